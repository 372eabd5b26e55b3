//! `tollgate`: every part in one binary. `main` parses the command line,
//! loads the config ([`config`], the one loader) and calls one command:
//! `serve` (gateway, pipeline and query service in one process), `proxy`,
//! `ingest` and `query` (the same parts apart), `compact`, `gen-lake`,
//! `simulate`, `keys`, `demo` and `bench` (the measuring tools).
//! [`pipeline`] wires the spool's drain; [`query`] the query service's
//! settings.

mod bench;
mod budgets;
mod config;
mod demo;
mod pipeline;
mod query;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tollgate_collector::Server;
use tollgate_collector::proxy::auth;
use tollgate_collector::upstream::simulate::{self, SimSettings};

use crate::config::Config;

// Query scans make many short-lived buffers: glibc's allocator spent a fifth
// of a lake scan in malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "OpenAI-compatible LLM gateway with a usage ledger"
)]
struct Cli {
    /// Log filter, e.g. `info` or `tollgate_collector=debug` (or RUST_LOG).
    #[arg(long, global = true, env = "TOLLGATE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with the given config.
    Serve {
        #[arg(long, short, default_value = "tollgate.toml")]
        config: PathBuf,
        /// Overrides `gateway.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run the gateway and its Kafka forwarder only; `tollgate ingest`
    /// processes write the lake.
    Proxy {
        #[arg(long, short, default_value = "tollgate.toml")]
        config: PathBuf,
        /// Overrides `gateway.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run one Kafka consumer-group member that writes the Parquet lake.
    Ingest {
        #[arg(long, short, default_value = "tollgate.toml")]
        config: PathBuf,
        /// Where `/healthz` and `/metrics` are served.
        #[arg(long, default_value = "127.0.0.1:8002")]
        listen: SocketAddr,
    },
    /// Serve SQL (HTTP and the PostgreSQL wire) and the reports over the
    /// lake, as `[query]` in the config says.
    Query {
        #[arg(long, short, default_value = "tollgate.toml")]
        config: PathBuf,
    },
    /// Write a synthetic lake (for trying the query service and its benchmark).
    GenLake(query::GenLakeArgs),
    /// Merge the small Parquet files of each closed hour of the lake.
    Compact {
        #[arg(long, short, default_value = "tollgate.toml")]
        config: PathBuf,
        /// Only this day (YYYY-MM-DD); default: every closed hour.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
    },
    /// Run a gateway with simulated deepseek-r1 and qwq-32b upstreams and
    /// steady sample traffic, printing each request's ledger entry.
    Demo(demo::DemoArgs),
    /// Serve a simulated OpenAI-compatible upstream.
    Simulate(SimulateArgs),
    /// Measuring tools for scripts/bench.sh (load generator, pipeline
    /// figures); not needed to run the gateway.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Manage consumer API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key (shown once) and its config line.
    New,
    /// Read a key from stdin and print its `sha256:` config form.
    Hash,
}

#[derive(Args)]
struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 0.0)]
    tokens_per_s: f64,
    #[arg(long, default_value_t = 64)]
    output_tokens: u32,
    #[arg(long, default_value_t = 0)]
    reasoning_tokens: u32,
    #[arg(long, default_value_t = 0)]
    cached_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value_t = 503)]
    error_status: u16,
    /// Report no usage at all.
    #[arg(long)]
    no_usage: bool,
    /// Put cumulative usage in every streamed chunk.
    #[arg(long)]
    usage_every_chunk: bool,
    /// `openai` or `deepseek` (prompt_cache_hit_tokens style).
    #[arg(long, default_value = "openai")]
    usage_style: String,
    /// Break every stream after this many chunks.
    #[arg(long)]
    fail_after_chunks: Option<u32>,
    /// Require this bearer key on every request.
    #[arg(long, env = "TOLLGATE_SIM_API_KEY", hide_env_values = true)]
    require_api_key: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // One line with its causes, never a backtrace: an error here is the
        // user's to read (a config key, a port in use), not a crash.
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own table; only errors interrupt it by default.
    let default = match (&cli.command, cli.log.as_str()) {
        (Command::Demo(_), "info") => "error".to_string(),
        _ => cli.log.clone(),
    };
    let filter = std::env::var("RUST_LOG").unwrap_or(default);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).context("bad log filter")?)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs sent to a file or a
        // collector stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve { config, listen } => serve(config, listen, pipeline::Role::All).await,
        Command::Proxy { config, listen } => serve(config, listen, pipeline::Role::ProxyOnly).await,
        Command::Ingest { config, listen } => {
            pipeline::ingest(&Config::load(&config)?, listen, shutdown_signal()).await
        }
        Command::Compact { config, date } => {
            // The lake's object-store client runs its own runtime: block
            // outside this one.
            let config = Config::load(&config)?;
            tokio::task::spawn_blocking(move || compact(&config, date)).await?
        }
        Command::Query { config } => run_query(config).await,
        Command::GenLake(args) => {
            tokio::task::spawn_blocking(move || query::gen_lake(&args)).await?
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Simulate(args) => run_simulator(args).await,
        Command::Bench(command) => bench::run(command).await,
        Command::Keys { command } => keys(command),
    }
}

async fn serve(
    path: PathBuf,
    listen: Option<SocketAddr>,
    role: pipeline::Role,
) -> anyhow::Result<()> {
    let mut config = Config::load(&path)?;
    if let Some(addr) = listen {
        config.collector.gateway.listen = addr;
    }
    let (spool, pipeline) = pipeline::start(&config, role).await?;
    let probe = Arc::new(query::Probe {
        instance: config.collector.gateway.instance.clone(),
        spool: config.pipeline.spool_dir.display().to_string(),
        backlog: spool.backlog(),
        tap: std::sync::OnceLock::new(),
    });
    let query = match role {
        pipeline::Role::All => query::start(&config, Some(probe.clone())).await?,
        pipeline::Role::ProxyOnly => None,
    };
    let server = Server::bind(
        &config.collector,
        spool,
        config.pipeline.queue_capacity,
        pipeline.metrics(),
    )
    .await?;
    let _ = probe.tap.set(server.tap_counters());
    budgets::rebuild(&config, server.gateway()).await?;
    let addr = server.local_addr()?;
    println!("tollgate gateway listening on http://{addr}");
    println!("usage lake -> {}", config.pipeline.lake);
    let summary = server.run(shutdown_signal()).await?;
    if let Some(q) = query {
        q.stop();
    }
    let (stats, forwarded) = (pipeline.stats.clone(), pipeline.forwarded.clone());
    tokio::task::spawn_blocking(move || pipeline.finish()).await??;
    tracing::info!(
        spooled = summary.events_written,
        dropped = summary.events_dropped,
        forwarded = forwarded
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed),
        rows_published = stats.rows.load(std::sync::atomic::Ordering::Relaxed),
        "gateway stopped"
    );
    Ok(())
}

async fn run_query(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let Some(service) = query::start(&config, None).await? else {
        anyhow::bail!(
            "{}: no [query] table; add one (see examples/tollgate.toml)",
            path.display()
        );
    };
    shutdown_signal().await;
    service.stop();
    Ok(())
}

async fn run_simulator(a: SimulateArgs) -> anyhow::Result<()> {
    let settings = SimSettings {
        latency_ms: a.latency_ms,
        tokens_per_s: a.tokens_per_s,
        output_tokens: a.output_tokens,
        reasoning_tokens: a.reasoning_tokens,
        cached_tokens: a.cached_tokens,
        error_rate: a.error_rate,
        error_status: a.error_status,
        usage: !a.no_usage,
        usage_every_chunk: a.usage_every_chunk,
        usage_style: a.usage_style.parse().map_err(anyhow::Error::msg)?,
        fail_after_chunks: a.fail_after_chunks,
        require_api_key: a.require_api_key,
    };
    settings.check().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    println!(
        "tollgate simulator listening on http://{}",
        listener.local_addr()?
    );
    simulate::serve(listener, settings, shutdown_signal()).await?;
    Ok(())
}

fn compact(config: &Config, date: Option<chrono::NaiveDate>) -> anyhow::Result<()> {
    let lake = pipeline::lake(&config.pipeline)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} hours  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report =
        tollgate_ingest::compact::compact(&lake, date, chrono::Utc::now(), |i, n, dir| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(dir.to_string());
        })?;
    bar.finish_and_clear();
    println!(
        "compacted {} hours: {} files -> {} ({} rows){}",
        report.hours,
        report.files_in,
        report.files_out,
        report.rows,
        if report.finished_interrupted > 0 {
            format!(
                "; finished an interrupted run ({} inputs removed)",
                report.finished_interrupted
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::New => {
            let (key, line) =
                auth::new_key().map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
            println!("key: {key}");
            println!("(shown once: give it to the consumer now; the gateway keeps only its hash)");
            println!("api_keys = [\"{line}\"]");
        }
        KeysCommand::Hash => {
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            println!("{}", auth::hash_key(&key));
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

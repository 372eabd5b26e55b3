//! `tollgate demo`: a gateway with two simulated upstreams, a demo consumer
//! and steady sample traffic, printing each request's ledger entry as it is
//! written, so routing, fallback and cost are visible at once.
//!
//! deepseek-r1 is slower, pricier and fails a share of requests with 503;
//! its route falls back to qwq-32b, which is fast and cheap.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rust_decimal::Decimal;
use tollgate_collector::Server;
use tollgate_collector::proxy::auth;
use tollgate_ingest::Lake;
use tollgate_schemas::UsageEvent;

use crate::config::Config;

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The query service (SQL and reports over the demo's lake).
    #[arg(long, default_value = "127.0.0.1:8001")]
    query_listen: SocketAddr,
    /// The query service's PostgreSQL wire endpoint.
    #[arg(long, default_value = "127.0.0.1:5433")]
    pg_listen: SocketAddr,
    /// Where the demo keeps its spool and its Parquet lake.
    #[arg(long, default_value = "data/demo")]
    data: PathBuf,
    /// Pause between sample requests.
    #[arg(long, default_value_t = 600)]
    interval_ms: u64,
    /// Stop after this many sample requests (default: run until Ctrl-C).
    #[arg(long)]
    requests: Option<u64>,
    /// Team demo's daily deepseek-r1 budget, USD; alerts at 50%, 80% and
    /// 100%, then R1 requests are served by qwq-32b.
    #[arg(long, default_value = "0.05")]
    budget_usd: rust_decimal::Decimal,
    /// Share of deepseek-r1 requests the simulated upstream fails.
    #[arg(long, default_value_t = 0.3)]
    error_rate: f64,
}

/// The demo's config; `keys` are the key lines of demo-app and research-bot,
/// `admin` the query service's admin token.
fn config_text(args: &DemoArgs, keys: [&str; 2], admin: &str) -> String {
    format!(
        r#"
[gateway]
listen = "{listen}"
instance = "demo"

[pipeline]
spool_dir = {spool:?}
lake = {lake:?}
flush_ms = 500

[query]
listen = "{query_listen}"
pg_listen = "{pg_listen}"
admin_token = "{admin}"

# Budget, forecast, anomaly and pipeline alerts (GET /v1/alerts, the
# `alerts` table); add [[alerts.webhooks]] to have them sent.
[alerts]
outbox_dir = {outbox:?}

[upstreams.sim-deepseek]
kind = "simulated"
latency_ms = 350
tokens_per_s = 400
output_tokens = 120
reasoning_tokens = 70
cached_tokens = 24
error_rate = {error_rate}
error_status = 503
usage_style = "deepseek"

[upstreams.sim-qwq]
kind = "simulated"
latency_ms = 60
tokens_per_s = 900
output_tokens = 90
reasoning_tokens = 40

[[routes]]
model = "deepseek-r1"
targets = [{{ upstream = "sim-deepseek", model = "deepseek-reasoner" }}]
fallback = ["qwq-32b"]
fallback_on = ["connect", "timeout", "5xx", "429"]

[[routes]]
model = "qwq-32b"
targets = [{{ upstream = "sim-qwq", model = "qwq-32b" }}]

[[consumers]]
name = "demo-app"
team = "demo"
api_keys = ["{key_line}"]

[[consumers]]
name = "research-bot"
team = "research"
api_keys = ["{research_line}"]

# R1 needs far more GPUs than QwQ: cap it per consumer; past the cap the
# request is served by QwQ-32B instead of failing.
[[rate_limits]]
name = "r1-tokens"
model = "deepseek-r1"
key = "consumer"
tokens_per_minute = 1500
default_output_tokens = 512
on_limit = {{ fallback = "qwq-32b" }}

# A small daily R1 budget for the team; once spent, R1 requests downgrade.
[[budgets]]
name = "demo-r1-daily"
team = "demo"
model = "deepseek-r1"
usd = "{budget_usd}"
period = "day"
alert_at = [0.5, 0.8, 1.0]
on_exhausted = {{ downgrade = "qwq-32b" }}
"#,
        listen = args.listen,
        query_listen = args.query_listen,
        pg_listen = args.pg_listen,
        spool = args.data.join("spool").display().to_string(),
        lake = args.data.join("lake").display().to_string(),
        outbox = args.data.join("alerts").display().to_string(),
        error_rate = args.error_rate,
        budget_usd = args.budget_usd,
        key_line = keys[0],
        research_line = keys[1],
    )
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let new_key = || auth::new_key().map_err(|e| anyhow::anyhow!("no system randomness: {e}"));
    let (key, key_line) = new_key()?;
    let (research, research_line) = new_key()?;
    let (admin, _) = new_key()?;
    let admin = admin.replacen("tg-", "tg-admin-", 1);
    let config = Config::parse(
        &config_text(&args, [&key_line, &research_line], &admin),
        "demo",
        |_| None,
    )?;
    let (spool, pipeline) = crate::pipeline::start(&config, crate::pipeline::Role::All).await?;
    let probe = std::sync::Arc::new(crate::query::Probe {
        instance: config.collector.gateway.instance.clone(),
        spool: config.pipeline.spool_dir.display().to_string(),
        backlog: spool.backlog(),
        tap: std::sync::OnceLock::new(),
    });
    let query = crate::query::start(&config, Some(probe.clone())).await?;
    let server = Server::bind(
        &config.collector,
        spool,
        config.pipeline.queue_capacity,
        pipeline.metrics(),
    )
    .await?;
    let _ = probe.tap.set(server.tap_counters());
    crate::budgets::rebuild(&config, server.gateway()).await?;
    let addr = server.local_addr()?;
    let lake = Lake::open(args.data.join("lake"))?;
    let already: HashSet<PathBuf> = lake.files()?.into_iter().collect();

    println!("Tollgate demo: gateway on http://{addr}");
    println!(
        "  routes: deepseek-r1 -> sim-deepseek (deepseek-reasoner, fails {:.0}% with 503) -> falls back to qwq-32b",
        args.error_rate * 100.0
    );
    println!("          qwq-32b     -> sim-qwq");
    println!(
        "  limits: deepseek-r1 1500 tokens/min per consumer, then qwq-32b; R1 budget ${}/day for team demo, then qwq-32b",
        args.budget_usd
    );
    println!("          state: curl -s http://{addr}/v1/limits -H 'Authorization: Bearer {key}'");
    println!("  demo consumer key: {key}");
    println!(
        "  try it:  curl -s http://{addr}/v1/chat/completions -H 'Authorization: Bearer {key}' \\"
    );
    println!(
        "             -H 'content-type: application/json' -d '{{\"model\":\"deepseek-r1\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!(
        "  usage lake -> {} (rows appear as the pipeline publishes them)",
        lake.describe()
    );
    println!("  research-bot key (team research): {research}");
    if let Some(q) = &query {
        println!(
            "  dashboard: http://{}/  (sign in with the admin token {admin}, or a consumer key)",
            q.http
        );
        println!(
            "  its ledger: curl -s http://{}/v1/reports/roi -H 'Authorization: Bearer {key}'",
            q.http
        );
        if let Some(pg) = q.pg {
            println!(
                "              PGPASSWORD={key} psql -h {} -p {} -U demo-app -d tollgate -c 'SELECT * FROM daily_cost'",
                pg.ip(),
                pg.port()
            );
        }
    }
    println!();
    println!(
        "{:<12} {:<6} {:<18} {:>6} {:>7} {:>7} {:>6} {:>12}  note",
        "requested", "mode", "served", "status", "in", "out", "ms", "cost $"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async move {
        tokio::select! {
            _ = stop_rx => {},
            () = crate::shutdown_signal() => {},
        }
    }));
    let tail_stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let tailer = tokio::spawn(tail(lake, already, tail_stop.clone()));

    let traffic = traffic(addr, [key, research], args.interval_ms, args.requests);
    tokio::select! {
        r = traffic => r?,
        () = crate::shutdown_signal() => {},
    }
    let _ = stop_tx.send(());
    let summary = server_task.await.context("gateway task")??;
    tokio::task::spawn_blocking(move || pipeline.finish()).await??;
    tail_stop.notify_one();
    let totals = tailer.await.context("tail task")?;
    println!();
    println!(
        "{} events spooled, {} dropped",
        summary.events_written, summary.events_dropped
    );
    for (model, (n, cost)) in totals {
        println!("  {model:<20} {n:>5} requests  ${}", cost.normalize());
    }
    Ok(())
}

/// Sends sample requests: mostly deepseek-r1, some qwq-32b, half streamed;
/// one in four from research-bot.
async fn traffic(
    addr: SocketAddr,
    keys: [String; 2],
    interval_ms: u64,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/chat/completions");
    let prompts = [
        "Summarise this quarter's LLM spend by team.",
        "Is switching from DeepSeek-R1 to QwQ-32B worth it for search?",
        "Write a haiku about rate limits.",
        "Explain prompt caching in one paragraph.",
    ];
    let mut n = 0u64;
    while limit.is_none_or(|l| n < l) {
        let model = if fastrand::u8(0..10) < 7 {
            "deepseek-r1"
        } else {
            "qwq-32b"
        };
        let stream = fastrand::bool();
        let body = serde_json::json!({
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": prompts[(n as usize) % prompts.len()]}],
        });
        let (key, feature) = if n % 4 == 3 {
            (&keys[1], "research")
        } else {
            (&keys[0], "demo")
        };
        let sent = client
            .post(&url)
            .bearer_auth(key)
            .header(
                "x-tollgate-tags",
                format!("feature={feature},prompt={}", n as usize % prompts.len()),
            )
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        match sent {
            Ok(resp) => {
                // Read the whole answer, streamed or not, as a client would.
                let _ = resp.bytes().await;
            }
            Err(e) => eprintln!("demo request failed: {e}"),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
    Ok(())
}

/// Prints the rows of each Parquet file the pipeline publishes; returns
/// requests and cost per served model.
async fn tail(
    lake: Lake,
    mut seen: HashSet<PathBuf>,
    stop: std::sync::Arc<tokio::sync::Notify>,
) -> BTreeMap<String, (u64, Decimal)> {
    let mut totals: BTreeMap<String, (u64, Decimal)> = BTreeMap::new();
    loop {
        let stopping = tokio::select! {
            () = stop.notified() => true,
            () = tokio::time::sleep(Duration::from_millis(200)) => false,
        };
        let mut fresh: Vec<UsageEvent> = Vec::new();
        for file in lake.files().unwrap_or_default() {
            if seen.insert(file.clone()) {
                fresh.extend(lake.read_file(&file).unwrap_or_default());
            }
        }
        fresh.sort_by_key(|e| e.ts_end);
        for e in fresh {
            print_event(&e);
            let key = e.served_model.clone().unwrap_or_else(|| "(none)".into());
            let entry = totals.entry(key).or_default();
            entry.0 += 1;
            entry.1 += e.cost_usd.map(|c| c.decimal()).unwrap_or_default();
        }
        if stopping {
            return totals;
        }
    }
}

fn print_event(e: &UsageEvent) {
    let note = if e.rate_limited {
        format!(
            "{} -> served by {} ({})",
            e.fallback_reason.as_deref().unwrap_or("refused"),
            e.served_model.as_deref().unwrap_or("-"),
            e.limit_key.as_deref().unwrap_or("?")
        )
    } else if e.fallback {
        format!(
            "fallback from {} ({})",
            e.fallback_from.as_deref().unwrap_or("?"),
            e.fallback_reason.as_deref().unwrap_or("?")
        )
    } else {
        String::new()
    };
    println!(
        "{:<12} {:<6} {:<18} {:>6} {:>7} {:>7} {:>6} {:>12}  {note}",
        e.requested_model.as_deref().unwrap_or("-"),
        if e.stream { "stream" } else { "json" },
        e.served_model.as_deref().unwrap_or("-"),
        e.status,
        e.input_tokens,
        e.output_tokens,
        e.latency_ms,
        e.cost_usd
            .map_or_else(|| "null".to_string(), |c| c.to_string()),
    );
}

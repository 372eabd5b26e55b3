//! The usage pipeline as `tollgate serve` runs it: the spool the tap writes
//! to, and what drains it. Without `[pipeline.kafka]` the spool drains
//! straight into the lake in this process (embedded mode); with it, a
//! forwarder sends the spool to Kafka and an ingester (one member of the
//! consumer group) writes the lake.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::Either;
use tollgate_ingest::config::{KafkaConfig, PipelineConfig};
use tollgate_ingest::forward::{self, ForwardStats};
use tollgate_ingest::{Lake, Stats};
use tollgate_schemas::metrics;
use tollgate_spool::SpoolWriter;

use crate::config::Config;

pub struct Pipeline {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
    pub stats: Arc<Stats>,
    pub forwarded: Arc<ForwardStats>,
}

/// The lake: a local directory or `s3://bucket/prefix`.
pub fn lake(p: &PipelineConfig) -> anyhow::Result<Lake> {
    p.open_lake()
        .with_context(|| format!("opening the lake {}", p.lake))
}

/// Creates the topic when it is missing, or says why it could not.
pub async fn ensure_topic(k: &KafkaConfig) -> anyhow::Result<()> {
    match tollgate_ingest::kafka::ensure_topic(&k.source(), k.partitions).await {
        Ok(true) => {
            tracing::info!(topic = %k.topic, partitions = k.partitions, "created the usage topic")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(topic = %k.topic, error = %e, "could not create the usage topic; create it by hand if it does not exist")
        }
    }
    Ok(())
}

fn spawn(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    Ok(std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)?)
}

/// Which parts of the pipeline a process runs besides the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: the spool's drain and, with Kafka, an ingester too.
    All,
    /// `proxy`: forward to Kafka only; `tollgate ingest` writes the lake.
    ProxyOnly,
}

/// Opens the spool (recovering it if the last stop was a crash) and starts
/// draining it. Returns the writer for the tap.
pub async fn start(config: &Config, role: Role) -> anyhow::Result<(SpoolWriter, Pipeline)> {
    let p = &config.pipeline;
    let drain_for = Duration::from_millis(p.drain_ms);
    if role == Role::ProxyOnly && p.kafka.is_none() {
        anyhow::bail!(
            "`tollgate proxy` forwards to Kafka: set [pipeline] kafka = {{ brokers = \"...\" }}, or use `tollgate serve`"
        );
    }
    let (writer, reader, recovery) = tollgate_spool::open(p.spool_options())
        .with_context(|| format!("opening the spool {}", p.spool_dir.display()))?;
    recovery.log();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let forwarded = Arc::new(ForwardStats::default());
    let lake = lake(p)?;
    let opts = p.ingest_options();
    let mut threads = Vec::new();
    match &p.kafka {
        None => {
            let instance = config.collector.gateway.instance.clone();
            let (stop, stats) = (stop.clone(), stats.clone());
            threads.push(spawn("tollgate-ingest", move || {
                tollgate_ingest::embedded::run(
                    &lake, reader, &instance, &opts, &stop, drain_for, &stats,
                )
                .context("embedded ingest")
            })?);
        }
        Some(k) => {
            ensure_topic(k).await?;
            let cfg = forward::ForwarderConfig {
                fault_fatal_after_batches: std::env::var("TOLLGATE_FAULT_FORWARDER_FATAL_AFTER")
                    .ok()
                    .and_then(|v| v.parse().ok()),
                ..k.forwarder()
            };
            {
                let (stop, forwarded) = (stop.clone(), forwarded.clone());
                threads.push(spawn("tollgate-forward", move || {
                    forward::run(&cfg, reader, &stop, drain_for, &forwarded)
                        .context("kafka forwarder")
                })?);
            }
            if role == Role::All {
                let source = k.source();
                let (stop, stats) = (stop.clone(), stats.clone());
                threads.push(spawn("tollgate-ingest", move || {
                    tollgate_ingest::kafka::run(&lake, &source, &opts, &stop, &stats)
                        .context("kafka ingester")
                })?);
            }
        }
    }
    Ok((
        writer,
        Pipeline {
            stop,
            threads,
            stats,
            forwarded,
        },
    ))
}

impl Pipeline {
    /// Call after the tap has closed: drains what it can in `drain_ms`.
    pub fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        let mut first_error = None;
        for t in self.threads {
            let result = t
                .join()
                .map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))
                .and_then(|r| r);
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "pipeline stopped with an error");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// `tollgate ingest`: one Kafka consumer-group member writing the lake,
/// with `/healthz` and `/metrics` on `listen`.
pub async fn ingest(
    config: &Config,
    listen: std::net::SocketAddr,
    stop_signal: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let p = &config.pipeline;
    let Some(k) = &p.kafka else {
        anyhow::bail!(
            "`tollgate ingest` reads Kafka: set [pipeline] kafka = {{ brokers = \"...\" }} (without Kafka, `tollgate serve` ingests in-process)"
        );
    };
    ensure_topic(k).await?;
    let lake = lake(p)?;
    let opts = p.ingest_options();
    let source = k.source();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let thread = {
        let (stop, stats) = (stop.clone(), stats.clone());
        spawn("tollgate-ingest", move || {
            tollgate_ingest::kafka::run(&lake, &source, &opts, &stop, &stats)
                .context("kafka ingester")
        })?
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!(
        "tollgate ingest ({} -> {}, group {}) listening on http://{}",
        k.topic,
        p.lake,
        k.group,
        listener.local_addr()?
    );
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get({
                let stats = stats.clone();
                let mut registry = metrics::Registry::default();
                registry.register_collector(Box::new(stats.clone()));
                let registry = Arc::new(registry);
                move |headers: axum::http::HeaderMap| {
                    let registry = registry.clone();
                    async move {
                        let accept = headers
                            .get(axum::http::header::ACCEPT)
                            .and_then(|v| v.to_str().ok());
                        let (kind, text) = metrics::render(&registry, accept);
                        ([(axum::http::header::CONTENT_TYPE, kind)], text)
                    }
                }
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    // An ingester that stopped on its own (a refused client setting, a lost
    // lake) ends the process with its error, rather than answering
    // `/healthz` while it ingests nothing.
    let joined = tokio::task::spawn_blocking(move || thread.join());
    let result = match futures_util::future::select(std::pin::pin!(stop_signal), joined).await {
        Either::Left(((), joined)) => {
            stop.store(true, Ordering::Release);
            joined.await
        }
        Either::Right((result, _)) => result,
    };
    server.abort();
    stop.store(true, Ordering::Release);
    result?.map_err(|_| anyhow::anyhow!("the ingest thread panicked"))??;
    tracing::info!(
        rows = stats.rows.load(Ordering::Relaxed),
        files = stats.files.load(Ordering::Relaxed),
        dead_letters = stats.dead_letters.load(Ordering::Relaxed),
        duplicates_dropped = stats.duplicates.load(Ordering::Relaxed),
        "ingester stopped"
    );
    Ok(())
}

impl Pipeline {
    /// What this pipeline shows on the gateway's `/metrics`.
    pub fn metrics(&self) -> Vec<Box<dyn metrics::Collector>> {
        vec![
            Box::new(self.stats.clone()),
            Box::new(self.forwarded.clone()),
        ]
    }
}

//! The usage pipeline as `tollgate serve` runs it: the spool the tap writes
//! to, and what drains it. Without `[pipeline.kafka]` the spool drains
//! straight into the lake in this process (embedded mode).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tollgate_collector::config::{Config, PipelineConfig};
use tollgate_ingest::{IngestOptions, Lake, Stats};
use tollgate_spool::{SpoolOptions, SpoolWriter};

/// How long a stopping gateway keeps draining the spool; the rest waits
/// in the spool for the next start.
const DRAIN_FOR: Duration = Duration::from_secs(10);

pub struct Pipeline {
    stop: Arc<AtomicBool>,
    drain: JoinHandle<anyhow::Result<()>>,
    pub stats: Arc<Stats>,
}

pub fn spool_options(p: &PipelineConfig) -> SpoolOptions {
    SpoolOptions {
        segment_bytes: p.spool_segment_bytes,
        max_bytes: p.spool_max_bytes,
        commit_interval: Duration::from_millis(p.commit_ms),
        commit_records: p.commit_events,
        ..SpoolOptions::new(&p.spool_dir)
    }
}

pub fn ingest_options(p: &PipelineConfig) -> IngestOptions {
    IngestOptions {
        flush_interval: Duration::from_millis(p.flush_ms),
        flush_rows: p.flush_rows,
        max_event_bytes: p.max_event_bytes,
    }
}

/// A local lake directory; object-store lakes are named `s3://...`.
pub fn lake_dir(p: &PipelineConfig) -> anyhow::Result<PathBuf> {
    if p.lake.contains("://") {
        anyhow::bail!(
            "pipeline.lake = {:?}: only local directories are supported by this build",
            p.lake
        );
    }
    Ok(PathBuf::from(&p.lake))
}

/// Opens the spool (recovering it if the last stop was a crash) and starts
/// draining it. Returns the writer for the tap.
pub fn start(config: &Config) -> anyhow::Result<(SpoolWriter, Pipeline)> {
    let p = &config.pipeline;
    let (writer, reader, recovery) = tollgate_spool::open(spool_options(p))
        .with_context(|| format!("opening the spool {}", p.spool_dir.display()))?;
    recovery.log();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let lake = Lake::open(lake_dir(p)?).context("opening the lake")?;
    let opts = ingest_options(p);
    let instance = config.gateway.instance.clone();
    let drain = std::thread::Builder::new()
        .name("tollgate-ingest".into())
        .spawn({
            let stop = stop.clone();
            let stats = stats.clone();
            move || {
                tollgate_ingest::embedded::run(
                    &lake, reader, &instance, &opts, &stop, DRAIN_FOR, &stats,
                )
                .context("embedded ingest")
            }
        })?;
    Ok((writer, Pipeline { stop, drain, stats }))
}

impl Pipeline {
    /// Call after the tap has closed: drains what it can in `DRAIN_FOR`.
    pub fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        self.drain
            .join()
            .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?
    }
}

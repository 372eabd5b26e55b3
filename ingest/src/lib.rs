//! The usage pipeline past the gateway's spool: [`forward`] drains the
//! spool into Kafka (idempotent producer, acks=all), and the ingesters take
//! the usage stream (Kafka, or the local spool in embedded mode) into a
//! Hive-partitioned Parquet lake, exactly once.
//!
//! The path of an event: [`decode`] (bad messages to [`dead_letter`]) ->
//! [`columns`] (Arrow) -> [`lake`] (Parquet, atomic publish, progress in
//! file names, on the store and in the layout `tollgate_lake` owns) ->
//! the source's position is saved ([`kafka`] for a consumer
//! group member, [`embedded`] for the gateway's own spool). [`compact`]
//! merges the small files of closed hours. [`config`] is the `[pipeline]`
//! section that sets all of them; [`publisher`] runs the lake's writes off
//! the reading thread; [`synth`] makes realistic synthetic events for
//! `gen-lake` and the benchmarks.

pub mod columns;
pub mod compact;
pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod embedded;
pub mod forward;
pub mod kafka;
pub mod lake;
pub mod publisher;
pub mod synth;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use tollgate_schemas::metrics::{Collector, counter, gauge};

pub use lake::Lake;

#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// A batch is published at least this often while events arrive...
    pub flush_interval: Duration,
    /// ...or once it holds this many rows.
    pub flush_rows: usize,
    /// Larger messages go to dead letters.
    pub max_event_bytes: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(2),
            flush_rows: 200_000,
            max_event_bytes: 1 << 20,
        }
    }
}

/// What an ingester has done; shared with whoever reports it.
#[derive(Debug, Default)]
pub struct Stats {
    pub rows: AtomicU64,
    pub files: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Copies of already-ingested events (a producer's replay) dropped.
    pub duplicates: AtomicU64,
    /// Partitions this ingester holds now.
    pub partitions: AtomicU64,
    /// Publishes the lake refused (each retried from the spool).
    pub publish_failures: AtomicU64,
}

impl Stats {
    /// Counts a published batch.
    pub fn published(&self, p: &lake::Published) {
        use std::sync::atomic::Ordering::Relaxed;
        self.rows.fetch_add(p.rows as u64, Relaxed);
        self.files.fetch_add(p.files.len() as u64, Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Spool(#[from] tollgate_spool::SpoolError),
    #[error("lake store: {0}")]
    Store(String),
    #[error(transparent)]
    Lake(#[from] tollgate_lake::LakeError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl IngestError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IngestError {
        let path = path.to_path_buf();
        move |source| IngestError::Io { path, source }
    }
}

/// The ingester's counters on `/metrics`.
impl Collector for Stats {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self;
        counter(
            &mut e,
            "tollgate_ingest_rows",
            "Rows published to the lake.",
            &s.rows,
        )?;
        counter(
            &mut e,
            "tollgate_ingest_files",
            "Parquet files published.",
            &s.files,
        )?;
        counter(
            &mut e,
            "tollgate_ingest_dead_letters",
            "Messages sent to dead letters.",
            &s.dead_letters,
        )?;
        counter(
            &mut e,
            "tollgate_ingest_publish_failures",
            "Writes the lake refused; the events were kept and retried.",
            &s.publish_failures,
        )?;
        counter(
            &mut e,
            "tollgate_ingest_duplicates",
            "Replayed copies dropped by event id.",
            &s.duplicates,
        )?;
        gauge(
            &mut e,
            "tollgate_ingest_partitions",
            "Kafka partitions held now.",
            &s.partitions,
        )
    }
}

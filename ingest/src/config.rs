//! `[pipeline]`: where usage events go after the tap. The spool (its
//! directory, bounds and group commit), the lake (a directory or
//! `s3://bucket/prefix` with its object-store options), the ingesters'
//! flush policy, and `[pipeline.kafka]` when a cluster sits between the
//! spool and the lake. Its client settings (`properties`: security, SASL,
//! TLS) are one block that every client of the cluster gets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tollgate_schemas::config::Invalid;
use tollgate_spool::SpoolOptions;
use toml::Spanned;

use crate::forward::ForwarderConfig;
use crate::kafka::KafkaSource;
use crate::{IngestError, IngestOptions, Lake};

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub spool_dir: PathBuf,
    /// A local directory, or `s3://bucket/prefix`.
    pub lake: String,
    /// Object store settings for an `s3://` lake (`endpoint`, `region`,
    /// `access_key_id`, `secret_access_key`, `allow_http`, ...); the
    /// `AWS_*` environment variables fill in what is not given.
    pub lake_options: BTreeMap<String, String>,
    /// Events held in memory before the tap counts overflow.
    pub queue_capacity: usize,
    pub spool_max_bytes: u64,
    pub spool_segment_bytes: u64,
    /// Group commit: a batch is made durable within this many ms...
    pub commit_ms: u64,
    /// ...or once this many events wait.
    pub commit_events: usize,
    /// Parquet files are written at least this often while events arrive...
    pub flush_ms: u64,
    /// ...or once this many rows are buffered.
    pub flush_rows: usize,
    /// Messages larger than this go to dead letters, bytes.
    pub max_event_bytes: usize,
    /// How long a stopping gateway keeps draining its spool; what is left
    /// stays there for the next start.
    pub drain_ms: u64,
    pub kafka: Option<KafkaConfig>,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    /// Consumer group of the ingesters.
    pub group: String,
    /// Partitions to create the topic with when it does not exist.
    pub partitions: i32,
    /// Static group membership (`group.instance.id`): a restarted ingester
    /// with the same name takes its partitions back at once instead of
    /// waiting for its old session to expire. Unique per ingester.
    pub member: Option<String>,
    /// Extra librdkafka properties, passed through as given to every
    /// client (producer, consumers, admin).
    pub properties: BTreeMap<String, String>,
}

/// `[pipeline]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    spool_dir: Option<PathBuf>,
    lake: Option<Spanned<String>>,
    #[serde(default)]
    lake_options: BTreeMap<String, String>,
    queue_capacity: Option<usize>,
    spool_max_bytes: Option<u64>,
    spool_segment_bytes: Option<u64>,
    commit_ms: Option<u64>,
    commit_events: Option<usize>,
    flush_ms: Option<u64>,
    flush_rows: Option<usize>,
    max_event_bytes: Option<usize>,
    drain_ms: Option<u64>,
    kafka: Option<RawKafka>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    topic: Option<String>,
    group: Option<String>,
    partitions: Option<i32>,
    member: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

impl PipelineConfig {
    /// Defaults for what is not written; sizes below their floor are raised
    /// to it.
    pub fn from_raw(p: RawPipeline) -> Result<Self, Invalid> {
        let lake = match p.lake {
            None => "data/lake".to_string(),
            Some(l) if l.get_ref().trim().is_empty() => {
                return Err(Invalid::at(l.span(), "pipeline.lake", "must not be empty"));
            }
            Some(l) => l.into_inner(),
        };
        Ok(Self {
            spool_dir: p.spool_dir.unwrap_or_else(|| PathBuf::from("data/spool")),
            lake,
            lake_options: p.lake_options,
            queue_capacity: p.queue_capacity.unwrap_or(65_536).max(1),
            spool_max_bytes: p.spool_max_bytes.unwrap_or(4 << 30),
            spool_segment_bytes: p.spool_segment_bytes.unwrap_or(64 << 20).max(4096),
            commit_ms: p.commit_ms.unwrap_or(5),
            commit_events: p.commit_events.unwrap_or(1024).max(1),
            flush_ms: p.flush_ms.unwrap_or(2000).max(1),
            flush_rows: p.flush_rows.unwrap_or(200_000).max(1),
            max_event_bytes: p.max_event_bytes.unwrap_or(1 << 20),
            drain_ms: p.drain_ms.unwrap_or(10_000),
            kafka: p.kafka.map(|k| KafkaConfig {
                brokers: k.brokers,
                topic: k.topic.unwrap_or_else(|| "tollgate.usage.v1".to_string()),
                group: k.group.unwrap_or_else(|| "tollgate-ingest".to_string()),
                partitions: k.partitions.unwrap_or(4).max(1),
                member: k.member,
                properties: k.properties,
            }),
        })
    }

    /// The spool the tap writes and the forwarder or embedded ingester reads.
    pub fn spool_options(&self) -> SpoolOptions {
        SpoolOptions {
            segment_bytes: self.spool_segment_bytes,
            max_bytes: self.spool_max_bytes,
            commit_interval: Duration::from_millis(self.commit_ms),
            commit_records: self.commit_events,
            ..SpoolOptions::new(&self.spool_dir)
        }
    }

    pub fn ingest_options(&self) -> IngestOptions {
        IngestOptions {
            flush_interval: Duration::from_millis(self.flush_ms),
            flush_rows: self.flush_rows,
            max_event_bytes: self.max_event_bytes,
        }
    }

    /// Opens the lake: a local directory or `s3://bucket/prefix`.
    pub fn open_lake(&self) -> Result<Lake, IngestError> {
        let options: Vec<(String, String)> = self.lake_options.clone().into_iter().collect();
        Lake::at(&self.lake, &options)
    }
}

impl KafkaConfig {
    /// What an ingester (one consumer-group member) reads.
    pub fn source(&self) -> KafkaSource {
        KafkaSource {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            member: self.member.clone(),
            properties: self.properties.clone().into_iter().collect(),
        }
    }

    /// What the forwarder's producer writes to, with the same client settings.
    pub fn forwarder(&self) -> ForwarderConfig {
        ForwarderConfig {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            properties: self.properties.clone(),
            fault_fatal_after_batches: None,
        }
    }
}

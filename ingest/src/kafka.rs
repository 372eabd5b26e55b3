//! The Kafka ingester: one member of a consumer group; the group splits
//! the topic's partitions between its members.
//!
//! Each partition is batched on its own, so a published file covers one
//! contiguous offset range `[start, end)` of one partition. Progress comes
//! from the lake itself: on assignment, the ingester lists the partition's
//! complete batches and skips every offset below the last one's end
//! (committed offsets only save re-reading). A revoked partition's
//! unpublished buffer is dropped before its next owner can start, so a
//! range is never published by two members. Copies that a replaying
//! producer left in the topic are dropped by event id.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tollgate_schemas::UsageEvent;
use uuid::Uuid;

use crate::decode::decode;
use tollgate_lake::layout::clean_source;

use crate::lake::Lake;
use crate::publisher::{Done, Inflight, Job, Publisher};
use crate::{IngestError, IngestOptions, Stats, dead_letter};

/// Event ids remembered per partition to drop replayed copies.
const RECENT_IDS: usize = 500_000;

#[derive(Debug, Clone)]
pub struct KafkaSource {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    /// `group.instance.id`, for static membership.
    pub member: Option<String>,
    pub properties: Vec<(String, String)>,
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub async fn ensure_topic(source: &KafkaSource, partitions: i32) -> Result<bool, IngestError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &source.brokers);
    let admin: AdminClient<DefaultClientContext> = with_properties(config, source).create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // The broker's default replication first; a single broker may want 1.
    for replication in [-1, 1] {
        let topic = NewTopic::new(
            &source.topic,
            partitions,
            TopicReplication::Fixed(replication),
        );
        let results = admin.create_topics([&topic], &opts).await?;
        match results.into_iter().next() {
            Some(Ok(_)) => return Ok(true),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(false),
            Some(Err((_, RDKafkaErrorCode::InvalidReplicationFactor))) if replication == -1 => {}
            Some(Err((_, code))) => {
                return Err(IngestError::Kafka(KafkaError::AdminOp(code)));
            }
            None => return Ok(false),
        }
    }
    Ok(false)
}

enum Change {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct Ctx {
    changes: Mutex<Vec<Change>>,
    /// Batches still being written: a revoke waits for them.
    inflight: Arc<Inflight>,
}

impl ClientContext for Ctx {}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // The next owner may start as soon as this returns: nothing of
            // these partitions may still be on its way to the lake.
            if !self.inflight.wait_idle(Duration::from_secs(120)) {
                tracing::error!(
                    "a publish outlasted the revoke wait; the event-id check is the safety net"
                );
            }
            if let Ok(mut c) = self.changes.lock() {
                c.push(Change::Revoked(partitions_of(tpl)));
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance
            && let Ok(mut c) = self.changes.lock()
        {
            c.push(Change::Assigned(partitions_of(tpl)));
        }
    }
}

/// One assigned partition.
struct Partition {
    source: String,
    /// End of the last published range: offsets below are in the lake.
    progress: Option<i64>,
    pending: Option<Pending>,
    recent: HashSet<Uuid>,
    recent_order: VecDeque<Uuid>,
}

struct Pending {
    start: i64,
    next: i64,
    events: Vec<UsageEvent>,
    since: Instant,
}

impl Partition {
    fn resume(lake: &Lake, source: String) -> Result<Partition, IngestError> {
        let mut complete = lake.recover_source(&source)?;
        complete.sort_by_key(|(_, end)| end.parse::<i64>().unwrap_or(-1));
        let progress = complete.last().and_then(|(_, end)| end.parse::<i64>().ok());
        let mut p = Partition {
            source,
            progress,
            pending: None,
            recent: HashSet::new(),
            recent_order: VecDeque::new(),
        };
        // Remember the ids of the latest batches: a replayed copy lands
        // shortly after its original.
        let mut ids = Vec::new();
        for (start, end) in complete.iter().rev() {
            if ids.len() >= RECENT_IDS {
                break;
            }
            for file in lake.batch_files(&p.source, start, end)? {
                ids.extend(lake.read_event_ids(&file)?);
            }
        }
        for id in ids.into_iter().rev() {
            p.remember(id);
        }
        Ok(p)
    }

    /// True when `id` was not seen recently (and remembers it).
    fn remember(&mut self, id: Uuid) -> bool {
        if !self.recent.insert(id) {
            return false;
        }
        self.recent_order.push_back(id);
        if self.recent_order.len() > RECENT_IDS
            && let Some(old) = self.recent_order.pop_front()
        {
            self.recent.remove(&old);
        }
        true
    }
}

/// `config` with the cluster's shared `properties` (security, SASL, TLS)
/// set last, so they override the defaults: every client of the cluster,
/// the consumer and the admin client alike, takes them.
fn with_properties(mut config: ClientConfig, source: &KafkaSource) -> ClientConfig {
    for (k, v) in &source.properties {
        config.set(k, v);
    }
    config
}

fn consumer(
    source: &KafkaSource,
    inflight: Arc<Inflight>,
) -> Result<BaseConsumer<Ctx>, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &source.brokers)
        .set("group.id", &source.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        .set("fetch.wait.max.ms", "100");
    if let Some(member) = &source.member {
        c.set("group.instance.id", member);
    }
    with_properties(c, source).create_with_context(Ctx {
        changes: Mutex::new(Vec::new()),
        inflight,
    })
}

/// Consumes until `stop` is set, then publishes what it holds and returns.
pub fn run(
    lake: &Lake,
    source: &KafkaSource,
    opts: &IngestOptions,
    stop: &AtomicBool,
    stats: &Stats,
) -> Result<(), IngestError> {
    let publisher = Publisher::start(lake.clone())?;
    let consumer = consumer(source, publisher.inflight())?;
    consumer.subscribe(&[&source.topic])?;
    let mut parts: HashMap<i32, Partition> = HashMap::new();
    let mut last_error: Option<Instant> = None;
    tracing::info!(topic = %source.topic, group = %source.group, "kafka ingester joined its group");
    loop {
        let message = consumer.poll(Duration::from_millis(100));
        apply_changes(lake, source, &consumer, &mut parts)?;
        published(source, &consumer, &parts, publisher.finished(), stats)?;
        stats
            .partitions
            .store(parts.len() as u64, Ordering::Relaxed);
        match message {
            Some(Ok(m)) => {
                let p = m.partition();
                if let Some(part) = parts.get_mut(&p) {
                    take(
                        lake,
                        part,
                        m.offset(),
                        m.payload().unwrap_or_default(),
                        p,
                        opts,
                        stats,
                    )?;
                }
            }
            Some(Err(e)) if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) => {
                tracing::warn!(error = %e, "kafka consumer error; retrying");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) | None => {}
        }
        let stopping = stop.load(Ordering::Acquire);
        for (&p, part) in parts.iter_mut() {
            let due = part.pending.as_ref().is_some_and(|b| {
                stopping
                    || b.events.len() >= opts.flush_rows
                    || b.since.elapsed() >= opts.flush_interval
            });
            if due {
                flush(&publisher, source, &consumer, p, part)?;
            }
        }
        if stopping {
            published(source, &consumer, &parts, publisher.finish(), stats)?;
            tracing::info!("kafka ingester stopping; everything read is published");
            // Closing a consumer waits on the group coordinator, which may be
            // unreachable; nothing is left to lose, so do not wait on it.
            std::thread::spawn(move || drop(consumer));
            return Ok(());
        }
    }
}

fn apply_changes(
    lake: &Lake,
    source: &KafkaSource,
    consumer: &BaseConsumer<Ctx>,
    parts: &mut HashMap<i32, Partition>,
) -> Result<(), IngestError> {
    let changes = match consumer.context().changes.lock() {
        Ok(mut c) => std::mem::take(&mut *c),
        Err(_) => return Ok(()),
    };
    for change in changes {
        match change {
            Change::Revoked(ps) => {
                for p in ps {
                    if let Some(part) = parts.remove(&p)
                        && let Some(b) = part.pending
                    {
                        tracing::info!(
                            partition = p,
                            dropped = b.events.len(),
                            "partition revoked; its unpublished events are read again by the next owner"
                        );
                    }
                }
            }
            Change::Assigned(ps) => {
                for p in ps {
                    let name = clean_source(&format!("{}.{p}", source.topic));
                    let part = Partition::resume(lake, name)?;
                    tracing::info!(partition = p, resume_after = ?part.progress, "partition assigned");
                    parts.insert(p, part);
                }
            }
        }
    }
    Ok(())
}

fn take(
    lake: &Lake,
    part: &mut Partition,
    offset: i64,
    payload: &[u8],
    partition: i32,
    opts: &IngestOptions,
    stats: &Stats,
) -> Result<(), IngestError> {
    if part.progress.is_some_and(|done| offset < done) {
        return Ok(()); // already in the lake
    }
    let start = part.progress.unwrap_or(offset);
    let pending = part.pending.get_or_insert_with(|| Pending {
        start,
        next: start,
        events: Vec::new(),
        since: Instant::now(),
    });
    pending.next = offset + 1;
    match decode(payload, opts.max_event_bytes) {
        Ok(event) => {
            let id = event.event_id;
            if part.remember(id) {
                if let Some(b) = part.pending.as_mut() {
                    b.events.push(event);
                }
            } else {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(rejection) => {
            let origin = dead_letter::Origin {
                source: &part.source,
                partition: Some(partition),
                position: format!("{offset:020}"),
            };
            dead_letter::write(lake, &origin, payload, &rejection.reason)?;
            stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Hands a partition's batch to the publisher. Its offsets are committed
/// when the publisher reports the batch in the lake (see `published`).
fn flush(
    publisher: &Publisher,
    source: &KafkaSource,
    consumer: &BaseConsumer<Ctx>,
    partition: i32,
    part: &mut Partition,
) -> Result<(), IngestError> {
    let Some(b) = part.pending.take() else {
        return Ok(());
    };
    part.progress = Some(b.next);
    if b.events.is_empty() {
        // Only dead letters or copies: no file; the committed offset
        // carries the consumer past the range.
        commit(source, consumer, partition, b.next);
        return Ok(());
    }
    publisher.submit(Job {
        key: partition,
        source: part.source.clone(),
        start: format!("{:020}", b.start),
        end: format!("{:020}", b.next),
        next: b.next,
        events: b.events,
    })
}

/// Accounts for published batches and commits their offsets.
fn published(
    source: &KafkaSource,
    consumer: &BaseConsumer<Ctx>,
    parts: &HashMap<i32, Partition>,
    done: Vec<Done>,
    stats: &Stats,
) -> Result<(), IngestError> {
    for d in done {
        stats.published(&d.result?);
        if parts.contains_key(&d.key) {
            commit(source, consumer, d.key, d.next);
        }
    }
    Ok(())
}

fn commit(source: &KafkaSource, consumer: &BaseConsumer<Ctx>, partition: i32, next: i64) {
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(&source.topic, partition, Offset::Offset(next))
        .is_err()
    {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        // The lake holds the progress; the commit only saves re-reading.
        tracing::debug!(error = %e, "offset commit failed");
    }
}

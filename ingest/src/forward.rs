//! The forwarder: drains the spool into Kafka.
//!
//! An idempotent producer (acks=all, compressed, keyed by consumer so one
//! consumer's events stay in one partition, in order). The spool cursor
//! moves only after every event of a batch has a successful delivery
//! report; a failed batch is read again from the cursor after a backoff.
//! With the brokers down, events wait in the spool (the gateway keeps
//! serving) and drain when they are back. A fatal producer error (e.g. an
//! out-of-order sequence) recreates the producer and replays everything
//! unacknowledged; the copies Kafka may then hold are removed by event id
//! at ingest.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use tollgate_schemas::metrics::{Collector, counter};
use tollgate_spool::{SpoolError, SpoolReader};

/// Events read from the spool per batch.
const BATCH: usize = 20_000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka properties; they override the defaults here.
    pub properties: BTreeMap<String, String>,
    /// Test hook: after this many delivered batches, act as if the next
    /// delivered batch hit a fatal producer error before its cursor moved.
    pub fault_fatal_after_batches: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// What the forwarder has done; read by metrics and logs.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub delivered: AtomicU64,
    pub batches_failed: AtomicU64,
    pub producers_recreated: AtomicU64,
}

#[derive(Default)]
struct Delivery {
    ok: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.to_string());
                }
            }
        }
    }
}

impl Delivery {
    fn reset(&self) {
        self.ok.store(0, Ordering::Relaxed);
        self.failed.store(0, Ordering::Relaxed);
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_else(|| "unknown".into())
    }
}

fn producer(cfg: &ForwarderConfig) -> Result<BaseProducer<Delivery>, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "zstd")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("message.timeout.ms", "120000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c.create_with_context(Delivery::default())
}

/// The partition key: the event's consumer.
fn key_of(event: &[u8]) -> Cow<'_, str> {
    #[derive(serde::Deserialize)]
    struct Key<'a> {
        #[serde(borrow)]
        consumer: Option<Cow<'a, str>>,
    }
    serde_json::from_slice::<Key<'_>>(event)
        .ok()
        .and_then(|k| k.consumer)
        .unwrap_or(Cow::Borrowed("-"))
}

/// The drain deadline: set the first time the stop flag is seen.
struct Stopping<'a> {
    stop: &'a AtomicBool,
    drain_for: Duration,
    at: std::cell::Cell<Option<Instant>>,
}

impl Stopping<'_> {
    fn requested(&self) -> bool {
        if self.at.get().is_none() && self.stop.load(Ordering::Acquire) {
            self.at.set(Some(Instant::now() + self.drain_for));
        }
        self.at.get().is_some()
    }

    fn out_of_time(&self) -> bool {
        self.requested() && self.at.get().is_some_and(|t| Instant::now() >= t)
    }
}

/// How a batch went.
enum Outcome {
    Delivered,
    Failed(String),
    Fatal(String),
    /// Stopping and out of time: the batch stays in the spool.
    Abandoned,
}

/// Runs until `stop` is set and the spool is drained, or `stop` is set and
/// `drain_for` has passed (the rest stays in the spool for the next start).
pub fn run(
    cfg: &ForwarderConfig,
    mut reader: SpoolReader,
    stop: &AtomicBool,
    drain_for: Duration,
    stats: &ForwardStats,
) -> Result<(), ForwardError> {
    let mut producer = producer(cfg)?;
    let mut backoff = Duration::from_millis(200);
    let stopping = Stopping {
        stop,
        drain_for,
        at: std::cell::Cell::new(None),
    };
    let mut delivered_batches = 0u64;
    let mut fault = cfg.fault_fatal_after_batches;
    loop {
        if stopping.requested() && reader.finished() {
            return Ok(());
        }
        let batch = reader.next_batch(BATCH, Duration::from_millis(100))?;
        if batch.is_empty() {
            continue;
        }
        let outcome = send_batch(&producer, cfg, &batch, &stopping);
        let outcome = match (outcome, fault) {
            (Outcome::Delivered, Some(after)) if delivered_batches >= after => {
                fault = None;
                Outcome::Fatal("injected fault after delivery".into())
            }
            (o, _) => o,
        };
        match outcome {
            Outcome::Delivered => {
                reader.ack(batch.end)?;
                stats
                    .delivered
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                delivered_batches += 1;
                if backoff > Duration::from_millis(200) {
                    tracing::info!(
                        events = batch.len(),
                        "kafka delivery resumed; spool draining"
                    );
                }
                backoff = Duration::from_millis(200);
            }
            Outcome::Abandoned => {
                tracing::warn!(
                    waiting_from = %reader.acked(),
                    "stopping with undelivered events; they stay in the spool for the next start"
                );
                return Ok(());
            }
            Outcome::Failed(why) | Outcome::Fatal(why) if stopping.out_of_time() => {
                tracing::warn!(error = %why, "stopping with undelivered events; they stay in the spool for the next start");
                return Ok(());
            }
            Outcome::Failed(why) => {
                stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    error = %why,
                    retry_in_ms = backoff.as_millis() as u64,
                    "kafka delivery failed; events wait in the spool and are sent again"
                );
                reader.rewind();
                sleep_unless_stopping(backoff, stop);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Outcome::Fatal(why) => {
                stats.producers_recreated.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = %why,
                    "kafka producer hit a fatal error; recreating it and replaying unacknowledged events"
                );
                reader.rewind();
                producer = self::producer(cfg)?;
            }
        }
    }
}

fn sleep_unless_stopping(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn send_batch(
    producer: &BaseProducer<Delivery>,
    cfg: &ForwarderConfig,
    batch: &tollgate_spool::Batch,
    stopping: &Stopping<'_>,
) -> Outcome {
    let ctx = producer.context();
    ctx.reset();
    let out_of_time = || stopping.out_of_time();
    for event in batch.records() {
        let key = key_of(event);
        let mut record = BaseRecord::to(&cfg.topic)
            .key(key.as_bytes())
            .payload(event);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                    if out_of_time() {
                        return Outcome::Abandoned;
                    }
                }
                Err((e, _)) => return Outcome::Failed(e.to_string()),
            }
        }
    }
    let started = Instant::now();
    let mut warned = false;
    loop {
        if let Some((code, why)) = producer.client().fatal_error() {
            return Outcome::Fatal(format!("{code:?}: {why}"));
        }
        let done = ctx.ok.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed);
        if done >= batch.len() as u64 {
            break;
        }
        let _ = producer.flush(Duration::from_millis(500));
        if out_of_time() {
            return Outcome::Abandoned;
        }
        if !warned && started.elapsed() > Duration::from_secs(5) {
            warned = true;
            tracing::warn!(
                brokers = %cfg.brokers,
                waiting = batch.len() as u64 - ctx.ok.load(Ordering::Relaxed),
                "kafka is not acknowledging; events wait in the spool while the gateway keeps serving"
            );
        }
    }
    if ctx.failed.load(Ordering::Relaxed) > 0 {
        return Outcome::Failed(ctx.last_error());
    }
    Outcome::Delivered
}

/// The forwarder's counters on `/metrics`.
impl Collector for ForwardStats {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self;
        counter(
            &mut e,
            "tollgate_forward_events_delivered",
            "Usage events Kafka acknowledged.",
            &s.delivered,
        )?;
        counter(
            &mut e,
            "tollgate_forward_batches_failed",
            "Batches sent again after a failed delivery.",
            &s.batches_failed,
        )?;
        counter(
            &mut e,
            "tollgate_forward_producers_recreated",
            "Producers recreated after a fatal error.",
            &s.producers_recreated,
        )
    }
}

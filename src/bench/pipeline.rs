//! `tollgate bench pipeline`: the usage pipeline's own figures, printed as
//! one JSON object for scripts/bench.sh.
//!
//! - ingest ceiling: decode + Arrow + Parquet + publish of pre-serialized
//!   events from memory, one thread (what one ingester can do);
//! - bytes per event of the lake that run wrote (a realistic mix);
//! - tap CPU per event: emit -> JSON -> spool with group commit;
//! - with `--kafka`: produce rate, a plain consumer's raw read rate and the
//!   ingester's Kafka -> Parquet rate on the same topic in the same run, and
//!   freshness (response -> row visible in the lake) through a gateway.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tollgate_collector::ledger::tap::Tap;
use tollgate_ingest::kafka::KafkaSource;
use tollgate_ingest::synth::Synth;
use tollgate_ingest::{IngestOptions, Lake, Stats};

#[derive(Args)]
pub struct BenchArgs {
    /// Events per measurement.
    #[arg(long, default_value_t = 400_000)]
    events: usize,
    /// A Kafka-protocol broker for the Kafka figures (host:port).
    #[arg(long)]
    kafka: Option<String>,
    /// Scratch directory (deleted and recreated).
    #[arg(long, default_value = "target/bench-pipeline")]
    dir: PathBuf,
    /// Requests per second for the freshness run.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 20.0)]
    freshness_s: f64,
}

fn synth_json(n: usize, seed: u64) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let start = chrono::Utc::now() - chrono::Duration::hours(2);
    // ~55 requests/s: a realistic spread of timestamps for one hour file.
    let mut synth = Synth::new(seed, start, 18_000)?;
    (0..n)
        .map(|_| {
            let e = synth.next_event();
            Ok((
                e.consumer.clone().unwrap_or_default(),
                serde_json::to_vec(&e)?,
            ))
        })
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        total += if p.is_dir() {
            dir_bytes(&p)
        } else {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    total
}

/// Process CPU seconds (user + system) from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based); after ")" they are 12, 13 (1-based).
    (ticks(11) + ticks(12)) / 100.0
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let mut out = serde_json::Map::new();
    out.insert("events".into(), args.events.into());

    // Ingest ceiling and bytes per event.
    let messages = synth_json(args.events, 11)?;
    let raw_bytes: usize = messages.iter().map(|(_, m)| m.len()).sum();
    let lake = Lake::open(args.dir.join("lake-memory"))?;
    // The ingester's own shape: this thread decodes the next batch while
    // the publisher thread writes the last one.
    let publisher = tollgate_ingest::publisher::Publisher::start(lake.clone())?;
    let mut decoding = Duration::ZERO;
    let started = Instant::now();
    for (batch_no, chunk) in messages.chunks(100_000).enumerate() {
        let t = Instant::now();
        let events = chunk
            .iter()
            .map(|(_, m)| {
                tollgate_ingest::decode::decode(m, 1 << 20).map_err(|r| anyhow::anyhow!(r.reason))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        decoding += t.elapsed();
        publisher.submit(tollgate_ingest::publisher::Job {
            key: 0,
            source: "bench.0".into(),
            start: format!("{batch_no:06}"),
            end: format!("{:06}", batch_no + 1),
            next: 0,
            events,
        })?;
    }
    let mut publishing = Duration::ZERO;
    for done in publisher.finish() {
        done.result?;
        publishing += done.took;
    }
    let secs = started.elapsed().as_secs_f64();
    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / args.events as f64;
    out.insert(
        "memory_decode_us_per_event".into(),
        per_event(decoding).into(),
    );
    out.insert(
        "memory_publish_us_per_event".into(),
        per_event(publishing).into(),
    );
    out.insert(
        "memory_ingest_events_per_s".into(),
        (args.events as f64 / secs).round().into(),
    );
    let parquet = dir_bytes(&args.dir.join("lake-memory").join("usage"));
    out.insert(
        "parquet_bytes_per_event".into(),
        (parquet as f64 / args.events as f64).into(),
    );
    out.insert(
        "json_bytes_per_event".into(),
        (raw_bytes as f64 / args.events as f64).into(),
    );

    // Tap CPU per event.
    let tap_events = args.events.min(200_000);
    let (writer, reader, _) =
        tollgate_spool::open(tollgate_spool::SpoolOptions::new(args.dir.join("spool")))?;
    let (tap, tap_writer) = Tap::start(writer, 65_536)?;
    let mut synth = Synth::new(12, chrono::Utc::now(), 10_000)?;
    let events: Vec<_> = (0..tap_events).map(|_| synth.next_event()).collect();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for e in events {
        tap.emit(e);
        // Keep under the queue bound: this measures cost, not overflow.
        while tap.counters().emitted.load(Ordering::Relaxed)
            > tap.counters().committed.load(Ordering::Relaxed) + 60_000
        {
            // Sleep, not spin: the wait must not count as the tap's CPU.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    drop(tap);
    tap_writer.close()?;
    let cpu = cpu_seconds() - cpu0;
    drop(reader);
    out.insert(
        "tap_cpu_us_per_event".into(),
        (cpu * 1e6 / tap_events as f64).into(),
    );
    out.insert(
        "tap_wall_us_per_event".into(),
        (t0.elapsed().as_secs_f64() * 1e6 / tap_events as f64).into(),
    );

    if let Some(brokers) = &args.kafka {
        kafka_figures(brokers, &args, &messages, &mut out).await?;
        freshness(brokers, &args, &mut out).await?;
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

async fn kafka_figures(
    brokers: &str,
    args: &BenchArgs,
    messages: &[(String, Vec<u8>)],
    out: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let topic = format!("bench.usage.{}", std::process::id());
    let source = KafkaSource {
        brokers: brokers.to_string(),
        topic: topic.clone(),
        group: format!("bench-{}", std::process::id()),
        member: None,
        properties: Vec::new(),
    };
    tollgate_ingest::kafka::ensure_topic(&source, 4).await?;

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "10")
        .set("compression.type", "zstd")
        .set("batch.num.messages", "10000")
        .create()?;
    let t = Instant::now();
    for (k, m) in messages {
        let mut rec = BaseRecord::to(&topic)
            .key(k.as_bytes())
            .payload(m.as_slice());
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(300))?;
    out.insert(
        "kafka_produce_msgs_per_s".into(),
        (messages.len() as f64 / t.elapsed().as_secs_f64())
            .round()
            .into(),
    );

    // Raw consume: a plain consumer that only counts.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let t = Instant::now();
    let mut n = 0;
    while n < messages.len() && t.elapsed() < Duration::from_secs(300) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
        }
    }
    let raw = n as f64 / t.elapsed().as_secs_f64();
    out.insert("kafka_raw_consume_msgs_per_s".into(), raw.round().into());
    drop(consumer);

    // The ingester on the same topic.
    let lake = Lake::open(args.dir.join("lake-kafka"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let opts = IngestOptions::default();
    let thread = {
        let (stop, stats, lake) = (stop.clone(), stats.clone(), lake.clone());
        std::thread::spawn(move || {
            tollgate_ingest::kafka::run(&lake, &source, &opts, &stop, &stats)
        })
    };
    // Joining the group is not ingesting: the clock starts at assignment.
    let joining = Instant::now();
    while stats.partitions.load(Ordering::Relaxed) == 0
        && joining.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    let mut last = 0;
    let mut last_change = Instant::now();
    while (stats.rows.load(Ordering::Relaxed) as usize) < messages.len()
        && last_change.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = stats.rows.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let ingest = stats.rows.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let _ = thread.join();
    out.insert("kafka_ingest_events_per_s".into(), ingest.round().into());
    out.insert("kafka_ingest_rows".into(), last.into());
    out.insert("kafka_ingest_vs_raw".into(), (ingest / raw).into());
    Ok(())
}

/// Requests through a gateway with the Kafka pipeline; each row's time to
/// visibility in the lake after its response completed.
async fn freshness(
    brokers: &str,
    args: &BenchArgs,
    out: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let dir = args.dir.join("freshness");
    let lake_dir = dir.join("lake");
    let (key, key_line) =
        tollgate_collector::proxy::auth::new_key().map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ninstance = \"bench\"\n\n[pipeline]\nspool_dir = {:?}\nlake = {:?}\nkafka = {{ brokers = \"{brokers}\", topic = \"bench.fresh.{}\", group = \"fresh-{}\" }}\n\n\
         [upstreams.sim]\nkind = \"simulated\"\n\n[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"sim\" }}]\n\n\
         [[consumers]]\nname = \"bench\"\napi_keys = [\"{key_line}\"]\n",
        dir.join("spool").display().to_string(),
        lake_dir.display().to_string(),
        std::process::id(),
        std::process::id(),
    );
    let config = crate::config::Config::parse(&config, "bench", |_| None)?;
    let (spool, pipeline) = crate::pipeline::start(&config, crate::pipeline::Role::All).await?;
    let server = tollgate_collector::Server::bind(
        &config.collector,
        spool,
        config.pipeline.queue_capacity,
        pipeline.metrics(),
    )
    .await?;
    let url = format!("http://{}/v1/chat/completions", server.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    let client = reqwest::Client::new();
    let body = r#"{"model":"qwq-32b","messages":[{"role":"user","content":"freshness"}]}"#;
    let mut done: HashMap<uuid::Uuid, Instant> = HashMap::new();
    let gap = Duration::from_secs_f64(1.0 / args.rate);
    let t = Instant::now();
    let mut next = Instant::now();
    let mut seen: HashMap<uuid::Uuid, Instant> = HashMap::new();
    let mut known: std::collections::HashSet<PathBuf> = Default::default();
    let lake = Lake::open(&lake_dir)?;
    let mut poll_at = Instant::now();
    while t.elapsed().as_secs_f64() < args.freshness_s || seen.len() < done.len() {
        if t.elapsed().as_secs_f64() < args.freshness_s && Instant::now() >= next {
            let resp = client
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let id = resp
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let _ = resp.bytes().await?;
            if let Some(id) = id {
                done.insert(id, Instant::now());
            }
            next += gap;
        }
        if Instant::now() >= poll_at {
            for f in lake.files()? {
                if known.insert(f.clone()) {
                    let now = Instant::now();
                    for id in lake.read_event_ids(&f)? {
                        seen.entry(id).or_insert(now);
                    }
                }
            }
            poll_at = Instant::now() + Duration::from_millis(25);
        }
        if t.elapsed() > Duration::from_secs_f64(args.freshness_s + 60.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stop_tx.send(());
    served.await.context("gateway task")??;
    tokio::task::spawn_blocking(move || pipeline.finish()).await??;
    let mut lags: Vec<f64> = done
        .iter()
        .filter_map(|(id, at)| {
            seen.get(id)
                .map(|v| v.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lags.get(((lags.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    out.insert("freshness_requests".into(), done.len().into());
    out.insert("freshness_rows_seen".into(), lags.len().into());
    out.insert("freshness_p50_ms".into(), pct(0.5).round().into());
    out.insert("freshness_p95_ms".into(), pct(0.95).round().into());
    Ok(())
}

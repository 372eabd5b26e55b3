//! The usage pipeline against a real Kafka-protocol broker: every request
//! lands in the lake exactly once through outages, crashes, garbage,
//! rebalances and producer replays.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use tollgate_ingest::synth::Synth;
use tollgate_lake::PartName;
use uuid::Uuid;

use crate::broker::Broker;
use crate::harness::*;

/// Two simulated upstreams: `qwq-32b` answers, `deepseek-r1` always fails
/// with 503 and falls back to `qwq-32b`.
fn body() -> String {
    format!(
        "[upstreams.sim]\nkind = \"simulated\"\noutput_tokens = 12\nreasoning_tokens = 5\n\n\
         [upstreams.down]\nkind = \"simulated\"\nerror_rate = 1.0\nerror_status = 503\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"sim\" }}]\n\n\
         [[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"down\", model = \"deepseek-reasoner\" }}]\nfallback = [\"qwq-32b\"]\n\n{}",
        consumers()
    )
}

/// What a client saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    event_id: Uuid,
    status: u16,
    model: String,
    authorized: bool,
    /// (prompt, completion) tokens as the response reported them.
    usage: Option<(u64, u64)>,
}

/// Request `i` of a mixed workload: streamed and not, fallbacks, a bad key
/// and an unknown model.
async fn request(gw: &Gateway, i: usize) -> Seen {
    let (model, stream, key) = match i % 6 {
        0 => ("qwq-32b", true, CLIENT_KEY),
        1 => ("deepseek-r1", false, CLIENT_KEY),
        2 => ("qwq-32b", false, CLIENT_KEY),
        3 => ("qwq-32b", false, "tg-not-a-key"),
        4 => ("no-such-model", false, CLIENT_KEY),
        _ => ("deepseek-r1", true, CLIENT_KEY),
    };
    let body = serde_json::json!({
        "model": model,
        "stream": stream,
        "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
        "messages": [{"role": "user", "content": format!("request {i}")}],
    })
    .to_string();
    let (status, headers, text) = post(gw, "/v1/chat/completions", Some(key), &body).await;
    let event_id = headers["x-request-id"].to_str().unwrap().parse().unwrap();
    let usage_of = |v: &serde_json::Value| {
        let u = v.get("usage")?;
        Some((
            u["prompt_tokens"].as_u64()?,
            u["completion_tokens"].as_u64()?,
        ))
    };
    let usage = if stream {
        sse_data(&text)
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .find_map(|v| usage_of(&v))
    } else {
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| usage_of(&v))
    };
    Seen {
        event_id,
        status,
        model: model.to_string(),
        authorized: key == CLIENT_KEY,
        usage,
    }
}

/// The gateway's `/metrics`, by name.
async fn metrics(gw: &Gateway) -> BTreeMap<String, u64> {
    let text = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        // Counts only: histogram sums are fractional.
        .filter_map(|(name, v)| Some((name.to_string(), v.parse().ok()?)))
        .collect()
}

/// Waits until the lake holds `n` rows (or fails after `secs`).
fn wait_rows(lake: &Path, n: usize, secs: u64) -> Vec<tollgate_schemas::UsageEvent> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let rows = read_events(lake);
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ids(rows: &[tollgate_schemas::UsageEvent]) -> Vec<Uuid> {
    let mut v: Vec<Uuid> = rows.iter().map(|e| e.event_id).collect();
    v.sort();
    v
}

fn assert_unique(rows: &[tollgate_schemas::UsageEvent]) {
    let set: HashSet<Uuid> = rows.iter().map(|e| e.event_id).collect();
    assert_eq!(set.len(), rows.len(), "duplicate event ids in the lake");
}

/// No two published batches of one source overlap, and none is repeated.
fn assert_no_overlapping_batches(lake: &Path) {
    let l = tollgate_ingest::Lake::open(lake).unwrap();
    let mut ranges: BTreeMap<String, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for f in l.files().unwrap() {
        let n = PartName::parse(f.file_name().unwrap().to_str().unwrap()).unwrap();
        let range = (n.start.parse().unwrap(), n.end.parse().unwrap());
        ranges.entry(n.source).or_default().insert(range);
    }
    for (source, rs) in ranges {
        let v: Vec<_> = rs.into_iter().collect();
        for w in v.windows(2) {
            assert!(w[0].1 <= w[1].0, "{source}: batches {w:?} overlap");
        }
    }
}

#[tokio::test]
async fn every_request_reaches_the_lake_through_kafka_once() {
    let dir = scratch("kafka-e2e");
    let broker = Broker::start(&dir);
    let gw = Gateway::start_with(
        &dir,
        "serve",
        &broker.pipeline("usage.e2e", "g-e2e", None),
        &body(),
        &[],
    );
    let mut seen = Vec::new();
    for i in 0..60 {
        seen.push(request(&gw, i).await);
    }
    let rows = wait_rows(&gw.lake, seen.len(), 60);
    assert_eq!(rows.len(), seen.len(), "one row per request");
    assert_unique(&rows);
    let by_id: BTreeMap<Uuid, &tollgate_schemas::UsageEvent> =
        rows.iter().map(|e| (e.event_id, e)).collect();
    for s in &seen {
        let e = by_id
            .get(&s.event_id)
            .unwrap_or_else(|| panic!("no row for {s:?}"));
        assert_eq!(e.status, s.status, "{s:?}");
        if s.authorized {
            assert_eq!(e.consumer.as_deref(), Some("app"));
            assert_eq!(e.requested_model.as_deref(), Some(s.model.as_str()));
        } else {
            assert_eq!(e.consumer, None);
        }
        if let Some((prompt, completion)) = s.usage {
            assert_eq!(
                (e.input_tokens, e.output_tokens),
                (prompt, completion),
                "{s:?}"
            );
            assert!(
                e.cost_usd
                    .is_some_and(|c| c.decimal() > rust_decimal::Decimal::ZERO)
            );
        }
        if s.model == "deepseek-r1" && s.authorized {
            assert!(e.fallback && e.attempts.len() == 2, "{e:?}");
        }
    }
    assert!(seen.iter().any(|s| s.status == 401) && seen.iter().any(|s| s.status == 404));
    assert_no_overlapping_batches(&gw.lake);
    // The counters catch up with the lake within a poll or two.
    let want = [
        ("tollgate_tap_events_committed_total", 60),
        ("tollgate_forward_events_delivered_total", 60),
        ("tollgate_ingest_rows_total", 60),
        ("tollgate_ingest_partitions", 4),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&gw).await;
        let got: Vec<(&str, u64)> = want.iter().map(|(n, _)| (*n, m[*n])).collect();
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_secrets(&all_text_under(&dir), "pipeline files");
}

#[tokio::test]
async fn a_broker_outage_loses_nothing_and_the_gateway_keeps_answering() {
    let dir = scratch("kafka-outage");
    let mut broker = Broker::start(&dir);
    let gw = Gateway::start_with(
        &dir,
        "serve",
        &broker.pipeline("usage.outage", "g-outage", Some("gw")),
        &body(),
        &[],
    );
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut stopped = false;
    let mut restarted = false;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(40) {
        if !stopped && started.elapsed() > Duration::from_secs(5) {
            broker.stop();
            stopped = true;
        }
        if !restarted && started.elapsed() > Duration::from_secs(35) {
            broker.restart();
            restarted = true;
        }
        // Authorized, answerable requests: the gateway must serve them all.
        let s = request(&gw, [0, 1, 2][i % 3]).await;
        assert_eq!(s.status, 200, "request {i} during the outage: {s:?}");
        seen.push(s);
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = wait_rows(&gw.lake, seen.len(), 120);
    assert_unique(&rows);
    let sent: Vec<Uuid> = {
        let mut v: Vec<Uuid> = seen.iter().map(|s| s.event_id).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&rows), sent, "the lake holds every request once");
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(
        log.contains("kafka is not acknowledging"),
        "the outage is logged clearly"
    );
}

/// Synthetic events written straight into `topic`, keyed by consumer.
fn produce_synthetic(broker: &Broker, topic: &str, n: usize, seed: u64) -> Vec<Uuid> {
    let mut synth = Synth::new(seed, Utc::now() - chrono::Duration::hours(1), 100_000).unwrap();
    let mut sent = Vec::with_capacity(n);
    let messages: Vec<(String, Vec<u8>)> = (0..n)
        .map(|_| {
            let e = synth.next_event();
            sent.push(e.event_id);
            (
                e.consumer.clone().unwrap_or_default(),
                serde_json::to_vec(&e).unwrap(),
            )
        })
        .collect();
    broker.produce(topic, &messages);
    sent.sort();
    sent
}

fn ingest_log(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("ingest-{n}.log"))
}

/// How many times ingester `n` has logged a partition assignment.
fn assignments(dir: &Path, n: usize) -> usize {
    std::fs::read_to_string(ingest_log(dir, n))
        .unwrap_or_default()
        .matches("partition assigned")
        .count()
}

/// Waits until ingester `n` has been given partitions more than `seen`
/// times: joining a group takes the broker a few seconds.
fn wait_assigned(dir: &Path, n: usize, seen: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while assignments(dir, n) <= seen {
        assert!(
            Instant::now() < deadline,
            "ingester {n} was not given partitions"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rows ingester `n` said it published when it stopped.
fn stopped_rows(dir: &Path, n: usize) -> u64 {
    std::fs::read_to_string(ingest_log(dir, n))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ingester stopped"))
        .filter_map(|l| {
            l.split("rows=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A `tollgate ingest` process.
fn ingester(
    dir: &Path,
    broker: &Broker,
    topic: &str,
    group: &str,
    member: Option<&str>,
    flush_rows: usize,
    n: usize,
) -> Proc {
    let path = dir.join(format!("ingest-{n}.toml"));
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nlake = {:?}\nflush_ms = 300\nflush_rows = {flush_rows}\nmax_event_bytes = 65536\n{}",
            dir.join("lake").display().to_string(),
            broker.pipeline(topic, group, member)
        ),
    )
    .unwrap();
    spawn(
        &[
            "ingest",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &ingest_log(dir, n),
        &[],
    )
}

fn create_topic(broker: &Broker, topic: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let source = tollgate_ingest::kafka::KafkaSource {
        brokers: broker.addr.clone(),
        topic: topic.to_string(),
        group: "setup".into(),
        member: None,
        properties: Vec::new(),
    };
    rt.block_on(tollgate_ingest::kafka::ensure_topic(&source, 4))
        .unwrap();
}

#[test]
fn a_killed_ingester_publishes_nothing_twice() {
    let dir = scratch("kafka-sigkill");
    let broker = Broker::start(&dir);
    create_topic(&broker, "usage.kill");
    let mut sent = produce_synthetic(&broker, "usage.kill", 10_000, 1);
    let lake = dir.join("lake");
    let (mut kills, mut interrupted) = (0, 0);
    while kills < 5 {
        let p = ingester(
            &dir,
            &broker,
            "usage.kill",
            "g-kill",
            Some("ingest-a"),
            700,
            kills,
        );
        // Killed while fresh events are still arriving: in the middle of
        // reading and publishing, never idle or still joining.
        wait_assigned(&dir, kills, 0);
        let seed = 10 + kills as u64;
        let fresh = std::thread::scope(|s| {
            let producing = s.spawn(|| produce_synthetic(&broker, "usage.kill", 5_000, seed));
            std::thread::sleep(Duration::from_millis(fastrand::u64(100..1_000)));
            p.kill9();
            producing.join().unwrap()
        });
        sent.extend(fresh);
        kills += 1;
        let rows = read_events(&lake);
        assert_unique(&rows);
        interrupted += usize::from(rows.len() < sent.len());
    }
    sent.sort();
    assert!(interrupted > 0, "no kill interrupted the ingestion");
    // One clean run to finish whatever the last kill interrupted.
    let last = ingester(
        &dir,
        &broker,
        "usage.kill",
        "g-kill",
        Some("ingest-a"),
        700,
        999,
    );
    let rows = wait_rows(&lake, sent.len(), 90);
    drop(last);
    assert_unique(&rows);
    assert_eq!(ids(&rows), sent, "exact after {kills} SIGKILLs");
    assert_no_overlapping_batches(&lake);
}

#[test]
fn garbage_goes_to_dead_letters_and_ingestion_continues() {
    let dir = scratch("kafka-garbage");
    let broker = Broker::start(&dir);
    create_topic(&broker, "usage.garbage");
    let before = produce_synthetic(&broker, "usage.garbage", 300, 2);
    let future = serde_json::json!({"schema_version": 99, "event_id": Uuid::now_v7()}).to_string();
    let garbage: Vec<(String, Vec<u8>)> = vec![
        ("k".into(), b"not json at all".to_vec()),
        ("k".into(), b"{\"schema_version\":1}".to_vec()),
        ("k".into(), future.into_bytes()),
        ("k".into(), vec![0xff, 0xfe, 0x00]),
        ("k".into(), vec![b' '; 100_000]),
    ];
    broker.produce("usage.garbage", &garbage);
    let after = produce_synthetic(&broker, "usage.garbage", 300, 3);
    let p = ingester(&dir, &broker, "usage.garbage", "g-garbage", None, 10_000, 0);
    let rows = wait_rows(&dir.join("lake"), 600, 60);
    let letters: Vec<serde_json::Value> = walk_json(&dir.join("lake").join("dead_letters"));
    drop(p);
    let mut sent: Vec<Uuid> = before.into_iter().chain(after).collect();
    sent.sort();
    assert_eq!(ids(&rows), sent, "valid events around the garbage all land");
    assert_eq!(letters.len(), 5, "{letters:#?}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    for want in [
        "not a JSON object",
        "schema violation",
        "unknown future schema_version",
        "oversize",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want}: {reasons:?}"
        );
    }
    assert!(
        letters
            .iter()
            .all(|l| l["partition"].is_i64() && l["raw_base64"].is_string())
    );
}

fn walk_json(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_json(&p));
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap());
        }
    }
    out
}

#[test]
fn two_ingesters_under_forced_rebalances_cover_every_event_once() {
    let dir = scratch("kafka-rebalance");
    let broker = Broker::start(&dir);
    create_topic(&broker, "usage.rebalance");
    let mut sent = produce_synthetic(&broker, "usage.rebalance", 10_000, 4);
    let lake = dir.join("lake");
    let a = ingester(&dir, &broker, "usage.rebalance", "g-rb", None, 500, 0);
    let mut b = ingester(&dir, &broker, "usage.rebalance", "g-rb", None, 500, 1);
    for round in 2..8 {
        // `b` leaves only once it holds partitions with fresh events in
        // them, and the next `b` joins only once `a` has taken them back:
        // each round hands work over in both directions, one membership
        // change at a time.
        wait_assigned(&dir, round - 1, 0);
        let seed = 10 + round as u64;
        sent.extend(produce_synthetic(&broker, "usage.rebalance", 3_000, seed));
        std::thread::sleep(Duration::from_millis(fastrand::u64(100..1_000)));
        let held_by_a = assignments(&dir, 0);
        b.terminate();
        wait_assigned(&dir, 0, held_by_a);
        b = ingester(&dir, &broker, "usage.rebalance", "g-rb", None, 500, round);
    }
    sent.sort();
    let rows = wait_rows(&lake, sent.len(), 90);
    drop((a, b));
    assert_unique(&rows);
    assert_eq!(rows.len(), sent.len(), "every event, once");
    assert_eq!(ids(&rows), sent, "exactly the set sent");
    assert_no_overlapping_batches(&lake);
    let by_b: u64 = (1..7).map(|n| stopped_rows(&dir, n)).sum();
    assert!(
        by_b > 0,
        "the joining ingesters published none of the events"
    );
}

#[tokio::test]
async fn a_fatal_producer_error_replays_and_the_lake_drops_the_copies() {
    let dir = scratch("kafka-fatal");
    let broker = Broker::start(&dir);
    let gw = Gateway::start_with(
        &dir,
        "serve",
        &broker.pipeline("usage.fatal", "g-fatal", None),
        &body(),
        &[("TOLLGATE_FAULT_FORWARDER_FATAL_AFTER", "2")],
    );
    let mut seen = Vec::new();
    for wave in 0..6 {
        for i in 0..8 {
            seen.push(request(&gw, [0, 2][(wave + i) % 2]).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rows = wait_rows(&gw.lake, seen.len(), 60);
    assert_unique(&rows);
    assert_eq!(rows.len(), seen.len());
    let in_kafka = broker.count("usage.fatal", 4);
    assert!(
        in_kafka > seen.len(),
        "the replay put copies in Kafka ({in_kafka} for {})",
        seen.len()
    );
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(
        log.contains("recreating it and replaying"),
        "the fatal error is logged"
    );
}

#[tokio::test]
async fn sigterm_with_a_backlog_leaves_it_in_the_spool_for_the_next_start() {
    let dir = scratch("kafka-backlog");
    let mut broker = Broker::start(&dir);
    let pipeline = format!(
        "drain_ms = 1000\n{}",
        broker.pipeline("usage.backlog", "g-backlog", Some("gw"))
    );
    let gw = Gateway::start_with(&dir, "serve", &pipeline, &body(), &[]);
    let first = request(&gw, 2).await;
    wait_rows(&gw.lake, 1, 30);
    broker.stop();
    let mut seen = vec![first];
    for i in 0..20 {
        let s = request(&gw, [0, 2][i % 2]).await;
        assert_eq!(s.status, 200);
        seen.push(s);
    }
    let stopping = Instant::now();
    let Gateway { proc, lake, .. } = gw;
    let status = proc.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "the drain is bounded"
    );
    assert_eq!(
        read_events(&lake).len(),
        1,
        "the backlog did not reach the lake yet"
    );

    broker.restart();
    let gw = Gateway::start_with(&dir, "serve", &pipeline, &body(), &[]);
    let rows = wait_rows(&gw.lake, seen.len(), 60);
    assert_unique(&rows);
    let mut sent: Vec<Uuid> = seen.iter().map(|s| s.event_id).collect();
    sent.sort();
    assert_eq!(ids(&rows), sent, "the backlog went out on the next start");
}

#[tokio::test]
async fn a_killed_gateway_keeps_every_committed_event() {
    let dir = scratch("gateway-sigkill");
    // A long flush: nothing reaches the lake before the kill.
    let gw = Gateway::start_with(&dir, "serve", "flush_ms = 600000", &body(), &[]);
    let mut seen = Vec::new();
    for i in 0..30 {
        seen.push(request(&gw, i).await);
    }
    // Wait for the group commit to cover every answered request.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let committed = metrics(&gw).await["tollgate_tap_events_committed_total"];
        if committed == seen.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed} of {}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Gateway { proc, lake, .. } = gw;
    proc.kill9();
    assert!(read_events(&lake).is_empty());

    let gw = Gateway::start_with(&dir, "serve", "", &body(), &[]);
    let rows = wait_rows(&gw.lake, seen.len(), 30);
    assert_unique(&rows);
    let mut sent: Vec<Uuid> = seen.iter().map(|s| s.event_id).collect();
    sent.sort();
    assert_eq!(ids(&rows), sent);
}

/// An S3-compatible object store on loopback: moto's server, from the
/// test venv (`scripts/test.sh` installs it).
struct ObjectStore {
    proc: std::process::Child,
    endpoint: String,
}

impl ObjectStore {
    fn start(dir: &Path) -> ObjectStore {
        let bin = std::env::var("TOLLGATE_MOTO").unwrap_or_else(|_| {
            format!(
                "{}/.cache/tollgate/venv/bin/moto_server",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let proc = std::process::Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}; scripts/test.sh installs it"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        ObjectStore {
            proc,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    fn options(&self) -> Vec<(String, String)> {
        [
            ("endpoint", self.endpoint.as_str()),
            ("allow_http", "true"),
            ("region", "us-east-1"),
            ("access_key_id", "lake-test"),
            ("secret_access_key", "lake-test"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn toml(&self) -> String {
        let pairs: Vec<String> = self
            .options()
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        format!("lake_options = {{ {} }}\n", pairs.join(", "))
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_creates_a_key_only_once() {
    // What the alerts' claims rest on without Redis: a conditional PUT.
    let dir = scratch("s3-create");
    let s3 = ObjectStore::start(&dir);
    let created = client()
        .put(format!("{}/tollgate-claims", s3.endpoint))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
    tokio::task::block_in_place(|| {
        let store =
            tollgate_lake::store::Store::open("s3://tollgate-claims/lake", &s3.options()).unwrap();
        assert!(store.read("alerts/claims/k").unwrap().is_none());
        assert!(store.create("alerts/claims/k", b"first".to_vec()).unwrap());
        assert!(!store.create("alerts/claims/k", b"second".to_vec()).unwrap());
        assert_eq!(
            &store.read("alerts/claims/k").unwrap().unwrap()[..],
            b"first"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_lake_holds_every_request_and_compacts() {
    let dir = scratch("s3-lake");
    let s3 = ObjectStore::start(&dir);
    let created = client()
        .put(format!("{}/tollgate-lake", s3.endpoint))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
    let pipeline = format!("lake = \"s3://tollgate-lake/prod\"\n{}", s3.toml());
    let gw = Gateway::start_with(&dir, "serve", &pipeline, &body(), &[]);
    let mut seen = Vec::new();
    for i in 0..18 {
        seen.push(request(&gw, i).await);
    }
    let lake = tokio::task::block_in_place(|| {
        tollgate_ingest::Lake::at("s3://tollgate-lake/prod", &s3.options()).unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = tokio::task::block_in_place(|| lake.read_events().unwrap());
        if rows.len() >= seen.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut sent: Vec<Uuid> = seen.iter().map(|s| s.event_id).collect();
    sent.sort();
    assert_eq!(ids(&rows), sent, "every request, once, in the object store");
    drop(gw);

    // Closed hours of an object-store lake compact like a directory's.
    let old: chrono::DateTime<Utc> = "2026-01-05T07:10:00Z".parse().unwrap();
    let mut synth = Synth::new(5, old, 200_000).unwrap();
    let events: Vec<_> = (0..1200).map(|_| synth.next_event()).collect();
    tokio::task::block_in_place(|| {
        for (i, chunk) in events.chunks(200).enumerate() {
            lake.publish(
                "old.0",
                &format!("{:04}", i * 200),
                &format!("{:04}", i * 200 + 200),
                chunk.to_vec(),
            )
            .unwrap();
        }
    });
    let config = dir.join("compact.toml");
    std::fs::write(&config, format!("[pipeline]\n{pipeline}")).unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "compact",
            "--config",
            config.to_str().unwrap(),
            "--date",
            "2026-01-05",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("compacted 1 hours"), "{stdout}");
    let old_files: Vec<_> = tokio::task::block_in_place(|| lake.files().unwrap())
        .into_iter()
        .filter(|f| f.to_str().unwrap().contains("date=2026-01-05"))
        .collect();
    assert_eq!(
        old_files.len(),
        2,
        "one merged file and the source's last batch: {old_files:?}"
    );
    let mut want: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    want.extend(sent);
    want.sort();
    let all = tokio::task::block_in_place(|| lake.read_events().unwrap());
    assert_eq!(ids(&all), want);
}

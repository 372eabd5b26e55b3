//! The query engine in process over a synthetic lake the ingester wrote:
//! isolation by principal on every path, read-only on statement and plan,
//! the limits, exact report money, and files published after start visible
//! at once. (Here rather than in `query/`, which does not link the
//! ingester.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tollgate_ingest::Lake;
use tollgate_ingest::synth::Synth;
use tollgate_query::reports::{self, CostRequest, RoiRequest};
use tollgate_query::{Engine, Limits, Principal, QueryError, QuerySettings, Tenant};
use tollgate_schemas::{PriceCatalog, UsageEvent};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-query-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn events(n: usize, seed: u64) -> Vec<UsageEvent> {
    let start: DateTime<Utc> = "2026-03-01T09:00:00Z".parse().unwrap();
    let mut synth = Synth::new(seed, start, 2_000_000).unwrap();
    (0..n).map(|_| synth.next_event()).collect()
}

fn tenant(name: &str) -> Tenant {
    Tenant {
        name: name.into(),
        key_hashes: vec![Sha256::digest(format!("key-{name}").as_bytes()).into()],
        team: None,
    }
}

async fn engine(dir: &std::path::Path, limits: Limits) -> Arc<Engine> {
    let text = tollgate_schemas::prices::SHIPPED
        .replace("version = \"", "version = \"alt-")
        .replace("output = 2.19", "output = 1.00");
    let other = PriceCatalog::parse(&text, "alt").unwrap();
    let settings = QuerySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        pg_listen: None,
        admin_token: Some("root".into()),
        tenants: vec![tenant("search-api"), tenant("support-bot")],
        lake: dir.display().to_string(),
        lake_options: vec![],
        catalogs: vec![PriceCatalog::shipped().unwrap(), other],
        limits,
        cache_bytes: 64 << 20,
        partitions: 4,
        cors_origins: vec![],
        rules: tollgate_query::rules::LimitRules::default(),
        alerts: None,
    };
    Engine::open(&settings).await.unwrap()
}

fn ints(batches: &[RecordBatch], col: usize) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let c =
                arrow::compute::cast(b.column(col), &arrow::datatypes::DataType::Int64).unwrap();
            c.as_primitive::<Int64Type>().values().to_vec()
        })
        .collect()
}

fn strings(batches: &[RecordBatch], col: usize) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = arrow::compute::cast(b.column(col), &arrow::datatypes::DataType::Utf8).unwrap();
            let c = c.as_string::<i32>();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn count(engine: &Engine, who: &Principal, sql: &str) -> i64 {
    let out = engine
        .run(who, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    ints(&out.batches, 0).into_iter().sum()
}

fn a() -> Principal {
    Principal::Consumer("search-api".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sees_only_its_rows_by_every_path() {
    let dir = scratch("isolation");
    let lake = Lake::open(&dir).unwrap();
    let sent = events(3000, 1);
    lake.publish("t.0", "0", "2999", sent.clone()).unwrap();
    let mine = sent
        .iter()
        .filter(|e| e.consumer.as_deref() == Some("search-api"))
        .count() as i64;
    assert!(mine > 0 && mine < 3000);
    let engine = engine(&dir, Limits::default()).await;

    assert_eq!(
        count(&engine, &Principal::Admin, "SELECT count(*) FROM usage").await,
        3000
    );
    for sql in [
        "SELECT count(*) FROM usage",
        "SELECT count(*) FROM (SELECT * FROM usage WHERE consumer <> 'search-api' OR true) s",
        "WITH x AS (SELECT * FROM usage) SELECT count(*) FROM x",
        "SELECT count(*) FROM (SELECT event_id FROM usage UNION ALL SELECT event_id FROM usage WHERE consumer = 'support-bot') u",
        "SELECT sum(requests) FROM daily_cost",
        "SELECT count(*) FROM tollgate.public.usage",
        "SELECT count(*) FROM usage WHERE consumer IN (SELECT consumer FROM usage)",
    ] {
        let n = count(&engine, &a(), sql).await;
        assert_eq!(n, mine, "{sql}");
    }
    // Not a single foreign row through any projection.
    for sql in [
        "SELECT DISTINCT consumer FROM usage",
        "SELECT DISTINCT consumer FROM daily_cost",
        "SELECT consumer FROM usage UNION SELECT consumer FROM usage",
    ] {
        let out = engine.run(&a(), sql).await.unwrap();
        assert_eq!(
            strings(&out.batches, 0),
            vec![Some("search-api".to_string())],
            "{sql}"
        );
    }
    // information_schema names tables, never rows; the lake itself is not
    // reachable under another name.
    let out = engine
        .run(&a(), "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")
        .await
        .unwrap();
    let names: Vec<_> = strings(&out.batches, 0).into_iter().flatten().collect();
    assert!(names.contains(&"usage".to_string()), "{names:?}");
    assert!(matches!(
        engine
            .run(&a(), "EXPLAIN ANALYZE SELECT count(*) FROM usage")
            .await,
        Err(QueryError::Forbidden(_))
    ));
    // Reports run in the same session.
    let params = vec![
        ("from".to_string(), "2026-03-01".to_string()),
        ("to".to_string(), "2026-03-02".to_string()),
    ];
    let request = CostRequest::parse(&params, engine.catalogs()).unwrap();
    let report = reports::cost(&engine, &a(), &request).await.unwrap();
    assert!(!report.rows.is_empty());
    for row in &report.rows {
        assert_eq!(row["consumer"], "search-api", "{row}");
    }
    assert_eq!(report.totals["requests"], mine);
    let roi = reports::roi(
        &engine,
        &a(),
        &RoiRequest::parse(&params, engine.catalogs()).unwrap(),
    )
    .await
    .unwrap();
    for row in &roi.rows {
        assert_eq!(row["consumer"], "search-api", "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_ddl_copy_and_set_are_refused_and_bad_sql_is_an_error() {
    let dir = scratch("readonly");
    Lake::open(&dir)
        .unwrap()
        .publish("t.0", "0", "99", events(100, 2))
        .unwrap();
    let engine = engine(&dir, Limits::default()).await;
    for who in [Principal::Admin, a()] {
        for sql in [
            "INSERT INTO usage SELECT * FROM usage",
            "DELETE FROM usage",
            "UPDATE usage SET status = 200",
            "DROP TABLE usage",
            "DROP VIEW daily_cost",
            "CREATE TABLE t AS SELECT 1",
            "CREATE VIEW v AS SELECT * FROM usage",
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "COPY (SELECT 1) TO '/tmp/tollgate-escape.csv'",
            "COPY usage TO '/tmp/tollgate-escape.parquet'",
            "SET datafusion.execution.target_partitions = 1",
            "SELECT 1; DROP TABLE usage",
            "TRUNCATE usage",
            "SELECT * INTO t2 FROM usage",
        ] {
            match engine.run(&who, sql).await {
                Err(QueryError::ReadOnly(_)) => {}
                other => panic!("{who:?} {sql}: {:?}", other.map(|o| o.batches.len())),
            }
        }
        for sql in [
            "SELEC 1",
            "SELECT nope FROM usage",
            "SELECT * FROM '/etc/passwd'",
            "SELECT 1 +",
            "",
        ] {
            assert!(engine.run(&who, sql).await.is_err(), "{sql}");
        }
    }
    assert!(!std::path::Path::new("/tmp/tollgate-escape.csv").exists());
    assert_eq!(
        count(&engine, &Principal::Admin, "SELECT count(*) FROM usage").await,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_stop_queries_with_clear_errors() {
    let dir = scratch("limits");
    Lake::open(&dir)
        .unwrap()
        .publish("t.0", "0", "999", events(1000, 3))
        .unwrap();
    let limits = Limits {
        memory_bytes: 8 << 20,
        timeout: Duration::from_millis(1500),
        max_result_rows: 500,
        max_concurrent: 1,
        max_generated_rows: 100_000,
        ..Limits::default()
    };
    let engine = engine(&dir, limits).await;
    let admin = Principal::Admin;
    assert!(matches!(
        engine.run(&admin, "SELECT * FROM usage").await,
        Err(QueryError::TooLarge(_))
    ));
    assert_eq!(
        engine
            .run(&admin, "SELECT * FROM usage LIMIT 500")
            .await
            .unwrap()
            .batches
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        500
    );
    match engine
        .run(
            &admin,
            "SELECT count(*) FROM generate_series(1, 100000000000) a",
        )
        .await
    {
        Err(QueryError::Timeout(ms)) => assert_eq!(ms, 1500),
        other => panic!("{:?}", other.map(|o| o.batches.len())),
    }
    for sql in [
        "SELECT generate_series(1, 1000000000000)",
        "SELECT range(1, 1000000000000)",
        "SELECT repeat('x', 1000000000000)",
        "SELECT lpad('x', 1000000000000)",
        "SELECT array_repeat(1, 1000000000000)",
    ] {
        match engine.run(&admin, sql).await {
            Err(QueryError::TooLarge(m)) => assert!(m.contains("over the limit"), "{sql}: {m}"),
            other => panic!("{sql}: {:?}", other.map(|o| o.batches.len())),
        }
    }
    assert_eq!(
        count(
            &engine,
            &admin,
            "SELECT cardinality(generate_series(1, 10))"
        )
        .await,
        10
    );
    match engine.run(&admin, "SELECT array_agg(a.value) FROM generate_series(1, 5000000) a GROUP BY a.value % 1000000").await {
        Err(QueryError::Resources(m)) => assert!(m.contains("memory"), "{m}"),
        other => panic!("{:?}", other.map(|o| o.batches.len())),
    }
    // One slot: a second query while one runs is refused, not queued.
    let e2 = engine.clone();
    let slow = tokio::spawn(async move {
        e2.run(
            &Principal::Admin,
            "SELECT count(*) FROM generate_series(1, 100000000000) a",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        engine.run(&admin, "SELECT 1").await,
        Err(QueryError::Busy(_))
    ));
    let _ = slow.await;
    assert_eq!(count(&engine, &admin, "SELECT 1").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_money_is_exact_and_new_files_show_up_at_once() {
    let dir = scratch("money");
    let lake = Lake::open(&dir).unwrap();
    let first = events(2000, 4);
    lake.publish("t.0", "0", "1999", first.clone()).unwrap();
    let engine = engine(&dir, Limits::default()).await;
    let params = |extra: &[(&str, &str)]| {
        let mut p = vec![
            ("from".to_string(), "2026-03-01".to_string()),
            ("to".to_string(), "2026-03-08".to_string()),
        ];
        p.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        p
    };
    let cost = |extra: &[(&str, &str)]| {
        let engine = engine.clone();
        let p = params(extra);
        async move {
            let r = CostRequest::parse(&p, engine.catalogs()).unwrap();
            reports::cost(&engine, &Principal::Admin, &r).await.unwrap()
        }
    };
    let dec = |v: &serde_json::Value| v.as_str().unwrap().parse::<Decimal>().unwrap();
    let expected = |evs: &[UsageEvent]| {
        evs.iter()
            .filter_map(|e| e.cost_usd)
            .map(|c| c.decimal())
            .sum::<Decimal>()
    };

    let report = cost(&[
        ("group_by", "consumer,model,tag:feature"),
        ("granularity", "hour"),
    ])
    .await;
    let rows_sum: Decimal = report.rows.iter().map(|r| dec(&r["cost_usd"])).sum();
    assert_eq!(rows_sum, dec(&report.totals["cost_usd"]));
    assert_eq!(dec(&report.totals["cost_usd"]), expected(&first));
    let tokens: u64 = first.iter().map(|e| e.output_tokens).sum();
    assert_eq!(report.totals["output_tokens"], tokens);
    // Per consumer, as computed from the events themselves.
    let mut by_consumer: BTreeMap<String, Decimal> = BTreeMap::new();
    for e in &first {
        *by_consumer
            .entry(e.consumer.clone().unwrap_or_default())
            .or_default() += e.cost_usd.map(|c| c.decimal()).unwrap_or_default();
    }
    let report = cost(&[("group_by", "consumer"), ("granularity", "month")]).await;
    for row in &report.rows {
        assert_eq!(
            dec(&row["cost_usd"]),
            by_consumer[row["consumer"].as_str().unwrap()],
            "{row}"
        );
    }

    // Repriced with another catalog: deepseek output at $1.00 instead of $2.19.
    let alt = cost(&[("group_by", "model"), ("catalog", "alt-2025-11-26")]).await;
    let shipped = cost(&[("group_by", "model"), ("catalog", "2025-11-26")]).await;
    let find = |r: &reports::Report, m: &str| {
        r.rows
            .iter()
            .find(|x| x["model"] == m)
            .map(|x| dec(&x["cost_usd"]))
    };
    if let (Some(a), Some(s)) = (
        find(&alt, "deepseek-reasoner"),
        find(&shipped, "deepseek-reasoner"),
    ) {
        assert!(a < s, "{a} vs {s}");
    }
    assert_eq!(find(&alt, "qwq-32b"), find(&shipped, "qwq-32b"));

    // Published after start: visible to the next query.
    let second = events(500, 5);
    lake.publish("t.1", "0", "499", second.clone()).unwrap();
    assert_eq!(
        count(&engine, &Principal::Admin, "SELECT count(*) FROM usage").await,
        2500
    );
    let report = cost(&[]).await;
    let all: Vec<UsageEvent> = first.iter().chain(&second).cloned().collect();
    assert_eq!(dec(&report.totals["cost_usd"]), expected(&all));

    // ROI: the thinking tax and the what-if pricing.
    let p = params(&[
        ("reprice", "deepseek-r1:qwq-32b"),
        ("gpu_hour_usd", "2.50"),
        ("tokens_per_s", "1500"),
    ]);
    let roi = reports::roi(
        &engine,
        &Principal::Admin,
        &RoiRequest::parse(&p, engine.catalogs()).unwrap(),
    )
    .await
    .unwrap();
    let rows_sum: Decimal = roi.rows.iter().map(|r| dec(&r["cost_usd"])).sum();
    assert_eq!(rows_sum, dec(&roi.totals["cost_usd"]));
    let repriced: Vec<_> = roi
        .rows
        .iter()
        .filter(|r| r.get("repriced").is_some())
        .collect();
    assert!(!repriced.is_empty(), "deepseek rows are repriced");
    for r in &repriced {
        assert_eq!(r["repriced"]["model"], "qwq-32b");
        assert!(dec(&r["repriced"]["cost_usd"]) < dec(&r["cost_usd"]), "{r}");
    }
    let sh = &roi.params["self_host"];
    assert!(
        sh["break_even_output_tokens_per_month"].as_u64().unwrap() > 0,
        "{sh}"
    );
    assert_eq!(
        dec(&sh["self_host_cost_per_million_output_tokens_usd"]),
        "0.462963".parse::<Decimal>().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_on_date_and_hour_finds_the_zero_padded_hour_directories() {
    let dir = scratch("hours");
    let lake = Lake::open(&dir).unwrap();
    // From 09:00, about one event every 2 s: hours 09 and 10.
    lake.publish("t.0", "0", "3999", events(4000, 3)).unwrap();
    let engine = engine(&dir, Limits::default()).await;
    let admin = Principal::Admin;
    for hour in [9, 10] {
        // Arithmetic on the column keeps it out of the listing prefix.
        let want = count(
            &engine,
            &admin,
            &format!("SELECT count(*) FROM usage WHERE hour + 0 = {hour}"),
        )
        .await;
        assert!(want > 1000);
        for sql in [
            format!("SELECT count(*) FROM usage WHERE date = DATE '2026-03-01' AND hour = {hour}"),
            format!("SELECT count(*) FROM usage WHERE hour = {hour} AND date = DATE '2026-03-01'"),
            format!("SELECT count(*) FROM usage WHERE date = '2026-03-01' AND {hour} = hour"),
            format!(
                "SELECT count(*) FROM usage WHERE (date = DATE '2026-03-01' AND hour = {hour}) \
                 OR (date = DATE '2026-03-01' AND hour = 99)"
            ),
        ] {
            assert_eq!(count(&engine, &admin, &sql).await, want, "{sql}");
        }
    }
    assert_eq!(
        count(
            &engine,
            &a(),
            "SELECT count(*) FROM usage WHERE date = DATE '2026-03-01' AND hour = 9"
        )
        .await,
        count(
            &engine,
            &a(),
            "SELECT count(*) FROM usage WHERE hour + 0 = 9"
        )
        .await,
    );
}

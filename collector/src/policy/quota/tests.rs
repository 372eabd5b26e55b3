use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use tollgate_schemas::Usd;

use super::*;
use crate::config::Config;

struct Fixture {
    quota: Arc<Quota>,
    now: Arc<Mutex<DateTime<Utc>>>,
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Consumers the rules' filters may name.
pub(crate) const CONSUMERS: &str = r#"[[consumers]]
name = "alice"
team = "search"
api_keys = ["sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
[[consumers]]
name = "ops"
api_keys = ["sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"]
[[consumers]]
name = "bob"
api_keys = ["sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"]
"#;

fn fixture(rules: &str, start: &str) -> Fixture {
    let text = format!(
        "[upstreams.s]\nkind = \"simulated\"\n[[routes]]\nmodel = \"*\"\ntargets = [{{ upstream = \"s\" }}]\n{CONSUMERS}{rules}"
    );
    let config = Config::from_toml(&text).unwrap();
    let now = Arc::new(Mutex::new(at(start)));
    let clock_now = now.clone();
    let clock: Clock = Arc::new(move || *clock_now.lock().unwrap());
    let quota = Quota::new(&config.limits, None, clock).unwrap();
    Fixture {
        quota: Arc::new(quota),
        now,
    }
}

impl Fixture {
    fn set(&self, t: &str) {
        *self.now.lock().unwrap() = at(t);
    }

    /// Admits a request by `consumer` with `input` tokens and `max_tokens`,
    /// priced at $1 per 1M tokens.
    async fn admit(&self, consumer: &str, input: u64, max_tokens: Option<u64>) -> Admission {
        let tags = BTreeMap::new();
        let headers = HeaderMap::new();
        let ask = Ask {
            model: "deepseek-r1",
            consumer: Some(consumer),
            team: Some("search"),
            tags: &tags,
            headers: &headers,
            query: None,
            peer: None,
        };
        let estimate = Estimate {
            input: &move || input,
            max_tokens,
            choices: 1,
            price: &|i, o| Some(Usd::for_tokens(i + o, rust_decimal::Decimal::ONE)),
        };
        self.quota.admit(&ask, &estimate).await
    }

    fn used(&self, limit: usize, key: &str) -> Figures {
        let frame = self.quota.span_of(limit).frame(self.quota.now());
        self.quota.local.figures(limit, key, frame)
    }
}

fn granted(a: Admission) -> Grant {
    match a {
        Admission::Granted(g) => g,
        Admission::Tripped(t) => panic!("tripped {t:?}"),
    }
}

fn tripped(a: Admission) -> Trip {
    match a {
        Admission::Granted(_) => panic!("granted"),
        Admission::Tripped(t) => t,
    }
}

fn spent(input: u64, output: u64) -> Spent {
    Spent {
        input,
        output,
        cost: Some(Usd::for_tokens(input + output, rust_decimal::Decimal::ONE)),
    }
}

const R1: &str = r#"
[[rate_limits]]
name = "r1-tokens"
model = "deepseek-*"
key = "consumer"
tokens_per_minute = 1000
requests_per_minute = 100
on_limit = { fallback = "qwq-32b" }
"#;

#[tokio::test]
async fn a_reservation_settles_to_what_the_request_used() {
    let f = fixture(R1, "2026-11-30T10:00:00Z");
    let g = granted(f.admit("alice", 100, Some(200)).await);
    assert_eq!(
        f.used(0, "alice").used,
        300,
        "input plus max_tokens reserved"
    );
    assert_eq!(f.used(0, "alice").reserved, 300);
    let h = g.headers.tokens.unwrap();
    assert_eq!((h.limit, h.remaining), (1000, 700));
    assert_eq!(g.headers.requests.unwrap().remaining, 99);
    g.settle(&spent(100, 40));
    assert_eq!(
        f.used(0, "alice"),
        Figures {
            used: 140,
            reserved: 0,
            newest: Some(f.used(0, "alice").newest.unwrap())
        }
    );
    assert_eq!(f.used(1, "alice").used, 1, "one request");
    assert_eq!(f.used(0, "bob").used, 0, "one counter per consumer");
}

#[tokio::test]
async fn a_request_that_would_go_over_reserves_nothing_and_says_when_to_retry() {
    let f = fixture(R1, "2026-11-30T10:00:00Z");
    granted(f.admit("alice", 100, Some(800)).await).settle(&spent(100, 800));
    f.set("2026-11-30T10:00:20Z");
    let t = tripped(f.admit("alice", 50, Some(100)).await);
    assert_eq!(t.limit_key, "r1-tokens:alice");
    assert_eq!(t.action, Action::Fallback("qwq-32b".into()));
    assert_eq!(t.kind, Kind::RateLimit);
    assert_eq!(
        t.retry_after.as_secs(),
        40,
        "when the 10:00:00 bucket leaves"
    );
    assert_eq!(
        f.used(1, "alice").used,
        1,
        "the request figure was not taken either"
    );
    f.set("2026-11-30T10:01:00Z");
    granted(f.admit("alice", 50, Some(100)).await);
}

#[tokio::test]
async fn a_dropped_grant_releases_its_reservation() {
    let f = fixture(R1, "2026-11-30T10:00:00Z");
    drop(granted(f.admit("alice", 100, Some(200)).await));
    assert_eq!(f.used(0, "alice").used, 0);
    assert_eq!(f.used(1, "alice").used, 1, "a request is a request");
}

#[tokio::test]
async fn concurrent_admissions_never_exceed_the_limit() {
    let f = fixture(R1, "2026-11-30T10:00:00Z");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let q = f.quota.clone();
        let fx = Fixture {
            quota: q,
            now: f.now.clone(),
        };
        tasks.push(tokio::spawn(async move {
            match fx.admit("alice", 10, Some(30)).await {
                Admission::Granted(g) => {
                    tokio::task::yield_now().await;
                    let used = 10 + fastrand::u64(0..=30);
                    g.settle(&spent(10, used - 10));
                    used
                }
                Admission::Tripped(_) => 0,
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total <= 1000, "admitted requests used {total} tokens");
    assert_eq!(f.used(0, "alice").used as u64, total);
}

const BUDGETS: &str = r#"
[[budgets]]
name = "search-monthly"
team = "search"
usd = "0.001"
period = "month"
timezone = "Asia/Shanghai"
on_exhausted = "block"
[[budgets]]
name = "daily-utc"
usd = "1"
period = "day"
on_exhausted = "alert_only"
"#;

#[tokio::test]
async fn a_budget_renews_at_its_local_month_start_and_a_day_at_utc_midnight() {
    let f = fixture(BUDGETS, "2026-11-30T15:59:00Z");
    granted(f.admit("alice", 500, Some(500)).await).settle(&spent(500, 500));
    let t = tripped(f.admit("alice", 1, Some(1)).await);
    assert_eq!(t.kind, Kind::Budget);
    assert_eq!(t.action, Action::Reject);
    assert_eq!(t.limit_key, "search-monthly:*");
    assert_eq!(t.retry_after.as_secs(), 60, "December starts at 16:00 UTC");
    f.set("2026-11-30T16:00:00Z");
    granted(f.admit("alice", 1, Some(1)).await);
    assert_eq!(f.used(1, "*").used, 10_000_000, "the UTC day goes on");
    f.set("2026-12-01T00:00:00Z");
    assert_eq!(f.used(1, "*").used, 0, "a new UTC day");
}

#[tokio::test]
async fn an_alert_only_budget_counts_but_never_refuses() {
    let f = fixture(
        "[[budgets]]\nname = \"b\"\nusd = \"0.0000001\"\non_exhausted = \"alert_only\"",
        "2026-11-30T10:00:00Z",
    );
    for _ in 0..3 {
        granted(f.admit("alice", 100, Some(100)).await).settle(&spent(100, 100));
    }
    assert_eq!(
        f.used(0, "*").used,
        6_000_000,
        "600 tokens at $1/M in 10^-10 USD"
    );
}

#[tokio::test]
async fn budgets_seeded_from_the_ledger_count_from_the_start() {
    let f = fixture(BUDGETS, "2026-11-30T10:00:00Z");
    f.quota
        .seed_budgets(&BTreeMap::from([("search-monthly".to_string(), 9_000_000)]))
        .await;
    let t = tripped(f.admit("alice", 100, Some(100)).await);
    assert_eq!(t.rule.as_ref(), "search-monthly");
    granted(f.admit("alice", 50, Some(50)).await);
}

#[tokio::test]
async fn the_view_shows_used_reserved_and_limit() {
    let f = fixture(&format!("{R1}{BUDGETS}"), "2026-11-30T10:00:00Z");
    let _held = granted(f.admit("alice", 100, Some(100)).await);
    granted(f.admit("bob", 10, Some(10)).await).settle(&spent(10, 5));
    let all = f.quota.view(&view::Viewer::Admin).await;
    let rows = all["data"].as_array().unwrap();
    let alice = rows
        .iter()
        .find(|r| r["rule"] == "r1-tokens" && r["key"] == "alice" && r["unit"] == "tokens")
        .unwrap();
    assert_eq!(alice["reserved"], 200);
    assert_eq!(alice["used"], 0);
    assert_eq!(alice["limit"], 1000);
    let budget = rows.iter().find(|r| r["rule"] == "search-monthly").unwrap();
    assert_eq!(budget["period_start"], "2026-10-31T16:00:00.000Z");
    assert_eq!(budget["limit"], "0.001");
    let own = f
        .quota
        .view(&view::Viewer::Consumer {
            name: "bob",
            team: None,
        })
        .await;
    let keys: Vec<&str> = own["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert!(
        keys.contains(&"bob") && !keys.contains(&"alice"),
        "{keys:?}"
    );
    assert!(
        !own["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule"] == "search-monthly"),
        "bob is not in team search"
    );
}

//! Rate limits and budgets through the whole request path: what trips,
//! what the client sees, what the event says, and counters equal to the
//! ledger.

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use tollgate_schemas::Outcome;

use crate::harness::*;

const ADMIN: &str = "tg-admin-limits-5c2f";

fn sections(rules: &str) -> String {
    format!(
        "[gateway]\nadmin_token = \"{ADMIN}\"\n\n{}{}\
         [[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"r1\", model = \"deepseek-reasoner\" }}]\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"qwq\", model = \"qwq-32b\" }}]\n\n{rules}\n",
        simulated("r1", &["output_tokens = 40", "reasoning_tokens = 10"]),
        simulated("qwq", &["output_tokens = 20"]),
    )
}

fn chat_max(model: &str, stream: bool, max_tokens: u64) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Summarise the spend."}],
    })
    .to_string()
}

async fn limits(gw: &TestGateway, key: Option<&str>) -> (u16, Value) {
    let mut req = Request::get("/v1/limits");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = gw.send(req.body(Body::empty()).unwrap()).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn row<'a>(view: &'a Value, rule: &str, key: &str, unit: &str) -> &'a Value {
    view["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == rule && r["key"] == key && r["unit"] == unit)
        .unwrap_or_else(|| panic!("no {rule}/{key}/{unit} in {view:#}"))
}

const R1_LIMIT: &str = r#"
[[rate_limits]]
name = "r1-tokens"
model = "deepseek-r1"
key = "consumer"
tokens_per_minute = 200
on_limit = { fallback = "qwq-32b" }
"#;

#[tokio::test]
async fn a_limited_r1_request_is_served_by_qwq_and_the_event_says_why() {
    let gw = TestGateway::start(&sections(R1_LIMIT));
    let mut served = Vec::new();
    for _ in 0..4 {
        let (status, headers, body) = gw
            .post(
                "/v1/chat/completions",
                Some(CLIENT_KEY),
                &chat_max("deepseek-r1", false, 100),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        served.push(
            headers["x-tollgate-served-model"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    // Each R1 request reserves its input plus 100, settles to input plus 40.
    assert_eq!(served[..2], ["deepseek-reasoner", "deepseek-reasoner"]);
    assert_eq!(served.last().unwrap(), "qwq-32b", "{served:?}");
    let (_, view) = limits(&gw, Some(ADMIN)).await;
    let r1 = row(&view, "r1-tokens", "app", "tokens");
    assert_eq!(r1["reserved"], 0);
    let events = gw.exactly(4).await;
    let r1_tokens: u64 = events
        .iter()
        .filter(|e| !e.rate_limited)
        .map(|e| e.input_tokens + e.output_tokens)
        .sum();
    assert_eq!(r1["used"], r1_tokens, "the counter equals the ledger");
    let limited = events.last().unwrap();
    assert!(limited.rate_limited && limited.fallback);
    assert_eq!(limited.fallback_reason.as_deref(), Some("rate_limited"));
    assert_eq!(limited.fallback_from.as_deref(), Some("deepseek-r1"));
    assert_eq!(limited.limit_key.as_deref(), Some("r1-tokens:app"));
    assert_eq!(limited.served_model.as_deref(), Some("qwq-32b"));
    assert_eq!(limited.outcome, Outcome::Ok);
    assert_eq!(limited.output_tokens, 20);
}

#[tokio::test]
async fn the_fallback_models_own_limit_still_applies_and_nothing_loops() {
    let gw = TestGateway::start(&sections(&format!(
        "{R1_LIMIT}\n[[rate_limits]]\nname = \"qwq-requests\"\nmodel = \"qwq-32b\"\nrequests_per_minute = 1\non_limit = \"reject\"\n"
    )));
    let mut served = Vec::new();
    for _ in 0..6 {
        let (status, headers, body) = gw
            .post(
                "/v1/chat/completions",
                Some(CLIENT_KEY),
                &chat_max("deepseek-r1", false, 100),
            )
            .await;
        served.push(match headers.get("x-tollgate-served-model") {
            Some(m) => m.to_str().unwrap().to_string(),
            None => status.as_u16().to_string(),
        });
        if status == 429 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{body}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("qwq-requests")
            );
            assert!(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            assert_eq!(headers["x-ratelimit-limit-requests"], "1");
            assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
        }
    }
    assert_eq!(
        served,
        [
            "deepseek-reasoner",
            "deepseek-reasoner",
            "qwq-32b",
            "429",
            "429",
            "429"
        ],
        "R1 until its limit, one QwQ request, then refusals"
    );
    let events = gw.exactly(6).await;
    let refused = events.last().unwrap();
    assert_eq!(refused.outcome, Outcome::RateLimited);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.limit_key.as_deref(), Some("qwq-requests:app"));
    assert!(refused.attempts.is_empty(), "nothing went upstream");
}

#[tokio::test]
async fn a_spent_budget_blocks_with_budget_exceeded_and_counters_match_the_ledger() {
    let gw = TestGateway::start(&sections(
        "[[budgets]]\nname = \"search-daily\"\nteam = \"search\"\nusd = \"0.00002\"\nperiod = \"day\"\non_exhausted = \"block\"\n",
    ));
    let mut codes = Vec::new();
    for stream in [false, true, false, true, false, true] {
        let (status, headers, body) = gw
            .post(
                "/v1/chat/completions",
                Some(CLIENT_KEY),
                &chat_max("qwq-32b", stream, 50),
            )
            .await;
        if status == 429 {
            let v: Value = serde_json::from_str(&body).unwrap();
            codes.push(v["error"]["code"].as_str().unwrap().to_string());
            assert!(headers.contains_key("retry-after"));
        } else {
            assert_eq!(status, 200, "{body}");
        }
    }
    assert!(
        codes.iter().all(|c| c == "budget_exceeded") && !codes.is_empty(),
        "{codes:?}"
    );
    let (_, view) = limits(&gw, Some(CLIENT_KEY)).await;
    let b = row(&view, "search-daily", "*", "usd").clone();
    assert_eq!(b["reserved"], "0");
    let (_, other) = limits(&gw, Some(OTHER_KEY)).await;
    assert!(
        other["data"].as_array().unwrap().is_empty(),
        "not in team search: {other}"
    );
    let events = gw.exactly(6).await;
    let spent: rust_decimal::Decimal = events
        .iter()
        .filter_map(|e| e.cost_usd)
        .map(|c| c.decimal())
        .sum();
    assert_eq!(b["used"].as_str().unwrap(), spent.normalize().to_string());
    assert!(spent <= "0.00002".parse().unwrap());
    assert!(events.iter().any(|e| e.outcome == Outcome::BudgetExceeded));
}

#[tokio::test]
async fn streamed_and_whole_answers_charge_the_same() {
    let gw = TestGateway::start(&sections(
        "[[rate_limits]]\nname = \"all\"\nkey = \"global\"\ntokens_per_hour = 1000000\n",
    ));
    let mut after = Vec::new();
    for stream in [false, true] {
        gw.post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &chat_max("qwq-32b", stream, 64),
        )
        .await;
        let (_, view) = limits(&gw, Some(ADMIN)).await;
        after.push(row(&view, "all", "*", "tokens")["used"].as_i64().unwrap());
    }
    assert_eq!(after[1], 2 * after[0], "{after:?}");
    let (_, headers, _) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &chat_max("qwq-32b", true, 64),
        )
        .await;
    assert_eq!(headers["x-ratelimit-limit-tokens"], "1000000");
    assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
    assert!(headers.contains_key("x-ratelimit-reset-tokens"));
    gw.exactly(3).await;
}

#[tokio::test]
async fn the_limits_view_needs_a_key() {
    let gw = TestGateway::start(&sections(R1_LIMIT));
    assert_eq!(limits(&gw, None).await.0, 401);
    assert_eq!(limits(&gw, Some("tg-wrong")).await.0, 401);
    let (status, all) = limits(&gw, Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(all["object"], "list");
    gw.exactly(0).await;
}

/// Header name and value pairs (`:query` is the URL's query string).
type Pairs = &'static [(&'static str, &'static str)];

/// One request per minute per key value: a second request with the same
/// value is refused, one with another value (or none) is not.
#[tokio::test]
async fn every_key_source_counts_per_value_and_matched_values_only() {
    // (key, match, value header pairs for the first request, for a second
    // value, and for a request the rule does not count)
    let cases: [(&str, &str, Pairs, Pairs, Pairs); 9] = [
        (
            "header:x-user",
            "",
            &[("x-user", "u1")],
            &[("x-user", "u2")],
            &[],
        ),
        (
            "header:x-user",
            "match = \"vip-*\"",
            &[("x-user", "vip-1")],
            &[("x-user", "vip-2")],
            &[("x-user", "free-1")],
        ),
        (
            "cookie:session",
            "",
            &[("cookie", "a=1; session=s1")],
            &[("cookie", "session=s2")],
            &[("cookie", "a=1")],
        ),
        (
            "ip",
            "",
            &[("x-forwarded-for", "10.0.0.1")],
            &[("x-forwarded-for", "10.0.0.2")],
            &[],
        ),
        (
            "ip",
            "match = \"10.0.0.0/8\"",
            &[("x-forwarded-for", "9.9.9.9, 10.0.0.1")],
            &[("x-forwarded-for", "10.0.0.2")],
            &[("x-forwarded-for", "192.168.0.1")],
        ),
        (
            "tag:feature",
            "",
            &[("x-tollgate-tags", "feature=search")],
            &[("x-tollgate-tags", "feature=chat")],
            &[],
        ),
        (
            "tag:feature",
            "match = \"regexp:^sea\"",
            &[("x-tollgate-tags", "feature=search")],
            &[("x-tollgate-tags", "feature=seal")],
            &[("x-tollgate-tags", "feature=chat")],
        ),
        (
            "query:user",
            "",
            &[(":query", "user=q1")],
            &[(":query", "user=q2")],
            &[],
        ),
        (
            "query:user",
            "match = \"q*\"\nshared = true",
            &[(":query", "user=q1")],
            &[(":query", "user=q2")],
            &[(":query", "user=z")],
        ),
    ];
    for (key, matching, first, second, uncounted) in cases {
        let gw = TestGateway::start(&format!(
            "[gateway]\nclient_ip_header = \"x-forwarded-for\"\n\n{}[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"qwq\" }}]\n\n\
             [[rate_limits]]\nname = \"one\"\nkey = \"{key}\"\n{matching}\nrequests_per_minute = 1\n",
            simulated("qwq", &["output_tokens = 4"]),
        ));
        let send = |pairs: Pairs| {
            let mut path = "/v1/chat/completions".to_string();
            let mut req = Request::post("/")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {CLIENT_KEY}"));
            for (name, value) in pairs {
                if *name == ":query" {
                    path = format!("{path}?{value}");
                } else {
                    req = req.header(*name, *value);
                }
            }
            let req = req
                .uri(path)
                .body(Body::from(chat("qwq-32b", false)))
                .unwrap();
            gw.send(req)
        };
        let status = |r: axum::response::Response| r.status().as_u16();
        assert_eq!(status(send(first).await), 200, "{key} {matching}: first");
        assert_eq!(
            status(send(first).await),
            429,
            "{key} {matching}: same value again"
        );
        // A shared counter counts every matching value together.
        let expect_second = if matching.contains("shared") {
            429
        } else {
            200
        };
        assert_eq!(
            status(send(second).await),
            expect_second,
            "{key} {matching}: another value"
        );
        for _ in 0..2 {
            assert_eq!(
                status(send(uncounted).await),
                200,
                "{key} {matching}: not counted"
            );
        }
        drop(gw);
    }
}

/// The consumer and team keys, with the consumer that is not in the team.
#[tokio::test]
async fn consumer_and_team_keys_count_their_own_requests() {
    for (key, other_counted) in [("consumer", true), ("team", false)] {
        let gw = TestGateway::start(&format!(
            "{}[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"qwq\" }}]\n\n\
             [[rate_limits]]\nname = \"one\"\nkey = \"{key}\"\nrequests_per_minute = 1\n",
            simulated("qwq", &["output_tokens = 4"]),
        ));
        let body = chat("qwq-32b", false);
        let post = |k| gw.post("/v1/chat/completions", Some(k), &body);
        assert_eq!(post(CLIENT_KEY).await.0, 200);
        assert_eq!(post(CLIENT_KEY).await.0, 429, "{key}");
        // `limited` has no team: a team rule does not count it.
        assert_eq!(post(OTHER_KEY).await.0, 200, "{key}");
        let again = if other_counted { 429 } else { 200 };
        assert_eq!(post(OTHER_KEY).await.0, again, "{key}");
    }
}

#[tokio::test]
async fn an_enormous_max_tokens_is_refused_and_leaves_the_counters_whole() {
    let gw = TestGateway::start(&sections(
        "[[rate_limits]]\nname = \"tpm\"\nkey = \"consumer\"\ntokens_per_minute = 20000\n\n\
         [[budgets]]\nname = \"daily\"\nteam = \"search\"\nusd = \"1\"\nperiod = \"day\"\n",
    ));
    let (status, _, _) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &chat_max("qwq-32b", false, 5),
        )
        .await;
    assert_eq!(status, 200);
    for max in [u64::MAX, i64::MAX as u64, 420_000_000_000, 30_000] {
        let (status, headers, body) = gw
            .post(
                "/v1/chat/completions",
                Some(CLIENT_KEY),
                &chat_max("qwq-32b", false, max),
            )
            .await;
        assert_eq!(status, 429, "{max}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("Request too large"), "{message}");
        assert!(!headers.contains_key("retry-after"), "no retry can fit");
    }
    let (_, view) = limits(&gw, Some(ADMIN)).await;
    let tpm = row(&view, "tpm", "app", "tokens");
    assert_eq!(tpm["reserved"], 0);
    let events = gw.exactly(5).await;
    assert_eq!(
        tpm["used"],
        events[0].input_tokens + events[0].output_tokens
    );
    assert!(
        events[1..]
            .iter()
            .all(|e| e.outcome == Outcome::RateLimited)
    );
}

#[tokio::test]
async fn every_answer_asked_for_is_reserved() {
    let gw = TestGateway::start(&sections(
        "[[rate_limits]]\nname = \"tpm\"\nkey = \"consumer\"\ntokens_per_minute = 300\n",
    ));
    let body = |n: u64| {
        serde_json::json!({
            "model": "qwq-32b", "max_tokens": 100, "n": n,
            "messages": [{"role": "user", "content": "hi"}],
        })
        .to_string()
    };
    let (status, _, _) = gw
        .post("/v1/chat/completions", Some(CLIENT_KEY), &body(2))
        .await;
    assert_eq!(status, 200, "input plus 2 x 100 fits in 300");
    let (status, _, text) = gw
        .post("/v1/chat/completions", Some(CLIENT_KEY), &body(4))
        .await;
    assert_eq!(status, 429, "input plus 4 x 100 never fits: {text}");
    assert!(text.contains("Request too large"), "{text}");
    gw.exactly(2).await;
}

//! The exact response cache in process (the store without `[redis]`):
//! hits and misses per parameter, isolation between consumers and
//! scopes, streamed replay, failed and cancelled streams never stored,
//! `Cache-Control`, and what hits put in the ledger. The same paths
//! against a real Redis are in `tests/python/test_cache.py`.

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate_schemas::{CacheKind, CacheStatus, Outcome, Usd};

use crate::harness::*;

fn sections(cache: &str, knobs: &[&str]) -> String {
    format!(
        "{}[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"qwq\" }}]\ncache = {cache}\n\n",
        simulated("qwq", knobs),
    )
}

const EXACT: &str = r#"{ mode = "exact", ttl_s = 600 }"#;

fn body(extra: Value) -> String {
    let mut b = json!({
        "model": "qwq-32b",
        "messages": [{"role": "user", "content": "What did search spend?"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

async fn post(
    gw: &TestGateway,
    key: &str,
    body: &str,
    control: Option<&str>,
) -> (u16, String, String) {
    let mut req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    if let Some(c) = control {
        req = req.header("cache-control", c);
    }
    let resp = gw
        .send(req.body(Body::from(body.to_string())).unwrap())
        .await;
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, cache, String::from_utf8_lossy(&bytes).into_owned())
}

fn content(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A stream's text and its usage chunk.
fn streamed(body: &str) -> (String, Value) {
    let mut text = String::new();
    let mut usage = Value::Null;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    (text, usage)
}

#[tokio::test]
async fn a_repeated_request_is_a_hit_that_costs_nothing_and_saves_what_the_first_cost() {
    let gw = TestGateway::start(&sections(EXACT, &["output_tokens = 8"]));
    let b = body(json!({"temperature": 0.2}));
    let (s1, c1, first) = post(&gw, CLIENT_KEY, &b, None).await;
    let (s2, c2, second) = post(&gw, CLIENT_KEY, &b, None).await;
    assert_eq!((s1, c1.as_str()), (200, "miss"));
    assert_eq!((s2, c2.as_str()), (200, "hit"));
    assert_eq!(content(&first), content(&second));
    let (v1, v2): (Value, Value) = (
        serde_json::from_str(&first).unwrap(),
        serde_json::from_str(&second).unwrap(),
    );
    assert_ne!(v1["id"], v2["id"], "a hit is a response of its own");
    assert_eq!(v1["usage"], v2["usage"]);
    let events = gw.exactly(2).await;
    let (miss, hit) = (&events[0], &events[1]);
    assert_eq!(miss.cache, CacheStatus::Miss);
    assert_eq!(miss.cache_kind, Some(CacheKind::Exact));
    assert_eq!(hit.cache, CacheStatus::Hit);
    assert_eq!(hit.cache_kind, Some(CacheKind::Exact));
    assert_eq!(hit.outcome, Outcome::Ok);
    assert_eq!(hit.cost_usd, Some(Usd::ZERO));
    assert!(miss.cost_usd.is_some_and(|c| c > Usd::ZERO));
    assert_eq!(hit.cost_saved_usd, miss.cost_usd);
    assert_eq!(
        (hit.input_tokens, hit.output_tokens),
        (miss.input_tokens, miss.output_tokens)
    );
    assert_eq!(hit.served_model, miss.served_model);
    assert!(hit.attempts.is_empty() && hit.upstream_latency_ms.is_none());
}

#[tokio::test]
async fn each_parameter_that_changes_the_answer_is_a_miss_and_field_order_is_not() {
    let gw = TestGateway::start(&sections(EXACT, &[]));
    let base = json!({"temperature": 0.2, "top_p": 0.9});
    post(&gw, CLIENT_KEY, &body(base), None).await;
    let reordered = r#"{ "top_p": 0.9,
        "messages": [{"content": "What did search spend?", "role": "user"}],
        "temperature": 0.2, "model": "qwq-32b" }"#;
    assert_eq!(post(&gw, CLIENT_KEY, reordered, None).await.1, "hit");
    let changed = [
        json!({"temperature": 0.3, "top_p": 0.9}),
        json!({"temperature": 0.2, "top_p": 0.8}),
        json!({"temperature": 0.2, "top_p": 0.9, "seed": 7}),
        json!({"temperature": 0.2, "top_p": 0.9, "max_tokens": 5}),
        json!({"temperature": 0.2, "top_p": 0.9, "response_format": {"type": "json_object"}}),
        json!({"temperature": 0.2, "top_p": 0.9, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ];
    for extra in &changed {
        let (_, cache, _) = post(&gw, CLIENT_KEY, &body(extra.clone()), None).await;
        assert_eq!(cache, "miss", "{extra}");
    }
    gw.exactly(2 + changed.len()).await;
}

#[tokio::test]
async fn consumers_never_share_entries_unless_the_scope_says_so() {
    let b = body(json!({}));
    let per_consumer = TestGateway::start(&sections(EXACT, &[]));
    post(&per_consumer, CLIENT_KEY, &b, None).await;
    assert_eq!(post(&per_consumer, OTHER_KEY, &b, None).await.1, "miss");
    assert_eq!(post(&per_consumer, OTHER_KEY, &b, None).await.1, "hit");
    per_consumer.exactly(3).await;
    // `limited` has no team: a team scope keeps it to itself.
    let team = TestGateway::start(&sections(r#"{ mode = "exact", scope = "team" }"#, &[]));
    post(&team, CLIENT_KEY, &b, None).await;
    assert_eq!(post(&team, OTHER_KEY, &b, None).await.1, "miss");
    team.exactly(2).await;
    let global = TestGateway::start(&sections(r#"{ mode = "exact", scope = "global" }"#, &[]));
    post(&global, CLIENT_KEY, &b, None).await;
    assert_eq!(post(&global, OTHER_KEY, &b, None).await.1, "hit");
    global.exactly(2).await;
}

#[tokio::test]
async fn a_streamed_hit_replays_the_original_stream_content_and_usage() {
    let gw = TestGateway::start(&sections(EXACT, &["output_tokens = 12"]));
    let b = body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (_, c1, first) = post(&gw, CLIENT_KEY, &b, None).await;
    let (_, c2, second) = post(&gw, CLIENT_KEY, &b, None).await;
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
    let (text, usage) = streamed(&first);
    assert!(!text.is_empty());
    assert_eq!(streamed(&second), (text.clone(), usage.clone()));
    assert!(second.trim_end().ends_with("data: [DONE]"));
    assert_eq!(usage["completion_tokens"], 12);
    // The same request whole: the streamed answer, as JSON.
    let (_, c3, whole) = post(&gw, CLIENT_KEY, &body(json!({})), None).await;
    assert_eq!(c3, "hit");
    assert_eq!(content(&whole), text);
    let events = gw.exactly(3).await;
    assert_eq!(events[1].output_tokens, 12);
    assert!(
        events[1].ttft_ms.is_some(),
        "a streamed hit has its first token"
    );
    assert!(events[1].upstream.is_none(), "no upstream was asked");
    assert_eq!(events[1].cost_saved_usd, events[0].cost_usd);
}

#[tokio::test]
async fn a_broken_stream_is_never_stored() {
    let gw = TestGateway::start(&sections(
        EXACT,
        &["output_tokens = 20", "fail_after_chunks = 5"],
    ));
    let b = body(json!({"stream": true}));
    for _ in 0..2 {
        let (status, cache, text) = post(&gw, CLIENT_KEY, &b, None).await;
        assert_eq!((status, cache.as_str()), (200, "miss"), "{text}");
        assert!(text.contains("stream_error"), "{text}");
    }
    gw.exactly(2).await;
}

#[tokio::test]
async fn a_cancelled_stream_is_never_stored() {
    let gw = TestGateway::start(&sections(
        EXACT,
        &["output_tokens = 50", "tokens_per_s = 50"],
    ));
    let b = body(json!({"stream": true}));
    let req = request("/v1/chat/completions", Some(CLIENT_KEY), &b);
    let resp = gw.send(req).await;
    let mut body = resp.into_body();
    let _first = body.frame().await;
    drop(body);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        post(&gw, CLIENT_KEY, &body_of_stream(), None).await.1,
        "miss"
    );
    let events = gw.exactly(2).await;
    assert_eq!(events[0].outcome, Outcome::ClientCancelled);
}

fn body_of_stream() -> String {
    body(json!({"stream": true}))
}

#[tokio::test]
async fn cache_control_no_cache_skips_the_lookup_and_no_store_stores_nothing() {
    let gw = TestGateway::start(&sections(EXACT, &[]));
    let b = body(json!({}));
    assert_eq!(post(&gw, CLIENT_KEY, &b, Some("no-store")).await.1, "miss");
    assert_eq!(
        post(&gw, CLIENT_KEY, &b, Some("no-cache")).await.1,
        "bypass"
    );
    assert_eq!(
        post(&gw, CLIENT_KEY, &b, Some("no-cache")).await.1,
        "bypass"
    );
    assert_eq!(
        post(&gw, CLIENT_KEY, &b, None).await.1,
        "hit",
        "no-cache still stored"
    );
    let events = gw.exactly(4).await;
    assert_eq!(events[1].cache, CacheStatus::Bypass);
    assert_eq!(events[3].cache, CacheStatus::Hit);
}

#[tokio::test]
async fn a_configured_hit_price_is_what_a_hit_costs() {
    let gw = TestGateway::start(&sections(r#"{ mode = "exact", hit_usd = "0.0001" }"#, &[]));
    let b = body(json!({}));
    post(&gw, CLIENT_KEY, &b, None).await;
    post(&gw, CLIENT_KEY, &b, None).await;
    let events = gw.exactly(2).await;
    assert_eq!(events[1].cost_usd, Some("0.0001".parse().unwrap()));
}

fn semantic_sections(threshold: f32, embed_upstream: &str) -> String {
    format!(
        "{}{}[upstreams.nowhere]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"qwq\" }}]\n\
         cache = {{ mode = \"semantic\", embeddings = {{ upstream = \"{embed_upstream}\", model = \"text-embedding-v3\", timeout_ms = 500 }}, threshold = {threshold} }}\n\n",
        simulated("qwq", &[]),
        simulated("embed", &[]),
    )
}

fn ask(question: &str, extra: Value) -> String {
    let mut b = json!({"messages": [{"role": "user", "content": question}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    body(b)
}

async fn post_full(gw: &TestGateway, key: &str, body: &str) -> (String, Option<f32>) {
    let resp = gw
        .send(request("/v1/chat/completions", Some(key), body))
        .await;
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let cache = header("x-tollgate-cache").unwrap_or_default();
    let similarity = header("x-tollgate-cache-similarity").map(|s| s.parse().unwrap());
    let _ = resp.into_body().collect().await.unwrap();
    (cache, similarity)
}

#[tokio::test]
async fn a_similar_question_is_a_semantic_hit_above_the_threshold_only() {
    let gw = TestGateway::start(&semantic_sections(0.6, "embed"));
    let stored = ask("What did the search team spend on tokens?", json!({}));
    assert_eq!(
        post_full(&gw, CLIENT_KEY, &stored).await,
        ("miss".into(), None)
    );
    let (cache, sim) = post_full(&gw, CLIENT_KEY, &stored).await;
    assert_eq!((cache.as_str(), sim), ("hit", None), "the exact key first");
    let (cache, sim) = post_full(
        &gw,
        CLIENT_KEY,
        &ask("what did the SEARCH team spend on tokens", json!({})),
    )
    .await;
    assert_eq!(cache, "hit");
    assert!(sim.is_some_and(|s| s > 0.99), "{sim:?}");
    let (cache, sim) = post_full(
        &gw,
        CLIENT_KEY,
        &ask(
            "What did the search team spend on tokens last week?",
            json!({}),
        ),
    )
    .await;
    assert_eq!(cache, "hit", "{sim:?}");
    assert!(sim.is_some_and(|s| (0.6..0.99).contains(&s)), "{sim:?}");
    let (cache, _) = post_full(
        &gw,
        CLIENT_KEY,
        &ask("Which model is the cheapest for translation?", json!({})),
    )
    .await;
    assert_eq!(cache, "miss", "an unrelated question");
    let (cache, _) = post_full(
        &gw,
        CLIENT_KEY,
        &ask(
            "what did the search team spend on tokens",
            json!({"temperature": 1.5}),
        ),
    )
    .await;
    assert_eq!(cache, "miss", "other sampling parameters");
    let (cache, _) = post_full(
        &gw,
        OTHER_KEY,
        &ask("what did the search team spend on tokens", json!({})),
    )
    .await;
    assert_eq!(cache, "miss", "another consumer");
    // Seven answers, and six embeddings calls (every lookup but the
    // exact hit), each an event of its own.
    let all = gw.exactly(13).await;
    let (events, embeddings): (Vec<_>, Vec<_>) =
        all.iter().partition(|e| e.endpoint == "chat/completions");
    assert_eq!(embeddings.len(), 6);
    for e in &embeddings {
        assert_eq!(e.endpoint, "embeddings");
        assert_eq!(e.tags["tollgate.purpose"], "semantic_cache");
        assert_eq!(e.requested_model.as_deref(), Some("text-embedding-v3"));
        assert!(e.consumer.is_some() && e.input_tokens > 0);
        assert_eq!(e.outcome, Outcome::Ok);
    }
    let hits: Vec<_> = events
        .iter()
        .filter(|e| e.cache == CacheStatus::Hit)
        .collect();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0].cache_kind, Some(CacheKind::Exact));
    assert_eq!(hits[1].cache_kind, Some(CacheKind::Semantic));
    assert!(hits.iter().all(|h| h.cost_saved_usd == events[0].cost_usd));
}

#[tokio::test]
async fn a_high_threshold_refuses_a_merely_similar_question() {
    let gw = TestGateway::start(&semantic_sections(0.97, "embed"));
    post_full(
        &gw,
        CLIENT_KEY,
        &ask("What did the search team spend on tokens?", json!({})),
    )
    .await;
    let (cache, _) = post_full(
        &gw,
        CLIENT_KEY,
        &ask(
            "What did the search team spend on tokens last week?",
            json!({}),
        ),
    )
    .await;
    assert_eq!(cache, "miss");
    let (cache, _) = post_full(
        &gw,
        CLIENT_KEY,
        &ask("what did the search team spend on tokens!", json!({})),
    )
    .await;
    assert_eq!(cache, "hit");
    gw.exactly(6).await;
}

#[tokio::test]
async fn the_embeddings_upstream_down_bypasses_the_cache_without_an_error() {
    let gw = TestGateway::start(&semantic_sections(0.9, "nowhere"));
    let q = ask("What did the search team spend on tokens?", json!({}));
    let (cache, _) = post_full(&gw, CLIENT_KEY, &q).await;
    assert_eq!(cache, "bypass");
    // Stored under its exact key all the same.
    assert_eq!(post_full(&gw, CLIENT_KEY, &q).await.0, "hit");
    let events = gw.exactly(3).await;
    let failed = &events[0];
    assert_eq!(
        (failed.endpoint.as_str(), failed.outcome),
        ("embeddings", Outcome::UpstreamError)
    );
    assert_eq!(
        failed.cost_usd,
        Some(Usd::ZERO),
        "a call that never answered costs nothing"
    );
    assert_eq!(events[1].cache, CacheStatus::Bypass);
    assert_eq!(events[1].outcome, Outcome::Ok);
}

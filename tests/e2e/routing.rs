//! Routing, renaming, billing and fallback through real processes.

use rust_decimal::Decimal;
use serde_json::Value;
use tollgate_schemas::TokenSource;

use crate::harness::*;

fn r1_routes() -> &'static str {
    "[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{ upstream = \"primary\", model = \"deepseek-reasoner\" }]\nfallback = [\"qwq-32b\"]\n\n\
     [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{ upstream = \"backup\", model = \"qwq-32b\" }]\n\n"
}

#[tokio::test]
async fn stream_and_non_stream_are_billed_identically() {
    let dir = scratch("parity");
    let sim = simulator(
        &dir,
        "sim",
        &["--output-tokens", "20", "--reasoning-tokens", "6"],
    );
    let backup = simulator(&dir, "backup", &[]);
    let gw = gateway_with(&dir, &[("primary", &sim), ("backup", &backup)], r1_routes());

    let (status, headers, body) = chat_as_app(&gw, &chat("deepseek-r1", false)).await;
    assert_eq!(status, 200, "{body}");
    keep(&dir, &body);
    assert_eq!(headers["x-tollgate-served-model"], "deepseek-reasoner");
    assert!(headers.contains_key("x-request-id"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], "deepseek-r1", "the client's model name is kept");
    let usage = v["usage"].clone();
    assert_eq!(usage["completion_tokens"], 20);
    assert!(v["choices"][0]["message"]["reasoning_content"].is_string());

    let (status, _, streamed) = chat_as_app(&gw, &chat("deepseek-r1", true)).await;
    assert_eq!(status, 200);
    keep(&dir, &streamed);
    let data = sse_data(&streamed);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !streamed.contains("\"usage\""),
        "usage was not asked for, so it is stripped: {streamed}"
    );
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        assert_eq!(chunk["model"], "deepseek-r1");
    }
    assert!(
        streamed.contains("reasoning_content"),
        "reasoning deltas are relayed"
    );

    let with_usage = serde_json::json!({
        "model": "deepseek-r1", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "How much did search spend on reasoning tokens?"}],
    });
    let (_, _, streamed_usage) = chat_as_app(&gw, &with_usage.to_string()).await;
    let data = sse_data(&streamed_usage);
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(
        usage_chunk["usage"], usage,
        "the usage chunk matches the non-streamed usage"
    );

    let events = gw.exactly(3);
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let want = dollars(prompt, 0, 20, "0.55", "0.14", "2.19");
    for e in &events {
        assert_eq!(e.consumer.as_deref(), Some("app"));
        assert_eq!(e.team.as_deref(), Some("search"));
        assert_eq!(e.requested_model.as_deref(), Some("deepseek-r1"));
        assert_eq!(e.served_model.as_deref(), Some("deepseek-reasoner"));
        assert_eq!(
            (e.input_tokens, e.output_tokens, e.reasoning_tokens),
            (prompt, 20, 6)
        );
        assert_eq!(e.token_source, Some(TokenSource::Upstream));
        assert_eq!(e.cost_usd.unwrap().decimal(), want);
        assert!(
            e.attempts.is_empty(),
            "one clean attempt is the top-level fields"
        );
        assert_eq!(e.upstream.as_deref(), Some("primary"));
        assert!(!e.fallback);
        assert_eq!(e.status, 200);
    }
    assert!(events[1].stream && events[1].ttft_ms.is_some());
    assert_no_secrets(&all_text_under(&dir), "test files");
}

#[tokio::test]
async fn provider_cache_and_reasoning_counts_are_normalised() {
    let dir = scratch("normalise");
    let sim = simulator(
        &dir,
        "sim",
        &[
            "--output-tokens",
            "12",
            "--reasoning-tokens",
            "5",
            "--cached-tokens",
            "8",
            "--usage-style",
            "deepseek",
        ],
    );
    let gw = Gateway::start(
        &dir,
        &format!(
            "{}[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"primary\", model = \"deepseek-reasoner\" }}]\n\n{}",
            upstream("primary", &sim),
            consumers()
        ),
    );
    for stream in [false, true] {
        let (status, _, _) = chat_as_app(&gw, &chat("deepseek-r1", stream)).await;
        assert_eq!(status, 200);
    }
    let events = gw.exactly(2);
    for e in &events {
        assert_eq!(e.cached_input_tokens, 8);
        assert_eq!(e.reasoning_tokens, 5);
        assert_eq!(e.output_tokens, 12);
        let want = dollars(e.input_tokens, 8, 12, "0.55", "0.14", "2.19");
        assert_eq!(e.cost_usd.unwrap().decimal(), want);
    }
}

#[tokio::test]
async fn connect_failures_and_timeouts_fall_back() {
    let dir = scratch("connect-timeout");
    let slow = simulator(&dir, "slow", &["--latency-ms", "5000"]);
    let backup = simulator(&dir, "backup", &[]);
    let config = format!(
        "[upstreams.dead]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nconnect_timeout_ms = 500\n\n\
         [upstreams.slow]\nkind = \"openai\"\nbase_url = \"http://{}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\nfirst_byte_timeout_ms = 300\n\n{}\
         [[routes]]\nmodel = \"via-dead\"\ntargets = [{{ upstream = \"dead\" }}]\nfallback = [\"qwq-32b\"]\n\n\
         [[routes]]\nmodel = \"via-slow\"\ntargets = [{{ upstream = \"slow\" }}]\nfallback = [\"qwq-32b\"]\n\n\
         [[routes]]\nmodel = \"slow-only\"\ntargets = [{{ upstream = \"slow\" }}]\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"backup\" }}]\n\n{}",
        slow.addr,
        upstream("backup", &backup),
        consumers()
    );
    let gw = Gateway::start(&dir, &config);
    let (s1, _, b1) = chat_as_app(&gw, &chat("via-dead", false)).await;
    let (s2, _, b2) = chat_as_app(&gw, &chat("via-slow", true)).await;
    let (s3, _, b3) = chat_as_app(&gw, &chat("slow-only", false)).await;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(s3, 504, "{b3}");
    let v: Value = serde_json::from_str(&b3).unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
    let events = gw.exactly(3);
    let by_model = |m: &str| {
        events
            .iter()
            .find(|e| e.requested_model.as_deref() == Some(m))
            .unwrap()
    };
    assert_eq!(
        by_model("via-dead").fallback_reason.as_deref(),
        Some("connect")
    );
    assert_eq!(
        by_model("via-slow").fallback_reason.as_deref(),
        Some("timeout")
    );
    let timed_out = by_model("slow-only");
    assert_eq!(timed_out.status, 504);
    assert_eq!(timed_out.outcome.as_str(), "upstream_error");
    assert_eq!(timed_out.attempts[0].error.as_deref(), Some("timeout"));
}

#[tokio::test]
async fn client_errors_from_upstream_pass_through_without_fallback() {
    let dir = scratch("upstream-4xx");
    let rejecting = simulator(
        &dir,
        "rejecting",
        &["--error-rate", "1", "--error-status", "422"],
    );
    let backup = simulator(&dir, "backup", &[]);
    let gw = gateway_with(
        &dir,
        &[("primary", &rejecting), ("backup", &backup)],
        r1_routes(),
    );
    let (status, _, body) = chat_as_app(&gw, &chat("deepseek-r1", false)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("simulated upstream failure"));
    let e = &gw.exactly(1)[0];
    assert_eq!(e.attempts.len(), 1);
    assert!(!e.fallback);
}

#[tokio::test]
async fn models_completions_and_embeddings() {
    let dir = scratch("endpoints");
    let sim = simulator(&dir, "sim", &["--output-tokens", "7"]);
    let gw = Gateway::start(
        &dir,
        &format!(
            "{}[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"primary\" }}]\n\n[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"primary\" }}]\n\n[[routes]]\nmodel = \"qwen-*\"\ntargets = [{{ upstream = \"primary\" }}]\n\n{}",
            upstream("primary", &sim),
            consumers()
        ),
    );
    let list = |key: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let all: Value = serde_json::from_str(&list(CLIENT_KEY).await).unwrap();
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwq-32b", "deepseek-r1"]);
    let limited: Value = serde_json::from_str(&list(OTHER_KEY).await).unwrap();
    assert_eq!(limited["data"].as_array().unwrap().len(), 1);
    assert_eq!(limited["data"][0]["id"], "qwq-32b");

    let (s, _, body) = post(
        &gw,
        "/v1/completions",
        Some(CLIENT_KEY),
        r#"{"model":"qwen-turbo","prompt":"say hi","max_tokens":3}"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["model"], "qwen-turbo");
    let (s, _, body) = post(
        &gw,
        "/v1/embeddings",
        Some(CLIENT_KEY),
        r#"{"model":"qwq-32b","input":["a","b"]}"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let events = gw.exactly(2);
    assert_eq!(events[0].endpoint, "completions");
    assert_eq!(events[0].output_tokens, 3);
    assert_eq!(events[0].served_model.as_deref(), Some("qwen-turbo"));
    assert!(events[0].cost_usd.unwrap().decimal() > Decimal::ZERO);
    assert_eq!(events[1].endpoint, "embeddings");
    assert!(events[1].input_tokens > 0);
}

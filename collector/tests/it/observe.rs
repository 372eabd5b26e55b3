//! `/metrics` agrees with the ledger: the same traffic, counted twice.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use rust_decimal::Decimal;

use crate::harness::*;

async fn page(gw: &TestGateway, accept: Option<&str>) -> (String, String) {
    let mut req = Request::get("/metrics");
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = gw.send(req.body(Body::empty()).unwrap()).await;
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (kind, String::from_utf8(bytes.to_vec()).unwrap())
}

/// `name{labels}` -> value, samples only.
fn samples(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn tokens_cost_and_requests_on_metrics_equal_the_events_for_mixed_traffic() {
    let gw = TestGateway::start(&format!(
        "{}{}{}\
         [[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"primary\", model = \"deepseek-reasoner\" }}]\nfallback = [\"qwq-32b\"]\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"backup\" }}]\n\n\
         [[routes]]\nmodel = \"qwq-*\"\ntargets = [{{ upstream = \"backup\", model = \"qwq-32b\" }}]\n\n\
         [[routes]]\nmodel = \"down\"\ntargets = [{{ upstream = \"broken\" }}]\nfallback = [\"qwq-32b\"]\n\n",
        simulated(
            "primary",
            &[
                "output_tokens = 7",
                "reasoning_tokens = 3",
                "cached_tokens = 2"
            ]
        ),
        simulated("backup", &["output_tokens = 9"]),
        simulated("broken", &["error_rate = 1.0", "error_status = 503"]),
    ));
    let mut sent = 0;
    for (key, model, stream) in [
        (CLIENT_KEY, "deepseek-r1", false),
        (CLIENT_KEY, "deepseek-r1", true),
        (CLIENT_KEY, "down", false),
        (CLIENT_KEY, "down", true),
        (OTHER_KEY, "qwq-32b", true),
        (OTHER_KEY, "qwq-preview", false),
        (OTHER_KEY, "deepseek-r1", false),
        (CLIENT_KEY, "no-such-model", false),
        ("tg-wrong-key", "deepseek-r1", false),
    ] {
        gw.post("/v1/chat/completions", Some(key), &chat(model, stream))
            .await;
        sent += 1;
    }
    let (kind, text) = page(&gw, None).await;
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let (open_kind, open_text) =
        page(&gw, Some("application/openmetrics-text;version=1.0.0")).await;
    assert!(open_kind.starts_with("application/openmetrics-text"));
    assert!(open_text.ends_with("# EOF\n"));
    for family in [
        "tollgate_rate_limited_total",
        "tollgate_cache_lookups_total",
        "tollgate_guard_matches_total",
        "tollgate_guard_moderation_failures_total",
        "tollgate_inflight_requests",
        "tollgate_open_streams",
        "tollgate_tap_events_emitted_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family}: {text}"
        );
    }
    let s = samples(&text);
    let events = gw.exactly(sent).await;

    let mut tokens: BTreeMap<String, u64> = BTreeMap::new();
    let mut requests: BTreeMap<String, u64> = BTreeMap::new();
    let mut cost: BTreeMap<String, Decimal> = BTreeMap::new();
    for e in &events {
        let consumer = e.consumer.as_deref().unwrap_or("-");
        let model = match e.requested_model.as_deref() {
            None => "-",
            Some("deepseek-r1") => "deepseek-r1",
            Some("down") => "down",
            Some("qwq-32b") => "qwq-32b",
            Some(m) if m.starts_with("qwq-") => "qwq-*",
            Some(_) => "other",
        };
        let served = e.served_model.as_deref().unwrap_or("-");
        *requests
            .entry(format!(
                "tollgate_requests_total{{consumer=\"{consumer}\",model=\"{model}\",served_model=\"{served}\",outcome=\"{}\"}}",
                e.outcome.as_str()
            ))
            .or_default() += 1;
        for (kind, n) in [
            ("input", e.input_tokens),
            ("cached_input", e.cached_input_tokens),
            ("output", e.output_tokens),
            ("reasoning", e.reasoning_tokens),
        ] {
            if n > 0 {
                *tokens
                    .entry(format!(
                        "tollgate_tokens_total{{consumer=\"{consumer}\",model=\"{model}\",served_model=\"{served}\",type=\"{kind}\"}}"
                    ))
                    .or_default() += n;
            }
        }
        if let Some(c) = e.cost_usd.filter(|c| !c.decimal().is_zero()) {
            *cost
                .entry(format!(
                    "tollgate_cost_usd_total{{consumer=\"{consumer}\",served_model=\"{served}\"}}"
                ))
                .or_default() += c.decimal();
        }
    }
    assert!(
        tokens.len() >= 6 && requests.len() >= 5,
        "{tokens:?} {requests:?}"
    );
    for (series, n) in requests.iter().chain(tokens.iter()) {
        assert_eq!(s.get(series), Some(&n.to_string()), "{series} in {text}");
    }
    let shown = |p: &str| s.keys().filter(|k| k.starts_with(p)).count();
    assert_eq!(shown("tollgate_requests_total{"), requests.len());
    assert_eq!(shown("tollgate_tokens_total{"), tokens.len());
    for (series, usd) in &cost {
        let v: Decimal = s[series].parse().unwrap();
        assert_eq!(
            v, *usd,
            "{series}: the exact sum, as its nearest float prints"
        );
    }
    assert_eq!(
        s[r#"tollgate_fallbacks_total{model="down",served_model="qwq-32b",reason="5xx"}"#],
        "2"
    );
    assert_eq!(
        s[r#"tollgate_upstream_requests_total{upstream="broken",status_class="5xx"}"#],
        "2"
    );
    assert_eq!(s["tollgate_inflight_requests"], "0");
    assert_eq!(s["tollgate_open_streams"], "0");
    assert!(
        s.keys()
            .any(|k| k.starts_with("tollgate_time_to_first_token_seconds_count{")),
        "streams have a time to first token"
    );
}

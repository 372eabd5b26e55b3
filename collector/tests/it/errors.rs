//! Every refusal is an OpenAI-style error body (`message`, `type`, `param`,
//! `code`) with its status, and still exactly one usage event.

use axum::body::Body;
use axum::http::Request;
use serde_json::Value;

use crate::harness::*;

#[tokio::test]
async fn each_client_error_has_the_openai_shape_its_status_and_one_event() {
    let gw = TestGateway::start(&format!(
        "[gateway]\nmax_body_bytes = 65536\n\n{}{}\
         [[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"sim\" }}]\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"sim\" }}]\n\n\
         [[routes]]\nmodel = \"broken\"\ntargets = [{{ upstream = \"failing\" }}]\n\n",
        simulated("sim", &[]),
        simulated("failing", &["error_rate = 1.0", "error_status = 500"]),
    ));
    let big = format!(
        r#"{{"model":"qwq-32b","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(70_000)
    );
    // (name, key, body, status, type, code, param, outcome)
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        String,
        u16,
        &'a str,
        Value,
        Value,
        &'a str,
    );
    let null = Value::Null;
    let s = |v: &str| Value::String(v.into());
    let cases: Vec<Case> = vec![
        (
            "no key",
            None,
            chat("qwq-32b", false),
            401,
            "authentication_error",
            s("invalid_api_key"),
            null.clone(),
            "unauthorized",
        ),
        (
            "wrong key",
            Some("tg-nope"),
            chat("qwq-32b", false),
            401,
            "authentication_error",
            s("invalid_api_key"),
            null.clone(),
            "unauthorized",
        ),
        (
            "not allowed",
            Some(OTHER_KEY),
            chat("deepseek-r1", false),
            403,
            "permission_error",
            s("model_not_allowed"),
            s("model"),
            "unauthorized",
        ),
        (
            "unknown model",
            Some(CLIENT_KEY),
            chat("gpt-9", false),
            404,
            "invalid_request_error",
            s("model_not_found"),
            s("model"),
            "invalid_request",
        ),
        (
            "malformed",
            Some(CLIENT_KEY),
            "{\"model\":".into(),
            400,
            "invalid_request_error",
            null.clone(),
            null.clone(),
            "invalid_request",
        ),
        (
            "too large",
            Some(CLIENT_KEY),
            big,
            413,
            "invalid_request_error",
            s("request_too_large"),
            null.clone(),
            "invalid_request",
        ),
        (
            "upstream 500",
            Some(CLIENT_KEY),
            chat("broken", false),
            502,
            "upstream_error",
            null.clone(),
            null.clone(),
            "upstream_error",
        ),
    ];
    for (name, key, body, status, kind, code, param, _) in &cases {
        let (got, headers, text) = gw.post("/v1/chat/completions", *key, body).await;
        assert_eq!(got.as_u16(), *status, "{name}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text}"));
        let error = v["error"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: {text}"));
        let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "message", "param", "type"], "{name}: {text}");
        assert_eq!(error["type"], *kind, "{name}");
        assert_eq!(error["code"], *code, "{name}");
        assert_eq!(error["param"], *param, "{name}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert_eq!(headers["content-type"], "application/json", "{name}");
        assert!(!headers["x-request-id"].is_empty(), "{name}");
    }
    let resp = gw
        .send(
            Request::get("/v1/chat/completions")
                .header("authorization", format!("Bearer {CLIENT_KEY}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 405);
    let (status, _, text) = gw.post("/v2/nothing", Some(CLIENT_KEY), "{}").await;
    assert_eq!(status, 404, "{text}");

    let events = gw.exactly(cases.len() + 2).await;
    for ((name, _, _, status, _, _, _, outcome), e) in cases.iter().zip(&events) {
        assert_eq!(e.status, *status, "{name}");
        assert_eq!(e.outcome.as_str(), *outcome, "{name}");
        assert_eq!(e.output_tokens, 0, "{name}");
    }
    assert_eq!(events[0].consumer, None);
    assert_eq!(events[2].consumer.as_deref(), Some("limited"));
    assert_eq!(events[6].attempts.len(), 1);
    assert_eq!(events[6].attempts[0].status, Some(500));
    assert_eq!(events[7].status, 405);
    assert_eq!(events[8].status, 404);
}

//! The ledger under real upstreams' response shapes, through real
//! processes: failures hidden in 200s, usage in every placement, reasoning
//! tokens, time to first token, `n` choices, every SSE framing. Each case
//! is scripted on a canned upstream; the assertions are the right values.

use std::time::Duration;

use serde_json::{Value, json};
use tollgate_schemas::{TokenSource, UsageEvent};

use crate::canned::*;
use crate::harness::*;

const SERVED: &str = "deepseek-reasoner";

/// Input, cached input, output and reasoning tokens.
type Counts = (u64, u64, u64, u64);
/// Input and output tokens.
type InOut = (u64, u64);

/// A gateway whose `deepseek-r1` goes to the canned upstream and falls back
/// to `qwq-32b` on a simulator, and whose `r1-alone` has no fallback.
struct Rig {
    dir: std::path::PathBuf,
    canned: Canned,
    _backup: Proc,
    gw: Gateway,
}

fn rig(name: &str) -> Rig {
    let dir = scratch(name);
    let canned = Canned::start();
    let backup = simulator(&dir, "backup", &["--output-tokens", "5"]);
    let routes = format!(
        "{}{}[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"canned\", model = \"{SERVED}\" }}]\nfallback = [\"qwq-32b\"]\n\n\
         [[routes]]\nmodel = \"r1-alone\"\ntargets = [{{ upstream = \"canned\", model = \"{SERVED}\" }}]\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"backup\", model = \"qwq-32b\" }}]\n\n{}",
        canned.upstream("canned"),
        upstream("backup", &backup),
        consumers()
    );
    let gw = Gateway::start(&dir, &routes);
    Rig {
        dir,
        canned,
        _backup: backup,
        gw,
    }
}

/// A chat request for `model` that the canned upstream answers with the
/// reply scripted for `case`; the case is also the request id.
fn request(model: &str, case: &str, stream: bool) -> Value {
    json!({
        "model": model, "stream": stream, "user": case,
        "messages": [{"role": "user", "content": "How much did search spend on reasoning tokens?"}],
    })
}

async fn ask(rig: &Rig, case: &str, body: &Value) -> (u16, String) {
    let resp = client()
        .post(rig.gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-request-id", case)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    keep(&rig.dir, &text);
    (status, text)
}

fn event<'a>(events: &'a [UsageEvent], case: &str) -> &'a UsageEvent {
    events
        .iter()
        .find(|e| e.request_id.as_deref() == Some(case))
        .unwrap_or_else(|| panic!("no event for {case}"))
}

/// Every event of an SSE body, split on blank lines; asserts each is a
/// whole event whose data a standard client can parse.
fn parseable_events(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("\n\n"),
        "the body ends on an event boundary: {body:?}"
    );
    let mut out = Vec::new();
    for ev in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data: Vec<&str> = ev
            .lines()
            .filter_map(|l| {
                l.strip_prefix("data:")
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
            })
            .collect();
        if data.is_empty() {
            assert!(
                ev.lines().all(|l| l.starts_with(':') || l.contains(':')),
                "{ev:?}"
            );
            continue;
        }
        let data = data.join("\n");
        if data.trim() == "[DONE]" {
            out.push(Value::String("[DONE]".into()));
            continue;
        }
        out.push(
            serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("unparseable event {data:?}: {e}")),
        );
    }
    out
}

fn role(model: &str) -> Part {
    data(&delta(
        model,
        0,
        json!({"role": "assistant", "content": ""}),
    ))
}

fn content(model: &str, text: &str) -> Part {
    data(&delta(model, 0, json!({"content": text})))
}

fn done() -> Part {
    raw("data: [DONE]\n\n")
}

fn zero_billed(e: &UsageEvent, i: usize) {
    let a = &e.attempts[i];
    assert_eq!(
        (a.input_tokens, a.output_tokens, a.reasoning_tokens),
        (0, 0, 0),
        "an attempt that generated nothing bills nothing: {e:#?}"
    );
    assert!(a.cost_usd.is_some_and(|c| c.decimal().is_zero()), "{e:#?}");
}

#[tokio::test]
async fn a_failure_hidden_in_a_200_falls_back_and_bills_nothing() {
    let rig = rig("hidden-failures");
    let error_502 =
        json!({"error": {"message": "upstream overloaded", "type": "upstream_error", "code": 502}});
    let cases: Vec<(&str, bool, Reply, &str)> = vec![
        ("json-error", false, Reply::json(&error_502), "5xx"),
        (
            "html-page",
            false,
            Reply::new(
                200,
                "text/html",
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            ),
            "invalid_response",
        ),
        (
            "not-an-answer",
            false,
            Reply::json(&json!({"status": "ok"})),
            "invalid_response",
        ),
        (
            "baidu-style",
            false,
            Reply::json(
                &json!({"error_code": 18, "error_msg": "Open api qps request limit reached"}),
            ),
            "invalid_response",
        ),
        (
            "empty-body",
            false,
            Reply::new(200, "application/json", ""),
            "invalid_response",
        ),
        (
            "rate-limit-in-200",
            false,
            Reply::json(&json!({"error": {"message": "slow down", "type": "rate_limit_error"}})),
            "429",
        ),
        ("stream-json-error", true, Reply::json(&error_502), "5xx"),
        (
            "stream-error-first",
            true,
            Reply::sse(vec![data(&error_502), done()]),
            "5xx",
        ),
        (
            "stream-event-error",
            true,
            Reply::sse(vec![raw(
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            )]),
            "5xx",
        ),
        (
            "stream-error-after-role",
            true,
            Reply::sse(vec![
                role(SERVED),
                raw(": keep-alive\n\n"),
                data(&error_502),
            ]),
            "5xx",
        ),
        (
            "stream-break-before-content",
            true,
            Reply::sse(vec![role(SERVED), raw(": keep-alive\n\n"), Part::Break]),
            "stream_error",
        ),
        (
            "stream-end-before-content",
            true,
            Reply::sse(vec![role(SERVED)]),
            "stream_error",
        ),
        (
            "stream-html",
            true,
            Reply::new(
                200,
                "text/html",
                "<html><body>502 Bad Gateway</body></html>",
            ),
            "stream_error",
        ),
        (
            "stream-big-html",
            true,
            Reply::new(200, "text/html", &"<p>Bad Gateway</p>\n\n".repeat(20_000)),
            "stream_error",
        ),
        (
            "stream-many-keepalives-then-error",
            true,
            Reply::sse(
                (0..300)
                    .map(|_| raw(&format!(": {}\n\n", "k".repeat(1024))))
                    .chain([data(&error_502)])
                    .collect(),
            ),
            "5xx",
        ),
        (
            "stream-done-only",
            true,
            Reply::sse(vec![done()]),
            "stream_error",
        ),
        (
            "stream-bom-then-error",
            true,
            Reply::sse(vec![raw("\u{feff}"), data(&error_502)]),
            "5xx",
        ),
        (
            "a-204",
            false,
            Reply {
                status: 204,
                content_type: None,
                parts: vec![],
            },
            "invalid_response",
        ),
    ];
    for (case, stream, reply, _) in &cases {
        rig.canned.on(case, reply.clone());
        let (status, body) = ask(&rig, case, &request("deepseek-r1", case, *stream)).await;
        assert_eq!(status, 200, "{case}: the fallback answered: {body}");
        if *stream {
            let events = parseable_events(&body);
            assert_eq!(
                events.last(),
                Some(&Value::String("[DONE]".into())),
                "{case}"
            );
            for e in &events[..events.len() - 1] {
                assert_eq!(e["model"], "deepseek-r1", "{case}");
                assert!(e.get("error").is_none(), "{case}: {body}");
            }
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["model"], "deepseek-r1", "{case}");
            assert!(
                v["choices"][0]["message"]["content"].is_string(),
                "{case}: {body}"
            );
        }
        assert_eq!(rig.canned.hits(case), 1, "{case}");
    }
    let events = rig.gw.exactly(cases.len());
    for (case, _, _, label) in &cases {
        let e = event(&events, case);
        assert_eq!(e.outcome.as_str(), "ok", "{case}: {e:#?}");
        assert!(e.fallback, "{case}");
        assert_eq!(e.served_model.as_deref(), Some("qwq-32b"), "{case}");
        assert_eq!(e.fallback_reason.as_deref(), Some(*label), "{case}");
        assert_eq!(e.attempts.len(), 2, "{case}");
        assert_eq!(e.attempts[0].error.as_deref(), Some(*label), "{case}");
        let status = if *case == "a-204" { 204 } else { 200 };
        assert_eq!(e.attempts[0].status, Some(status), "{case}");
        zero_billed(e, 0);
        assert_eq!(e.output_tokens, 5, "{case}: only the fallback's tokens");
    }
}

#[tokio::test]
async fn without_a_fallback_the_error_in_a_200_reaches_the_client_with_its_class() {
    let rig = rig("hidden-failures-alone");
    // (case, error object, status to the client, attempt error, outcome)
    let cases: Vec<(&str, Value, u16, &str, &str)> = vec![
        (
            "server",
            json!({"error": {"message": "upstream overloaded", "type": "upstream_error", "code": 502}}),
            502,
            "5xx",
            "upstream_error",
        ),
        (
            "rate",
            json!({"error": {"message": "slow down", "type": "rate_limit_error"}}),
            429,
            "429",
            "upstream_error",
        ),
        (
            "client",
            json!({"error": {"message": "context too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}),
            400,
            "4xx",
            "invalid_request",
        ),
        (
            "leaky",
            json!({"error": {"message": format!("bad key {UPSTREAM_KEY}"), "code": 503}}),
            502,
            "5xx",
            "upstream_error",
        ),
    ];
    let mut asked = Vec::new();
    let long = format!("{}{UPSTREAM_KEY} tail", "x".repeat(484));
    rig.canned
        .on("long-400", Reply::new(400, "text/plain", &long));
    let (status, body) = ask(&rig, "long-400", &request("r1-alone", "long-400", false)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        !body.contains("sk-canary"),
        "no piece of the key is cut into the message: {body}"
    );
    asked.push(("long-400".to_string(), "4xx", "invalid_request"));
    for (name, error, want, label, outcome) in &cases {
        for stream in [false, true] {
            let case = format!("{name}-{stream}");
            let reply = if stream {
                Reply::sse(vec![data(error), done()])
            } else {
                Reply::json(error)
            };
            rig.canned.on(&case, reply);
            let (status, body) = ask(&rig, &case, &request("r1-alone", &case, stream)).await;
            assert_eq!(status, *want, "{case}: {body}");
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{case}: JSON error body: {body}"));
            assert!(v["error"]["message"].is_string(), "{case}: {body}");
            assert!(
                !body.contains(UPSTREAM_KEY),
                "{case}: the upstream key is scrubbed"
            );
            asked.push((case, *label, *outcome));
        }
    }
    let events = rig.gw.exactly(asked.len());
    for (case, label, outcome) in &asked {
        let e = event(&events, case);
        assert_eq!(e.outcome.as_str(), *outcome, "{case}");
        assert_eq!(e.attempts[0].error.as_deref(), Some(*label), "{case}");
        assert_eq!(
            (e.input_tokens, e.output_tokens),
            (0, 0),
            "{case}: nothing billed"
        );
        assert!(e.cost_usd.is_some_and(|c| c.decimal().is_zero()), "{case}");
    }
    assert_no_secrets(&all_text_under(&rig.dir), "test files");
}

#[tokio::test]
async fn a_failed_attempt_is_billed_what_the_upstream_reported_or_generated() {
    let rig = rig("failed-billing");
    let usage = json!({"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57});
    let usage_chunk = data(&json!({"id": "x", "model": SERVED, "choices": [], "usage": usage}));
    let error = json!({"message": "overloaded", "code": 503});
    // (case, stream, reply, attempt error, attempt tokens (input, output))
    let cases: Vec<(&str, bool, Reply, &str, InOut)> = vec![
        (
            "usage-then-break",
            true,
            Reply::sse(vec![usage_chunk.clone(), Part::Break]),
            "stream_error",
            (50, 7),
        ),
        (
            "usage-then-end",
            true,
            Reply::sse(vec![usage_chunk, done()]),
            "stream_error",
            (50, 7),
        ),
        (
            "error-with-usage",
            true,
            Reply::sse(vec![data(&json!({"error": error, "usage": usage}))]),
            "5xx",
            (50, 7),
        ),
        (
            "json-answer-to-a-stream",
            true,
            Reply::json(&answer(SERVED, "Hi", Some(usage.clone()))),
            "invalid_response",
            (50, 7),
        ),
        (
            "usage-without-choices",
            false,
            Reply::json(&json!({"object": "list", "model": SERVED, "usage": usage})),
            "invalid_response",
            (50, 7),
        ),
        (
            "usage-in-a-500",
            false,
            Reply::new(
                500,
                "application/json",
                &json!({"error": error, "usage": usage}).to_string(),
            ),
            "5xx",
            (50, 7),
        ),
        (
            "content-and-error-in-one-read",
            true,
            Reply::sse(vec![raw(&format!(
                "data: {}\n\ndata: {}\n\n",
                delta(SERVED, 0, json!({"content": "Hello"})),
                json!({"error": error})
            ))]),
            "5xx",
            (0, 1),
        ),
    ];
    for (case, stream, reply, _, _) in &cases {
        rig.canned.on(case, reply.clone());
        let (status, body) = ask(&rig, case, &request("deepseek-r1", case, *stream)).await;
        assert_eq!(status, 200, "{case}: {body}");
    }
    let events = rig.gw.exactly(cases.len());
    for (case, _, _, label, (input, output)) in &cases {
        let e = event(&events, case);
        let a = &e.attempts[0];
        if *case == "content-and-error-in-one-read" {
            // The content went out before the error was read: no fallback,
            // and the generated text is billed.
            assert!(!e.fallback, "{case}: {e:#?}");
            assert_eq!(e.outcome.as_str(), "upstream_error", "{case}");
            assert!(
                a.output_tokens >= *output && a.input_tokens > 0,
                "{case}: {a:?}"
            );
            continue;
        }
        assert!(e.fallback, "{case}: {e:#?}");
        assert_eq!(a.error.as_deref(), Some(*label), "{case}");
        assert_eq!(
            (a.input_tokens, a.output_tokens),
            (*input, *output),
            "{case}: the upstream's own count"
        );
        assert_eq!(a.token_source, Some(TokenSource::Upstream), "{case}");
    }
}

#[tokio::test]
async fn a_stream_that_fails_after_its_first_token_ends_with_a_parseable_error_event() {
    let rig = rig("mid-stream");
    let cases: Vec<(&str, Vec<Part>, &str, &str)> = vec![
        (
            "error-event",
            vec![
                role(SERVED),
                content(SERVED, "Hello"),
                content(SERVED, " world"),
                data(&json!({"error": {"message": "boom", "type": "server_error"}})),
            ],
            "upstream_error",
            "5xx",
        ),
        (
            "typed-error-event",
            vec![
                content(SERVED, "Hello"),
                raw(
                    "event: error\ndata: {\"error\":{\"message\":\"overloaded\",\"code\":429}}\n\n",
                ),
            ],
            "upstream_error",
            "429",
        ),
        (
            "cut-mid-line",
            vec![
                content(SERVED, "Hello"),
                raw(
                    "data: {\"model\":\"deepseek-reasoner\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tru",
                ),
                Part::Break,
            ],
            "upstream_error",
            "stream_error",
        ),
        (
            "cut-mid-event",
            vec![content(SERVED, "Hello"), raw("id: 4\n"), Part::Break],
            "upstream_error",
            "stream_error",
        ),
        (
            "ends-without-done",
            vec![
                content(SERVED, "Hello"),
                raw("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tru"),
            ],
            "upstream_error",
            "stream_error",
        ),
        (
            "unterminated-done",
            vec![content(SERVED, "Hello"), raw("data: [DONE]")],
            "ok",
            "",
        ),
        (
            "lone-cr-tail",
            vec![
                content(SERVED, "Hello"),
                raw(&format!(
                    "data: {}\r",
                    delta(SERVED, 0, json!({"content": " world"}))
                )),
            ],
            "upstream_error",
            "stream_error",
        ),
        (
            "done-with-trailing-space",
            vec![content(SERVED, "Hello"), raw("data: [DONE] \n\n")],
            "ok",
            "",
        ),
        (
            "only-an-unterminated-event",
            vec![raw(&format!(
                "data: {}",
                delta(SERVED, 0, json!({"content": "Hello"}))
            ))],
            "upstream_error",
            "stream_error",
        ),
        (
            "only-an-event-ended-by-one-newline",
            vec![raw(&format!(
                "data: {}\n",
                delta(SERVED, 0, json!({"content": "Hello"}))
            ))],
            "upstream_error",
            "stream_error",
        ),
        (
            "error-as-a-list",
            vec![content(SERVED, "Hello"), data(&json!({"error": [1]}))],
            "upstream_error",
            "5xx",
        ),
    ];
    for (case, parts, _, _) in &cases {
        rig.canned.on(case, Reply::sse(parts.clone()));
        let (status, body) = ask(&rig, case, &request("deepseek-r1", case, true)).await;
        assert_eq!(status, 200, "{case}");
        let events = parseable_events(&body);
        assert!(
            body.contains("\"Hello\""),
            "{case}: what was generated went out: {body:?}"
        );
        assert!(
            !body.contains("\"tru"),
            "{case}: a partial line never reaches the client: {body:?}"
        );
        if *case == "lone-cr-tail" {
            assert!(
                body.contains("\" world\""),
                "the whole last event is kept: {body:?}"
            );
        }
        let last = events.last().unwrap();
        if ["unterminated-done", "done-with-trailing-space"].contains(case) {
            assert_eq!(last, &Value::String("[DONE]".into()), "{case}");
        } else {
            assert_eq!(last["error"]["type"], "upstream_error", "{case}: {body:?}");
        }
        assert_eq!(
            rig.canned.hits(case),
            1,
            "{case}: no fallback once content went out"
        );
    }
    let events = rig.gw.exactly(cases.len());
    for (case, _, outcome, label) in &cases {
        let e = event(&events, case);
        assert_eq!(e.outcome.as_str(), *outcome, "{case}: {e:#?}");
        assert!(!e.fallback, "{case}");
        assert!(e.output_tokens >= 1, "{case}: the generated text is billed");
        assert_eq!(e.token_source, Some(TokenSource::Estimated), "{case}");
        if !label.is_empty() {
            assert_eq!(e.attempts[0].error.as_deref(), Some(*label), "{case}");
        }
    }
}

#[tokio::test]
async fn usage_is_read_from_every_placement_and_reconciled() {
    let rig = rig("placements");
    let moonshot = json!({"prompt_tokens": 2048, "completion_tokens": 900, "total_tokens": 2948});
    let reasoner = json!({"prompt_tokens": 21, "completion_tokens": 0, "total_tokens": 81,
                          "completion_tokens_details": {"reasoning_tokens": 60}});
    let finish = |usage: Option<&Value>, key: &str| {
        let mut c = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": SERVED,
                           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        if let Some(u) = usage {
            match key {
                "choice" => c["choices"][0]["usage"] = u.clone(),
                "x_groq" => c["x_groq"] = json!({"id": "req_1", "usage": u}),
                _ => c["usage"] = u.clone(),
            }
        }
        data(&c)
    };
    let cumulative = |n: u64| {
        let mut c = delta(SERVED, 0, json!({"content": " word"}));
        c["usage"] = json!({"prompt_tokens": 30, "completion_tokens": n, "total_tokens": 30 + n});
        data(&c)
    };
    // (case, stream, reply, (input, cached, output, reasoning))
    let cases: Vec<(&str, bool, Reply, Counts)> = vec![
        (
            "moonshot-choice-usage",
            true,
            Reply::sse(vec![
                role(SERVED),
                content(SERVED, "Hi"),
                finish(Some(&moonshot), "choice"),
                done(),
            ]),
            (2048, 0, 900, 0),
        ),
        (
            "groq-x-groq-usage",
            true,
            Reply::sse(vec![
                content(SERVED, "Hi"),
                finish(Some(&moonshot), "x_groq"),
                done(),
            ]),
            (2048, 0, 900, 0),
        ),
        (
            "usage-in-every-chunk",
            true,
            Reply::sse(vec![
                cumulative(1),
                cumulative(2),
                cumulative(3),
                finish(None, ""),
                done(),
            ]),
            (30, 0, 3, 0),
        ),
        (
            "reasoner-reasoning-over-completion",
            false,
            Reply::json(&answer(SERVED, "", Some(reasoner.clone()))),
            (21, 0, 60, 60),
        ),
        (
            "reasoner-streamed",
            true,
            Reply::sse(vec![
                data(&delta(
                    SERVED,
                    0,
                    json!({"reasoning_content": "Let me think"}),
                )),
                data(&json!({"id": "x", "model": SERVED, "choices": [], "usage": reasoner})),
                done(),
            ]),
            (21, 0, 60, 60),
        ),
        (
            "choice-usage-not-streamed",
            false,
            Reply::json(&{
                let mut a = answer(SERVED, "Hi", None);
                a["choices"][0]["usage"] = moonshot.clone();
                a
            }),
            (2048, 0, 900, 0),
        ),
        (
            "deepseek-cache-fields",
            false,
            Reply::json(&answer(
                SERVED,
                "Hi",
                Some(
                    json!({"prompt_tokens": 100, "completion_tokens": 7, "prompt_cache_hit_tokens": 64,
                            "prompt_cache_miss_tokens": 36}),
                ),
            )),
            (100, 64, 7, 0),
        ),
    ];
    for (case, stream, reply, _) in &cases {
        rig.canned.on(case, reply.clone());
        let (status, body) = ask(&rig, case, &request("deepseek-r1", case, *stream)).await;
        assert_eq!(status, 200, "{case}: {body}");
    }
    let events = rig.gw.exactly(cases.len());
    for (case, _, _, (input, cached, output, reasoning)) in &cases {
        let e = event(&events, case);
        assert_eq!(
            (
                e.input_tokens,
                e.cached_input_tokens,
                e.output_tokens,
                e.reasoning_tokens
            ),
            (*input, *cached, *output, *reasoning),
            "{case}"
        );
        assert_eq!(e.token_source, Some(TokenSource::Upstream), "{case}");
        assert_eq!(
            e.cost_usd.unwrap().decimal(),
            dollars(*input, *cached, *output, "0.55", "0.14", "2.19"),
            "{case}"
        );
    }
    assert_no_estimates_logged(&rig);
}

fn assert_no_estimates_logged(rig: &Rig) {
    let log = std::fs::read_to_string(&rig.gw.log).unwrap();
    assert!(!log.contains("cannot read"), "{log}");
}

#[tokio::test]
async fn usage_that_cannot_be_read_is_estimated_counted_and_logged_once() {
    let rig = rig("unreadable");
    let cases: Vec<(&str, bool, Reply, &str)> = vec![
        (
            "odd-object",
            false,
            Reply::json(&answer(
                SERVED,
                "hello world",
                Some(json!({"tokens": {"in": 9, "out": 2}})),
            )),
            "unreadable_usage",
        ),
        (
            "a-string",
            true,
            Reply::sse(vec![
                content(SERVED, "hello world"),
                data(&json!({"model": SERVED, "choices": [], "usage": "n/a"})),
                done(),
            ]),
            "unreadable_usage",
        ),
        (
            "total-only",
            false,
            Reply::json(&answer(
                SERVED,
                "hello world",
                Some(json!({"total_tokens": 40})),
            )),
            "total_only",
        ),
        (
            "none",
            false,
            Reply::json(&answer(SERVED, "hello world", None)),
            "no_usage",
        ),
    ];
    for (case, stream, reply, _) in &cases {
        rig.canned.on(case, reply.clone());
        let (status, _) = ask(&rig, case, &request("deepseek-r1", case, *stream)).await;
        assert_eq!(status, 200, "{case}");
    }
    let events = rig.gw.exactly(cases.len());
    for (case, _, _, _) in &cases {
        let e = event(&events, case);
        assert_eq!(e.token_source, Some(TokenSource::Estimated), "{case}");
        assert!(e.input_tokens > 0, "{case}");
    }
    assert_eq!(
        event(&events, "total-only").input_tokens + event(&events, "total-only").output_tokens,
        40,
        "a total alone is kept, only its split is estimated"
    );
    let metrics = reqwest::get(rig.gw.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (reason, n) in [("unreadable_usage", 2), ("total_only", 1), ("no_usage", 1)] {
        let line = format!(
            "tollgate_usage_estimated_total{{upstream=\"canned\",reason=\"{reason}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    let log = std::fs::read_to_string(&rig.gw.log).unwrap();
    assert_eq!(
        log.matches("cannot read").count(),
        1,
        "logged once per upstream: {log}"
    );
}

#[tokio::test]
async fn time_to_first_token_is_the_first_generated_content_not_the_first_byte() {
    let rig = rig("ttft");
    let keepalives = |n: usize| {
        (0..n)
            .flat_map(|_| [raw(": keep-alive\n\n"), pause_ms(300)])
            .collect::<Vec<_>>()
    };
    let cases: Vec<(&str, Vec<Part>)> = vec![
        ("content", [vec![role(SERVED)], keepalives(5), vec![content(SERVED, "Hi"), done()]].concat()),
        (
            "reasoning",
            [
                vec![role(SERVED)],
                keepalives(5),
                vec![data(&delta(SERVED, 0, json!({"reasoning_content": "Let"}))), done()],
            ]
            .concat(),
        ),
        (
            "tool-call",
            [
                keepalives(5),
                vec![
                    data(&delta(SERVED, 0, json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "", "arguments": "{\""}}]}))),
                    done(),
                ],
            ]
            .concat(),
        ),
    ];
    for (case, parts) in &cases {
        rig.canned.on(case, Reply::sse(parts.clone()));
        let (status, body) = ask(&rig, case, &request("deepseek-r1", case, true)).await;
        assert_eq!(status, 200, "{case}: {body}");
        parseable_events(&body);
    }
    let events = rig.gw.exactly(cases.len());
    for (case, _) in &cases {
        let e = event(&events, case);
        let ttft = e.ttft_ms.unwrap();
        assert!(
            ttft >= 1500,
            "{case}: ttft {ttft} ms counts the wait for content"
        );
        assert!(ttft <= e.latency_ms, "{case}");
        assert_eq!(e.outcome.as_str(), "ok", "{case}");
    }
    // Non-streamed answers have no time to first token.
    rig.canned
        .on("plain", Reply::json(&answer(SERVED, "Hi", None)));
    ask(&rig, "plain", &request("deepseek-r1", "plain", false)).await;
    let events = rig.gw.exactly(cases.len() + 1);
    assert_eq!(event(&events, "plain").ttft_ms, None);
}

#[tokio::test]
async fn an_estimate_counts_and_caps_every_choice_of_n() {
    let rig = rig("n-choices");
    let words = " the gateway routes every request and counts each token to";
    let streamed: Vec<Part> = (0..3u32)
        .map(|i| data(&delta(SERVED, i, json!({"content": words}))))
        .chain([done()])
        .collect();
    rig.canned.on("stream", Reply::sse(streamed));
    let mut whole = answer(SERVED, words, None);
    whole["choices"] = json!((0..3).map(|i| json!({"index": i, "message": {"role": "assistant", "content": words}, "finish_reason": "length"})).collect::<Vec<_>>());
    rig.canned.on("whole", Reply::json(&whole));
    for (case, stream) in [("stream", true), ("whole", false)] {
        let mut body = request("deepseek-r1", case, stream);
        body["n"] = json!(3);
        body["max_tokens"] = json!(8);
        let (status, text) = ask(&rig, case, &body).await;
        assert_eq!(status, 200, "{case}: {text}");
    }
    let events = rig.gw.exactly(2);
    for case in ["stream", "whole"] {
        let e = event(&events, case);
        assert_eq!(
            e.output_tokens, 24,
            "{case}: 8 tokens for each of 3 choices"
        );
        assert_eq!(e.token_source, Some(TokenSource::Estimated), "{case}");
    }
}

#[tokio::test]
async fn the_client_model_name_is_restored_in_every_sse_framing() {
    let rig = rig("framing");
    let chunk = |text: &str| {
        serde_json::to_string_pretty(&delta(SERVED, 0, json!({"content": text}))).unwrap()
    };
    let multi_line: String = chunk("c").lines().map(|l| format!("data: {l}\n")).collect();
    let parts = vec![
        raw("\u{feff}"),
        raw(&format!(
            "id: 1\ndata: {}\n\n",
            chunk("a").replace('\n', " ")
        )),
        raw(&format!(
            "event: message\nretry: 1000\ndata:{}\r\n\r\n",
            delta(SERVED, 0, json!({"content": "b"}))
        )),
        raw(&format!(": note\n{multi_line}id: 3\n\n")),
        raw(
            "data: {\"model\" : \"deepseek-reasoner\" , \"choices\" : [ { \"index\" : 0 , \"delta\" : { \"content\" : \"d\" } } ] }\n\n",
        ),
        done(),
    ];
    rig.canned.on("framings", Reply::sse(parts));
    let (status, body) = ask(&rig, "framings", &request("deepseek-r1", "framings", true)).await;
    assert_eq!(status, 200, "{body}");
    let body = body.replace("\r\n", "\n");
    let events = parseable_events(&body);
    assert_eq!(events.len(), 5, "{body}");
    let mut text = String::new();
    for e in &events[..4] {
        assert_eq!(
            e["model"], "deepseek-r1",
            "one name in the whole stream: {body}"
        );
        text.push_str(e["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(text, "abcd");
    assert!(
        body.contains("id: 1\n") && body.contains("retry: 1000\n") && body.contains(": note\n"),
        "other fields are kept: {body}"
    );

    let pretty = serde_json::to_string_pretty(&answer(SERVED, "Hi", None)).unwrap();
    rig.canned.on(
        "pretty",
        Reply::new(200, "application/json; charset=utf-8", &pretty),
    );
    let (status, body) = ask(&rig, "pretty", &request("deepseek-r1", "pretty", false)).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["model"],
        "deepseek-r1"
    );
    assert_eq!(
        body,
        pretty.replace("\"deepseek-reasoner\"", "\"deepseek-r1\""),
        "only the name changes"
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_read_in_any_case() {
    let rig = rig("bearer");
    rig.canned.on("k", Reply::json(&answer(SERVED, "Hi", None)));
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = client()
            .post(rig.gw.url("/v1/chat/completions"))
            .header("authorization", format!("{scheme}  {CLIENT_KEY}"))
            .header("content-type", "application/json")
            .body(request("deepseek-r1", "k", false).to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{scheme}");
    }
    let resp = client()
        .post(rig.gw.url("/v1/chat/completions"))
        .header("authorization", format!("Basic {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(request("deepseek-r1", "k", false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn an_overlong_model_name_is_refused_and_still_recorded() {
    let rig = rig("long-model");
    let long = "deepseek-".to_string() + &"r".repeat(200);
    let (status, body) = ask(&rig, "long", &request(&long, "long", false)).await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["param"], "model");
    let events = rig.gw.exactly(1);
    assert_eq!(events[0].outcome.as_str(), "invalid_request");
    assert_eq!(events[0].status, 400);
    assert_eq!(rig.canned.hits("long"), 0);
}

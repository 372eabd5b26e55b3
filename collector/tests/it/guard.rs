//! The content guard through the whole request path: input blocked and
//! masked before it goes upstream, whole and streamed answers blocked and
//! masked (matches split across chunks), the moderation upstream slow and
//! down in both fail modes, and what the event says.

use serde_json::Value;
use tollgate_schemas::Outcome;

use crate::harness::*;

fn sections(rules: &str) -> String {
    format!(
        "{}{}{}\
         [upstreams.nowhere]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
         [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"qwq\" }}]\n\n{rules}\n",
        simulated("qwq", &["output_tokens = 12"]),
        simulated("moderation", &[]),
        simulated("slow-moderation", &["latency_ms = 3000"]),
    )
}

fn say(text: &str, stream: bool) -> String {
    serde_json::json!({
        "model": "qwq-32b",
        "stream": stream,
        "messages": [{"role": "user", "content": format!("say: {text}")}],
    })
    .to_string()
}

fn ask(text: &str) -> String {
    serde_json::json!({
        "model": "qwq-32b",
        "messages": [{"role": "user", "content": text}],
    })
    .to_string()
}

/// The text a client reads from a stream, and the error event's code.
fn streamed(body: &str) -> (String, Option<String>) {
    let mut text = String::new();
    let mut error = None;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(code) = v["error"]["code"].as_str() {
            error = Some(code.to_string());
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
    }
    (text, error)
}

fn answer(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

const PII_BLOCK_IN: &str = r#"
[[guard]]
name = "no-pii-out"
direction = "input"
detect = ["email", "phone", "bank_card", "cn_resident_id", "secret"]
deny = ["keyword:internal-only", "regex:(?i)project\\s+falcon"]
"#;

#[tokio::test]
async fn input_with_pii_or_a_denied_word_is_refused_with_content_blocked_and_costs_nothing() {
    let gw = TestGateway::start(&sections(PII_BLOCK_IN));
    let refused = [
        "mail bob.smith@example.com the numbers",
        "call me on +86 138 0013 8000",
        "card 4111 1111 1111 1111 expires soon",
        "my id is 11010519491231002X",
        "use key sk-proj-abcdefghijklmnopqrstuvwxyz123456",
        "this is INTERNAL-ONLY material",
        "status of Project   Falcon?",
    ];
    for text in refused {
        let (status, _, body) = gw
            .post("/v1/chat/completions", Some(CLIENT_KEY), &ask(text))
            .await;
        assert_eq!(status, 400, "{text}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "content_blocked", "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no-pii-out")
        );
    }
    let passed = [
        "card 4111 1111 1111 1112 fails its Luhn check",
        "id 110105194912310021 has a wrong check digit",
        "a plain question about spend",
    ];
    for text in passed {
        let (status, _, body) = gw
            .post("/v1/chat/completions", Some(CLIENT_KEY), &ask(text))
            .await;
        assert_eq!(status, 200, "{text}: {body}");
    }
    let events = gw.exactly(refused.len() + passed.len()).await;
    for (e, text) in events.iter().zip(refused) {
        assert_eq!(e.outcome, Outcome::Blocked, "{text}");
        assert_eq!(e.error_type.as_deref(), Some("invalid_request_error"));
        assert_eq!(e.limit_key.as_deref(), Some("no-pii-out:input"));
        assert_eq!(e.cost_usd.map(|c| c.to_string()), Some("0".into()));
        assert!(e.attempts.is_empty() && e.output_tokens == 0);
        let json = serde_json::to_string(e).unwrap();
        for secret in [
            "bob.smith",
            "138 0013",
            "4111 1111",
            "11010519491231002X",
            "sk-proj",
            "Falcon",
        ] {
            assert!(!json.contains(secret), "{secret} in the event: {json}");
        }
    }
    assert!(
        events[refused.len()..]
            .iter()
            .all(|e| e.outcome == Outcome::Ok)
    );
}

#[tokio::test]
async fn masked_input_reaches_the_upstream_masked() {
    let gw = TestGateway::start(&sections(
        "[[guard]]\nname = \"mask-in\"\ndirection = \"input\"\ndetect = [\"email\", \"phone\"]\naction = \"mask\"\ndeny = [\"keyword:falcon\"]\n",
    ));
    // The simulator says back what follows `say:`, as it received it.
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &say("write to ann@corp.cn or 13800138000 about FALCON", false),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), "write to [EMAIL] or [PHONE] about [DENIED]");
    let e = &gw.exactly(1).await[0];
    assert_eq!(e.outcome, Outcome::Ok);
    assert!(e.limit_key.is_none());
}

const SECRETS_OUT: &str = r#"
[[guard]]
name = "no-secrets-back"
direction = "output"
detect = ["secret", "email"]
action = "ACTION"
"#;

#[tokio::test]
async fn a_secret_split_across_two_or_three_chunks_never_reaches_the_client() {
    let gw = TestGateway::start(&sections(&SECRETS_OUT.replace("ACTION", "block")));
    let splits = [
        "the key is sk-abcdefghij|klmnopqrstuvwxyz0123 ok",
        "the key is sk-abcde|fghijklmnopq|rstuvwxyz0123 ok",
        "write to a.very.long.name@exam|ple.com please",
    ];
    for text in splits {
        let (status, _, body) = gw
            .post("/v1/chat/completions", Some(CLIENT_KEY), &say(text, true))
            .await;
        assert_eq!(status, 200);
        let (got, error) = streamed(&body);
        assert_eq!(error.as_deref(), Some("content_blocked"), "{body}");
        for piece in text.split('|').skip(1) {
            assert!(
                !body.contains(piece.trim()),
                "{piece:?} reached the client: {body}"
            );
        }
        assert!(!got.contains("sk-abc") && !got.contains("@exam"), "{got}");
        assert!(!body.contains("[DONE]"));
    }
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &say("nothing| to| see| here", true),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(streamed(&body), ("nothing to see here".into(), None));
    assert!(body.contains("[DONE]"));
    let events = gw.exactly(4).await;
    for e in &events[..3] {
        assert_eq!(e.outcome, Outcome::Blocked);
        assert_eq!(e.limit_key.as_deref(), Some("no-secrets-back:output"));
        assert!(e.output_tokens > 0, "blocked output is billed");
        assert!(e.cost_usd.is_some_and(|c| c > tollgate_schemas::Usd::ZERO));
    }
    assert_eq!(events[3].outcome, Outcome::Ok);
}

#[tokio::test]
async fn a_masked_stream_carries_the_mask_in_place_of_a_split_secret() {
    let gw = TestGateway::start(&sections(&SECRETS_OUT.replace("ACTION", "mask")));
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &say(
                "key: sk-abcde|fghijklmnopq|rstuvwxyz0123| and mail x@y|.org| done",
                true,
            ),
        )
        .await;
    assert_eq!(status, 200);
    let (text, error) = streamed(&body);
    assert_eq!(error, None, "{body}");
    assert_eq!(text, "key: [SECRET] and mail [EMAIL] done");
    assert!(body.contains("[DONE]"));
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &say("mail x@y.org now", false),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer(&body), "mail [EMAIL] now");
    let events = gw.exactly(2).await;
    assert!(events.iter().all(|e| e.outcome == Outcome::Ok));
}

#[tokio::test]
async fn a_blocked_whole_answer_is_replaced_by_the_error_and_billed() {
    let gw = TestGateway::start(&sections(&SECRETS_OUT.replace("ACTION", "block")));
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &say("here: AKIAIOSFODNN7EXAMPLE", false),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("AKIA"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "content_blocked");
    let e = &gw.exactly(1).await[0];
    assert_eq!(e.outcome, Outcome::Blocked);
    assert_eq!(e.limit_key.as_deref(), Some("no-secrets-back:output"));
    assert!(e.output_tokens > 0 && e.cost_usd.is_some_and(|c| c > tollgate_schemas::Usd::ZERO));
}

fn moderated(upstream: &str, fail: &str) -> String {
    sections(&format!(
        "[[guard]]\nname = \"moderated\"\ndirection = \"input\"\n\
         moderation = {{ upstream = \"{upstream}\", timeout_ms = 300, fail = \"{fail}\" }}\n"
    ))
}

#[tokio::test]
async fn the_moderation_upstream_blocks_what_it_flags() {
    let gw = TestGateway::start(&moderated("moderation", "closed"));
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &ask("something HARMFUL"),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("content_blocked"));
    let (status, _, _) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &ask("something kind"),
        )
        .await;
    assert_eq!(status, 200);
    let events = gw.exactly(2).await;
    assert_eq!(events[0].outcome, Outcome::Blocked);
    assert_eq!(events[1].outcome, Outcome::Ok);
}

#[tokio::test]
async fn a_slow_or_down_moderation_upstream_fails_open_or_closed_as_configured() {
    for upstream in ["slow-moderation", "nowhere"] {
        let open = TestGateway::start(&moderated(upstream, "open"));
        let started = std::time::Instant::now();
        let (status, _, body) = open
            .post("/v1/chat/completions", Some(CLIENT_KEY), &ask("hello"))
            .await;
        assert_eq!(status, 200, "{upstream}: {body}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "the timeout holds"
        );
        let closed = TestGateway::start(&moderated(upstream, "closed"));
        let (status, _, body) = closed
            .post("/v1/chat/completions", Some(CLIENT_KEY), &ask("hello"))
            .await;
        assert_eq!(status, 400, "{upstream}: {body}");
        assert!(body.contains("did not answer"), "{body}");
        assert_eq!(open.exactly(1).await[0].outcome, Outcome::Ok);
        assert_eq!(closed.exactly(1).await[0].outcome, Outcome::Blocked);
    }
}

#[tokio::test]
async fn rules_apply_only_to_the_models_and_consumers_they_name() {
    let gw = TestGateway::start(&sections(
        "[[guard]]\nname = \"only-limited\"\ndetect = [\"email\"]\nconsumers = [\"limited\"]\n",
    ));
    let body = ask("mail bob@example.com");
    let (status, _, _) = gw
        .post("/v1/chat/completions", Some(CLIENT_KEY), &body)
        .await;
    assert_eq!(status, 200, "the rule names another consumer");
    let (status, _, _) = gw
        .post("/v1/chat/completions", Some(OTHER_KEY), &body)
        .await;
    assert_eq!(status, 400);
    gw.exactly(2).await;
}

#[tokio::test]
async fn a_secret_split_across_content_parts_is_still_one_text() {
    let gw = TestGateway::start(&sections(PII_BLOCK_IN));
    let body = serde_json::json!({
        "model": "qwq-32b",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi AKIAIOSFOD"},
            {"type": "text", "text": "NN7EXAMPLE"},
        ]}],
    })
    .to_string();
    let (status, _, body) = gw
        .post("/v1/chat/completions", Some(CLIENT_KEY), &body)
        .await;
    assert_eq!(status, 400, "{body}");
    gw.exactly(1).await;
}

//! A failing route falls back, and the one event records every attempt.

use rust_decimal::Decimal;

use crate::harness::*;

fn r1_routes() -> &'static str {
    "[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{ upstream = \"primary\", model = \"deepseek-reasoner\" }]\nfallback = [\"qwq-32b\"]\n\n\
     [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{ upstream = \"backup\", model = \"qwq-32b\" }]\n\n"
}

#[tokio::test]
async fn a_failing_route_falls_back_and_every_attempt_is_recorded() {
    let gw = TestGateway::start(&format!(
        "{}{}{}",
        simulated("primary", &["error_rate = 1.0", "error_status = 503"]),
        simulated("backup", &["output_tokens = 9"]),
        r1_routes()
    ));
    for stream in [false, true] {
        let (status, headers, body) = gw
            .post(
                "/v1/chat/completions",
                Some(CLIENT_KEY),
                &chat("deepseek-r1", stream),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-tollgate-served-model"], "qwq-32b");
        assert!(
            body.contains("\"model\":\"deepseek-r1\""),
            "client name kept after fallback: {body}"
        );
    }
    for e in gw.exactly(2).await {
        assert!(e.fallback);
        assert_eq!(e.fallback_from.as_deref(), Some("deepseek-reasoner"));
        assert_eq!(e.fallback_reason.as_deref(), Some("5xx"));
        assert_eq!(e.served_model.as_deref(), Some("qwq-32b"));
        assert_eq!(e.attempts.len(), 2);
        assert_eq!(e.attempts[0].status, Some(503));
        assert_eq!(
            e.attempts[0].cost_usd.map(|c| c.decimal()),
            Some(Decimal::ZERO)
        );
        assert_eq!(e.attempts[1].status, Some(200));
        assert_eq!(e.output_tokens, 9);
        let want = dollars(e.input_tokens, 0, 9, "0.20", "0.20", "0.20");
        assert_eq!(e.cost_usd.unwrap().decimal(), want);
    }
}

#[tokio::test]
async fn a_client_error_does_not_fall_back_unless_the_route_says_so() {
    let gw = TestGateway::start(&format!(
        "{}{}{}\
         [[routes]]\nmodel = \"strict\"\ntargets = [{{ upstream = \"bad\" }}]\nfallback = [\"qwq-32b\"]\n\n\
         [[routes]]\nmodel = \"lenient\"\ntargets = [{{ upstream = \"bad\" }}]\nfallback = [\"qwq-32b\"]\nfallback_on = [\"4xx\"]\n\n",
        simulated("bad", &["error_rate = 1.0", "error_status = 400"]),
        simulated("backup", &["output_tokens = 9"]),
        "[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{ upstream = \"backup\" }]\n\n",
    ));
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &chat("strict", false),
        )
        .await;
    assert_eq!(status, 400, "the upstream's 4xx reaches the client: {body}");
    let (status, headers, body) = gw
        .post(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &chat("lenient", false),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-tollgate-served-model"], "qwq-32b");
    let events = gw.exactly(2).await;
    assert_eq!(events[0].attempts.len(), 1);
    assert!(!events[0].fallback);
    assert_eq!(events[1].attempts.len(), 2);
    assert_eq!(events[1].fallback_reason.as_deref(), Some("4xx"));
}

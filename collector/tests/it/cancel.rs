//! A client that stops reading a stream still yields exactly one event,
//! billed for what was generated.

use axum::body::Body;
use http_body_util::BodyExt;
use tollgate_schemas::TokenSource;

use crate::harness::*;

/// Reads SSE events until `n` have arrived, then drops the body.
async fn read_then_cancel(gw: &TestGateway, n: usize) -> String {
    let resp = gw
        .send(request(
            "/v1/chat/completions",
            Some(CLIENT_KEY),
            &chat("qwq-32b", true),
        ))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body: Body = resp.into_body();
    let mut seen = String::new();
    while seen.matches("\n\n").count() < n {
        let frame = body.frame().await.expect("the stream ended early").unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    drop(body);
    seen
}

#[tokio::test]
async fn a_stream_cancelled_after_n_chunks_yields_exactly_one_event_each() {
    // 200 tokens at 50/s: the stream is mid-way whenever the client leaves.
    let gw = TestGateway::start(&format!(
        "{}[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"sim\" }}]\n\n",
        simulated("sim", &["output_tokens = 200", "tokens_per_s = 50"]),
    ));
    let mut seen = Vec::new();
    for n in [1, 3, 8] {
        seen.push(read_then_cancel(&gw, n).await);
    }
    let events = gw.exactly(seen.len()).await;
    for (raw, e) in seen.iter().zip(&events) {
        let deltas = raw.matches("\"content\":\"").count();
        assert_eq!(e.outcome.as_str(), "client_cancelled", "{e:?}");
        assert_eq!(e.status, 200);
        assert!(e.stream);
        assert_eq!(e.attempts.len(), 1);
        assert_eq!(e.attempts[0].error.as_deref(), Some("client_cancelled"));
        assert!(
            e.output_tokens as usize >= deltas,
            "billed {} < seen {deltas}",
            e.output_tokens
        );
        assert!(
            e.output_tokens < 200,
            "the upstream was cancelled, not drained"
        );
        assert_eq!(e.token_source, Some(TokenSource::Estimated));
        assert!(e.input_tokens > 0);
        assert!(
            e.cost_usd
                .is_some_and(|c| c.decimal() > rust_decimal::Decimal::ZERO)
        );
    }
}

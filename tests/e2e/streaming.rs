//! Streams: disconnects, usage shapes, and upstreams that break mid-way.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use tollgate_schemas::TokenSource;

use crate::harness::*;

/// Sends a streamed chat request over a raw socket and reads until `stop`
/// says so; returns what was read. The socket is then closed.
fn read_then_disconnect(gw: &Gateway, stop: impl Fn(&[u8]) -> Option<usize>) -> Vec<u8> {
    let body = chat("qwq-32b", true);
    let mut s = TcpStream::connect(gw.proc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    loop {
        if let Some(cut) = stop(&got) {
            got.truncate(cut);
            break;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => got.push(buf[0]),
        }
    }
    drop(s);
    got
}

/// Content deltas the client saw complete.
fn deltas_seen(raw: &[u8]) -> usize {
    String::from_utf8_lossy(raw)
        .matches("\"content\":\"")
        .count()
}

#[tokio::test]
async fn a_client_that_disconnects_is_billed_for_what_was_generated() {
    let dir = scratch("disconnect");
    // 200 tokens at 50/s: the stream is mid-way whenever the client leaves.
    let sim = simulator(
        &dir,
        "sim",
        &["--output-tokens", "200", "--tokens-per-s", "50"],
    );
    let gw = qwq_gateway(&dir, &sim);
    // Each SSE event ends in a blank line; chunked framing adds only CRLFs.
    let chunks = |n: usize| {
        move |got: &[u8]| {
            (String::from_utf8_lossy(got).matches("\n\n").count() >= n).then_some(got.len())
        }
    };
    let mid_utf8 = |got: &[u8]| {
        // Cut one byte into the first multi-byte character the server sent.
        let pos = got.windows(3).position(|w| w == "成".as_bytes())?;
        Some(pos + 1)
    };
    let header_only = |got: &[u8]| got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let seen = [
        read_then_disconnect(&gw, header_only),
        read_then_disconnect(&gw, chunks(1)),
        read_then_disconnect(&gw, chunks(8)),
        read_then_disconnect(&gw, mid_utf8),
    ];
    let events = gw.exactly(seen.len());
    for (raw, e) in seen.iter().zip(&events) {
        assert_eq!(e.outcome.as_str(), "client_cancelled", "{e:?}");
        assert_eq!(e.status, 200);
        assert_eq!(e.attempts.len(), 1);
        assert_eq!(e.attempts[0].error.as_deref(), Some("client_cancelled"));
        assert!(
            e.output_tokens as usize >= deltas_seen(raw),
            "billed {} < seen {}",
            e.output_tokens,
            deltas_seen(raw)
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

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_recorded_once() {
    let dir = scratch("early-leave");
    let sim = simulator(&dir, "sim", &["--latency-ms", "1500"]);
    let gw = qwq_gateway(&dir, &sim);
    read_then_disconnect(&gw, |got| {
        (got.is_empty()).then(|| {
            std::thread::sleep(Duration::from_millis(300));
            0
        })
    });
    let events = gw.exactly(1);
    let e = &events[0];
    assert_eq!(e.outcome.as_str(), "client_cancelled");
    assert_eq!(e.status, 499);
    assert_eq!(e.attempts.len(), 1, "{e:?}");
    assert_eq!(e.attempts[0].error.as_deref(), Some("client_cancelled"));
    assert!(e.input_tokens > 0, "the prompt sent upstream is billed");
}

#[tokio::test]
async fn usage_shapes_every_chunk_absent_and_zero() {
    let dir = scratch("usage-shapes");
    let every = simulator(
        &dir,
        "every",
        &["--output-tokens", "30", "--usage-every-chunk"],
    );
    let absent = simulator(&dir, "absent", &["--output-tokens", "30", "--no-usage"]);
    let zeros = simulator(
        &dir,
        "zeros",
        &["--output-tokens", "30", "--usage-style", "zeros"],
    );
    let gw = Gateway::start(
        &dir,
        &format!(
            "{}{}{}[[routes]]\nmodel = \"qwq-every\"\ntargets = [{{ upstream = \"every\" }}]\n\n\
             [[routes]]\nmodel = \"qwq-absent\"\ntargets = [{{ upstream = \"absent\" }}]\n\n\
             [[routes]]\nmodel = \"qwq-zeros\"\ntargets = [{{ upstream = \"zeros\" }}]\n\n{}",
            upstream("every", &every),
            upstream("absent", &absent),
            upstream("zeros", &zeros),
            consumers()
        ),
    );
    let asks = [
        ("qwq-every", true, None),
        ("qwq-every", false, None),
        ("qwq-absent", true, Some(5)),
        ("qwq-absent", false, None),
        ("qwq-zeros", true, None),
    ];
    for (model, stream, max) in asks {
        let mut body: Value = serde_json::from_str(&chat(model, stream)).unwrap();
        if let Some(m) = max {
            body["max_tokens"] = m.into();
        }
        let (status, _, text) = chat_as_app(&gw, &body.to_string()).await;
        assert_eq!(status, 200, "{text}");
    }
    let e = gw.exactly(asks.len());
    assert_eq!(
        (e[0].output_tokens, e[0].token_source),
        (30, Some(TokenSource::Upstream)),
        "cumulative usage: the last, not the sum"
    );
    assert_eq!(e[1].output_tokens, 30);
    assert_eq!(e[0].input_tokens, e[1].input_tokens);
    assert_eq!(e[2].token_source, Some(TokenSource::Estimated));
    assert!(
        e[2].output_tokens > 0 && e[2].output_tokens <= 5,
        "estimate bounded by max_tokens: {}",
        e[2].output_tokens
    );
    assert!(e[2].input_tokens > 0);
    assert_eq!(e[3].token_source, Some(TokenSource::Estimated));
    assert!(
        e[3].output_tokens >= 30,
        "every generated word counted: {}",
        e[3].output_tokens
    );
    assert_eq!(
        (e[4].input_tokens, e[4].output_tokens),
        (0, 0),
        "explicit zeros stay zero"
    );
    assert_eq!(e[4].token_source, Some(TokenSource::Upstream));
    assert_eq!(
        e[4].cost_usd.map(|c| c.decimal()),
        Some(rust_decimal::Decimal::ZERO)
    );
}

#[tokio::test]
async fn a_stream_that_breaks_mid_way_does_not_switch_to_the_fallback() {
    let dir = scratch("mid-stream");
    let breaking = simulator(
        &dir,
        "breaking",
        &["--output-tokens", "50", "--fail-after-chunks", "5"],
    );
    let backup = simulator(&dir, "backup", &[]);
    let gw = Gateway::start(
        &dir,
        &format!(
            "{}{}[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"breaking\", model = \"deepseek-reasoner\" }}]\nfallback = [\"qwq-32b\"]\n\n\
             [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"backup\" }}]\n\n{}",
            upstream("breaking", &breaking),
            upstream("backup", &backup),
            consumers()
        ),
    );
    let (status, _, body) = chat_as_app(&gw, &chat("deepseek-r1", true)).await;
    assert_eq!(status, 200);
    let data = sse_data(&body);
    assert!(!data.contains(&"[DONE]".to_string()));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{body}");
    assert_eq!(deltas_seen(body.as_bytes()), 5);
    let e = &gw.exactly(1)[0];
    assert!(!e.fallback);
    assert_eq!(e.attempts.len(), 1);
    assert_eq!(e.attempts[0].error.as_deref(), Some("stream_error"));
    assert_eq!(e.outcome.as_str(), "upstream_error");
    assert_eq!(e.served_model.as_deref(), Some("deepseek-reasoner"));
    assert!(
        e.output_tokens >= 5,
        "the partial attempt is billed: {}",
        e.output_tokens
    );
    assert!(e.cost_usd.is_some());
}

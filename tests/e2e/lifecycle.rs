//! Start-up, shutdown, the demo and key tooling.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn sigterm_lets_open_streams_finish_and_drains_the_tap() {
    let dir = scratch("sigterm");
    let sim = simulator(
        &dir,
        "sim",
        &["--output-tokens", "40", "--tokens-per-s", "40"],
    );
    let gw = qwq_gateway(&dir, &sim);
    let url = gw.url("/v1/chat/completions");
    let stream = tokio::spawn(async move {
        let resp = client()
            .post(url)
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(chat("qwq-32b", true))
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Gateway { proc, lake, .. } = gw;
    let status = tokio::task::spawn_blocking(move || proc.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let body = stream.await.unwrap();
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "the open stream completed"
    );
    let written = read_events(&lake);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].output_tokens, 40);
    assert_eq!(written[0].outcome.as_str(), "ok");
}

#[test]
fn the_demo_runs_traffic_and_prints_the_ledger() {
    let dir = scratch("demo");
    let out = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--requests",
            "30",
            "--interval-ms",
            "20",
            "--error-rate",
            "0.5",
            "--query-listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo consumer key: tg-"), "{stdout}");
    assert!(stdout.contains("30 events spooled, 0 dropped"), "{stdout}");
    let written = read_events(&dir.join("lake"));
    assert_eq!(written.len(), 30);
    assert!(
        written
            .iter()
            .all(|e| e.status == 200 && e.cost_usd.is_some())
    );
    // The demo's R1 token limit trips within its traffic: QwQ serves on.
    let limited: Vec<_> = written.iter().filter(|e| e.rate_limited).collect();
    assert!(!limited.is_empty(), "{stdout}");
    for e in limited {
        assert_eq!(e.fallback_reason.as_deref(), Some("rate_limited"));
        assert_eq!(e.limit_key.as_deref(), Some("r1-tokens:demo-app"));
        assert_eq!(e.served_model.as_deref(), Some("qwq-32b"));
    }
    assert!(
        stdout.contains("rate_limited -> served by qwq-32b (r1-tokens:demo-app)"),
        "{stdout}"
    );
}

#[test]
fn keys_new_prints_a_key_and_its_config_line() {
    let out = Command::new(BIN).args(["keys", "new"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().find_map(|l| l.strip_prefix("key: ")).unwrap();
    let line = text.lines().find(|l| l.starts_with("api_keys = ")).unwrap();
    assert!(line.contains(&hash(key)), "{text}");
}

//! Hostile input: keys, bodies, paths and hosts that have broken other
//! gateways.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use crate::harness::*;

#[tokio::test]
async fn hostile_keys_get_the_same_401_and_are_never_echoed() {
    let dir = scratch("hostile-keys");
    let sim = simulator(&dir, "sim", &[]);
    let gw = qwq_gateway(&dir, &sim);
    let long = "k".repeat(64 * 1024);
    let keys: Vec<String> = vec![
        "' OR '1'='1".into(),
        String::new(),
        long,
        "ключ-🔑".into(),
        format!("{CLIENT_KEY}x"),
        CLIENT_KEY[..CLIENT_KEY.len() - 1].to_string(),
    ];
    let mut bodies = Vec::new();
    for k in &keys {
        let mut req = client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat("qwq-32b", false));
        // Non-ASCII cannot go through reqwest's header builder as text.
        req = req.header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(format!("Bearer {k}").as_bytes()).unwrap(),
        );
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        let text = resp.text().await.unwrap();
        assert!(!text.contains(k.as_str()) || k.is_empty(), "key echoed");
        keep(&dir, &text);
        bodies.push(text);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every 401 body is identical"
    );
    let events = gw.exactly(keys.len());
    assert!(
        events
            .iter()
            .all(|e| e.outcome.as_str() == "unauthorized" && e.api_key_id.is_none())
    );
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(
        !log.contains("' OR '1'='1") && !log.contains("ключ"),
        "keys are never logged"
    );
    assert_no_secrets(&all_text_under(&dir), "test files");
}

#[tokio::test]
async fn upstream_addresses_in_the_body_are_ignored() {
    let dir = scratch("api-base");
    let sim = simulator(&dir, "sim", &[]);
    let gw = qwq_gateway(&dir, &sim);
    let decoy = TcpListener::bind("127.0.0.1:0").unwrap();
    let decoy_addr = decoy.local_addr().unwrap();
    decoy.set_nonblocking(true).unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (hits, stop) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while stop.load(Ordering::Relaxed) == 0 {
                if decoy.accept().is_ok() {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let url = format!("http://{decoy_addr}/v1");
    let body = serde_json::json!({
        "model": "qwq-32b",
        "api_base": url, "base_url": url, "api_key": "sk-client-supplied", "custom_llm_provider": "openai",
        "metadata": {"api_base": url, "deeper": [{"base_url": url}]},
        "extra_body": {"api_base": url},
        "messages": [{"role": "user", "content": "hi", "api_base": url}],
    });
    for stream in [false, true] {
        let mut b = body.clone();
        b["stream"] = Value::Bool(stream);
        let (status, _, text) = chat_as_app(&gw, &b.to_string()).await;
        assert_eq!(status, 200, "{text}");
    }
    let events = gw.exactly(2);
    stop.store(1, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "nothing ever connected to the address in the body"
    );
    assert!(
        events
            .iter()
            .all(|e| e.upstream.as_deref() == Some("primary"))
    );
}

#[tokio::test]
async fn path_and_host_tricks_route_on_the_normalised_path() {
    let dir = scratch("paths");
    let sim = simulator(&dir, "sim", &[]);
    let gw = qwq_gateway(&dir, &sim);
    let body = chat("qwq-32b", false);
    let req = |target: &str, host: &str, key: bool| {
        let auth = if key {
            format!("Authorization: Bearer {CLIENT_KEY}\r\n")
        } else {
            String::new()
        };
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let cases: Vec<(&str, &str, bool, u16)> = vec![
        ("//v1/chat/completions", "127.0.0.1", true, 200),
        ("//v1/chat/completions", "127.0.0.1", false, 401),
        ("/v1//chat/./completions", "127.0.0.1", true, 200),
        ("/v1/x/%2e%2e/chat/completions", "127.0.0.1", true, 200),
        ("/v1/x/%2E%2E/chat/completions", "127.0.0.1", false, 401),
        ("/v1/../../../etc/passwd", "127.0.0.1", true, 404),
        ("/v1/%2fchat/completions", "127.0.0.1", true, 404),
        ("/v1/chat/completions", "evil.example", true, 200),
        ("/v1/chat/completions", "127.0.0.1:1/../admin", true, 200),
        (
            "http://evil.example/v1/chat/completions",
            "evil.example",
            true,
            200,
        ),
    ];
    for (target, host, key, want) in &cases {
        let (status, text) = raw_http(gw.proc.addr, &req(target, host, *key));
        keep(&dir, &text);
        assert_eq!(status, *want, "{target} host={host}: {text}");
    }
    let events = gw.exactly(cases.len());
    assert!(
        events
            .iter()
            .filter(|e| e.status == 200)
            .all(|e| e.upstream.as_deref() == Some("primary") && e.endpoint == "chat/completions")
    );
    assert_no_secrets(&all_text_under(&dir), "test files");
}

#[tokio::test]
async fn hostile_json_is_a_400_and_the_gateway_stays_up() {
    let dir = scratch("hostile-json");
    let sim = simulator(&dir, "sim", &[]);
    let gw = qwq_gateway(&dir, &sim);
    let deep = format!(
        r#"{{"model":"qwq-32b","messages":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("nested 10k", deep.into_bytes()),
        ("nested objects 10k", deep_obj.into_bytes()),
        (
            "duplicate keys",
            br#"{"model":"qwq-32b","model":"other","messages":[{"role":"user","content":"x"}]}"#
                .to_vec(),
        ),
        (
            "stream as string",
            br#"{"model":"qwq-32b","stream":"true","messages":[{"role":"user","content":"x"}]}"#
                .to_vec(),
        ),
        (
            "NaN",
            br#"{"model":"qwq-32b","temperature":NaN,"messages":[{"role":"user","content":"x"}]}"#
                .to_vec(),
        ),
        (
            "lone surrogate",
            br#"{"model":"qwq-32b","messages":[{"role":"user","content":"\udc00"}]}"#.to_vec(),
        ),
        (
            "invalid utf-8",
            b"{\"model\":\"qwq-32b\",\"messages\":[{\"content\":\"\xff\"}]}".to_vec(),
        ),
        ("not an object", b"[]".to_vec()),
    ];
    for (name, body) in &bodies {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 400, "{name}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{name}");
    }
    let (status, _, _) = chat_as_app(&gw, &chat("qwq-32b", false)).await;
    assert_eq!(status, 200, "still serving after hostile input");
    let events = gw.exactly(bodies.len() + 1);
    assert!(
        events[..bodies.len()]
            .iter()
            .all(|e| e.outcome.as_str() == "invalid_request" && e.status == 400)
    );
}

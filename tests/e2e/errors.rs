//! Every error is an OpenAI-style body with its status, and still exactly
//! one usage event.

use serde_json::Value;

use crate::harness::*;

#[tokio::test]
async fn each_error_has_its_status_body_and_event() {
    let dir = scratch("errors");
    let sim = simulator(&dir, "sim", &[]);
    let failing = simulator(
        &dir,
        "failing",
        &["--error-rate", "1", "--error-status", "500"],
    );
    let gw = Gateway::start(
        &dir,
        &format!(
            "{}{}[[routes]]\nmodel = \"deepseek-r1\"\ntargets = [{{ upstream = \"primary\" }}]\n\n\
             [[routes]]\nmodel = \"qwq-32b\"\ntargets = [{{ upstream = \"primary\" }}]\n\n\
             [[routes]]\nmodel = \"broken\"\ntargets = [{{ upstream = \"failing\" }}]\n\n{}",
            upstream("primary", &sim),
            upstream("failing", &failing),
            consumers()
        ),
    );
    let big = format!(
        r#"{{"model":"qwq-32b","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(70_000)
    );
    // (name, key, body, status, error type, event outcome)
    type Case<'a> = (&'a str, Option<&'a str>, String, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no key",
            None,
            chat("qwq-32b", false),
            401,
            "authentication_error",
            "unauthorized",
        ),
        (
            "wrong key",
            Some("tg-nope"),
            chat("qwq-32b", false),
            401,
            "authentication_error",
            "unauthorized",
        ),
        (
            "not allowed",
            Some(OTHER_KEY),
            chat("deepseek-r1", false),
            403,
            "permission_error",
            "unauthorized",
        ),
        (
            "unknown model",
            Some(CLIENT_KEY),
            chat("gpt-9", false),
            404,
            "invalid_request_error",
            "invalid_request",
        ),
        (
            "malformed",
            Some(CLIENT_KEY),
            "{\"model\":".into(),
            400,
            "invalid_request_error",
            "invalid_request",
        ),
        (
            "too large",
            Some(CLIENT_KEY),
            big,
            413,
            "invalid_request_error",
            "invalid_request",
        ),
        (
            "upstream 500",
            Some(CLIENT_KEY),
            chat("broken", false),
            502,
            "upstream_error",
            "upstream_error",
        ),
    ];
    for (name, key, body, status, kind, _) in &cases {
        let (got, headers, text) = post(&gw, "/v1/chat/completions", *key, body).await;
        keep(&dir, &text);
        assert_eq!(got, *status, "{name}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text}"));
        assert_eq!(v["error"]["type"], *kind, "{name}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(!headers["x-request-id"].is_empty(), "{name}");
    }
    let (status, _, text) = {
        let resp = client()
            .get(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), (), resp.text().await.unwrap())
    };
    assert_eq!(status, 405, "{text}");
    let (status, _, text) = post(&gw, "/v2/nothing", Some(CLIENT_KEY), "{}").await;
    assert_eq!(status, 404, "{text}");

    let events = gw.exactly(cases.len() + 2);
    for ((name, _, _, status, _, outcome), e) in cases.iter().zip(&events) {
        assert_eq!(e.status, *status, "{name}");
        assert_eq!(e.outcome.as_str(), *outcome, "{name}");
        assert_eq!(e.output_tokens, 0, "{name}");
    }
    assert_eq!(events[0].consumer, None);
    assert_eq!(events[2].consumer.as_deref(), Some("limited"));
    assert_eq!(events[6].attempts.len(), 1);
    assert_eq!(events[6].attempts[0].status, Some(500));
    assert_no_secrets(&all_text_under(&dir), "test files");
}

#[tokio::test]
async fn a_bad_config_names_the_field_and_line() {
    let dir = scratch("bad-config");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[gateway]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"nowhere\" }]\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 6")
            && err.contains("routes[0].targets[0].upstream")
            && err.contains("nowhere"),
        "{err}"
    );
}

#[test]
fn kafka_client_settings_reach_the_ingesters_consumer_too() {
    // A setting librdkafka refuses proves it was applied: before, only the
    // forwarder's producer took `properties`, so an ingester against a
    // SASL/TLS cluster ran with none of them.
    let dir = scratch("kafka-properties");
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nspool_dir = {:?}\nlake = {:?}\n\
             kafka = {{ brokers = \"127.0.0.1:9\", properties = {{ \"security.protocol\" = \"carrier-pigeon\" }} }}\n",
            dir.join("spool").display().to_string(),
            dir.join("lake").display().to_string()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args([
            "ingest",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("TOLLGATE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the ingester ignored its Kafka client settings and kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("security.protocol"), "{err}");
}

#[tokio::test]
async fn a_query_port_in_use_is_an_error_naming_the_key_not_a_crash() {
    let dir = scratch("port-in-use");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let path = dir.join("busy.toml");
    for (key, line) in [
        (
            "query.listen",
            format!("listen = \"{addr}\"\npg_listen = \"off\""),
        ),
        (
            "query.pg_listen",
            format!("listen = \"127.0.0.1:0\"\npg_listen = \"{addr}\""),
        ),
    ] {
        std::fs::write(
            &path,
            format!(
                "[pipeline]\nlake = \"{}\"\n\n[query]\n{line}\n",
                dir.join("lake").display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["query", "--config", path.to_str().unwrap()])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(key) && err.contains(&addr.to_string()),
            "{err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
    }
}

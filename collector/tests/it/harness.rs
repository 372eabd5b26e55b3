//! A gateway in process: config from TOML sections, the tap on a spool in a
//! temporary directory, requests through the router, events read back.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tollgate_collector::ledger::tap::{Tap, TapWriter};
use tollgate_collector::{Config, Gateway, app};
use tollgate_schemas::UsageEvent;
use tollgate_spool::{SpoolOptions, SpoolReader};
use tower::ServiceExt;

/// `app` may call every model; `limited` only `qwq-*`.
pub const CLIENT_KEY: &str = "tg-test-client-7d1e";
pub const OTHER_KEY: &str = "tg-test-other-3b9a";

pub struct TestGateway {
    pub app: Router,
    tap: Arc<Tap>,
    writer: Option<TapWriter>,
    reader: SpoolReader,
    dir: PathBuf,
}

/// A `[upstreams.<name>]` table for the simulated upstream with `knobs`
/// (TOML lines such as `output_tokens = 9`).
pub fn simulated(name: &str, knobs: &[&str]) -> String {
    format!(
        "[upstreams.{name}]\nkind = \"simulated\"\n{}\n\n",
        knobs.join("\n")
    )
}

fn hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

impl TestGateway {
    /// A gateway with `sections` (upstreams and routes) and the two test
    /// consumers.
    pub fn start(sections: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!(
            "{sections}[[consumers]]\nname = \"app\"\nteam = \"search\"\napi_keys = [\"{}\"]\n\n\
             [[consumers]]\nname = \"limited\"\napi_keys = [\"{}\"]\nmodels = [\"qwq-*\"]\n",
            hash(CLIENT_KEY),
            hash(OTHER_KEY)
        );
        let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let (spool, reader, _) =
            tollgate_spool::open(SpoolOptions::new(dir.join("spool"))).unwrap();
        let (tap, writer) = Tap::start(spool, 1024).unwrap();
        let gateway = Gateway::new(&config, tap.clone(), Vec::new()).unwrap();
        Self {
            app: app(Arc::new(gateway)),
            tap,
            writer: Some(writer),
            reader,
            dir,
        }
    }

    /// One request through the router; the response body unread.
    pub async fn send(&self, req: Request<Body>) -> axum::response::Response {
        self.app.clone().oneshot(req).await.unwrap()
    }

    /// `POST path` with `body` as JSON, as the holder of `key`; the status,
    /// headers and whole body.
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let resp = self.send(request(path, key, body)).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// Waits for `n` events, stops the tap, and returns every event it
    /// spooled, which must be exactly `n`.
    pub async fn exactly(mut self, n: usize) -> Vec<UsageEvent> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.tap.counters().emitted.load(Ordering::Relaxed) as usize) < n
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Room for an event that should not come.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let writer = self.writer.take().unwrap();
        tokio::task::spawn_blocking(move || writer.close())
            .await
            .unwrap()
            .unwrap();
        let mut events = Vec::new();
        loop {
            let batch = self
                .reader
                .next_batch(1024, Duration::from_millis(50))
                .unwrap();
            if batch.is_empty() {
                break;
            }
            for r in batch.records() {
                events.push(serde_json::from_slice::<UsageEvent>(r).unwrap());
            }
        }
        assert_eq!(events.len(), n, "events: {events:#?}");
        events
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON `POST`, with `Authorization: Bearer <key>` when there is a key.
pub fn request(path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut req = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    req.body(Body::from(body.to_string())).unwrap()
}

pub fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "How much did search spend on reasoning tokens?"}],
    })
    .to_string()
}

/// The cost of tokens at $/1M prices, computed independently of the
/// gateway's code.
pub fn dollars(
    input: u64,
    cached: u64,
    output: u64,
    p_in: &str,
    p_cached: &str,
    p_out: &str,
) -> rust_decimal::Decimal {
    use rust_decimal::Decimal;
    use std::str::FromStr;
    let m = Decimal::from(1_000_000u64);
    (Decimal::from(input - cached) * Decimal::from_str(p_in).unwrap()
        + Decimal::from(cached) * Decimal::from_str(p_cached).unwrap()
        + Decimal::from(output) * Decimal::from_str(p_out).unwrap())
        / m
}

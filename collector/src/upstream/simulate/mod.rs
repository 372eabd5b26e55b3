//! A simulated OpenAI-compatible upstream: chat completions (streamed and
//! not), legacy completions, embeddings with deterministic vectors,
//! moderations (flagging a few words), models. A chat or completion whose
//! prompt starts `say:` answers the rest, one chunk per `|`-separated piece.
//!
//! `tollgate simulate` serves [`router`] on a socket; the `simulated`
//! upstream kind calls the very same router in-process. Its knobs reproduce
//! what real providers do to a gateway: slow first bytes, slow tokens,
//! errors, usage in the last chunk or in every chunk or not at all,
//! DeepSeek-style cache fields, and streams that break half-way.
//!
//! Its parts: [`settings`] (the knobs), `plan` (one request's plan and
//! usage), `answer` (whole bodies, embeddings) and `stream` (the same
//! answer as server-sent events).

mod answer;
mod plan;
pub mod settings;
mod stream;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

pub use answer::embed;
use answer::{chat, completions, embeddings, moderations};
use plan::Sim;
pub use settings::{SimSettings, UsageStyle};

/// The simulator's HTTP surface, rooted at `/v1`.
pub fn router(settings: SimSettings) -> Router {
    let sim = Arc::new(Sim {
        settings,
        counter: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/moderations", post(moderations))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        // Takes what a gateway may send (its own limit is configurable),
        // not axum's 2 MiB default.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(sim)
}

/// Largest request body the simulator reads, bytes.
const MAX_REQUEST_BYTES: usize = 256 << 20;

async fn models() -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": "simulated", "object": "model", "owned_by": "tollgate"}]}))
        .into_response()
}

/// Serves the simulator until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: SimSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(settings))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use serde_json::Value;
    use tower::ServiceExt;

    async fn call(settings: SimSettings, path: &str, body: Value) -> (StatusCode, String) {
        let req = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router(settings).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn non_stream_reports_usage_and_reasoning() {
        let s = SimSettings {
            output_tokens: 10,
            reasoning_tokens: 4,
            cached_tokens: 2,
            ..Default::default()
        };
        let (status, body) = call(
            s,
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hello world!"}]}),
        )
        .await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], "m");
        assert_eq!(v["usage"]["completion_tokens"], 10);
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"],
            4
        );
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert!(
            !v["choices"][0]["message"]["reasoning_content"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn stream_ends_with_usage_then_done_only_when_asked() {
        let s = SimSettings {
            output_tokens: 3,
            ..Default::default()
        };
        let (_, with) = call(s.clone(), "/v1/chat/completions", json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true}})).await;
        let events: Vec<&str> = with.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3 + 1 + 1 + 1, "{with}");
        assert!(events[4].contains("\"choices\":[],\"usage\""));
        assert_eq!(events[5], "data: [DONE]");
        let (_, without) = call(
            s,
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "stream": true}),
        )
        .await;
        assert!(!without.contains("usage"));
        assert!(without.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn max_tokens_caps_output() {
        let s = SimSettings {
            output_tokens: 50,
            ..Default::default()
        };
        let (_, body) = call(
            s,
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "max_tokens": 5}),
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }

    #[tokio::test]
    async fn embeddings_are_deterministic_unit_vectors() {
        let (_, a) = call(
            SimSettings::default(),
            "/v1/embeddings",
            json!({"model": "e", "input": ["a", "b"], "dimensions": 8}),
        )
        .await;
        let (_, b) = call(
            SimSettings::default(),
            "/v1/embeddings",
            json!({"model": "e", "input": ["a", "b"], "dimensions": 8}),
        )
        .await;
        assert_eq!(a, b);
        let v: Value = serde_json::from_str(&a).unwrap();
        let e: Vec<f64> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(e.len(), 8);
        assert!((e.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
    }

    #[tokio::test]
    async fn errors_at_the_configured_rate() {
        let s = SimSettings {
            error_rate: 1.0,
            error_status: 429,
            ..Default::default()
        };
        let (status, body) = call(
            s,
            "/v1/chat/completions",
            json!({"model": "m", "messages": []}),
        )
        .await;
        assert_eq!(status, 429);
        assert!(body.contains("simulated upstream failure"));
    }
}

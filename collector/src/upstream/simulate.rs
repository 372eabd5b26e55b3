//! A simulated OpenAI-compatible upstream: chat completions (streamed and
//! not), legacy completions, embeddings with deterministic vectors, models.
//!
//! `tollgate simulate` serves [`router`] on a socket; the `simulated`
//! upstream kind calls the very same router in-process. Its knobs reproduce
//! what real providers do to a gateway: slow first bytes, slow tokens,
//! errors, usage in the last chunk or in every chunk or not at all,
//! DeepSeek-style cache fields, and streams that break half-way.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};

/// How the simulator behaves; shared by the CLI and the `simulated` kind.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSettings {
    /// Delay before the first byte of a response.
    pub latency_ms: u64,
    /// Generation speed; 0 = as fast as possible.
    pub tokens_per_s: f64,
    /// Output tokens per completion (before `max_tokens` caps it),
    /// reasoning included.
    pub output_tokens: u32,
    /// How many of the output tokens are `reasoning_content`.
    pub reasoning_tokens: u32,
    /// Prompt tokens reported as served from the provider's cache.
    pub cached_tokens: u32,
    /// Share of requests answered with `error_status`.
    pub error_rate: f64,
    pub error_status: u16,
    /// Report usage (and honour `stream_options.include_usage`).
    pub usage: bool,
    /// Streamed usage in every chunk, cumulative, instead of only at the end.
    pub usage_every_chunk: bool,
    pub usage_style: UsageStyle,
    /// Break the stream (abort the connection) after this many chunks.
    pub fail_after_chunks: Option<u32>,
    /// When set, requests must carry `Authorization: Bearer <this>`.
    pub require_api_key: Option<String>,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            tokens_per_s: 0.0,
            output_tokens: 64,
            reasoning_tokens: 0,
            cached_tokens: 0,
            error_rate: 0.0,
            error_status: 503,
            usage: true,
            usage_every_chunk: false,
            usage_style: UsageStyle::OpenAi,
            fail_after_chunks: None,
            require_api_key: None,
        }
    }
}

impl SimSettings {
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate must be within 0..=1, not {}",
                self.error_rate
            ));
        }
        if !(self.tokens_per_s >= 0.0 && self.tokens_per_s.is_finite()) {
            return Err(format!(
                "tokens_per_s must be >= 0, not {}",
                self.tokens_per_s
            ));
        }
        if StatusCode::from_u16(self.error_status).is_err() || self.error_status < 400 {
            return Err(format!(
                "error_status must be an HTTP error status, not {}",
                self.error_status
            ));
        }
        if self.reasoning_tokens > self.output_tokens {
            return Err("reasoning_tokens cannot exceed output_tokens".into());
        }
        Ok(())
    }
}

/// The shape of the usage object the simulator reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageStyle {
    /// `prompt_tokens_details.cached_tokens`.
    OpenAi,
    /// `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`.
    DeepSeek,
    /// Every count an explicit zero, as some self-hosted servers report.
    Zeros,
}

impl FromStr for UsageStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "openai" => Ok(UsageStyle::OpenAi),
            "deepseek" => Ok(UsageStyle::DeepSeek),
            "zeros" => Ok(UsageStyle::Zeros),
            other => Err(format!(
                "usage_style must be \"openai\", \"deepseek\" or \"zeros\", not {other:?}"
            )),
        }
    }
}

struct Sim {
    settings: SimSettings,
    counter: AtomicU64,
}

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
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sim)
}

const WORDS: [&str; 16] = [
    " the", " gateway", " routes", " every", " request", " and", " counts", " each", " token",
    " to", " the", " cent", " 成本", " finance", " trusts", " it",
];

#[derive(Deserialize)]
struct ChatBody {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct EmbeddingBody {
    model: Option<String>,
    input: Value,
    dimensions: Option<usize>,
}

/// A cheap, deterministic prompt-size estimate: a token per 4 bytes of text.
fn text_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => (s.len() as u64).div_ceil(4),
        Value::Array(items) => items.iter().map(text_tokens).sum(),
        Value::Object(o) => o.get("text").map(text_tokens).unwrap_or(0),
        _ => 0,
    }
}

/// One request's plan: what to generate and how to report it.
struct Plan {
    id: String,
    created: u64,
    model_json: String,
    prompt_tokens: u64,
    output: u64,
    reasoning: u64,
    finish: &'static str,
    usage: bool,
}

impl Sim {
    fn check_auth(&self, headers: &HeaderMap) -> Option<Response> {
        let want = self.settings.require_api_key.as_ref()?;
        let got = tollgate_schemas::credential::presented(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            headers.get("x-api-key").map(|v| v.as_bytes()),
        );
        if got == Ok(want.as_bytes()) {
            None
        } else {
            Some(error(
                StatusCode::UNAUTHORIZED,
                "invalid api key",
                "authentication_error",
            ))
        }
    }

    fn roll_error(&self) -> Option<Response> {
        let s = &self.settings;
        if s.error_rate > 0.0 && fastrand::f64() < s.error_rate {
            let status =
                StatusCode::from_u16(s.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Some(error(status, "simulated upstream failure", "server_error"));
        }
        None
    }

    fn plan(
        &self,
        model: Option<&str>,
        prompt_tokens: u64,
        max_tokens: Option<u64>,
        usage: bool,
    ) -> Plan {
        let s = &self.settings;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let wanted = u64::from(s.output_tokens);
        let output = max_tokens.map_or(wanted, |m| wanted.min(m));
        let reasoning = u64::from(s.reasoning_tokens).min(output);
        Plan {
            id: format!("sim-{n}"),
            created: chrono::Utc::now().timestamp().max(0) as u64,
            model_json: serde_json::to_string(model.unwrap_or("simulated"))
                .unwrap_or_else(|_| "\"simulated\"".into()),
            prompt_tokens: prompt_tokens.max(1),
            output,
            reasoning,
            finish: if output < wanted { "length" } else { "stop" },
            usage,
        }
    }

    fn usage_json(&self, p: &Plan, completion: u64) -> String {
        let cached = u64::from(self.settings.cached_tokens).min(p.prompt_tokens);
        let reasoning = p.reasoning.min(completion);
        let total = p.prompt_tokens + completion;
        match self.settings.usage_style {
            UsageStyle::OpenAi => format!(
                "{{\"prompt_tokens\":{},\"completion_tokens\":{completion},\"total_tokens\":{total},\
                 \"prompt_tokens_details\":{{\"cached_tokens\":{cached}}},\
                 \"completion_tokens_details\":{{\"reasoning_tokens\":{reasoning}}}}}",
                p.prompt_tokens
            ),
            UsageStyle::DeepSeek => format!(
                "{{\"prompt_tokens\":{},\"completion_tokens\":{completion},\"total_tokens\":{total},\
                 \"prompt_cache_hit_tokens\":{cached},\"prompt_cache_miss_tokens\":{},\
                 \"completion_tokens_details\":{{\"reasoning_tokens\":{reasoning}}}}}",
                p.prompt_tokens,
                p.prompt_tokens - cached
            ),
            UsageStyle::Zeros => {
                "{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}".to_string()
            }
        }
    }

    async fn wait_first_byte(&self) {
        if self.settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.settings.latency_ms)).await;
        }
    }

    fn token_gap(&self) -> Option<Duration> {
        (self.settings.tokens_per_s > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.settings.tokens_per_s))
    }
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("invalid request body: {e}"),
            "invalid_request_error",
        ))
    })
}

async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = sim.check_auth(&headers) {
        return r;
    }
    let req: ChatBody = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if let Some(r) = sim.roll_error() {
        sim.wait_first_byte().await;
        return r;
    }
    let prompt: u64 = req
        .messages
        .iter()
        .map(|m| text_tokens(&m.content) + 4)
        .sum::<u64>()
        + 3;
    let max = req.max_completion_tokens.or(req.max_tokens);
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let report = sim.settings.usage && (!req.stream || include_usage);
    let plan = sim.plan(req.model.as_deref(), prompt, max, report);
    sim.wait_first_byte().await;
    if req.stream {
        return stream_response(sim, plan, Kind::Chat);
    }
    if let Some(gap) = sim.token_gap() {
        tokio::time::sleep(gap * plan.output as u32).await;
    }
    let mut reasoning = String::new();
    let mut content = String::new();
    for i in 0..plan.output {
        let w = WORDS[(i % WORDS.len() as u64) as usize];
        if i < plan.reasoning {
            reasoning.push_str(w)
        } else {
            content.push_str(w)
        }
    }
    let mut message = json!({"role": "assistant", "content": content});
    if plan.reasoning > 0 {
        message["reasoning_content"] = Value::String(reasoning);
    }
    let mut out = json!({
        "id": format!("chatcmpl-{}", plan.id),
        "object": "chat.completion",
        "created": plan.created,
        "model": serde_json::from_str::<Value>(&plan.model_json).unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish}],
    });
    if plan.usage {
        out["usage"] =
            serde_json::from_str(&sim.usage_json(&plan, plan.output)).unwrap_or(Value::Null);
    }
    axum::Json(out).into_response()
}

async fn completions(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = sim.check_auth(&headers) {
        return r;
    }
    let req: CompletionBody = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if let Some(r) = sim.roll_error() {
        sim.wait_first_byte().await;
        return r;
    }
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let report = sim.settings.usage && (!req.stream || include_usage);
    let mut plan = sim.plan(
        req.model.as_deref(),
        text_tokens(&req.prompt),
        req.max_tokens,
        report,
    );
    plan.reasoning = 0;
    sim.wait_first_byte().await;
    if req.stream {
        return stream_response(sim, plan, Kind::Completion);
    }
    if let Some(gap) = sim.token_gap() {
        tokio::time::sleep(gap * plan.output as u32).await;
    }
    let text: String = (0..plan.output)
        .map(|i| WORDS[(i % WORDS.len() as u64) as usize])
        .collect();
    let mut out = json!({
        "id": format!("cmpl-{}", plan.id),
        "object": "text_completion",
        "created": plan.created,
        "model": serde_json::from_str::<Value>(&plan.model_json).unwrap_or(Value::Null),
        "choices": [{"index": 0, "text": text, "finish_reason": plan.finish, "logprobs": null}],
    });
    if plan.usage {
        out["usage"] =
            serde_json::from_str(&sim.usage_json(&plan, plan.output)).unwrap_or(Value::Null);
    }
    axum::Json(out).into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// Streams one chunk per token, then the finish chunk, the usage chunk when
/// asked for, and `[DONE]`.
fn stream_response(sim: Arc<Sim>, plan: Plan, kind: Kind) -> Response {
    let gap = sim.token_gap();
    let fail_after = sim.settings.fail_after_chunks.map(u64::from);
    let every = sim.settings.usage_every_chunk && plan.usage;
    // Step n: 0..output = tokens, output = finish, output+1 = usage, then DONE.
    let state = (sim, plan, 0u64);
    let body = stream::unfold(state, move |(sim, plan, n)| async move {
        if fail_after.is_some_and(|f| n >= f) {
            // Let what was sent reach the wire before the connection drops,
            // as with a real upstream that dies mid-generation.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let err = std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated stream failure",
            );
            return Some((Err(err), (sim, plan, u64::MAX)));
        }
        if n == u64::MAX {
            return None;
        }
        let mut out = String::with_capacity(256);
        let head = |out: &mut String| {
            let (prefix, object) = match kind {
                Kind::Chat => ("chatcmpl", "chat.completion.chunk"),
                Kind::Completion => ("cmpl", "text_completion"),
            };
            let _ = write!(
                out,
                "data: {{\"id\":\"{prefix}-{}\",\"object\":\"{object}\",\"created\":{},\"model\":{},\"choices\":",
                plan.id, plan.created, plan.model_json
            );
        };
        let next = if n < plan.output {
            if n > 0
                && let Some(gap) = gap
            {
                tokio::time::sleep(gap).await;
            }
            let w = WORDS[(n % WORDS.len() as u64) as usize];
            head(&mut out);
            match kind {
                Kind::Chat if n < plan.reasoning => {
                    let role = if n == 0 {
                        "\"role\":\"assistant\",\"content\":null,"
                    } else {
                        ""
                    };
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"delta\":{{{role}\"reasoning_content\":\"{w}\"}},\"finish_reason\":null}}]"
                    );
                }
                Kind::Chat => {
                    let role = if n == 0 {
                        "\"role\":\"assistant\","
                    } else {
                        ""
                    };
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"delta\":{{{role}\"content\":\"{w}\"}},\"finish_reason\":null}}]"
                    );
                }
                Kind::Completion => {
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"text\":\"{w}\",\"finish_reason\":null}}]"
                    );
                }
            }
            if every {
                let _ = write!(out, ",\"usage\":{}", sim.usage_json(&plan, n + 1));
            }
            out.push_str("}\n\n");
            n + 1
        } else if n == plan.output {
            head(&mut out);
            match kind {
                Kind::Chat => {
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{}\"}}]",
                        plan.finish
                    );
                }
                Kind::Completion => {
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"text\":\"\",\"finish_reason\":\"{}\"}}]",
                        plan.finish
                    );
                }
            }
            if every {
                let _ = write!(out, ",\"usage\":{}", sim.usage_json(&plan, plan.output));
            }
            out.push_str("}\n\n");
            if plan.usage { n + 1 } else { n + 2 }
        } else if n == plan.output + 1 {
            head(&mut out);
            let _ = write!(
                out,
                "[],\"usage\":{}}}\n\n",
                sim.usage_json(&plan, plan.output)
            );
            n + 1
        } else if n == plan.output + 2 {
            out.push_str("data: [DONE]\n\n");
            u64::MAX
        } else {
            return None;
        };
        Some((Ok(Bytes::from(out)), (sim, plan, next)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "response build failed",
                "server_error",
            )
        })
}

async fn embeddings(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = sim.check_auth(&headers) {
        return r;
    }
    let req: EmbeddingBody = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if let Some(r) = sim.roll_error() {
        sim.wait_first_byte().await;
        return r;
    }
    sim.wait_first_byte().await;
    let inputs: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect(),
        other => vec![other.to_string()],
    };
    let dims = req.dimensions.unwrap_or(64).clamp(1, 4096);
    let mut prompt = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            prompt += (text.len() as u64).div_ceil(4).max(1);
            json!({"object": "embedding", "index": i, "embedding": embed(text, dims)})
        })
        .collect();
    let mut out = json!({
        "object": "list",
        "data": data,
        "model": req.model.unwrap_or_else(|| "simulated".into()),
    });
    if sim.settings.usage {
        out["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
    }
    axum::Json(out).into_response()
}

/// A unit vector that depends only on the text (FNV-1a seeded xorshift).
pub fn embed(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

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

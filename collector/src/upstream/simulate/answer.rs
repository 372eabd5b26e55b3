//! What one request gets: authentication and injected errors, the plan
//! (id, token counts, finish reason), whole chat and completion bodies,
//! and embeddings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::settings::{SimSettings, UsageStyle};
use super::stream::{Kind, stream_response};

pub(super) struct Sim {
    pub(super) settings: SimSettings,
    pub(super) counter: AtomicU64,
}

pub(super) const WORDS: [&str; 16] = [
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
pub(super) struct Plan {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model_json: String,
    pub(super) prompt_tokens: u64,
    pub(super) output: u64,
    pub(super) reasoning: u64,
    pub(super) finish: &'static str,
    pub(super) usage: bool,
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

    pub(super) fn usage_json(&self, p: &Plan, completion: u64) -> String {
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

    pub(super) async fn wait_first_byte(&self) {
        if self.settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.settings.latency_ms)).await;
        }
    }

    pub(super) fn token_gap(&self) -> Option<Duration> {
        (self.settings.tokens_per_s > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.settings.tokens_per_s))
    }
}

pub(super) fn error(status: StatusCode, message: &str, kind: &str) -> Response {
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

pub(super) async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
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

pub(super) async fn completions(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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

pub(super) async fn embeddings(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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

//! What one request gets: whole chat and completion bodies (or, when
//! asked, the stream), and embeddings.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::plan::{Sim, error};
use super::stream::{Kind, stream_response};
use crate::ledger::tokens;

#[derive(Deserialize)]
struct ChatBody {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    prompt: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
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
    // Counted as OpenAI counts (tiktoken and its chat framing), so that an
    // estimate made before the call can equal what the upstream reports.
    let prompt = tokens::input(&body);
    let max = req.max_completion_tokens.or(req.max_tokens);
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let report = sim.settings.usage && (!req.stream || include_usage);
    let mut plan = sim.plan(req.model.as_deref(), prompt, max, report);
    let last_user = (req.messages.iter().rev())
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str());
    plan.follow(last_user, max);
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
        let w = plan.word(i);
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
        tokens::input(&body),
        req.max_tokens,
        report,
    );
    plan.reasoning = 0;
    plan.follow(req.prompt.as_ref().and_then(Value::as_str), req.max_tokens);
    sim.wait_first_byte().await;
    if req.stream {
        return stream_response(sim, plan, Kind::Completion);
    }
    if let Some(gap) = sim.token_gap() {
        tokio::time::sleep(gap * plan.output as u32).await;
    }
    let text: String = (0..plan.output).map(|i| plan.word(i)).collect();
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
    let prompt = tokens::input(&body).max(1);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(text, dims)}))
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

/// A unit vector that depends only on the text, and that is close for
/// texts sharing most of their words: the sum of one pseudo-random vector
/// per word (lower-cased, letters and digits; FNV-1a seeded xorshift),
/// normalised. Texts with the same words in any order embed alike; a
/// text without words gets the vector of its whole bytes.
pub fn embed(text: &str, dims: usize) -> Vec<f32> {
    let lower = text.to_lowercase();
    let mut words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        words.push(&lower);
    }
    let mut v = vec![0f32; dims];
    for w in words {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in w.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        for x in v.iter_mut() {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            *x += ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        }
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

#[derive(Deserialize)]
struct ModerationBody {
    input: Value,
}

/// Words the simulated moderation flags, with the category it names.
const FLAGGED: [(&str, &str); 2] = [("harmful", "violence"), ("hateful", "hate")];

/// OpenAI's `/v1/moderations`: one result per input, flagged when the
/// text holds one of [`FLAGGED`]'s words (any case).
pub(super) async fn moderations(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = sim.check_auth(&headers) {
        return r;
    }
    let req: ModerationBody = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    sim.wait_first_byte().await;
    if let Some(r) = sim.roll_error() {
        return r;
    }
    let inputs: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect(),
        other => vec![other.to_string()],
    };
    let results: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let lower = text.to_lowercase();
            let categories: serde_json::Map<String, Value> = FLAGGED
                .iter()
                .map(|(word, cat)| (cat.to_string(), Value::Bool(lower.contains(word))))
                .collect();
            let flagged = categories.values().any(|v| v == &Value::Bool(true));
            json!({"flagged": flagged, "categories": categories})
        })
        .collect();
    axum::Json(json!({"id": "modr-sim", "model": "simulated-moderation", "results": results}))
        .into_response()
}

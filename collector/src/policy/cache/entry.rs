//! A cached answer and its replay: the whole JSON answer as the client
//! got it, what it cost and who served it; replayed as that JSON (with a
//! fresh id) or as the event stream a streamed request would have got
//! (role chunk, content deltas, finish chunk, the usage chunk when asked
//! for, `[DONE]`).

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tollgate_schemas::{TokenSource, Tokens, Usd};

use crate::proxy::routing::Candidate;

/// One cached answer, stored as JSON (in Redis) or as is (in process).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The answer's JSON, the client's model name in it.
    pub body: String,
    pub served_model: String,
    pub provider: String,
    pub upstream: String,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub estimated: bool,
    /// What the original request cost, USD decimal; `None` when unpriced.
    pub cost_usd: Option<String>,
    /// When it was stored, Unix seconds.
    pub created: i64,
}

impl Entry {
    /// The answer `body` (as the client got it) that `candidate` gave for
    /// `tokens`, which cost `cost`.
    pub fn new(
        body: String,
        candidate: &Candidate,
        tokens: Tokens,
        estimated: bool,
        cost: Option<Usd>,
    ) -> Self {
        Self {
            body,
            served_model: candidate.model.clone(),
            provider: candidate.upstream.provider().to_string(),
            upstream: candidate.upstream.name().to_string(),
            input_tokens: tokens.input,
            cached_input_tokens: tokens.cached_input,
            output_tokens: tokens.output,
            reasoning_tokens: tokens.reasoning,
            estimated,
            cost_usd: cost.map(|c| c.to_string()),
            created: chrono::Utc::now().timestamp(),
        }
    }

    pub fn tokens(&self) -> Tokens {
        Tokens::new(
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_tokens,
        )
    }

    pub fn token_source(&self) -> TokenSource {
        if self.estimated {
            TokenSource::Estimated
        } else {
            TokenSource::Upstream
        }
    }

    pub fn cost(&self) -> Option<Usd> {
        self.cost_usd.as_deref().and_then(|c| c.parse().ok())
    }

    /// Whether the stored answer can be replayed at all.
    pub fn doc(&self) -> Option<Value> {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .filter(Value::is_object)
    }
}

/// The whole answer as stored, byte for byte (numbers are not re-read,
/// so an embedding's floats come back exactly), with a fresh `id` when it
/// has one, so two hits are two responses.
pub fn whole(body: &str, doc: &Value, id: &str) -> Bytes {
    let Some(old) = doc.get("id").and_then(Value::as_str) else {
        return Bytes::from(body.to_string());
    };
    let from = format!("\"id\":{}", Value::from(old));
    let to = format!("\"id\":{}", Value::from(id));
    Bytes::from(body.replacen(&from, &to, 1))
}

/// The answer as server-sent events, in the shape of the endpoint's
/// stream (`chat.completion.chunk` or `text_completion`).
pub fn events(doc: &Value, id: &str, include_usage: bool) -> Bytes {
    let chat = doc["object"] != "text_completion";
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let created = chrono::Utc::now().timestamp();
    let model = doc.get("model").cloned().unwrap_or(Value::Null);
    let mut out = BytesMut::new();
    let mut chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u.clone();
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(c.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    };
    let choices = doc["choices"].as_array().cloned().unwrap_or_default();
    for (i, c) in choices.iter().enumerate() {
        let index = c.get("index").cloned().unwrap_or(json!(i));
        if !chat {
            let text = c["text"].as_str().unwrap_or_default();
            chunk(
                json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]),
                None,
            );
            chunk(
                json!([{"index": index, "text": "", "logprobs": null, "finish_reason": c["finish_reason"]}]),
                None,
            );
            continue;
        }
        let m = &c["message"];
        let role = m["role"].as_str().unwrap_or("assistant");
        chunk(
            json!([{"index": index, "delta": {"role": role, "content": ""}, "finish_reason": null}]),
            None,
        );
        if let Some(r) = m["reasoning_content"].as_str().filter(|r| !r.is_empty()) {
            chunk(
                json!([{"index": index, "delta": {"reasoning_content": r}, "finish_reason": null}]),
                None,
            );
        }
        if let Some(r) = m["refusal"].as_str().filter(|r| !r.is_empty()) {
            chunk(
                json!([{"index": index, "delta": {"refusal": r}, "finish_reason": null}]),
                None,
            );
        }
        if let Some(t) = m["content"].as_str().filter(|t| !t.is_empty()) {
            chunk(
                json!([{"index": index, "delta": {"content": t}, "finish_reason": null}]),
                None,
            );
        }
        if let Some(calls) = m["tool_calls"].as_array() {
            let deltas: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(j, call)| {
                    let mut d = call.clone();
                    d["index"] = json!(j);
                    d
                })
                .collect();
            chunk(
                json!([{"index": index, "delta": {"tool_calls": deltas}, "finish_reason": null}]),
                None,
            );
        }
        chunk(
            json!([{"index": index, "delta": {}, "finish_reason": c["finish_reason"]}]),
            None,
        );
    }
    if include_usage && let Some(u) = doc.get("usage").filter(|u| u.is_object()) {
        chunk(json!([]), Some(u));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out.freeze()
}

/// OpenAI's `usage` object for `tokens`.
pub fn usage_json(t: &Tokens) -> Value {
    json!({
        "prompt_tokens": t.input,
        "completion_tokens": t.output,
        "total_tokens": t.input + t.output,
        "prompt_tokens_details": {"cached_tokens": t.cached_input},
        "completion_tokens_details": {"reasoning_tokens": t.reasoning},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sse: &Bytes) -> (String, Vec<Value>) {
        let s = std::str::from_utf8(sse).unwrap();
        let mut text = String::new();
        let mut chunks = Vec::new();
        for data in s.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            for c in v["choices"].as_array().unwrap() {
                text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                text.push_str(c["text"].as_str().unwrap_or(""));
            }
            chunks.push(v);
        }
        (text, chunks)
    }

    #[test]
    fn a_chat_answer_replays_as_role_content_finish_usage_and_done() {
        let doc = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "qwq-32b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "the answer"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}});
        let sse = events(&doc, "chatcmpl-hit", true);
        assert!(sse.ends_with(b"data: [DONE]\n\n"));
        let (text, chunks) = texts(&sse);
        assert_eq!(text, "the answer");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[3]["usage"]["total_tokens"], 7);
        assert_eq!(chunks[3]["choices"], json!([]));
        let (_, without) = texts(&events(&doc, "id", false));
        assert_eq!(without.len(), 3, "no usage chunk unless asked for");
    }

    #[test]
    fn a_whole_replay_keeps_every_byte_but_the_id() {
        let body = r#"{"id":"chatcmpl-1","object":"list","data":[{"embedding":[0.12072098255157471,1e-7]}]}"#;
        let doc: Value = serde_json::from_str(body).unwrap();
        let out = whole(body, &doc, "chatcmpl-2");
        assert_eq!(out, body.replace("chatcmpl-1", "chatcmpl-2"));
        let no_id = r#"{"object":"list","data":[]}"#;
        assert_eq!(
            whole(no_id, &serde_json::from_str(no_id).unwrap(), "x"),
            no_id
        );
    }

    #[test]
    fn a_completion_replays_as_text_chunks() {
        let doc = json!({"id": "x", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": "abc", "finish_reason": "length"}]});
        let (text, chunks) = texts(&events(&doc, "cmpl-hit", false));
        assert_eq!(text, "abc");
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[0]["object"], "text_completion");
    }
}

//! Filling the cache from a streamed miss: the events the client got are
//! folded into the whole answer they add up to, stored only once the
//! stream ends normally (`[DONE]`, no error). A stream whose deltas carry
//! more than text (tool calls, refusals, audio) is not stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tollgate_schemas::{Tokens, Usd};

use crate::policy::cache::entry::{Entry, usage_json};
use crate::policy::cache::{Cache, Pending};
use crate::proxy::routing::Candidate;
use crate::relay::sse;

/// Longest event folded, bytes.
const MAX_EVENT_BYTES: usize = 8 << 20;

/// A streamed miss on its way into the cache.
pub struct StreamFill {
    cache: Arc<Cache>,
    pending: Pending,
    parser: sse::Parser,
    id: Option<Value>,
    model: Option<Value>,
    completion: bool,
    choices: BTreeMap<u64, Folded>,
    bytes: usize,
    /// The upstream's own usage object, as its last usage chunk said it.
    usage: Option<Value>,
    /// Something the fold cannot replay: the stream is not stored.
    spoiled: bool,
}

#[derive(Default)]
struct Folded {
    content: String,
    reasoning: String,
    finish: Value,
}

impl StreamFill {
    pub fn new(cache: Arc<Cache>, pending: Pending) -> Self {
        Self {
            cache,
            pending,
            parser: sse::Parser::new(MAX_EVENT_BYTES),
            id: None,
            model: None,
            completion: false,
            choices: BTreeMap::new(),
            bytes: 0,
            usage: None,
            spoiled: false,
        }
    }

    /// Folds whole events the client got.
    pub fn observe(&mut self, bytes: &[u8]) {
        if self.spoiled {
            return;
        }
        self.bytes += bytes.len();
        if self.bytes > self.pending.max_entry_bytes {
            self.spoil();
            return;
        }
        self.parser.push(bytes);
        while let Ok(Some(ev)) = self.parser.next_event() {
            let Some(data) = ev.data.as_deref() else {
                continue;
            };
            if data.trim_ascii() == b"[DONE]" {
                continue;
            }
            match serde_json::from_slice::<Value>(data) {
                Ok(Value::Object(doc)) => self.fold(&doc),
                _ => self.spoil(),
            }
        }
    }

    /// An event the client does not get (the usage chunk the gateway asked
    /// for on its behalf): only its usage is kept.
    pub fn usage_of(&mut self, data: &[u8]) {
        if self.spoiled || memchr::memmem::find(data, b"\"usage\"").is_none() {
            return;
        }
        if let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(data)
            && let Some(u) = doc.get("usage").filter(|u| u.is_object())
        {
            self.usage = Some(u.clone());
        }
    }

    fn spoil(&mut self) {
        self.spoiled = true;
        self.choices.clear();
    }

    fn fold(&mut self, doc: &Map<String, Value>) {
        if self.id.is_none() {
            self.id = doc.get("id").cloned();
            self.model = doc.get("model").cloned();
            self.completion = doc.get("object").and_then(Value::as_str) == Some("text_completion");
        }
        if let Some(u) = doc.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choices) = doc.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = self.choices.entry(index).or_default();
            if let Some(t) = c.get("text").and_then(Value::as_str) {
                f.content.push_str(t);
            }
            if let Some(Value::Object(delta)) = c.get("delta") {
                for (k, v) in delta {
                    match (k.as_str(), v) {
                        ("content", Value::String(t)) => f.content.push_str(t),
                        ("reasoning_content", Value::String(t)) => f.reasoning.push_str(t),
                        ("role" | "content" | "reasoning_content", _) => {}
                        (_, Value::Null) => {}
                        _ => {
                            self.spoiled = true;
                        }
                    }
                }
            }
            if let Some(reason) = c.get("finish_reason").filter(|r| !r.is_null()) {
                f.finish = reason.clone();
            }
        }
    }

    /// The stream ended normally: stores the answer it added up to, with
    /// the usage and cost the ledger settled.
    pub fn finish(self, candidate: &Candidate, tokens: Tokens, estimated: bool, cost: Option<Usd>) {
        if self.spoiled || self.choices.is_empty() {
            return;
        }
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, f)| {
                if self.completion {
                    json!({"index": index, "text": f.content, "logprobs": null, "finish_reason": f.finish})
                } else {
                    let mut message = json!({"role": "assistant", "content": f.content});
                    if !f.reasoning.is_empty() {
                        message["reasoning_content"] = Value::String(f.reasoning);
                    }
                    json!({"index": index, "message": message, "finish_reason": f.finish})
                }
            })
            .collect();
        let object = if self.completion {
            "text_completion"
        } else {
            "chat.completion"
        };
        let body = json!({
            "id": self.id.unwrap_or(Value::Null),
            "object": object,
            "created": chrono::Utc::now().timestamp(),
            "model": self.model.unwrap_or(Value::Null),
            "choices": choices,
            "usage": self.usage.unwrap_or_else(|| usage_json(&tokens)),
        });
        let entry = Entry::new(body.to_string(), candidate, tokens, estimated, cost);
        self.cache.store(self.pending, entry);
    }
}

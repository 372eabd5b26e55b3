//! Token counting for upstreams that report no usage.
//!
//! Counts use tiktoken's `cl100k_base`; for models with other tokenizers
//! (DeepSeek, Qwen) the figure is an estimate, which is why such events say
//! `token_source = "estimated"`. The tokenizer loads on first use only, so a
//! gateway whose upstreams all report usage never pays for it.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

/// What a request asked for, as far as an estimate needs it.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The client's request body.
    pub body: Bytes,
    /// `max_completion_tokens` or `max_tokens`: the cap on each choice.
    pub max_tokens: Option<u64>,
}

fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::cl100k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// Prompt texts kept counted; past it the memory starts over.
const COUNTED_TEXTS: usize = 65_536;

/// Prompt texts repeat (system prompts, a conversation resent with every
/// turn) and tokenizing is most of an estimate's cost, so counts are kept
/// by a SipHash of the text under a per-process random key (a client
/// cannot aim a collision at another text's count).
static COUNTED: std::sync::LazyLock<(
    std::hash::RandomState,
    std::sync::Mutex<std::collections::HashMap<u64, u32>>,
)> = std::sync::LazyLock::new(Default::default);

fn prompt_count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let (key, counted) = &*COUNTED;
    let hash = std::hash::BuildHasher::hash_one(key, text);
    if let Some(n) = counted.lock().ok().and_then(|m| m.get(&hash).copied()) {
        return u64::from(n);
    }
    let n = count(text);
    if let Ok(mut m) = counted.lock() {
        if m.len() >= COUNTED_TEXTS {
            m.clear();
        }
        m.insert(hash, u32::try_from(n).unwrap_or(u32::MAX));
    }
    n
}

/// Output tokens of generated `text`, capped by the request's `max_tokens`
/// (an upstream cannot have generated more than it was allowed to).
pub fn output(text: &str, max_tokens: Option<u64>) -> u64 {
    let n = count(text);
    max_tokens.map_or(n, |m| n.min(m))
}

#[derive(Deserialize)]
struct PromptView {
    #[serde(default)]
    messages: Vec<MessageView>,
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize)]
struct MessageView {
    #[serde(default)]
    role: Value,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    name: Value,
}

/// Input tokens of a request body, by OpenAI's published chat formula:
/// each message costs its text plus 3 tokens of framing, and the reply is
/// primed with 3 more.
pub fn input(body: &[u8]) -> u64 {
    let Ok(view) = serde_json::from_slice::<PromptView>(body) else {
        return 0;
    };
    let mut n = 0;
    if !view.messages.is_empty() {
        n += 3;
        for m in &view.messages {
            n += 3 + text_of(&m.role) + text_of(&m.content);
            if !m.name.is_null() {
                n += 1 + text_of(&m.name);
            }
        }
    }
    n + text_of(&view.prompt) + text_of(&view.input)
}

/// [`input`] of a body already parsed (the same count, without parsing
/// the request again).
pub fn input_of(body: &serde_json::Map<String, Value>) -> u64 {
    let mut n = 0;
    if let Some(Value::Array(messages)) = body.get("messages")
        && !messages.is_empty()
    {
        n += 3;
        for m in messages {
            let field = |k: &str| m.get(k).unwrap_or(&Value::Null);
            n += 3 + text_of(field("role")) + text_of(field("content"));
            if !field("name").is_null() {
                n += 1 + text_of(field("name"));
            }
        }
    }
    let field = |k: &str| body.get(k).unwrap_or(&Value::Null);
    n + text_of(field("prompt")) + text_of(field("input"))
}

fn text_of(v: &Value) -> u64 {
    match v {
        Value::String(s) => prompt_count(s),
        Value::Array(items) => items.iter().map(text_of).sum(),
        Value::Object(o) => o.get("text").map(text_of).unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_tiktoken_counts() {
        assert_eq!(output("", None), 0);
        assert_eq!(output("hello world", None), 2);
        assert_eq!(output(" the gateway routes every request", Some(3)), 3);
    }

    #[test]
    fn chat_input_follows_the_framing_formula() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#;
        // 3 priming + 3 framing + "user" (1) + "hello world" (2)
        assert_eq!(input(body), 9);
        let parts =
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hello world"}]}]}"#;
        assert_eq!(input(parts), 9);
        assert_eq!(input(br#"{"prompt":"hello world"}"#), 2);
        assert_eq!(input(br#"{"input":["hello","world"]}"#), 2);
        assert_eq!(input(b"not json"), 0);
        for body in [
            &body[..],
            parts,
            br#"{"prompt":["a b","c"]}"#,
            br#"{"messages":[{"role":"user","content":"x","name":"bob"}]}"#,
        ] {
            let map: serde_json::Map<String, Value> = serde_json::from_slice(body).unwrap();
            assert_eq!(
                input_of(&map),
                input(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}

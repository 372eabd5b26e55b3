//! Screening a whole (non-streamed) answer: its choices' content,
//! reasoning, completion text and tool-call arguments, by the detectors,
//! deny lists and moderation upstreams of the output rules. Streams go
//! through [`crate::policy::screen::holdback`].

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::policy::screen::input::{Blocked, blocks, mask_hits, mask_pieces, moderate_and_log};
use crate::policy::screen::rules::{Counters, Direction, Rule};

/// Screens a whole answer (`choices[].message` or `choices[].text`).
/// `Ok(Some(body))` when a mask rewrote it.
pub async fn screen_answer(
    rules: &[Arc<Rule>],
    counters: &Counters,
    body: &Bytes,
) -> Result<Option<Bytes>, Blocked> {
    let Ok(mut doc) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let dir = Direction::Output;
    let mut texts = answer_texts(&mut doc);
    let masks = {
        let all: Vec<&str> = texts.iter().map(|t| t.as_str()).collect();
        blocks(rules, counters, dir, &all)?;
        mask_hits(rules, counters, dir, &all)
    };
    let masked = masks.iter().any(|m| !m.is_empty());
    for (text, hits) in texts.iter_mut().zip(masks) {
        mask_pieces(&mut [&mut **text], &hits);
    }
    let all: Vec<&str> = texts.iter().map(|t| t.as_str()).collect();
    moderate_and_log(rules, counters, dir, &all).await?;
    Ok(masked.then(|| Bytes::from(doc.to_string())))
}

fn answer_texts(doc: &mut Value) -> Vec<&mut String> {
    let mut out = Vec::new();
    let Some(Value::Array(choices)) = doc.get_mut("choices") else {
        return out;
    };
    for c in choices.iter_mut().filter_map(Value::as_object_mut) {
        for (key, v) in c.iter_mut() {
            match (key.as_str(), v) {
                ("text", Value::String(t)) => out.push(t),
                ("message", Value::Object(m)) => {
                    for (k, v) in m.iter_mut() {
                        match (k.as_str(), v) {
                            ("content" | "reasoning_content" | "refusal", Value::String(t)) => {
                                out.push(t)
                            }
                            ("function_call", Value::Object(f)) => {
                                if let Some(Value::String(a)) = f.get_mut("arguments") {
                                    out.push(a);
                                }
                            }
                            ("tool_calls", Value::Array(calls)) => {
                                for call in calls {
                                    if let Some(Value::String(a)) = call
                                        .get_mut("function")
                                        .and_then(|f| f.get_mut("arguments"))
                                    {
                                        out.push(a);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

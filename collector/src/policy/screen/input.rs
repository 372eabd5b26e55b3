//! Screening a request before it goes upstream. The texts a model reads
//! are gathered in groups, each checked as one text: a message's content
//! (its string, or its text parts joined, so a secret split across parts
//! is still one), each tool call's and legacy `function_call`'s
//! arguments, each tool's description, `prediction` content, each
//! `prompt` and `suffix` of a completion, each embeddings `input`. Block
//! rules look first, at the text as the client sent it, then masks
//! rewrite the body in place, then the moderation upstreams and the log
//! rules read what goes upstream.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::GuardAction;
use crate::observe::names::Name;
use crate::policy::screen::moderation::Moderated;
use crate::policy::screen::rules::{Counters, Direction, Hit, Rule};
use crate::upstream::Endpoint;

/// Which rule stopped the text, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rule: Name,
    pub direction: Direction,
    pub why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A detector, keyword or pattern matched, or moderation flagged it.
    Matched,
    /// The moderation service did not answer and the rule fails closed.
    Unanswered,
    /// A streamed event the guard cannot read: it fails closed.
    Unreadable,
}

/// Screens the request `body` of `endpoint` with `rules` (those that
/// apply to it, for input). `Ok(true)` when a mask rewrote the body.
pub async fn screen(
    rules: &[Arc<Rule>],
    counters: &Counters,
    endpoint: Endpoint,
    body: &mut Map<String, Value>,
) -> Result<bool, Blocked> {
    let dir = Direction::Input;
    let mut groups = groups_mut(endpoint, body);
    let masks = {
        let joined: Vec<Cow<str>> = groups.iter().map(|g| join(g)).collect();
        let texts: Vec<&str> = joined.iter().map(|t| t.as_ref()).collect();
        blocks(rules, counters, dir, &texts)?;
        mask_hits(rules, counters, dir, &texts)
    };
    let masked = masks.iter().any(|m| !m.is_empty());
    for (group, hits) in groups.iter_mut().zip(masks) {
        mask_pieces(group, &hits);
    }
    // The moderation upstream is a third party too: it reads the text as
    // it goes upstream, masks applied.
    let joined: Vec<Cow<str>> = groups.iter().map(|g| join(g)).collect();
    let texts: Vec<&str> = joined.iter().map(|t| t.as_ref()).collect();
    moderate_and_log(rules, counters, dir, &texts).await?;
    Ok(masked)
}

/// The first block rule that matches.
pub fn blocks(
    rules: &[Arc<Rule>],
    counters: &Counters,
    dir: Direction,
    texts: &[&str],
) -> Result<(), Blocked> {
    for rule in rules
        .iter()
        .filter(|r| r.action == GuardAction::Block && r.scans())
    {
        if let Some(what) = texts
            .iter()
            .find_map(|t| rule.find(t).first().map(|h| h.what))
        {
            counters.matched(rule, dir, GuardAction::Block);
            tracing::info!(rule = %rule.name, direction = dir.as_str(), what, "content guard blocked");
            return Err(Blocked {
                rule: rule.name.clone(),
                direction: dir,
                why: Why::Matched,
            });
        }
    }
    Ok(())
}

/// The moderation upstreams, then log rules' matches.
pub async fn moderate_and_log(
    rules: &[Arc<Rule>],
    counters: &Counters,
    dir: Direction,
    texts: &[&str],
) -> Result<(), Blocked> {
    let blocked = |rule: &Rule, why| Blocked {
        rule: rule.name.clone(),
        direction: dir,
        why,
    };
    for rule in rules {
        let Some(m) = &rule.moderation else { continue };
        let all: Vec<&str> = texts
            .iter()
            .copied()
            .filter(|t| !t.trim().is_empty())
            .collect();
        if all.is_empty() {
            continue;
        }
        match m.check(&all).await {
            Moderated::Clean => {}
            Moderated::Flagged(categories) if rule.action == GuardAction::Log => {
                counters.matched(rule, dir, GuardAction::Log);
                tracing::info!(rule = %rule.name, direction = dir.as_str(), ?categories, "moderation flagged (logged only)");
            }
            Moderated::Flagged(categories) => {
                counters.matched(rule, dir, GuardAction::Block);
                tracing::info!(rule = %rule.name, direction = dir.as_str(), ?categories, "moderation flagged: blocked");
                return Err(blocked(rule, Why::Matched));
            }
            Moderated::Failed(why) => {
                counters.moderation_failed(rule);
                tracing::warn!(rule = %rule.name, error = %why, fail_open = m.fail_open, "moderation upstream failed");
                if !m.fail_open {
                    return Err(blocked(rule, Why::Unanswered));
                }
            }
        }
    }
    for rule in rules
        .iter()
        .filter(|r| r.action == GuardAction::Log && r.scans())
    {
        if let Some(what) = texts
            .iter()
            .find_map(|t| rule.find(t).first().map(|h| h.what))
        {
            counters.matched(rule, dir, GuardAction::Log);
            tracing::info!(rule = %rule.name, direction = dir.as_str(), what, "content guard match (logged only)");
        }
    }
    Ok(())
}

/// Every mask rule's matches in each text, merged per text (counted once
/// per rule).
pub fn mask_hits(
    rules: &[Arc<Rule>],
    counters: &Counters,
    dir: Direction,
    texts: &[&str],
) -> Vec<Vec<Hit>> {
    let mut out: Vec<Vec<Hit>> = vec![Vec::new(); texts.len()];
    for rule in rules.iter().filter(|r| r.action == GuardAction::Mask) {
        let mut hit = false;
        for (t, text) in texts.iter().enumerate() {
            let hits = rule.find(text);
            hit |= !hits.is_empty();
            out[t].extend(hits);
        }
        if hit {
            counters.matched(rule, dir, GuardAction::Mask);
            tracing::info!(rule = %rule.name, direction = dir.as_str(), "content guard masked");
        }
    }
    for hits in &mut out {
        // The outermost first, so that it names a merged span.
        hits.sort_by_key(|h| (h.at.start, std::cmp::Reverse(h.at.end)));
    }
    out
}

/// Masks `hits` (byte ranges of the pieces joined) in the pieces: a
/// match's mask goes where it starts, the rest of it is cut from the
/// pieces it runs on into.
pub fn mask_pieces(pieces: &mut [&mut String], hits: &[Hit]) {
    // Overlapping matches merge into one, named by the first.
    let mut merged: Vec<Hit> = Vec::new();
    for h in hits {
        match merged.last_mut() {
            Some(last) if h.at.start < last.at.end => last.at.end = last.at.end.max(h.at.end),
            _ => merged.push(h.clone()),
        }
    }
    let mut starts = Vec::with_capacity(pieces.len());
    let mut at = 0;
    for p in pieces.iter() {
        starts.push(at);
        at += p.len();
    }
    for hit in merged.iter().rev() {
        for (i, piece) in pieces.iter_mut().enumerate().rev() {
            let start = starts[i];
            let (lo, hi) = (hit.at.start.max(start), hit.at.end.min(start + piece.len()));
            if lo >= hi {
                continue;
            }
            let with = if hit.at.start >= start { hit.mask } else { "" };
            piece.replace_range(lo - start..hi - start, with);
        }
    }
}

fn join<'a>(pieces: &'a [&mut String]) -> Cow<'a, str> {
    match pieces {
        [one] => Cow::Borrowed(one.as_str()),
        many => Cow::Owned(many.iter().map(|p| p.as_str()).collect()),
    }
}

/// The request's texts a model reads, in groups read as one text each.
pub fn groups_mut(endpoint: Endpoint, body: &mut Map<String, Value>) -> Vec<Vec<&mut String>> {
    let mut out = Vec::new();
    for (key, v) in body.iter_mut() {
        match (endpoint, key.as_str()) {
            (Endpoint::ChatCompletions, "messages") => {
                let Value::Array(messages) = v else { continue };
                for m in messages.iter_mut().filter_map(Value::as_object_mut) {
                    for (key, v) in m.iter_mut() {
                        match key.as_str() {
                            "content" => out.push(pieces(v)),
                            "tool_calls" => arguments(v, &mut out),
                            "function_call" => {
                                if let Some(Value::String(a)) = v.get_mut("arguments") {
                                    out.push(vec![a]);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            (Endpoint::ChatCompletions, "tools" | "functions") => {
                let Value::Array(tools) = v else { continue };
                for t in tools {
                    // `tools[].function` or legacy `functions[]`.
                    let f = if t.get("function").is_some() {
                        &mut t["function"]
                    } else {
                        t
                    };
                    descriptions(f, &mut out);
                }
            }
            (Endpoint::ChatCompletions, "prediction") => {
                if let Some(c) = v.get_mut("content") {
                    out.push(pieces(c));
                }
            }
            (Endpoint::Completions, "prompt" | "suffix")
            | (Endpoint::Embeddings | Endpoint::Moderations, "input") => match v {
                Value::String(s) => out.push(vec![s]),
                Value::Array(items) => {
                    for item in items {
                        if let Value::String(s) = item {
                            out.push(vec![s]);
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
    out.retain(|g| !g.is_empty());
    out
}

/// A string, or the strings and `{"type": "text", "text": ..}` parts of an
/// array, in order.
fn pieces(v: &mut Value) -> Vec<&mut String> {
    let mut out = Vec::new();
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => out.push(s),
                    Value::Object(part) => {
                        if let Some(Value::String(t)) = part.get_mut("text") {
                            out.push(t);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    out
}

/// Every `description` in a function's definition, its parameters'
/// included (a model reads them all), each a group of its own.
fn descriptions<'a>(v: &'a mut Value, out: &mut Vec<Vec<&'a mut String>>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match (k.as_str(), v) {
                    ("description", Value::String(d)) => out.push(vec![d]),
                    (_, v) => descriptions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| descriptions(i, out)),
        _ => {}
    }
}

/// Each of `tool_calls[].function.arguments`, a group of its own.
fn arguments<'a>(v: &'a mut Value, out: &mut Vec<Vec<&'a mut String>>) {
    let Value::Array(calls) = v else { return };
    for call in calls {
        if let Some(Value::String(a)) = call.pointer_mut("/function/arguments") {
            out.push(vec![a]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::screen::rules::DENIED_MASK;

    #[test]
    fn a_match_across_pieces_is_masked_where_it_starts_and_cut_from_the_rest() {
        let (mut a, mut b, mut c) = (
            "key AKIA".to_string(),
            "IOSFODNN7".to_string(),
            "EXAMPLE ok".to_string(),
        );
        let hit = Hit {
            at: 4..24,
            mask: "[SECRET]",
            what: "secret",
        };
        mask_pieces(&mut [&mut a, &mut b, &mut c], &[hit]);
        assert_eq!(
            (a.as_str(), b.as_str(), c.as_str()),
            ("key [SECRET]", "", " ok")
        );
        let mut one = "a falcon b falcon".to_string();
        let hits = [
            Hit {
                at: 2..8,
                mask: DENIED_MASK,
                what: "keyword",
            },
            Hit {
                at: 11..17,
                mask: DENIED_MASK,
                what: "keyword",
            },
        ];
        mask_pieces(&mut [&mut one], &hits);
        assert_eq!(one, "a [DENIED] b [DENIED]");
    }

    #[test]
    fn every_text_a_model_reads_is_gathered() {
        let mut body: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "c"}}], "function_call": {"arguments": "d"}},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "description": "e"}}],
            "prediction": {"type": "content", "content": "g"},
        }))
        .unwrap();
        let mut groups: Vec<String> = groups_mut(Endpoint::ChatCompletions, &mut body)
            .iter()
            .map(|g| g.iter().map(|s| s.as_str()).collect())
            .collect();
        groups.sort();
        assert_eq!(groups, ["ab", "c", "d", "e", "g"]);
    }
}

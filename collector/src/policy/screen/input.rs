//! Screening a request before it goes upstream: the texts of its messages
//! (string contents, text parts, tool-call arguments), its `prompt` or its
//! `input`, checked by each rule that applies. Block rules look first, at
//! the text as the client sent it, then the moderation upstreams, then
//! masks rewrite the body in place, then log rules count what goes out.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::GuardAction;
use crate::observe::names::Name;
use crate::policy::screen::moderation::Moderated;
use crate::policy::screen::rules::{Counters, Direction, Rule, mask};
use crate::upstream::Endpoint;

/// Why a rule stopped the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rule: Name,
    pub direction: Direction,
    /// The moderation service did not answer and the rule fails closed.
    pub unanswered: bool,
}

/// Screens the request `body` of `endpoint` with `rules` (those that
/// apply to it, for input). `Ok(true)` when a mask rewrote the body.
pub async fn screen(
    rules: &[Arc<Rule>],
    counters: &Counters,
    endpoint: Endpoint,
    body: &mut Map<String, Value>,
) -> Result<bool, Blocked> {
    let mut texts = texts_mut(endpoint, body);
    let dir = Direction::Input;
    check(rules, counters, dir, texts.iter().map(|t| t.as_str())).await?;
    let mut masked = false;
    for rule in rules.iter().filter(|r| r.action == GuardAction::Mask) {
        let mut hit = false;
        for text in texts.iter_mut() {
            let hits = rule.find(text);
            if !hits.is_empty() {
                **text = mask(text, &hits);
                hit = true;
            }
        }
        if hit {
            counters.matched(rule, dir, GuardAction::Mask);
            tracing::info!(rule = %rule.name, direction = "input", "content guard masked the request");
            masked = true;
        }
    }
    Ok(masked)
}

/// The checks that do not rewrite: block rules' matches, the moderation
/// upstreams, log rules' matches. Shared with whole (non-streamed) answers.
pub async fn check<'a>(
    rules: &[Arc<Rule>],
    counters: &Counters,
    dir: Direction,
    texts: impl Iterator<Item = &'a str> + Clone,
) -> Result<(), Blocked> {
    let blocked = |rule: &Rule, unanswered| Blocked {
        rule: rule.name.clone(),
        direction: dir,
        unanswered,
    };
    for rule in rules
        .iter()
        .filter(|r| r.action == GuardAction::Block && r.scans())
    {
        if let Some(what) = texts
            .clone()
            .find_map(|t| rule.find(t).first().map(|h| h.what))
        {
            counters.matched(rule, dir, GuardAction::Block);
            tracing::info!(rule = %rule.name, direction = dir.as_str(), what, "content guard blocked");
            return Err(blocked(rule, false));
        }
    }
    for rule in rules {
        let Some(m) = &rule.moderation else { continue };
        let all: Vec<&str> = texts.clone().filter(|t| !t.trim().is_empty()).collect();
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
                return Err(blocked(rule, false));
            }
            Moderated::Failed(why) => {
                counters.moderation_failed(rule);
                tracing::warn!(rule = %rule.name, error = %why, fail_open = m.fail_open, "moderation upstream failed");
                if !m.fail_open {
                    return Err(blocked(rule, true));
                }
            }
        }
    }
    for rule in rules
        .iter()
        .filter(|r| r.action == GuardAction::Log && r.scans())
    {
        if let Some(what) = texts
            .clone()
            .find_map(|t| rule.find(t).first().map(|h| h.what))
        {
            counters.matched(rule, dir, GuardAction::Log);
            tracing::info!(rule = %rule.name, direction = dir.as_str(), what, "content guard match (logged only)");
        }
    }
    Ok(())
}

/// The request's texts a model reads, in order.
pub fn texts_mut(endpoint: Endpoint, body: &mut Map<String, Value>) -> Vec<&mut String> {
    let mut out = Vec::new();
    match endpoint {
        Endpoint::ChatCompletions => {
            if let Some(Value::Array(messages)) = body.get_mut("messages") {
                for m in messages.iter_mut().filter_map(Value::as_object_mut) {
                    for (key, v) in m.iter_mut() {
                        match key.as_str() {
                            "content" => strings(v, &mut out),
                            "tool_calls" => arguments(v, &mut out),
                            _ => {}
                        }
                    }
                }
            }
        }
        Endpoint::Completions => {
            if let Some(v) = body.get_mut("prompt") {
                strings(v, &mut out);
            }
        }
        Endpoint::Embeddings | Endpoint::Moderations => {
            if let Some(v) = body.get_mut("input") {
                strings(v, &mut out);
            }
        }
    }
    out
}

/// A string, or an array of strings and `{"type": "text", "text": ..}`
/// parts.
fn strings<'a>(v: &'a mut Value, out: &mut Vec<&'a mut String>) {
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
}

/// `tool_calls[].function.arguments`.
fn arguments<'a>(v: &'a mut Value, out: &mut Vec<&'a mut String>) {
    let Value::Array(calls) = v else { return };
    for call in calls {
        if let Some(Value::String(a)) = call
            .get_mut("function")
            .and_then(|f| f.get_mut("arguments"))
        {
            out.push(a);
        }
    }
}

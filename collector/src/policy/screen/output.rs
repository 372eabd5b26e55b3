//! Screening what comes back: a whole answer at once, or a stream as it
//! is relayed.
//!
//! A stream is checked incrementally with a bounded holdback: the events
//! carrying the last `holdback_chars` characters of generated text are
//! held, and each new event is checked together with them and with the
//! tail of what was already released. A match of up to `holdback_chars`
//! characters, split across any number of chunks, is therefore caught
//! before any of it reaches the client: a block ends the stream with an
//! error event, a mask rewrites the held events. The delay this adds is
//! the time the upstream takes to generate `holdback_chars` characters
//! (TTFT included); the end of the stream releases everything held.
//! Moderation upstreams are asked about whole answers only.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::config::GuardAction;
use crate::policy::screen::input::{Blocked, check};
use crate::policy::screen::rules::{Counters, Direction, Hit, Rule, mask};
use crate::relay::sse;

/// Longest single event the holdback parses, bytes (as the relay).
const MAX_EVENT_BYTES: usize = 8 << 20;

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
            masked = true;
        }
    }
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
                            ("content" | "reasoning_content", Value::String(t)) => out.push(t),
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

/// The stream check of one response.
pub struct Holdback {
    rules: Vec<Arc<Rule>>,
    counters: Counters,
    holdback: usize,
    parser: sse::Parser,
    held: VecDeque<Held>,
    /// The last `holdback` characters already released: context for a
    /// match that starts there.
    tail: String,
    /// Log rules count once per response.
    logged: Vec<bool>,
}

/// An event not yet released, and its generated text.
struct Held {
    raw: Bytes,
    /// The event's JSON, kept while it has text a mask may rewrite.
    doc: Option<Value>,
    segments: Vec<Segment>,
    changed: bool,
    /// `data: [DONE]`: the end.
    done: bool,
}

/// One text field of an event: `choices[choice].delta.<field>` or
/// `choices[choice].text`.
struct Segment {
    choice: usize,
    field: &'static str,
    in_delta: bool,
    text: String,
}

/// What the client gets next.
pub enum Released {
    Events(Vec<Bytes>),
    Blocked(Blocked),
}

impl Holdback {
    /// `None` when no rule scans text (moderation-only rules do not look
    /// at streams).
    pub fn new(rules: Vec<Arc<Rule>>, counters: Counters) -> Option<Self> {
        let rules: Vec<_> = rules.into_iter().filter(|r| r.scans()).collect();
        let holdback = rules.iter().map(|r| r.holdback_chars).max()?;
        Some(Self {
            logged: vec![false; rules.len()],
            rules,
            counters,
            holdback,
            parser: sse::Parser::new(MAX_EVENT_BYTES),
            held: VecDeque::new(),
            tail: String::new(),
        })
    }

    /// Takes whole events the relay would send; gives back those that may
    /// go now.
    pub fn push(&mut self, bytes: &[u8]) -> Released {
        self.parser.push(bytes);
        let mut end = false;
        loop {
            let ev = match self.parser.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    // Oversized: the relay refuses such events before this.
                    self.parser = sse::Parser::new(MAX_EVENT_BYTES);
                    break;
                }
            };
            let held = Held::of(ev.raw, ev.data.as_deref());
            end |= held.done;
            self.held.push_back(held);
        }
        self.step(end)
    }

    /// The upstream ended: checks and releases everything held.
    pub fn finish(&mut self) -> Released {
        if let Some(ev) = self.parser.finish() {
            let held = Held::of(ev.raw, ev.data.as_deref());
            self.held.push_back(held);
        }
        self.step(true)
    }

    fn step(&mut self, end: bool) -> Released {
        // How many events go out now: all at the end, else as many as
        // leave at least `holdback` characters held.
        let mut chars: usize = self.held.iter().map(Held::chars).sum();
        let mut release = 0;
        if end {
            release = self.held.len();
        } else {
            for h in &self.held {
                let c = h.chars();
                if chars - c < self.holdback {
                    break;
                }
                chars -= c;
                release += 1;
            }
        }
        let (window, starts) = self.window();
        let boundary = starts.get(release).map_or(window.len(), |s| s.0);
        let tail_len = self.tail.len();
        let mut masks: Vec<Hit> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let hits: Vec<Hit> = rule
                .find(&window)
                .into_iter()
                .filter(|h| h.at.end > tail_len)
                .collect();
            if hits.is_empty() {
                continue;
            }
            match rule.action {
                GuardAction::Block => {
                    self.counters
                        .matched(rule, Direction::Output, GuardAction::Block);
                    tracing::info!(rule = %rule.name, direction = "output", what = hits[0].what, "content guard blocked the stream");
                    self.held.clear();
                    return Released::Blocked(Blocked {
                        rule: rule.name.clone(),
                        direction: Direction::Output,
                        unanswered: false,
                    });
                }
                GuardAction::Log => {
                    if !self.logged[i] {
                        self.logged[i] = true;
                        self.counters
                            .matched(rule, Direction::Output, GuardAction::Log);
                        tracing::info!(rule = %rule.name, direction = "output", what = hits[0].what, "content guard match (logged only)");
                    }
                }
                GuardAction::Mask => {
                    // A match at the very end may still grow (more digits,
                    // the rest of a domain): it waits unless it must go.
                    let now: Vec<Hit> = hits
                        .into_iter()
                        .filter(|h| end || h.at.end < window.len() || h.at.start < boundary)
                        .collect();
                    if !now.is_empty() {
                        self.counters
                            .matched(rule, Direction::Output, GuardAction::Mask);
                        masks.extend(now);
                    }
                }
            }
        }
        if !masks.is_empty() {
            masks.sort_by_key(|h| (h.at.start, h.at.end));
            self.apply(&masks, &starts);
        }
        let mut out = Vec::with_capacity(release);
        let mut released_text = String::new();
        for _ in 0..release {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            for s in &h.segments {
                released_text.push_str(&s.text);
            }
            out.push(h.into_bytes());
        }
        if !released_text.is_empty() {
            self.tail.push_str(&released_text);
            let chars = self.tail.chars().count();
            if chars > self.holdback {
                let cut = self
                    .tail
                    .char_indices()
                    .nth(chars - self.holdback)
                    .map_or(0, |(i, _)| i);
                self.tail.drain(..cut);
            }
        }
        Released::Events(out)
    }

    /// The released tail and the held text, with where each held event's
    /// and each segment's text starts in it: `(event start, [segment
    /// starts])`.
    fn window(&self) -> (String, Vec<(usize, Vec<usize>)>) {
        let mut w = self.tail.clone();
        let mut starts = Vec::with_capacity(self.held.len());
        for h in &self.held {
            let at = w.len();
            let mut segs = Vec::with_capacity(h.segments.len());
            for s in &h.segments {
                segs.push(w.len());
                w.push_str(&s.text);
            }
            starts.push((at, segs));
        }
        (w, starts)
    }

    /// Masks `hits` (window byte ranges, by start) in the held segments;
    /// a hit across segments is masked in the first and cut from the rest.
    fn apply(&mut self, hits: &[Hit], starts: &[(usize, Vec<usize>)]) {
        // Merge overlaps, then go from the last so earlier offsets hold.
        let mut merged: Vec<Hit> = Vec::new();
        for h in hits {
            match merged.last_mut() {
                Some(last) if h.at.start < last.at.end => {
                    last.at.end = last.at.end.max(h.at.end);
                }
                _ => merged.push(h.clone()),
            }
        }
        for hit in merged.iter().rev() {
            let mut first = true;
            let mut edits: Vec<(usize, usize, std::ops::Range<usize>, &'static str)> = Vec::new();
            for (e, (_, segs)) in starts.iter().enumerate() {
                for (k, &start) in segs.iter().enumerate() {
                    let len = self.held[e].segments[k].text.len();
                    let (lo, hi) = (hit.at.start.max(start), hit.at.end.min(start + len));
                    if lo >= hi {
                        continue;
                    }
                    let with = if first { hit.mask } else { "" };
                    first = false;
                    edits.push((e, k, lo - start..hi - start, with));
                }
            }
            for (e, k, range, with) in edits {
                let h = &mut self.held[e];
                h.segments[k].text.replace_range(range, with);
                h.changed = true;
            }
        }
    }
}

impl Held {
    fn of(raw: Bytes, data: Option<&[u8]>) -> Self {
        let done = data.is_some_and(|d| d.trim_ascii() == b"[DONE]");
        let doc = data
            .filter(|d| d.trim_ascii_start().starts_with(b"{"))
            .and_then(|d| serde_json::from_slice::<Value>(d).ok());
        let mut segments = Vec::new();
        if let Some(Value::Array(choices)) = doc.as_ref().and_then(|d| d.get("choices")) {
            for (i, c) in choices.iter().enumerate() {
                if let Some(Value::String(t)) = c.get("text") {
                    segments.push(Segment::new(i, "text", false, t));
                }
                let Some(delta) = c.get("delta") else {
                    continue;
                };
                for field in ["reasoning_content", "content"] {
                    if let Some(Value::String(t)) = delta.get(field) {
                        segments.push(Segment::new(i, field, true, t));
                    }
                }
            }
        }
        Held {
            raw,
            doc: if segments.is_empty() { None } else { doc },
            segments,
            changed: false,
            done,
        }
    }

    fn chars(&self) -> usize {
        self.segments.iter().map(|s| s.text.chars().count()).sum()
    }

    /// The event as it goes out: as received, or rewritten by a mask.
    fn into_bytes(self) -> Bytes {
        let Held {
            raw,
            doc,
            segments,
            changed,
            ..
        } = self;
        let Some(mut doc) = doc.filter(|_| changed) else {
            return raw;
        };
        for s in segments {
            let choice = &mut doc["choices"][s.choice];
            let target = if s.in_delta {
                &mut choice["delta"][s.field]
            } else {
                &mut choice[s.field]
            };
            *target = Value::String(s.text);
        }
        Bytes::from(format!("data: {doc}\n\n"))
    }
}

impl Segment {
    fn new(choice: usize, field: &'static str, in_delta: bool, text: &str) -> Self {
        Self {
            choice,
            field,
            in_delta,
            text: text.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;

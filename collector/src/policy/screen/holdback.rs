//! Checking a stream as it is relayed, through a bounded holdback.
//!
//! The events carrying the last `holdback_chars` characters of each text
//! of the stream (each choice's content, reasoning, refusal, and each of
//! its tool calls' arguments, apart) are held, and each new event is
//! checked together with them and with what that text already released. A match of up to `holdback_chars`
//! characters, split across any number of chunks, is caught before any of
//! it reaches the client: a block ends the stream with an error event, a
//! mask rewrites the held events. A longer match that a mask has begun
//! (a PEM private key, say) stays open: the released text is kept as
//! context (up to [`MAX_OPEN_CHARS`]) and the rest of the match is cut
//! from the events that carry it. The delay this adds is the time the
//! upstream takes to generate `holdback_chars` characters; the end of the
//! stream releases everything held.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::config::GuardAction;
use crate::policy::screen::input::{Blocked, Why};
use crate::policy::screen::rules::{Counters, Direction, Hit, Rule};
use crate::relay::sse;

/// Longest single event the holdback parses, bytes (as the relay).
const MAX_EVENT_BYTES: usize = 8 << 20;

/// Most released characters kept as the context of an open match.
pub const MAX_OPEN_CHARS: usize = 64 * 1024;

/// The stream check of one response.
pub struct Holdback {
    rules: Vec<Arc<Rule>>,
    counters: Counters,
    holdback: usize,
    parser: sse::Parser,
    held: VecDeque<Held>,
    /// Per channel: the text already released, as generated (unmasked),
    /// kept as context for matches that start there.
    tails: BTreeMap<Channel, String>,
    /// Each rule counts once per response.
    counted: Vec<bool>,
    /// Blocked or aborted: nothing more goes out.
    stopped: bool,
    /// A mask rewrote something: the answer is this client's alone.
    masked: bool,
}

/// An event not yet released, and its generated text.
struct Held {
    raw: Bytes,
    /// The event's JSON, kept while it has text a mask may rewrite.
    doc: Option<Value>,
    segments: Vec<Segment>,
    /// `data: [DONE]`: the end.
    done: bool,
    /// JSON the guard cannot read (a lone surrogate, `NaN`): unchecked.
    unreadable: bool,
}

/// One text of a stream: a choice (its `index`) and which of its texts.
/// Each is checked on its own: a choice's content, its reasoning, each of
/// its tool calls' arguments never join.
type Channel = (u64, Chan);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Chan {
    Content,
    Reasoning,
    Refusal,
    /// A tool call, by its `index`.
    Tool(u64),
    FunctionCall,
}

/// One text field of an event, where it sits, and the masks on it.
struct Segment {
    channel: Channel,
    /// Its position in `choices`.
    pos: usize,
    field: Field,
    /// As generated.
    text: String,
    chars: usize,
    /// Byte ranges of `text` to replace, and with what.
    masks: Vec<(Range<usize>, &'static str)>,
}

#[derive(Clone, Copy)]
enum Field {
    /// `choices[pos].text`
    Text,
    /// `choices[pos].delta.<name>`
    Delta(&'static str),
    /// `choices[pos].delta.tool_calls[n].function.arguments`
    Arguments(usize),
    /// `choices[pos].delta.function_call.arguments`
    FunctionCall,
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
            counted: vec![false; rules.len()],
            rules,
            counters,
            holdback,
            parser: sse::Parser::new(MAX_EVENT_BYTES),
            held: VecDeque::new(),
            tails: BTreeMap::new(),
            stopped: false,
            masked: false,
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

    /// How many events go out now: all at the end, else those after which
    /// every choice they carry still holds `holdback` characters.
    fn releasable(&self, end: bool) -> usize {
        if end {
            return self.held.len();
        }
        let mut left: BTreeMap<Channel, usize> = BTreeMap::new();
        for s in self.held.iter().flat_map(|h| &h.segments) {
            *left.entry(s.channel).or_default() += s.chars;
        }
        let mut n = 0;
        for h in &self.held {
            for s in &h.segments {
                *left.entry(s.channel).or_default() -= s.chars;
            }
            if h.segments.iter().any(|s| left[&s.channel] < self.holdback) {
                break;
            }
            n += 1;
        }
        n
    }

    /// Whether a mask rewrote any of the answer.
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// The stream broke: what is held was never checked whole, so it is
    /// dropped, not sent.
    pub fn abort(&mut self) {
        self.held.clear();
        self.stopped = true;
    }

    fn step(&mut self, end: bool) -> Released {
        if self.stopped {
            self.held.clear();
            return Released::Events(Vec::new());
        }
        if self.held.iter().any(|h| h.unreadable) {
            // What cannot be read cannot be checked: fail closed.
            self.abort();
            let rule = self
                .rules
                .first()
                .map(|r| r.name.clone())
                .unwrap_or_default();
            return Released::Blocked(Blocked {
                rule,
                direction: Direction::Output,
                why: Why::Unreadable,
            });
        }
        let release = self.releasable(end);
        let channels: Vec<Channel> = {
            let mut c: Vec<Channel> = self.tails.keys().copied().collect();
            c.extend(
                self.held
                    .iter()
                    .flat_map(|h| h.segments.iter().map(|s| s.channel)),
            );
            c.sort_unstable();
            c.dedup();
            c
        };
        let mut open: BTreeMap<Channel, usize> = BTreeMap::new();
        for channel in channels {
            match self.check(channel, release, end) {
                Ok(Some(start)) => {
                    open.insert(channel, start);
                }
                Ok(None) => {}
                Err(blocked) => {
                    self.held.clear();
                    self.stopped = true;
                    return Released::Blocked(blocked);
                }
            }
        }
        let mut out = Vec::with_capacity(release);
        for _ in 0..release {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            for s in &h.segments {
                self.tails.entry(s.channel).or_default().push_str(&s.text);
            }
            out.push(h.into_bytes());
        }
        for (channel, tail) in self.tails.iter_mut() {
            let keep_from = open.get(channel).copied();
            trim(tail, self.holdback, keep_from);
        }
        Released::Events(out)
    }

    /// Checks one channel's window (its released tail and held text):
    /// blocks, counts logs, puts masks on held segments. `Ok(Some(at))`:
    /// a mask's match is still open at the end, from byte `at` of the tail.
    fn check(
        &mut self,
        channel: Channel,
        release: usize,
        end: bool,
    ) -> Result<Option<usize>, Blocked> {
        let tail = self.tails.get(&channel).map(String::as_str).unwrap_or("");
        let mut window = String::with_capacity(tail.len() + 256);
        window.push_str(tail);
        // (event, segment, start in the window) of each held segment.
        let mut places: Vec<(usize, usize, usize)> = Vec::new();
        let mut boundary = window.len();
        for (e, h) in self.held.iter().enumerate() {
            for (k, s) in h
                .segments
                .iter()
                .enumerate()
                .filter(|(_, s)| s.channel == channel)
            {
                places.push((e, k, window.len()));
                window.push_str(&s.text);
            }
            if e + 1 == release {
                boundary = window.len();
            }
        }
        let tail_len = tail.len();
        let mut open = None;
        for i in 0..self.rules.len() {
            let rule = self.rules[i].clone();
            let hits: Vec<Hit> = (rule.find(&window).into_iter())
                .filter(|h| h.at.end > tail_len)
                .collect();
            let Some(first) = hits.first() else { continue };
            if !self.counted[i] {
                self.counted[i] = true;
                self.counters.matched(&rule, Direction::Output, rule.action);
                tracing::info!(rule = %rule.name, direction = "output", what = first.what, action = rule.action.as_str(), "content guard match in a stream");
            }
            match rule.action {
                GuardAction::Block => {
                    return Err(Blocked {
                        rule: rule.name.clone(),
                        direction: Direction::Output,
                        why: Why::Matched,
                    });
                }
                GuardAction::Log => {}
                GuardAction::Mask => {
                    for h in hits {
                        let at_end = h.at.end == window.len();
                        // A match at the very end may still grow (more
                        // digits, the rest of a key): it waits unless its
                        // start must go now.
                        if at_end && !end && h.at.start >= boundary {
                            continue;
                        }
                        if at_end && !end {
                            open = Some(open.map_or(h.at.start, |o: usize| o.min(h.at.start)));
                        }
                        self.mask(&places, &h, tail_len);
                    }
                }
            }
        }
        // The tail after release is the window up to `boundary`, so an
        // open match starts at the same byte there.
        Ok(open)
    }

    /// Puts `hit` (window byte range) on the held segments it covers: its
    /// mask on the first if the match starts in held text, nothing (the
    /// text cut) on the rest.
    fn mask(&mut self, places: &[(usize, usize, usize)], hit: &Hit, tail_len: usize) {
        let mut first = hit.at.start >= tail_len;
        for &(e, k, start) in places {
            let s = &mut self.held[e].segments[k];
            let (lo, hi) = (
                hit.at.start.max(start),
                hit.at.end.min(start + s.text.len()),
            );
            if lo >= hi {
                continue;
            }
            let with = if first { hit.mask } else { "" };
            first = false;
            s.masks.push((lo - start..hi - start, with));
            self.masked = true;
        }
    }
}

/// Keeps the last `chars` characters of `tail`, or from byte `from` if
/// that is earlier (an open match), at most [`MAX_OPEN_CHARS`].
fn trim(tail: &mut String, chars: usize, from: Option<usize>) {
    let count = tail.chars().count();
    let by_chars = tail
        .char_indices()
        .nth(count.saturating_sub(chars))
        .map_or(tail.len(), |(i, _)| i);
    let mut cut = from.map_or(by_chars, |f| f.min(by_chars));
    if tail.len() - cut > MAX_OPEN_CHARS * 4 || tail[cut..].chars().count() > MAX_OPEN_CHARS {
        cut = by_chars;
    }
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    tail.drain(..cut);
}

impl Held {
    fn of(raw: Bytes, data: Option<&[u8]>) -> Self {
        let done = data.is_some_and(|d| d.trim_ascii() == b"[DONE]");
        let json = data.filter(|d| d.trim_ascii_start().starts_with(b"{"));
        let doc = json.and_then(|d| serde_json::from_slice::<Value>(d).ok());
        let unreadable = json.is_some() && doc.is_none();
        let mut segments = Vec::new();
        if let Some(Value::Array(choices)) = doc.as_ref().and_then(|d| d.get("choices")) {
            for (pos, c) in choices.iter().enumerate() {
                let choice = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
                let mut add = |chan, field, text: &str| {
                    if !text.is_empty() {
                        segments.push(Segment::new((choice, chan), pos, field, text));
                    }
                };
                if let Some(Value::String(t)) = c.get("text") {
                    add(Chan::Content, Field::Text, t);
                }
                let Some(delta) = c.get("delta") else {
                    continue;
                };
                for (name, chan) in [
                    ("reasoning_content", Chan::Reasoning),
                    ("content", Chan::Content),
                    ("refusal", Chan::Refusal),
                ] {
                    if let Some(Value::String(t)) = delta.get(name) {
                        add(chan, Field::Delta(name), t);
                    }
                }
                if let Some(Value::Array(calls)) = delta.get("tool_calls") {
                    for (n, call) in calls.iter().enumerate() {
                        let index = call
                            .get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(n as u64);
                        if let Some(Value::String(a)) = call.pointer("/function/arguments") {
                            add(Chan::Tool(index), Field::Arguments(n), a);
                        }
                    }
                }
                if let Some(Value::String(a)) = delta.pointer("/function_call/arguments") {
                    add(Chan::FunctionCall, Field::FunctionCall, a);
                }
            }
        }
        Held {
            raw,
            doc: if segments.is_empty() { None } else { doc },
            segments,
            done,
            unreadable,
        }
    }

    /// The event as it goes out: as received, or rewritten by its masks.
    fn into_bytes(self) -> Bytes {
        let Held {
            raw, doc, segments, ..
        } = self;
        let Some(mut doc) = doc.filter(|_| segments.iter().any(|s| !s.masks.is_empty())) else {
            return raw;
        };
        for s in segments.into_iter().filter(|s| !s.masks.is_empty()) {
            let choice = &mut doc["choices"][s.pos];
            let target = match s.field {
                Field::Text => &mut choice["text"],
                Field::Delta(name) => &mut choice["delta"][name],
                Field::Arguments(n) => {
                    &mut choice["delta"]["tool_calls"][n]["function"]["arguments"]
                }
                Field::FunctionCall => &mut choice["delta"]["function_call"]["arguments"],
            };
            *target = Value::String(s.render());
        }
        Bytes::from(format!("data: {doc}\n\n"))
    }
}

impl Segment {
    fn new(channel: Channel, pos: usize, field: Field, text: &str) -> Self {
        Self {
            channel,
            pos,
            field,
            text: text.to_string(),
            chars: text.chars().count(),
            masks: Vec::new(),
        }
    }

    /// The text with its masks applied; overlapping masks merge into the
    /// outermost (a card number inside a key is the key's).
    fn render(&self) -> String {
        let mut masks = self.masks.clone();
        masks.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
        let mut merged: Vec<(Range<usize>, &'static str)> = Vec::new();
        for (r, with) in masks {
            match merged.last_mut() {
                Some((last, _)) if r.start < last.end => last.end = last.end.max(r.end),
                _ => merged.push((r, with)),
            }
        }
        let mut out = String::with_capacity(self.text.len());
        let mut at = 0;
        for (r, with) in merged {
            out.push_str(&self.text[at..r.start]);
            out.push_str(with);
            at = r.end;
        }
        out.push_str(&self.text[at..]);
        out
    }
}

#[cfg(test)]
mod tests;

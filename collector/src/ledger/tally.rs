//! What one upstream attempt generated, read document by document (a
//! complete body, or each event of a stream), and what it is billed.
//!
//! Usage objects are cumulative wherever they appear (every chunk, the
//! finish chunk, a last usage-only chunk, Anthropic's start and delta), so
//! counts merge by taking the larger of each, never by summing. Without a
//! readable count the attempt is estimated: input from the request body,
//! output from the text of each choice, each choice capped by `max_tokens`
//! on its own (a request with `n = 3` may generate three times the cap).

use tollgate_schemas::{TokenSource, Tokens};

use crate::ledger::tokens::{self, Prompt};
use crate::ledger::usage::Counted;
use crate::upstream::response::Document;

/// Generated text kept for an estimate, all choices together; past it the
/// count is extrapolated from the bytes dropped.
const MAX_TEXT_BYTES: usize = 4 << 20;
/// Choices tracked one by one (OpenAI allows `n` up to 128); text of any
/// further choice is counted with the last one tracked.
const MAX_CHOICES: usize = 1024;

#[derive(Debug, Default)]
pub struct Tally {
    reported: Option<Tokens>,
    /// Which sides the reported counts cover.
    input_reported: bool,
    output_reported: bool,
    /// Embeddings generate no output: its count is never missing.
    no_output: bool,
    total_only: Option<u64>,
    unreadable: bool,
    choices: Vec<Generated>,
    kept: usize,
    /// What the answer said of itself, for its trace.
    pub answer: Answered,
}

/// The answer's own `id` and `model`, and why its choices stopped.
#[derive(Debug, Default, Clone)]
pub struct Answered {
    pub id: Option<String>,
    pub model: Option<String>,
    /// At most one per tracked choice.
    pub finish_reasons: Vec<String>,
}

#[derive(Debug)]
struct Generated {
    index: u32,
    text: String,
    dropped: usize,
}

/// Tokens and where they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub tokens: Tokens,
    pub source: TokenSource,
}

/// Why an attempt's tokens were estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimated {
    /// The upstream sent no usage at all.
    NoUsage,
    /// A usage object came, but with no count that could be read.
    Unreadable,
    /// Only `total_tokens` came: the total is kept, the split estimated.
    TotalOnly,
    /// Usage counted one side only (input or output); the other is
    /// estimated.
    Partial,
}

impl Estimated {
    /// The `reason` label of `tollgate_usage_estimated_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Estimated::NoUsage => "no_usage",
            Estimated::Unreadable => "unreadable_usage",
            Estimated::TotalOnly => "total_only",
            Estimated::Partial => "partial_usage",
        }
    }
}

impl Tally {
    /// A tally for an embeddings answer, which has no output to count.
    pub fn embeddings() -> Self {
        Tally {
            no_output: true,
            ..Tally::default()
        }
    }

    /// Takes in one document's usage objects and generated text.
    pub fn read(&mut self, doc: &Document) {
        for u in doc.usage() {
            match u.counted() {
                Counted::Tokens(t) => {
                    self.merge(t);
                    self.input_reported = true;
                    self.output_reported = true;
                }
                Counted::OneSide { tokens, input } => {
                    self.merge(tokens);
                    self.input_reported |= input;
                    self.output_reported |= !input;
                }
                Counted::TotalOnly(t) => {
                    self.total_only = Some(self.total_only.unwrap_or(0).max(t));
                }
                Counted::Unreadable => self.unreadable = true,
            }
        }
        if self.answer.id.is_none() {
            (self.answer.id, self.answer.model) = doc.identity();
        }
        for (position, c) in doc.choices().enumerate() {
            if let Some(reason) = c.finish_reason()
                && self.answer.finish_reasons.len() < MAX_CHOICES
            {
                self.answer.finish_reasons.push(reason);
            }
            let slot = self.slot(c.index().unwrap_or(position as u32));
            let mut kept = self.kept;
            let g = &mut self.choices[slot];
            c.each_text(|t| {
                if kept + t.len() <= MAX_TEXT_BYTES {
                    g.text.push_str(t);
                    kept += t.len();
                } else {
                    g.dropped += t.len();
                }
            });
            self.kept = kept;
        }
    }

    /// Counts are cumulative: the larger of each is kept.
    fn merge(&mut self, t: Tokens) {
        let r = self.reported.get_or_insert_default();
        r.input = r.input.max(t.input);
        r.cached_input = r.cached_input.max(t.cached_input);
        r.output = r.output.max(t.output);
        r.reasoning = r.reasoning.max(t.reasoning);
    }

    fn slot(&mut self, index: u32) -> usize {
        if let Some(i) = self.choices.iter().position(|g| g.index == index) {
            return i;
        }
        if self.choices.len() < MAX_CHOICES {
            self.choices.push(Generated {
                index,
                text: String::new(),
                dropped: 0,
            });
        }
        self.choices.len() - 1
    }

    /// The generated text of each tracked choice, in order (for a trace
    /// that captures content).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.choices.iter().map(|g| g.text.as_str())
    }

    /// Whether the upstream reported a count.
    pub fn reported(&self) -> bool {
        self.reported.is_some()
    }

    /// Whether any generated text was read.
    pub fn generated(&self) -> bool {
        self.choices
            .iter()
            .any(|g| !g.text.is_empty() || g.dropped > 0)
    }

    /// A document that may hold usage could not be read.
    pub fn unreadable(&mut self) {
        self.unreadable = true;
    }

    /// What the attempt is billed, and why it was estimated if it was.
    pub fn settle(&self, prompt: Option<&Prompt>) -> (Usage, Option<Estimated>) {
        let output_reported = self.output_reported || self.no_output;
        let input = || prompt.map_or(0, |p| tokens::input(&p.body));
        let output = || {
            let max = prompt.and_then(|p| p.max_tokens);
            self.choices.iter().map(|g| g.output(max)).sum::<u64>()
        };
        let (tokens, why) = match (self.reported, self.total_only) {
            (Some(tokens), _) if self.input_reported && output_reported => {
                let usage = Usage {
                    tokens,
                    source: TokenSource::Upstream,
                };
                return (usage, None);
            }
            (Some(r), _) => {
                let i = if self.input_reported {
                    r.input
                } else {
                    r.input.max(input())
                };
                let o = if output_reported {
                    r.output
                } else {
                    r.output.max(output())
                };
                (
                    Tokens::new(i, r.cached_input, o, r.reasoning),
                    Estimated::Partial,
                )
            }
            (None, Some(total)) => {
                let input = input().min(total);
                (
                    Tokens::new(input, 0, total - input, 0),
                    Estimated::TotalOnly,
                )
            }
            (None, None) => {
                let why = if self.unreadable {
                    Estimated::Unreadable
                } else {
                    Estimated::NoUsage
                };
                (Tokens::new(input(), 0, output(), 0), why)
            }
        };
        let usage = Usage {
            tokens,
            source: TokenSource::Estimated,
        };
        (usage, Some(why))
    }
}

impl Generated {
    /// Output tokens of this choice, extrapolated over text not kept, and
    /// capped by `max_tokens`.
    fn output(&self, max_tokens: Option<u64>) -> u64 {
        let mut n = tokens::output(&self.text, None);
        if self.dropped > 0 {
            let per_byte = if self.text.is_empty() {
                0.25
            } else {
                n as f64 / self.text.len() as f64
            };
            n += (per_byte * self.dropped as f64).ceil() as u64;
        }
        max_tokens.map_or(n, |m| n.min(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn read(tally: &mut Tally, json: &str) {
        tally.read(&Document::parse(json.as_bytes()).unwrap());
    }

    fn prompt(max_tokens: Option<u64>) -> Prompt {
        Prompt {
            body: Bytes::from_static(br#"{"messages":[{"role":"user","content":"hello world"}]}"#),
            max_tokens,
        }
    }

    #[test]
    fn cumulative_usage_counts_once_and_partial_objects_merge() {
        let mut t = Tally::default();
        read(
            &mut t,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":10,"completion_tokens":1}}"#,
        );
        read(
            &mut t,
            r#"{"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":10,"completion_tokens":2}}"#,
        );
        read(
            &mut t,
            r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2}}"#,
        );
        let (u, why) = t.settle(Some(&prompt(None)));
        assert_eq!(
            (u.tokens, u.source, why),
            (Tokens::new(10, 0, 2, 0), TokenSource::Upstream, None)
        );
        // Anthropic: input at the start, output in the delta.
        let mut a = Tally::default();
        read(
            &mut a,
            r#"{"type":"message_start","message":{"usage":{"input_tokens":5,"cache_read_input_tokens":20,"output_tokens":1}}}"#,
        );
        read(
            &mut a,
            r#"{"type":"message_delta","usage":{"output_tokens":42}}"#,
        );
        assert_eq!(a.settle(None).0.tokens, Tokens::new(25, 20, 42, 0));
    }

    #[test]
    fn estimates_count_and_cap_each_choice_on_its_own() {
        let mut t = Tally::default();
        // n = 3, max_tokens = 8: each choice generated 10 words.
        let words = " the gateway routes every request and counts each token to";
        for i in 0..3 {
            read(
                &mut t,
                &format!(r#"{{"choices":[{{"index":{i},"delta":{{"content":"{words}"}}}}]}}"#),
            );
        }
        let (u, why) = t.settle(Some(&prompt(Some(8))));
        assert_eq!(u.tokens.output, 24, "8 per choice, three choices");
        assert_eq!(u.tokens.input, 9);
        assert_eq!(
            (u.source, why),
            (TokenSource::Estimated, Some(Estimated::NoUsage))
        );
        let (uncapped, _) = t.settle(Some(&prompt(None)));
        assert_eq!(uncapped.tokens.output, 30);
    }

    #[test]
    fn an_unreadable_or_total_only_usage_is_an_estimate_that_says_so() {
        let mut t = Tally::default();
        read(
            &mut t,
            r#"{"choices":[{"index":0,"message":{"content":"hello world"}}],"usage":{"tokens":"lots"}}"#,
        );
        let (u, why) = t.settle(Some(&prompt(None)));
        assert_eq!(
            (u.tokens, why),
            (Tokens::new(9, 0, 2, 0), Some(Estimated::Unreadable))
        );
        let mut total = Tally::default();
        read(
            &mut total,
            r#"{"choices":[{"index":0,"message":{"content":"x"}}],"usage":{"total_tokens":100}}"#,
        );
        let (u, why) = total.settle(Some(&prompt(None)));
        assert_eq!(
            (u.tokens, why),
            (Tokens::new(9, 0, 91, 0), Some(Estimated::TotalOnly))
        );
        let mut tiny = Tally::default();
        read(&mut tiny, r#"{"usage":{"total_tokens":4}}"#);
        assert_eq!(
            tiny.settle(Some(&prompt(None))).0.tokens,
            Tokens::new(4, 0, 0, 0),
            "input never exceeds the total"
        );
    }

    #[test]
    fn a_side_the_upstream_left_out_is_estimated_and_marked() {
        let mut t = Tally::default();
        read(
            &mut t,
            r#"{"choices":[{"index":0,"message":{"content":"hello world"}}],"usage":{"completion_tokens":20}}"#,
        );
        let (u, why) = t.settle(Some(&prompt(None)));
        assert_eq!(
            (u.tokens, u.source, why),
            (
                Tokens::new(9, 0, 20, 0),
                TokenSource::Estimated,
                Some(Estimated::Partial)
            )
        );
        let mut p = Tally::default();
        read(
            &mut p,
            r#"{"choices":[{"index":0,"message":{"content":"hello world"}}],"usage":{"prompt_tokens":30}}"#,
        );
        assert_eq!(
            p.settle(Some(&prompt(None))).0.tokens,
            Tokens::new(30, 0, 2, 0)
        );
        // Embeddings report prompt tokens only, and that is complete.
        let mut e = Tally::embeddings();
        read(&mut e, r#"{"data":[],"usage":{"prompt_tokens":12}}"#);
        assert_eq!(
            e.settle(None),
            (
                Usage {
                    tokens: Tokens::new(12, 0, 0, 0),
                    source: TokenSource::Upstream
                },
                None
            )
        );
        // Anthropic: each side in its own event makes a whole.
        let mut a = Tally::default();
        read(&mut a, r#"{"message":{"usage":{"input_tokens":5}}}"#);
        read(&mut a, r#"{"usage":{"output_tokens":7}}"#);
        assert_eq!(a.settle(None).1, None);
    }

    #[test]
    fn choices_without_an_index_are_told_apart_by_position() {
        let mut t = Tally::default();
        let words = " the gateway routes every request and counts each token to";
        read(
            &mut t,
            &format!(
                r#"{{"choices":[{{"message":{{"content":"{words}"}}}},{{"message":{{"content":"{words}"}}}}]}}"#
            ),
        );
        assert_eq!(t.settle(Some(&prompt(Some(5)))).0.tokens.output, 10);
    }

    #[test]
    fn text_past_the_bound_is_extrapolated_not_kept() {
        let mut t = Tally::default();
        let chunk = format!(
            r#"{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#,
            " token".repeat(1 << 16)
        );
        for _ in 0..20 {
            read(&mut t, &chunk);
        }
        assert!(t.kept <= MAX_TEXT_BYTES);
        let out = t.settle(None).0.tokens.output;
        let exact = 20 * (1u64 << 16);
        assert!(out.abs_diff(exact) < exact / 100, "{out} vs {exact}");
    }

    #[test]
    fn hostile_choice_indexes_do_not_grow_memory() {
        let mut t = Tally::default();
        for i in 0..2000u32 {
            read(
                &mut t,
                &format!(
                    r#"{{"choices":[{{"index":{},"delta":{{"content":" a"}}}}]}}"#,
                    i * 2_000_000
                ),
            );
        }
        assert_eq!(t.choices.len(), MAX_CHOICES);
        assert_eq!(t.settle(None).0.tokens.output, 2000);
    }
}

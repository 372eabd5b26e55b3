//! Reading one usage object and normalising it to the ledger's one meaning
//! (see `tollgate_schemas::Tokens`): `input` includes `cached_input`,
//! `output` includes `reasoning`.
//!
//! Shapes read, by provider (where in a response they sit is the business
//! of `upstream::response`):
//! - OpenAI, DashScope, vLLM, Zhipu, llama.cpp: `prompt_tokens` includes
//!   `prompt_tokens_details.cached_tokens`; `completion_tokens` includes
//!   `completion_tokens_details.reasoning_tokens` (OpenAI API reference,
//!   "The chat completion object").
//! - DeepSeek: `prompt_cache_hit_tokens` + `prompt_cache_miss_tokens` =
//!   `prompt_tokens` (api-docs.deepseek.com, "Context Caching"). Its
//!   reasoner has answered `completion_tokens: 0` with `reasoning_tokens: 60`
//!   and `total_tokens` = prompt + 60 (router-for-me/CLIProxyAPI#5733).
//! - Moonshot/Kimi: `cached_tokens` at the top of the usage object
//!   (Bike4Mind/bike4mind#1089: "cached_tokens in both spellings").
//! - Anthropic style (and Bedrock's `amazon-bedrock-invocationMetrics`):
//!   `input_tokens` / `inputTokenCount` exclude `cache_read_input_tokens`
//!   and `cache_creation_input_tokens`, so they are added back.
//! - OpenAI Responses style: `input_tokens` includes
//!   `input_tokens_details.cached_tokens`; `output_tokens_details.reasoning_tokens`.
//! - Gemini `usageMetadata`: `candidatesTokenCount` excludes
//!   `thoughtsTokenCount`, which `totalTokenCount` includes
//!   (mozilla-ai/any-llm#1290, vercel/ai#6082); Gemini's OpenAI-compatible
//!   endpoint has reported `completion_tokens` without the thoughts.
//! - Some servers report `total_tokens` alone.
//!
//! Reconciliation, in this order: a count missing beside a present
//! `total_tokens` is derived from it; a subset larger than its parent widens
//! the parent, never the subset shrinks; and a `total_tokens` larger than
//! input + output widens output by the difference (every case seen is
//! reasoning left out of `completion_tokens`). A count is read from a
//! non-negative integer, an integral float or a numeric string; anything
//! else counts as absent, so an odd field never hides the rest.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use tollgate_schemas::Tokens;

/// A usage object as found in a response: readable (an object) or not.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageObject {
    Read(Box<RawUsage>),
    /// A usage-like member that is not an object (`"usage": "n/a"`).
    Unreadable,
}

impl<'de> Deserialize<'de> for UsageObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UsageObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UsageObject, A::Error> {
                let raw = RawUsage::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(UsageObject::Read(Box::new(raw)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<UsageObject, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(UsageObject::Unreadable)
            }
            fn visit_bool<E>(self, _: bool) -> Result<UsageObject, E> {
                Ok(UsageObject::Unreadable)
            }
            fn visit_i64<E>(self, _: i64) -> Result<UsageObject, E> {
                Ok(UsageObject::Unreadable)
            }
            fn visit_u64<E>(self, _: u64) -> Result<UsageObject, E> {
                Ok(UsageObject::Unreadable)
            }
            fn visit_f64<E>(self, _: f64) -> Result<UsageObject, E> {
                Ok(UsageObject::Unreadable)
            }
            fn visit_str<E>(self, _: &str) -> Result<UsageObject, E> {
                Ok(UsageObject::Unreadable)
            }
        }
        d.deserialize_any(V)
    }
}

impl UsageObject {
    /// What the object says; see [`RawUsage::normalize`].
    pub fn counted(&self) -> Counted {
        match self {
            UsageObject::Read(raw) => raw.normalize(),
            UsageObject::Unreadable => Counted::Unreadable,
        }
    }
}

/// What one usage object says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Input and output both counted (or derived from `total_tokens`).
    Tokens(Tokens),
    /// One side counted and the other missing; `input` says which side
    /// was given. The missing side is estimated.
    OneSide { tokens: Tokens, input: bool },
    /// Only a total: the split between input and output is not known.
    TotalOnly(u64),
    /// Present, but without a count that can be read.
    Unreadable,
}

/// Every count field of the shapes in the module docs.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct RawUsage {
    #[serde(default, deserialize_with = "count")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    total_tokens: Option<u64>,
    #[serde(default, deserialize_with = "details")]
    prompt_tokens_details: Details,
    #[serde(default, deserialize_with = "details")]
    completion_tokens_details: Details,
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    prompt_cache_hit_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    prompt_cache_miss_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count", alias = "inputTokenCount")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count", alias = "outputTokenCount")]
    output_tokens: Option<u64>,
    #[serde(
        default,
        deserialize_with = "count",
        alias = "cacheReadInputTokenCount"
    )]
    cache_read_input_tokens: Option<u64>,
    #[serde(
        default,
        deserialize_with = "count",
        alias = "cacheWriteInputTokenCount"
    )]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "details")]
    input_tokens_details: Details,
    #[serde(default, deserialize_with = "details")]
    output_tokens_details: Details,
    // Gemini `usageMetadata`.
    #[serde(default, deserialize_with = "count", rename = "promptTokenCount")]
    gemini_prompt: Option<u64>,
    #[serde(
        default,
        deserialize_with = "count",
        rename = "toolUsePromptTokenCount"
    )]
    gemini_tool_prompt: Option<u64>,
    #[serde(
        default,
        deserialize_with = "count",
        rename = "cachedContentTokenCount"
    )]
    gemini_cached: Option<u64>,
    #[serde(default, deserialize_with = "count", rename = "candidatesTokenCount")]
    gemini_candidates: Option<u64>,
    #[serde(default, deserialize_with = "count", rename = "thoughtsTokenCount")]
    gemini_thoughts: Option<u64>,
    #[serde(default, deserialize_with = "count", rename = "totalTokenCount")]
    gemini_total: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
struct Details {
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    /// The counts in the ledger's meaning, reconciled as the module docs say.
    pub fn normalize(&self) -> Counted {
        let reasoning = self
            .completion_tokens_details
            .reasoning_tokens
            .or(self.output_tokens_details.reasoning_tokens)
            .or(self.gemini_thoughts);
        let (input, cached, output, total) = if self.is_gemini() {
            let input = add(self.gemini_prompt, self.gemini_tool_prompt);
            let output = add(self.gemini_candidates, self.gemini_thoughts);
            (input, self.gemini_cached, output, self.gemini_total)
        } else {
            let (input, cached) = self.input_side();
            let output = self.completion_tokens.or(self.output_tokens);
            (input, cached, output, self.total_tokens)
        };
        let (input, output, one_side) = match (input, output, total) {
            (None, None, None) => return Counted::Unreadable,
            (None, None, Some(t)) if cached.is_none() && reasoning.is_none() => {
                return Counted::TotalOnly(t);
            }
            (Some(i), None, Some(t)) => (i, t.saturating_sub(i), None),
            (None, Some(o), Some(t)) => (t.saturating_sub(o), o, None),
            (Some(i), None, None) => (i, 0, Some(true)),
            (None, Some(o), None) => (0, o, Some(false)),
            (i, o, _) => (i.unwrap_or(0), o.unwrap_or(0), None),
        };
        let mut tokens = Tokens::new(input, cached.unwrap_or(0), output, reasoning.unwrap_or(0));
        if let Some(t) = total {
            tokens.output += t.saturating_sub(tokens.total());
        }
        match one_side {
            Some(input) => Counted::OneSide { tokens, input },
            None => Counted::Tokens(tokens),
        }
    }

    /// Gemini's own names, and none of the OpenAI-style ones beside them.
    fn is_gemini(&self) -> bool {
        let openai = self.prompt_tokens.is_some()
            || self.completion_tokens.is_some()
            || self.input_tokens.is_some()
            || self.output_tokens.is_some();
        !openai && (self.gemini_prompt.is_some() || self.gemini_candidates.is_some())
    }

    /// Input tokens (cached included) and the cached subset.
    fn input_side(&self) -> (Option<u64>, Option<u64>) {
        let hit_miss = self
            .prompt_cache_hit_tokens
            .zip(self.prompt_cache_miss_tokens)
            .map(|(hit, miss)| hit.saturating_add(miss));
        if let Some(prompt) = self.prompt_tokens {
            let cached = self
                .prompt_tokens_details
                .cached_tokens
                .or(self.prompt_cache_hit_tokens)
                .or(self.cached_tokens)
                .or(self.input_tokens_details.cached_tokens);
            return (Some(prompt.max(hit_miss.unwrap_or(0))), cached);
        }
        if hit_miss.is_some() {
            return (hit_miss, self.prompt_cache_hit_tokens);
        }
        let Some(input) = self.input_tokens else {
            let cached = self
                .prompt_tokens_details
                .cached_tokens
                .or(self.cached_tokens)
                .or(self.input_tokens_details.cached_tokens);
            return (None, cached);
        };
        if let Some(cached) = self.input_tokens_details.cached_tokens {
            // Responses style: input already includes cached.
            return (Some(input), Some(cached));
        }
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let created = self.cache_creation_input_tokens.unwrap_or(0);
        let total = input.saturating_add(read).saturating_add(created);
        (
            Some(total),
            self.cache_read_input_tokens.or(self.cached_tokens),
        )
    }
}

fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

/// Largest count believed: no request has ten billion tokens, and a cost
/// built on a larger one would be refused by the lake, losing the event.
const MAX_COUNT: u64 = 10_000_000_000;

/// A token count: a non-negative integer, an integral float or a numeric
/// string, up to [`MAX_COUNT`]; anything else is no count.
pub(crate) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok((v <= MAX_COUNT).then_some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok().filter(|v| *v <= MAX_COUNT))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            let integral = v.fract() == 0.0 && (0.0..=MAX_COUNT as f64).contains(&v);
            Ok(integral.then_some(v as u64))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.trim().parse().ok().filter(|v| *v <= MAX_COUNT))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// A `*_details` object; anything else is empty details.
fn details<'de, D: Deserializer<'de>>(d: D) -> Result<Details, D::Error> {
    Ok(
        crate::upstream::lenient::Lenient::<Details>::deserialize(d)?
            .0
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(json: &str) -> Counted {
        serde_json::from_str::<UsageObject>(json).unwrap().counted()
    }

    fn t(input: u64, cached: u64, output: u64, reasoning: u64) -> Counted {
        Counted::Tokens(Tokens::new(input, cached, output, reasoning))
    }

    #[test]
    fn every_provider_shape_normalises_to_one_meaning() {
        let cases: &[(&str, &str, Counted)] = &[
            (
                "openai",
                r#"{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,
                    "prompt_tokens_details":{"cached_tokens":40},"completion_tokens_details":{"reasoning_tokens":30}}"#,
                t(100, 40, 50, 30),
            ),
            (
                "deepseek",
                r#"{"prompt_tokens":100,"completion_tokens":50,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36,
                    "completion_tokens_details":{"reasoning_tokens":20}}"#,
                t(100, 64, 50, 20),
            ),
            (
                "prompt only",
                r#"{"prompt_tokens":12}"#,
                Counted::OneSide {
                    tokens: Tokens::new(12, 0, 0, 0),
                    input: true,
                },
            ),
            (
                "completion only",
                r#"{"completion_tokens":20}"#,
                Counted::OneSide {
                    tokens: Tokens::new(0, 0, 20, 0),
                    input: false,
                },
            ),
            (
                "a stray gemini key beside openai counts",
                r#"{"prompt_tokens":100,"completion_tokens":50,"totalTokenCount":1}"#,
                t(100, 0, 50, 0),
            ),
            (
                "reasoning alone is no count",
                r#"{"completion_tokens_details":{"reasoning_tokens":5}}"#,
                Counted::Unreadable,
            ),
            (
                "deepseek without prompt_tokens",
                r#"{"completion_tokens":5,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36}"#,
                t(100, 64, 5, 0),
            ),
            (
                "moonshot",
                r#"{"prompt_tokens":2048,"completion_tokens":900,"total_tokens":2948,"cached_tokens":1024}"#,
                t(2048, 1024, 900, 0),
            ),
            (
                "anthropic",
                r#"{"input_tokens":10,"output_tokens":7,"cache_read_input_tokens":80,"cache_creation_input_tokens":5}"#,
                t(95, 80, 7, 0),
            ),
            (
                "bedrock invocation metrics",
                r#"{"inputTokenCount":10,"outputTokenCount":7,"cacheReadInputTokenCount":80,"invocationLatency":900}"#,
                t(90, 80, 7, 0),
            ),
            (
                "responses",
                r#"{"input_tokens":90,"output_tokens":9,"input_tokens_details":{"cached_tokens":30},"output_tokens_details":{"reasoning_tokens":4}}"#,
                t(90, 30, 9, 4),
            ),
            (
                "gemini usageMetadata",
                r#"{"promptTokenCount":20,"candidatesTokenCount":198,"thoughtsTokenCount":405,"totalTokenCount":623,"cachedContentTokenCount":8}"#,
                t(20, 8, 603, 405),
            ),
            (
                "embeddings",
                r#"{"prompt_tokens":12,"total_tokens":12}"#,
                t(12, 0, 0, 0),
            ),
            (
                "explicit zeros",
                r#"{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#,
                t(0, 0, 0, 0),
            ),
            (
                "null details",
                r#"{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":null}"#,
                t(3, 0, 2, 0),
            ),
            (
                "total only",
                r#"{"total_tokens":42}"#,
                Counted::TotalOnly(42),
            ),
            ("empty", "{}", Counted::Unreadable),
            (
                "only unknown keys",
                r#"{"tokens":{"in":1}}"#,
                Counted::Unreadable,
            ),
            ("a string", r#""n/a""#, Counted::Unreadable),
            ("an array", "[1,2]", Counted::Unreadable),
        ];
        for (name, json, want) in cases {
            assert_eq!(&norm(json), want, "{name}");
        }
    }

    #[test]
    fn a_subset_over_its_parent_widens_the_parent() {
        // DeepSeek-reasoner as reported: completion 0, reasoning 60, total 81.
        let reasoner = r#"{"prompt_tokens":21,"completion_tokens":0,"total_tokens":81,
                           "completion_tokens_details":{"reasoning_tokens":60}}"#;
        assert_eq!(norm(reasoner), t(21, 0, 60, 60));
        // No total: reasoning alone widens output.
        let no_total = r#"{"prompt_tokens":21,"completion_tokens":0,"completion_tokens_details":{"reasoning_tokens":60}}"#;
        assert_eq!(norm(no_total), t(21, 0, 60, 60));
        // Cached over prompt: input widens.
        let cached = r#"{"prompt_tokens":10,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":30}}"#;
        assert_eq!(norm(cached), t(30, 30, 1, 0));
        // DeepSeek's hit + miss over prompt_tokens.
        let hit_miss = r#"{"prompt_tokens":50,"completion_tokens":1,"prompt_cache_hit_tokens":40,"prompt_cache_miss_tokens":20}"#;
        assert_eq!(norm(hit_miss), t(60, 40, 1, 0));
    }

    #[test]
    fn total_tokens_reconciles_missing_and_short_counts() {
        let cases: &[(&str, Counted)] = &[
            // Completion left out of a total.
            (r#"{"prompt_tokens":21,"total_tokens":81}"#, t(21, 0, 60, 0)),
            // Prompt left out of a total.
            (
                r#"{"completion_tokens":6,"total_tokens":10}"#,
                t(4, 0, 6, 0),
            ),
            // Gemini compat: completion without thoughts, total with them.
            (
                r#"{"prompt_tokens":7477,"completion_tokens":2060,"total_tokens":11476}"#,
                t(7477, 0, 3999, 0),
            ),
            // A total short of the parts never shrinks them.
            (
                r#"{"prompt_tokens":10,"completion_tokens":10,"total_tokens":5}"#,
                t(10, 0, 10, 0),
            ),
        ];
        for (json, want) in cases {
            assert_eq!(&norm(json), want, "{json}");
        }
    }

    #[test]
    fn counts_are_read_from_numbers_in_any_spelling() {
        let odd = r#"{"prompt_tokens":"12","completion_tokens":3.0,"total_tokens":null,
                      "completion_tokens_details":{"reasoning_tokens":-1}}"#;
        assert_eq!(norm(odd), t(12, 0, 3, 0));
        let negative = r#"{"prompt_tokens":-5,"completion_tokens":20}"#;
        assert_eq!(
            norm(negative),
            Counted::OneSide {
                tokens: Tokens::new(0, 0, 20, 0),
                input: false
            },
            "an unreadable count is a missing side, to be estimated"
        );
        let junk = r#"{"prompt_tokens":true,"completion_tokens":2.5,"prompt_tokens_details":"x"}"#;
        assert_eq!(norm(junk), Counted::Unreadable);
        let huge = r#"{"prompt_tokens":18446744073709551615,"completion_tokens":10000000000,
                       "total_tokens":1e300}"#;
        assert_eq!(
            norm(huge),
            Counted::OneSide {
                tokens: Tokens::new(0, 0, 10_000_000_000, 0),
                input: false
            },
            "past ten billion is no count"
        );
    }

    proptest! {
        #[test]
        fn normalised_counts_keep_the_subset_invariants(
            prompt in proptest::option::of(0u64..MAX_COUNT),
            completion in proptest::option::of(0u64..MAX_COUNT),
            total in proptest::option::of(0u64..MAX_COUNT),
            cached in proptest::option::of(0u64..MAX_COUNT),
            reasoning in proptest::option::of(0u64..MAX_COUNT),
        ) {
            let mut o = serde_json::Map::new();
            let mut put = |k: &str, v: Option<u64>| if let Some(v) = v { o.insert(k.into(), v.into()); };
            put("prompt_tokens", prompt);
            put("completion_tokens", completion);
            put("total_tokens", total);
            if let Some(c) = cached {
                o.insert("prompt_tokens_details".into(), serde_json::json!({"cached_tokens": c}));
            }
            if let Some(r) = reasoning {
                o.insert("completion_tokens_details".into(), serde_json::json!({"reasoning_tokens": r}));
            }
            let json = serde_json::Value::Object(o).to_string();
            if let Counted::Tokens(t) | Counted::OneSide { tokens: t, .. } = norm(&json) {
                prop_assert!(t.cached_input <= t.input);
                prop_assert!(t.reasoning <= t.output);
                // No reported count is ever lowered.
                prop_assert!(t.input >= prompt.unwrap_or(0).max(cached.unwrap_or(0)));
                prop_assert!(t.output >= completion.unwrap_or(0).max(reasoning.unwrap_or(0)));
                prop_assert_eq!(t.cached_input, cached.unwrap_or(0));
                prop_assert_eq!(t.reasoning, reasoning.unwrap_or(0));
                if let Some(total) = total {
                    prop_assert!(t.total() >= total);
                }
            }
        }
    }
}

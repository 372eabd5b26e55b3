//! Reading token usage out of upstream responses and normalising it to the
//! ledger's one meaning (see `tollgate_schemas::Tokens`).
//!
//! Shapes seen in the wild, all mapped here:
//! - OpenAI, DashScope, vLLM: `prompt_tokens` includes
//!   `prompt_tokens_details.cached_tokens`; `completion_tokens` includes
//!   `completion_tokens_details.reasoning_tokens`.
//! - DeepSeek: `prompt_cache_hit_tokens` + `prompt_cache_miss_tokens` =
//!   `prompt_tokens`.
//! - Anthropic style: `input_tokens` excludes `cache_read_input_tokens` and
//!   `cache_creation_input_tokens`, so they are added back.
//! - OpenAI Responses style: `input_tokens_details.cached_tokens`,
//!   `output_tokens_details.reasoning_tokens`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};
use tollgate_schemas::Tokens;

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    prompt_cache_hit_tokens: Option<u64>,
    prompt_cache_miss_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    /// The counts in the ledger's meaning; `None` when the object carries no
    /// token count at all.
    pub fn normalize(&self) -> Option<Tokens> {
        let detail = |d: &Option<Details>, f: fn(&Details) -> Option<u64>| d.as_ref().and_then(f);
        let reasoning = detail(&self.completion_tokens_details, |d| d.reasoning_tokens)
            .or_else(|| detail(&self.output_tokens_details, |d| d.reasoning_tokens))
            .unwrap_or(0);
        if let Some(prompt) = self.prompt_tokens {
            let cached = detail(&self.prompt_tokens_details, |d| d.cached_tokens)
                .or(self.prompt_cache_hit_tokens)
                .unwrap_or(0);
            let output = self.completion_tokens.or(self.output_tokens).unwrap_or(0);
            return Some(Tokens::new(prompt, cached, output, reasoning));
        }
        if let (Some(hit), Some(miss)) =
            (self.prompt_cache_hit_tokens, self.prompt_cache_miss_tokens)
        {
            let output = self.completion_tokens.unwrap_or(0);
            return Some(Tokens::new(hit + miss, hit, output, reasoning));
        }
        if let Some(input) = self.input_tokens {
            let output = self.output_tokens.or(self.completion_tokens).unwrap_or(0);
            if let Some(cached) = detail(&self.input_tokens_details, |d| d.cached_tokens) {
                // Responses style: input already includes cached.
                return Some(Tokens::new(input, cached, output, reasoning));
            }
            let read = self.cache_read_input_tokens.unwrap_or(0);
            let created = self.cache_creation_input_tokens.unwrap_or(0);
            return Some(Tokens::new(input + read + created, read, output, reasoning));
        }
        self.completion_tokens
            .or(self.output_tokens)
            .map(|output| Tokens::new(0, 0, output, reasoning))
    }
}

/// The parts of a response or stream chunk the ledger reads; everything
/// else is skipped without being built.
#[derive(Debug, Default, Deserialize)]
pub struct ResponseView<'a> {
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub choices: Vec<ChoiceView<'a>>,
    #[serde(default)]
    pub usage: Option<RawUsage>,
    #[serde(default)]
    pub error: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChoiceView<'a> {
    #[serde(default, borrow)]
    pub delta: Option<MessageView<'a>>,
    #[serde(default, borrow)]
    pub message: Option<MessageView<'a>>,
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub text: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct MessageView<'a> {
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<Vec<ToolCallView<'a>>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ToolCallView<'a> {
    #[serde(default, borrow)]
    pub function: Option<FunctionView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct FunctionView<'a> {
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub name: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "lenient_text")]
    pub arguments: Option<Cow<'a, str>>,
}

impl ResponseView<'_> {
    /// Appends every piece of generated text to `out`.
    pub fn collect_text(&self, out: &mut String) {
        for c in &self.choices {
            if let Some(t) = &c.text {
                out.push_str(t);
            }
            for m in [&c.delta, &c.message].into_iter().flatten() {
                for t in [&m.reasoning_content, &m.content, &m.refusal]
                    .into_iter()
                    .flatten()
                {
                    out.push_str(t);
                }
                for call in m.tool_calls.iter().flatten() {
                    if let Some(f) = &call.function {
                        for t in [&f.name, &f.arguments].into_iter().flatten() {
                            out.push_str(t);
                        }
                    }
                }
            }
        }
    }
}

/// A string, or anything else (array parts, numbers) taken as no text, so
/// that an odd `content` never costs the usage next to it.
fn lenient_text<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("text")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(json: &str) -> Option<Tokens> {
        serde_json::from_str::<RawUsage>(json).unwrap().normalize()
    }

    #[test]
    fn provider_shapes_normalise_to_one_meaning() {
        let cases: &[(&str, &str, Option<Tokens>)] = &[
            (
                "openai",
                r#"{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,
                    "prompt_tokens_details":{"cached_tokens":40},"completion_tokens_details":{"reasoning_tokens":30}}"#,
                Some(Tokens::new(100, 40, 50, 30)),
            ),
            (
                "deepseek",
                r#"{"prompt_tokens":100,"completion_tokens":50,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36,
                    "completion_tokens_details":{"reasoning_tokens":20}}"#,
                Some(Tokens::new(100, 64, 50, 20)),
            ),
            (
                "deepseek without prompt_tokens",
                r#"{"completion_tokens":5,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36}"#,
                Some(Tokens::new(100, 64, 5, 0)),
            ),
            (
                "anthropic",
                r#"{"input_tokens":10,"output_tokens":7,"cache_read_input_tokens":80,"cache_creation_input_tokens":5}"#,
                Some(Tokens::new(95, 80, 7, 0)),
            ),
            (
                "responses",
                r#"{"input_tokens":90,"output_tokens":9,"input_tokens_details":{"cached_tokens":30},"output_tokens_details":{"reasoning_tokens":4}}"#,
                Some(Tokens::new(90, 30, 9, 4)),
            ),
            (
                "explicit zeros",
                r#"{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#,
                Some(Tokens::default()),
            ),
            (
                "null details",
                r#"{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":null}"#,
                Some(Tokens::new(3, 0, 2, 0)),
            ),
            ("empty", "{}", None),
        ];
        for (name, json, want) in cases {
            assert_eq!(&norm(json), want, "{name}");
        }
    }

    #[test]
    fn odd_content_does_not_hide_usage() {
        let chunk = r#"{"choices":[{"delta":{"content":[{"type":"text","text":"x"}],"reasoning_content":"why"}}],
                        "usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let v: ResponseView = serde_json::from_str(chunk).unwrap();
        let mut text = String::new();
        v.collect_text(&mut text);
        assert_eq!(text, "why");
        assert_eq!(v.usage.unwrap().normalize(), Some(Tokens::new(1, 0, 2, 0)));
    }

    #[test]
    fn text_is_collected_from_every_kind_of_choice() {
        let body = r#"{"choices":[
            {"message":{"content":"a\"b","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}},
            {"text":"c"},
            {"delta":{"refusal":"no"}}]}"#;
        let v: ResponseView = serde_json::from_str(body).unwrap();
        let mut text = String::new();
        v.collect_text(&mut text);
        assert_eq!(text, "a\"bf{}cno");
    }
}

//! Reading one upstream JSON document: a complete response body, or the
//! `data` of one stream event. One parse yields all the gateway acts on:
//! the exact bytes of the model name (for the rename), usage objects in
//! every placement, each choice's generated text, whether the document
//! carries generated content (time to first token), whether a choice
//! finished, and an `error` member. Everything else is skipped unbuilt, and
//! a field of an unexpected type counts as absent instead of failing the
//! parse, so an odd `content` never costs the usage beside it.
//!
//! Usage placements read (each normalised by [`crate::ledger::usage`]):
//! - `usage` at the top: OpenAI and most others; streamed in a last chunk
//!   with `choices: []` when `stream_options.include_usage` is set, or in
//!   every chunk, cumulative (vLLM's `continuous_usage_stats`).
//! - `choices[i].usage`: Moonshot/Kimi streams (earendil-works/pi#2017);
//!   OpenAI's finish chunk has carried it too (maximhq/bifrost#191).
//! - `x_groq.usage`: Groq streams (Portkey-AI/gateway#1072).
//! - `message.usage` and `response.usage`: Anthropic's `message_start` and
//!   the Responses API's `response.completed`, from compatibility layers.
//! - `usageMetadata`: Gemini; `amazon-bedrock-invocationMetrics`: Bedrock.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::lenient::{Lenient, List};
use crate::ledger::usage::UsageObject;

/// The parts of one document the gateway reads.
#[derive(Debug, Default, Deserialize)]
pub struct Document<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    model: Option<&'a RawValue>,
    #[serde(default, borrow)]
    choices: List<Choice<'a>>,
    #[serde(default)]
    usage: Option<UsageObject>,
    #[serde(default)]
    x_groq: Lenient<Envelope>,
    #[serde(default)]
    message: Lenient<Envelope>,
    #[serde(default)]
    response: Lenient<Envelope>,
    #[serde(default, rename = "usageMetadata")]
    usage_metadata: Option<UsageObject>,
    #[serde(default, rename = "amazon-bedrock-invocationMetrics")]
    bedrock_metrics: Option<UsageObject>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    /// Embeddings answer with `data`.
    #[serde(default)]
    data: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<UsageObject>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Choice<'a> {
    #[serde(default, deserialize_with = "choice_index")]
    index: Option<u32>,
    #[serde(default, borrow)]
    delta: Lenient<Message<'a>>,
    #[serde(default, borrow)]
    message: Lenient<Message<'a>>,
    #[serde(default, borrow, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<UsageObject>,
}

#[derive(Debug, Default, Deserialize)]
struct Message<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    reasoning_content: Option<Cow<'a, str>>,
    /// OpenRouter's and newer vLLM's name for `reasoning_content`.
    #[serde(default, borrow, deserialize_with = "text")]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: List<ToolCall<'a>>,
    /// The legacy single function call.
    #[serde(default, borrow)]
    function_call: Lenient<Function<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct ToolCall<'a> {
    #[serde(default, borrow)]
    function: Lenient<Function<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct Function<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    arguments: Option<Cow<'a, str>>,
}

impl<'a> Document<'a> {
    /// `None` when `bytes` is not a JSON object.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        // A derived struct would also take a JSON array, field by position.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    /// Where the top-level `model` string sits in `bytes` (the slice this
    /// document was parsed from), and its value.
    pub fn model(&self, bytes: &[u8]) -> Option<(Range<usize>, Cow<'a, str>)> {
        let raw = self.model?.get();
        let name: Cow<'a, str> = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            // The usual name has no escapes: its bytes are its value.
            Some(plain) if !plain.contains('\\') => Cow::Borrowed(plain),
            _ => serde_json::from_str(raw).ok()?,
        };
        let start = (raw.as_ptr() as usize).checked_sub(bytes.as_ptr() as usize)?;
        let span = start..start + raw.len();
        (span.end <= bytes.len()).then_some((span, name))
    }

    /// The response's `id` and `model`, when they are strings (for traces).
    pub fn identity(&self) -> (Option<String>, Option<String>) {
        let text = |v: Option<&RawValue>| {
            let raw = v.filter(|r| r.get().starts_with('"'))?;
            serde_json::from_str::<String>(raw.get()).ok()
        };
        (text(self.id), text(self.model))
    }

    pub fn choices(&self) -> impl Iterator<Item = &Choice<'a>> {
        self.choices.iter()
    }

    /// Every usage object, whatever its placement.
    pub fn usage(&self) -> impl Iterator<Item = &UsageObject> {
        let envelopes = [&self.x_groq, &self.message, &self.response]
            .into_iter()
            .filter_map(|e| e.0.as_ref()?.usage.as_ref());
        [&self.usage, &self.usage_metadata, &self.bedrock_metrics]
            .into_iter()
            .flatten()
            .chain(envelopes)
            .chain(self.choices().filter_map(|c| c.usage.as_ref()))
    }

    /// Whether any choice carries generated text: content, reasoning, a
    /// refusal, a tool call's name or arguments, or completion text.
    pub fn has_content(&self) -> bool {
        let mut any = false;
        for c in self.choices() {
            c.each_text(|t| any |= !t.is_empty());
        }
        any
    }

    /// Whether a choice says why it stopped.
    pub fn finished(&self) -> bool {
        self.choices()
            .any(|c| c.finish_reason.is_some_and(|r| r.get() != "null"))
    }

    /// A chunk that only reports usage (OpenAI's `include_usage` chunk).
    pub fn is_usage_only(&self) -> bool {
        self.choices().next().is_none() && self.usage.is_some()
    }

    /// Whether the document answers `endpoint`: `choices` for completions,
    /// `data` for embeddings.
    pub fn is_answer(&self, embeddings: bool) -> bool {
        if embeddings {
            self.data.is_some()
        } else {
            self.choices.0.is_some()
        }
    }

    /// The `error` member, if the upstream sent one. An empty one (`""`,
    /// `{}`, `false`, an object of nulls), as some servers put in every
    /// answer, is no error.
    pub fn error(&self) -> Option<Fault> {
        self.error.and_then(Fault::from_error)
    }
}

impl Choice<'_> {
    /// Why the choice stopped (`stop`, `length`, ...), once it has.
    pub fn finish_reason(&self) -> Option<String> {
        // Most stream chunks say `null`: no parse (and no error) for those.
        let raw = self.finish_reason.filter(|r| r.get() != "null")?;
        serde_json::from_str::<String>(raw.get()).ok()
    }

    /// The choice's `index`, when it has a readable one.
    pub fn index(&self) -> Option<u32> {
        self.index
    }

    /// Calls `f` with each piece of generated text in this choice.
    pub fn each_text(&self, mut f: impl FnMut(&str)) {
        if let Some(t) = &self.text {
            f(t);
        }
        for m in [&self.delta.0, &self.message.0].into_iter().flatten() {
            for t in [&m.reasoning_content, &m.reasoning, &m.content, &m.refusal]
                .into_iter()
                .flatten()
            {
                f(t);
            }
            let functions = m
                .tool_calls
                .iter()
                .filter_map(|c| c.function.0.as_ref())
                .chain(m.function_call.0.as_ref());
            for func in functions {
                for t in [&func.name, &func.arguments].into_iter().flatten() {
                    f(t);
                }
            }
        }
    }
}

/// An error an upstream reported in its body or stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub class: FaultClass,
    /// The HTTP status the error names, when it names one.
    pub status: Option<u16>,
    pub message: String,
}

/// What kind of failure an error object describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    RateLimited,
    /// The request itself was refused (a 4xx other than 429).
    Client,
    Server,
}

#[derive(Deserialize, Default)]
struct ErrorObject<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "type", deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    status: Option<&'a RawValue>,
}

impl Fault {
    /// The error an event typed `error` carries: an `error` member, the
    /// data itself as an error object, or the data's text.
    pub fn of_error_event(data: &[u8]) -> Fault {
        if let Some(fault) = Document::parse(data).and_then(|d| d.error()) {
            return fault;
        }
        let from_json = serde_json::from_slice::<&RawValue>(data)
            .ok()
            .and_then(Fault::from_error);
        from_json.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&data[..data.len().min(512)]).into_owned();
            Fault::classify(None, &[], text)
        })
    }

    /// Reads an `error` member: OpenAI's `{message, type, code}`, Google's
    /// `{code, message, status}`, a bare string, or any other value. An
    /// error is any value that is not empty, as the OpenAI SDKs judge it
    /// (they raise on a truthy `error`): `null`, `false`, `0`, `""`, `[]`
    /// and `{}` are none.
    fn from_error(raw: &RawValue) -> Option<Fault> {
        let generic = || Fault::classify(None, &[], "the upstream reported an error".into());
        let value: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
        let obj = match value {
            serde_json::Value::Null | serde_json::Value::Bool(false) => return None,
            serde_json::Value::Number(n) if n.as_f64() == Some(0.0) => return None,
            serde_json::Value::String(text) if text.is_empty() => return None,
            serde_json::Value::String(text) => return Some(Fault::classify(None, &[], text)),
            serde_json::Value::Array(items) if items.is_empty() => return None,
            serde_json::Value::Object(o) if o.is_empty() => return None,
            serde_json::Value::Object(_) => serde_json::from_str::<ErrorObject>(raw.get()).ok(),
            _ => None,
        };
        let Some(obj) = obj else {
            return Some(generic());
        };
        let mut status = None;
        let mut words: Vec<String> = Vec::new();
        for v in [obj.code, obj.status].into_iter().flatten() {
            let v = v.get().trim_matches('"');
            match v.parse::<u16>() {
                Ok(n) if (400..600).contains(&n) => status = status.or(Some(n)),
                _ => words.push(v.to_ascii_lowercase()),
            }
        }
        words.extend(obj.kind.map(|k| k.to_ascii_lowercase()));
        let message = obj
            .message
            .filter(|m| !m.trim().is_empty())
            .map(Cow::into_owned)
            .unwrap_or_else(|| "the upstream reported an error".into());
        Some(Fault::classify(status, &words, message))
    }

    fn classify(status: Option<u16>, words: &[String], message: String) -> Fault {
        let says = |needles: &[&str]| words.iter().any(|w| needles.iter().any(|n| w.contains(n)));
        let class = match status {
            Some(429) => FaultClass::RateLimited,
            Some(400..=499) => FaultClass::Client,
            Some(_) => FaultClass::Server,
            None if says(&[
                "rate_limit",
                "too_many_requests",
                "resource_exhausted",
                "quota",
            ]) =>
            {
                FaultClass::RateLimited
            }
            None if says(&[
                "invalid_request",
                "authentication",
                "permission",
                "not_found",
                "context_length",
                "content_filter",
                "content_policy",
            ]) =>
            {
                FaultClass::Client
            }
            None => FaultClass::Server,
        };
        Fault {
            class,
            status,
            message,
        }
    }
}

/// A choice's index; anything but a non-negative integer is none.
fn choice_index<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = crate::ledger::usage::count(d)?;
    Ok(n.and_then(|n| u32::try_from(n).ok()))
}

/// Text: a string, or content parts (`[{"type": "text", "text": "..."}]`)
/// joined; anything else is no text.
fn text<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
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
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut joined: Option<String> = None;
            while let Some(part) = seq.next_element::<Lenient<Part<'de>>>()? {
                if let Some(t) = part.0.and_then(|p| p.text) {
                    joined.get_or_insert_with(String::new).push_str(&t);
                }
            }
            Ok(joined.map(Cow::Owned))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::usage::Counted;
    use tollgate_schemas::Tokens;

    fn texts(doc: &Document) -> Vec<(u32, String)> {
        doc.choices()
            .map(|c| {
                let mut s = String::new();
                c.each_text(|t| s.push_str(t));
                (c.index().unwrap_or(0), s)
            })
            .collect()
    }

    fn usage(json: &str) -> Vec<Counted> {
        let doc = Document::parse(json.as_bytes()).unwrap();
        doc.usage().map(UsageObject::counted).collect()
    }

    #[test]
    fn usage_is_found_in_every_placement() {
        let u = Counted::Tokens(Tokens::new(2048, 0, 900, 0));
        let n = r#"{"prompt_tokens":2048,"completion_tokens":900}"#;
        let cases = [
            format!(r#"{{"choices":[],"usage":{n}}}"#),
            format!(r#"{{"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop","usage":{n}}}]}}"#),
            format!(r#"{{"choices":[],"x_groq":{{"id":"req_1","usage":{n}}}}}"#),
            format!(r#"{{"type":"message_start","message":{{"usage":{n}}}}}"#),
            format!(r#"{{"type":"response.completed","response":{{"usage":{n}}}}}"#),
            r#"{"usageMetadata":{"promptTokenCount":2048,"candidatesTokenCount":900}}"#.into(),
            r#"{"amazon-bedrock-invocationMetrics":{"inputTokenCount":2048,"outputTokenCount":900}}"#.into(),
        ];
        for json in &cases {
            assert_eq!(usage(json), vec![u], "{json}");
        }
    }

    #[test]
    fn odd_shapes_never_hide_the_usage_beside_them() {
        let json = r#"{"model":7,"choices":[1,{"index":"x","delta":"oops"},{"index":2,"delta":{"content":{"a":1},"tool_calls":"no"}}],
                       "x_groq":[],"message":"hi","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(usage(json), vec![Counted::Tokens(Tokens::new(1, 0, 2, 0))]);
        assert_eq!(usage(r#"{"usage":"n/a"}"#), vec![Counted::Unreadable]);
        assert!(usage(r#"{"usage":null}"#).is_empty());
        assert!(Document::parse(b"[1]").is_none());
        assert!(Document::parse(b"<html>").is_none());
    }

    #[test]
    fn text_is_read_from_every_kind_of_choice_per_index() {
        let body = r#"{"choices":[
            {"index":0,"message":{"content":"a\"b","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}},
            {"index":1,"text":"c"},
            {"index":2,"delta":{"refusal":"no","reasoning":"r"}},
            {"index":3,"delta":{"content":[{"type":"text","text":"x"},{"type":"image_url"},{"type":"text","text":"y"}]}},
            {"index":4,"message":{"function_call":{"name":"g","arguments":"1"}}}]}"#;
        let doc = Document::parse(body.as_bytes()).unwrap();
        assert_eq!(
            texts(&doc),
            vec![
                (0, "a\"bf{}".to_string()),
                (1, "c".into()),
                (2, "rno".into()),
                (3, "xy".into()),
                (4, "g1".into())
            ]
        );
        assert!(doc.has_content());
    }

    #[test]
    fn content_means_generated_text_not_a_role_or_an_empty_delta() {
        let no = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
        ];
        for json in no {
            assert!(
                !Document::parse(json.as_bytes()).unwrap().has_content(),
                "{json}"
            );
        }
        let yes = [
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"Let me"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]}}]}"#,
            r#"{"choices":[{"index":0,"text":" the"}]}"#,
        ];
        for json in yes {
            assert!(
                Document::parse(json.as_bytes()).unwrap().has_content(),
                "{json}"
            );
        }
    }

    #[test]
    fn the_model_span_points_at_the_exact_bytes() {
        let body = br#"{ "id" : "x",  "model" :	"deep\u0073eek-reasoner" , "choices": [] }"#;
        let doc = Document::parse(body).unwrap();
        let (span, name) = doc.model(body).unwrap();
        assert_eq!(&body[span], br#""deep\u0073eek-reasoner""#);
        assert_eq!(name, "deepseek-reasoner");
        assert!(
            Document::parse(br#"{"model":1}"#)
                .unwrap()
                .model(br#"{"model":1}"#)
                .is_none()
        );
    }

    #[test]
    fn error_members_are_classified_by_status_then_by_words() {
        let cases: &[(&str, FaultClass, Option<u16>, &str)] = &[
            (
                r#"{"message":"bad gateway","type":"upstream_error","code":502}"#,
                FaultClass::Server,
                Some(502),
                "bad gateway",
            ),
            (
                r#"{"message":"slow down","type":"rate_limit_error"}"#,
                FaultClass::RateLimited,
                None,
                "slow down",
            ),
            (
                r#"{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}"#,
                FaultClass::RateLimited,
                Some(429),
                "quota",
            ),
            (
                r#"{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}"#,
                FaultClass::Client,
                None,
                "too long",
            ),
            (
                r#"{"message":"nope","code":"400"}"#,
                FaultClass::Client,
                Some(400),
                "nope",
            ),
            (
                r#"{"message":"overloaded","type":"overloaded_error"}"#,
                FaultClass::Server,
                None,
                "overloaded",
            ),
            (r#""it broke""#, FaultClass::Server, None, "it broke"),
            (
                r#"{"code":"internal"}"#,
                FaultClass::Server,
                None,
                "the upstream reported an error",
            ),
            (
                r#"{"message":null}"#,
                FaultClass::Server,
                None,
                "the upstream reported an error",
            ),
            (
                "[1]",
                FaultClass::Server,
                None,
                "the upstream reported an error",
            ),
            (
                "true",
                FaultClass::Server,
                None,
                "the upstream reported an error",
            ),
        ];
        for (error, class, status, message) in cases {
            let json = format!(r#"{{"error":{error}}}"#);
            let f = Document::parse(json.as_bytes()).unwrap().error().unwrap();
            assert_eq!(
                (f.class, f.status, f.message.as_str()),
                (*class, *status, *message),
                "{error}"
            );
        }
        let empty = ["null", r#""""#, "{}", "false", "0", "[]"];
        for e in empty {
            let json = format!(r#"{{"error":{e},"choices":[]}}"#);
            let doc = Document::parse(json.as_bytes()).unwrap();
            assert!(doc.error().is_none(), "{e}");
        }
    }

    #[test]
    fn finished_and_usage_only_chunks_are_told_apart() {
        let fin =
            Document::parse(br#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#)
                .unwrap();
        assert!(fin.finished() && !fin.is_usage_only());
        let open = Document::parse(
            br#"{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert!(!open.finished());
        let usage = Document::parse(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert!(usage.is_usage_only());
    }

    #[test]
    fn the_answers_id_model_and_finish_reasons_are_read_when_they_are_strings() {
        let doc = Document::parse(
            br#"{"id":"chatcmpl-1","model":"qwq-32b","choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            doc.identity(),
            (Some("chatcmpl-1".into()), Some("qwq-32b".into()))
        );
        let reasons: Vec<_> = doc.choices().filter_map(Choice::finish_reason).collect();
        assert_eq!(reasons, ["stop"]);
        let odd = Document::parse(br#"{"id":7,"model":null,"choices":[]}"#).unwrap();
        assert_eq!(odd.identity(), (None, None));
    }
}

//! The client's request body: parsed once, strictly, then rewritten for
//! each upstream attempt.
//!
//! Strict means: valid UTF-8 JSON, an object at the top, no duplicate keys
//! at any depth (two parsers could disagree on which one wins), nesting
//! bounded by serde_json's recursion limit, and the fields the gateway acts
//! on of the right type. Unknown fields are kept and forwarded untouched.
//! Fields that name an upstream address or key (`api_base`, `base_url`,
//! `api_key`, ...) are never read: upstreams come from the config only.

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::GatewayError;

/// Longest model name taken: every model name in use is far shorter, and
/// the name travels into events, headers and logs.
pub const MAX_MODEL_CHARS: usize = 128;

pub use crate::upstream::Endpoint;

/// A parsed request: the body as a JSON object plus the fields the gateway
/// acts on.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub body: Map<String, Value>,
    /// The body as received, kept for token estimation.
    pub raw: Bytes,
    pub model: String,
    pub stream: bool,
    /// Whether the client itself asked for the usage chunk.
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    /// Answers the request asks for: `n` (or `best_of`, if larger) times
    /// the prompts of a completion; `max_tokens` caps each.
    pub choices: u64,
}

impl ClientRequest {
    pub fn parse(endpoint: Endpoint, raw: Bytes) -> Result<Self, GatewayError> {
        let bad = |m: String| GatewayError::InvalidRequest {
            message: m,
            param: None,
        };
        let bad_param = |p: &'static str, m: &str| GatewayError::InvalidRequest {
            message: m.to_string(),
            param: Some(p),
        };
        let text =
            std::str::from_utf8(&raw).map_err(|_| bad("request body is not valid UTF-8".into()))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let value = StrictValue::deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?
            .0;
        let Value::Object(body) = value else {
            return Err(bad("request body must be a JSON object".into()));
        };
        let model = match body.get("model") {
            Some(Value::String(m))
                if m.chars().count() > MAX_MODEL_CHARS || m.chars().any(char::is_control) =>
            {
                return Err(bad_param(
                    "model",
                    "model must be at most 128 characters, without control characters",
                ));
            }
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None => {
                return Err(bad_param("model", "you must provide a model parameter"));
            }
            Some(_) => return Err(bad_param("model", "model must be a string")),
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad_param("stream", "stream must be a boolean")),
        };
        if stream && !endpoint.streams() {
            return Err(bad_param("stream", "this endpoint does not stream"));
        }
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad_param(
                        "stream_options",
                        "stream_options.include_usage must be a boolean",
                    ));
                }
            },
            Some(_) => {
                return Err(bad_param(
                    "stream_options",
                    "stream_options must be an object",
                ));
            }
        };
        let mut max_tokens = None;
        for key in ["max_completion_tokens", "max_tokens"] {
            match body.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) if n.as_u64().is_some() => {
                    max_tokens = max_tokens.or(n.as_u64());
                }
                Some(_) => {
                    let param = if key == "max_tokens" {
                        "max_tokens"
                    } else {
                        "max_completion_tokens"
                    };
                    return Err(bad_param(param, "must be a non-negative integer"));
                }
            }
        }
        match endpoint {
            Endpoint::ChatCompletions => match body.get("messages") {
                Some(Value::Array(m)) if !m.is_empty() => {}
                Some(Value::Array(_)) => {
                    return Err(bad_param("messages", "messages must not be empty"));
                }
                _ => {
                    return Err(bad_param(
                        "messages",
                        "messages must be an array of messages",
                    ));
                }
            },
            Endpoint::Completions => {
                if !body.contains_key("prompt") {
                    return Err(bad_param("prompt", "you must provide a prompt"));
                }
            }
            Endpoint::Embeddings | Endpoint::Moderations => match body.get("input") {
                Some(Value::String(_) | Value::Array(_)) => {}
                _ => return Err(bad_param("input", "input must be a string or an array")),
            },
        }
        let count = |k: &str| body.get(k).and_then(Value::as_u64).unwrap_or(1).max(1);
        let prompts = match body.get("prompt") {
            Some(Value::Array(p)) if p.iter().all(|x| !x.is_number()) => p.len().max(1) as u64,
            _ => 1,
        };
        let choices = count("n").max(count("best_of")).saturating_mul(prompts);
        Ok(Self {
            body,
            raw,
            model,
            stream,
            include_usage,
            max_tokens,
            choices,
        })
    }

    /// The content guard rewrote `body`: `raw` follows, so that estimates
    /// count what goes upstream.
    pub fn masked(&mut self) {
        // A map of plain JSON values always serialises.
        self.raw = Bytes::from(serde_json::to_vec(&self.body).unwrap_or_default());
    }

    /// The body for one upstream attempt: `model` replaced by the target's
    /// name and, on streams, usage requested so the ledger is exact. The
    /// body is edited in place (`model` is kept on `self`), not copied.
    pub fn upstream_body(&mut self, model: &str) -> Bytes {
        self.body
            .insert("model".into(), Value::String(model.to_string()));
        if self.stream && !self.include_usage {
            let opts = self
                .body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(o) = opts {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        // A map of plain JSON values always serialises.
        Bytes::from(serde_json::to_vec(&self.body).unwrap_or_default())
    }
}

/// A JSON value that refuses duplicate object keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(de::Error::custom(format!("duplicate key {shown:?}")));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(body: &str) -> Result<ClientRequest, GatewayError> {
        ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.to_string()))
    }

    fn msg_of(r: Result<ClientRequest, GatewayError>) -> String {
        match r {
            Err(GatewayError::InvalidRequest { message, .. }) => message,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn hostile_bodies_are_400s() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_obj = format!(
            r#"{{"model":"m","messages":{}1{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let cases: Vec<(&str, String, &str)> = vec![
            ("deep array", deep, "recursion limit"),
            ("deep inside", deep_obj, "recursion limit"),
            (
                "dup top",
                r#"{"model":"a","model":"b","messages":[{}]}"#.into(),
                "duplicate key \"model\"",
            ),
            (
                "dup nested",
                r#"{"model":"a","messages":[{"role":"user","role":"system"}]}"#.into(),
                "duplicate key",
            ),
            (
                "stream string",
                r#"{"model":"a","messages":[{}],"stream":"true"}"#.into(),
                "stream must be a boolean",
            ),
            (
                "NaN",
                r#"{"model":"a","messages":[{}],"temperature":NaN}"#.into(),
                "not valid JSON",
            ),
            (
                "lone surrogate",
                r#"{"model":"a\ud800","messages":[{}]}"#.into(),
                "not valid JSON",
            ),
            (
                "trailing",
                r#"{"model":"a","messages":[{}]} x"#.into(),
                "not valid JSON",
            ),
            ("not object", "[1]".into(), "must be a JSON object"),
            ("no model", r#"{"messages":[{}]}"#.into(), "model"),
            (
                "model number",
                r#"{"model":1,"messages":[{}]}"#.into(),
                "model must be a string",
            ),
            ("no messages", r#"{"model":"m"}"#.into(), "messages"),
            (
                "bad max_tokens",
                r#"{"model":"m","messages":[{}],"max_tokens":-1}"#.into(),
                "non-negative",
            ),
            ("empty", "".into(), "not valid JSON"),
            (
                "long model",
                format!(r#"{{"model":"{}","messages":[{{}}]}}"#, "m".repeat(129)),
                "at most 128 characters",
            ),
            (
                "control in model",
                r#"{"model":"a\nb","messages":[{}]}"#.into(),
                "without control characters",
            ),
        ];
        for (name, body, needle) in cases {
            let m = msg_of(parse(&body));
            assert!(m.contains(needle), "{name}: {m}");
        }
        assert!(
            msg_of(ClientRequest::parse(
                Endpoint::ChatCompletions,
                Bytes::from_static(b"\xff\xfe")
            ))
            .contains("UTF-8")
        );
    }

    #[test]
    fn upstream_body_swaps_model_and_asks_for_usage() {
        let mut r = parse(r#"{"model":"deepseek-r1","messages":[{"role":"user","content":"hi"}],"stream":true,"api_base":"http://evil","x":{"y":1}}"#).unwrap();
        assert!(r.stream && !r.include_usage);
        let up: Value = serde_json::from_slice(&r.upstream_body("deepseek-reasoner")).unwrap();
        assert_eq!(up["model"], "deepseek-reasoner");
        assert_eq!(up["stream_options"]["include_usage"], true);
        assert_eq!(up["x"]["y"], 1, "unknown fields are forwarded");
        let mut plain = parse(r#"{"model":"m","messages":[{}]}"#).unwrap();
        let up: Value = serde_json::from_slice(&plain.upstream_body("t")).unwrap();
        assert!(up.get("stream_options").is_none());
    }

    #[test]
    fn max_tokens_and_include_usage_are_read() {
        let r = parse(r#"{"model":"m","messages":[{}],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":7}"#).unwrap();
        assert!(r.include_usage);
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.choices, 1);
        let many = parse(r#"{"model":"m","messages":[{}],"n":4}"#).unwrap();
        assert_eq!(many.choices, 4);
        let prompts = ClientRequest::parse(
            Endpoint::Completions,
            Bytes::from_static(br#"{"model":"m","prompt":["a","b","c"],"n":2,"best_of":5}"#),
        )
        .unwrap();
        assert_eq!(prompts.choices, 15, "best_of 5 for each of 3 prompts");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body));
        }

        #[test]
        fn arbitrary_json_text_never_panics(body in "[\\[\\]{}\":,a-z0-9 \\\\.eE+-]{0,200}") {
            let _ = ClientRequest::parse(Endpoint::Embeddings, Bytes::from(body));
        }
    }
}

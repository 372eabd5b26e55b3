//! Cache keys: SHA-256 over the scope, the endpoint, the requested model
//! and the request body in a canonical form (object keys sorted, values
//! typed and length-prefixed), so field order and whitespace do not
//! matter and no two different requests share a key. Every field counts
//! (messages, tools, response_format, temperature, top_p, seed, max
//! tokens, unknown ones) except `stream` and `stream_options`: a streamed
//! and a whole request get the same answer, replayed in either shape.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::CacheScope;
use crate::proxy::auth::Caller;
use crate::upstream::Endpoint;

/// Body fields that change how the answer is delivered, not what it is.
const DELIVERY: [&str; 2] = ["stream", "stream_options"];

/// The scope's part of a key: who may share an entry.
pub fn scope(scope: CacheScope, caller: &Caller<'_>) -> String {
    let c = &caller.consumer;
    match (scope, c.team.as_deref()) {
        (CacheScope::Global, _) => "global".into(),
        (CacheScope::Team, Some(team)) => format!("team:{team}"),
        (CacheScope::Team, None) | (CacheScope::Consumer, _) => format!("consumer:{}", c.name),
    }
}

/// The exact key of a request, 64 hex digits.
pub fn exact(scope: &str, endpoint: Endpoint, body: &Map<String, Value>) -> String {
    let mut h = Sha256::new();
    h.update(b"tollgate-cache-v1\0");
    string(&mut h, scope);
    string(&mut h, endpoint.path());
    let mut keys: Vec<&String> = body
        .keys()
        .filter(|k| !DELIVERY.contains(&k.as_str()))
        .collect();
    keys.sort();
    h.update((keys.len() as u64).to_le_bytes());
    for k in keys {
        string(&mut h, k);
        value(&mut h, &body[k]);
    }
    hex::encode(h.finalize())
}

/// Hashes everything of `body` except `skip` (top-level keys), in the same
/// canonical form: the sampling parameters a semantic hit must share.
pub fn without(body: &Map<String, Value>, skip: &[&str]) -> String {
    let mut h = Sha256::new();
    let mut keys: Vec<&String> = body
        .keys()
        .filter(|k| !DELIVERY.contains(&k.as_str()) && !skip.contains(&k.as_str()))
        .collect();
    keys.sort();
    for k in keys {
        string(&mut h, k);
        value(&mut h, &body[k]);
    }
    hex::encode(h.finalize())
}

fn string(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn value(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(true) => h.update(b"t"),
        Value::Bool(false) => h.update(b"f"),
        Value::Number(n) => {
            h.update(b"d");
            string(h, &n.to_string());
        }
        Value::String(s) => {
            h.update(b"s");
            string(h, s);
        }
        Value::Array(items) => {
            h.update(b"a");
            h.update((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| value(h, i));
        }
        Value::Object(map) => {
            h.update(b"o");
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.update((keys.len() as u64).to_le_bytes());
            for k in keys {
                string(h, k);
                value(h, &map[k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(json: &str) -> String {
        let Value::Object(m) = serde_json::from_str(json).unwrap() else {
            panic!()
        };
        exact("consumer:app", Endpoint::ChatCompletions, &m)
    }

    #[test]
    fn order_whitespace_and_delivery_do_not_change_the_key() {
        let a =
            key(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.2}"#);
        let b = key(
            r#"{ "temperature": 0.2, "stream": true, "stream_options": {"include_usage": true},
                 "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn every_field_that_changes_the_answer_changes_the_key() {
        let base = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let k = key(base);
        for other in [
            r#"{"model":"m2","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi!"}]}"#,
            r#"{"model":"m","messages":[{"role":"system","content":"hi"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_p":0.5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":1}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"h"},{"role":"user","content":"i"}]}"#,
        ] {
            assert_ne!(key(other), k, "{other}");
        }
        let Value::Object(m) = serde_json::from_str(base).unwrap() else {
            panic!()
        };
        assert_ne!(
            exact("consumer:other", Endpoint::ChatCompletions, &m),
            k,
            "the scope is part of the key"
        );
        assert_ne!(exact("consumer:app", Endpoint::Completions, &m), k);
    }
}

//! Keeping the client's model name in responses.
//!
//! Upstreams answer with their own model name (`deepseek-reasoner`, or the
//! fallback's `qwq-32b`); the client asked for `deepseek-r1` and gets that
//! name back. The rewrite is a byte replacement of `"model":"<served>"`,
//! which cannot match inside a JSON string (quotes there are escaped), so
//! streamed chunks are not re-serialised; a body written with other
//! spacing falls back to a parse and re-serialise.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde_json::Value;

pub struct Rename {
    /// `"model":"<requested>"`
    replacement: Vec<u8>,
    requested: String,
    /// The served name this finder was built for, and the finder.
    finder: Option<(String, memmem::Finder<'static>)>,
}

impl Rename {
    pub fn new(requested: &str) -> Self {
        let mut replacement = b"\"model\":".to_vec();
        replacement.extend_from_slice(&json_string(requested));
        Self {
            replacement,
            requested: requested.to_string(),
            finder: None,
        }
    }

    /// `json` with its top-level `model` (whose value is `served`) renamed.
    pub fn apply(&mut self, json: Bytes, served: Option<&str>) -> Bytes {
        let Some(served) = served.filter(|s| *s != self.requested) else {
            return json;
        };
        if self.finder.as_ref().is_none_or(|(name, _)| name != served) {
            let mut needle = b"\"model\":".to_vec();
            needle.extend_from_slice(&json_string(served));
            self.finder = Some((
                served.to_string(),
                memmem::Finder::new(&needle).into_owned(),
            ));
        }
        let Some((_, finder)) = &self.finder else {
            return json;
        };
        let hits: Vec<usize> = finder.find_iter(&json).collect();
        if hits.is_empty() {
            return self.reserialize(&json).unwrap_or(json);
        }
        let needle_len = finder.needle().len();
        let mut out = BytesMut::with_capacity(json.len() + hits.len() * self.replacement.len());
        let mut at = 0;
        for h in hits {
            out.extend_from_slice(&json[at..h]);
            out.extend_from_slice(&self.replacement);
            at = h + needle_len;
        }
        out.extend_from_slice(&json[at..]);
        out.freeze()
    }

    /// The slow path for JSON with unusual spacing. Works on a whole JSON
    /// document or on one SSE event with a single `data:` line.
    fn reserialize(&self, raw: &[u8]) -> Option<Bytes> {
        let (prefix, body, suffix): (&[u8], &[u8], &[u8]) = match raw.strip_prefix(b"data:") {
            Some(rest) => {
                let end = rest.iter().rposition(|b| !b.is_ascii_whitespace())? + 1;
                (b"data: ", rest[..end].trim_ascii_start(), &rest[end..])
            }
            None => (b"", raw, b""),
        };
        let mut v: Value = serde_json::from_slice(body).ok()?;
        let obj = v.as_object_mut()?;
        if !obj.contains_key("model") {
            return None;
        }
        obj.insert("model".into(), Value::String(self.requested.clone()));
        let mut out = prefix.to_vec();
        serde_json::to_writer(&mut out, &v).ok()?;
        out.extend_from_slice(suffix);
        Some(Bytes::from(out))
    }
}

fn json_string(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_json_is_renamed_in_place() {
        let mut r = Rename::new("deepseek-r1");
        let chunk = Bytes::from_static(b"data: {\"id\":\"x\",\"model\":\"deepseek-reasoner\",\"choices\":[{\"delta\":{\"content\":\"\\\"model\\\":\\\"deepseek-reasoner\\\"\"}}]}\n\n");
        let out = r.apply(chunk, Some("deepseek-reasoner"));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains("\"model\":\"deepseek-r1\""), "{text}");
        assert!(
            text.contains("\\\"model\\\":\\\"deepseek-reasoner\\\""),
            "content is untouched: {text}"
        );
    }

    #[test]
    fn spaced_json_falls_back_to_reserialising() {
        let mut r = Rename::new("m-public");
        let out = r.apply(
            Bytes::from_static(b"data: {\"model\" : \"m-up\", \"a\": 1}\r\n\r\n"),
            Some("m-up"),
        );
        assert_eq!(&out[..], b"data: {\"a\":1,\"model\":\"m-public\"}\r\n\r\n");
        let doc = r.apply(Bytes::from_static(b"{ \"model\": \"m-up\" }"), Some("m-up"));
        assert_eq!(&doc[..], b"{\"model\":\"m-public\"}");
    }

    #[test]
    fn same_name_or_no_name_is_left_alone() {
        let mut r = Rename::new("m");
        let raw = Bytes::from_static(b"data: {\"model\":\"m\"}\n\n");
        assert_eq!(r.apply(raw.clone(), Some("m")), raw);
        assert_eq!(r.apply(raw.clone(), None), raw);
    }
}

//! Keeping the client's model name in responses.
//!
//! Upstreams answer with their own model name (`deepseek-reasoner`, or the
//! fallback's `qwq-32b`); the client asked for `deepseek-r1` and gets that
//! name back. The parse that reads a document (see [`crate::upstream::response`])
//! also says where its top-level `model` string sits, so the rename
//! replaces exactly those bytes and leaves every other byte as sent: any
//! spacing, key order, and every SSE framing (`id:`, `event:`, `retry:`,
//! comments, data split over several lines).

use bytes::{Bytes, BytesMut};

use crate::relay::sse::Event;
use crate::upstream::response::Document;

pub struct Rename {
    requested: String,
    /// `requested` as a JSON string.
    replacement: Vec<u8>,
}

impl Rename {
    pub fn new(requested: &str) -> Self {
        let replacement = serde_json::to_vec(requested).unwrap_or_else(|_| b"\"\"".to_vec());
        Self {
            requested: requested.to_string(),
            replacement,
        }
    }

    /// A complete JSON body, `doc` parsed from it, with the model renamed.
    pub fn body(&self, body: &Bytes, doc: &Document) -> Bytes {
        match doc.model(body) {
            Some((span, served)) if served != self.requested => {
                self.splice(body, span.start, span.len())
            }
            _ => body.clone(),
        }
    }

    /// One SSE event, `doc` parsed from its data, with the model renamed.
    pub fn event(&self, ev: &Event, doc: &Document) -> Bytes {
        let Some(data) = &ev.data else {
            return ev.raw.clone();
        };
        let Some((span, served)) = doc.model(data) else {
            return ev.raw.clone();
        };
        if served == self.requested {
            return ev.raw.clone();
        }
        let at = ev.raw_position(span.start);
        match at.filter(|&at| ev.raw.get(at..at + span.len()) == data.get(span.clone())) {
            Some(at) => self.splice(&ev.raw, at, span.len()),
            None => ev.raw.clone(),
        }
    }

    fn splice(&self, bytes: &[u8], at: usize, len: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(bytes.len() - len + self.replacement.len());
        out.extend_from_slice(&bytes[..at]);
        out.extend_from_slice(&self.replacement);
        out.extend_from_slice(&bytes[at + len..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::sse::Parser;

    fn renamed_events(input: &[u8], requested: &str) -> Vec<u8> {
        let r = Rename::new(requested);
        let mut p = Parser::new(1 << 20);
        p.push(input);
        let mut out = Vec::new();
        while let Some(ev) = p.next_event().unwrap() {
            let data = ev.data.clone().unwrap_or_default();
            let bytes = match Document::parse(&data) {
                Some(doc) => r.event(&ev, &doc),
                None => ev.raw,
            };
            out.extend_from_slice(&bytes);
        }
        out
    }

    #[test]
    fn every_sse_framing_is_renamed_and_nothing_else_changes() {
        let cases: &[(&str, &str)] = &[
            (
                "data: {\"model\":\"up\",\"choices\":[]}\n\n",
                "data: {\"model\":\"pub\",\"choices\":[]}\n\n",
            ),
            (
                "id: 1\ndata: { \"model\" : \"up\", \"a\": 1 }\n\n",
                "id: 1\ndata: { \"model\" : \"pub\", \"a\": 1 }\n\n",
            ),
            (
                "event: chunk\r\nretry: 5\r\ndata:{\"model\":\"up\"}\r\n\r\n",
                "event: chunk\r\nretry: 5\r\ndata:{\"model\":\"pub\"}\r\n\r\n",
            ),
            (
                ": ping\ndata: {\ndata:   \"model\": \"up\",\nid: 9\ndata: \"x\": \"\\\"model\\\":\\\"up\\\"\"\ndata: }\n\n",
                ": ping\ndata: {\ndata:   \"model\": \"pub\",\nid: 9\ndata: \"x\": \"\\\"model\\\":\\\"up\\\"\"\ndata: }\n\n",
            ),
            ("data: [DONE]\n\n", "data: [DONE]\n\n"),
            (": keep-alive\n\n", ": keep-alive\n\n"),
        ];
        for (input, want) in cases {
            let got = renamed_events(input.as_bytes(), "pub");
            assert_eq!(String::from_utf8_lossy(&got), *want, "{input:?}");
        }
    }

    #[test]
    fn a_model_name_inside_content_is_left_alone() {
        let input = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"model\\\":\\\"up\\\"\"}}],\"model\":\"up\"}\n\n";
        let got = String::from_utf8(renamed_events(input.as_bytes(), "pub")).unwrap();
        assert!(got.contains(r#"\"model\":\"up\""#), "{got}");
        assert!(got.ends_with("\"model\":\"pub\"}\n\n"), "{got}");
    }

    #[test]
    fn bodies_keep_their_spacing_and_escaped_names_are_matched_by_value() {
        let r = Rename::new("deepseek-r1");
        let body = Bytes::from_static(
            b"{\n  \"model\": \"deepseek-\\u0072easoner\",\n  \"choices\": []\n}",
        );
        let doc = Document::parse(&body).unwrap();
        let out = r.body(&body, &doc);
        assert_eq!(
            &out[..],
            b"{\n  \"model\": \"deepseek-r1\",\n  \"choices\": []\n}"
        );
        let same = Bytes::from_static(b"{\"model\":\"deepseek-r1\"}");
        let doc = Document::parse(&same).unwrap();
        assert_eq!(r.body(&same, &doc), same);
    }
}

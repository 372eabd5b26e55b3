//! Request paths, normalised before routing.
//!
//! Routing, auth and the upstream URL never see the raw request target:
//! `//v1//chat/completions`, `/v1/x/%2e%2e/chat/completions` and
//! `/v1/./models` all become their plain form, and a path that climbs above
//! the root is refused. The upstream path is fixed per endpoint in any case,
//! and the Host header plays no part in routing.

use axum::http::{Request, Uri};

/// The normalised form of `path`, or `None` when it escapes the root or
/// hides a separator or NUL in an escape.
pub fn normalize(path: &str) -> Option<String> {
    let mut segments: Vec<String> = Vec::new();
    for raw in path.split('/') {
        let seg = decode_segment(raw)?;
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop()?;
            }
            _ => segments.push(seg),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Percent-decodes one segment; an encoded `/`, `\` or NUL is refused, as is
/// a malformed escape or non-UTF-8 result.
fn decode_segment(raw: &str) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_string());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            let b = u8::from_str_radix(hex, 16).ok()?;
            if matches!(b, b'/' | b'\\' | 0) {
                return None;
            }
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Rewrites the request's URI to its normalised path (the query is kept);
/// an unnormalisable path becomes `/invalid-path`, which routes to the 404
/// handler.
pub fn normalize_request<B>(mut req: Request<B>) -> Request<B> {
    let uri = req.uri();
    let path = uri.path();
    let fixed = match normalize(path) {
        Some(p) if p == path => return req,
        Some(p) => p,
        None => "/invalid-path".to_string(),
    };
    let target = match uri.query() {
        Some(q) => format!("{fixed}?{q}"),
        None => fixed,
    };
    if let Ok(new) = target.parse::<Uri>() {
        *req.uri_mut() = new;
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tricks_normalise_to_the_plain_path() {
        let cases = [
            ("/v1/chat/completions", Some("/v1/chat/completions")),
            ("//v1/chat/completions", Some("/v1/chat/completions")),
            ("/v1//chat///completions/", Some("/v1/chat/completions")),
            ("/v1/./models", Some("/v1/models")),
            ("/v1/x/../models", Some("/v1/models")),
            ("/v1/x/%2e%2e/models", Some("/v1/models")),
            ("/v1/x/%2E%2E/models", Some("/v1/models")),
            ("/%76%31/models", Some("/v1/models")),
            ("/..", None),
            ("/v1/../../etc/passwd", None),
            ("/v1/%2f/models", None),
            ("/v1/%5c/models", None),
            ("/v1/%00/models", None),
            ("/v1/%zz/models", None),
            ("/v1/%ff/models", None),
            ("/", Some("/")),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn the_query_survives_normalisation() {
        let req = Request::get("//v1/models?x=1").body(()).unwrap();
        assert_eq!(normalize_request(req).uri().to_string(), "/v1/models?x=1");
        let bad = Request::get("/v1/../../x").body(()).unwrap();
        assert_eq!(normalize_request(bad).uri().path(), "/invalid-path");
    }
}

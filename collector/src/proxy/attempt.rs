//! One upstream attempt and its verdict, judged from what the upstream
//! actually sent, not from its status line alone:
//!
//! - a status of 400 or more fails by its class (429, 4xx, 5xx);
//! - a complete body must be a JSON answer (`choices`, or `data` for
//!   embeddings) without an `error` member; an HTML error page or an
//!   `{"error": ...}` inside a 200 fails like the status it names;
//! - a stream is read up to its first event with generated content before
//!   anything goes to the client; an error event, a JSON body instead of an
//!   event stream, a break, a stall or an end before that first content
//!   fails the attempt.
//!
//! A failure is a fallback trigger like a 5xx of its class, because nothing
//! has been sent yet. An attempt that generated nothing bills nothing (only
//! what the upstream itself reported, if it reported usage).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::config::FallbackTrigger;
use crate::error::{GatewayError, redact};
use crate::ledger::Record;
use crate::ledger::tally::{Tally, Usage};
use crate::proxy::request::{ClientRequest, Endpoint};
use crate::proxy::routing::Candidate;
use crate::relay::rename::Rename;
use crate::relay::{self, Events};
use crate::upstream::response::{Document, Fault, FaultClass};
use crate::upstream::{BodyStream, MediaType, SendError, UpstreamResponse};

/// Longest upstream error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A successful attempt.
pub enum Answer {
    /// A complete JSON body, the client's model name restored.
    Complete { body: Bytes, usage: Usage },
    /// A stream whose first content (or its end) has arrived.
    Stream(Box<relay::Primed>),
}

/// A failed attempt: how the ledger records it and whether the route may
/// fall back.
pub struct Failure {
    pub trigger: FallbackTrigger,
    /// The attempt's `error` in the ledger.
    pub label: &'static str,
    /// The upstream's HTTP status, when a response head arrived.
    pub status: Option<u16>,
    /// Tokens the upstream reported for the failed attempt, if it did.
    pub usage: Option<Usage>,
    pub error: GatewayError,
}

impl Failure {
    fn new(
        trigger: FallbackTrigger,
        label: &'static str,
        status: Option<u16>,
        error: GatewayError,
    ) -> Self {
        Failure {
            trigger,
            label,
            status,
            usage: None,
            error,
        }
    }

    /// A 2xx that is not an answer.
    pub(crate) fn invalid(message: String) -> Self {
        Failure::new(
            FallbackTrigger::ServerError,
            "invalid_response",
            Some(200),
            GatewayError::Upstream { message },
        )
    }

    /// An error the upstream reported in a body or an event.
    pub fn from_fault(fault: Fault, status: Option<u16>, candidate: &Candidate) -> Self {
        let message = scrub(&fault.message, candidate.upstream.secret());
        match fault.class {
            FaultClass::RateLimited => Failure::new(
                FallbackTrigger::RateLimited,
                "429",
                status,
                GatewayError::UpstreamRateLimited { message },
            ),
            FaultClass::Client => Failure::new(
                FallbackTrigger::ClientError,
                "4xx",
                status,
                GatewayError::UpstreamRejected {
                    status: fault.status.unwrap_or(400),
                    message,
                },
            ),
            FaultClass::Server => Failure::new(
                FallbackTrigger::ServerError,
                "5xx",
                status,
                GatewayError::Upstream {
                    message: format!("{} reported an error: {message}", candidate.upstream.name()),
                },
            ),
        }
    }

    pub(crate) fn broken(message: String) -> Self {
        Failure::new(
            FallbackTrigger::Connect,
            "stream_error",
            Some(200),
            GatewayError::Upstream { message },
        )
    }

    pub(crate) fn stalled(message: &str) -> Self {
        Failure::new(
            FallbackTrigger::Timeout,
            "timeout",
            Some(200),
            GatewayError::UpstreamTimeout {
                message: message.into(),
            },
        )
    }
}

/// Sends `req` to `candidate` and judges the answer.
pub async fn run(
    candidate: &Candidate,
    endpoint: Endpoint,
    req: &mut ClientRequest,
    rec: &Record,
    max_response_bytes: usize,
) -> Result<Answer, Failure> {
    let resp = candidate
        .upstream
        .send(endpoint, req.upstream_body(&candidate.model))
        .await
        .map_err(refused)?;
    if resp.status >= 400 {
        return Err(error_status(resp, candidate, rec).await);
    }
    if !(200..300).contains(&resp.status) || resp.status == 204 {
        let mut failure = Failure::invalid(format!(
            "{} answered {} instead of a response",
            candidate.upstream.name(),
            resp.status
        ));
        failure.status = Some(resp.status);
        return Err(failure);
    }
    let media = resp.content_type;
    if req.stream && !media.is_json() {
        let events = Events::new(&req.model, req.include_usage);
        let settle = |t: &Tally| rec.settle(&candidate.upstream, t);
        // Boxed: its state would otherwise widen every request's future.
        let primed = Box::pin(relay::prime(resp, events, candidate, settle)).await;
        return primed.map(|primed| Answer::Stream(Box::new(primed)));
    }
    let idle = resp.idle_timeout;
    let bytes = match read_all(resp.body, max_response_bytes, idle).await {
        Ok(bytes) => bytes,
        Err(ReadError::Timeout) => {
            return Err(Failure::stalled(
                "the upstream stalled while sending its response",
            ));
        }
        Err(ReadError::Broken(m)) => return Err(Failure::broken(m)),
    };
    complete(candidate, rec, req, endpoint, &bytes, media)
}

/// A whole body: an answer, or the failure it reports. A failed attempt
/// is billed what the upstream reported, or an estimate of what it
/// generated; nothing if it generated nothing.
fn complete(
    candidate: &Candidate,
    rec: &Record,
    req: &ClientRequest,
    endpoint: Endpoint,
    bytes: &Bytes,
    media: MediaType,
) -> Result<Answer, Failure> {
    let name = candidate.upstream.name();
    let Some(doc) = Document::parse(bytes) else {
        let what = format!("{name} answered 200 with {media} that is not a JSON response");
        return Err(Failure::invalid(what));
    };
    let mut tally = match endpoint {
        Endpoint::Embeddings => Tally::embeddings(),
        _ => Tally::default(),
    };
    tally.read(&doc);
    let failed = |mut failure: Failure| {
        failure.usage = (tally.reported() || tally.generated())
            .then(|| rec.settle(&candidate.upstream, &tally));
        failure
    };
    if let Some(fault) = doc.error() {
        return Err(failed(Failure::from_fault(fault, Some(200), candidate)));
    }
    if !doc.is_answer(endpoint == Endpoint::Embeddings) {
        let what = format!("{name} answered 200 with JSON that is not a response");
        return Err(failed(Failure::invalid(what)));
    }
    if req.stream {
        // An SDK reading a stream would see no event at all.
        let what = format!("{name} answered a streamed request with a whole JSON body ({media})");
        return Err(failed(Failure::invalid(what)));
    }
    let usage = rec.settle(&candidate.upstream, &tally);
    let body = Rename::new(&req.model).body(bytes, &doc);
    Ok(Answer::Complete { body, usage })
}

fn refused(e: SendError) -> Failure {
    let (trigger, label, error) = match e {
        SendError::Connect(m) | SendError::Other(m) => (
            FallbackTrigger::Connect,
            "connect",
            GatewayError::Upstream { message: m },
        ),
        SendError::Timeout(m) => (
            FallbackTrigger::Timeout,
            "timeout",
            GatewayError::UpstreamTimeout { message: m },
        ),
    };
    Failure::new(trigger, label, None, error)
}

/// A status of 400 or more, with the message of its body.
/// A status of 400 or more, with the message of its body, billed the
/// usage the body reports, if any.
async fn error_status(resp: UpstreamResponse, candidate: &Candidate, rec: &Record) -> Failure {
    let status = resp.status;
    let idle = resp.idle_timeout.min(Duration::from_secs(10));
    let body = read_all(resp.body, MAX_ERROR_BODY, idle).await.ok();
    let doc = body.as_deref().and_then(Document::parse);
    let message = match (&doc, &body) {
        (Some(doc), _) if doc.error().is_some() => doc.error().map(|f| f.message),
        (_, Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
        (_, None) => None,
    };
    let text = scrub(
        message.as_deref().unwrap_or("(no body)"),
        candidate.upstream.secret(),
    );
    let mut tally = Tally::default();
    if let Some(doc) = &doc {
        tally.read(doc);
    }
    let usage = tally
        .reported()
        .then(|| rec.settle(&candidate.upstream, &tally));
    let name = candidate.upstream.name();
    let (trigger, label, error) = match status {
        429 => (
            FallbackTrigger::RateLimited,
            "429",
            GatewayError::UpstreamRateLimited { message: text },
        ),
        500.. => (
            FallbackTrigger::ServerError,
            "5xx",
            GatewayError::Upstream {
                message: format!("{name} answered {status}: {text}"),
            },
        ),
        _ => (
            FallbackTrigger::ClientError,
            "4xx",
            GatewayError::UpstreamRejected {
                status,
                message: text,
            },
        ),
    };
    let mut failure = Failure::new(trigger, label, Some(status), error);
    failure.usage = usage;
    failure
}

pub(crate) enum ReadError {
    Timeout,
    Broken(String),
}

/// The whole body, up to `limit` bytes, with at most `idle` between chunks.
pub(crate) async fn read_all(
    mut body: BodyStream,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, ReadError> {
    let mut buf = BytesMut::new();
    let mut single: Option<Bytes> = None;
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReadError::Broken(e)),
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() + single.as_ref().map_or(0, Bytes::len) > limit {
                    return Err(ReadError::Broken(format!(
                        "upstream response exceeds {limit} bytes"
                    )));
                }
                match single.take() {
                    None if buf.is_empty() => single = Some(chunk),
                    None => buf.extend_from_slice(&chunk),
                    Some(first) => {
                        buf.extend_from_slice(&first);
                        buf.extend_from_slice(&chunk);
                    }
                }
            }
        }
    }
    Ok(single.unwrap_or_else(|| buf.freeze()))
}

/// Longest upstream message passed on, in characters.
const MAX_MESSAGE_CHARS: usize = 512;

/// An upstream's words made safe to pass on: JSON `\uXXXX` escapes
/// decoded, the upstream's key removed, then control characters dropped and
/// the length bounded (in that order, so a cut never leaves a piece of the
/// key).
pub(crate) fn scrub(text: &str, secret: Option<&str>) -> String {
    let text = redact(&unescape(text), &secret.into_iter().collect::<Vec<_>>());
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// `text` with `\uXXXX` escapes decoded (surrogate pairs included), so an
/// escaped key is seen by the redaction; anything else is left as it is.
fn unescape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("\\u") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\\u") {
        out.push_str(&rest[..at]);
        let hex = |s: &str| s.get(..4).and_then(|h| u32::from_str_radix(h, 16).ok());
        let after = &rest[at + 2..];
        let decoded = hex(after).and_then(|hi| {
            if (0xD800..0xDC00).contains(&hi) {
                let lo = after
                    .get(4..6)
                    .filter(|p| *p == "\\u")
                    .and_then(|_| hex(&after[6..]))?;
                let c =
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo.checked_sub(0xDC00)?))?;
                Some((c, 10))
            } else {
                char::from_u32(hi).map(|c| (c, 4))
            }
        });
        match decoded {
            Some((c, used)) => {
                out.push(c);
                rest = &after[used..];
            }
            None => {
                out.push_str("\\u");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_redacted_before_the_message_is_cut_and_in_any_escaping() {
        let key = "sk-UPSTREAM-CANARY-0123456789";
        let long = format!("{}{key} tail", "x".repeat(MAX_MESSAGE_CHARS - 10));
        let out = scrub(&long, Some(key));
        assert!(!out.contains("sk-UPSTREAM"), "{out}");
        assert_eq!(out.chars().count(), MAX_MESSAGE_CHARS);
        let escaped = r"bad key sk-UPSTREAM\u002dCANARY\u002d0123456789 given";
        assert_eq!(scrub(escaped, Some(key)), "bad key [redacted] given");
        let pair = r"emoji \ud83d\ude00 and \u00e9 and a stray \uZZZZ";
        assert_eq!(scrub(pair, None), r"emoji 😀 and é and a stray \uZZZZ");
        assert_eq!(scrub("line\nbreak\u{7}", None), "linebreak");
    }
}

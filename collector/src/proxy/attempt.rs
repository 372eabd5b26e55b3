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

use bytes::Bytes;

use crate::config::FallbackTrigger;
use crate::error::GatewayError;
use crate::ledger::Record;
use crate::ledger::tally::{Tally, Usage};
use crate::proxy::failure::{Failure, scrub};
use crate::proxy::request::{ClientRequest, Endpoint};
use crate::proxy::routing::Candidate;
use crate::relay::rename::Rename;
use crate::relay::{self, Events};
use crate::upstream::read::{ReadError, read_all};
use crate::upstream::response::Document;
use crate::upstream::{MediaType, SendError, UpstreamResponse};

/// Longest upstream error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A successful attempt.
pub enum Answer {
    /// A complete JSON body, the client's model name restored.
    Complete { body: Bytes, usage: Usage },
    /// A stream whose first content (or its end) has arrived.
    Stream(Box<relay::Primed>),
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
        .send(
            endpoint,
            req.upstream_body(&candidate.model),
            &rec.trace_headers(),
        )
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

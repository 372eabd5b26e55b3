//! Relaying a streamed (SSE) response to the client, event by event.
//!
//! [`prime`] reads the upstream's events up to the first one that carries
//! generated content (or a finish, `[DONE]`, or the end), holding them back:
//! until then nothing is committed and the attempt may still fail over.
//! From there the [`Relay`] sends each complete event as soon as it is
//! parsed, with the model renamed and the usage-only chunk dropped when the
//! client did not ask for it (the gateway asked on its behalf). It keeps a
//! [`Tally`] of usage and text, never the chunks.
//!
//! The client always receives whole events: a partial line the upstream
//! left when it broke is dropped, and an unterminated last event that
//! parses is terminated, so the gateway's own closing error event is one a
//! standard SSE client reads. An `error` event (by its `event:` type or an
//! `error` member in its data) is an upstream error: the relay sends the
//! gateway's error event in its place and ends.
//!
//! The relay owns the request's [`Record`]. It closes it when the stream
//! ends, when the upstream breaks, or when the client disconnects and the
//! relay is dropped, which also drops, and so cancels, the upstream request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::time::Sleep;
use tollgate_schemas::Outcome;

use crate::attempt::{Failure, scrub};
use crate::ledger::Record;
use crate::rename::Rename;
use crate::response::{Document, Fault, FaultClass};
use crate::routing::Candidate;
use crate::sse::{self, Event};
use crate::tally::{Tally, Usage};
use crate::upstream::UpstreamResponse;

/// Longest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 8 << 20;
/// Most bytes held back while waiting for the first content; past it the
/// stream is committed without it.
const MAX_HELD_BYTES: usize = 256 * 1024;
/// Most bytes gathered from chunks that are already waiting before they go
/// out together.
const COALESCE_BYTES: usize = 64 * 1024;

/// What the relay reads from the upstream's events, apart from the record.
pub struct Events {
    parser: sse::Parser,
    rename: Rename,
    client_wants_usage: bool,
    tally: Tally,
    /// When the first event with generated content was read.
    first_content: Option<Instant>,
    finished: bool,
    saw_done: bool,
}

/// What to do with one event.
enum Step {
    Send(Bytes),
    Skip,
    Fault(Fault),
}

impl Events {
    pub fn new(requested: &str, client_wants_usage: bool) -> Self {
        Self {
            parser: sse::Parser::new(MAX_EVENT_BYTES),
            rename: Rename::new(requested),
            client_wants_usage,
            tally: Tally::default(),
            first_content: None,
            finished: false,
            saw_done: false,
        }
    }

    /// One event: read what the ledger needs, return what the client gets.
    fn process(&mut self, ev: Event) -> Step {
        let Some(data) = &ev.data else {
            return Step::Send(ev.raw);
        };
        if data.trim_ascii() == b"[DONE]" {
            self.saw_done = true;
            return Step::Send(ev.raw);
        }
        let doc = Document::parse(data);
        if let Some(doc) = &doc {
            // Usage beside an error is still usage the upstream billed.
            self.tally.read(doc);
        }
        if ev.is_error() {
            return Step::Fault(Fault::of_error_event(data));
        }
        let Some(doc) = doc else {
            if data.trim_ascii_start().starts_with(b"{") {
                // JSON the reader refuses (duplicate keys, say) may hold usage.
                self.tally.unreadable();
            }
            return Step::Send(ev.raw);
        };
        if let Some(fault) = doc.error() {
            return Step::Fault(fault);
        }
        if self.first_content.is_none() && doc.has_content() {
            self.first_content = Some(Instant::now());
        }
        if !self.finished {
            self.finished = doc.finished();
        }
        if doc.is_usage_only() && !self.client_wants_usage {
            return Step::Skip;
        }
        Step::Send(self.rename.event(&ev, &doc))
    }

    /// The unterminated last event when the body ends: terminated if it is
    /// a whole event, dropped if it is a partial line.
    fn tail(&mut self) -> Option<Step> {
        let ev = self.parser.finish()?;
        let Some(data) = ev.data.as_ref() else {
            // A JSON error sent without SSE framing.
            let fault = Document::parse(ev.raw.trim_ascii()).and_then(|d| d.error());
            return fault.map(Step::Fault);
        };
        let whole =
            data.trim_ascii() == b"[DONE]" || Document::parse(data).is_some() || ev.is_error();
        if !whole {
            return None;
        }
        Some(match self.process(ev) {
            Step::Send(raw) => {
                // Whatever line ending the upstream left, end on a blank line.
                let body = raw.trim_ascii_end();
                let mut out = BytesMut::with_capacity(body.len() + 2);
                out.extend_from_slice(body);
                out.extend_from_slice(b"\n\n");
                Step::Send(out.freeze())
            }
            other => other,
        })
    }

    /// The stream is committed once a choice generated content or finished.
    fn committed(&self) -> bool {
        self.first_content.is_some() || self.finished
    }

    /// What a failed attempt is billed: what the upstream reported, or an
    /// estimate of what it generated; nothing if it generated nothing.
    fn failed_usage(&self, settle: impl Fn(&Tally) -> Usage) -> Option<Usage> {
        (self.tally.reported() || self.tally.generated()).then(|| settle(&self.tally))
    }
}

/// A stream whose first content has arrived, with what came before it.
pub struct Primed {
    upstream: UpstreamResponse,
    events: Events,
    held: Option<Bytes>,
    /// The upstream's body has already ended.
    ended: bool,
}

impl Primed {
    /// When the first event with generated content was read.
    pub fn first_content(&self) -> Option<Instant> {
        self.events.first_content
    }
}

/// Reads the stream up to its first content, holding back what came
/// before it; any failure on the way is the attempt's failure, billed by
/// `settle` if the upstream reported or generated anything. Events without
/// data (keep-alive comments) are not held: they mean nothing once the
/// content comes.
pub async fn prime(
    mut upstream: UpstreamResponse,
    mut events: Events,
    candidate: &Candidate,
    settle: impl Fn(&Tally) -> Usage,
) -> Result<Primed, Failure> {
    let mut held = BytesMut::new();
    let fail = |events: &Events, mut failure: Failure| {
        failure.usage = events.failed_usage(&settle);
        failure
    };
    let idle = tokio::time::sleep(upstream.idle_timeout);
    tokio::pin!(idle);
    let ended = 'read: loop {
        let next = tokio::select! {
            biased;
            next = upstream.body.next() => Ok(next),
            () = &mut idle => Err(()),
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + upstream.idle_timeout);
        let chunk = match next {
            Err(()) => {
                let stalled = Failure::stalled("the upstream stalled before its first token");
                return Err(fail(&events, stalled));
            }
            Ok(Some(Err(e))) => {
                let message = format!("the upstream stream broke before its first token: {e}");
                return Err(fail(&events, Failure::broken(message)));
            }
            Ok(None) => {
                match events.tail() {
                    Some(Step::Send(bytes)) => held.extend_from_slice(&bytes),
                    Some(Step::Fault(f)) => {
                        return Err(fail(&events, Failure::from_fault(f, Some(200), candidate)));
                    }
                    Some(Step::Skip) | None => {}
                }
                if !events.committed() {
                    let message = "the upstream stream ended before its first token".to_string();
                    return Err(fail(&events, Failure::broken(message)));
                }
                break true;
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        events.parser.push(&chunk);
        loop {
            let ev = match events.parser.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    let broken = Failure::broken("the upstream sent an oversized event".into());
                    return Err(fail(&events, broken));
                }
            };
            let keep = ev.data.is_some();
            match events.process(ev) {
                Step::Send(bytes) if keep => held.extend_from_slice(&bytes),
                Step::Send(_) | Step::Skip => {}
                Step::Fault(f) => {
                    return Err(fail(&events, Failure::from_fault(f, Some(200), candidate)));
                }
            }
            if events.committed() {
                // The rest stays in the parser for the relay.
                break 'read false;
            }
            if held.len() > MAX_HELD_BYTES {
                let message = format!(
                    "{} sent over {MAX_HELD_BYTES} bytes of events without generated content",
                    candidate.upstream.name()
                );
                return Err(fail(&events, Failure::invalid(message)));
            }
        }
    };
    Ok(Primed {
        upstream,
        events,
        held: (!held.is_empty()).then(|| held.freeze()),
        ended,
    })
}

pub struct Relay {
    record: Option<Record>,
    candidate: Candidate,
    upstream: UpstreamResponse,
    sent_at: Instant,
    idle: Pin<Box<Sleep>>,
    events: Events,
    held: Option<Bytes>,
    upstream_ended: bool,
    ended: bool,
}

impl Relay {
    pub fn new(record: Record, candidate: Candidate, primed: Primed, sent_at: Instant) -> Self {
        let idle = Box::pin(tokio::time::sleep(primed.upstream.idle_timeout));
        Self {
            record: Some(record),
            candidate,
            upstream: primed.upstream,
            sent_at,
            idle,
            events: primed.events,
            held: primed.held,
            upstream_ended: primed.ended,
            ended: false,
        }
    }

    /// Turns complete events into bytes for the client; `false` once the
    /// relay has ended on an error.
    fn drain_events(&mut self, out: &mut Gathered) -> bool {
        loop {
            let ev = match self.events.parser.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return true,
                Err(_) => {
                    self.fail(out, "stream_error", "the upstream sent an oversized event");
                    return false;
                }
            };
            match self.events.process(ev) {
                Step::Send(bytes) => out.push(bytes),
                Step::Skip => {}
                Step::Fault(f) => {
                    self.fault(out, f);
                    return false;
                }
            }
        }
    }

    /// The upstream's body ended.
    fn finish(&mut self, out: &mut Gathered) {
        match self.events.tail() {
            Some(Step::Send(bytes)) => out.push(bytes),
            Some(Step::Fault(f)) => return self.fault(out, f),
            Some(Step::Skip) | None => {}
        }
        if self.events.saw_done {
            self.close(None, Outcome::Ok);
        } else {
            self.fail(
                out,
                "stream_error",
                "the upstream stream ended without [DONE]",
            );
        }
    }

    fn fault(&mut self, out: &mut Gathered, f: Fault) {
        let label = match f.class {
            FaultClass::RateLimited => "429",
            FaultClass::Client => "4xx",
            FaultClass::Server => "5xx",
        };
        let message = scrub(&f.message, self.candidate.upstream.secret());
        tracing::warn!(upstream = self.candidate.upstream.name(), error = %message, "the upstream sent an error event mid-stream");
        self.close(Some(label), Outcome::UpstreamError);
        out.push(error_event(&message, "upstream_error"));
    }

    /// Ends the relay with the gateway's own error event.
    fn fail(&mut self, out: &mut Gathered, label: &str, message: &str) {
        self.close(Some(label), Outcome::UpstreamError);
        out.push(error_event(message, "stream_error"));
    }

    /// Closes the record once. `error` is the attempt's failure, if any.
    fn close(&mut self, error: Option<&str>, outcome: Outcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        let latency = self.sent_at.elapsed();
        let status = self.upstream.status;
        if let Some(mut rec) = self.record.take() {
            if let Some(at) = self.events.first_content {
                rec.first_token(at);
            }
            let usage = rec.settle(&self.candidate.upstream, &self.events.tally);
            rec.attempt(&self.candidate, Some(status), error, latency, Some(usage));
            match error {
                None => rec.finish(status),
                Some(kind) => rec.finish_with(status, outcome, kind),
            }
        }
    }
}

/// The gateway's own error event, in OpenAI's error shape.
fn error_event(message: &str, code: &str) -> Bytes {
    let body = serde_json::json!({"error": {
        "message": message, "type": "upstream_error", "param": null, "code": code,
    }});
    Bytes::from(format!("data: {body}\n\n"))
}

/// Bytes gathered for one write: a single chunk as is, several copied
/// into one buffer.
#[derive(Default)]
struct Gathered {
    single: Option<Bytes>,
    buf: Option<BytesMut>,
}

impl Gathered {
    fn push(&mut self, bytes: Bytes) {
        match (self.single.take(), self.buf.as_mut()) {
            (None, None) => self.single = Some(bytes),
            (Some(first), None) => {
                let mut buf = BytesMut::with_capacity(first.len() + bytes.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&bytes);
                self.buf = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&bytes),
        }
    }

    fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, BytesMut::len) + self.single.as_ref().map_or(0, Bytes::len)
    }

    fn take(self) -> Option<Bytes> {
        self.buf.map(BytesMut::freeze).or(self.single)
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    /// Relays whatever the upstream has ready, never waiting to fill a
    /// buffer: chunks that already arrived go out in one write, and the
    /// first `Pending` sends what was gathered.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut out = Gathered::default();
        if let Some(held) = this.held.take() {
            out.push(held);
            // Events read in the same chunk as the first content.
            this.drain_events(&mut out);
        }
        if this.upstream_ended && !this.ended {
            this.finish(&mut out);
        }
        loop {
            if this.ended {
                return Poll::Ready(out.take().map(Ok));
            }
            match this.upstream.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = tokio::time::Instant::now() + this.upstream.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    this.events.parser.push(&chunk);
                    if this.drain_events(&mut out) && out.len() >= COALESCE_BYTES {
                        break;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(upstream = this.candidate.upstream.name(), error = %e, "upstream stream broke");
                    if this.drain_events(&mut out) {
                        this.fail(
                            &mut out,
                            "stream_error",
                            "the upstream stream broke before it finished",
                        );
                    }
                }
                Poll::Ready(None) => this.finish(&mut out),
                Poll::Pending => {
                    if out.len() > 0 {
                        break;
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.fail(&mut out, "timeout", "the upstream stream stalled");
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(out.take().map(Ok))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client went away mid-stream: bill what was generated.
        self.close(Some("client_cancelled"), Outcome::ClientCancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::simulate::SimSettings;
    use crate::upstream::Upstream;

    fn settle(t: &Tally) -> Usage {
        t.settle(None).0
    }

    fn candidate() -> Candidate {
        Candidate {
            upstream: Arc::new(Upstream::simulated("up", "test", SimSettings::default())),
            model: "served".into(),
            route_model: "asked".into(),
        }
    }

    /// An upstream response whose body yields `parts` (`None` = the body
    /// breaks there), each after `gap`.
    fn upstream(parts: Vec<Option<&'static str>>, gap: Duration) -> UpstreamResponse {
        let body = futures_util::stream::iter(parts).then(move |p| async move {
            tokio::time::sleep(gap).await;
            p.map(|s| Bytes::from_static(s.as_bytes()))
                .ok_or_else(|| "reset".to_string())
        });
        UpstreamResponse {
            status: 200,
            content_type: crate::upstream::MediaType::of(None),
            body: Box::pin(body),
            idle_timeout: Duration::from_millis(200),
        }
    }

    async fn primed(parts: Vec<Option<&'static str>>) -> Result<Primed, Failure> {
        let events = Events::new("asked", false);
        prime(
            upstream(parts, Duration::ZERO),
            events,
            &candidate(),
            settle,
        )
        .await
    }

    const ROLE: &str = "data: {\"model\":\"served\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    const HI: &str = "data: {\"model\":\"served\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";

    #[tokio::test]
    async fn data_events_before_the_first_content_are_held_and_renamed() {
        let p = primed(vec![
            Some(ROLE),
            Some(": ka\n\n"),
            Some(HI),
            Some("data: [DONE]\n\n"),
        ])
        .await
        .ok()
        .unwrap();
        let held = String::from_utf8(p.held.clone().unwrap().to_vec()).unwrap();
        assert_eq!(held.matches("\"model\":\"asked\"").count(), 2, "{held}");
        assert!(
            !held.contains(": ka") && !held.contains("[DONE]"),
            "keep-alives are not held, and nothing past the first content: {held}"
        );
        assert!(p.first_content().is_some() && !p.ended);
    }

    #[tokio::test]
    async fn any_failure_before_the_first_content_fails_the_attempt() {
        let cases: Vec<(Vec<Option<&'static str>>, &str)> = vec![
            (
                vec![Some(
                    "data: {\"error\":{\"message\":\"x\",\"code\":502}}\n\n",
                )],
                "5xx",
            ),
            (
                vec![
                    Some(ROLE),
                    Some(
                        "event: error\ndata: {\"message\":\"busy\",\"type\":\"rate_limit_error\"}\n\n",
                    ),
                ],
                "429",
            ),
            (vec![Some(ROLE), None], "stream_error"),
            (vec![Some(ROLE)], "stream_error"),
            (vec![Some("<html>oops</html>")], "stream_error"),
            (
                vec![Some("{\"error\":{\"message\":\"no\",\"code\":503}}")],
                "5xx",
            ),
        ];
        for (parts, label) in cases {
            let shown = format!("{parts:?}");
            let f = primed(parts)
                .await
                .err()
                .unwrap_or_else(|| panic!("{shown}"));
            assert_eq!(f.label, label, "{shown}");
            assert!(
                f.usage.is_none(),
                "{shown}: nothing generated, nothing billed"
            );
        }
        let stalled = prime(
            upstream(vec![Some(ROLE), Some(HI)], Duration::from_millis(500)),
            Events::new("asked", false),
            &candidate(),
            settle,
        )
        .await;
        assert_eq!(stalled.err().map(|f| f.label), Some("timeout"));
    }

    #[tokio::test]
    async fn a_finish_commits_a_stream_without_content_and_done_alone_does_not() {
        let fin =
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"content_filter\"}]}";
        let both = format!("{fin}\n\ndata: [DONE]");
        let p = primed(vec![Some(ROLE), Some(both.leak())])
            .await
            .ok()
            .unwrap();
        assert!(
            p.first_content().is_none() && !p.ended,
            "the rest is the relay's"
        );
        let ended = primed(vec![Some(ROLE), Some(fin)]).await.ok().unwrap();
        assert!(ended.ended);
        let held = ended.held.unwrap();
        assert!(
            held.ends_with(b"\"content_filter\"}]}\n\n"),
            "the last event is terminated: {held:?}"
        );
        let done_only = primed(vec![Some(ROLE), Some("data: [DONE]\n\n")]).await;
        assert_eq!(done_only.err().map(|f| f.label), Some("stream_error"));
    }
}

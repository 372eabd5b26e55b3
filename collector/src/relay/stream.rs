//! Sending a committed stream to the client, event by event, and closing
//! the request's record when it ends, breaks or is abandoned.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::Sleep;
use tollgate_schemas::Outcome;

use crate::ledger::Record;
use crate::observe::InFlight;
use crate::policy::cache::fill::StreamFill;
use crate::policy::screen::Blocked;
use crate::policy::screen::holdback::{Holdback, Released};
use crate::proxy::failure::scrub;
use crate::proxy::routing::Candidate;
use crate::relay::events::{Events, Step};
use crate::relay::prime::Primed;
use crate::upstream::UpstreamResponse;
use crate::upstream::response::{Fault, FaultClass};

/// Most bytes gathered from chunks that are already waiting before they go
/// out together.
const COALESCE_BYTES: usize = 64 * 1024;

pub struct Relay {
    record: Option<Record>,
    candidate: Candidate,
    upstream: UpstreamResponse,
    sent_at: Instant,
    idle: Pin<Box<Sleep>>,
    events: Events,
    held: Option<Bytes>,
    /// The content guard's output check, when a rule applies.
    guard: Option<Holdback>,
    /// A cache miss to store once the stream ends normally.
    fill: Option<StreamFill>,
    upstream_ended: bool,
    ended: bool,
    _open: InFlight,
}

impl Relay {
    pub fn new(
        record: Record,
        candidate: Candidate,
        primed: Primed,
        sent_at: Instant,
        guard: Option<Holdback>,
        fill: Option<StreamFill>,
    ) -> Self {
        let mut record = record;
        record.served_by(&candidate);
        record.responded();
        let idle = Box::pin(tokio::time::sleep(primed.upstream.idle_timeout));
        let open = record.stream_opened();
        Self {
            record: Some(record),
            candidate,
            upstream: primed.upstream,
            sent_at,
            idle,
            events: primed.events,
            held: primed.held,
            guard,
            fill,
            upstream_ended: primed.ended,
            ended: false,
            _open: open,
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
            if let Some(fill) = self.fill.as_mut()
                && !self.events.client_wants_usage
                && let Some(data) = ev.data.as_deref()
            {
                fill.usage_of(data);
            }
            match self.events.process(ev) {
                Step::Send(bytes) => {
                    if !self.send(out, bytes) {
                        return false;
                    }
                }
                Step::Skip => {}
                Step::Fault(f) => {
                    self.abort_guard();
                    self.fault(out, f);
                    return false;
                }
            }
        }
    }

    /// Sends whole events, through the content guard when one applies;
    /// `false` once the guard has blocked the stream.
    fn send(&mut self, out: &mut Gathered, bytes: Bytes) -> bool {
        let Some(guard) = self.guard.as_mut() else {
            if let Some(fill) = self.fill.as_mut() {
                fill.observe(&bytes);
            }
            out.push(bytes);
            return true;
        };
        let released = guard.push(&bytes);
        self.released(out, released)
    }

    fn released(&mut self, out: &mut Gathered, released: Released) -> bool {
        match released {
            Released::Events(events) => {
                for b in events {
                    if let Some(fill) = self.fill.as_mut() {
                        fill.observe(&b);
                    }
                    out.push(b);
                }
                true
            }
            Released::Blocked(b) => {
                self.block(out, &b);
                false
            }
        }
    }

    /// The stream failed: what the guard holds was never checked whole and
    /// is not sent.
    fn abort_guard(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            g.abort();
        }
    }

    /// Whatever the guard still holds, checked to the end and released.
    fn drain_guard(&mut self, out: &mut Gathered) -> bool {
        match self.guard.as_mut().map(Holdback::finish) {
            Some(released) => self.released(out, released),
            None => true,
        }
    }

    /// The guard blocked the answer: billed for what was generated, ended
    /// with the gateway's `content_blocked` error event.
    fn block(&mut self, out: &mut Gathered, b: &Blocked) {
        let error = crate::error::GatewayError::blocked(b);
        if let Some(rec) = self.record.as_mut() {
            rec.blocked(b);
        }
        // The attempt itself succeeded; the request is what was blocked.
        self.close_as(None, Outcome::Blocked, Some(error.kind()));
        let body = error.body();
        out.push(Bytes::from(format!("data: {body}\n\n")));
    }

    /// The upstream's body ended.
    fn finish(&mut self, out: &mut Gathered) {
        match self.events.tail() {
            Some(Step::Send(bytes)) => {
                if !self.send(out, bytes) {
                    return;
                }
            }
            Some(Step::Fault(f)) => {
                self.abort_guard();
                self.fault(out, f);
                return;
            }
            Some(Step::Skip) | None => {}
        }
        if self.events.saw_done {
            if self.drain_guard(out) {
                self.close(None, Outcome::Ok);
            }
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
        self.abort_guard();
        self.close(Some(label), Outcome::UpstreamError);
        out.push(error_event(message, "stream_error"));
    }

    /// Closes the record once. `error` is the attempt's failure, if any.
    fn close(&mut self, error: Option<&str>, outcome: Outcome) {
        self.close_as(error, outcome, error);
    }

    /// Closes the record once: `error` is the attempt's failure, if any,
    /// `error_type` the request's (`None`: a success).
    fn close_as(&mut self, error: Option<&str>, outcome: Outcome, error_type: Option<&str>) {
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
            // A masked answer is this client's alone: never shared.
            let masked = self.guard.as_ref().is_some_and(Holdback::masked);
            if let Some(fill) = self.fill.take()
                && error_type.is_none()
                && !masked
            {
                let cost = rec.price(&self.candidate.model, &usage.tokens);
                let estimated = usage.source == tollgate_schemas::TokenSource::Estimated;
                fill.finish(&self.candidate, usage.tokens, estimated, cost);
            }
            rec.attempt(&self.candidate, Some(status), error, latency, Some(usage));
            match error_type {
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
        if let Some(held) = this.held.take()
            && this.send(&mut out, held)
        {
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

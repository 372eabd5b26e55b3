//! Relaying a streamed (SSE) response to the client, event by event.
//!
//! Each complete upstream event goes out as soon as it is parsed: with the
//! model renamed, and the usage-only chunk dropped when the client did not
//! ask for it (the gateway asked on its behalf). Along the way the relay
//! keeps only counters: the last usage object (usage may be cumulative in
//! every chunk; the last one wins, never a sum) and the generated text for
//! an estimate if no usage ever comes.
//!
//! The relay owns the request's [`Record`]. It closes it when the stream
//! ends, when the upstream breaks (no fallback then: bytes already went
//! out), or when the client disconnects and the relay is dropped, which
//! also drops, and so cancels, the upstream request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::Sleep;
use tollgate_schemas::{Outcome, TokenSource, Tokens};

use crate::ledger::{Record, Usage};
use crate::rename::Rename;
use crate::routing::Candidate;
use crate::sse;
use crate::upstream::UpstreamResponse;
use crate::usage::ResponseView;

/// Longest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 8 << 20;
/// Generated text kept for estimation; beyond it the count is extrapolated.
const MAX_TEXT_BYTES: usize = 4 << 20;

pub struct Relay {
    record: Option<Record>,
    candidate: Candidate,
    upstream: UpstreamResponse,
    sent_at: Instant,
    idle: Pin<Box<Sleep>>,
    parser: sse::Parser,
    rename: Rename,
    client_wants_usage: bool,
    usage: Option<Tokens>,
    text: String,
    text_overflow: usize,
    saw_done: bool,
    ended: bool,
}

impl Relay {
    pub fn new(
        record: Record,
        candidate: Candidate,
        upstream: UpstreamResponse,
        sent_at: Instant,
        requested: &str,
        client_wants_usage: bool,
    ) -> Self {
        let idle = Box::pin(tokio::time::sleep(upstream.idle_timeout));
        Self {
            record: Some(record),
            candidate,
            upstream,
            sent_at,
            idle,
            parser: sse::Parser::new(MAX_EVENT_BYTES),
            rename: Rename::new(requested),
            client_wants_usage,
            usage: None,
            text: String::new(),
            text_overflow: 0,
            saw_done: false,
            ended: false,
        }
    }

    /// Turns complete events into bytes for the client.
    fn drain_events(
        &mut self,
        out: &mut Option<BytesMut>,
        single: &mut Option<Bytes>,
    ) -> Result<(), sse::Overflow> {
        while let Some(ev) = self.parser.next_event()? {
            if let Some(bytes) = self.process(ev) {
                if let Some(rec) = self.record.as_mut() {
                    rec.first_byte();
                }
                push_out(out, single, bytes);
            }
        }
        Ok(())
    }

    /// One event: read what the ledger needs, return what the client gets.
    fn process(&mut self, ev: sse::Event) -> Option<Bytes> {
        let Some(data) = &ev.data else {
            return Some(ev.raw);
        };
        if data.as_ref() == b"[DONE]" {
            self.saw_done = true;
            return Some(ev.raw);
        }
        let Ok(view) = serde_json::from_slice::<ResponseView>(data) else {
            return Some(ev.raw);
        };
        if let Some(u) = view.usage.as_ref().and_then(|u| u.normalize()) {
            self.usage = Some(u);
        }
        if self.text.len() < MAX_TEXT_BYTES {
            view.collect_text(&mut self.text);
        } else {
            let mut more = String::new();
            view.collect_text(&mut more);
            self.text_overflow += more.len();
        }
        let usage_only = view.choices.is_empty() && view.usage.is_some();
        if usage_only && !self.client_wants_usage {
            return None;
        }
        let served = view.model.as_deref().map(str::to_string);
        Some(self.rename.apply(ev.raw, served.as_deref()))
    }

    fn usage(&self) -> Usage {
        match (self.usage, &self.record) {
            (Some(tokens), _) => Usage {
                tokens,
                source: TokenSource::Upstream,
            },
            (None, Some(rec)) => {
                let mut u = rec.estimate(&self.text, true);
                if self.text_overflow > 0 && !self.text.is_empty() {
                    // Extrapolate the count over text not kept.
                    let per_byte = u.tokens.output as f64 / self.text.len() as f64;
                    u.tokens.output += (per_byte * self.text_overflow as f64).ceil() as u64;
                }
                u
            }
            (None, None) => Usage {
                tokens: Tokens::default(),
                source: TokenSource::Estimated,
            },
        }
    }

    /// Closes the record once. `error` is the attempt's failure, if any.
    fn close(&mut self, error: Option<&str>, outcome: Outcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        let usage = self.usage();
        let latency = self.sent_at.elapsed();
        let status = self.upstream.status;
        if let Some(mut rec) = self.record.take() {
            rec.attempt(&self.candidate, Some(status), error, latency, Some(usage));
            match error {
                None => rec.finish(status),
                Some(kind) => rec.finish_with(status, outcome, kind),
            }
        }
    }

    fn error_event(message: &str) -> Bytes {
        let body = serde_json::json!({"error": {
            "message": message, "type": "upstream_error", "param": null, "code": "stream_error",
        }});
        Bytes::from(format!("data: {body}\n\n"))
    }
}

fn push_out(out: &mut Option<BytesMut>, single: &mut Option<Bytes>, bytes: Bytes) {
    match (single.take(), out.as_mut()) {
        (None, None) => *single = Some(bytes),
        (Some(first), None) => {
            let mut buf = BytesMut::with_capacity(first.len() + bytes.len());
            buf.extend_from_slice(&first);
            buf.extend_from_slice(&bytes);
            *out = Some(buf);
        }
        (_, Some(buf)) => buf.extend_from_slice(&bytes),
    }
}

/// Most bytes gathered from chunks that are already waiting before they go
/// out together.
const COALESCE_BYTES: usize = 64 * 1024;

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    /// Relays whatever the upstream has ready, never waiting to fill a
    /// buffer: chunks that already arrived go out in one write, and the
    /// first `Pending` sends what was gathered.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let (mut out, mut single): (Option<BytesMut>, Option<Bytes>) = (None, None);
        let gathered = |out: &Option<BytesMut>, single: &Option<Bytes>| {
            out.as_ref().map_or(0, BytesMut::len) + single.as_ref().map_or(0, Bytes::len)
        };
        loop {
            if this.ended {
                return Poll::Ready(take(out, single).map(Ok));
            }
            match this.upstream.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = tokio::time::Instant::now() + this.upstream.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    this.parser.push(&chunk);
                    if this.drain_events(&mut out, &mut single).is_err() {
                        this.close(Some("stream_error"), Outcome::UpstreamError);
                        push_out(
                            &mut out,
                            &mut single,
                            Self::error_event("upstream sent an oversized event"),
                        );
                        continue;
                    }
                    if gathered(&out, &single) >= COALESCE_BYTES {
                        break;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(upstream = this.candidate.upstream.name(), error = %e, "upstream stream broke");
                    let _ = this.drain_events(&mut out, &mut single);
                    this.close(Some("stream_error"), Outcome::UpstreamError);
                    push_out(
                        &mut out,
                        &mut single,
                        Self::error_event("the upstream stream broke before it finished"),
                    );
                }
                Poll::Ready(None) => {
                    if let Some(tail) = this.parser.finish().and_then(|ev| this.process(ev)) {
                        push_out(&mut out, &mut single, tail);
                    }
                    if this.saw_done {
                        this.close(None, Outcome::Ok);
                    } else {
                        this.close(Some("stream_error"), Outcome::UpstreamError);
                        push_out(
                            &mut out,
                            &mut single,
                            Self::error_event("the upstream stream ended without [DONE]"),
                        );
                    }
                }
                Poll::Pending => {
                    if gathered(&out, &single) > 0 {
                        break;
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.close(Some("timeout"), Outcome::UpstreamError);
                        return Poll::Ready(Some(Ok(Self::error_event(
                            "the upstream stream stalled",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(take(out, single).map(Ok))
    }
}

fn take(out: Option<BytesMut>, single: Option<Bytes>) -> Option<Bytes> {
    out.map(BytesMut::freeze).or(single)
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client went away mid-stream: bill what was generated.
        self.close(Some("client_cancelled"), Outcome::ClientCancelled);
    }
}

//! Reading an upstream's events: what the ledger needs from each, and
//! what the client gets of it.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::ledger::tally::{Tally, Usage};
use crate::relay::rename::Rename;
use crate::relay::sse::{self, Event};
use crate::upstream::response::{Document, Fault};

/// Longest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 8 << 20;

/// What the relay reads from the upstream's events, apart from the record.
pub struct Events {
    pub(super) parser: sse::Parser,
    pub(super) rename: Rename,
    pub(super) client_wants_usage: bool,
    pub(super) tally: Tally,
    /// When the first event with generated content was read.
    pub(super) first_content: Option<Instant>,
    pub(super) finished: bool,
    pub(super) saw_done: bool,
}

/// What to do with one event.
pub(super) enum Step {
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
    pub(super) fn process(&mut self, ev: Event) -> Step {
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
    pub(super) fn tail(&mut self) -> Option<Step> {
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
    pub(super) fn committed(&self) -> bool {
        self.first_content.is_some() || self.finished
    }

    /// What a failed attempt is billed: what the upstream reported, or an
    /// estimate of what it generated; nothing if it generated nothing.
    pub(super) fn failed_usage(&self, settle: impl Fn(&Tally) -> Usage) -> Option<Usage> {
        (self.tally.reported() || self.tally.generated()).then(|| settle(&self.tally))
    }
}

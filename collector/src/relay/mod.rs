//! Relaying a streamed (SSE) response to the client, event by event.
//!
//! [`prime`] reads the upstream's events up to the first one that carries
//! generated content (or a finish, `[DONE]`, or the end), holding them back:
//! until then nothing is committed and the attempt may still fail over.
//! From there the [`Relay`] sends each complete event as soon as it is
//! parsed, with the model renamed and the usage-only chunk dropped when the
//! client did not ask for it (the gateway asked on its behalf). It keeps a
//! [`Tally`](crate::ledger::tally::Tally) of usage and text, never the
//! chunks.
//!
//! The client always receives whole events: a partial line the upstream
//! left when it broke is dropped, and an unterminated last event that
//! parses is terminated, so the gateway's own closing error event is one a
//! standard SSE client reads. An `error` event (by its `event:` type or an
//! `error` member in its data) is an upstream error: the relay sends the
//! gateway's error event in its place and ends.
//!
//! The relay owns the request's [`Record`](crate::ledger::Record). It closes it when the stream
//! ends, when the upstream breaks, or when the client disconnects and the
//! relay is dropped, which also drops, and so cancels, the upstream request.

//! Its parts, in flow order: [`sse`] (event framing), [`events`] (what each
//! event means for the ledger and the client), [`rename`] (the client's
//! model name), [`prime`] (holding back until the first content) and
//! [`stream`] (the committed relay).

pub mod events;
pub mod prime;
pub mod rename;
pub mod sse;
pub mod stream;

pub use events::Events;
pub use prime::{Primed, prime};
pub use stream::Relay;

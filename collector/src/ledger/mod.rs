//! The ledger: what each request is billed, and the one event it yields.
//!
//! Invariants: every request yields exactly one `UsageEvent`, rejected,
//! failed and client-cancelled ones included; each upstream attempt is
//! priced on its own and the event's cost is their sum; the request path
//! never waits on the ledger (the tap's queue is bounded, and a full queue
//! is counted, not waited on).
//!
//! Its parts, in the order a request meets them: [`record`] (a request's
//! usage record, opened on arrival, closed into its event), [`usage`] (one
//! usage object's counts in the ledger's meaning), [`tally`] (an attempt's
//! usage across its documents, or the estimate without it), [`tokens`]
//! (tiktoken counts for estimates), [`pricing`] (cost from the catalog in
//! force) and [`tap`] (the event into the durable spool).

pub mod pricing;
pub mod record;
pub mod tally;
pub mod tap;
pub mod tokens;
pub mod usage;

pub use pricing::Pricing;
pub use record::{Ledger, Record};

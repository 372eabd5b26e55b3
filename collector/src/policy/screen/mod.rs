//! The content guard: what it looks for in text going to a model and
//! coming back, and what it does about it. Its parts, in the order a text
//! meets them: [`detect`] (PII and secret detectors, each with its
//! checksum where the format has one), [`rules`] (the `[[guard]]` rules
//! compiled: detectors, keyword and regex deny lists, filters),
//! [`moderation`] (an external `/v1/moderations` upstream), [`input`]
//! (the request, before it goes upstream), [`output`] (a whole answer)
//! and [`holdback`] (a stream, as it is relayed).

pub mod detect;
pub mod holdback;
pub mod input;
pub mod moderation;
pub mod output;
pub mod rules;

pub use input::Blocked;
pub use rules::{Direction, Screen};

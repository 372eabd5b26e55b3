//! The content guard's screen: what it looks for in text going to a model
//! or coming back. Its parts, in the order a text meets them: [`detect`]
//! (PII and secret detectors, each with its checksum where the format has
//! one). Rules (deny lists, actions, directions), the incremental check of
//! streamed output and the moderation upstream build on it.

pub mod detect;

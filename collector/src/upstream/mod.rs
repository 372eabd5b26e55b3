//! Upstreams: where attempts go.
//!
//! `openai` upstreams are any OpenAI-compatible HTTP API (DeepSeek,
//! DashScope, vLLM, ...), reached through one pooled client each;
//! `simulated` upstreams call the simulator's router in-process. Both hand
//! back the same [`UpstreamResponse`]: a status and a body stream.
//!
//! The address and the key come from the config only; nothing in a client's
//! request can change either.

//!
//! Its parts: [`config`] (the `[upstreams.<name>]` section), [`client`]
//! (an upstream, its transport and what an attempt gets back: a status, a
//! media type and a body stream), [`response`] (reading one JSON document
//! an upstream sent: model, choices, usage, errors, with the [`lenient`]
//! readers), [`read`] (a whole body, bounded) and [`simulate`] (the
//! simulated upstream).

pub mod client;
pub mod config;
pub mod lenient;
pub mod read;
pub mod response;
pub mod simulate;

pub use client::{BodyStream, MediaType, SendError, Upstream, UpstreamError, UpstreamResponse};

/// The endpoints the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions = 0,
    Completions = 1,
    Embeddings = 2,
    /// Not proxied: the content guard's moderation upstream.
    Moderations = 3,
}

impl Endpoint {
    /// The path below an upstream's base URL, and the event's `endpoint`.
    pub fn path(&self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Moderations => "moderations",
        }
    }

    pub fn streams(&self) -> bool {
        !matches!(self, Endpoint::Embeddings | Endpoint::Moderations)
    }
}

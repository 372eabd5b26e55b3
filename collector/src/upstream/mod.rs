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
//! Its parts: [`client`] (an upstream, its transport and what an attempt
//! gets back: a status, a media type and a body stream), [`response`]
//! (reading one JSON document an upstream sent: model, choices, usage,
//! errors) and [`simulate`] (the simulated upstream).

pub mod client;
pub mod response;
pub mod simulate;

pub use client::{BodyStream, MediaType, SendError, Upstream, UpstreamError, UpstreamResponse};

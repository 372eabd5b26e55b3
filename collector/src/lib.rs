//! The gateway: an OpenAI-compatible proxy that authenticates API keys to
//! consumers, routes by model name to upstreams with weighted targets and
//! fallback, relays streams without buffering, and records every request as
//! exactly one `UsageEvent` through the tap.
//!
//! Invariants: the request path never waits on the tap (a full queue is
//! counted, not waited on); every request yields one event, including
//! rejected, failed and client-cancelled ones; no client or upstream key
//! reaches a log line, an error body or an event.
//!
//! The path of a request: [`paths`] -> [`gateway::app`] -> [`proxy`]
//! ([`auth`], [`request`], [`routing`], then per attempt [`upstream`] and
//! [`attempt`], which judges the answer and for streams hands over to
//! [`relay`]) with the [`ledger`] recording it and the [`tap`] taking the
//! event into the spool, which [`forward`] drains into Kafka.
//!
//! Reading what upstreams send, one parser per concern: [`sse`] (event
//! framing), [`response`] (one JSON document: model, choices, usage
//! placements, errors), [`usage`] (one usage object's counts), [`tally`]
//! (an attempt's usage and the estimate without it), [`rename`] (the
//! client's model name); credentials are read by
//! `tollgate_schemas::credential`, shared with the query service.

pub mod attempt;
pub mod auth;
pub mod config;
pub mod error;
pub mod forward;
pub mod gateway;
pub mod ledger;
pub mod metrics;
pub mod paths;
pub mod proxy;
pub mod relay;
pub mod rename;
pub mod request;
pub mod response;
pub mod routing;
pub mod simulate;
pub mod sse;
pub mod tally;
pub mod tap;
pub mod tokens;
pub mod upstream;
pub mod usage;

pub use config::{Config, ConfigError};
pub use gateway::{Gateway, Server, Summary, app};

/// Errors that stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Catalog(#[from] tollgate_schemas::CatalogError),
    #[error("upstream {name}: {message}")]
    Upstream { name: String, message: String },
    #[error(transparent)]
    Spool(#[from] tollgate_spool::SpoolError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

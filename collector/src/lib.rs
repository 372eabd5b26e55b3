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
//! Its parts, in the order a request meets them: [`server`] (the listener,
//! [`paths`] normalised before routing) -> [`app`] (the router) ->
//! [`proxy`] (the numbered steps of one request: auth, body, route,
//! content screen, admission, attempts) -> [`policy`] (the content guard,
//! the limits and budgets; the coming cache and search steps) -> [`upstream`] (where attempts go and what comes back) ->
//! [`relay`] (streams to the client), with the [`ledger`] recording the
//! request and its tap taking the event into the spool (the pipeline past
//! the spool is `tollgate_ingest`'s), and [`observe`] turning the same
//! record into Prometheus metrics and OpenTelemetry spans. [`state`] is
//! what every request reads; [`config`] and [`error`] serve them all.

pub mod app;
pub mod config;
pub mod error;
pub mod ledger;
pub mod observe;
pub mod paths;
pub mod policy;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod state;
pub mod upstream;

pub use app::app;
pub use config::{Config, ConfigError};
pub use server::{Server, Summary};
pub use state::Gateway;

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
    #[error(transparent)]
    Telemetry(#[from] observe::otlp::OtlpError),
    #[error("limits: {0}")]
    Limits(String),
    #[error(transparent)]
    Screen(#[from] policy::screen::rules::ScreenError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

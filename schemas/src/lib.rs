//! The types every part of Tollgate shares: the [`UsageEvent`] (one row per
//! client request), token counts with one documented meaning ([`Tokens`]),
//! exact money ([`Usd`]), the price catalog ([`PriceCatalog`]), the one
//! reading of a presented API key ([`credential`]), how a part's
//! atomic counters reach `/metrics` ([`metrics`]), what every part's config
//! section shares ([`config`]: a refused setting, a secret) and budgets'
//! calendar periods in a time zone ([`period`]).
//!
//! Token semantics, fixed here once for the whole ledger (OpenAI's meaning):
//! `input_tokens` includes `cached_input_tokens`, and `output_tokens`
//! includes `reasoning_tokens`. Providers that count differently are
//! normalised at the edge before a number reaches this crate.
//!
//! The same event has three descriptions kept in step by tests: the Rust
//! type, its Arrow schema (the lake's columns) and the published JSON
//! Schema `usage_event.v1.json` (the Kafka message format).
//!
//! Schema evolution: fields are only ever added, as nullable, and
//! `schema_version` names the version a producer wrote.

pub mod arrow;
pub mod config;
pub mod credential;
pub mod event;
pub mod metrics;
pub mod money;
pub mod period;
pub mod prices;
pub mod tokens;

pub use arrow::usage_schema;
pub use event::{
    Attempt, CacheKind, CacheStatus, Outcome, SCHEMA_VERSION, TokenSource, UsageEvent,
};
pub use money::Usd;
pub use prices::{CatalogError, Price, PriceCatalog};
pub use tokens::Tokens;

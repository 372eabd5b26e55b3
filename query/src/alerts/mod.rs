//! Alerts: budget thresholds, burn-rate forecasts, spend anomalies and
//! pipeline health, evaluated from the ledger by the query service and
//! sent to webhooks, each exactly once however many query services run.
//!
//! One tick of the [`alerter`], every `evaluate_ms`, in flow order:
//! [`ledger`] (the lake's spend per hour, summed again only where files
//! changed) -> [`evaluate`] (the rules, with the clock passed in) ->
//! [`claims`] (the first process to claim an [`alert`]'s key sends it;
//! the rest stay quiet) -> [`deliver`] (the outbox and the webhooks,
//! retried until they answer). [`claims::Records`] keeps every alert in
//! the lake for the `alerts` table ([`table`]) and `GET /v1/alerts`;
//! [`config`] is the `[alerts]` section and what the service is given;
//! [`metrics`] what `/metrics` shows.

pub mod alert;
pub mod alerter;
pub mod claims;
pub mod config;
pub mod deliver;
pub mod evaluate;
pub mod ledger;
pub mod metrics;
pub mod table;

pub use alert::{Alert, Status};
pub use alerter::{AlertError, Alerter};
pub use claims::{Claims, Records};
pub use config::{AlertSettings, AlertsConfig, Kind, PipelineProbe, PipelineReading};
pub use metrics::AlertMetrics;

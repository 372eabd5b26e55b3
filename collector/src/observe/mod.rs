//! What the platform team watches live, before anything reaches the lake:
//! [`metrics`] (Prometheus, `GET /metrics`) and [`trace`] (OpenTelemetry
//! spans and GenAI metrics, exported over OTLP by [`otlp`]; off by
//! default). Both are fed by the request's [`crate::ledger::Record`]: as it
//! opens, at each upstream attempt, and from its one event as it closes,
//! so their tokens and costs are the ledger's own. Both take label values
//! from [`names`], the configured names only.
//!
//! Neither waits on anything: Prometheus counters are atomics read at
//! scrape time; spans go to a bounded queue that a background thread
//! exports, and a span that finds it full is dropped and counted.

pub mod metrics;
pub mod names;
pub mod otlp;
pub mod trace;

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use tollgate_schemas::metrics::{Collector, counter};

use crate::ledger::tap::Counters;
use crate::upstream::Upstream;
pub use metrics::{GatewayMetrics, InFlight, Timing};
pub use trace::{RequestTrace, Telemetry};

/// The gateway's observers, shared by every request.
pub struct Observe {
    pub metrics: GatewayMetrics,
    /// `None` when OpenTelemetry export is off.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// The tap's counters on `/metrics`.
impl Collector for Counters {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        counter(
            &mut e,
            "tollgate_tap_events_emitted",
            "Usage events handed to the tap.",
            &self.emitted,
        )?;
        counter(
            &mut e,
            "tollgate_tap_events_committed",
            "Usage events durable in the spool.",
            &self.committed,
        )?;
        counter(
            &mut e,
            "tollgate_tap_events_dropped_queue_full",
            "Usage events refused: tap queue full.",
            &self.dropped_queue_full,
        )?;
        counter(
            &mut e,
            "tollgate_tap_events_dropped_spool_full",
            "Usage events refused: spool at its size bound.",
            &self.dropped_spool_full,
        )
    }
}

/// `tollgate_usage_estimated_total{upstream, reason}`: attempts whose
/// tokens the gateway estimated. A `reason` other than `no_usage` means the
/// upstream sent usage in a shape the gateway does not read.
pub struct Estimates(pub Vec<Arc<Upstream>>);

impl std::fmt::Debug for Estimates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Estimates")
    }
}

impl Collector for Estimates {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = e.encode_descriptor(
            "tollgate_usage_estimated",
            "Upstream attempts whose tokens were estimated, by reason.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for u in &self.0 {
            for (why, n) in u.estimate_counts() {
                let labels = [("upstream", u.name()), ("reason", why.as_str())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

//! The alerts on the query service's `/metrics`:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tollgate_alerts_fired_total` | counter | `kind` (this process won the claim) |
//! | `tollgate_alerts_deliveries_total` | counter | `outcome` (`delivered`, `failed`: attempts) |
//! | `tollgate_alerts_deliveries_pending` | gauge | deliveries kept until a webhook answers |
//! | `tollgate_alerts_deliveries_failing` | gauge | pending deliveries that failed at least once |
//! | `tollgate_alerts_evaluations_total` | counter | `outcome` (`ok`, `error`) |
//! | `tollgate_alerts_evaluation_duration_seconds` | histogram | (one tick: ledger refresh and rules) |

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::config::Kind;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByKind {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByOutcome {
    outcome: &'static str,
}

#[derive(Debug, Clone)]
pub struct AlertMetrics {
    fired: Family<ByKind, Counter>,
    deliveries: Family<ByOutcome, Counter>,
    pending: Gauge,
    failing: Gauge,
    evaluations: Family<ByOutcome, Counter>,
    duration: Histogram,
}

impl Default for AlertMetrics {
    fn default() -> Self {
        Self {
            fired: Family::default(),
            deliveries: Family::default(),
            pending: Gauge::default(),
            failing: Gauge::default(),
            evaluations: Family::default(),
            // 1 ms to about 16 s, doubling.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

impl AlertMetrics {
    /// Adds the alerts' metrics to `registry` (prefixed `tollgate`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "alerts_fired",
            "Alerts this process claimed and sent, by kind",
            self.fired.clone(),
        );
        registry.register(
            "alerts_deliveries",
            "Webhook delivery attempts by outcome",
            self.deliveries.clone(),
        );
        registry.register(
            "alerts_deliveries_pending",
            "Webhook deliveries kept until the webhook answers 2xx",
            self.pending.clone(),
        );
        registry.register(
            "alerts_deliveries_failing",
            "Pending webhook deliveries that failed at least once",
            self.failing.clone(),
        );
        registry.register(
            "alerts_evaluations",
            "Alert evaluations (ledger read and rules) by outcome",
            self.evaluations.clone(),
        );
        registry.register(
            "alerts_evaluation_duration_seconds",
            "Time one alert evaluation took",
            self.duration.clone(),
        );
    }

    pub fn fired(&self, kind: Kind) {
        self.fired
            .get_or_create(&ByKind {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn delivered(&self, ok: bool) {
        let outcome = if ok { "delivered" } else { "failed" };
        self.deliveries.get_or_create(&ByOutcome { outcome }).inc();
    }

    pub fn pending(&self, pending: usize, failing: usize) {
        self.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.failing.set(i64::try_from(failing).unwrap_or(i64::MAX));
    }

    pub fn evaluated(&self, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.evaluations.get_or_create(&ByOutcome { outcome }).inc();
        self.duration.observe(took.as_secs_f64());
    }
}

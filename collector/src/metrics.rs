//! Prometheus text exposition for `/metrics`: the tap's counters, the
//! upstreams' estimate counters, and any other part of the process that
//! registers a [`Source`] (the binary wraps the forwarder's and the
//! ingester's counters in one).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Something that adds lines to `/metrics`.
pub trait Source: Send + Sync {
    fn render(&self, out: &mut String);
}

pub enum Kind {
    Counter,
    Gauge,
}

/// Writes one metric with its HELP and TYPE lines.
pub fn write(out: &mut String, name: &str, help: &str, kind: Kind, value: &AtomicU64) {
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
        value.load(Ordering::Relaxed)
    );
}

/// `tollgate_usage_estimated_total{upstream, reason}`: attempts whose
/// tokens the gateway estimated. A `reason` other than `no_usage` means the
/// upstream sent usage in a shape the gateway does not read.
pub fn render_estimates(out: &mut String, upstreams: &[std::sync::Arc<crate::upstream::Upstream>]) {
    const NAME: &str = "tollgate_usage_estimated_total";
    let _ = writeln!(
        out,
        "# HELP {NAME} Upstream attempts whose tokens were estimated, by reason.\n# TYPE {NAME} counter"
    );
    for u in upstreams {
        for (why, n) in u.estimate_counts() {
            let upstream = label_value(u.name());
            let reason = why.as_str();
            let _ = writeln!(
                out,
                "{NAME}{{upstream=\"{upstream}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
}

/// A label value escaped as the text exposition format requires.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Source for crate::ledger::tap::Counters {
    fn render(&self, out: &mut String) {
        write(
            out,
            "tollgate_tap_events_emitted_total",
            "Usage events handed to the tap.",
            Kind::Counter,
            &self.emitted,
        );
        write(
            out,
            "tollgate_tap_events_committed_total",
            "Usage events durable in the spool.",
            Kind::Counter,
            &self.committed,
        );
        write(
            out,
            "tollgate_tap_events_dropped_queue_full_total",
            "Usage events refused: tap queue full.",
            Kind::Counter,
            &self.dropped_queue_full,
        );
        write(
            out,
            "tollgate_tap_events_dropped_spool_full_total",
            "Usage events refused: spool at its size bound.",
            Kind::Counter,
            &self.dropped_spool_full,
        );
    }
}

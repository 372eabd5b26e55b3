//! The gateway's own lines on `/metrics`: the tap's counters and the
//! upstreams' estimate counters. The format, and the [`Source`] trait the
//! rest of the process (forwarder, ingester) renders through, are
//! `tollgate_schemas::metrics`.

use std::fmt::Write;

pub use tollgate_schemas::metrics::{Kind, Source, label_value, write};

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

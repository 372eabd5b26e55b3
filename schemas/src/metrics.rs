//! The Prometheus text exposition every part of the process writes its
//! counters in (format: <https://prometheus.io/docs/instrumenting/exposition_formats/>).
//! Each part implements [`Source`] for its own counters; whoever serves
//! `/metrics` (the gateway, `tollgate ingest`) renders the sources it holds.

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

/// Writes one unlabelled metric with its HELP and TYPE lines.
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

/// A label value escaped as the text exposition format requires
/// (backslash, double quote and newline).
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_written_with_its_help_and_type() {
        let mut out = String::new();
        write(
            &mut out,
            "x_total",
            "Things.",
            Kind::Counter,
            &AtomicU64::new(3),
        );
        assert_eq!(
            out,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n"
        );
    }

    #[test]
    fn label_values_escape_quotes_backslashes_and_newlines() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

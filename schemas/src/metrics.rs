//! Counters a part keeps as plain atomics (the tap, the forwarder, the
//! ingester), shown on `/metrics` through prometheus-client: each part
//! implements [`Collector`] by reading its atomics at scrape time, so the
//! hot path pays one relaxed add and whoever serves `/metrics` registers
//! the collectors it holds. Names are given without the `_total` suffix,
//! which the encoder adds to counters
//! (<https://github.com/OpenObservability/OpenMetrics/blob/main/specification/OpenMetrics.md>).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::registry::Registry;

/// Encodes one unlabelled counter read from `value`.
pub fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value.load(Ordering::Relaxed));
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Encodes one unlabelled gauge read from `value`.
pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let v = i64::try_from(value.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// The registry's text in the format the scraper's `Accept` header asks
/// for, and its `Content-Type`: OpenMetrics 1.0 when it is accepted (as
/// Prometheus asks), else the Prometheus text format 0.0.4 (curl,
/// `promtool check metrics`), as the Prometheus client libraries
/// negotiate. Formats:
/// <https://prometheus.io/docs/instrumenting/exposition_formats/>.
pub fn render(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail; a collector's own error leaves what
    // was written so far, which is still a valid prefix for a scraper.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    if accept.is_some_and(prefers_openmetrics) {
        (OPENMETRICS, out)
    } else {
        (TEXT_0_0_4, to_text_0_0_4(&out))
    }
}

/// Whether `accept` ranks OpenMetrics (with a quality above zero) at least
/// as high as the plain text format.
fn prefers_openmetrics(accept: &str) -> bool {
    let (mut open, mut text) = (0.0f32, 0.0f32);
    for entry in accept.split(',') {
        let mut parts = entry.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| {
                let (name, value) = p.split_once('=')?;
                name.trim().eq_ignore_ascii_case("q").then_some(value)
            })
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => open = open.max(q),
            "text/plain" => text = text.max(q),
            _ => {}
        }
    }
    open > 0.0 && open >= text
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text -> Prometheus text 0.0.4: a counter family's HELP and
/// TYPE lines carry its samples' `_total` name, and the `# UNIT` and
/// `# EOF` lines go (the older format has neither).
fn to_text_0_0_4(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Two {
        done: AtomicU64,
        held: AtomicU64,
    }

    impl Collector for Two {
        fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            counter(&mut e, "x_done", "Things done.", &self.done)?;
            gauge(&mut e, "x_held", "Things held now.", &self.held)
        }
    }

    #[test]
    fn atomics_are_shown_as_a_counter_and_a_gauge_with_help_and_type() {
        let two = Two::default();
        two.done.store(3, Ordering::Relaxed);
        two.held.store(2, Ordering::Relaxed);
        let mut r = Registry::default();
        r.register_collector(Box::new(two));
        let (kind, text) = render(&r, Some("application/openmetrics-text;version=1.0.0,*/*"));
        assert_eq!(kind, OPENMETRICS);
        assert!(
            text.contains("# HELP x_done Things done.\n# TYPE x_done counter\nx_done_total 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE x_held gauge\nx_held 2\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_format_follows_the_accept_headers_qualities() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(prefers_openmetrics(prometheus));
        assert!(prefers_openmetrics("APPLICATION/OPENMETRICS-TEXT"));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;q=0, text/plain;q=1"
        ));
        assert!(!prefers_openmetrics(
            "text/plain, application/openmetrics-text;q=0.5"
        ));
        assert!(!prefers_openmetrics("*/*"));
    }

    #[test]
    fn without_openmetrics_in_accept_counters_are_named_as_text_0_0_4_has_them() {
        let two = Two::default();
        two.done.store(3, Ordering::Relaxed);
        let mut r = Registry::default();
        r.register_collector(Box::new(two));
        let (kind, text) = render(&r, None);
        assert_eq!(kind, TEXT_0_0_4);
        assert_eq!(
            text,
            "# HELP x_done_total Things done.\n# TYPE x_done_total counter\nx_done_total 3\n\
             # HELP x_held Things held now.\n# TYPE x_held gauge\nx_held 0\n"
        );
    }
}

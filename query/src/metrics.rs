//! The query service's own `/metrics`, in the Prometheus text format
//! (prometheus-client): every query on either surface counted by its
//! outcome, how long it ran, and what it returned. The outcome is the
//! query's SQLSTATE, as its client saw it: `00000` (PostgreSQL's
//! `successful_completion`) for an answer, otherwise the error's code
//! (`25006` a refused write, `42601` a statement that does not plan,
//! `53300` too many at once, `57014` a timeout, ...).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tollgate_query_queries_total` | counter | `surface` (`http`, `pg`), `sqlstate` |
//! | `tollgate_query_duration_seconds` | histogram | `surface` |
//! | `tollgate_query_result_rows_total` | counter | `surface` |
//! | `tollgate_query_result_bytes_total` | counter (bytes, in Arrow memory) | `surface` |
//!
//! and the alerts' own (see [`crate::alerts::metrics::AlertMetrics`]).

use std::time::Duration;

use arrow::array::RecordBatch;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Where a query came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    Http,
    Pg,
}

impl Surface {
    fn label(self) -> &'static str {
        match self {
            Surface::Http => "http",
            Surface::Pg => "pg",
        }
    }
}

/// SQLSTATE `successful_completion`.
pub const OK: &str = "00000";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Outcome {
    surface: &'static str,
    sqlstate: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct On {
    surface: &'static str,
}

/// The counters; one per service, shared by both surfaces.
#[derive(Debug)]
pub struct QueryMetrics {
    registry: Registry,
    queries: Family<Outcome, Counter>,
    duration: Family<On, Histogram>,
    rows: Family<On, Counter>,
    bytes: Family<On, Counter>,
    /// The alerts' evaluations and deliveries.
    pub alerts: crate::alerts::metrics::AlertMetrics,
}

impl Default for QueryMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl QueryMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let queries = Family::<Outcome, Counter>::default();
        // 1 ms to about 65 s, doubling.
        let duration = Family::<On, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        let rows = Family::<On, Counter>::default();
        let bytes = Family::<On, Counter>::default();
        registry.register(
            "query_queries",
            "Queries by surface and outcome (the SQLSTATE the client saw; 00000 answered)",
            queries.clone(),
        );
        registry.register(
            "query_duration_seconds",
            "Time from a query's arrival to its answer or error",
            duration.clone(),
        );
        registry.register(
            "query_result_rows",
            "Rows returned to clients",
            rows.clone(),
        );
        registry.register(
            "query_result_bytes",
            "Bytes of the results returned, as the engine held them (Arrow memory)",
            bytes.clone(),
        );
        let alerts = crate::alerts::metrics::AlertMetrics::default();
        alerts.register(&mut registry);
        Self {
            registry,
            alerts,
            queries,
            duration,
            rows,
            bytes,
        }
    }

    /// One answered query and the batches it returned (none for a report).
    pub fn answered(&self, surface: Surface, elapsed: Duration, batches: &[RecordBatch]) {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        self.counted(surface, OK, Some(elapsed));
        let on = On {
            surface: surface.label(),
        };
        self.rows.get_or_create(&on).inc_by(rows as u64);
        self.bytes.get_or_create(&on).inc_by(bytes as u64);
    }

    /// One query that ended in an error with `sqlstate`; `elapsed` when known.
    pub fn failed(&self, surface: Surface, sqlstate: &str, elapsed: Option<Duration>) {
        self.counted(surface, sqlstate, elapsed);
    }

    fn counted(&self, surface: Surface, sqlstate: &str, elapsed: Option<Duration>) {
        // A SQLSTATE is five characters of [0-9A-Z]; anything else would
        // make an unbounded label.
        let sqlstate = if sqlstate.len() == 5
            && sqlstate
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        {
            sqlstate.to_string()
        } else {
            "XX000".to_string()
        };
        self.queries
            .get_or_create(&Outcome {
                surface: surface.label(),
                sqlstate,
            })
            .inc();
        if let Some(elapsed) = elapsed {
            self.duration
                .get_or_create(&On {
                    surface: surface.label(),
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Every metric, in the format `accept` asks for, with its
    /// `Content-Type` (see `tollgate_schemas::metrics::render`).
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        tollgate_schemas::metrics::render(&self.registry, accept)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_counted_by_surface_and_sqlstate() {
        let m = QueryMetrics::new();
        let batch = |n: i64| {
            RecordBatch::try_from_iter(vec![(
                "n",
                std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(0..n))
                    as arrow::array::ArrayRef,
            )])
            .unwrap()
        };
        let (ten, one) = (batch(10), batch(1));
        m.answered(Surface::Http, Duration::from_millis(3), &[ten]);
        m.answered(
            Surface::Pg,
            Duration::from_millis(5),
            std::slice::from_ref(&one),
        );
        m.failed(Surface::Pg, "25006", None);
        m.failed(Surface::Http, "not a code", Some(Duration::from_millis(1)));
        let (_, text) = m.render(None);
        for line in [
            "tollgate_query_queries_total{surface=\"http\",sqlstate=\"00000\"} 1".to_string(),
            "tollgate_query_queries_total{surface=\"pg\",sqlstate=\"25006\"} 1".to_string(),
            "tollgate_query_queries_total{surface=\"http\",sqlstate=\"XX000\"} 1".to_string(),
            "tollgate_query_result_rows_total{surface=\"http\"} 10".to_string(),
            format!(
                "tollgate_query_result_bytes_total{{surface=\"pg\"}} {}",
                one.get_array_memory_size()
            ),
            "tollgate_query_duration_seconds_count{surface=\"http\"} 2".to_string(),
        ] {
            assert!(text.contains(line.as_str()), "{line} not in\n{text}");
        }
    }
}

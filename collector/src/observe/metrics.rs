//! The gateway's `GET /metrics` (prometheus-client, OpenMetrics text).
//! Names and labels are a contract: dashboards and alert rules query them.
//! Labels stay low-cardinality: `consumer` is a configured consumer or
//! `-`; `model` a configured route (its name or glob) or `other`;
//! `served_model` a configured target model or route, `other`, or `-` when
//! nothing served the request; `upstream` a configured upstream.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tollgate_requests_total` | counter | consumer, model, served_model, outcome |
//! | `tollgate_request_duration_seconds` | histogram | model, served_model, stream |
//! | `tollgate_time_to_first_token_seconds` | histogram (streams) | model, served_model |
//! | `tollgate_time_per_output_token_seconds` | histogram (streams) | served_model |
//! | `tollgate_tokens_total` | counter (tokens) | consumer, model, served_model, type |
//! | `tollgate_cost_usd_total` | counter (USD) | consumer, served_model |
//! | `tollgate_fallbacks_total` | counter | model, served_model, reason |
//! | `tollgate_upstream_requests_total` | counter | upstream, status_class |
//! | `tollgate_upstream_duration_seconds` | histogram | upstream, status_class |
//! | `tollgate_inflight_requests`, `tollgate_open_streams` | gauge | |
//! | `tollgate_rate_limited_total` | counter | consumer, rule |
//! | `tollgate_cache_lookups_total` | counter | result, kind |
//! | `tollgate_cache_stores_total` | counter | result |
//! | `tollgate_guard_matches_total` | counter | rule, direction, action |
//! | `tollgate_guard_moderation_failures_total` | counter | rule |
//!
//! Request, token and cost figures are taken from the request's one
//! `UsageEvent` as it is emitted, so they agree with the lake to the token
//! and, for cost, to the nearest `f64` of the exact sum (kept as integer
//! units of 10^-10 USD, the ledger's scale).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;
use tollgate_schemas::metrics::Collector;
use tollgate_schemas::{UsageEvent, Usd};

pub use super::names::{Name, Names};
use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Request {
    consumer: Name,
    model: Name,
    served_model: Name,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Timed {
    model: Name,
    served_model: Name,
    stream: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Models {
    model: Name,
    served_model: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Served {
    served_model: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenKind {
    consumer: Name,
    model: Name,
    served_model: Name,
    r#type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Spend {
    consumer: Name,
    served_model: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Fallback {
    model: Name,
    served_model: Name,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamStatus {
    upstream: Name,
    status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Limited {
    pub consumer: Name,
    pub rule: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Lookup {
    pub result: &'static str,
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CacheStore {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GuardMatch {
    pub rule: Name,
    pub direction: &'static str,
    pub action: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GuardRule {
    pub rule: Name,
}

/// A request's timing beyond what its event says to the millisecond.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Arrival to the last byte (or the error) sent.
    pub elapsed: Duration,
    /// Streams: arrival to the first relayed content.
    pub ttft: Option<Duration>,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// Every gateway metric; one per gateway, shared by all requests.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    /// Request metrics on (`[telemetry] prometheus`).
    on: bool,
    names: Arc<Names>,
    requests: Family<Request, Counter>,
    duration: Histograms<Timed>,
    ttft: Histograms<Models>,
    tpot: Histograms<Served>,
    tokens: Family<TokenKind, Counter>,
    cost: Family<Spend, UsdCounter>,
    fallbacks: Family<Fallback, Counter>,
    upstream_requests: Family<UpstreamStatus, Counter>,
    upstream_duration: Histograms<UpstreamStatus>,
    inflight: Gauge,
    open_streams: Gauge,
    /// Bounded by the configured names (their combinations).
    cache: RwLock<FxHashMap<SeriesKey, Arc<Series>>>,
    /// Incremented by the quota, cache and content-screen steps.
    pub rate_limited: Family<Limited, Counter>,
    pub cache_lookups: Family<Lookup, Counter>,
    pub cache_stores: Family<CacheStore, Counter>,
    pub guard_matches: Family<GuardMatch, Counter>,
    pub guard_moderation_failures: Family<GuardRule, Counter>,
}

/// 5 ms to about 82 s, doubling: a whole request or attempt.
fn request_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// 10 ms to about 41 s, doubling.
fn first_token_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

/// 0.5 ms to about 1 s, doubling.
fn token_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 12))
}

impl GatewayMetrics {
    /// The metrics of a gateway built from `config`; `others` are the rest
    /// of the process's collectors (the tap, upstream estimates, the
    /// pipeline), shown on the same page.
    pub fn new(config: &Config, names: Arc<Names>, others: Vec<Box<dyn Collector>>) -> Self {
        let m = Self {
            registry: Registry::default(),
            on: config.telemetry.prometheus,
            names,
            requests: Family::default(),
            duration: Family::new_with_constructor(request_seconds),
            ttft: Family::new_with_constructor(first_token_seconds),
            tpot: Family::new_with_constructor(token_seconds),
            tokens: Family::default(),
            cost: Family::default(),
            fallbacks: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(request_seconds),
            inflight: Gauge::default(),
            open_streams: Gauge::default(),
            cache: RwLock::default(),
            rate_limited: Family::default(),
            cache_lookups: Family::default(),
            cache_stores: Family::default(),
            guard_matches: Family::default(),
            guard_moderation_failures: Family::default(),
        };
        m.registered(others)
    }

    fn registered(mut self, others: Vec<Box<dyn Collector>>) -> Self {
        let r = &mut self.registry;
        r.register(
            "tollgate_requests",
            "Requests answered, by consumer, requested model, served model and outcome",
            self.requests.clone(),
        );
        r.register(
            "tollgate_request_duration_seconds",
            "Time from a request's arrival to its last byte, seconds",
            self.duration.clone(),
        );
        r.register(
            "tollgate_time_to_first_token_seconds",
            "Streams: time from a request's arrival to its first generated content, seconds",
            self.ttft.clone(),
        );
        r.register(
            "tollgate_time_per_output_token_seconds",
            "Streams: time per output token after the first, seconds",
            self.tpot.clone(),
        );
        r.register(
            "tollgate_tokens",
            "Tokens billed, by type (input includes cached_input, output includes reasoning)",
            self.tokens.clone(),
        );
        r.register(
            "tollgate_cost_usd",
            "Cost billed, USD (the ledger's exact sum, as a float)",
            self.cost.clone(),
        );
        r.register(
            "tollgate_fallbacks",
            "Requests served or failed after a fallback, by the first attempt's failure",
            self.fallbacks.clone(),
        );
        r.register(
            "tollgate_upstream_requests",
            "Upstream attempts, by upstream and HTTP status class (none: no response)",
            self.upstream_requests.clone(),
        );
        r.register(
            "tollgate_upstream_duration_seconds",
            "Upstream attempts' duration, seconds (a stream's until its end)",
            self.upstream_duration.clone(),
        );
        r.register(
            "tollgate_inflight_requests",
            "Requests in the gateway now, streams included",
            self.inflight.clone(),
        );
        r.register(
            "tollgate_open_streams",
            "Streamed responses being relayed now",
            self.open_streams.clone(),
        );
        r.register(
            "tollgate_rate_limited",
            "Requests refused by a rate limit or budget, by consumer and rule",
            Shown(self.rate_limited.clone()),
        );
        r.register(
            "tollgate_cache_lookups",
            "Response cache lookups, by result (hit, miss, bypass: Cache-Control no-cache, error: the store failed or was slow) and kind",
            Shown(self.cache_lookups.clone()),
        );
        r.register(
            "tollgate_cache_stores",
            "Answers offered to the response cache, by result (stored, too_large, failed, dropped: too many stores in flight)",
            Shown(self.cache_stores.clone()),
        );
        r.register(
            "tollgate_guard_matches",
            "Content guard matches, by rule, direction (input, output) and action taken (block, mask, log)",
            Shown(self.guard_matches.clone()),
        );
        r.register(
            "tollgate_guard_moderation_failures",
            "Moderation upstream calls that timed out or failed, by rule (its fail mode decided)",
            Shown(self.guard_moderation_failures.clone()),
        );
        for c in others {
            r.register_collector(c);
        }
        for result in ["hit", "miss"] {
            for kind in ["exact", "semantic"] {
                let _ = self.cache_lookups.get_or_create(&Lookup { result, kind });
            }
        }
        self
    }

    /// The page served on `GET /metrics`, in the format `accept` asks
    /// for, with its `Content-Type`.
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        tollgate_schemas::metrics::render(&self.registry, accept)
    }

    /// A request arrived; the guard counts it until dropped (two atomic
    /// adds: kept even with request metrics off).
    pub fn arrived(&self) -> InFlight {
        InFlight::new(&self.inflight)
    }

    /// A stream started relaying; the guard counts it until dropped.
    pub fn stream_opened(&self) -> InFlight {
        InFlight::new(&self.open_streams)
    }

    /// A request tripped `rule` (a rate limit or a budget).
    pub fn limited(&self, consumer: Option<&str>, rule: &Name) {
        let labels = Limited {
            consumer: self.names.consumer(consumer),
            rule: rule.clone(),
        };
        self.rate_limited.get_or_create(&labels).inc();
    }

    /// One upstream attempt ended with `status` (`None`: no response).
    pub fn attempt(&self, upstream: &str, status: Option<u16>, latency: Duration) {
        if !self.on {
            return;
        }
        let labels = UpstreamStatus {
            upstream: self.names.upstream(upstream),
            status_class: status_class(status),
        };
        self.upstream_requests.get_or_create(&labels).inc();
        self.upstream_duration
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
    }

    /// A request's one event, as it leaves for the ledger.
    pub fn finished(&self, e: &UsageEvent, t: Timing) {
        if !self.on {
            return;
        }
        let n = &self.names;
        let consumer = n.consumer(e.consumer.as_deref());
        let model = n.model(e.requested_model.as_deref());
        let served_model = n.served(e.served_model.as_deref());
        let series = self.series(&consumer, &model, &served_model, e);
        series.requests.inc();
        series.duration.observe(t.elapsed.as_secs_f64());
        if let (Some(ttft), Some(h)) = (t.ttft, &series.ttft) {
            h.observe(ttft.as_secs_f64());
            if let (Some(tpot), true) = (&series.tpot, e.output_tokens > 1) {
                let after = t.elapsed.saturating_sub(ttft).as_secs_f64();
                tpot.observe(after / (e.output_tokens - 1) as f64);
            }
        }
        for (i, count) in [
            e.input_tokens,
            e.cached_input_tokens,
            e.output_tokens,
            e.reasoning_tokens,
        ]
        .into_iter()
        .enumerate()
        {
            if count > 0 {
                let c = series.tokens[i].get_or_init(|| {
                    self.tokens.get_or_create_owned(&TokenKind {
                        consumer: consumer.clone(),
                        model: model.clone(),
                        served_model: served_model.clone(),
                        r#type: TOKEN_TYPES[i],
                    })
                });
                c.inc_by(count);
            }
        }
        if let Some(cost) = e.cost_usd.filter(|c| *c != Usd::ZERO) {
            let c = series.cost.get_or_init(|| {
                self.cost.get_or_create_owned(&Spend {
                    consumer: consumer.clone(),
                    served_model: served_model.clone(),
                })
            });
            c.add(cost);
        }
        if e.fallback {
            let labels = Fallback {
                model,
                served_model,
                reason: fallback_reason(e.fallback_reason.as_deref()),
            };
            self.fallbacks.get_or_create(&labels).inc();
        }
    }

    /// The series of one combination of labels, found by the names'
    /// addresses (they are interned), so a request hashes three pointers
    /// once instead of its label strings once per metric.
    fn series(&self, consumer: &Name, model: &Name, served: &Name, e: &UsageEvent) -> Arc<Series> {
        let key = SeriesKey {
            names: [consumer, model, served].map(|n| Arc::as_ptr(n).cast::<u8>() as usize),
            outcome: e.outcome,
            stream: e.stream,
        };
        if let Some(s) = self.cache.read().ok().and_then(|c| c.get(&key).cloned()) {
            return s;
        }
        let models = Models {
            model: model.clone(),
            served_model: served.clone(),
        };
        let built = Arc::new(Series {
            requests: self.requests.get_or_create_owned(&Request {
                consumer: consumer.clone(),
                model: model.clone(),
                served_model: served.clone(),
                outcome: e.outcome.as_str(),
            }),
            duration: self.duration.get_or_create_owned(&Timed {
                model: model.clone(),
                served_model: served.clone(),
                stream: if e.stream { "true" } else { "false" },
            }),
            ttft: e.stream.then(|| self.ttft.get_or_create_owned(&models)),
            tpot: e.stream.then(|| {
                self.tpot.get_or_create_owned(&Served {
                    served_model: served.clone(),
                })
            }),
            tokens: Default::default(),
            cost: OnceLock::new(),
        });
        match self.cache.write() {
            Ok(mut c) => c.entry(key).or_insert(built).clone(),
            Err(_) => built,
        }
    }
}

/// `tollgate_tokens_total`'s `type`s, in the event's field order.
const TOKEN_TYPES: [&str; 4] = ["input", "cached_input", "output", "reasoning"];

/// One combination of a request's labels; the names by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    names: [usize; 3],
    outcome: tollgate_schemas::Outcome,
    stream: bool,
}

/// The metrics one combination of labels writes, each looked up once.
/// Token and cost series are made on first use, so a type a model never
/// bills shows no series.
#[derive(Debug)]
struct Series {
    requests: Counter,
    duration: Histogram,
    ttft: Option<Histogram>,
    tpot: Option<Histogram>,
    tokens: [OnceLock<Counter>; 4],
    cost: OnceLock<UsdCounter>,
}

/// Counts one in-flight thing until dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl InFlight {
    fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        None => "none",
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(_) => "5xx",
    }
}

/// A first attempt's failure (`Attempt::error`), from a fixed set.
fn fallback_reason(reason: Option<&str>) -> &'static str {
    const KNOWN: [&str; 8] = [
        "connect",
        "timeout",
        "5xx",
        "429",
        "4xx",
        "invalid_response",
        "stream_error",
        "client_cancelled",
    ];
    reason
        .and_then(|r| KNOWN.into_iter().find(|k| *k == r))
        .unwrap_or("other")
}

/// A family whose HELP and TYPE are shown before its first series (the
/// registry skips empty families), so dashboards find the name.
#[derive(Debug)]
struct Shown<M>(M);

impl<M: EncodeMetric> EncodeMetric for Shown<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A USD counter kept exact: integer units of 10^-10 USD ([`Usd::SCALE`]),
/// shown as the nearest `f64` (exact for totals below 2^53 units, about
/// USD 900,000 per series). Clones share the count.
#[derive(Debug, Default, Clone)]
pub struct UsdCounter(Arc<AtomicU64>);

impl UsdCounter {
    pub fn add(&self, amount: Usd) {
        let units = u64::try_from(amount.to_scaled()).unwrap_or(0);
        self.0.fetch_add(units, Ordering::Relaxed);
    }

    fn value(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 10f64.powi(Usd::SCALE as i32)
    }
}

impl TypedMetric for UsdCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for UsdCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.value(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

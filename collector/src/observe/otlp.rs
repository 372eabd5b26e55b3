//! OTLP export, off the request path: the opentelemetry-otlp exporters
//! (HTTP/protobuf or gRPC) behind the SDK's batch span processor and
//! periodic metric reader, each on its own thread. Two things are added:
//!
//! - a bound on spans waiting, checked before the SDK's queue, so every
//!   span dropped (queue full, or its export failed) is counted on
//!   `/metrics` rather than logged once;
//! - a small Tokio runtime of its own that drives the exports: the SDK's
//!   threads poll with a plain executor, while the HTTP and gRPC clients
//!   need a Tokio reactor (open-telemetry/opentelemetry-rust#2539).
//!
//! The standard `OTEL_EXPORTER_OTLP_*`, `OTEL_BSP_*` and
//! `OTEL_METRIC_EXPORT_*` variables are honoured by the SDK; a key in
//! `[telemetry]` wins over its variable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};
use prometheus_client::encoding::DescriptorEncoder;
use tollgate_schemas::metrics::{Collector, counter};

use crate::config::{OtlpProtocol, TelemetryConfig};

/// Why OpenTelemetry export could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("telemetry: {0}={1:?}: expected \"http/protobuf\" or \"grpc\"")]
    Protocol(String, String),
    #[error("telemetry: starting the export runtime: {0}")]
    Runtime(std::io::Error),
    #[error("telemetry: building the OTLP exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("telemetry: building the OTLP/HTTP client: {0}")]
    Client(String),
    #[error(
        "telemetry: gRPC export is plaintext only; use an http:// collector, or http/protobuf for https://"
    )]
    GrpcTls,
}

/// Whether export is on: an endpoint in `[telemetry]` or in the
/// environment, and not `OTEL_SDK_DISABLED=true`.
pub fn enabled(config: &TelemetryConfig, env: impl Fn(&str) -> Option<String>) -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    config.otlp_endpoint.is_some()
        || [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ]
        .into_iter()
        .any(|k| env(k).is_some_and(|v| !v.trim().is_empty()))
}

/// What export has done; on `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Whether each signal's last export failed (traces, metrics): a
    /// failure is logged when it starts and when it ends, not per batch.
    failing: [std::sync::atomic::AtomicBool; 2],
    /// Spans handed to the SDK and not yet exported or failed.
    waiting: AtomicU64,
    pub spans_exported: AtomicU64,
    pub spans_dropped_queue_full: AtomicU64,
    pub spans_dropped_export_failed: AtomicU64,
    pub metric_exports: AtomicU64,
    pub metric_exports_failed: AtomicU64,
}

impl ExportStats {
    fn outcome(&self, signal: &'static str, result: &OTelSdkResult) {
        let failing = &self.failing[usize::from(signal == "metrics")];
        match result {
            Ok(()) => {
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(signal, "OTLP export works again");
                }
            }
            Err(e) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(signal, error = %e, "OTLP export failing; telemetry is dropped (counted in tollgate_otlp_*) while requests are served");
                }
            }
        }
    }
}

impl Collector for ExportStats {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        counter(
            &mut e,
            "tollgate_otlp_spans_exported",
            "Spans the OTLP collector accepted.",
            &self.spans_exported,
        )?;
        counter(
            &mut e,
            "tollgate_otlp_spans_dropped_queue_full",
            "Spans dropped: the export queue was full.",
            &self.spans_dropped_queue_full,
        )?;
        counter(
            &mut e,
            "tollgate_otlp_spans_dropped_export_failed",
            "Spans dropped: their export failed (collector down, slow or refusing).",
            &self.spans_dropped_export_failed,
        )?;
        counter(
            &mut e,
            "tollgate_otlp_metric_exports",
            "Metric exports attempted.",
            &self.metric_exports,
        )?;
        counter(
            &mut e,
            "tollgate_otlp_metric_exports_failed",
            "Metric exports that failed; their data points are lost.",
            &self.metric_exports_failed,
        )
    }
}

/// The running exporters. Dropping it stops them without waiting;
/// [`Exporters::shutdown`] flushes first.
pub struct Exporters {
    // Field order is drop order: the providers stop before the runtime
    // that drives their exports.
    pub tracer_provider: SdkTracerProvider,
    pub meter_provider: SdkMeterProvider,
    pub stats: Arc<ExportStats>,
    _runtime: Background,
}

impl Exporters {
    /// Starts span and metric export as `config` and the environment say.
    pub fn start(
        config: &TelemetryConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, OtlpError> {
        let traces_protocol = protocol(config, &env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")?;
        let metrics_protocol = protocol(config, &env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")?;
        for (p, signal) in [(traces_protocol, "TRACES"), (metrics_protocol, "METRICS")] {
            let url = config.otlp_endpoint.clone().or_else(|| {
                env(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
                    .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            });
            let tls = |u: String| u.trim().to_ascii_lowercase().starts_with("https://");
            if p == OtlpProtocol::Grpc && url.is_some_and(tls) {
                return Err(OtlpError::GrpcTls);
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-otlp")
            .enable_all()
            .build()
            .map_err(OtlpError::Runtime)?;
        // The gRPC channel binds to the runtime it is built in.
        let _entered = runtime.enter();
        let handle = runtime.handle().clone();
        let stats = Arc::new(ExportStats::default());
        let service = config
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "tollgate".to_string());
        let resource = Resource::builder().with_service_name(service).build();
        let endpoint = config.otlp_endpoint.as_deref();
        let headers: HashMap<String, String> = config
            .otlp_headers
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()))
            .collect();

        // The span and metric builders are different types with the same
        // steps: one macro, so the two signals cannot drift apart.
        macro_rules! exporter {
            ($builder:path, $protocol:expr, $signal:literal, $path:literal) => {
                match $protocol {
                    OtlpProtocol::HttpProtobuf => {
                        let mut b = <$builder>::builder()
                            .with_http()
                            .with_protocol(Protocol::HttpBinary)
                            .with_http_client(Capped::new(timeout(&env, $signal))?)
                            .with_headers(headers.clone());
                        if let Some(base) = endpoint {
                            b = b.with_endpoint(format!("{base}{}", $path));
                        }
                        b.build()?
                    }
                    OtlpProtocol::Grpc => {
                        let mut b = <$builder>::builder()
                            .with_tonic()
                            .with_metadata(metadata(&headers));
                        if let Some(base) = endpoint {
                            b = b.with_endpoint(base);
                        }
                        b.build()?
                    }
                }
            };
        }
        let spans = exporter!(
            opentelemetry_otlp::SpanExporter,
            traces_protocol,
            "TRACES",
            "/v1/traces"
        );
        let metrics = exporter!(
            opentelemetry_otlp::MetricExporter,
            metrics_protocol,
            "METRICS",
            "/v1/metrics"
        );

        let queue = config
            .max_queue_spans
            .or_else(|| {
                env("OTEL_BSP_MAX_QUEUE_SIZE")
                    .and_then(|v| v.trim().parse().ok())
                    .filter(|n| (1..=1 << 20).contains(n))
            })
            .unwrap_or(2048);
        let batch = BatchSpanProcessor::builder(CountedSpans {
            inner: Arc::new(spans),
            stats: stats.clone(),
            runtime: handle.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(queue)
                .build(),
        )
        .build();
        let tracer_provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batch,
                stats: stats.clone(),
                capacity: queue as u64,
            })
            .with_resource(resource.clone())
            .build();
        let reader = PeriodicReader::builder(CountedMetrics {
            inner: metrics,
            stats: stats.clone(),
            runtime: handle,
        })
        .with_interval(interval(&env))
        .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        Ok(Self {
            tracer_provider,
            meter_provider,
            stats,
            _runtime: Background(Some(runtime)),
        })
    }

    /// Exports what is waiting and stops, traces and metrics at once, for
    /// at most about `timeout`; blocking, so call it off the async runtime.
    /// `false` when an export was still under way (a collector that does
    /// not answer).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let meters = self.meter_provider.clone();
        let metrics = std::thread::Builder::new()
            .name("tollgate-otlp-stop".into())
            .spawn(move || meters.shutdown_with_timeout(timeout).is_ok());
        let traces = self.tracer_provider.shutdown_with_timeout(timeout).is_ok();
        let metrics = metrics.is_ok_and(|t| t.join().unwrap_or(false));
        traces && metrics
    }
}

/// The protocol of one signal: `[telemetry]`, else the signal's variable,
/// else `OTEL_EXPORTER_OTLP_PROTOCOL`, else HTTP/protobuf.
fn protocol(
    config: &TelemetryConfig,
    env: &impl Fn(&str) -> Option<String>,
    signal_var: &str,
) -> Result<OtlpProtocol, OtlpError> {
    if let Some(p) = config.otlp_protocol {
        return Ok(p);
    }
    let var = [signal_var, "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .into_iter()
        .find_map(|k| Some((k, env(k)?)));
    match var {
        Some((k, v)) => OtlpProtocol::parse(&v).ok_or(OtlpError::Protocol(k.into(), v)),
        None => Ok(OtlpProtocol::HttpProtobuf),
    }
}

/// The export timeout the variables give (milliseconds), else 10 s.
fn timeout(env: &impl Fn(&str) -> Option<String>, signal: &str) -> Duration {
    env(&format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|v| v.trim().parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds, at least 100: a smaller
/// one would keep a core busy exporting), else the SDK's 60 s.
fn interval(env: &impl Fn(&str) -> Option<String>) -> Duration {
    env("OTEL_METRIC_EXPORT_INTERVAL")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(60), |ms| {
            Duration::from_millis(ms.max(100))
        })
}

/// Largest collector response read; the rest is dropped unread (an answer
/// is an empty or tiny protobuf message).
const MAX_COLLECTOR_RESPONSE: usize = 64 * 1024;

/// The OTLP/HTTP client: reqwest with the export timeout, reading at most
/// [`MAX_COLLECTOR_RESPONSE`] of an answer, so a collector that streams
/// without end cannot grow the gateway's memory.
#[derive(Debug)]
struct Capped(reqwest::Client);

impl Capped {
    fn new(timeout: Duration) -> Result<Self, OtlpError> {
        reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map(Self)
            .map_err(|e| OtlpError::Client(e.to_string()))
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Capped {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let mut response = self.0.execute(request).await?.error_for_status()?;
        let status = response.status();
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = response.chunk().await? {
            let room = MAX_COLLECTOR_RESPONSE - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() == MAX_COLLECTOR_RESPONSE {
                break;
            }
        }
        Ok(http::Response::builder()
            .status(status)
            .body(body.freeze())?)
    }
}

fn metadata(
    headers: &HashMap<String, String>,
) -> opentelemetry_otlp::tonic_types::metadata::MetadataMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        // Names and values were validated as HTTP headers with the config.
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            map.insert(k, v);
        }
    }
    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map)
}

/// The export runtime, stopped without blocking wherever it is dropped
/// (dropping a runtime inside another one would panic).
struct Background(Option<tokio::runtime::Runtime>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `f` to completion on the export runtime: awaited where a Tokio
/// runtime is already current, else blocked on (the SDK's own threads).
async fn on_runtime<F: Future>(runtime: &tokio::runtime::Handle, f: F) -> F::Output {
    if tokio::runtime::Handle::try_current().is_ok() {
        f.await
    } else {
        runtime.block_on(f)
    }
}

/// Counts spans as they leave: exported, or dropped with a failed batch.
#[derive(Debug)]
struct CountedSpans<E> {
    inner: Arc<E>,
    stats: Arc<ExportStats>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for CountedSpans<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = on_runtime(&self.runtime, self.inner.export(batch)).await;
        let s = &self.stats;
        s.waiting.fetch_sub(n, Ordering::Relaxed);
        s.outcome("traces", &result);
        match &result {
            Ok(()) => s.spans_exported.fetch_add(n, Ordering::Relaxed),
            Err(_) => s
                .spans_dropped_export_failed
                .fetch_add(n, Ordering::Relaxed),
        };
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.shutdown_with_timeout(timeout),
            None => Ok(()),
        }
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.force_flush(),
            None => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Refuses a span, counted, when `capacity` are already waiting, so the
/// SDK's queue (of the same size) never drops one uncounted.
#[derive(Debug)]
struct Bounded<P> {
    inner: P,
    stats: Arc<ExportStats>,
    capacity: u64,
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let s = &self.stats;
        if s.waiting.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            s.waiting.fetch_sub(1, Ordering::Relaxed);
            s.spans_dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts metric exports and their failures.
struct CountedMetrics<E> {
    inner: E,
    stats: Arc<ExportStats>,
    runtime: tokio::runtime::Handle,
}

impl<E: PushMetricExporter> PushMetricExporter for CountedMetrics<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = on_runtime(&self.runtime, self.inner.export(metrics)).await;
        self.stats.metric_exports.fetch_add(1, Ordering::Relaxed);
        self.stats.outcome("metrics", &result);
        if result.is_err() {
            self.stats
                .metric_exports_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn export_is_off_without_an_endpoint_and_on_with_one_from_config_or_env() {
        let mut c = TelemetryConfig::default();
        assert!(!enabled(&c, env(&[])));
        assert!(enabled(
            &c,
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4318")])
        ));
        c.otlp_endpoint = Some("http://x:4318".into());
        assert!(enabled(&c, env(&[])));
        assert!(!enabled(&c, env(&[("OTEL_SDK_DISABLED", "true")])));
    }

    #[test]
    fn an_unknown_protocol_in_the_environment_is_refused() {
        let c = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            ..TelemetryConfig::default()
        };
        let err = Exporters::start(&c, env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]));
        assert!(matches!(err, Err(OtlpError::Protocol(..))));
    }
}

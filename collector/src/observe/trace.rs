//! OpenTelemetry for each request, in the GenAI semantic conventions
//! (<https://opentelemetry.io/docs/specs/semconv/gen-ai/>): one server span
//! per request and one client span per upstream attempt under it (a
//! fallback shows as two attempts), and the `gen_ai.client.token.usage`,
//! `gen_ai.client.operation.duration` and `gen_ai.server.time_to_first_token`
//! histograms. The client's `traceparent` is the parent; each attempt
//! carries its own span's W3C context to the upstream; the event's
//! `trace_id` is the span's. Prompt and completion text are exported only
//! with `capture_content`; keys never are.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::metrics::{Histogram, MeterProvider};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;
use serde_json::{Map, Value as Json};
use tollgate_schemas::{Outcome, Tokens, UsageEvent, Usd};

use super::metrics::{Names, Timing};
use super::otlp::{ExportStats, Exporters, OtlpError};
use crate::config::TelemetryConfig;
use crate::ledger::tally::Answered;
use crate::proxy::routing::Candidate;

/// Spans and GenAI metrics for every request, and their exporters.
pub struct Telemetry {
    tracer: SdkTracer,
    token_usage: Histogram<u64>,
    duration: Histogram<f64>,
    ttft: Histogram<f64>,
    propagator: TraceContextPropagator,
    capture_content: bool,
    names: Arc<Names>,
    exporters: Exporters,
}

/// Longest captured prompt or completion text per attribute, bytes; a
/// span over an exporter's message limit would be dropped whole.
const MAX_CONTENT_BYTES: usize = 32 * 1024;

/// Bucket boundaries the GenAI metric conventions advise.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
const TTFT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

impl Telemetry {
    /// Starts export when `config` or the environment names an endpoint;
    /// `Ok(None)` when export is off.
    pub fn start(
        config: &TelemetryConfig,
        names: Arc<Names>,
        env: impl Fn(&str) -> Option<String> + Copy,
    ) -> Result<Option<Self>, OtlpError> {
        if !super::otlp::enabled(config, env) {
            return Ok(None);
        }
        let exporters = Exporters::start(config, env)?;
        let scope = opentelemetry::InstrumentationScope::builder("tollgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = exporters.tracer_provider.tracer_with_scope(scope.clone());
        let meter = exporters.meter_provider.meter_with_scope(scope);
        let token_usage = meter
            .u64_histogram("gen_ai.client.token.usage")
            .with_unit("{token}")
            .with_description("Number of input and output tokens used.")
            .with_boundaries(TOKEN_BUCKETS.to_vec())
            .build();
        let duration = meter
            .f64_histogram("gen_ai.client.operation.duration")
            .with_unit("s")
            .with_description("GenAI operation duration.")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let ttft = meter
            .f64_histogram("gen_ai.server.time_to_first_token")
            .with_unit("s")
            .with_description("Time to generate first token for successful responses.")
            .with_boundaries(TTFT_BUCKETS.to_vec())
            .build();
        Ok(Some(Self {
            tracer,
            token_usage,
            duration,
            ttft,
            propagator: TraceContextPropagator::new(),
            capture_content: config.capture_content,
            names,
            exporters,
        }))
    }

    /// Export's counters, for `/metrics`.
    pub fn stats(&self) -> Arc<ExportStats> {
        self.exporters.stats.clone()
    }

    /// Exports what is waiting and stops, within about `timeout`;
    /// blocking. `false` when an export was still under way.
    pub fn shutdown(&self, timeout: std::time::Duration) -> bool {
        self.exporters.shutdown(timeout)
    }

    /// The server span of a request that just arrived at `endpoint`.
    pub fn request(self: &Arc<Self>, headers: &HeaderMap, endpoint: &str) -> RequestTrace {
        let parent = self.propagator.extract(&Headers(headers));
        let operation = operation(endpoint);
        let mut attributes = vec![KeyValue::new("gen_ai.operation.name", operation)];
        if let Some((host, port)) = host(headers) {
            attributes.push(KeyValue::new("server.address", host));
            if let Some(port) = port {
                attributes.push(KeyValue::new("server.port", port));
            }
        }
        let span = self
            .tracer
            .span_builder(operation)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            telemetry: self.clone(),
            server: parent.with_span(span),
            attempt: None,
            operation,
        }
    }
}

/// The spans of one request; ended by [`RequestTrace::finish`] (or, for an
/// attempt, [`RequestTrace::attempt_ended`]).
pub struct RequestTrace {
    telemetry: Arc<Telemetry>,
    server: Context,
    attempt: Option<Context>,
    operation: &'static str,
}

impl RequestTrace {
    /// The trace id (32 lowercase hex digits), for the event.
    pub fn trace_id(&self) -> Option<String> {
        let span = self.server.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id().to_string())
    }

    pub fn consumer(&self, name: &str) {
        self.server
            .span()
            .set_attribute(KeyValue::new("tollgate.consumer", name.to_string()));
    }

    /// The parsed request: its model and sampling parameters, and, with
    /// `capture_content`, its messages.
    pub fn request(&self, model: &str, body: &Map<String, Json>, max_tokens: Option<u64>) {
        let span = self.server.span();
        // Span names stay low-cardinality: the route, not the raw name.
        let route = self.telemetry.names.model(Some(model));
        span.update_name(format!("{} {route}", self.operation));
        let mut kv = vec![KeyValue::new("gen_ai.request.model", model.to_string())];
        if let Some(n) = max_tokens.and_then(|n| i64::try_from(n).ok()) {
            kv.push(KeyValue::new("gen_ai.request.max_tokens", n));
        }
        for (key, attr) in [
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ] {
            if let Some(v) = body.get(key).and_then(Json::as_f64) {
                kv.push(KeyValue::new(attr, v));
            }
        }
        if self.telemetry.capture_content {
            let input = ["messages", "prompt", "input"]
                .into_iter()
                .find_map(|k| body.get(k));
            if let Some(input) = input {
                kv.push(KeyValue::new(
                    "gen_ai.input.messages",
                    capped(input.to_string()),
                ));
            }
        }
        span.set_attributes(kv);
    }

    /// An attempt is about to be sent to `c`: its client span starts.
    pub fn attempt_started(&mut self, c: &Candidate) {
        let t = &self.telemetry;
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", self.operation),
            KeyValue::new("gen_ai.provider.name", c.upstream.provider().to_string()),
            KeyValue::new("gen_ai.request.model", c.model.clone()),
            KeyValue::new("tollgate.upstream", c.upstream.name().to_string()),
        ];
        if let Some((host, port)) = c.upstream.address() {
            attributes.push(KeyValue::new("server.address", host.to_string()));
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        // The target's configured name; a glob route passing the client's
        // name through is `other`, as on /metrics.
        let target = t.names.served(Some(&c.model));
        let span = t
            .tracer
            .span_builder(format!("{} {target}", self.operation))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&t.tracer, &self.server);
        self.attempt = Some(self.server.with_span(span));
    }

    /// The W3C trace context headers an attempt carries upstream.
    pub fn propagation(&self) -> Vec<(&'static str, HeaderValue)> {
        let mut out = Outgoing(Vec::with_capacity(2));
        let cx = self.attempt.as_ref().unwrap_or(&self.server);
        self.telemetry.propagator.inject_context(cx, &mut out);
        out.0
    }

    /// What an attempt's answer said of itself; `texts`, with
    /// `capture_content`, is what it generated.
    pub fn answered<'a>(&self, a: &Answered, texts: impl Iterator<Item = &'a str>) {
        let mut kv = Vec::with_capacity(4);
        if let Some(id) = &a.id {
            kv.push(KeyValue::new("gen_ai.response.id", id.clone()));
        }
        if let Some(model) = &a.model {
            kv.push(KeyValue::new("gen_ai.response.model", model.clone()));
        }
        if !a.finish_reasons.is_empty() {
            let reasons: Vec<StringValue> = a
                .finish_reasons
                .iter()
                .map(|r| StringValue::from(r.clone()))
                .collect();
            kv.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(Array::String(reasons)),
            ));
        }
        if self.telemetry.capture_content {
            let choices: Vec<Json> = texts
                .map(|t| serde_json::json!({"role": "assistant", "parts": [{"type": "text", "content": t}]}))
                .collect();
            kv.push(KeyValue::new(
                "gen_ai.output.messages",
                capped(Json::Array(choices).to_string()),
            ));
        }
        if let Some(cx) = &self.attempt {
            cx.span().set_attributes(kv.iter().cloned());
        }
        // The served attempt answers last, so the request span ends with its.
        self.server.span().set_attributes(kv);
    }

    /// The attempt under way ended: `status` from the upstream (`None`:
    /// no response), `error` its failure label, what it was billed.
    pub fn attempt_ended(
        &mut self,
        status: Option<u16>,
        error: Option<&str>,
        tokens: Option<Tokens>,
        cost: Option<Usd>,
    ) {
        let Some(cx) = self.attempt.take() else {
            return;
        };
        let span = cx.span();
        let mut kv = Vec::with_capacity(6);
        if let Some(s) = status {
            kv.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        if let Some(t) = tokens {
            kv.push(usage("gen_ai.usage.input_tokens", t.input));
            kv.push(usage("gen_ai.usage.output_tokens", t.output));
        }
        if let Some(c) = cost {
            kv.push(KeyValue::new("tollgate.cost_usd", usd(c)));
        }
        if let Some(e) = error {
            kv.push(KeyValue::new("error.type", e.to_string()));
            span.set_status(Status::error(e.to_string()));
        }
        span.set_attributes(kv);
        span.end();
    }

    /// The request's event is complete: the server span gets its totals
    /// and ends, and the GenAI metrics are recorded.
    pub fn finish(mut self, e: &UsageEvent, t: Timing) {
        self.attempt_ended(None, Some("client_cancelled"), None, None);
        let span = self.server.span();
        let mut kv = vec![
            KeyValue::new("http.response.status_code", i64::from(e.status)),
            KeyValue::new("tollgate.outcome", e.outcome.as_str()),
            KeyValue::new("tollgate.fallback", e.fallback),
            KeyValue::new("tollgate.cache", cache(e)),
            KeyValue::new("tollgate.event_id", e.event_id.to_string()),
        ];
        if let Some(p) = &e.provider {
            kv.push(KeyValue::new("gen_ai.provider.name", p.clone()));
        }
        if let Some(m) = &e.served_model {
            kv.push(KeyValue::new("tollgate.served_model", m.clone()));
        }
        if e.token_source.is_some() {
            kv.push(usage("gen_ai.usage.input_tokens", e.input_tokens));
            kv.push(usage("gen_ai.usage.output_tokens", e.output_tokens));
        }
        if let Some(c) = e.cost_usd {
            kv.push(KeyValue::new("tollgate.cost_usd", usd(c)));
        }
        if let Some(err) = e.error_type.as_ref().filter(|_| e.outcome != Outcome::Ok) {
            kv.push(KeyValue::new("error.type", err.clone()));
            span.set_status(Status::error(err.clone()));
        }
        span.set_attributes(kv);
        span.end();
        self.record_metrics(e, t);
    }

    fn record_metrics(&self, e: &UsageEvent, t: Timing) {
        let tel = &self.telemetry;
        let mut attrs = vec![KeyValue::new("gen_ai.operation.name", self.operation)];
        // Bounded as on /metrics: the route and the configured target, not
        // whatever name the client or the upstream sent.
        let n = &tel.names;
        attrs.push(KeyValue::new(
            "gen_ai.request.model",
            n.model(e.requested_model.as_deref()),
        ));
        attrs.push(KeyValue::new(
            "gen_ai.response.model",
            n.served(e.served_model.as_deref()),
        ));
        if let Some(p) = &e.provider {
            attrs.push(KeyValue::new("gen_ai.provider.name", p.clone()));
        }
        if e.token_source.is_some() {
            for (kind, n) in [("input", e.input_tokens), ("output", e.output_tokens)] {
                let mut a = attrs.clone();
                a.push(KeyValue::new("gen_ai.token.type", kind));
                tel.token_usage.record(n, &a);
            }
        }
        if let (true, Some(ttft)) = (e.stream && e.outcome == Outcome::Ok, t.ttft) {
            tel.ttft.record(ttft.as_secs_f64(), &attrs);
        }
        if let Some(err) = e.error_type.as_ref().filter(|_| e.outcome != Outcome::Ok) {
            attrs.push(KeyValue::new("error.type", err.clone()));
        }
        tel.duration.record(t.elapsed.as_secs_f64(), &attrs);
    }
}

/// GenAI's `gen_ai.operation.name` for a gateway endpoint.
fn operation(endpoint: &str) -> &'static str {
    match endpoint {
        "chat/completions" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        _ => "other",
    }
}

fn usage(key: &'static str, n: u64) -> KeyValue {
    KeyValue::new(key, i64::try_from(n).unwrap_or(i64::MAX))
}

/// USD as a double, the nearest to the ledger's exact decimal (the lake
/// keeps the decimal).
fn usd(c: Usd) -> f64 {
    rust_decimal::prelude::ToPrimitive::to_f64(&c.decimal()).unwrap_or(0.0)
}

fn cache(e: &UsageEvent) -> &'static str {
    match e.cache {
        tollgate_schemas::CacheStatus::Hit => "hit",
        tollgate_schemas::CacheStatus::Miss => "miss",
        tollgate_schemas::CacheStatus::Bypass => "bypass",
    }
}

/// A prompt or completion, cut at [`MAX_CONTENT_BYTES`] on a character
/// boundary.
fn capped(mut text: String) -> String {
    if text.len() > MAX_CONTENT_BYTES {
        let mut end = MAX_CONTENT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...[truncated]");
    }
    text
}

/// The client's `traceparent`, when it is valid W3C trace context
/// (<https://www.w3.org/TR/trace-context/#traceparent-header>): lowercase
/// hex, version not `ff` (version `00` exactly 55 characters, a later one
/// at least that with a `-` after), trace and parent ids not all zero.
/// Anything else starts a new trace, with or without export.
pub fn traceparent(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let b = v.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
    };
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    let shape = b.len() >= 55
        && hex(0..2)
        && b[2] == b'-'
        && hex(3..35)
        && b[35] == b'-'
        && hex(36..52)
        && b[52] == b'-'
        && hex(53..55);
    // Flags beyond sampled (01) and random (02) are refused, as the
    // propagator refuses them, so a header means the same with export on
    // or off.
    let flags_ok = shape && u8::from_str_radix(&v[53..55], 16).is_ok_and(|f| f <= 2);
    let version_ok = match &b[..2.min(b.len())] {
        b"00" => b.len() == 55,
        b"ff" => false,
        _ => b.len() == 55 || b.get(55) == Some(&b'-'),
    };
    (shape && flags_ok && version_ok && !zero(3..35) && !zero(36..52)).then_some(v)
}

/// The `Host` header split into host and port.
fn host(headers: &HeaderMap) -> Option<(String, Option<i64>)> {
    let h = headers.get(http::header::HOST)?.to_str().ok()?;
    let uri: http::uri::Authority = h.parse().ok()?;
    Some((uri.host().to_string(), uri.port_u16().map(i64::from)))
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => traceparent(self.0),
            // Context from a refused traceparent is not taken either.
            "tracestate" => {
                traceparent(self.0)?;
                self.0.get(key)?.to_str().ok()
            }
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Outgoing(Vec<(&'static str, HeaderValue)>);

impl Injector for Outgoing {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        if let Ok(v) = HeaderValue::from_str(&value)
            && !value.is_empty()
        {
            self.0.push((name, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(v: &str) -> Option<String> {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(v).unwrap());
        traceparent(&h).map(str::to_string)
    }

    #[test]
    fn only_valid_w3c_traceparents_are_taken() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parent(ok).as_deref(), Some(ok));
        assert!(parent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later").is_some());
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
            "00-1-b7ad6b7169203331-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7é",
        ] {
            assert_eq!(parent(bad), None, "{bad}");
        }
    }

    #[test]
    fn captured_text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_CONTENT_BYTES);
        let cut = capped(long);
        assert!(cut.len() <= MAX_CONTENT_BYTES + 16 && cut.ends_with("[truncated]"));
        assert_eq!(capped("short".into()), "short");
    }
}

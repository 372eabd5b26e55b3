//! The usage record of one request, from arrival to its one event.
//!
//! A [`Record`] is opened when a request arrives and emits exactly one
//! `UsageEvent` to the tap: when the gateway finishes the request, or,
//! if the request is dropped first (the client went away), from `Drop`, as
//! `client_cancelled` with what was generated so far.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use chrono::Utc;
use sha2::{Digest, Sha256};
use tollgate_schemas::{
    Attempt, CacheKind, CacheStatus, Outcome, SCHEMA_VERSION, TokenSource, Tokens, UsageEvent, Usd,
};
use uuid::Uuid;

use crate::config::ClientIp;
use crate::error::GatewayError;
use crate::ledger::pricing::Pricing;
use crate::ledger::tally::{Tally, Usage};
use crate::ledger::tap::Tap;
use crate::ledger::tokens::{self, Prompt};
use crate::observe::{InFlight, Observe, RequestTrace, Timing};
use crate::policy::cache::entry::Entry;
use crate::policy::quota::{Grant, Kind, Spent, Trip};
use crate::policy::screen::Blocked;
use crate::proxy::auth::Caller;
use crate::proxy::request::ClientRequest;
use crate::proxy::routing::Candidate;
use crate::upstream::Upstream;

/// What the ledger needs to know about the gateway.
pub struct Ledger {
    pub tap: Arc<Tap>,
    pub pricing: Pricing,
    pub instance: String,
    pub client_ip: ClientIp,
    /// Metrics and traces, fed from the same record.
    pub observe: Arc<Observe>,
}

pub struct Record {
    ledger: Arc<Ledger>,
    event: Option<UsageEvent>,
    started: Instant,
    upstream_wait: Duration,
    overhead: Option<Duration>,
    /// The request, for estimating when an upstream reports no usage.
    prompt: Option<Prompt>,
    /// The attempt under way, billed if the request is dropped mid-way.
    in_flight: Option<(Candidate, Instant)>,
    first_token: Option<Instant>,
    /// `None` when OpenTelemetry export is off.
    trace: Option<RequestTrace>,
    /// The request's limit reservations, settled when the record closes.
    grant: Option<Grant>,
    /// A content guard checks the answer: traces never capture its text.
    hide_output: bool,
    /// Answered from the cache: the original's tokens and cost.
    hit: Option<CacheHit>,
    _counted: InFlight,
}

impl Record {
    pub fn open(
        ledger: &Arc<Ledger>,
        endpoint: &str,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Self {
        let now = Utc::now();
        let event_id = uuid_v7();
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_string);
        let client_ip = peer.and_then(|p| match ledger.client_ip {
            ClientIp::Plain => Some(p.ip().to_string()),
            ClientIp::Hashed => Some(hex::encode(
                &Sha256::digest(p.ip().to_string().as_bytes())[..8],
            )),
            ClientIp::Off => None,
        });
        let trace = (ledger.observe.telemetry.as_ref()).map(|t| t.request(headers, endpoint));
        let event = UsageEvent {
            event_id,
            schema_version: SCHEMA_VERSION,
            request_id,
            trace_id: match &trace {
                Some(t) => t.trace_id(),
                None => trace_id(headers),
            },
            gateway_instance: ledger.instance.clone(),
            ts_start: now,
            ts_end: now,
            latency_ms: 0,
            ttft_ms: None,
            upstream_latency_ms: None,
            gateway_overhead_us: 0,
            consumer: None,
            team: None,
            api_key_id: None,
            client_ip,
            tags: tags(headers),
            endpoint: endpoint.to_string(),
            requested_model: None,
            served_model: None,
            provider: None,
            upstream: None,
            stream: false,
            fallback: false,
            fallback_from: None,
            fallback_reason: None,
            attempts: Vec::new(),
            status: 0,
            outcome: Outcome::Ok,
            error_type: None,
            input_tokens: 0,
            cached_input_tokens: 0,
            output_tokens: 0,
            reasoning_tokens: 0,
            token_source: None,
            cache: CacheStatus::Bypass,
            cache_kind: None,
            cost_usd: Some(Usd::ZERO),
            cost_saved_usd: None,
            price_version: Some(ledger.pricing.version().to_string()),
            rate_limited: false,
            limit_key: None,
        };
        Self {
            ledger: ledger.clone(),
            event: Some(event),
            started: Instant::now(),
            upstream_wait: Duration::ZERO,
            overhead: None,
            prompt: None,
            in_flight: None,
            first_token: None,
            trace,
            grant: None,
            hide_output: false,
            hit: None,
            _counted: ledger.observe.metrics.arrived(),
        }
    }

    /// The `x-request-id` answered: the client's own, else the event id.
    pub fn request_id_header(&self) -> Option<http::HeaderValue> {
        let e = self.event.as_ref()?;
        match &e.request_id {
            Some(id) => http::HeaderValue::from_str(id).ok(),
            None => {
                let mut buf = uuid::Uuid::encode_buffer();
                http::HeaderValue::from_str(e.event_id.hyphenated().encode_lower(&mut buf)).ok()
            }
        }
    }

    /// The request's `x-tollgate-tags`.
    /// Adds a tag the gateway sets itself (a client's tag of that name is
    /// replaced).
    pub fn tag(&mut self, key: &str, value: &str) {
        if let Some(e) = self.event() {
            e.tags.insert(key.to_string(), value.to_string());
        }
    }

    pub fn tags(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.event.as_ref().map_or(&NONE, |e| &e.tags)
    }

    /// When the request arrived (the catalog entry in force then prices it).
    pub fn started_at(&self) -> chrono::DateTime<Utc> {
        self.event.as_ref().map_or_else(Utc::now, |e| e.ts_start)
    }

    pub fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    fn event(&mut self) -> Option<&mut UsageEvent> {
        self.event.as_mut()
    }

    pub fn caller(&mut self, caller: &Caller<'_>) {
        if let Some(e) = self.event() {
            e.consumer = Some(caller.consumer.name.clone());
            e.team = caller.consumer.team.clone();
            e.api_key_id = Some(caller.key_id.as_str().to_string());
        }
        if let Some(t) = &self.trace {
            t.consumer(&caller.consumer.name);
        }
    }

    pub fn request(&mut self, req: &ClientRequest) {
        if let Some(e) = self.event() {
            e.requested_model = Some(crate::error::shown(&req.model));
            e.stream = req.stream;
            // Not looked up (yet): the cache step says otherwise.
            e.cache = CacheStatus::Bypass;
        }
    }

    /// The request as it goes upstream, past the content guard: what the
    /// trace may capture and what estimates count. With `hide_output`, an
    /// output rule applies and the answer's text is not captured.
    pub fn screened(&mut self, req: &ClientRequest, hide_output: bool) {
        if let Some(t) = &self.trace {
            t.request(&req.model, &req.body, req.max_tokens);
        }
        self.hide_output = hide_output;
        self.prompt = Some(Prompt {
            body: req.raw.clone(),
            max_tokens: req.max_tokens,
        });
    }

    /// The request's cache lookup: `Miss` or `Bypass` (a hit is
    /// [`Record::cache_hit`]).
    pub fn cache(&mut self, status: CacheStatus, kind: CacheKind) {
        if let Some(e) = self.event() {
            e.cache = status;
            e.cache_kind = Some(kind);
        }
    }

    /// Answered from the cache with `entry`: the event carries the
    /// original's tokens and model, costs `price`, and saved what the
    /// original cost.
    pub fn cache_hit(&mut self, entry: &Entry, kind: CacheKind, price: Usd) {
        if let Some(e) = self.event() {
            e.cache = CacheStatus::Hit;
            e.cache_kind = Some(kind);
            // Who answered originally; no upstream was asked this time.
            e.served_model = Some(entry.served_model.clone());
            e.provider = Some(entry.provider.clone());
            e.upstream = None;
        }
        self.hit = Some(CacheHit {
            tokens: entry.tokens(),
            source: entry.token_source(),
            price,
            saved: entry.cost(),
        });
    }

    /// What `tokens` of `model` cost at the request's start; `None` when
    /// the model has no price.
    pub fn price(&self, model: &str, tokens: &Tokens) -> Option<Usd> {
        let at = self.event.as_ref().map_or_else(Utc::now, |e| e.ts_start);
        self.ledger.pricing.cost(model, tokens, at)
    }

    /// A content guard rule blocked the request or its answer: the event
    /// names it in `limit_key` as `<rule>:<input|output>`.
    pub fn blocked(&mut self, b: &Blocked) {
        if let Some(e) = self.event() {
            e.limit_key = Some(format!("{}:{}", b.rule, b.direction.as_str()));
        }
    }

    /// A limit tripped: the event says which rule and key; with
    /// `fallback`, the request goes on as a fallback for that reason.
    pub fn limited(&mut self, trip: &Trip, fallback: bool) {
        let consumer = self.event.as_ref().and_then(|e| e.consumer.clone());
        self.ledger
            .observe
            .metrics
            .limited(consumer.as_deref(), &trip.rule);
        if let Some(e) = self.event() {
            e.rate_limited = true;
            e.limit_key = Some(trip.limit_key.clone());
            if fallback {
                e.fallback = true;
                e.fallback_from = e.requested_model.clone();
                e.fallback_reason = Some(
                    match trip.kind {
                        Kind::RateLimit => "rate_limited",
                        Kind::Budget => "budget_exhausted",
                    }
                    .into(),
                );
            }
        }
    }

    /// The limit reservations to settle to the request's usage at its end.
    pub fn hold(&mut self, grant: Grant) {
        self.grant = Some(grant);
    }

    /// An attempt is about to be sent.
    pub fn sending(&mut self, c: &Candidate) -> Instant {
        let now = Instant::now();
        self.in_flight = Some((c.clone(), now));
        if let Some(t) = &mut self.trace {
            t.attempt_started(c);
        }
        now
    }

    /// The trace context headers the attempt under way carries upstream
    /// (none when tracing is off).
    pub fn trace_headers(&self) -> Vec<(&'static str, http::HeaderValue)> {
        self.trace
            .as_ref()
            .map(RequestTrace::propagation)
            .unwrap_or_default()
    }

    /// Streamed responses being relayed, counted while the guard lives.
    pub fn stream_opened(&self) -> InFlight {
        self.ledger.observe.metrics.stream_opened()
    }

    /// Time spent waiting on an upstream, excluded from the gateway overhead.
    pub fn waited(&mut self, d: Duration) {
        self.upstream_wait += d;
    }

    /// The response is leaving the gateway: what the gateway itself cost.
    pub fn responded(&mut self) {
        self.overhead = Some(self.started.elapsed().saturating_sub(self.upstream_wait));
    }

    /// The first event with generated content went to the client at `at`.
    pub fn first_token(&mut self, at: Instant) {
        self.first_token.get_or_insert(at);
        let ms = at.saturating_duration_since(self.started).as_millis() as u64;
        if let Some(e) = self.event() {
            e.ttft_ms.get_or_insert(ms);
        }
    }

    /// What an attempt that produced `tally` is billed: the upstream's
    /// counts, else an estimate, which `upstream` counts by reason.
    pub fn settle(&self, upstream: &Upstream, tally: &Tally) -> Usage {
        let (usage, estimated) = tally.settle(self.prompt.as_ref());
        if let Some(why) = estimated {
            upstream.estimated(why);
        }
        if let Some(t) = &self.trace {
            if self.hide_output {
                t.answered(&tally.answer, std::iter::empty());
            } else {
                t.answered(&tally.answer, tally.texts());
            }
        }
        usage
    }

    /// Records a finished attempt (successful or not).
    pub fn attempt(
        &mut self,
        c: &Candidate,
        status: Option<u16>,
        error: Option<&str>,
        latency: Duration,
        usage: Option<Usage>,
    ) {
        self.in_flight = None;
        let Some(ts_start) = self.event.as_ref().map(|e| e.ts_start) else {
            return;
        };
        let (tokens, source) = match usage {
            Some(u) => (u.tokens, Some(u.source)),
            None => (Tokens::default(), None),
        };
        let cost = self.ledger.pricing.cost(&c.model, &tokens, ts_start);
        self.ledger
            .observe
            .metrics
            .attempt(c.upstream.name(), status, latency);
        if let Some(t) = &mut self.trace {
            t.attempt_ended(status, error, source.map(|_| tokens), cost);
        }
        if let Some(e) = self.event() {
            e.attempts.push(Attempt {
                upstream: c.upstream.name().to_string(),
                provider: c.upstream.provider().to_string(),
                model: c.model.clone(),
                status,
                error: error.map(str::to_string),
                latency_ms: latency.as_millis() as u64,
                input_tokens: tokens.input,
                cached_input_tokens: tokens.cached_input,
                output_tokens: tokens.output,
                reasoning_tokens: tokens.reasoning,
                token_source: source,
                cost_usd: cost,
            });
        }
    }

    /// The attempt whose response the client gets.
    pub fn served_by(&mut self, c: &Candidate) {
        if let Some(e) = self.event() {
            e.served_model = Some(c.model.clone());
            e.provider = Some(c.upstream.provider().to_string());
            e.upstream = Some(c.upstream.name().to_string());
        }
    }

    /// Ends the record with a successful response.
    pub fn finish(mut self, status: u16) {
        self.close(status, Outcome::Ok, None);
    }

    /// Ends the record with an error response and renders it.
    pub fn fail(mut self, err: GatewayError) -> axum::response::Response {
        use axum::response::IntoResponse;
        self.responded();
        let request_id = self.request_id_header();
        self.close(err.status().as_u16(), err.outcome(), Some(err.kind()));
        let mut resp = err.into_response();
        if let Some(v) = request_id {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }

    /// Ends a streamed response that broke or was abandoned after its head
    /// went out with `status`.
    pub fn finish_with(mut self, status: u16, outcome: Outcome, error_type: &str) {
        self.close(status, outcome, Some(error_type));
    }

    fn close(&mut self, status: u16, outcome: Outcome, error_type: Option<&str>) {
        if let Some((c, sent)) = self.in_flight.take() {
            // Dropped while an upstream was working on it: the prompt was
            // processed, so it is billed, as the upstream will bill it.
            let input = self.prompt.as_ref().map_or(0, |p| tokens::input(&p.body));
            let usage = Usage {
                tokens: Tokens::new(input, 0, 0, 0),
                source: TokenSource::Estimated,
            };
            self.attempt(
                &c,
                None,
                Some("client_cancelled"),
                sent.elapsed(),
                Some(usage),
            );
        }
        let Some(mut e) = self.event.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        e.ts_end = e.ts_start + chrono::Duration::microseconds(elapsed.as_micros() as i64);
        e.latency_ms = elapsed.as_millis() as u64;
        e.gateway_overhead_us = self
            .overhead
            .unwrap_or_else(|| elapsed.saturating_sub(self.upstream_wait))
            .as_micros() as u64;
        if !e.attempts.is_empty() {
            e.upstream_latency_ms = Some(e.attempts.iter().map(|a| a.latency_ms).sum());
        }
        e.status = status;
        e.outcome = outcome;
        e.error_type = error_type.map(str::to_string);
        let mut total = Tokens::default();
        let mut cost = Some(Usd::ZERO);
        let mut source = None;
        for a in &e.attempts {
            let t = a.tokens();
            total.input += t.input;
            total.cached_input += t.cached_input;
            total.output += t.output;
            total.reasoning += t.reasoning;
            cost = cost.zip(a.cost_usd).map(|(x, y)| x + y);
            source = match (source, a.token_source) {
                (Some(TokenSource::Estimated), _) | (_, Some(TokenSource::Estimated)) => {
                    Some(TokenSource::Estimated)
                }
                (s, None) => s,
                (_, s) => s,
            };
        }
        if let Some(hit) = self.hit.take() {
            total = hit.tokens;
            source = Some(hit.source);
            cost = Some(hit.price);
            e.cost_saved_usd = hit.saved;
        }
        e.input_tokens = total.input;
        e.cached_input_tokens = total.cached_input;
        e.output_tokens = total.output;
        e.reasoning_tokens = total.reasoning;
        e.token_source = source;
        e.cost_usd = cost;
        if let Some(grant) = self.grant.take() {
            grant.settle(&Spent {
                input: total.input,
                output: total.output,
                cost,
            });
        }
        if e.attempts.len() > 1
            && !e.fallback
            && let Some(first) = e.attempts.first()
        {
            e.fallback = true;
            e.fallback_from = Some(first.model.clone());
            e.fallback_reason = first.error.clone();
        }
        // One clean attempt is all in the top-level fields already; the
        // list is kept for what they cannot say (retries, failures).
        if let [only] = e.attempts.as_slice()
            && only.error.is_none()
            && only.status.is_some_and(|s| (200..300).contains(&s))
        {
            e.attempts.clear();
        }
        let timing = Timing {
            elapsed,
            ttft: self
                .first_token
                .map(|at| at.saturating_duration_since(self.started)),
        };
        self.ledger.observe.metrics.finished(&e, timing);
        if let Some(t) = self.trace.take() {
            t.finish(&e, timing);
        }
        self.ledger.tap.emit(e);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.event.is_some() {
            // 499: the client closed the request before a response was sent.
            self.close(499, Outcome::ClientCancelled, Some("client_cancelled"));
        }
    }
}

/// What a cache hit puts in the event in place of attempts.
struct CacheHit {
    tokens: Tokens,
    source: TokenSource,
    price: Usd,
    saved: Option<Usd>,
}

/// A UUIDv7 (time-ordered, the ledger's dedupe key) with its 74 random bits
/// from a per-thread generator: `Uuid::now_v7` asks the kernel for them,
/// a system call per id on the request path.
fn uuid_v7() -> Uuid {
    let millis = Utc::now().timestamp_millis().max(0) as u64;
    let random: [u8; 10] = fastrand::u128(..).to_le_bytes()[..10]
        .try_into()
        .unwrap_or([0; 10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// The trace id of a valid W3C `traceparent` header.
fn trace_id(headers: &HeaderMap) -> Option<String> {
    crate::observe::trace::traceparent(headers).map(|v| v[3..35].to_string())
}

const MAX_TAGS: usize = 16;
const MAX_TAG_LEN: usize = 64;

/// `x-tollgate-tags: feature=search, env=prod` -> a bounded map; malformed
/// pairs are skipped.
fn tags(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for value in headers.get_all("x-tollgate-tags") {
        let Ok(v) = value.to_str() else { continue };
        for pair in v.split(',') {
            let Some((k, val)) = pair.split_once('=') else {
                continue;
            };
            let (k, val) = (k.trim(), val.trim());
            let ok = |s: &str| {
                !s.is_empty() && s.len() <= MAX_TAG_LEN && s.bytes().all(|b| b.is_ascii_graphic())
            };
            if ok(k) && ok(val) && out.len() < MAX_TAGS {
                out.insert(k.to_string(), val.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn ids_are_version_7_and_distinct() {
        let (a, b) = (uuid_v7(), uuid_v7());
        assert_eq!(a.get_version_num(), 7);
        assert_ne!(a, b);
        assert!(a.as_bytes()[..6] <= b.as_bytes()[..6], "time-ordered");
    }

    #[test]
    fn tags_are_parsed_and_bounded() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-tollgate-tags",
            HeaderValue::from_static("feature=search, env=prod,broken,=x,k="),
        );
        let t = tags(&h);
        assert_eq!(t.len(), 2);
        assert_eq!(t["feature"], "search");
        let many: String = (0..40).map(|i| format!("k{i}=v,")).collect();
        h.insert("x-tollgate-tags", HeaderValue::from_str(&many).unwrap());
        assert_eq!(tags(&h).len(), MAX_TAGS);
    }

    #[test]
    fn traceparent_gives_the_trace_id() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        assert_eq!(trace_id(&h), None);
    }
}

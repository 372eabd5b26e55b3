//! `UsageEvent` v1: one row per client request.
//!
//! Every request the gateway answers yields exactly one event, rejected,
//! failed and cancelled ones included. Optional fields are `null` when the
//! request never got far enough to know them (a 401 has no model).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::Usd;
use crate::tokens::Tokens;

pub const SCHEMA_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    // Identity
    /// UUIDv7, time-ordered; the ledger's dedupe key.
    pub event_id: Uuid,
    pub schema_version: u16,
    /// The client's own `x-request-id`; null when it sent none (the
    /// gateway then answers with the event id as `x-request-id`).
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub gateway_instance: String,

    // Time
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub ts_start: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub ts_end: DateTime<Utc>,
    pub latency_ms: u64,
    /// Streams only: time from the request's arrival to the first relayed
    /// event that carries generated content (content, reasoning, a tool
    /// call, completion text). Keep-alive comments and role-only chunks do
    /// not count.
    pub ttft_ms: Option<u64>,
    /// Time spent waiting on upstreams, all attempts together.
    pub upstream_latency_ms: Option<u64>,
    /// Time the gateway itself spent on the request, upstream waits excluded.
    pub gateway_overhead_us: u64,

    // Who
    pub consumer: Option<String>,
    pub team: Option<String>,
    /// Short, non-secret id of the API key used; never the key.
    pub api_key_id: Option<String>,
    pub client_ip: Option<String>,
    pub tags: BTreeMap<String, String>,

    // What
    pub endpoint: String,
    pub requested_model: Option<String>,
    pub served_model: Option<String>,
    pub provider: Option<String>,
    pub upstream: Option<String>,
    pub stream: bool,
    pub fallback: bool,
    pub fallback_from: Option<String>,
    pub fallback_reason: Option<String>,
    /// Every upstream attempt when there was more than one or when one
    /// failed. Empty when a single attempt succeeded: the top-level fields
    /// (served model, upstream, status, tokens, cost, upstream latency)
    /// describe it completely, and the ledger does not store it twice.
    pub attempts: Vec<Attempt>,

    // Outcome
    /// HTTP status sent to the client.
    pub status: u16,
    pub outcome: Outcome,
    pub error_type: Option<String>,

    // Tokens (see `Tokens` for their meaning)
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub token_source: Option<TokenSource>,

    // Cache
    pub cache: CacheStatus,
    pub cache_kind: Option<CacheKind>,

    // Money
    /// Sum of the cost of every attempt; null when a billed model has no price.
    pub cost_usd: Option<Usd>,
    pub cost_saved_usd: Option<Usd>,
    pub price_version: Option<String>,

    // Limits
    pub rate_limited: bool,
    pub limit_key: Option<String>,
}

/// One upstream attempt. A failed or partial attempt before a fallback is
/// billed and attributed here, so the request's cost is the sum of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub upstream: String,
    pub provider: String,
    pub model: String,
    /// Upstream HTTP status; null when no response arrived (connect error,
    /// timeout, cancellation before headers).
    pub status: Option<u16>,
    /// `connect`, `timeout`, `5xx`, `429`, `4xx` (by the status, or by the
    /// error object an upstream sent inside a 200 or a stream),
    /// `invalid_response` (a 200 that is not an answer: HTML, not JSON, no
    /// `choices`), `stream_error`, `client_cancelled`; null for a
    /// successful attempt.
    pub error: Option<String>,
    pub latency_ms: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub token_source: Option<TokenSource>,
    pub cost_usd: Option<Usd>,
}

impl Attempt {
    pub fn tokens(&self) -> Tokens {
        Tokens::new(
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_tokens,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    UpstreamError,
    RateLimited,
    BudgetExceeded,
    Blocked,
    ClientCancelled,
    InvalidRequest,
    Unauthorized,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::RateLimited => "rate_limited",
            Outcome::BudgetExceeded => "budget_exceeded",
            Outcome::Blocked => "blocked",
            Outcome::ClientCancelled => "client_cancelled",
            Outcome::InvalidRequest => "invalid_request",
            Outcome::Unauthorized => "unauthorized",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// Reported by the upstream's `usage`.
    Upstream,
    /// Counted by the gateway (tiktoken) because the upstream reported none.
    Estimated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheStatus {
    Hit,
    Miss,
    Bypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    Exact,
    Semantic,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn sample() -> UsageEvent {
        let t0 = DateTime::from_timestamp_micros(1_764_151_200_123_456).unwrap();
        let t1 = DateTime::from_timestamp_micros(1_764_151_201_654_321).unwrap();
        UsageEvent {
            event_id: Uuid::now_v7(),
            schema_version: SCHEMA_VERSION,
            request_id: Some("req_1".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            gateway_instance: "gw-1".into(),
            ts_start: t0,
            ts_end: t1,
            latency_ms: 1530,
            ttft_ms: Some(120),
            upstream_latency_ms: Some(1500),
            gateway_overhead_us: 85,
            consumer: Some("search-app".into()),
            team: Some("search".into()),
            api_key_id: Some("k_1a2b3c4d".into()),
            client_ip: Some("127.0.0.1".into()),
            tags: BTreeMap::from([("feature".into(), "search".into())]),
            endpoint: "chat/completions".into(),
            requested_model: Some("deepseek-r1".into()),
            served_model: Some("qwq-32b".into()),
            provider: Some("simulated".into()),
            upstream: Some("sim-qwq".into()),
            stream: true,
            fallback: true,
            fallback_from: Some("deepseek-r1".into()),
            fallback_reason: Some("5xx".into()),
            attempts: vec![Attempt {
                upstream: "deepseek".into(),
                provider: "openai".into(),
                model: "deepseek-reasoner".into(),
                status: Some(503),
                error: Some("5xx".into()),
                latency_ms: 30,
                input_tokens: 0,
                cached_input_tokens: 0,
                output_tokens: 0,
                reasoning_tokens: 0,
                token_source: None,
                cost_usd: Some(Usd::ZERO),
            }],
            status: 200,
            outcome: Outcome::Ok,
            error_type: None,
            input_tokens: 1200,
            cached_input_tokens: 1000,
            output_tokens: 300,
            reasoning_tokens: 200,
            token_source: Some(TokenSource::Upstream),
            cache: CacheStatus::Miss,
            cache_kind: None,
            cost_usd: Some(Usd::from_str("0.00029").unwrap()),
            cost_saved_usd: None,
            price_version: Some("2025-09-01".into()),
            rate_limited: false,
            limit_key: None,
        }
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let e = sample();
        let json = serde_json::to_string(&e).unwrap();
        let back: UsageEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
        // Times are integer microseconds, money is a bare number.
        assert!(json.contains("\"ts_start\":1764151200123456"), "{json}");
        assert!(json.contains("\"cost_usd\":0.00029"), "{json}");
        assert!(json.contains("\"outcome\":\"ok\""), "{json}");
    }

    #[test]
    fn outcome_names_match_their_json() {
        for o in [
            Outcome::Ok,
            Outcome::UpstreamError,
            Outcome::RateLimited,
            Outcome::BudgetExceeded,
            Outcome::Blocked,
            Outcome::ClientCancelled,
            Outcome::InvalidRequest,
            Outcome::Unauthorized,
        ] {
            assert_eq!(
                serde_json::to_string(&o).unwrap(),
                format!("\"{}\"", o.as_str())
            );
        }
    }
}

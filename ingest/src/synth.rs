//! Realistic synthetic usage events: a mix of consumers, teams, models,
//! streams, fallbacks, errors and cache hits, priced from the shipped
//! catalog. Feeds the benchmarks (ingest ceiling, bytes per event) and
//! `tollgate gen-lake`; deterministic for a given seed.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use tollgate_schemas::{
    Attempt, CacheKind, CacheStatus, CatalogError, Outcome, PriceCatalog, SCHEMA_VERSION,
    TokenSource, Tokens, UsageEvent, Usd,
};
use uuid::Uuid;

const CONSUMERS: [(&str, &str); 12] = [
    ("search-api", "search"),
    ("search-rerank", "search"),
    ("support-bot", "support"),
    ("support-summaries", "support"),
    ("code-review", "platform"),
    ("ci-triage", "platform"),
    ("docs-qa", "platform"),
    ("sales-email", "growth"),
    ("lead-scoring", "growth"),
    ("analytics-sql", "data"),
    ("etl-classify", "data"),
    ("notebook", "data"),
];

/// (requested model, served model, provider, upstream, share %, reasoning)
const MODELS: [(&str, &str, &str, &str, u32, bool); 5] = [
    (
        "deepseek-r1",
        "deepseek-reasoner",
        "deepseek",
        "deepseek",
        40,
        true,
    ),
    ("qwq-32b", "qwq-32b", "vllm", "gpu-pool", 25, true),
    ("gpt-4o-mini", "gpt-4o-mini", "openai", "openai", 20, false),
    (
        "deepseek-v3",
        "deepseek-chat",
        "deepseek",
        "deepseek",
        10,
        false,
    ),
    (
        "qwen-turbo",
        "qwen-turbo",
        "dashscope",
        "dashscope",
        5,
        false,
    ),
];

const FEATURES: [&str; 4] = ["search", "chat", "summarize", "classify"];

pub struct Synth {
    rng: fastrand::Rng,
    catalog: PriceCatalog,
    now: DateTime<Utc>,
    /// Mean gap between requests.
    gap_us: u64,
}

impl Synth {
    /// Events from `start`, one every `gap_us` microseconds on average.
    pub fn new(seed: u64, start: DateTime<Utc>, gap_us: u64) -> Result<Self, CatalogError> {
        Ok(Self {
            rng: fastrand::Rng::with_seed(seed),
            catalog: PriceCatalog::shipped()?,
            now: start,
            gap_us: gap_us.max(1),
        })
    }

    fn uuid_v7(&mut self, at: DateTime<Utc>) -> Uuid {
        let millis = at.timestamp_millis().max(0) as u64;
        let bytes = self.rng.u128(..).to_le_bytes();
        let mut random = [0u8; 10];
        random.copy_from_slice(&bytes[..10]);
        uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
    }

    fn cost(&self, model: &str, at: DateTime<Utc>, t: &Tokens) -> Option<Usd> {
        self.catalog.price(model, at).map(|p| p.cost(t))
    }

    pub fn next_event(&mut self) -> UsageEvent {
        let r = &mut self.rng;
        self.now += Duration::microseconds(r.u64(0..=2 * self.gap_us) as i64);
        let ts_start = self.now;
        let (consumer, team) = CONSUMERS[r.usize(..CONSUMERS.len())];
        let pick = r.u32(0..100);
        let mut acc = 0;
        let mut model = MODELS[0];
        for m in MODELS {
            acc += m.4;
            if pick < acc {
                model = m;
                break;
            }
        }
        let (requested, mut served, mut provider, mut upstream, _, reasoning) = model;
        let stream = r.u8(0..10) < 6;
        let roll = r.u32(0..1000);
        let cache_hit = roll < 100;
        let fails = (100..120).contains(&roll);
        let fallback = requested == "deepseek-r1" && (120..170).contains(&roll);

        let input = 150 + r.u64(0..3000) * r.u64(1..3);
        let cached = if r.bool() {
            input * r.u64(0..60) / 100
        } else {
            0
        };
        let output = if fails { 0 } else { 40 + r.u64(0..1200) };
        let reasoning_tokens = if reasoning {
            output * r.u64(30..75) / 100
        } else {
            0
        };
        let latency_ms = if cache_hit {
            r.u64(2..15)
        } else {
            200 + output * r.u64(8..30) / 2
        };
        let ttft_ms = stream.then(|| latency_ms.min(80 + r.u64(0..900)));

        let mut attempts = Vec::new();
        let mut fallback_reason = None;
        if fallback {
            let reason = ["5xx", "timeout", "429"][r.usize(..3)];
            fallback_reason = Some(reason.to_string());
            attempts.push(Attempt {
                upstream: upstream.into(),
                provider: provider.into(),
                model: served.into(),
                status: (reason != "timeout").then_some(if reason == "429" { 429 } else { 503 }),
                error: Some(reason.into()),
                latency_ms: r.u64(20..3000),
                input_tokens: 0,
                cached_input_tokens: 0,
                output_tokens: 0,
                reasoning_tokens: 0,
                token_source: None,
                cost_usd: Some(Usd::ZERO),
            });
            (served, provider, upstream) = ("qwq-32b", "vllm", "gpu-pool");
        }
        let tokens = Tokens::new(input, cached, output, reasoning_tokens);
        let (status, outcome, error_type) = if fails {
            (
                502,
                Outcome::UpstreamError,
                Some("upstream_error".to_string()),
            )
        } else {
            (200, Outcome::Ok, None)
        };
        let billed = if cache_hit {
            None
        } else {
            self.cost(served, ts_start, &tokens)
        };
        let saved = if cache_hit {
            self.cost(served, ts_start, &tokens)
        } else {
            None
        };
        if !cache_hit && (fallback || fails) {
            attempts.push(Attempt {
                upstream: upstream.into(),
                provider: provider.into(),
                model: served.into(),
                status: Some(if fails { 502 } else { 200 }),
                error: fails.then(|| "5xx".to_string()),
                latency_ms: latency_ms.saturating_sub(1),
                input_tokens: input,
                cached_input_tokens: tokens.cached_input,
                output_tokens: output,
                reasoning_tokens: tokens.reasoning,
                token_source: Some(TokenSource::Upstream),
                cost_usd: billed,
            });
        }
        let r = &mut self.rng;
        let feature = FEATURES[r.usize(..FEATURES.len())];
        let key_no = r.u8(0..2);
        let overhead = 30 + r.u64(0..120);
        let ts_end = ts_start + Duration::milliseconds(latency_ms as i64);
        let event_id = self.uuid_v7(ts_start);
        UsageEvent {
            event_id,
            schema_version: SCHEMA_VERSION,
            request_id: None,
            trace_id: None,
            gateway_instance: "gw-1".into(),
            ts_start,
            ts_end,
            latency_ms,
            ttft_ms,
            upstream_latency_ms: (!cache_hit).then(|| latency_ms.saturating_sub(1)),
            gateway_overhead_us: overhead,
            consumer: Some(consumer.into()),
            team: Some(team.into()),
            api_key_id: Some(format!(
                "k_{:08x}",
                (consumer.len() as u32) << 8 | u32::from(key_no)
            )),
            client_ip: None,
            tags: BTreeMap::from([("feature".to_string(), feature.to_string())]),
            endpoint: "chat/completions".into(),
            requested_model: Some(requested.into()),
            served_model: Some(served.into()),
            provider: Some(provider.into()),
            upstream: Some(upstream.into()),
            stream,
            fallback,
            fallback_from: fallback.then(|| requested.to_string()),
            fallback_reason,
            attempts,
            status,
            outcome,
            error_type,
            input_tokens: tokens.input,
            cached_input_tokens: tokens.cached_input,
            output_tokens: tokens.output,
            reasoning_tokens: tokens.reasoning,
            token_source: Some(TokenSource::Upstream),
            cache: if cache_hit {
                CacheStatus::Hit
            } else {
                CacheStatus::Miss
            },
            cache_kind: cache_hit.then_some(CacheKind::Exact),
            cost_usd: Some(billed.unwrap_or(Usd::ZERO)),
            cost_saved_usd: saved,
            price_version: Some(self.catalog.version().to_string()),
            rate_limited: false,
            limit_key: None,
        }
    }
}

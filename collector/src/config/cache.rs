//! The response cache's settings: per route (`cache = {...}` in
//! `[[routes]]`: mode, scope, TTL, entry size, the semantic mode's
//! embeddings upstream and threshold) and for the process (`[cache]`: the
//! in-process store's size, the Redis lookup timeout).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_schemas::Usd;
use tollgate_schemas::config::Invalid;

use super::UpstreamConfig;

/// One route's cache.
#[derive(Debug, Clone)]
pub struct RouteCache {
    pub mode: CacheMode,
    pub scope: CacheScope,
    pub ttl: Duration,
    /// Larger answers are not stored.
    pub max_entry_bytes: usize,
    /// What a hit costs the consumer (default 0).
    pub hit_usd: Usd,
    /// `semantic`: who embeds the last user message.
    pub embeddings: Option<EmbeddingsRef>,
    /// `semantic`: cosine similarity a hit needs, in (0, 1].
    pub threshold: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    Off,
    Exact,
    Semantic,
}

/// Who may receive an answer cached for someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// Only the consumer it was cached for (default).
    Consumer,
    /// Consumers of the same team (a consumer without a team: only itself).
    Team,
    /// Everyone who may use the model.
    Global,
}

#[derive(Debug, Clone)]
pub struct EmbeddingsRef {
    pub upstream: String,
    pub model: String,
    /// Longest wait for an embedding before the request bypasses the cache
    /// (default 2000 ms).
    pub timeout: Duration,
}

/// `[cache]`: the process's stores.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// The in-process store's capacity (without `[redis]`), bytes.
    pub memory_bytes: u64,
    /// Longest wait for a Redis lookup before the request bypasses the
    /// cache (default 50 ms).
    pub lookup_timeout: Duration,
    /// Most entries the semantic index holds (oldest go first).
    pub semantic_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            lookup_timeout: Duration::from_millis(50),
            semantic_entries: 100_000,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheSettings {
    memory_bytes: Option<u64>,
    lookup_timeout_ms: Option<u64>,
    semantic_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    mode: CacheMode,
    scope: Option<CacheScope>,
    ttl_s: Option<u64>,
    max_entry_bytes: Option<usize>,
    hit_usd: Option<String>,
    embeddings: Option<RawEmbeddings>,
    threshold: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbeddings {
    upstream: String,
    model: String,
    timeout_ms: Option<u64>,
}

/// Longest TTL: 30 days, seconds.
const MAX_TTL_S: u64 = 30 * 24 * 3600;

pub fn validate_settings(raw: RawCacheSettings) -> Result<CacheSettings, Invalid> {
    let d = CacheSettings::default();
    let memory_bytes = raw.memory_bytes.unwrap_or(d.memory_bytes);
    if !(1 << 20..=1 << 40).contains(&memory_bytes) {
        return Err(Invalid::key("cache.memory_bytes", "1 MiB to 1 TiB"));
    }
    let ms = raw.lookup_timeout_ms.unwrap_or(50);
    if !(1..=10_000).contains(&ms) {
        return Err(Invalid::key("cache.lookup_timeout_ms", "1 to 10000"));
    }
    let semantic_entries = raw.semantic_entries.unwrap_or(d.semantic_entries);
    if !(1..=10_000_000).contains(&semantic_entries) {
        return Err(Invalid::key("cache.semantic_entries", "1 to 10000000"));
    }
    Ok(CacheSettings {
        memory_bytes,
        lookup_timeout: Duration::from_millis(ms),
        semantic_entries,
    })
}

/// One route's `cache`; `None` when it is off. `path` is the route's key
/// path, for errors.
pub fn validate_route(
    raw: &RawRouteCache,
    path: &str,
    upstreams: &BTreeMap<String, UpstreamConfig>,
) -> Result<Option<RouteCache>, Invalid> {
    let err = |field: &str, m: String| Invalid::key(format!("{path}.cache{field}"), m);
    let ttl_s = raw.ttl_s.unwrap_or(3600);
    if !(1..=MAX_TTL_S).contains(&ttl_s) {
        return Err(err(".ttl_s", format!("1 to {MAX_TTL_S}")));
    }
    let max_entry_bytes = raw.max_entry_bytes.unwrap_or(1 << 20);
    if !(1024..=64 << 20).contains(&max_entry_bytes) {
        return Err(err(".max_entry_bytes", "1024 to 67108864".into()));
    }
    // Far below what one event may carry (the lake's bound is $10^8).
    let max_hit: Usd = "1000".parse().unwrap_or(Usd::ZERO);
    let hit_usd = match &raw.hit_usd {
        None => Usd::ZERO,
        Some(s) => s
            .parse::<Usd>()
            .ok()
            .filter(|u| *u >= Usd::ZERO && *u <= max_hit && u.decimal().scale() <= 10)
            .ok_or_else(|| {
                err(
                    ".hit_usd",
                    "a decimal string from 0 to 1000 with at most 10 decimals, e.g. \"0.0001\""
                        .into(),
                )
            })?,
    };
    let semantic = raw.mode == CacheMode::Semantic;
    let embeddings = match (&raw.embeddings, semantic) {
        (Some(e), true) => {
            if !upstreams.contains_key(&e.upstream) {
                let known: Vec<_> = upstreams.keys().cloned().collect();
                return Err(err(
                    ".embeddings.upstream",
                    format!(
                        "unknown upstream {:?} (known: {})",
                        e.upstream,
                        known.join(", ")
                    ),
                ));
            }
            if e.model.is_empty() {
                return Err(err(".embeddings.model", "must not be empty".into()));
            }
            let ms = e.timeout_ms.unwrap_or(2000);
            if !(1..=60_000).contains(&ms) {
                return Err(err(".embeddings.timeout_ms", "1 to 60000".into()));
            }
            Some(EmbeddingsRef {
                upstream: e.upstream.clone(),
                model: e.model.clone(),
                timeout: Duration::from_millis(ms),
            })
        }
        (None, true) => {
            return Err(err(
                ".embeddings",
                "semantic mode needs embeddings = { upstream, model }".into(),
            ));
        }
        (Some(_), false) | (None, false) => {
            if raw.embeddings.is_some() || raw.threshold.is_some() {
                return Err(err(
                    "",
                    "embeddings and threshold are for mode = \"semantic\"".into(),
                ));
            }
            None
        }
    };
    let threshold = raw.threshold.unwrap_or(0.92);
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(err(".threshold", "above 0 and at most 1".into()));
    }
    if raw.mode == CacheMode::Off {
        return Ok(None);
    }
    Ok(Some(RouteCache {
        mode: raw.mode,
        scope: raw.scope.unwrap_or(CacheScope::Consumer),
        ttl: Duration::from_secs(ttl_s),
        max_entry_bytes,
        hit_usd,
        embeddings,
        threshold,
    }))
}

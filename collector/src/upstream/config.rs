//! `[upstreams.<name>]`: an OpenAI-compatible HTTP upstream (`kind =
//! "openai"`: base URL, key, timeouts) or the simulated upstream in
//! process (`kind = "simulated"`: the simulator's knobs).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_schemas::config::{Invalid, Secret};
use toml::Spanned;

use super::simulate::SimSettings;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// The `provider` written into events; defaults to the upstream's name
    /// (`simulated` for a simulated one).
    pub provider: String,
    pub kind: UpstreamKind,
}

#[derive(Debug, Clone)]
pub enum UpstreamKind {
    OpenAi(OpenAiUpstreamConfig),
    Simulated(SimSettings),
}

#[derive(Debug, Clone)]
pub struct OpenAiUpstreamConfig {
    /// Without a trailing slash.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks before the attempt fails.
    pub idle_timeout: Duration,
}

/// `[upstreams.<name>]` as written; which fields are valid depends on `kind`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    kind: String,
    provider: Option<String>,
    // openai
    base_url: Option<String>,
    api_key: Option<String>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    // simulated
    latency_ms: Option<u64>,
    tokens_per_s: Option<f64>,
    output_tokens: Option<u32>,
    reasoning_tokens: Option<u32>,
    cached_tokens: Option<u32>,
    error_rate: Option<f64>,
    error_status: Option<u16>,
    usage: Option<bool>,
    usage_every_chunk: Option<bool>,
    usage_style: Option<String>,
    fail_after_chunks: Option<u32>,
}

pub fn validate(
    raw: BTreeMap<String, Spanned<RawUpstream>>,
) -> Result<BTreeMap<String, UpstreamConfig>, Invalid> {
    let mut upstreams = BTreeMap::new();
    for (name, spanned) in raw {
        let span = spanned.span();
        let path = format!("upstreams.{name}");
        let err = |m: String| Invalid::at(span.clone(), path.clone(), m);
        let u = spanned.into_inner();
        let kind = match u.kind.as_str() {
            "openai" => UpstreamKind::OpenAi(openai(&u).map_err(err)?),
            "simulated" => UpstreamKind::Simulated(simulated(&u).map_err(err)?),
            other => {
                return Err(err(format!(
                    "unknown kind {other:?} (expected \"openai\" or \"simulated\")"
                )));
            }
        };
        let provider = u.provider.unwrap_or_else(|| match kind {
            UpstreamKind::Simulated(_) => "simulated".to_string(),
            UpstreamKind::OpenAi(_) => name.clone(),
        });
        upstreams.insert(
            name.clone(),
            UpstreamConfig {
                name,
                provider,
                kind,
            },
        );
    }
    Ok(upstreams)
}

fn openai(u: &RawUpstream) -> Result<OpenAiUpstreamConfig, String> {
    let sim_fields = [
        u.latency_ms.is_some(),
        u.tokens_per_s.is_some(),
        u.output_tokens.is_some(),
        u.reasoning_tokens.is_some(),
        u.cached_tokens.is_some(),
        u.error_rate.is_some(),
        u.error_status.is_some(),
        u.usage.is_some(),
        u.usage_every_chunk.is_some(),
        u.usage_style.is_some(),
        u.fail_after_chunks.is_some(),
    ];
    if sim_fields.iter().any(|s| *s) {
        return Err("simulator settings are only valid with kind = \"simulated\"".into());
    }
    let base_url = u
        .base_url
        .as_deref()
        .ok_or("base_url is required for kind = \"openai\"")?;
    let parsed = reqwest::Url::parse(base_url)
        .map_err(|e| format!("base_url {base_url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("base_url {base_url:?} must be http or https"));
    }
    Ok(OpenAiUpstreamConfig {
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key: u.api_key.clone().and_then(Secret::new),
        connect_timeout: Duration::from_millis(u.connect_timeout_ms.unwrap_or(2_000)),
        first_byte_timeout: Duration::from_millis(u.first_byte_timeout_ms.unwrap_or(60_000)),
        idle_timeout: Duration::from_millis(u.idle_timeout_ms.unwrap_or(120_000)),
    })
}

fn simulated(u: &RawUpstream) -> Result<SimSettings, String> {
    if u.base_url.is_some()
        || u.api_key.is_some()
        || u.connect_timeout_ms.is_some()
        || u.first_byte_timeout_ms.is_some()
        || u.idle_timeout_ms.is_some()
    {
        return Err("base_url, api_key and timeouts are only valid with kind = \"openai\"".into());
    }
    let d = SimSettings::default();
    let s = SimSettings {
        latency_ms: u.latency_ms.unwrap_or(d.latency_ms),
        tokens_per_s: u.tokens_per_s.unwrap_or(d.tokens_per_s),
        output_tokens: u.output_tokens.unwrap_or(d.output_tokens),
        reasoning_tokens: u.reasoning_tokens.unwrap_or(d.reasoning_tokens),
        cached_tokens: u.cached_tokens.unwrap_or(d.cached_tokens),
        error_rate: u.error_rate.unwrap_or(d.error_rate),
        error_status: u.error_status.unwrap_or(d.error_status),
        usage: u.usage.unwrap_or(d.usage),
        usage_every_chunk: u.usage_every_chunk.unwrap_or(d.usage_every_chunk),
        usage_style: match u.usage_style.as_deref() {
            None => d.usage_style,
            Some(s) => s.parse()?,
        },
        fail_after_chunks: u.fail_after_chunks,
        require_api_key: None,
    };
    s.check()?;
    Ok(s)
}

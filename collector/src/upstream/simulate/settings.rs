//! The simulator's knobs, shared by `tollgate simulate` and the
//! `simulated` upstream kind.

use std::str::FromStr;

use axum::http::StatusCode;

/// How the simulator behaves; shared by the CLI and the `simulated` kind.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSettings {
    /// Delay before the first byte of a response.
    pub latency_ms: u64,
    /// Generation speed; 0 = as fast as possible.
    pub tokens_per_s: f64,
    /// Output tokens per completion (before `max_tokens` caps it),
    /// reasoning included.
    pub output_tokens: u32,
    /// How many of the output tokens are `reasoning_content`.
    pub reasoning_tokens: u32,
    /// Prompt tokens reported as served from the provider's cache.
    pub cached_tokens: u32,
    /// Share of requests answered with `error_status`.
    pub error_rate: f64,
    pub error_status: u16,
    /// Report usage (and honour `stream_options.include_usage`).
    pub usage: bool,
    /// Streamed usage in every chunk, cumulative, instead of only at the end.
    pub usage_every_chunk: bool,
    pub usage_style: UsageStyle,
    /// Break the stream (abort the connection) after this many chunks.
    pub fail_after_chunks: Option<u32>,
    /// When set, requests must carry `Authorization: Bearer <this>`.
    pub require_api_key: Option<String>,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            tokens_per_s: 0.0,
            output_tokens: 64,
            reasoning_tokens: 0,
            cached_tokens: 0,
            error_rate: 0.0,
            error_status: 503,
            usage: true,
            usage_every_chunk: false,
            usage_style: UsageStyle::OpenAi,
            fail_after_chunks: None,
            require_api_key: None,
        }
    }
}

impl SimSettings {
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate must be within 0..=1, not {}",
                self.error_rate
            ));
        }
        if !(self.tokens_per_s >= 0.0 && self.tokens_per_s.is_finite()) {
            return Err(format!(
                "tokens_per_s must be >= 0, not {}",
                self.tokens_per_s
            ));
        }
        if StatusCode::from_u16(self.error_status).is_err() || self.error_status < 400 {
            return Err(format!(
                "error_status must be an HTTP error status, not {}",
                self.error_status
            ));
        }
        if self.reasoning_tokens > self.output_tokens {
            return Err("reasoning_tokens cannot exceed output_tokens".into());
        }
        Ok(())
    }
}

/// The shape of the usage object the simulator reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageStyle {
    /// `prompt_tokens_details.cached_tokens`.
    OpenAi,
    /// `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`.
    DeepSeek,
    /// Every count an explicit zero, as some self-hosted servers report.
    Zeros,
}

impl FromStr for UsageStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "openai" => Ok(UsageStyle::OpenAi),
            "deepseek" => Ok(UsageStyle::DeepSeek),
            "zeros" => Ok(UsageStyle::Zeros),
            other => Err(format!(
                "usage_style must be \"openai\", \"deepseek\" or \"zeros\", not {other:?}"
            )),
        }
    }
}

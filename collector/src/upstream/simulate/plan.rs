//! The simulator's state and one request's plan: authentication and
//! injected errors, what to generate (id, token counts, finish reason), the
//! usage object in the configured style, and the pacing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::settings::{SimSettings, UsageStyle};

pub(super) struct Sim {
    pub(super) settings: SimSettings,
    pub(super) counter: AtomicU64,
}

pub(super) const WORDS: [&str; 16] = [
    " the", " gateway", " routes", " every", " request", " and", " counts", " each", " token",
    " to", " the", " cent", " 成本", " finance", " trusts", " it",
];

/// One request's plan: what to generate and how to report it.
pub(super) struct Plan {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model_json: String,
    pub(super) prompt_tokens: u64,
    pub(super) output: u64,
    pub(super) reasoning: u64,
    pub(super) finish: &'static str,
    pub(super) usage: bool,
    /// The pieces of a scripted answer (`say: a|b|c`), one per chunk;
    /// empty: the stock words.
    pub(super) script: Vec<String>,
}

impl Plan {
    /// The text of token `n`.
    pub(super) fn word(&self, n: u64) -> &str {
        match self.script.get(n as usize) {
            Some(piece) => piece,
            None => WORDS[(n % WORDS.len() as u64) as usize],
        }
    }

    /// Token `n` escaped for a JSON string.
    pub(super) fn word_json(&self, n: u64) -> String {
        let quoted = serde_json::to_string(self.word(n)).unwrap_or_default();
        quoted
            .get(1..quoted.len().saturating_sub(1))
            .unwrap_or_default()
            .to_string()
    }

    /// Scripts the answer: the text after `say:` in `prompt`, one chunk
    /// per `|`-separated piece, so a test can split a string across
    /// chunks exactly where it wants.
    pub(super) fn follow(&mut self, prompt: Option<&str>, max_tokens: Option<u64>) {
        let Some(text) = prompt.and_then(|p| p.strip_prefix("say:")) else {
            return;
        };
        self.script = text.trim_start().split('|').map(str::to_string).collect();
        let n = self.script.len() as u64;
        self.output = max_tokens.map_or(n, |m| n.min(m));
        self.reasoning = 0;
        self.finish = if self.output < n { "length" } else { "stop" };
    }
}

impl Sim {
    pub(super) fn check_auth(&self, headers: &HeaderMap) -> Option<Response> {
        let want = self.settings.require_api_key.as_ref()?;
        let got = tollgate_schemas::credential::presented(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            headers.get("x-api-key").map(|v| v.as_bytes()),
        );
        if got == Ok(want.as_bytes()) {
            None
        } else {
            Some(error(
                StatusCode::UNAUTHORIZED,
                "invalid api key",
                "authentication_error",
            ))
        }
    }

    pub(super) fn roll_error(&self) -> Option<Response> {
        let s = &self.settings;
        if s.error_rate > 0.0 && fastrand::f64() < s.error_rate {
            let status =
                StatusCode::from_u16(s.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Some(error(status, "simulated upstream failure", "server_error"));
        }
        None
    }

    pub(super) fn plan(
        &self,
        model: Option<&str>,
        prompt_tokens: u64,
        max_tokens: Option<u64>,
        usage: bool,
    ) -> Plan {
        let s = &self.settings;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let wanted = u64::from(s.output_tokens);
        let output = max_tokens.map_or(wanted, |m| wanted.min(m));
        let reasoning = u64::from(s.reasoning_tokens).min(output);
        Plan {
            id: format!("sim-{n}"),
            created: chrono::Utc::now().timestamp().max(0) as u64,
            model_json: serde_json::to_string(model.unwrap_or("simulated"))
                .unwrap_or_else(|_| "\"simulated\"".into()),
            prompt_tokens: prompt_tokens.max(1),
            output,
            reasoning,
            finish: if output < wanted { "length" } else { "stop" },
            usage,
            script: Vec::new(),
        }
    }

    pub(super) fn usage_json(&self, p: &Plan, completion: u64) -> String {
        let cached = u64::from(self.settings.cached_tokens).min(p.prompt_tokens);
        let reasoning = p.reasoning.min(completion);
        let total = p.prompt_tokens + completion;
        match self.settings.usage_style {
            UsageStyle::OpenAi => format!(
                "{{\"prompt_tokens\":{},\"completion_tokens\":{completion},\"total_tokens\":{total},\
                 \"prompt_tokens_details\":{{\"cached_tokens\":{cached}}},\
                 \"completion_tokens_details\":{{\"reasoning_tokens\":{reasoning}}}}}",
                p.prompt_tokens
            ),
            UsageStyle::DeepSeek => format!(
                "{{\"prompt_tokens\":{},\"completion_tokens\":{completion},\"total_tokens\":{total},\
                 \"prompt_cache_hit_tokens\":{cached},\"prompt_cache_miss_tokens\":{},\
                 \"completion_tokens_details\":{{\"reasoning_tokens\":{reasoning}}}}}",
                p.prompt_tokens,
                p.prompt_tokens - cached
            ),
            UsageStyle::Zeros => {
                "{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}".to_string()
            }
        }
    }

    pub(super) async fn wait_first_byte(&self) {
        if self.settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.settings.latency_ms)).await;
        }
    }

    pub(super) fn token_gap(&self) -> Option<Duration> {
        (self.settings.tokens_per_s > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.settings.tokens_per_s))
    }
}

pub(super) fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

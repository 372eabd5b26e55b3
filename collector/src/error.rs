//! The gateway's errors and their one rendering: OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}` with one status each.
//!
//! No variant carries a client key or an upstream key; upstream messages
//! pass through `redact` before they get here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_schemas::Outcome;

use crate::policy::screen::input::Why;
use crate::policy::screen::{Blocked, Direction};

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("Missing or invalid API key. Send it as `Authorization: Bearer <key>`.")]
    Unauthorized,
    #[error("This API key may not use model {model:?}.")]
    ModelNotAllowed { model: String },
    #[error("The model {model:?} does not exist or you do not have access to it.")]
    ModelNotFound { model: String },
    #[error("Request body exceeds the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    #[error("Unknown path {path}.")]
    NotFound { path: String },
    #[error("Method not allowed on this path.")]
    MethodNotAllowed,
    /// A `[[rate_limits]]` rule would go over.
    #[error("{message}")]
    /// `retry_after`: seconds until a retry can fit; `None` when none can.
    RateLimited {
        message: String,
        retry_after: Option<u64>,
    },
    /// A `[[budgets]]` entry is spent.
    #[error("{message}")]
    BudgetExceeded {
        message: String,
        retry_after: Option<u64>,
    },
    #[error("Upstream rate limit reached: {message}")]
    UpstreamRateLimited { message: String },
    /// The upstream refused the request itself (a 4xx other than 429).
    #[error("{message}")]
    UpstreamRejected { status: u16, message: String },
    #[error("Upstream failure: {message}")]
    Upstream { message: String },
    #[error("Upstream timed out: {message}")]
    UpstreamTimeout { message: String },
    /// A `[[guard]]` rule blocked the request or its answer.
    #[error("{message}")]
    ContentBlocked { message: String },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidRequest { .. } | GatewayError::ContentBlocked { .. } => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            GatewayError::ModelNotFound { .. } | GatewayError::NotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UpstreamRateLimited { .. }
            | GatewayError::RateLimited { .. }
            | GatewayError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamRejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            GatewayError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's `type`, also the event's `error_type` (low cardinality).
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed
            | GatewayError::ModelNotFound { .. }
            | GatewayError::ContentBlocked { .. }
            | GatewayError::UpstreamRejected { .. } => "invalid_request_error",
            GatewayError::Unauthorized => "authentication_error",
            GatewayError::ModelNotAllowed { .. } => "permission_error",
            GatewayError::UpstreamRateLimited { .. } | GatewayError::RateLimited { .. } => {
                "rate_limit_error"
            }
            GatewayError::BudgetExceeded { .. } => "insufficient_quota",
            GatewayError::Upstream { .. } | GatewayError::UpstreamTimeout { .. } => {
                "upstream_error"
            }
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            GatewayError::Unauthorized => Some("invalid_api_key"),
            GatewayError::ModelNotAllowed { .. } => Some("model_not_allowed"),
            GatewayError::ModelNotFound { .. } => Some("model_not_found"),
            GatewayError::BodyTooLarge { .. } => Some("request_too_large"),
            GatewayError::UpstreamTimeout { .. } => Some("upstream_timeout"),
            GatewayError::RateLimited { .. } => Some("rate_limit_exceeded"),
            GatewayError::BudgetExceeded { .. } => Some("budget_exceeded"),
            GatewayError::ContentBlocked { .. } => Some("content_blocked"),
            _ => None,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::InvalidRequest { param, .. } => *param,
            GatewayError::ModelNotAllowed { .. } | GatewayError::ModelNotFound { .. } => {
                Some("model")
            }
            _ => None,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            GatewayError::InvalidRequest { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed
            | GatewayError::ModelNotFound { .. }
            | GatewayError::UpstreamRejected { .. } => Outcome::InvalidRequest,
            GatewayError::Unauthorized | GatewayError::ModelNotAllowed { .. } => {
                Outcome::Unauthorized
            }
            GatewayError::UpstreamRateLimited { .. }
            | GatewayError::Upstream { .. }
            | GatewayError::UpstreamTimeout { .. } => Outcome::UpstreamError,
            GatewayError::RateLimited { .. } => Outcome::RateLimited,
            GatewayError::BudgetExceeded { .. } => Outcome::BudgetExceeded,
            GatewayError::ContentBlocked { .. } => Outcome::Blocked,
        }
    }

    /// The content guard's refusal: which rule, which way; never the text.
    pub fn blocked(b: &Blocked) -> Self {
        GatewayError::ContentBlocked {
            message: Self::blocked_message(b),
        }
    }

    pub fn blocked_message(b: &Blocked) -> String {
        let what = match b.direction {
            Direction::Input => "The request",
            Direction::Output => "The answer",
        };
        let why = match b.why {
            Why::Matched => "",
            Why::Unanswered => " (the moderation service did not answer)",
            Why::Unreadable => " (the upstream sent an event it cannot read)",
        };
        format!(
            "{what} was blocked by the content guard (rule {:?}){why}.",
            &*b.rule
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }})
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if let GatewayError::RateLimited {
            retry_after: Some(retry_after),
            ..
        }
        | GatewayError::BudgetExceeded {
            retry_after: Some(retry_after),
            ..
        } = self
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, retry_after.into());
        }
        resp
    }
}

/// A client-supplied name made safe to echo: bounded, no control characters.
pub fn shown(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).take(128).collect()
}

/// Removes every occurrence of each secret from `text`, in any ASCII case.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        const MARK: &str = "[redacted]";
        let needle = s.to_ascii_lowercase();
        let mut from = 0;
        // Lower-casing ASCII keeps every byte offset.
        while let Some(found) = out[from..].to_ascii_lowercase().find(&needle) {
            let at = from + found;
            out.replace_range(at..at + needle.len(), MARK);
            from = at + MARK.len();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_openai_contract() {
        let cases = [
            (
                GatewayError::InvalidRequest {
                    message: "x".into(),
                    param: None,
                },
                400,
            ),
            (GatewayError::Unauthorized, 401),
            (GatewayError::ModelNotAllowed { model: "m".into() }, 403),
            (GatewayError::ModelNotFound { model: "m".into() }, 404),
            (GatewayError::BodyTooLarge { limit: 1 }, 413),
            (
                GatewayError::Upstream {
                    message: "x".into(),
                },
                502,
            ),
            (
                GatewayError::UpstreamTimeout {
                    message: "x".into(),
                },
                504,
            ),
            (
                GatewayError::UpstreamRateLimited {
                    message: "x".into(),
                },
                429,
            ),
            (
                GatewayError::UpstreamRejected {
                    status: 422,
                    message: "x".into(),
                },
                422,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            let body = e.body();
            assert!(body["error"]["message"].is_string());
            assert!(body["error"]["type"].is_string());
        }
    }

    #[test]
    fn redaction_and_echo_bounds() {
        assert_eq!(
            redact("bad key sk-abcdef given", &["sk-abcdef"]),
            "bad key [redacted] given"
        );
        assert_eq!(
            redact("SK-ABCDEF and sk-AbCdEf", &["sk-abcdef"]),
            "[redacted] and [redacted]"
        );
        assert_eq!(redact("a redacted b", &["redacted"]), "a [redacted] b");
        assert_eq!(shown(&"x".repeat(1000)).len(), 128);
        assert_eq!(shown("a\nb\u{7}"), "ab");
    }
}

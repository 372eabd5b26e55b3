//! A failed attempt as the ledger records it and the route acts on it: its
//! fallback trigger, its label, the upstream's status and reported usage,
//! and the client-facing error, with the upstream's words [`scrub`]bed of
//! its key before they go anywhere.

use crate::config::FallbackTrigger;
use crate::error::{GatewayError, redact};
use crate::ledger::tally::Usage;
use crate::proxy::routing::Candidate;
use crate::upstream::response::{Fault, FaultClass};

/// A failed attempt: how the ledger records it and whether the route may
/// fall back.
pub struct Failure {
    pub trigger: FallbackTrigger,
    /// The attempt's `error` in the ledger.
    pub label: &'static str,
    /// The upstream's HTTP status, when a response head arrived.
    pub status: Option<u16>,
    /// Tokens the upstream reported for the failed attempt, if it did.
    pub usage: Option<Usage>,
    pub error: GatewayError,
}

impl Failure {
    pub(crate) fn new(
        trigger: FallbackTrigger,
        label: &'static str,
        status: Option<u16>,
        error: GatewayError,
    ) -> Self {
        Failure {
            trigger,
            label,
            status,
            usage: None,
            error,
        }
    }

    /// A 2xx that is not an answer.
    pub(crate) fn invalid(message: String) -> Self {
        Failure::new(
            FallbackTrigger::ServerError,
            "invalid_response",
            Some(200),
            GatewayError::Upstream { message },
        )
    }

    /// An error the upstream reported in a body or an event.
    pub fn from_fault(fault: Fault, status: Option<u16>, candidate: &Candidate) -> Self {
        let message = scrub(&fault.message, candidate.upstream.secret());
        match fault.class {
            FaultClass::RateLimited => Failure::new(
                FallbackTrigger::RateLimited,
                "429",
                status,
                GatewayError::UpstreamRateLimited { message },
            ),
            FaultClass::Client => Failure::new(
                FallbackTrigger::ClientError,
                "4xx",
                status,
                GatewayError::UpstreamRejected {
                    status: fault.status.unwrap_or(400),
                    message,
                },
            ),
            FaultClass::Server => Failure::new(
                FallbackTrigger::ServerError,
                "5xx",
                status,
                GatewayError::Upstream {
                    message: format!("{} reported an error: {message}", candidate.upstream.name()),
                },
            ),
        }
    }

    pub(crate) fn broken(message: String) -> Self {
        Failure::new(
            FallbackTrigger::Connect,
            "stream_error",
            Some(200),
            GatewayError::Upstream { message },
        )
    }

    pub(crate) fn stalled(message: &str) -> Self {
        Failure::new(
            FallbackTrigger::Timeout,
            "timeout",
            Some(200),
            GatewayError::UpstreamTimeout {
                message: message.into(),
            },
        )
    }
}

/// Longest upstream message passed on, in characters.
const MAX_MESSAGE_CHARS: usize = 512;

/// An upstream's words made safe to pass on: JSON `\uXXXX` escapes
/// decoded, the upstream's key removed, then control characters dropped and
/// the length bounded (in that order, so a cut never leaves a piece of the
/// key).
pub(crate) fn scrub(text: &str, secret: Option<&str>) -> String {
    let text = redact(&unescape(text), &secret.into_iter().collect::<Vec<_>>());
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// `text` with `\uXXXX` escapes decoded (surrogate pairs included), so an
/// escaped key is seen by the redaction; anything else is left as it is.
fn unescape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("\\u") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\\u") {
        out.push_str(&rest[..at]);
        let hex = |s: &str| s.get(..4).and_then(|h| u32::from_str_radix(h, 16).ok());
        let after = &rest[at + 2..];
        let decoded = hex(after).and_then(|hi| {
            if (0xD800..0xDC00).contains(&hi) {
                let lo = after
                    .get(4..6)
                    .filter(|p| *p == "\\u")
                    .and_then(|_| hex(&after[6..]))?;
                let c =
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo.checked_sub(0xDC00)?))?;
                Some((c, 10))
            } else {
                char::from_u32(hi).map(|c| (c, 4))
            }
        });
        match decoded {
            Some((c, used)) => {
                out.push(c);
                rest = &after[used..];
            }
            None => {
                out.push_str("\\u");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_redacted_before_the_message_is_cut_and_in_any_escaping() {
        let key = "sk-UPSTREAM-CANARY-0123456789";
        let long = format!("{}{key} tail", "x".repeat(MAX_MESSAGE_CHARS - 10));
        let out = scrub(&long, Some(key));
        assert!(!out.contains("sk-UPSTREAM"), "{out}");
        assert_eq!(out.chars().count(), MAX_MESSAGE_CHARS);
        let escaped = r"bad key sk-UPSTREAM\u002dCANARY\u002d0123456789 given";
        assert_eq!(scrub(escaped, Some(key)), "bad key [redacted] given");
        let pair = r"emoji \ud83d\ude00 and \u00e9 and a stray \uZZZZ";
        assert_eq!(scrub(pair, None), r"emoji 😀 and é and a stray \uZZZZ");
        assert_eq!(scrub("line\nbreak\u{7}", None), "linebreak");
    }
}

//! A message's bytes to a validated `UsageEvent`, or the reason it is not
//! one (which sends it to dead letters).

use tollgate_schemas::arrow::money_fits;
use tollgate_schemas::{SCHEMA_VERSION, UsageEvent, Usd};

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
}

fn reject(reason: impl Into<String>) -> Rejection {
    Rejection {
        reason: reason.into(),
    }
}

/// Decodes one message. Older schema versions are accepted (fields are only
/// ever added); a version newer than this reader knows is refused rather
/// than read with fields silently lost.
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<UsageEvent, Rejection> {
    if bytes.len() > max_bytes {
        return Err(reject(format!(
            "oversize: {} bytes, limit {max_bytes}",
            bytes.len()
        )));
    }
    // One parse in the common case; a failed one is parsed again only to
    // name the reason (a future event is named as such, not by whatever
    // field it changed).
    match serde_json::from_slice::<UsageEvent>(bytes) {
        Ok(event) => {
            check_version(Some(u64::from(event.schema_version)))?;
            validate(&event)?;
            Ok(event)
        }
        Err(e) => {
            #[derive(serde::Deserialize)]
            struct Version {
                schema_version: Option<u64>,
            }
            let version: Version = serde_json::from_slice(bytes)
                .map_err(|e| reject(format!("not a JSON object: {e}")))?;
            check_version(version.schema_version)?;
            Err(reject(format!("schema violation: {e}")))
        }
    }
}

fn check_version(version: Option<u64>) -> Result<(), Rejection> {
    match version {
        None => Err(reject("schema violation: missing schema_version")),
        Some(0) => Err(reject("schema violation: schema_version 0")),
        Some(v) if v > u64::from(SCHEMA_VERSION) => Err(reject(format!(
            "unknown future schema_version {v} (this reader knows up to {SCHEMA_VERSION})"
        ))),
        Some(_) => Ok(()),
    }
}

/// Rules the types alone do not hold.
fn validate(e: &UsageEvent) -> Result<(), Rejection> {
    if e.ts_end < e.ts_start {
        return Err(reject("schema violation: ts_end before ts_start"));
    }
    if !(100..=599).contains(&e.status) {
        return Err(reject(format!("schema violation: status {}", e.status)));
    }
    if e.cached_input_tokens > e.input_tokens || e.reasoning_tokens > e.output_tokens {
        return Err(reject("schema violation: a token subset exceeds its total"));
    }
    if e.input_tokens > i64::MAX as u64 || e.output_tokens > i64::MAX as u64 {
        return Err(reject("schema violation: token count out of range"));
    }
    let amounts = [e.cost_usd, e.cost_saved_usd]
        .into_iter()
        .chain(e.attempts.iter().map(|a| a.cost_usd));
    for amount in amounts.flatten() {
        if amount < Usd::ZERO || !money_fits(amount) {
            return Err(reject(format!(
                "schema violation: amount {amount} out of range"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> String {
        r#"{"event_id":"019abbf0-7a2b-7c3d-8e4f-0123456789ab","schema_version":1,"request_id":"req_1","trace_id":null,"gateway_instance":"gw","ts_start":1764151200000000,"ts_end":1764151200100000,"latency_ms":100,"ttft_ms":null,"upstream_latency_ms":90,"gateway_overhead_us":50,"consumer":"a","team":null,"api_key_id":"k_00000000","client_ip":null,"tags":{},"endpoint":"chat/completions","requested_model":"m","served_model":"m","provider":"p","upstream":"u","stream":false,"fallback":false,"fallback_from":null,"fallback_reason":null,"attempts":[],"status":200,"outcome":"ok","error_type":null,"input_tokens":10,"cached_input_tokens":0,"output_tokens":5,"reasoning_tokens":0,"token_source":"upstream","cache":"miss","cache_kind":null,"cost_usd":0.0001,"cost_saved_usd":null,"price_version":"v","rate_limited":false,"limit_key":null}"#.to_string()
    }

    #[test]
    fn a_valid_event_decodes() {
        let e = decode(valid().as_bytes(), 1 << 20).unwrap();
        assert_eq!(e.input_tokens, 10);
    }

    #[test]
    fn each_kind_of_bad_message_is_named() {
        let cases = [
            ("not json at all".to_string(), "not a JSON object"),
            ("[1,2]".to_string(), "not a JSON object"),
            ("{}".to_string(), "missing schema_version"),
            (
                valid().replace("\"schema_version\":1", "\"schema_version\":9"),
                "unknown future",
            ),
            (
                valid().replace("\"outcome\":\"ok\"", "\"outcome\":\"great\""),
                "schema violation",
            ),
            (
                valid().replace("\"input_tokens\":10", "\"input_tokens\":-1"),
                "schema violation",
            ),
            (
                valid().replace("\"status\":200", "\"status\":42"),
                "status 42",
            ),
            (
                valid().replace("\"cached_input_tokens\":0", "\"cached_input_tokens\":11"),
                "subset",
            ),
            (
                valid().replace("\"cost_usd\":0.0001", "\"cost_usd\":100000000"),
                "out of range",
            ),
            (
                valid().replace("\"cost_usd\":0.0001", "\"cost_usd\":-0.5"),
                "out of range",
            ),
        ];
        for (msg, want) in cases {
            let err = decode(msg.as_bytes(), 1 << 20).unwrap_err();
            assert!(err.reason.contains(want), "{msg}: {}", err.reason);
        }
        let err = decode(valid().as_bytes(), 100).unwrap_err();
        assert!(err.reason.starts_with("oversize"));
    }
}

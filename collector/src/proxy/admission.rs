//! Step 5 of a request: the limits and budgets admit it, send it to a
//! cheaper model, or refuse it with a 429 (see [`crate::policy::quota`]).
//!
//! A fallback is one hop: the fallback model's own rules apply, and if one
//! of them trips too the request is refused, never sent further.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::config::limits::Unit;
use crate::error::GatewayError;
use crate::ledger::Record;
use crate::policy::quota::{Action, Admission, Ask, Estimate, Kind, RateHeaders, Trip};
use crate::proxy::auth::Caller;
use crate::proxy::request::ClientRequest;
use crate::proxy::routing::{Candidate, Route};
use crate::state::Gateway;

/// What the request arrived with, beyond its body.
pub struct Arrival<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub peer: Option<SocketAddr>,
}

/// The attempts to make, and the headers the answer carries.
pub struct Admitted {
    pub plan: Vec<Candidate>,
    pub headers: RateHeaders,
}

/// Admits the request planned on `route`, possibly onto a fallback's plan.
pub async fn admit(
    gw: &Gateway,
    rec: &mut Record,
    caller: &Caller<'_>,
    req: &ClientRequest,
    arrival: &Arrival<'_>,
    route: &Route,
) -> Result<Admitted, (GatewayError, RateHeaders)> {
    let plan = gw.routes.plan(route, &req.model);
    if gw.quota.is_empty() {
        return Ok(Admitted {
            plan,
            headers: RateHeaders::default(),
        });
    }
    let trip = match admit_on(gw, rec, caller, req, arrival, &req.model, &plan).await {
        Ok(headers) => return Ok(Admitted { plan, headers }),
        Err(trip) => trip,
    };
    let Action::Fallback(model) = &trip.action else {
        rec.limited(&trip, false);
        return Err(refusal(&trip));
    };
    rec.limited(&trip, true);
    let Some(fallback) = gw.routes.resolve(model) else {
        // The config check makes this unreachable; refuse rather than loop.
        return Err(refusal(&trip));
    };
    let plan = gw.routes.plan(fallback, model);
    match admit_on(gw, rec, caller, req, arrival, model, &plan).await {
        Ok(headers) => Ok(Admitted { plan, headers }),
        Err(second) => {
            rec.limited(&second, false);
            Err(refusal(&second))
        }
    }
}

/// One admission as `model`, priced on the first planned attempt.
async fn admit_on(
    gw: &Gateway,
    rec: &mut Record,
    caller: &Caller<'_>,
    req: &ClientRequest,
    arrival: &Arrival<'_>,
    model: &str,
    plan: &[Candidate],
) -> Result<RateHeaders, Trip> {
    let ask = Ask {
        model,
        consumer: Some(&caller.consumer.name),
        team: caller.consumer.team.as_deref(),
        tags: rec.tags(),
        headers: arrival.headers,
        query: arrival.uri.query(),
        peer: arrival.peer.map(|p| p.ip()),
    };
    let priced = plan.first().map(|c| c.model.as_str()).unwrap_or(model);
    let at = rec.started_at();
    let pricing = &gw.ledger.pricing;
    let estimate = Estimate {
        input: &|| crate::ledger::tokens::input_of(&req.body),
        max_tokens: req.max_tokens,
        choices: req.choices,
        price: &|input, output| {
            pricing.cost(
                priced,
                &tollgate_schemas::Tokens::new(input, 0, output, 0),
                at,
            )
        },
    };
    match gw.quota.admit(&ask, &estimate).await {
        Admission::Granted(grant) => {
            let headers = grant.headers;
            rec.hold(grant);
            Ok(headers)
        }
        Admission::Tripped(trip) => Err(trip),
    }
}

fn refusal(trip: &Trip) -> (GatewayError, RateHeaders) {
    // Whole seconds, rounded up, in the header and the message alike.
    let secs = trip.retry_after.as_secs() + u64::from(trip.retry_after.subsec_nanos() > 0);
    let again = duration_text(Duration::from_secs(secs.max(1)));
    let amount = |v: i64| match trip.unit {
        Unit::Usd => format!(
            "${}",
            tollgate_schemas::Usd::from_scaled(i128::from(v)).unwrap_or_default()
        ),
        unit => format!("{v} {}", unit.as_str()),
    };
    let (needed, limit) = (amount(trip.needed), amount(trip.limit));
    let window = trip.window;
    let (message, retry_after) = match (trip.kind, trip.never) {
        (Kind::RateLimit, true) => (
            format!(
                "Request too large for rate limit {}: it needs {needed}, over the limit of {limit} per {window}. Lower max_tokens or the prompt.",
                trip.rule
            ),
            None,
        ),
        (Kind::RateLimit, false) => (
            format!(
                "Rate limit {} reached for {} ({limit} per {window}). Please try again in {again}.",
                trip.rule, trip.limit_key
            ),
            Some(secs.max(1)),
        ),
        (Kind::Budget, true) => (
            format!(
                "Request too large for budget {}: its estimate of {needed} is over the whole budget of {limit} per {window}. Lower max_tokens or the prompt.",
                trip.rule
            ),
            None,
        ),
        (Kind::Budget, false) => (
            format!(
                "Budget {} ({limit} per {window}) cannot cover this request's estimate of {needed} in this period; it renews in {again}.",
                trip.rule
            ),
            Some(secs.max(1)),
        ),
    };
    let error = match trip.kind {
        Kind::RateLimit => GatewayError::RateLimited {
            message,
            retry_after,
        },
        Kind::Budget => GatewayError::BudgetExceeded {
            message,
            retry_after,
        },
    };
    (error, trip.headers)
}

/// OpenAI's `x-ratelimit-*` headers for the tightest token and request
/// limits (<https://platform.openai.com/docs/guides/rate-limits>).
pub fn set_headers(h: &mut HeaderMap, r: &RateHeaders) {
    const TOKENS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ];
    const REQUESTS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ];
    for (figure, [limit, remaining, reset]) in [(r.tokens, TOKENS), (r.requests, REQUESTS)] {
        let Some(f) = figure else { continue };
        h.insert(limit, HeaderValue::from(f.limit));
        h.insert(remaining, HeaderValue::from(f.remaining));
        if let Ok(v) = HeaderValue::from_str(&duration_text(f.reset)) {
            h.insert(reset, v);
        }
    }
}

/// A duration as OpenAI writes it: `20ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs() + u64::from(d.subsec_millis() > 0);
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai_headers() {
        assert_eq!(duration_text(Duration::from_millis(20)), "20ms");
        assert_eq!(duration_text(Duration::from_secs(1)), "1s");
        assert_eq!(duration_text(Duration::from_millis(1500)), "2s");
        assert_eq!(duration_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(duration_text(Duration::from_secs(3723)), "1h2m3s");
    }
}

//! The path of one proxied request, top to bottom:
//!
//! 1. open the usage record (it emits exactly one event, whatever happens)
//! 2. authenticate the key -> consumer ([`auth`], 401)
//! 3. read the body within the size limit (413) and parse it strictly
//!    ([`request`], 400)
//! 4. check the consumer may use the model (403) and find its route
//!    ([`routing`], 404)
//! 5. the content guard's input rules block (400 `content_blocked`) or
//!    mask the request ([`crate::policy::screen`])
//! 6. the limits and budgets reserve the request's estimate, send it to a
//!    cheaper model, or refuse it ([`admission`], 429)
//! 7. try the planned attempts in order, each judged by [`attempt`] (a
//!    [`failure`] says how it is recorded); fall back on the route's
//!    triggers, only while nothing has been sent to the client
//! 8. answer: a complete JSON body (its output rules checked first), or a
//!    streamed relay that owns the record from here on, its output rules
//!    checked through a holdback (the record settles the reservations at
//!    its end)
//!
//! The other policy steps (cache, search) will sit beside 6; see
//! [`crate::policy`].

pub mod admission;
pub mod attempt;
pub mod auth;
pub mod cached;
pub mod failure;
pub mod request;
pub mod routing;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::error::{GatewayError, shown};
use crate::ledger::Record;
use crate::policy::cache::Pending;
use crate::policy::cache::fill::StreamFill;
use crate::policy::quota::RateHeaders;
use crate::policy::screen;
use crate::policy::screen::holdback::Holdback;
use crate::policy::screen::rules::Applying;
use crate::proxy::auth::Caller;
use crate::proxy::request::{ClientRequest, Endpoint};
use crate::proxy::routing::{Candidate, Route};
use crate::relay::Relay;
use crate::state::Gateway;
use admission::{Admitted, Arrival};
use attempt::Answer;

pub async fn chat_completions(
    state: State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, peer, uri, headers, body, Endpoint::ChatCompletions).await
}

pub async fn completions(
    state: State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, peer, uri, headers, body, Endpoint::Completions).await
}

pub async fn embeddings(
    state: State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, peer, uri, headers, body, Endpoint::Embeddings).await
}

async fn handle(
    State(gw): State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let peer = peer.map(|c| c.0.0);
    let record = Record::open(&gw.ledger, endpoint.path(), &headers, peer);
    let request_id = record.request_id_header();
    let arrival = Arrival {
        headers: &headers,
        uri: &uri,
        peer,
    };
    let mut resp = respond(&gw, endpoint, &arrival, body, record).await;
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}

async fn respond(
    gw: &Gateway,
    endpoint: Endpoint,
    arrival: &Arrival<'_>,
    body: Body,
    mut rec: Record,
) -> Response {
    let Some(caller) = gw.keyring.authenticate(arrival.headers) else {
        return rec.fail(GatewayError::Unauthorized);
    };
    rec.caller(&caller);
    let raw = match read_limited(body, gw.max_body_bytes).await {
        Ok(raw) => raw,
        Err(e) => return rec.fail(e),
    };
    let mut req = match ClientRequest::parse(endpoint, raw) {
        Ok(r) => r,
        Err(e) => return rec.fail(e),
    };
    rec.request(&req);
    if !caller.consumer.may_use(&req.model) {
        return rec.fail(GatewayError::ModelNotAllowed {
            model: shown(&req.model),
        });
    }
    let Some(route) = gw.routes.resolve(&req.model) else {
        return rec.fail(GatewayError::ModelNotFound {
            model: shown(&req.model),
        });
    };
    let mut rules = gw.screen.rules_for(&req.model, &caller);
    if endpoint == Endpoint::Embeddings {
        // Vectors hold no text to check.
        rules.output.clear();
    }
    if !rules.input.is_empty() {
        match screen::input::screen(&rules.input, &gw.screen.counters, endpoint, &mut req.body)
            .await
        {
            Ok(false) => {}
            Ok(true) => req.masked(),
            Err(b) => {
                rec.blocked(&b);
                return rec.fail(GatewayError::blocked(&b));
            }
        }
    }
    rec.screened(&req, !rules.output.is_empty());
    let lookup = cached::lookup(
        gw,
        rec,
        route,
        &caller,
        endpoint,
        &req,
        arrival,
        &rules.output,
    );
    let (rec, decision) = match lookup.await {
        Ok(go) => go,
        Err(hit) => return hit,
    };
    let upstream = Upstream {
        endpoint,
        arrival,
        caller: &caller,
        route,
        rules: &rules,
    };
    let mut resp = forward(gw, upstream, rec, req, decision.pending).await;
    if let Some(v) = decision.header {
        resp.headers_mut()
            .insert(cached::CACHE_HEADER, HeaderValue::from_static(v));
    }
    resp
}

/// What the request path knows by the time it goes upstream.
struct Upstream<'a> {
    endpoint: Endpoint,
    arrival: &'a Arrival<'a>,
    caller: &'a Caller<'a>,
    route: &'a Route,
    rules: &'a Applying,
}

/// Admission, then the attempts, then the answer (stored in the cache
/// when `pending` says where).
async fn forward(
    gw: &Gateway,
    up: Upstream<'_>,
    mut rec: Record,
    mut req: ClientRequest,
    mut pending: Option<Pending>,
) -> Response {
    let Upstream {
        endpoint,
        arrival,
        caller,
        route,
        rules,
    } = up;
    let Admitted { plan, headers } =
        match admission::admit(gw, &mut rec, caller, &req, arrival, route).await {
            Ok(admitted) => admitted,
            Err((error, headers)) => {
                let mut resp = rec.fail(error);
                admission::set_headers(resp.headers_mut(), &headers);
                return resp;
            }
        };
    let mut last_error = GatewayError::Upstream {
        message: "the route has no usable upstream".into(),
    };
    for (i, candidate) in plan.iter().enumerate() {
        let sent_at = rec.sending(candidate);
        let result = attempt::run(candidate, endpoint, &mut req, &rec, gw.max_response_bytes).await;
        rec.waited(sent_at.elapsed());
        match result {
            Ok(Answer::Complete { body, usage }) => {
                rec.attempt(candidate, Some(200), None, sent_at.elapsed(), Some(usage));
                let screened = if rules.output.is_empty() {
                    // Without output rules the answer is not read again.
                    Ok(None)
                } else {
                    screen::output::screen_answer(&rules.output, &gw.screen.counters, &body).await
                };
                if matches!(screened, Ok(Some(_))) {
                    // A masked answer is this client's alone: never shared.
                    pending = None;
                }
                let body = match screened {
                    Ok(masked) => masked.unwrap_or(body),
                    Err(b) => {
                        // Never stored: the cache replays only what a client got.
                        rec.served_by(candidate);
                        rec.blocked(&b);
                        let mut resp = rec.fail(GatewayError::blocked(&b));
                        admission::set_headers(resp.headers_mut(), &headers);
                        return resp;
                    }
                };
                if let Some(p) = pending.take() {
                    cached::store_whole(gw, &rec, p, candidate, &body, &usage);
                }
                return complete(rec, candidate, body, &headers);
            }
            Ok(Answer::Stream(primed)) => {
                let guard = Holdback::new(rules.output.clone(), gw.screen.counters.clone());
                let fill = pending.take().map(|p| StreamFill::new(gw.cache.clone(), p));
                let relay = Relay::new(rec, candidate.clone(), *primed, sent_at, guard, fill);
                return stream(relay, candidate, &headers);
            }
            Err(failure) => {
                tracing::warn!(
                    upstream = candidate.upstream.name(),
                    status = failure.status,
                    reason = failure.label,
                    error = %failure.error,
                    "upstream attempt failed"
                );
                rec.attempt(
                    candidate,
                    failure.status,
                    Some(failure.label),
                    sent_at.elapsed(),
                    failure.usage,
                );
                last_error = failure.error;
                let may_fall_back =
                    i + 1 < plan.len() && route.fallback_on.contains(&failure.trigger);
                if !may_fall_back {
                    break;
                }
            }
        }
    }
    let mut resp = rec.fail(last_error);
    admission::set_headers(resp.headers_mut(), &headers);
    resp
}

/// A complete (non-streamed) answer, its model name already restored.
fn complete(mut rec: Record, candidate: &Candidate, body: Bytes, limits: &RateHeaders) -> Response {
    rec.served_by(candidate);
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&candidate.model) {
        h.insert("x-tollgate-served-model", v);
    }
    admission::set_headers(h, limits);
    rec.responded();
    rec.finish(200);
    resp
}

fn stream(relay: Relay, candidate: &Candidate, limits: &RateHeaders) -> Response {
    let mut resp = Response::new(Body::from_stream(relay));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&candidate.model) {
        h.insert("x-tollgate-served-model", v);
    }
    admission::set_headers(h, limits);
    resp
}

async fn read_limited(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
        while let Some(c) = cause {
            if c.is::<http_body_util::LengthLimitError>() {
                return GatewayError::BodyTooLarge { limit };
            }
            cause = c.source();
        }
        GatewayError::InvalidRequest {
            message: "could not read the request body".into(),
            param: None,
        }
    })
}

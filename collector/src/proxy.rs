//! The path of one proxied request, top to bottom:
//!
//! 1. open the usage record (it emits exactly one event, whatever happens)
//! 2. authenticate the key -> consumer (401)
//! 3. read the body within the size limit (413) and parse it strictly (400)
//! 4. check the consumer may use the model (403) and find its route (404)
//! 5. try the planned attempts in order; fall back on the route's triggers,
//!    only while nothing has been sent to the client
//! 6. answer: a complete JSON body, or a streamed relay that owns the
//!    record from here on

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tollgate_schemas::TokenSource;

use crate::config::FallbackTrigger;
use crate::error::{GatewayError, redact, shown};
use crate::gateway::Gateway;
use crate::ledger::{Record, Usage};
use crate::relay::Relay;
use crate::rename::Rename;
use crate::request::{ClientRequest, Endpoint};
use crate::routing::Candidate;
use crate::upstream::{BodyStream, SendError, UpstreamResponse};
use crate::usage::ResponseView;

/// Longest upstream error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub async fn chat_completions(
    state: State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, peer, headers, body, Endpoint::ChatCompletions).await
}

pub async fn completions(
    state: State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, peer, headers, body, Endpoint::Completions).await
}

pub async fn embeddings(
    state: State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, peer, headers, body, Endpoint::Embeddings).await
}

async fn handle(
    State(gw): State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let record = Record::open(&gw.ledger, endpoint.path(), &headers, peer.map(|c| c.0.0));
    let request_id = record.request_id_header();
    let mut resp = respond(&gw, endpoint, &headers, body, record).await;
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}

async fn respond(
    gw: &Gateway,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    mut rec: Record,
) -> Response {
    let Some(caller) = gw.keyring.authenticate(headers) else {
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
    rec.request(&req.model, req.stream, req.raw.clone(), req.max_tokens);
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
    let plan = gw.routes.plan(route, &req.model);
    let mut last_error = GatewayError::Upstream {
        message: "the route has no usable upstream".into(),
    };
    for (i, candidate) in plan.iter().enumerate() {
        let may_fall_back =
            |t: FallbackTrigger| i + 1 < plan.len() && route.fallback_on.contains(&t);
        let sent_at = rec.sending(candidate);
        let sent = candidate
            .upstream
            .send(endpoint, req.upstream_body(&candidate.model))
            .await;
        rec.waited(sent_at.elapsed());
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                let (trigger, label, err) = match e {
                    SendError::Connect(m) => (
                        FallbackTrigger::Connect,
                        "connect",
                        GatewayError::Upstream { message: m },
                    ),
                    SendError::Timeout(m) => (
                        FallbackTrigger::Timeout,
                        "timeout",
                        GatewayError::UpstreamTimeout { message: m },
                    ),
                    SendError::Other(m) => (
                        FallbackTrigger::Connect,
                        "connect",
                        GatewayError::Upstream { message: m },
                    ),
                };
                tracing::warn!(upstream = candidate.upstream.name(), error = %err, "upstream attempt failed");
                rec.attempt(candidate, None, Some(label), sent_at.elapsed(), None);
                last_error = err;
                if may_fall_back(trigger) {
                    continue;
                }
                break;
            }
        };
        if resp.status >= 400 {
            let status = resp.status;
            let (trigger, label) = match status {
                429 => (FallbackTrigger::RateLimited, "429"),
                500.. => (FallbackTrigger::ServerError, "5xx"),
                _ => (FallbackTrigger::ClientError, "4xx"),
            };
            let text = read_error_body(resp, candidate.upstream.secret()).await;
            rec.attempt(
                candidate,
                Some(status),
                Some(label),
                sent_at.elapsed(),
                None,
            );
            tracing::warn!(
                upstream = candidate.upstream.name(),
                status,
                "upstream answered with an error"
            );
            last_error = match status {
                429 => GatewayError::UpstreamRateLimited { message: text },
                500.. => GatewayError::Upstream {
                    message: format!("{} answered {status}: {text}", candidate.upstream.name()),
                },
                _ => GatewayError::UpstreamRejected {
                    status,
                    message: text,
                },
            };
            if may_fall_back(trigger) {
                continue;
            }
            break;
        }
        if req.stream {
            return stream(rec, candidate, resp, sent_at, &req);
        }
        let idle = resp.idle_timeout;
        let read_at = Instant::now();
        let read = read_all(resp.body, gw.max_response_bytes, idle).await;
        rec.waited(read_at.elapsed());
        match read {
            Ok(bytes) => return complete(rec, candidate, bytes, sent_at, &req),
            Err(ReadError::Timeout) => {
                rec.attempt(
                    candidate,
                    Some(200),
                    Some("timeout"),
                    sent_at.elapsed(),
                    None,
                );
                last_error = GatewayError::UpstreamTimeout {
                    message: "the upstream stalled while sending its response".into(),
                };
                if may_fall_back(FallbackTrigger::Timeout) {
                    continue;
                }
            }
            Err(ReadError::Broken(m)) => {
                rec.attempt(
                    candidate,
                    Some(200),
                    Some("stream_error"),
                    sent_at.elapsed(),
                    None,
                );
                last_error = GatewayError::Upstream { message: m };
                if may_fall_back(FallbackTrigger::Connect) {
                    continue;
                }
            }
        }
        break;
    }
    rec.fail(last_error)
}

/// A complete (non-streamed) upstream answer, passed on with the client's
/// model name.
fn complete(
    mut rec: Record,
    candidate: &Candidate,
    bytes: Bytes,
    sent_at: Instant,
    req: &ClientRequest,
) -> Response {
    let (usage, served, valid) = match serde_json::from_slice::<ResponseView>(&bytes) {
        Ok(view) => {
            let usage = match view.usage.as_ref().and_then(|u| u.normalize()) {
                Some(tokens) => Usage {
                    tokens,
                    source: TokenSource::Upstream,
                },
                None => {
                    let mut text = String::new();
                    view.collect_text(&mut text);
                    rec.estimate(&text, true)
                }
            };
            (usage, view.model.map(|m| m.into_owned()), true)
        }
        Err(_) => (rec.estimate("", true), None, false),
    };
    if !valid {
        rec.attempt(
            candidate,
            Some(200),
            Some("invalid_response"),
            sent_at.elapsed(),
            Some(usage),
        );
        return rec.fail(GatewayError::Upstream {
            message: "the upstream returned a response that is not JSON".into(),
        });
    }
    rec.attempt(candidate, Some(200), None, sent_at.elapsed(), Some(usage));
    rec.served_by(candidate);
    let body = Rename::new(&req.model).apply(bytes, served.as_deref());
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&candidate.model) {
        h.insert("x-tollgate-served-model", v);
    }
    rec.responded();
    rec.finish(200);
    resp
}

fn stream(
    mut rec: Record,
    candidate: &Candidate,
    upstream: UpstreamResponse,
    sent_at: Instant,
    req: &ClientRequest,
) -> Response {
    rec.served_by(candidate);
    rec.responded();
    let status = upstream.status;
    let relay = Relay::new(
        rec,
        candidate.clone(),
        upstream,
        sent_at,
        &req.model,
        req.include_usage,
    );
    let mut resp = Response::new(Body::from_stream(relay));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&candidate.model) {
        h.insert("x-tollgate-served-model", v);
    }
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

enum ReadError {
    Timeout,
    Broken(String),
}

async fn read_all(mut body: BodyStream, limit: usize, idle: Duration) -> Result<Bytes, ReadError> {
    let mut buf = BytesMut::new();
    let mut single: Option<Bytes> = None;
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReadError::Broken(e)),
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() + single.as_ref().map_or(0, Bytes::len) > limit {
                    return Err(ReadError::Broken(format!(
                        "upstream response exceeds {limit} bytes"
                    )));
                }
                match single.take() {
                    None if buf.is_empty() => single = Some(chunk),
                    None => buf.extend_from_slice(&chunk),
                    Some(first) => {
                        buf.extend_from_slice(&first);
                        buf.extend_from_slice(&chunk);
                    }
                }
            }
        }
    }
    Ok(single.unwrap_or_else(|| buf.freeze()))
}

/// The message of an upstream error body, scrubbed of the upstream's key.
async fn read_error_body(resp: UpstreamResponse, secret: Option<&str>) -> String {
    let text = match read_all(
        resp.body,
        MAX_ERROR_BODY,
        resp.idle_timeout.min(Duration::from_secs(10)),
    )
    .await
    {
        Ok(bytes) => {
            let v: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
            match v
                .as_ref()
                .and_then(|v| v.pointer("/error/message"))
                .and_then(|m| m.as_str())
            {
                Some(m) => m.to_string(),
                None => String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
            }
        }
        Err(_) => "(no body)".to_string(),
    };
    let text: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(1024)
        .collect();
    redact(&text, &secret.into_iter().collect::<Vec<_>>())
}

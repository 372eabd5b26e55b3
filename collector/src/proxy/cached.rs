//! The response cache on the request path: the lookup (after the content
//! guard's input check, before the limits: a hit uses no upstream and
//! counts against no limit), a hit's replay, and storing a whole answer.
//! Streamed answers are stored by the relay once they end normally.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tollgate_schemas::{CacheKind, CacheStatus, TokenSource};

use crate::config::{CacheMode, RouteCache};
use crate::error::GatewayError;
use crate::ledger::Record;
use crate::ledger::tally::Usage;
use crate::policy::cache::entry::{self, Entry};
use crate::policy::cache::{Control, Looked, Pending, key};
use crate::policy::screen::output::screen_answer;
use crate::policy::screen::rules::Rule;
use crate::proxy::auth::Caller;
use crate::proxy::request::{ClientRequest, Endpoint};
use crate::proxy::routing::Candidate;
use crate::state::Gateway;

/// The response header that says what the cache did.
pub const CACHE_HEADER: &str = "x-tollgate-cache";

/// What the lookup decided for a request that goes on upstream.
#[derive(Default)]
pub struct Decision {
    /// Where to store the answer; `None`: not stored.
    pub pending: Option<Pending>,
    /// `miss` or `bypass`; `None` when the route has no cache.
    pub header: Option<&'static str>,
}

/// Looks the request up in its route's cache: `Err` is a hit's response
/// (the record closed), `Ok` the record and what to do with the answer.
#[allow(clippy::too_many_arguments)]
pub async fn lookup(
    gw: &Gateway,
    mut rec: Record,
    cache: Option<&RouteCache>,
    caller: &Caller<'_>,
    endpoint: Endpoint,
    req: &ClientRequest,
    headers: &HeaderMap,
    output_rules: &[Arc<Rule>],
) -> Result<(Record, Decision), Response> {
    let Some(rc) = cache.filter(|c| c.mode == CacheMode::Exact) else {
        return Ok((rec, Decision::default()));
    };
    let kind = CacheKind::Exact;
    let control = Control::of(headers);
    let scope = key::scope(rc.scope, caller);
    let key = key::exact(&scope, endpoint, &req.body);
    let pending = (!control.no_store).then(|| Pending {
        key: key.clone(),
        ttl: rc.ttl,
        max_entry_bytes: rc.max_entry_bytes,
        kind,
    });
    if control.no_cache {
        gw.cache.counted("bypass", kind);
        rec.cache(CacheStatus::Bypass, kind);
        return Ok((
            rec,
            Decision {
                pending,
                header: Some("bypass"),
            },
        ));
    }
    match gw.cache.get(&key).await {
        Looked::Hit(e) if e.doc().is_some() => {
            gw.cache.counted("hit", kind);
            Err(replay(gw, rec, req, &e, kind, rc, output_rules).await)
        }
        Looked::Hit(_) | Looked::Miss => {
            gw.cache.counted("miss", kind);
            rec.cache(CacheStatus::Miss, kind);
            let header = Some("miss");
            Ok((rec, Decision { pending, header }))
        }
        Looked::Failed => {
            gw.cache.counted("error", kind);
            rec.cache(CacheStatus::Bypass, kind);
            let header = Some("bypass");
            Ok((
                rec,
                Decision {
                    pending: None,
                    header,
                },
            ))
        }
    }
}

/// A hit, whole or as a stream; the output rules apply to it as to any
/// answer. The record is closed here (a blocked replay through `fail`).
async fn replay(
    gw: &Gateway,
    mut rec: Record,
    req: &ClientRequest,
    e: &Entry,
    kind: CacheKind,
    rc: &RouteCache,
    output_rules: &[Arc<Rule>],
) -> Response {
    let mut body = Bytes::from(e.body.clone());
    if !output_rules.is_empty() {
        match screen_answer(output_rules, &gw.screen.counters, &body).await {
            Ok(Some(masked)) => body = masked,
            Ok(None) => {}
            Err(b) => {
                rec.blocked(&b);
                return rec.fail(GatewayError::blocked(&b));
            }
        }
    }
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    rec.cache_hit(e, kind, rc.hit_usd);
    rec.responded();
    let prefix = if doc["object"] == "text_completion" {
        "cmpl"
    } else {
        "chatcmpl"
    };
    let id = format!("{prefix}-tgc{:032x}", fastrand::u128(..));
    let (content_type, bytes) = if req.stream {
        (
            "text/event-stream",
            entry::events(&doc, &id, req.include_usage),
        )
    } else {
        ("application/json", entry::whole(doc, &id))
    };
    let mut resp = (StatusCode::OK, Body::from(bytes)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    if let Ok(v) = HeaderValue::from_str(&e.served_model) {
        h.insert("x-tollgate-served-model", v);
    }
    rec.finish(200);
    resp
}

/// Stores a whole answer (`body` as the client gets it) that `candidate`
/// gave at the cost of `usage`.
pub fn store_whole(
    gw: &Gateway,
    rec: &Record,
    pending: Pending,
    candidate: &Candidate,
    body: &Bytes,
    usage: &Usage,
) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let t = usage.tokens;
    let entry = Entry {
        body: text.to_string(),
        served_model: candidate.model.clone(),
        provider: candidate.upstream.provider().to_string(),
        upstream: candidate.upstream.name().to_string(),
        input_tokens: t.input,
        cached_input_tokens: t.cached_input,
        output_tokens: t.output,
        reasoning_tokens: t.reasoning,
        estimated: usage.source == TokenSource::Estimated,
        cost_usd: rec.price(&candidate.model, &t).map(|c| c.to_string()),
        created: chrono::Utc::now().timestamp(),
        vector: None,
    };
    gw.cache.store(pending, entry);
}

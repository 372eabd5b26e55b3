//! The response cache on the request path: the lookup (after the content
//! guard's input check, before the limits: a hit uses no upstream and
//! counts against no limit), a hit's replay, and storing a whole answer.
//! Streamed answers are stored by the relay once they end normally.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tollgate_schemas::{CacheKind, CacheStatus, Outcome, TokenSource};

use crate::config::{CacheMode, RouteCache};
use crate::error::GatewayError;
use crate::ledger::Record;
use crate::ledger::tally::{Tally, Usage};
use crate::policy::cache::entry::{self, Entry};
use crate::policy::cache::semantic::{self, Embedder};
use crate::policy::cache::{Control, Looked, Pending, key};
use crate::policy::screen::output::screen_answer;
use crate::policy::screen::rules::Rule;
use crate::proxy::admission::Arrival;
use crate::proxy::auth::Caller;
use crate::proxy::request::{ClientRequest, Endpoint};
use crate::proxy::routing::{Candidate, Route};
use crate::state::Gateway;
use crate::upstream::response::Document;

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
/// Semantic routes look up the exact key first (no embedding needed),
/// then the nearest stored question.
#[allow(clippy::too_many_arguments)]
pub async fn lookup(
    gw: &Gateway,
    rec: Record,
    route: &Route,
    caller: &Caller<'_>,
    endpoint: Endpoint,
    req: &ClientRequest,
    arrival: &Arrival<'_>,
    output_rules: &[Arc<Rule>],
) -> Result<(Record, Decision), Response> {
    let Some(rc) = route.cache.as_ref().filter(|c| c.mode != CacheMode::Off) else {
        return Ok((rec, Decision::default()));
    };
    let semantic = rc.mode == CacheMode::Semantic && endpoint != Endpoint::Embeddings;
    let kind = if semantic {
        CacheKind::Semantic
    } else {
        CacheKind::Exact
    };
    let control = Control::of(arrival.headers);
    let scope = key::scope(rc.scope, caller);
    let exact = key::exact(&scope, endpoint, &req.body);
    let mut pending = (!control.no_store).then(|| Pending {
        key: exact.clone(),
        ttl: rc.ttl,
        max_entry_bytes: rc.max_entry_bytes,
        kind,
        semantic: None,
    });
    let go = |mut rec: Record, status, result, pending, header| {
        gw.cache.counted(result, kind);
        rec.cache(status, kind);
        (
            rec,
            Decision {
                pending,
                header: Some(header),
            },
        )
    };
    if control.no_cache {
        return Ok(go(rec, CacheStatus::Bypass, "bypass", pending, "bypass"));
    }
    let hit = Hit {
        gw,
        req,
        rc,
        output_rules,
    };
    match gw.cache.get(&exact).await {
        Looked::Hit(e) => {
            // An entry that does not parse is a miss, overwritten later.
            if let Some(doc) = e.doc() {
                gw.cache.counted("hit", CacheKind::Exact);
                return Err(hit.replay(rec, &e, doc, CacheKind::Exact, None).await);
            }
        }
        Looked::Miss => {}
        Looked::Failed => return Ok(go(rec, CacheStatus::Bypass, "error", None, "bypass")),
    }
    let embedder = gw.cache.embedder(&route.model);
    let query = semantic::query_text(&req.body);
    let (Some(embedder), Some((at, text)), true) = (embedder, query, semantic) else {
        return Ok(go(rec, CacheStatus::Miss, "miss", pending, "miss"));
    };
    let vector = match embed(gw, embedder, &text, caller, arrival).await {
        Ok(v) => v,
        Err(why) => {
            tracing::warn!(route = %route.model, error = %why, "semantic cache: no embedding, bypassed");
            return Ok(go(rec, CacheStatus::Bypass, "error", pending, "bypass"));
        }
    };
    let partition = key::exact(&scope, endpoint, &semantic::context(&req.body, at));
    // A row whose entry the store lost (flushed, evicted) is forgotten and
    // the next nearest tried, a few times at most.
    for _ in 0..3 {
        let Some(near) = gw.cache.nearest(&partition, &vector, rc.threshold).await else {
            break;
        };
        match gw.cache.get(&near.key).await {
            Looked::Hit(e) => match e.doc() {
                Some(doc) => {
                    gw.cache.counted("hit", kind);
                    let similarity = Some(near.similarity);
                    return Err(hit.replay(rec, &e, doc, kind, similarity).await);
                }
                None => gw.cache.forget(&partition, &near.key),
            },
            Looked::Failed => return Ok(go(rec, CacheStatus::Bypass, "error", None, "bypass")),
            Looked::Miss => gw.cache.forget(&partition, &near.key),
        }
    }
    if let Some(p) = pending.as_mut() {
        p.semantic = Some((partition, vector));
    }
    Ok(go(rec, CacheStatus::Miss, "miss", pending, "miss"))
}

/// What replaying a hit needs.
struct Hit<'a> {
    gw: &'a Gateway,
    req: &'a ClientRequest,
    rc: &'a RouteCache,
    output_rules: &'a [Arc<Rule>],
}

impl Hit<'_> {
    /// A hit (`doc`: its parsed answer), whole or as a stream, with the similarity of a semantic
    /// one; the output rules apply to it as to any answer. The record is
    /// closed here (a blocked replay through `fail`).
    async fn replay(
        self,
        mut rec: Record,
        e: &Entry,
        mut doc: serde_json::Value,
        kind: CacheKind,
        similarity: Option<f32>,
    ) -> Response {
        let Hit {
            gw,
            req,
            rc,
            output_rules,
        } = self;
        let mut body = Bytes::from(e.body.clone());
        if !output_rules.is_empty() {
            match screen_answer(output_rules, &gw.screen.counters, &body).await {
                Ok(Some(masked)) => {
                    doc = serde_json::from_slice(&masked).unwrap_or_default();
                    body = masked;
                }
                Ok(None) => {}
                Err(b) => {
                    rec.blocked(&b);
                    return rec.fail(GatewayError::blocked(&b));
                }
            }
        }
        rec.cache_hit(e, kind, rc.hit_usd);
        rec.responded();
        if req.stream {
            // The whole replay goes out at once: its first token is now.
            rec.first_token(std::time::Instant::now());
        }
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
            let text = std::str::from_utf8(&body).unwrap_or_default();
            ("application/json", entry::whole(text, &doc, &id))
        };
        let mut resp = (StatusCode::OK, Body::from(bytes)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
        if let Ok(v) = HeaderValue::from_str(&e.served_model) {
            h.insert("x-tollgate-served-model", v);
        }
        let kind_name = match kind {
            CacheKind::Exact => "exact",
            CacheKind::Semantic => "semantic",
        };
        h.insert("x-tollgate-cache-kind", HeaderValue::from_static(kind_name));
        if let Some(s) = similarity
            && let Ok(v) = HeaderValue::from_str(&format!("{s:.4}"))
        {
            h.insert("x-tollgate-cache-similarity", v);
        }
        rec.finish(200);
        resp
    }
}

/// The embedding of `text`, its call recorded as an event of its own
/// (endpoint `embeddings`, the caller's, tagged `tollgate.purpose =
/// semantic_cache`), so the lookup's cost is in the ledger too.
async fn embed(
    gw: &Gateway,
    embedder: &Embedder,
    text: &str,
    caller: &Caller<'_>,
    arrival: &Arrival<'_>,
) -> Result<Vec<f32>, String> {
    let endpoint = Endpoint::Embeddings;
    let body = embedder.body(text);
    let mut rec = Record::open(&gw.ledger, endpoint.path(), arrival.headers, arrival.peer);
    rec.caller(caller);
    rec.tag("tollgate.purpose", "semantic_cache");
    if let Ok(req) = ClientRequest::parse(endpoint, body.clone()) {
        rec.request(&req);
        rec.screened(&req, false);
    }
    let candidate = Candidate {
        upstream: embedder.upstream.clone(),
        model: embedder.model.clone(),
        route_model: embedder.model.clone(),
    };
    let sent = rec.sending(&candidate);
    let answer = embedder.ask(body).await;
    rec.waited(sent.elapsed());
    let (status, bytes) = match answer {
        Ok(a) => a,
        Err(why) => {
            let label = if why.starts_with("no embedding within") {
                "timeout"
            } else {
                "connect"
            };
            rec.attempt(&candidate, None, Some(label), sent.elapsed(), None);
            rec.finish_with(502, Outcome::UpstreamError, "upstream_error");
            return Err(why);
        }
    };
    let mut tally = Tally::embeddings();
    if let Some(doc) = Document::parse(&bytes) {
        tally.read(&doc);
    }
    let ok = (200..300).contains(&status);
    let usage = (ok || tally.reported()).then(|| rec.settle(&candidate.upstream, &tally));
    let error = (!ok).then_some("upstream_error");
    rec.attempt(&candidate, Some(status), error, sent.elapsed(), usage);
    rec.served_by(&candidate);
    let vector = if ok {
        semantic::vector_of(&bytes)
    } else {
        Err(format!("the embeddings upstream answered {status}"))
    };
    match &vector {
        Ok(_) => rec.finish(200),
        Err(_) => rec.finish_with(502, Outcome::UpstreamError, "upstream_error"),
    }
    vector
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
    let estimated = usage.source == TokenSource::Estimated;
    let cost = rec.price(&candidate.model, &t);
    let entry = Entry::new(text.to_string(), candidate, t, estimated, cost);
    gw.cache.store(pending, entry);
}

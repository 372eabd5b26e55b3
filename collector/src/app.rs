//! The gateway's HTTP surface: which path goes to which handler. The order
//! of work for a request is written once, on [`app`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::error::GatewayError;
use crate::ledger::Record;
use crate::proxy;
use crate::state::Gateway;

/// The gateway's HTTP surface.
///
/// Order of work for a request: path normalisation (outside the router, so
/// routing only ever sees the normalised path) -> route match -> handler,
/// which authenticates, limits and parses the body, checks permissions,
/// routes by model and proxies (see `proxy`). Unknown paths and methods
/// get OpenAI-style errors and are recorded like any other request.
pub fn app(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(models))
        .route("/v1/limits", get(limits))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gw)
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let Some(caller) = gw.keyring.authenticate(&headers) else {
        return GatewayError::Unauthorized.into_response();
    };
    let data: Vec<serde_json::Value> = gw
        .routes
        .exact_models()
        .filter(|m| caller.consumer.may_use(m))
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/limits`: the admin token sees every counter, a consumer's key
/// its own (see `crate::policy::quota::view`).
async fn limits(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    use crate::policy::quota::view::Viewer;
    let admin = gw
        .admin_token
        .as_ref()
        .is_some_and(|t| proxy::auth::presents(&headers, t.expose()));
    let body = if admin {
        gw.quota.view(&Viewer::Admin).await
    } else {
        let Some(caller) = gw.keyring.authenticate(&headers) else {
            return GatewayError::Unauthorized.into_response();
        };
        let viewer = Viewer::Consumer {
            name: &caller.consumer.name,
            team: caller.consumer.team.as_deref(),
        };
        gw.quota.view(&viewer).await
    };
    axum::Json(body).into_response()
}

async fn not_found(
    State(gw): State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    req: Request<Body>,
) -> Response {
    let rec = Record::open(&gw.ledger, "unknown", req.headers(), peer.map(|c| c.0.0));
    let path: String = crate::error::shown(req.uri().path());
    rec.fail(GatewayError::NotFound { path })
}

async fn method_not_allowed(
    State(gw): State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    req: Request<Body>,
) -> Response {
    let endpoint = req.uri().path().trim_start_matches("/v1/").to_string();
    let rec = Record::open(
        &gw.ledger,
        &crate::error::shown(&endpoint),
        req.headers(),
        peer.map(|c| c.0.0),
    );
    rec.fail(GatewayError::MethodNotAllowed)
}

/// `/metrics`: the gateway's and the rest of the process's (see
/// `crate::observe::metrics`).
async fn metrics(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let (kind, text) = gw.observe.metrics.render(accept);
    ([(axum::http::header::CONTENT_TYPE, kind)], text).into_response()
}

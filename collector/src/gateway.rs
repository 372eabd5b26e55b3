//! The gateway as a whole: its state, its HTTP surface and its server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tollgate_schemas::PriceCatalog;
use tower::Layer;
use tower::util::MapRequestLayer;

use crate::auth::Keyring;
use crate::config::Config;
use crate::error::GatewayError;
use crate::ledger::{Ledger, Pricing, Record};
use crate::metrics::{self, Source};
use crate::routing::Routes;
use crate::tap::{Tap, TapWriter};
use crate::upstream::Upstream;
use crate::{CollectorError, paths, proxy};
use tollgate_spool::SpoolWriter;

pub struct Gateway {
    pub keyring: Keyring,
    pub routes: Routes,
    pub ledger: Arc<Ledger>,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    /// Every configured upstream, for their counters on `/metrics`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Other parts of the process shown on `/metrics`.
    pub metrics: Vec<Arc<dyn metrics::Source>>,
}

impl Gateway {
    pub fn new(config: &Config, tap: Arc<Tap>) -> Result<Self, CollectorError> {
        let catalog = match &config.gateway.prices {
            Some(path) => PriceCatalog::load(path)?,
            None => PriceCatalog::shipped()?,
        };
        let mut upstreams = HashMap::new();
        for (name, u) in &config.upstreams {
            let up = Upstream::new(u).map_err(|e| CollectorError::Upstream {
                name: name.clone(),
                message: e.to_string(),
            })?;
            upstreams.insert(name.clone(), Arc::new(up));
        }
        let mut listed: Vec<Arc<Upstream>> = upstreams.values().cloned().collect();
        listed.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(Self {
            keyring: Keyring::new(&config.consumers),
            routes: Routes::new(&config.routes, &upstreams),
            upstreams: listed,
            ledger: Arc::new(Ledger {
                tap,
                pricing: Pricing::new(catalog),
                instance: config.gateway.instance.clone(),
                client_ip: config.gateway.client_ip,
            }),
            max_body_bytes: config.gateway.max_body_bytes,
            max_response_bytes: config.gateway.max_response_bytes,
            metrics: Vec::new(),
        })
    }
}

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

/// Prometheus text: the tap's counters, then every registered source.
async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let mut out = String::with_capacity(1024);
    gw.ledger.tap.counters().render(&mut out);
    metrics::render_estimates(&mut out, &gw.upstreams);
    for source in &gw.metrics {
        source.render(&mut out);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// A bound gateway, ready to serve.
pub struct Server {
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tap: Arc<Tap>,
    writer: TapWriter,
}

/// What a server did, reported when it stops.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub events_written: u64,
    pub events_dropped: u64,
}

impl Server {
    /// Binds the listener and starts the tap, which writes to `spool`.
    /// `metrics`: other parts of the process to show on `/metrics`.
    pub async fn bind(
        config: &Config,
        spool: SpoolWriter,
        metrics: Vec<Arc<dyn metrics::Source>>,
    ) -> Result<Self, CollectorError> {
        let (tap, writer) =
            Tap::start(spool, config.pipeline.queue_capacity).map_err(|source| {
                CollectorError::Io {
                    context: "starting the tap".into(),
                    source,
                }
            })?;
        let mut gateway = Gateway::new(config, tap.clone())?;
        gateway.metrics = metrics;
        let gateway = Arc::new(gateway);
        let listener = TcpListener::bind(config.gateway.listen)
            .await
            .map_err(|source| CollectorError::Io {
                context: format!("binding {}", config.gateway.listen),
                source,
            })?;
        Ok(Self {
            listener,
            gateway,
            tap,
            writer,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, CollectorError> {
        self.listener
            .local_addr()
            .map_err(|source| CollectorError::Io {
                context: "reading the bound address".into(),
                source,
            })
    }

    /// Serves until `shutdown` resolves, lets in-flight requests finish,
    /// then drains the tap.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Summary, CollectorError> {
        let service =
            MapRequestLayer::new(paths::normalize_request::<Body>).layer(app(self.gateway));
        let make = axum::ServiceExt::<Request<Body>>::into_make_service_with_connect_info::<
            SocketAddr,
        >(service);
        // Small SSE writes must leave at once, not wait on Nagle + delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, make)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| CollectorError::Io {
                context: "serving".into(),
                source,
            })?;
        let dropped = self.tap.dropped();
        drop(self.tap);
        let written = tokio::task::spawn_blocking(move || self.writer.close())
            .await
            .map_err(|e| CollectorError::Io {
                context: "stopping the tap".into(),
                source: std::io::Error::other(e),
            })??;
        Ok(Summary {
            events_written: written,
            events_dropped: dropped,
        })
    }
}

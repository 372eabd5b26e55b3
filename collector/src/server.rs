//! Serving the gateway: binding the listener, starting the tap, and a
//! graceful stop that lets in-flight requests (streams included) finish and
//! then drains the tap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use tokio::net::TcpListener;
use tollgate_spool::SpoolWriter;
use tower::Layer;
use tower::util::MapRequestLayer;

use crate::app::app;
use crate::config::Config;
use crate::ledger::tap::{Tap, TapWriter};
use crate::state::Gateway;
use crate::{CollectorError, paths};
use tollgate_schemas::metrics::Collector;

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
    /// Binds the listener and starts the tap, which writes to `spool`
    /// through a queue of `queue_capacity` events (`[pipeline]`).
    /// `metrics`: other parts of the process to show on `/metrics`.
    pub async fn bind(
        config: &Config,
        spool: SpoolWriter,
        queue_capacity: usize,
        metrics: Vec<Box<dyn Collector>>,
    ) -> Result<Self, CollectorError> {
        let (tap, writer) =
            Tap::start(spool, queue_capacity).map_err(|source| CollectorError::Io {
                context: "starting the tap".into(),
                source,
            })?;
        let gateway = Arc::new(Gateway::new(config, tap.clone(), metrics)?);
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

    /// What the tap has spooled (for the pipeline's health).
    pub fn tap_counters(&self) -> Arc<crate::ledger::tap::Counters> {
        self.tap.counters().clone()
    }

    /// The state requests will read (to seed it before serving).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
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
        let observe = self.gateway.observe.clone();
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
        if let Some(t) = observe.telemetry.clone() {
            flush_telemetry(t).await;
        }
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

/// Exports the spans and metrics still waiting, for at most about 5 s: a
/// collector that does not answer must not hold the gateway's exit.
async fn flush_telemetry(t: Arc<crate::observe::Telemetry>) {
    let held = t.clone();
    let flush = tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(4)));
    let clean = matches!(
        tokio::time::timeout(Duration::from_secs(5), flush).await,
        Ok(Ok(true))
    );
    if !clean {
        tracing::warn!("telemetry export did not finish in time; what was waiting is dropped");
        // An export thread may still wait on the collector: the exporters
        // and their runtime stay until the process exits, rather than being
        // torn down under it.
        std::mem::forget(held);
    }
}

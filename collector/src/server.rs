//! Serving the gateway: binding the listener, starting the tap, and a
//! graceful stop that lets in-flight requests (streams included) finish and
//! then drains the tap.

use std::net::SocketAddr;
use std::sync::Arc;

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
use crate::{CollectorError, metrics, paths};

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
        metrics: Vec<Arc<dyn metrics::Source>>,
    ) -> Result<Self, CollectorError> {
        let (tap, writer) =
            Tap::start(spool, queue_capacity).map_err(|source| CollectorError::Io {
                context: "starting the tap".into(),
                source,
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

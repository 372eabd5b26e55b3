//! The query service as a whole: the engine, the HTTP and PostgreSQL
//! listeners, on a runtime of their own so heavy queries never take
//! threads from the proxy's hot path.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::settings::QuerySettings;
use crate::{QueryError, engine::Engine, http, pg};

pub struct QueryService {
    pub http: SocketAddr,
    pub pg: Option<SocketAddr>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
}

/// Each query thread's stack, bytes (virtual: pages are touched only by a
/// deep plan).
const QUERY_STACK_BYTES: usize = 256 << 20;

impl QueryService {
    /// Opens the engine and binds both listeners; errors (a taken port, a
    /// bad lake) come back here rather than from a background task.
    pub async fn start(
        settings: QuerySettings,
        threads: usize,
    ) -> Result<QueryService, QueryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("tollgate-query")
            // Planning recurses over the statement: a 2 MiB stack overflows
            // (and aborts the process) on a few thousand chained terms
            // (`a OR b OR ...`, as BI tools write them). Reserved, not used.
            .thread_stack_size(QUERY_STACK_BYTES)
            .enable_all()
            .build()
            .map_err(|e| QueryError::Internal(format!("starting the query runtime: {e}")))?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        runtime.spawn(async move {
            let started = async {
                let engine = Engine::open(&settings).await?;
                let bind_err = |what: &'static str, addr: SocketAddr| {
                    move |e: std::io::Error| QueryError::Internal(format!("{what} {addr}: {e}"))
                };
                let http_listener = tokio::net::TcpListener::bind(settings.listen)
                    .await
                    .map_err(bind_err("query.listen", settings.listen))?;
                let pg_listener = match settings.pg_listen {
                    Some(addr) => Some(
                        tokio::net::TcpListener::bind(addr)
                            .await
                            .map_err(bind_err("query.pg_listen", addr))?,
                    ),
                    None => None,
                };
                Ok::<_, QueryError>((engine, http_listener, pg_listener))
            };
            let (engine, http_listener, pg_listener) = match started.await {
                Ok(parts) => parts,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if let Some(alerts) = settings.alerts.clone() {
                let started = crate::alerts::alerter::Alerter::start(
                    engine.clone(),
                    engine.store().clone(),
                    engine.records().clone(),
                    alerts,
                    engine.rules().clone(),
                );
                if let Err(e) = started {
                    let _ = ready_tx.send(Err(QueryError::Internal(format!("alerts: {e}"))));
                    return;
                }
            }
            let addrs = (
                http_listener.local_addr().ok(),
                pg_listener.as_ref().and_then(|l| l.local_addr().ok()),
            );
            let _ = ready_tx.send(Ok(addrs));
            if let Some(listener) = pg_listener {
                let engine = engine.clone();
                tokio::spawn(async move {
                    if let Err(e) = pg::serve(engine, listener).await {
                        tracing::error!("the PostgreSQL listener stopped: {e}");
                    }
                });
            }
            let app = http::router(Arc::clone(&engine), &settings.cors_origins);
            let served = axum::serve(http_listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("the query HTTP listener stopped: {e}");
            }
        });
        // A runtime must not be dropped inside another: on a failed start it
        // is shut down in the background, like at a normal stop.
        let started = match ready_rx.await {
            Ok(Ok((Some(http), pg))) => Ok((http, pg)),
            Ok(Ok((None, _))) => Err(QueryError::Internal("query listener has no address".into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QueryError::Internal(
                "the query service did not start".into(),
            )),
        };
        let (http, pg) = match started {
            Ok(addrs) => addrs,
            Err(e) => {
                runtime.shutdown_background();
                return Err(e);
            }
        };
        tracing::info!("query: SQL and reports on http://{http}");
        if let Some(pg) = pg {
            tracing::info!("query: PostgreSQL wire on {pg}");
        }
        Ok(QueryService {
            http,
            pg,
            runtime: Some(runtime),
            stop: Some(stop_tx),
        })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for QueryService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

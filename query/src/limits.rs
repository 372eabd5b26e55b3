//! How far a query may go: a cap on concurrent queries, a timeout, a cap on
//! the rows and bytes of a result, and a watchdog on the process's resident
//! size for the allocations DataFusion's memory pool does not track.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::QueryError;
use crate::settings::Limits;

pub struct Gate {
    limits: Limits,
    slots: Arc<Semaphore>,
    /// Woken by the watchdog: every running query stops.
    cancel: Arc<Notify>,
    pub cancelled_by_watchdog: AtomicU64,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            limits,
            cancel: Arc::new(Notify::new()),
            cancelled_by_watchdog: AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A slot, or a clear refusal when every slot is taken.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, QueryError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            QueryError::Busy(format!(
                "{} queries are already running, the configured maximum; retry shortly",
                self.limits.max_concurrent
            ))
        })
    }

    /// Runs `work` under the timeout and the watchdog.
    pub async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, QueryError>>,
    ) -> Result<T, QueryError> {
        let cancelled = self.cancel.notified();
        // A panic inside an operator (arrow's offset overflow on a huge
        // string, say) fails the query, never the server.
        let work = std::panic::AssertUnwindSafe(work).catch_unwind();
        let work = async {
            work.await.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Err(QueryError::Resources(format!(
                    "the query failed inside the engine: {what}"
                )))
            })
        };
        tokio::select! {
            r = tokio::time::timeout(self.limits.timeout, work) => {
                r.map_err(|_| QueryError::Timeout(self.limits.timeout.as_millis() as u64))?
            }
            _ = cancelled => Err(QueryError::Resources(format!(
                "the server's memory passed {} MiB and running queries were cancelled",
                self.limits.max_rss_bytes >> 20
            ))),
        }
    }

    /// Drains a result stream, refusing it once it passes the row or byte cap.
    pub async fn collect(
        &self,
        mut stream: SendableRecordBatchStream,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let (mut rows, mut bytes) = (0usize, 0usize);
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(QueryError::from_datafusion)?;
            rows += batch.num_rows();
            bytes += batch.get_array_memory_size();
            if rows > self.limits.max_result_rows {
                return Err(QueryError::TooLarge(format!(
                    "the result has more than {} rows, the configured maximum; add a LIMIT or aggregate",
                    self.limits.max_result_rows
                )));
            }
            if bytes > self.limits.max_result_bytes {
                return Err(QueryError::TooLarge(format!(
                    "the result is larger than {} MiB, the configured maximum; select fewer columns or rows",
                    self.limits.max_result_bytes >> 20
                )));
            }
            batches.push(batch);
        }
        Ok(batches)
    }

    /// Starts the resident-size watchdog on a thread of its own, so it runs
    /// even while every runtime worker is busy.
    pub fn watch_memory(self: &Arc<Self>) {
        let gate = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("tollgate-query-watchdog".into())
            .spawn(move || {
                while let Some(gate) = gate.upgrade() {
                    let running = gate.limits.max_concurrent - gate.slots.available_permits();
                    if running > 0
                        && resident_bytes().is_some_and(|rss| rss > gate.limits.max_rss_bytes)
                    {
                        gate.cancelled_by_watchdog.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "resident memory over {} MiB: cancelling running queries",
                            gate.limits.max_rss_bytes >> 20
                        );
                        gate.cancel.notify_waiters();
                    }
                    drop(gate);
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("query memory watchdog not started: {e}");
        }
    }
}

/// This process's resident set size, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

//! The publisher: a thread that writes batches to the lake while the
//! ingester reads and decodes the next ones, so both cores work.
//!
//! Batches are published one at a time, in the order submitted, so a
//! source still has at most one batch in progress (the lake's recovery
//! relies on that). At most one batch waits while another is written.
//! [`Inflight::wait_idle`] lets a revoked ingester wait until nothing of
//! its partitions is still being written before it lets them go.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tollgate_schemas::UsageEvent;

use crate::IngestError;
use crate::lake::{Lake, Published};

pub struct Job {
    /// The caller's name for the stream (a Kafka partition).
    pub key: i32,
    pub source: String,
    pub start: String,
    pub end: String,
    /// The caller's position after the batch (the next Kafka offset).
    pub next: i64,
    pub events: Vec<UsageEvent>,
}

pub struct Done {
    pub key: i32,
    pub next: i64,
    pub result: Result<Published, IngestError>,
    /// Time spent writing the batch.
    pub took: Duration,
}

/// Batches submitted and not yet published.
#[derive(Default)]
pub struct Inflight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    fn add(&self, n: isize) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.saturating_add_signed(n);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until every submitted batch is published (or `limit` passes).
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *c > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = match self.idle.wait_timeout(c, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

pub struct Publisher {
    tx: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    inflight: Arc<Inflight>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    pub fn start(lake: Lake) -> Result<Publisher, IngestError> {
        let (tx, jobs) = sync_channel::<Job>(1);
        let (done_tx, done) = sync_channel::<Done>(1024);
        let inflight = Arc::new(Inflight::default());
        let thread = std::thread::Builder::new()
            .name("tollgate-publish".into())
            .spawn({
                let inflight = inflight.clone();
                move || {
                    for job in jobs {
                        let started = Instant::now();
                        let result = lake.publish(&job.source, &job.start, &job.end, job.events);
                        let took = started.elapsed();
                        // Reported before the count drops: a caller that saw
                        // the publisher idle finds every result waiting.
                        let _ = done_tx.send(Done {
                            key: job.key,
                            next: job.next,
                            result,
                            took,
                        });
                        inflight.add(-1);
                    }
                }
            })
            .map_err(|e| IngestError::Store(format!("starting the publisher: {e}")))?;
        Ok(Publisher {
            tx: Some(tx),
            done,
            inflight,
            thread: Some(thread),
        })
    }

    pub fn inflight(&self) -> Arc<Inflight> {
        self.inflight.clone()
    }

    /// Queues a batch; waits while another batch is already queued.
    pub fn submit(&self, job: Job) -> Result<(), IngestError> {
        self.inflight.add(1);
        let sent = self.tx.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            self.inflight.add(-1);
            return Err(IngestError::Store(
                "the publisher thread has stopped".into(),
            ));
        }
        Ok(())
    }

    /// Results of the batches published since the last call.
    pub fn finished(&self) -> Vec<Done> {
        let mut out = Vec::new();
        loop {
            match self.done.try_recv() {
                Ok(d) => out.push(d),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }

    /// Publishes what is queued, stops the thread, returns the last results.
    pub fn finish(mut self) -> Vec<Done> {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.finished()
    }
}

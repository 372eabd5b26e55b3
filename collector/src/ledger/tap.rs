//! The tap: where finished usage events leave the request path.
//!
//! `emit` never blocks: it hands the event to a bounded queue and returns.
//! One writer thread serializes events (JSON, the Kafka message format)
//! into the durable spool and group-commits them: one `fdatasync` per few
//! milliseconds or per batch of events, whichever comes first. An event
//! that finds the queue full, or the spool at its size bound, is counted
//! and logged, never lost silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use tollgate_schemas::UsageEvent;
use tollgate_spool::{Append, SpoolError, SpoolWriter};

pub struct Tap {
    /// Boxed: the channel allocates its capacity up front, so slots stay small.
    tx: SyncSender<Box<UsageEvent>>,
    counters: Arc<Counters>,
}

/// What the tap has done so far; read by `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub emitted: AtomicU64,
    /// Refused because the in-memory queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Refused because the spool was at its size bound.
    pub dropped_spool_full: AtomicU64,
    /// Durable in the spool.
    pub committed: AtomicU64,
    /// Events spooled per hour of their `ts_start` (unix seconds of the
    /// hour), for the lake completeness check; the last [`HOURS_KEPT`].
    pub by_hour: std::sync::Mutex<std::collections::BTreeMap<i64, u64>>,
    /// When the writer started (unix seconds): hours before it are partial.
    pub since: AtomicU64,
}

/// Hours of [`Counters::by_hour`] kept.
pub const HOURS_KEPT: usize = 72;

impl Counters {
    fn spooled(&self, hours: &mut Vec<(i64, u64)>) {
        if hours.is_empty() {
            return;
        }
        let mut map = self.by_hour.lock().unwrap_or_else(|p| p.into_inner());
        for (h, n) in hours.drain(..) {
            *map.entry(h).or_default() += n;
        }
        while map.len() > HOURS_KEPT {
            map.pop_first();
        }
    }

    /// Events spooled in each whole hour since the writer started, oldest
    /// first: `(hour start, unix seconds; events)`.
    pub fn whole_hours(&self) -> Vec<(i64, u64)> {
        let since = self.since.load(Ordering::Relaxed) as i64;
        let map = self.by_hour.lock().unwrap_or_else(|p| p.into_inner());
        map.range(since.div_euclid(3600) * 3600 + 3600..)
            .map(|(h, n)| (*h, *n))
            .collect()
    }
}

pub struct TapWriter {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<u64, SpoolError>>,
}

impl Tap {
    /// Starts the writer thread that owns `spool`.
    pub fn start(spool: SpoolWriter, capacity: usize) -> std::io::Result<(Arc<Tap>, TapWriter)> {
        let (tx, rx) = sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        counters.since.store(now, Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name("tollgate-tap".into())
            .spawn({
                let stop = stop.clone();
                let counters = counters.clone();
                move || write_loop(rx, spool, &stop, &counters)
            })?;
        Ok((Arc::new(Tap { tx, counters }), TapWriter { stop, thread }))
    }

    pub fn emit(&self, event: UsageEvent) {
        match self.tx.try_send(Box::new(event)) {
            Ok(()) => {
                self.counters.emitted.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(e) | TrySendError::Disconnected(e)) => {
                let n = self
                    .counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n.is_power_of_two() {
                    tracing::error!(
                        dropped_total = n,
                        event_id = %e.event_id,
                        "usage tap queue full or closed: event dropped"
                    );
                }
            }
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Events refused by the queue or the spool.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped_queue_full.load(Ordering::Relaxed)
            + self.counters.dropped_spool_full.load(Ordering::Relaxed)
    }
}

impl TapWriter {
    /// Spools what is queued, commits it and stops the writer. Returns the
    /// number of events committed over the writer's life.
    pub fn close(self) -> Result<u64, SpoolError> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().map_err(|_| SpoolError::Io {
            path: "tap writer".into(),
            source: std::io::Error::other("tap writer thread panicked"),
        })?
    }
}

const MIN_NAP: Duration = Duration::from_micros(500);
const MAX_NAP: Duration = Duration::from_millis(20);

/// The writer polls the queue instead of blocking on it: a blocked receiver
/// makes every `emit` pay for a futex wake-up and a context switch, which is
/// most of what an event would otherwise cost the request path. Naps grow
/// while the queue stays empty, but never past a due commit.
fn write_loop(
    rx: Receiver<Box<UsageEvent>>,
    mut spool: SpoolWriter,
    stop: &AtomicBool,
    counters: &Counters,
) -> Result<u64, SpoolError> {
    let mut json = Vec::with_capacity(2048);
    let mut committed = 0u64;
    let mut nap = MIN_NAP;
    let mut closing = false;
    let mut hours: Vec<(i64, u64)> = Vec::new();
    loop {
        let mut got = 0;
        loop {
            match rx.try_recv() {
                Ok(event) => {
                    got += 1;
                    json.clear();
                    if let Err(e) = serde_json::to_writer(&mut json, &*event) {
                        tracing::error!(event_id = %event.event_id, error = %e, "usage event not serializable: dropped");
                        continue;
                    }
                    let appended = spool.append(&json)?;
                    if appended == Append::Buffered {
                        let hour = event.ts_start.timestamp().div_euclid(3600) * 3600;
                        match hours.last_mut() {
                            Some((h, n)) if *h == hour => *n += 1,
                            _ => hours.push((hour, 1)),
                        }
                    }
                    if appended == Append::Full {
                        let n = counters.dropped_spool_full.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::error!(
                                dropped_total = n,
                                bytes = spool.bytes_on_disk(),
                                "usage spool at its size bound: event dropped"
                            );
                        }
                    }
                    if spool.commit_due() {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closing = true;
                    break;
                }
            }
        }
        if spool.commit_due() || closing || stop.load(Ordering::Acquire) {
            let n = spool.commit()? as u64;
            committed += n;
            counters.committed.fetch_add(n, Ordering::Relaxed);
            counters.spooled(&mut hours);
        }
        if closing || (stop.load(Ordering::Acquire) && got == 0) {
            let n = spool.close()? as u64;
            counters.committed.fetch_add(n, Ordering::Relaxed);
            counters.spooled(&mut hours);
            return Ok(committed + n);
        }
        if got > 0 {
            nap = MIN_NAP;
            continue;
        }
        let wait = spool.due_in().map_or(nap, |due| due.min(nap));
        std::thread::sleep(wait);
        nap = (nap * 2).min(MAX_NAP);
    }
}

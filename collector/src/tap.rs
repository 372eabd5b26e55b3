//! The tap: where finished usage events leave the request path.
//!
//! `emit` never blocks: it hands the event to a bounded queue and returns.
//! When the queue is full the event is counted as dropped and logged, never
//! lost silently. One writer thread owns the output file, writes events as
//! JSON lines in batches (one flush per batch) and drains the queue on
//! shutdown.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use tollgate_schemas::UsageEvent;

pub struct Tap {
    /// Boxed: the channel allocates its capacity up front, so slots stay small.
    tx: SyncSender<Box<UsageEvent>>,
    emitted: AtomicU64,
    dropped: AtomicU64,
}

pub struct TapWriter {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<u64>>,
}

impl Tap {
    /// Opens (appends to) `path` and starts the writer thread.
    pub fn open(path: &Path, capacity: usize) -> io::Result<(Arc<Tap>, TapWriter)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("tollgate-tap".into())
            .spawn({
                let stop = stop.clone();
                move || write_loop(rx, file, &stop)
            })?;
        let tap = Arc::new(Tap {
            tx,
            emitted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        Ok((
            tap,
            TapWriter {
                path: path.to_path_buf(),
                stop,
                thread,
            },
        ))
    }

    pub fn emit(&self, event: UsageEvent) {
        match self.tx.try_send(Box::new(event)) {
            Ok(()) => {
                self.emitted.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(e) | TrySendError::Disconnected(e)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(
                        dropped_total = n,
                        request_id = %e.request_id,
                        "usage tap queue full or closed: event dropped"
                    );
                }
            }
        }
    }

    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl TapWriter {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what is queued, syncs the file and stops the writer.
    pub fn close(self) -> io::Result<u64> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| io::Error::other("tap writer thread panicked"))?
    }
}

const BATCH: usize = 1024;
const MIN_NAP: Duration = Duration::from_millis(2);
const MAX_NAP: Duration = Duration::from_millis(50);

/// The writer polls the queue instead of blocking on it: a blocked receiver
/// makes every `emit` pay for a futex wake-up and a context switch, which is
/// most of what an event would otherwise cost the request path. Naps grow
/// while the queue stays empty, so an idle gateway hardly wakes.
fn write_loop(rx: Receiver<Box<UsageEvent>>, file: File, stop: &AtomicBool) -> io::Result<u64> {
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    let mut written = 0u64;
    let mut nap = MIN_NAP;
    loop {
        let mut batch = 0u64;
        loop {
            match rx.try_recv() {
                Ok(e) => {
                    write_one(&mut out, &e)?;
                    batch += 1;
                    if batch == BATCH as u64 {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    written += batch;
                    out.flush()?;
                    out.get_ref().sync_data()?;
                    return Ok(written);
                }
            }
        }
        if batch > 0 {
            written += batch;
            out.flush()?;
            nap = MIN_NAP;
            continue;
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(MAX_NAP);
    }
    out.flush()?;
    out.get_ref().sync_data()?;
    Ok(written)
}

fn write_one(out: &mut impl Write, e: &UsageEvent) -> io::Result<()> {
    serde_json::to_writer(&mut *out, e).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

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
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use tollgate_schemas::UsageEvent;

pub struct Tap {
    tx: SyncSender<UsageEvent>,
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
        match self.tx.try_send(event) {
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

fn write_loop(rx: Receiver<UsageEvent>, file: File, stop: &AtomicBool) -> io::Result<u64> {
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    let mut written = 0u64;
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => break,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        write_one(&mut out, &first)?;
        written += 1;
        for e in rx.try_iter().take(BATCH - 1) {
            write_one(&mut out, &e)?;
            written += 1;
        }
        out.flush()?;
    }
    out.flush()?;
    out.get_ref().sync_data()?;
    Ok(written)
}

fn write_one(out: &mut impl Write, e: &UsageEvent) -> io::Result<()> {
    serde_json::to_writer(&mut *out, e).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

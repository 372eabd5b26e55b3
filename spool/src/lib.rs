//! The spool: a durable, append-only local log of usage events between the
//! gateway's tap and whatever drains it (the Kafka forwarder, or the
//! embedded ingester when there is no Kafka).
//!
//! One writer appends framed records to numbered segment files and makes
//! them durable in groups (one `fsync` per commit). One reader drains
//! committed records in order and saves its cursor only when the records
//! are safely elsewhere, so a crash replays at most the unacknowledged
//! tail. Every frame carries a CRC-32C over its length and payload: on
//! open, a torn or damaged tail is cut at the last valid record and
//! reported, never looped on or refused.
//!
//! Layout of a spool directory: `<segment>.seg` files named by a 20-digit
//! counter, and `cursor`, the acknowledged position.
//!
//! Its parts, in the order a record meets them: `writer` (append, group
//! commit) -> [`frame`] (length, CRC-32C, payload) -> `dir` (segments and
//! the cursor on disk) -> `reader` (drain, acknowledge); `recovery` cuts a
//! damaged tail on open, and [`scan`] reads every record without draining.

mod dir;
pub mod frame;
mod reader;
mod recovery;
mod scan;
mod writer;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

pub use reader::{Batch, SpoolReader};
pub use recovery::{Damage, Recovery};
pub use scan::scan;
pub use writer::{Append, SpoolWriter};

/// A place in the spool: a segment and a byte offset within it. Positions
/// order the records; a batch is named by its first and end positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.segment, self.offset)
    }
}

impl std::str::FromStr for Position {
    type Err = SpoolError;
    fn from_str(s: &str) -> Result<Self, SpoolError> {
        let bad = || SpoolError::BadPosition(s.to_string());
        let (seg, off) = s.split_once('.').ok_or_else(bad)?;
        Ok(Position {
            segment: seg.parse().map_err(|_| bad())?,
            offset: off.parse().map_err(|_| bad())?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Bound on the bytes on disk; appends past it are refused and counted.
    pub max_bytes: u64,
    /// A commit happens this long after the first uncommitted append...
    pub commit_interval: Duration,
    /// ...or once this many records are waiting, whichever comes first.
    pub commit_records: usize,
}

impl SpoolOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: 4 << 30,
            commit_interval: Duration::from_millis(5),
            commit_records: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool position {0:?} is not SEGMENT.OFFSET")]
    BadPosition(String),
    #[error("spool {0} is in use by another process")]
    Locked(PathBuf),
    #[error("the segment counter is exhausted")]
    SegmentsExhausted,
    #[error("record of {0} bytes is empty or larger than a frame may be")]
    TooLarge(usize),
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.into();
    move |source| SpoolError::Io { path, source }
}

/// State the writer and the reader share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// End of the durable records; the reader never reads past it.
    committed: Mutex<Position>,
    changed: Condvar,
    /// Bytes of all segment files on disk.
    bytes: AtomicU64,
    writer_closed: AtomicBool,
    /// Where the saved cursor is in the first segment on disk: the bytes
    /// before it are drained.
    acked_offset: AtomicU64,
    /// The end of each commit not yet acknowledged and when it was made,
    /// oldest first; bounded (a full queue merges into its newest entry,
    /// which keeps the oldest time and so errs towards an older backlog).
    unacked: Mutex<VecDeque<(Position, SystemTime)>>,
    /// Held while the writer or the reader lives: one process per spool.
    _lock: std::fs::File,
}

/// Commits remembered for [`Backlog::oldest`]; past it, commits merge.
const UNACKED_COMMITS: usize = 4096;

impl Shared {
    fn committed_at(&self, end: Position, at: SystemTime) {
        let mut q = self.unacked.lock().unwrap_or_else(|p| p.into_inner());
        let full = q.len() >= UNACKED_COMMITS;
        match q.back_mut() {
            Some(last) if full => last.0 = end,
            _ => q.push_back((end, at)),
        }
    }

    fn acked_to(&self, upto: Position) {
        self.acked_offset.store(upto.offset, Ordering::Release);
        let mut q = self.unacked.lock().unwrap_or_else(|p| p.into_inner());
        while q.front().is_some_and(|(end, _)| *end <= upto) {
            q.pop_front();
        }
    }
}

/// What is in the spool and not yet drained, for pipeline health: read from
/// any thread while the writer and the reader work.
#[derive(Debug, Clone)]
pub struct Backlog(Arc<Shared>);

impl Backlog {
    /// Bytes committed and not yet acknowledged by the drain.
    pub fn bytes(&self) -> u64 {
        let on_disk = self.0.bytes.load(Ordering::Acquire);
        on_disk.saturating_sub(self.0.acked_offset.load(Ordering::Acquire))
    }

    /// When the oldest record not yet acknowledged was committed; `None`
    /// when everything committed is drained.
    pub fn oldest(&self) -> Option<SystemTime> {
        let q = self.0.unacked.lock().unwrap_or_else(|p| p.into_inner());
        q.front().map(|(_, at)| *at)
    }
}

/// Opens (recovering if needed) the spool in `opts.dir`, creating it when
/// missing. Returns the writer, the reader positioned at the acknowledged
/// cursor, and what recovery found.
pub fn open(opts: SpoolOptions) -> Result<(SpoolWriter, SpoolReader, Recovery), SpoolError> {
    std::fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir))?;
    let lock_path = opts.dir.join("LOCK");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(opts.dir.clone())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
    }
    let recovered = recovery::recover(&opts)?;
    let shared = Arc::new(Shared {
        committed: Mutex::new(recovered.write_at),
        changed: Condvar::new(),
        bytes: AtomicU64::new(recovered.bytes),
        writer_closed: AtomicBool::new(false),
        acked_offset: AtomicU64::new(recovered.report.cursor.offset),
        // What a crash left undrained counts as committed at this open.
        unacked: Mutex::new(
            (recovered.report.cursor < recovered.write_at)
                .then(|| (recovered.write_at, SystemTime::now()))
                .into_iter()
                .collect(),
        ),
        _lock: lock,
    });
    let writer = SpoolWriter::create(&opts, shared.clone(), recovered.write_at.segment)?;
    let reader = SpoolReader::new(&opts, shared, recovered.report.cursor);
    Ok((writer, reader, recovered.report))
}

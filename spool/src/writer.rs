//! The append side: frames records into a buffer and makes them durable in
//! groups, one write and one `fdatasync` per commit.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::{Position, Shared, SpoolError, SpoolOptions, dir, frame, io_err};

pub struct SpoolWriter {
    dir: PathBuf,
    shared: Arc<Shared>,
    segment_bytes: u64,
    max_bytes: u64,
    commit_interval: Duration,
    commit_records: usize,
    file: File,
    segment: u64,
    /// Durable length of the current segment.
    len: u64,
    buf: Vec<u8>,
    pending: usize,
    first_pending: Option<Instant>,
}

/// What became of an appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Append {
    /// Buffered; durable at the next commit.
    Buffered,
    /// Refused: the spool is at its size bound. The caller counts it.
    Full,
}

impl SpoolWriter {
    pub(crate) fn create(
        opts: &SpoolOptions,
        shared: Arc<Shared>,
        segment: u64,
    ) -> Result<Self, SpoolError> {
        let file = open_segment(&opts.dir, segment)?;
        Ok(Self {
            dir: opts.dir.clone(),
            shared,
            segment_bytes: opts.segment_bytes.max(1),
            max_bytes: opts.max_bytes,
            commit_interval: opts.commit_interval,
            commit_records: opts.commit_records.max(1),
            file,
            segment,
            len: 0,
            buf: Vec::with_capacity(256 << 10),
            pending: 0,
            first_pending: None,
        })
    }

    /// Buffers one record. Nothing is durable until [`commit`](Self::commit).
    pub fn append(&mut self, payload: &[u8]) -> Result<Append, SpoolError> {
        if payload.is_empty() || payload.len() > frame::MAX_PAYLOAD {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        let size = (frame::HEADER + payload.len()) as u64;
        let on_disk = self.shared.bytes.load(Ordering::Acquire);
        if on_disk + self.buf.len() as u64 + size > self.max_bytes {
            return Ok(Append::Full);
        }
        frame::encode(&mut self.buf, payload);
        self.pending += 1;
        self.first_pending.get_or_insert_with(Instant::now);
        Ok(Append::Buffered)
    }

    /// True when the buffered records should be committed now.
    pub fn commit_due(&self) -> bool {
        self.pending >= self.commit_records
            || self
                .first_pending
                .is_some_and(|t| t.elapsed() >= self.commit_interval)
    }

    /// How long until a commit is due (`None` when nothing is buffered).
    pub fn due_in(&self) -> Option<Duration> {
        self.first_pending
            .map(|t| self.commit_interval.saturating_sub(t.elapsed()))
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Writes and syncs the buffered records, then lets the reader see
    /// them. Returns how many records were committed.
    pub fn commit(&mut self) -> Result<usize, SpoolError> {
        if self.buf.is_empty() {
            return Ok(0);
        }
        let path = dir::segment_path(&self.dir, self.segment);
        self.file.write_all(&self.buf).map_err(io_err(&path))?;
        self.file.sync_data().map_err(io_err(&path))?;
        self.len += self.buf.len() as u64;
        self.shared
            .bytes
            .fetch_add(self.buf.len() as u64, Ordering::AcqRel);
        self.buf.clear();
        let committed = std::mem::take(&mut self.pending);
        self.first_pending = None;

        let mut end = Position {
            segment: self.segment,
            offset: self.len,
        };
        if self.len >= self.segment_bytes {
            // The new segment exists before the reader learns of it, so a
            // reader that sees a higher segment knows the old one is sealed.
            let next = self
                .segment
                .checked_add(1)
                .ok_or(SpoolError::SegmentsExhausted)?;
            self.file = open_segment(&self.dir, next)?;
            self.segment = next;
            self.len = 0;
            end = Position {
                segment: next,
                offset: 0,
            };
        }
        self.publish(end);
        self.shared.committed_at(end, std::time::SystemTime::now());
        Ok(committed)
    }

    fn publish(&self, end: Position) {
        let mut committed = self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *committed = end;
        drop(committed);
        self.shared.changed.notify_all();
    }

    /// Commits what is buffered and tells the reader no more will come.
    pub fn close(mut self) -> Result<usize, SpoolError> {
        let n = self.commit()?;
        self.shared.writer_closed.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        Ok(n)
    }

    /// What is committed and not yet drained.
    pub fn backlog(&self) -> crate::Backlog {
        crate::Backlog(self.shared.clone())
    }

    /// Bytes on disk in all segments.
    pub fn bytes_on_disk(&self) -> u64 {
        self.shared.bytes.load(Ordering::Acquire)
    }
}

fn open_segment(dir: &std::path::Path, segment: u64) -> Result<File, SpoolError> {
    let path = dir::segment_path(dir, segment);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    dir::sync_dir(dir)?;
    Ok(file)
}

//! The drain side: reads committed records in order, in batches, and saves
//! the cursor when the caller acknowledges a batch.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::frame::{self, Decoded};
use crate::{Position, Shared, SpoolError, SpoolOptions, dir, io_err};

/// Bytes read from a segment per read call.
const CHUNK: usize = 1 << 20;

pub struct SpoolReader {
    dir: PathBuf,
    shared: Arc<Shared>,
    /// Next record to read.
    pos: Position,
    /// Saved cursor: everything before it is drained.
    acked: Position,
    file: Option<(u64, File)>,
    buf: Vec<u8>,
    /// Records skipped because they were damaged after recovery.
    damaged: u64,
}

/// Consecutive records from `start` up to (not including) `end`.
#[derive(Debug, Default)]
pub struct Batch {
    pub start: Position,
    pub end: Position,
    data: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn records(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.spans.iter().map(|&(at, len)| &self.data[at..at + len])
    }
}

impl SpoolReader {
    pub(crate) fn new(opts: &SpoolOptions, shared: Arc<Shared>, cursor: Position) -> Self {
        Self {
            dir: opts.dir.clone(),
            shared,
            pos: cursor,
            acked: cursor,
            file: None,
            buf: Vec::new(),
            damaged: 0,
        }
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    pub fn acked(&self) -> Position {
        self.acked
    }

    /// Records found damaged while reading (after recovery, only outside
    /// interference can cause this).
    pub fn damaged(&self) -> u64 {
        self.damaged
    }

    /// End of the records committed so far.
    pub fn committed(&self) -> Position {
        *self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// True once the writer is closed and every record has been read.
    pub fn finished(&self) -> bool {
        self.shared.writer_closed.load(Ordering::Acquire) && self.pos >= self.committed()
    }

    /// Reads up to `max_records` committed records, waiting up to `wait`
    /// for the first one. An empty batch means none arrived in time.
    pub fn next_batch(&mut self, max_records: usize, wait: Duration) -> Result<Batch, SpoolError> {
        let deadline = Instant::now() + wait;
        let mut batch = Batch {
            start: self.pos,
            end: self.pos,
            ..Batch::default()
        };
        while batch.spans.len() < max_records.max(1) {
            let committed = self.wait_for_data(if batch.is_empty() {
                deadline
            } else {
                Instant::now()
            });
            if self.pos >= committed {
                break;
            }
            if !self.read_some(&mut batch, committed, max_records)? {
                break;
            }
        }
        batch.end = self.pos;
        Ok(batch)
    }

    /// Waits until records past the read position are committed, or until
    /// `deadline`; returns the committed end.
    fn wait_for_data(&self, deadline: Instant) -> Position {
        let mut committed = self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let now = Instant::now();
            if *committed > self.pos
                || now >= deadline
                || self.shared.writer_closed.load(Ordering::Acquire)
            {
                return *committed;
            }
            committed = match self.shared.changed.wait_timeout(committed, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Reads one chunk of the current segment into `batch`. Returns false
    /// when nothing more can be read now.
    fn read_some(
        &mut self,
        batch: &mut Batch,
        committed: Position,
        max_records: usize,
    ) -> Result<bool, SpoolError> {
        let sealed = self.pos.segment < committed.segment;
        if !self.open_current()? {
            // The segment is gone (removed by hand): move on.
            return Ok(next_segment(&self.dir, &mut self.pos, committed));
        }
        let Self {
            dir,
            pos,
            file,
            buf,
            damaged,
            ..
        } = self;
        let Some((_, file)) = file.as_ref() else {
            return Ok(false);
        };
        let path = dir::segment_path(dir, pos.segment);
        let limit = if sealed {
            file.metadata().map_err(io_err(&path))?.len()
        } else {
            committed.offset
        };
        if pos.offset >= limit {
            return Ok(sealed && next_segment(dir, pos, committed));
        }
        let available = usize::try_from(limit - pos.offset).unwrap_or(usize::MAX);
        let mut want = available.min(CHUNK);
        loop {
            buf.resize(want, 0);
            file.read_exact_at(buf, pos.offset).map_err(io_err(&path))?;
            let mut at = 0;
            let mut grow = false;
            while batch.spans.len() < max_records {
                match frame::decode(&buf[at..]) {
                    Decoded::Record { payload, size } => {
                        batch.spans.push((batch.data.len(), payload.len()));
                        batch.data.extend_from_slice(payload);
                        at += size;
                    }
                    Decoded::Incomplete if at == buf.len() => break,
                    Decoded::Incomplete if want < available => {
                        // A record straddles the chunk: read on from it,
                        // whole even when it is larger than a chunk.
                        grow = at == 0;
                        break;
                    }
                    Decoded::Incomplete | Decoded::Damaged(_) => {
                        // Committed bytes that do not frame: skip the rest
                        // of a sealed segment; an open one waits for repair.
                        *damaged += 1;
                        pos.offset += at as u64;
                        tracing::error!(position = %pos, "spool record damaged after recovery; skipping the rest of the segment");
                        return Ok(sealed && next_segment(dir, pos, committed));
                    }
                }
            }
            if grow {
                want = available.min(frame::HEADER + frame::MAX_PAYLOAD);
                continue;
            }
            pos.offset += at as u64;
            if sealed && pos.offset >= limit {
                next_segment(dir, pos, committed);
            }
            return Ok(at > 0);
        }
    }

    /// Opens the segment under the read position; false when it is gone.
    fn open_current(&mut self) -> Result<bool, SpoolError> {
        let segment = self.pos.segment;
        if self.file.as_ref().map(|(s, _)| *s) == Some(segment) {
            return Ok(true);
        }
        let path = dir::segment_path(&self.dir, segment);
        match File::open(&path) {
            Ok(f) => {
                self.file = Some((segment, f));
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.file = None;
                Ok(false)
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Saves the cursor at `upto` (a batch's `end`) and deletes the
    /// segments wholly before it. The cursor is saved first: a crash in
    /// between leaves segments that recovery removes.
    pub fn ack(&mut self, upto: Position) -> Result<(), SpoolError> {
        if upto <= self.acked {
            return Ok(());
        }
        dir::write_cursor(&self.dir, upto)?;
        for seg in dir::segments(&self.dir)?
            .into_iter()
            .take_while(|&s| s < upto.segment)
        {
            let path = dir::segment_path(&self.dir, seg);
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.shared.bytes.fetch_sub(
                        size.min(self.shared.bytes.load(Ordering::Acquire)),
                        Ordering::AcqRel,
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path)(e)),
            }
            if self.file.as_ref().is_some_and(|(s, _)| *s == seg) {
                self.file = None;
            }
        }
        self.acked = upto;
        self.shared.acked_to(upto);
        Ok(())
    }

    /// Goes back to the saved cursor, to replay what was not acknowledged.
    pub fn rewind(&mut self) {
        self.pos = self.acked;
    }

    /// Skips ahead to `pos` (progress known from elsewhere, e.g. files
    /// already published). Never moves backwards.
    pub fn skip_to(&mut self, pos: Position) {
        if pos > self.pos {
            self.pos = pos;
        }
    }
}

/// Moves `pos` to the next segment that exists, up to the committed one.
fn next_segment(dir: &std::path::Path, pos: &mut Position, committed: Position) -> bool {
    let next = dir::segments(dir)
        .ok()
        .and_then(|segs| segs.into_iter().find(|&s| s > pos.segment))
        .unwrap_or(committed.segment)
        .min(committed.segment);
    if next <= pos.segment {
        return false;
    }
    *pos = Position {
        segment: next,
        offset: 0,
    };
    true
}

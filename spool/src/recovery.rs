//! Opening a spool after any stop, clean or not.
//!
//! What a crash can leave, and what is done about it:
//! - a torn or damaged frame: the segment is cut at the last valid record
//!   (the records after a damaged one cannot be framed again);
//! - a missing or damaged cursor: replay from the oldest segment (the
//!   drain side removes duplicates by event id);
//! - a cursor naming a segment already deleted: continue at the next one;
//! - segments below the cursor (deleted after the cursor was saved): removed.
//!
//! Recovery always finishes; it reports what it dropped instead of failing.

use std::fs::{self, OpenOptions};
use std::io::Read;

use crate::dir::{self, Cursor};
use crate::frame::{self, Decoded};
use crate::{Position, SpoolError, SpoolOptions, io_err};

/// A stretch of a segment that recovery cut away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment: u64,
    /// Where the cut was made: the end of the last valid record.
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: &'static str,
}

/// What opening the spool found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Where reading resumes.
    pub cursor: Position,
    /// Records waiting to be drained.
    pub backlog_records: u64,
    pub damage: Vec<Damage>,
    /// Set when the cursor file was missing (`None` on a brand-new spool),
    /// damaged, or pointed at a segment that is gone.
    pub cursor_note: Option<String>,
}

impl Recovery {
    /// Logs what recovery found, loudly when something was dropped.
    pub fn log(&self) {
        if let Some(note) = &self.cursor_note {
            tracing::warn!(cursor = %self.cursor, "spool cursor: {note}");
        }
        for d in &self.damage {
            tracing::error!(
                segment = d.segment,
                offset = d.offset,
                bytes_dropped = d.bytes_dropped,
                reason = d.reason,
                "spool damage: segment cut at its last valid record"
            );
        }
        if self.backlog_records > 0 {
            tracing::info!(
                backlog = self.backlog_records,
                from = %self.cursor,
                "spool holds records from before the last stop; they drain first"
            );
        }
    }
}

pub(crate) struct Recovered {
    pub report: Recovery,
    /// Where the writer starts: a fresh segment after every existing one.
    pub write_at: Position,
    pub bytes: u64,
}

pub(crate) fn recover(opts: &SpoolOptions) -> Result<Recovered, SpoolError> {
    let d = opts.dir.as_path();
    fs::create_dir_all(d).map_err(io_err(d))?;
    let _ = fs::remove_file(d.join("cursor.tmp"));
    let segments = dir::segments(d)?;
    let mut report = Recovery::default();

    let first = segments.first().copied();
    let mut cursor = match dir::read_cursor(d)? {
        Cursor::At(p) => p,
        Cursor::Missing => {
            if first.is_some() {
                report.cursor_note = Some("missing; replaying from the oldest segment".into());
            }
            Position {
                segment: first.unwrap_or(0),
                offset: 0,
            }
        }
        Cursor::Damaged => {
            report.cursor_note = Some("damaged; replaying from the oldest segment".into());
            Position {
                segment: first.unwrap_or(0),
                offset: 0,
            }
        }
    };
    if !segments.contains(&cursor.segment) {
        // The cursor's segment is gone: it was fully drained and deleted
        // before the cursor moved past it. Continue at the next one.
        let next = segments.iter().copied().find(|&s| s > cursor.segment);
        if !segments.is_empty() || cursor.offset != 0 {
            report.cursor_note = Some(format!(
                "segment {} is gone; continuing at the next segment",
                cursor.segment
            ));
        }
        cursor = Position {
            segment: next.unwrap_or(cursor.segment),
            offset: 0,
        };
    }

    let mut bytes = 0u64;
    let mut last = None;
    for &seg in &segments {
        let path = dir::segment_path(d, seg);
        if seg < cursor.segment {
            // Drained; the crash came between saving the cursor and deleting.
            fs::remove_file(&path).map_err(io_err(&path))?;
            continue;
        }
        let start = if seg == cursor.segment {
            cursor.offset
        } else {
            0
        };
        let (valid_end, records, damage) = scan(&path, seg, start)?;
        if let Some(damage) = damage {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_len(valid_end).map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
            report.damage.push(damage);
        }
        if seg == cursor.segment && cursor.offset > valid_end {
            report.cursor_note = Some(format!(
                "offset {} is past the segment's valid end {valid_end}; moved back",
                cursor.offset
            ));
            cursor.offset = valid_end;
        }
        report.backlog_records += records;
        bytes += valid_end;
        last = Some(seg);
    }
    dir::sync_dir(d)?;
    report.cursor = cursor;
    let write_segment = last.map_or(cursor.segment, |s| s.saturating_add(1));
    Ok(Recovered {
        report,
        write_at: Position {
            segment: write_segment.max(cursor.segment),
            offset: 0,
        },
        bytes,
    })
}

/// Reads the frames of one segment from `start`; returns the end of the
/// last valid record, the number of valid records and the damage if any.
fn scan(
    path: &std::path::Path,
    segment: u64,
    start: u64,
) -> Result<(u64, u64, Option<Damage>), SpoolError> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let total = bytes.len() as u64;
    let mut at = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let mut records = 0;
    loop {
        if at == bytes.len() {
            return Ok((at as u64, records, None));
        }
        let reason = match frame::decode(&bytes[at..]) {
            Decoded::Record { size, .. } => {
                at += size;
                records += 1;
                continue;
            }
            Decoded::Incomplete => "torn record at the end of the segment",
            Decoded::Damaged(why) => why,
        };
        let end = at as u64;
        return Ok((
            end,
            records,
            Some(Damage {
                segment,
                offset: end,
                bytes_dropped: total - end,
                reason,
            }),
        ));
    }
}

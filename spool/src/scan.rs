//! Reading every intact record of a spool directory without taking it:
//! for a process that needs what is spooled but not yet drained (budgets
//! rebuilt from the ledger on start) while the reader stays the drain's.

use std::path::Path;

use crate::frame::{self, Decoded};
use crate::{SpoolError, dir, io_err};

/// Calls `each` with every record of every segment in `dir`, oldest
/// first, stopping in a segment at its first torn or damaged frame (the
/// writer's recovery deals with those). A segment removed while it is
/// read (drained meanwhile) is skipped. Returns how many records.
pub fn scan(dir: &Path, mut each: impl FnMut(&[u8])) -> Result<u64, SpoolError> {
    if !dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for segment in dir::segments(dir)? {
        let path = dir::segment_path(dir, segment);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut at = 0;
        while let Decoded::Record { payload, size } = frame::decode(&bytes[at..]) {
            each(payload);
            n += 1;
            at += size;
        }
    }
    Ok(n)
}

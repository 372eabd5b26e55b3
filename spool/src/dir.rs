//! Files of a spool directory: segment names, listing, the cursor file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Position, SpoolError, io_err};

const SEGMENT_EXT: &str = "seg";
const CURSOR: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";

pub fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.{SEGMENT_EXT}"))
}

/// Segment numbers present in `dir`, ascending (by number, not by name).
pub fn segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_suffix(".seg")
            .and_then(|stem| stem.parse::<u64>().ok())
        {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

pub fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The cursor as 20 bytes: segment, offset (u64 LE each) and a CRC-32C.
fn encode_cursor(p: Position) -> [u8; 20] {
    let mut buf = [0u8; 20];
    buf[..8].copy_from_slice(&p.segment.to_le_bytes());
    buf[8..16].copy_from_slice(&p.offset.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..16]);
    buf[16..].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// What the cursor file holds.
pub enum Cursor {
    Missing,
    Damaged,
    At(Position),
}

pub fn read_cursor(dir: &Path) -> Result<Cursor, SpoolError> {
    let path = dir.join(CURSOR);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursor::Missing),
        Err(e) => return Err(io_err(path)(e)),
    };
    let Ok(raw) = <[u8; 20]>::try_from(bytes.as_slice()) else {
        return Ok(Cursor::Damaged);
    };
    let crc = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]);
    if crc32c::crc32c(&raw[..16]) != crc {
        return Ok(Cursor::Damaged);
    }
    let mut seg = [0u8; 8];
    let mut off = [0u8; 8];
    seg.copy_from_slice(&raw[..8]);
    off.copy_from_slice(&raw[8..16]);
    Ok(Cursor::At(Position {
        segment: u64::from_le_bytes(seg),
        offset: u64::from_le_bytes(off),
    }))
}

/// Saves the cursor atomically: write a temporary file, sync it, rename it
/// over the old one, sync the directory.
pub fn write_cursor(dir: &Path, p: Position) -> Result<(), SpoolError> {
    let tmp = dir.join(CURSOR_TMP);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&encode_cursor(p)).map_err(io_err(&tmp))?;
    f.sync_data().map_err(io_err(&tmp))?;
    fs::rename(&tmp, dir.join(CURSOR)).map_err(io_err(dir))?;
    sync_dir(dir)
}

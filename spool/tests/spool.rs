//! The spool's promises: committed records survive, unacknowledged ones
//! replay, damage is cut and reported, and recovery always finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_spool::{Append, Position, SpoolOptions, SpoolReader, open};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-spool-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn small(dir: &Path) -> SpoolOptions {
    SpoolOptions {
        segment_bytes: 1000,
        ..SpoolOptions::new(dir)
    }
}

fn record(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 50)).into_bytes()
}

/// Reads everything committed, without acknowledging.
fn drain(reader: &mut SpoolReader) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let batch = reader.next_batch(100, Duration::ZERO).unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch.records().map(<[u8]>::to_vec));
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_round_trip_across_segments_and_restarts() {
    let dir = scratch("roundtrip");
    let (mut w, mut r, rec) = open(small(&dir)).unwrap();
    assert_eq!(rec.backlog_records, 0);
    assert!(rec.cursor_note.is_none());
    for i in 0..200 {
        assert_eq!(w.append(&record(i)).unwrap(), Append::Buffered);
        if i % 7 == 0 {
            w.commit().unwrap();
        }
    }
    w.commit().unwrap();
    assert!(segments(&dir).len() > 5, "small segments roll over");
    let got = drain(&mut r);
    assert_eq!(got, (0..200).map(record).collect::<Vec<_>>());

    // Acknowledge half: the rest replays after a restart, nothing else.
    let mut r2 = r;
    r2.rewind();
    let first = r2.next_batch(100, Duration::ZERO).unwrap();
    assert_eq!(first.len(), 100);
    r2.ack(first.end).unwrap();
    drop((w, r2));
    let (_w, mut r, rec) = open(small(&dir)).unwrap();
    assert_eq!(rec.backlog_records, 100);
    assert!(rec.damage.is_empty());
    assert_eq!(drain(&mut r), (100..200).map(record).collect::<Vec<_>>());
}

#[test]
fn one_process_at_a_time() {
    let dir = scratch("lock");
    let held = open(small(&dir)).unwrap();
    assert!(matches!(
        open(small(&dir)),
        Err(tollgate_spool::SpoolError::Locked(_))
    ));
    drop(held);
    assert!(open(small(&dir)).is_ok());
}

#[test]
fn uncommitted_records_are_neither_visible_nor_kept() {
    let dir = scratch("uncommitted");
    let (mut w, mut r, _) = open(small(&dir)).unwrap();
    w.append(b"one").unwrap();
    w.commit().unwrap();
    w.append(b"two").unwrap();
    assert_eq!(drain(&mut r), vec![b"one".to_vec()]);
    drop((w, r)); // a crash: "two" was never committed
    let (_w, mut r, _) = open(small(&dir)).unwrap();
    assert_eq!(drain(&mut r), vec![b"one".to_vec()]);
}

#[test]
fn acknowledged_segments_are_deleted_and_the_size_bound_holds() {
    let dir = scratch("bound");
    let opts = SpoolOptions {
        segment_bytes: 500,
        max_bytes: 2000,
        ..SpoolOptions::new(&dir)
    };
    let (mut w, mut r, _) = open(opts).unwrap();
    let mut full = 0;
    for i in 0..100 {
        if w.append(&record(i)).unwrap() == Append::Full {
            full += 1;
        }
        w.commit().unwrap();
    }
    assert!(full > 0, "the bound refuses records");
    assert!(w.bytes_on_disk() <= 2000);
    let batch = r.next_batch(1000, Duration::ZERO).unwrap();
    assert_eq!(batch.len(), 100 - full);
    r.ack(batch.end).unwrap();
    assert!(segments(&dir).len() <= 2, "{:?}", segments(&dir));
    assert!(w.bytes_on_disk() < 500);
    assert_eq!(w.append(b"room again").unwrap(), Append::Buffered);
}

fn append_raw(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

fn last_segment_with_data(dir: &Path) -> PathBuf {
    segments(dir)
        .into_iter()
        .rev()
        .find(|p| fs::metadata(p).unwrap().len() > 0)
        .unwrap()
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let dir = scratch("torn");
    let (mut w, r, _) = open(SpoolOptions::new(&dir)).unwrap();
    for i in 0..10 {
        w.append(&record(i)).unwrap();
    }
    w.commit().unwrap();
    drop((w, r));
    let seg = last_segment_with_data(&dir);
    let len = fs::metadata(&seg).unwrap().len();
    // Half of the last record is lost in the crash.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();

    let (mut w, mut r, rec) = open(SpoolOptions::new(&dir)).unwrap();
    assert_eq!(rec.damage.len(), 1, "{rec:?}");
    assert_eq!(
        rec.damage[0].reason,
        "torn record at the end of the segment"
    );
    assert_eq!(rec.backlog_records, 9);
    assert_eq!(drain(&mut r), (0..9).map(record).collect::<Vec<_>>());
    // Writing goes on after the cut.
    w.append(b"after").unwrap();
    w.commit().unwrap();
    assert_eq!(drain(&mut r), vec![b"after".to_vec()]);
}

#[test]
fn a_flipped_bit_cuts_at_the_last_valid_record() {
    let dir = scratch("flip");
    let (mut w, r, _) = open(SpoolOptions::new(&dir)).unwrap();
    for i in 0..10 {
        w.append(&record(i)).unwrap();
    }
    w.commit().unwrap();
    drop((w, r));
    let seg = last_segment_with_data(&dir);
    let mut bytes = fs::read(&seg).unwrap();
    // The fifth record's checksum (records 0..4 stay valid).
    let fifth: usize = (0..4).map(|i| 8 + record(i).len()).sum();
    bytes[fifth + 5] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();

    let (_w, mut r, rec) = open(SpoolOptions::new(&dir)).unwrap();
    assert_eq!(rec.damage[0].reason, "checksum mismatch");
    assert_eq!(rec.damage[0].offset, fifth as u64);
    assert_eq!(
        rec.damage[0].bytes_dropped,
        (bytes.len() - fifth) as u64,
        "the report says what was dropped"
    );
    assert_eq!(drain(&mut r), (0..4).map(record).collect::<Vec<_>>());
}

#[test]
fn zeroed_space_is_not_a_record() {
    let dir = scratch("zeros");
    let (mut w, r, _) = open(SpoolOptions::new(&dir)).unwrap();
    w.append(b"kept").unwrap();
    w.commit().unwrap();
    drop((w, r));
    append_raw(&last_segment_with_data(&dir), &[0u8; 4096]);
    let (_w, mut r, rec) = open(SpoolOptions::new(&dir)).unwrap();
    assert_eq!(rec.damage[0].reason, "zero-length frame");
    assert_eq!(rec.damage[0].bytes_dropped, 4096);
    assert_eq!(drain(&mut r), vec![b"kept".to_vec()]);
}

#[test]
fn a_cursor_on_a_deleted_segment_continues_at_the_next() {
    let dir = scratch("gone");
    let (mut w, mut r, _) = open(small(&dir)).unwrap();
    for i in 0..60 {
        w.append(&record(i)).unwrap();
        w.commit().unwrap();
    }
    // Acknowledge into the first segment, then delete it as a drain that
    // crashed before saving the cursor would have.
    let batch = r.next_batch(3, Duration::ZERO).unwrap();
    r.ack(batch.end).unwrap();
    drop((w, r));
    let segs = segments(&dir);
    let first_seg_records = {
        let (_w, mut r, _) = open(small(&dir)).unwrap();
        let all = drain(&mut r);
        57 - all.len()
    };
    assert_eq!(first_seg_records, 0);
    fs::remove_file(&segs[0]).unwrap();

    let (_w, mut r, rec) = open(small(&dir)).unwrap();
    assert!(
        rec.cursor_note.as_deref().unwrap_or("").contains("is gone"),
        "{rec:?}"
    );
    let rest = drain(&mut r);
    assert!(!rest.is_empty());
    assert_eq!(rest.last().unwrap(), &record(59));
}

#[test]
fn segments_behind_the_cursor_are_removed_on_open() {
    let dir = scratch("behind");
    let (mut w, mut r, _) = open(small(&dir)).unwrap();
    for i in 0..60 {
        w.append(&record(i)).unwrap();
        w.commit().unwrap();
    }
    let all = r.next_batch(1000, Duration::ZERO).unwrap();
    drop((w, r));
    let before = segments(&dir).len();
    // A cursor saved at the end, old segments not yet deleted.
    write_cursor(&dir, all.end);
    let (_w, mut r, rec) = open(small(&dir)).unwrap();
    assert_eq!(rec.backlog_records, 0);
    assert!(segments(&dir).len() < before);
    assert!(drain(&mut r).is_empty());
}

/// Writes a cursor file by hand, in the documented format (segment and
/// offset as u64 LE, then their CRC-32C), as a crashed process left it.
fn write_cursor(dir: &Path, cursor: Position) {
    let mut raw = Vec::new();
    raw.extend_from_slice(&cursor.segment.to_le_bytes());
    raw.extend_from_slice(&cursor.offset.to_le_bytes());
    let crc = crc32c_of(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    fs::write(dir.join("cursor"), raw).unwrap();
}

/// CRC-32C, bit by bit: an independent check of the cursor format.
fn crc32c_of(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

#[test]
fn a_damaged_cursor_replays_from_the_oldest_segment() {
    let dir = scratch("badcursor");
    let (mut w, mut r, _) = open(small(&dir)).unwrap();
    for i in 0..20 {
        w.append(&record(i)).unwrap();
    }
    w.commit().unwrap();
    let b = r.next_batch(5, Duration::ZERO).unwrap();
    r.ack(b.end).unwrap();
    drop((w, r));
    let mut cursor = fs::read(dir.join("cursor")).unwrap();
    cursor[3] ^= 1;
    fs::write(dir.join("cursor"), cursor).unwrap();
    let (_w, mut r, rec) = open(small(&dir)).unwrap();
    assert!(rec.cursor_note.as_deref().unwrap_or("").contains("damaged"));
    assert_eq!(drain(&mut r).len(), 20, "replays everything it still has");
}

#[test]
fn a_reader_wakes_when_the_writer_commits() {
    let dir = scratch("wake");
    let (mut w, mut r, _) = open(SpoolOptions::new(&dir)).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        while got < 1000 {
            got += r.next_batch(10_000, Duration::from_secs(10)).unwrap().len();
        }
        got
    });
    for i in 0..1000 {
        w.append(&record(i)).unwrap();
        if w.commit_due() || i % 100 == 99 {
            w.commit().unwrap();
        }
    }
    w.close().unwrap();
    assert_eq!(reader.join().unwrap(), 1000);
}

/// Production sizes: the default 64 MiB segment rolls over, large segment
/// numbers order numerically, and a record larger than the read chunk reads.
#[test]
fn production_limits() {
    let dir = scratch("limits");
    fs::create_dir_all(&dir).unwrap();
    // Start near the top of the segment counter's 20-digit names.
    write_cursor(
        &dir,
        Position {
            segment: 99_999_999_999_999_999,
            offset: 0,
        },
    );

    let opts = SpoolOptions::new(&dir);
    let (mut w, mut r, _) = open(opts.clone()).unwrap();
    let payload = vec![b'e'; 1024];
    let big = vec![b'b'; 3 << 20];
    let n = 70 * 1024; // 70 MiB of 1 KiB records: past one segment
    for i in 0..n {
        w.append(if i == 1000 { &big } else { &payload }).unwrap();
        if w.pending() >= 1024 {
            w.commit().unwrap();
        }
    }
    w.commit().unwrap();
    let segs = segments(&dir);
    assert!(segs.len() >= 2, "{segs:?}");
    assert!(segs[0].to_str().unwrap().contains("99999999999999999"));

    let mut seen = 0;
    let mut end = Position::default();
    loop {
        let b = r.next_batch(50_000, Duration::ZERO).unwrap();
        if b.is_empty() {
            break;
        }
        for (i, rec) in b.records().enumerate() {
            let want = if seen + i == 1000 { big.len() } else { 1024 };
            assert_eq!(rec.len(), want);
        }
        seen += b.len();
        end = b.end;
    }
    assert_eq!(seen, n);
    r.ack(end).unwrap();
    assert_eq!(segments(&dir).len(), 1, "drained segments are deleted");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn the_backlog_is_what_is_committed_and_not_acknowledged() {
    let dir = scratch("backlog");
    let (mut w, mut r, _) = open(small(&dir)).unwrap();
    let backlog = w.backlog();
    assert_eq!((backlog.bytes(), backlog.oldest()), (0, None));
    for i in 0..60 {
        w.append(&record(i)).unwrap();
    }
    assert_eq!(backlog.bytes(), 0, "buffered is not committed");
    let before = std::time::SystemTime::now();
    w.commit().unwrap();
    let first = backlog.oldest().unwrap();
    assert!(first >= before);
    assert!(backlog.bytes() > 1000, "spans segments");
    for i in 60..80 {
        w.append(&record(i)).unwrap();
    }
    w.commit().unwrap();
    let batch = r.next_batch(60, Duration::ZERO).unwrap();
    r.ack(batch.end).unwrap();
    let after_half = backlog.bytes();
    assert!(
        after_half > 0 && backlog.oldest().unwrap() > first,
        "the first commit is drained"
    );
    let rest = r.next_batch(1000, Duration::ZERO).unwrap();
    r.ack(rest.end).unwrap();
    assert_eq!((backlog.bytes(), backlog.oldest()), (0, None));
    // The gauge holds the spool open, as the writer and the reader do.
    drop((w, r, backlog));
    // Left undrained by a crash: counted from the open.
    let (mut w, _r, _) = open(small(&dir)).unwrap();
    w.append(&record(1)).unwrap();
    w.commit().unwrap();
    drop((w, _r));
    let (w, _r, _) = open(small(&dir)).unwrap();
    assert!(w.backlog().bytes() > 0 && w.backlog().oldest().is_some());
}

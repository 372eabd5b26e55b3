//! The SSE parser on arbitrary bytes, split at arbitrary points: it must
//! never panic, and the events must not depend on where the splits fall.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_collector::relay::sse::Parser;

fn events(pieces: &[&[u8]]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut p = Parser::new(1 << 16);
    let mut out = Vec::new();
    for piece in pieces {
        p.push(piece);
        loop {
            match p.next_event() {
                Ok(Some(e)) => out.push((e.raw.to_vec(), e.data.map(|d| d.to_vec()))),
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    if let Some(e) = p.finish() {
        out.push((e.raw.to_vec(), e.data.map(|d| d.to_vec())));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else { return };
    let at = (cut as usize).min(body.len());
    let whole = events(&[body]);
    let split = events(&[&body[..at], &body[at..]]);
    if body.len() < (1 << 16) {
        assert_eq!(whole, split);
    }
});

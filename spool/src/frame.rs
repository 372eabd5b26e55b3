//! The record frame: `len: u32 LE | crc: u32 LE | payload[len]`, where
//! `crc` is CRC-32C over the length bytes and the payload, so a flipped bit
//! in either is caught. A zero length is never written: zeroed space (a
//! preallocated or torn tail) can never pass for a record.

pub const HEADER: usize = 8;
/// Larger frames are taken for damage; no usage event comes near this.
pub const MAX_PAYLOAD: usize = 16 << 20;

pub fn checksum(len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

/// Appends one frame holding `payload` to `out`.
pub fn encode(out: &mut Vec<u8>, payload: &[u8]) {
    debug_assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD);
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What is at the start of `buf`.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, valid frame of `size` bytes (header included).
    Record { payload: &'a [u8], size: usize },
    /// Fewer bytes than the frame claims: more may still come (or, at the
    /// end of a file after a crash, a torn tail).
    Incomplete,
    /// Not a valid frame.
    Damaged(&'static str),
}

pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER {
        return Decoded::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 {
        return Decoded::Damaged("zero-length frame");
    }
    if len as usize > MAX_PAYLOAD {
        return Decoded::Damaged("frame length out of range");
    }
    let size = HEADER + len as usize;
    if buf.len() < size {
        return Decoded::Incomplete;
    }
    let payload = &buf[HEADER..size];
    if checksum(len, payload) != crc {
        return Decoded::Damaged("checksum mismatch");
    }
    Decoded::Record { payload, size }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_decodes_to_its_payload() {
        let mut buf = Vec::new();
        encode(&mut buf, b"hello");
        assert_eq!(
            decode(&buf),
            Decoded::Record {
                payload: b"hello",
                size: 13
            }
        );
        assert_eq!(decode(&buf[..12]), Decoded::Incomplete);
        assert_eq!(decode(&[0u8; 64]), Decoded::Damaged("zero-length frame"));
    }

    proptest! {
        /// Any single flipped bit in a frame is caught, never misread.
        #[test]
        fn a_flipped_bit_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..300), bit in any::<usize>()) {
            let mut buf = Vec::new();
            encode(&mut buf, &payload);
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            match decode(&buf) {
                Decoded::Record { payload: p, .. } => prop_assert!(false, "damaged frame accepted: {:?}", p),
                Decoded::Incomplete | Decoded::Damaged(_) => {}
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&buf);
        }
    }
}

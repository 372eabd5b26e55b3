//! An incremental parser for `text/event-stream` bodies.
//!
//! Upstream bytes arrive split anywhere (mid-line, mid-UTF-8). The parser
//! holds only the unfinished tail and hands out each complete event as the
//! exact bytes received (so it can be relayed untouched) plus its `data`
//! payload (a zero-copy slice in the usual one-line case).

use bytes::{Bytes, BytesMut};

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event as received, blank-line terminator included.
    pub raw: Bytes,
    /// The `data` field, lines joined by `\n`; `None` for comments and
    /// events without data.
    pub data: Option<Bytes>,
    /// The `event` field (the event type), when the upstream named one.
    pub name: Option<Bytes>,
}

impl Event {
    fn new(raw: Bytes) -> Self {
        let (data, name) = fields(&raw);
        Event { raw, data, name }
    }

    /// Whether the upstream typed this event `error`.
    pub fn is_error(&self) -> bool {
        self.name.as_deref() == Some(b"error")
    }

    /// Where byte `at` of `data` sits in `raw`. A value inside one JSON
    /// token never spans data lines, so a span that starts here continues
    /// on the same line.
    pub fn raw_position(&self, at: usize) -> Option<usize> {
        let data = self.data.as_ref()?;
        let base = self.raw.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize).checked_sub(base);
        if offset(data).is_some_and(|o| o + data.len() <= self.raw.len()) {
            return offset(data).map(|o| o + at);
        }
        let mut start = 0;
        for line in data_lines(&self.raw) {
            if at < start + line.len() {
                return offset(line).map(|o| o + at - start);
            }
            start += line.len() + 1;
        }
        None
    }
}

#[derive(Debug, Default)]
pub struct Parser {
    buf: BytesMut,
    /// Bytes of `buf` already scanned without finding an event's end.
    scanned: usize,
    /// Longest event the parser accepts before it reports an overflow.
    max_event_bytes: usize,
    /// Whether the start of the stream was checked for a byte order mark.
    bom_checked: bool,
}

/// A UTF-8 byte order mark, which the SSE standard strips from the start
/// of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an event exceeded {0} bytes without ending")]
pub struct Overflow(pub usize);

impl Parser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max_event_bytes,
            bom_checked: false,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received that do not yet form a complete event.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete event, if the buffer holds one.
    pub fn next_event(&mut self) -> Result<Option<Event>, Overflow> {
        if !self.bom_checked {
            if BOM.starts_with(&self.buf) {
                return Ok(None); // too few bytes to tell yet
            }
            self.skip_bom();
        }
        match find_event_end(&self.buf, self.scanned.saturating_sub(3)) {
            Some(end) => {
                self.scanned = 0;
                Ok(Some(Event::new(self.buf.split_to(end).freeze())))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_event_bytes {
                    return Err(Overflow(self.max_event_bytes));
                }
                Ok(None)
            }
        }
    }

    /// What is left when the body ends: an event whose terminator never came.
    pub fn finish(&mut self) -> Option<Event> {
        if !self.bom_checked {
            self.skip_bom();
        }
        self.scanned = 0;
        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            self.buf.clear();
            return None;
        }
        Some(Event::new(self.buf.split().freeze()))
    }
}

impl Parser {
    fn skip_bom(&mut self) {
        self.bom_checked = true;
        if self.buf.starts_with(BOM) || BOM.starts_with(&self.buf) {
            let n = self.buf.len().min(BOM.len());
            let _ = self.buf.split_to(n);
        }
    }
}

/// Index just past the blank line that ends the first event, searching from
/// `from`. Lines end in `\n`, `\r\n` or `\r`.
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from.min(buf.len());
    while let Some(off) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
        let eol = i + off;
        let next = match buf[eol] {
            b'\r' if buf.get(eol + 1) == Some(&b'\n') => eol + 2,
            // A lone `\r` at the very end may be the first half of `\r\n`.
            b'\r' if eol + 1 == buf.len() => return None,
            _ => eol + 1,
        };
        // Is the line that starts at `next` empty?
        match buf.get(next) {
            Some(b'\n') => return Some(next + 1),
            Some(b'\r') => match buf.get(next + 1) {
                Some(b'\n') => return Some(next + 2),
                Some(_) => return Some(next + 1),
                None => return None,
            },
            Some(_) => i = next,
            None => return None,
        }
    }
    None
}

/// The lines of `raw`, each ended by `\n`, `\r\n` or `\r`.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match memchr::memchr2(b'\n', b'\r', rest) {
            Some(i) if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') => (&rest[..i], i + 2),
            Some(i) => (&rest[..i], i + 1),
            None => (rest, rest.len()),
        };
        rest = &rest[next..];
        Some(line)
    })
}

/// A line's field name and value (one leading space dropped); a comment
/// has the empty name.
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b':', line) {
        Some(i) => {
            let value = &line[i + 1..];
            (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &line[..0]),
    }
}

/// The values of the `data` lines of `raw`, in order.
fn data_lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    lines(raw).filter_map(|line| match field(line) {
        (b"data", value) => Some(value),
        _ => None,
    })
}

/// The `data` field (lines joined by `\n`) and the `event` field, in one
/// pass over the lines.
fn fields(raw: &Bytes) -> (Option<Bytes>, Option<Bytes>) {
    let mut name = None;
    let mut first: Option<&[u8]> = None;
    let mut joined: Option<Vec<u8>> = None;
    for line in lines(raw) {
        match field(line) {
            (b"data", value) => match (first, joined.as_mut()) {
                (None, _) => first = Some(value),
                (Some(f), None) => {
                    let mut j = Vec::with_capacity(f.len() + value.len() + 1);
                    j.extend_from_slice(f);
                    j.push(b'\n');
                    j.extend_from_slice(value);
                    joined = Some(j);
                }
                (Some(_), Some(j)) => {
                    j.push(b'\n');
                    j.extend_from_slice(value);
                }
            },
            (b"event", value) => name = Some(value),
            _ => {}
        }
    }
    let data = match joined {
        Some(j) => Some(Bytes::from(j)),
        None => first.map(|f| raw.slice_ref(f)),
    };
    (data, name.map(|n| raw.slice_ref(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_events(p: &mut Parser) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = p.next_event().unwrap() {
            out.push(e);
        }
        out
    }

    fn parse_whole(input: &[u8]) -> Vec<Event> {
        let mut p = Parser::new(1 << 20);
        p.push(input);
        let mut out = all_events(&mut p);
        out.extend(p.finish());
        out
    }

    #[test]
    fn events_in_all_line_ending_styles() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"data: a\n\ndata: b\n\n", &["a", "b"]),
            (b"data: a\r\n\r\ndata: b\r\n\r\n", &["a", "b"]),
            (b"data: a\r\rdata: b\r\r", &["a", "b"]),
            (b"data:a\ndata: b\n\n", &["a\nb"]),
            (b": keepalive\n\ndata: x\n\n", &["x"]),
            (b"event: ping\ndata: {}\nid: 1\n\n", &["{}"]),
        ];
        for (input, want) in cases {
            let got: Vec<String> = parse_whole(input)
                .iter()
                .filter_map(|e| {
                    e.data
                        .as_ref()
                        .map(|d| String::from_utf8_lossy(d).into_owned())
                })
                .collect();
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn raw_bytes_are_kept_exactly() {
        let input = b"data: {\"a\":1}\r\n\r\n: c\n\n";
        let events = parse_whole(input);
        let joined: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(joined, input);
        assert_eq!(events[1].data, None);
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_stripped_however_it_is_split() {
        let input = b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n";
        for cut in 0..=input.len() {
            let mut p = Parser::new(1024);
            let mut events = Vec::new();
            for piece in [&input[..cut], &input[cut..]] {
                p.push(piece);
                events.extend(all_events(&mut p));
            }
            events.extend(p.finish());
            assert_eq!(
                events[0].raw,
                Bytes::from_static(b"data: a\n\n"),
                "cut at {cut}"
            );
            assert_eq!(events[0].data.as_deref(), Some(&b"a"[..]));
            assert_eq!(events.len(), 2, "only the stream's first BOM is stripped");
        }
        let mut lone = Parser::new(16);
        lone.push(b"\xEF\xBB");
        assert!(lone.next_event().unwrap().is_none() && lone.finish().is_none());
    }

    #[test]
    fn the_event_type_is_read() {
        let events = parse_whole(b"event: error\ndata: {}\n\nevent:ping\n\ndata: x\n\n");
        assert!(events[0].is_error());
        assert_eq!(events[1].name.as_deref(), Some(&b"ping"[..]));
        assert_eq!(events[2].name, None);
    }

    #[test]
    fn data_positions_map_back_to_the_raw_event() {
        let cases: &[&[u8]] = &[
            b"data: {\"model\":\"m\"}\n\n",
            b"id: 7\nevent: chunk\ndata:{\"model\":\"m\"}\r\n\r\n",
            b": c\ndata: {\ndata: \"a\": 1,\nretry: 10\ndata:  \"model\" : \"m\"\ndata: }\n\n",
        ];
        for raw in cases {
            let ev = &parse_whole(raw)[0];
            let data = ev.data.as_ref().unwrap();
            let at = memchr::memmem::find(data, b"\"m\"").unwrap();
            let pos = ev.raw_position(at).unwrap();
            assert_eq!(
                &ev.raw[pos..pos + 3],
                b"\"m\"",
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn an_unterminated_tail_is_returned_by_finish() {
        let mut p = Parser::new(1024);
        p.push(b"data: a\n\ndata: partial");
        assert_eq!(all_events(&mut p).len(), 1);
        let tail = p.finish().unwrap();
        assert_eq!(tail.data.as_deref(), Some(&b"partial"[..]));
        assert!(p.finish().is_none());
    }

    #[test]
    fn the_parser_is_usable_after_finish() {
        let mut p = Parser::new(1024);
        p.push(b"data: a long unterminated event without its blank line");
        assert!(p.next_event().unwrap().is_none());
        assert!(p.finish().is_some());
        assert!(p.next_event().unwrap().is_none(), "no stale scan position");
        p.push(b"data: b\n\n");
        assert_eq!(
            p.next_event().unwrap().unwrap().data.as_deref(),
            Some(&b"b"[..])
        );
    }

    #[test]
    fn oversized_events_are_reported_not_buffered_forever() {
        let mut p = Parser::new(16);
        p.push(&[b'x'; 64]);
        assert_eq!(p.next_event(), Err(Overflow(16)));
    }

    #[test]
    fn a_split_crlf_is_not_mistaken_for_two_line_ends() {
        let mut p = Parser::new(1024);
        p.push(b"data: a\r\n\r");
        assert!(p.next_event().unwrap().is_none());
        p.push(b"\ndata: b\r\n\r\n");
        let events = all_events(&mut p);
        assert_eq!(events.len(), 2);
        assert_eq!(&events[0].raw[..], b"data: a\r\n\r\n");
    }

    fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
        let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        let event = (
            proptest::collection::vec("[ -~é😀]{0,20}", 0..3),
            line_end,
            any::<bool>(),
        )
            .prop_map(|(lines, eol, comment)| {
                let mut s = String::new();
                if comment {
                    s.push_str(": note");
                    s.push_str(eol);
                }
                for l in lines {
                    s.push_str("data: ");
                    s.push_str(&l.replace(['\r', '\n'], ""));
                    s.push_str(eol);
                }
                s.push_str(eol);
                s
            });
        proptest::collection::vec(event, 0..8).prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(input in stream_strategy(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12)) {
            let whole = parse_whole(&input);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            points.push(0);
            points.push(input.len());
            points.sort_unstable();
            let mut p = Parser::new(1 << 20);
            let mut pieces = Vec::new();
            for w in points.windows(2) {
                p.push(&input[w[0]..w[1]]);
                pieces.extend(all_events(&mut p));
            }
            pieces.extend(p.finish());
            prop_assert_eq!(pieces, whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512), more in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut p = Parser::new(256);
            p.push(&input);
            while let Ok(Some(_)) = p.next_event() {}
            let _ = p.finish();
            p.push(&more);
            while let Ok(Some(_)) = p.next_event() {}
            let _ = p.finish();
        }
    }
}

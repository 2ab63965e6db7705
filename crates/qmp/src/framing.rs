//! Framing of the input stream by JSON value.
//!
//! QMP clients send compact JSON with no newline, several requests may arrive in one read and one
//! request may be split over many reads. [`JsonSplitter`] finds where each top-level value ends
//! by tracking brackets and strings (the way QEMU's JSON streamer does), without parsing the
//! value itself, and with bounded memory:
//!
//! * objects and arrays end when their brackets balance; top-level strings at their closing quote;
//! * QEMU's JSON extension of single-quoted strings (`{'execute': 'stop'}`) and of `\'` escapes
//!   is accepted: such strings are rewritten to standard JSON in the frame;
//! * top-level scalars (`123`, `true`) end at the next whitespace or structural character;
//! * bytes that cannot start a JSON value are reported as a [`Frame::Error`] per run of such
//!   bytes, so garbage gets an answer as soon as it arrives and the stream resynchronises at the
//!   next `{`;
//! * a value longer than the limit, or nested deeper than [`DEFAULT_MAX_NESTING`], is reported
//!   once and then skipped up to its end without being stored.

/// QEMU's nesting limit for QMP input.
pub const DEFAULT_MAX_NESTING: usize = 1024;

/// Longest garbage excerpt quoted in an error message.
const EXCERPT: usize = 32;

/// One unit cut from the input stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one complete top-level JSON value candidate (not yet validated).
    Value(Vec<u8>),
    /// Input that cannot be a JSON value; the text is the `desc` of the error reply.
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside an object or array (`depth` > 0), outside strings.
    Container,
    /// Inside a string; `depth` says whether it is nested (> 0) or top-level (0).
    Str,
    /// Just after a backslash inside a string.
    Escape,
    /// Inside a top-level scalar such as `123` or `true`.
    Scalar,
    /// Inside a run of bytes that cannot start a value.
    Garbage,
}

/// Incremental splitter of a byte stream into top-level JSON values.
#[derive(Debug)]
pub struct JsonSplitter {
    state: State,
    depth: usize,
    buf: Vec<u8>,
    /// The current value went over a limit: it has been reported and is skipped to its end.
    discarding: bool,
    /// Quote character of the current string: `"` or QEMU's extension `'`.
    quote: u8,
    max_bytes: usize,
    max_nesting: usize,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(EXCERPT)];
    let mut s: String = String::from_utf8_lossy(cut)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if bytes.len() > EXCERPT {
        s.push_str("...");
    }
    s
}

impl JsonSplitter {
    /// A splitter that refuses values longer than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self::with_limits(max_bytes, DEFAULT_MAX_NESTING)
    }

    /// A splitter with explicit size and nesting limits.
    pub fn with_limits(max_bytes: usize, max_nesting: usize) -> Self {
        Self {
            state: State::Idle,
            depth: 0,
            buf: Vec::new(),
            discarding: false,
            quote: b'"',
            max_bytes: max_bytes.max(2),
            max_nesting: max_nesting.max(1),
        }
    }

    /// Bytes currently held for an incomplete value (never more than the size limit).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn store(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= self.max_bytes {
            out.push(Frame::Error(format!(
                "JSON parse error, request larger than {} bytes",
                self.max_bytes
            )));
            self.buf = Vec::new();
            self.discarding = true;
            return;
        }
        self.buf.push(b);
    }

    fn finish_value(&mut self, out: &mut Vec<Frame>) {
        if !self.discarding {
            out.push(Frame::Value(std::mem::take(&mut self.buf)));
        }
        self.buf = Vec::new();
        self.discarding = false;
        self.depth = 0;
        self.state = State::Idle;
    }

    fn flush_garbage(&mut self, out: &mut Vec<Frame>) {
        let text = excerpt(&self.buf);
        out.push(Frame::Error(format!("JSON parse error, stray '{text}'")));
        self.buf.clear();
        self.discarding = false;
        self.state = State::Idle;
    }

    /// Feeds `data`; appends every frame completed by it to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                State::Idle => {
                    if is_ws(b) {
                        i += 1;
                        continue;
                    }
                    self.buf.clear();
                    self.discarding = false;
                    match b {
                        b'{' | b'[' => {
                            self.depth = 1;
                            self.buf.push(b);
                            self.state = State::Container;
                        }
                        b'"' | b'\'' => {
                            self.depth = 0;
                            self.quote = b;
                            self.buf.push(b'"');
                            self.state = State::Str;
                        }
                        _ if is_scalar_byte(b) => {
                            self.buf.push(b);
                            self.state = State::Scalar;
                        }
                        _ => {
                            self.buf.push(b);
                            self.state = State::Garbage;
                        }
                    }
                    i += 1;
                }
                State::Container => {
                    if b == b'\'' {
                        self.store(b'"', out);
                    } else {
                        self.store(b, out);
                    }
                    match b {
                        b'"' | b'\'' => {
                            self.quote = b;
                            self.state = State::Str;
                        }
                        b'{' | b'[' => {
                            self.depth += 1;
                            if self.depth > self.max_nesting && !self.discarding {
                                out.push(Frame::Error(
                                    "JSON parse error, nesting depth limit exceeded".to_string(),
                                ));
                                self.buf = Vec::new();
                                self.discarding = true;
                            }
                        }
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                self.finish_value(out);
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                State::Str => {
                    match b {
                        // The backslash is stored with the next byte (see Escape).
                        b'\\' => self.state = State::Escape,
                        _ if b == self.quote => {
                            self.store(b'"', out);
                            if self.depth == 0 {
                                self.finish_value(out);
                            } else {
                                self.state = State::Container;
                            }
                        }
                        // A double quote inside a single-quoted string.
                        b'"' => {
                            self.store(b'\\', out);
                            self.store(b'"', out);
                        }
                        _ => self.store(b, out),
                    }
                    i += 1;
                }
                State::Escape => {
                    // QEMU accepts `\'` in both kinds of strings; plain JSON needs no escape
                    // for `'`.
                    if b != b'\'' {
                        self.store(b'\\', out);
                    }
                    self.store(b, out);
                    self.state = State::Str;
                    i += 1;
                }
                State::Scalar => {
                    if is_scalar_byte(b) {
                        self.store(b, out);
                        i += 1;
                    } else {
                        // The scalar ends here; `b` is looked at again in the Idle state.
                        self.finish_value(out);
                    }
                }
                State::Garbage => {
                    if is_ws(b) || matches!(b, b'{' | b'[' | b'"' | b'\'') {
                        self.flush_garbage(out);
                    } else {
                        if self.buf.len() < EXCERPT + 1 {
                            self.buf.push(b);
                        }
                        i += 1;
                    }
                }
            }
        }
        // Report garbage at once rather than waiting for the byte that ends it.
        if self.state == State::Garbage {
            self.flush_garbage(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<Frame> {
        let mut s = JsonSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    fn v(s: &str) -> Frame {
        Frame::Value(s.as_bytes().to_vec())
    }

    fn e(s: &str) -> Frame {
        Frame::Error(s.to_string())
    }

    #[test]
    fn table() {
        let cases: Vec<(Vec<&[u8]>, Vec<Frame>)> = vec![
            (vec![b"{\"execute\":\"x\"}"], vec![v("{\"execute\":\"x\"}")]),
            (
                vec![b"{\"a\":1}{\"b\":2}"],
                vec![v("{\"a\":1}"), v("{\"b\":2}")],
            ),
            (vec![b"{\"a\"", b":", b"1}"], vec![v("{\"a\":1}")]),
            (vec![b"  \r\n{}\n"], vec![v("{}")]),
            // Brackets and escaped quotes inside strings do not count.
            (vec![b"{\"a\":\"}{\\\"[\"}"], vec![v("{\"a\":\"}{\\\"[\"}")]),
            (vec![b"[1,[2]]"], vec![v("[1,[2]]")]),
            (vec![b"\"str\""], vec![v("\"str\"")]),
            (vec![b"123 "], vec![v("123")]),
            (vec![b"true{}"], vec![v("true"), v("{}")]),
            (vec![b"12", b"3\n"], vec![v("123")]),
            // Garbage is reported at once and the stream resynchronises at '{'.
            (
                vec![b"}}\x01\xff{\"a\":1}"],
                vec![e("JSON parse error, stray '}}?\u{fffd}'"), v("{\"a\":1}")],
            ),
            (
                vec![b"), ", b"x{}"],
                vec![e("JSON parse error, stray '),'"), v("x"), v("{}")],
            ),
            // QEMU's single-quoted strings become JSON strings.
            (
                vec![b"{'execute': 'qmp_capabilities', 'id': 'a\\'b\"c'}"],
                vec![v(
                    "{\"execute\": \"qmp_capabilities\", \"id\": \"a'b\\\"c\"}",
                )],
            ),
            (vec![b"'top'"], vec![v("\"top\"")]),
            (vec![b"{\"a\":\"x\\'y\\n\"}"], vec![v("{\"a\":\"x'y\\n\"}")]),
            // Mismatched brackets still balance: the parser reports the error later.
            (vec![b"{]"], vec![v("{]")]),
            // Incomplete: nothing yet.
            (vec![b"{\"a\":"], vec![]),
        ];
        for (chunks, expected) in cases {
            assert_eq!(split(&chunks, 1024), expected, "input {chunks:?}");
        }
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let input = b"{\"execute\":\"a\",\"id\":[1,{\"x\":\"]\"}]} garbage {\"execute\":\"b\"}";
        let whole = split(&[input], 1024);
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        let bytewise = split(&pieces, 1024);
        // Garbage runs are flushed at the end of each read, so only compare the values.
        let values = |f: &[Frame]| {
            f.iter()
                .filter(|x| matches!(x, Frame::Value(_)))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&whole), values(&bytewise));
        assert_eq!(values(&whole).len(), 3); // two objects and the scalar "garbage"
    }

    #[test]
    fn oversized_value_is_reported_once_and_skipped() {
        let mut s = JsonSplitter::new(100);
        let mut out = Vec::new();
        s.push(b"{\"execute\":\"x\",\"arguments\":{\"s\":\"", &mut out);
        let chunk = [b'a'; 1000];
        for _ in 0..100 {
            s.push(&chunk, &mut out);
            assert!(s.buffered() <= 100);
        }
        s.push(b"\"}}{\"execute\":\"ok\"}", &mut out);
        assert_eq!(
            out,
            vec![
                e("JSON parse error, request larger than 100 bytes"),
                v("{\"execute\":\"ok\"}")
            ]
        );
    }

    #[test]
    fn oversized_top_level_string_and_scalar() {
        let mut big = vec![b'"'];
        big.extend(std::iter::repeat_n(b'x', 500));
        big.extend_from_slice(b"\"{}");
        assert_eq!(
            split(&[&big], 100),
            vec![
                e("JSON parse error, request larger than 100 bytes"),
                v("{}")
            ]
        );
        let digits = [b'1'; 500];
        assert_eq!(
            split(&[&digits, b" {}"], 100),
            vec![
                e("JSON parse error, request larger than 100 bytes"),
                v("{}")
            ]
        );
    }

    #[test]
    fn nesting_limit() {
        let mut s = JsonSplitter::with_limits(1 << 20, 8);
        let mut out = Vec::new();
        let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
        s.push(deep.as_bytes(), &mut out);
        s.push(b"{}", &mut out);
        assert_eq!(
            out,
            vec![e("JSON parse error, nesting depth limit exceeded"), v("{}")]
        );
    }
}

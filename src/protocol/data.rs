//! The DATA reader: turns the bytes after `354` into message content.
//!
//! This is where mail servers get smuggled (SMTP smuggling, 2023): two
//! programs that disagree about where a message ends let an attacker hide a
//! second message inside the first. So the rules are strict and tracked
//! across chunk boundaries: the message ends only at `CRLF.CRLF` (the first
//! CRLF may be the one that ended the DATA command); dot-stuffing is undone on
//! every line, the first included; a bare LF or a bare CR is either refused or
//! normalised, never taken as a line end. The size is counted as it streams.
//!
//! Output lines end in LF: that is how the spool stores a message and how
//! programs receive it.

/// What to do with a bare LF or bare CR in message data (`smtp.bare_lf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLineEnding {
    /// Refuse the message (521 5.5.2) and close.
    Reject,
    /// Treat it as a line end in the stored message (never as an end of data).
    Normalize,
}

/// Where the reader is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (right after 354, or after CRLF).
    LineStart,
    /// A line started with `.`.
    Dot,
    /// A line was `.` followed by CR.
    DotCr,
    /// Inside a line.
    Text,
    /// Inside a line, after a CR.
    Cr,
    /// The end `CRLF.CRLF` was seen.
    Done,
}

/// Fatal problems in the data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("bare LF or CR in message data")]
    BareLineEnding,
}

/// Result of feeding bytes to the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes consumed; the rest belong to the next command.
    pub consumed: usize,
    /// The end of data was reached.
    pub done: bool,
}

/// Streaming DATA reader. Feed it input with [`DataReader::feed`]; it appends
/// content to `out`, stops at the end of data and counts the size.
#[derive(Debug, Clone)]
pub struct DataReader {
    state: State,
    policy: BareLineEnding,
    max_size: u64,
    size: u64,
    /// The current line began after a bare LF or CR (normalize mode): such
    /// a line can never be the end of data, or `\n.\r\n` would smuggle.
    after_bare: bool,
}

impl DataReader {
    /// A reader positioned right after the 354 reply.
    pub fn new(policy: BareLineEnding, max_size: u64) -> Self {
        DataReader {
            state: State::LineStart,
            policy,
            max_size,
            size: 0,
            after_bare: false,
        }
    }

    /// The message size so far: content octets with CRLF line ends, as a
    /// client would count it for SIZE.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the content is larger than the limit. Content past the limit is
    /// no longer appended (the message is refused at the end), but the
    /// stream is still read to its end so the session stays in step.
    pub fn too_big(&self) -> bool {
        self.size > self.max_size
    }

    /// Reads from `input`, appending content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, DataError> {
        for (i, &b) in input.iter().enumerate() {
            if self.state == State::Done {
                return Ok(Progress {
                    consumed: i,
                    done: true,
                });
            }
            self.step(b, out)?;
        }
        Ok(Progress {
            consumed: input.len(),
            done: self.state == State::Done,
        })
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), DataError> {
        match (self.state, b) {
            (State::Done, _) => {}
            (State::LineStart, b'.') => self.state = State::Dot,
            (State::Dot, b'\r') => self.state = State::DotCr,
            (State::DotCr, b'\n') if self.after_bare => {
                // Not an end: the line "." is content.
                self.push(b'.', out);
                self.line_end(out);
                self.after_bare = false;
                self.state = State::LineStart;
            }
            (State::DotCr, b'\n') => self.state = State::Done,
            // ".\r" then anything but LF: a line "." ended by a bare CR.
            (State::DotCr, _) => {
                self.push(b'.', out);
                self.bare_then(b, out)?;
            }
            // A line "." ended by a bare LF.
            (State::Dot, b'\n') => {
                self.push(b'.', out);
                self.bare(out)?;
                self.state = State::LineStart;
            }
            // A dot-stuffed line: the leading dot goes, the rest stays.
            (State::Dot, _) => {
                self.state = State::Text;
                self.step(b, out)?;
            }
            (State::LineStart | State::Text, b'\r') => self.state = State::Cr,
            (State::LineStart | State::Text, b'\n') => {
                self.bare(out)?;
                self.state = State::LineStart;
            }
            (State::LineStart | State::Text, _) => {
                self.push(b, out);
                self.state = State::Text;
            }
            (State::Cr, b'\n') => {
                self.line_end(out);
                self.after_bare = false;
                self.state = State::LineStart;
            }
            (State::Cr, _) => self.bare_then(b, out)?,
        }
        Ok(())
    }

    /// A bare CR followed by `b`: once normalised into a line end, `b` is
    /// the first byte of a new line (so a dot there is unstuffed too).
    fn bare_then(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), DataError> {
        self.bare(out)?;
        self.state = State::LineStart;
        self.step(b, out)
    }

    fn push(&mut self, b: u8, out: &mut Vec<u8>) {
        self.size += 1;
        if !self.too_big() {
            out.push(b);
        }
    }

    fn line_end(&mut self, out: &mut Vec<u8>) {
        self.size += 2;
        if !self.too_big() {
            out.push(b'\n');
        }
    }

    /// A bare LF or CR: refused, or stored as a line end. Either way it never
    /// counts towards the end of data, so `\n.\n` and `\r.\r` are just text.
    fn bare(&mut self, out: &mut Vec<u8>) -> Result<(), DataError> {
        match self.policy {
            BareLineEnding::Reject => Err(DataError::BareLineEnding),
            BareLineEnding::Normalize => {
                self.line_end(out);
                self.after_bare = true;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes; returns content, consumed
    /// count and whether the end was found.
    fn read_chunked(
        input: &[u8],
        chunk: usize,
        policy: BareLineEnding,
    ) -> Result<(Vec<u8>, usize, bool), DataError> {
        let mut reader = DataReader::new(policy, 1 << 20);
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in input.chunks(chunk.max(1)) {
            let p = reader.feed(piece, &mut out)?;
            consumed += p.consumed;
            if p.done {
                return Ok((out, consumed, true));
            }
        }
        Ok((out, consumed, false))
    }

    fn read_all(input: &[u8]) -> (Vec<u8>, usize, bool) {
        let whole = read_chunked(input, input.len(), BareLineEnding::Reject).unwrap();
        // Every split point must give the same answer: state crosses chunks.
        for chunk in 1..input.len().min(8) {
            assert_eq!(
                read_chunked(input, chunk, BareLineEnding::Reject).unwrap(),
                whole,
                "chunk size {chunk}"
            );
        }
        whole
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        let (out, consumed, done) = read_all(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert!(done);
        assert_eq!(out, b"Subject: x\n\nhello\n");
        assert_eq!(consumed, b"Subject: x\r\n\r\nhello\r\n.\r\n".len());
    }

    #[test]
    fn dots_inside_a_line_are_text() {
        let (out, consumed, done) = read_all(b"bob@example.org\r\nHello.\r\n..\r\nend.\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b"bob@example.org\nHello.\n.\nend.\n");
        assert_eq!(consumed, 38);
    }

    #[test]
    fn empty_message_right_after_354() {
        let (out, consumed, done) = read_all(b".\r\nQUIT\r\n");
        assert!(done);
        assert!(out.is_empty());
        assert_eq!(consumed, 3);
    }

    #[test]
    fn dot_stuffing_is_undone_on_every_line_including_the_first() {
        let (out, _, done) = read_all(b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b".first\nmid\n.\n..x\n");
    }

    #[test]
    fn smuggling_sequences_never_end_the_message() {
        for seq in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n.\n",
            b"\r\n.\r\r\n",
        ] {
            let mut input = b"a".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<x@y>\r\n");
            // Refused in reject mode ...
            assert_eq!(
                read_chunked(&input, input.len(), BareLineEnding::Reject),
                Err(DataError::BareLineEnding),
                "{seq:?}"
            );
            // ... and only text in normalize mode: no end of data.
            for chunk in 1..=input.len() {
                let (_, _, done) = read_chunked(&input, chunk, BareLineEnding::Normalize).unwrap();
                assert!(!done, "{seq:?} ended the message (chunk {chunk})");
            }
        }
    }

    #[test]
    fn normalize_turns_bare_endings_into_lines() {
        let (out, _, done) = read_chunked(
            b"a\nb\rc\r\n.\n\r\n.\rx\r\na\r..b\r\n.\r\n",
            64,
            BareLineEnding::Normalize,
        )
        .unwrap();
        assert!(done);
        // Lines "." keep their dot; a line after a bare CR is unstuffed.
        assert_eq!(out, b"a\nb\nc\n.\n\n.\nx\na\n.b\n");
    }

    #[test]
    fn eight_bit_and_nul_content_is_kept() {
        let (out, _, done) = read_all(b"caf\xc3\xa9 \xff\x00\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b"caf\xc3\xa9 \xff\x00\n");
    }

    #[test]
    fn size_is_counted_and_content_past_the_limit_dropped() {
        let mut reader = DataReader::new(BareLineEnding::Reject, 10);
        let mut out = Vec::new();
        let p = reader
            .feed(b"0123456789\r\nabcdef\r\n.\r\n", &mut out)
            .unwrap();
        assert!(p.done);
        assert!(reader.too_big());
        assert_eq!(reader.size(), 20);
        assert!(out.len() <= 10);
        let mut exact = DataReader::new(BareLineEnding::Reject, 10);
        let mut out = Vec::new();
        assert!(exact.feed(b"01234567\r\n.\r\n", &mut out).unwrap().done);
        assert!(!exact.too_big());
        assert_eq!(out, b"01234567\n");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Bytes that matter to the reader, often enough to meet each other.
        fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                prop_oneof![
                    Just(b'\r'),
                    Just(b'\n'),
                    Just(b'.'),
                    Just(b'a'),
                    any::<u8>()
                ],
                0..64,
            )
        }

        proptest! {
            /// However the stream is cut into reads, the reader decides the same.
            #[test]
            fn chunking_never_changes_the_result(input in wire_bytes(), chunk in 1usize..16) {
                for policy in [BareLineEnding::Reject, BareLineEnding::Normalize] {
                    prop_assert_eq!(
                        read_chunked(&input, chunk, policy),
                        read_chunked(&input, input.len(), policy)
                    );
                }
            }

            /// The end of data is the first CRLF.CRLF (the DATA command's CRLF
            /// first); nothing else ends a message, not even in normalize
            /// mode, where bare line ends are accepted as text.
            #[test]
            fn only_crlf_dot_crlf_ends_data(input in wire_bytes()) {
                let mut framed = b"\r\n".to_vec();
                framed.extend_from_slice(&input);
                let end = framed.windows(5).position(|w| w == b"\r\n.\r\n").map(|at| at + 3);
                let (_, consumed, done) =
                    read_chunked(&input, input.len(), BareLineEnding::Normalize).unwrap();
                prop_assert_eq!(done, end.is_some());
                prop_assert_eq!(consumed, end.unwrap_or(input.len()));
            }

            /// Dot-stuffing round trip: any lines of any bytes, stuffed as a
            /// client must, read back as themselves whatever the chunking.
            #[test]
            fn stuffed_text_reads_back(
                lines in proptest::collection::vec(
                    proptest::collection::vec(any::<u8>().prop_filter("no line ends", |b| *b != b'\r' && *b != b'\n'), 0..12),
                    0..8,
                ),
                chunk in 1usize..16,
            ) {
                let mut wire = Vec::new();
                let mut expected = Vec::new();
                for line in &lines {
                    if line.first() == Some(&b'.') {
                        wire.push(b'.');
                    }
                    wire.extend_from_slice(line);
                    wire.extend_from_slice(b"\r\n");
                    expected.extend_from_slice(line);
                    expected.push(b'\n');
                }
                wire.extend_from_slice(b".\r\nQUIT\r\n");
                let read = read_chunked(&wire, chunk, BareLineEnding::Reject);
                prop_assert_eq!(read, Ok((expected, wire.len() - 6, true)));
            }
        }
    }
}

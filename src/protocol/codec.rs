//! tokio-util codec over the pure parsers: command lines in one mode, message
//! content (through [`DataReader`]) in the other. The connection's I/O task
//! switches modes when the session machine says `EnterData`; the codec
//! switches back by itself at the end of data.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::data::{BareLineEnding, DataReader};
use super::reply::Reply;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
pub const MAX_COMMAND_LINE: usize = 512;

/// One unit of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A command line without its line end.
    Line(Bytes),
    /// A command line over [`MAX_COMMAND_LINE`]; its bytes were dropped.
    LineTooLong,
    /// Message content (LF line ends, unstuffed).
    Data(Bytes),
    /// The end of data.
    DataEnd { size: u64, too_big: bool },
    /// A bare LF or CR under `bare_lf = "reject"`.
    DataRejected,
}

#[derive(Debug)]
enum Mode {
    Command { discarding: bool },
    Data(DataReader),
}

/// The SMTP server codec.
#[derive(Debug)]
pub struct SmtpCodec {
    mode: Mode,
    pending_end: Option<Frame>,
    policy: BareLineEnding,
    max_message_size: u64,
}

impl SmtpCodec {
    pub fn new(policy: BareLineEnding, max_message_size: u64) -> Self {
        SmtpCodec {
            mode: Mode::Command { discarding: false },
            pending_end: None,
            policy,
            max_message_size,
        }
    }

    /// Reads what follows as message content.
    pub fn enter_data(&mut self) {
        self.mode = Mode::Data(DataReader::new(self.policy, self.max_message_size));
    }

    /// Whether a message is being read: its content, or its end not yet
    /// handed out.
    pub fn in_data(&self) -> bool {
        matches!(self.mode, Mode::Data(_)) || self.pending_end.is_some()
    }
}

impl Decoder for SmtpCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(end) = self.pending_end.take() {
            return Ok(Some(end));
        }
        match &mut self.mode {
            Mode::Command { discarding } => {
                if *discarding {
                    return Ok(match src.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            src.advance(i + 1);
                            *discarding = false;
                            Some(Frame::LineTooLong)
                        }
                        None => {
                            src.clear();
                            None
                        }
                    });
                }
                let window = &src[..src.len().min(MAX_COMMAND_LINE)];
                match window.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        let mut line = src.split_to(i + 1);
                        line.truncate(i);
                        if line.last() == Some(&b'\r') {
                            line.truncate(i - 1);
                        }
                        Ok(Some(Frame::Line(line.freeze())))
                    }
                    None if src.len() >= MAX_COMMAND_LINE => {
                        // Too long: drop through its line end, which may
                        // already be buffered, and keep what follows it.
                        match src.iter().position(|&b| b == b'\n') {
                            Some(i) => {
                                src.advance(i + 1);
                                Ok(Some(Frame::LineTooLong))
                            }
                            None => {
                                *discarding = true;
                                src.clear();
                                Ok(None)
                            }
                        }
                    }
                    None => Ok(None),
                }
            }
            Mode::Data(reader) => {
                if src.is_empty() {
                    return Ok(None);
                }
                let mut out = Vec::with_capacity(src.len());
                let progress = match reader.feed(src, &mut out) {
                    Ok(p) => p,
                    Err(_) => {
                        self.mode = Mode::Command { discarding: false };
                        src.clear();
                        return Ok(Some(Frame::DataRejected));
                    }
                };
                src.advance(progress.consumed);
                if progress.done {
                    let end = Frame::DataEnd {
                        size: reader.size(),
                        too_big: reader.too_big(),
                    };
                    self.mode = Mode::Command { discarding: false };
                    if out.is_empty() {
                        return Ok(Some(end));
                    }
                    self.pending_end = Some(end);
                }
                Ok((!out.is_empty()).then(|| Frame::Data(Bytes::from(out))))
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        // A partial line or message at EOF is simply a lost connection.
        let frame = self.decode(src)?;
        if frame.is_none() {
            src.clear();
        }
        Ok(frame)
    }
}

impl Encoder<Reply> for SmtpCodec {
    type Error = std::io::Error;

    fn encode(&mut self, reply: Reply, dst: &mut BytesMut) -> Result<(), Self::Error> {
        dst.extend_from_slice(&reply.to_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(codec: &mut SmtpCodec, input: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            let data_start = matches!(&f, Frame::Line(l) if l.eq_ignore_ascii_case(b"DATA"));
            out.push(f);
            if data_start {
                codec.enter_data();
            }
        }
        out
    }

    #[test]
    fn pipelined_commands_and_data_split_correctly() {
        let mut codec = SmtpCodec::new(BareLineEnding::Reject, 1000);
        let got = frames(
            &mut codec,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(
            got,
            vec![
                Frame::Line(Bytes::from_static(b"MAIL FROM:<a@b>")),
                Frame::Line(Bytes::from_static(b"RCPT TO:<c@d>")),
                Frame::Line(Bytes::from_static(b"DATA")),
                Frame::Data(Bytes::from_static(b"hi\n")),
                Frame::DataEnd {
                    size: 4,
                    too_big: false
                },
                Frame::Line(Bytes::from_static(b"QUIT")),
            ]
        );
    }

    #[test]
    fn line_limit_counts_the_crlf() {
        let mut codec = SmtpCodec::new(BareLineEnding::Reject, 1000);
        let mut ok = vec![b'N'; 510];
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(frames(&mut codec, &ok)[..], [Frame::Line(_)]));
        let mut long = vec![b'N'; 511];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(
            frames(&mut codec, &long),
            vec![Frame::LineTooLong, Frame::Line(Bytes::from_static(b"NOOP"))]
        );
    }

    #[test]
    fn overlong_line_across_reads_is_dropped_without_growing() {
        let mut codec = SmtpCodec::new(BareLineEnding::Reject, 1000);
        let mut buf = BytesMut::from(&[b'x'; 600][..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(&[b'y'; 5000]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"yy\r\nQUIT\r\n");
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::LineTooLong));
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Line(Bytes::from_static(b"QUIT")))
        );
    }

    #[test]
    fn the_message_lasts_until_its_end_is_handed_out() {
        let mut codec = SmtpCodec::new(BareLineEnding::Reject, 1000);
        codec.enter_data();
        let mut buf = BytesMut::from(&b"body\r\n.\r\n"[..]);
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Data(_))
        ));
        assert!(codec.in_data(), "the end is still to come");
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::DataEnd { .. })
        ));
        assert!(!codec.in_data());
    }

    #[test]
    fn bare_lf_in_data_is_a_rejection_frame() {
        let mut codec = SmtpCodec::new(BareLineEnding::Reject, 1000);
        codec.enter_data();
        let mut buf = BytesMut::from(&b"a\n.\nMAIL FROM:<x@y>\r\n"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::DataRejected));
        assert!(!codec.in_data());
    }
}

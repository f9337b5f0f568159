//! Outbound SMTP: the client that talks to `[relay]` for bounces and address
//! aliases, and that `mailnode send` uses. Every reply is kept with its text
//! so a refusal can be told to the sender, and classified as temporary (4xx,
//! no connection, timeout) or permanent (5xx).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::delivery::status::{DeliveryStatus, EnhancedCode};
use crate::protocol::reply::Reply;
use crate::sysexits::{EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE};

/// The longest reply line we read; a peer sending more is broken.
const MAX_REPLY_LINE: usize = 4096;
/// The most lines of one multi-line reply.
const MAX_REPLY_LINES: usize = 100;

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    pub host: String,
    pub port: u16,
    /// The name we greet with (EHLO).
    pub helo: String,
    /// Limit for the connection and for each reply.
    pub timeout: Duration,
}

/// What we could not do, before any reply decided it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("timeout talking to {0}")]
    Timeout(String),
    #[error("connection to {0} failed: {1}")]
    Io(String, String),
    #[error("{0} broke the protocol: {1}")]
    Protocol(String, String),
}

/// The outcome of one transaction, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionOutcome {
    /// The greeting, EHLO or MAIL refused the whole transaction.
    pub refused: Option<Reply>,
    /// Each recipient's RCPT reply, in order.
    pub recipients: Vec<Reply>,
    /// The reply after the message data (None when no recipient was taken).
    pub data: Option<Reply>,
}

impl TransactionOutcome {
    /// The outcome for recipient `i`: the reply that decided it.
    pub fn for_recipient(&self, i: usize) -> Option<&Reply> {
        if let Some(r) = &self.refused {
            return Some(r);
        }
        match self.recipients.get(i) {
            Some(r) if !is_success(r) => Some(r),
            Some(r) => self.data.as_ref().or(Some(r)),
            None => None,
        }
    }
}

/// A message to send.
pub struct Outgoing<'a> {
    /// RFC 5321 form without brackets; empty for `<>`.
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// Needs 8BITMIME / SMTPUTF8 if the relay offers them.
    pub body_8bit: bool,
    pub smtputf8: bool,
}

/// Sends `body` (LF or CRLF line ends; dot-stuffed here) to `target`.
pub async fn send<R: AsyncRead + Unpin>(
    target: &RelayTarget,
    message: &Outgoing<'_>,
    body: R,
) -> Result<TransactionOutcome, RelayError> {
    let peer = format!("{}:{}", target.host, target.port);
    // An address is one token on a command line: a CR or LF in it would
    // start a command of the caller's choosing.
    let addresses =
        std::iter::once(message.sender).chain(message.recipients.iter().map(String::as_str));
    if let Some(bad) = addresses.clone().find(|a| a.chars().any(char::is_control)) {
        return Err(RelayError::Protocol(
            peer,
            format!("address {bad:?} contains control characters"),
        ));
    }
    let stream = tokio::time::timeout(target.timeout, TcpStream::connect(&peer))
        .await
        .map_err(|_| RelayError::Timeout(peer.clone()))?
        .map_err(|e| RelayError::Connect(peer.clone(), e.to_string()))?;
    let mut session = ClientSession {
        stream: BufReader::new(stream),
        peer,
        timeout: target.timeout,
    };
    let outcome = session.transaction(target, message, body).await;
    // Be polite whatever happened; the outcome is already decided.
    let _ = tokio::time::timeout(Duration::from_secs(5), session.command("QUIT")).await;
    outcome
}

struct ClientSession {
    stream: BufReader<TcpStream>,
    peer: String,
    timeout: Duration,
}

impl ClientSession {
    async fn transaction<R: AsyncRead + Unpin>(
        &mut self,
        target: &RelayTarget,
        message: &Outgoing<'_>,
        mut body: R,
    ) -> Result<TransactionOutcome, RelayError> {
        let refused = |reply: Reply| TransactionOutcome {
            refused: Some(reply),
            recipients: Vec::new(),
            data: None,
        };
        let greeting = self.reply().await?;
        if !greeting.is_positive() {
            return Ok(refused(greeting));
        }
        let mut ehlo = self.command(&format!("EHLO {}", target.helo)).await?;
        let mut extensions = Vec::new();
        if ehlo.is_positive() {
            extensions = ehlo
                .text()
                .lines()
                .skip(1)
                .map(|l| {
                    l.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase()
                })
                .collect();
        } else {
            ehlo = self.command(&format!("HELO {}", target.helo)).await?;
            if !ehlo.is_positive() {
                return Ok(refused(ehlo));
            }
        }
        let offers = |ext: &str| extensions.iter().any(|e| e == ext);
        let mut mail = format!("MAIL FROM:<{}>", message.sender);
        if message.body_8bit && offers("8BITMIME") {
            mail.push_str(" BODY=8BITMIME");
        }
        if message.smtputf8 && offers("SMTPUTF8") {
            mail.push_str(" SMTPUTF8");
        }
        let reply = self.command(&mail).await?;
        if !is_success(&reply) {
            return Ok(refused(reply));
        }
        let mut recipients = Vec::with_capacity(message.recipients.len());
        for rcpt in message.recipients {
            recipients.push(self.command(&format!("RCPT TO:<{rcpt}>")).await?);
        }
        if !recipients.iter().any(is_success) {
            let _ = self.command("RSET").await;
            return Ok(TransactionOutcome {
                refused: None,
                recipients,
                data: None,
            });
        }
        let go = self.command("DATA").await?;
        if go.code() != 354 {
            if go.code() < 400 {
                // A "yes" that is not 354 would have us count an unsent
                // message as delivered.
                return Err(RelayError::Protocol(
                    self.peer.clone(),
                    format!("unexpected answer to DATA: {go}"),
                ));
            }
            return Ok(TransactionOutcome {
                refused: None,
                recipients,
                data: Some(go),
            });
        }
        let mut encoder = WireEncoder::default();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut wire = Vec::with_capacity(chunk.len() + chunk.len() / 8);
        loop {
            let n = body.read(&mut chunk).await.map_err(|e| {
                RelayError::Io(self.peer.clone(), format!("reading the message: {e}"))
            })?;
            wire.clear();
            if n == 0 {
                encoder.finish(&mut wire);
                self.write(&wire).await?;
                break;
            }
            encoder.encode(&chunk[..n], &mut wire);
            self.write(&wire).await?;
        }
        let data = self.reply().await?;
        Ok(TransactionOutcome {
            refused: None,
            recipients,
            data: Some(data),
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        let stream = self.stream.get_mut();
        tokio::time::timeout(self.timeout, stream.write_all(bytes))
            .await
            .map_err(|_| RelayError::Timeout(self.peer.clone()))?
            .map_err(|e| RelayError::Io(self.peer.clone(), e.to_string()))
    }

    async fn command(&mut self, line: &str) -> Result<Reply, RelayError> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// Reads one reply, all of its lines.
    async fn reply(&mut self) -> Result<Reply, RelayError> {
        let mut lines: Vec<String> = Vec::new();
        loop {
            let mut raw = Vec::new();
            let mut limited = (&mut self.stream).take(MAX_REPLY_LINE as u64);
            let n = tokio::time::timeout(self.timeout, limited.read_until(b'\n', &mut raw))
                .await
                .map_err(|_| RelayError::Timeout(self.peer.clone()))?
                .map_err(|e| RelayError::Io(self.peer.clone(), e.to_string()))?;
            if n == 0 {
                return Err(RelayError::Io(
                    self.peer.clone(),
                    "connection closed".into(),
                ));
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let (code, rest) = parse_reply_line(line).ok_or_else(|| {
                RelayError::Protocol(self.peer.clone(), format!("bad reply {line:?}"))
            })?;
            lines.push(rest.1.to_string());
            if !rest.0 {
                return Ok(Reply::new(code, lines.join("\n")));
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(RelayError::Protocol(
                    self.peer.clone(),
                    "reply of more than 100 lines".into(),
                ));
            }
        }
    }
}

/// MAIL and RCPT succeed only with 2xx (a 3xx there is nonsense).
fn is_success(reply: &Reply) -> bool {
    (200..300).contains(&reply.code())
}

/// What one transaction meant for recipient `i`: accepted, 4xx or no
/// answer (temporary), 5xx (permanent), with the relay's enhanced status
/// code where it gave one. The relay's own words become the diagnostic.
pub fn recipient_status(
    outcome: &Result<TransactionOutcome, RelayError>,
    i: usize,
) -> DeliveryStatus {
    let reply = match outcome {
        Err(e) => return DeliveryStatus::Temporary(EnhancedCode::NO_CONNECTION, e.to_string()),
        Ok(o) => match o.for_recipient(i) {
            Some(r) => r,
            None => {
                return DeliveryStatus::Temporary(
                    EnhancedCode::NO_ANSWER,
                    "relay gave no answer for the recipient".into(),
                )
            }
        },
    };
    let said = format!(
        "relay said: {} {}",
        reply.code(),
        reply.text().replace('\n', " ")
    );
    let code = |default| {
        reply
            .enhanced_code()
            .and_then(EnhancedCode::parse)
            .unwrap_or(default)
    };
    if is_success(reply) {
        DeliveryStatus::Delivered(code(EnhancedCode::DELIVERED))
    } else if reply.is_permanent() {
        DeliveryStatus::Permanent(code(EnhancedCode::PERMANENT), said)
    } else {
        DeliveryStatus::Temporary(code(EnhancedCode::TEMPORARY), said)
    }
}

/// The exit status for a transaction: 75 if anything must be tried again
/// (4xx, no connection, timeout), else 69 for a refused transaction or
/// message, else 67 for a refused recipient, else 0.
pub fn exit_status(outcome: &Result<TransactionOutcome, RelayError>) -> u8 {
    let o = match outcome {
        Err(_) => return EX_TEMPFAIL,
        Ok(o) => o,
    };
    let replies = o
        .refused
        .iter()
        .chain(o.recipients.iter())
        .chain(o.data.iter());
    let mut status = EX_OK;
    for r in replies.filter(|r| !is_success(r)) {
        if !r.is_permanent() {
            return EX_TEMPFAIL;
        }
        let refused_whole = o.refused.as_ref() == Some(r) || o.data.as_ref() == Some(r);
        status = if refused_whole || status == EX_UNAVAILABLE {
            EX_UNAVAILABLE
        } else {
            EX_NOUSER
        };
    }
    status
}

/// Splits `host[:port]` or `[v6]:port`; the port defaults to 25.
pub fn parse_host_port(text: &str) -> Option<(String, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 25,
            None => return None,
        };
        return (!host.is_empty()).then(|| (host.to_string(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port: u16 = port.parse().ok()?;
            (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
        }
        Some(_) => Some((text.to_string(), 25)),
        None => (!text.is_empty()).then(|| (text.to_string(), 25)),
    }
}

/// `250-text` → (250, (more, "text")).
fn parse_reply_line(line: &str) -> Option<(u16, (bool, &str))> {
    let code = line.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    if !(200..600).contains(&code) {
        return None;
    }
    match line.as_bytes().get(3) {
        None => Some((code, (false, ""))),
        Some(b'-') => Some((code, (true, &line[4..]))),
        Some(b' ') => Some((code, (false, &line[4..]))),
        Some(_) => None,
    }
}

/// Turns stored content (LF or CRLF line ends) into DATA on the wire: CRLF
/// line ends, dot-stuffing, and the final `CRLF.CRLF`.
#[derive(Debug)]
pub struct WireEncoder {
    line_start: bool,
    pending_cr: bool,
}

impl Default for WireEncoder {
    fn default() -> Self {
        WireEncoder {
            line_start: true,
            pending_cr: false,
        }
    }
}

impl WireEncoder {
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    continue;
                }
                // A bare CR ends a line too: sent bare, a lax receiver could
                // read `CR . CR LF` as the end of the message.
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                b'.' if self.line_start => {
                    out.extend_from_slice(b"..");
                    self.line_start = false;
                }
                _ => {
                    out.push(b);
                    self.line_start = false;
                }
            }
        }
    }

    /// Ends the data: completes the last line, then `.CRLF`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr {
            out.extend_from_slice(b"\r\n");
            self.pending_cr = false;
            self.line_start = true;
        }
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.line_start = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::data::{BareLineEnding, DataReader};

    fn wire(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut e = WireEncoder::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            e.encode(piece, &mut out);
        }
        e.finish(&mut out);
        out
    }

    #[test]
    fn stuffs_dots_and_ends_with_crlf_dot_crlf() {
        assert_eq!(wire(b".a\nb.\n..\n", 3), b"..a\r\nb.\r\n...\r\n.\r\n");
        assert_eq!(wire(b"no newline", 4), b"no newline\r\n.\r\n");
        assert_eq!(wire(b"", 1), b".\r\n");
        assert_eq!(wire(b"crlf\r\n.x\r\n", 1), b"crlf\r\n..x\r\n.\r\n");
        // A bare CR never reaches the wire: `\r.\r\n` is two lines.
        assert_eq!(wire(b"a\r.\r\nb", 1), b"a\r\n..\r\nb\r\n.\r\n");
    }

    #[test]
    fn our_own_reader_reads_back_what_the_encoder_wrote() {
        let content: &[u8] = b"Subject: x\n\n.\n..\n.a\nend.\n";
        for chunk in 1..8 {
            let bytes = wire(content, chunk);
            let mut reader = DataReader::new(BareLineEnding::Reject, 1 << 20);
            let mut out = Vec::new();
            let p = reader.feed(&bytes, &mut out).unwrap();
            assert!(p.done);
            assert_eq!(p.consumed, bytes.len());
            assert_eq!(out, content);
        }
    }

    #[test]
    fn exit_statuses_follow_sysexits() {
        let ok = Reply::new(250, "2.0.0 ok");
        let temp = Reply::new(451, "4.3.0 later");
        let no_user = Reply::new(550, "5.1.1 unknown");
        let outcome = |refused: Option<Reply>, recipients: Vec<Reply>, data: Option<Reply>| {
            Ok(TransactionOutcome {
                refused,
                recipients,
                data,
            })
        };
        assert_eq!(
            exit_status(&outcome(None, vec![ok.clone()], Some(ok.clone()))),
            0
        );
        assert_eq!(
            exit_status(&outcome(
                None,
                vec![no_user.clone(), ok.clone()],
                Some(ok.clone())
            )),
            67
        );
        assert_eq!(exit_status(&outcome(None, vec![no_user.clone()], None)), 67);
        assert_eq!(
            exit_status(&outcome(
                None,
                vec![ok.clone()],
                Some(Reply::new(554, "5.3.0 no"))
            )),
            69
        );
        assert_eq!(
            exit_status(&outcome(Some(Reply::new(554, "no")), vec![], None)),
            69
        );
        assert_eq!(
            exit_status(&outcome(None, vec![no_user, temp.clone()], Some(ok))),
            75
        );
        assert_eq!(exit_status(&outcome(Some(temp), vec![], None)), 75);
        assert_eq!(exit_status(&Err(RelayError::Timeout("x".into()))), 75);
    }

    #[test]
    fn host_and_port() {
        assert_eq!(
            parse_host_port("mx.example"),
            Some(("mx.example".into(), 25))
        );
        assert_eq!(
            parse_host_port("127.0.0.1:2525"),
            Some(("127.0.0.1".into(), 2525))
        );
        assert_eq!(parse_host_port("[::1]:26"), Some(("::1".into(), 26)));
        assert_eq!(parse_host_port("::1"), Some(("::1".into(), 25)));
        assert_eq!(parse_host_port("host:x"), None);
        assert_eq!(parse_host_port(""), None);
        assert_eq!(parse_host_port(":25"), None);
    }

    #[tokio::test]
    async fn addresses_with_line_breaks_are_never_sent() {
        let target = RelayTarget {
            host: "127.0.0.1".into(),
            port: 9,
            helo: "me".into(),
            timeout: Duration::from_secs(1),
        };
        let recipients = ["a@b>\r\nRCPT TO:<evil@x".to_string()];
        let message = Outgoing {
            sender: "s@x",
            recipients: &recipients,
            body_8bit: false,
            smtputf8: false,
        };
        let outcome = send(&target, &message, &b"x"[..]).await;
        assert!(
            matches!(outcome, Err(RelayError::Protocol(_, _))),
            "{outcome:?}"
        );
    }

    #[test]
    fn reply_lines_parse() {
        assert_eq!(
            parse_reply_line("250-PIPELINING"),
            Some((250, (true, "PIPELINING")))
        );
        assert_eq!(
            parse_reply_line("550 5.1.1 no"),
            Some((550, (false, "5.1.1 no")))
        );
        assert_eq!(parse_reply_line("250"), Some((250, (false, ""))));
        assert_eq!(parse_reply_line("25x ok"), None);
        assert_eq!(parse_reply_line("999 what"), None);
    }
}

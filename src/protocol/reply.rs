//! SMTP replies: every reply the contract fixes is a named constant here, so a
//! reader can find "552 5.3.4" by its meaning and a test can assert on it.

use std::borrow::Cow;

/// One SMTP reply: a three-digit code and its text. Multi-line replies keep
/// their lines separated by `\n` in `text`; the enhanced status code, when the
/// reply has one, starts every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    text: Cow<'static, str>,
}

impl Reply {
    /// A reply whose text is fixed at compile time.
    pub const fn fixed(code: u16, text: &'static str) -> Self {
        Reply {
            code,
            text: Cow::Borrowed(text),
        }
    }

    /// A reply with text built at run time (greetings, queue ids).
    pub fn new(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            text: text.into(),
        }
    }

    /// The three-digit reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The reply text, lines joined by `\n`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The enhanced status code (RFC 3463) at the start of the text, if any.
    pub fn enhanced_code(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let mut parts = first.split('.');
        let class = parts.next()?;
        let ok = matches!(class, "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(first)
    }

    /// 2xx and 3xx: the command was taken.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 5xx: the client must not retry the same thing.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form (`250-a\r\n250 b\r\n`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        if lines.peek().is_none() {
            out.extend_from_slice(format!("{}\r\n", self.code).as_bytes());
        }
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, line).as_bytes());
        }
    }

    /// The wire form as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 8);
        self.write_to(&mut out);
        out
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

/// `220 HOSTNAME ESMTP mailnode`
pub fn greeting(hostname: &str) -> Reply {
    Reply::new(220, format!("{hostname} ESMTP mailnode"))
}

/// The EHLO reply with the extensions we support; STARTTLS only where it
/// can be used (TLS configured, the session still in clear).
pub fn ehlo(hostname: &str, max_message_size: u64, starttls: bool) -> Reply {
    let starttls = if starttls { "\nSTARTTLS" } else { "" };
    Reply::new(
        250,
        format!(
            "{hostname}\nPIPELINING\nSIZE {max_message_size}\n8BITMIME\nENHANCEDSTATUSCODES\nSMTPUTF8{starttls}\nHELP"
        ),
    )
}

/// The HELO reply.
pub fn helo(hostname: &str) -> Reply {
    Reply::new(250, hostname.to_string())
}

/// Queue mode: the message is durable.
pub fn queued(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
}

pub const OK: Reply = Reply::fixed(250, "2.0.0 Ok");
pub const SENDER_OK: Reply = Reply::fixed(250, "2.1.0 Ok");
pub const RECIPIENT_OK: Reply = Reply::fixed(250, "2.1.5 Ok");
pub const START_DATA: Reply = Reply::fixed(354, "End data with <CR><LF>.<CR><LF>");
pub const BYE: Reply = Reply::fixed(221, "2.0.0 Bye");
pub const CANNOT_VRFY: Reply = Reply::fixed(
    252,
    "2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::fixed(
    214,
    "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
);

/// Unknown recipient: no alias by that name.
pub const UNKNOWN_RECIPIENT: Reply =
    Reply::fixed(550, "5.1.1 Recipient address rejected: User unknown");
/// The alias exists but names a kind of target mailnode does not deliver to.
pub const UNSUPPORTED_RECIPIENT: Reply = Reply::fixed(
    550,
    "5.1.1 Recipient address rejected: alias has no supported delivery",
);
/// An alias that forwards to another address, on a node without `[relay]`.
pub const FORWARD_WITHOUT_RELAY: Reply = Reply::fixed(
    550,
    "5.1.1 Recipient address rejected: alias forwards elsewhere and this server has no relay configured",
);
/// Recipient domain is not one of `local_domains`.
pub const DOMAIN_NOT_LOCAL: Reply =
    Reply::fixed(554, "5.7.1 Recipient address rejected: Relay access denied");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::fixed(452, "4.5.3 Too many recipients");
pub const BAD_SEQUENCE: Reply = Reply::fixed(503, "5.5.1 Bad sequence of commands");
pub const NEED_MAIL: Reply = Reply::fixed(503, "5.5.1 Error: need MAIL command");
pub const NESTED_MAIL: Reply = Reply::fixed(503, "5.5.1 Error: nested MAIL command");
pub const NO_VALID_RECIPIENTS: Reply = Reply::fixed(554, "5.5.1 Error: no valid recipients");
pub const UNKNOWN_COMMAND: Reply = Reply::fixed(500, "5.5.2 Error: command not recognized");
pub const SYNTAX_ERROR: Reply = Reply::fixed(501, "5.5.4 Syntax error in parameters");
pub const UNSUPPORTED_PARAMETER: Reply = Reply::fixed(555, "5.5.4 Unsupported option");
pub const LINE_TOO_LONG: Reply = Reply::fixed(500, "5.5.6 Error: command line too long");
pub const BAD_ADDRESS: Reply = Reply::fixed(501, "5.1.3 Bad address syntax");
pub const NEED_SMTPUTF8: Reply = Reply::fixed(
    553,
    "5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
);
pub const MESSAGE_TOO_BIG: Reply = Reply::fixed(552, "5.3.4 Message size exceeds fixed limit");
pub const BARE_LF: Reply = Reply::fixed(
    521,
    "5.5.2 Bare LF or CR in message data is not allowed (RFC 5321 2.3.8)",
);
/// Inline mode: every program took the message.
pub fn delivered(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: delivered as {id}"))
}

/// Inline mode: a program failed temporarily; nothing stays queued.
pub const INLINE_TEMPORARY: Reply = Reply::fixed(
    451,
    "4.3.0 Error: delivery failed temporarily, try again later",
);
/// Inline mode: a program refused the message.
pub const INLINE_PERMANENT: Reply = Reply::fixed(554, "5.3.0 Error: delivery failed");

/// Program trouble in inline mode; the spool could not be written.
pub const LOCAL_ERROR: Reply = Reply::fixed(451, "4.3.0 Error: queue file write error");
/// Disk full.
pub const INSUFFICIENT_STORAGE: Reply = Reply::fixed(452, "4.3.1 Insufficient system storage");
/// More than 50 `Received:` headers: a mail loop.
pub const TOO_MANY_HOPS: Reply = Reply::fixed(554, "5.4.6 Too many hops: mail loop");
pub const CONNECT_LIMIT: Reply =
    Reply::fixed(421, "4.4.2 Error: connection time limit exceeded, closing");
pub const IDLE_TIMEOUT: Reply = Reply::fixed(421, "4.4.2 Error: timeout exceeded, closing");
/// Access refused (deny, finicky, a host hook): the greeting.
pub const ACCESS_DENIED: Reply = Reply::fixed(554, "5.7.1 Access denied");
/// After a refusal, everything but QUIT.
pub const ONLY_QUIT: Reply = Reply::fixed(503, "5.7.1 Error: access denied, only QUIT is allowed");
/// The validate_sender hook said no.
pub const SENDER_REFUSED: Reply = Reply::fixed(550, "5.7.1 Sender address rejected: Access denied");
/// The validate_recipient hook said no.
pub const RECIPIENT_REFUSED: Reply =
    Reply::fixed(550, "5.7.1 Recipient address rejected: Access denied");
/// `message_rate_per_ip` exceeded, at MAIL.
pub const MESSAGE_RATE: Reply =
    Reply::fixed(450, "4.7.1 Error: too many messages from you, slow down");
/// `max_connections` reached.
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::fixed(421, "4.3.2 Too many connections, try again later");
/// `max_connections_per_ip` reached.
pub const TOO_MANY_FROM_YOU: Reply =
    Reply::fixed(421, "4.7.0 Error: too many connections from you");
/// `connection_rate_per_ip` exceeded.
pub const CONNECTION_RATE: Reply =
    Reply::fixed(421, "4.7.0 Error: too many connections from you, slow down");
/// The spool's disk is behind: intake waited for it and may not any longer.
pub const SPOOL_BEHIND: Reply = Reply::fixed(
    451,
    "4.3.2 The mail system is busy writing to disk, try again later",
);
/// STARTTLS accepted: the handshake follows this reply.
pub const READY_TO_START_TLS: Reply = Reply::fixed(220, "2.0.0 Ready to start TLS");
/// STARTTLS inside TLS (RFC 3207 4.2).
pub const TLS_ALREADY_ACTIVE: Reply = Reply::fixed(503, "5.5.1 Error: TLS already active");
/// STARTTLS on a node without `[tls]`.
pub const TLS_NOT_AVAILABLE: Reply = Reply::fixed(502, "5.5.1 Error: TLS not available");
/// STARTTLS inside a mail transaction (its state would not survive the reset).
pub const TLS_IN_TRANSACTION: Reply =
    Reply::fixed(503, "5.5.1 Error: MAIL transaction in progress");
/// After the handshake the session starts over (RFC 3207 4.2).
pub const NEED_EHLO: Reply = Reply::fixed(503, "5.5.1 Error: send EHLO first");
/// `[tls] require`: MAIL before STARTTLS (RFC 3207 4).
pub const TLS_REQUIRED: Reply = Reply::fixed(530, "5.7.0 Must issue a STARTTLS command first");
/// `[auth] dmarc_policy = "enforce"`: DMARC failed and the From: domain
/// asks for `p=reject` (RFC 7489 6.3).
pub const DMARC_REJECT: Reply = Reply::fixed(
    550,
    "5.7.1 Message rejected: DMARC policy of the From: domain (p=reject)",
);
/// `[auth] dmarc_policy = "enforce"`: the From: header names several
/// domains, which DMARC cannot vouch for (RFC 7489 6.6.1).
pub const SEVERAL_FROM_DOMAINS: Reply = Reply::fixed(
    550,
    "5.7.1 Message rejected: the From: header names several domains",
);
/// Intake paused by the operator.
pub const INTAKE_PAUSED: Reply = Reply::fixed(421, "4.3.2 Not accepting mail now, try again later");
pub const SHUTTING_DOWN: Reply = Reply::fixed(
    421,
    "4.3.2 Service shutting down, closing transmission channel",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line_wire_forms() {
        assert_eq!(OK.to_bytes(), b"250 2.0.0 Ok\r\n");
        assert_eq!(
            ehlo("mx", 10, false).to_bytes(),
            b"250-mx\r\n250-PIPELINING\r\n250-SIZE 10\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 HELP\r\n"
        );
        assert_eq!(
            ehlo("mx", 10, true).to_bytes(),
            b"250-mx\r\n250-PIPELINING\r\n250-SIZE 10\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-STARTTLS\r\n250 HELP\r\n"
        );
    }

    #[test]
    fn enhanced_code_is_found_only_when_present() {
        assert_eq!(MESSAGE_TOO_BIG.enhanced_code(), Some("5.3.4"));
        assert_eq!(greeting("mx").enhanced_code(), None);
        assert_eq!(START_DATA.enhanced_code(), None);
    }
}

//! One SMTP command line in, one [`Command`] out (RFC 5321 section 4.1, with the
//! length limits of 4.5.3.1). Pure: no I/O, no session state. The line has
//! already lost its CRLF; the codec enforces the 512-octet line limit.

use super::reply::{self, Reply};

/// RFC 5321 4.5.3.1.1: local part at most 64 octets.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 4.5.3.1.2: domain at most 255 octets.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 4.5.3.1.3: path (with its angle brackets) at most 256 octets.
pub const MAX_PATH: usize = 256;

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: Address,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// RFC 3207: the client asks to start TLS.
    StartTls,
}

/// The MAIL FROM path: `<>` (bounces) or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Address(Address),
}

impl ReversePath {
    /// The address as programs see it in `SENDER`: empty for `<>`.
    pub fn to_plain(&self) -> String {
        match self {
            ReversePath::Null => String::new(),
            ReversePath::Address(a) => a.to_plain(),
        }
    }
}

/// A mailbox. `local` holds the local part with any quoting undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub local: String,
    /// `None` only for the domain-less `<postmaster>` of RFC 5321 4.1.1.3.
    pub domain: Option<String>,
}

impl Address {
    /// `local@domain` with the quoting removed: the form programs receive in
    /// their environment and aliases are looked up by.
    pub fn to_plain(&self) -> String {
        match &self.domain {
            Some(d) => format!("{}@{}", self.local, d),
            None => self.local.clone(),
        }
    }

    /// The RFC 5321 form, quoting the local part when it is not a dot-string,
    /// for headers such as `Return-Path:`.
    pub fn to_smtp(&self) -> String {
        let local = if is_dot_string(self.local.as_bytes()) {
            self.local.clone()
        } else {
            let mut q = String::with_capacity(self.local.len() + 2);
            q.push('"');
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    q.push('\\');
                }
                q.push(c);
            }
            q.push('"');
            q
        };
        match &self.domain {
            Some(d) => format!("{local}@{d}"),
            None => local,
        }
    }

    /// Whether the address needs SMTPUTF8 (RFC 6531).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.as_deref().is_none_or(str::is_ascii)
    }
}

/// MAIL parameters we understand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// RFC 1870 declared size.
    pub size: Option<u64>,
    /// RFC 6152 `BODY=8BITMIME` (or `7BIT`).
    pub body_8bit: bool,
    /// RFC 6531 `SMTPUTF8`.
    pub smtputf8: bool,
}

/// Why a command line was refused; each maps to one reply of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command line too long")]
    LineTooLong,
    #[error("command not recognized")]
    UnknownCommand,
    #[error("syntax error in parameters")]
    Syntax,
    #[error("bad address syntax")]
    BadAddress,
    #[error("unsupported parameter")]
    UnsupportedParameter,
}

impl CommandError {
    /// The reply the client gets.
    pub fn reply(self) -> Reply {
        match self {
            CommandError::LineTooLong => reply::LINE_TOO_LONG,
            CommandError::UnknownCommand => reply::UNKNOWN_COMMAND,
            CommandError::Syntax => reply::SYNTAX_ERROR,
            CommandError::BadAddress => reply::BAD_ADDRESS,
            CommandError::UnsupportedParameter => reply::UNSUPPORTED_PARAMETER,
        }
    }
}

/// Parses one command line (without its line terminator).
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    // NUL and other control bytes have no place in a command; an attacker
    // uses them to make two programs disagree about where a field ends.
    if line.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(CommandError::Syntax);
    }
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let verb = &line[..verb_end];
    let known = [
        "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "STARTTLS",
    ]
    .into_iter()
    .find(|v| verb.eq_ignore_ascii_case(v.as_bytes()));
    let Some(verb) = known else {
        return Err(CommandError::UnknownCommand);
    };
    let rest = std::str::from_utf8(&line[verb_end..]).map_err(|_| CommandError::Syntax)?;
    // The same for the C1 controls and line separators of UTF-8 text: NEL,
    // U+2028 and U+2029 break lines for Unicode-aware programs that read
    // our headers. Plain ASCII was fully checked above and skips the scan.
    if !rest.is_ascii()
        && rest
            .chars()
            .any(|c| (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}')
    {
        return Err(CommandError::Syntax);
    }
    let arg = rest.trim_matches([' ', '\t']);
    match verb {
        "HELO" | "EHLO" => {
            if arg.is_empty() {
                return Err(CommandError::Syntax);
            }
            let name = arg.to_string();
            Ok(if verb == "HELO" {
                Command::Helo(name)
            } else {
                Command::Ehlo(name)
            })
        }
        "MAIL" => parse_mail(arg),
        "RCPT" => parse_rcpt(arg),
        // RFC 3207 4: STARTTLS takes no parameters (501).
        "DATA" | "RSET" | "QUIT" | "STARTTLS" => {
            if !arg.is_empty() {
                return Err(CommandError::Syntax);
            }
            Ok(match verb {
                "DATA" => Command::Data,
                "RSET" => Command::Rset,
                "STARTTLS" => Command::StartTls,
                _ => Command::Quit,
            })
        }
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        _ => {
            if arg.is_empty() {
                return Err(CommandError::Syntax);
            }
            Ok(Command::Vrfy)
        }
    }
}

fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| arg[keyword.len()..].trim_start_matches([' ', '\t']))
}

fn parse_mail(arg: &str) -> Result<Command, CommandError> {
    let rest = strip_keyword(arg, "FROM:").ok_or(CommandError::Syntax)?;
    let (path, params_text) = split_path(rest)?;
    let from = match parse_path(path, PathKind::Reverse)? {
        None => ReversePath::Null,
        Some(a) => ReversePath::Address(a),
    };
    let mut params = MailParams::default();
    for param in params_text.split([' ', '\t']).filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        if key.eq_ignore_ascii_case("SIZE") {
            let v = value.ok_or(CommandError::Syntax)?;
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CommandError::Syntax);
            }
            // A size too large for u64 is certainly above our limit.
            params.size = Some(v.parse().unwrap_or(u64::MAX));
        } else if key.eq_ignore_ascii_case("BODY") {
            match value {
                Some(v) if v.eq_ignore_ascii_case("8BITMIME") => params.body_8bit = true,
                Some(v) if v.eq_ignore_ascii_case("7BIT") => params.body_8bit = false,
                _ => return Err(CommandError::Syntax),
            }
        } else if key.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() {
                return Err(CommandError::Syntax);
            }
            params.smtputf8 = true;
        } else {
            return Err(CommandError::UnsupportedParameter);
        }
    }
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(arg: &str) -> Result<Command, CommandError> {
    let rest = strip_keyword(arg, "TO:").ok_or(CommandError::Syntax)?;
    let (path, params_text) = split_path(rest)?;
    if !params_text.trim().is_empty() {
        return Err(CommandError::UnsupportedParameter);
    }
    match parse_path(path, PathKind::Forward)? {
        Some(to) => Ok(Command::Rcpt { to }),
        None => Err(CommandError::BadAddress),
    }
}

/// Splits `<path> params` (or a bare address, which Postfix accepts too)
/// without being fooled by spaces or `>` inside a quoted local part.
fn split_path(text: &str) -> Result<(&str, &str), CommandError> {
    if text.is_empty() {
        return Err(CommandError::Syntax);
    }
    let bytes = text.as_bytes();
    let mut in_quotes = false;
    let mut escaped = false;
    let bracketed = bytes[0] == b'<';
    // Quoting exists only in the local part: a '"' in a source route or in
    // an address literal such as [tag:a"b] is an ordinary character.
    let mut in_route = bytes.get(usize::from(bracketed)) == Some(&b'@');
    let mut in_local = !in_route;
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quotes => escaped = true,
            b'"' if in_local => in_quotes = !in_quotes,
            b':' if in_route => {
                in_route = false;
                in_local = true;
            }
            b'@' if in_local && !in_quotes => in_local = false,
            b'>' if bracketed && !in_quotes => {
                let rest = &text[i + 1..];
                if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
                    return Err(CommandError::Syntax);
                }
                return Ok((&text[..=i], rest));
            }
            b' ' | b'\t' if !bracketed && !in_quotes => return Ok((&text[..i], &text[i..])),
            _ => {}
        }
    }
    if bracketed {
        Err(CommandError::BadAddress)
    } else {
        Ok((text, ""))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Reverse,
    Forward,
}

/// `<>` gives `None` (allowed for MAIL only).
fn parse_path(path: &str, kind: PathKind) -> Result<Option<Address>, CommandError> {
    // The limit counts the angle brackets; a client that left them out
    // must not get a longer address than one that wrote them.
    let brackets = if path.starts_with('<') { 0 } else { 2 };
    if path.len() + brackets > MAX_PATH {
        return Err(CommandError::BadAddress);
    }
    let inner = match path.strip_prefix('<') {
        Some(p) => p.strip_suffix('>').ok_or(CommandError::BadAddress)?,
        None => path,
    };
    if inner.is_empty() {
        return match kind {
            PathKind::Reverse => Ok(None),
            PathKind::Forward => Err(CommandError::BadAddress),
        };
    }
    // RFC 5321 4.1.1.3 / appendix C: a source route is accepted and ignored.
    let mailbox = if inner.starts_with('@') {
        let (route, mailbox) = inner.split_once(':').ok_or(CommandError::BadAddress)?;
        for hop in route.split(',') {
            let domain = hop.strip_prefix('@').ok_or(CommandError::BadAddress)?;
            if !is_domain(domain) {
                return Err(CommandError::BadAddress);
            }
        }
        mailbox
    } else {
        inner
    };
    parse_mailbox(mailbox, kind).map(Some)
}

fn parse_mailbox(mailbox: &str, kind: PathKind) -> Result<Address, CommandError> {
    let bytes = mailbox.as_bytes();
    let (local, after) = if bytes.first() == Some(&b'"') {
        let (local, consumed) = parse_quoted(bytes)?;
        (local, &mailbox[consumed..])
    } else {
        // A dot-string has no '@': the first one ends it (an address literal
        // after it may hold more).
        let end = mailbox.find('@').unwrap_or(mailbox.len());
        let local = &mailbox[..end];
        if !is_dot_string(local.as_bytes()) {
            return Err(CommandError::BadAddress);
        }
        (local.to_string(), &mailbox[end..])
    };
    if local.len() > MAX_LOCAL_PART {
        return Err(CommandError::BadAddress);
    }
    let domain = match after.strip_prefix('@') {
        Some(d) => {
            if d.len() > MAX_DOMAIN || !is_domain(d) {
                return Err(CommandError::BadAddress);
            }
            Some(d.to_string())
        }
        None if after.is_empty()
            && kind == PathKind::Forward
            && local.eq_ignore_ascii_case("postmaster") =>
        {
            None
        }
        None => return Err(CommandError::BadAddress),
    };
    if local.is_empty() {
        return Err(CommandError::BadAddress);
    }
    Ok(Address { local, domain })
}

/// Parses a quoted-string at the start of `bytes`; returns the unquoted text
/// and the number of bytes consumed.
fn parse_quoted(bytes: &[u8]) -> Result<(String, usize), CommandError> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let text = String::from_utf8(out).map_err(|_| CommandError::BadAddress)?;
                return Ok((text, i + 1));
            }
            b'\\' => {
                let next = *bytes.get(i + 1).ok_or(CommandError::BadAddress)?;
                if !(0x20..=0x7e).contains(&next) {
                    return Err(CommandError::BadAddress);
                }
                out.push(next);
                i += 2;
            }
            b if b >= 0x20 && b != 0x7f => {
                out.push(b);
                i += 1;
            }
            _ => return Err(CommandError::BadAddress),
        }
    }
    Err(CommandError::BadAddress)
}

/// RFC 5321 atext, widened to UTF-8 octets by RFC 6531.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

fn is_dot_string(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)))
}

/// A domain name or an address literal (`[192.0.2.1]`, `[IPv6:...]`).
pub fn is_domain(d: &str) -> bool {
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return false;
    }
    if d.starts_with('[') {
        return is_address_literal(d);
    }
    d.split('.').all(|label| is_label(label, true))
}

/// RFC 5321 4.1.3, brackets included: an IPv4 address, `IPv6:` and an IPv6
/// address, or a general literal `tag:content` (tag letters, digits and
/// inner hyphens; content printable, without `[`, `]` and `\`, and, stricter
/// than the RFC, without `<` and `>`, which would end a path in brackets).
pub fn is_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    if inner.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let Some((tag, content)) = inner.split_once(':') else {
        return false;
    };
    if tag.eq_ignore_ascii_case("IPv6") {
        return content.parse::<std::net::Ipv6Addr>().is_ok();
    }
    is_label(tag, false)
        && !content.is_empty()
        && content
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !b"[]\\<>".contains(&b))
}

/// One DNS label: letters, digits and inner hyphens, at most 63 octets;
/// with `utf8`, also the UTF-8 octets of an SMTPUTF8 (U-label) domain.
pub fn is_label(label: &str, utf8: bool) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (utf8 && b >= 0x80))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(local: &str, domain: &str) -> Address {
        Address {
            local: local.into(),
            domain: Some(domain.into()),
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse(b"quit"), Ok(Command::Quit));
        assert_eq!(parse(b"NoOp"), Ok(Command::Noop));
        assert_eq!(
            parse(b"ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse(b"HELO x"), Ok(Command::Helo("x".into())));
    }

    #[test]
    fn unknown_and_malformed_commands() {
        assert_eq!(parse(b"FOO"), Err(CommandError::UnknownCommand));
        assert_eq!(parse(b""), Err(CommandError::UnknownCommand));
        assert_eq!(
            parse(b"MAILX FROM:<a@b>"),
            Err(CommandError::UnknownCommand)
        );
        assert_eq!(parse(b"EHLO"), Err(CommandError::Syntax));
        assert_eq!(parse(b"DATA now"), Err(CommandError::Syntax));
        assert_eq!(parse(b"VRFY"), Err(CommandError::Syntax));
        assert_eq!(parse(b"VRFY someone"), Ok(Command::Vrfy));
        assert_eq!(parse(b"MAIL TO:<a@b>"), Err(CommandError::Syntax));
        assert_eq!(parse(b"RCPT <a@b>"), Err(CommandError::Syntax));
    }

    #[test]
    fn nul_and_control_bytes_are_syntax_errors() {
        assert_eq!(parse(b"HELO a\0b"), Err(CommandError::Syntax));
        assert_eq!(parse(b"MAIL FROM:<a\0@b>"), Err(CommandError::Syntax));
        assert_eq!(parse(b"HELO a\rb"), Err(CommandError::Syntax));
        assert_eq!(parse(b"NOOP \x7f"), Err(CommandError::Syntax));
        assert_eq!(parse(b"MAIL\0FROM:<a@b>"), Err(CommandError::Syntax));
        assert_eq!(parse(b"\0"), Err(CommandError::Syntax));
        // C1 controls in UTF-8 text: NEL (U+0085) in a name and an address.
        assert_eq!(parse("HELO a\u{85}b".as_bytes()), Err(CommandError::Syntax));
        assert_eq!(
            parse("RCPT TO:<a\u{9b}@b> SMTPUTF8".as_bytes()),
            Err(CommandError::Syntax)
        );
        assert_eq!(
            parse("MAIL FROM:<a\u{2028}@b> SMTPUTF8".as_bytes()),
            Err(CommandError::Syntax)
        );
        // TAB is whitespace, as in headers.
        assert_eq!(parse(b"HELO a\tb"), Ok(Command::Helo("a\tb".into())));
    }

    #[test]
    fn address_literals_follow_rfc_5321() {
        for good in [
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[ipv6:::ffff:192.0.2.1]",
            "[x-tag:any=thing@here]",
        ] {
            assert!(is_address_literal(good), "{good}");
            assert!(is_domain(good), "{good}");
        }
        for bad in [
            "[]",
            "[I@v]",
            "[192.0.2.256]",
            "[IPv6:192.0.2.1]",
            "[-tag:x]",
            "[tag:]",
            "[tag:a]b]",
            "[tag:a>b]",
            "192.0.2.1]",
        ] {
            assert!(!is_address_literal(bad), "{bad}");
            assert!(!is_domain(bad), "{bad}");
        }
        // A quote in a literal is no quoting, bracketed or not.
        for line in [
            &b"RCPT TO:<bob@[x-tag:a\"b]>"[..],
            b"RCPT TO:bob@[x-tag:a\"b]",
        ] {
            assert_eq!(
                parse(line),
                Ok(Command::Rcpt {
                    to: addr("bob", "[x-tag:a\"b]")
                }),
                "{line:?}"
            );
        }
        // After a source route the local part may be quoted.
        assert_eq!(
            parse(b"RCPT TO:<@r.example:\"a b\"@example.org>"),
            Ok(Command::Rcpt {
                to: addr("a b", "example.org")
            })
        );
        // The local part ends at the first '@', whatever the literal holds.
        assert_eq!(
            parse(b"RCPT TO:<bob@[x-tag:a@b]>"),
            Ok(Command::Rcpt {
                to: addr("bob", "[x-tag:a@b]")
            })
        );
    }

    #[test]
    fn mail_paths_and_parameters() {
        assert_eq!(
            parse(b"MAIL FROM:<>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                params: MailParams::default()
            })
        );
        assert_eq!(
            parse(b"mail from: <a@b.example> SIZE=100 BODY=8BITMIME SMTPUTF8"),
            Ok(Command::Mail {
                from: ReversePath::Address(addr("a", "b.example")),
                params: MailParams {
                    size: Some(100),
                    body_8bit: true,
                    smtputf8: true
                }
            })
        );
        assert_eq!(
            parse(b"MAIL FROM:a@b.example"),
            Ok(Command::Mail {
                from: ReversePath::Address(addr("a", "b.example")),
                params: MailParams::default()
            })
        );
        assert_eq!(parse(b"MAIL FROM:<a@b> SIZE=x"), Err(CommandError::Syntax));
        assert_eq!(parse(b"MAIL FROM:<a@b> SIZE"), Err(CommandError::Syntax));
        assert_eq!(
            parse(b"MAIL FROM:<a@b> BODY=9BIT"),
            Err(CommandError::Syntax)
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b> RET=FULL"),
            Err(CommandError::UnsupportedParameter)
        );
        assert_eq!(parse(b"MAIL FROM:<a@b>x"), Err(CommandError::Syntax));
        assert_eq!(
            parse(b"MAIL FROM:<a@b> SIZE=99999999999999999999999"),
            Ok(Command::Mail {
                from: ReversePath::Address(addr("a", "b")),
                params: MailParams {
                    size: Some(u64::MAX),
                    ..MailParams::default()
                }
            })
        );
    }

    #[test]
    fn rcpt_paths() {
        assert_eq!(
            parse(b"RCPT TO:<support+x@example.org>"),
            Ok(Command::Rcpt {
                to: addr("support+x", "example.org")
            })
        );
        assert_eq!(
            parse(b"RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt {
                to: Address {
                    local: "Postmaster".into(),
                    domain: None
                }
            })
        );
        assert_eq!(parse(b"RCPT TO:<>"), Err(CommandError::BadAddress));
        assert_eq!(parse(b"RCPT TO:<support>"), Err(CommandError::BadAddress));
        assert_eq!(
            parse(b"RCPT TO:<a@b> NOTIFY=NEVER"),
            Err(CommandError::UnsupportedParameter)
        );
        assert_eq!(
            parse(b"RCPT TO:<@relay.example,@r2.example:user@example.org>"),
            Ok(Command::Rcpt {
                to: addr("user", "example.org")
            })
        );
    }

    #[test]
    fn quoted_local_parts_keep_shell_metacharacters_as_data() {
        let cmd = parse(br#"RCPT TO:<"support+$(touch /tmp/x); `id` \"q\" >"@example.org>"#);
        let Ok(Command::Rcpt { to }) = cmd else {
            panic!("not parsed: {cmd:?}");
        };
        assert_eq!(to.local, r#"support+$(touch /tmp/x); `id` "q" >"#);
        assert_eq!(
            to.to_smtp(),
            r#""support+$(touch /tmp/x); `id` \"q\" >"@example.org"#
        );
        assert_eq!(
            to.to_plain(),
            r#"support+$(touch /tmp/x); `id` "q" >@example.org"#
        );
    }

    #[test]
    fn malformed_addresses() {
        for bad in [
            &b"RCPT TO:<a@@b>"[..],
            b"RCPT TO:<a@b..c>",
            b"RCPT TO:<a@-b>",
            b"RCPT TO:<.a@b>",
            b"RCPT TO:<a.@b>",
            b"RCPT TO:<a b@c>",
            b"RCPT TO:<a@b",
            b"RCPT TO:<\"unterminated@b>",
            b"RCPT TO:<@b>",
            b"RCPT TO:<a@>",
            b"RCPT TO:<a@b.>",
        ] {
            assert_eq!(
                parse(bad),
                Err(CommandError::BadAddress),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn rfc5321_length_limits() {
        let local64 = "a".repeat(64);
        let ok = format!("RCPT TO:<{local64}@b>");
        assert!(parse(ok.as_bytes()).is_ok());
        let local65 = format!("RCPT TO:<{}@b>", "a".repeat(65));
        assert_eq!(parse(local65.as_bytes()), Err(CommandError::BadAddress));
        // 4 labels of 63 + 3 dots = 255: the longest domain.
        let domain255 = vec!["d".repeat(63); 4].join(".");
        assert_eq!(domain255.len(), 255);
        assert!(is_domain(&domain255));
        let domain256 = format!("x{domain255}");
        assert!(!is_domain(&domain256));
        // A path over 256 octets is refused even when its parts are in range.
        let long_path = format!(
            "RCPT TO:<{}@{}>",
            "a".repeat(60),
            vec!["d".repeat(60); 4].join(".")
        );
        assert!(long_path.len() - "RCPT TO:".len() > MAX_PATH);
        assert_eq!(parse(long_path.as_bytes()), Err(CommandError::BadAddress));
        // The same limit without brackets: 255 octets of address plus the
        // two brackets it would have had.
        let bare = format!(
            "{}@{}",
            "a".repeat(60),
            vec!["d".repeat(60); 3].join(".") + "." + &"d".repeat(11)
        );
        assert_eq!(bare.len(), 255);
        assert_eq!(
            parse(format!("RCPT TO:{bare}").as_bytes()),
            Err(CommandError::BadAddress)
        );
        assert!(parse(format!("RCPT TO:{}", &bare[1..]).as_bytes()).is_ok());
    }

    #[test]
    fn utf8_addresses_are_parsed_and_flagged() {
        let Ok(Command::Rcpt { to }) = parse("RCPT TO:<jörg@bücher.example>".as_bytes()) else {
            panic!("utf-8 address refused");
        };
        assert!(!to.is_ascii());
        assert_eq!(parse(b"HELO \xff"), Err(CommandError::Syntax));
    }

    #[test]
    fn errors_map_to_contract_replies() {
        assert_eq!(CommandError::LineTooLong.reply().code(), 500);
        assert_eq!(
            CommandError::LineTooLong.reply().enhanced_code(),
            Some("5.5.6")
        );
        assert_eq!(
            CommandError::UnknownCommand.reply().enhanced_code(),
            Some("5.5.2")
        );
        assert_eq!(CommandError::Syntax.reply().code(), 501);
        assert_eq!(CommandError::Syntax.reply().enhanced_code(), Some("5.5.4"));
        assert_eq!(
            CommandError::BadAddress.reply().enhanced_code(),
            Some("5.1.3")
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Local parts of every shape a client may send: dot-strings, and
        /// quoted strings of any printable ASCII (quotes and backslashes
        /// included).
        fn local_part() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\\.[a-zA-Z0-9_+-]{1,10}){0,2}",
                "[ -~]{1,30}",
            ]
        }

        fn domain() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}",
                "\\[(25[0-5]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|1[0-9]{2}|[1-9]?[0-9])){3}\\]",
            ]
        }

        proptest! {
            /// What `to_smtp` writes (Return-Path:, relay commands) parses back
            /// to the same address.
            #[test]
            fn an_address_survives_its_smtp_form(local in local_part(), domain in domain()) {
                let address = Address { local, domain: Some(domain) };
                let line = format!("RCPT TO:<{}>", address.to_smtp());
                prop_assert_eq!(parse(line.as_bytes()), Ok(Command::Rcpt { to: address }));
            }

            /// Whatever a client sends, no parsed name or address carries a
            /// control character (TAB, which headers allow, aside) into
            /// headers or program environments.
            #[test]
            fn parsed_fields_never_hold_control_characters(
                line in proptest::collection::vec(
                    prop_oneof![
                        any::<char>(),
                        Just('\u{85}'),
                        Just('\u{2028}'),
                        Just('\u{2029}'),
                        Just('\r'),
                        Just('<'),
                        Just('>'),
                        Just('"'),
                        Just('\\'),
                        Just('@'),
                    ],
                    0..40,
                ),
                verb in prop_oneof![Just("HELO "), Just("EHLO "), Just("MAIL FROM:<"), Just("RCPT TO:<")],
            ) {
                let mut full = verb.as_bytes().to_vec();
                full.extend_from_slice(line.iter().collect::<String>().as_bytes());
                let fields: Vec<String> = match parse(&full) {
                    Ok(Command::Helo(name) | Command::Ehlo(name)) => vec![name],
                    Ok(Command::Mail { from: ReversePath::Address(a), .. }) | Ok(Command::Rcpt { to: a }) => {
                        vec![a.local, a.domain.unwrap_or_default()]
                    }
                    _ => Vec::new(),
                };
                for field in fields {
                    prop_assert!(
                        !field.chars().any(|c| (c.is_control() && c != '\t')
                            || c == '\u{2028}'
                            || c == '\u{2029}'),
                        "{:?} from {:?}",
                        field,
                        full
                    );
                }
            }
        }
    }
}

//! Sender authentication (`[auth]`): SPF, DKIM and DMARC, checked with
//! mail-auth over its hickory resolver, so that programs can trust who a
//! message is from. SPF is asked when MAIL arrives; DKIM and DMARC at the
//! end of DATA, on the message as it was received. The verdict becomes one
//! `Authentication-Results:` header (RFC 8601) and the `AUTH_*` variables,
//! and travels in the envelope.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::dkim::DkimError;
use mail_auth::dmarc::Policy;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcResult,
    MessageAuthenticator, SpfOutput, SpfResult,
};

use crate::config::{AuthConfig, DmarcPolicy};
use crate::telemetry;

/// Why the resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("auth: cannot set up the DNS resolver: {0}")]
pub struct AuthSetupError(String);

/// A result as RFC 8601 spells it, and as programs get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Pass,
    Neutral,
    TempError,
    SoftFail,
    Fail,
    PermError,
    None,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::SoftFail => "softfail",
            Outcome::Neutral => "neutral",
            Outcome::None => "none",
            Outcome::TempError => "temperror",
            Outcome::PermError => "permerror",
        }
    }

    fn of_spf(result: SpfResult) -> Self {
        match result {
            SpfResult::Pass => Outcome::Pass,
            SpfResult::Fail => Outcome::Fail,
            SpfResult::SoftFail => Outcome::SoftFail,
            SpfResult::Neutral => Outcome::Neutral,
            SpfResult::TempError => Outcome::TempError,
            SpfResult::PermError => Outcome::PermError,
            SpfResult::None => Outcome::None,
        }
    }

    fn of_dkim(result: &DkimResult) -> Self {
        match result {
            DkimResult::Pass => Outcome::Pass,
            // A signature whose body hash does not match failed its test
            // (RFC 6376 6.3), whatever mail-auth calls it.
            DkimResult::Neutral(mail_auth::Error::Dkim(DkimError::FailedBodyHashMatch)) => {
                Outcome::Fail
            }
            DkimResult::Neutral(_) => Outcome::Neutral,
            DkimResult::Fail(_) => Outcome::Fail,
            DkimResult::PermError(_) => Outcome::PermError,
            DkimResult::TempError(_) => Outcome::TempError,
            DkimResult::None => Outcome::None,
        }
    }

    fn of_dmarc(result: &DmarcResult) -> Self {
        match result {
            DmarcResult::Pass => Outcome::Pass,
            DmarcResult::Fail(_) => Outcome::Fail,
            DmarcResult::TempError(_) => Outcome::TempError,
            DmarcResult::PermError(_) => Outcome::PermError,
            DmarcResult::None => Outcome::None,
        }
    }
}

/// What SPF said about a transaction, asked when MAIL arrived.
#[derive(Debug, Clone)]
pub struct SpfVerdict {
    output: SpfOutput,
    /// MAIL FROM as given (plain form), empty for `<>`.
    sender: String,
    helo: String,
    client: IpAddr,
}

/// The whole verdict on a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub spf: String,
    /// The best of the signatures.
    pub dkim: String,
    pub dmarc: String,
    /// The `From:` header's domain, lowercased.
    pub from_domain: String,
    /// `Authentication-Results: ...`, LF line ends, ending in LF.
    pub header: String,
    /// `dmarc_policy = "enforce"` refuses the message, and why.
    pub refusal: Option<Refusal>,
}

/// Why `enforce` refuses a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// DMARC failed and the From: domain asks for `p=reject`.
    DmarcReject,
    /// The From: header names more than one domain.
    SeveralFromDomains,
}

/// The node's checker: one resolver (with its cache) for every session.
pub struct Authenticator {
    inner: MessageAuthenticator,
    authserv_id: String,
    enforce: bool,
    /// One DKIM signature: its key, asked over UDP then TCP.
    signature_budget: Duration,
    /// Bounds on SPF and on DMARC, over the resolver's own per-question
    /// timeout: a DNS server that never answers gives temperror.
    spf_budget: Duration,
    dmarc_budget: Duration,
}

/// SPF may ask this many questions one after another (its includes and
/// redirects); RFC 7208 4.6.4 allows 10 look-ups, most answered from cache.
const SPF_QUESTIONS_IN_A_ROW: u32 = 4;
/// DMARC: the From: domain's record, then the organizational domain's.
const DMARC_QUESTIONS_IN_A_ROW: u32 = 3;
/// DKIM-Signature fields checked per message, the first ones: each may cost
/// a DNS question and a pass over the body, and a sender gains nothing
/// from more.
pub const MAX_SIGNATURES: usize = 8;
/// A DKIM-Signature field longer than this is not checked: real ones are
/// under 1 KiB, and mail-auth's work grows with the square of `h=`.
const SIGNATURE_FIELD: usize = 4096;
/// Of one value we write into the header (a domain, a selector, a reason).
const VALUE_LIMIT: usize = 255;
/// The whole `Authentication-Results:` header.
const HEADER_LIMIT: usize = 8192;

impl Authenticator {
    /// `authserv_id` is the node's hostname when the config leaves it empty.
    pub fn new(config: &AuthConfig, hostname: &str) -> Result<Self, AuthSetupError> {
        let mut options = ResolverOpts::default();
        options.timeout = config.dns_timeout;
        options.attempts = 1;
        let inner = if config.nameservers.is_empty() {
            let (resolvers, mut system) =
                mail_auth::hickory_resolver::system_conf::read_system_conf()
                    .map_err(|e| AuthSetupError(format!("/etc/resolv.conf: {e}")))?;
            system.timeout = config.dns_timeout;
            system.attempts = 1;
            MessageAuthenticator::new(resolvers, system)
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), options)
        }
        .map_err(|e| AuthSetupError(e.to_string()))?;
        let authserv_id = if config.authserv_id.is_empty() {
            hostname.to_string()
        } else {
            config.authserv_id.clone()
        };
        Ok(Authenticator {
            inner,
            authserv_id,
            enforce: config.dmarc_policy == DmarcPolicy::Enforce,
            signature_budget: config.dns_timeout * 2 + Duration::from_secs(1),
            spf_budget: config.dns_timeout * SPF_QUESTIONS_IN_A_ROW + Duration::from_secs(1),
            dmarc_budget: config.dns_timeout * DMARC_QUESTIONS_IN_A_ROW + Duration::from_secs(1),
        })
    }

    /// The node's checker when `[auth] enabled`: what `serve` and `inetd`
    /// share.
    pub fn for_config(config: &crate::config::Config) -> Result<Option<Arc<Self>>, AuthSetupError> {
        if !config.auth.enabled {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self::new(&config.auth, &config.hostname)?)))
    }

    pub fn authserv_id(&self) -> &str {
        &self.authserv_id
    }

    /// SPF for the MAIL FROM identity, or the HELO identity for `<>`.
    pub async fn spf(self: Arc<Self>, client: IpAddr, helo: String, sender: String) -> SpfVerdict {
        let params = if sender.is_empty() {
            SpfParameters::verify_ehlo(client, &helo, &self.authserv_id)
        } else {
            SpfParameters::verify_mail_from(client, &helo, &self.authserv_id, &sender)
        };
        let output =
            match tokio::time::timeout(self.spf_budget, self.inner.verify_spf(params)).await {
                Ok(output) => output,
                Err(_) => {
                    let domain = match sender.rsplit_once('@') {
                        Some((_, domain)) => domain,
                        None => helo.as_str(),
                    };
                    SpfOutput::new(domain.to_string()).with_result(SpfResult::TempError)
                }
            };
        SpfVerdict {
            output,
            sender,
            helo,
            client,
        }
    }

    /// DKIM and DMARC on `message` (as received, our `Received:` first),
    /// with the SPF verdict of its transaction.
    pub async fn verify(&self, message: &[u8], spf: &SpfVerdict) -> Verdict {
        let spf_outcome = Outcome::of_spf(spf.output.result());
        // mail-auth parses and hashes every DKIM-Signature field before
        // anything can be bounded, in time that grows with their number and
        // size: at most MAX_SIGNATURES fields of at most SIGNATURE_FIELD
        // bytes reach it (a copy without the others, only then).
        let trimmed;
        let message = match without_excess_signatures(message) {
            Some(copy) => {
                trimmed = copy;
                &trimmed[..]
            }
            None => message,
        };
        // The spool keeps LF line ends. mail-auth canonicalizes those as
        // CRLF, except that it cuts an `l=` body on the bytes as stored:
        // for such a signature it gets the message with CRLF (a copy, so
        // only then).
        let with_crlf;
        let message = if has_length_limit(message) {
            with_crlf = crlf_line_ends(message);
            &with_crlf[..]
        } else {
            message
        };
        // Not strict: signatures with `l=` are verified (mail-auth's strict
        // mode refuses them outright); content after the signed length is
        // dealt with below.
        let Some(parsed) = AuthenticatedMessage::parse_with_opts(message, None, false) else {
            // Not even headers: nothing to verify, and no From: to align.
            return self.finish(spf, spf_outcome, Outcome::None, Outcome::None, "", None);
        };
        // Several From: domains (RFC 7489 6.6.1): DMARC cannot vouch for
        // the message, and under enforce it is refused.
        let mut from_domains: Vec<String> = parsed
            .froms()
            .iter()
            .map(|f| f.rsplit_once('@').map_or("", |(_, d)| d).to_lowercase())
            .collect();
        from_domains.sort();
        from_domains.dedup();
        let several_from = from_domains.len() > 1;
        let from_domain = if several_from {
            String::new()
        } else {
            plausible_domain(parsed.from().rsplit_once('@').map_or("", |(_, d)| d))
        };
        let body_len = signed_body_len(&message[parsed.body_offset as usize..]);

        // Each signature is checked on its own, all at once, each within
        // its own budget: one whose DNS never answers is a temperror of its
        // own and cannot use up the time of the others or of DMARC (which
        // would turn an enforced p=reject into a temperror that lets the
        // mail in). A temperror of a signature of another domain than the
        // From: domain's does not keep DMARC from failing.
        let singles: Vec<AuthenticatedMessage<'_>> = if parsed.dkim_headers.len() > 1 {
            parsed
                .dkim_headers
                .iter()
                .enumerate()
                .map(|(n, signature)| {
                    let mut single = parsed.clone();
                    single.dkim_headers = vec![signature.clone()];
                    // Malformed signatures are reported once, not per copy.
                    if n > 0 {
                        single.errors.clear();
                    }
                    single
                })
                .collect()
        } else {
            // The usual case, one signature or none: checked in place.
            Vec::new()
        };
        let checked = if singles.is_empty() {
            vec![self.check_signatures(&parsed).await]
        } else {
            futures_util::future::join_all(singles.iter().map(|s| self.check_signatures(s))).await
        };
        let outputs: Vec<DkimOutput<'_>> = checked.into_iter().flatten().collect();
        // A signature that covers only part of the body (`l=`) says
        // nothing of what follows: the classic way to append a forged text
        // to a genuine message. It counts as neutral, for the programs and
        // for DMARC alike.
        let partial = |o: &DkimOutput<'_>| {
            o.signature()
                .is_some_and(|s| s.l > 0 && body_len > s.l && *o.result() == DkimResult::Pass)
        };
        let verdicts: Vec<(Outcome, Option<String>)> = outputs
            .iter()
            .map(|o| match o.signature() {
                Some(signature) if partial(o) => (
                    Outcome::Neutral,
                    Some(format!("content after l={} is unsigned", signature.l)),
                ),
                _ => (Outcome::of_dkim(o.result()), None),
            })
            .collect();
        let whole: Vec<DkimOutput<'_>> = outputs.iter().filter(|o| !partial(o)).cloned().collect();
        let best_dkim = verdicts
            .iter()
            .map(|(outcome, _)| *outcome)
            .min()
            .unwrap_or(Outcome::None);

        let mail_from_domain = match spf.sender.rsplit_once('@') {
            Some((_, domain)) => domain.to_string(),
            None => spf.helo.clone(),
        };
        let dmarc = tokio::time::timeout(
            self.dmarc_budget,
            self.inner
                .verify_dmarc(mail_auth::dmarc::verify::DmarcParameters::new(
                    &parsed,
                    &whole,
                    &mail_from_domain,
                    &spf.output,
                )),
        )
        .await;
        let (dmarc, policy, header) = match dmarc {
            Ok(dmarc) => {
                let others = AuthenticationResults::new(&self.authserv_id)
                    .with_spf_mailfrom_result(&spf.output, spf.client, &spf.sender, &spf.helo)
                    .with_dmarc_result(&dmarc)
                    .to_string();
                let header = format!(
                    "{}{}{}",
                    self.authserv_id,
                    dkim_results(&outputs, &verdicts),
                    others
                        .strip_prefix(self.authserv_id.as_str())
                        .unwrap_or(&others)
                );
                (
                    Outcome::of_dmarc(&dmarc.result()),
                    dmarc.policy(),
                    Some(header),
                )
            }
            Err(_) => (Outcome::TempError, Policy::Unspecified, None),
        };
        if several_from {
            let mut verdict =
                self.finish(spf, spf_outcome, best_dkim, Outcome::PermError, "", None);
            verdict.refusal = self.enforce.then_some(Refusal::SeveralFromDomains);
            return verdict;
        }
        let mut verdict = self.finish(spf, spf_outcome, best_dkim, dmarc, &from_domain, header);
        verdict.refusal = (self.enforce && dmarc == Outcome::Fail && policy == Policy::Reject)
            .then_some(Refusal::DmarcReject);
        verdict
    }

    /// The signatures of `message`, within one signature's budget; past
    /// it, each is a temperror.
    async fn check_signatures<'x>(
        &self,
        message: &'x AuthenticatedMessage<'x>,
    ) -> Vec<DkimOutput<'x>> {
        match tokio::time::timeout(self.signature_budget, self.inner.verify_dkim(message)).await {
            Ok(outputs) => outputs,
            Err(_) => message
                .dkim_headers
                .iter()
                .map(|h| {
                    DkimOutput::temp_err(mail_auth::Error::Dns(mail_auth::DnsError::Resolver(
                        "no answer in time".into(),
                    )))
                    .with_signature(&h.header)
                })
                .collect(),
        }
    }

    fn finish(
        &self,
        spf: &SpfVerdict,
        spf_outcome: Outcome,
        dkim: Outcome,
        dmarc: Outcome,
        from_domain: &str,
        header: Option<String>,
    ) -> Verdict {
        for (method, outcome) in [("spf", spf_outcome), ("dkim", dkim), ("dmarc", dmarc)] {
            telemetry::auth_result(method, outcome.as_str());
        }
        let header = header.unwrap_or_else(|| {
            // What mail-auth would have written, with our own verdicts.
            let mail_from = if spf.sender.is_empty() {
                "<>".to_string()
            } else {
                spf.sender.clone()
            };
            format!(
                "{};\r\n\tdkim={};\r\n\tspf={} smtp.mailfrom={};\r\n\tdmarc={} header.from={}",
                self.authserv_id,
                dkim.as_str(),
                spf_outcome.as_str(),
                header_value(&mail_from),
                dmarc.as_str(),
                header_value(from_domain),
            )
        });
        Verdict {
            spf: spf_outcome.as_str().into(),
            dkim: dkim.as_str().into(),
            dmarc: dmarc.as_str().into(),
            from_domain: from_domain.to_string(),
            header: bounded_header(&header),
            refusal: None,
        }
    }
}

/// The `dkim=` entries of the header, one per signature, each with the
/// result as programs get it, why when it is not a pass, and the
/// signature's `header.d`, `header.s`, `header.i` and `header.b` (RFC 6008).
fn dkim_results(outputs: &[DkimOutput<'_>], verdicts: &[(Outcome, Option<String>)]) -> String {
    if outputs.is_empty() {
        return ";\r\n\tdkim=none".into();
    }
    let mut out = String::new();
    for (output, (outcome, ours)) in outputs.iter().zip(verdicts) {
        out.push_str(";\r\n\tdkim=");
        out.push_str(outcome.as_str());
        let why = match output.result() {
            _ if ours.is_some() => ours.clone(),
            DkimResult::Pass | DkimResult::None => None,
            DkimResult::Neutral(e)
            | DkimResult::Fail(e)
            | DkimResult::PermError(e)
            | DkimResult::TempError(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            out.push_str(&format!(" ({})", header_value(&why).replace('?', " ")));
        }
        if let Some(signature) = output.signature() {
            out.push_str(&format!(
                " header.d={} header.s={}",
                header_value(&signature.d),
                header_value(&signature.s)
            ));
            if !signature.i.is_empty() {
                out.push_str(&format!(" header.i={}", header_value(&signature.i)));
            }
            if let Some(prefix) = signature.b.get(..6) {
                out.push_str(&format!(" header.b={}", base64_of_six(prefix)));
            }
        }
    }
    out
}

/// The From: domain as programs get it in `AUTH_FROM_DOMAIN`: a domain
/// name's characters only (letters of any script, digits, dot, hyphen),
/// lowercased; anything else is not a domain and gives "".
fn plausible_domain(domain: &str) -> String {
    let plausible = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-' || c == '_');
    if plausible {
        domain.to_lowercase()
    } else {
        String::new()
    }
}

/// The first 8 base64 characters of a signature (6 bytes), which tell
/// signatures of one domain and selector apart.
fn base64_of_six(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(8);
    for group in bytes.chunks_exact(3) {
        let n = u32::from(group[0]) << 16 | u32::from(group[1]) << 8 | u32::from(group[2]);
        for shift in [18, 12, 6, 0] {
            out.push(char::from(ALPHABET[(n >> shift) as usize & 63]));
        }
    }
    out
}

/// The body's length as `l=` counts it (RFC 6376 3.5): with CRLF line
/// ends, trailing empty lines not counted.
fn signed_body_len(body: &[u8]) -> u64 {
    let mut end = body.len();
    while body[..end].ends_with(b"\r\n\r\n") {
        end -= 2;
    }
    end as u64
}

/// Whether a DKIM signature in the header section has an `l=` tag: a
/// look at the tag names of `DKIM-Signature:` fields, no hashing and no
/// copy.
fn has_length_limit(message: &[u8]) -> bool {
    let headers_end = message
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(message.len());
    let mut in_signature = false;
    for line in message[..headers_end].split(|&b| b == b'\n') {
        let value = match line.first() {
            Some(b' ' | b'\t') if in_signature => line,
            _ => {
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    in_signature = false;
                    continue;
                };
                in_signature = line[..colon]
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"DKIM-Signature");
                if !in_signature {
                    continue;
                }
                &line[colon + 1..]
            }
        };
        // A tag begins the value or follows a `;`: its name ends at `=`.
        let has_l = value.split(|&b| b == b';').any(|tag| {
            tag.split(|&b| b == b'=')
                .next()
                .is_some_and(|name| name.trim_ascii().eq_ignore_ascii_case(b"l"))
                && tag.contains(&b'=')
        });
        if has_l {
            return true;
        }
    }
    false
}

fn crlf_line_ends(message: &[u8]) -> Vec<u8> {
    let lines = message.iter().filter(|&&b| b == b'\n').count();
    let mut out = Vec::with_capacity(message.len() + lines);
    for &b in message {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The header as programs read it: LF line ends, at most HEADER_LIMIT
/// bytes (cut at a line end), ending in LF.
fn bounded_header(results: &str) -> String {
    let mut header = format!("Authentication-Results: {}", results.replace("\r\n", "\n"));
    if header.len() > HEADER_LIMIT {
        let mut cut = HEADER_LIMIT;
        while !header.is_char_boundary(cut) {
            cut -= 1;
        }
        header.truncate(header[..cut].rfind('\n').unwrap_or(cut));
    }
    header.push('\n');
    header
}

/// Copies `message` without the DKIM-Signature fields past the first
/// MAX_SIGNATURES, and without any longer than SIGNATURE_FIELD bytes;
/// `None` when there are none such (the usual case: no copy).
fn without_excess_signatures(message: &[u8]) -> Option<Vec<u8>> {
    let headers_end = message
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(message.len(), |p| p + 1);
    // (start, end, keep) of each DKIM-Signature field.
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    let mut current: Option<usize> = None;
    for line in message[..headers_end].split_inclusive(|&b| b == b'\n') {
        let continues = matches!(line.first(), Some(b' ' | b'\t'));
        if !continues {
            if let Some(start) = current.take() {
                fields.push((start, at));
            }
            let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
            if line[..name_end]
                .trim_ascii()
                .eq_ignore_ascii_case(b"DKIM-Signature")
            {
                current = Some(at);
            }
        }
        at += line.len();
    }
    if let Some(start) = current {
        fields.push((start, at));
    }
    let mut kept = 0;
    let dropped: Vec<(usize, usize)> = fields
        .into_iter()
        .filter(|(start, end)| {
            let keep = end - start <= SIGNATURE_FIELD && kept < MAX_SIGNATURES;
            kept += usize::from(keep);
            !keep
        })
        .collect();
    if dropped.is_empty() {
        return None;
    }
    let mut copy = Vec::with_capacity(message.len());
    let mut from = 0;
    for (start, end) in dropped {
        copy.extend_from_slice(&message[from..start]);
        from = end;
    }
    copy.extend_from_slice(&message[from..]);
    Some(copy)
}

/// Client text made safe for a header value we compose ourselves, and
/// bounded.
fn header_value(text: &str) -> String {
    text.chars()
        .take(VALUE_LIMIT)
        .map(|c| {
            if c.is_ascii_graphic() && !"();\\\"".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Messages larger than this are mapped rather than read: DKIM of a 25 MB
/// message costs no 25 MB of heap. Smaller ones are read: unmapping costs
/// every core a TLB flush, dearer than copying a few kilobytes.
const MAP_FROM: u64 = 1 << 20;

/// A received message, for DKIM.
pub(crate) enum MessageFile {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl MessageFile {
    pub(crate) fn open(path: &std::path::Path) -> Self {
        let opened = std::fs::File::open(path).and_then(|file| {
            let len = file.metadata()?.len();
            if len < MAP_FROM {
                let mut bytes = Vec::with_capacity(len as usize);
                std::io::Read::read_to_end(&mut &file, &mut bytes)?;
                return Ok(MessageFile::Read(bytes));
            }
            // SAFETY: the file is this session's own body in incoming/,
            // written and flushed; nothing truncates or rewrites it while
            // the map lives (the session holds it until the commit).
            unsafe { memmap2::Mmap::map(&file) }.map(MessageFile::Mapped)
        });
        opened.unwrap_or_else(|e| {
            // Nothing to verify: the checks then say none.
            tracing::warn!(path = %path.display(), "cannot read the message for DKIM: {e}");
            MessageFile::Read(Vec::new())
        })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            MessageFile::Mapped(map) => map,
            MessageFile::Read(bytes) => bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_prefixes_are_base64_as_rfc_6008_shows_them() {
        assert_eq!(base64_of_six(b"\x00\x00\x00\xff\xff\xff"), "AAAA////");
        assert_eq!(base64_of_six(b"Man Ma"), "TWFuIE1h");
    }

    #[test]
    fn an_l_tag_is_found_in_a_folded_signature_and_not_elsewhere() {
        let signed = b"Received: x\nDKIM-Signature: v=1; a=rsa-sha256;\n l=13; d=a.test; s=s;\n b=x\nSubject: l=1\n\nl=2\n";
        assert!(has_length_limit(signed));
        let unsigned =
            b"DKIM-Signature: v=1; d=l.test; bh=l=; b=x\nX-L: l=3\n\nDKIM-Signature: l=4\n";
        assert!(!has_length_limit(unsigned));
    }

    #[test]
    fn the_body_length_ignores_trailing_empty_lines_and_line_ends_become_crlf() {
        assert_eq!(signed_body_len(b"abc\r\n\r\n\r\n"), 5);
        assert_eq!(signed_body_len(b""), 0);
        assert_eq!(crlf_line_ends(b"a\nb\n"), b"a\r\nb\r\n");
    }

    #[test]
    fn at_most_eight_signature_fields_of_bounded_size_reach_mail_auth() {
        let mut usual = Vec::new();
        for n in 0..3 {
            usual
                .extend_from_slice(format!("DKIM-Signature: v=1; d=d{n}.test;\n b=x\n").as_bytes());
        }
        usual.extend_from_slice(b"From: a@b.test\n\nbody\n");
        assert_eq!(
            without_excess_signatures(&usual),
            None,
            "no copy when all fit"
        );

        let mut many = b"Received: x\n".to_vec();
        for n in 0..20 {
            many.extend_from_slice(format!("DKIM-Signature: v=1; d=d{n}.test;\n b=x\n").as_bytes());
        }
        many.extend_from_slice(b"DKIM-Signature: h=");
        many.extend(std::iter::repeat_n(b'a', SIGNATURE_FIELD));
        many.extend_from_slice(b"\nFrom: a@b.test\n\nDKIM-Signature: in the body\n");
        let kept = String::from_utf8(without_excess_signatures(&many).unwrap()).unwrap();
        assert_eq!(kept.matches("DKIM-Signature: v=1").count(), MAX_SIGNATURES);
        assert!(
            kept.contains("d=d7.test") && !kept.contains("d=d8.test"),
            "{kept}"
        );
        assert!(!kept.contains("h=aaa"));
        assert!(
            kept.starts_with("Received: x\n")
                && kept.ends_with("From: a@b.test\n\nDKIM-Signature: in the body\n")
        );
    }

    #[test]
    fn the_header_is_bounded_and_ends_a_line() {
        let long = format!(
            "mx.test;\r\n\tdkim=pass header.d={}",
            "a".repeat(3 * HEADER_LIMIT)
        );
        let header = bounded_header(&long);
        assert!(header.len() <= HEADER_LIMIT + 1, "{}", header.len());
        assert!(header.ends_with('\n') && header.starts_with("Authentication-Results: mx.test;"));
        assert_eq!(header_value(&"x".repeat(1000)).len(), VALUE_LIMIT);
    }

    #[test]
    fn the_best_dkim_result_is_the_most_favourable() {
        let mut all = [
            Outcome::None,
            Outcome::Fail,
            Outcome::Neutral,
            Outcome::Pass,
        ];
        all.sort();
        assert_eq!(all[0], Outcome::Pass);
        assert!(Outcome::TempError < Outcome::Fail);
    }
}

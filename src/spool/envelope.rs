//! The on-disk envelope: a versioned, length-prefixed binary record with a
//! checksum. No client-supplied byte is ever read as structure here (Exim's
//! 21Nails bugs came from a text format clients could forge): every field is
//! a counted string or a fixed-width number, in a fixed order.
//!
//! Layout: `MNQE` magic, u16 version, fields, CRC-32 of everything before it.
//! Integers are little-endian; strings are a u32 length and UTF-8 bytes.
//! Version 3 ends the fields with the body's length and CRC-32 (see
//! [`BodyCheck`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::aliases::Target;
use crate::delivery::status::EnhancedCode;

const MAGIC: &[u8; 4] = b"MNQE";
/// 2 added each delivery's status and history, and the Bounced state; 3 the
/// body check; 4 the TLS version and cipher; 5 the `[auth]` verdict; 6 the
/// HTTP and handler targets. Every older version is still read, and each
/// message is written in the oldest version that holds it (see [`encode`]).
const VERSION: u16 = 6;
/// No field of a sane envelope comes near this; a larger length is damage.
const MAX_FIELD: usize = 1 << 20;

/// The fate of one delivery so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not yet delivered; will be attempted (again).
    Pending,
    /// The program took it (exit 0) or the relay accepted it.
    Delivered,
    /// Failed permanently; to be returned to the sender.
    Failed,
    /// Failed, and the sender has been sent a delivery status notification.
    Bounced,
    /// Never to be attempted again: when the message was retried, the
    /// aliases in force no longer led its recipient to this target (see
    /// `queue::reexpand`).
    Superseded,
}

/// One attempt in a delivery's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub at: SystemTime,
    /// Enhanced status code of the outcome (RFC 3463): `2.0.0`, `4.3.0`, ...
    pub status: String,
    pub diagnostic: String,
}

/// The most attempts a delivery remembers (the newest are kept).
pub(crate) const HISTORY_LIMIT: usize = 32;

/// One recipient target of one message, tracked on its own: a retry never
/// runs a program again for a delivery that already succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub original_recipient: String,
    pub recipient: String,
    pub local: String,
    pub extension: String,
    pub domain: String,
    pub target: Target,
    pub state: DeliveryState,
    pub attempts: u32,
    pub last_attempt: Option<SystemTime>,
    pub last_error: String,
    /// Enhanced status code of the latest outcome; empty before any.
    pub status: String,
    pub history: Vec<Attempt>,
}

impl Delivery {
    /// A delivery not yet attempted.
    pub fn new(
        original_recipient: String,
        recipient: String,
        local: String,
        extension: String,
        domain: String,
        target: Target,
    ) -> Self {
        Delivery {
            original_recipient,
            recipient,
            local,
            extension,
            domain,
            target,
            state: DeliveryState::Pending,
            attempts: 0,
            last_attempt: None,
            last_error: String::new(),
            status: String::new(),
            history: Vec::new(),
        }
    }

    /// Records one attempt's outcome in the history (bounded).
    pub(crate) fn record(&mut self, at: SystemTime, status: EnhancedCode, diagnostic: &str) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.remove(0);
        }
        self.status = status.to_string();
        self.history.push(Attempt {
            at,
            status: self.status.clone(),
            diagnostic: diagnostic.to_string(),
        });
    }
}

/// A queued message's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    /// Plain form (quoting undone); empty for `<>`.
    pub sender: String,
    /// RFC 5321 form for `Return-Path: <...>`; empty for `<>`.
    pub return_path: String,
    pub arrival: SystemTime,
    pub client_address: String,
    pub client_helo: String,
    pub channel: String,
    pub size: u64,
    pub smtputf8: bool,
    pub body_8bit: bool,
    /// Parked: not attempted until released.
    pub held: bool,
    pub next_attempt: SystemTime,
    pub deliveries: Vec<Delivery>,
    /// What the body file held when the message was committed; `None` for
    /// messages queued by versions that fsynced before renaming.
    pub body_check: Option<BodyCheck>,
    /// The TLS protocol version the message came over (`TLSv1.3`); empty
    /// when it came in clear. Programs get it as `TLS_VERSION`.
    pub tls_version: String,
    /// The cipher suite, by its IANA name; empty in clear (`TLS_CIPHER`).
    pub tls_cipher: String,
    /// The sender authentication verdict; all empty without `[auth]`.
    pub auth: AuthRecord,
}

/// What `[auth]` found, as programs get it (`AUTH_*`) and the
/// `Authentication-Results:` header they read before the message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthRecord {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub from_domain: String,
    /// The whole header, LF line ends, ending in LF.
    pub header: String,
}

impl AuthRecord {
    fn is_empty(&self) -> bool {
        *self == AuthRecord::default()
    }
}

/// The length and CRC-32 of a message's body as committed. A commit renames
/// the sealed queue file into `queue/` before its fsync finishes (one flush
/// round per message), so after a power cut a message that was never
/// acknowledged may sit there with old or missing bytes; start-up after a
/// reboot reads each body against its check and sets such messages aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyCheck {
    pub len: u64,
    pub crc32: u32,
}

impl Envelope {
    /// Deliveries still to be attempted.
    pub fn pending(&self) -> impl Iterator<Item = (usize, &Delivery)> {
        self.deliveries
            .iter()
            .enumerate()
            .filter(|(_, d)| d.state == DeliveryState::Pending)
    }

    /// `DELIVERY_ID`: stable across retries of one delivery of one message.
    pub fn delivery_id(&self, index: usize) -> String {
        format!("{}.{}", self.id, index)
    }

    /// How much of the queue file is the message: the sealed envelope
    /// follows it. `None`: all of it (a body still in `incoming/`, or a
    /// message queued before bodies were sealed).
    pub fn body_len(&self) -> Option<u64> {
        self.body_check.map(|check| check.len)
    }

    /// A plain envelope for unit tests: a local client, a small message.
    #[cfg(test)]
    pub(crate) fn for_test(
        id: &str,
        sender: &str,
        arrival: SystemTime,
        deliveries: Vec<Delivery>,
    ) -> Envelope {
        Envelope {
            id: id.into(),
            sender: sender.into(),
            return_path: sender.into(),
            arrival,
            client_address: "127.0.0.1".into(),
            client_helo: "client".into(),
            channel: "local".into(),
            size: 1,
            smtputf8: false,
            body_8bit: false,
            held: false,
            next_attempt: arrival,
            deliveries,
            body_check: None,
            tls_version: String::new(),
            tls_cipher: String::new(),
            auth: AuthRecord::default(),
        }
    }

    /// [`Envelope::for_test`] with `recipients` deliveries to `r0@x`,
    /// `r1@x`, ..., each piped to `cat`.
    #[cfg(test)]
    pub(crate) fn for_test_piped(
        id: &str,
        sender: &str,
        recipients: usize,
        arrival: SystemTime,
    ) -> Envelope {
        let deliveries = (0..recipients)
            .map(|i| {
                Delivery::new(
                    format!("r{i}@x"),
                    format!("r{i}@x"),
                    format!("r{i}"),
                    String::new(),
                    "x".into(),
                    Target::Pipe {
                        command: "cat".into(),
                    },
                )
            })
            .collect();
        Envelope::for_test(id, sender, arrival, deliveries)
    }
}

/// Why bytes are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not an envelope (bad magic)")]
    BadMagic,
    #[error("unsupported envelope version {0}")]
    BadVersion(u16),
    #[error("envelope checksum mismatch")]
    BadChecksum,
    #[error("envelope truncated")]
    Truncated,
    #[error("envelope field too long")]
    TooLong,
    #[error("envelope field is not UTF-8")]
    BadUtf8,
    #[error("envelope has an unknown {0} tag")]
    BadTag(&'static str),
    #[error("envelope has trailing bytes")]
    Trailing,
    #[error("body does not match its envelope (a commit cut short by a power cut?)")]
    BodyMismatch,
}

/// Serialises an envelope.
pub(crate) fn encode(env: &Envelope) -> Vec<u8> {
    // Each message is written in the oldest version that holds it, so that
    // going back to a version before TLS or before [auth] still reads
    // what that version could have received.
    let in_clear = env.tls_version.is_empty() && env.tls_cipher.is_empty();
    let new_kinds = env
        .deliveries
        .iter()
        .any(|d| matches!(d.target, Target::Http { .. } | Target::Handler { .. }));
    let version: u16 = match (in_clear, env.auth.is_empty(), new_kinds) {
        (_, _, true) => VERSION,
        (true, true, false) => 3,
        (false, true, false) => 4,
        (_, false, false) => 5,
    };
    let mut w = Writer(Vec::with_capacity(256));
    w.0.extend_from_slice(MAGIC);
    w.0.extend_from_slice(&version.to_le_bytes());
    w.str(&env.id);
    w.str(&env.sender);
    w.str(&env.return_path);
    w.time(Some(env.arrival));
    w.str(&env.client_address);
    w.str(&env.client_helo);
    w.str(&env.channel);
    w.u64(env.size);
    w.flag(env.smtputf8);
    w.flag(env.body_8bit);
    w.flag(env.held);
    w.time(Some(env.next_attempt));
    w.u32(env.deliveries.len() as u32);
    for d in &env.deliveries {
        w.str(&d.original_recipient);
        w.str(&d.recipient);
        w.str(&d.local);
        w.str(&d.extension);
        w.str(&d.domain);
        match &d.target {
            Target::Pipe { command } => {
                w.u8(1);
                w.str(command);
            }
            Target::Forward { address } => {
                w.u8(2);
                w.str(address);
            }
            Target::Http { url } => {
                w.u8(3);
                w.str(url);
            }
            Target::Handler { name } => {
                w.u8(4);
                w.str(name);
            }
        }
        w.u8(match d.state {
            DeliveryState::Pending => 0,
            DeliveryState::Delivered => 1,
            DeliveryState::Failed => 2,
            DeliveryState::Bounced => 3,
            DeliveryState::Superseded => 4,
        });
        w.u32(d.attempts);
        w.time(d.last_attempt);
        w.str(&d.last_error);
        w.str(&d.status);
        w.u32(d.history.len() as u32);
        for a in &d.history {
            w.time(Some(a.at));
            w.str(&a.status);
            w.str(&a.diagnostic);
        }
    }
    w.flag(env.body_check.is_some());
    if let Some(check) = env.body_check {
        w.u64(check.len);
        w.u32(check.crc32);
    }
    if version >= 4 {
        w.str(&env.tls_version);
        w.str(&env.tls_cipher);
    }
    if version >= 5 {
        let a = &env.auth;
        for field in [&a.spf, &a.dkim, &a.dmarc, &a.from_domain, &a.header] {
            w.str(field);
        }
    }
    let crc = crc32fast::hash(&w.0);
    w.u32(crc);
    w.0
}

/// `env` as version 3 wrote it: nothing after the body check (what
/// [`encode`] writes for mail that came in clear).
#[cfg(test)]
pub(crate) fn encode_v3(env: &Envelope) -> Vec<u8> {
    let mut in_clear = env.clone();
    in_clear.tls_version.clear();
    in_clear.tls_cipher.clear();
    in_clear.auth = AuthRecord::default();
    encode(&in_clear)
}

/// `env` as version 2 wrote it: no body check after the deliveries.
#[cfg(test)]
pub(crate) fn encode_v2(env: &Envelope) -> Vec<u8> {
    let mut without_check = env.clone();
    without_check.body_check = None;
    let v3 = encode_v3(&without_check);
    // Drop the "no body check" flag before the CRC.
    let mut v2 = v3[..v3.len() - 5].to_vec();
    v2[4] = 2;
    let crc = crc32fast::hash(&v2).to_le_bytes();
    v2.extend_from_slice(&crc);
    v2
}

/// Parses an envelope, refusing anything damaged.
pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    if bytes.len() < MAGIC.len() + 2 + 4 {
        return Err(EnvelopeError::Truncated);
    }
    if &bytes[..4] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if !(1..=VERSION).contains(&version) {
        return Err(EnvelopeError::BadVersion(version));
    }
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored {
        return Err(EnvelopeError::BadChecksum);
    }
    let mut r = Reader {
        bytes: &body[6..],
        pos: 0,
    };
    let id = r.str()?;
    let sender = r.str()?;
    let return_path = r.str()?;
    let arrival = r.time()?.unwrap_or(UNIX_EPOCH);
    let client_address = r.str()?;
    let client_helo = r.str()?;
    let channel = r.str()?;
    let size = r.u64()?;
    let smtputf8 = r.flag()?;
    let body_8bit = r.flag()?;
    let held = r.flag()?;
    let next_attempt = r.time()?.unwrap_or(UNIX_EPOCH);
    let count = r.u32()? as usize;
    let mut deliveries = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let original_recipient = r.str()?;
        let recipient = r.str()?;
        let local = r.str()?;
        let extension = r.str()?;
        let domain = r.str()?;
        let target = match r.u8()? {
            1 => Target::Pipe { command: r.str()? },
            2 => Target::Forward { address: r.str()? },
            3 if version >= 6 => Target::Http { url: r.str()? },
            4 if version >= 6 => Target::Handler { name: r.str()? },
            _ => return Err(EnvelopeError::BadTag("target")),
        };
        let state = match r.u8()? {
            0 => DeliveryState::Pending,
            1 => DeliveryState::Delivered,
            2 => DeliveryState::Failed,
            3 => DeliveryState::Bounced,
            4 => DeliveryState::Superseded,
            _ => return Err(EnvelopeError::BadTag("state")),
        };
        let attempts = r.u32()?;
        let last_attempt = r.time()?;
        let last_error = r.str()?;
        let (status, entries) = if version >= 2 {
            (r.str()?, r.u32()? as usize)
        } else {
            (String::new(), 0)
        };
        let mut history = Vec::with_capacity(entries.min(HISTORY_LIMIT));
        for _ in 0..entries {
            history.push(Attempt {
                at: r.time()?.unwrap_or(UNIX_EPOCH),
                status: r.str()?,
                diagnostic: r.str()?,
            });
        }
        deliveries.push(Delivery {
            original_recipient,
            recipient,
            local,
            extension,
            domain,
            target,
            state,
            attempts,
            last_attempt,
            last_error,
            status,
            history,
        });
    }
    let body_check = if version >= 3 && r.flag()? {
        Some(BodyCheck {
            len: r.u64()?,
            crc32: r.u32()?,
        })
    } else {
        None
    };
    let (tls_version, tls_cipher) = if version >= 4 {
        (r.str()?, r.str()?)
    } else {
        (String::new(), String::new())
    };
    let auth = if version >= 5 {
        AuthRecord {
            spf: r.str()?,
            dkim: r.str()?,
            dmarc: r.str()?,
            from_domain: r.str()?,
            header: r.str()?,
        }
    } else {
        AuthRecord::default()
    };
    if r.pos != r.bytes.len() {
        return Err(EnvelopeError::Trailing);
    }
    Ok(Envelope {
        id,
        sender,
        return_path,
        arrival,
        client_address,
        client_helo,
        channel,
        size,
        smtputf8,
        body_8bit,
        held,
        next_attempt,
        deliveries,
        body_check,
        tls_version,
        tls_cipher,
        auth,
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn flag(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // Fields are bounded at intake (512-octet commands, 1 KiB of program
        // output); clamping here keeps the record decodable whatever happens.
        let bytes = &s.as_bytes()[..s.len().min(MAX_FIELD)];
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
    }
    /// Microseconds since the epoch; u64::MAX for "none".
    fn time(&mut self, t: Option<SystemTime>) {
        let v = match t {
            None => u64::MAX,
            Some(t) => t
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros().min(u128::from(u64::MAX - 1)) as u64)
                .unwrap_or(0),
        };
        self.u64(v);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], EnvelopeError> {
        let end = self.pos.checked_add(n).ok_or(EnvelopeError::Truncated)?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(EnvelopeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, EnvelopeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(EnvelopeError::BadTag("flag")),
        }
    }
    fn u32(&mut self) -> Result<u32, EnvelopeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, EnvelopeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String, EnvelopeError> {
        let len = self.u32()? as usize;
        if len > MAX_FIELD {
            return Err(EnvelopeError::TooLong);
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| EnvelopeError::BadUtf8)
    }
    fn time(&mut self) -> Result<Option<SystemTime>, EnvelopeError> {
        Ok(match self.u64()? {
            u64::MAX => None,
            v => Some(UNIX_EPOCH + Duration::from_micros(v)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Envelope {
        let t = UNIX_EPOCH + Duration::from_micros(1_790_000_000_123_456);
        Envelope {
            id: "0123456789ABCDE".into(),
            sender: "a \"b\"@example.org".into(),
            return_path: "\"a \\\"b\\\"\"@example.org".into(),
            arrival: t,
            client_address: "127.0.0.1".into(),
            client_helo: "$(touch /tmp/x)".into(),
            channel: "local".into(),
            size: 4096,
            smtputf8: true,
            body_8bit: false,
            held: false,
            next_attempt: t + Duration::from_secs(60),
            deliveries: vec![
                Delivery {
                    original_recipient: "team+x@example.org".into(),
                    recipient: "team+x@example.org".into(),
                    local: "team".into(),
                    extension: "x".into(),
                    domain: "example.org".into(),
                    target: Target::Pipe {
                        command: "/bin/cat > /dev/null".into(),
                    },
                    state: DeliveryState::Delivered,
                    attempts: 1,
                    last_attempt: Some(t),
                    last_error: String::new(),
                    status: "2.0.0".into(),
                    history: vec![Attempt {
                        at: t,
                        status: "2.0.0".into(),
                        diagnostic: String::new(),
                    }],
                },
                Delivery {
                    original_recipient: "team+x@example.org".into(),
                    recipient: "ops@example.org".into(),
                    local: "ops".into(),
                    extension: String::new(),
                    domain: "example.org".into(),
                    target: Target::Forward {
                        address: "oncall@partner.example".into(),
                    },
                    state: DeliveryState::Bounced,
                    attempts: 0,
                    last_attempt: None,
                    last_error: "exit 75: try later\nsecond line".into(),
                    status: String::new(),
                    history: Vec::new(),
                },
            ],
            body_check: Some(BodyCheck {
                len: 4321,
                crc32: 0xdead_beef,
            }),
            tls_version: "TLSv1.2".into(),
            tls_cipher: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
            auth: AuthRecord {
                spf: "pass".into(),
                dkim: "fail".into(),
                dmarc: "none".into(),
                from_domain: "example.org".into(),
                header: "Authentication-Results: mx.example.org;\n\tspf=pass\n".into(),
            },
        }
    }

    #[test]
    fn round_trip() {
        let env = sample();
        assert_eq!(decode(&encode(&env)), Ok(env));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(decode(&damaged).is_err(), "flipped byte {i}");
        }
    }

    #[test]
    fn version_3_envelopes_are_still_read_as_having_come_in_clear() {
        let mut env = sample();
        env.tls_version = "TLSv1.3".into();
        env.tls_cipher = "TLS_AES_256_GCM_SHA384".into();
        let v5 = encode(&env);
        assert_eq!(u16::from_le_bytes([v5[4], v5[5]]), 5);
        assert_eq!(decode(&v5), Ok(env.clone()));
        let mut without_auth = env.clone();
        without_auth.auth = AuthRecord::default();
        let v4 = encode(&without_auth);
        assert_eq!(
            u16::from_le_bytes([v4[4], v4[5]]),
            4,
            "TLS without [auth] is version 4"
        );
        assert_eq!(decode(&v4), Ok(without_auth));
        let v3 = encode_v3(&env);
        assert_eq!(
            u16::from_le_bytes([v3[4], v3[5]]),
            3,
            "mail in clear is written as version 3"
        );
        env.tls_version.clear();
        env.tls_cipher.clear();
        env.auth = AuthRecord::default();
        assert_eq!(decode(&v3), Ok(env));
    }

    #[test]
    fn version_2_envelopes_are_still_read_without_a_body_check() {
        let mut env = sample();
        let v2 = encode_v2(&env);
        env.body_check = None;
        env.tls_version.clear();
        env.tls_cipher.clear();
        env.auth = AuthRecord::default();
        assert_eq!(decode(&v2), Ok(env));
    }

    #[test]
    fn version_1_envelopes_are_still_read() {
        let mut env = sample();
        env.body_check = None;
        env.tls_version.clear();
        env.tls_cipher.clear();
        env.auth = AuthRecord::default();
        for d in &mut env.deliveries {
            d.status.clear();
            d.history.clear();
            if d.state == DeliveryState::Bounced {
                d.state = DeliveryState::Failed;
            }
        }
        // Version 1 wrote nothing after each delivery's last_error; here
        // each delivery ends with an empty status and an empty history
        // count (8 bytes). Cut them, last delivery first so earlier offsets
        // hold, and stamp version 1.
        let v2 = encode_v2(&env);
        let mut v1 = v2[..v2.len() - 4].to_vec();
        v1[4] = 1;
        for d in (0..env.deliveries.len()).rev() {
            let mut prefix = env.clone();
            prefix.deliveries.truncate(d + 1);
            let end = encode_v2(&prefix).len() - 4;
            v1.drain(end - 8..end);
        }
        let crc = crc32fast::hash(&v1).to_le_bytes();
        v1.extend_from_slice(&crc);
        assert_eq!(decode(&v1), Ok(env));
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let mut bytes = encode(&sample());
        bytes[4] = 9;
        let n = bytes.len();
        let crc = crc32fast::hash(&bytes[..n - 4]).to_le_bytes();
        bytes[n - 4..].copy_from_slice(&crc);
        assert_eq!(decode(&bytes), Err(EnvelopeError::BadVersion(9)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Times as the envelope keeps them: microseconds since the epoch.
        fn time() -> impl Strategy<Value = SystemTime> {
            (0u64..4_102_444_800_000_000).prop_map(|us| UNIX_EPOCH + Duration::from_micros(us))
        }

        fn delivery() -> impl Strategy<Value = Delivery> {
            (
                (
                    any::<String>(),
                    any::<String>(),
                    any::<String>(),
                    any::<String>(),
                    any::<String>(),
                ),
                (any::<bool>(), any::<String>()),
                (
                    0u8..5,
                    any::<u32>(),
                    proptest::option::of(time()),
                    any::<String>(),
                    any::<String>(),
                ),
                proptest::collection::vec((time(), any::<String>(), any::<String>()), 0..3),
            )
                .prop_map(|(names, target, progress, history)| {
                    let (original_recipient, recipient, local, extension, domain) = names;
                    let (state, attempts, last_attempt, last_error, status) = progress;
                    Delivery {
                        original_recipient,
                        recipient,
                        local,
                        extension,
                        domain,
                        target: match target {
                            (true, command) => Target::Pipe { command },
                            (false, address) => Target::Forward { address },
                        },
                        state: [
                            DeliveryState::Pending,
                            DeliveryState::Delivered,
                            DeliveryState::Failed,
                            DeliveryState::Bounced,
                            DeliveryState::Superseded,
                        ][usize::from(state)],
                        attempts,
                        last_attempt,
                        last_error,
                        status,
                        history: history
                            .into_iter()
                            .map(|(at, status, diagnostic)| Attempt {
                                at,
                                status,
                                diagnostic,
                            })
                            .collect(),
                    }
                })
        }

        fn envelope() -> impl Strategy<Value = Envelope> {
            (
                (any::<String>(), any::<String>(), any::<String>(), time()),
                (
                    any::<String>(),
                    any::<String>(),
                    any::<String>(),
                    any::<u64>(),
                ),
                (any::<bool>(), any::<bool>(), any::<bool>(), time()),
                proptest::collection::vec(delivery(), 0..4),
                proptest::option::of((any::<u64>(), any::<u32>())),
                (any::<String>(), any::<String>()),
                proptest::collection::vec(any::<String>(), 5),
            )
                .prop_map(|(who, client, flags, deliveries, check, tls, auth)| {
                    let (id, sender, return_path, arrival) = who;
                    let (client_address, client_helo, channel, size) = client;
                    let (smtputf8, body_8bit, held, next_attempt) = flags;
                    Envelope {
                        id,
                        sender,
                        return_path,
                        arrival,
                        client_address,
                        client_helo,
                        channel,
                        size,
                        smtputf8,
                        body_8bit,
                        held,
                        next_attempt,
                        deliveries,
                        body_check: check.map(|(len, crc32)| BodyCheck { len, crc32 }),
                        tls_version: tls.0,
                        tls_cipher: tls.1,
                        auth: AuthRecord {
                            spf: auth[0].clone(),
                            dkim: auth[1].clone(),
                            dmarc: auth[2].clone(),
                            from_domain: auth[3].clone(),
                            header: auth[4].clone(),
                        },
                    }
                })
        }

        proptest! {
            #[test]
            fn every_envelope_reads_back_as_written(env in envelope()) {
                prop_assert_eq!(decode(&encode(&env)), Ok(env));
            }

            /// A torn write or a flipped byte is refused, never read as some
            /// other envelope (a wrong recipient or a lost "delivered").
            #[test]
            fn damage_is_always_detected(env in envelope(), at in any::<proptest::sample::Index>(), flip in 1u8..=255) {
                let bytes = encode(&env);
                let at = at.index(bytes.len());
                prop_assert!(decode(&bytes[..at]).is_err());
                let mut damaged = bytes.clone();
                damaged[at] ^= flip;
                prop_assert!(decode(&damaged).is_err());
            }
        }
    }
}

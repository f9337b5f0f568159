//! Delivery to an HTTP target: the message is POSTed to the URL the alias
//! names, as `message/rfc822` with CRLF line ends, with the envelope in
//! `Mailnode-*` request headers and, with `[http] secret_file`, an
//! HMAC-SHA256 `Mailnode-Signature`. The answer maps to the same typed
//! statuses an exit code does: 2xx delivered; 408, 429, 5xx, no
//! connection, a TLS failure or the timeout temporary (`Retry-After`
//! honoured); anything else, redirects included, permanent.
//!
//! The body is streamed from the queue file in 64 KiB pieces, so a big
//! message costs no more memory than a small one. It is read twice: once to
//! learn its length with CRLF line ends (and to sign it), once to send it.
//!
//! reqwest (on hyper) is the client: HTTP/1.1 with keep-alive per host, no
//! redirects, no proxy from the environment, and our own rustls
//! configuration (ring, the system's roots and `ca_file`).

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::config::{FileSetting, HttpConfig};
use crate::delivery::status::{DeliveryStatus, EnhancedCode};
use crate::delivery::{open_message, open_message_sized, stdin_prefix};
use crate::spool::Envelope;

/// How much of a response's body the log, `ctl queue show` and the bounce
/// quote.
pub const RESPONSE_EXCERPT: usize = 1024;
/// Pieces the body is read and sent in.
const CHUNK: usize = 64 * 1024;
/// A message up to this size (prefix included) is read whole, in one go,
/// and sent from memory; a bigger one is streamed from its file. Reading
/// once costs a 4 KB message half of what streaming does (one blocking
/// read instead of three, no 64 KiB buffers to zero).
const WHOLE_LIMIT: u64 = 256 * 1024;

/// 4.4.2: the server took too long, or the connection broke mid-request.
const BAD_CONNECTION: EnhancedCode = EnhancedCode::new(4, 4, 2);
/// 4.7.5: the TLS handshake failed (an untrusted certificate, a name
/// that does not match).
const TLS_FAILURE: EnhancedCode = EnhancedCode::new(4, 7, 5);

/// Why `[http]` cannot be used; each names where the file was set.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    #[error("{at}: http.secret_file: cannot read {}: {source}", path.display())]
    ReadSecret {
        at: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{at}: http.secret_file: {} is empty: a key is needed to sign requests", path.display())]
    EmptySecret {
        at: String,
        path: std::path::PathBuf,
    },
    #[error("{at}: http.ca_file: cannot read {}: {why}", path.display())]
    ReadCa {
        at: String,
        path: std::path::PathBuf,
        why: String,
    },
    #[error("{0}")]
    Tls(String),
}

/// What every delivery worker's client shares: the settings, the key, the
/// trusted roots and the per-host limits.
pub struct HttpShared {
    timeout: Duration,
    max_per_host: usize,
    secret_file: Option<FileSetting>,
    ca_file: Option<FileSetting>,
    /// Replaced whole by [`HttpShared::reload`]; a worker's client is made
    /// again when it finds a newer one here.
    keys: RwLock<Arc<HttpKeys>>,
    /// One semaphore of `max_per_host` permits per `scheme://host:port`.
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// What `secret_file` and `ca_file` held when last read, and the TLS
/// settings made from them.
struct HttpKeys {
    secret: Option<ring::hmac::Key>,
    extra_roots: Vec<CertificateDer<'static>>,
    /// Built at the first HTTP delivery (or by a reload), not at start:
    /// reading the system's roots would cost a `runq` or an `inetd` session
    /// that posts nothing.
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl HttpShared {
    /// Reads `secret_file` and `ca_file`: a node that cannot sign or
    /// cannot trust what it was told to does not start.
    pub fn new(config: &HttpConfig) -> Result<Self, HttpSetupError> {
        let keys = HttpKeys::read(config.secret_file.as_ref(), config.ca_file.as_ref())?;
        Ok(HttpShared {
            timeout: config.timeout,
            max_per_host: config.max_per_host.max(1),
            secret_file: config.secret_file.clone(),
            ca_file: config.ca_file.clone(),
            keys: RwLock::new(Arc::new(keys)),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// Reads `secret_file` and `ca_file` again (SIGHUP), and the system's
    /// trusted roots with them: a rotated key signs the next request, a
    /// new root is trusted by the next connection. If either file cannot
    /// be read, both the old key and the old roots stay in force. False
    /// when `[http]` has neither file (the system's roots are read again
    /// all the same).
    pub fn reload(&self) -> Result<bool, HttpSetupError> {
        let keys = HttpKeys::read(self.secret_file.as_ref(), self.ca_file.as_ref())?;
        // Now rather than at the next delivery: a failure keeps the old
        // keys, and no delivery thread waits while the roots are read.
        keys.tls().map_err(HttpSetupError::Tls)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(self.secret_file.is_some() || self.ca_file.is_some())
    }

    fn keys(&self) -> Arc<HttpKeys> {
        // Only ever replaced whole: a panic elsewhere cannot leave it half
        // written.
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn host_permits(&self, host: &str) -> Arc<Semaphore> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            hosts
                .entry(host.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_host))),
        )
    }
}

impl HttpKeys {
    fn read(
        secret_file: Option<&FileSetting>,
        ca_file: Option<&FileSetting>,
    ) -> Result<Self, HttpSetupError> {
        Ok(HttpKeys {
            secret: secret_file.map(read_secret).transpose()?,
            extra_roots: match ca_file {
                Some(file) => read_roots(file)?,
                None => Vec::new(),
            },
            tls: OnceLock::new(),
        })
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.tls
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for e in &native.errors {
                    tracing::warn!("reading the system's trusted certificates: {e}");
                }
                let (system, ignored) = roots.add_parsable_certificates(native.certs);
                let (extra, _) = roots.add_parsable_certificates(self.extra_roots.iter().cloned());
                tracing::debug!(
                    system,
                    ca_file = extra,
                    ignored,
                    "trusted roots for HTTPS targets"
                );
                rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
                    .with_safe_default_protocol_versions()
                    .map(|builder| {
                        Arc::new(builder.with_root_certificates(roots).with_no_client_auth())
                    })
                    .map_err(|e| format!("cannot set up TLS for HTTPS targets: {e}"))
            })
            .clone()
    }
}

fn read_secret(file: &FileSetting) -> Result<ring::hmac::Key, HttpSetupError> {
    let bytes = std::fs::read(&file.path).map_err(|source| HttpSetupError::ReadSecret {
        at: file.at.clone(),
        path: file.path.clone(),
        source,
    })?;
    // `openssl rand -hex 32 > file` and editors end the file with a line
    // break, which the application's copy of the key will not have.
    let key = bytes.trim_ascii_end();
    if key.is_empty() {
        return Err(HttpSetupError::EmptySecret {
            at: file.at.clone(),
            path: file.path.clone(),
        });
    }
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
}

fn read_roots(file: &FileSetting) -> Result<Vec<CertificateDer<'static>>, HttpSetupError> {
    let problem = |why: String| HttpSetupError::ReadCa {
        at: file.at.clone(),
        path: file.path.clone(),
        why,
    };
    let roots = CertificateDer::pem_file_iter(&file.path)
        .map_err(|e| problem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(e.to_string()))?;
    if roots.is_empty() {
        return Err(problem("no PEM certificate in it".into()));
    }
    let mut store = rustls::RootCertStore::empty();
    for root in &roots {
        store
            .add(root.clone())
            .map_err(|e| problem(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// `scheme://host:port` of a URL: what keep-alive connections and
/// `max_per_host` are counted by. `None` for a URL that does not parse
/// (the aliases file refuses those).
pub fn host_of(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    Some(format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str()?,
        url.port_or_known_default()?
    ))
}

/// One delivery worker's client: its own pool of keep-alive connections,
/// on the worker's own runtime.
pub struct HttpClient {
    client: reqwest::Client,
    shared: Arc<HttpShared>,
    /// The keys it was made with: its pool's connections trust their
    /// roots, so a reload that replaces them means a new client.
    keys: Arc<HttpKeys>,
}

/// The result of one POST.
#[derive(Debug)]
pub struct HttpOutcome {
    pub status: DeliveryStatus,
    /// The server's `Retry-After`, on a temporary failure.
    pub retry_after: Option<Duration>,
}

impl HttpClient {
    pub fn new(shared: Arc<HttpShared>) -> Result<Self, String> {
        let keys = shared.keys();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*keys.tls()?).clone())
            .http1_only()
            .http1_title_case_headers()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(shared.timeout)
            .connect_timeout(shared.timeout)
            .pool_max_idle_per_host(shared.max_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("mailnode/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::error_text(&e))?;
        Ok(HttpClient {
            client,
            shared,
            keys,
        })
    }

    /// False once the keys were read again: a client made now would trust
    /// the new roots (its pool's connections were made with the old ones).
    pub fn is_current(&self) -> bool {
        // Asked at every HTTP delivery: compared under the lock, without
        // taking a reference of its own.
        let keys = self.shared.keys.read().unwrap_or_else(|e| e.into_inner());
        Arc::ptr_eq(&self.keys, &keys)
    }

    /// POSTs delivery `index` of `env`, whose message is at `body_path`.
    pub async fn post(
        &self,
        url: &str,
        env: &Envelope,
        index: usize,
        body_path: &std::path::Path,
    ) -> HttpOutcome {
        let temporary = |code, why: String| HttpOutcome {
            status: DeliveryStatus::Temporary(code, why),
            retry_after: None,
        };
        let host = host_of(url).unwrap_or_else(|| url.to_string());
        // Never closed, so acquiring only waits.
        let _permit = self.shared.host_permits(&host).acquire_owned().await.ok();
        let prefix = stdin_prefix(env, index);
        let body_len = env.body_len();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let delivery_id = env.delivery_id(index);

        let signed_prefix = format!("{timestamp}.{delivery_id}.");
        let size = prefix.len() as u64 + body_len.unwrap_or(env.size);
        let first_pass = if size <= WHOLE_LIMIT {
            // A small message just written is in the page cache: reading it
            // here costs less than handing it to a blocking thread and back.
            Ok(measure(
                &prefix,
                body_path,
                body_len,
                self.keys.secret.as_ref(),
                &signed_prefix,
            ))
        } else {
            let (prefix, path) = (prefix.clone(), body_path.to_path_buf());
            let key = self.keys.secret.clone();
            tokio::task::spawn_blocking(move || {
                measure(&prefix, &path, body_len, key.as_ref(), &signed_prefix)
            })
            .await
        };
        let mut measured = match first_pass {
            Ok(Ok(measured)) => measured,
            Ok(Err(why)) => return temporary(EnhancedCode::SYSTEM_TEMPORARY, why),
            Err(e) => {
                return temporary(
                    EnhancedCode::SYSTEM_TEMPORARY,
                    format!("reading the message: {e}"),
                )
            }
        };
        let headers = match request_headers(env, index, timestamp, &measured) {
            Ok(headers) => headers,
            Err(why) => return temporary(EnhancedCode::SYSTEM_TEMPORARY, why),
        };
        let body = match measured.whole.take() {
            Some(whole) => reqwest::Body::from(whole),
            None => match open_message(body_path, body_len) {
                Ok(file) => {
                    let file = tokio::fs::File::from_std(file).take(body_len.unwrap_or(u64::MAX));
                    reqwest::Body::wrap_stream(crlf_stream(prefix, file))
                }
                Err(e) => return temporary(EnhancedCode::SYSTEM_TEMPORARY, e.to_string()),
            },
        };
        let response = self
            .client
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                return HttpOutcome {
                    status: failed_request(&e, self.shared.timeout),
                    retry_after: None,
                }
            }
        };
        let code = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let excerpt = read_excerpt(response).await;
        let status = status_for(
            code.as_u16(),
            code.canonical_reason().unwrap_or(""),
            location.as_deref(),
            &excerpt,
        );
        let retry_after = match status {
            DeliveryStatus::Temporary(..) => retry_after,
            _ => None,
        };
        HttpOutcome {
            status,
            retry_after,
        }
    }
}

/// The body's length as sent (LF made CRLF) and, with a key, its
/// signature; and the body itself when it is small enough to send from
/// memory.
#[derive(Debug)]
struct Measured {
    content_length: u64,
    signature: Option<String>,
    whole: Option<Bytes>,
}

fn measure(
    prefix: &[u8],
    path: &std::path::Path,
    body_len: Option<u64>,
    key: Option<&ring::hmac::Key>,
    signed_prefix: &str,
) -> Result<Measured, String> {
    let mut context = key.map(|key| {
        let mut context = ring::hmac::Context::with_key(key);
        context.update(signed_prefix.as_bytes());
        context
    });
    let mut content_length = 0u64;
    let mut take = |piece: &[u8]| {
        let mut rest = piece;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            if let Some(context) = &mut context {
                context.update(&rest[..at]);
                context.update(b"\r\n");
            }
            content_length += at as u64 + 2;
            rest = &rest[at + 1..];
        }
        if let Some(context) = &mut context {
            context.update(rest);
        }
        content_length += rest.len() as u64;
    };
    let (file, file_len) = open_message_sized(path, body_len).map_err(|e| e.to_string())?;
    let len = body_len.map_or(file_len, |wanted| wanted.min(file_len));
    let mut file = file.take(len);
    if prefix.len() as u64 + len <= WHOLE_LIMIT {
        // Exactly `len`: a read past it to find the end would cost a
        // system call more per delivery.
        let mut message = vec![0u8; len as usize];
        file.read_exact(&mut message).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                format!("the queued message was cut short while being read (expected {len} bytes)")
            }
            _ => format!("cannot read the message: {e}"),
        })?;
        let mut whole = BytesMut::with_capacity(prefix.len() + message.len() + message.len() / 16);
        extend_crlf(&mut whole, prefix);
        extend_crlf(&mut whole, &message);
        let signature = context.map(|mut context| {
            context.update(&whole);
            format!("v1={}", hex(context.sign().as_ref()))
        });
        return Ok(Measured {
            content_length: whole.len() as u64,
            signature,
            whole: Some(whole.freeze()),
        });
    }
    take(prefix);
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| format!("cannot read the message: {e}"))?;
        if n == 0 {
            break;
        }
        take(&buffer[..n]);
    }
    let signature = context.map(|context| format!("v1={}", hex(context.sign().as_ref())));
    Ok(Measured {
        content_length,
        signature,
        whole: None,
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The prefix and the message, read in pieces, each LF sent as CRLF.
fn crlf_stream(
    prefix: Vec<u8>,
    file: tokio::io::Take<tokio::fs::File>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    let reader = AsyncReadExt::chain(std::io::Cursor::new(prefix), file);
    futures_util::stream::unfold(
        (reader, vec![0u8; CHUNK]),
        |(mut reader, mut buffer)| async move {
            match reader.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    let piece = with_crlf(&buffer[..n]);
                    Some((Ok(piece), (reader, buffer)))
                }
                Err(e) => Some((Err(e), (reader, buffer))),
            }
        },
    )
}

fn with_crlf(piece: &[u8]) -> Bytes {
    let lines = piece.iter().filter(|&&b| b == b'\n').count();
    let mut out = BytesMut::with_capacity(piece.len() + lines);
    extend_crlf(&mut out, piece);
    out.freeze()
}

fn extend_crlf(out: &mut BytesMut, piece: &[u8]) {
    for part in piece.split_inclusive(|&b| b == b'\n') {
        match part.strip_suffix(b"\n") {
            Some(line) => {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
            None => out.extend_from_slice(part),
        }
    }
}

/// The contract's request headers; client text only in header values,
/// never in the URL.
fn request_headers(
    env: &Envelope,
    index: usize,
    timestamp: u64,
    measured: &Measured,
) -> Result<HeaderMap, String> {
    let Some(d) = env.deliveries.get(index) else {
        return Err("no such delivery".into());
    };
    let mut fields: Vec<(&'static str, String)> = vec![
        ("content-type", "message/rfc822".into()),
        ("content-length", measured.content_length.to_string()),
        ("mailnode-sender", env.sender.clone()),
        ("mailnode-recipient", d.recipient.clone()),
        ("mailnode-original-recipient", d.original_recipient.clone()),
        ("mailnode-queue-id", env.id.clone()),
        ("mailnode-delivery-id", env.delivery_id(index)),
        ("mailnode-attempt", (d.attempts + 1).to_string()),
        ("mailnode-client-address", env.client_address.clone()),
        ("mailnode-client-helo", env.client_helo.clone()),
        ("mailnode-channel", env.channel.clone()),
        ("mailnode-timestamp", timestamp.to_string()),
    ];
    if !env.tls_version.is_empty() {
        fields.push(("mailnode-tls-version", env.tls_version.clone()));
        fields.push(("mailnode-tls-cipher", env.tls_cipher.clone()));
    }
    if !env.auth.spf.is_empty() || !env.auth.dkim.is_empty() || !env.auth.dmarc.is_empty() {
        fields.push(("mailnode-auth-spf", env.auth.spf.clone()));
        fields.push(("mailnode-auth-dkim", env.auth.dkim.clone()));
        fields.push(("mailnode-auth-dmarc", env.auth.dmarc.clone()));
        fields.push(("mailnode-auth-from-domain", env.auth.from_domain.clone()));
    }
    if let Some(signature) = &measured.signature {
        fields.push(("mailnode-signature", signature.clone()));
    }
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        // Addresses may be UTF-8 (SMTPUTF8): sent as the raw bytes HTTP
        // allows in a field value. No control character reaches here (the
        // SMTP parser refuses them), but one would be an error, not a
        // header split.
        let value = HeaderValue::from_bytes(value.as_bytes())
            .map_err(|_| format!("{name}: value {value:?} cannot be sent in a header"))?;
        headers.insert(HeaderName::from_static(name), value);
    }
    Ok(headers)
}

/// What a request that got no response says: no connection, a TLS
/// failure and the timeout are all retried.
fn failed_request(e: &reqwest::Error, timeout: Duration) -> DeliveryStatus {
    let chain = crate::error_text(e);
    if e.is_timeout() {
        return DeliveryStatus::Temporary(
            BAD_CONNECTION,
            format!(
                "no response within {} ([http] timeout): {chain}",
                humantime::format_duration(timeout)
            ),
        );
    }
    if caused_by_tls(e) {
        return DeliveryStatus::Temporary(TLS_FAILURE, format!("TLS: {chain}"));
    }
    if e.is_connect() {
        return DeliveryStatus::Temporary(
            EnhancedCode::NO_CONNECTION,
            format!("cannot connect: {chain}"),
        );
    }
    DeliveryStatus::Temporary(BAD_CONNECTION, chain)
}

fn caused_by_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    if error.is::<rustls::Error>() {
        return true;
    }
    // hyper-util wraps tokio-rustls's io::Error (which wraps the rustls
    // error) in another io::Error; an io::Error's `source` skips what it
    // wraps, so each is opened by hand.
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        if caused_by_tls(inner) {
            return true;
        }
    }
    error.source().is_some_and(caused_by_tls)
}

async fn read_excerpt(mut response: reqwest::Response) -> Vec<u8> {
    let mut excerpt = Vec::new();
    while excerpt.len() < RESPONSE_EXCERPT {
        match response.chunk().await {
            Ok(Some(piece)) => excerpt.extend_from_slice(&piece),
            // A body cut short or too slow still leaves the status to go on.
            Ok(None) | Err(_) => break,
        }
    }
    excerpt.truncate(RESPONSE_EXCERPT);
    excerpt
}

/// Maps a response to a delivery status. The diagnostic is the status
/// line and the start of the body, on one line: it goes into the log,
/// `ctl queue show` and the bounce.
pub(crate) fn status_for(
    code: u16,
    reason: &str,
    location: Option<&str>,
    excerpt: &[u8],
) -> DeliveryStatus {
    if (200..300).contains(&code) {
        return DeliveryStatus::DELIVERED;
    }
    let mut why = format!("HTTP {code}");
    if !reason.is_empty() {
        why.push(' ');
        why.push_str(reason);
    }
    if (300..400).contains(&code) {
        why.push_str(&format!(
            " (redirects are not followed; Location: {})",
            one_line(location.unwrap_or("none").as_bytes())
        ));
    }
    let body = one_line(excerpt);
    if !body.is_empty() {
        why.push_str(": ");
        why.push_str(&body);
    }
    if code == 408 || code == 429 || (500..600).contains(&code) {
        DeliveryStatus::Temporary(EnhancedCode::TEMPORARY, why)
    } else {
        DeliveryStatus::Permanent(EnhancedCode::PERMANENT, why)
    }
}

/// Text a server sent, safe on one line: control characters become spaces.
fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`, as a
/// wait from `now` (a date gone by is no wait).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hundreds_deliver_and_the_rest_is_temporary_or_permanent_as_spec_says() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(status_for(code, "", None, b""), DeliveryStatus::DELIVERED);
        }
        for code in [408, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(
                    status_for(code, "", None, b""),
                    DeliveryStatus::Temporary(..)
                ),
                "{code}"
            );
        }
        for code in [301, 302, 307, 308, 400, 401, 403, 404, 410, 413, 422] {
            assert!(
                matches!(
                    status_for(code, "", None, b""),
                    DeliveryStatus::Permanent(..)
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn the_diagnostic_holds_the_status_line_and_the_body_on_one_line() {
        let status = status_for(404, "Not Found", None, b"no such\r\nqueue\n\x1b[31m");
        assert_eq!(
            status.diagnostic(),
            "HTTP 404 Not Found: no such queue [31m"
        );
        let status = status_for(301, "Moved Permanently", Some("https://new/\r\nx"), b"");
        assert_eq!(
            status.diagnostic(),
            "HTTP 301 Moved Permanently (redirects are not followed; Location: https://new/ x)"
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 2 ", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        for junk in ["", "-1", "soon", "1.5"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn every_lf_goes_out_as_crlf_and_nothing_else_changes() {
        assert_eq!(&with_crlf(b"a\nb\n\nc")[..], b"a\r\nb\r\n\r\nc");
        // A CR the client sent before its line end was kept in the queue
        // file (the codec strips one CRLF); it goes back as it came.
        assert_eq!(&with_crlf(b"a\r\n")[..], b"a\r\r\n");
        assert_eq!(&with_crlf(b"")[..], b"");
    }

    #[test]
    fn the_measured_length_and_signature_are_those_of_the_bytes_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let body: Vec<u8> = (0..200_000u32)
            .flat_map(|i| {
                if i % 77 == 0 {
                    b"\n".to_vec()
                } else {
                    vec![b'a' + (i % 26) as u8]
                }
            })
            .collect();
        std::fs::write(&path, &body).unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k3y");
        let prefix = b"Return-Path: <a@b>\nDelivered-To: c@d\n";
        let measured = measure(prefix, &path, None, Some(&key), "17.ID.0.").unwrap();
        let mut sent = with_crlf(prefix).to_vec();
        sent.extend_from_slice(&with_crlf(&body));
        assert_eq!(measured.content_length, sent.len() as u64);
        let mut signed = b"17.ID.0.".to_vec();
        signed.extend_from_slice(&sent);
        let expected = hex(ring::hmac::sign(&key, &signed).as_ref());
        assert_eq!(measured.signature, Some(format!("v1={expected}")));
        // Only the envelope's length of the file is the message.
        let short = measure(b"", &path, Some(10), None, "").unwrap();
        assert_eq!(short.content_length, with_crlf(&body[..10]).len() as u64);
        assert_eq!(short.signature, None);
    }

    #[test]
    fn a_tls_failure_is_found_inside_the_io_errors_that_wrap_it() {
        use std::io::{Error, ErrorKind};
        let rustls = rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
        let wrapped = Error::other(Error::new(ErrorKind::InvalidData, rustls));
        assert!(caused_by_tls(&wrapped));
        let refused = Error::other(Error::from(ErrorKind::ConnectionRefused));
        assert!(!caused_by_tls(&refused));
    }

    #[test]
    fn hosts_are_told_apart_by_scheme_host_and_port() {
        assert_eq!(
            host_of("https://App.example/hook?x=1").as_deref(),
            Some("https://app.example:443")
        );
        assert_eq!(
            host_of("http://127.0.0.1:8080/").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(host_of("not a url"), None);
    }

    #[test]
    fn an_unreadable_or_empty_secret_and_a_bad_ca_file_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let setting = |name: &str| FileSetting {
            path: dir.path().join(name),
            at: "mailnode.toml:7".into(),
        };
        let config = |secret: Option<FileSetting>, ca: Option<FileSetting>| HttpConfig {
            secret_file: secret,
            ca_file: ca,
            ..HttpConfig::default()
        };
        let e = HttpShared::new(&config(Some(setting("missing")), None))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("mailnode.toml:7: http.secret_file: cannot read "),
            "{e}"
        );
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let e = HttpShared::new(&config(Some(setting("empty")), None))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
        std::fs::write(dir.path().join("junk.pem"), "not pem\n").unwrap();
        let e = HttpShared::new(&config(None, Some(setting("junk.pem"))))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("mailnode.toml:7: http.ca_file: cannot read "),
            "{e}"
        );
        std::fs::write(dir.path().join("key"), "s3cret\n").unwrap();
        assert!(HttpShared::new(&config(Some(setting("key")), None)).is_ok());
    }

    #[test]
    fn a_reload_replaces_the_keys_and_a_failed_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "one\n").unwrap();
        let config = HttpConfig {
            secret_file: Some(FileSetting {
                path: key.clone(),
                at: "mailnode.toml:3".into(),
            }),
            ..HttpConfig::default()
        };
        let shared = HttpShared::new(&config).unwrap();
        let sign = |shared: &HttpShared| {
            let keys = shared.keys();
            let secret = keys.secret.as_ref().expect("a key");
            hex(ring::hmac::sign(secret, b"m").as_ref())
        };
        let first = sign(&shared);
        std::fs::write(&key, "two\n").unwrap();
        assert!(shared.reload().unwrap());
        let second = sign(&shared);
        assert_ne!(first, second);
        std::fs::write(&key, "").unwrap();
        let e = shared.reload().err().unwrap().to_string();
        assert!(e.starts_with("mailnode.toml:3: http.secret_file: "), "{e}");
        assert_eq!(sign(&shared), second, "a failed reload kept the key");
        // Nothing to read: the system's roots are read again all the same.
        let bare = HttpShared::new(&HttpConfig::default()).unwrap();
        let before = bare.keys();
        assert!(!bare.reload().unwrap());
        assert!(!Arc::ptr_eq(&before, &bare.keys()));
    }
}

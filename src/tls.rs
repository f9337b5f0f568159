//! TLS for SMTP: STARTTLS (RFC 3207) and implicit TLS on `listen_tls`
//! listeners (RFC 8314), with rustls on the ring provider.
//!
//! The layer sits between the socket and the SMTP codec: a connection's
//! I/O task holds a `Connection`, plain or TLS, and the session machine
//! only hears that a handshake happened (`TlsInfo`). The certificate in
//! force is a whole `rustls::ServerConfig` behind a lock: a reload swaps it
//! for the next handshake, and sessions already encrypted keep theirs.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{TlsConfig, TlsVersion};
use crate::protocol::session::TlsInfo;
use crate::telemetry;

/// `check` warns about a certificate that stops being valid this soon.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert: cannot read certificates from {}: {source}", path.display())]
    ReadCertificate {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("tls.cert: {} holds no certificate: expected a PEM \"BEGIN CERTIFICATE\" block, the server's certificate first", path.display())]
    NoCertificate { path: PathBuf },
    #[error("tls.cert: cannot parse the first certificate in {}: {why}", path.display())]
    BadCertificate { path: PathBuf, why: String },
    #[error("tls.key: cannot read a private key from {}: {}", path.display(), key_problem(source))]
    ReadKey {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("tls.key: {} cannot be used: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("tls.key: {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("tls: {0}")]
    Setup(#[source] rustls::Error),
    #[error("tls: no [tls] cert and key are configured")]
    NotConfigured,
}

fn key_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => {
            "no private key found: expected a PEM PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key".into()
        }
        other => other.to_string(),
    }
}

/// A certificate and key loaded and checked, ready to serve.
pub struct Credentials {
    server: Arc<ServerConfig>,
    /// The server certificate's notAfter.
    pub not_after: SystemTime,
}

/// Reads `cert` and `key`, checks they belong together, and builds what
/// handshakes use.
pub fn load(settings: &TlsConfig) -> Result<Credentials, TlsError> {
    let chain = CertificateDer::pem_file_iter(&settings.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificate {
            path: settings.cert.clone(),
            source,
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: settings.cert.clone(),
        });
    };
    let not_after = not_after(leaf).map_err(|why| TlsError::BadCertificate {
        path: settings.cert.clone(),
        why,
    })?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|source| TlsError::ReadKey {
        path: settings.key.clone(),
        source,
    })?;
    let provider = Arc::new(provider());
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: settings.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::KeyMismatch {
                cert: settings.cert.clone(),
                key: settings.key.clone(),
            })
        }
        Err(source) => {
            return Err(TlsError::BadKey {
                path: settings.key.clone(),
                source,
            })
        }
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(Credentials {
        server: Arc::new(server),
        not_after,
    })
}

/// The ring provider with X25519 preferred for key exchange, as OpenSSL
/// and the MTAs built on it prefer it: ring's default list puts P-384
/// first, whose key exchange costs about ten times X25519's and made a
/// handshake's CPU three times as large in the benchmark.
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::kx_group;
    // rustls nudges towards aws-lc-rs for post-quantum key exchange; that
    // builds a large C library with cmake, which this project avoids.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    provider
}

fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let seconds = parsed.validity().not_after.timestamp();
    Ok(match u64::try_from(seconds) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    })
}

/// What `check` says of `[tls]`: the certificate and key load and match
/// (else the error), and a warning when the certificate expires within
/// [`EXPIRY_WARNING`] of `now`.
pub fn check(settings: &TlsConfig, now: SystemTime) -> Result<Option<String>, TlsError> {
    let loaded = load(settings)?;
    let when = humantime::format_rfc3339_seconds(loaded.not_after);
    let cert = settings.cert.display();
    Ok(match loaded.not_after.duration_since(now) {
        Err(_) => Some(format!(
            "tls.cert: {cert}: the certificate expired on {when}; clients that check it will refuse TLS"
        )),
        Ok(left) if left < EXPIRY_WARNING => Some(format!(
            "tls.cert: {cert}: the certificate expires on {when}, in {} days; renew it and run `mailnode ctl tls reload`",
            left.as_secs() / 86_400
        )),
        Ok(_) => None,
    })
}

/// The node's TLS: its settings and the certificate in force.
pub struct ServerTls {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads the certificate: a node does not start on one it cannot use.
    pub fn new(settings: TlsConfig) -> Result<Self, TlsError> {
        let loaded = load(&settings)?;
        telemetry::tls_certificate_expiry(loaded.not_after);
        Ok(ServerTls {
            settings,
            current: RwLock::new(loaded.server),
        })
    }

    /// Reads cert and key again. The next handshake uses them; sessions
    /// already encrypted keep what they agreed on. On failure the old ones
    /// stay in force.
    pub fn reload(&self) -> Result<SystemTime, TlsError> {
        let loaded = load(&self.settings)?;
        telemetry::tls_certificate_expiry(loaded.not_after);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = loaded.server;
        Ok(loaded.not_after)
    }

    fn in_force(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Server side of a handshake on `stream`, within `handshake_timeout`;
    /// counted in `mailnode_tls_handshakes_total`.
    pub(crate) async fn handshake<S>(
        &self,
        stream: S,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, TlsInfo), HandshakeFailure>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.in_force());
        let wait = self.settings.handshake_timeout;
        let result = match tokio::time::timeout(wait, acceptor.accept(stream)).await {
            Err(_) => Err(HandshakeFailure::TimedOut(wait)),
            Ok(Err(e)) => Err(HandshakeFailure::Failed(e)),
            Ok(Ok(tls)) => {
                let info = session_info(tls.get_ref().1);
                Ok((tls, info))
            }
        };
        telemetry::tls_handshake(if result.is_ok() { "ok" } else { "failed" });
        result
    }
}

/// Why a TLS handshake did not finish: the connection is closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeFailure {
    #[error("TLS handshake not done within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("TLS handshake failed: {0}")]
    Failed(#[source] io::Error),
    #[error("TLS asked for inside TLS")]
    AlreadyActive,
    #[error("TLS handshake cut short by connect_limit")]
    ConnectLimit,
}

/// Names as OpenSSL, Postfix and log readers know them: `TLSv1.3`, and the
/// cipher suite by its IANA name (`TLS_AES_256_GCM_SHA384`).
fn session_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .map(|v| v.replace('_', "."))
        .unwrap_or_default();
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .map(|name| match name.strip_prefix("TLS13_") {
            Some(rest) => format!("TLS_{rest}"),
            None => name.to_string(),
        })
        .unwrap_or_default();
    TlsInfo { version, cipher }
}

/// A session's byte stream: in clear, or inside TLS after a handshake.
pub(crate) enum Connection<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(s) => s.is_write_vectored(),
            Connection::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_flush(cx),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

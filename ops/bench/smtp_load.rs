//! smtp-load: the benchmark's load client where smtp-source cannot do the
//! job (ops/bench/run, parts `tls` and `auth`): it speaks TLS, and it sends
//! a given (DKIM-signed) message. The same client for every server.
//!
//!     cargo run --release --example smtp-load -- PORT SESSIONS MESSAGES SIZE CA_PEM
//!         [--handshake-only | --plain-only | --clear] [--template FILE]
//!
//! SESSIONS connections at once, each message on a connection of its own:
//! EHLO, STARTTLS, a full handshake (session resumption off, so every
//! message pays for one), EHLO again, then MAIL, RCPT, DATA with a SIZE-byte
//! message carrying a unique Message-Id, QUIT. `--handshake-only` stops
//! after the handshake (QUIT): what a server spends on a STARTTLS session;
//! `--plain-only` is the same session without TLS (EHLO, QUIT), whose cost
//! taken from the former leaves what TLS itself costs. The
//! server's certificate must be for `localhost` and signed by CA_PEM.
//! `--clear` sends the messages without STARTTLS (CA_PEM is then unused,
//! `-` will do). `--template FILE` sends FILE (CRLF line ends, no final
//! dot) in place of a generated message, each `@@N@@` in it replaced by the
//! message's number: a Message-Id outside what a DKIM signature covers
//! keeps the signature valid and every message distinct. Prints one line: `sent N failed F seconds S`; exits 1 if any failed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SENDER: &str = "bench@bench.test";
const RCPT: &str = "sink@bench.test";

/// How far each connection goes.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// STARTTLS, then a message.
    Message,
    /// STARTTLS, then QUIT.
    HandshakeOnly,
    /// EHLO and QUIT in clear.
    PlainOnly,
    /// A message in clear, no STARTTLS.
    Clear,
}

struct Load {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    size: usize,
    mode: Mode,
    /// `--template`: the message to send, `@@N@@` standing for its number.
    template: Option<String>,
    next: AtomicUsize,
    total: usize,
}

/// Reads one reply (all its lines); an error unless its code is `code`.
async fn expect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    code: &str,
) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = stream
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed while waiting for {code}"));
        }
        if !line.starts_with(code) {
            return Err(format!("expected {code}, got {}", line.trim_end()));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
}

async fn say<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    text: &[u8],
    code: &str,
) -> Result<(), String> {
    stream
        .get_mut()
        .write_all(text)
        .await
        .map_err(|e| e.to_string())?;
    expect(stream, code).await
}

/// A message of about `size` bytes (whole body lines), dot-terminated.
fn message(n: usize, size: usize) -> Vec<u8> {
    const LINE: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuv\r\n";
    let mut m = format!(
        "From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: tls bench {n}\r\nMessage-Id: <tls-{n}.{}@bench.test>\r\n\r\n",
        std::process::id()
    )
    .into_bytes();
    while m.len() + LINE.len() <= size {
        m.extend_from_slice(LINE);
    }
    m.extend_from_slice(b".\r\n");
    m
}

async fn one(load: &Load, n: usize) -> Result<(), String> {
    let tcp = TcpStream::connect(load.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut plain = BufReader::new(tcp);
    expect(&mut plain, "220").await?;
    say(&mut plain, b"EHLO smtp-load.bench.test\r\n", "250").await?;
    if load.mode == Mode::PlainOnly {
        return say(&mut plain, b"QUIT\r\n", "221").await;
    }
    if load.mode == Mode::Clear {
        return transaction(&mut plain, load, n).await;
    }
    say(&mut plain, b"STARTTLS\r\n", "220").await?;
    if !plain.buffer().is_empty() {
        return Err("bytes after the STARTTLS reply".into());
    }
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = load
        .connector
        .connect(name, plain.into_inner())
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut tls = BufReader::new(tls);
    if load.mode == Mode::HandshakeOnly {
        return say(&mut tls, b"QUIT\r\n", "221").await;
    }
    say(&mut tls, b"EHLO smtp-load.bench.test\r\n", "250").await?;
    transaction(&mut tls, load, n).await
}

/// MAIL, RCPT, DATA with message `n`, QUIT.
async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    load: &Load,
    n: usize,
) -> Result<(), String> {
    say(
        stream,
        format!("MAIL FROM:<{SENDER}>\r\n").as_bytes(),
        "250",
    )
    .await?;
    say(stream, format!("RCPT TO:<{RCPT}>\r\n").as_bytes(), "250").await?;
    say(stream, b"DATA\r\n", "354").await?;
    let content = match &load.template {
        Some(template) => {
            let mut m = template.replace("@@N@@", &n.to_string()).into_bytes();
            m.extend_from_slice(b".\r\n");
            m
        }
        None => message(n, load.size),
    };
    say(stream, &content, "250").await?;
    say(stream, b"QUIT\r\n", "221").await
}

async fn session(load: Arc<Load>) -> usize {
    let mut failed = 0;
    loop {
        let n = load.next.fetch_add(1, Ordering::Relaxed);
        if n >= load.total {
            return failed;
        }
        if let Err(e) = one(&load, n).await {
            eprintln!("smtp-load: message {n}: {e}");
            failed += 1;
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: smtp-load PORT SESSIONS MESSAGES SIZE CA_PEM [--handshake-only | --plain-only | --clear] [--template FILE] (connects to 127.0.0.1)"
    );
    std::process::exit(64)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        usage();
    }
    let number = |i: usize| args[i].parse::<usize>().unwrap_or_else(|_| usage());
    let (port, sessions, total, size) = (number(0), number(1), number(2), number(3));
    let flags = &args[5..];
    let mode = if flags.iter().any(|f| f == "--handshake-only") {
        Mode::HandshakeOnly
    } else if flags.iter().any(|f| f == "--plain-only") {
        Mode::PlainOnly
    } else if flags.iter().any(|f| f == "--clear") {
        Mode::Clear
    } else {
        Mode::Message
    };
    let template = match flags.iter().position(|f| f == "--template") {
        Some(at) => {
            let path = flags.get(at + 1).unwrap_or_else(|| usage());
            Some(std::fs::read_to_string(path).unwrap_or_else(|e| {
                eprintln!("smtp-load: {path}: {e}");
                std::process::exit(66)
            }))
        }
        None => None,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = if mode == Mode::Clear {
        Ok(Vec::new())
    } else {
        CertificateDer::pem_file_iter(&args[4])
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
    }
    .unwrap_or_else(|e| {
        eprintln!("smtp-load: {}: {e}", args[4]);
        std::process::exit(66)
    });
    for cert in ca {
        if let Err(e) = roots.add(cert) {
            eprintln!("smtp-load: {}: {e}", args[4]);
            std::process::exit(66)
        }
    }
    // Key exchange offered as MTAs built on OpenSSL offer it: X25519 first.
    let provider = Arc::new(mailnode::tls::provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| {
            eprintln!("smtp-load: {e}");
            std::process::exit(70)
        })
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every message pays for a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    let load = Arc::new(Load {
        addr: SocketAddr::from(([127, 0, 0, 1], port as u16)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        size,
        mode,
        template,
        next: AtomicUsize::new(0),
        total,
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..sessions.max(1))
        .map(|_| tokio::spawn(session(Arc::clone(&load))))
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await.unwrap_or(total);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "sent {} failed {failed} seconds {seconds:.3}",
        total - failed.min(total)
    );
    std::process::exit(i32::from(failed > 0));
}

//! TLS: real clients (Python's smtplib, `openssl s_client`, curl, swaks)
//! complete STARTTLS against a certificate from a test authority made here
//! with openssl, and implicit TLS on `listen_tls`; what the program sees and
//! the `Received:` header; plaintext injection, the STARTTLS replies, a
//! handshake that never comes or is garbage; reloading the certificate by
//! `ctl tls reload` and SIGHUP while a session stays open; `check` on a key
//! that does not match and on a certificate about to expire.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mailnode::config::{Config, TlsConfig, TlsVersion};

const BIN: &str = env!("CARGO_BIN_EXE_mailnode");

/// Records each delivery's message and environment, each file whole once
/// it has its name.
const RECORD: &str = "record: |cat > OUTBOX/$DELIVERY_ID.m; env > OUTBOX/$DELIVERY_ID.e; mv OUTBOX/$DELIVERY_ID.m OUTBOX/$DELIVERY_ID.msg; mv OUTBOX/$DELIVERY_ID.e OUTBOX/$DELIVERY_ID.env\n";

fn tls_settings(cert: &Path, key: &Path) -> TlsConfig {
    TlsConfig {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        min_version: TlsVersion::Tls12,
        handshake_timeout: Duration::from_secs(30),
        require: false,
    }
}

/// A node with a certificate for localhost, STARTTLS on its listener and
/// implicit TLS on a second one.
fn tls_node(adjust: impl FnOnce(&mut Config)) -> (TestNode, Pki) {
    let scratch = tempfile::tempdir().unwrap();
    let pki_dir = scratch.keep();
    let pki = Pki::new(&pki_dir);
    let (cert, key) = pki.server("first.mx.test", 30);
    let node = TestNode::start_with(RECORD, |c| {
        c.tls = Some(tls_settings(&cert, &key));
        c.smtp.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
        adjust(c);
    });
    (node, pki)
}

fn tls_addr(node: &TestNode) -> SocketAddr {
    node.node.as_ref().unwrap().tls_addrs()[0]
}

/// The message and environment of the first delivery of queue id `id`.
fn delivered(node: &TestNode, id: &str) -> (String, std::collections::BTreeMap<String, String>) {
    let msg = wait_for_file(&node.outbox.join(format!("{id}.0.msg")));
    let env = wait_for_file(&node.outbox.join(format!("{id}.0.env")));
    (String::from_utf8_lossy(&msg).into_owned(), parse_env(&env))
}

/// Asserts the program saw a TLS 1.3 session and that our `Received:`
/// header, the first in the message, names the same.
#[track_caller]
fn assert_tls_seen(msg: &str, env: &std::collections::BTreeMap<String, String>, version: &str) {
    let cipher = env.get("TLS_CIPHER").cloned().unwrap_or_default();
    assert_eq!(
        env.get("TLS_VERSION").map(String::as_str),
        Some(version),
        "{env:?}"
    );
    assert!(cipher.starts_with("TLS_"), "{env:?}");
    let received: String = msg
        .split("\nReceived: ")
        .nth(1)
        .expect("a Received header")
        .split("\n\t")
        .take(4)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        received.contains(&format!("(using {version} with cipher {cipher})")),
        "{received}"
    );
    assert!(received.contains(" with ESMTPS id "), "{received}");
}

/// Sends one message with Python's smtplib. `mode`: "starttls", "implicit"
/// or "plain"; prints the queue id.
const SMTPLIB: &str = r#"
import smtplib, ssl, sys
mode, port, ca, subject, maxver = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
if maxver == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
if mode == "implicit":
    s = smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=20)
    # Inside TLS a client greets before MAIL.
    code, text = s.docmd("MAIL FROM:<early@example.org>")
    assert (code, text) == (503, b"5.5.1 Error: send EHLO first"), (code, text)
else:
    s = smtplib.SMTP("localhost", port, timeout=20)
    if mode == "starttls":
        s.starttls(context=ctx)
s.ehlo("client.example")
s.mail("sender@example.org")
s.rcpt("record@example.org")
code, text = s.data(("Subject: %s\r\n\r\nbody\r\n" % subject).encode())
print(text.decode().rsplit(" ", 1)[1])
s.quit()
"#;

fn smtplib(mode: &str, port: u16, ca: &Path, subject: &str, max_version: &str) -> String {
    python(
        SMTPLIB,
        &[
            mode,
            &port.to_string(),
            ca.to_str().unwrap(),
            subject,
            max_version,
        ],
    )
    .trim()
    .to_string()
}

#[test]
fn smtplib_starttls_and_implicit_tls_deliver_and_the_program_sees_the_session() {
    let (node, pki) = tls_node(|_| {});
    let id = smtplib("starttls", node.addr.port(), &pki.ca, "smtplib", "");
    let (msg, env) = delivered(&node, &id);
    assert_tls_seen(&msg, &env, "TLSv1.3");
    assert_eq!(env["CLIENT_ADDRESS"], "127.0.0.1");

    let id = smtplib("implicit", tls_addr(&node).port(), &pki.ca, "implicit", "");
    let (msg, env) = delivered(&node, &id);
    assert_tls_seen(&msg, &env, "TLSv1.3");

    // TLS 1.2 is offered by default, and named as such.
    let id = smtplib("starttls", node.addr.port(), &pki.ca, "old client", "1.2");
    let (msg, env) = delivered(&node, &id);
    assert_tls_seen(&msg, &env, "TLSv1.2");
    assert!(
        env["TLS_CIPHER"].starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{env:?}"
    );

    // In clear: both empty, and the header says ESMTP.
    let id = smtplib("plain", node.addr.port(), &pki.ca, "clear", "");
    let (msg, env) = delivered(&node, &id);
    assert_eq!(env.get("TLS_VERSION").map(String::as_str), Some(""));
    assert_eq!(env.get("TLS_CIPHER").map(String::as_str), Some(""));
    assert!(msg.contains(" with ESMTP id "), "{msg}");
    assert!(!msg.contains("(using "), "{msg}");
}

#[test]
fn min_version_1_3_refuses_a_tls_1_2_client() {
    let (node, pki) = tls_node(|c| {
        if let Some(tls) = c.tls.as_mut() {
            tls.min_version = TlsVersion::Tls13;
        }
    });
    let out = Command::new("python3")
        .arg("-c")
        .arg(SMTPLIB)
        .args(["starttls", &node.addr.port().to_string()])
        .arg(&pki.ca)
        .args(["old", "1.2"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a TLS 1.2 client got through");
    // The node still serves TLS 1.3.
    let id = smtplib("starttls", node.addr.port(), &pki.ca, "new", "");
    assert_tls_seen(
        &delivered(&node, &id).0,
        &delivered(&node, &id).1,
        "TLSv1.3",
    );
}

/// The queue id in a client's transcript (`queued as ID`).
fn queued_in(transcript: &str) -> String {
    transcript
        .split("queued as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no message queued:\n{transcript}"))
        .to_string()
}

#[test]
fn openssl_curl_and_swaks_deliver_over_starttls() {
    let (node, pki) = tls_node(|_| {});
    let port = node.addr.port().to_string();
    let ca = pki.ca.to_str().unwrap().to_string();

    // openssl s_client: the commands one by one, each after its reply
    // (s_client writes whatever it reads on stdin at once).
    let mut s_client = Command::new("openssl")
        .args(["s_client", "-starttls", "smtp", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-CAfile", &ca, "-verify_return_error", "-crlf", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client runs");
    let mut input = s_client.stdin.take().unwrap();
    let mut output = BufReader::new(s_client.stdout.take().unwrap());
    let mut transcript = String::new();
    let mut expect = |code: &str, transcript: &mut String| loop {
        let mut line = String::new();
        assert!(
            output.read_line(&mut line).unwrap() > 0,
            "s_client ended:\n{transcript}"
        );
        transcript.push_str(&line);
        if line.starts_with(&format!("{code} ")) {
            return;
        }
        assert!(
            line.starts_with(&format!("{code}-")),
            "expected {code}:\n{transcript}"
        );
    };
    for (command, code) in [
        ("EHLO openssl.example\n", "250"),
        ("MAIL FROM:<sender@example.org>\n", "250"),
        ("RCPT TO:<record@example.org>\n", "250"),
        ("DATA\n", "354"),
        ("Subject: openssl\n\nbody\n.\n", "250"),
    ] {
        input.write_all(command.as_bytes()).unwrap();
        input.flush().unwrap();
        expect(code, &mut transcript);
    }
    input.write_all(b"QUIT\n").unwrap();
    drop(input);
    let _ = s_client.wait();
    let (msg, env) = delivered(&node, &queued_in(&transcript));
    assert_tls_seen(&msg, &env, "TLSv1.3");
    assert!(msg.contains("Subject: openssl"), "{msg}");

    // curl: --ssl-reqd fails rather than send in clear.
    let scratch = tempfile::tempdir().unwrap();
    let mail = scratch.path().join("mail.txt");
    std::fs::write(&mail, "Subject: curl\r\n\r\nbody\r\n").unwrap();
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--verbose",
            "--ssl-reqd",
            "--cacert",
            &ca,
        ])
        .arg(format!("smtp://127.0.0.1:{port}"))
        .args([
            "--mail-from",
            "sender@example.org",
            "--mail-rcpt",
            "record@example.org",
        ])
        .arg("--upload-file")
        .arg(&mail)
        .output()
        .expect("curl runs");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed:\n{said}");
    let (msg, env) = delivered(&node, &queued_in(&said));
    assert_tls_seen(&msg, &env, "TLSv1.3");
    assert!(msg.contains("Subject: curl"), "{msg}");

    // swaks --tls, verifying the certificate against the test CA.
    let out = Command::new("swaks")
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--tls",
            "--tls-verify",
        ])
        .args(["--tls-ca-path", &ca, "--helo", "swaks.example"])
        .args(["--from", "sender@example.org", "--to", "record@example.org"])
        .args(["--header", "Subject: swaks", "--body", "body"])
        .output()
        .expect("swaks runs (Debian's swaks package)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed:\n{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (msg, env) = delivered(&node, &queued_in(&said));
    assert_tls_seen(&msg, &env, "TLSv1.3");
    assert!(msg.contains("Subject: swaks"), "{msg}");
}

/// Speaks raw SMTP, then TLS on the same socket, with Python's ssl module;
/// prints every reply it reads, one per line, as `REPLY <line>`.
const INJECT: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
f = raw.makefile("rb")
def reply(f):
    while True:
        line = f.readline().decode().rstrip("\r\n")
        print("REPLY", line, flush=True)
        if len(line) < 4 or line[3] != "-":
            return line
reply(f)
raw.sendall(b"EHLO client.example\r\n"); reply(f)
# The attack: commands after STARTTLS in the same write.
raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<record@example.org>\r\n")
reply(f)
ctx = ssl.create_default_context(cafile=ca)
tls = ctx.wrap_socket(raw, server_hostname="localhost")
g = tls.makefile("rb")
tls.sendall(b"NOOP\r\n"); reply(g)
tls.sendall(b"MAIL FROM:<sender@example.org>\r\n"); reply(g)
tls.sendall(b"STARTTLS\r\n"); reply(g)
tls.sendall(b"EHLO client.example\r\n"); reply(g)
tls.sendall(b"MAIL FROM:<sender@example.org>\r\n"); reply(g)
tls.sendall(b"QUIT\r\n"); reply(g)
# The server ends TLS with close_notify: unwrap() fails on a bare close.
tls.unwrap()
print("CLOSE_NOTIFY", flush=True)
"#;

#[test]
fn commands_sent_after_starttls_before_the_handshake_are_never_executed() {
    let (node, pki) = tls_node(|_| {});
    let out = python(
        INJECT,
        &[&node.addr.port().to_string(), pki.ca.to_str().unwrap()],
    );
    let replies: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("REPLY "))
        .filter(|l| l.len() < 4 || l.as_bytes()[3] != b'-')
        .collect();
    assert_eq!(
        replies,
        [
            "220 mx.test ESMTP mailnode",
            "250 HELP",
            "220 2.0.0 Ready to start TLS",
            // The first reply inside TLS is NOOP's: nothing injected ran.
            "250 2.0.0 Ok",
            "503 5.5.1 Error: send EHLO first",
            "503 5.5.1 Error: TLS already active",
            "250 HELP",
            "250 2.1.0 Ok",
            "221 2.0.0 Bye",
        ],
        "{out}"
    );
    assert!(out.contains("\nCLOSE_NOTIFY"), "{out}");
    // The EHLO inside TLS no longer offers STARTTLS.
    let after_tls = out.split("Ready to start TLS").nth(1).unwrap();
    assert!(!after_tls.contains("STARTTLS"), "{out}");
    assert!(out
        .split("Ready to start TLS")
        .next()
        .unwrap()
        .contains("250-STARTTLS"));
}

#[test]
fn starttls_with_an_argument_or_without_tls_configured_is_refused() {
    let (node, _pki) = tls_node(|_| {});
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client.example");
    let r = c.cmd("STARTTLS please");
    assert!(r.is(501, "5.5.4"), "{r:?}");
    // The session is still in clear and usable.
    assert!(c.cmd("NOOP").is(250, "2.0.0"));

    let plain = TestNode::start(RECORD);
    let mut c = plain.client();
    c.reply();
    let ehlo = c.cmd("EHLO client.example");
    assert!(!ehlo.text.contains("STARTTLS"), "{ehlo:?}");
    let r = c.cmd("STARTTLS");
    assert!(r.is(502, "5.5.1"), "{r:?}");
}

/// Reads until the server closes; `None` if it stays open past `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A raw client up to the STARTTLS reply.
fn after_starttls(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"EHLO client.example\r\nSTARTTLS\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("220 2.0.0") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the STARTTLS reply");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

#[test]
fn a_handshake_that_never_comes_or_is_garbage_closes_the_connection_and_the_node_serves_on() {
    let (node, pki) = tls_node(|c| {
        if let Some(tls) = c.tls.as_mut() {
            tls.handshake_timeout = Duration::from_secs(1);
        }
    });
    // Silent after STARTTLS: closed after handshake_timeout.
    let mut silent = after_starttls(node.addr);
    let took = closed_within(&mut silent, Duration::from_secs(15)).expect("closed");
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");

    // connect_limit holds during a handshake as well.
    let (capped, _pki) = tls_node(|c| c.smtp.connect_limit = Duration::from_secs(1));
    let mut silent = after_starttls(capped.addr);
    let took = closed_within(&mut silent, Duration::from_secs(15)).expect("closed");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");

    // Garbage instead of a ClientHello.
    let mut garbage = after_starttls(node.addr);
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(10)).is_some());
    // The same on the implicit TLS port.
    let mut garbage = TcpStream::connect(tls_addr(&node)).unwrap();
    garbage.write_all(b"EHLO client.example\r\n").unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(10)).is_some());

    // The node serves TLS on, on both ports.
    let id = smtplib("starttls", node.addr.port(), &pki.ca, "after", "");
    assert_tls_seen(
        &delivered(&node, &id).0,
        &delivered(&node, &id).1,
        "TLSv1.3",
    );
    let id = smtplib("implicit", tls_addr(&node).port(), &pki.ca, "after", "");
    assert_tls_seen(
        &delivered(&node, &id).0,
        &delivered(&node, &id).1,
        "TLSv1.3",
    );
}

/// Holds one STARTTLS session open: prints the certificate's CN, then on
/// each stdin line sends a message and prints its queue id.
const HOLD: &str = r#"
import smtplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP("localhost", port, timeout=20)
s.starttls(context=ctx)
cert = s.sock.getpeercert()
print("CN", dict(x[0] for x in cert["subject"])["commonName"], flush=True)
s.ehlo("held.example")
for line in sys.stdin:
    s.mail("sender@example.org")
    s.rcpt("record@example.org")
    code, text = s.data(("Subject: %s\r\n\r\nbody\r\n" % line.strip()).encode())
    print("QUEUED", text.decode().rsplit(" ", 1)[1], flush=True)
s.quit()
"#;

/// The CN of the certificate a new STARTTLS session gets.
fn served_cn(port: u16, ca: &Path) -> String {
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
s = smtplib.SMTP("localhost", int(sys.argv[1]), timeout=20)
s.starttls(context=ctx)
print(dict(x[0] for x in s.sock.getpeercert()["subject"])["commonName"])
s.quit()
"#;
    python(script, &[&port.to_string(), ca.to_str().unwrap()])
        .trim()
        .to_string()
}

fn install(from: &(PathBuf, PathBuf), to: &(PathBuf, PathBuf)) {
    std::fs::copy(&from.0, &to.0).unwrap();
    std::fs::copy(&from.1, &to.1).unwrap();
}

fn ctl(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["ctl", "-c"])
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `mailnode serve` in `dir` with `[tls]` on the files `live` and `extra`
/// TOML: the process, its config file, its SMTP address and its log.
fn serve_with_tls(
    dir: &Path,
    outbox: &Path,
    live: &(PathBuf, PathBuf),
    extra: &str,
) -> (std::process::Child, PathBuf, SocketAddr, ServeLog) {
    std::fs::write(
        dir.join("aliases"),
        RECORD.replace("OUTBOX", outbox.to_str().unwrap()),
    )
    .unwrap();
    let config = dir.join("mailnode.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\n{extra}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{0}/aliases\"\n[spool]\npath = \"{0}/spool\"\n[control]\nsocket = \"{0}/ctl.sock\"\n[tls]\ncert = \"{1}\"\nkey = \"{2}\"\n",
            dir.display(),
            live.0.display(),
            live.1.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, log) = listening_address(&mut child);
    (child, config, addr, log)
}

#[test]
fn a_reloaded_certificate_serves_the_next_session_while_open_ones_go_on() {
    let (dir, outbox) = shared_tempdir();
    let pki = Pki::new(dir.path());
    let first = pki.server("first.mx.test", 30);
    let second = pki.server("second.mx.test", 30);
    let third = pki.server("third.mx.test", 30);
    let live = (dir.path().join("live.pem"), dir.path().join("live.key"));
    install(&first, &live);
    let (mut child, config, addr, log) =
        serve_with_tls(dir.path(), &outbox, &live, "[metrics]\nlisten = \"off\"");
    let port = addr.port();
    assert_eq!(served_cn(port, &pki.ca), "first.mx.test");

    let mut held = Command::new("python3")
        .arg("-c")
        .arg(HOLD)
        .arg(port.to_string())
        .arg(&pki.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_in = held.stdin.take().unwrap();
    let mut held_out = BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    held_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "CN first.mx.test");
    let mut send_held = |subject: &str| {
        writeln!(held_in, "{subject}").unwrap();
        held_in.flush().unwrap();
        let mut line = String::new();
        held_out.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix("QUEUED ")
            .expect("queued")
            .to_string()
    };

    // ctl tls reload: the next session gets the new certificate.
    install(&second, &live);
    let out = ctl(&config, &["tls", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(served_cn(port, &pki.ca), "second.mx.test");
    // The session opened before goes on.
    let id = send_held("held after ctl");
    assert!(wait_for_file(&outbox.join(format!("{id}.0.msg"))).starts_with(b"Return-Path:"));

    // A broken key: refused, said why, the certificate in force stays.
    std::fs::copy(&third.0, &live.0).unwrap();
    std::fs::write(
        &live.1,
        "-----BEGIN PRIVATE KEY-----\nnot base64 !\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = ctl(&config, &["tls", "reload"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("tls.key") && said.contains("unchanged"),
        "{said}"
    );
    assert_eq!(served_cn(port, &pki.ca), "second.mx.test");
    // And on SIGHUP too.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let refused = wait_for(Duration::from_secs(10), || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("SIGHUP: TLS certificate not reloaded"))
            .then_some(())
    });
    assert!(refused.is_some(), "{:?}", log.lock().unwrap());
    assert_eq!(served_cn(port, &pki.ca), "second.mx.test");

    // SIGHUP with good files: the next session gets them.
    install(&third, &live);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let reloaded = wait_for(Duration::from_secs(10), || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("SIGHUP: TLS certificate reloaded"))
            .then_some(())
    });
    assert!(reloaded.is_some(), "{:?}", log.lock().unwrap());
    assert_eq!(served_cn(port, &pki.ca), "third.mx.test");
    let id = send_held("held after SIGHUP");
    assert!(wait_for_file(&outbox.join(format!("{id}.0.msg"))).starts_with(b"Return-Path:"));
    drop(held_in);
    let _ = held.wait();
    let _ = child.kill();
    let _ = child.wait();
}

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_a_key_that_does_not_match_and_warns_of_a_certificate_about_to_expire() {
    let (dir, _outbox) = shared_tempdir();
    let pki = Pki::new(dir.path());
    let good = pki.server("good.mx.test", 30);
    let other = pki.server("other.mx.test", 30);
    let expiring = pki.server("expiring.mx.test", 5);
    std::fs::write(dir.path().join("aliases"), "a: |cat\n").unwrap();
    let config = dir.path().join("mailnode.toml");
    let write = |cert: &Path, key: &Path| {
        std::fs::write(
            &config,
            format!(
                "[aliases]\npath = \"{}/aliases\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                dir.path().display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
    };
    write(&good.0, &good.1);
    assert_eq!(check(&config), (0, String::new()));

    write(&good.0, &other.1);
    let (code, said) = check(&config);
    assert_eq!(code, 78, "{said}");
    assert!(said.contains("does not match the certificate"), "{said}");
    // serve refuses it as well, before listening.
    let out = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    write(&expiring.0, &expiring.1);
    let (code, said) = check(&config);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("expires on") && said.contains("in 4 days"),
        "{said}"
    );

    write(&dir.path().join("missing.pem"), &good.1);
    let (code, said) = check(&config);
    assert_eq!(code, 78, "{said}");
    assert!(
        said.contains("tls.cert: cannot read certificates from"),
        "{said}"
    );
}

/// One series' value from the node's `/metrics`.
fn metric(addr: SocketAddr, series: &str) -> f64 {
    metric_value(addr, series).unwrap_or_else(|| panic!("no {series} exported"))
}

#[test]
fn handshakes_are_counted_and_the_certificates_expiry_is_exported() {
    // A process of its own: the gauge is process-wide, and other tests'
    // nodes here load other certificates.
    let (dir, outbox) = shared_tempdir();
    let pki = Pki::new(dir.path());
    let live = pki.server("first.mx.test", 30);
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (mut child, _config, addr, _log) = serve_with_tls(
        dir.path(),
        &outbox,
        &live,
        &format!("[metrics]\nlisten = \"{metrics}\""),
    );
    let up = wait_for(Duration::from_secs(20), || TcpStream::connect(metrics).ok());
    assert!(up.is_some(), "metrics never listened on {metrics}");
    assert_eq!(
        metric(metrics, "mailnode_tls_handshakes_total{result=\"ok\"}"),
        0.0
    );
    assert_eq!(
        metric(metrics, "mailnode_tls_handshakes_total{result=\"failed\"}"),
        0.0
    );
    smtplib("starttls", addr.port(), &pki.ca, "counted", "");
    let mut garbage = after_starttls(addr);
    garbage.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(10)).is_some());
    assert_eq!(
        metric(metrics, "mailnode_tls_handshakes_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        metric(metrics, "mailnode_tls_handshakes_total{result=\"failed\"}"),
        1.0
    );

    // The gauge holds the certificate's notAfter, as openssl reads it.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
        .arg(&live.0)
        .output()
        .unwrap();
    let end = String::from_utf8_lossy(&out.stdout);
    let end = end.trim().trim_start_matches("notAfter=").replace(' ', "T");
    let expected = humantime::parse_rfc3339(&end)
        .unwrap_or_else(|e| panic!("{end}: {e}"))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert_eq!(
        metric(metrics, "mailnode_tls_certificate_expiry_timestamp_seconds"),
        expected
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A PROXY v1 header in clear, then TLS from the first byte after it, as
/// HAProxy sends to a `listen_tls` port; then a message.
const PROXIED_IMPLICIT: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
raw.sendall(b"PROXY TCP4 198.51.100.9 192.0.2.1 40000 465\r\n")
tls = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")
f = tls.makefile("rb")
def reply():
    while True:
        line = f.readline().decode()
        if line[3:4] != "-":
            return line.strip()
reply()
for command in ["EHLO client.example", "MAIL FROM:<sender@example.org>", "RCPT TO:<record@example.org>", "DATA"]:
    tls.sendall(command.encode() + b"\r\n"); reply()
tls.sendall(b"Subject: proxied\r\n\r\nbody\r\n.\r\n")
print(reply().rsplit(" ", 1)[1])
tls.sendall(b"QUIT\r\n"); reply()
"#;

#[test]
fn behind_a_balancer_a_listen_tls_port_reads_the_proxy_header_then_speaks_tls() {
    let (node, pki) = tls_node(|c| {
        c.smtp.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
    });
    let id = python(
        PROXIED_IMPLICIT,
        &[
            &tls_addr(&node).port().to_string(),
            pki.ca.to_str().unwrap(),
        ],
    );
    let (msg, env) = delivered(&node, id.trim());
    assert_tls_seen(&msg, &env, "TLSv1.3");
    assert_eq!(env["CLIENT_ADDRESS"], "198.51.100.9");
    assert!(
        msg.contains("Received: from client.example ([198.51.100.9])"),
        "{msg}"
    );
}

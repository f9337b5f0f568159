//! Sender authentication: a real DNS server (Debian's dnsmasq, on a
//! loopback port the test picks) serves SPF, DKIM and DMARC records for a
//! few test domains; messages are signed by an independent DKIM
//! implementation (dkimpy, Debian's python3-dkim); each case asserts the
//! `Authentication-Results:` header and the `AUTH_*` values the program saw.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mailnode::config::{Config, DmarcPolicy};

const RECORD: &str = "record: |cat > OUTBOX/$DELIVERY_ID.m; env > OUTBOX/$DELIVERY_ID.e; mv OUTBOX/$DELIVERY_ID.m OUTBOX/$DELIVERY_ID.msg; mv OUTBOX/$DELIVERY_ID.e OUTBOX/$DELIVERY_ID.env\n";

/// Debian's Python, where python3-dkim is installed (the `python3` on
/// PATH may be another one).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Signs stdin with dkimpy: KEY SELECTOR DOMAIN [length] [times].
const SIGN: &str = r#"
import sys, dkim
key, selector, domain = open(sys.argv[1], "rb").read(), sys.argv[2].encode(), sys.argv[3].encode()
length = len(sys.argv) > 4 and sys.argv[4] == "length"
times = int(sys.argv[5]) if len(sys.argv) > 5 else 1
msg = sys.stdin.buffer.read()
for _ in range(times):
    msg = dkim.sign(msg, selector, domain, key, include_headers=[b"from", b"to", b"subject"], length=length) + msg
sys.stdout.buffer.write(msg)
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test domains' DNS, and the DKIM key of `good.test`.
struct Dns {
    _server: Killed,
    addr: SocketAddr,
    key: PathBuf,
    /// Where questions about `silent.test` go: bound, never read.
    _silent: UdpSocket,
}

/// A TXT value in strings of at most 255 bytes, as dnsmasq takes them.
fn txt(name: &str, value: &str) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(250)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}

/// A DNS query for TXT `name`, by hand.
fn txt_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 16, 0, 1]);
    q
}

impl Dns {
    fn start(dir: &Path) -> Dns {
        let key_dir = dir.join("dkim");
        std::fs::create_dir_all(&key_dir).unwrap();
        let made = Command::new("dknewkey")
            .args(["--ktype", "rsa", "sel1"])
            .current_dir(&key_dir)
            .output()
            .expect("dknewkey runs (Debian's python3-dkim)");
        assert!(made.status.success(), "{made:?}");
        let public = std::fs::read_to_string(key_dir.join("sel1.dns")).unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        let records = [
            txt("good.test", "v=spf1 ip4:127.0.0.1 -all"),
            txt("sel1._domainkey.good.test", public.trim()),
            txt("_dmarc.good.test", "v=DMARC1; p=reject"),
            txt("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
            txt("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
            txt("_dmarc.fail.test", "v=DMARC1; p=reject"),
            txt("quarantine.test", "v=spf1 ip4:192.0.2.1 -all"),
            txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine"),
            txt("helo.good.test", "v=spf1 ip4:127.0.0.1 -all"),
        ];
        // The port is free when picked, but another test may take it
        // before dnsmasq binds it: then dnsmasq exits, and a new port is
        // tried (a bounded number of times).
        let mut started = None;
        for _ in 0..5 {
            let port = free_udp_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--conf-file=/dev/null",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    // Authoritative for the test TLD: unknown names are NXDOMAIN.
                    "--local=/test/",
                ])
                .arg(format!("--server=/silent.test/127.0.0.1#{silent_port}"))
                .arg(format!("--port={port}"))
                .args(&records)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq runs (Debian's dnsmasq-base)");
            let mut server = Killed(child);
            let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
            probe
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let answered = wait_for(Duration::from_secs(10), || {
                if let Ok(Some(_)) = server.0.try_wait() {
                    return Some(false);
                }
                probe.send_to(&txt_query("good.test"), addr).ok()?;
                let mut buf = [0u8; 1500];
                probe.recv(&mut buf).ok().map(|_| true)
            });
            if answered == Some(true) {
                started = Some((server, addr));
                break;
            }
        }
        let (server, addr) = started.expect("dnsmasq answered on a port of its own");
        Dns {
            _server: server,
            addr,
            key: key_dir.join("sel1.key"),
            _silent: silent,
        }
    }

    /// `message` signed for good.test, `times` times.
    fn sign(&self, message: &str, length: bool, times: usize) -> Vec<u8> {
        self.sign_as("good.test", message, length, times)
    }

    /// `message` signed with good.test's key in the name of `domain`.
    fn sign_as(&self, domain: &str, message: &str, length: bool, times: usize) -> Vec<u8> {
        let mut child = Command::new(DEBIAN_PYTHON)
            .arg("-c")
            .arg(SIGN)
            .arg(&self.key)
            .args(["sel1", domain, if length { "length" } else { "all" }])
            .arg(times.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("Debian's python3 with python3-dkim");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(message.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        out.stdout
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn auth_node(dns: SocketAddr, adjust: impl FnOnce(&mut Config)) -> TestNode {
    TestNode::start_with(RECORD, |c| {
        c.hostname = "mx.test".into();
        c.auth.enabled = true;
        c.auth.nameservers = vec![dns];
        c.auth.dns_timeout = Duration::from_secs(2);
        adjust(c);
    })
}

/// Sends `message` with smtplib: MAIL FROM `from`, EHLO `helo`; the final
/// reply's code and text.
fn send(node: &TestNode, helo: &str, from: &str, message: &[u8]) -> (u16, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, message).unwrap();
    let script = r#"
import smtplib, sys
port, helo, sender, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
s.ehlo(helo)
s.mail(sender)
s.rcpt("record@x.test")
code, text = s.data(open(path, "rb").read())
print(code, text.decode())
s.quit()
"#;
    let out = python(
        script,
        &[
            &node.addr.port().to_string(),
            helo,
            from,
            file.to_str().unwrap(),
        ],
    );
    let (code, text) = out.trim().split_once(' ').unwrap();
    (code.parse().unwrap(), text.to_string())
}

/// What the program saw: its stdin and its environment.
fn seen(node: &TestNode, reply: &str) -> (String, std::collections::BTreeMap<String, String>) {
    let id = reply.rsplit(' ').next().unwrap();
    let msg = wait_for_file(&node.outbox.join(format!("{id}.0.msg")));
    let env = wait_for_file(&node.outbox.join(format!("{id}.0.env")));
    (String::from_utf8_lossy(&msg).into_owned(), parse_env(&env))
}

/// Our Authentication-Results header, unfolded.
fn results(msg: &str) -> String {
    let start = msg
        .find("Authentication-Results: mx.test;")
        .unwrap_or_else(|| panic!("no A-R of ours in\n{msg}"));
    let header: Vec<&str> = msg[start..]
        .split('\n')
        .enumerate()
        .take_while(|(i, l)| *i == 0 || l.starts_with('\t') || l.starts_with(' '))
        .map(|(_, l)| l.trim())
        .collect();
    header.join(" ")
}

#[track_caller]
fn assert_auth(
    env: &std::collections::BTreeMap<String, String>,
    spf: &str,
    dkim: &str,
    dmarc: &str,
) {
    assert_eq!(
        (
            env["AUTH_SPF"].as_str(),
            env["AUTH_DKIM"].as_str(),
            env["AUTH_DMARC"].as_str()
        ),
        (spf, dkim, dmarc),
        "{env:?}"
    );
}

fn message(from: &str, subject: &str, body: &str) -> String {
    format!("From: {from}\r\nTo: record@x.test\r\nSubject: {subject}\r\n\r\n{body}\r\n")
}

#[test]
fn each_case_gets_its_results_header_and_variables() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Dns::start(dir.path());
    let node = auth_node(dns.addr, |_| {});

    // Aligned SPF and DKIM: all pass.
    let signed = dns.sign(
        &message("Alice <alice@good.test>", "aligned", "hello"),
        false,
        1,
    );
    let (code, reply) = send(&node, "client.good.test", "alice@good.test", &signed);
    assert_eq!(code, 250, "{reply}");
    let (msg, env) = seen(&node, &reply);
    assert_auth(&env, "pass", "pass", "pass");
    assert_eq!(env["AUTH_FROM_DOMAIN"], "good.test");
    let ar = results(&msg);
    assert!(
        ar.contains("dkim=pass") && ar.contains("header.s=sel1"),
        "{ar}"
    );
    assert!(
        ar.contains("spf=pass") && ar.contains("smtp.mailfrom=alice@good.test"),
        "{ar}"
    );
    assert!(ar.contains("dmarc=pass header.from=good.test"), "{ar}");
    // Above our Received header, below Return-Path and Delivered-To.
    let (ar_at, received_at) = (
        msg.find("Authentication-Results:").unwrap(),
        msg.find("Received: from client.good.test").unwrap(),
    );
    assert!(
        msg.find("Delivered-To:").unwrap() < ar_at && ar_at < received_at,
        "{msg}"
    );

    // The body changed after signing.
    let tampered = String::from_utf8(signed.clone())
        .unwrap()
        .replace("hello", "HELLO");
    let (_, reply) = send(
        &node,
        "client.good.test",
        "alice@good.test",
        tampered.as_bytes(),
    );
    let (msg, env) = seen(&node, &reply);
    assert_eq!(env["AUTH_DKIM"], "fail", "{}", results(&msg));
    assert!(results(&msg).contains("dkim=fail"));

    // A signed header changed after signing.
    let tampered = String::from_utf8(signed.clone())
        .unwrap()
        .replace("Subject: aligned", "Subject: changed");
    let (_, reply) = send(
        &node,
        "client.good.test",
        "alice@good.test",
        tampered.as_bytes(),
    );
    assert_eq!(seen(&node, &reply).1["AUTH_DKIM"], "fail");

    // A client outside the SPF record: -all fails, ~all soft-fails.
    let plain = message("x@fail.test", "spf", "x");
    let (_, reply) = send(&node, "client.example", "x@fail.test", plain.as_bytes());
    let (msg, env) = seen(&node, &reply);
    assert_auth(&env, "fail", "none", "fail");
    assert!(results(&msg).contains("spf=fail"), "{}", results(&msg));
    let plain = message("x@soft.test", "spf", "x");
    let (_, reply) = send(&node, "client.example", "x@soft.test", plain.as_bytes());
    assert_eq!(seen(&node, &reply).1["AUTH_SPF"], "softfail");

    // A domain without any record.
    let plain = message("x@none.test", "none", "x");
    let (_, reply) = send(&node, "client.example", "x@none.test", plain.as_bytes());
    let (msg, env) = seen(&node, &reply);
    assert_auth(&env, "none", "none", "none");
    assert_eq!(env["AUTH_FROM_DOMAIN"], "none.test");
    assert!(results(&msg).contains("spf=none"), "{}", results(&msg));

    // <> is checked with the HELO name.
    let bounce = message("MAILER-DAEMON@helo.good.test", "bounce", "x");
    let (_, reply) = send(&node, "helo.good.test", "", bounce.as_bytes());
    let (msg, env) = seen(&node, &reply);
    assert_eq!(env["AUTH_SPF"], "pass", "{}", results(&msg));

    // Forged results: ours removed, another service's kept.
    let forged = format!(
        "Authentication-Results: mx.test; dkim=pass header.d=bank.example\r\nAuthentication-Results: other.example; spf=pass\r\n{}",
        message("x@none.test", "forged", "x")
    );
    let (_, reply) = send(&node, "client.example", "x@none.test", forged.as_bytes());
    let (msg, _) = seen(&node, &reply);
    assert_eq!(
        msg.matches("Authentication-Results: mx.test;").count(),
        1,
        "{msg}"
    );
    assert!(!msg.contains("bank.example"), "{msg}");
    assert!(
        msg.contains("Authentication-Results: other.example; spf=pass"),
        "{msg}"
    );
}

#[test]
fn a_dns_server_that_never_answers_gives_temperror_and_the_message_is_accepted() {
    // Bound, never read: every question goes unanswered.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let node = auth_node(silent.local_addr().unwrap(), |c| {
        c.auth.dns_timeout = Duration::from_secs(1);
    });
    let started = Instant::now();
    let (code, reply) = send(
        &node,
        "client.good.test",
        "alice@good.test",
        message("alice@good.test", "slow dns", "x").as_bytes(),
    );
    let took = started.elapsed();
    assert_eq!(code, 250, "{reply}");
    let (_, env) = seen(&node, &reply);
    assert_eq!(env["AUTH_SPF"], "temperror", "{env:?}");
    assert_eq!(env["AUTH_DMARC"], "temperror", "{env:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn enforce_refuses_a_spoofed_p_reject_domain_and_report_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Dns::start(dir.path());
    let spoof = message("CEO <ceo@fail.test>", "wire the money", "now");
    let enforcing = auth_node(dns.addr, |c| c.auth.dmarc_policy = DmarcPolicy::Enforce);
    let (code, reply) = send(
        &enforcing,
        "client.example",
        "ceo@fail.test",
        spoof.as_bytes(),
    );
    assert_eq!(
        (code, reply.as_str()),
        (
            550,
            "5.7.1 Message rejected: DMARC policy of the From: domain (p=reject)"
        )
    );
    // Nothing queued, no program run.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(enforcing.queue_files(), 0);
    assert_eq!(enforcing.incoming_files(), 0);
    assert_eq!(std::fs::read_dir(&enforcing.outbox).unwrap().count(), 0);
    // Several From: domains: DMARC cannot vouch, enforce refuses.
    let two =
        "From: ceo@fail.test, friend@none.test\r\nTo: record@x.test\r\nSubject: two\r\n\r\nx\r\n";
    let (code, reply) = send(
        &enforcing,
        "client.example",
        "ceo@fail.test",
        two.as_bytes(),
    );
    assert_eq!(
        (code, reply.as_str()),
        (
            550,
            "5.7.1 Message rejected: the From: header names several domains"
        )
    );
    // p=quarantine changes nothing but the header.
    let quarantined = message("x@quarantine.test", "q", "x");
    let (code, reply) = send(
        &enforcing,
        "client.example",
        "x@quarantine.test",
        quarantined.as_bytes(),
    );
    assert_eq!(code, 250, "{reply}");
    assert_eq!(seen(&enforcing, &reply).1["AUTH_DMARC"], "fail");

    let reporting = auth_node(dns.addr, |_| {});
    let (code, reply) = send(
        &reporting,
        "client.example",
        "ceo@fail.test",
        spoof.as_bytes(),
    );
    assert_eq!(code, 250, "{reply}");
    let (msg, env) = seen(&reporting, &reply);
    assert_eq!(env["AUTH_DMARC"], "fail");
    assert!(results(&msg).contains("dmarc=fail"), "{}", results(&msg));
    let (code, reply) = send(
        &reporting,
        "client.example",
        "ceo@fail.test",
        two.as_bytes(),
    );
    assert_eq!(code, 250, "{reply}");
    let (_, env) = seen(&reporting, &reply);
    assert_eq!(
        (env["AUTH_DMARC"].as_str(), env["AUTH_FROM_DOMAIN"].as_str()),
        ("permerror", "")
    );
}

#[test]
fn long_bodies_l_tags_and_a_hundred_signatures_verify_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Dns::start(dir.path());
    let node = auth_node(dns.addr, |_| {});
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let big = line.repeat(1_100_000 / line.len());
    assert!(big.len() > 1 << 20);
    let signed = dns.sign(&message("alice@good.test", "big", &big), false, 1);
    let (code, reply) = send(&node, "client.good.test", "alice@good.test", &signed);
    assert_eq!(code, 250, "{reply}");
    assert_eq!(seen(&node, &reply).1["AUTH_DKIM"], "pass");

    // l=: the signed length verifies; text appended after signing is not
    // what was signed, and says so (neutral, not pass).
    let mut signed = dns.sign(
        &message("alice@good.test", "length", "signed part"),
        true,
        1,
    );
    assert!(String::from_utf8_lossy(&signed).contains(" l=13;"));
    let (_, reply) = send(&node, "client.good.test", "alice@good.test", &signed);
    assert_eq!(seen(&node, &reply).1["AUTH_DKIM"], "pass");
    signed.extend_from_slice(b"Wire the money to account 666.\r\n");
    let (_, reply) = send(&node, "client.good.test", "alice@good.test", &signed);
    let (msg, env) = seen(&node, &reply);
    assert_eq!(env["AUTH_DKIM"], "neutral", "{}", results(&msg));
    assert!(results(&msg).contains("l="), "{}", results(&msg));

    let signed = dns.sign(&message("alice@good.test", "many", "x"), false, 100);
    let started = Instant::now();
    let (code, reply) = send(&node, "client.good.test", "alice@good.test", &signed);
    let took = started.elapsed();
    assert_eq!(code, 250, "{reply}");
    assert_eq!(seen(&node, &reply).1["AUTH_DKIM"], "pass");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn signatures_whose_dns_never_answers_cannot_turn_an_enforced_reject_into_temperror() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Dns::start(dir.path());
    let node = auth_node(dns.addr, |c| {
        c.auth.dmarc_policy = DmarcPolicy::Enforce;
        c.auth.dns_timeout = Duration::from_secs(1);
    });
    // A spoof of a p=reject domain, with twenty signatures whose keys
    // live behind a DNS server that never answers.
    let spoof = message("CEO <ceo@fail.test>", "wire the money", "now");
    let padded = dns.sign_as("silent.test", &spoof, false, 20);
    let started = Instant::now();
    let (code, reply) = send(&node, "client.example", "ceo@fail.test", &padded);
    let took = started.elapsed();
    assert_eq!(code, 550, "{reply}");
    assert_eq!(node.queue_files(), 0);
    // At most 8 signatures are checked, a second each at most.
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn the_verdict_is_kept_with_the_queued_message_and_shown_by_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Dns::start(dir.path());
    let node = TestNode::start_with("record: |exit 75\n", |c| {
        c.hostname = "mx.test".into();
        c.auth.enabled = true;
        c.auth.nameservers = vec![dns.addr];
        c.queue.retry_min = Duration::from_secs(3600);
        c.queue.retry_max = Duration::from_secs(3600);
    });
    let signed = dns.sign(&message("alice@good.test", "kept", "x"), false, 1);
    let (code, reply) = send(&node, "client.good.test", "alice@good.test", &signed);
    assert_eq!(code, 250, "{reply}");
    let id = reply.rsplit(' ').next().unwrap().to_string();
    let shown = wait_for(Duration::from_secs(20), || {
        let out = Command::new(env!("CARGO_BIN_EXE_mailnode"))
            .args(["ctl", "--json", "--control"])
            .arg(node.dir.path().join("ctl.sock"))
            .args(["queue", "show", &id])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["recipients"][0]["attempts"].as_u64()? >= 1).then_some(v)
    })
    .expect("queue show");
    assert_eq!(
        (
            shown["auth_spf"].as_str(),
            shown["auth_dkim"].as_str(),
            shown["auth_dmarc"].as_str(),
            shown["auth_from_domain"].as_str()
        ),
        (Some("pass"), Some("pass"), Some("pass"), Some("good.test")),
        "{shown}"
    );
}

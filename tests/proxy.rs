//! The PROXY protocol: a load balancer's header names the client for
//! everything (programs, `Received:`, limits, access), a bad, missing or
//! slow one closes the connection without a greeting, and from any other
//! peer a `PROXY` line is just an unknown command. Then the same through a
//! real HAProxy (Debian's), with `send-proxy` and `send-proxy-v2`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mailnode::config::Config;

/// Records each delivery's message and environment, each file whole once
/// it has its name.
const RECORD: &str = "record: |cat > OUTBOX/$DELIVERY_ID.m; env > OUTBOX/$DELIVERY_ID.e; mv OUTBOX/$DELIVERY_ID.m OUTBOX/$DELIVERY_ID.msg; mv OUTBOX/$DELIVERY_ID.e OUTBOX/$DELIVERY_ID.env\n";

/// A node that takes PROXY headers from loopback's 127.0.0.1.
fn behind_a_balancer(adjust: impl FnOnce(&mut Config)) -> TestNode {
    TestNode::start_with(RECORD, |c| {
        c.smtp.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
        // Limits must meet the clients the headers name.
        c.limits.exempt = Vec::new();
        adjust(c);
    })
}

fn v1(source: &str) -> Vec<u8> {
    format!("PROXY TCP4 {source} 198.51.100.1 51000 25\r\n").into_bytes()
}

/// A version 2 header (PROXY, TCP over IPv6) naming `source`, by hand.
fn v2_ipv6(source: std::net::Ipv6Addr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x21, 0, 36]);
    h.extend_from_slice(&source.octets());
    h.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    h.extend_from_slice(&51000u16.to_be_bytes());
    h.extend_from_slice(&25u16.to_be_bytes());
    h
}

/// A version 2 `LOCAL` header: a balancer's own health check.
fn v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

/// Sends a message after `header`; the environment its program saw.
fn deliver_after(node: &TestNode, header: &[u8], tag: &str) -> (String, String) {
    let mut c = node.client();
    c.send(header);
    let id = c.send_message(
        "client.example",
        "sender@example.org",
        "record@example.org",
        &format!("Subject: {tag}\r\n\r\nbody\r\n"),
    );
    let env = wait_for_file(&node.outbox.join(format!("{id}.0.env")));
    let msg = wait_for_file(&node.outbox.join(format!("{id}.0.msg")));
    (
        String::from_utf8_lossy(&env).into_owned(),
        String::from_utf8_lossy(&msg).into_owned(),
    )
}

#[test]
fn the_client_a_proxy_header_names_is_the_client_for_everything() {
    let node = behind_a_balancer(|c| {
        c.access.deny = vec!["192.0.2.66/32".parse().unwrap()];
        c.smtp.max_connections_per_ip = 1;
    });
    let (env, msg) = deliver_after(&node, &v1("192.0.2.7"), "v1");
    assert!(env.contains("CLIENT_ADDRESS=192.0.2.7\n"), "{env}");
    assert!(msg.contains("[192.0.2.7]"), "{msg}");

    let (env, msg) = deliver_after(&node, &v2_ipv6("2001:db8::7".parse().unwrap()), "v2");
    assert!(env.contains("CLIENT_ADDRESS=2001:db8::7\n"), "{env}");
    assert!(msg.contains("2001:db8::7"), "{msg}");

    // A health check keeps the balancer's own address.
    let (env, _) = deliver_after(&node, &v2_local(), "local");
    assert!(env.contains("CLIENT_ADDRESS=127.0.0.1\n"), "{env}");
    let (env, _) = deliver_after(&node, b"PROXY UNKNOWN\r\n", "unknown");
    assert!(env.contains("CLIENT_ADDRESS=127.0.0.1\n"), "{env}");

    // Access rules and per-address limits meet the client, not the
    // balancer all clients come through.
    let mut denied = node.client();
    denied.send(&v1("192.0.2.66"));
    assert!(denied.reply().is(554, "5.7.1"));
    let mut first = node.client();
    first.send(&v1("192.0.2.9"));
    assert_eq!(first.reply().code, 220);
    let mut second = node.client();
    second.send(&v1("192.0.2.9"));
    assert!(second.reply().is(421, "4.7.0"));
    let mut other = node.client();
    other.send(&v1("192.0.2.10"));
    assert_eq!(other.reply().code, 220, "another client is not limited");
}

/// Whether the server closes the connection without having sent a byte.
fn closed_without_a_word(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let ended = match stream.read_to_end(&mut got) {
        Ok(_) => true,
        // Closed with the client's bytes unread.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    ended && got.is_empty()
}

#[test]
fn a_bad_missing_or_slow_header_closes_the_connection_without_a_greeting() {
    let node = behind_a_balancer(|c| c.smtp.command_timeout = Duration::from_secs(1));
    let bad: [&[u8]; 4] = [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 192.0.2.7 nonsense 1 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
    ];
    for bytes in bad {
        let mut s = TcpStream::connect(node.addr).unwrap();
        s.write_all(bytes).unwrap();
        assert!(closed_without_a_word(&mut s), "{bytes:?}");
    }
    // Nothing at all: closed once command_timeout (here 1 s) is up.
    let mut silent = TcpStream::connect(node.addr).unwrap();
    let started = Instant::now();
    assert!(closed_without_a_word(&mut silent));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // And the node serves on.
    let (env, _) = deliver_after(&node, &v1("192.0.2.7"), "after");
    assert!(env.contains("CLIENT_ADDRESS=192.0.2.7\n"));
}

#[test]
fn a_header_is_awaited_10_seconds_at_most_and_header_readers_count_against_max_connections() {
    // command_timeout stays 5 minutes: the wait is 10 s.
    let node = behind_a_balancer(|c| c.smtp.max_connections = 2);
    let started = Instant::now();
    let mut silent = TcpStream::connect(node.addr).unwrap();
    let _also_silent = TcpStream::connect(node.addr).unwrap();
    // Two wait for their headers: a third is over max_connections.
    let mut third = node.client();
    assert!(third.reply().is(421, "4.3.2"));
    assert!(closed_without_a_word(&mut silent));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(9500) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
}

#[test]
fn from_any_other_peer_a_proxy_line_is_an_unknown_command() {
    let node = TestNode::start(RECORD);
    let mut c = node.client();
    assert_eq!(c.reply().code, 220);
    assert!(c
        .cmd("PROXY TCP4 192.0.2.7 198.51.100.1 51000 25")
        .is(500, "5.5.2"));
}

// --- through a real HAProxy --------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_mailnode");

/// Waits until something accepts connections on `addr`.
fn wait_listening(addr: SocketAddr) {
    let up = wait_for(Duration::from_secs(20), || {
        TcpStream::connect(addr).ok().map(|_| ())
    });
    assert!(up.is_some(), "nothing listens on {addr}");
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node's config in `dir`: SMTP on `listen`, PROXY headers from
/// 127.0.0.1, its program writing to `outbox`, and `extra` TOML.
fn node_config(dir: &Path, outbox: &Path, listen: SocketAddr, extra: &str) -> std::path::PathBuf {
    let aliases = dir.join("aliases");
    std::fs::write(
        &aliases,
        RECORD.replace("OUTBOX", &outbox.display().to_string()),
    )
    .unwrap();
    let config = dir.join("mailnode.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\n[aliases]\npath = \"{}\"\n[spool]\npath = \"{}\"\n[control]\nsocket = \"{}\"\n[smtp]\nlisten = [\"{listen}\"]\nproxy_protocol_from = [\"127.0.0.1/32\"]\n{extra}",
            aliases.display(),
            dir.join("spool").display(),
            dir.join("ctl.sock").display()
        ),
    )
    .unwrap();
    config
}

/// `mailnode serve -c config`: the process, its SMTP and metrics
/// addresses, and its log lines.
fn serve(config: &Path) -> (Killed, SocketAddr, SocketAddr, ServeLog) {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .arg("--metrics")
        .arg(metrics.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (smtp, log) = listening_address(&mut child);
    wait_listening(metrics);
    (Killed(child), smtp, metrics, log)
}

/// HAProxy in front of `node`, relaying with `send` (`send-proxy` or
/// `send-proxy-v2`) and checking it with SMTP health checks that carry a
/// PROXY header too.
fn haproxy(dir: &Path, node: SocketAddr, send: &str) -> (Killed, SocketAddr) {
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.join(format!("haproxy-{send}.cfg"));
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend smtp\n  bind {front}\n  default_backend nodes\nbackend nodes\n  option smtpchk HELO haproxy.test\n  server n1 {node} {send} check check-send-proxy inter 300ms\n"
        ),
    )
    .unwrap();
    (run_haproxy(&config, front), front)
}

/// HAProxy in the foreground with `config`, once it listens on `front`.
fn run_haproxy(config: &Path, front: SocketAddr) -> Killed {
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy runs (Debian's haproxy package)");
    wait_listening(front);
    Killed(child)
}

fn metric(addr: SocketAddr, series: &str) -> f64 {
    metric_value(addr, series).unwrap_or(0.0)
}

/// Python's smtplib from a given loopback address, through `front`.
const CLIENT: &str = r#"
import smtplib, socket, sys, time
front_port, mode = int(sys.argv[1]), sys.argv[2]
def client(source):
    return smtplib.SMTP("127.0.0.1", front_port, source_address=(source, 0), timeout=20)
if mode == "send":
    s = client("127.0.0.2")
    s.sendmail("sender@example.org", ["record@example.org"], "Subject: through haproxy\r\n\r\nbody\r\n")
    s.quit()
    print("sent")
elif mode == "deny":
    try:
        client("127.0.0.3")
        print("greeted")
    except smtplib.SMTPConnectError as e:
        print("refused", e.smtp_code)
elif mode == "per-ip":
    first = client("127.0.0.2")
    try:
        client("127.0.0.2")
        print("second greeted")
    except smtplib.SMTPConnectError as e:
        print("second refused", e.smtp_code)
    other = client("127.0.0.4")
    print("other greeted")
"#;

#[test]
fn through_haproxy_programs_limits_and_access_see_the_real_client() {
    for send in ["send-proxy", "send-proxy-v2"] {
        let (dir, outbox) = shared_tempdir();
        let config = node_config(
            dir.path(),
            &outbox,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "max_connections_per_ip = 1\n[limits]\nexempt = []\n[access]\ndeny = [\"127.0.0.3/32\"]\n",
        );
        let (_node, node_addr, metrics, log) = serve(&config);
        let (_haproxy, front) = haproxy(dir.path(), node_addr, send);
        let port = front.port().to_string();

        assert_eq!(python(CLIENT, &[&port, "send"]).trim(), "sent", "{send}");
        let env = wait_for(Duration::from_secs(20), || {
            std::fs::read_dir(&outbox).ok()?.find_map(|e| {
                let path = e.ok()?.path();
                (path.extension()? == "env").then_some(path)
            })
        })
        .expect("delivered");
        let env = String::from_utf8_lossy(&wait_for_file(&env)).into_owned();
        assert!(env.contains("CLIENT_ADDRESS=127.0.0.2\n"), "{send}: {env}");
        assert!(
            log.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("queued") && l.contains("client=127.0.0.2")),
            "{send}: the log names the real client"
        );
        assert_eq!(
            python(CLIENT, &[&port, "deny"]).trim(),
            "refused 554",
            "{send}: access.deny meets the real client"
        );
        assert_eq!(
            python(CLIENT, &[&port, "per-ip"]).trim(),
            "second refused 421\nother greeted",
            "{send}: max_connections_per_ip meets the real client"
        );

        // Health checks (every 300 ms) are sessions without mail, and their
        // LOCAL headers are good ones.
        let checked = wait_for(Duration::from_secs(10), || {
            (metric(metrics, "mailnode_proxy_headers_total{result=\"ok\"}") >= 10.0).then_some(())
        });
        assert!(checked.is_some(), "{send}: no health checks came");
        assert_eq!(
            metric(
                metrics,
                "mailnode_smtp_messages_total{outcome=\"accepted\"}"
            ),
            1.0,
            "{send}"
        );
        assert_eq!(
            metric(metrics, "mailnode_proxy_headers_total{result=\"invalid\"}"),
            0.0
        );
        assert_eq!(
            metric(metrics, "mailnode_proxy_headers_total{result=\"missing\"}"),
            0.0
        );
    }
}

// --- a fleet ------------------------------------------------------------------

/// ops/haproxy/haproxy.cfg as shipped, on loopback: its frontend on
/// `front`, its two servers `nodes`, checked often so a stopped node is
/// seen at once.
fn shipped_haproxy(dir: &Path, front: SocketAddr, nodes: [SocketAddr; 2]) -> Killed {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/haproxy/haproxy.cfg"),
    )
    .unwrap();
    let mut config = String::new();
    for line in shipped.lines() {
        let line = line
            .replace("bind [::]:25 v4v6", &format!("bind {front}"))
            .replace("10.0.0.11:2525", &nodes[0].to_string())
            .replace("10.0.0.12:2525", &nodes[1].to_string())
            .replace("inter 5s fall 2 rise 2", "inter 200ms fall 1 rise 1");
        // Neither syslog nor the haproxy user and its chroot here.
        let word = line.split_whitespace().next().unwrap_or("");
        if !matches!(word, "log" | "user" | "group" | "chroot") {
            config.push_str(&line);
            config.push('\n');
        }
    }
    assert!(
        config.contains(&format!("server node2 {}", nodes[1])),
        "{config}"
    );
    let path = dir.join("haproxy-fleet.cfg");
    std::fs::write(&path, config).unwrap();
    run_haproxy(&path, front)
}

/// One message with `token` as its subject through `front`; Err on
/// anything but a 250 at its end (a reset, a refusal, a node that died).
fn try_send(front: SocketAddr, token: &str) -> Result<(), String> {
    let stream = TcpStream::connect(front).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut expect = |sent: &str, code: &str| -> Result<(), String> {
        if !sent.is_empty() {
            writer
                .write_all(sent.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("closed after {sent:?}"));
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return if line.starts_with(code) {
                    Ok(())
                } else {
                    Err(format!("{sent:?}: {line}"))
                };
            }
        }
    };
    expect("", "220")?;
    expect("EHLO client.example\r\n", "250")?;
    expect("MAIL FROM:<sender@example.org>\r\n", "250")?;
    expect("RCPT TO:<record@example.org>\r\n", "250")?;
    expect("DATA\r\n", "354")?;
    expect(&format!("Subject: {token}\r\n\r\nbody\r\n.\r\n"), "250")?;
    let _ = expect("QUIT\r\n", "221");
    Ok(())
}

/// The subjects of every message the nodes' programs wrote.
fn delivered_subjects(outboxes: &[&Path]) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (node, outbox) in outboxes.iter().enumerate() {
        for entry in std::fs::read_dir(outbox).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "msg") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if let Some(subject) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
                    found.push((node, subject.to_string()));
                }
            }
        }
    }
    found
}

#[test]
fn a_fleet_behind_haproxy_loses_nothing_when_a_node_is_killed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let (one, outbox1) = shared_tempdir();
    let (two, outbox2) = shared_tempdir();
    let addr1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addr2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config1 = node_config(one.path(), &outbox1, addr1, "");
    let config2 = node_config(two.path(), &outbox2, addr2, "");
    let (_node1, _, _, _) = serve(&config1);
    let (node2, _, _, _) = serve(&config2);
    let mut node2 = Some(node2);
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _haproxy = shipped_haproxy(one.path(), front, [addr1, addr2]);

    // Through HAProxy every client is 127.0.0.1 here, exempt (by default)
    // from the per-address limits: 1,000 messages in seconds would meet the
    // connection rate otherwise.
    // 10 clients send 1,000 messages; a message refused or cut off is sent
    // again (a new subject each try), as a client's queue would.
    let (total, clients) = (1000, 10);
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let retried = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..clients)
        .map(|_| {
            let (next, acknowledged, retried) = (
                Arc::clone(&next),
                Arc::clone(&acknowledged),
                Arc::clone(&retried),
            );
            std::thread::spawn(move || loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return;
                }
                let mut attempt = 0;
                loop {
                    let token = format!("m{n}-a{attempt}");
                    match try_send(front, &token) {
                        Ok(()) => {
                            acknowledged.lock().unwrap().push(token);
                            break;
                        }
                        Err(why) => {
                            attempt += 1;
                            retried.fetch_add(1, Ordering::SeqCst);
                            assert!(attempt < 50, "{token}: {why}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
        })
        .collect();

    // Halfway, node 2 dies and is started again on its spool.
    let halfway = wait_for(Duration::from_secs(120), || {
        (acknowledged.lock().unwrap().len() >= total / 2).then_some(())
    });
    assert!(halfway.is_some(), "half the messages never went through");
    drop(node2.take());
    let (restarted, _, _, _) = serve(&config2);
    for sender in senders {
        sender.join().expect("a client gave up");
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), total);

    // Every acknowledged message delivered once, by one node (a program
    // run again after the kill rewrites its own DELIVERY_ID's file).
    let outboxes = [outbox1.as_path(), outbox2.as_path()];
    let all = wait_for(Duration::from_secs(120), || {
        let found = delivered_subjects(&outboxes);
        acknowledged
            .iter()
            .all(|token| found.iter().any(|(_, s)| s == token))
            .then_some(found)
    })
    .expect("an acknowledged message was never delivered");
    let mut split = [0usize; 2];
    for token in &acknowledged {
        let copies: Vec<&(usize, String)> = all.iter().filter(|(_, s)| s == token).collect();
        assert_eq!(copies.len(), 1, "{token} delivered {} times", copies.len());
        split[copies[0].0] += 1;
    }
    println!(
        "fleet: node 1 took {}, node 2 took {} of {total}; {} attempts were refused or cut off and sent again",
        split[0],
        split[1],
        retried.load(Ordering::SeqCst)
    );
    assert!(
        split[0] > 0 && split[1] > 0,
        "one node took everything: {split:?}"
    );
    drop(restarted);
}

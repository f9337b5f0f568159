//! Hostile clients against a running node (issue 8, first part): floods of
//! pipelined commands, a client that never reads, slowloris, many idle
//! connections (5,000 of them). The node must stay up and keep serving everyone else.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const ALIASES: &str = "ok: |cat > /dev/null\n";

/// A normal client still gets through, quickly.
fn served_promptly(node: &TestNode) {
    let started = Instant::now();
    let mut c = node.client();
    assert_eq!(c.reply().code, 220);
    c.cmd("EHLO normal");
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: still here\r\n\r\nx\r\n.\r\n");
    queued_id(&c.reply());
    // Generous: this is "not starved", not a benchmark.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn thousands_of_pipelined_commands_in_one_write_get_every_reply_in_order() {
    let node = TestNode::start(ALIASES);
    let mut c = node.client();
    c.reply();
    let mut burst = Vec::new();
    for i in 0..5000 {
        if i % 2 == 0 {
            burst.extend_from_slice(b"NOOP\r\n");
        } else {
            burst.extend_from_slice(b"FROB\r\n");
        }
    }
    c.send(&burst);
    for i in 0..5000 {
        let r = c.reply();
        let expected = if i % 2 == 0 { 250 } else { 500 };
        assert_eq!(r.code, expected, "reply {i}");
    }
    served_promptly(&node);
}

#[test]
fn a_client_that_never_reads_is_cut_off_and_others_are_served() {
    let node = TestNode::start_with(ALIASES, |c| c.smtp.command_timeout = Duration::from_secs(1));
    let mut flood = std::net::TcpStream::connect(node.addr).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Write until the server stops taking it (its replies pile up unread).
    let chunk = b"NOOP\r\n".repeat(10_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut cut_off = false;
    while Instant::now() < deadline {
        if flood.write_all(&chunk).is_err() {
            cut_off = true;
            break;
        }
    }
    assert!(
        cut_off,
        "the server kept reading from a client that never reads"
    );
    served_promptly(&node);
}

#[test]
fn slowloris_is_ended_by_the_command_timeout() {
    let node = TestNode::start_with(ALIASES, |c| c.smtp.command_timeout = Duration::from_secs(1));
    let mut slow = node.client();
    slow.reply();
    let started = Instant::now();
    // One byte of a never-ending command every 100 ms, until hung up on.
    while started.elapsed() < Duration::from_secs(10) && slow.try_send(b"N") {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "still talking after 10 s"
    );
    let r = slow.reply();
    assert!(r.is(421, "4.4.2"), "{r:?}");
    served_promptly(&node);
}

/// As many connections as the process may open, up to `wanted`: each
/// costs two descriptors here (client and server end, in one process).
fn raise_open_file_limit(wanted: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    let room = (limit.rlim_cur as usize).saturating_sub(200) / 2;
    wanted.min(room)
}

#[test]
fn five_thousand_idle_connections_do_not_starve_a_normal_client() {
    const IDLE: usize = 5000;
    let idle_count = raise_open_file_limit(IDLE);
    assert!(
        idle_count == IDLE,
        "the open-file limit allows only {idle_count} idle connections"
    );
    let node = TestNode::start_with(ALIASES, |c| {
        c.smtp.max_connections = IDLE + 10;
        c.smtp.max_connections_per_ip = IDLE + 10;
        c.limits.connection_rate_per_ip = "1000000/s".parse().unwrap();
    });
    let mut idle = Vec::with_capacity(IDLE);
    for n in 0..IDLE {
        let mut s = std::net::TcpStream::connect(node.addr)
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // Greeted, then silent.
        assert!(read_line(&mut s).starts_with("220 "), "connection {n}");
        idle.push(s);
    }
    served_promptly(&node);
    assert!(
        node.node.as_ref().unwrap().sessions() >= IDLE,
        "idle sessions were dropped"
    );
    // Still held, still answering.
    for s in idle.iter_mut().step_by(500) {
        s.write_all(b"NOOP\r\n").unwrap();
        assert!(read_line(s).starts_with("250 "));
    }
}

/// One reply line, read a byte at a time so nothing after it is consumed.
fn read_line(s: &mut std::net::TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        s.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Header injection: a line break or another control character smuggled
/// into HELO, MAIL or RCPT is refused with 501 (or splits into a second,
/// unknown command), and the message that follows carries no header the
/// client wrote into those fields.
#[test]
fn header_injection_through_helo_and_addresses_is_refused() {
    let node = TestNode::start("ok: |cat > OUTBOX/message\n");
    let mut c = node.client();
    assert_eq!(c.reply().code, 220);
    for attempt in [
        &b"HELO evil\rX-Injected: helo-cr\r\n"[..],
        "HELO evil\u{85}X-Injected: helo-nel\r\n".as_bytes(),
        b"HELO evil\x0bX-Injected: helo-vt\r\n",
        b"MAIL FROM:<a\r@example.org>\r\n",
        "MAIL FROM:<a\u{2028}@example.org> SMTPUTF8\r\n".as_bytes(),
        b"MAIL FROM:<\"a\rX-Injected: quoted\"@example.org>\r\n",
    ] {
        c.send(attempt);
        let r = c.reply();
        assert!(
            r.is(501, "5.5.4") || r.is(501, "5.1.3") || r.is(553, "5.1.3"),
            "{attempt:?}: {r:?}"
        );
    }
    // A bare LF ends the command line, so the rest is a command of its own.
    c.send(b"HELO evil\nX-Injected: helo-lf\r\n");
    assert_eq!(c.reply().code, 250);
    assert!(c.reply().is(500, "5.5.2"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").is(250, "2.1.0"));
    c.send(b"RCPT TO:<ok@example.org\rX-Injected: rcpt>\r\n");
    assert_eq!(c.reply().code, 501);
    assert!(c.cmd("RCPT TO:<ok@example.org>").is(250, "2.1.5"));
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: clean\r\n\r\nbody\r\n.\r\n");
    queued_id(&c.reply());
    let message = wait_for_file(&node.outbox.join("message"));
    let text = String::from_utf8_lossy(&message);
    assert!(!text.contains("X-Injected"), "{text}");
    assert!(text.contains("Received: from evil ("), "{text}");
}

//! The SMTP dialogue of a running node, over real TCP: every reply of the
//! contract's table that the core mail path owns, pipelining, and the DATA
//! rules that keep smuggled messages out.

mod common;

use std::time::Duration;

use common::*;

const ALIASES: &str = "\
ok: |cat > /dev/null
file: /var/mail/file
ops: oncall@partner.example
";

fn session(node: &TestNode) -> Client {
    let mut c = node.client();
    let greeting = c.reply();
    assert_eq!(greeting.code, 220);
    assert!(
        greeting.text.starts_with("220 mx.test ESMTP mailnode"),
        "{greeting:?}"
    );
    c
}

fn assert_reply(r: &Reply, code: u16, enhanced: &str) {
    assert!(
        r.is(code, enhanced),
        "expected {code} {enhanced}, got {r:?}"
    );
}

#[test]
fn ehlo_advertises_the_contract_extensions() {
    let node = TestNode::start(ALIASES);
    let mut c = session(&node);
    let r = c.cmd("EHLO client.example");
    assert_eq!(r.code, 250);
    for ext in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
    ] {
        assert!(
            r.text.lines().any(|l| &l[4..] == ext),
            "{ext} missing: {}",
            r.text
        );
    }
    assert_eq!(c.cmd("HELO client.example").code, 250);
    assert_eq!(c.cmd("NOOP").code, 250);
    assert_reply(&c.cmd("VRFY ok"), 252, "2.0.0");
    assert_eq!(c.cmd("HELP").code, 214);
    assert_reply(&c.cmd("RSET"), 250, "2.0.0");
    assert_reply(&c.cmd("QUIT"), 221, "2.0.0");
    assert!(c.is_closed());
}

#[test]
fn recipient_replies() {
    let node = TestNode::start(ALIASES);
    let mut c = session(&node);
    c.cmd("EHLO client");
    assert_reply(&c.cmd("MAIL FROM:<a@example.org>"), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<nobody@example.org>"), 550, "5.1.1");
    assert_reply(&c.cmd("RCPT TO:<file@example.org>"), 550, "5.1.1");
    // An address alias needs [relay]; none is configured.
    assert_reply(&c.cmd("RCPT TO:<ops@example.org>"), 550, "5.1.1");
    assert_reply(&c.cmd("RCPT TO:<OK@Example.Org>"), 250, "2.1.5");
    assert_reply(&c.cmd("RCPT TO:<a@@b>"), 501, "5.1.3");
    assert_reply(&c.cmd("RCPT TO:<jörg@example.org>"), 553, "5.6.7");
    assert_reply(
        &c.cmd(&format!("RCPT TO:<{}@example.org>", "a".repeat(65))),
        501,
        "5.1.3",
    );
}

#[test]
fn local_domains_and_recipient_limit() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.smtp.local_domains = vec!["example.org".into()];
        c.smtp.max_recipients = 2;
    });
    let mut c = session(&node);
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<a@example.org>");
    assert_reply(&c.cmd("RCPT TO:<ok@elsewhere.example>"), 554, "5.7.1");
    assert_reply(&c.cmd("RCPT TO:<ok@EXAMPLE.org>"), 250, "2.1.5");
    assert_reply(&c.cmd("RCPT TO:<ok+x@example.org>"), 250, "2.1.5");
    assert_reply(&c.cmd("RCPT TO:<ok+y@example.org>"), 452, "4.5.3");
}

#[test]
fn sequence_and_syntax_replies() {
    let node = TestNode::start(ALIASES);
    let mut c = session(&node);
    assert_reply(&c.cmd("DATA"), 503, "5.5.1");
    assert_reply(&c.cmd("RCPT TO:<ok@example.org>"), 503, "5.5.1");
    assert_reply(&c.cmd("FROB"), 500, "5.5.2");
    assert_reply(&c.cmd("MAIL FROM:"), 501, "5.5.4");
    assert_reply(&c.cmd("MAIL FROM:<a@example.org> FOO=BAR"), 555, "5.5.4");
    c.send(b"HELO a\0b\r\n");
    assert_reply(&c.reply(), 501, "5.5.4");
    let long = format!("NOOP {}", "x".repeat(600));
    assert_reply(&c.cmd(&long), 500, "5.5.6");
    // 512 octets with the CRLF is still a command.
    let longest = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert_reply(&c.cmd(&longest), 250, "2.0.0");
    assert_reply(&c.cmd("MAIL FROM:<a@example.org>"), 250, "2.1.0");
    assert_reply(&c.cmd("MAIL FROM:<a@example.org>"), 503, "5.5.1");
    assert_reply(&c.cmd("DATA"), 554, "5.5.1");
    assert_reply(&c.cmd("RSET"), 250, "2.0.0");
    assert_reply(&c.cmd("RCPT TO:<ok@example.org>"), 503, "5.5.1");
}

#[test]
fn size_limits() {
    let node = TestNode::start_with(ALIASES, |c| c.smtp.max_message_size = 1000);
    let mut c = session(&node);
    c.cmd("EHLO client");
    assert_reply(&c.cmd("MAIL FROM:<a@example.org> SIZE=1001"), 552, "5.3.4");
    assert_reply(&c.cmd("MAIL FROM:<a@example.org> SIZE=1000"), 250, "2.1.0");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    let big = "y".repeat(100);
    for _ in 0..20 {
        c.send(format!("{big}\r\n").as_bytes());
    }
    c.send(b".\r\n");
    assert_reply(&c.reply(), 552, "5.3.4");
    // The session goes on, and nothing was queued.
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
    assert_eq!(node.queue_files(), 0);
    assert_eq!(node.incoming_files(), 0);
}

#[test]
fn pipelined_commands_get_their_replies_in_order() {
    let node = TestNode::start(ALIASES);
    let mut c = session(&node);
    c.cmd("EHLO client");
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<ok@example.org>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n",
    );
    assert_reply(&c.reply(), 250, "2.1.0");
    assert_reply(&c.reply(), 250, "2.1.5");
    assert_reply(&c.reply(), 550, "5.1.1");
    assert_eq!(c.reply().code, 354);
    // The message, the next transaction and QUIT in one write.
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<ok@example.org>\r\nQUIT\r\n");
    queued_id(&c.reply());
    assert_reply(&c.reply(), 250, "2.1.0");
    assert_reply(&c.reply(), 250, "2.1.5");
    assert_reply(&c.reply(), 221, "2.0.0");
}

#[test]
fn bare_lf_is_refused_closes_and_queues_nothing() {
    let node = TestNode::start(ALIASES);
    for smuggle in [
        &b"\n.\n"[..],
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n.\n",
    ] {
        let mut c = session(&node);
        c.cmd("EHLO client");
        c.cmd("MAIL FROM:<a@example.org>");
        c.cmd("RCPT TO:<ok@example.org>");
        assert_eq!(c.cmd("DATA").code, 354);
        let mut data = b"Subject: first".to_vec();
        data.extend_from_slice(smuggle);
        data.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<ok@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n");
        c.send(&data);
        assert_reply(&c.reply(), 521, "5.5.2");
        assert!(c.is_closed(), "{smuggle:?}: connection left open");
    }
    // Nothing queued, nothing half-written.
    assert!(
        wait_for(Duration::from_secs(5), || (node.incoming_files() == 0)
            .then_some(()))
        .is_some()
    );
    assert_eq!(node.queue_files(), 0);
}

#[test]
fn normalize_mode_accepts_bare_lf_but_only_crlf_dot_crlf_ends_data() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.smtp.bare_lf = mailnode::config::BareLf::Normalize
    });
    let mut c = session(&node);
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: one\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n");
    // One message: the smuggled MAIL is content, not a command.
    queued_id(&c.reply());
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
}

#[test]
fn spool_not_writable_is_a_temporary_error_and_the_session_goes_on() {
    let node = TestNode::start(ALIASES);
    // Root ignores permission bits, so break the directory itself.
    let incoming = node.spool.join("incoming");
    std::fs::remove_dir(&incoming).unwrap();
    std::fs::write(&incoming, b"not a directory").unwrap();
    let mut c = session(&node);
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_reply(&c.cmd("DATA"), 451, "4.3.0");
    std::fs::remove_file(&incoming).unwrap();
    std::fs::create_dir(&incoming).unwrap();
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"x\r\n.\r\n");
    queued_id(&c.reply());
}

#[test]
fn empty_message_and_null_sender_are_accepted() {
    let node = TestNode::start(ALIASES);
    let mut c = session(&node);
    c.cmd("HELO client");
    assert_reply(&c.cmd("MAIL FROM:<>"), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<Postmaster>"), 550, "5.1.1");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b".\r\n");
    queued_id(&c.reply());
}

//! Limits, access and lifecycle of a running node: every limit and timeout
//! with its exact reply, rates that trigger and recover, deny / finicky /
//! channels, the embedding hooks, stop(), pause/resume.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mailnode::config::{Channel, Rate};

const ALIASES: &str =
    "ok: |cat > /dev/null\nrecord: |env > OUTBOX/$QUEUE_ID.env; cat > /dev/null\n";

fn rate(count: u32, per: Duration) -> Rate {
    Rate {
        count: std::num::NonZeroU32::new(count).unwrap(),
        per,
    }
}

fn assert_reply(r: &Reply, code: u16, enhanced: &str) {
    assert!(
        r.is(code, enhanced),
        "expected {code} {enhanced}, got {r:?}"
    );
}

#[test]
fn connect_limit_ends_a_session_even_while_the_client_talks() {
    let node = TestNode::start_with(ALIASES, |c| c.smtp.connect_limit = Duration::from_secs(1));
    let mut c = node.client();
    assert_eq!(c.reply().code, 220);
    let started = Instant::now();
    let mut last = None;
    for _ in 0..100 {
        let r = c.cmd("NOOP");
        if r.code != 250 {
            last = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = last.expect("the session outlived connect_limit");
    assert_reply(&r, 421, "4.4.2");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(c.is_closed());
}

#[test]
fn idle_timeouts_in_commands_and_in_data() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.smtp.command_timeout = Duration::from_millis(300);
        c.smtp.data_timeout = Duration::from_millis(300);
    });
    let mut c = node.client();
    c.reply();
    assert_reply(&c.reply(), 421, "4.4.2");
    assert!(c.is_closed());

    let mut c = node.client();
    c.open_data("client", "a@example.org", "ok@example.org");
    c.send(b"Subject: half a message\r\n");
    assert_reply(&c.reply(), 421, "4.4.2");
    assert!(c.is_closed());
    assert!(
        wait_for(Duration::from_secs(5), || (node.incoming_files() == 0)
            .then_some(()))
        .is_some()
    );
    assert_eq!(node.queue_files(), 0, "half a message was queued");
}

#[test]
fn connection_limits_overall_and_per_address() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.smtp.max_connections = 2;
        c.smtp.max_connections_per_ip = 2;
    });
    let mut a = node.client();
    let mut b = node.client();
    assert_eq!(a.reply().code, 220);
    assert_eq!(b.reply().code, 220);
    let mut third = node.client();
    assert_reply(&third.reply(), 421, "4.3.2");
    assert!(third.is_closed());
    a.cmd("QUIT");
    drop(a);
    // The slot comes back once the first session has ended.
    let fourth = wait_for(Duration::from_secs(5), || {
        let mut c = node.client();
        (c.reply().code == 220).then_some(c)
    });
    assert!(fourth.is_some(), "a freed slot was not given back");

    let node = TestNode::start_with(ALIASES, |c| {
        c.smtp.max_connections_per_ip = 1;
        // The test's client is on loopback, exempt by default.
        c.limits.exempt = Vec::new();
    });
    let mut one = node.client();
    assert_eq!(one.reply().code, 220);
    let mut two = node.client();
    assert_reply(&two.reply(), 421, "4.7.0");
    assert!(two.is_closed());
}

#[test]
fn connection_rate_triggers_and_recovers() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.limits.connection_rate_per_ip = rate(3, Duration::from_secs(1));
        c.limits.exempt = Vec::new();
    });
    for _ in 0..3 {
        let mut c = node.client();
        assert_eq!(c.reply().code, 220);
        c.cmd("QUIT");
    }
    let mut over = node.client();
    assert_reply(&over.reply(), 421, "4.7.0");
    let recovered = wait_for(Duration::from_secs(5), || {
        let mut c = node.client();
        (c.reply().code == 220).then_some(())
    });
    assert!(recovered.is_some(), "the connection rate never recovered");
}

#[test]
fn message_rate_triggers_at_mail_and_recovers() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.limits.message_rate_per_ip = rate(2, Duration::from_secs(1));
        c.limits.exempt = Vec::new();
    });
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client");
    for _ in 0..2 {
        assert_reply(&c.cmd("MAIL FROM:<a@example.org>"), 250, "2.1.0");
        c.cmd("RSET");
    }
    assert_reply(&c.cmd("MAIL FROM:<a@example.org>"), 450, "4.7.1");
    let recovered = wait_for(Duration::from_secs(5), || {
        (c.cmd("MAIL FROM:<a@example.org>").code == 250).then_some(())
    });
    assert!(recovered.is_some(), "the message rate never recovered");
}

fn refused_dialogue(c: &mut Client) {
    assert_reply(&c.reply(), 554, "5.7.1");
    for line in [
        "EHLO client",
        "MAIL FROM:<a@example.org>",
        "RCPT TO:<ok@example.org>",
        "DATA",
        "NOOP",
    ] {
        assert_reply(&c.cmd(line), 503, "5.7.1");
    }
    assert_reply(&c.cmd("QUIT"), 221, "2.0.0");
    assert!(c.is_closed());
}

#[test]
fn deny_and_finicky_refuse_with_the_quit_only_dialogue() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.access.deny = vec!["127.0.0.0/8".parse().unwrap()]
    });
    refused_dialogue(&mut node.client());

    let node = TestNode::start_with(ALIASES, |c| {
        c.access.finicky = true;
        c.access.channel = vec![Channel {
            name: "partners".into(),
            hosts: vec!["192.0.2.0/24".parse().unwrap()],
        }];
    });
    refused_dialogue(&mut node.client());
}

#[test]
fn the_channel_names_the_client_for_programs_and_in_received() {
    let node = TestNode::start_with(ALIASES, |c| {
        c.access.channel = vec![
            Channel {
                name: "loopback".into(),
                hosts: vec!["127.0.0.1/32".parse().unwrap()],
            },
            Channel {
                name: "internet".into(),
                hosts: vec![],
            },
        ];
    });
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<record@example.org>");
    c.cmd("DATA");
    c.send(b"Subject: channel\r\n\r\nx\r\n.\r\n");
    let id = queued_id(&c.reply());
    let env = parse_env(&wait_for_file(&node.outbox.join(format!("{id}.env"))));
    assert_eq!(env["CHANNEL"], "loopback");
}

#[test]
fn validate_hooks_refuse_host_sender_and_recipient() {
    let hooks = mailnode::hooks::Hooks::default().validate_host(|ip| !ip.is_loopback());
    let node = TestNode::start_hooked(ALIASES, |_| {}, hooks);
    refused_dialogue(&mut node.client());

    let hooks = mailnode::hooks::Hooks::default()
        .validate_sender(|s| !s.starts_with("denied@"))
        .validate_recipient(|r| !r.starts_with("record@"));
    let node = TestNode::start_hooked(ALIASES, |_| {}, hooks);
    let mut c = node.client();
    assert_eq!(c.reply().code, 220);
    c.cmd("EHLO client");
    assert_reply(&c.cmd("MAIL FROM:<denied@example.org>"), 550, "5.7.1");
    assert_reply(&c.cmd("MAIL FROM:<fine@example.org>"), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<record@example.org>"), 550, "5.7.1");
    assert_reply(&c.cmd("RCPT TO:<ok@example.org>"), 250, "2.1.5");
}

#[test]
fn stop_releases_the_listener_while_sessions_finish() {
    let node = TestNode::start(ALIASES);
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client");
    node.node.as_ref().unwrap().stop();
    let refused = wait_for(Duration::from_secs(5), || {
        std::net::TcpStream::connect(node.addr)
            .is_err()
            .then_some(())
    });
    assert!(refused.is_some(), "the listener stayed open after stop()");
    // The open session goes on to the end of a message.
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<ok@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: after stop\r\n\r\nx\r\n.\r\n");
    queued_id(&c.reply());
}

#[test]
fn paused_intake_answers_421_and_resumes() {
    let node = TestNode::start(ALIASES);
    let handle = node.node.as_ref().unwrap();
    handle.pause_intake();
    let mut c = node.client();
    assert_reply(&c.reply(), 421, "4.3.2");
    assert!(c.is_closed());
    handle.resume_intake();
    assert_eq!(node.client().reply().code, 220);

    // A session already open hears it at its next MAIL.
    let mut open = node.client();
    open.reply();
    open.cmd("EHLO client");
    handle.pause_intake();
    assert_reply(&open.cmd("MAIL FROM:<a@example.org>"), 421, "4.3.2");
    assert!(open.is_closed());
    handle.resume_intake();
}

#[test]
fn shutdown_tells_a_client_stalled_in_data_421_before_time_is_up() {
    let mut node = TestNode::start_with(ALIASES, |c| {
        c.smtp.data_timeout = Duration::from_secs(3);
        c.delivery.timeout = Duration::from_secs(3);
    });
    let mut c = node.client();
    c.open_data("client", "a@example.org", "ok@example.org");
    c.send(b"Subject: never finished\r\n");
    let handle = node.node.take().unwrap();
    let stopping = std::thread::spawn(move || handle.shutdown());
    // Not a reset, not the data timeout: the shutdown's own 421 4.3.2.
    assert_reply(&c.reply(), 421, "4.3.2");
    assert!(c.is_closed());
    stopping.join().unwrap();
    assert_eq!(node.queue_files(), 0);
    assert_eq!(node.incoming_files(), 0);
}

/// 200 messages, each on a connection of its own, as fast as they go: what
/// the first refusal was, if any.
fn send_200(node: &TestNode) -> Option<(usize, u16)> {
    for n in 0..200 {
        let mut c = node.client();
        let greeting = c.reply();
        if greeting.code != 220 {
            return Some((n, greeting.code));
        }
        c.cmd("HELO app.example");
        let mail = c.cmd("MAIL FROM:<app@example.org>");
        if mail.code != 250 {
            return Some((n, mail.code));
        }
        assert_eq!(c.cmd("RCPT TO:<sink@example.org>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(b"Subject: from the app\r\n\r\nx\r\n.\r\n");
        assert_eq!(c.reply().code, 250);
        c.cmd("QUIT");
    }
    None
}

#[test]
fn a_local_application_is_exempt_from_the_per_address_limits_and_rates() {
    // The default limits: 120 connections and 600 messages a minute per
    // address, 50 at once; loopback exempt.
    let node = TestNode::start("sink: |cat > /dev/null\n");
    assert_eq!(send_200(&node), None, "a local application met a limit");
    // Not exempt, the same load meets the connection rate.
    let node = TestNode::start_with("sink: |cat > /dev/null\n", |c| c.limits.exempt = Vec::new());
    let refused = send_200(&node);
    assert!(matches!(refused, Some((n, 421)) if n >= 100), "{refused:?}");
}

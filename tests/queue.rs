//! The queue's life after intake: retries on the configured backoff,
//! returning mail to its sender as RFC 3464 reports through `[relay]`,
//! expiry, loops, holding what cannot be returned, and forwarding address
//! aliases. The relay is a small SMTP sink the tests run.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use mailnode::config::{Config, RelayHost};

fn relay_to(sink: &Sink) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        c.relay.host = Some(RelayHost {
            host: "127.0.0.1".into(),
            port: sink.addr.port(),
        });
    }
}

fn send(node: &TestNode, from: &str, rcpt: &str, body: &str) -> String {
    node.client()
        .send_message("client.example", from, rcpt, body)
}

/// What Python's email package makes of a DSN: the top content type, the
/// report type, the part types, and the fields of each status block.
struct ParsedReport {
    content_type: String,
    report_type: String,
    parts: Vec<String>,
    blocks: Vec<BTreeMap<String, String>>,
    text: String,
}

fn parse_report(dir: &std::path::Path, data: &[u8]) -> ParsedReport {
    let path = dir.join("dsn.eml");
    std::fs::write(&path, data).unwrap();
    let script = r#"
import email, sys, json
msg = email.message_from_binary_file(open(sys.argv[1], 'rb'))
out = {'type': msg.get_content_type(), 'report': msg.get_param('report-type') or '',
       'parts': [], 'blocks': [], 'text': ''}
for part in msg.walk():
    out['parts'].append(part.get_content_type())
    if part.get_content_type() == 'message/delivery-status':
        for block in part.get_payload():
            out['blocks'].append({k: str(v) for k, v in block.items()})
    elif part.get_content_type() == 'text/plain' and not out['text']:
        out['text'] = (part.get_payload(decode=True) or b'').decode()
print(json.dumps(out))
"#;
    let out = python(script, &[path.to_str().unwrap()]);
    let v = parse_json(&out);
    ParsedReport {
        content_type: v.0,
        report_type: v.1,
        parts: v.2,
        blocks: v.3,
        text: v.4,
    }
}

/// A tiny reader for the JSON above (no JSON crate needed for one shape):
/// Python prints it again as lines we can split reliably.
fn parse_json(
    json: &str,
) -> (
    String,
    String,
    Vec<String>,
    Vec<BTreeMap<String, String>>,
    String,
) {
    let script = r#"
import json, sys
v = json.loads(sys.argv[1])
print(v['type']); print(v['report']); print('\x1f'.join(v['parts']))
print('\x1e'.join('\x1f'.join(k + '\x1d' + val.replace('\n', ' ') for k, val in b.items()) for b in v['blocks']))
print(v['text'].replace('\n', ' '))
"#;
    let out = python(script, &[json.trim()]);
    let mut lines = out.lines();
    let mut next = || lines.next().unwrap_or("").to_string();
    let content_type = next();
    let report_type = next();
    let parts = next().split('\x1f').map(String::from).collect();
    let blocks = next()
        .split('\x1e')
        .map(|b| {
            b.split('\x1f')
                .filter_map(|kv| kv.split_once('\x1d'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect();
    let text = next();
    (content_type, report_type, parts, blocks, text)
}

/// The report's block about the (first) failed recipient.
fn recipient_block(report: &ParsedReport) -> BTreeMap<String, String> {
    report
        .blocks
        .iter()
        .find(|b| b.contains_key("Final-Recipient"))
        .cloned()
        .expect("a per-recipient block")
}

/// Waits until the node holds exactly one message.
fn wait_held(node: &TestNode) -> bool {
    let rt = actix_rt::Runtime::new().unwrap();
    let handle = node.node.as_ref().unwrap();
    wait_for(Duration::from_secs(20), || {
        let counts = rt.block_on(handle.queue_counts())?;
        (counts.held == 1).then_some(())
    })
    .is_some()
}

#[test]
fn retries_follow_the_backoff_and_deliver_once() {
    let node = TestNode::start_with(
        "flaky: |date +%s%N >> OUTBOX/times; n=$(wc -l < OUTBOX/times); [ \"$n\" -ge 3 ] || exit 75; cat >> OUTBOX/got\n",
        |c| {
            c.queue.retry_min = Duration::from_millis(300);
            c.queue.retry_max = Duration::from_secs(10);
        },
    );
    let id = send(
        &node,
        "a@example.org",
        "flaky@example.org",
        "Subject: backoff\r\n\r\nx\r\n",
    );
    // Between the second and the third attempt the envelope on disk holds
    // the history: two temporary failures, retry_min apart.
    let envelope = node.spool.join("queue").join(format!("{id}.env"));
    let history = wait_for(Duration::from_secs(30), || {
        let env = mailnode::spool::envelope::decode(&std::fs::read(&envelope).ok()?).ok()?;
        let h = env.deliveries[0].history.clone();
        (h.len() >= 2).then_some(h)
    })
    .expect("two attempts recorded in the envelope");
    assert_eq!(history[0].status, "4.3.0");
    assert!(history[0].diagnostic.contains("exited 75"), "{history:?}");
    let recorded_gap = history[1].at.duration_since(history[0].at).unwrap();
    assert!(
        recorded_gap >= Duration::from_millis(295),
        "recorded gap {recorded_gap:?}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "never delivered"
    );
    let times: Vec<u128> = std::fs::read_to_string(node.outbox.join("times"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(times.len(), 3, "attempts: {times:?}");
    let gap = |i: usize| (times[i + 1] - times[i]) / 1_000_000;
    // retry_min, then doubled; a little slack for the clock's granularity.
    assert!(gap(0) >= 295, "first retry after {} ms", gap(0));
    assert!(gap(1) >= 595, "second retry after {} ms", gap(1));
    let got = std::fs::read_to_string(node.outbox.join("got")).unwrap();
    assert_eq!(
        got.matches("Subject: backoff").count(),
        1,
        "delivered more than once"
    );
}

#[test]
fn a_permanent_failure_is_returned_to_the_sender_as_a_dsn() {
    let sink = Sink::start(|_| None);
    let node = TestNode::start_with(
        "refuse: |echo \"no such queue: $EXTENSION\"; exit 67\n",
        relay_to(&sink),
    );
    let id = send(
        &node,
        "alice@example.org",
        "refuse+billing@example.org",
        "Subject: please file this\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n",
    );
    let got = sink.wait_for(1);
    let dsn = &got[0];
    assert_eq!(dsn.from, "", "a bounce must come from <>");
    assert_eq!(dsn.rcpts, vec!["alice@example.org".to_string()]);
    let report = parse_report(node.dir.path(), &dsn.data);
    assert_eq!(report.content_type, "multipart/report");
    assert_eq!(report.report_type, "delivery-status");
    assert!(
        report
            .parts
            .contains(&"message/delivery-status".to_string()),
        "{:?}",
        report.parts
    );
    assert!(
        report.parts.contains(&"text/rfc822-headers".to_string()),
        "{:?}",
        report.parts
    );
    let recipient_block = recipient_block(&report);
    assert_eq!(
        recipient_block["Final-Recipient"],
        "rfc822; refuse+billing@example.org"
    );
    assert_eq!(recipient_block["Action"], "failed");
    assert_eq!(recipient_block["Status"], "5.3.0");
    assert!(
        recipient_block["Diagnostic-Code"].contains("no such queue: billing"),
        "{recipient_block:?}"
    );
    assert!(
        report.text.contains("no such queue: billing"),
        "{}",
        report.text
    );
    assert!(String::from_utf8_lossy(&dsn.data).contains(&id));
    assert!(String::from_utf8_lossy(&dsn.data).contains("Message-ID: <m1@example.org>"));
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "the returned message stayed queued"
    );
}

#[test]
fn expiry_after_max_age_returns_the_message() {
    let sink = Sink::start(|_| None);
    let node = TestNode::start_with("later: |echo busy; exit 75\n", |c| {
        relay_to(&sink)(c);
        c.queue.max_age = Duration::from_secs(1);
        c.queue.retry_min = Duration::from_millis(200);
        c.queue.retry_max = Duration::from_millis(200);
    });
    send(
        &node,
        "alice@example.org",
        "later@example.org",
        "Subject: x\r\n\r\nx\r\n",
    );
    let got = sink.wait_for(1);
    let report = parse_report(node.dir.path(), &got[0].data);
    let block = recipient_block(&report);
    assert_eq!(block["Status"], "4.4.7");
    assert!(block["Diagnostic-Code"].contains("expired"), "{block:?}");
    assert!(block["Diagnostic-Code"].contains("busy"), "{block:?}");
}

#[test]
fn signals_timeouts_and_exit_1_are_retried_not_returned() {
    let sink = Sink::start(|_| None);
    let node = TestNode::start_with(
        "\
sig: |echo x >> OUTBOX/sig; kill -9 $$
slow: |echo x >> OUTBOX/slow; sleep 30
one: |echo x >> OUTBOX/one; exit 1
",
        |c| {
            relay_to(&sink)(c);
            c.delivery.timeout = Duration::from_millis(300);
        },
    );
    for rcpt in ["sig", "slow", "one"] {
        send(
            &node,
            "alice@example.org",
            &format!("{rcpt}@example.org"),
            "Subject: x\r\n\r\nx\r\n",
        );
    }
    for name in ["sig", "slow", "one"] {
        let attempts = wait_for(Duration::from_secs(30), || {
            let n = std::fs::read_to_string(node.outbox.join(name))
                .ok()?
                .lines()
                .count();
            (n >= 2).then_some(n)
        });
        assert!(attempts.is_some(), "{name} was not retried");
    }
    assert!(
        sink.messages().is_empty(),
        "a temporary failure was returned"
    );
    assert_eq!(node.queue_files(), 6, "all three must still be queued");
}

#[test]
fn mail_from_null_is_never_returned_but_held() {
    let sink = Sink::start(|_| None);
    let node = TestNode::start_with("refuse: |exit 67\n", relay_to(&sink));
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<>");
    c.cmd("RCPT TO:<refuse@example.org>");
    c.cmd("DATA");
    c.send(b"Subject: a bounce\r\n\r\nx\r\n.\r\n");
    queued_id(&c.reply());
    assert!(wait_held(&node), "not held");
    assert!(sink.messages().is_empty(), "a message from <> was bounced");
}

#[test]
fn a_bounce_the_relay_refuses_is_held() {
    let sink = Sink::start(|rcpt| {
        rcpt.starts_with("alice@")
            .then(|| "550 5.1.1 no such sender here".to_string())
    });
    let node = TestNode::start_with("refuse: |exit 67\n", relay_to(&sink));
    send(
        &node,
        "alice@example.org",
        "refuse@example.org",
        "Subject: x\r\n\r\nx\r\n",
    );
    assert!(wait_held(&node), "a refused bounce was not held");
    // The held state is known before its envelope update (a .tmp beside
    // the envelope) has been renamed into place.
    let stays_queued = wait_for(Duration::from_secs(10), || {
        (node.queue_files() == 2).then_some(())
    });
    assert!(
        stays_queued.is_some(),
        "the held message must stay queued: {} files in queue/",
        node.queue_files()
    );
}

#[test]
fn a_loop_is_returned_not_delivered() {
    let sink = Sink::start(|_| None);
    let node = TestNode::start_with(
        "record: |touch OUTBOX/ran; cat > /dev/null\n",
        relay_to(&sink),
    );
    send(
        &node,
        "alice@example.org",
        "record@example.org",
        "Delivered-To: Record@Example.org\r\nSubject: looping\r\n\r\nx\r\n",
    );
    let got = sink.wait_for(1);
    let report = parse_report(node.dir.path(), &got[0].data);
    let block = recipient_block(&report);
    assert_eq!(block["Status"], "5.4.6");
    assert!(
        !node.outbox.join("ran").exists(),
        "a looping message was delivered"
    );
}

#[test]
fn more_than_fifty_received_headers_are_refused_at_data() {
    let node = TestNode::start("ok: |cat > /dev/null\n");
    for (hops, expect) in [(50, 250), (51, 554)] {
        let mut c = node.client();
        c.open_data("client", "a@example.org", "ok@example.org");
        for i in 0..hops {
            c.send(format!("Received: from hop{i} by hop{}\r\n", i + 1).as_bytes());
        }
        c.send(b"Subject: hops\r\n\r\nx\r\n.\r\n");
        let r = c.reply();
        assert_eq!(r.code, expect, "{hops} hops: {r:?}");
        if expect == 554 {
            assert_eq!(r.enhanced, "5.4.6");
        }
    }
}

#[test]
fn an_address_alias_is_forwarded_with_the_original_sender() {
    let sink = Sink::start(|rcpt| {
        rcpt.starts_with("gone@")
            .then(|| "550 5.1.1 no such user here".to_string())
    });
    let node = TestNode::start_with(
        "ops: oncall@partner.example\nold: gone@partner.example\n",
        relay_to(&sink),
    );
    send(
        &node,
        "alice@example.org",
        "ops@example.org",
        "Subject: page\r\n\r\nwake up\r\n",
    );
    let got = sink.wait_for(1);
    assert_eq!(got[0].from, "alice@example.org");
    assert_eq!(got[0].rcpts, vec!["oncall@partner.example".to_string()]);
    let text = String::from_utf8_lossy(&got[0].data);
    // The message and nothing after it (the queue file goes on with the
    // envelope).
    assert!(text.ends_with("Subject: page\r\n\r\nwake up\r\n"), "{text}");
    assert!(text.starts_with("Received: from client.example"), "{text}");

    // The relay refusing the forward returns it, with the relay's words.
    send(
        &node,
        "alice@example.org",
        "old@example.org",
        "Subject: gone\r\n\r\nx\r\n",
    );
    let got = sink.wait_for(2);
    let dsn = &got[1];
    assert_eq!(dsn.from, "");
    let report = parse_report(node.dir.path(), &dsn.data);
    let block = recipient_block(&report);
    assert_eq!(block["Status"], "5.1.1");
    assert!(
        block["Diagnostic-Code"].contains("550 5.1.1 no such user here"),
        "{block:?}"
    );
}

#[test]
fn inline_mode_answers_with_the_programs_verdict_and_queues_nothing() {
    let node = TestNode::start_with(
        "ok: |cat > OUTBOX/inline.$QUEUE_ID\nlater: |echo busy; exit 75\nno: |exit 67\n",
        |c| c.delivery.mode = mailnode::config::DeliveryMode::Inline,
    );
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client");
    let mut transaction = |rcpt: &str| {
        c.cmd("MAIL FROM:<a@example.org>");
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).is(250, "2.1.5"));
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(b"Subject: inline\r\n\r\nnow\r\n.\r\n");
        c.reply()
    };
    let delivered = transaction("ok@example.org");
    assert!(delivered.is(250, "2.0.0"), "{delivered:?}");
    let id = delivered
        .text
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(delivered.text.contains("delivered as"), "{delivered:?}");
    // Already there when the client hears 250.
    let got = std::fs::read_to_string(node.outbox.join(format!("inline.{id}"))).unwrap();
    assert!(got.ends_with("Subject: inline\n\nnow\n"));

    let later = transaction("later@example.org");
    assert!(later.is(451, "4.3.0"), "{later:?}");
    let refused = transaction("no@example.org");
    assert!(refused.is(554, "5.3.0"), "{refused:?}");
    assert_eq!(node.queue_files(), 0, "inline mode left a queue file");
    assert_eq!(node.incoming_files(), 0, "inline mode left a body behind");
}

#[test]
fn a_fifo_and_a_socket_in_the_queue_do_not_keep_the_node_from_serving() {
    let (dir, _outbox) = shared_tempdir();
    let config = test_config(dir.path());
    std::fs::write(&config.aliases.path, "ok: |cat > /dev/null\n").unwrap();
    let queue = config.spool.path.join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    let fifo = std::ffi::CString::new(
        queue
            .join("0000000000001AA.msg")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a plain system call on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let _socket =
        std::os::unix::net::UnixListener::bind(queue.join("0000000000002AA.msg")).unwrap();
    let (started, up) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = started.send(mailnode::Node::start(config));
    });
    let node = up
        .recv_timeout(Duration::from_secs(10))
        .expect("the node did not start within 10 s")
        .expect("the node refused to start");
    let mut client = Client::connect(node.local_addrs()[0]);
    assert_eq!(client.reply().code, 220, "no greeting");
    node.shutdown();
    let corrupt = dir.path().join("spool").join("corrupt");
    for name in ["0000000000001AA.msg", "0000000000002AA.msg"] {
        assert!(
            std::fs::symlink_metadata(corrupt.join(name)).is_ok(),
            "{name} not set aside"
        );
    }
}

#[test]
fn fixing_an_alias_fixes_its_queued_mail_and_a_vanished_alias_is_returned() {
    let sink = Sink::start(|_| None);
    let steady = "steady: |cat > /dev/null; echo \"$DELIVERY_ID\" >> OUTBOX/steady.log\n";
    let node = TestNode::start_with(
        &format!(
            "{steady}broken: |cat > /dev/null; echo \"$DELIVERY_ID\" >> OUTBOX/broken.log; exit 75
helpdesk: steady, broken
leaving: |cat > /dev/null; exit 75
"
        ),
        relay_to(&sink),
    );
    let mut client = node.client();
    client.reply();
    client.cmd("HELO client");
    client.cmd("MAIL FROM:<alice@example.org>");
    assert!(client
        .cmd("RCPT TO:<helpdesk@example.org>")
        .is(250, "2.1.5"));
    assert!(client.cmd("RCPT TO:<leaving@example.org>").is(250, "2.1.5"));
    client.cmd("DATA");
    client.send(b"Subject: help\r\n\r\nplease\r\n.\r\n");
    let id = queued_id(&client.reply());
    client.cmd("QUIT");
    // Deliveries: 0 steady, 1 broken (both for helpdesk), 2 leaving. The
    // broken one has failed at least once.
    wait_for_file(&node.outbox.join("broken.log"));
    assert_eq!(
        std::fs::read_to_string(node.outbox.join("steady.log")).unwrap(),
        format!("{id}.0\n")
    );

    // The operator fixes helpdesk and retires leaving.
    std::fs::write(
        node.dir.path().join("aliases"),
        format!(
            "{steady}fixed: |cat > /dev/null; echo \"$DELIVERY_ID $RECIPIENT\" >> OUTBOX/fixed.log\nhelpdesk: steady, fixed\n"
        )
        .replace("OUTBOX", &node.outbox.display().to_string()),
    )
    .unwrap();
    let rt = actix_rt::Runtime::new().unwrap();
    let handle = node.node.as_ref().unwrap();
    assert_eq!(rt.block_on(handle.reload_aliases()).unwrap(), 3);

    // The retry runs the fixed program, as a delivery of its own; the
    // recipient whose alias is gone is returned with 5.1.1.
    let fixed = wait_for_file(&node.outbox.join("fixed.log"));
    assert_eq!(
        String::from_utf8_lossy(&fixed),
        format!("{id}.3 fixed@example.org\n")
    );
    let got = sink.wait_for(1);
    let report = parse_report(node.dir.path(), &got[0].data);
    let block = recipient_block(&report);
    assert_eq!(block["Status"], "5.1.1", "{block:?}");
    assert!(
        block["Final-Recipient"].contains("leaving@example.org"),
        "{block:?}"
    );
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "the message stayed queued"
    );
    // What succeeded never ran again; the broken program only ever ran
    // as delivery 1.
    assert_eq!(
        std::fs::read_to_string(node.outbox.join("steady.log")).unwrap(),
        format!("{id}.0\n"),
        "steady ran again"
    );
    let broken_runs = std::fs::read_to_string(node.outbox.join("broken.log")).unwrap();
    assert!(
        broken_runs.lines().all(|l| l == format!("{id}.1")),
        "{broken_runs}"
    );
    assert_eq!(sink.messages().len(), 1, "one return, for leaving only");
}

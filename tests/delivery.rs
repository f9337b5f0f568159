//! End to end through real SMTP clients into real programs: what a program
//! receives (stdin and environment), that client text never reaches a
//! command line, and that retries deliver each recipient exactly once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// A program that records its stdin, environment and identity.
const RECORD: &str = "record: |cat > OUTBOX/$DELIVERY_ID.msg; id -u > OUTBOX/$DELIVERY_ID.uid; id -G >> OUTBOX/$DELIVERY_ID.uid; env > OUTBOX/$DELIVERY_ID.env\n";

const ALLOWED_ENV: &[&str] = &[
    "PATH",
    "SENDER",
    "RECIPIENT",
    "ORIGINAL_RECIPIENT",
    "LOCAL",
    "DOMAIN",
    "EXTENSION",
    "CLIENT_ADDRESS",
    "CLIENT_HELO",
    "QUEUE_ID",
    "CHANNEL",
    "ATTEMPT",
    "DELIVERY_ID",
    "TLS_VERSION",
    "TLS_CIPHER",
    "AUTH_SPF",
    "AUTH_DKIM",
    "AUTH_DMARC",
    "AUTH_FROM_DOMAIN",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "TZ",
    // Set by /bin/sh itself.
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
];

/// Splits what a program read into (Received header, rest of the message),
/// after checking the two prepended lines.
fn split_delivered(stdin: &[u8], sender: &str, recipient: &str) -> (String, Vec<u8>) {
    let prefix = format!("Return-Path: <{sender}>\nDelivered-To: {recipient}\nReceived: ");
    assert!(
        stdin.starts_with(prefix.as_bytes()),
        "unexpected start: {:?}",
        String::from_utf8_lossy(&stdin[..stdin.len().min(200)])
    );
    let after_prefix = &stdin["Return-Path: <".len()
        + sender.len()
        + 2
        + "Delivered-To: ".len()
        + recipient.len()
        + 1..];
    // The Received header ends at the first line that does not start with a tab.
    let mut end = after_prefix
        .iter()
        .position(|&b| b == b'\n')
        .expect("header line")
        + 1;
    while after_prefix.get(end) == Some(&b'\t') {
        end += after_prefix[end..]
            .iter()
            .position(|&b| b == b'\n')
            .expect("continuation")
            + 1;
    }
    (
        String::from_utf8_lossy(&after_prefix[..end]).into_owned(),
        after_prefix[end..].to_vec(),
    )
}

fn assert_clean_env(env: &std::collections::BTreeMap<String, String>) {
    for key in env.keys() {
        assert!(
            ALLOWED_ENV.contains(&key.as_str()),
            "variable {key} leaked into the program's environment"
        );
    }
}

fn assert_never_root(uid_file: &[u8]) {
    let text = String::from_utf8_lossy(uid_file);
    let mut lines = text.lines();
    let uid: u32 = lines
        .next()
        .expect("uid")
        .trim()
        .parse()
        .expect("uid number");
    let groups: Vec<u32> = lines
        .next()
        .expect("groups")
        .split_whitespace()
        .map(|g| g.parse().expect("gid"))
        .collect();
    assert_ne!(uid, 0, "program ran as root");
    assert!(!groups.contains(&0), "program kept group 0: {groups:?}");
    if nix::unistd::geteuid().is_root() {
        // Dropped to `nobody` with its own gid only: no supplementary groups.
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert_eq!(uid, nobody.uid.as_raw());
        assert_eq!(groups, vec![nobody.gid.as_raw()]);
    }
}

#[test]
fn smtplib_message_reaches_the_program_byte_exact_with_its_environment() {
    let node = TestNode::start(RECORD);
    let script = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.example')
s.ehlo()
s.mail('alice@example.org', ['BODY=8BITMIME'])
s.rcpt('record+Ext@Example.ORG')
body = (b"Subject: test\r\nX-Eight: caf\xc3\xa9\r\n\r\nline one\r\n.leading dot\r\n"
        b"..two dots\r\n.\r\n\xff raw byte\r\nlast line without dot\r\n")
code, resp = s.data(body)
print(code, resp.decode())
s.quit()
"#;
    let out = python(script, &[&node.addr.port().to_string()]);
    let (code, text) = out.trim().split_once(' ').expect("code and text");
    assert_eq!(code, "250", "{out}");
    let id = text.rsplit(' ').next().expect("id").to_string();
    assert!(text.starts_with("2.0.0 Ok: queued as "), "{text}");

    let delivery = format!("{id}.0");
    let env = parse_env(&wait_for_file(&node.outbox.join(format!("{delivery}.env"))));
    let stdin = std::fs::read(node.outbox.join(format!("{delivery}.msg"))).unwrap();
    let (received, rest) = split_delivered(&stdin, "alice@example.org", "record+Ext@example.org");
    assert!(received.starts_with(
        "Received: from client.example ([127.0.0.1])\n\tby mx.test (mailnode, channel local) with ESMTP id "
    ));
    assert!(received.contains(&format!(" id {id}\n")), "{received}");
    assert!(
        received.contains("for <record+Ext@Example.ORG>"),
        "{received}"
    );
    assert_eq!(
        rest,
        b"Subject: test\nX-Eight: caf\xc3\xa9\n\nline one\n.leading dot\n..two dots\n.\n\xff raw byte\nlast line without dot\n"
            .to_vec(),
        "body not byte-exact: {:?}",
        String::from_utf8_lossy(&rest)
    );

    let expect = [
        ("SENDER", "alice@example.org"),
        ("RECIPIENT", "record+Ext@example.org"),
        ("ORIGINAL_RECIPIENT", "record+Ext@Example.ORG"),
        ("LOCAL", "record"),
        ("DOMAIN", "example.org"),
        ("EXTENSION", "Ext"),
        ("CLIENT_ADDRESS", "127.0.0.1"),
        ("CLIENT_HELO", "client.example"),
        ("QUEUE_ID", id.as_str()),
        ("CHANNEL", "local"),
        ("ATTEMPT", "1"),
        ("DELIVERY_ID", delivery.as_str()),
        // In clear: present and empty.
        ("TLS_VERSION", ""),
        ("TLS_CIPHER", ""),
        // Without [auth]: present and empty.
        ("AUTH_SPF", ""),
        ("AUTH_DKIM", ""),
        ("AUTH_DMARC", ""),
        ("AUTH_FROM_DOMAIN", ""),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ];
    for (key, value) in expect {
        assert_eq!(env.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_clean_env(&env);
    assert_never_root(&std::fs::read(node.outbox.join(format!("{delivery}.uid"))).unwrap());
}

#[test]
fn curl_message_reaches_the_program_and_the_queue_empties() {
    let node = TestNode::start(RECORD);
    let mail = node.dir.path().join("mail.eml");
    std::fs::write(
        &mail,
        b"From: bob@example.org\r\nSubject: via curl\r\n\r\nHello.\r\n.\r\nStill body.\r\n",
    )
    .unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--url"])
        .arg(format!(
            "smtp://127.0.0.1:{}/curl.example",
            node.addr.port()
        ))
        .args([
            "--mail-from",
            "bob@example.org",
            "--mail-rcpt",
            "record@example.org",
            "-T",
        ])
        .arg(&mail)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = wait_for(Duration::from_secs(20), || {
        let entry = std::fs::read_dir(&node.outbox)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".env"))?;
        let env = parse_env(&std::fs::read(entry.path()).ok()?);
        let delivery = env.get("DELIVERY_ID")?.clone();
        Some((
            env,
            std::fs::read(node.outbox.join(format!("{delivery}.msg"))).ok()?,
        ))
    })
    .expect("curl's message delivered");
    let (env, stdin) = msg;
    assert_eq!(env["CLIENT_HELO"], "curl.example");
    assert_eq!(env["EXTENSION"], "");
    let (_, rest) = split_delivered(&stdin, "bob@example.org", "record@example.org");
    assert_eq!(
        rest,
        b"From: bob@example.org\nSubject: via curl\n\nHello.\n.\nStill body.\n".to_vec()
    );
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "delivered message left in the queue"
    );
}

#[test]
fn shell_metacharacters_reach_programs_only_through_the_environment() {
    let node = TestNode::start(RECORD);
    let m = |name: &str| {
        node.outbox
            .join(format!("marker-{name}"))
            .display()
            .to_string()
    };
    // Each field carries one construct that would run a command if it were
    // ever interpreted by a shell.
    let cases = [
        (
            format!("$(touch {})", m("helo")),
            format!("\"$(touch {})\"@example.org", m("s1")),
            format!("\"record+$(touch {})\"@example.org", m("r1")),
        ),
        (
            format!("`touch {}`", m("helo2")),
            format!("\"`touch {}`\"@example.org", m("s2")),
            format!("\"record+`touch {}`\"@example.org", m("r2")),
        ),
        (
            format!("x;touch {}", m("helo3")),
            format!("\";touch {};\"@example.org", m("s3")),
            format!("\"record+;touch {}\"@example.org", m("r3")),
        ),
        (
            format!("'\"|touch {}", m("helo4")),
            format!("\"'\\\"|touch {}\"@example.org", m("s4")),
            format!("\"record+'\\\"|touch {}\"@example.org", m("r4")),
        ),
    ];
    let mut client = node.client();
    assert_eq!(client.reply().code, 220);
    let mut ids = Vec::new();
    for (helo, sender, rcpt) in &cases {
        assert_eq!(client.cmd(&format!("EHLO {helo}")).code, 250, "EHLO {helo}");
        let r = client.cmd(&format!("MAIL FROM:<{sender}>"));
        assert!(r.is(250, "2.1.0"), "MAIL {sender}: {r:?}");
        let r = client.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.is(250, "2.1.5"), "RCPT {rcpt}: {r:?}");
        assert_eq!(client.cmd("DATA").code, 354);
        client.send(b"Subject: hostile\r\n\r\nbody\r\n.\r\n");
        ids.push((
            queued_id(&client.reply()),
            helo.clone(),
            sender.clone(),
            rcpt.clone(),
        ));
    }
    assert_eq!(client.cmd("QUIT").code, 221);
    for (id, helo, sender, rcpt) in &ids {
        let env = parse_env(&wait_for_file(&node.outbox.join(format!("{id}.0.env"))));
        assert_eq!(&env["CLIENT_HELO"], helo);
        // The plain forms: quoting undone, the text itself intact.
        let plain_sender = sender
            .trim_end_matches("@example.org")
            .trim_matches('"')
            .replace("\\\"", "\"")
            + "@example.org";
        assert_eq!(env["SENDER"], plain_sender);
        let ext = rcpt
            .trim_end_matches("@example.org")
            .trim_matches('"')
            .trim_start_matches("record+")
            .replace("\\\"", "\"");
        assert_eq!(env["EXTENSION"], ext);
    }
    let markers: Vec<String> = std::fs::read_dir(&node.outbox)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("marker-"))
        .collect();
    assert!(
        markers.is_empty(),
        "client text ran as a command: {markers:?}"
    );
}

#[test]
fn a_temporary_failure_is_retried_and_a_succeeded_recipient_never_runs_again() {
    let aliases = "\
flaky: |n=$(cat OUTBOX/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > OUTBOX/count; if [ $n -lt 2 ]; then echo not yet; exit 75; fi; cat > /dev/null; echo \"$DELIVERY_ID $ATTEMPT\" >> OUTBOX/flaky.log
steady: |cat > /dev/null; echo \"$DELIVERY_ID $ATTEMPT\" >> OUTBOX/steady.log
both: steady, flaky
";
    let node = TestNode::start(aliases);
    let mut client = node.client();
    client.reply();
    client.cmd("EHLO client");
    assert!(client.cmd("MAIL FROM:<a@example.org>").is(250, "2.1.0"));
    assert!(client.cmd("RCPT TO:<both@example.org>").is(250, "2.1.5"));
    client.cmd("DATA");
    client.send(b"Subject: retry\r\n\r\nx\r\n.\r\n");
    let id = queued_id(&client.reply());
    client.cmd("QUIT");

    // Done once the message has left the queue: every delivery succeeded.
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "message never fully delivered"
    );
    let steady = std::fs::read_to_string(node.outbox.join("steady.log")).unwrap();
    let flaky = std::fs::read_to_string(node.outbox.join("flaky.log")).unwrap();
    let count = std::fs::read_to_string(node.outbox.join("count")).unwrap();
    assert_eq!(steady, format!("{id}.0 1\n"), "steady ran again");
    assert_eq!(
        flaky,
        format!("{id}.1 2\n"),
        "flaky delivered other than once, on attempt 2"
    );
    assert_eq!(count.trim(), "2");
}

#[test]
fn a_permanent_failure_is_kept_held_without_a_relay_and_others_still_deliver() {
    let aliases = "\
refuse: |echo no such ticket queue; exit 67
ok: |cat > /dev/null; echo \"$DELIVERY_ID\" >> OUTBOX/ok.log
";
    let node = TestNode::start(aliases);
    let mut client = node.client();
    client.reply();
    client.cmd("HELO client");
    client.cmd("MAIL FROM:<a@example.org>");
    assert!(client.cmd("RCPT TO:<refuse@example.org>").is(250, "2.1.5"));
    assert!(client.cmd("RCPT TO:<ok@example.org>").is(250, "2.1.5"));
    client.cmd("DATA");
    client.send(b"Subject: mixed\r\n\r\nx\r\n.\r\n");
    let id = queued_id(&client.reply());
    let ok = wait_for_file(&node.outbox.join("ok.log"));
    assert_eq!(String::from_utf8_lossy(&ok), format!("{id}.1\n"));
    let rt = actix_rt::Runtime::new().unwrap();
    let handle = node.node.as_ref().unwrap();
    let counts = wait_for(Duration::from_secs(20), || {
        let c = rt.block_on(handle.queue_counts())?;
        (c.held == 1).then_some(c)
    })
    .expect("message held");
    assert_eq!((counts.active, counts.deferred), (0, 0));
    // The envelope records each delivery's own fate and the program's words.
    let names: BTreeSet<String> = std::fs::read_dir(node.spool.join("queue"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([format!("{id}.env"), format!("{id}.msg")])
    );
}

#[test]
fn a_recipient_given_twice_runs_its_program_once() {
    let node =
        TestNode::start("once: |cat > /dev/null; echo \"$DELIVERY_ID\" >> OUTBOX/once.log\n");
    let mut client = node.client();
    client.reply();
    client.cmd("HELO client");
    client.cmd("MAIL FROM:<a@example.org>");
    for rcpt in ["once@example.org", "once@example.org", "ONCE@Example.org"] {
        assert!(client.cmd(&format!("RCPT TO:<{rcpt}>")).is(250, "2.1.5"));
    }
    client.cmd("DATA");
    client.send(b"Subject: dup\r\n\r\nx\r\n.\r\n");
    let id = queued_id(&client.reply());
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "not delivered"
    );
    let log = std::fs::read_to_string(node.outbox.join("once.log")).unwrap();
    assert_eq!(log, format!("{id}.0\n"));
}

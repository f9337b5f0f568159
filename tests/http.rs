//! HTTP targets and in-process handlers against real servers: Python's
//! http.server (and ssl, with a certificate authority made by openssl)
//! started by each test on 127.0.0.1 and a free port.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mailnode::config::{Config, FileSetting, RelayHost};
use mailnode::hooks::Hooks;
use mailnode::{DeliveryStatus, HandedMessage};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

fn relay_to(sink: &Sink) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        c.relay.host = Some(RelayHost {
            host: "127.0.0.1".into(),
            port: sink.addr.port(),
        });
    }
}

fn send(node: &TestNode, rcpt: &str, body: &str) -> String {
    node.client()
        .send_message("client.example", "alice@example.org", rcpt, body)
}

fn queue_show(node: &TestNode, id: &str) -> Value {
    control_request(
        &node.dir.path().join("ctl.sock"),
        &json!({"cmd": "queue.show", "id": id}).to_string(),
    )
}

/// The message's first recipient's `last_error` once it has one that
/// passes `check`.
fn last_error_of(node: &TestNode, id: &str, check: impl Fn(&str) -> bool) -> String {
    wait_for(Duration::from_secs(20), || {
        let shown = queue_show(node, id);
        let error = shown["data"]["recipients"][0]["last_error"]
            .as_str()?
            .to_string();
        check(&error).then_some(error)
    })
    .unwrap_or_else(|| panic!("{id}: no such error: {}", queue_show(node, id)))
}

fn queue_empties(node: &TestNode) {
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some(),
        "the queue never emptied"
    );
}

fn crlf(lf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lf.len() + lf.len() / 40);
    for &b in lf {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// docs/http.md's Python recipe for checking `Mailnode-Signature`, as a
/// reader would copy it, run on a recorded request: prints True or False.
fn documented_check(key: &Path, request: &Request, body: &[u8]) -> String {
    let doc = include_str!("../docs/http.md");
    let start = doc.find("```python\n").expect("a Python recipe") + "```python\n".len();
    let end = start + doc[start..].find("```").expect("its end");
    let recipe = doc[start..end].replace(
        "\"/etc/helpdesk/mailnode.key\"",
        &format!("{:?}", key.display().to_string()),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), body).unwrap();
    std::fs::write(
        dir.path().join("headers.json"),
        serde_json::to_vec(&request.headers).unwrap(),
    )
    .unwrap();
    let script = format!(
        "{recipe}\nimport json, sys\nclass Headers(dict):\n    def get(self, name, default=None):\n        return dict.get(self, name.lower(), default)\nheaders = Headers(json.load(open(sys.argv[1])))\nprint(signed_by_mailnode(headers, open(sys.argv[2], 'rb').read()))\n"
    );
    python(
        &script,
        &[
            dir.path().join("headers.json").to_str().unwrap(),
            dir.path().join("body").to_str().unwrap(),
        ],
    )
    .trim()
    .to_string()
}

#[test]
fn a_post_carries_what_a_program_reads_with_every_header_and_a_signature_python_verifies() {
    let (dir, _) = shared_tempdir();
    let pki = Pki::new(dir.path());
    let cert = pki.server("localhost", 30);
    let plain = HttpTarget::start(answer_200());
    let secure = HttpTarget::start_tls(answer_200(), Some(&cert));
    let secret = dir.path().join("hook.key");
    std::fs::write(&secret, "0f1e2d3c4b5a69788796a5b4c3d2e1f0\n").unwrap();
    let aliases = format!(
        "both: \"|cat > OUTBOX/program.msg\", {}, {}\n",
        plain.url("http", "/mail/in?queue=support"),
        secure.url("https", "/secure")
    );
    let node = TestNode::start_with(&aliases, |c| {
        c.http.secret_file = Some(FileSetting {
            path: secret.clone(),
            at: "test".into(),
        });
        c.http.ca_file = Some(FileSetting {
            path: pki.ca.clone(),
            at: "test".into(),
        });
    });
    let body = "Subject: over HTTP\r\nFrom: alice@example.org\r\n\r\nline one\r\n..dot\r\nlast\r\n";
    let id = send(&node, "Both+Ext@Example.ORG", body);
    let stdin = wait_for_file(&node.outbox.join("program.msg"));
    for (target, path) in [(&plain, "/mail/in?queue=support"), (&secure, "/secure")] {
        let requests = target.wait_for(1, Duration::from_secs(20));
        assert_eq!(requests.len(), 1);
        let r = &requests[0];
        assert_eq!(r.path, path);
        assert_eq!(r.body.as_deref(), Some(&crlf(&stdin)[..]), "{path}");
        assert_eq!(r.header("content-type"), "message/rfc822");
        assert_eq!(r.header("mailnode-sender"), "alice@example.org");
        assert_eq!(r.header("mailnode-recipient"), "both+Ext@example.org");
        assert_eq!(
            r.header("mailnode-original-recipient"),
            "Both+Ext@Example.ORG"
        );
        assert_eq!(r.header("mailnode-queue-id"), id);
        assert!(r
            .header("mailnode-delivery-id")
            .starts_with(&format!("{id}.")));
        assert_eq!(r.header("mailnode-attempt"), "1");
        assert_eq!(r.header("mailnode-client-address"), "127.0.0.1");
        assert_eq!(r.header("mailnode-channel"), "local");
        let timestamp: u64 = r.header("mailnode-timestamp").parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(timestamp <= now && now - timestamp < 60, "{timestamp}");
        let body = r.body.clone().unwrap_or_default();
        assert_eq!(
            documented_check(&secret, r, &body),
            "True",
            "{path}: the signature does not verify"
        );
        let mut changed = body.clone();
        changed.extend_from_slice(b"one more line\r\n");
        assert_eq!(documented_check(&secret, r, &changed), "False", "{path}");
    }
    queue_empties(&node);
}

#[test]
fn a_500_then_a_503_with_retry_after_then_a_200_is_delivered_once_after_the_wait() {
    let target = HttpTarget::start(json!([
        {"status": 500, "body": "database is down"},
        {"status": 503, "headers": {"Retry-After": "2"}},
        {"status": 200}
    ]));
    let node = TestNode::start_with(&format!("hook: {}\n", target.url("http", "/")), |c| {
        c.queue.retry_max = Duration::from_secs(30);
    });
    let id = send(&node, "hook@example.org", "Subject: retried\r\n\r\nx\r\n");
    let requests = target.wait_for(3, Duration::from_secs(30));
    queue_empties(&node);
    std::thread::sleep(Duration::from_millis(300));
    let requests_after = target.requests();
    assert_eq!(requests_after.len(), 3, "posted again after a 200");
    let ids: Vec<&str> = requests
        .iter()
        .map(|r| r.header("mailnode-delivery-id"))
        .collect();
    let expected = format!("{id}.0");
    assert_eq!(ids, [expected.as_str(); 3]);
    let attempts: Vec<&str> = requests
        .iter()
        .map(|r| r.header("mailnode-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    let waited = requests[2].received_at - requests[1].received_at;
    assert!(
        waited >= 2.0,
        "Retry-After: 2 but retried after {waited:.2} s"
    );
}

#[test]
fn a_429_and_a_408_are_retried() {
    let target = HttpTarget::start(json!([{"status": 429}, {"status": 408}, {"status": 204}]));
    let node = TestNode::start(&format!("hook: {}\n", target.url("http", "/")));
    send(&node, "hook@example.org", "Subject: busy\r\n\r\nx\r\n");
    target.wait_for(3, Duration::from_secs(20));
    queue_empties(&node);
}

#[test]
fn a_404_a_410_and_a_301_are_returned_to_the_sender_with_the_status_line_and_the_body() {
    let sink = Sink::start(|_| None);
    let gone = HttpTarget::start(json!([{"status": 404, "body": "no such queue\nsupport"}]));
    let removed = HttpTarget::start(json!([{"status": 410, "body": "retired"}]));
    let moved = HttpTarget::start(json!([
        {"status": 301, "headers": {"Location": "/elsewhere"}, "body": "moved"},
        {"status": 200}
    ]));
    let aliases = format!(
        "gone: {}\nremoved: {}\nmoved: {}\n",
        gone.url("http", "/in"),
        removed.url("http", "/in"),
        moved.url("http", "/in")
    );
    let node = TestNode::start_with(&aliases, relay_to(&sink));
    for rcpt in ["gone", "removed", "moved"] {
        send(
            &node,
            &format!("{rcpt}@example.org"),
            &format!("Subject: to {rcpt}\r\n\r\nx\r\n"),
        );
    }
    let bounces = sink.wait_for(3);
    let text: Vec<String> = bounces
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    let find = |what: &str| {
        text.iter()
            .find(|t| t.contains(what))
            .unwrap_or_else(|| panic!("no bounce mentions {what:?}: {text:#?}"))
    };
    assert!(find("Subject: to gone").contains("HTTP 404 Not Found: no such queue support"));
    assert!(find("Subject: to removed").contains("HTTP 410 Gone: retired"));
    let moved_bounce = find("Subject: to moved");
    assert!(
        moved_bounce.contains(
            "HTTP 301 Moved Permanently (redirects are not followed; Location: /elsewhere): moved"
        ),
        "{moved_bounce}"
    );
    for b in &bounces {
        assert_eq!(b.from, "");
        assert_eq!(b.rcpts, ["alice@example.org"]);
    }
    queue_empties(&node);
    // Each was asked once; the redirect was not followed.
    assert_eq!(gone.requests().len(), 1);
    assert_eq!(removed.requests().len(), 1);
    assert_eq!(moved.requests().len(), 1);
}

#[test]
fn no_connection_no_answer_and_an_untrusted_certificate_are_retried_and_shown() {
    let (dir, _) = shared_tempdir();
    let stranger = Pki::new(&dir.path().join("stranger"));
    let ours = Pki::new(&dir.path().join("ours"));
    let untrusted = HttpTarget::start_tls(answer_200(), Some(&stranger.server("localhost", 30)));
    let silent = HttpTarget::start(json!([{"hang": true}]));
    let nobody = free_port();
    let aliases = format!(
        "refused: http://127.0.0.1:{nobody}/in\nsilent: {}\nuntrusted: {}\n",
        silent.url("http", "/in"),
        untrusted.url("https", "/in")
    );
    let node = TestNode::start_with(&aliases, |c| {
        c.http.timeout = Duration::from_secs(1);
        c.http.ca_file = Some(FileSetting {
            path: ours.ca.clone(),
            at: "test".into(),
        });
    });
    let refused = send(&node, "refused@example.org", "Subject: a\r\n\r\nx\r\n");
    let no_answer = send(&node, "silent@example.org", "Subject: b\r\n\r\nx\r\n");
    let bad_tls = send(&node, "untrusted@example.org", "Subject: c\r\n\r\nx\r\n");
    let attempted_twice = |node: &TestNode, id: &str| {
        wait_for(Duration::from_secs(20), || {
            let shown = queue_show(node, id);
            (shown["data"]["recipients"][0]["attempts"].as_u64()? >= 2).then_some(())
        })
        .unwrap_or_else(|| panic!("{id} was not retried: {}", queue_show(node, id)))
    };
    for id in [&refused, &no_answer, &bad_tls] {
        attempted_twice(&node, id);
    }
    let e = last_error_of(&node, &refused, |e| e.contains("cannot connect"));
    assert!(
        e.contains("Connection refused") || e.contains("connect"),
        "{e}"
    );
    last_error_of(&node, &no_answer, |e| {
        e.starts_with("no response within 1s ([http] timeout)")
    });
    let e = last_error_of(&node, &bad_tls, |e| e.starts_with("TLS: "));
    // Both test authorities have one name: rustls finds ours and its
    // signature does not match (BadSignature); a stranger would be
    // UnknownIssuer.
    assert!(e.contains("invalid peer certificate"), "{e}");
    // Still queued, not returned.
    assert!(node.queue_files() >= 6);
}

#[test]
fn inline_mode_says_250_only_once_every_target_answered_2xx() {
    let good = HttpTarget::start(answer_200());
    let busy = HttpTarget::start(json!([{"status": 503}]));
    let aliases = format!(
        "good: {}\nmixed: {}, {}\n",
        good.url("http", "/one"),
        good.url("http", "/two"),
        busy.url("http", "/in")
    );
    let node = TestNode::start_with(&aliases, |c| {
        c.delivery.mode = mailnode::config::DeliveryMode::Inline;
    });
    let answer = |rcpt: &str| {
        let mut client = node.client();
        client.open_data("client.example", "alice@example.org", rcpt);
        client.send(b"Subject: inline\r\n\r\nx\r\n.\r\n");
        client.reply()
    };
    let r = answer("good@example.org");
    assert!(
        r.is(250, "2.0.0") && r.text.contains("delivered as"),
        "{r:?}"
    );
    assert_eq!(good.wait_for(1, Duration::from_secs(5)).len(), 1);
    let r = answer("mixed@example.org");
    assert!(r.is(451, "4.3.0"), "{r:?}");
    assert_eq!(busy.requests().len(), 1);
    assert_eq!(node.queue_files(), 0, "inline mode keeps nothing");
}

#[test]
fn each_target_of_a_mixed_alias_is_tracked_on_its_own() {
    let steady = HttpTarget::start(answer_200());
    let flaky = HttpTarget::start(json!([{"status": 502}, {"status": 502}, {"status": 200}]));
    let aliases = format!(
        "team: \"|echo run >> OUTBOX/runs\", {}, other\nother: {}\n",
        steady.url("http", "/steady"),
        flaky.url("http", "/flaky")
    );
    let node = TestNode::start(&aliases);
    let id = send(&node, "team@example.org", "Subject: team\r\n\r\nx\r\n");
    flaky.wait_for(3, Duration::from_secs(20));
    queue_empties(&node);
    assert_eq!(
        steady.requests().len(),
        1,
        "a target that got a 2xx was posted again"
    );
    let runs = std::fs::read_to_string(node.outbox.join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1, "the program ran again");
    let flaky_ids: Vec<String> = flaky
        .requests()
        .iter()
        .map(|r| r.header("mailnode-delivery-id").to_string())
        .collect();
    assert_eq!(flaky_ids.len(), 3);
    assert!(flaky_ids.iter().all(|d| d == &flaky_ids[0]));
    assert_ne!(
        steady.requests()[0].header("mailnode-delivery-id"),
        flaky_ids[0]
    );
    assert!(flaky_ids[0].starts_with(&id));
}

#[test]
fn one_host_gets_kept_alive_connections_not_one_per_post() {
    let target = HttpTarget::start(answer_200());
    let node = TestNode::start(&format!("hook: {}\n", target.url("http", "/in")));
    // Each delivery worker (one per core) keeps its own pool.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let messages = 2 * workers + 2;
    for n in 0..messages {
        send(
            &node,
            "hook@example.org",
            &format!("Subject: {n}\r\n\r\nx\r\n"),
        );
        // Delivered and removed: its connection is back in the pool
        // before the next message comes.
        target.wait_for(n + 1, Duration::from_secs(20));
        queue_empties(&node);
    }
    let connections: std::collections::BTreeSet<u16> =
        target.requests().iter().map(|r| r.client_port).collect();
    assert!(
        connections.len() <= workers,
        "{messages} POSTs one after another came on {} connections ({workers} workers)",
        connections.len()
    );
}

#[test]
fn no_proxy_is_taken_from_the_environment() {
    let target = HttpTarget::start(answer_200());
    // Would record the POST (with the target's URL as its path) if the
    // node went through it.
    let proxy = HttpTarget::start(answer_200());
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(
        dir.path(),
        &format!("hook: {}\n", target.url("http", "/in")),
        "",
    );
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port);
    let variables = [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ];
    let mut env: Vec<(&str, &str)> = variables.iter().map(|v| (*v, proxy_url.as_str())).collect();
    // A machine whose NO_PROXY names 127.0.0.1 would pass without the
    // node's own refusal.
    env.extend([("no_proxy", ""), ("NO_PROXY", "")]);
    let served = serve(&["-c", &config], dir.path(), &env);
    send_to_hook(served.addr, "direct");
    let requests = target.wait_for(1, Duration::from_secs(20));
    assert_eq!(requests[0].path, "/in");
    spool_empties(dir.path(), "not removed after the 200");
    assert!(
        proxy.requests().is_empty(),
        "went through the proxy of the environment: {:?}",
        proxy.requests()
    );
}

#[test]
fn sighup_reads_a_rotated_secret_and_a_new_ca_file_and_a_bad_secret_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let target_pki = Pki::new(&dir.path().join("target"));
    let other_pki = Pki::new(&dir.path().join("other"));
    let target = HttpTarget::start_tls(answer_200(), Some(&target_pki.server("localhost", 30)));
    let (secret, ca_file) = (dir.path().join("hook.key"), dir.path().join("ca.pem"));
    std::fs::write(&secret, "first-key\n").unwrap();
    // A good CA file, but not the one that signed the target's certificate.
    std::fs::copy(&other_pki.ca, &ca_file).unwrap();
    let config = serve_config(
        dir.path(),
        &format!("hook: {}\n", target.url("https", "/in")),
        &format!("[http]\nsecret_file = {secret:?}\nca_file = {ca_file:?}\n"),
    );
    let served = serve(&["-c", &config], dir.path(), &[]);
    let socket = dir.path().join("ctl.sock");
    let id = send_to_hook(served.addr, "untrusted at first");
    // Attempts go to the delivery workers in turn: once each has tried,
    // each has a client made with the old key and roots.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Retries come at most a second apart ([queue] retry_max).
    let limit = Duration::from_secs(10 + 2 * workers as u64);
    let untrusted = wait_for(limit, || {
        let shown = control_request(&socket, &json!({"cmd": "queue.show", "id": id}).to_string());
        let recipient = &shown["data"]["recipients"][0];
        let error = recipient["last_error"].as_str()?.to_string();
        (error.contains("invalid peer certificate")
            && recipient["attempts"].as_u64()? > workers as u64)
            .then_some(error)
    });
    assert!(untrusted.is_some(), "never refused the certificate");
    assert!(target.requests().is_empty());

    let sighup_says = |needle: &str, times: usize| {
        served.signal(nix::sys::signal::Signal::SIGHUP);
        let said = wait_for(Duration::from_secs(10), || {
            let log = served.log.lock().unwrap();
            (log.iter().filter(|l| l.contains(needle)).count() == times).then_some(())
        });
        assert!(
            said.is_some(),
            "no {needle:?}: {:?}",
            served.log.lock().unwrap()
        );
    };
    std::fs::write(&secret, "second-key\n").unwrap();
    std::fs::copy(&target_pki.ca, &ca_file).unwrap();
    sighup_says("SIGHUP: [http] key and trusted roots reloaded", 1);
    control_request(&socket, &json!({"cmd": "queue.flush"}).to_string());
    let first = target.wait_for(1, Duration::from_secs(20));
    let signed_with = |request: &Request, key: &str| {
        let file = dir.path().join("check.key");
        std::fs::write(&file, key).unwrap();
        documented_check(&file, request, request.body.as_deref().unwrap_or_default())
    };
    assert_eq!(signed_with(&first[0], "second-key"), "True");
    assert_eq!(signed_with(&first[0], "first-key"), "False");

    // An empty key file is refused: the second key goes on signing.
    std::fs::write(&secret, "").unwrap();
    sighup_says("SIGHUP: [http] files not reloaded", 1);
    send_to_hook(served.addr, "after a bad reload");
    let both = target.wait_for(2, Duration::from_secs(20));
    assert_eq!(signed_with(&both[1], "second-key"), "True");
}

#[test]
fn handlers_are_tracked_like_programs_through_failures_panics_and_refusals() {
    let sink = Sink::start(|_| None);
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u32, String, String)>::new()));
    let hooks = {
        let (calls, seen) = (Arc::clone(&calls), Arc::clone(&seen));
        Hooks::default()
            .handler("store", move |mut m: HandedMessage| {
                let (calls, seen) = (Arc::clone(&calls), Arc::clone(&seen));
                async move {
                    let mut text = String::new();
                    let read = m.message.read_to_string(&mut text).await;
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.lock()
                        .unwrap()
                        .push((m.attempt, m.delivery_id.clone(), text));
                    match n {
                        1 => DeliveryStatus::temporary("database busy"),
                        2 => panic!("handler bug"),
                        _ if read.is_ok() => DeliveryStatus::DELIVERED,
                        _ => DeliveryStatus::temporary("unreadable"),
                    }
                }
            })
            .handler("refuse", |m: HandedMessage| async move {
                DeliveryStatus::permanent(format!("no ticket queue for {}", m.recipient))
            })
    };
    let node = TestNode::start_hooked(
        "tickets: @store\nnowhere: @refuse\n",
        relay_to(&sink),
        hooks,
    );
    let id = send(
        &node,
        "tickets@example.org",
        "Subject: kept\r\n\r\nbody\r\n",
    );
    queue_empties(&node);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "ATTEMPT"
    );
    assert!(seen.iter().all(|s| s.1 == format!("{id}.0")));
    let message = &seen[2].2;
    assert!(
        message.starts_with(
            "Return-Path: <alice@example.org>\nDelivered-To: tickets@example.org\nReceived: "
        ),
        "{message}"
    );
    assert!(message.contains("Subject: kept\n\nbody\n"), "{message}");

    send(
        &node,
        "nowhere@example.org",
        "Subject: refused\r\n\r\nx\r\n",
    );
    let bounce = sink.wait_for(1);
    let text = String::from_utf8_lossy(&bounce[0].data);
    assert!(
        text.contains("no ticket queue for nowhere@example.org"),
        "{text}"
    );
    queue_empties(&node);
    // The node serves on after the panic.
    send(&node, "tickets@example.org", "Subject: again\r\n\r\nx\r\n");
    queue_empties(&node);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[test]
fn an_unknown_handler_stops_the_node_from_starting_with_its_line() {
    let (dir, _) = shared_tempdir();
    let config = test_config(dir.path());
    std::fs::write(&config.aliases.path, "ok: |true\nx: @missing\n").unwrap();
    let e = mailnode::Node::start_with(
        config,
        Hooks::default().handler("store", |_m: HandedMessage| async {
            DeliveryStatus::DELIVERED
        }),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.ends_with("aliases:2: alias 'x': unknown handler '@missing'; registered: store"),
        "{e}"
    );
}

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailnode"))
        .args(["check", "-c"])
        .arg(config)
        .output()
        .expect("mailnode runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_a_bad_url_and_an_unreadable_secret_at_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    let config = dir.path().join("mailnode.toml");
    std::fs::write(
        &aliases,
        "ok: https://app.example/in\nbad: https://exa mple/in\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[aliases]\npath = {:?}\n\n[http]\nsecret_file = {:?}\n",
            aliases,
            dir.path().join("missing.key")
        ),
    )
    .unwrap();
    let (code, said) = check(&config);
    assert_eq!(code, 78, "{said}");
    assert!(
        said.contains(&format!(
            "{}:2: alias 'bad': invalid URL",
            aliases.display()
        )),
        "{said}"
    );
    std::fs::write(&aliases, "ok: https://app.example/in\n").unwrap();
    let (code, said) = check(&config);
    assert_eq!(code, 78, "{said}");
    assert!(
        said.contains(&format!(
            "{}:5: http.secret_file: cannot read",
            config.display()
        )),
        "{said}"
    );
    std::fs::write(dir.path().join("missing.key"), "k\n").unwrap();
    let (code, said) = check(&config);
    assert_eq!(code, 0, "{said}");
}

/// A config file for `mailnode serve` in `dir` with `aliases`, and more
/// settings.
fn serve_config(dir: &Path, aliases: &str, more: &str) -> String {
    let aliases_path = dir.join("aliases");
    std::fs::write(&aliases_path, aliases).unwrap();
    let config = dir.join("mailnode.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 41943040\n[aliases]\npath = {:?}\n[spool]\npath = {:?}\n[control]\nsocket = {:?}\n[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n{more}",
            aliases_path,
            dir.join("spool"),
            dir.join("ctl.sock")
        ),
    )
    .unwrap();
    config.display().to_string()
}

fn queue_is_empty(spool: &Path) -> bool {
    std::fs::read_dir(spool.join("queue")).is_ok_and(|d| d.count() == 0)
}

/// Waits for the queue of a `serve` whose spool is under `dir` to empty.
fn spool_empties(dir: &Path, why: &str) {
    assert!(
        wait_for(Duration::from_secs(20), || queue_is_empty(
            &dir.join("spool")
        )
        .then_some(()))
        .is_some(),
        "{why}"
    );
}

/// Sends a message with `subject` to `hook@` of the `serve` at `addr`.
fn send_to_hook(addr: std::net::SocketAddr, subject: &str) -> String {
    Client::connect(addr).send_message(
        "client",
        "alice@example.org",
        "hook@example.org",
        &format!("Subject: {subject}\r\n\r\nx\r\n"),
    )
}

#[test]
fn a_post_cut_off_by_kill_9_is_made_again_after_a_restart_with_the_same_delivery_id() {
    let target = HttpTarget::start(json!([{"hang": true}, {"status": 200}]));
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(
        dir.path(),
        &format!("hook: {}\n", target.url("http", "/in")),
        "[http]\ntimeout = \"5m\"\n",
    );
    let first = serve(&["-c", &config], dir.path(), &[]);
    let id = send_to_hook(first.addr, "at least once");
    // The POST is under way: the server has its headers and says nothing.
    wait_for(Duration::from_secs(20), || {
        (target.requests().len() == 1).then_some(())
    })
    .expect("the first POST never came");
    let mut first = first;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    drop(first);

    let _second = serve(&["-c", &config], dir.path(), &[]);
    // The first one's body never came: the server was waiting to read it.
    let requests = wait_for(Duration::from_secs(30), || {
        let found = target.requests();
        (found.len() == 2 && found[1].body.is_some()).then_some(found)
    })
    .unwrap_or_else(|| panic!("not posted again: {:?}", target.requests()));
    let expected = format!("{id}.0");
    assert_eq!(requests[0].header("mailnode-delivery-id"), expected);
    assert_eq!(requests[1].header("mailnode-delivery-id"), expected);
    spool_empties(dir.path(), "not removed after the 200");
    assert_eq!(target.requests().len(), 2, "posted a third time");
}

/// Sends a message of about `size` bytes to `hook@` through a fresh
/// `serve`, waits for the POST to end, and says the node's peak RSS.
fn peak_rss_posting(size: usize) -> u64 {
    let target = HttpTarget::start(answer_200());
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(
        dir.path(),
        &format!("hook: {}\n", target.url("http", "/in")),
        "",
    );
    let served = serve(&["-c", &config], dir.path(), &[]);
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n";
    let mut client = Client::connect(served.addr);
    client.open_data("client", "alice@example.org", "hook@example.org");
    client.send(b"Subject: big\r\n\r\n");
    let mut sent = 0;
    let block = line.repeat(1000);
    while sent < size {
        client.send(block.as_bytes());
        sent += block.len();
    }
    client.send(b".\r\n");
    queued_id(&client.reply());
    let requests = target.wait_for(1, Duration::from_secs(120));
    let received = requests[0].body.as_ref().map_or(0, Vec::len);
    assert!(received > sent, "{received} bytes posted of {sent}");
    proc_status_kib(served.child.id(), "VmHWM")
}

#[test]
fn a_25_mb_message_is_posted_in_the_memory_of_a_4_kb_one() {
    let small = peak_rss_posting(4 * 1024);
    let big = peak_rss_posting(25 * 1024 * 1024);
    eprintln!("peak RSS of the node: {small} KiB posting 4 KB, {big} KiB posting 25 MB");
    // The issue's bound is 2x; flat memory is tighter than that on a
    // debug build's 28 MiB: a copy of the message would not fit in 8 MiB.
    assert!(
        big <= 2 * small && big <= small + 8 * 1024,
        "posting 25 MB peaked at {big} KiB, 4 KB at {small} KiB"
    );
}

#[test]
fn a_server_reading_a_byte_a_second_holds_back_only_its_own_deliveries() {
    let slow = HttpTarget::start(json!([{"slow_read": true}]));
    let quick = HttpTarget::start(answer_200());
    let aliases = format!(
        "slow: {}\nquick: {}\nlocal: \"|cat > OUTBOX/$QUEUE_ID\"\n",
        slow.url("http", "/in"),
        quick.url("http", "/in")
    );
    let node = TestNode::start_with(&aliases, |c| {
        c.http.max_per_host = 2;
        c.delivery.concurrency = 2;
    });
    // More than the slow host may have in flight, and more than the
    // program slots: the rest of its mail waits in its own lane.
    for n in 0..4 {
        send(
            &node,
            "slow@example.org",
            &format!("Subject: slow {n}\r\n\r\nx\r\n"),
        );
    }
    wait_for(Duration::from_secs(20), || {
        (slow.requests().len() == 2).then_some(())
    })
    .expect("the slow server never got its two POSTs");
    let mut programs = Vec::new();
    for n in 0..6 {
        send(
            &node,
            "quick@example.org",
            &format!("Subject: quick {n}\r\n\r\nx\r\n"),
        );
        programs.push(send(
            &node,
            "local@example.org",
            &format!("Subject: local {n}\r\n\r\nx\r\n"),
        ));
    }
    quick.wait_for(6, Duration::from_secs(20));
    for id in &programs {
        wait_for_file(&node.outbox.join(id));
    }
    // Still reading the first two, and never more than two at once.
    let at_the_slow_host = slow.requests();
    assert_eq!(at_the_slow_host.len(), 2, "{at_the_slow_host:?}");
    assert!(at_the_slow_host.iter().all(|r| r.body.is_none()));
}

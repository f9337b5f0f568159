//! The Prometheus endpoint of a running node: every metric of the contract,
//! with data after a little traffic, in a form promtool accepts.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_name_every_contract_series_and_pass_promtool() {
    let node = TestNode::start_with("ok: |cat > /dev/null\n", |c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let metrics = node
        .node
        .as_ref()
        .unwrap()
        .metrics_addr()
        .expect("metrics served");
    // A little traffic: one message delivered, one unknown recipient.
    let mut c = node.client();
    c.reply();
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<nobody@example.org>");
    c.cmd("RCPT TO:<ok@example.org>");
    c.cmd("DATA");
    c.send(b"Subject: m\r\n\r\nx\r\n.\r\n");
    queued_id(&c.reply());
    c.cmd("QUIT");
    assert!(
        wait_for(Duration::from_secs(20), || (node.queue_files() == 0)
            .then_some(()))
        .is_some()
    );

    let (head, body) = wait_for(Duration::from_secs(10), || {
        let (h, b) = scrape(metrics, "/metrics");
        b.contains("mailnode_deliveries_total{outcome=\"delivered\"} 1")
            .then_some((h, b))
    })
    .unwrap_or_else(|| panic!("no delivery counted:\n{}", scrape(metrics, "/metrics").1));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for name in [
        "mailnode_smtp_connections_total{outcome=\"accepted\"}",
        "mailnode_smtp_connections_total{outcome=\"denied\"}",
        "mailnode_smtp_connections_total{outcome=\"rate_limited\"}",
        "mailnode_smtp_connections_total{outcome=\"over_capacity\"}",
        "mailnode_smtp_sessions_active",
        "mailnode_smtp_sessions_closed_total{reason=\"quit\"}",
        "mailnode_smtp_sessions_closed_total{reason=\"connect_limit\"}",
        "mailnode_smtp_sessions_closed_total{reason=\"timeout\"}",
        "mailnode_smtp_sessions_closed_total{reason=\"error\"}",
        "mailnode_smtp_sessions_closed_total{reason=\"shutdown\"}",
        "mailnode_smtp_sessions_closed_total{reason=\"peer\"}",
        "mailnode_smtp_messages_total{outcome=\"accepted\"}",
        "mailnode_smtp_messages_total{outcome=\"rejected\"}",
        "mailnode_smtp_messages_total{outcome=\"tempfailed\"}",
        "mailnode_smtp_recipients_total{outcome=\"accepted\"}",
        "mailnode_smtp_recipients_total{outcome=\"rejected\"}",
        "mailnode_queue_messages{state=\"active\"}",
        "mailnode_queue_messages{state=\"deferred\"}",
        "mailnode_queue_messages{state=\"held\"}",
        "mailnode_deliveries_total{outcome=\"delivered\"}",
        "mailnode_deliveries_total{outcome=\"deferred\"}",
        "mailnode_deliveries_total{outcome=\"bounced\"}",
        "mailnode_delivery_duration_seconds_bucket",
        "mailnode_ratelimit_rejections_total{limit=\"connection\"}",
        "mailnode_ratelimit_rejections_total{limit=\"message\"}",
        "mailnode_actor_restarts_total{actor=\"queue_runner\"}",
        "mailnode_build_info{version=\"",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(body.contains("# TYPE mailnode_delivery_duration_seconds histogram"));
    assert!(
        body.contains("mailnode_smtp_messages_total{outcome=\"accepted\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("mailnode_smtp_recipients_total{outcome=\"rejected\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("mailnode_smtp_sessions_closed_total{reason=\"quit\"} 1"),
        "{body}"
    );

    // promtool (from Debian's prometheus package, installed by .ci/run)
    // accepts the exposition.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (head, _) = scrape(metrics, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

//! The Prometheus endpoint of a running node: every metric of the contract,
//! with data after a little traffic, in a form promtool accepts.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    (head.to_string(), body.to_string())
}

/// The value of one series in an exposition (0 when absent).
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
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
        (value(&b, "mailnode_deliveries_total{outcome=\"delivered\"}") >= 1.0).then_some((h, b))
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
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(body.contains("# TYPE mailnode_delivery_duration_seconds histogram"));
    // At least: another test in this process shares the recorder.
    for series in [
        "mailnode_smtp_messages_total{outcome=\"accepted\"}",
        "mailnode_smtp_recipients_total{outcome=\"rejected\"}",
        "mailnode_smtp_sessions_closed_total{reason=\"quit\"}",
    ] {
        assert!(value(&body, series) >= 1.0, "{series}: {body}");
    }

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

/// A real Prometheus server on loopback, stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mailnode\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus is installed (.ci/run installs it)");
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    let ready = wait_for(Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr).ok()?;
        let (head, _) = scrape(addr, "/-/ready");
        head.starts_with("HTTP/1.1 200").then_some(())
    });
    assert!(ready.is_some(), "prometheus never became ready");
    p
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; Ok(number of series) or the error Prometheus gave.
fn query(prometheus: std::net::SocketAddr, expr: &str) -> Result<usize, String> {
    let (_, body) = scrape(
        prometheus,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    );
    // Chunked or not, the JSON object is what lies between the braces.
    let json = &body[body.find('{').ok_or("no json")?..=body.rfind('}').ok_or("no json")?];
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(v["error"].to_string());
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    // TLS too, for its panels: a certificate from a test authority.
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(pki_dir.path());
    let (cert, key) = pki.server("mx.test", 30);
    // An HTTP target too, for the HTTP deliveries' panels.
    let hook = HttpTarget::start(answer_200());
    let aliases = format!("ok: \"|cat > /dev/null\", {}\n", hook.url("http", "/mail"));
    let node = TestNode::start_with(&aliases, |c| {
        c.tls = Some(mailnode::config::TlsConfig {
            cert,
            key,
            min_version: mailnode::config::TlsVersion::Tls12,
            handshake_timeout: Duration::from_secs(30),
            require: false,
        });
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        c.limits.connection_rate_per_ip = mailnode::config::Rate {
            count: std::num::NonZeroU32::new(20).unwrap(),
            per: Duration::from_secs(60),
        };
        // The test's client is on loopback, exempt by default.
        c.limits.exempt = Vec::new();
    });
    let metrics = node.node.as_ref().unwrap().metrics_addr().unwrap();
    let prometheus = start_prometheus(metrics);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dashboards/mailnode.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m")
        })
        .collect();
    assert!(exprs.len() >= 14, "{exprs:?}");
    // The template variable's own query too.
    let instances = dashboard["templating"]["list"][1]["definition"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(instances.contains("mailnode_build_info"));

    // A little traffic while Prometheus scrapes: messages delivered, one
    // recipient refused, then more connections than the rate allows.
    for _ in 0..3 {
        let mut c = node.client();
        c.reply();
        c.cmd("EHLO client");
        c.cmd("MAIL FROM:<a@example.org>");
        c.cmd("RCPT TO:<nobody@example.org>");
        c.cmd("RCPT TO:<ok@example.org>");
        c.cmd("DATA");
        c.send(b"Subject: traffic\r\n\r\nx\r\n.\r\n");
        queued_id(&c.reply());
        c.cmd("QUIT");
    }
    python(
        "import smtplib, ssl, sys\ns = smtplib.SMTP('localhost', int(sys.argv[1]), timeout=20)\ns.starttls(context=ssl.create_default_context(cafile=sys.argv[2]))\ns.quit()",
        &[&node.addr.port().to_string(), pki.ca.to_str().unwrap()],
    );
    for _ in 0..20 {
        let mut c = node.client();
        c.reply();
    }
    let all_answered = wait_for(Duration::from_secs(60), || {
        for expr in &exprs {
            match query(prometheus.addr, expr) {
                Ok(n) if n > 0 => {}
                Ok(_) => return None,
                Err(e) => panic!("query failed: {expr}: {e}"),
            }
        }
        let delivered = query(
            prometheus.addr,
            "sum(mailnode_deliveries_by_target_total{kind=\"http\",outcome=\"delivered\"}) >= 3 and sum(mailnode_deliveries_by_target_total{kind=\"program\",outcome=\"delivered\"}) >= 3",
        );
        (delivered == Ok(1)).then_some(())
    });
    if all_answered.is_none() {
        let empty: Vec<&String> = exprs
            .iter()
            .filter(|e| query(prometheus.addr, e).unwrap_or(0) == 0)
            .collect();
        panic!("queries without data: {empty:#?}");
    }
}

//! The `mailnode` binary itself: `check`, `serve`'s refusal of bad files,
//! the README's demo from the repository root, and a kill -9 in the middle
//! of the queue that loses nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_mailnode");

fn mailnode(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("mailnode runs")
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_is_silent_when_all_is_well() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(&dir.path().join("aliases"), "support: |cat\n");
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!("[aliases]\npath = \"{aliases}\"\n"),
    );
    let out = mailnode(&["check", "-c", &config]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

#[test]
fn check_reports_bad_alias_lines_with_file_and_line_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(
        &dir.path().join("aliases"),
        "# comment\nok: |cat\nbroken line without colon\nempty:\n",
    );
    let config = write(&dir.path().join("c.toml"), "");
    let out = mailnode(&["check", "-c", &config, "-a", &aliases]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].starts_with(&format!("{aliases}:3: ")), "{stderr}");
    assert!(lines[1].starts_with(&format!("{aliases}:4: ")), "{stderr}");
    // serve refuses to start on the same problems, with the same lines.
    let served = mailnode(&[
        "serve",
        "-c",
        &config,
        "-a",
        &aliases,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(served.status.code(), Some(78));
    assert_eq!(String::from_utf8_lossy(&served.stderr), stderr);
}

#[test]
fn check_reports_an_unknown_config_key_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(&dir.path().join("aliases"), "ok: |cat\n");
    let config = write(
        &dir.path().join("c.toml"),
        &format!("[aliases]\npath = \"{aliases}\"\n\n[smtp]\nlisten = [\"127.0.0.1:0\"]\ncolour = \"blue\"\n"),
    );
    let out = mailnode(&["check", "-c", &config]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with(&format!("{config}:6: ")), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
    let served = mailnode(&["serve", "-c", &config]);
    assert_eq!(served.status.code(), Some(78));
}

#[test]
fn unsupported_alias_kinds_are_warnings_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(
        &dir.path().join("aliases"),
        "ok: |cat\nfile: /var/mail/file\ninc: :include:/etc/list\n",
    );
    let config = write(&dir.path().join("c.toml"), "");
    let out = mailnode(&["check", "-c", &config, "-a", &aliases]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{aliases}:2: warning: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{aliases}:3: warning: ")),
        "{stderr}"
    );
}

/// A `mailnode serve` child and the address it reported.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .filter(|_| line.contains("listening for SMTP"))
            {
                let _ = tx.send(addr.parse::<SocketAddr>().expect("addr"));
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve reported its listening address");
    Served { child, addr }
}

fn send_one(addr: SocketAddr, rcpt: &str, body: &str) -> String {
    let mut c = Client::connect(addr);
    assert_eq!(c.reply().code, 220);
    c.cmd("EHLO client");
    assert!(c.cmd("MAIL FROM:<sender@example.org>").is(250, "2.1.0"));
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    assert!(r.is(250, "2.1.5"), "{r:?}");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(body.as_bytes());
    c.send(b".\r\n");
    let id = queued_id(&c.reply());
    c.cmd("QUIT");
    id
}

#[test]
fn readme_demo_runs_from_the_repository_root() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let served = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--spool",
            spool.to_str().unwrap(),
        ],
        root,
        &[],
    );
    let marker = format!("demo-{}-{}", std::process::id(), served.addr.port());
    let id = send_one(
        served.addr,
        "demo@example.org",
        &format!("Subject: {marker}\r\n\r\nhello\r\n"),
    );
    let mbox = Path::new("/tmp/mailnode-demo.mbox");
    let found = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(mbox).ok()?;
        text.contains(&format!("Subject: {marker}")).then_some(text)
    })
    .expect("the demo alias appended the message");
    assert!(found.contains(&format!(" id {id}")));
}

#[test]
fn kill_9_after_250_loses_nothing() {
    let (dir, outbox) = shared_tempdir();
    let outbox_s = outbox.display().to_string();
    // The program refuses (75) until the test says go: at the kill, every
    // message is still in the queue, some possibly mid-attempt.
    let aliases = write(
        &dir.path().join("aliases"),
        &format!(
            "hold: |if [ -e {outbox_s}/go ]; then cat > {outbox_s}/$QUEUE_ID; env > {outbox_s}/$QUEUE_ID.env; else exit 75; fi\n"
        ),
    );
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!(
            "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n",
            dir.path().join("spool").display()
        ),
    );
    let secret = [("MAILNODE_TEST_SECRET", "hunter2")];
    let mut first = serve(&["-c", &config], dir.path(), &secret);
    const N: usize = 30;
    let ids: Vec<String> = (0..N)
        .map(|i| {
            send_one(
                first.addr,
                "hold@example.org",
                &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"),
            )
        })
        .collect();
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    drop(first);

    let second = serve(&["-c", &config], dir.path(), &secret);
    std::fs::write(outbox.join("go"), b"").unwrap();
    let missing = wait_for(Duration::from_secs(30), || {
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| !outbox.join(id.as_str()).exists())
            .collect();
        missing.is_empty().then_some(())
    });
    assert!(missing.is_some(), "messages lost after kill -9");
    for (i, id) in ids.iter().enumerate() {
        let body = wait_for_file(&outbox.join(id));
        assert!(
            String::from_utf8_lossy(&body).ends_with(&format!("Subject: m{i}\n\nbody {i}\n")),
            "{id}"
        );
    }
    // Nothing of the server's own environment leaks into programs.
    let env = std::fs::read_to_string(outbox.join(format!("{}.env", ids[0]))).unwrap();
    assert!(!env.contains("hunter2"), "server environment leaked: {env}");
    drop(second);
}

fn run_send(args: &[&str], stdin: &[u8]) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("send")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("send runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn send_exits_with_sysexits_codes() {
    let sink = Sink::start(|rcpt| {
        rcpt.starts_with("nobody@")
            .then(|| "550 5.1.1 unknown".to_string())
    });
    let target = format!("127.0.0.1:{}", sink.addr.port());
    let message = b"Subject: sent\n\n.leading dot\nbody\n";
    let (code, err) = run_send(
        &[
            "-h",
            "talker.example",
            &target,
            "me@example.org",
            "you@example.org",
        ],
        message,
    );
    assert_eq!(code, Some(0), "{err}");
    let got = sink.wait_for(1);
    assert_eq!(got[0].helo, "talker.example");
    assert_eq!(got[0].from, "me@example.org");
    assert_eq!(got[0].rcpts, vec!["you@example.org".to_string()]);
    assert_eq!(
        got[0].data,
        b"Subject: sent\r\n\r\n.leading dot\r\nbody\r\n".to_vec()
    );

    let (code, err) = run_send(&[&target, "me@example.org", "nobody@example.org"], message);
    assert_eq!(code, Some(67), "{err}");
    assert!(err.contains("550 5.1.1"), "{err}");

    // A port nothing listens on: try again later.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, _) = run_send(
        &[
            &format!("127.0.0.1:{port}"),
            "me@example.org",
            "you@example.org",
        ],
        message,
    );
    assert_eq!(code, Some(75));

    let (code, _) = run_send(&[&target, "me@example.org"], message);
    assert_eq!(code, Some(64), "no recipient is a usage error");
}

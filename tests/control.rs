//! The control socket end to end: every command through `mailnode ctl`, in
//! human and JSON form, against a running node; the socket's mode; a peer
//! of another uid refused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use mailnode::config::RelayHost;

const BIN: &str = env!("CARGO_BIN_EXE_mailnode");

struct Ctl {
    socket: String,
}

impl Ctl {
    fn run(&self, json: bool, words: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = Command::new(BIN);
        cmd.args(["ctl", "--control", &self.socket]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.args(words).output().expect("ctl runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn json(&self, words: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.run(true, words);
        assert_eq!(code, Some(0), "ctl {words:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {words:?}: {e}: {out}"))
    }

    fn human(&self, words: &[&str]) -> String {
        let (code, out, err) = self.run(false, words);
        assert_eq!(code, Some(0), "ctl {words:?}: {err}");
        out
    }
}

fn send(node: &TestNode, rcpt: &str) -> String {
    node.client().send_message(
        "client",
        "alice@example.org",
        rcpt,
        "Subject: ctl\r\n\r\nx\r\n",
    )
}

fn state_of(ctl: &Ctl, id: &str) -> Option<String> {
    let list = ctl.json(&["queue"]);
    list.as_array()?
        .iter()
        .find(|e| e["id"] == id)
        .map(|e| e["state"].as_str().unwrap_or("").to_string())
}

#[test]
fn every_control_command_end_to_end() {
    let sink = Sink::start(|_| None);
    let node = TestNode::start_with(
        "hold: |[ -e OUTBOX/go ] || { echo not yet; exit 75; }; cat > OUTBOX/$QUEUE_ID\n",
        |c| {
            c.queue.retry_min = Duration::from_secs(3600);
            c.queue.retry_max = Duration::from_secs(3600);
            c.relay.host = Some(RelayHost {
                host: "127.0.0.1".into(),
                port: sink.addr.port(),
            });
        },
    );
    let ctl = Ctl {
        socket: node
            .node
            .as_ref()
            .unwrap()
            .control_path()
            .display()
            .to_string(),
    };
    // The socket has the configured mode (0600 by default).
    let mode = std::fs::metadata(&ctl.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let status = ctl.json(&["status"]);
    // The version, and the commit of this checkout (tests run in one).
    assert_eq!(status["version"], mailnode::VERSION);
    let version = status["version"].as_str().unwrap();
    assert!(version.starts_with(env!("CARGO_PKG_VERSION")), "{version}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    if head.status.success() {
        let commit = String::from_utf8_lossy(&head.stdout).trim().to_string();
        assert!(version.ends_with(&format!("(git {commit})")), "{version}");
    }
    assert_eq!(status["intake"], "accepting");
    assert!(ctl.human(&["status"]).contains("intake: accepting"));

    // A message that waits (exit 75, next try in an hour).
    let id = send(&node, "hold@example.org");
    let deferred = wait_for(Duration::from_secs(20), || {
        (state_of(&ctl, &id).as_deref() == Some("deferred")).then_some(())
    });
    assert!(deferred.is_some(), "never deferred");
    let list = ctl.json(&["queue"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(entry["sender"], "alice@example.org");
    assert!(entry["age_seconds"].is_u64() && entry["size"].is_u64());
    let rcpt = &entry["recipients"][0];
    assert_eq!(rcpt["address"], "hold@example.org");
    assert_eq!(rcpt["state"], "pending");
    assert_eq!(rcpt["attempts"], 1);
    assert!(rcpt["last_error"].as_str().unwrap().contains("not yet"));
    let human = ctl.human(&["queue"]);
    assert!(
        human.contains(&id) && human.contains("-> hold@example.org (pending, 1 attempts"),
        "{human}"
    );

    let shown = ctl.json(&["queue", "show", &id]);
    assert_eq!(shown["client_address"], "127.0.0.1");
    assert_eq!(shown["recipients"][0]["history"][0]["status"], "4.3.0");
    assert!(ctl
        .human(&["queue", "show", &id])
        .contains("client_helo: client"));

    // hold / flush refused while held / release.
    ctl.json(&["queue", "hold", &id]);
    assert_eq!(state_of(&ctl, &id).as_deref(), Some("held"));
    let (code, _, err) = ctl.run(false, &["queue", "flush", &id]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("held"), "{err}");
    ctl.json(&["queue", "release", &id]);
    assert_ne!(state_of(&ctl, &id).as_deref(), Some("held"));
    // Releasing what is not held would only queue it twice: refused.
    let (code, _, err) = ctl.run(false, &["queue", "release", &id]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not held"), "{err}");
    // Released mail is tried at once (and still refused): deferred again.
    let retried = wait_for(Duration::from_secs(20), || {
        let list = ctl.json(&["queue"]);
        let e = list.as_array()?.iter().find(|e| e["id"] == id)?.clone();
        (e["state"] == "deferred" && e["recipients"][0]["attempts"] == 2).then_some(())
    });
    assert!(retried.is_some(), "release did not attempt the message");

    // flush: attempted now, delivered, gone.
    std::fs::write(node.outbox.join("go"), b"").unwrap();
    ctl.json(&["queue", "flush"]);
    wait_for_file(&node.outbox.join(&id));
    assert!(wait_for(Duration::from_secs(20), || state_of(&ctl, &id)
        .is_none()
        .then_some(()))
    .is_some());

    // delete.
    std::fs::remove_file(node.outbox.join("go")).unwrap();
    let doomed = send(&node, "hold@example.org");
    wait_for(Duration::from_secs(20), || {
        (state_of(&ctl, &doomed).as_deref() == Some("deferred")).then_some(())
    })
    .expect("deferred");
    ctl.json(&["queue", "delete", &doomed]);
    assert!(state_of(&ctl, &doomed).is_none());
    assert!(wait_for(Duration::from_secs(5), || {
        (!node
            .spool
            .join("queue")
            .join(format!("{doomed}.msg"))
            .exists())
        .then_some(())
    })
    .is_some());

    // bounce: returned to the sender now, through the relay.
    let returned = send(&node, "hold@example.org");
    wait_for(Duration::from_secs(20), || {
        (state_of(&ctl, &returned).as_deref() == Some("deferred")).then_some(())
    })
    .expect("deferred");
    ctl.json(&["queue", "bounce", &returned]);
    let dsn = sink.wait_for(1);
    assert_eq!(dsn[0].rcpts, vec!["alice@example.org".to_string()]);
    assert!(String::from_utf8_lossy(&dsn[0].data).contains("returned by the operator"));
    assert!(
        wait_for(Duration::from_secs(20), || state_of(&ctl, &returned)
            .is_none()
            .then_some(()))
        .is_some()
    );

    // Deleted and returned mail is gone from the disk: no copy is kept
    // for reuse (each message names its id in its Received header).
    for gone in [&doomed, &returned] {
        let mark = format!(" id {gone}");
        let kept = || {
            files_under(&node.spool)
                .into_iter()
                .filter(|f| {
                    std::fs::read(f)
                        .is_ok_and(|bytes| bytes.windows(mark.len()).any(|w| w == mark.as_bytes()))
                })
                .collect::<Vec<_>>()
        };
        // The queue forgets a message before the writer has unlinked it.
        let erased = wait_for(Duration::from_secs(10), || kept().is_empty().then_some(()));
        assert!(erased.is_some(), "{gone} is still on disk: {:?}", kept());
    }

    // Unknown ids are errors (exit 1), not crashes.
    let (code, _, err) = ctl.run(true, &["queue", "show", "0000000000000XX"]);
    assert_eq!(code, Some(1), "{err}");

    // aliases.
    let found = ctl.json(&["aliases", "lookup", "hold+x@example.org"]);
    assert_eq!(found["accepted"], true);
    assert!(found["targets"][0]["target"]
        .as_str()
        .unwrap()
        .starts_with("|[ -e "));
    assert_eq!(found["targets"][0]["recipient"], "hold+x@example.org");
    let missing = ctl.json(&["aliases", "lookup", "nobody@example.org"]);
    assert_eq!(missing["accepted"], false);
    assert!(missing["reply"].as_str().unwrap().starts_with("550 5.1.1"));
    // `postmaster` without a domain is an address, as RCPT takes it
    // (RFC 5321 4.1.1.3); this node has no such alias.
    let postmaster = ctl.json(&["aliases", "lookup", "postmaster"]);
    assert_eq!(postmaster["address"], "postmaster");
    assert!(
        postmaster["reply"]
            .as_str()
            .unwrap()
            .starts_with("550 5.1.1"),
        "{postmaster}"
    );
    assert_eq!(ctl.json(&["aliases", "reload"])["aliases"], 1);

    // pause / resume.
    ctl.json(&["pause"]);
    assert!(node.client().reply().is(421, "4.3.2"));
    assert_eq!(ctl.json(&["status"])["intake"], "paused");
    assert!(ctl.human(&["resume"]).contains("accepting"));
    assert_eq!(node.client().reply().code, 220);

    // Bad usage and an absent server.
    assert_eq!(ctl.run(false, &["frobnicate"]).0, Some(64));
    let gone = Ctl {
        socket: node.dir.path().join("nothing.sock").display().to_string(),
    };
    assert_eq!(gone.run(false, &["status"]).0, Some(69));
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        // Only root can be another user here; CI runs as root.
        eprintln!("skipped: needs root to act as another uid");
        return;
    }
    let node = TestNode::start_with("ok: |cat > /dev/null\n", |c| c.control.mode = 0o666);
    let socket = node.node.as_ref().unwrap().control_path().to_path_buf();
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o666
    );
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let out = Command::new(BIN)
        .args(["ctl", "--control"])
        .arg(&socket)
        .arg("status")
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output()
        .expect("ctl runs as nobody");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("permission denied"), "{said}");
}

/// Every regular file under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(t) if t.is_file() => found.push(entry.path()),
                _ => {}
            }
        }
    }
    found
}

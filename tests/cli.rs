//! The `mailnode` binary itself: `check`, `serve`'s refusal of bad files,
//! the README's demo from the repository root, and a kill -9 in the middle
//! of the queue that loses nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
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
fn check_warns_of_a_forward_that_has_no_relay_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(
        &dir.path().join("aliases"),
        "support: |cat\nops: oncall@partner.example, support\n",
    );
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!("[aliases]\npath = \"{aliases}\"\n"),
    );
    let out = mailnode(&["check", "-c", &config]);
    assert_eq!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        said.trim_end(),
        format!("{aliases}:2: warning: alias 'ops' forwards to oncall@partner.example, but no [relay] host is configured: mail to it will be refused (550)")
    );
    // With a relay there is nothing to say.
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!("[aliases]\npath = \"{aliases}\"\n[relay]\nhost = \"smtp.example.org:25\"\n"),
    );
    let out = mailnode(&["check", "-c", &config]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty(), "{out:?}");
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
fn check_reports_a_bad_spawner_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(&dir.path().join("aliases"), "ok: |cat\n");
    let config = write(
        &dir.path().join("c.toml"),
        &format!("[aliases]\npath = \"{aliases}\"\n\n[delivery]\nspawner = \"fork\"\n"),
    );
    let out = mailnode(&["check", "-c", &config]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!("{config}:5: delivery.spawner: invalid value \"fork\": expected \"auto\", \"clone\" or \"process\"")
    );
}

#[test]
fn check_refuses_a_delivery_user_serve_would_refuse_with_the_same_line() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(&dir.path().join("aliases"), "ok: |cat\n");
    let config = write(
        &dir.path().join("c.toml"),
        &format!(
            "[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n[delivery]\nuser = \"nosuchuser\"\n",
            dir.path().join("spool").display()
        ),
    );
    let expected = format!(
        "{config}:6: delivery.user: no user \"nosuchuser\" on this system: expected the name of an existing unprivileged user"
    );
    let check = mailnode(&["check", "-c", &config]);
    assert_eq!(check.status.code(), Some(78));
    assert_eq!(String::from_utf8_lossy(&check.stderr).trim_end(), expected);
    let control = dir.path().join("ctl.sock").display().to_string();
    let serve = mailnode(&[
        "serve",
        "-c",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "off",
        "--control",
        &control,
    ]);
    assert_eq!(serve.status.code(), Some(78));
    let said = String::from_utf8_lossy(&serve.stderr);
    assert_eq!(
        said.matches(&expected).count(),
        1,
        "said once, with its line: {said}"
    );
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

fn send_one(addr: SocketAddr, rcpt: &str, body: &str) -> String {
    Client::connect(addr).send_message("client", "sender@example.org", rcpt, body)
}

#[test]
fn readme_demo_runs_from_the_repository_root() {
    // The repository's config/ as it is, in a directory of the test's own:
    // the demo's state (var/, /tmp/mailnode-demo.mbox) is the README
    // reader's, and a demo server of theirs may be running.
    let root = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir(root.path().join("config")).unwrap();
    std::fs::copy(
        repo.join("config/mailnode.toml"),
        root.path().join("config/mailnode.toml"),
    )
    .unwrap();
    let mbox = root.path().join("demo.mbox");
    let aliases = std::fs::read_to_string(repo.join("config/aliases")).unwrap();
    assert!(aliases.contains("/tmp/mailnode-demo.mbox"));
    std::fs::write(
        root.path().join("config/aliases"),
        aliases.replace("/tmp/mailnode-demo.mbox", mbox.to_str().unwrap()),
    )
    .unwrap();
    // Programs run as nobody when the tests run as root.
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let served = serve(&["--listen", "127.0.0.1:0"], root.path(), &[]);
    let marker = format!("demo-{}-{}", std::process::id(), served.addr.port());
    let id = send_one(
        served.addr,
        "demo@example.org",
        &format!("Subject: {marker}\r\n\r\nhello\r\n"),
    );
    let found = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&mbox).ok()?;
        text.contains(&format!("Subject: {marker}")).then_some(text)
    })
    .expect("the demo alias appended the message");
    assert!(found.contains(&format!(" id {id}")));
    // The default config's relative paths, under the directory it runs in.
    assert!(root.path().join("var/spool").is_dir());
    assert!(root.path().join("var/run/mailnode.sock").exists());
}

/// Makes `pidfd_open` fail with EPERM in `command`'s process, as the
/// default seccomp filters of older container runtimes do.
fn refuse_pidfd_open(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let statement = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // The system call's number is the first word of seccomp_data.
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        statement(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::SYS_pidfd_open as u32,
            0,
            1,
        ),
        statement(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            0,
            0,
        ),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ];
    // SAFETY: prctl only, between fork and exec, on a filter made before
    // the fork; the filter survives the exec (no_new_privs is set).
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A node whose programs put each message in `outbox`, named by queue id.
fn outbox_config(dir: &Path, outbox: &Path, delivery: &str) -> String {
    let aliases = write(
        &dir.join("aliases"),
        &format!("box: |cat > {}/$QUEUE_ID\n", outbox.display()),
    );
    write(
        &dir.join("mailnode.toml"),
        &format!(
            "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n[delivery]\n{delivery}",
            dir.join("spool").display()
        ),
    )
}

fn delivers_to_outbox(served: &Served, outbox: &Path) {
    let id = send_one(
        served.addr,
        "box@example.org",
        "Subject: by fork\r\n\r\nhello\r\n",
    );
    let delivered = wait_for_file(&outbox.join(&id));
    assert!(
        String::from_utf8_lossy(&delivered).contains("Subject: by fork\n\nhello\n"),
        "{}",
        String::from_utf8_lossy(&delivered)
    );
}

#[test]
fn the_process_spawner_delivers_and_the_log_names_it() {
    let (dir, outbox) = shared_tempdir();
    let config = outbox_config(dir.path(), &outbox, "spawner = \"process\"\n");
    let served = serve(&["-c", &config], dir.path(), &[]);
    assert!(
        served.logged("program spawner") && served.logged("spawner=process"),
        "{:?}",
        served.log.lock().unwrap()
    );
    delivers_to_outbox(&served, &outbox);
}

#[test]
fn where_seccomp_refuses_pidfd_open_auto_takes_the_process_spawner_and_clone_refuses_to_start() {
    let (dir, outbox) = shared_tempdir();
    let config = outbox_config(dir.path(), &outbox, "");
    let mut command = serve_command(&["-c", &config], dir.path(), &[]);
    refuse_pidfd_open(&mut command);
    let served = serve_from(command);
    assert!(
        served.logged("spawner=process configured=auto"),
        "{:?}",
        served.log.lock().unwrap()
    );
    delivers_to_outbox(&served, &outbox);
    drop(served);

    let config = outbox_config(dir.path(), &outbox, "spawner = \"clone\"\n");
    let mut command = Command::new(BIN);
    command
        .args(["serve", "-c", &config, "--metrics", "off"])
        .current_dir(dir.path());
    refuse_pidfd_open(&mut command);
    let out = command.output().expect("mailnode runs");
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("delivery.spawner = \"clone\""), "{stderr}");
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
    // It may refuse its arguments before reading: a closed pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin);
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
    let (code, _) = run_send(
        &[
            &target,
            "me@example.org",
            "you@example.org>\r\nRCPT TO:<evil@example.org",
        ],
        message,
    );
    assert_eq!(code, Some(64), "a CRLF in an address is refused");
    assert_eq!(sink.messages().len(), 1, "nothing more was sent");
}

#[test]
fn send_refuses_bad_arguments_before_reading_its_message() {
    // Standard input stays open and silent, as a terminal would: a usage
    // error must not wait for it.
    let mut child = Command::new(BIN)
        .args(["send", "127.0.0.1:25", "me@example.org", "<>"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("send runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = status.expect("send waited for its message before refusing an empty recipient");
    assert_eq!(status.code(), Some(64));
}

/// A config file for the binary in `dir`, with `aliases` and extra TOML.
fn binary_config(dir: &Path, aliases: &str, extra: &str) -> String {
    let aliases = write(&dir.join("aliases"), aliases);
    write(
        &dir.join("mailnode.toml"),
        &format!(
            "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n{extra}",
            dir.join("spool").display()
        ),
    )
}

fn inetd_session(config: &str, dialogue: &[u8]) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["inetd", "-c", config])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("inetd runs");
    let _ = child.stdin.take().unwrap().write_all(dialogue);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const DIALOGUE: &[u8] = b"EHLO pipe.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<rec@example.org>\r\nDATA\r\nSubject: over pipes\r\n\r\nhello\r\n.\r\nQUIT\r\n";

#[test]
fn inetd_mode_over_pipes_delivers_before_it_exits() {
    let (dir, outbox) = shared_tempdir();
    let o = outbox.display().to_string();
    let config = binary_config(
        dir.path(),
        &format!("rec: |cat > {o}/$QUEUE_ID; echo \"$CLIENT_HELO\" > {o}/helo\n"),
        "",
    );
    let (code, replies) = inetd_session(&config, DIALOGUE);
    assert_eq!(code, Some(0), "{replies}");
    assert!(
        replies.starts_with("220 mx.test ESMTP mailnode\r\n"),
        "{replies}"
    );
    let queued = replies
        .lines()
        .find(|l| l.starts_with("250 2.0.0 Ok: queued as "))
        .expect("queued");
    let id = queued.rsplit(' ').next().unwrap();
    assert!(replies.ends_with("221 2.0.0 Bye\r\n"), "{replies}");
    // Delivered by the time the process exited.
    let got = std::fs::read_to_string(outbox.join(id)).expect("delivered before exit");
    assert!(got.ends_with("Subject: over pipes\n\nhello\n"));
    assert_eq!(
        std::fs::read_to_string(outbox.join("helo")).unwrap(),
        "pipe.example\n"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/queue"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn inetd_reads_a_proxy_header_from_a_balancer_as_serve_does() {
    let (dir, outbox) = shared_tempdir();
    let o = outbox.display().to_string();
    let aliases = write(
        &dir.path().join("aliases"),
        &format!("rec: |echo \"$CLIENT_ADDRESS\" > {o}/$QUEUE_ID\n"),
    );
    // Over pipes the peer counts as 127.0.0.1.
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!(
            "hostname = \"mx.test\"\n[smtp]\nproxy_protocol_from = [\"127.0.0.1/32\"]\n[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n",
            dir.path().join("spool").display()
        ),
    );
    let mut dialogue = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 25\r\n".to_vec();
    dialogue.extend_from_slice(DIALOGUE);
    let (code, replies) = inetd_session(&config, &dialogue);
    assert_eq!(code, Some(0), "{replies}");
    let id = replies
        .lines()
        .find_map(|l| l.strip_prefix("250 2.0.0 Ok: queued as "))
        .expect("queued")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(outbox.join(id)).unwrap(),
        "192.0.2.7\n"
    );
    // Without the header: no greeting at all.
    let (_, replies) = inetd_session(&config, DIALOGUE);
    assert_eq!(replies, "", "greeted without a PROXY header");
}

#[test]
fn a_second_serve_opens_no_port_while_it_waits_for_the_spool() {
    let (dir, _outbox) = shared_tempdir();
    let config = binary_config(dir.path(), "ok: |cat > /dev/null\n", "");
    let _first = serve(&["-c", &config], dir.path(), &[]);
    let port = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap().port()
    };
    let control = dir.path().join("second.sock").display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut second = Command::new(BIN)
        .args([
            "serve",
            "-c",
            &config,
            "--listen",
            &listen,
            "--metrics",
            "off",
        ])
        .args(["--control", &control])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve runs");
    // Its wait for the spool lock lasts seconds; nothing may answer there
    // meanwhile (it would only reset the connection later).
    let mut tries = 0;
    while second.try_wait().unwrap().is_none() {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the second serve accepted a connection while it waited for the lock"
        );
        tries += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tries > 10, "the second serve gave up too soon to tell");
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another mailnode queue runner")
    );
}

#[test]
fn queue_runners_exclude_each_other_and_runq_finishes_what_serve_left() {
    let (dir, outbox) = shared_tempdir();
    let o = outbox.display().to_string();
    let config = binary_config(
        dir.path(),
        &format!(
            "hold: |echo $QUEUE_ID >> {o}/tries; [ -e {o}/go ] || exit 75; cat > {o}/$QUEUE_ID\n"
        ),
        "[queue]\nretry_min = \"200ms\"\nretry_max = \"200ms\"\n",
    );
    let mut served = serve(&["-c", &config], dir.path(), &[]);
    let first = send_one(
        served.addr,
        "hold@example.org",
        "Subject: left\r\n\r\nbehind\r\n",
    );
    wait_for_file(&outbox.join("tries"));

    // A second queue runner on the same spool is refused, with a reason.
    let runq = mailnode(&["runq", "-c", &config]);
    assert_eq!(runq.status.code(), Some(75));
    let said = String::from_utf8_lossy(&runq.stderr);
    assert!(
        said.contains("in use by another mailnode queue runner"),
        "{said}"
    );

    // An inetd session meanwhile leaves its message to the daemon, which
    // picks it up from the queue directory.
    let dialogue = String::from_utf8_lossy(DIALOGUE).replace("rec@example.org", "hold@example.org");
    let (code, replies) = inetd_session(&config, dialogue.as_bytes());
    assert_eq!(code, Some(0), "{replies}");
    let second = replies
        .lines()
        .find_map(|l| l.strip_prefix("250 2.0.0 Ok: queued as "))
        .expect("inetd queued it")
        .to_string();
    let picked_up = wait_for(Duration::from_secs(30), || {
        let tries = std::fs::read_to_string(outbox.join("tries")).ok()?;
        tries.contains(&second).then_some(())
    });
    assert!(
        picked_up.is_some(),
        "the daemon never attempted the inetd message"
    );

    // Stop the daemon; runq then delivers what it left.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(served.child.wait().unwrap().code(), Some(0));
    std::fs::write(outbox.join("go"), b"").unwrap();
    let delivered = wait_for(Duration::from_secs(30), || {
        let run = mailnode(&["runq", "-c", &config]);
        assert_eq!(
            run.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let remaining = std::fs::read_dir(dir.path().join("spool/queue"))
            .ok()?
            .count();
        let both = outbox.join(&first).exists() && outbox.join(&second).exists();
        (both && remaining == 0).then_some(())
    });
    assert!(delivered.is_some(), "runq did not deliver what serve left");
}

#[test]
fn sigterm_during_data_finishes_or_refuses_the_message_and_exits_0() {
    let (dir, outbox) = shared_tempdir();
    let o = outbox.display().to_string();
    let config = binary_config(dir.path(), &format!("rec: |cat > {o}/$QUEUE_ID\n"), "");
    let mut served = serve(&["-c", &config], dir.path(), &[]);
    let mut idle = Client::connect(served.addr);
    assert_eq!(idle.reply().code, 220);
    let mut c = Client::connect(served.addr);
    assert_eq!(c.reply().code, 220);
    c.cmd("EHLO client");
    c.cmd("MAIL FROM:<a@example.org>");
    c.cmd("RCPT TO:<rec@example.org>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: in flight\r\n");
    served.signal(nix::sys::signal::Signal::SIGTERM);
    // The idle session is told at once.
    let bye = idle.reply();
    assert!(bye.is(421, "4.3.2"), "{bye:?}");
    c.send(b"\r\nthe rest\r\n.\r\n");
    let verdict = c.reply();
    assert!(
        verdict.code == 250 || (400..500).contains(&verdict.code),
        "neither completed nor refused: {verdict:?}"
    );
    assert_eq!(served.child.wait().unwrap().code(), Some(0));
    let queue = dir.path().join("spool/queue");
    let incoming = dir.path().join("spool/incoming");
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "half a message left"
    );
    if verdict.code == 250 {
        // Completed: delivered now or after a restart, never lost.
        let id = queued_id(&verdict);
        drop(served);
        let again = serve(&["-c", &config], dir.path(), &[]);
        let got = wait_for_file(&outbox.join(&id));
        assert!(String::from_utf8_lossy(&got).ends_with("Subject: in flight\n\nthe rest\n"));
        drop(again);
    } else {
        assert_eq!(std::fs::read_dir(&queue).unwrap().count(), 0);
    }
}

#[test]
fn sighup_reloads_aliases_and_a_bad_file_keeps_the_old_table() {
    let (dir, _outbox) = shared_tempdir();
    let config = binary_config(dir.path(), "a: |cat > /dev/null\n", "");
    let served = serve(&["-c", &config], dir.path(), &[]);
    let rcpt_reply = |rcpt: &str| {
        let mut c = Client::connect(served.addr);
        c.reply();
        c.cmd("HELO client");
        c.cmd("MAIL FROM:<x@example.org>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        c.cmd("QUIT");
        r.code
    };
    assert_eq!(rcpt_reply("b@example.org"), 550);
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "a: |cat > /dev/null\nb: |cat > /dev/null\n").unwrap();
    served.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = wait_for(Duration::from_secs(10), || {
        (rcpt_reply("b@example.org") == 250).then_some(())
    });
    assert!(reloaded.is_some(), "SIGHUP did not reload the aliases");

    std::fs::write(&aliases, "a: |cat > /dev/null\nthis line is broken\n").unwrap();
    served.signal(nix::sys::signal::Signal::SIGHUP);
    let reported = wait_for(Duration::from_secs(10), || {
        served
            .logged(&format!("{}:2:", aliases.display()))
            .then_some(())
    });
    assert!(
        reported.is_some(),
        "the bad file was not reported with FILE:LINE"
    );
    // The old table is still in force, and the server still up.
    assert_eq!(rcpt_reply("b@example.org"), 250);
}

#[test]
fn systemd_notifications_ready_watchdog_stopping() {
    let (dir, _outbox) = shared_tempdir();
    let config = binary_config(dir.path(), "a: |cat > /dev/null\n", "");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut served = serve(
        &["-c", &config],
        dir.path(),
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let next = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    };
    assert_eq!(next(), "READY=1");
    // Fed while healthy (every 150 ms here).
    assert_eq!(next(), "WATCHDOG=1");
    assert_eq!(next(), "WATCHDOG=1");
    served.signal(nix::sys::signal::Signal::SIGTERM);
    let stopping = (0..50).map(|_| next()).find(|m| m != "WATCHDOG=1");
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
    assert_eq!(served.child.wait().unwrap().code(), Some(0));
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    use std::os::fd::AsRawFd;
    let (dir, _outbox) = shared_tempdir();
    // The configured address is one nobody listens on: only the passed
    // socket can answer.
    let config = binary_config(dir.path(), "a: |cat > /dev/null\n", "");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    // As systemd does: the socket at fd 3, LISTEN_PID the service's pid.
    let script = format!(
        "exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} serve -c {config} --metrics off --control {}",
        dir.path().join("ctl.sock").display()
    );
    let mut child = Command::new("/bin/sh")
        .args(["-c", &script])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    let greeted = wait_for(Duration::from_secs(20), || {
        let stream = std::net::TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        line.starts_with("220 ").then_some(line)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(greeted.is_some(), "nothing answered on the passed socket");
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let (dir, _outbox) = shared_tempdir();
    let config = binary_config(
        dir.path(),
        "a: |cat > /dev/null\n",
        "[log]\nformat = \"json\"\n",
    );
    let mut child = Command::new(BIN)
        .args(["serve", "-c", &config, "--metrics", "off"])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Every line is JSON, up to the one saying where SMTP is served.
    let (line, v) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a log line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["fields"]["message"] == "listening for SMTP" {
            break (line, v);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(
        v["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{line}"
    );
}

#[test]
fn control_replies_stay_bounded_and_paging_lists_every_message_once() {
    use std::io::{Read, Write};
    let (dir, _outbox) = shared_tempdir();
    // The relay accepts connections and never speaks: the one delivery
    // allowed at a time waits, so every message stays queued.
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socket = dir.path().join("ctl.sock");
    let config = binary_config(
        dir.path(),
        "fwd: someone@elsewhere.example\n",
        &format!(
            "[delivery]\nconcurrency = 1\n[relay]\nhost = \"{}\"\n[control]\nsocket = \"{}\"\n",
            relay.local_addr().unwrap(),
            socket.display()
        ),
    );
    let served = serve(&["-c", &config], dir.path(), &[]);
    let (messages, recipients) = (60, 100);
    for _ in 0..messages {
        let mut client = Client::connect(served.addr);
        assert_eq!(client.reply().code, 220);
        client.cmd("HELO client");
        client.cmd("MAIL FROM:<sender@example.org>");
        for n in 0..recipients {
            let rcpt = format!("fwd+a-rather-long-extension-for-a-long-listing-{n}@example.org");
            assert_eq!(client.cmd(&format!("RCPT TO:<{rcpt}>")).code, 250);
        }
        assert_eq!(client.cmd("DATA").code, 354);
        client.send(b"Subject: listed\r\n\r\nx\r\n.\r\n");
        assert_eq!(client.reply().code, 250);
        client.cmd("QUIT");
    }
    // More messages than the node lists at a time (256): one reply, made
    // of several batches.
    let small = 250;
    let mut client = Client::connect(served.addr);
    assert_eq!(client.reply().code, 220);
    client.cmd("HELO client");
    for _ in 0..small {
        assert_eq!(client.cmd("MAIL FROM:<sender@example.org>").code, 250);
        assert_eq!(client.cmd("RCPT TO:<fwd@example.org>").code, 250);
        assert_eq!(client.cmd("DATA").code, 354);
        client.send(b"Subject: small\r\n\r\nx\r\n.\r\n");
        assert_eq!(client.reply().code, 250);
    }
    client.cmd("QUIT");
    let messages = messages + small;

    // The whole queue in one reply, and then page by page: every message
    // once, in order, the last page saying no more follow.
    let full = control_request(&socket, r#"{"cmd":"queue.list"}"#);
    let all: Vec<String> = full["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(all.len(), messages);
    assert!(
        full.get("more").is_none(),
        "an unpaged listing has no 'more'"
    );
    let full_size = serde_json::to_vec(&full).unwrap().len();
    assert!(
        full_size > 1_000_000,
        "a listing of {full_size} bytes is too small to tell"
    );
    let mut paged = Vec::new();
    let mut after = None::<String>;
    loop {
        let request = match &after {
            Some(id) => format!(r#"{{"cmd":"queue.list","limit":7,"after":"{id}"}}"#),
            None => r#"{"cmd":"queue.list","limit":7}"#.to_string(),
        };
        let page = control_request(&socket, &request);
        let ids: Vec<String> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        assert!(ids.len() <= 7);
        paged.extend(ids.iter().cloned());
        if page["more"] == false {
            break;
        }
        assert_eq!(page["more"], true);
        after = ids.last().cloned();
        assert!(paged.len() <= messages, "paging does not end");
    }
    assert_eq!(paged, all, "every message once, in order");
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, all, "listed in id order, each once");
    // The same through `mailnode ctl`, which says how to ask for the rest.
    let page = Command::new(BIN)
        .args(["ctl", "--control"])
        .arg(&socket)
        .args(["queue", "--limit", "7"])
        .output()
        .unwrap();
    assert!(page.status.success(), "{page:?}");
    let printed = String::from_utf8_lossy(&page.stdout);
    assert!(
        printed.contains(&format!("mailnode ctl queue --limit 7 --after {}", all[6])),
        "{printed}"
    );
    let zero = control_request(&socket, r#"{"cmd":"queue.list","limit":0}"#);
    assert_eq!(
        zero["ok"], false,
        "a page of nothing would never end: {zero}"
    );

    // Clients that pipeline listings and never read: each holds one reply
    // being written, never one per request, and past the bound a client is
    // told to try again.
    let before = proc_status_kib(served.child.id(), "VmRSS");
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Past what the socket holds: a refused client has hung up.
        let _ = stream.write_all(
            &br#"{"cmd":"queue.list"}
"#
            .repeat(20),
        );
        clients.push(stream);
    }
    let mut refused = 0;
    for stream in &mut clients {
        let mut start = [0u8; 64];
        stream.read_exact(&mut start).unwrap();
        if start.starts_with(br#"{"ok":false,"error":"too many control clients"#) {
            refused += 1;
        } else {
            assert!(start.starts_with(br#"{"ok":true,"data":["#));
        }
    }
    assert_eq!(refused, 4, "16 clients at once, the rest refused");
    let mut most = before;
    for _ in 0..20 {
        most = most.max(proc_status_kib(served.child.id(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let grew_mib = (most.saturating_sub(before)) / 1024;
    // Before, each such client held its whole reply, and its JSON tree:
    // 16 x about ten times the listing's size.
    assert!(
        grew_mib < 24,
        "16 clients that never read grew the node by {grew_mib} MiB (a listing is {full_size} bytes)"
    );
    drop(clients);
    drop(relay);
}

/// A preload library that makes every fsync and fdatasync of the process
/// wait `SLOW_FSYNC_MS` first: a disk busy with other writers.
fn slow_fsync_library(dir: &Path) -> String {
    let source = dir.join("slow_fsync.c");
    write(
        &source,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>
static void wait_like_a_busy_disk(void) {
    const char *ms = getenv("SLOW_FSYNC_MS");
    long n = ms ? atol(ms) : 0;
    struct timespec left = { n / 1000, (n % 1000) * 1000000L };
    int saved = errno;
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {}
    errno = saved;
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_like_a_busy_disk();
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_like_a_busy_disk();
    return real(fd);
}
"#,
    );
    let library = dir.join("slow_fsync.so");
    // `cc` is there wherever Rust links.
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("cc runs");
    assert!(built.success(), "cannot build the slow-fsync library");
    library.display().to_string()
}

#[test]
fn memory_stays_bounded_when_fsync_is_slow() {
    let (dir, _outbox) = shared_tempdir();
    let library = slow_fsync_library(dir.path());
    // Every delivery fails for now: each of the 100 results per message is
    // an envelope update waiting for the slow disk.
    let flag = dir.path().join("failing");
    write(&flag, "");
    let program = write(
        &dir.path().join("program"),
        &format!(
            "#!/bin/sh\ncat > /dev/null\ntest -e {} && exit 75\nexit 0\n",
            flag.display()
        ),
    );
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = dir.path().join("ctl.sock");
    let config = binary_config(
        dir.path(),
        &format!("ops: |{program}\n"),
        &format!("[control]\nsocket = \"{}\"\n", socket.display()),
    );
    let served = serve(
        &["-c", &config],
        dir.path(),
        &[("LD_PRELOAD", &library), ("SLOW_FSYNC_MS", "20")],
    );
    let pid = served.child.id();
    let start = proc_status_kib(pid, "VmRSS");
    let (messages, recipients) = (40, 100);
    let mut peak = start;
    for _ in 0..messages {
        let mut client = Client::connect(served.addr);
        assert_eq!(client.reply().code, 220);
        client.cmd("HELO client");
        let mail = client.cmd("MAIL FROM:<sender@example.org>");
        assert_eq!(
            mail.code, 250,
            "intake refused: the spool fell behind: {mail:?}"
        );
        for n in 0..recipients {
            assert_eq!(client.cmd(&format!("RCPT TO:<ops+{n}@x.test>")).code, 250);
        }
        assert_eq!(client.cmd("DATA").code, 354);
        client.send(b"Subject: burst\r\n\r\nx\r\n.\r\n");
        assert_eq!(client.reply().code, 250);
        client.cmd("QUIT");
        peak = peak.max(proc_status_kib(pid, "VmRSS"));
    }
    // Until every first attempt is recorded.
    let deferred = wait_for(Duration::from_secs(120), || {
        peak = peak.max(proc_status_kib(pid, "VmRSS"));
        let status = control_request(&socket, r#"{"cmd":"status"}"#);
        (status["data"]["queue"]["deferred"] == messages).then_some(())
    });
    assert!(deferred.is_some(), "the first attempts were never recorded");
    let grew_mib = (peak - start) / 1024;
    // Before, every result queued a copy of its 100-recipient envelope
    // for the disk: about 5 MiB per message, 200 MiB here.
    assert!(
        grew_mib < 32,
        "{messages} messages of {recipients} recipients on a slow disk grew the node by {grew_mib} MiB"
    );

    // The programs work again: on the same slow disk the queue drains.
    // (That the free heap is then given back is memory.rs's test: at this
    // size it is within the noise of a debug build.)
    std::fs::remove_file(&flag).unwrap();
    let flushed = control_request(&socket, r#"{"cmd":"queue.flush"}"#);
    assert_eq!(flushed["ok"], true, "{flushed}");
    let drained = wait_for(Duration::from_secs(120), || {
        let status = control_request(&socket, r#"{"cmd":"status"}"#);
        let queue = &status["data"]["queue"];
        (queue["active"] == 0 && queue["deferred"] == 0 && queue["held"] == 0).then_some(())
    });
    assert!(drained.is_some(), "the queue never drained");
    eprintln!(
        "RSS: {start} KiB at start, {peak} KiB at most, {} KiB drained",
        proc_status_kib(pid, "VmRSS")
    );
}

#[test]
fn the_start_up_line_says_where_everything_is_and_a_refused_recipient_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(&dir.path().join("aliases"), "known: |cat > /dev/null\n");
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!(
            "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n[control]\nsocket = \"{}\"\n",
            dir.path().join("spool").display(),
            dir.path().join("ctl.sock").display()
        ),
    );
    let served = serve(&["-c", &config], dir.path(), &[]);
    // The first line says where everything is.
    let started = served
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains(" started"))
        .cloned()
        .expect("a start-up line");
    for (what, path) in [
        ("config", config.clone()),
        ("aliases", aliases.clone()),
        ("spool", dir.path().join("spool").display().to_string()),
        ("control", dir.path().join("ctl.sock").display().to_string()),
    ] {
        assert!(
            started.contains(&format!("{what}={path}")),
            "{what}: {started}"
        );
    }
    assert!(started.contains("metrics=http://127.0.0.1:"), "{started}");
    let mut client = Client::connect(served.addr);
    client.reply();
    client.cmd("EHLO client.example");
    client.cmd("MAIL FROM:<alice@example.org>");
    let r = client.cmd("RCPT TO:<Nobody@example.org>");
    assert!(r.is(550, "5.1.1"), "{r:?}");
    client.cmd("QUIT");
    let line = wait_for(Duration::from_secs(10), || {
        served
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("recipient refused"))
            .cloned()
    })
    .expect("no log line for the refused recipient");
    assert!(
        line.contains("Nobody@example.org")
            && line.contains("550 5.1.1")
            && line.contains("127.0.0.1"),
        "{line}"
    );
}

#[test]
fn a_start_up_error_names_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = write(&dir.path().join("aliases"), "known: |cat > /dev/null\n");
    // The control socket's directory is a regular file.
    let not_a_directory = write(&dir.path().join("plain-file"), "");
    let config = write(
        &dir.path().join("mailnode.toml"),
        &format!(
            "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{aliases}\"\n[spool]\npath = \"{}\"\n[control]\nsocket = \"{not_a_directory}/ctl.sock\"\n[metrics]\nlisten = \"off\"\n",
            dir.path().join("spool").display()
        ),
    );
    let out = Command::new(BIN)
        .args(["serve", "-c", &config])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    let line = said
        .lines()
        .find(|l| l.starts_with("mailnode: "))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains("cannot create control socket"), "{line}");
    assert_eq!(line.matches("(os error ").count(), 1, "{line}");
}

#[test]
fn ctl_with_no_server_says_which_socket_it_tried_and_how_to_name_another() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ctl", "status"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no server answers at ")
            && said.contains("that socket comes from ")
            && said.contains("-c FILE")
            && said.contains("--control PATH"),
        "{said}"
    );
    if !Path::new("/etc/mailnode/mailnode.toml").exists() {
        assert!(said.contains("at var/run/mailnode.sock"), "{said}");
        assert!(said.contains("the built-in default"), "{said}");
    }
}

#[test]
fn every_manual_page_renders_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let out = mailnode(&["man", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for expected in [
        "mailnode.8",
        "mailnode-serve.8",
        "mailnode-check.8",
        "mailnode-inetd.8",
        "mailnode-runq.8",
        "mailnode-ctl.8",
        "mailnode-send.8",
        "mailnode-man.8",
        "mailnode-completions.8",
        "mailnode.toml.5",
        "mailnode-aliases.5",
    ] {
        assert!(
            pages.iter().any(|p| p == expected),
            "{expected} not in {pages:?}"
        );
    }
    for page in &pages {
        // `MANWIDTH=80 man -l PAGE 2>&1 >/dev/null`: every warning of
        // groff and man, and nothing else.
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join(page))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "")
            .stdout(Stdio::null())
            .output()
            .expect("man runs (Debian's man-db)");
        assert!(out.status.success(), "{page}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.trim().is_empty(), "{page}:\n{said}");
    }
    // The file formats are the docs' text.
    let aliases = std::fs::read_to_string(dir.path().join("mailnode-aliases.5")).unwrap();
    assert!(aliases.contains(".SH KINDS OF TARGET"), "{aliases}");
}

#[test]
fn bash_completes_ctl_qu_to_queue() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("mailnode.bash");
    let out = mailnode(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; _mailnode mailnode '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display(),
                words.join(" "),
                words.len() - 1,
                words[words.len() - 1],
                words[words.len() - 2],
            ))
            .output()
            .expect("bash runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(complete("mailnode ctl qu").trim(), "queue");
    let top = complete("mailnode se");
    assert!(
        top.lines().any(|l| l == "serve") && top.lines().any(|l| l == "send"),
        "{top}"
    );
    // zsh and fish get scripts too.
    for shell in ["zsh", "fish"] {
        let out = mailnode(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("mailnode"));
    }
}

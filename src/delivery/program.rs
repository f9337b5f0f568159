//! Running an alias's program: `/bin/sh -c COMMAND` with a clean environment,
//! in its own process group, as an unprivileged user when we are root, fed
//! the message on stdin, killed (with everything it started) at the timeout.
//! Its exit status becomes a [`DeliveryStatus`]. The program is started by
//! the [`ProgramSpawner`] chosen at start-up; whichever it is, all of this
//! works the same over it (see [`super::spawn`]).
//!
//! A command the shell would only split into words (an absolute program
//! path and arguments free of quotes, variables, globs, redirections and
//! the like, see [`plain_argv`]) is executed directly, as the shell would
//! have executed it: starting a shell costs as much as starting the program
//! itself. Postfix's local(8) does the same.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::spawn::{ProgramSpawner, SpawnSpec, Spawner};
use crate::sysexits::{EX_CONFIG, EX_OSERR, EX_TEMPFAIL, EX_USAGE};

/// Most of a program's output we keep for the log and the bounce.
pub const OUTPUT_LIMIT: usize = 1024;
/// The `PATH` programs get.
pub const PROGRAM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// After the program exits, how long we still collect output that it (or a
/// child holding its pipe) had written.
const OUTPUT_GRACE: Duration = Duration::from_millis(100);

use super::status::{DeliveryStatus, EnhancedCode};

/// The user programs run as when mailnode runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Why the delivery user cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error("delivery user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("delivery user {0:?} has uid 0 or gid 0; programs never run as root")]
    Privileged(String),
    #[error("cannot look up delivery user {0:?}: {1}")]
    Lookup(String, String),
}

impl RunAs {
    /// Whom programs should run as: `None` when we are not root (programs
    /// run as we do); else `[delivery] user`, refused if it is privileged.
    pub fn for_delivery_user(user: &str) -> Result<Option<RunAs>, RunAsError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let found = nix::unistd::User::from_name(user)
            .map_err(|e| RunAsError::Lookup(user.to_string(), e.to_string()))?
            .ok_or_else(|| RunAsError::NoSuchUser(user.to_string()))?;
        if found.uid.is_root() || found.gid.as_raw() == 0 {
            return Err(RunAsError::Privileged(user.to_string()));
        }
        Ok(Some(RunAs {
            name: found.name,
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
            home: found.dir,
        }))
    }
}

/// One program to run.
#[derive(Debug, Clone)]
pub struct ProgramRequest {
    pub command: String,
    /// The contract's variables (`SENDER`, `RECIPIENT`, ...).
    pub env: Vec<(String, String)>,
    pub run_as: Option<RunAs>,
    /// What starts the program (chosen once at start-up).
    pub spawner: ProgramSpawner,
    pub timeout: Duration,
    /// `Return-Path:` and `Delivered-To:` lines, written before the body.
    pub stdin_prefix: Vec<u8>,
    /// The spooled message (LF line ends), copied to stdin after the prefix.
    pub body_path: PathBuf,
    /// How much of that file is the message ([`Envelope::body_len`](crate::spool::Envelope::body_len)).
    pub body_len: Option<u64>,
}

/// How the program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Status(ExitStatus),
    TimedOut,
    SpawnFailed(String),
    /// The queued message could not be read to the program.
    InputFailed(String),
}

/// What running the program gave.
#[derive(Debug, Clone)]
pub struct ProgramOutcome {
    pub exit: Exit,
    /// The first [`OUTPUT_LIMIT`] bytes of stdout and stderr.
    pub output: Vec<u8>,
}

impl ProgramOutcome {
    /// The contract's mapping of the outcome.
    pub fn status(&self) -> DeliveryStatus {
        classify(&self.exit, &self.output)
    }
}

/// Exit 0: delivered. 75, 71, a signal, the timeout, a failure to start and
/// anything outside 64-78: temporary. The rest of 64-78: permanent.
pub fn classify(exit: &Exit, output: &[u8]) -> DeliveryStatus {
    let said = String::from_utf8_lossy(output).trim().to_string();
    let with_output = |what: String| {
        if said.is_empty() {
            what
        } else {
            format!("{what}: {said}")
        }
    };
    match exit {
        Exit::TimedOut => DeliveryStatus::system_temporary(with_output("program timed out".into())),
        Exit::SpawnFailed(e) => {
            DeliveryStatus::system_temporary(format!("cannot run program: {e}"))
        }
        Exit::InputFailed(e) => DeliveryStatus::system_temporary(e.clone()),
        Exit::Status(status) => {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(0), _) => DeliveryStatus::DELIVERED,
                (Some(code), _)
                    if code == i32::from(EX_TEMPFAIL) || code == i32::from(EX_OSERR) =>
                {
                    DeliveryStatus::system_temporary(with_output(format!("program exited {code}")))
                }
                (Some(code), _) if (i32::from(EX_USAGE)..=i32::from(EX_CONFIG)).contains(&code) => {
                    DeliveryStatus::Permanent(
                        EnhancedCode::PROGRAM_REFUSED,
                        with_output(format!("program exited {code}")),
                    )
                }
                (Some(code), _) => {
                    DeliveryStatus::system_temporary(with_output(format!("program exited {code}")))
                }
                (None, Some(sig)) => DeliveryStatus::system_temporary(with_output(format!(
                    "program killed by signal {sig}"
                ))),
                (None, None) => {
                    DeliveryStatus::system_temporary(with_output("program ended oddly".into()))
                }
            }
        }
    }
}

/// The words of a command that `/bin/sh -c` would run as one program with
/// no interpretation beyond splitting at blanks: the first word an absolute
/// path (no builtin, no `PATH` search, no assignment), every byte a letter,
/// digit, blank or one of `/ . _ - + , : @ % =`.
pub fn plain_argv(command: &str) -> Option<Vec<&str>> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b" \t/._-+,:@%=".contains(&b);
    if !command.bytes().all(plain) {
        return None;
    }
    let words: Vec<&str> = command
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    words.first().filter(|w| w.starts_with('/'))?;
    Some(words)
}

/// The user mailnode itself runs as, for HOME, USER and LOGNAME when
/// programs run as that user (looked up once: /etc/passwd is not read per
/// delivery).
fn own_user() -> Option<&'static nix::unistd::User> {
    static OWN_USER: std::sync::OnceLock<Option<nix::unistd::User>> = std::sync::OnceLock::new();
    OWN_USER
        .get_or_init(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
        })
        .as_ref()
}

/// The program, its arguments and its whole environment.
/// `direct`: run a plain command without the shell.
fn spawn_spec(request: &ProgramRequest, direct: bool) -> std::io::Result<SpawnSpec> {
    let words = plain_argv(&request.command).filter(|_| direct);
    let (program, args) = match words {
        Some(words) => (words[0], words[1..].to_vec()),
        None => ("/bin/sh", vec!["-c", request.command.as_str()]),
    };
    let mut env: Vec<(&str, &str)> = request
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.extend([
        ("PATH", PROGRAM_PATH),
        ("SHELL", "/bin/sh"),
        ("LANG", "C.UTF-8"),
    ]);
    let home;
    let credentials = match &request.run_as {
        Some(user) => {
            home = user.home.to_string_lossy();
            env.extend([
                ("HOME", home.as_ref()),
                ("USER", user.name.as_str()),
                ("LOGNAME", user.name.as_str()),
            ]);
            Some((user.uid, user.gid))
        }
        None => {
            if let Some(me) = own_user() {
                home = me.dir.to_string_lossy();
                env.extend([
                    ("HOME", home.as_ref()),
                    ("USER", me.name.as_str()),
                    ("LOGNAME", me.name.as_str()),
                ]);
            }
            None
        }
    };
    SpawnSpec::new(program, args, env, credentials)
}

/// Runs the program to its end or its timeout.
pub async fn run(request: &ProgramRequest) -> ProgramOutcome {
    let failed = |exit| ProgramOutcome {
        exit,
        output: Vec::new(),
    };
    // Open the message before the program starts: a program must never
    // exit 0 on an empty stdin because we could not read the queue file.
    let body = match super::open_message(&request.body_path, request.body_len) {
        Ok(f) => f,
        Err(e) => return failed(Exit::InputFailed(e.to_string())),
    };
    let body = std::io::Read::take(body, request.body_len.unwrap_or(u64::MAX));
    // Starting counts against the timeout too (an exec can hang on a dead
    // network file system).
    let started_in_time = tokio::time::timeout(request.timeout, async {
        let spawned = request.spawner.spawn(spawn_spec(request, true)?).await;
        match spawned {
            // A script without a #! line: the shell would have run it as a
            // shell script, so let it.
            Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
                request.spawner.spawn(spawn_spec(request, false)?).await
            }
            other => other,
        }
    })
    .await;
    let mut child = match started_in_time {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return failed(Exit::SpawnFailed(e.to_string())),
        Err(_) => return failed(Exit::TimedOut),
    };
    let mut group = GroupGuard(Some(nix::unistd::Pid::from_raw(child.pid())));
    let feed = feed_stdin(
        child.stdin.take(),
        request.stdin_prefix.clone(),
        body,
        request.body_len,
    );
    let mut output_pipe = child.output.take();
    let mut output = Vec::new();
    let mut input_failure = None;

    let waited = tokio::time::timeout(request.timeout, async {
        let wait = child.wait();
        tokio::pin!(wait);
        tokio::pin!(feed);
        let mut feeding = true;
        loop {
            tokio::select! {
                status = &mut wait => return status,
                fed = &mut feed, if feeding => {
                    feeding = false;
                    if let Err(e) = fed {
                        // The program got a truncated message: whatever it
                        // says now, this attempt has not delivered.
                        input_failure = Some(e);
                        group.kill();
                    }
                }
                chunk = read_some(&mut output_pipe), if output_pipe.is_some() => keep(&mut output, &chunk),
            }
        }
    })
    .await;

    let exit = match waited {
        Ok(Ok(status)) => {
            // Reaped: the group id may now be reused; never signal it again.
            // Children it left behind may go on (like Postfix's pipe).
            group.disarm();
            // Output written just before exit may still be in the pipes.
            let _ = tokio::time::timeout(OUTPUT_GRACE, async {
                while output_pipe.is_some() {
                    let chunk = read_some(&mut output_pipe).await;
                    keep(&mut output, &chunk);
                }
            })
            .await;
            match input_failure {
                Some(e) => Exit::InputFailed(e),
                None => Exit::Status(status),
            }
        }
        Ok(Err(e)) => Exit::SpawnFailed(e.to_string()),
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            group.disarm();
            Exit::TimedOut
        }
    };
    ProgramOutcome { exit, output }
}

/// The program's process group, killed whole if the attempt is abandoned
/// (timeout, a dropped future at shutdown) before the program was reaped.
struct GroupGuard(Option<nix::unistd::Pid>);

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads one chunk from a pipe; clears the pipe at EOF. Everything is read,
/// even past the limit, so a chatty program never blocks on a full pipe.
async fn read_some<R: tokio::io::AsyncRead + Unpin>(pipe: &mut Option<R>) -> Vec<u8> {
    let Some(reader) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    let mut buf = vec![0u8; 8192];
    match reader.read(&mut buf).await {
        Ok(0) | Err(_) => {
            *pipe = None;
            Vec::new()
        }
        Ok(n) => {
            buf.truncate(n);
            buf
        }
    }
}

/// Keeps output up to [`OUTPUT_LIMIT`].
fn keep(output: &mut Vec<u8>, chunk: &[u8]) {
    let room = OUTPUT_LIMIT.saturating_sub(output.len());
    output.extend_from_slice(&chunk[..chunk.len().min(room)]);
}

/// Writes the prefix and the body to the program. A program that stops
/// reading (or never starts) is not an error here: its exit status decides.
/// Failing to read the queued message is: the program got less than the mail.
async fn feed_stdin(
    stdin: Option<tokio::net::unix::pipe::Sender>,
    prefix: Vec<u8>,
    mut body: impl std::io::Read,
    expected_len: Option<u64>,
) -> Result<(), String> {
    let Some(mut stdin) = stdin else {
        return Ok(());
    };
    if stdin.write_all(&prefix).await.is_err() {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut fed = 0u64;
    loop {
        // The message was just written or is small: it reads from the page
        // cache, quicker than a hop to a blocking thread would be.
        let n = std::io::Read::read(&mut body, &mut buf)
            .map_err(|e| format!("cannot read queued message: {e}"))?;
        if n == 0 {
            break;
        }
        fed += n as u64;
        if stdin.write_all(&buf[..n]).await.is_err() {
            return Ok(());
        }
    }
    if let Some(expected) = expected_len.filter(|&len| fed < len) {
        return Err(super::UnreadableMessage::Short { len: fed, expected }.to_string());
    }
    let _ = stdin.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> Exit {
        Exit::Status(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn exit_status_mapping_follows_the_contract() {
        assert_eq!(classify(&exited(0), b""), DeliveryStatus::DELIVERED);
        for temp in [75, 71, 1, 2, 63, 79, 126, 127, 255] {
            assert!(
                matches!(classify(&exited(temp), b""), DeliveryStatus::Temporary(..)),
                "exit {temp}"
            );
        }
        for perm in [64, 65, 66, 67, 68, 69, 70, 72, 73, 74, 76, 77, 78] {
            assert!(
                matches!(classify(&exited(perm), b""), DeliveryStatus::Permanent(..)),
                "exit {perm}"
            );
        }
        let killed = Exit::Status(ExitStatus::from_raw(9));
        assert!(matches!(
            classify(&killed, b""),
            DeliveryStatus::Temporary(..)
        ));
        assert!(matches!(
            classify(&Exit::TimedOut, b""),
            DeliveryStatus::Temporary(..)
        ));
        assert!(matches!(
            classify(&Exit::SpawnFailed("x".into()), b""),
            DeliveryStatus::Temporary(..)
        ));
    }

    #[test]
    fn diagnostics_carry_the_programs_words() {
        assert_eq!(
            classify(&exited(67), b"no such user\n"),
            DeliveryStatus::Permanent(
                EnhancedCode::PROGRAM_REFUSED,
                "program exited 67: no such user".into()
            )
        );
    }

    fn request(command: &str, body: &std::path::Path, timeout: Duration) -> ProgramRequest {
        ProgramRequest {
            command: command.into(),
            env: vec![("SENDER".into(), "s@example.org".into())],
            run_as: None,
            spawner: crate::delivery::spawn::choose(crate::config::SpawnerChoice::Auto).unwrap(),
            timeout,
            stdin_prefix: b"Return-Path: <s@example.org>\n".to_vec(),
            body_path: body.to_path_buf(),
            body_len: None,
        }
    }

    #[tokio::test]
    async fn program_gets_stdin_env_and_its_output_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"Subject: t\n\nhi\n").unwrap();
        let out = dir.path().join("out");
        let cmd = format!(
            "cat > {}; echo \"$SENDER:$PATH\"; head -c 5000 /dev/zero | tr '\\0' x",
            out.display()
        );
        let outcome = run(&request(&cmd, &body, Duration::from_secs(10))).await;
        assert_eq!(outcome.status(), DeliveryStatus::DELIVERED);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"Return-Path: <s@example.org>\nSubject: t\n\nhi\n".to_vec()
        );
        assert!(outcome
            .output
            .starts_with(format!("s@example.org:{PROGRAM_PATH}\n").as_bytes()));
        assert_eq!(outcome.output.len(), OUTPUT_LIMIT);
    }

    #[tokio::test]
    async fn a_queue_file_feeds_only_its_message_and_a_short_one_never_delivers() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        // The message, then what a sealed queue file goes on with.
        std::fs::write(&body, b"Subject: t\n\nhi\nMNQE-envelope-and-trailer").unwrap();
        let out = dir.path().join("out");
        let cmd = format!("cat > {}", out.display());
        let mut sealed = request(&cmd, &body, Duration::from_secs(10));
        sealed.body_len = Some(15);
        assert_eq!(run(&sealed).await.status(), DeliveryStatus::DELIVERED);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"Return-Path: <s@example.org>\nSubject: t\n\nhi\n".to_vec()
        );
        // Shorter than its envelope says (damage): not delivered, and the
        // program never started.
        std::fs::remove_file(&out).unwrap();
        sealed.body_len = Some(1000);
        let outcome = run(&sealed).await;
        assert!(!out.exists(), "the program ran on a cut message");
        assert!(
            matches!(&outcome.exit, Exit::InputFailed(e) if e.contains("of its 1000 bytes")),
            "{:?}",
            outcome.exit
        );
        assert!(matches!(outcome.status(), DeliveryStatus::Temporary(..)));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"x\n").unwrap();
        let pidfile = dir.path().join("child.pid");
        // A child in the background that would outlive its parent.
        let cmd = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let outcome = run(&request(&cmd, &body, Duration::from_millis(300))).await;
        assert_eq!(outcome.exit, Exit::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background child got SIGKILL too (it may linger as a zombie
        // of init for a moment; poll until it is gone or a zombie).
        let mut gone = false;
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "background child {pid} survived the timeout");
    }

    #[tokio::test]
    async fn an_unreadable_message_is_a_temporary_failure_and_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let cmd = format!("cat > /dev/null; touch {}", marker.display());
        let outcome = run(&request(
            &cmd,
            &dir.path().join("gone"),
            Duration::from_secs(10),
        ))
        .await;
        assert!(
            matches!(outcome.status(), DeliveryStatus::Temporary(_, ref why) if why.contains("gone")),
            "{:?}",
            outcome.status()
        );
        assert!(!marker.exists(), "the program ran without its message");
    }

    #[tokio::test]
    async fn a_flood_of_output_is_read_and_dropped_past_1_kib() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"x\n").unwrap();
        let outcome = run(&request(
            "cat > /dev/null; head -c 100000000 /dev/zero | tr '\\0' y",
            &body,
            Duration::from_secs(60),
        ))
        .await;
        assert_eq!(outcome.status(), DeliveryStatus::DELIVERED);
        assert_eq!(outcome.output.len(), OUTPUT_LIMIT);
    }

    #[tokio::test]
    async fn a_child_left_behind_does_not_hold_up_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"x\n").unwrap();
        // The orphan keeps stdout open for 30 s; the result comes at once.
        let started = std::time::Instant::now();
        let outcome = run(&request(
            "cat > /dev/null; (sleep 30; echo late) & echo done",
            &body,
            Duration::from_secs(60),
        ))
        .await;
        assert_eq!(outcome.status(), DeliveryStatus::DELIVERED);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(String::from_utf8_lossy(&outcome.output).contains("done"));
    }

    #[tokio::test]
    async fn a_missing_or_unexecutable_program_is_a_temporary_failure() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"x\n").unwrap();
        let script = dir.path().join("not-executable");
        std::fs::write(&script, b"#!/bin/sh\nexit 0\n").unwrap();
        // Both ways of starting: directly, and through the shell (the
        // redirection makes it a shell command).
        for command in [
            "/nonexistent/program".to_string(),
            script.display().to_string(),
            "/nonexistent/program 2>&1".to_string(),
            format!("{} 2>&1", script.display()),
        ] {
            let outcome = run(&request(&command, &body, Duration::from_secs(10))).await;
            assert!(
                matches!(outcome.status(), DeliveryStatus::Temporary(..)),
                "{command}: {:?}",
                outcome.status()
            );
        }
    }

    #[tokio::test]
    async fn a_program_that_ignores_stdin_is_judged_by_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, vec![b'a'; 1 << 20]).unwrap();
        let outcome = run(&request("exit 0", &body, Duration::from_secs(10))).await;
        assert_eq!(outcome.status(), DeliveryStatus::DELIVERED);
        let outcome = run(&request("exit 67", &body, Duration::from_secs(10))).await;
        assert!(matches!(outcome.status(), DeliveryStatus::Permanent(..)));
    }

    #[test]
    fn only_commands_the_shell_would_just_split_run_without_it() {
        assert_eq!(
            plain_argv("/opt/rt5/bin/rt-mailgate --queue support --action correspond --url http://localhost/"),
            Some(vec![
                "/opt/rt5/bin/rt-mailgate",
                "--queue",
                "support",
                "--action",
                "correspond",
                "--url",
                "http://localhost/"
            ])
        );
        assert_eq!(
            plain_argv(" /usr/bin/env  a=b\tuser@example.org,100% "),
            Some(vec!["/usr/bin/env", "a=b", "user@example.org,100%"])
        );
        for needs_a_shell in [
            "",
            "cat > /tmp/x",
            "exit 75",
            "true",
            "FOO=1 /usr/bin/env",
            "/bin/echo $HOME",
            "/bin/echo ~",
            "/bin/echo *",
            "/bin/echo ?",
            "/bin/echo [ab]",
            "/bin/echo {a,b}",
            "/bin/a; /bin/b",
            "/bin/a | /bin/b",
            "/bin/a && /bin/b",
            "/bin/a &",
            "/bin/echo 'q'",
            "/bin/echo \"q\"",
            "/bin/echo `id`",
            "/bin/echo a\\ b",
            "/bin/echo #x",
            "/bin/echo !x",
            "/bin/echo (x)",
            "/bin/a\n/bin/b",
            "/bin/a < /etc/passwd",
            "/bin/\u{e9}cho",
        ] {
            assert_eq!(plain_argv(needs_a_shell), None, "{needs_a_shell:?}");
        }
    }

    #[tokio::test]
    async fn a_plain_command_runs_without_a_shell_with_its_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"x\n").unwrap();
        let printed = run(&request(
            "/usr/bin/printf %s,%s, a=b --x",
            &body,
            Duration::from_secs(10),
        ))
        .await;
        assert_eq!(printed.status(), DeliveryStatus::DELIVERED);
        assert_eq!(printed.output, b"a=b,--x,");
        // No variable a shell sets (PWD, SHLVL) may be in the environment.
        let env = run(&request("/usr/bin/env", &body, Duration::from_secs(10))).await;
        let env = String::from_utf8_lossy(&env.output).into_owned();
        assert!(env.contains("SENDER=s@example.org\n"), "{env}");
        assert!(!env.contains("PWD="), "a shell ran: {env}");
        assert!(!env.contains("SHLVL="), "a shell ran: {env}");
    }

    #[tokio::test]
    async fn a_script_without_an_interpreter_line_runs_as_the_shell_would() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        std::fs::write(&body, b"x\n").unwrap();
        let script = dir.path().join("no-shebang");
        std::fs::write(&script, b"echo ran as a shell script; exit 0\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let command = script.display().to_string();
        assert!(plain_argv(&command).is_some());
        let outcome = run(&request(&command, &body, Duration::from_secs(10))).await;
        assert_eq!(outcome.status(), DeliveryStatus::DELIVERED);
        assert_eq!(outcome.output, b"ran as a shell script\n");
    }
}

/// The same deliveries through both spawners, as production makes them (as
/// the delivery user when the tests run as root): what the programs saw
/// and how their ends were read must not tell the spawners apart.
#[cfg(test)]
mod both_spawners {
    use super::*;
    use crate::config::SpawnerChoice;
    use crate::delivery::spawn::{self, ProcessSpawner};

    /// The clone spawner as `[delivery] spawner = "clone"` gets it, and the
    /// fallback.
    fn spawners() -> [ProgramSpawner; 2] {
        [
            spawn::choose(SpawnerChoice::Clone).unwrap(),
            ProgramSpawner::Process(ProcessSpawner),
        ]
    }

    struct Setup {
        dir: tempfile::TempDir,
        body: PathBuf,
        run_as: Option<RunAs>,
    }

    fn setup(body: &[u8]) -> Setup {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // The delivery user must reach the scripts some tests put here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let body_path = dir.path().join("body");
        std::fs::write(&body_path, body).unwrap();
        Setup {
            dir,
            body: body_path,
            run_as: RunAs::for_delivery_user("nobody").unwrap(),
        }
    }

    impl Setup {
        fn request(
            &self,
            command: &str,
            spawner: ProgramSpawner,
            timeout: Duration,
        ) -> ProgramRequest {
            ProgramRequest {
                command: command.into(),
                env: vec![
                    ("SENDER".into(), "s@example.org".into()),
                    ("RECIPIENT".into(), "r@example.org".into()),
                ],
                run_as: self.run_as.clone(),
                spawner,
                timeout,
                stdin_prefix: b"Return-Path: <s@example.org>\n".to_vec(),
                body_path: self.body.clone(),
                body_len: None,
            }
        }

        /// `command` through each spawner: (clone's outcome, the fallback's).
        async fn run_both(
            &self,
            command: &str,
            timeout: Duration,
        ) -> (ProgramOutcome, ProgramOutcome) {
            let [clone, process] = spawners();
            let by_clone = run(&self.request(command, clone, timeout)).await;
            let by_process = run(&self.request(command, process, timeout)).await;
            (by_clone, by_process)
        }

        /// Runs `command` through both, asserts they saw and ended alike,
        /// and returns what they printed.
        async fn same_through_both(&self, command: &str) -> String {
            let (clone, process) = self.run_both(command, Duration::from_secs(20)).await;
            assert_eq!(
                String::from_utf8_lossy(&clone.output),
                String::from_utf8_lossy(&process.output),
                "{command}: the spawners' programs printed differently"
            );
            assert_eq!(clone.exit, process.exit, "{command}");
            assert_eq!(clone.status(), process.status(), "{command}");
            String::from_utf8_lossy(&clone.output).into_owned()
        }
    }

    #[tokio::test]
    async fn the_same_environment_in_the_same_order() {
        let s = setup(b"x\n");
        let env = s.same_through_both("/usr/bin/env").await;
        let mut names: Vec<&str> = env
            .lines()
            .map(|l| l.split('=').next().unwrap_or_default())
            .collect();
        names.sort_unstable();
        let mut expected = vec!["HOME", "LANG", "PATH", "RECIPIENT", "SENDER", "SHELL"];
        if s.run_as.is_some() || own_user().is_some() {
            expected.extend(["LOGNAME", "USER"]);
        }
        expected.sort_unstable();
        assert_eq!(names, expected, "{env}");
        // Through the shell too, which adds its own (PWD) alike.
        s.same_through_both("env | sort").await;
    }

    #[tokio::test]
    async fn the_same_user_groups_limits_signals_and_directory() {
        let s = setup(b"x\n");
        s.same_through_both("/usr/bin/id").await;
        let seen = s
            .same_through_both(
                "umask; pwd; ulimit -n; ulimit -Hn; \
                 grep -E '^(Uid|Gid|Groups|SigBlk|SigIgn|Cap(Inh|Prm|Eff|Amb)|NoNewPrivs):' /proc/self/status",
            )
            .await;
        if let Some(user) = &s.run_as {
            let uid = user.uid;
            let gid = user.gid;
            assert!(
                seen.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n")),
                "{seen}"
            );
            assert!(
                seen.contains(&format!("Gid:\t{gid}\t{gid}\t{gid}\t{gid}\n")),
                "{seen}"
            );
            let groups = seen.lines().find(|l| l.starts_with("Groups:"));
            assert_eq!(groups.map(str::trim), Some("Groups:"), "{seen}");
            assert!(seen.contains("CapEff:\t0000000000000000\n"), "{seen}");
        }
        assert!(seen.contains("SigBlk:\t0000000000000000\n"), "{seen}");
        // mailnode ignores SIGPIPE (as every Rust program does); a program
        // must not. (glibc refuses to touch signals 32 and 33, which it
        // keeps for itself: whatever mailnode got there, programs get.)
        let ignored = seen
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .and_then(|mask| u64::from_str_radix(mask, 16).ok());
        assert_eq!(ignored.map(|mask| mask & 0x7fff_ffff), Some(0), "{seen}");
    }

    #[tokio::test]
    async fn the_same_stdin() {
        // Every byte value, lines of all kinds, and more than a pipe holds.
        let mut body: Vec<u8> = (0..=255u8).collect();
        body.extend_from_slice(b"\r\n.\n\nFrom x\n");
        while body.len() < 300_000 {
            body.extend_from_within(..1000.min(body.len()));
        }
        let s = setup(&body);
        let mut expected = b"Return-Path: <s@example.org>\n".to_vec();
        expected.extend_from_slice(&body);
        let expected_path = s.dir.path().join("expected");
        std::fs::write(&expected_path, &expected).unwrap();
        let sum = std::process::Command::new("/usr/bin/sha256sum")
            .arg(&expected_path)
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&sum.stdout);
        let sum = sum.split_whitespace().next().unwrap();
        for command in ["/usr/bin/sha256sum", "cat | /usr/bin/sha256sum"] {
            let seen = s.same_through_both(command).await;
            assert_eq!(seen, format!("{sum}  -\n"), "{command}");
        }
    }

    #[tokio::test]
    async fn the_same_argv_direct_through_the_shell_and_for_a_script_without_interpreter() {
        use std::os::unix::fs::PermissionsExt;
        let s = setup(b"x\n");
        assert_eq!(
            s.same_through_both("/usr/bin/cat /proc/self/cmdline").await,
            "/usr/bin/cat\0/proc/self/cmdline\0"
        );
        assert_eq!(
            s.same_through_both("/usr/bin/printf [%s] a=b --x user@example.org,100%")
                .await,
            "[a=b][--x][user@example.org,100%]"
        );
        let piped = "cat > /dev/null; echo one; echo two | tr a-z A-Z; cat /proc/$$/cmdline";
        assert_eq!(
            s.same_through_both(piped).await,
            format!("one\nTWO\n/bin/sh\0-c\0{piped}\0")
        );
        // A plain command that turns out to be a script with no #! line.
        let script = s.dir.path().join("no-interpreter");
        std::fs::write(&script, b"cat /proc/$$/cmdline; echo \" $0 $#\"\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let command = format!("{} one two", script.display());
        assert!(plain_argv(&command).is_some());
        s.same_through_both(&command).await;
    }

    #[tokio::test]
    async fn the_same_exit_mapping() {
        let s = setup(b"x\n");
        let cases = [
            ("exit 0", DeliveryStatus::DELIVERED),
            (
                "echo busy; exit 75",
                DeliveryStatus::system_temporary("program exited 75: busy"),
            ),
            (
                "echo no such user; exit 67",
                DeliveryStatus::Permanent(
                    EnhancedCode::PROGRAM_REFUSED,
                    "program exited 67: no such user".into(),
                ),
            ),
            (
                "kill -KILL $$",
                DeliveryStatus::system_temporary("program killed by signal 9"),
            ),
        ];
        for (command, expected) in cases {
            s.same_through_both(command).await;
            let (clone, _) = s.run_both(command, Duration::from_secs(20)).await;
            assert_eq!(clone.status(), expected, "{command}");
        }
        let (clone, process) = s.run_both("sleep 60", Duration::from_millis(300)).await;
        for outcome in [clone, process] {
            assert_eq!(outcome.exit, Exit::TimedOut);
            assert_eq!(
                outcome.status(),
                DeliveryStatus::system_temporary("program timed out")
            );
        }
    }

    /// Live (not zombie) processes in process group `pgid`.
    fn live_members(pgid: i32) -> Vec<i32> {
        let mut live = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // After the command name: state, ppid, pgrp.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z") {
                live.push(pid);
            }
        }
        live
    }

    #[tokio::test]
    async fn the_timeout_kills_the_whole_group() {
        let s = setup(b"x\n");
        let [clone, process] = spawners();
        for spawner in [clone, process] {
            let request = s.request(
                "sleep 60 & echo $$; wait",
                spawner,
                Duration::from_millis(500),
            );
            let outcome = run(&request).await;
            assert_eq!(outcome.exit, Exit::TimedOut, "{spawner}");
            let pgid: i32 = String::from_utf8_lossy(&outcome.output)
                .trim()
                .parse()
                .unwrap();
            let mut live = live_members(pgid);
            for _ in 0..100 {
                if live.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                live = live_members(pgid);
            }
            assert!(
                live.is_empty(),
                "{spawner}: {live:?} of group {pgid} survived"
            );
        }
    }
}

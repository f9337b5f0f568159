//! Starting a program: in a new process group (its pid is the group's id,
//! so a timeout can kill everything it started), with exactly the
//! environment it is given, as the delivery user when we are root, with the
//! open-file limit mailnode started with, default signal dispositions and
//! an empty signal mask, one pipe as its stdin and one as both its stdout
//! and its stderr (one pipe, so the output keeps the order it was written
//! in). Its working directory and umask are mailnode's.
//!
//! Two [`Spawner`]s do that:
//!
//! - [`CloneSpawner`] starts programs at `posix_spawn`'s cost with
//!   `clone(CLONE_VM | CLONE_VFORK)` and raw system calls in the child
//!   (`clone.rs` says why: a fork of a multi-threaded server is dear, and
//!   measured it was most of mailnode's CPU per delivery). It needs Linux on
//!   a target whose credential system calls take 32-bit ids, and a kernel
//!   and seccomp filter that allow that `clone` and `pidfd_open` (Linux
//!   5.3; container runtimes whose seccomp profile predates `pidfd_open`
//!   refuse it with EPERM).
//! - [`ProcessSpawner`] uses `tokio::process::Command`, which forks: dearer
//!   per program, but it works wherever the standard library can start a
//!   process.
//!
//! `[delivery] spawner` picks one. "auto", the default, probes the clone
//! spawner once at start-up (a child that exits at once, through the same
//! system calls) and takes the process spawner if the probe fails; see
//! [`choose`]. The tests in `program.rs` run the same deliveries through
//! both and compare what the programs saw and how their ends were read.

// The child changes its credentials with raw system calls; on 32-bit x86
// and ARM SYS_setresuid and friends take 16-bit ids, and a uid of 65536
// would become root: those targets get only the process spawner.
#[cfg(all(
    target_os = "linux",
    not(any(target_arch = "x86", target_arch = "arm"))
))]
mod clone;
mod process;

#[cfg(all(
    target_os = "linux",
    not(any(target_arch = "x86", target_arch = "arm"))
))]
pub use clone::CloneSpawner;
pub use process::ProcessSpawner;

use std::ffi::CString;
use std::future::Future;
use std::io;
use std::process::ExitStatus;

use tokio::net::unix::pipe;

use crate::config::SpawnerChoice;

/// The open-file soft limit mailnode started with, restored in programs
/// (0: never raised, nothing to restore). A program should not inherit the
/// raised limit: tools that close every descriptor up to the limit would
/// crawl, and select() users can break.
static PROGRAM_OPEN_FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises this process's soft open-file limit to the hard one (a server
/// holding thousands of connections needs it; systemd's default soft limit
/// is 1024) while programs keep the limit mailnode started with. Returns
/// the soft limit now in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on local structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        let original = limit.rlim_cur;
        if original < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            PROGRAM_OPEN_FILES.store(original, std::sync::atomic::Ordering::Relaxed);
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// The soft open-file limit to give a program (0: leave it).
fn program_open_files() -> libc::rlim_t {
    PROGRAM_OPEN_FILES.load(std::sync::atomic::Ordering::Relaxed)
}

/// What to run and how.
pub struct SpawnSpec {
    /// Absolute path of the program.
    pub program: CString,
    /// The program's arguments, its name first.
    pub argv: Vec<CString>,
    /// `NAME=value` strings: the whole environment.
    pub env: Vec<CString>,
    /// uid and gid to become, dropping supplementary groups (we are root).
    pub credentials: Option<(u32, u32)>,
}

impl SpawnSpec {
    /// Builds a spec; fails on a NUL byte in any string.
    pub fn new<'a>(
        program: &str,
        args: impl IntoIterator<Item = &'a str>,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        credentials: Option<(u32, u32)>,
    ) -> io::Result<SpawnSpec> {
        let c = |s: &[u8]| {
            CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
        };
        let program = c(program.as_bytes())?;
        let mut argv = vec![program.clone()];
        for a in args {
            argv.push(c(a.as_bytes())?);
        }
        let mut vars = Vec::new();
        for (k, v) in env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            vars.push(c(&kv)?);
        }
        Ok(SpawnSpec {
            program,
            argv,
            env: vars,
            credentials,
        })
    }
}

/// Starts programs.
pub trait Spawner {
    /// Starts the program as the module comment says. Fails, with no child
    /// left behind, if it could not be executed (`ENOEXEC` included, so
    /// the caller decides whether a shell should run it).
    fn spawn(&self, spec: SpawnSpec) -> impl Future<Output = io::Result<Spawned>> + Send;
}

/// A running program: its stdin, its stdout and stderr (one pipe, in the
/// order written), and its exit. Dropped unreaped (its attempt abandoned;
/// the caller has killed its group), it is reaped in the background: no
/// zombies.
pub struct Spawned {
    pid: i32,
    pub stdin: Option<pipe::Sender>,
    pub output: Option<pipe::Receiver>,
    exit: ExitWatch,
}

/// How each spawner learns that its program ended.
enum ExitWatch {
    #[cfg(all(
        target_os = "linux",
        not(any(target_arch = "x86", target_arch = "arm"))
    ))]
    Pidfd(clone::Reaper),
    Child(tokio::process::Child),
}

impl Spawned {
    /// The program's pid, which is also its process group's id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the program to end and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.exit {
            #[cfg(all(
                target_os = "linux",
                not(any(target_arch = "x86", target_arch = "arm"))
            ))]
            ExitWatch::Pidfd(reaper) => reaper.wait().await,
            ExitWatch::Child(child) => child.wait().await,
        }
    }
}

/// The spawner in use, chosen once at start-up by [`choose`]. An enum, not
/// a trait object: starting a program through it costs no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramSpawner {
    #[cfg(all(
        target_os = "linux",
        not(any(target_arch = "x86", target_arch = "arm"))
    ))]
    Clone(CloneSpawner),
    Process(ProcessSpawner),
}

impl ProgramSpawner {
    /// Its name, as `[delivery] spawner` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            #[cfg(all(
                target_os = "linux",
                not(any(target_arch = "x86", target_arch = "arm"))
            ))]
            ProgramSpawner::Clone(_) => SpawnerChoice::Clone.as_str(),
            ProgramSpawner::Process(_) => SpawnerChoice::Process.as_str(),
        }
    }
}

impl std::fmt::Display for ProgramSpawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Spawner for ProgramSpawner {
    async fn spawn(&self, spec: SpawnSpec) -> io::Result<Spawned> {
        match self {
            #[cfg(all(
                target_os = "linux",
                not(any(target_arch = "x86", target_arch = "arm"))
            ))]
            ProgramSpawner::Clone(spawner) => spawner.spawn(spec).await,
            ProgramSpawner::Process(spawner) => spawner.spawn(spec).await,
        }
    }
}

/// Why programs cannot be started the way the configuration asks.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    #[error("delivery.spawner = \"clone\", but clone(CLONE_VM | CLONE_VFORK) cannot start programs here ({0}); use \"auto\" or \"process\"")]
    CloneUnavailable(io::Error),
}

/// The spawner `[delivery] spawner` asks for, told in the log. The one
/// place the choice is made: `serve`, `runq` and `inetd` call it at start.
pub fn choose(choice: SpawnerChoice) -> Result<ProgramSpawner, SpawnerError> {
    choose_with(choice, probe_clone)
}

/// [`choose`], with the clone spawner's probe given (tests make it fail).
fn choose_with(
    choice: SpawnerChoice,
    probe_clone: impl FnOnce() -> io::Result<ProgramSpawner>,
) -> Result<ProgramSpawner, SpawnerError> {
    let spawner = match choice {
        SpawnerChoice::Process => ProgramSpawner::Process(ProcessSpawner),
        SpawnerChoice::Clone => probe_clone().map_err(SpawnerError::CloneUnavailable)?,
        SpawnerChoice::Auto => probe_clone().unwrap_or_else(|e| {
            tracing::warn!(
                error = %e,
                "clone(CLONE_VM | CLONE_VFORK) cannot start programs here; \
                 each program costs a fork (set [delivery] spawner = \"process\" to say so)"
            );
            ProgramSpawner::Process(ProcessSpawner)
        }),
    };
    tracing::info!(spawner = %spawner, configured = %choice, "program spawner");
    Ok(spawner)
}

#[cfg(all(
    target_os = "linux",
    not(any(target_arch = "x86", target_arch = "arm"))
))]
fn probe_clone() -> io::Result<ProgramSpawner> {
    CloneSpawner::probe().map(ProgramSpawner::Clone)
}

#[cfg(not(all(
    target_os = "linux",
    not(any(target_arch = "x86", target_arch = "arm"))
)))]
fn probe_clone() -> io::Result<ProgramSpawner> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the clone spawner is built only for Linux on targets with 32-bit ids",
    ))
}

/// In a child about to exec: every signal's default action, then the
/// empty mask a program expects. mailnode's handlers, and anything it
/// ignores or blocks, are nothing a program should inherit. System calls
/// only (both spawners call it where nothing else is allowed).
///
/// # Safety
/// Only in a child between its creation and `execve`.
unsafe fn default_signals() {
    // SAFETY: system calls on local structs, in a child of our own.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=last_signal() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn last_signal() -> libc::c_int {
    libc::SIGRTMAX()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn last_signal() -> libc::c_int {
    // The BSDs and macOS number their signals below 32.
    31
}

/// In a child about to exec: the open-file soft limit `limit` (0: leave
/// it), never above the hard one. System calls only.
///
/// # Safety
/// Only in a child between its creation and `execve`.
unsafe fn restore_open_files(limit: libc::rlim_t) {
    if limit == 0 {
        return;
    }
    // SAFETY: system calls on a local struct, in a child of our own.
    unsafe {
        let mut current: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) == 0 {
            current.rlim_cur = limit.min(current.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn spec(program: &str, args: &[&str]) -> SpawnSpec {
        SpawnSpec::new(program, args.iter().copied(), [("PATH", "/bin")], None).unwrap()
    }

    /// Every spawner this build has, each probed as start-up would.
    fn spawners() -> Vec<ProgramSpawner> {
        let mut all = vec![ProgramSpawner::Process(ProcessSpawner)];
        if let Ok(clone) = probe_clone() {
            all.insert(0, clone);
        }
        all
    }

    async fn output_of(child: &mut Spawned) -> String {
        drop(child.stdin.take());
        let mut output = String::new();
        child
            .output
            .take()
            .unwrap()
            .read_to_string(&mut output)
            .await
            .unwrap();
        output
    }

    #[tokio::test]
    async fn a_failed_exec_is_an_error_not_a_child() {
        for spawner in spawners() {
            let err = spawner
                .spawn(spec("/nonexistent/program", &[]))
                .await
                .err()
                .unwrap();
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{spawner}");
        }
    }

    #[tokio::test]
    async fn a_script_without_an_interpreter_line_is_left_to_the_caller() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("no-interpreter");
        std::fs::write(&script, b"exit 0\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = script.to_str().unwrap();
        for spawner in spawners() {
            let err = spawner.spawn(spec(script, &[])).await.err();
            let errno = err.as_ref().and_then(io::Error::raw_os_error);
            assert_eq!(errno, Some(libc::ENOEXEC), "{spawner}: {err:?}");
        }
    }

    #[tokio::test]
    async fn exit_status_and_output_come_back() {
        for spawner in spawners() {
            let mut child = spawner
                .spawn(spec("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"]))
                .await
                .unwrap();
            assert_eq!(output_of(&mut child).await, "out\nerr\n", "{spawner}");
            assert_eq!(child.wait().await.unwrap().code(), Some(3), "{spawner}");
        }
    }

    #[tokio::test]
    async fn programs_keep_the_open_file_limit_mailnode_started_with() {
        let before = {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a plain system call on a local struct.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
            limit
        };
        let now = raise_open_file_limit().unwrap();
        assert_eq!(now, before.rlim_max);
        for spawner in spawners() {
            let mut child = spawner
                .spawn(spec("/bin/sh", &["-c", "ulimit -n"]))
                .await
                .unwrap();
            let output = output_of(&mut child).await;
            assert_eq!(child.wait().await.unwrap().code(), Some(0), "{spawner}");
            assert_eq!(output.trim(), before.rlim_cur.to_string(), "{spawner}");
        }
    }

    #[tokio::test]
    async fn a_program_dropped_unwaited_is_reaped() {
        for spawner in spawners() {
            let child = spawner.spawn(spec("/bin/sleep", &["0"])).await.unwrap();
            let proc_entry = format!("/proc/{}", child.pid());
            drop(child);
            let mut reaped = false;
            for _ in 0..500 {
                if !std::path::Path::new(&proc_entry).exists() {
                    reaped = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(reaped, "{spawner}: {proc_entry} is still there: a zombie");
        }
    }

    #[test]
    fn auto_takes_the_process_spawner_when_the_clone_probe_fails() {
        for errno in [libc::ENOSYS, libc::EPERM] {
            let chosen = choose_with(SpawnerChoice::Auto, || {
                Err(io::Error::from_raw_os_error(errno))
            });
            assert_eq!(chosen.unwrap(), ProgramSpawner::Process(ProcessSpawner));
        }
    }

    #[test]
    fn asking_for_clone_where_it_cannot_work_is_an_error() {
        let chosen = choose_with(SpawnerChoice::Clone, || {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        });
        let err = chosen.unwrap_err();
        assert!(
            err.to_string().starts_with("delivery.spawner = \"clone\""),
            "{err}"
        );
    }

    #[test]
    fn asking_for_process_never_probes() {
        let chosen = choose_with(SpawnerChoice::Process, || panic!("probed"));
        assert_eq!(chosen.unwrap(), ProgramSpawner::Process(ProcessSpawner));
    }

    #[cfg(all(
        target_os = "linux",
        not(any(target_arch = "x86", target_arch = "arm"))
    ))]
    #[test]
    fn auto_takes_clone_where_it_works() {
        let chosen = choose(SpawnerChoice::Auto).unwrap();
        assert!(matches!(chosen, ProgramSpawner::Clone(_)), "{chosen}");
        assert_eq!(chosen.name(), "clone");
        assert_eq!(choose(SpawnerChoice::Clone).unwrap(), chosen);
    }
}

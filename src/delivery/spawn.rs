//! Starting a program at `posix_spawn`'s cost.
//!
//! `std::process::Command` (and tokio's, built on it) falls back to `fork`
//! as soon as a uid, a gid or a process group must be set, and a fork of a
//! multi-threaded server is dear: every page of the parent is made
//! copy-on-write, which flushes the TLB of each CPU running one of its
//! threads (an inter-processor interrupt, a VM exit under a hypervisor),
//! and the parent then faults on its own pages. Measured with `perf`, that
//! was most of mailnode's CPU per delivery. So programs are started the way
//! glibc's `posix_spawn` does it: `clone(CLONE_VM | CLONE_VFORK)` runs the
//! child on the parent's memory, with its own small stack, while the
//! calling thread waits until the child has called `execve` (or failed).
//!
//! The child may only make system calls on data prepared beforehand: no
//! allocation, no lock, nothing another thread of ours could hold. The
//! credential changes are raw system calls, because glibc's `setuid` would
//! ask every thread of the process (which here would be our parent's
//! threads) to change theirs too.

// The child changes its credentials with raw system calls; on these
// targets SYS_setresuid and friends take 16-bit ids, and a uid of 65536
// would become root.
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
compile_error!(
    "spawn.rs uses the 32-bit-id credential system calls; port it to the *32 calls first"
);

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

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

/// A running program: its stdin, its stdout and stderr (one pipe, in the
/// order written), and its exit.
pub struct Spawned {
    pid: libc::pid_t,
    pub stdin: Option<pipe::Sender>,
    pub output: Option<pipe::Receiver>,
    exited: Option<AsyncFd<OwnedFd>>,
}

impl Spawned {
    /// The program's pid, which is also its process group's id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the program to end and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let Some(exited) = self.exited.as_ref() else {
            return Err(io::Error::other("program already reaped"));
        };
        loop {
            let mut ready = exited.readable().await?;
            match reap(self.pid, false)? {
                Some(status) => {
                    self.exited = None;
                    return Ok(status);
                }
                None => ready.clear_ready(),
            }
        }
    }
}

impl Drop for Spawned {
    /// A program dropped unreaped (its attempt abandoned; the caller has
    /// killed its group) is reaped in the background: no zombies.
    fn drop(&mut self) {
        let Some(exited) = self.exited.take() else {
            return;
        };
        let pid = self.pid;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = exited.readable().await;
                    let _ = reap(pid, false);
                });
            }
            Err(_) => {
                let _ = reap(pid, true);
            }
        }
    }
}

/// Kills an unreaped child and its group: the child itself too, in case it
/// has already left its group (setsid) and would otherwise live on.
fn kill_unreaped(pid: libc::pid_t) {
    // SAFETY: plain system calls; the pid is our child, not yet reaped, so
    // neither it nor its group id can have been reused.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// `waitpid` on our child; `None` while it runs (when not blocking).
fn reap(pid: libc::pid_t, block: bool) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: plain system call on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        match r {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Everything the child reads, prepared by the parent.
#[repr(C)]
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    output: RawFd,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    /// The soft open-file limit to give the program (0: leave it).
    open_files: libc::rlim_t,
    /// Set by the child if it fails before `execve` succeeds.
    errno: libc::c_int,
}

/// The child's stack: it only makes system calls.
const CHILD_STACK: usize = 32 * 1024;

/// A program started, not yet tied to an async runtime. Dropped without
/// [`Started::register`], it kills the program's group and reaps it.
struct Started {
    child: Unclaimed,
    stdin: OwnedFd,
    output: OwnedFd,
    exited: OwnedFd,
}

impl Started {
    /// Hands the pipes and the exit to the current tokio runtime.
    fn register(mut self) -> io::Result<Spawned> {
        let Some(pid) = self.child.0.take() else {
            return Err(io::Error::other("program already handed over"));
        };
        let mut spawned = Spawned {
            pid,
            stdin: None,
            output: None,
            exited: None,
        };
        let kill = |e: io::Error| {
            kill_unreaped(pid);
            e
        };
        // SAFETY: an OwnedFd keeps its descriptor open, and the same, until
        // the AsyncFd that owns it is dropped.
        let exited =
            unsafe { AsyncFd::register_with_interest(self.exited, tokio::io::Interest::READABLE) };
        match exited {
            Ok(exited) => spawned.exited = Some(exited),
            Err(e) => {
                let e = kill(e.into());
                let _ = reap(pid, true);
                return Err(e);
            }
        }
        // From here a failure drops `spawned`, which reaps the child.
        spawned.stdin = Some(pipe::Sender::from_owned_fd(self.stdin).map_err(kill)?);
        spawned.output = Some(pipe::Receiver::from_owned_fd(self.output).map_err(kill)?);
        Ok(spawned)
    }
}

/// A child no [`Spawned`] has taken charge of yet.
struct Unclaimed(Option<libc::pid_t>);

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            kill_unreaped(pid);
            let _ = reap(pid, true);
        }
    }
}

type SpawnJob = (SpawnSpec, tokio::sync::oneshot::Sender<io::Result<Started>>);

/// Threads programs are started from. A vfork'd child borrows its parent
/// thread until it has exec'd, which on a busy machine takes a millisecond
/// or more: these threads wait, not the event loops serving SMTP sessions,
/// and several of them, so one slow exec does not hold up the next.
const SPAWNER_THREADS: usize = 4;

fn spawner() -> Option<&'static crossbeam_channel::Sender<SpawnJob>> {
    static SPAWNER: std::sync::OnceLock<Option<crossbeam_channel::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (jobs, queue) = crossbeam_channel::unbounded::<SpawnJob>();
            let mut started = 0;
            for n in 0..SPAWNER_THREADS {
                let queue = queue.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("program-spawn-{n}"))
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        for (spec, reply) in queue {
                            // If the asker is gone, the program is dropped:
                            // killed and reaped.
                            let _ = reply.send(start(&spec));
                        }
                    });
                started += usize::from(thread.is_ok());
            }
            (started > 0).then_some(jobs)
        })
        .as_ref()
}

/// Starts the program in its own process group with the pipes as its
/// standard input, output and error.
pub async fn spawn(spec: SpawnSpec) -> io::Result<Spawned> {
    let started = match spawner() {
        Some(jobs) => {
            let (reply, answer) = tokio::sync::oneshot::channel();
            jobs.send((spec, reply))
                .map_err(|_| io::Error::other("program spawner thread is gone"))?;
            answer
                .await
                .map_err(|_| io::Error::other("program spawner thread is gone"))??
        }
        // No thread could be made: start it here.
        None => start(&spec)?,
    };
    started.register()
}

fn start(spec: &SpawnSpec) -> io::Result<Started> {
    let (stdin_read, stdin_write) = pipe_pair()?;
    let (output_read, output_write) = pipe_pair()?;
    let argv: Vec<*const libc::c_char> = spec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = spec
        .env
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut plan = ChildPlan {
        program: spec.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdin: stdin_read.as_raw_fd(),
        output: output_write.as_raw_fd(),
        credentials: spec.credentials,
        open_files: PROGRAM_OPEN_FILES.load(std::sync::atomic::Ordering::Relaxed),
        errno: 0,
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: the stack grows down from its (16-byte aligned) end; it and
    // the plan outlive the child's use of them, since CLONE_VFORK holds this
    // thread until the child has exec'd or exited. All signals are blocked
    // around the clone so no handler of ours runs in the child before it
    // resets them.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK);
        let top = top.sub(top as usize % 16);
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let pid = libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut plan as *mut ChildPlan).cast(),
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        if pid < 0 {
            return Err(clone_error);
        }
        pid
    };
    drop(stack);
    drop(stdin_read);
    drop(output_write);
    // SAFETY: the child wrote errno (if at all) before it exited, and has
    // stopped using the plan.
    let child_errno = unsafe { std::ptr::read_volatile(&plan.errno) };
    if child_errno != 0 {
        let _ = reap(pid, true);
        return Err(io::Error::from_raw_os_error(child_errno));
    }
    // SAFETY: a plain system call; the pid is our unreaped child, so it
    // cannot have been reused.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = io::Error::last_os_error();
        kill_unreaped(pid);
        let _ = reap(pid, true);
        return Err(e);
    }
    Ok(Started {
        child: Unclaimed(Some(pid)),
        stdin: stdin_write,
        output: output_read,
        // SAFETY: pidfd_open returned a new descriptor we own.
        exited: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
    })
}

/// Runs in the child, on the parent's memory: system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's plan, valid until we exec or exit; we
    // only make system calls on descriptors and strings it prepared.
    unsafe {
        let plan = &mut *arg.cast::<ChildPlan>();
        let fail = |plan: &mut ChildPlan| -> ! {
            plan.errno = *libc::__errno_location();
            if plan.errno == 0 {
                plan.errno = libc::EINVAL;
            }
            libc::_exit(127)
        };
        // Default dispositions, then the empty mask a program expects.
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if let Some((uid, gid)) = plan.credentials {
            let empty: *const libc::gid_t = std::ptr::null();
            if libc::syscall(libc::SYS_setgroups, 0, empty) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                fail(plan);
            }
        }
        if plan.open_files != 0 {
            let mut limit: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = plan.open_files.min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            fail(plan);
        }
        for (from, to) in [(plan.stdin, 0), (plan.output, 1), (plan.output, 2)] {
            let moved = if from == to {
                // dup2 onto itself would keep close-on-exec set.
                libc::fcntl(from, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if moved < 0 {
                fail(plan);
            }
        }
        libc::execve(plan.program, plan.argv, plan.envp);
        fail(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(program: &str, args: &[&str]) -> SpawnSpec {
        SpawnSpec::new(program, args.iter().copied(), [("PATH", "/bin")], None).unwrap()
    }

    #[tokio::test]
    async fn a_failed_exec_is_an_error_not_a_child() {
        let err = spawn(spec("/nonexistent/program", &[]))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn exit_status_and_output_come_back() {
        use tokio::io::AsyncReadExt;
        let mut child = spawn(spec("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"]))
            .await
            .unwrap();
        drop(child.stdin.take());
        let mut output = Vec::new();
        child
            .output
            .take()
            .unwrap()
            .read_to_end(&mut output)
            .await
            .unwrap();
        assert_eq!(output, b"out\nerr\n");
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn programs_keep_the_open_file_limit_mailnode_started_with() {
        use tokio::io::AsyncReadExt;
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
        let mut child = spawn(spec("/bin/sh", &["-c", "ulimit -n"])).await.unwrap();
        drop(child.stdin.take());
        let mut output = String::new();
        child
            .output
            .take()
            .unwrap()
            .read_to_string(&mut output)
            .await
            .unwrap();
        assert_eq!(child.wait().await.unwrap().code(), Some(0));
        assert_eq!(output.trim(), before.rlim_cur.to_string());
    }

    #[tokio::test]
    async fn a_program_dropped_unwaited_is_reaped() {
        let child = spawn(spec("/bin/sleep", &["0"])).await.unwrap();
        let proc_entry = format!("/proc/{}", child.pid());
        drop(child);
        for _ in 0..500 {
            if !std::path::Path::new(&proc_entry).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{proc_entry} is still there: a zombie");
    }
}

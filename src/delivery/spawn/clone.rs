//! Starting a program at `posix_spawn`'s cost.
//!
//! `std::process::Command` (and tokio's, built on it) falls back to `fork`
//! as soon as a uid, a gid or a step before `exec` is needed, and a fork of a
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

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::{
    default_signals, program_open_files, restore_open_files, ExitWatch, SpawnSpec, Spawned, Spawner,
};

/// Starts programs with `clone(CLONE_VM | CLONE_VFORK)`. Made only by
/// [`CloneSpawner::probe`], so one in hand has been seen to work here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneSpawner {
    _probed: (),
}

impl CloneSpawner {
    /// Whether this kernel and any seccomp filter let us start programs
    /// this way: a child that exits at once, started and watched through
    /// the very system calls a program's start makes (`clone` with these
    /// flags, `pidfd_open`, `waitpid`).
    pub fn probe() -> io::Result<CloneSpawner> {
        let mut stack = vec![0u8; PROBE_STACK];
        let pid = clone_vfork(exit_at_once, std::ptr::null_mut(), &mut stack)?;
        // Killed and reaped if pidfd_open is refused.
        let mut child = Unclaimed(Some(pid));
        drop(pidfd_open(pid)?);
        child.0 = None;
        reap(pid, true)?;
        Ok(CloneSpawner { _probed: () })
    }
}

impl Spawner for CloneSpawner {
    /// Starts the program in its own process group with the pipes as its
    /// standard input, output and error.
    async fn spawn(&self, spec: SpawnSpec) -> io::Result<Spawned> {
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
}

/// A started program's exit, seen through its pidfd.
pub(super) struct Reaper {
    pid: libc::pid_t,
    exited: Option<AsyncFd<OwnedFd>>,
}

impl Reaper {
    /// Waits for the program to end and reaps it.
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
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

impl Drop for Reaper {
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
        let kill = |e: io::Error| {
            kill_unreaped(pid);
            e
        };
        // SAFETY: an OwnedFd keeps its descriptor open, and the same, until
        // the AsyncFd that owns it is dropped.
        let exited =
            unsafe { AsyncFd::register_with_interest(self.exited, tokio::io::Interest::READABLE) };
        let reaper = match exited {
            Ok(exited) => Reaper {
                pid,
                exited: Some(exited),
            },
            Err(e) => {
                let e = kill(e.into());
                let _ = reap(pid, true);
                return Err(e);
            }
        };
        // From here a failure drops `reaper`, which reaps the child.
        let stdin = pipe::Sender::from_owned_fd(self.stdin).map_err(kill)?;
        let output = pipe::Receiver::from_owned_fd(self.output).map_err(kill)?;
        Ok(Spawned {
            pid,
            stdin: Some(stdin),
            output: Some(output),
            exit: ExitWatch::Pidfd(reaper),
        })
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
        open_files: program_open_files(),
        errno: 0,
    };
    let mut stack = vec![0u8; CHILD_STACK];
    let pid = clone_vfork(child_main, (&mut plan as *mut ChildPlan).cast(), &mut stack)?;
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
    let exited = match pidfd_open(pid) {
        Ok(exited) => exited,
        Err(e) => {
            kill_unreaped(pid);
            let _ = reap(pid, true);
            return Err(e);
        }
    };
    Ok(Started {
        child: Unclaimed(Some(pid)),
        stdin: stdin_write,
        output: output_read,
        exited,
    })
}

/// Runs `child(arg)` in a child on our memory and `stack`, and returns its
/// pid once it has exec'd or exited.
fn clone_vfork(
    child: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
    stack: &mut [u8],
) -> io::Result<libc::pid_t> {
    // SAFETY: the stack grows down from its (16-byte aligned) end; it and
    // `arg` outlive the child's use of them, since CLONE_VFORK holds this
    // thread until the child has exec'd or exited. All signals are blocked
    // around the clone so no handler of ours runs in the child before it
    // resets them.
    unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let pid = libc::clone(
            child,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        if pid < 0 {
            return Err(clone_error);
        }
        Ok(pid)
    }
}

/// A descriptor that becomes readable when our unreaped child `pid` ends.
fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the pid is our unreaped child, so it
    // cannot have been reused.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) })
}

/// The probe's child: it only shows that it could be started.
extern "C" fn exit_at_once(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: _exit is what a vfork'd child may call.
    unsafe { libc::_exit(0) }
}

/// The probe child's stack: it makes one system call.
const PROBE_STACK: usize = 4 * 1024;

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
        default_signals();
        if let Some((uid, gid)) = plan.credentials {
            let empty: *const libc::gid_t = std::ptr::null();
            if libc::syscall(libc::SYS_setgroups, 0, empty) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                fail(plan);
            }
        }
        restore_open_files(plan.open_files);
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

    #[test]
    fn the_probe_leaves_no_child() {
        CloneSpawner::probe().unwrap();
        // The children of this thread alone: other tests' programs are
        // started from other threads.
        let children = std::fs::read_to_string("/proc/thread-self/children").unwrap();
        assert_eq!(children.trim(), "", "the probe left a child");
    }

    /// Makes system call `nr` fail with `errno` in this thread (and only
    /// here: the filter is not synchronised to the process's other threads).
    fn refuse_in_this_thread(nr: libc::c_long, errno: libc::c_int) {
        let statement = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        };
        let filter = [
            // The system call's number is the first word of seccomp_data.
            statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
            statement(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, nr as u32, 0, 1),
            statement(
                libc::BPF_RET | libc::BPF_K,
                libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
                0,
                0,
            ),
            statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
        ];
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: prctl on a filter that outlives the call (the kernel
        // copies it); no_new_privs and the filter bind this thread only.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ),
                0,
                "{}",
                io::Error::last_os_error()
            );
        }
    }

    #[test]
    fn under_a_seccomp_filter_that_refuses_it_auto_falls_back() {
        use super::super::{choose, ProcessSpawner, ProgramSpawner};
        use crate::config::SpawnerChoice;
        // Container runtimes' older default filters (pidfd_open), and a
        // kernel or sandbox without the call.
        for (nr, errno) in [
            (libc::SYS_pidfd_open, libc::EPERM),
            (libc::SYS_pidfd_open, libc::ENOSYS),
            (libc::SYS_clone, libc::EPERM),
        ] {
            std::thread::spawn(move || {
                refuse_in_this_thread(nr, errno);
                let refused = CloneSpawner::probe().err();
                assert_eq!(refused.and_then(|e| e.raw_os_error()), Some(errno));
                assert_eq!(
                    choose(SpawnerChoice::Auto).unwrap(),
                    ProgramSpawner::Process(ProcessSpawner)
                );
                assert!(choose(SpawnerChoice::Clone).is_err());
                let children = std::fs::read_to_string("/proc/thread-self/children").unwrap();
                assert_eq!(children.trim(), "", "a refused probe left a child");
            })
            .join()
            .unwrap();
        }
    }
}

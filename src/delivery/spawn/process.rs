//! Starting a program with `tokio::process::Command`: the fallback where
//! the clone spawner cannot work (see the module above). It forks, which a
//! big multi-threaded parent pays for, but it needs nothing the standard
//! library does not.

use std::io;
use std::os::fd::OwnedFd;
use std::process::Stdio;

use tokio::net::unix::pipe;

use super::{
    default_signals, program_open_files, restore_open_files, ExitWatch, SpawnSpec, Spawned, Spawner,
};

/// Starts programs with `tokio::process::Command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessSpawner;

impl Spawner for ProcessSpawner {
    async fn spawn(&self, spec: SpawnSpec) -> io::Result<Spawned> {
        // A fork holds its thread until the child has exec'd: a blocking
        // thread waits, not the event loop serving SMTP sessions.
        tokio::task::spawn_blocking(move || start(spec))
            .await
            .map_err(|e| io::Error::other(format!("program spawner thread failed: {e}")))?
            .and_then(Started::register)
    }
}

/// A program started, its pipes not yet handed over. Dropped before
/// [`Started::register`] (the asker gave up), it kills the program's group.
struct Started {
    child: Option<tokio::process::Child>,
    pid: i32,
    stdin: Option<OwnedFd>,
    output: Option<OwnedFd>,
}

impl Started {
    fn register(mut self) -> io::Result<Spawned> {
        let (Some(child), Some(stdin), Some(output)) =
            (self.child.take(), self.stdin.take(), self.output.take())
        else {
            return Err(io::Error::other("program already handed over"));
        };
        let kill = |e: io::Error| {
            kill_group(self.pid);
            e
        };
        // A failure from here drops `child`, which tokio reaps.
        let stdin = pipe::Sender::from_owned_fd(stdin).map_err(kill)?;
        let output = pipe::Receiver::from_owned_fd(output).map_err(kill)?;
        Ok(Spawned {
            pid: self.pid,
            stdin: Some(stdin),
            output: Some(output),
            exit: ExitWatch::Child(child),
        })
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.child.is_some() {
            kill_group(self.pid);
        }
    }
}

/// Kills an unreaped child and its group: the child itself too, in case it
/// has already left its group (setsid) and would otherwise live on.
fn kill_group(pid: i32) {
    // SAFETY: plain system calls; the pid is our child, not yet reaped (its
    // tokio::process::Child is alive), so neither it nor its group id can
    // have been reused.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

fn start(spec: SpawnSpec) -> io::Result<Started> {
    let (stdin_read, stdin_write) = std::io::pipe()?;
    let (output_read, output_write) = std::io::pipe()?;
    let stderr = output_write.try_clone()?;
    let credentials = spec.credentials;
    let exec = Exec::new(spec);
    let mut command = tokio::process::Command::new(exec.program());
    command
        .stdin(Stdio::from(stdin_read))
        .stdout(Stdio::from(output_write))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(false);
    if let Some((uid, gid)) = credentials {
        // With a uid to set, the standard library empties the supplementary
        // groups before setuid but passes over an EPERM from that: the
        // child checks below.
        command.uid(uid).gid(gid);
    }
    let open_files = program_open_files();
    // SAFETY: the closure runs in the forked child before exec and makes
    // system calls only, on values made before the fork.
    unsafe {
        command.pre_exec(move || {
            if credentials.is_some() && libc::getgroups(0, std::ptr::null_mut()) != 0 {
                // Root's groups kept: refused, as the clone spawner would.
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            default_signals();
            restore_open_files(open_files);
            exec.exec()
        });
    }
    let child = command.spawn()?;
    // The child's ends of the pipes go with `command`: the program's exit
    // must close the last writer of its output.
    drop(command);
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| io::Error::other("program has no pid"))?;
    Ok(Started {
        child: Some(child),
        pid,
        stdin: Some(OwnedFd::from(stdin_write)),
        output: Some(OwnedFd::from(output_read)),
    })
}

/// The program's `execve`, made by the child itself rather than left to
/// the standard library, which would give the program a different start:
/// it calls `execvp`, whose glibc version runs a file without a `#!` line
/// through `/bin/sh` on its own (the caller's shell fallback, with
/// `/bin/sh -c`, would never see ENOEXEC), and it passes the environment
/// sorted and without repeated names. This way the program gets the very
/// argv and envp arrays the clone spawner gives it.
struct Exec {
    spec: SpawnSpec,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the CStrings of `spec`, owned alongside
// them and never changed; moving an `Exec` moves no string.
unsafe impl Send for Exec {}
// SAFETY: as for Send; nothing is written through the pointers.
unsafe impl Sync for Exec {}

impl Exec {
    fn new(spec: SpawnSpec) -> Exec {
        let pointers = |strings: &[std::ffi::CString]| {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Exec {
            argv: pointers(&spec.argv),
            envp: pointers(&spec.env),
            spec,
        }
    }

    fn program(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(self.spec.program.to_bytes())
    }

    /// Replaces the child with the program; returns only on failure.
    /// System calls only: it runs between fork and exec.
    fn exec(&self) -> io::Result<()> {
        // SAFETY: NUL-terminated strings and null-terminated arrays of
        // them, alive as long as `self`.
        unsafe {
            libc::execve(
                self.spec.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
        }
        Err(io::Error::last_os_error())
    }
}

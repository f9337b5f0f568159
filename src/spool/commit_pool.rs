//! Committing new messages: from a sealed body in `incoming/` (the body,
//! then its envelope, see `mod.rs`) to a message durable in `queue/`, on a
//! small pool of threads.
//!
//! One file and one flush round per message: the sealed file is renamed
//! into `queue/`, then it and the directory are fsynced. The file's fsync
//! commits the journal transaction that holds its blocks and the rename;
//! the directory's finds it committed. Syncing in `incoming/` first and
//! renaming after would pay a second journal commit, and a body and an
//! envelope in two files a third flush (measured on the benchmark
//! machine's ext4: 0.26 ms per message this way, 0.42 ms with two files,
//! 0.49 ms syncing before the renames).
//!
//! The price is that a power cut can leave, in `queue/`, a message whose
//! commit had not finished, so never acknowledged, with old or missing
//! bytes: its seal or envelope then no longer reads, or its body no longer
//! matches the envelope's [`BodyCheck`](super::BodyCheck), and start-up
//! after a reboot sets it aside (see `Spool::scan`). A crash of the process
//! alone cannot tear a file: what it wrote is in the page cache.
//!
//! Why a pool: an fsync mostly waits for the disk, and the file system
//! merges the fsyncs that wait together into one journal commit, so
//! concurrent sessions' commits share disk flushes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use super::writer::{sync_dir, Reply};
use super::{IncomingBody, SpoolError};

/// Enough threads for the fsyncs of a burst of sessions to wait together;
/// each is idle (blocked on a channel) when there is no mail.
const COMMIT_THREADS: usize = 4;

/// Commit threads only rename and fsync.
const COMMIT_STACK: usize = 128 * 1024;

type Task = Box<dyn FnOnce() + Send>;

/// What commits have done, for tests: that they overlap, so their fsyncs
/// can share journal commits.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Messages made durable.
    pub commits: AtomicU64,
    /// Commits under way right now.
    pub in_progress: AtomicU64,
    /// The most commits ever under way at once.
    pub most_at_once: AtomicU64,
}

/// The threads that commit new messages, and where they put them.
pub(super) struct CommitPool {
    tasks: Sender<Task>,
    queue: PathBuf,
    stats: Arc<CommitStats>,
}

impl CommitPool {
    /// Starts the pool; its threads end when the pool is dropped.
    pub(super) fn start(queue: PathBuf) -> Result<CommitPool, SpoolError> {
        let (tasks, received) = crossbeam_channel::unbounded();
        for n in 0..COMMIT_THREADS {
            let received: Receiver<Task> = received.clone();
            std::thread::Builder::new()
                .name(format!("spool-commit-{n}"))
                .stack_size(COMMIT_STACK)
                .spawn(move || {
                    while let Ok(task) = received.recv() {
                        task();
                    }
                })
                .map_err(|e| SpoolError::io("start spool commit thread", e))?;
        }
        Ok(CommitPool {
            tasks,
            queue,
            stats: Arc::new(CommitStats::default()),
        })
    }

    /// Commits queued and not yet started.
    pub(super) fn waiting(&self) -> usize {
        self.tasks.len()
    }

    #[cfg(test)]
    pub(super) fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Queues the commit of one sealed message; `reply` hears the outcome
    /// once it is durable or failed.
    pub(super) fn commit(&self, mut body: IncomingBody, reply: Reply) {
        let queue = self.queue.clone();
        let stats = Arc::clone(&self.stats);
        let task: Task = Box::new(move || {
            let at_once = stats.in_progress.fetch_add(1, Ordering::Relaxed) + 1;
            stats.most_at_once.fetch_max(at_once, Ordering::Relaxed);
            let result = commit_one(&mut body, &queue);
            if result.is_ok() {
                body.mark_committed();
                stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            stats.in_progress.fetch_sub(1, Ordering::Relaxed);
            // Uncommitted, the body removes its file from wherever the
            // commit got it to.
            drop(body);
            let _ = reply.send(result);
        });
        // A send fails only once the pool is gone, that is while the node
        // shuts down; running the task here keeps the message's fate
        // decided anyway.
        if let Err(crossbeam_channel::SendError(task)) = self.tasks.send(task) {
            task();
        }
    }
}

fn io_err(context: &str, path: &Path, e: impl Into<std::io::Error>) -> SpoolError {
    SpoolError::io(format!("{context} {}", path.display()), e.into())
}

fn commit_one(body: &mut IncomingBody, queue: &Path) -> Result<(), SpoolError> {
    let queued = queue.join(format!("{}.msg", body.id()));
    // Never over a queued message: ids restart with each process, and a
    // clock stepped back could repeat one.
    match renameat2(
        AT_FDCWD,
        &body.path,
        AT_FDCWD,
        &queued,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => {}
        // A file system without RENAME_NOREPLACE (NFS, older kernels): a
        // hard link refuses an existing name too.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            fs::hard_link(&body.path, &queued).map_err(|e| io_err("link", &queued, e))?;
            if let Err(e) = fs::remove_file(&body.path) {
                let _ = fs::remove_file(&queued);
                return Err(io_err("remove", &body.path, e));
            }
        }
        Err(e) => return Err(io_err("rename", &body.path, e)),
    }
    body.path = queued;
    body.file
        .get_ref()
        .sync_data()
        .map_err(|e| io_err("fsync", &body.path, e))?;
    sync_dir(queue)
}

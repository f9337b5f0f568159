//! The queue's bookkeeping thread: envelope updates and removals of queued
//! messages pass through here, in order, so their fsyncs never block an
//! actor's thread and a batch of them shares one directory fsync. (New
//! messages are committed by the commit pool, `commit_pool.rs`.)

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;

use super::envelope::{encode, Envelope};
use super::spare::{Disposal, Existing, Retired, Spares};
use super::SpoolError;

/// Most jobs taken into one batch: enough to share fsyncs, few enough that
/// the first waiter is not kept long.
const MAX_BATCH: usize = 256;

pub(super) type Reply = oneshot::Sender<Result<(), SpoolError>>;

/// Work for the writer thread.
pub(super) enum Job {
    /// Replace a queued message's envelope atomically.
    Update {
        envelope: Box<Envelope>,
        reply: Reply,
    },
    /// Forget a message: the queue file first, so a crash leaves at most
    /// an updated envelope without its message, which start-up removes.
    /// Answered once the directory fsync has made it durable, which may
    /// wait a little to be shared (see [`REMOVAL_SYNC_DELAY`]).
    Remove {
        id: String,
        disposal: Disposal,
        reply: Reply,
    },
}

/// How long a removal may wait for a directory fsync to share. Removals do
/// not hold anyone up (nothing is lost if one is undone by a power cut: the
/// message is delivered again), so they ride on the next update's fsync or
/// share one with the removals of the next few milliseconds, instead of
/// paying their own; at the latest this long after the first unsynced one.
pub(super) const REMOVAL_SYNC_DELAY: Duration = Duration::from_millis(50);

/// Removals made but not yet made durable by a directory fsync.
#[derive(Default)]
struct Unsynced {
    since: Option<Instant>,
    /// Their files, reusable only after that fsync.
    retired: Vec<Retired>,
    /// Their answers: a removal is reported done only once it is durable,
    /// so whoever logs "removed" says what a power cut cannot undo.
    waiting: Vec<Reply>,
}

impl Unsynced {
    /// After a successful directory fsync of `queue/`.
    fn synced(&mut self, spares: &Spares) {
        self.since = None;
        spares.release(self.retired.drain(..));
        for reply in self.waiting.drain(..) {
            let _ = reply.send(Ok(()));
        }
    }

    fn sync_now(&mut self, queue: &Path, spares: &Spares) {
        match sync_dir(queue) {
            Ok(()) => self.synced(spares),
            Err(e) => {
                tracing::error!("cannot make removals durable: {e}");
                // Try again after another delay.
                self.since = Some(Instant::now());
            }
        }
    }
}

/// Runs until every sender is gone.
pub(super) fn run(jobs: Receiver<Job>, queue: PathBuf, spares: Arc<Spares>) {
    let mut unsynced = Unsynced::default();
    loop {
        let first = match unsynced.since {
            Some(since) => {
                let left = REMOVAL_SYNC_DELAY.saturating_sub(since.elapsed());
                match jobs.recv_timeout(left) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        unsynced.sync_now(&queue, &spares);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let mut batch = vec![first];
        batch.extend(jobs.try_iter().take(MAX_BATCH - 1));
        process_batch(batch, &queue, &spares, &mut unsynced);
        // A steady stream of removals must not put the fsync off forever.
        if unsynced
            .since
            .is_some_and(|since| since.elapsed() >= REMOVAL_SYNC_DELAY)
        {
            unsynced.sync_now(&queue, &spares);
        }
    }
    if unsynced.since.is_some() {
        let result = sync_dir(&queue);
        for reply in unsynced.waiting.drain(..) {
            let _ = reply.send(result.clone());
        }
    }
}

struct Done {
    reply: Reply,
    result: Result<(), SpoolError>,
}

/// A batch of removals only leaves its directory fsync, and its answers,
/// to `unsynced`.
fn process_batch(batch: Vec<Job>, queue: &Path, spares: &Spares, unsynced: &mut Unsynced) {
    let only_removals = batch.iter().all(|job| matches!(job, Job::Remove { .. }));
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        done.push(match job {
            Job::Update { envelope, reply } => Done {
                reply,
                result: update_one(&envelope, queue, spares),
            },
            Job::Remove {
                id,
                disposal,
                reply,
            } => Done {
                reply,
                result: remove_one(&id, disposal, queue, spares, &mut unsynced.retired),
            },
        });
    }
    if only_removals {
        unsynced.since.get_or_insert_with(Instant::now);
        for d in done {
            match d.result {
                Ok(()) => unsynced.waiting.push(d.reply),
                failed => {
                    let _ = d.reply.send(failed);
                }
            }
        }
        return;
    }
    // One directory fsync makes every rename of the batch durable, and
    // every earlier removal.
    let synced = sync_dir(queue);
    if synced.is_ok() {
        unsynced.synced(spares);
    } else if !unsynced.retired.is_empty() {
        unsynced.since.get_or_insert_with(Instant::now);
    }
    for d in done {
        let result = match (&synced, d.result) {
            (Err(e), Ok(())) => Err(e.clone()),
            (_, result) => result,
        };
        let _ = d.reply.send(result);
    }
}

fn io_err(context: &str, path: &Path, e: std::io::Error) -> SpoolError {
    SpoolError::io(format!("{context} {}", path.display()), e)
}

/// Writes `bytes` as a new file at `path` (a spare when there is one),
/// not yet synced.
pub(super) fn write_fresh(
    spares: &Spares,
    path: &Path,
    bytes: &[u8],
    existing: Existing,
) -> Result<File, SpoolError> {
    let mut fresh = spares
        .create(path, existing)
        .map_err(|e| io_err("create", path, e))?;
    fresh
        .file
        .write_all(bytes)
        .map_err(|e| io_err("write", path, e))?;
    fresh
        .cut(bytes.len() as u64)
        .map_err(|e| io_err("write", path, e))?;
    Ok(fresh.file)
}

fn update_one(envelope: &Envelope, queue: &Path, spares: &Spares) -> Result<(), SpoolError> {
    let tmp = queue.join(format!("{}.env.tmp", envelope.id));
    let path = queue.join(format!("{}.env", envelope.id));
    if !queue.join(format!("{}.msg", envelope.id)).exists() {
        return Err(SpoolError::NotFound(envelope.id.clone()));
    }
    // A .tmp left by an update interrupted by a crash is overwritten.
    write_fresh(spares, &tmp, &encode(envelope), Existing::Truncate)?
        .sync_data()
        .map_err(|e| io_err("fsync", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_err("rename", &tmp, e))
}

fn remove_one(
    id: &str,
    disposal: Disposal,
    queue: &Path,
    spares: &Spares,
    retired: &mut Vec<Retired>,
) -> Result<(), SpoolError> {
    for ext in ["msg", "env"] {
        let path = queue.join(format!("{id}.{ext}"));
        let moved = spares
            .retire(&path, disposal)
            .map_err(|e| io_err("remove", &path, e))?;
        retired.extend(moved);
    }
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

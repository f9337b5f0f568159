//! The group-commit thread. Every change to `queue/` passes through here, in
//! order, so fsyncs never block an actor's thread and concurrent sessions
//! share the one directory fsync that makes a batch of renames durable.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;

use super::envelope::{encode, Envelope};
use super::spare::{Existing, Retired, Spares};
use super::{IncomingBody, SpoolError};

/// Most jobs taken into one batch: enough to share fsyncs, few enough that
/// the first waiter is not kept long.
const MAX_BATCH: usize = 256;

pub(super) type Reply = oneshot::Sender<Result<(), SpoolError>>;

/// Work for the writer thread.
pub(super) enum Job {
    /// Move a staged message (body and envelope fsynced in `incoming/`)
    /// into `queue/`.
    Commit {
        body: IncomingBody,
        envelope_path: PathBuf,
        reply: Reply,
    },
    /// Replace a queued message's envelope atomically.
    Update {
        envelope: Box<Envelope>,
        reply: Reply,
    },
    /// Forget a message: envelope first, so a crash leaves only an orphan
    /// body. Answered before the directory fsync (see
    /// [`REMOVAL_SYNC_DELAY`]).
    Remove { id: String, reply: Reply },
}

/// What the writer has done, for tests and metrics: how well concurrent
/// commits share directory fsyncs.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches, each ending in one directory fsync.
    pub batches: AtomicU64,
    /// Messages made durable.
    pub commits: AtomicU64,
}

/// How long a removal may wait for a directory fsync to share. Removals do
/// not hold anyone up (nothing is lost if one is undone by a power cut: the
/// message is delivered again), so they ride on the next commit's fsync,
/// which under load comes within milliseconds, instead of paying their own;
/// at the latest this long after the first unsynced one.
pub(super) const REMOVAL_SYNC_DELAY: Duration = Duration::from_millis(50);

/// Removals made but not yet made durable by a directory fsync.
#[derive(Default)]
struct Unsynced {
    since: Option<Instant>,
    /// Their files, reusable only after that fsync.
    retired: Vec<Retired>,
}

impl Unsynced {
    /// After a successful directory fsync of `queue/`.
    fn synced(&mut self, spares: &Spares) {
        self.since = None;
        spares.release(self.retired.drain(..));
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
pub(super) fn run(
    jobs: Receiver<Job>,
    queue: PathBuf,
    spares: Arc<Spares>,
    stats: Arc<WriterStats>,
) {
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
        process_batch(batch, &queue, &spares, &stats, &mut unsynced);
        // A steady stream of removals must not put the fsync off forever.
        if unsynced
            .since
            .is_some_and(|since| since.elapsed() >= REMOVAL_SYNC_DELAY)
        {
            unsynced.sync_now(&queue, &spares);
        }
    }
    if unsynced.since.is_some() {
        let _ = sync_dir(&queue);
    }
}

struct Done {
    reply: Reply,
    result: Result<(), SpoolError>,
    /// Files to unlink if the batch's directory fsync fails.
    undo: Vec<PathBuf>,
    committed: Option<IncomingBody>,
}

/// Counts the batch in `stats` before anyone hears the outcome. A batch of
/// removals only is answered without a directory fsync, left to `unsynced`.
fn process_batch(
    batch: Vec<Job>,
    queue: &Path,
    spares: &Spares,
    stats: &WriterStats,
    unsynced: &mut Unsynced,
) {
    let only_removals = batch.iter().all(|job| matches!(job, Job::Remove { .. }));
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        done.push(match job {
            Job::Commit {
                body,
                envelope_path,
                reply,
            } => match commit_one(&body, &envelope_path, queue) {
                Ok(undo) => Done {
                    reply,
                    result: Ok(()),
                    undo,
                    committed: Some(body),
                },
                // `body` drops here and removes its incoming files.
                Err(e) => Done {
                    reply,
                    result: Err(e),
                    undo: Vec::new(),
                    committed: None,
                },
            },
            Job::Update { envelope, reply } => Done {
                reply,
                result: update_one(&envelope, queue, spares),
                undo: Vec::new(),
                committed: None,
            },
            Job::Remove { id, reply } => Done {
                reply,
                result: remove_one(&id, queue, spares, &mut unsynced.retired),
                undo: Vec::new(),
                committed: None,
            },
        });
    }
    if only_removals {
        unsynced.since.get_or_insert_with(Instant::now);
        for d in done {
            let _ = d.reply.send(d.result);
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
    stats.batches.fetch_add(1, Ordering::Relaxed);
    if synced.is_ok() {
        let commits = done.iter().filter(|d| d.committed.is_some()).count();
        stats.commits.fetch_add(commits as u64, Ordering::Relaxed);
    }
    for mut d in done {
        if let (Err(e), Ok(())) = (&synced, &d.result) {
            for path in &d.undo {
                let _ = fs::remove_file(path);
            }
            d.result = Err(e.clone());
        }
        if let Some(mut body) = d.committed.take() {
            if d.result.is_ok() {
                body.mark_committed();
            }
        }
        let _ = d.reply.send(d.result);
    }
}

fn io_err(context: &str, path: &Path, e: std::io::Error) -> SpoolError {
    SpoolError::io(format!("{context} {}", path.display()), e)
}

pub(super) fn write_synced(
    spares: &Spares,
    path: &Path,
    bytes: &[u8],
    existing: Existing,
) -> Result<(), SpoolError> {
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
    fresh.file.sync_data().map_err(|e| io_err("fsync", path, e))
}

/// Returns the queue files to remove should the directory fsync fail.
fn commit_one(
    body: &IncomingBody,
    envelope_path: &Path,
    queue: &Path,
) -> Result<Vec<PathBuf>, SpoolError> {
    let msg_queued = queue.join(format!("{}.msg", body.id()));
    let env_queued = queue.join(format!("{}.env", body.id()));
    fs::rename(body.path(), &msg_queued).map_err(|e| io_err("rename", body.path(), e))?;
    // The envelope's rename is the commit point: a body without an envelope
    // is an orphan that start-up removes.
    if let Err(e) = fs::rename(envelope_path, &env_queued) {
        let _ = fs::remove_file(&msg_queued);
        return Err(io_err("rename", envelope_path, e));
    }
    Ok(vec![env_queued, msg_queued])
}

fn update_one(envelope: &Envelope, queue: &Path, spares: &Spares) -> Result<(), SpoolError> {
    let tmp = queue.join(format!("{}.env.tmp", envelope.id));
    let path = queue.join(format!("{}.env", envelope.id));
    if !path.exists() {
        return Err(SpoolError::NotFound(envelope.id.clone()));
    }
    // A .tmp left by an update interrupted by a crash is overwritten.
    write_synced(spares, &tmp, &encode(envelope), Existing::Truncate)?;
    fs::rename(&tmp, &path).map_err(|e| io_err("rename", &tmp, e))
}

fn remove_one(
    id: &str,
    queue: &Path,
    spares: &Spares,
    retired: &mut Vec<Retired>,
) -> Result<(), SpoolError> {
    for ext in ["env", "msg"] {
        let path = queue.join(format!("{id}.{ext}"));
        let moved = spares
            .retire(&path)
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

//! The queue's bookkeeping thread: envelope updates and removals of queued
//! messages pass through here, so their fsyncs never block an actor's
//! thread and a batch of them shares one directory fsync. (New messages
//! are committed by the commit pool, `commit_pool.rs`.)
//!
//! What waits for it is kept small whatever the disk's speed ([`Backlog`]):
//! a message's updates coalesce, since each envelope written is the whole
//! of what is known about the message and only the newest matters; and
//! removals go before updates, because until a removal is durable a power
//! cut delivers its message again.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::envelope::{encode, Envelope};
use super::spare::{Disposal, Existing, Retired, Spares};
use super::SpoolError;

/// Most removals taken into one batch: enough to share fsyncs, few enough
/// that the first waiter is not kept long.
const MAX_REMOVALS: usize = 256;

/// Most updates written in one batch. Each pays its own fdatasync, and the
/// batch's removals (and updates) are answered only after the last of
/// them: this keeps the wait of a removal behind updates short.
const MAX_UPDATES: usize = 16;

/// Past this many messages waiting for the writer (updates and removals),
/// or for the commit pool, intake waits (see [`Backlog::wait_for_room`]).
/// A waiting update holds one envelope: with 100 recipients about 30 KB.
pub(super) const INTAKE_BACKLOG_LIMIT: usize = 512;

/// How long a new transaction waits for the backlog to fall below the
/// limit before it is refused with a temporary error.
pub(super) const INTAKE_WAIT: Duration = Duration::from_secs(20);

pub(super) type Reply = oneshot::Sender<Result<(), SpoolError>>;

/// A removal waiting for the writer.
struct Removal {
    id: String,
    disposal: Disposal,
    reply: Reply,
}

/// The newest envelope of one message waiting to be written, and everyone
/// waiting on one of the updates it replaced.
struct Update {
    envelope: Box<Envelope>,
    replies: Vec<Reply>,
}

#[derive(Default)]
struct Waiting {
    removals: VecDeque<Removal>,
    updates: HashMap<String, Update>,
    /// The messages of `updates`, oldest first.
    update_order: VecDeque<String>,
    /// No more jobs will come: finish these and stop.
    closed: bool,
}

impl Waiting {
    fn len(&self) -> usize {
        self.removals.len() + self.updates.len()
    }
}

/// What waits for the writer thread, shared by every spool handle.
pub(super) struct Backlog {
    waiting: Mutex<Waiting>,
    /// Wakes the writer.
    work: Condvar,
    /// Wakes sessions waiting for room (see [`Backlog::wait_for_room`]).
    room: Notify,
    /// [`INTAKE_BACKLOG_LIMIT`] and [`INTAKE_WAIT`], smaller in tests.
    limit: AtomicUsize,
    wait_ms: AtomicU64,
    #[cfg(test)]
    held: Mutex<bool>,
    #[cfg(test)]
    released: Condvar,
}

impl Backlog {
    pub(super) fn new() -> Backlog {
        Backlog {
            waiting: Mutex::new(Waiting::default()),
            work: Condvar::new(),
            room: Notify::new(),
            limit: AtomicUsize::new(INTAKE_BACKLOG_LIMIT),
            wait_ms: AtomicU64::new(INTAKE_WAIT.as_millis() as u64),
            #[cfg(test)]
            held: Mutex::new(false),
            #[cfg(test)]
            released: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // A panic while the lock was held left the lists as they were
        // between two whole operations: keep using them.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the write of `envelope`, replacing any update of the same
    /// message still waiting; `reply` hears once this envelope, or a newer
    /// one, is durable.
    pub(super) fn update(&self, envelope: Envelope, reply: Reply) {
        let mut waiting = self.lock();
        if waiting.closed {
            // The reply drops: its waiter hears WriterGone.
            return;
        }
        match waiting.updates.get_mut(&envelope.id) {
            Some(update) => {
                *update.envelope = envelope;
                update.replies.push(reply);
            }
            None => {
                waiting.update_order.push_back(envelope.id.clone());
                waiting.updates.insert(
                    envelope.id.clone(),
                    Update {
                        envelope: Box::new(envelope),
                        replies: vec![reply],
                    },
                );
            }
        }
        drop(waiting);
        self.work.notify_one();
    }

    /// Queues the removal of a message; see [`super::Spool::remove`].
    pub(super) fn remove(&self, id: String, disposal: Disposal, reply: Reply) {
        let mut waiting = self.lock();
        if waiting.closed {
            return;
        }
        waiting.removals.push_back(Removal {
            id,
            disposal,
            reply,
        });
        drop(waiting);
        self.work.notify_one();
    }

    /// The last spool handle is gone: the writer finishes what waits, then
    /// stops.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.work.notify_one();
        // A test that failed while holding the writer must not hang in
        // the join that follows.
        #[cfg(test)]
        self.hold(false);
    }

    /// Jobs waiting for the writer (not counting the batch being written).
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(super) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Waits until `has_room` holds, re-checked whenever the writer has
    /// finished a batch or `poll` has passed (the commit pool does not
    /// notify), for at most the intake wait. False if it never held.
    pub(super) async fn wait_for_room(&self, has_room: impl Fn() -> bool) -> bool {
        // Commits finish on their own threads without telling anyone:
        // look again at least this often.
        const POLL: Duration = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.wait_ms.load(Ordering::Relaxed));
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            // Registered before looking, so a batch finishing in between
            // is not missed.
            notified.as_mut().enable();
            if has_room() {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = tokio::time::timeout((deadline - now).min(POLL), notified).await;
        }
    }

    /// Test hooks: a smaller bound, and a writer that stops before its next
    /// batch until released (a disk that does not answer).
    #[cfg(test)]
    pub(super) fn set_bound(&self, limit: usize, wait: Duration) {
        self.limit.store(limit, Ordering::Relaxed);
        self.wait_ms
            .store(wait.as_millis() as u64, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(super) fn hold(&self, held: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        self.released.notify_all();
    }

    #[cfg(test)]
    fn wait_while_held(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
    }
}

/// How long a removal may wait for a directory fsync to share. Removals do
/// not hold anyone up (nothing is lost if one is undone by a power cut: the
/// message is delivered again), so they ride on the next update's fsync or
/// share one with the removals of the next few milliseconds, instead of
/// paying their own; at the latest this long after the first unsynced one.
pub(super) const REMOVAL_SYNC_DELAY: Duration = Duration::from_millis(10);

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

/// One round of the writer: removals first.
struct Batch {
    removals: Vec<Removal>,
    updates: Vec<Update>,
}

/// Whatever ends the writer, a panic included, what waits for it hears so
/// (its reply dropped: `WriterGone`) instead of waiting for ever, and so
/// does whatever is asked of it later.
struct Stopped<'a>(&'a Backlog);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let mut waiting = self.0.lock();
        waiting.closed = true;
        waiting.removals.clear();
        waiting.updates.clear();
        waiting.update_order.clear();
        drop(waiting);
        self.0.room.notify_waiters();
    }
}

/// Runs until the backlog is closed and empty.
pub(super) fn run(backlog: Arc<Backlog>, queue: PathBuf, spares: Arc<Spares>) {
    let _stopped = Stopped(&backlog);
    let mut unsynced = Unsynced::default();
    while let Some(batch) = next_batch(&backlog, &mut unsynced, &queue, &spares) {
        process_batch(batch, &queue, &spares, &mut unsynced);
        // A steady stream of removals must not put the fsync off forever.
        if unsynced
            .since
            .is_some_and(|since| since.elapsed() >= REMOVAL_SYNC_DELAY)
        {
            unsynced.sync_now(&queue, &spares);
        }
        backlog.room.notify_waiters();
    }
    if unsynced.since.is_some() {
        let result = sync_dir(&queue);
        for reply in unsynced.waiting.drain(..) {
            let _ = reply.send(result.clone());
        }
    }
}

/// Waits for work, making removals durable when their delay is up; None
/// once the backlog is closed and everything in it written.
fn next_batch(
    backlog: &Backlog,
    unsynced: &mut Unsynced,
    queue: &Path,
    spares: &Spares,
) -> Option<Batch> {
    let mut waiting = backlog.lock();
    loop {
        let work = !waiting.removals.is_empty() || !waiting.update_order.is_empty();
        #[cfg(test)]
        if work && *backlog.held.lock().unwrap() {
            drop(waiting);
            backlog.wait_while_held();
            waiting = backlog.lock();
            continue;
        }
        if work {
            let removals = waiting.removals.len().min(MAX_REMOVALS);
            let removals = waiting.removals.drain(..removals).collect();
            let mut updates = Vec::new();
            while updates.len() < MAX_UPDATES {
                let Some(id) = waiting.update_order.pop_front() else {
                    break;
                };
                updates.extend(waiting.updates.remove(&id));
            }
            return Some(Batch { removals, updates });
        }
        if waiting.closed {
            return None;
        }
        waiting = match unsynced.since {
            Some(since) => {
                let left = REMOVAL_SYNC_DELAY.saturating_sub(since.elapsed());
                if left.is_zero() {
                    drop(waiting);
                    unsynced.sync_now(queue, spares);
                    backlog.lock()
                } else {
                    backlog
                        .work
                        .wait_timeout(waiting, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            }
            None => backlog
                .work
                .wait(waiting)
                .unwrap_or_else(|e| e.into_inner()),
        };
    }
}

/// A batch of removals only leaves its directory fsync, and its answers,
/// to `unsynced`.
fn process_batch(batch: Batch, queue: &Path, spares: &Spares, unsynced: &mut Unsynced) {
    let mut removed = Vec::with_capacity(batch.removals.len());
    for removal in batch.removals {
        let result = remove_one(
            &removal.id,
            removal.disposal,
            queue,
            spares,
            &mut unsynced.retired,
        );
        removed.push((removal.reply, result));
    }
    if batch.updates.is_empty() {
        unsynced.since.get_or_insert_with(Instant::now);
        for (reply, result) in removed {
            match result {
                Ok(()) => unsynced.waiting.push(reply),
                failed => {
                    let _ = reply.send(failed);
                }
            }
        }
        return;
    }
    let mut written = Vec::with_capacity(batch.updates.len());
    for update in batch.updates {
        let result = update_one(&update.envelope, queue, spares);
        written.push((update.replies, result));
    }
    // One directory fsync makes every rename of the batch durable, and
    // every earlier removal.
    let synced = sync_dir(queue);
    if synced.is_ok() {
        unsynced.synced(spares);
    } else if !unsynced.retired.is_empty() {
        unsynced.since.get_or_insert_with(Instant::now);
    }
    let outcome = |result: Result<(), SpoolError>| match (&synced, result) {
        (Err(e), Ok(())) => Err(e.clone()),
        (_, result) => result,
    };
    for (reply, result) in removed {
        let _ = reply.send(outcome(result));
    }
    for (replies, result) in written {
        let result = outcome(result);
        for reply in replies {
            let _ = reply.send(result.clone());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_is_taken_before_updates_that_waited_longer() {
        let backlog = Backlog::new();
        let mut answers = Vec::new();
        for n in 0..40 {
            let (reply, answer) = oneshot::channel();
            let envelope = Envelope::for_test(
                &format!("M{n}"),
                "a@example.org",
                std::time::SystemTime::now(),
                Vec::new(),
            );
            backlog.update(envelope, reply);
            answers.push(answer);
        }
        let (reply, _answer) = oneshot::channel();
        backlog.remove("GONE".into(), Disposal::Erase, reply);
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::load(dir.path().to_path_buf(), true).unwrap();
        let batch = next_batch(&backlog, &mut Unsynced::default(), dir.path(), &spares).unwrap();
        assert_eq!(
            batch.removals.len(),
            1,
            "the removal does not wait behind 40 updates"
        );
        assert_eq!(batch.updates.len(), MAX_UPDATES);
        let first: Vec<&str> = batch
            .updates
            .iter()
            .map(|u| u.envelope.id.as_str())
            .collect();
        assert_eq!(first[0], "M0", "updates keep their order");
        assert_eq!(backlog.len(), 40 - MAX_UPDATES);
    }
}

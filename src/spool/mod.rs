//! The durable queue. Its promise: `250` means the message survives kill -9
//! and power loss; no file is ever half-visible; each delivery's fate is
//! recorded on its own.
//!
//! Layout under the spool directory:
//! - `lock`: held exclusively by the one queue runner (`serve` or `runq`);
//! - `incoming/ID.msg`: a body being received (never acknowledged, so
//!   start-up deletes whatever is left here);
//! - `queue/ID.msg` + `queue/ID.env`: a queued message; the envelope's
//!   rename into `queue/` is the commit point;
//! - `corrupt/`: damaged envelopes moved aside for an operator, never
//!   silently deleted;
//! - `spare/`: files of delivered messages kept for reuse (`spare.rs` says why);
//!   never part of the queue.

pub mod envelope;
pub mod id;
mod spare;
mod staging;
mod writer;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

pub use envelope::{Attempt, Delivery, DeliveryState, Envelope, EnvelopeError};

use crate::protocol::session::StorageFailure;
use writer::Job;
pub use writer::WriterStats;

/// What can go wrong with the spool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    #[error("{context}: {message}")]
    Io {
        context: String,
        message: String,
        /// The file system is full (ENOSPC, EDQUOT).
        full: bool,
    },
    #[error("spool {} is in use by another mailnode queue runner ({holder})", .path.display())]
    Locked { path: PathBuf, holder: String },
    #[error("queue file {0} not found")]
    NotFound(String),
    #[error("queue file {id} is damaged: {reason}")]
    Corrupt { id: String, reason: EnvelopeError },
    #[error("the spool writer thread has stopped")]
    WriterGone,
}

impl SpoolError {
    pub(crate) fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        let full = matches!(
            e.raw_os_error(),
            Some(code) if code == nix::errno::Errno::ENOSPC as i32
                || code == nix::errno::Errno::EDQUOT as i32
        );
        SpoolError::Io {
            context: context.into(),
            message: e.to_string(),
            full,
        }
    }

    /// How a client hears of it: 452 4.3.1 when the disk is full, else 451 4.3.0.
    pub fn storage_failure(&self) -> StorageFailure {
        match self {
            SpoolError::Io { full: true, .. } => StorageFailure::Full,
            _ => StorageFailure::Unavailable,
        }
    }
}

/// A message body being received into `incoming/`. Dropped without a
/// successful commit, it removes its files: a message that was never
/// acknowledged leaves nothing behind.
#[derive(Debug)]
pub struct IncomingBody {
    id: String,
    path: PathBuf,
    envelope_path: Option<PathBuf>,
    file: Option<BufWriter<File>>,
    /// Bytes of content written so far.
    written: u64,
    /// A reused file's length before: bytes past `written` are old and cut
    /// before anything reads or fsyncs the body.
    old_len: u64,
    /// After the fsync: still open, so its lock keeps other processes'
    /// clean-up away until the rename into `queue/`.
    synced: Option<File>,
    committed: bool,
}

impl IncomingBody {
    /// The queue id the message will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the body is being written (in `incoming/`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pushes buffered content to the file so another process (an inline
    /// delivery) can read it; no fsync: nothing durable is promised yet.
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        let context = || format!("write {}", self.path.display());
        let file = self.file.as_mut().ok_or(SpoolError::WriterGone)?;
        file.flush().map_err(|e| SpoolError::io(context(), e))?;
        if self.old_len > self.written {
            file.get_ref()
                .set_len(self.written)
                .map_err(|e| SpoolError::io(context(), e))?;
            self.old_len = self.written;
        }
        Ok(())
    }

    fn set_envelope_path(&mut self, path: PathBuf) {
        self.envelope_path = Some(path);
    }

    /// Appends content.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let file = self.file.as_mut().ok_or(SpoolError::WriterGone)?;
        file.write_all(bytes)
            .map_err(|e| SpoolError::io(format!("write {}", self.path.display()), e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Makes the written body durable (the buffer is flushed first).
    fn sync(&mut self) -> Result<(), SpoolError> {
        self.flush()?;
        let context = || format!("fsync {}", self.path.display());
        let file = self.file.take().ok_or(SpoolError::WriterGone)?;
        let file = file
            .into_inner()
            .map_err(|e| SpoolError::io(context(), e.into_error()))?;
        file.sync_data().map_err(|e| SpoolError::io(context(), e))?;
        self.synced = Some(file);
        Ok(())
    }

    fn mark_committed(&mut self) {
        self.committed = true;
    }
}

impl Drop for IncomingBody {
    fn drop(&mut self) {
        if !self.committed {
            self.file = None;
            self.synced = None;
            let _ = fs::remove_file(&self.path);
            if let Some(env) = &self.envelope_path {
                let _ = fs::remove_file(env);
            }
        }
    }
}

struct Inner {
    root: PathBuf,
    incoming: PathBuf,
    queue: PathBuf,
    corrupt: PathBuf,
    jobs: Sender<Job>,
    staging: Sender<staging::Task>,
    spares: Arc<spare::Spares>,
    stats: Arc<WriterStats>,
}

/// A handle on an open spool; cheap to clone and shared by all actors.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("root", &self.inner.root)
            .finish()
    }
}

/// The writer thread; join it after the last [`Spool`] handle is dropped to
/// be sure every acknowledged change reached the disk.
pub struct SpoolWriter {
    thread: Option<JoinHandle<()>>,
}

impl SpoolWriter {
    /// Waits for the writer to finish its last batch.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `scan` found in `queue/`.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub envelopes: Vec<Envelope>,
    /// Damaged envelopes, moved to `corrupt/`.
    pub corrupt: Vec<SpoolError>,
    /// Bodies without an envelope (never acknowledged), removed.
    pub orphans_removed: usize,
}

impl Spool {
    /// Opens (creating if needed) the spool at `root`, clears what crashed
    /// sessions left in `incoming/` and starts the writer thread. Any number
    /// of processes may write to one spool (`serve`, `inetd` sessions); only
    /// the holder of the [`QueueLock`] works the queue.
    pub fn open(root: &Path) -> Result<(Spool, SpoolWriter), SpoolError> {
        let incoming = root.join("incoming");
        let queue = root.join("queue");
        let corrupt = root.join("corrupt");
        let spare = root.join("spare");
        // Mail is private: directories we create are ours alone (an
        // existing directory keeps the mode its installer gave it).
        for dir in [root, &incoming, &queue, &corrupt, &spare] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| SpoolError::io(format!("create {}", dir.display()), e))?;
        }
        // Whatever is in incoming/ was never acknowledged to a client, unless
        // another process is receiving it right now.
        remove_abandoned(&incoming, &queue)?;
        let spares = Arc::new(
            spare::Spares::load(spare.clone())
                .map_err(|e| SpoolError::io(format!("read {}", spare.display()), e))?,
        );
        let (jobs, rx) = crossbeam_channel::unbounded();
        let writer_queue = queue.clone();
        let writer_spares = Arc::clone(&spares);
        let stats = Arc::new(WriterStats::default());
        let writer_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer::run(rx, writer_queue, writer_spares, writer_stats))
            .map_err(|e| SpoolError::io("start spool writer thread", e))?;
        let (staging, staging_tasks) = crossbeam_channel::unbounded();
        staging::start(staging_tasks)?;
        let spool = Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                incoming,
                queue,
                corrupt,
                jobs,
                staging,
                spares,
                stats,
            }),
        };
        Ok((
            spool,
            SpoolWriter {
                thread: Some(thread),
            },
        ))
    }

    /// What the writer thread has done so far.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// The spool directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Starts receiving a new message: allocates its id and body file.
    pub fn begin(&self, now: SystemTime) -> Result<IncomingBody, SpoolError> {
        loop {
            let id = id::new_id(now);
            if self.inner.queue.join(format!("{id}.env")).exists() {
                continue;
            }
            let path = self.inner.incoming.join(format!("{id}.msg"));
            match self.inner.spares.create(&path, spare::Existing::Refuse) {
                Ok(spare::Fresh { file: f, old_len }) => {
                    // The lock marks the body as in use for other processes'
                    // start-up clean-up. If one of them got to the fresh file
                    // first (or is probing the reused inode's lock), leave it
                    // and take another id; the name is ours to remove.
                    if f.try_lock().is_err() {
                        drop(f);
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    return Ok(IncomingBody {
                        id,
                        path,
                        envelope_path: None,
                        file: Some(BufWriter::with_capacity(64 * 1024, f)),
                        written: 0,
                        old_len,
                        synced: None,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SpoolError::io(format!("create {}", path.display()), e)),
            }
        }
    }

    fn submit(&self, make: impl FnOnce(writer::Reply) -> Job) -> Pending {
        let (tx, rx) = oneshot::channel();
        // If the writer is gone, the job (and its reply sender) drops, and
        // the receiver reports WriterGone.
        let _ = self.inner.jobs.send(make(tx));
        Pending(rx)
    }

    /// Makes a received message durable. Resolves once body, envelope and
    /// directory are fsynced: only then may the client hear `250`.
    pub fn commit(&self, body: IncomingBody, envelope: Envelope) -> Pending {
        let (reply, answer) = oneshot::channel();
        let envelope_path = self.inner.incoming.join(format!("{}.env", body.id()));
        staging::stage(
            &self.inner.staging,
            &self.inner.jobs,
            &self.inner.spares,
            body,
            &envelope,
            envelope_path,
            reply,
        );
        Pending(answer)
    }

    /// Durably replaces a queued message's envelope.
    pub fn update(&self, envelope: Envelope) -> Pending {
        self.submit(|reply| Job::Update {
            envelope: Box::new(envelope),
            reply,
        })
    }

    /// Removes a message from the queue. Resolves once its files are out of
    /// `queue/`; the directory fsync that makes the removal survive a power
    /// cut follows within 50 ms or with the next commit. A power cut in
    /// between brings the message back to be delivered again: mail is
    /// never lost that way, at worst delivered twice, as it is anyway when
    /// a power cut falls between a program's exit and its record.
    pub fn remove(&self, id: &str) -> Pending {
        let id = id.to_string();
        self.submit(|reply| Job::Remove { id, reply })
    }

    /// Where a queued message's body is.
    pub fn body_path(&self, id: &str) -> PathBuf {
        self.inner.queue.join(format!("{id}.msg"))
    }

    /// Reads one queued envelope.
    pub fn read_envelope(&self, id: &str) -> Result<Envelope, SpoolError> {
        if !id::is_valid_id(id) {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        let path = self.inner.queue.join(format!("{id}.env"));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SpoolError::NotFound(id.to_string()))
            }
            Err(e) => return Err(SpoolError::io(format!("read {}", path.display()), e)),
        };
        envelope::decode(&bytes).map_err(|reason| SpoolError::Corrupt {
            id: id.to_string(),
            reason,
        })
    }

    /// Envelopes in `queue/` that `known` does not know, for picking up
    /// what other processes queued. Unreadable or damaged ones are left for
    /// start-up to judge.
    pub fn scan_new(&self, known: impl Fn(&str) -> bool) -> Result<Vec<Envelope>, SpoolError> {
        let queue = &self.inner.queue;
        let entries = fs::read_dir(queue)
            .map_err(|e| SpoolError::io(format!("read {}", queue.display()), e))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".env")) else {
                continue;
            };
            if known(id) || !self.body_path(id).exists() {
                continue;
            }
            if let Ok(env) = self.read_envelope(id) {
                found.push(env);
            }
        }
        Ok(found)
    }

    /// Reads every queued envelope (start-up). Removes leftovers of crashes:
    /// bodies without envelopes and half-written envelope updates; moves
    /// damaged envelopes to `corrupt/`.
    pub fn scan(&self) -> Result<ScanReport, SpoolError> {
        let queue = &self.inner.queue;
        let entries = fs::read_dir(queue)
            .map_err(|e| SpoolError::io(format!("read {}", queue.display()), e))?;
        let mut envelope_ids = Vec::new();
        let mut body_ids = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| SpoolError::io(format!("read {}", queue.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".env") {
                envelope_ids.push(id.to_string());
            } else if let Some(id) = name.strip_suffix(".msg") {
                body_ids.push(id.to_string());
            } else if name.ends_with(".env.tmp") && is_old(&entry) {
                let _ = fs::remove_file(entry.path());
            }
        }
        envelope_ids.sort();
        let mut report = ScanReport::default();
        for id in &body_ids {
            let path = queue.join(format!("{id}.msg"));
            // A body is renamed in just before its envelope; the process
            // committing it holds its lock until then. An unlocked body
            // without an envelope was never acknowledged: a crash's leftover.
            let in_progress = File::open(&path)
                .map(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
                .unwrap_or(true);
            if envelope_ids.binary_search(id).is_err() && !in_progress {
                let _ = fs::remove_file(&path);
                report.orphans_removed += 1;
            }
        }
        body_ids.sort();
        for id in envelope_ids {
            let damaged = match self.read_envelope(&id) {
                // The listing may have missed a body renamed in during it:
                // ask the file system itself before judging.
                Ok(env) if env.id == id && self.body_path(&id).exists() => {
                    report.envelopes.push(env);
                    continue;
                }
                Ok(_) => SpoolError::Corrupt {
                    id: id.clone(),
                    reason: EnvelopeError::Truncated,
                },
                Err(e @ SpoolError::Corrupt { .. }) => e,
                // Unreadable is not damaged (a wrong owner, EIO): refuse to
                // start rather than set acknowledged mail aside.
                Err(e) => return Err(e),
            };
            for ext in ["env", "msg"] {
                let from = queue.join(format!("{id}.{ext}"));
                if from.exists() {
                    let _ = fs::rename(&from, self.inner.corrupt.join(format!("{id}.{ext}")));
                }
            }
            report.corrupt.push(damaged);
        }
        Ok(report)
    }
}

/// The answer to a writer job.
#[must_use = "the change is durable only once this resolves to Ok"]
pub struct Pending(oneshot::Receiver<Result<(), SpoolError>>);

impl Pending {
    /// Waits asynchronously.
    pub async fn wait(self) -> Result<(), SpoolError> {
        self.0.await.unwrap_or(Err(SpoolError::WriterGone))
    }

    /// Waits on a thread that is not running async tasks (`runq`, tests).
    pub fn wait_blocking(self) -> Result<(), SpoolError> {
        self.0
            .blocking_recv()
            .unwrap_or(Err(SpoolError::WriterGone))
    }
}

/// A file younger than this in `incoming/` or a `.tmp` may be another
/// process's work in progress; older ones are a crash's leftovers.
const ABANDONED_AFTER: Duration = Duration::from_secs(120);

/// Removes bodies no live session holds (each holds an exclusive lock on
/// its body) and envelopes left half-committed by a crash.
fn remove_abandoned(incoming: &Path, queue: &Path) -> Result<(), SpoolError> {
    let entries = fs::read_dir(incoming)
        .map_err(|e| SpoolError::io(format!("read {}", incoming.display()), e))?;
    let locked = |path: &Path| {
        File::open(path)
            .map(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
            .unwrap_or(false)
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // An envelope being committed belongs to a body its committer still
        // locks (here or already renamed into queue/).
        let in_use = match name.strip_suffix(".env") {
            Some(id) => {
                locked(&incoming.join(format!("{id}.msg")))
                    || locked(&queue.join(format!("{id}.msg")))
            }
            None => locked(&path),
        };
        if !in_use {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

fn is_old(entry: &fs::DirEntry) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > ABANDONED_AFTER)
}

/// The exclusive right to work the queue: held by `serve` and `runq` (and
/// briefly by an `inetd` session delivering what it took), so two queue
/// runners never attempt the same message at once.
#[derive(Debug)]
pub struct QueueLock {
    _file: File,
}

impl QueueLock {
    /// Takes the lock for `role` (`serve`, `runq`, `inetd`), waiting up to
    /// `wait` for another holder to finish. The lock file names its holder,
    /// so a refusal can say who has the spool.
    pub fn acquire(root: &Path, role: &str, wait: Duration) -> Result<QueueLock, SpoolError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| SpoolError::io(format!("create {}", root.display()), e))?;
        let path = root.join("lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SpoolError::io(format!("open {}", path.display()), e))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    // Best effort: the name is for messages, not for safety.
                    let _ = file.set_len(0);
                    let _ = writeln!(file, "{role}, pid {}", std::process::id());
                    return Ok(QueueLock { _file: file });
                }
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(SpoolError::Locked {
                        path: root.to_path_buf(),
                        holder: Self::holder(root),
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(SpoolError::io(format!("lock {}", path.display()), e))
                }
            }
        }
    }

    /// Who holds (or last held) the lock: `serve, pid 123`.
    pub fn holder(root: &Path) -> String {
        fs::read_to_string(root.join("lock"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown holder".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliases::Target;

    fn envelope_for(id: &str) -> Envelope {
        let delivery = Delivery::new(
            "x@example.org".into(),
            "x@example.org".into(),
            "x".into(),
            String::new(),
            "example.org".into(),
            Target::Pipe {
                command: "cat".into(),
            },
        );
        Envelope::for_test(id, "a@example.org", SystemTime::now(), vec![delivery])
    }

    #[test]
    fn commit_makes_body_and_envelope_visible_together() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(dir.path()).unwrap();
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(b"hello\n").unwrap();
        let id = body.id().to_string();
        spool
            .commit(body, envelope_for(&id))
            .wait_blocking()
            .unwrap();
        assert_eq!(fs::read(spool.body_path(&id)).unwrap(), b"hello\n".to_vec());
        assert_eq!(spool.read_envelope(&id).unwrap().id, id);
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );

        let mut env = spool.read_envelope(&id).unwrap();
        env.deliveries[0].state = DeliveryState::Delivered;
        spool.update(env.clone()).wait_blocking().unwrap();
        assert_eq!(spool.read_envelope(&id).unwrap(), env);

        spool.remove(&id).wait_blocking().unwrap();
        assert!(matches!(
            spool.read_envelope(&id),
            Err(SpoolError::NotFound(_))
        ));
        drop(spool);
        writer.join();
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_failures() {
        let full = SpoolError::io(
            "write",
            std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert_eq!(full.storage_failure(), StorageFailure::Full);
        let quota = SpoolError::io(
            "write",
            std::io::Error::from_raw_os_error(nix::libc::EDQUOT),
        );
        assert_eq!(quota.storage_failure(), StorageFailure::Full);
        let other = SpoolError::io("write", std::io::Error::from_raw_os_error(nix::libc::EIO));
        assert_eq!(other.storage_failure(), StorageFailure::Unavailable);
        assert_eq!(
            SpoolError::WriterGone.storage_failure(),
            StorageFailure::Unavailable
        );
    }

    #[test]
    fn a_removed_messages_files_are_reused_only_once_the_removal_is_durable() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (spool, _writer) = Spool::open(dir.path()).unwrap();
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(b"first message\n").unwrap();
        let id = body.id().to_string();
        spool
            .commit(body, envelope_for(&id))
            .wait_blocking()
            .unwrap();
        let old_inode = fs::metadata(spool.body_path(&id)).unwrap().ino();
        spool.remove(&id).wait_blocking().unwrap();
        // Not durable yet (a removal alone waits for a directory fsync to
        // share): a power cut could bring `id` back, so its body must not
        // hold new mail.
        let early = spool.begin(SystemTime::now()).unwrap();
        assert_ne!(
            fs::metadata(early.path()).unwrap().ino(),
            old_inode,
            "a spare was reused before its removal was durable"
        );
        drop(early);
        // After the delayed directory fsync the file is reused.
        let reused = wait_until(Duration::from_secs(5), || {
            let body = spool.begin(SystemTime::now()).unwrap();
            fs::metadata(body.path()).unwrap().ino() == old_inode
        });
        assert!(reused, "the spare was never reused");
    }

    fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn concurrent_commits_share_directory_fsyncs() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (spool, _writer) = Spool::open(dir.path()).unwrap();
        const N: usize = 64;
        // Submitted together, as N sessions ending DATA at once would.
        let pending: Vec<Pending> = (0..N)
            .map(|_| {
                let mut body = spool.begin(SystemTime::now()).unwrap();
                body.append(b"x\n").unwrap();
                let id = body.id().to_string();
                spool.commit(body, envelope_for(&id))
            })
            .collect();
        for p in pending {
            p.wait_blocking().unwrap();
        }
        let stats = spool.writer_stats();
        assert_eq!(stats.commits.load(Ordering::Relaxed), N as u64);
        let batches = stats.batches.load(Ordering::Relaxed);
        // Staged messages reach the writer as their fsyncs finish, a few at
        // a time; one fsync each would be N.
        assert!(
            batches < N as u64 * 3 / 4,
            "{batches} directory fsyncs for {N} commits"
        );
    }

    #[test]
    fn a_dropped_body_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _writer) = Spool::open(dir.path()).unwrap();
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(b"partial").unwrap();
        drop(body);
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn one_queue_lock_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = QueueLock::acquire(dir.path(), "serve", Duration::ZERO).unwrap();
        let second = QueueLock::acquire(dir.path(), "runq", Duration::from_millis(200));
        let Err(SpoolError::Locked { holder, .. }) = second else {
            panic!("not refused: {second:?}");
        };
        assert_eq!(holder, format!("serve, pid {}", std::process::id()));
        drop(first);
        assert!(QueueLock::acquire(dir.path(), "runq", Duration::ZERO).is_ok());
    }

    #[test]
    fn opening_keeps_bodies_another_session_is_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let mut live = spool.begin(SystemTime::now()).unwrap();
        live.append(b"in progress").unwrap();
        // Another process opening the spool (a second open does the same
        // clean-up) must leave the body a live session holds.
        let (_again, _w2) = Spool::open(dir.path()).unwrap();
        assert!(live.path().exists(), "a live session's body was removed");
        drop(live);
        let (_third, _w3) = Spool::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn scan_recovers_queued_and_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let (spool, writer) = Spool::open(dir.path()).unwrap();
            let body = spool.begin(SystemTime::now()).unwrap();
            id = body.id().to_string();
            spool
                .commit(body, envelope_for(&id))
                .wait_blocking()
                .unwrap();
            drop(spool);
            writer.join();
        }
        let queue = dir.path().join("queue");
        fs::write(dir.path().join("incoming/LEFTOVER.msg"), b"x").unwrap();
        let orphan = queue.join("0000000000000ZZ.msg");
        fs::write(&orphan, b"orphan").unwrap();
        fs::write(queue.join("0000000000001ZZ.env"), b"garbage").unwrap();
        fs::write(queue.join("0000000000001ZZ.msg"), b"body").unwrap();
        let tmp = queue.join(format!("{id}.env.tmp"));
        fs::write(&tmp, b"half").unwrap();
        make_old(&tmp);
        // A body without envelope that its committer still locks is a
        // commit in progress: kept.
        let young = queue.join("0000000000002ZZ.msg");
        fs::write(&young, b"arriving").unwrap();
        let committing = File::open(&young).unwrap();
        committing.lock().unwrap();

        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let report = spool.scan().unwrap();
        assert_eq!(report.envelopes.len(), 1);
        assert_eq!(report.envelopes[0].id, id);
        assert_eq!(report.orphans_removed, 1);
        assert_eq!(report.corrupt.len(), 1);
        assert!(dir.path().join("corrupt/0000000000001ZZ.env").exists());
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
        assert!(!queue.join(format!("{id}.env.tmp")).exists());
        assert!(
            young.exists(),
            "a commit in progress was taken for an orphan"
        );
    }

    /// Old enough to be a crash's leftover, not another process's work.
    fn make_old(path: &Path) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }
}

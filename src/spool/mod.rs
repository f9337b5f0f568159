//! The durable queue. Its promise: `250` means the message survives kill -9
//! and power loss; a queue file is never visible before it is whole (a
//! power cut can leave one that was never acknowledged with old bytes:
//! start-up sets it aside); each delivery's fate is recorded on its own.
//!
//! Layout under the spool directory:
//! - `lock`: held exclusively by the one queue runner (`serve` or `runq`);
//! - `boot_id`: the machine's boot when the queue was last checked (see
//!   [`Spool::scan`]);
//! - `incoming/ID.msg`: a body being received (never acknowledged, so
//!   start-up deletes whatever is left here);
//! - `queue/ID.msg`: a queued message, sealed: the body, then the envelope
//!   as committed, then an 8-byte trailer (the envelope's length, u32
//!   little-endian, and `MNQT`). The rename into `queue/` makes it
//!   visible, the fsyncs that follow (while its committer still holds its
//!   lock) make it queued;
//! - `queue/ID.env`: the envelope as last updated (results, retries); once
//!   present it supersedes the sealed one. Messages queued before queue
//!   files were sealed (envelope version 2 and older) have one from the
//!   start and no seal;
//! - `corrupt/`: damaged messages moved aside for an operator, never
//!   silently deleted;
//! - `spare/`: files of delivered messages kept for reuse (`spare.rs` says why);
//!   never part of the queue.

mod accepted;
mod commit_pool;
pub mod envelope;
pub mod id;
mod spare;
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

pub use envelope::{Attempt, BodyCheck, Delivery, DeliveryState, Envelope, EnvelopeError};

use crate::protocol::session::StorageFailure;
pub use commit_pool::CommitStats;
use writer::Job;

/// What can go wrong with the spool.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        /// Shared: a failed write is reported to every message waiting on it.
        #[source]
        source: std::sync::Arc<std::io::Error>,
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
            source: std::sync::Arc::new(e),
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

/// The end of a sealed queue file: the envelope's length and this mark.
const SEAL_MARK: &[u8; 4] = b"MNQT";
const TRAILER_LEN: u64 = 8;

/// A message body being received into `incoming/`. Dropped without a
/// successful commit, it removes its file, wherever the commit had moved
/// it: a message that was never acknowledged leaves nothing behind.
#[derive(Debug)]
pub struct IncomingBody {
    id: String,
    /// Where the body is now: `incoming/`, or `queue/` once a commit has
    /// renamed it there.
    path: PathBuf,
    /// Open from creation to the end of the commit: its lock keeps other
    /// processes' start-up clean-up away.
    file: BufWriter<File>,
    /// Bytes written to the file so far (with the seal, once sealed).
    written: u64,
    /// CRC-32 of the body's bytes, for the envelope's [`BodyCheck`].
    crc: crc32fast::Hasher,
    /// A reused file's length before: bytes past `written` are old and cut
    /// before anything reads or fsyncs the body.
    old_len: u64,
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
        self.file
            .flush()
            .map_err(|e| SpoolError::io(context(), e))?;
        if self.old_len > self.written {
            self.file
                .get_ref()
                .set_len(self.written)
                .map_err(|e| SpoolError::io(context(), e))?;
            self.old_len = self.written;
        }
        Ok(())
    }

    /// Appends content.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.file
            .write_all(bytes)
            .map_err(|e| SpoolError::io(format!("write {}", self.path.display()), e))?;
        self.crc.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// What the body holds so far.
    fn check(&self) -> BodyCheck {
        BodyCheck {
            len: self.written,
            crc32: self.crc.clone().finalize(),
        }
    }

    /// Ends the file with the encoded envelope and the trailer, and flushes
    /// it: the file is now a queue file, ready to be renamed and fsynced.
    fn seal(&mut self, envelope: &[u8]) -> Result<(), SpoolError> {
        let context = || format!("write {}", self.path.display());
        let len = u32::try_from(envelope.len()).map_err(|_| {
            SpoolError::io(
                context(),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "envelope too large"),
            )
        })?;
        let mut trailer = [0u8; TRAILER_LEN as usize];
        trailer[..4].copy_from_slice(&len.to_le_bytes());
        trailer[4..].copy_from_slice(SEAL_MARK);
        for part in [envelope, &trailer[..]] {
            self.file
                .write_all(part)
                .map_err(|e| SpoolError::io(context(), e))?;
        }
        self.written += u64::from(len) + TRAILER_LEN;
        self.flush()
    }

    fn mark_committed(&mut self) {
        self.committed = true;
    }
}

impl Drop for IncomingBody {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads the envelope of message `id` in the queue directory `queue`: the
/// updated one beside the message if there is one, else the one it was
/// sealed with.
pub fn read_queued(queue: &Path, id: &str) -> Result<Envelope, SpoolError> {
    if !id::is_valid_id(id) {
        return Err(SpoolError::NotFound(id.to_string()));
    }
    let corrupt = |reason| SpoolError::Corrupt {
        id: id.to_string(),
        reason,
    };
    let path = queue.join(format!("{id}.env"));
    let sealed = match fs::read(&path) {
        Ok(bytes) => return envelope::decode(&bytes).map_err(corrupt),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let body = queue.join(format!("{id}.msg"));
            read_sealed(&body).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
                std::io::ErrorKind::UnexpectedEof => corrupt(EnvelopeError::Truncated),
                _ => SpoolError::io(format!("read {}", body.display()), e),
            })?
        }
        Err(e) => return Err(SpoolError::io(format!("read {}", path.display()), e)),
    };
    sealed.map_err(corrupt)
}

/// Reads the envelope a sealed queue file ends with.
fn read_sealed(path: &Path) -> Result<Result<Envelope, EnvelopeError>, std::io::Error> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    if file_len < TRAILER_LEN {
        return Ok(Err(EnvelopeError::Truncated));
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut trailer, file_len - TRAILER_LEN)?;
    if &trailer[4..] != SEAL_MARK {
        return Ok(Err(EnvelopeError::BadMagic));
    }
    let env_len = u64::from(u32::from_le_bytes([
        trailer[0], trailer[1], trailer[2], trailer[3],
    ]));
    let Some(body_len) = file_len.checked_sub(TRAILER_LEN + env_len) else {
        return Ok(Err(EnvelopeError::Truncated));
    };
    let mut bytes = vec![0u8; env_len as usize];
    file.read_exact_at(&mut bytes, body_len)?;
    Ok(envelope::decode(&bytes).and_then(|env| {
        // The seal and the envelope must agree on where the body ends.
        match env.body_check {
            Some(check) if check.len == body_len => Ok(env),
            _ => Err(EnvelopeError::Truncated),
        }
    }))
}

/// Whether the first `check.len` bytes of the file at `path` are the body
/// committed.
fn body_matches(path: &Path, check: BodyCheck) -> std::io::Result<bool> {
    use std::io::Read;
    let mut body = File::open(path)?.take(check.len);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        len += n as u64;
    }
    Ok(len == check.len && crc.finalize() == check.crc32)
}

struct Inner {
    root: PathBuf,
    incoming: PathBuf,
    queue: PathBuf,
    corrupt: PathBuf,
    jobs: Sender<Job>,
    commits: commit_pool::CommitPool,
    spares: Arc<spare::Spares>,
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
    /// Damaged messages, moved to `corrupt/`.
    pub corrupt: Vec<SpoolError>,
    /// Updated envelopes whose message a removal had already taken,
    /// removed.
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
        remove_abandoned(&incoming)?;
        // Another process may have retired files into spare/ whose removal
        // from queue/ it has not made durable yet: make it so before they
        // can hold new mail.
        writer::sync_dir(&queue)?;
        let spares = Arc::new(
            spare::Spares::load(spare.clone())
                .map_err(|e| SpoolError::io(format!("read {}", spare.display()), e))?,
        );
        let (jobs, rx) = crossbeam_channel::unbounded();
        let writer_queue = queue.clone();
        let writer_spares = Arc::clone(&spares);
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer::run(rx, writer_queue, writer_spares))
            .map_err(|e| SpoolError::io("start spool writer thread", e))?;
        let commits = commit_pool::CommitPool::start(queue.clone())?;
        let spool = Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                incoming,
                queue,
                corrupt,
                jobs,
                commits,
                spares,
            }),
        };
        Ok((
            spool,
            SpoolWriter {
                thread: Some(thread),
            },
        ))
    }

    /// What commits have done so far.
    pub fn commit_stats(&self) -> &CommitStats {
        self.inner.commits.stats()
    }

    /// The spool directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Starts receiving a new message: allocates its id and body file.
    pub fn begin(&self, now: SystemTime) -> Result<IncomingBody, SpoolError> {
        loop {
            let id = id::new_id(now);
            // Ids restart with each process: one still queued (a clock
            // stepped back) is skipped here rather than refused at commit.
            if self.inner.queue.join(format!("{id}.msg")).exists() {
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
                        file: BufWriter::with_capacity(64 * 1024, f),
                        written: 0,
                        crc: crc32fast::Hasher::new(),
                        old_len,
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

    /// Makes a received message durable, recording the body's check in
    /// `envelope` first. Resolves once body, envelope and directory are
    /// fsynced: only then may the client hear `250`.
    pub fn commit(&self, mut body: IncomingBody, envelope: &mut Envelope) -> Pending {
        let (reply, answer) = oneshot::channel();
        envelope.body_check = Some(body.check());
        // Sealed here, on the caller's thread, so the commit thread only
        // renames and fsyncs.
        match body.seal(&envelope::encode(envelope)) {
            Ok(()) => self.inner.commits.commit(body, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
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

    /// Reads one queued envelope (see [`read_queued`]).
    pub fn read_envelope(&self, id: &str) -> Result<Envelope, SpoolError> {
        read_queued(&self.inner.queue, id)
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
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".msg")) else {
                continue;
            };
            // A message whose committer still holds it may not be durable
            // yet, and its commit may still fail.
            if known(id) || is_locked(&entry.path()) {
                continue;
            }
            match self.read_envelope(id) {
                Ok(env) if env.id == id => found.push(env),
                _ => {}
            }
        }
        Ok(found)
    }

    /// Reads every queued envelope (start-up). Removes leftovers of crashes:
    /// updated envelopes of removed messages and half-written updates;
    /// moves damaged messages to `corrupt/`.
    ///
    /// After the machine has restarted (its boot id differs from the one
    /// recorded in the spool) every body is also read against its
    /// envelope's [`BodyCheck`]: a commit cut short by a power cut can
    /// leave a message that was never acknowledged with old or missing
    /// bytes (see `commit_pool.rs`). A crash of the process alone cannot, so
    /// ordinary restarts skip the reading.
    pub fn scan(&self) -> Result<ScanReport, SpoolError> {
        let queue = &self.inner.queue;
        let entries = fs::read_dir(queue)
            .map_err(|e| SpoolError::io(format!("read {}", queue.display()), e))?;
        let mut message_ids = Vec::new();
        let mut updated_ids = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| SpoolError::io(format!("read {}", queue.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".msg") {
                message_ids.push(id.to_string());
            } else if let Some(id) = name.strip_suffix(".env") {
                updated_ids.push(id.to_string());
            } else if name.ends_with(".env.tmp") && is_old(&entry) {
                let _ = fs::remove_file(entry.path());
            }
        }
        message_ids.sort();
        let mut report = ScanReport::default();
        for id in &updated_ids {
            // A removal takes the message first, its updated envelope
            // second: alone, the envelope is a crash's leftover.
            if message_ids.binary_search(id).is_err() && !self.body_path(id).exists() {
                let _ = fs::remove_file(queue.join(format!("{id}.env")));
                report.orphans_removed += 1;
            }
        }
        let boot = BootId::check(&self.inner.root);
        // Reading is most of a start-up with a long queue, and waits for
        // the disk when the page cache is cold (after a reboot): several
        // readers keep it busy. Every verdict comes before any move, so an
        // unreadable file stops start-up with nothing half done.
        let judged = in_parallel(&message_ids, |id| self.judge(id, boot.rebooted))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for (id, judged) in message_ids.iter().zip(judged) {
            let damaged = match judged {
                Judged::Queued(env) => {
                    report.envelopes.push(env);
                    continue;
                }
                Judged::Gone => continue,
                Judged::Damaged(damaged) => damaged,
            };
            // Left in queue/, a damaged message would be picked up again
            // (a body that does not match its envelope reads as queued).
            // The queue file first: an updated envelope left alone is
            // removed as a leftover, never read as queued.
            for ext in ["msg", "env"] {
                let from = queue.join(format!("{id}.{ext}"));
                match fs::rename(&from, self.inner.corrupt.join(format!("{id}.{ext}"))) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(SpoolError::io(
                            format!("set aside damaged {} ({damaged})", from.display()),
                            e,
                        ))
                    }
                }
            }
            report.corrupt.push(damaged);
        }
        boot.record(&self.inner.root);
        Ok(report)
    }
}

/// What start-up makes of one file in `queue/`.
// Not boxed: an envelope boxed on a reader thread and moved out on another
// left its box behind in that thread's allocator arena, 27 MiB of RSS with
// 100,000 queued.
#[allow(clippy::large_enum_variant)]
enum Judged {
    Queued(Envelope),
    Damaged(SpoolError),
    /// Gone meanwhile, or another process's commit in progress.
    Gone,
}

impl Spool {
    /// Reads message `id`'s envelope, and with `verify_body` its body
    /// against the envelope's check. Unreadable is an error, not damage.
    fn judge(&self, id: &str, verify_body: bool) -> Result<Judged, SpoolError> {
        let corrupt = |reason| {
            Ok(Judged::Damaged(SpoolError::Corrupt {
                id: id.to_string(),
                reason,
            }))
        };
        match self.read_envelope(id) {
            Ok(env) if env.id == id => match (verify_body, env.body_check) {
                (true, Some(check)) => {
                    let body = self.body_path(id);
                    match body_matches(&body, check) {
                        Ok(true) => Ok(Judged::Queued(env)),
                        Ok(false) => corrupt(EnvelopeError::BodyMismatch),
                        Err(e) => Err(SpoolError::io(format!("read {}", body.display()), e)),
                    }
                }
                _ => Ok(Judged::Queued(env)),
            },
            Ok(_) => corrupt(EnvelopeError::Truncated),
            // Taken away meanwhile (a `runq` cannot run beside us, but an
            // operator can): nothing to judge.
            Err(SpoolError::NotFound(_)) => Ok(Judged::Gone),
            // Another process is committing it (a session of an earlier
            // version renames the body before the envelope).
            Err(SpoolError::Corrupt { .. }) if is_locked(&self.body_path(id)) => Ok(Judged::Gone),
            Err(e @ SpoolError::Corrupt { .. }) => Ok(Judged::Damaged(e)),
            // Unreadable is not damaged (a wrong owner, EIO): refuse to
            // start rather than set acknowledged mail aside.
            Err(e) => Err(e),
        }
    }
}

/// Readers of a start-up scan; each takes a run of ids of its own.
const SCAN_THREADS: usize = 8;
/// Fewer ids than this each are not worth a thread.
const SCAN_MIN_PER_THREAD: usize = 256;

/// `judge` of every id, in order, spread over up to [`SCAN_THREADS`]
/// threads (fewer if the system will not start them).
fn in_parallel<T: Send>(ids: &[String], judge: impl Fn(&str) -> T + Sync) -> Vec<T> {
    let threads = (ids.len() / SCAN_MIN_PER_THREAD).clamp(1, SCAN_THREADS);
    if threads == 1 {
        return ids.iter().map(|id| judge(id)).collect();
    }
    let judge = &judge;
    let judge_all = move |run: &[String]| run.iter().map(|id| judge(id)).collect::<Vec<T>>();
    std::thread::scope(|scope| {
        let runs: Vec<_> = ids
            .chunks(ids.len().div_ceil(threads))
            .map(|run| {
                let started = std::thread::Builder::new()
                    .name("spool-scan".into())
                    .spawn_scoped(scope, move || judge_all(run));
                (run, started.ok())
            })
            .collect();
        runs.into_iter()
            .flat_map(|(run, started)| match started {
                Some(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                None => judge_all(run),
            })
            .collect()
    })
}

/// The machine's boot id (`/proc/sys/kernel/random/boot_id`) against the
/// one the spool recorded when its queue was last checked.
struct BootId {
    current: Option<String>,
    rebooted: bool,
}

const BOOT_ID_FILE: &str = "boot_id";

impl BootId {
    fn check(root: &Path) -> BootId {
        let current = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let recorded = fs::read_to_string(root.join(BOOT_ID_FILE)).ok();
        // Not knowing counts as a restart: the reading costs time, skipping
        // it could cost mail.
        let rebooted = match (&current, recorded) {
            (Some(current), Some(recorded)) => recorded.trim() != current,
            _ => true,
        };
        BootId { current, rebooted }
    }

    /// Records the current boot once its queue has been checked, durably:
    /// a process crash after this must not skip a check a power cut made
    /// necessary, and it does not, since the check is done by then.
    fn record(&self, root: &Path) {
        let (Some(current), true) = (&self.current, self.rebooted) else {
            return;
        };
        let tmp = root.join(format!("{BOOT_ID_FILE}.tmp"));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(current.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, root.join(BOOT_ID_FILE))?;
            File::open(root)?.sync_all()
        })();
        if let Err(e) = written {
            // Next start-up reads the bodies again; nothing else is lost.
            tracing::warn!("cannot record the boot id in {}: {e}", root.display());
        }
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
/// its body), and envelopes older versions left there.
fn remove_abandoned(incoming: &Path) -> Result<(), SpoolError> {
    let entries = fs::read_dir(incoming)
        .map_err(|e| SpoolError::io(format!("read {}", incoming.display()), e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if !is_locked(&path) {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Whether another holder (a session receiving or committing the file)
/// has it locked.
fn is_locked(path: &Path) -> bool {
    File::open(path)
        .map(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
        .unwrap_or(false)
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
    use envelope::encode;

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
        let mut envelope = envelope_for(&id);
        spool.commit(body, &mut envelope).wait_blocking().unwrap();
        let check = BodyCheck {
            len: 6,
            crc32: crc32fast::hash(b"hello\n"),
        };
        assert_eq!(envelope.body_check, Some(check));
        assert_eq!(envelope.body_len(), Some(6));
        // One file: the body, the envelope, the trailer.
        let mut sealed = b"hello\n".to_vec();
        let encoded = envelope::encode(&envelope);
        sealed.extend_from_slice(&encoded);
        sealed.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        sealed.extend_from_slice(b"MNQT");
        assert_eq!(fs::read(spool.body_path(&id)).unwrap(), sealed);
        assert_eq!(
            fs::read_dir(dir.path().join("queue")).unwrap().count(),
            1,
            "one file per message"
        );
        // (As stored: times to the microsecond.)
        let stored = envelope::decode(&encode(&envelope)).unwrap();
        assert_eq!(spool.read_envelope(&id).unwrap(), stored);
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
            .commit(body, &mut envelope_for(&id))
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
    fn concurrent_commits_overlap_so_their_fsyncs_can_share_journal_commits() {
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
                spool.commit(body, &mut envelope_for(&id))
            })
            .collect();
        for p in pending {
            p.wait_blocking().unwrap();
        }
        let stats = spool.commit_stats();
        assert_eq!(stats.commits.load(Ordering::Relaxed), N as u64);
        assert_eq!(stats.in_progress.load(Ordering::Relaxed), 0);
        // One commit at a time would pay one disk flush per message.
        let most = stats.most_at_once.load(Ordering::Relaxed);
        assert!(most > 1, "commits never overlapped ({most} at most)");
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
                .commit(body, &mut envelope_for(&id))
                .wait_blocking()
                .unwrap();
            drop(spool);
            writer.join();
        }
        let queue = dir.path().join("queue");
        fs::write(dir.path().join("incoming/LEFTOVER.msg"), b"x").unwrap();
        // An updated envelope whose message a removal had taken already.
        let removed = queue.join("0000000000000ZZ.env");
        fs::write(&removed, encode(&envelope_for("0000000000000ZZ"))).unwrap();
        // A damaged updated envelope, and a queue file without its seal.
        fs::write(queue.join("0000000000001ZZ.env"), b"garbage").unwrap();
        fs::write(queue.join("0000000000001ZZ.msg"), b"body").unwrap();
        fs::write(queue.join("0000000000002ZZ.msg"), b"no seal").unwrap();
        let tmp = queue.join(format!("{id}.env.tmp"));
        fs::write(&tmp, b"half").unwrap();
        make_old(&tmp);

        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let report = spool.scan().unwrap();
        assert_eq!(report.envelopes.len(), 1);
        assert_eq!(report.envelopes[0].id, id);
        assert_eq!(report.orphans_removed, 1);
        assert!(!removed.exists());
        assert_eq!(report.corrupt.len(), 2, "{:?}", report.corrupt);
        for kept in [
            "0000000000001ZZ.env",
            "0000000000001ZZ.msg",
            "0000000000002ZZ.msg",
        ] {
            assert!(dir.path().join("corrupt").join(kept).exists(), "{kept}");
        }
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
        assert!(!queue.join(format!("{id}.env.tmp")).exists());
    }

    #[test]
    fn judging_is_spread_over_threads_and_keeps_the_order() {
        let ids: Vec<String> = (0..SCAN_MIN_PER_THREAD * 4)
            .map(|i| format!("{i:015}"))
            .collect();
        let judged = in_parallel(&ids, |id| (id.to_string(), std::thread::current().id()));
        let in_order: Vec<&String> = judged.iter().map(|(id, _)| id).collect();
        assert_eq!(in_order, ids.iter().collect::<Vec<_>>());
        let threads: std::collections::HashSet<_> = judged.iter().map(|(_, t)| *t).collect();
        assert_eq!(threads.len(), 4, "ids judged on {} threads", threads.len());
        // A short queue is not worth a thread.
        let few = &ids[..10];
        let here = std::thread::current().id();
        assert!(in_parallel(few, |_| std::thread::current().id())
            .into_iter()
            .all(|t| t == here));
    }

    #[test]
    fn a_long_queue_is_read_by_several_threads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let n = SCAN_MIN_PER_THREAD * 3 + 7;
        let pending: Vec<Pending> = (0..n)
            .map(|i| {
                let mut body = spool.begin(SystemTime::now()).unwrap();
                body.append(format!("message {i}\n").as_bytes()).unwrap();
                let id = body.id().to_string();
                spool.commit(body, &mut envelope_for(&id))
            })
            .collect();
        for p in pending {
            p.wait_blocking().unwrap();
        }
        let mut ids: Vec<String> = fs::read_dir(dir.path().join("queue"))
            .unwrap()
            .map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.trim_end_matches(".msg").to_string()
            })
            .collect();
        ids.sort();
        let damaged = ids.remove(n / 2);
        fs::write(spool.body_path(&damaged), b"no seal").unwrap();
        let report = spool.scan().unwrap();
        let loaded: Vec<String> = report.envelopes.into_iter().map(|e| e.id).collect();
        assert_eq!(loaded, ids);
        assert_eq!(report.corrupt.len(), 1);
        assert!(dir
            .path()
            .join("corrupt")
            .join(format!("{damaged}.msg"))
            .exists());
    }

    #[test]
    fn a_commit_never_replaces_a_queued_message_of_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(b"new\n").unwrap();
        let id = body.id().to_string();
        // As if a clock stepped back had repeated an id still queued.
        fs::write(spool.body_path(&id), b"queued before").unwrap();
        let refused = spool.commit(body, &mut envelope_for(&id)).wait_blocking();
        assert!(matches!(refused, Err(SpoolError::Io { .. })), "{refused:?}");
        assert_eq!(fs::read(spool.body_path(&id)).unwrap(), b"queued before");
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_rescan_leaves_messages_whose_commit_is_still_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(b"x\n").unwrap();
        let id = body.id().to_string();
        spool
            .commit(body, &mut envelope_for(&id))
            .wait_blocking()
            .unwrap();
        // Another process between its rename and its fsyncs holds the lock.
        let committing = File::open(spool.body_path(&id)).unwrap();
        committing.lock().unwrap();
        assert!(spool.scan_new(|_| false).unwrap().is_empty());
        drop(committing);
        let found = spool.scan_new(|_| false).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, id);
        // A queue file holding another message's envelope (a reused file
        // a power cut left as it was) is not taken for this one.
        let other = spool.body_path("0000000000004ZZ");
        fs::copy(spool.body_path(&id), &other).unwrap();
        let ids: Vec<String> = spool
            .scan_new(|_| false)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec![id]);
    }

    #[test]
    fn a_cut_or_damaged_seal_is_never_read_as_an_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(b"Subject: x\n\nbody\n").unwrap();
        let id = body.id().to_string();
        spool
            .commit(body, &mut envelope_for(&id))
            .wait_blocking()
            .unwrap();
        let path = spool.body_path(&id);
        let sealed = fs::read(&path).unwrap();
        for len in 0..sealed.len() {
            fs::write(&path, &sealed[..len]).unwrap();
            assert!(
                matches!(spool.read_envelope(&id), Err(SpoolError::Corrupt { .. })),
                "cut to {len}"
            );
        }
        // Bytes appended after the seal (a longer old file not cut).
        let mut longer = sealed.clone();
        longer.extend_from_slice(b"old bytes");
        fs::write(&path, &longer).unwrap();
        assert!(spool.read_envelope(&id).is_err());
        fs::write(&path, &sealed).unwrap();
        assert_eq!(spool.read_envelope(&id).unwrap().id, id);
    }

    #[test]
    fn after_a_reboot_bodies_are_read_against_their_envelopes() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        {
            let (spool, writer) = Spool::open(dir.path()).unwrap();
            for text in [&b"intact\n"[..], b"to be damaged\n"] {
                let mut body = spool.begin(SystemTime::now()).unwrap();
                body.append(text).unwrap();
                let id = body.id().to_string();
                spool
                    .commit(body, &mut envelope_for(&id))
                    .wait_blocking()
                    .unwrap();
                ids.push(id);
            }
            drop(spool);
            writer.join();
        }
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.scan().unwrap().envelopes.len(), 2);
        let boot_id = fs::read_to_string(dir.path().join("boot_id")).unwrap();
        assert_eq!(
            boot_id,
            fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
        );
        // What a power cut can leave of a commit in progress: the body's
        // bytes are not the ones written (here the first one is old).
        let damaged = spool.body_path(&ids[1]);
        let mut bytes = fs::read(&damaged).unwrap();
        bytes[0] = b'T';
        fs::write(&damaged, &bytes).unwrap();
        // Same boot: a process crash cannot do that, so bodies are not read.
        assert_eq!(spool.scan().unwrap().envelopes.len(), 2);
        // Another boot: every body is read; the damaged one is set aside.
        fs::write(dir.path().join("boot_id"), "an earlier boot").unwrap();
        let report = spool.scan().unwrap();
        let loaded: Vec<&str> = report.envelopes.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(loaded, vec![ids[0].as_str()]);
        assert!(
            matches!(
                &report.corrupt[..],
                [SpoolError::Corrupt { id, reason: EnvelopeError::BodyMismatch }] if *id == ids[1]
            ),
            "{:?}",
            report.corrupt
        );
        assert!(dir
            .path()
            .join("corrupt")
            .join(format!("{}.msg", ids[1]))
            .exists());
        assert_eq!(
            fs::read_to_string(dir.path().join("boot_id")).unwrap(),
            boot_id,
            "the check is recorded once done"
        );
    }

    #[test]
    fn messages_queued_before_bodies_were_sealed_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(dir.path()).unwrap();
        let id = "0000000000003ZZ";
        let queue = dir.path().join("queue");
        fs::write(queue.join(format!("{id}.msg")), b"a plain body\n").unwrap();
        let old = envelope::decode(&encode(&envelope_for(id))).unwrap();
        fs::write(queue.join(format!("{id}.env")), envelope::encode_v2(&old)).unwrap();
        fs::write(dir.path().join("boot_id"), "an earlier boot").unwrap();
        let report = spool.scan().unwrap();
        assert_eq!(report.envelopes, vec![old.clone()]);
        assert_eq!(report.envelopes[0].body_len(), None);
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

//! The durable queue. Its promise: `250` means the message survives kill -9
//! and power loss; a queue file is never visible before it is whole (a
//! power cut can leave one that was never acknowledged with old bytes:
//! start-up sets it aside); each delivery's fate is recorded on its own.
//!
//! Layout under the spool directory:
//! - `lock`: held exclusively by the one queue runner (`serve` or `runq`);
//! - `boot_id`: the machine's boot when the queue was last checked (see
//!   `Spool::scan`);
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
//!
//! The code follows a message's life: `incoming` (a body being received and
//! sealed), `commit_pool` (the rename and fsyncs behind a `250`), `writer`
//! (updates and removals), `scan` (reading the queue back), `lock` (one
//! queue runner per spool), `spare` (files kept for reuse), `envelope`
//! (the on-disk record) and `id` (queue ids).

mod accepted;
mod commit_pool;
pub mod envelope;
pub(crate) mod id;
mod incoming;
mod lock;
mod scan;
mod spare;
mod writer;

use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use tokio::sync::oneshot;

pub use envelope::{
    Attempt, AuthRecord, BodyCheck, Delivery, DeliveryState, Envelope, EnvelopeError,
};

use crate::protocol::session::StorageFailure;
#[cfg(test)]
use commit_pool::CommitStats;
use incoming::remove_abandoned;
pub(crate) use incoming::IncomingBody;
pub(crate) use lock::QueueLock;
pub use scan::read_queued;
pub(crate) use spare::Disposal;
use writer::Backlog;

/// Opens a spool file for reading without ever waiting on it: a FIFO or a
/// socket someone left in the spool would block a plain open (or a read)
/// for ever, and start-up with it. Anything but a regular file is refused
/// (`InvalidInput`); symbolic links are not followed.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    open_regular_sized(path).map(|(file, _)| file)
}

/// [`open_regular`], with the file's length as it was when opened (the
/// check already asked the system for it: a delivery asks once, not twice).
pub(crate) fn open_regular_sized(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    let metadata = file.metadata()?;
    if metadata.is_file() {
        // Needed only to open without waiting: reads of a regular file
        // block as usual (some network and FUSE file systems would
        // otherwise answer EAGAIN).
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((file, metadata.len()))
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// What can go wrong with the spool.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    // The OS error is in the message rather than the source chain: every
    // log line and reply prints this error alone.
    #[error("{context}: {error}")]
    Io {
        context: String,
        /// Shared: a failed write is reported to every message waiting on it.
        error: std::sync::Arc<std::io::Error>,
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
            error: std::sync::Arc::new(e),
            full,
        }
    }

    /// How a client hears of it: 452 4.3.1 when the disk is full, else 451 4.3.0.
    pub(crate) fn storage_failure(&self) -> StorageFailure {
        match self {
            SpoolError::Io { full: true, .. } => StorageFailure::Full,
            _ => StorageFailure::Unavailable,
        }
    }
}

struct Inner {
    root: PathBuf,
    incoming: PathBuf,
    queue: PathBuf,
    corrupt: PathBuf,
    backlog: Arc<Backlog>,
    commits: commit_pool::CommitPool,
    spares: Arc<spare::Spares>,
}

impl Drop for Inner {
    /// The last handle is gone: the writer finishes what waits, then stops.
    fn drop(&mut self) {
        self.backlog.close();
    }
}

/// A handle on an open spool; cheap to clone and shared by all actors.
#[derive(Clone)]
pub(crate) struct Spool {
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
pub(crate) struct SpoolWriter {
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

impl Spool {
    /// [`Spool::open_with`] with files reused, as by default.
    #[cfg(test)]
    pub fn open(root: &Path) -> Result<(Spool, SpoolWriter), SpoolError> {
        Self::open_with(root, true)
    }

    /// Opens (creating if needed) the spool at `root`, clears what crashed
    /// sessions left in `incoming/` and starts the writer thread. Any number
    /// of processes may write to one spool (`serve`, `inetd` sessions); only
    /// the holder of the [`QueueLock`] works the queue. `reuse_files`
    /// (`[spool] reuse_files`) keeps delivered messages' files for the next
    /// ones; without it `spare/` is emptied at once.
    pub fn open_with(root: &Path, reuse_files: bool) -> Result<(Spool, SpoolWriter), SpoolError> {
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
            spare::Spares::load(spare.clone(), reuse_files)
                .map_err(|e| SpoolError::io(format!("read {}", spare.display()), e))?,
        );
        // First: if it cannot start, no writer is left waiting for jobs.
        let commits = commit_pool::CommitPool::start(queue.clone())?;
        let backlog = Arc::new(Backlog::new());
        let writer_backlog = Arc::clone(&backlog);
        let writer_queue = queue.clone();
        let writer_spares = Arc::clone(&spares);
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer::run(writer_backlog, writer_queue, writer_spares))
            .map_err(|e| SpoolError::io("start spool writer thread", e))?;
        let spool = Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                incoming,
                queue,
                corrupt,
                backlog,
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

    /// What commits have done so far (tests: commits must overlap).
    #[cfg(test)]
    pub fn commit_stats(&self) -> &CommitStats {
        self.inner.commits.stats()
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
    /// An update of a message still waiting for the writer is replaced by
    /// the newer one (each envelope is the whole of what is known about the
    /// message); both resolve once the newer is durable.
    pub fn update(&self, envelope: Envelope) -> Pending {
        let (reply, answer) = oneshot::channel();
        self.inner.backlog.update(envelope, reply);
        Pending(answer)
    }

    /// Removes a message from the queue. Resolves once the removal is
    /// durable: the directory fsync that makes it survive a power cut is
    /// shared with other removals (within 10 ms) or with the next batch of
    /// updates. A power cut before it brings the message back to be
    /// delivered again: mail is never lost that way, at worst delivered
    /// twice, as it is anyway when a power cut falls between a program's
    /// exit and its record.
    ///
    /// Removals are written before any update waiting with them.
    pub fn remove(&self, id: &str, disposal: Disposal) -> Pending {
        let (reply, answer) = oneshot::channel();
        self.inner.backlog.remove(id.to_string(), disposal, reply);
        Pending(answer)
    }

    /// Whether the spool keeps up with its disk: fewer messages than the
    /// intake limit wait for the writer and for the commit pool. Intake
    /// waits while it does not ([`Spool::wait_for_intake_room`]), so what
    /// waits in memory for a slow disk stays bounded.
    pub fn has_intake_room(&self) -> bool {
        let limit = self.inner.backlog.limit();
        self.inner.backlog.len() < limit && self.inner.commits.waiting() < limit
    }

    /// Waits, for at most the intake wait (20 s), until
    /// [`Spool::has_intake_room`]; false if it did not come.
    pub async fn wait_for_intake_room(&self) -> bool {
        self.has_intake_room()
            || self
                .inner
                .backlog
                .wait_for_room(|| self.has_intake_room())
                .await
    }

    /// Test hooks: a smaller intake bound, and a writer held before its next
    /// batch (a disk that stops answering) until released.
    #[cfg(test)]
    pub fn set_intake_bound(&self, limit: usize, wait: std::time::Duration) {
        self.inner.backlog.set_bound(limit, wait);
    }

    #[cfg(test)]
    pub fn hold_writer(&self, held: bool) {
        self.inner.backlog.hold(held);
    }

    /// Where a queued message's body is.
    pub fn body_path(&self, id: &str) -> PathBuf {
        self.inner.queue.join(format!("{id}.msg"))
    }

    /// Reads one queued envelope (see [`read_queued`]).
    pub fn read_envelope(&self, id: &str) -> Result<Envelope, SpoolError> {
        read_queued(&self.inner.queue, id)
    }
}

/// The answer to a writer job.
#[must_use = "the change is durable only once this resolves to Ok"]
pub(crate) struct Pending(oneshot::Receiver<Result<(), SpoolError>>);

impl Pending {
    /// Waits asynchronously.
    pub async fn wait(self) -> Result<(), SpoolError> {
        self.0.await.unwrap_or(Err(SpoolError::WriterGone))
    }

    /// Waits on a thread that is not running async tasks.
    #[cfg(test)]
    pub fn wait_blocking(self) -> Result<(), SpoolError> {
        self.0
            .blocking_recv()
            .unwrap_or(Err(SpoolError::WriterGone))
    }
}

#[cfg(test)]
mod tests {
    use super::scan::{in_parallel, SCAN_MIN_PER_THREAD};
    use super::*;
    use crate::aliases::Target;
    use envelope::encode;
    use std::fs::File;
    use std::time::Duration;

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

        spool
            .remove(&id, Disposal::Recycle)
            .wait_blocking()
            .unwrap();
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
    fn a_removal_is_answered_and_its_files_reused_only_once_it_is_durable() {
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
        let removal = spool.remove(&id, Disposal::Recycle);
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
        // The answer comes only after that fsync: the file is reusable at
        // once, which it is only once the removal is durable.
        removal.wait_blocking().unwrap();
        let body = spool.begin(SystemTime::now()).unwrap();
        assert_eq!(
            fs::metadata(body.path()).unwrap().ino(),
            old_inode,
            "the removal was answered before it was durable"
        );
    }

    #[test]
    fn a_messages_waiting_updates_coalesce_into_its_newest_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(dir.path()).unwrap();
        let kept = commit_text(&spool, b"kept\n");
        let gone = commit_text(&spool, b"gone\n");
        let mut envelope = spool.read_envelope(&kept).unwrap();
        // A disk that does not answer: what waits for it must not grow
        // with each result.
        spool.hold_writer(true);
        let mut answers = Vec::new();
        for n in 0..50 {
            envelope.deliveries[0].last_error = format!("attempt {n}");
            answers.push(spool.update(envelope.clone()));
        }
        answers.push(spool.remove(&gone, Disposal::Erase));
        assert_eq!(
            spool.inner.backlog.len(),
            2,
            "one envelope of one message, and one removal"
        );
        spool.hold_writer(false);
        for answer in answers {
            answer.wait_blocking().unwrap();
        }
        assert_eq!(
            spool.read_envelope(&kept).unwrap().deliveries[0].last_error,
            "attempt 49",
            "the newest envelope is the one written"
        );
        assert!(matches!(
            spool.read_envelope(&gone),
            Err(SpoolError::NotFound(_))
        ));
        drop(spool);
        writer.join();
    }

    #[test]
    fn intake_has_room_until_the_writer_falls_behind_and_again_once_it_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..3).map(|_| commit_text(&spool, b"x\n")).collect();
        spool.set_intake_bound(3, Duration::from_millis(200));
        spool.hold_writer(true);
        let answers: Vec<Pending> = ids
            .iter()
            .map(|id| spool.update(spool.read_envelope(id).unwrap()))
            .collect();
        assert!(!spool.has_intake_room(), "three waiting, at a limit of 3");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        assert!(!rt.block_on(spool.wait_for_intake_room()));
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Released while someone waits: the wait ends with room.
        let releaser = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                spool.hold_writer(false);
            })
        };
        spool.set_intake_bound(3, Duration::from_secs(20));
        assert!(rt.block_on(spool.wait_for_intake_room()));
        releaser.join().unwrap();
        for answer in answers {
            answer.wait_blocking().unwrap();
        }
        assert!(spool.has_intake_room());
        drop(spool);
        writer.join();
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
                ids.push(commit_text(&spool, text));
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

    /// Runs `f` on a thread of its own; `None` if it has not ended in 10 s
    /// (the thread is left behind, blocked where it hung).
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Queues a message holding `text`; its id.
    fn commit_text(spool: &Spool, text: &[u8]) -> String {
        let mut body = spool.begin(SystemTime::now()).unwrap();
        body.append(text).unwrap();
        let id = body.id().to_string();
        spool
            .commit(body, &mut envelope_for(&id))
            .wait_blocking()
            .unwrap();
        id
    }

    /// A spool at `root` holding one queued message, closed again; its id.
    fn one_queued_message(root: &Path) -> String {
        let (spool, writer) = Spool::open(root).unwrap();
        let id = commit_text(&spool, b"");
        drop(spool);
        writer.join();
        id
    }

    #[test]
    fn what_is_not_a_regular_file_is_set_aside_and_never_waited_on() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let queued = one_queued_message(dir.path());
        let queue = dir.path().join("queue");
        let odd = [
            "0000000000001AA.msg",
            "0000000000002AA.msg",
            "0000000000003AA.env",
            "0000000000004AA.msg",
        ];
        nix::unistd::mkfifo(&queue.join(odd[0]), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(queue.join(odd[1])).unwrap();
        nix::unistd::mkfifo(&queue.join(odd[2]), nix::sys::stat::Mode::S_IRWXU).unwrap();
        symlink("/dev/zero", queue.join(odd[3])).unwrap();
        // A FIFO in incoming/ too: start-up's clean-up must not wait on it.
        nix::unistd::mkfifo(
            &dir.path().join("incoming").join("0000000000005AA.msg"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        let root = dir.path().to_path_buf();
        let report = within_seconds(move || {
            let (spool, _writer) = Spool::open(&root).unwrap();
            spool.scan().unwrap()
        })
        .expect("start-up waited on a FIFO or a socket");
        let loaded: Vec<&str> = report.envelopes.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(loaded, vec![queued.as_str()]);
        let mut set_aside = report.set_aside.clone();
        set_aside.sort();
        assert_eq!(
            set_aside,
            vec![
                format!("queue/{} is a FIFO", odd[0]),
                format!("queue/{} is a socket", odd[1]),
                format!("queue/{} is a FIFO", odd[2]),
                format!("queue/{} is a symbolic link", odd[3]),
            ]
        );
        for name in odd {
            assert!(
                fs::symlink_metadata(dir.path().join("corrupt").join(name)).is_ok(),
                "{name}"
            );
            assert!(fs::symlink_metadata(queue.join(name)).is_err(), "{name}");
        }
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn every_leftover_is_named_and_what_may_be_mail_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let queued = one_queued_message(dir.path());
        let queue = dir.path().join("queue");
        // A fresh unfinished update (the queue lock is ours: nobody else
        // is writing it), an envelope without its message, and a file of a
        // name mailnode never writes.
        fs::write(queue.join(format!("{queued}.env.tmp")), b"half").unwrap();
        fs::write(
            queue.join("0000000000009ZZ.env"),
            encode(&envelope_for("0000000000009ZZ")),
        )
        .unwrap();
        fs::write(queue.join("urgent.eml"), b"Subject: by hand\n\nkeep me\n").unwrap();
        // A name like a queue file's that is no queue id.
        fs::write(queue.join("urgent.msg"), b"Subject: also by hand\n").unwrap();
        // An earlier start-up set aside a file of the same name: kept too.
        fs::write(dir.path().join("corrupt/urgent.eml"), b"earlier").unwrap();
        let (spool, _writer) = Spool::open(dir.path()).unwrap();
        let report = spool.scan().unwrap();
        assert_eq!(report.envelopes.len(), 1);
        assert_eq!(
            report.removed,
            vec![
                format!("queue/{queued}.env.tmp, an unfinished envelope update"),
                "queue/0000000000009ZZ.env, the envelope of a message already removed".to_string(),
            ]
        );
        let mut set_aside = report.set_aside.clone();
        set_aside.sort();
        assert_eq!(
            set_aside,
            vec![
                "queue/urgent.eml is no queue file".to_string(),
                "queue/urgent.msg is no queue file".to_string(),
            ]
        );
        assert_eq!(
            fs::read(dir.path().join("corrupt/urgent.eml")).unwrap(),
            b"earlier"
        );
        assert_eq!(
            fs::read(dir.path().join("corrupt/urgent.eml.1")).unwrap(),
            b"Subject: by hand\n\nkeep me\n"
        );
        assert_eq!(
            fs::read(dir.path().join("corrupt/urgent.msg")).unwrap(),
            b"Subject: also by hand\n"
        );
        let mut left: Vec<String> = fs::read_dir(&queue)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![format!("{queued}.msg")]);
    }

    #[test]
    fn erased_mail_and_a_spool_without_reuse_keep_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        let spare = dir.path().join("spare");
        let spares = || fs::read_dir(&spare).unwrap().count();
        {
            let (spool, writer) = Spool::open_with(dir.path(), true).unwrap();
            let delivered = commit_text(&spool, b"delivered\n");
            let deleted = commit_text(&spool, b"deleted\n");
            spool
                .remove(&delivered, Disposal::Recycle)
                .wait_blocking()
                .unwrap();
            spool
                .remove(&deleted, Disposal::Erase)
                .wait_blocking()
                .unwrap();
            // The delivered message's file waits in spare/; the deleted one's
            // is nowhere.
            assert!(spare.join(format!("{delivered}.msg")).exists());
            assert!(!spare.join(format!("{deleted}.msg")).exists());
            assert!(!spool.body_path(&deleted).exists());
            assert_eq!(spares(), 1);
            drop(spool);
            writer.join();
        }
        // Without reuse: spare/ is emptied at start, and nothing is kept.
        let (spool, _writer) = Spool::open_with(dir.path(), false).unwrap();
        assert_eq!(spares(), 0);
        let delivered = commit_text(&spool, b"delivered too\n");
        spool
            .remove(&delivered, Disposal::Recycle)
            .wait_blocking()
            .unwrap();
        assert_eq!(spares(), 0);
        assert!(!spool.body_path(&delivered).exists());
    }
}

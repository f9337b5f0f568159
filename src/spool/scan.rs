//! Reading the queue: one message's envelope (updated, or sealed in its
//! queue file), start-up's scan of every message (in parallel, checking
//! bodies after a reboot, setting damaged ones aside), and the rescan
//! that picks up what other processes queued.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::incoming::{is_locked, SEAL_MARK, TRAILER_LEN};
use super::{envelope, id, BodyCheck, Envelope, EnvelopeError, Spool, SpoolError};

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
    let sealed = match super::open_regular(&path).and_then(|mut f| {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).map(|_| bytes)
    }) {
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
    let file = super::open_regular(path)?;
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
    let mut body = super::open_regular(path)?.take(check.len);
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

/// What `scan` found in `queue/`.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub envelopes: Vec<Envelope>,
    /// Damaged messages, moved to `corrupt/`.
    pub corrupt: Vec<SpoolError>,
    /// Updated envelopes whose message a removal had already taken,
    /// removed.
    pub orphans_removed: usize,
    /// What was found in `queue/` that is not a queue file (a FIFO, a
    /// socket, a link, a directory, a name mailnode never writes), each
    /// moved to `corrupt/`, as `queue/NAME is ...`.
    pub set_aside: Vec<String>,
    /// Leftovers of crashes that hold no mail, deleted, as `queue/NAME, why`.
    pub removed: Vec<String>,
}

impl ScanReport {
    /// Names in the log, one line each, the damaged messages start-up moved
    /// to `corrupt/` (what else it set aside or removed is logged as it
    /// happens, so the log has it even if start-up then fails).
    pub(crate) fn log_damaged(&self) {
        for damaged in &self.corrupt {
            tracing::error!("{damaged}; moved to corrupt/");
        }
    }
}

impl Spool {
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

    /// Reads every queued envelope (start-up, with the queue lock held).
    /// Removes leftovers of crashes (updated envelopes of removed messages,
    /// half-written updates) and moves damaged messages and whatever is not
    /// a queue file to `corrupt/`; the report names each.
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
        let mut report = ScanReport::default();
        for entry in entries {
            let entry =
                entry.map_err(|e| SpoolError::io(format!("read {}", queue.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let queued_id = |suffix| name.strip_suffix(suffix).filter(|id| id::is_valid_id(id));
            if let Some(kind) = not_a_file(&entry) {
                // Nothing mailnode writes; opening a FIFO would wait for a
                // writer for ever. Set aside where an operator looks.
                self.set_aside(&entry, format!("queue/{name} is a {kind}"), &mut report);
            } else if let Some(id) = queued_id(".msg") {
                message_ids.push(id.to_string());
            } else if let Some(id) = queued_id(".env") {
                updated_ids.push(id.to_string());
            } else if queued_id(".env.tmp").is_some() {
                // Only the holder of the queue lock (we are) updates
                // envelopes: this is an update a crash cut short, and the
                // envelope it was replacing is still in place.
                let _ = fs::remove_file(entry.path());
                let leftover = format!("queue/{name}, an unfinished envelope update");
                tracing::info!("removed {leftover}");
                report.removed.push(leftover);
            } else {
                // Not a name mailnode writes; it may be mail someone put
                // here by hand. Kept where an operator looks.
                self.set_aside(
                    &entry,
                    format!("queue/{name} is no queue file"),
                    &mut report,
                );
            }
        }
        message_ids.sort();
        for id in &updated_ids {
            // A removal takes the message first, its updated envelope
            // second: alone, the envelope is a crash's leftover.
            if message_ids.binary_search(id).is_err() && !self.body_path(id).exists() {
                let _ = fs::remove_file(queue.join(format!("{id}.env")));
                report.orphans_removed += 1;
                let leftover = format!("queue/{id}.env, the envelope of a message already removed");
                tracing::info!("removed {leftover}");
                report.removed.push(leftover);
            }
        }
        let boot = BootId::check(&self.inner.root);
        // Reading is most of a start-up with a long queue, and waits for
        // the disk when the page cache is cold (after a reboot): several
        // readers keep it busy. Every verdict on a message comes before any
        // message moves, so an unreadable one stops start-up with no
        // message half set aside.
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

impl Spool {
    /// Moves a stray entry of `queue/` to `corrupt/`, under a name of its
    /// own there (never over an earlier one), and logs it. One that cannot
    /// be moved is left in place with an error logged: it is not mail the
    /// node would deliver, so it does not stop start-up.
    fn set_aside(&self, entry: &fs::DirEntry, what: String, report: &mut ScanReport) {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        let name = entry.file_name();
        let mut to = self.inner.corrupt.join(&name);
        for n in 1..=100 {
            match renameat2(
                AT_FDCWD,
                &entry.path(),
                AT_FDCWD,
                &to,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {
                    tracing::error!("{what}; moved to {}", to.display());
                    report.set_aside.push(what);
                    return;
                }
                Err(Errno::EEXIST) => {
                    let mut numbered = name.clone();
                    numbered.push(format!(".{n}"));
                    to = self.inner.corrupt.join(numbered);
                }
                Err(e) => {
                    tracing::error!("{what}; cannot move it to corrupt/ ({e}), left in place");
                    return;
                }
            }
        }
        tracing::error!("{what}; corrupt/ holds 100 of that name, left in place");
    }
}

/// What kind of thing a directory entry is, if not a regular file (a
/// symbolic link counts as not one: it is never followed).
fn not_a_file(entry: &fs::DirEntry) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = entry.file_type().ok()?;
    Some(if kind.is_file() {
        return None;
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_dir() {
        "directory"
    } else {
        "device"
    })
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
pub(super) const SCAN_MIN_PER_THREAD: usize = 256;

/// `judge` of every id, in order, spread over up to [`SCAN_THREADS`]
/// threads (fewer if the system will not start them).
pub(super) fn in_parallel<T: Send>(ids: &[String], judge: impl Fn(&str) -> T + Sync) -> Vec<T> {
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

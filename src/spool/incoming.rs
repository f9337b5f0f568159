//! A message body being received into `incoming/`, sealed into a queue
//! file at commit; and start-up's clean-up of bodies no session holds.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{BodyCheck, SpoolError};

/// The end of a sealed queue file: the envelope's length and this mark.
pub(super) const SEAL_MARK: &[u8; 4] = b"MNQT";
pub(super) const TRAILER_LEN: u64 = 8;

/// A message body being received into `incoming/`. Dropped without a
/// successful commit, it removes its file, wherever the commit had moved
/// it: a message that was never acknowledged leaves nothing behind.
#[derive(Debug)]
pub struct IncomingBody {
    pub(super) id: String,
    /// Where the body is now: `incoming/`, or `queue/` once a commit has
    /// renamed it there.
    pub(super) path: PathBuf,
    /// Open from creation to the end of the commit: its lock keeps other
    /// processes' start-up clean-up away.
    pub(super) file: BufWriter<File>,
    /// Bytes written to the file so far (with the seal, once sealed).
    pub(super) written: u64,
    /// CRC-32 of the body's bytes, for the envelope's [`BodyCheck`].
    pub(super) crc: crc32fast::Hasher,
    /// A reused file's length before: bytes past `written` are old and cut
    /// before anything reads or fsyncs the body.
    pub(super) old_len: u64,
    pub(super) committed: bool,
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
    pub(super) fn check(&self) -> BodyCheck {
        BodyCheck {
            len: self.written,
            crc32: self.crc.clone().finalize(),
        }
    }

    /// Ends the file with the encoded envelope and the trailer, and flushes
    /// it: the file is now a queue file, ready to be renamed and fsynced.
    pub(super) fn seal(&mut self, envelope: &[u8]) -> Result<(), SpoolError> {
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

    pub(super) fn mark_committed(&mut self) {
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

/// Removes bodies no live session holds (each holds an exclusive lock on
/// its body), and envelopes older versions left there.
pub(super) fn remove_abandoned(incoming: &Path) -> Result<(), SpoolError> {
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
pub(super) fn is_locked(path: &Path) -> bool {
    super::open_regular(path)
        .map(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
        .unwrap_or(false)
}

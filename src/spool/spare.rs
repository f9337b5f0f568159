//! Recycled spool files.
//!
//! Creating a file is the dearest file-system operation a queued message
//! costs: ext4 allocates the inode by walking its inode table past every
//! recently deleted one, about 0.4 ms of CPU per file on a spool that
//! creates and deletes thousands of files a minute (measured with `perf`;
//! renames and opens of existing files cost about 20 µs). So the files of a
//! delivered message are not unlinked but renamed into `spare/`, and a new
//! message's files are renamed out of it and overwritten in place: the
//! blocks are already allocated, so writing and fsyncing a message of a
//! similar size changes no file-system metadata and needs no journal
//! commit (truncating first cost a fifth more per fsync). The writer of a
//! reused file cuts it to its new length before the fsync ([`Fresh`]).
//!
//! Nothing about durability changes: a spare is never part of the queue
//! (a retired file becomes reusable only after the directory fsync that made
//! its removal durable, see [`Retired`]), and every rename into `queue/` is
//! still followed by a directory fsync. Like unlinked files' blocks, spares
//! keep old bytes until overwritten, inside the spool's private
//! directories; only files up to [`MAX_SPARE_SIZE`] are kept, at most
//! [`MAX_SPARES`] of them. Only delivered messages are recycled: one deleted
//! by an operator or returned to its sender is unlinked, and with
//! `[spool] reuse_files = false` every file is, and `spare/` is emptied.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

/// Enough spares for the files of the messages a busy node has in flight.
pub(super) const MAX_SPARES: usize = 1024;
/// Larger files are unlinked, so `spare/` never holds much disk space.
pub(super) const MAX_SPARE_SIZE: u64 = 64 * 1024;

/// A file opened for new content, perhaps a spare with old bytes past
/// whatever is written now: [`Fresh::cut`] to the written length before
/// the content is read or fsynced.
#[derive(Debug)]
pub(super) struct Fresh {
    pub file: File,
    pub old_len: u64,
}

impl Fresh {
    /// Drops old bytes beyond `len` (a no-op for a new file or a longer
    /// content, which overwrote them all).
    pub(super) fn cut(&self, len: u64) -> std::io::Result<()> {
        if self.old_len > len {
            self.file.set_len(len)?;
        }
        Ok(())
    }
}

/// Whether a new file must not replace one already at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    /// Refuse (`AlreadyExists`): the path is a fresh message's.
    Refuse,
    /// Truncate it: a leftover temporary file of an interrupted update.
    Truncate,
}

/// What becomes of a removed message's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposal {
    /// Delivered: its files may hold the next messages (when
    /// `[spool] reuse_files` is on).
    Recycle,
    /// Deleted by an operator or returned to its sender: unlinked, so no
    /// copy of it stays in `spare/`.
    Erase,
}

/// A file moved to `spare/` whose removal from `queue/` is not yet durable.
#[derive(Debug)]
pub(super) struct Retired(PathBuf, u64);

pub(super) struct Spares {
    dir: PathBuf,
    /// `[spool] reuse_files`.
    reuse: bool,
    /// Each spare with its length.
    names: Mutex<Vec<(PathBuf, u64)>>,
}

impl Spares {
    /// Takes stock of `dir` (created by the caller). Files beyond the
    /// limits, from a node that ran with larger ones, are removed; without
    /// `reuse`, all of them are.
    pub(super) fn load(dir: PathBuf, reuse: bool) -> std::io::Result<Spares> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            match fs::symlink_metadata(&path) {
                Ok(m)
                    if reuse
                        && m.is_file()
                        && m.len() <= MAX_SPARE_SIZE
                        && names.len() < MAX_SPARES =>
                {
                    names.push((path, m.len()));
                }
                _ => {
                    let _ = fs::remove_file(path);
                }
            }
        }
        Ok(Spares {
            dir,
            reuse,
            names: Mutex::new(names),
        })
    }

    fn take(&self) -> Option<(PathBuf, u64)> {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn give_back(&self, name: (PathBuf, u64)) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name);
    }

    /// Opens `path` for writing as a new file with mode 0600, made from a
    /// spare when there is one.
    pub(super) fn create(&self, path: &Path, existing: Existing) -> std::io::Result<Fresh> {
        while let Some((spare, old_len)) = self.take() {
            match renameat2(
                AT_FDCWD,
                &spare,
                AT_FDCWD,
                path,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {
                    return match OpenOptions::new().write(true).open(path) {
                        Ok(file) => Ok(Fresh { file, old_len }),
                        Err(e) => {
                            // Not left at a path its caller will not own.
                            let _ = fs::remove_file(path);
                            Err(e)
                        }
                    };
                }
                // Another process sharing the spool took it first.
                Err(Errno::ENOENT) => continue,
                Err(Errno::EEXIST) => {
                    self.give_back((spare, old_len));
                    break;
                }
                // A file system without RENAME_NOREPLACE, or trouble with
                // this spare: create the file the ordinary way.
                Err(_) => break,
            }
        }
        let mut open = OpenOptions::new();
        open.write(true).mode(0o600);
        match existing {
            Existing::Refuse => open.create_new(true),
            Existing::Truncate => open.create(true).truncate(true),
        };
        Ok(Fresh {
            file: open.open(path)?,
            old_len: 0,
        })
    }

    /// Takes a file out of `queue/`: moved to `spare/` if `recycle` allows
    /// it, reuse is on, the file is small and there is room; else unlinked.
    /// A file already gone is not an error.
    ///
    /// A moved file comes back as a [`Retired`], not yet reusable: until a
    /// directory fsync of `queue/` has made its removal durable, a power cut
    /// could bring the old entry back, and it must not then point at a new
    /// message's bytes. The writer hands it to [`Spares::release`] after
    /// that fsync.
    pub(super) fn retire(
        &self,
        path: &Path,
        recycle: Disposal,
    ) -> std::io::Result<Option<Retired>> {
        let room = self.reuse && recycle == Disposal::Recycle && {
            let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            names.len() < MAX_SPARES
        };
        let small = fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.is_file() && m.len() <= MAX_SPARE_SIZE)
            .map(|m| m.len());
        if let (true, Some(len)) = (room, small) {
            if let Some(name) = path.file_name() {
                let spare = self.dir.join(name);
                match renameat2(
                    AT_FDCWD,
                    path,
                    AT_FDCWD,
                    &spare,
                    RenameFlags::RENAME_NOREPLACE,
                ) {
                    Ok(()) => return Ok(Some(Retired(spare, len))),
                    Err(Errno::ENOENT) => return Ok(None),
                    // Fall back to unlinking.
                    Err(_) => {}
                }
            }
        }
        match fs::remove_file(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            other => other.map(|()| None),
        }
    }

    /// Makes retired files reusable, now that their removal from `queue/`
    /// is durable. Beyond the pool's size they are unlinked.
    pub(super) fn release(&self, retired: impl IntoIterator<Item = Retired>) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        for Retired(path, len) in retired {
            if names.len() < MAX_SPARES {
                names.push((path, len));
            } else {
                let _ = fs::remove_file(path);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn count(&self) -> usize {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    fn spares_in(tmp: &Path) -> Spares {
        let dir = tmp.join("spare");
        fs::create_dir_all(&dir).unwrap();
        Spares::load(dir, true).unwrap()
    }

    #[test]
    fn a_retired_file_is_reused_and_cut_to_its_new_content() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = spares_in(tmp.path());
        let old = tmp.path().join("old.msg");
        fs::write(&old, b"yesterday's mail").unwrap();
        let inode = fs::metadata(&old).unwrap().ino();
        let retired = spares.retire(&old, Disposal::Recycle).unwrap();
        assert_eq!(spares.count(), 0, "reusable before the removal is durable");
        spares.release(retired);
        assert!(!old.exists());
        assert_eq!(spares.count(), 1);

        let new = tmp.path().join("new.msg");
        let mut fresh = spares.create(&new, Existing::Refuse).unwrap();
        fresh.file.write_all(b"today").unwrap();
        fresh.cut(5).unwrap();
        drop(fresh);
        assert_eq!(fs::metadata(&new).unwrap().ino(), inode, "not recycled");
        let mut content = String::new();
        File::open(&new)
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "today", "old bytes were left");
        assert_eq!(spares.count(), 0);
    }

    #[test]
    fn a_fresh_path_is_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = spares_in(tmp.path());
        let spare_source = tmp.path().join("s.env");
        fs::write(&spare_source, b"x").unwrap();
        let retired = spares.retire(&spare_source, Disposal::Recycle).unwrap();
        spares.release(retired);
        let taken = tmp.path().join("taken.msg");
        fs::write(&taken, b"someone else's").unwrap();
        let err = spares.create(&taken, Existing::Refuse).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&taken).unwrap(), b"someone else's");
        assert_eq!(spares.count(), 1, "the spare was lost");
        // A leftover temporary file is replaced when asked to.
        spares.create(&taken, Existing::Truncate).unwrap();
        assert_eq!(fs::read(&taken).unwrap(), b"");
    }

    #[test]
    fn large_files_and_a_full_pool_are_unlinked() {
        let tmp = tempfile::tempdir().unwrap();
        let spare_dir = tmp.path().join("spare");
        fs::create_dir_all(&spare_dir).unwrap();
        // Left by a node that kept larger spares.
        fs::write(
            spare_dir.join("huge.msg"),
            vec![b'x'; MAX_SPARE_SIZE as usize + 1],
        )
        .unwrap();
        fs::write(spare_dir.join("small.msg"), b"x").unwrap();
        let spares = Spares::load(spare_dir.clone(), true).unwrap();
        assert_eq!(spares.count(), 1);
        assert!(!spare_dir.join("huge.msg").exists());

        let big = tmp.path().join("big.msg");
        fs::write(&big, vec![b'x'; MAX_SPARE_SIZE as usize + 1]).unwrap();
        assert!(spares.retire(&big, Disposal::Recycle).unwrap().is_none());
        assert!(!big.exists());
        assert!(!spare_dir.join("big.msg").exists());
        assert_eq!(spares.count(), 1);
        spares
            .retire(&tmp.path().join("gone.msg"), Disposal::Recycle)
            .unwrap();

        for n in spares.count()..MAX_SPARES {
            spares.give_back((spare_dir.join(format!("placeholder{n}")), 0));
        }
        let extra = tmp.path().join("extra.msg");
        fs::write(&extra, b"x").unwrap();
        let retired = spares.retire(&extra, Disposal::Recycle).unwrap();
        spares.release(retired);
        assert!(!extra.exists());
        assert!(!spare_dir.join("extra.msg").exists());
    }

    #[test]
    fn a_spare_taken_by_another_process_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = spares_in(tmp.path());
        for name in ["a.msg", "b.msg"] {
            let path = tmp.path().join(name);
            fs::write(&path, b"x").unwrap();
            let retired = spares.retire(&path, Disposal::Recycle).unwrap();
            spares.release(retired);
        }
        // The other process renames the most recent spare away.
        fs::remove_file(tmp.path().join("spare/b.msg")).unwrap();
        let new = tmp.path().join("new.msg");
        spares.create(&new, Existing::Refuse).unwrap();
        assert!(new.exists());
        assert!(!tmp.path().join("spare/a.msg").exists());
    }
}

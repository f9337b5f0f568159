//! Recycled spool files.
//!
//! Creating a file is the dearest file-system operation a queued message
//! costs: ext4 allocates the inode by walking its inode table past every
//! recently deleted one, about 0.4 ms of CPU per file on a spool that
//! creates and deletes thousands of files a minute (measured with `perf`;
//! renames and opens of existing files cost about 20 µs). So the files of a
//! delivered message are not unlinked but renamed into `spare/` and
//! truncated there (by the writer thread, off the sessions' path), and a new
//! message's files are renamed out of it. Nothing about durability changes:
//! a spare is never part of the queue, and every rename into `queue/` is
//! still followed by the batch's directory fsync. Spares are empty: no mail
//! lingers in `spare/`, and it holds at most [`MAX_SPARES`] inodes.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

/// Enough spares for the files of the messages a busy node has in flight.
pub(super) const MAX_SPARES: usize = 1024;

/// Whether a new file must not replace one already at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    /// Refuse (`AlreadyExists`): the path is a fresh message's.
    Refuse,
    /// Truncate it: a leftover temporary file of an interrupted update.
    Truncate,
}

pub(super) struct Spares {
    dir: PathBuf,
    names: Mutex<Vec<PathBuf>>,
}

impl Spares {
    /// Takes stock of `dir` (created by the caller). Files beyond the limit,
    /// from a node that ran with a larger one, are removed, and one a crash
    /// left untruncated is emptied.
    pub(super) fn load(dir: PathBuf) -> std::io::Result<Spares> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if names.len() < MAX_SPARES && empty(&path).is_ok() {
                names.push(path);
            } else {
                let _ = fs::remove_file(path);
            }
        }
        Ok(Spares {
            dir,
            names: Mutex::new(names),
        })
    }

    fn take(&self) -> Option<PathBuf> {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn give_back(&self, name: PathBuf) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name);
    }

    /// Opens `path` for writing as a new, empty file with mode 0600, made
    /// from a spare when there is one.
    pub(super) fn create(&self, path: &Path, existing: Existing) -> std::io::Result<File> {
        while let Some(spare) = self.take() {
            match renameat2(
                AT_FDCWD,
                &spare,
                AT_FDCWD,
                path,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                // Spares are empty already: no truncation (and no wait for
                // the file system's journal) here, on a session's path.
                Ok(()) => return OpenOptions::new().write(true).open(path),
                // Another process sharing the spool took it first.
                Err(Errno::ENOENT) => continue,
                Err(Errno::EEXIST) => {
                    self.give_back(spare);
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
        open.open(path)
    }

    /// Takes a file out of use: moved out of the way and emptied as a spare
    /// if there is room, else unlinked. A file already gone is not an error.
    pub(super) fn retire(&self, path: &Path) -> std::io::Result<()> {
        let keep = {
            let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            names.len() < MAX_SPARES
        };
        if keep {
            if let Some(name) = path.file_name() {
                let spare = self.dir.join(name);
                match renameat2(
                    AT_FDCWD,
                    path,
                    AT_FDCWD,
                    &spare,
                    RenameFlags::RENAME_NOREPLACE,
                ) {
                    // Out of the queue first, then emptied: a crash in
                    // between leaves a spare that load() empties.
                    Ok(()) => {
                        if empty(&spare).is_ok() {
                            self.give_back(spare);
                        } else {
                            let _ = fs::remove_file(&spare);
                        }
                        return Ok(());
                    }
                    Err(Errno::ENOENT) => return Ok(()),
                    // Fall back to unlinking.
                    Err(_) => {}
                }
            }
        }
        match fs::remove_file(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
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

/// Truncates a regular file to nothing.
fn empty(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > 0 {
        OpenOptions::new().write(true).open(path)?.set_len(0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    fn spares_in(tmp: &Path) -> Spares {
        let dir = tmp.join("spare");
        fs::create_dir_all(&dir).unwrap();
        Spares::load(dir).unwrap()
    }

    #[test]
    fn a_retired_file_comes_back_empty_under_its_new_name() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = spares_in(tmp.path());
        let old = tmp.path().join("old.msg");
        fs::write(&old, b"yesterday's mail").unwrap();
        let inode = fs::metadata(&old).unwrap().ino();
        spares.retire(&old).unwrap();
        assert!(!old.exists());
        assert_eq!(spares.count(), 1);

        let new = tmp.path().join("new.msg");
        let mut f = spares.create(&new, Existing::Refuse).unwrap();
        f.write_all(b"today").unwrap();
        drop(f);
        assert_eq!(fs::metadata(&new).unwrap().ino(), inode, "not recycled");
        let mut content = String::new();
        File::open(&new)
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "today");
        assert_eq!(spares.count(), 0);
    }

    #[test]
    fn a_fresh_path_is_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = spares_in(tmp.path());
        let spare_source = tmp.path().join("s.env");
        fs::write(&spare_source, b"x").unwrap();
        spares.retire(&spare_source).unwrap();
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
    fn spares_hold_no_mail_and_a_full_pool_unlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let spare_dir = tmp.path().join("spare");
        fs::create_dir_all(&spare_dir).unwrap();
        // A crash between the move and the truncation left one full.
        fs::write(spare_dir.join("crashed.msg"), b"old mail").unwrap();
        let spares = Spares::load(spare_dir.clone()).unwrap();
        assert_eq!(fs::read(spare_dir.join("crashed.msg")).unwrap(), b"");
        let big = tmp.path().join("big.msg");
        fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
        spares.retire(&big).unwrap();
        assert!(!big.exists());
        assert_eq!(fs::read(spare_dir.join("big.msg")).unwrap(), b"");
        assert_eq!(spares.count(), 2);
        spares.retire(&tmp.path().join("gone.msg")).unwrap();

        // A full pool unlinks.
        for n in spares.count()..MAX_SPARES {
            spares.give_back(spare_dir.join(format!("placeholder{n}")));
        }
        let extra = tmp.path().join("extra.msg");
        fs::write(&extra, b"x").unwrap();
        spares.retire(&extra).unwrap();
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
            spares.retire(&path).unwrap();
        }
        // The other process renames the most recent spare away.
        fs::remove_file(tmp.path().join("spare/b.msg")).unwrap();
        let new = tmp.path().join("new.msg");
        spares.create(&new, Existing::Refuse).unwrap();
        assert!(new.exists());
        assert!(!tmp.path().join("spare/a.msg").exists());
    }
}

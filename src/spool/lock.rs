//! The queue lock: one queue runner per spool.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use super::SpoolError;

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

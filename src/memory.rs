//! Giving memory back after a burst. The allocator (glibc's malloc) keeps
//! what the process freed for its next allocations, in one arena per
//! thread that allocated; after a burst (a big queue delivered, a backlog
//! written) most of it stays resident while nothing uses it. Asking it now
//! and then to return its free pages keeps the node's resident size that
//! of what it holds.

use std::time::Duration;

/// How often the allocator is asked. Cheap when there is little to
/// return: it walks its free lists, under each arena's lock in turn.
pub(crate) const GIVE_BACK_EVERY: Duration = Duration::from_secs(10);

/// Returns the allocator's free pages to the system (glibc's
/// `malloc_trim`); whether it returned any. Elsewhere it does nothing.
pub(crate) fn give_back_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: only adjusts the allocator's own state, under its locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[test]
    fn free_heap_held_after_a_burst_is_returned() {
        // On a thread of its own: its own arena, as a burst on one of the
        // node's threads would have.
        let (before, held, after) = std::thread::spawn(|| {
            let before = rss_kib();
            // 64 MiB in 16 KiB pieces, every eighth kept: the free space is
            // in holes the allocator cannot simply cut off its heap's end.
            let mut pieces: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 << 10]).collect();
            let kept: Vec<Vec<u8>> = pieces
                .drain(..)
                .enumerate()
                .filter_map(|(n, p)| (n % 8 == 0).then_some(p))
                .collect();
            let held = rss_kib();
            assert!(give_back_free_heap(), "56 MiB free and nothing given back");
            let after = rss_kib();
            drop(kept);
            (before, held, after)
        })
        .join()
        .unwrap();
        assert!(
            held > before + 48 * 1024,
            "the burst was not resident: {before} -> {held} KiB"
        );
        assert!(
            held.saturating_sub(after) > 32 * 1024,
            "free heap was not given back: {before} KiB before, {held} held, {after} after"
        );
    }
}

//! Queue ids: time-ordered (they sort by arrival), unique across restarts,
//! safe as file names and short enough for a log line. Like Postfix's long
//! queue ids, they encode the arrival time; a per-process counter separates
//! messages of the same microsecond, and the spool's exclusive file creation
//! catches the rest.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Crockford's base32: no I, L, O or U to confuse a reader.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const TIME_DIGITS: usize = 11;
const SEQ_DIGITS: usize = 4;
/// Length of every queue id.
pub const ID_LEN: usize = TIME_DIGITS + SEQ_DIGITS;

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A new id for a message arriving at `now`.
pub fn new_id(now: SystemTime) -> String {
    let micros = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let seq = u64::from(SEQUENCE.fetch_add(1, Ordering::Relaxed) & 0xFFFFF);
    let mut id = Vec::with_capacity(ID_LEN);
    push_base32(&mut id, micros, TIME_DIGITS);
    push_base32(&mut id, seq, SEQ_DIGITS);
    String::from_utf8(id).unwrap_or_default()
}

fn push_base32(out: &mut Vec<u8>, value: u64, digits: usize) {
    for i in (0..digits).rev() {
        out.push(ALPHABET[((value >> (5 * i)) & 31) as usize]);
    }
}

/// Whether `s` has the shape of a queue id: anything that names a spool file
/// passes through here, so a hostile id cannot walk out of the spool.
pub fn is_valid_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ids_are_valid_unique_and_time_ordered() {
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = new_id(t);
        let b = new_id(t);
        let c = new_id(t + Duration::from_micros(1));
        assert!(is_valid_id(&a) && is_valid_id(&b) && is_valid_id(&c));
        assert_ne!(a, b);
        assert!(a[..TIME_DIGITS] < c[..TIME_DIGITS]);
        let mut many: Vec<String> = (0..10_000).map(|_| new_id(t)).collect();
        many.sort();
        many.dedup();
        assert_eq!(many.len(), 10_000);
    }

    #[test]
    fn path_like_ids_are_invalid() {
        assert!(!is_valid_id("../../etc/passwd"));
        assert!(!is_valid_id("0000000000000I0"));
        assert!(!is_valid_id(""));
    }
}

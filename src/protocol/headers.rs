//! Watches the header section of a message as it streams in, for the two
//! loop signs of the contract: the number of `Received:` headers (hops) and
//! the `Delivered-To:` addresses earlier deliveries stamped. Pure, bounded:
//! it keeps only what it needs of each line.

/// More hops than this: refused at DATA with 554 5.4.6.
pub const MAX_HOPS: usize = 50;
/// Of one header line, the bytes we look at.
const KEEP: usize = 512;
/// The most Delivered-To values remembered.
const MAX_DELIVERED_TO: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct HeaderScan {
    done: bool,
    line: Vec<u8>,
    /// `Received:` headers seen.
    pub hops: usize,
    /// `Delivered-To:` values, trimmed and lowercased.
    pub delivered_to: Vec<String>,
}

impl HeaderScan {
    /// Feeds message content (LF line ends).
    pub fn feed(&mut self, content: &[u8]) {
        for &b in content {
            if self.done {
                return;
            }
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < KEEP {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.done = true;
            return;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"Received") {
            self.hops += 1;
        } else if name.eq_ignore_ascii_case(b"Delivered-To")
            && self.delivered_to.len() < MAX_DELIVERED_TO
        {
            let value = String::from_utf8_lossy(&line[colon + 1..]);
            self.delivered_to.push(value.trim().to_lowercase());
        }
    }

    /// Whether `recipient` was already delivered to on this message's way
    /// (the node reads the list itself, see `Envelope::accepted`).
    #[cfg(test)]
    pub fn delivered_to(&self, recipient: &str) -> bool {
        let recipient = recipient.to_lowercase();
        self.delivered_to.contains(&recipient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_received_and_collects_delivered_to_across_chunks() {
        let msg = b"Received: from a\n\tby b\nreceived: x\nDelivered-To: Support@Example.org \nSubject: s\n\nReceived: in body\nDelivered-To: body@x\n";
        for chunk in 1..10 {
            let mut scan = HeaderScan::default();
            for piece in msg.chunks(chunk) {
                scan.feed(piece);
            }
            assert_eq!(scan.hops, 2);
            assert_eq!(scan.delivered_to, vec!["support@example.org".to_string()]);
            assert!(scan.delivered_to("SUPPORT@example.org"));
            assert!(!scan.delivered_to("body@x"));
        }
    }
}

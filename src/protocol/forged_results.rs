//! Removes, as a message streams in, the `Authentication-Results:` headers
//! that claim to be ours (RFC 8601 section 5): a client must not be able to
//! hand a program a verdict mailnode never gave. Results of other
//! authentication services stay. Pure and bounded: at most [`DECIDE_WITHIN`]
//! bytes of a header field are held back before it is decided about; an
//! `Authentication-Results:` field that names no authserv-id by then is
//! removed too.

/// Of one header field, the bytes held back to find its name and
/// authserv-id.
pub const DECIDE_WITHIN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Drop,
}

#[derive(Debug, Clone)]
pub struct ForgedResultsFilter {
    /// Lowercased.
    authserv_id: String,
    /// Past the header section: everything passes.
    in_body: bool,
    /// The next byte starts a line.
    at_line_start: bool,
    /// Inside a header field: its bytes not yet passed on, while undecided.
    held: Vec<u8>,
    /// The current field's fate, once known.
    fate: Option<Fate>,
    /// A field is open (its first line has begun).
    in_field: bool,
    /// How far the undecided field has been read: each byte is looked at
    /// once.
    scan: Scan,
}

/// Where the reading of an undecided field stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// In the field name, before the colon.
    Name,
    /// After the colon, in white space and comments before the
    /// authserv-id (`depth` comments open, the last byte a `\` in one).
    BeforeId { depth: usize, escaped: bool },
    /// In the authserv-id, from `start` in `held`: a token, or a quoted
    /// string (RFC 8601 2.2: a `value`).
    Id {
        start: usize,
        quoted: bool,
        escaped: bool,
    },
}

impl ForgedResultsFilter {
    pub fn new(authserv_id: &str) -> Self {
        ForgedResultsFilter {
            authserv_id: authserv_id.to_ascii_lowercase(),
            in_body: false,
            at_line_start: true,
            held: Vec::new(),
            fate: None,
            in_field: false,
            scan: Scan::Name,
        }
    }

    /// Feeds message content (LF line ends); returns what passes.
    pub fn feed(&mut self, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len());
        for (i, &b) in content.iter().enumerate() {
            if self.in_body {
                out.extend_from_slice(&content[i..]);
                return out;
            }
            let continues = (b == b' ' || b == b'\t') && self.in_field;
            if self.at_line_start && !continues {
                // The field before, if any, is complete.
                self.close_field(&mut out);
                if b == b'\n' {
                    // The empty line ends the header section.
                    self.in_body = true;
                    out.push(b);
                    continue;
                }
                self.in_field = true;
            }
            self.at_line_start = b == b'\n';
            match self.fate {
                Some(Fate::Keep) => out.push(b),
                Some(Fate::Drop) => {}
                None => {
                    self.held.push(b);
                    self.fate = self.step(b);
                    self.release(&mut out);
                }
            }
        }
        out
    }

    /// The end of the message: whatever is held is decided and passed on.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.in_body {
            self.close_field(&mut out);
        }
        out
    }

    fn close_field(&mut self, out: &mut Vec<u8>) {
        if self.in_field && self.fate.is_none() {
            self.fate = Some(self.at_field_end());
            self.release(out);
        }
        self.in_field = false;
        self.fate = None;
        self.held.clear();
        self.scan = Scan::Name;
    }

    /// Passes on (or drops) what was held once the fate is known.
    fn release(&mut self, out: &mut Vec<u8>) {
        match self.fate {
            Some(Fate::Keep) => out.append(&mut self.held),
            Some(Fate::Drop) => self.held.clear(),
            None => {}
        }
    }

    /// Reads the byte just held (`b`, the last of `held`); the field's
    /// fate once it can be told.
    fn step(&mut self, b: u8) -> Option<Fate> {
        let len = self.held.len();
        let fate = match self.scan {
            Scan::Name if b == b':' => {
                if is_results_name(&self.held[..len - 1]) {
                    self.scan = Scan::BeforeId {
                        depth: 0,
                        escaped: false,
                    };
                    None
                } else {
                    Some(Fate::Keep)
                }
            }
            // A name ends on its own line: this is no field we judge.
            Scan::Name if b == b'\n' => Some(Fate::Keep),
            Scan::Name => None,
            Scan::BeforeId { depth, escaped } => {
                self.scan = match (depth, escaped, b) {
                    (d, true, _) => Scan::BeforeId {
                        depth: d,
                        escaped: false,
                    },
                    (d, false, b'\\') if d > 0 => Scan::BeforeId {
                        depth: d,
                        escaped: true,
                    },
                    (d, false, b'(') => Scan::BeforeId {
                        depth: d + 1,
                        escaped: false,
                    },
                    (d, false, b')') if d > 0 => Scan::BeforeId {
                        depth: d - 1,
                        escaped: false,
                    },
                    (d, false, _) if d > 0 => Scan::BeforeId {
                        depth: d,
                        escaped: false,
                    },
                    (0, false, b' ' | b'\t' | b'\r' | b'\n') => Scan::BeforeId {
                        depth: 0,
                        escaped: false,
                    },
                    (_, false, b'"') => Scan::Id {
                        start: len,
                        quoted: true,
                        escaped: false,
                    },
                    _ => Scan::Id {
                        start: len - 1,
                        quoted: false,
                        escaped: false,
                    },
                };
                None
            }
            Scan::Id {
                start,
                quoted: true,
                escaped,
            } => {
                if escaped || b == b'\\' {
                    self.scan = Scan::Id {
                        start,
                        quoted: true,
                        escaped: !escaped,
                    };
                    None
                } else if b == b'"' {
                    Some(self.judge(start, len - 1))
                } else {
                    None
                }
            }
            Scan::Id {
                start,
                quoted: false,
                ..
            } => {
                if matches!(b, b';' | b' ' | b'\t' | b'\r' | b'\n' | b'(') {
                    Some(self.judge(start, len - 1))
                } else {
                    None
                }
            }
        };
        match fate {
            Some(fate) => Some(fate),
            // Held as long as it may be: an authserv-id that has not shown
            // by then hides behind kilobytes of comment or space, which no
            // honest service writes; a name that long is no A-R name.
            None if len >= DECIDE_WITHIN => Some(match self.scan {
                Scan::Name if !is_results_name(&self.held) => Fate::Keep,
                _ => Fate::Drop,
            }),
            None => None,
        }
    }

    /// The fate of a field that ended undecided.
    fn at_field_end(&self) -> Fate {
        match self.scan {
            Scan::Id { start, .. } => self.judge(start, self.held.len()),
            _ => Fate::Keep,
        }
    }

    /// An authserv-id read whole from `held[start..end]`.
    fn judge(&self, start: usize, end: usize) -> Fate {
        let id: Vec<u8> = self.held[start..end]
            .iter()
            .copied()
            .filter(|&b| b != b'\\' && b != b'\n' && b != b'\r')
            .collect();
        if id.eq_ignore_ascii_case(self.authserv_id.as_bytes()) {
            Fate::Drop
        } else {
            Fate::Keep
        }
    }
}

/// `Authentication-Results`, with the white space the obsolete syntax
/// allows before the colon (RFC 5322 4.5.8), nothing before it.
fn is_results_name(name: &[u8]) -> bool {
    name.trim_ascii_end()
        .eq_ignore_ascii_case(b"Authentication-Results")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `message` cut at every `cuts` boundary; returns what passed.
    fn filtered(message: &[u8], cut_every: usize) -> Vec<u8> {
        let mut f = ForgedResultsFilter::new("mx.example.org");
        let mut out = Vec::new();
        for chunk in message.chunks(cut_every.max(1)) {
            out.extend(f.feed(chunk));
        }
        out.extend(f.finish());
        out
    }

    #[test]
    fn ours_go_others_stay_and_the_body_is_untouched() {
        let message = b"Received: from a\n\tby b\nAuthentication-Results: MX.example.org;\n\tdkim=pass header.d=bank.example\nAuthentication-Results: other.example; spf=fail\nAuthentication-Results:\n (comment) mx.example.org; dmarc=pass\nSubject: s\n\nAuthentication-Results: mx.example.org; in the body\n";
        let expected = b"Received: from a\n\tby b\nAuthentication-Results: other.example; spf=fail\nSubject: s\n\nAuthentication-Results: mx.example.org; in the body\n";
        for cut in 1..message.len() + 1 {
            assert_eq!(
                String::from_utf8_lossy(&filtered(message, cut)),
                String::from_utf8_lossy(expected),
                "cut every {cut}"
            );
        }
    }

    #[test]
    fn a_prefix_of_our_id_is_not_ours_and_headers_without_a_body_are_judged_too() {
        let message = b"Authentication-Results: mx.example.org.evil; spf=pass\nAuthentication-Results: mx.example.org";
        assert_eq!(
            filtered(message, 7),
            b"Authentication-Results: mx.example.org.evil; spf=pass\n".to_vec()
        );
    }

    #[test]
    fn escaped_comments_quoted_ids_and_spaces_before_the_colon_do_not_hide_ours() {
        for forged in [
            &b"Authentication-Results: (\\)) mx.example.org; dkim=pass\n"[..],
            b"Authentication-Results: \"mx.example.org\"; dkim=pass\n",
            b"Authentication-Results   : mx.example.org; dkim=pass\n",
        ] {
            let mut message = forged.to_vec();
            message.extend_from_slice(b"Subject: s\n\nbody\n");
            assert_eq!(
                filtered(&message, 3),
                b"Subject: s\n\nbody\n".to_vec(),
                "{forged:?}"
            );
        }
        let mut padded = b"Authentication-Results".to_vec();
        padded.extend(std::iter::repeat_n(b' ', DECIDE_WITHIN));
        padded.extend_from_slice(b": mx.example.org; dkim=pass\nSubject: s\n\nbody\n");
        assert_eq!(filtered(&padded, 64), b"Subject: s\n\nbody\n".to_vec());
        // Another service's quoted id stays.
        let other = b"Authentication-Results: \"other.example\"; spf=pass\n\nb\n";
        assert_eq!(filtered(other, 5), other.to_vec());
    }

    #[test]
    fn a_first_line_that_starts_with_a_space_is_kept() {
        assert_eq!(filtered(b" at\x002", 2), b" at\x002".to_vec());
    }

    #[test]
    fn what_is_held_back_is_bounded_and_results_that_hide_their_id_go() {
        let mut f = ForgedResultsFilter::new("mx.example.org");
        let mut long = b"Authentication-Results: (".to_vec();
        long.extend(std::iter::repeat_n(b'x', DECIDE_WITHIN * 2));
        long.extend_from_slice(b") mx.example.org; dkim=pass\nSubject: s\n\nbody\n");
        let mut out = Vec::new();
        for chunk in long.chunks(100) {
            out.extend(f.feed(chunk));
            assert!(f.held.len() <= DECIDE_WITHIN, "{}", f.held.len());
        }
        out.extend(f.finish());
        assert_eq!(out, b"Subject: s\n\nbody\n".to_vec());
    }
}

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
                    self.fate = self.decide(false);
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
            self.fate = self.decide(true);
            self.release(out);
        }
        self.in_field = false;
        self.fate = None;
        self.held.clear();
    }

    /// Passes on (or drops) what was held once the fate is known.
    fn release(&mut self, out: &mut Vec<u8>) {
        match self.fate {
            Some(Fate::Keep) => out.append(&mut self.held),
            Some(Fate::Drop) => self.held.clear(),
            None => {}
        }
    }

    /// The fate of the held field, if it can be told yet (`complete`: the
    /// field has ended, so whatever is held is all there is).
    fn decide(&self, complete: bool) -> Option<Fate> {
        let field = &self.held;
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            // No name yet; a line without a colon is not a field we judge.
            return (complete || field.len() >= DECIDE_WITHIN || field.contains(&b'\n'))
                .then_some(Fate::Keep);
        };
        // The name as written (RFC 5322 3.6.8), space before the colon
        // allowed (obsolete syntax, 4.5.8), nothing before it.
        if !field[..colon]
            .trim_ascii_end()
            .eq_ignore_ascii_case(b"Authentication-Results")
        {
            return Some(Fate::Keep);
        }
        let ours = |id: &[u8]| {
            if id.eq_ignore_ascii_case(self.authserv_id.as_bytes()) {
                Fate::Drop
            } else {
                Fate::Keep
            }
        };
        match authserv_id(&field[colon + 1..]) {
            Some((id, true)) => Some(ours(id)),
            Some((id, false)) if complete => Some(ours(id)),
            None if complete => Some(Fate::Keep),
            // Results whose authserv-id hides behind kilobytes of comment
            // are no service's honest results: they go.
            _ if field.len() >= DECIDE_WITHIN => Some(Fate::Drop),
            _ => None,
        }
    }
}

/// The authserv-id at the start of an `Authentication-Results:` value,
/// after any folding whitespace and comments; with whether it is known to
/// be whole (a delimiter follows it).
fn authserv_id(value: &[u8]) -> Option<(&[u8], bool)> {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let start = i;
    while i < value.len() && !matches!(value[i], b';' | b' ' | b'\t' | b'\r' | b'\n' | b'(') {
        i += 1;
    }
    if start == i {
        return None;
    }
    Some((&value[start..i], i < value.len()))
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

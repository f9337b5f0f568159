//! The filter that removes incoming `Authentication-Results:` headers
//! claiming our authserv-id, as the session feeds it: in chunks. Beyond
//! "no panic": what passes does not depend on where the chunks were cut;
//! it is the input with whole header fields removed, the body untouched;
//! exactly the A-R fields naming our id, or naming none within the first
//! DECIDE_WITHIN bytes, are removed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailnode::protocol::forged_results::{ForgedResultsFilter, DECIDE_WITHIN};

const OURS: &str = "mx.example.org";

fn run(input: &[u8], cuts: &[u8]) -> Vec<u8> {
    let mut filter = ForgedResultsFilter::new(OURS);
    let mut out = Vec::new();
    let mut rest = input;
    for &cut in cuts.iter().cycle().take(input.len() + 1) {
        if rest.is_empty() {
            break;
        }
        let n = (usize::from(cut) % 64 + 1).min(rest.len());
        out.extend(filter.feed(&rest[..n]));
        rest = &rest[n..];
    }
    out.extend(filter.feed(rest));
    out.extend(filter.finish());
    out
}

/// The header fields (each with its line ends) and the rest.
fn split(input: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    loop {
        // At a line start.
        if i >= input.len() {
            if start < i {
                fields.push(&input[start..i]);
            }
            return (fields, &input[input.len()..]);
        }
        if input[i] != b' ' && input[i] != b'\t' && start < i {
            fields.push(&input[start..i]);
            start = i;
        }
        if input[i] == b'\n' && start == i {
            return (fields, &input[i..]);
        }
        match input[i..].iter().position(|&b| b == b'\n') {
            Some(end) => i += end + 1,
            None => i = input.len(),
        }
    }
}

/// Whether the filter must remove this field, by the contract read on the
/// whole field: an A-R field (name, optional white space, colon) whose
/// authserv-id (after white space and comments, which may hold escaped
/// characters; a token or a quoted string) is ours, or whose id has not
/// ended within the first DECIDE_WITHIN bytes.
fn names_ours(field: &[u8]) -> bool {
    let is_name = |n: &[u8]| n.trim_ascii_end().eq_ignore_ascii_case(b"Authentication-Results");
    let bound = DECIDE_WITHIN - 1; // the last index looked at before deciding
    let colon = field.iter().position(|&b| b == b':');
    let newline = field.iter().position(|&b| b == b'\n');
    let name_end = match (colon, newline) {
        (Some(c), Some(n)) if n < c => return false,
        (Some(c), _) if c <= bound => c,
        _ => {
            // No colon in time: a name that is all A-R and spaces goes.
            return field.len() > bound && is_name(&field[..DECIDE_WITHIN]);
        }
    };
    if !is_name(&field[..name_end]) {
        return false;
    }
    let ours = |id: Vec<u8>| id.eq_ignore_ascii_case(OURS.as_bytes());
    let clean = |bytes: &[u8]| -> Vec<u8> {
        bytes.iter().copied().filter(|&b| b != b'\\' && b != b'\n' && b != b'\r').collect()
    };
    // White space and comments.
    let mut i = name_end + 1;
    let mut depth = 0usize;
    while i < field.len() {
        let b = field[i];
        if depth > 0 {
            if b == b'\\' {
                i += 1;
            } else if b == b'(' {
                depth += 1;
            } else if b == b')' {
                depth -= 1;
            }
        } else if b == b'(' {
            depth = 1;
        } else if !matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
            break;
        }
        i += 1;
    }
    if i >= field.len() {
        // No id before the field ended, or before the bound.
        return field.len() > bound;
    }
    if field[i] == b'"' {
        let start = i + 1;
        let mut j = start;
        while j < field.len() && field[j] != b'"' {
            if field[j] == b'\\' {
                j += 1;
            }
            j += 1;
        }
        if j < field.len() && j <= bound {
            return ours(clean(&field[start..j]));
        }
        if field.len() > bound {
            return true;
        }
        return ours(clean(&field[start..field.len().min(j)]));
    }
    let start = i;
    let end = field[start..]
        .iter()
        .position(|b| matches!(b, b';' | b' ' | b'\t' | b'\r' | b'\n' | b'('))
        .map(|p| start + p);
    match end {
        Some(e) if e <= bound => ours(clean(&field[start..e])),
        _ if field.len() > bound => true,
        _ => ours(clean(&field[start..])),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let (cuts, input) = rest.split_at(n);
    let whole = run(input, &[255]);
    let cut = run(input, if cuts.is_empty() { &[0] } else { cuts });
    assert_eq!(whole, cut, "the cuts changed what passed");

    let (fields, body) = split(input);
    let kept: Vec<&[u8]> = fields.iter().copied().filter(|f| !names_ours(f)).collect();
    let removed_ours = fields.len() - kept.len();
    // Whatever passed is whole fields of the input in order, then the body.
    let out_fields_len = whole.len() - body.len();
    assert!(whole.ends_with(body), "the body changed");
    let mut rebuilt = Vec::new();
    let mut dropped_other = false;
    let mut j = 0;
    for f in &fields {
        if whole[j..out_fields_len].starts_with(f) && (!names_ours(f) || removed_ours == 0) {
            rebuilt.extend_from_slice(f);
            j += f.len();
        } else if names_ours(f) {
            // Removed, as it should be.
        } else {
            dropped_other = true;
        }
    }
    assert!(!dropped_other, "a field not naming our id was removed: {input:?}");
    assert_eq!(rebuilt.len(), out_fields_len, "partial fields passed: {input:?}");
});

//! Reading the aliases file into entries: names, continuation lines,
//! comma rules, quoting and pipes, every problem reported with its line.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;

use super::Diag;

/// A parsed alias definition whose targets are not yet classified.
pub(super) struct Entry {
    /// Lowercase name.
    pub(super) name: String,
    pub(super) line: usize,
    pub(super) targets: Vec<RawTarget>,
}

pub(super) struct RawTarget {
    pub(super) line: usize,
    pub(super) kind: RawKind,
}

pub(super) enum RawKind {
    Pipe(String),
    /// Anything that is not a pipe, quotes already removed. Whether it is an
    /// alias name can only be decided once the whole file is read.
    Word(String),
}

/// The entry being assembled from its header and continuation lines.
enum Current {
    Nothing,
    /// Lines that belong to a header already reported as broken, or to an
    /// orphan continuation; reporting them again would repeat one problem.
    Absorb,
    Entry(Pending),
}

struct Pending {
    /// The name as written, for messages.
    label: String,
    /// Lowercase name, `None` if the name is invalid or a duplicate: the
    /// targets are still checked, but the entry does not enter the table.
    key: Option<String>,
    line: usize,
    segments: Vec<(usize, String)>,
}

pub(super) fn read_entries(bytes: &[u8], diag: &mut Diag) -> Vec<Entry> {
    // Editors on some systems prepend a BOM; left in place it would become
    // part of the first alias name, which then silently never matches.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut entries = Vec::new();
    let mut first_lines: HashMap<String, usize> = HashMap::new();
    let mut current = Current::Nothing;

    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.contains(&0) {
            diag.error(line, "NUL byte in line");
        }
        if std::str::from_utf8(raw).is_err() {
            diag.error(line, "invalid UTF-8");
        }
        // Going on with a lossy decoding still finds the line's other
        // problems; the file is rejected anyway.
        let text = String::from_utf8_lossy(raw);

        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if text.starts_with(char::is_whitespace) {
            match &mut current {
                Current::Entry(pending) => pending.segments.push((line, text.into_owned())),
                Current::Absorb => {}
                Current::Nothing => {
                    diag.error(line, "continuation line without a preceding alias");
                    current = Current::Absorb;
                }
            }
            continue;
        }

        if let Current::Entry(pending) = std::mem::replace(&mut current, Current::Nothing) {
            finish_entry(pending, &mut entries, diag);
        }
        let Some((name, rest)) = text.split_once(':') else {
            diag.error(line, "missing ':' after alias name");
            current = Current::Absorb;
            continue;
        };
        let name = name.trim_end();
        let key = if name.is_empty() {
            diag.error(line, "empty alias name");
            None
        } else if let Some(bad) = name
            .chars()
            .find(|&c| c.is_whitespace() || c == '"' || c == ',')
        {
            let what = match bad {
                '"' => "a quote",
                ',' => "a comma",
                _ => "white space",
            };
            diag.error(
                line,
                format!("invalid alias name '{name}': contains {what}"),
            );
            None
        } else {
            match first_lines.entry(name.to_lowercase()) {
                MapEntry::Occupied(first) => {
                    diag.error(
                        line,
                        format!(
                            "duplicate alias '{name}' (first defined at line {})",
                            first.get()
                        ),
                    );
                    None
                }
                MapEntry::Vacant(slot) => {
                    let key = slot.key().clone();
                    slot.insert(line);
                    Some(key)
                }
            }
        };
        current = Current::Entry(Pending {
            label: name.to_string(),
            key,
            line,
            segments: vec![(line, rest.to_string())],
        });
    }
    if let Current::Entry(pending) = current {
        finish_entry(pending, &mut entries, diag);
    }
    entries
}

fn finish_entry(pending: Pending, entries: &mut Vec<Entry>, diag: &mut Diag) {
    let errors_before = diag.errors.len();
    let targets = parse_targets(&pending.segments, diag);
    // A list that already produced an error is not also "empty".
    if targets.is_empty() && diag.errors.len() == errors_before {
        let message = if pending.label.is_empty() {
            "alias has no targets".to_string()
        } else {
            format!("alias '{}' has no targets", pending.label)
        };
        diag.error(pending.line, message);
    }
    if let Some(name) = pending.key {
        entries.push(Entry {
            name,
            line: pending.line,
            targets,
        });
    }
}

/// What came last while scanning a target list, to validate commas.
enum Prev {
    Nothing,
    Target {
        same_line: bool,
    },
    Comma {
        line: usize,
    },
    /// A comma already reported as misplaced; not reported again at the end.
    BadComma,
}

fn parse_targets(segments: &[(usize, String)], diag: &mut Diag) -> Vec<RawTarget> {
    let mut targets = Vec::new();
    let mut prev = Prev::Nothing;
    for (line, text) in segments {
        let line = *line;
        let mut rest = text.as_str();
        loop {
            rest = rest.trim_start();
            let Some(first) = rest.chars().next() else {
                break;
            };
            if first == ',' {
                prev = match prev {
                    Prev::Target { .. } => Prev::Comma { line },
                    _ => {
                        diag.error(line, "empty target before ','");
                        Prev::BadComma
                    }
                };
                rest = &rest[1..];
                continue;
            }
            // Only a closing quote can leave more text on the same line:
            // bare words stop at a comma and unquoted pipes take the line.
            if matches!(prev, Prev::Target { same_line: true }) {
                diag.error(line, "missing ',' between targets");
            }
            prev = Prev::Target { same_line: true };
            match first {
                '|' => {
                    push_pipe(&rest[1..], line, &mut targets, diag);
                    rest = "";
                }
                '"' => match read_quoted(&rest[1..]) {
                    Some((content, after)) => {
                        let content = content.trim();
                        if let Some(command) = content.strip_prefix('|') {
                            push_pipe(command, line, &mut targets, diag);
                        } else if content.is_empty() {
                            diag.error(line, "empty quoted target");
                        } else {
                            targets.push(RawTarget {
                                line,
                                kind: RawKind::Word(content.to_string()),
                            });
                        }
                        rest = after;
                    }
                    None => {
                        diag.error(line, "unterminated quote");
                        rest = "";
                    }
                },
                _ => {
                    let end = rest.find(',').unwrap_or(rest.len());
                    targets.push(RawTarget {
                        line,
                        kind: RawKind::Word(rest[..end].trim_end().to_string()),
                    });
                    rest = &rest[end..];
                }
            }
        }
        if let Prev::Target { same_line: true } = prev {
            prev = Prev::Target { same_line: false };
        }
    }
    if let Prev::Comma { line } = prev {
        diag.error(line, "trailing ',' without a following target");
    }
    targets
}

fn push_pipe(after_bar: &str, line: usize, targets: &mut Vec<RawTarget>, diag: &mut Diag) {
    let command = after_bar.trim();
    if command.is_empty() {
        diag.error(line, "empty pipe command");
    } else {
        targets.push(RawTarget {
            line,
            kind: RawKind::Pipe(command.to_string()),
        });
    }
}

/// Reads a quoted string whose opening quote is already consumed; returns
/// its unescaped content and the text after the closing quote.
fn read_quoted(s: &str) -> Option<(String, &str)> {
    let mut content = String::new();
    let mut chars = s.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((content, &s[at + 1..])),
            '\\' => match chars.next() {
                Some((_, escaped @ ('"' | '\\'))) => content.push(escaped),
                // Other backslashes belong to the command (e.g. regexes).
                Some((_, other)) => {
                    content.push('\\');
                    content.push(other);
                }
                None => return None,
            },
            _ => content.push(c),
        }
    }
    None
}

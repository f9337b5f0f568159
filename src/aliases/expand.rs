//! Flattening entries into the table: each alias's final targets, with
//! loops, over-deep chains and undeliverable targets reported.

use std::collections::{HashMap, HashSet};

use super::parse::{Entry, RawKind, RawTarget};
use super::{AliasTable, Diag, Expanded, TableEntry, Target, MAX_DEPTH};

/// A target after classification against the full set of alias names.
enum Item {
    Direct(Target),
    Alias { index: usize, line: usize },
    Unsupported,
}

enum Outcome {
    /// Loop, excessive depth, or depends on such an alias; already reported.
    Failed,
    Expanded {
        depth: usize,
        /// The child alias on the longest chain, to name the chain in errors.
        deepest: Option<usize>,
        expansion: Option<Vec<Expanded>>,
    },
}

enum Mark {
    New,
    /// On the current expansion path; meeting it again means a loop.
    Active,
    Done(Outcome),
}

pub(super) fn expand(entries: &[Entry], diag: &mut Diag) -> AliasTable {
    let by_name: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| (entry.name.as_str(), index))
        .collect();
    let items: Vec<Vec<Item>> = entries
        .iter()
        .map(|entry| {
            entry
                .targets
                .iter()
                .map(|raw| classify(entry, raw, &by_name, diag))
                .collect()
        })
        .collect();

    let mut marks: Vec<Mark> = entries.iter().map(|_| Mark::New).collect();
    // Iterative depth-first search: a long alias chain in the file must not
    // be able to overflow the stack.
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..entries.len() {
        if !matches!(marks[root], Mark::New) {
            continue;
        }
        marks[root] = Mark::Active;
        stack.push((root, 0));
        while let Some(top) = stack.last_mut() {
            let (index, next) = *top;
            let Some(item) = items[index].get(next) else {
                stack.pop();
                let outcome = finish_expansion(index, entries, &items, &marks, diag);
                marks[index] = Mark::Done(outcome);
                continue;
            };
            top.1 += 1;
            let Item::Alias { index: child, line } = *item else {
                continue;
            };
            match marks[child] {
                Mark::New => {
                    marks[child] = Mark::Active;
                    stack.push((child, 0));
                }
                Mark::Active => {
                    let start = stack.iter().position(|&(i, _)| i == child).unwrap_or(0);
                    let path: Vec<&str> = stack[start..]
                        .iter()
                        .map(|&(i, _)| entries[i].name.as_str())
                        .chain(std::iter::once(entries[child].name.as_str()))
                        .collect();
                    diag.error(line, format!("alias loop: {}", path.join(" -> ")));
                }
                Mark::Done(_) => {}
            }
        }
    }

    let mut table = AliasTable::default();
    for (entry, mark) in entries.iter().zip(marks) {
        // Failed entries exist only alongside a reported error, in which case
        // the table is discarded.
        if let Mark::Done(Outcome::Expanded { expansion, .. }) = mark {
            table.entries.insert(
                entry.name.clone(),
                TableEntry {
                    line: entry.line,
                    expansion,
                },
            );
        }
    }
    table
}

fn classify(
    entry: &Entry,
    raw: &RawTarget,
    by_name: &HashMap<&str, usize>,
    diag: &mut Diag,
) -> Item {
    let word = match &raw.kind {
        RawKind::Pipe(command) => {
            return Item::Direct(Target::Pipe {
                command: command.clone(),
            })
        }
        RawKind::Word(word) => word,
    };
    if is_url(word) {
        return match http_target(word) {
            Ok(target) => Item::Direct(target),
            Err(why) => {
                diag.error(raw.line, format!("alias '{}': {why}", entry.name));
                Item::Unsupported
            }
        };
    }
    if let Some(name) = word.strip_prefix('@') {
        if !diag.handlers.iter().any(|known| known == name) {
            let known = if diag.handlers.is_empty() {
                "none is registered (handlers exist only in a program that embeds mailnode)"
                    .to_string()
            } else {
                format!("registered: {}", diag.handlers.join(", "))
            };
            diag.error(
                raw.line,
                format!("alias '{}': unknown handler '@{name}'; {known}", entry.name),
            );
            return Item::Unsupported;
        }
        return Item::Direct(Target::Handler {
            name: name.to_string(),
        });
    }
    let problem = if word
        .get(..9)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(":include:"))
    {
        format!("'{word}': :include: is not supported")
    } else if ["/", "./", "../", "~"].iter().any(|p| word.starts_with(p)) {
        format!("'{word}': delivery to a file is not supported")
    } else if word.contains('@') {
        if is_forward_address(word) {
            return Item::Direct(Target::Forward {
                address: word.clone(),
            });
        }
        format!("'{word}' is not a valid forwarding address")
    } else if let Some(&index) = by_name.get(word.to_lowercase().as_str()) {
        return Item::Alias {
            index,
            line: raw.line,
        };
    } else if word
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == ',')
    {
        format!("unsupported target '{word}'")
    } else {
        format!("'{word}' is not a defined alias (local users are not supported)")
    };
    diag.warn(
        raw.line,
        format!(
            "alias '{}': {problem}; mail to this alias (and to aliases including it) will be rejected",
            entry.name
        ),
    );
    Item::Unsupported
}

fn is_url(word: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| {
        word.get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    })
}

/// An HTTP target's URL, checked once here so that a delivery never meets
/// a URL it cannot send to.
fn http_target(word: &str) -> Result<Target, String> {
    let url = url::Url::parse(word).map_err(|e| format!("invalid URL '{word}': {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid URL '{word}': it names no host"));
    }
    if url.fragment().is_some() {
        return Err(format!(
            "invalid URL '{word}': a #fragment is never sent to the server"
        ));
    }
    Ok(Target::Http {
        url: url.to_string(),
    })
}

/// A plain `local@domain`; anything fancier (quoted local parts, address
/// literals, display names) is left unsupported rather than guessed at.
fn is_forward_address(word: &str) -> bool {
    let Some((local, domain)) = word.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local
            .chars()
            .all(|c| (c.is_ascii_graphic() || !c.is_ascii()) && !"\"(),:;<>@[\\]".contains(c));
    let domain_ok = !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    local_ok && domain_ok && !word.chars().any(char::is_whitespace)
}

fn finish_expansion(
    index: usize,
    entries: &[Entry],
    items: &[Vec<Item>],
    marks: &[Mark],
    diag: &mut Diag,
) -> Outcome {
    let entry = &entries[index];
    let mut depth = 1;
    let mut deepest = None;
    let mut supported = true;
    let mut expansion = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |expanded: Expanded| {
        // The same program reached twice must not get the message twice.
        if seen.insert(expanded.target.clone()) {
            expansion.push(expanded);
        }
    };
    for item in &items[index] {
        match item {
            Item::Direct(target) => add(Expanded {
                via_alias: entry.name.clone(),
                target: target.clone(),
            }),
            Item::Unsupported => supported = false,
            Item::Alias { index: child, .. } => match &marks[*child] {
                Mark::Done(Outcome::Expanded {
                    depth: child_depth,
                    expansion: child_expansion,
                    ..
                }) => {
                    if child_depth + 1 > depth {
                        depth = child_depth + 1;
                        deepest = Some(*child);
                    }
                    match child_expansion {
                        Some(list) => list.iter().cloned().for_each(&mut add),
                        None => supported = false,
                    }
                }
                // Still active means a loop (reported where it closed);
                // failed means reported further down.
                _ => return Outcome::Failed,
            },
        }
    }
    if depth > MAX_DEPTH {
        let mut chain = vec![entry.name.as_str()];
        let mut next = deepest;
        while let Some(child) = next {
            chain.push(entries[child].name.as_str());
            next = match &marks[child] {
                Mark::Done(Outcome::Expanded { deepest, .. }) => *deepest,
                _ => None,
            };
        }
        diag.error(
            entry.line,
            format!(
                "alias '{}' nests more than {MAX_DEPTH} levels deep: {}",
                entry.name,
                chain.join(" -> ")
            ),
        );
        return Outcome::Failed;
    }
    Outcome::Expanded {
        depth,
        deepest,
        expansion: supported.then_some(expansion),
    }
}

//! The aliases file: which program (or forwarding address) receives mail
//! for a recipient.
//!
//! mailnode delivers each accepted message by piping it into the command its
//! alias names. This module reads the aliases file, reports every problem in
//! it at once (so an operator fixes the file in one pass), and flattens each
//! alias into its final list of targets at load time, so the SMTP session
//! only does a hash lookup per `RCPT TO`.
//!
//! Pipes, `http(s)://` URLs, the embedder's `@NAME` handlers and
//! `user@domain` forwards are deliverable; a URL that does not parse and a
//! handler nobody registered are errors. Other classic
//! aliases targets (files, `:include:`, local users) are accepted in the file
//! but make the alias resolve to `Resolution::Unsupported`: rejecting the
//! recipient is safer than delivering to only part of a list.
//!
//! Format rules beyond the basic `name: target, target` shape:
//! - Comment and blank lines are skipped without ending the current entry, so
//!   a comment may sit between an entry and its continuation lines.
//! - The end of a physical line separates targets just like a comma; this is
//!   forced by unquoted pipes, which run to the end of their line.
//! - Every comma must separate two targets (`a,,b`, a leading or a trailing
//!   comma are errors), because an empty slot usually means a lost target.
//! - Quotes do not span lines.
//! - Alias expansion may pass through at most [`MAX_DEPTH`] aliases, counting
//!   the alias being resolved: `a: b` with `b: "|cmd"` is 2 levels deep.
//!
//! Loading happens in two steps: `parse.rs` reads the file into entries,
//! then `expand.rs` flattens them into the table.

mod expand;
mod parse;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use expand::expand;
use parse::read_entries;

/// How many aliases one expansion chain may pass through, the resolved alias
/// included.
pub const MAX_DEPTH: usize = 10;

/// One problem in the aliases file. Displays as `FILE:LINE: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct AliasError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

/// A target that loads but cannot be delivered. Displays as
/// `FILE:LINE: warning: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasWarning {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for AliasWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: warning: {}",
            self.file.display(),
            self.line,
            self.message
        )
    }
}

/// A successfully loaded aliases file.
#[derive(Debug)]
pub struct Loaded {
    pub table: AliasTable,
    pub warnings: Vec<AliasWarning>,
}

/// Why an aliases file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read aliases file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem found in the file, ordered by line.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<AliasError>),
}

/// Why a running node's aliases were not reloaded; the old table stays in
/// force either way.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("alias resolver unavailable: {0}")]
    ResolverUnavailable(#[source] actix::MailboxError),
    #[error("node not running: {0}")]
    NodeNotRunning(#[source] actix::MailboxError),
}

/// Aliases keyed by lowercase name, each already flattened.
#[derive(Debug, Clone, Default)]
pub struct AliasTable {
    entries: HashMap<String, TableEntry>,
}

#[derive(Debug, Clone)]
struct TableEntry {
    /// Line of the alias definition.
    line: usize,
    /// `None` when some target anywhere in the expansion is unsupported.
    expansion: Option<Vec<Expanded>>,
}

/// What a recipient's local part resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// No alias matches.
    Unknown,
    /// The alias exists but its expansion contains an unsupported target.
    /// `alias` is the matched name (lowercase), `line` where it is defined.
    Unsupported { alias: String, line: usize },
    /// Deliver to these targets, in file order, without duplicates.
    Targets {
        alias: String,
        extension: Option<String>,
        targets: Vec<Expanded>,
    },
}

/// A deliverable target together with the alias (lowercase) whose own list
/// names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expanded {
    pub(crate) via_alias: String,
    pub(crate) target: Target,
}

/// A deliverable target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Pipe the message into this shell command.
    Pipe { command: String },
    /// Forward to this address; the caller decides whether that is allowed.
    Forward { address: String },
    /// POST the message to this `http://` or `https://` URL.
    Http { url: String },
    /// Hand the message to the embedding program's handler of this name
    /// (`Hooks::handler`).
    Handler { name: String },
}

impl Target {
    /// The kind, as the `kind` label of `mailnode_deliveries_by_target_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Pipe { .. } => "program",
            Target::Forward { .. } => "forward",
            Target::Http { .. } => "http",
            Target::Handler { .. } => "handler",
        }
    }
}

impl fmt::Display for Target {
    /// As the aliases file writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pipe { command } => write!(f, "|{command}"),
            Target::Forward { address } => f.write_str(address),
            Target::Http { url } => f.write_str(url),
            Target::Handler { name } => write!(f, "@{name}"),
        }
    }
}

impl AliasTable {
    /// Resolves a recipient's local part (any case, may carry `+ext`).
    ///
    /// An alias whose name contains the `+` wins; otherwise the part before
    /// the first `+` is looked up and the rest becomes the extension, in its
    /// original case because programs may treat it as data.
    pub(crate) fn resolve(&self, local_part: &str) -> Resolution {
        let whole = local_part.to_lowercase();
        if let Some(entry) = self.entries.get(&whole) {
            return entry.resolution(whole, None);
        }
        if let Some((user, extension)) = local_part.split_once('+') {
            let user = user.to_lowercase();
            if let Some(entry) = self.entries.get(&user) {
                return entry.resolution(user, Some(extension.to_string()));
            }
        }
        Resolution::Unknown
    }

    /// Every alias whose expansion forwards to another address, with its
    /// line and the addresses, in line order: without `[relay]` mail to
    /// them is refused, which `check` warns of.
    pub fn forwarding(&self) -> Vec<(usize, &str, Vec<&str>)> {
        let mut found: Vec<(usize, &str, Vec<&str>)> = self
            .entries
            .iter()
            .filter_map(|(name, entry)| {
                let addresses: Vec<&str> = entry
                    .expansion
                    .as_ref()?
                    .iter()
                    .filter_map(|e| match &e.target {
                        Target::Forward { address } => Some(address.as_str()),
                        _ => None,
                    })
                    .collect();
                (!addresses.is_empty()).then_some((entry.line, name.as_str(), addresses))
            })
            .collect();
        found.sort();
        found
    }

    /// Number of aliases, unsupported ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl TableEntry {
    fn resolution(&self, alias: String, extension: Option<String>) -> Resolution {
        match &self.expansion {
            Some(targets) => Resolution::Targets {
                alias,
                extension,
                targets: targets.clone(),
            },
            None => Resolution::Unsupported {
                alias,
                line: self.line,
            },
        }
    }
}

/// Reads and parses the aliases file at `path`, for a node without
/// handlers (the `mailnode` program): every `@NAME` target is an error.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    load_with_handlers(path, &[])
}

/// Reads and parses the aliases file at `path`; `handlers` are the names
/// `@NAME` targets may use.
pub fn load_with_handlers(path: &Path, handlers: &[String]) -> Result<Loaded, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with_handlers(&bytes, path, handlers)
}

/// Parses aliases file contents; `file` is only used in messages.
pub fn parse(bytes: &[u8], file: &Path) -> Result<Loaded, LoadError> {
    parse_with_handlers(bytes, file, &[])
}

/// [`parse()`], with the names of the handlers `@NAME` targets may use.
pub fn parse_with_handlers(
    bytes: &[u8],
    file: &Path,
    handlers: &[String],
) -> Result<Loaded, LoadError> {
    let mut diag = Diag {
        file,
        handlers,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let entries = read_entries(bytes, &mut diag);
    let table = expand(&entries, &mut diag);
    if !diag.errors.is_empty() {
        let mut errors = diag.errors;
        // Phases find problems in different orders; the operator reads by line.
        errors.sort_by_key(|e| e.line);
        return Err(LoadError::Invalid(errors));
    }
    let mut warnings = diag.warnings;
    warnings.sort_by_key(|w| w.line);
    Ok(Loaded { table, warnings })
}

/// Collects problems so that parsing can go on past the first one.
struct Diag<'a> {
    file: &'a Path,
    /// Registered handler names.
    handlers: &'a [String],
    errors: Vec<AliasError>,
    warnings: Vec<AliasWarning>,
}

impl Diag<'_> {
    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(AliasError {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        });
    }

    fn warn(&mut self, line: usize, message: impl Into<String>) {
        self.warnings.push(AliasWarning {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/mailnode/aliases";

    const SAMPLE: &str = r#"# comment
support:  |/opt/rt5/bin/rt-mailgate --queue support --action correspond --url http://rt.example.com/
billing:  "|/usr/local/bin/billing-intake --strict"
team:     "|/usr/local/bin/notify a", "|/usr/local/bin/archive", support
ops:      oncall@partner.example
long:     "|/usr/local/bin/x",
          "|/usr/local/bin/y"
"#;

    const RT: &str =
        "/opt/rt5/bin/rt-mailgate --queue support --action correspond --url http://rt.example.com/";

    fn load_ok(text: &str) -> Loaded {
        parse(text.as_bytes(), Path::new(FILE)).unwrap()
    }

    fn errors_of(bytes: &[u8]) -> Vec<AliasError> {
        match parse(bytes, Path::new(FILE)) {
            Err(LoadError::Invalid(errors)) => errors,
            other => panic!("expected LoadError::Invalid, got {other:?}"),
        }
    }

    fn error_lines(text: &str) -> Vec<String> {
        errors_of(text.as_bytes())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn pipe(via: &str, command: &str) -> Expanded {
        Expanded {
            via_alias: via.to_string(),
            target: Target::Pipe {
                command: command.to_string(),
            },
        }
    }

    fn forward(via: &str, address: &str) -> Expanded {
        Expanded {
            via_alias: via.to_string(),
            target: Target::Forward {
                address: address.to_string(),
            },
        }
    }

    fn targets(table: &AliasTable, local_part: &str) -> Vec<Expanded> {
        match table.resolve(local_part) {
            Resolution::Targets { targets, .. } => targets,
            other => panic!("{local_part}: expected targets, got {other:?}"),
        }
    }

    fn warning_lines(loaded: &Loaded) -> Vec<String> {
        loaded.warnings.iter().map(ToString::to_string).collect()
    }

    // --- the sample file -------------------------------------------------

    #[test]
    fn sample_loads_without_warnings() {
        let loaded = load_ok(SAMPLE);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.table.len(), 5);
        assert!(!loaded.table.is_empty());
    }

    #[test]
    fn sample_unquoted_pipe_keeps_whole_command() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            loaded.table.resolve("support"),
            Resolution::Targets {
                alias: "support".into(),
                extension: None,
                targets: vec![pipe("support", RT)],
            }
        );
    }

    #[test]
    fn sample_quoted_pipe_has_quotes_stripped() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            targets(&loaded.table, "billing"),
            vec![pipe("billing", "/usr/local/bin/billing-intake --strict")]
        );
    }

    #[test]
    fn sample_team_expands_nested_alias() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            targets(&loaded.table, "team"),
            vec![
                pipe("team", "/usr/local/bin/notify a"),
                pipe("team", "/usr/local/bin/archive"),
                pipe("support", RT),
            ]
        );
    }

    #[test]
    fn sample_forward() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            targets(&loaded.table, "ops"),
            vec![forward("ops", "oncall@partner.example")]
        );
    }

    #[test]
    fn sample_continuation_line() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            targets(&loaded.table, "long"),
            vec![
                pipe("long", "/usr/local/bin/x"),
                pipe("long", "/usr/local/bin/y")
            ]
        );
    }

    #[test]
    fn crlf_file_resolves_like_lf_file() {
        let lf = load_ok(SAMPLE);
        let crlf = load_ok(&SAMPLE.replace('\n', "\r\n"));
        assert!(crlf.warnings.is_empty());
        for name in ["support", "billing", "team", "ops", "long"] {
            assert_eq!(crlf.table.resolve(name), lf.table.resolve(name), "{name}");
        }
        // The unquoted pipe runs to the end of the line: no stray '\r'.
        assert_eq!(targets(&crlf.table, "support"), vec![pipe("support", RT)]);
    }

    // --- lookup ----------------------------------------------------------

    #[test]
    fn lookup_is_case_insensitive() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            loaded.table.resolve("SUPPORT"),
            Resolution::Targets {
                alias: "support".into(),
                extension: None,
                targets: vec![pipe("support", RT)],
            }
        );
        assert_eq!(loaded.table.resolve("Team"), loaded.table.resolve("team"));
    }

    #[test]
    fn names_and_references_are_case_insensitive() {
        let loaded = load_ok("Team: SUPPORT, |/bin/t\nSupport: |/bin/s\n");
        assert_eq!(
            loaded.table.resolve("tEaM"),
            Resolution::Targets {
                alias: "team".into(),
                extension: None,
                targets: vec![pipe("support", "/bin/s"), pipe("team", "/bin/t")],
            }
        );
    }

    #[test]
    fn unknown_local_parts() {
        let loaded = load_ok(SAMPLE);
        for local in ["nobody", "nobody+support", "", "+support", "supportx"] {
            assert_eq!(loaded.table.resolve(local), Resolution::Unknown, "{local}");
        }
    }

    #[test]
    fn plus_extension_falls_back_to_user() {
        let loaded = load_ok(SAMPLE);
        assert_eq!(
            loaded.table.resolve("support+urgent"),
            Resolution::Targets {
                alias: "support".into(),
                extension: Some("urgent".into()),
                targets: vec![pipe("support", RT)],
            }
        );
        // The extension keeps its case; the alias name does not.
        assert_eq!(
            loaded.table.resolve("Support+Urgent"),
            Resolution::Targets {
                alias: "support".into(),
                extension: Some("Urgent".into()),
                targets: vec![pipe("support", RT)],
            }
        );
        assert!(matches!(
            loaded.table.resolve("support+"),
            Resolution::Targets { extension: Some(e), .. } if e.is_empty()
        ));
    }

    #[test]
    fn alias_containing_plus_wins_over_user() {
        let loaded = load_ok("a: |/bin/a\na+b: |/bin/ab\n");
        assert_eq!(
            loaded.table.resolve("A+B"),
            Resolution::Targets {
                alias: "a+b".into(),
                extension: None,
                targets: vec![pipe("a+b", "/bin/ab")],
            }
        );
        assert_eq!(
            loaded.table.resolve("a+c"),
            Resolution::Targets {
                alias: "a".into(),
                extension: Some("c".into()),
                targets: vec![pipe("a", "/bin/a")],
            }
        );
    }

    #[test]
    fn extension_splits_at_first_plus() {
        let loaded = load_ok("a: |/bin/a\n");
        assert!(matches!(
            loaded.table.resolve("a+b+c"),
            Resolution::Targets { alias, extension: Some(e), .. } if alias == "a" && e == "b+c"
        ));
        // `a+b` exists but the split is at the first '+', so `a+b+c` looks
        // for `a` only.
        let loaded = load_ok("a+b: |/bin/ab\n");
        assert_eq!(loaded.table.resolve("a+b+c"), Resolution::Unknown);
    }

    // --- target syntax ---------------------------------------------------

    #[test]
    fn unquoted_pipe_keeps_commas_and_quotes() {
        let loaded =
            load_ok("x: |/bin/cmd --to a,b,c --subject \"hello, world\" 'it''s'  \ny: |/bin/y\n");
        assert_eq!(
            targets(&loaded.table, "x"),
            vec![pipe(
                "x",
                "/bin/cmd --to a,b,c --subject \"hello, world\" 'it''s'"
            )]
        );
    }

    #[test]
    fn unquoted_pipe_after_other_targets_takes_rest_of_line() {
        let loaded = load_ok("x: \"|/bin/a\", |/bin/b, c\n   |/bin/d\n");
        assert_eq!(
            targets(&loaded.table, "x"),
            vec![
                pipe("x", "/bin/a"),
                pipe("x", "/bin/b, c"),
                pipe("x", "/bin/d")
            ]
        );
    }

    #[test]
    fn quoted_pipe_escapes() {
        let loaded = load_ok(r#"x: "|/bin/echo \"hi, there\" C:\\dir \d""#);
        assert_eq!(
            targets(&loaded.table, "x"),
            vec![pipe("x", r#"/bin/echo "hi, there" C:\dir \d"#)]
        );
    }

    #[test]
    fn line_end_separates_targets_without_comma() {
        let loaded = load_ok("x: \"|/bin/a\"\n   \"|/bin/b\"\n   , \"|/bin/c\"\n");
        assert_eq!(
            targets(&loaded.table, "x"),
            vec![
                pipe("x", "/bin/a"),
                pipe("x", "/bin/b"),
                pipe("x", "/bin/c")
            ]
        );
    }

    #[test]
    fn comments_and_blank_lines_are_ignored() {
        let text = "# top\n\n   # indented comment\n\t\na: \"|/bin/a\",\n# between entry and continuation\n\n     \"|/bin/b\"\nb: |/bin/b # part of the command\n";
        let loaded = load_ok(text);
        assert_eq!(loaded.table.len(), 2);
        assert_eq!(
            targets(&loaded.table, "a"),
            vec![pipe("a", "/bin/a"), pipe("a", "/bin/b")]
        );
        assert_eq!(
            targets(&loaded.table, "b"),
            vec![pipe("b", "/bin/b # part of the command")]
        );
    }

    #[test]
    fn empty_and_comment_only_files_give_empty_table() {
        for text in ["", "\n\n", "# nothing here\n   # still nothing\n"] {
            let loaded = load_ok(text);
            assert!(loaded.table.is_empty());
            assert_eq!(loaded.table.len(), 0);
            assert!(loaded.warnings.is_empty());
        }
    }

    #[test]
    fn leading_byte_order_mark_is_ignored() {
        let loaded = load_ok("\u{feff}support: |/bin/s\n");
        assert_eq!(
            targets(&loaded.table, "support"),
            vec![pipe("support", "/bin/s")]
        );
    }

    #[test]
    fn quoted_forward_and_forward_dedupe() {
        let loaded = load_ok("f: \"a@x.example\", a@x.example, b@x.example\n");
        assert_eq!(
            targets(&loaded.table, "f"),
            vec![forward("f", "a@x.example"), forward("f", "b@x.example")]
        );
    }

    // --- expansion -------------------------------------------------------

    #[test]
    fn identical_commands_are_delivered_once_keeping_first_via() {
        let text = "all: \"|/bin/notify\", sub1, sub2\nsub1: |/bin/notify\nsub2: \"|/bin/archive\", sub1, \"|/bin/notify\"\n";
        let loaded = load_ok(text);
        assert_eq!(
            targets(&loaded.table, "all"),
            vec![pipe("all", "/bin/notify"), pipe("sub2", "/bin/archive")]
        );
        assert_eq!(
            targets(&loaded.table, "sub2"),
            vec![pipe("sub2", "/bin/archive"), pipe("sub1", "/bin/notify")]
        );
    }

    #[test]
    fn same_alias_listed_twice_is_expanded_once() {
        let loaded = load_ok("x: y, Y\ny: \"|/bin/y\", \"|/bin/z\"\n");
        assert_eq!(
            targets(&loaded.table, "x"),
            vec![pipe("y", "/bin/y"), pipe("y", "/bin/z")]
        );
    }

    fn chain(levels: usize) -> String {
        let mut text = String::new();
        for i in 1..levels {
            text.push_str(&format!("a{i}: a{}\n", i + 1));
        }
        text.push_str(&format!("a{levels}: |/bin/leaf\n"));
        text
    }

    #[test]
    fn depth_ten_is_accepted() {
        let loaded = load_ok(&chain(MAX_DEPTH));
        assert_eq!(
            targets(&loaded.table, "a1"),
            vec![pipe(&format!("a{MAX_DEPTH}"), "/bin/leaf")]
        );
    }

    #[test]
    fn depth_eleven_is_an_error() {
        assert_eq!(
            error_lines(&chain(11)),
            vec![format!(
                "{FILE}:1: alias 'a1' nests more than 10 levels deep: a1 -> a2 -> a3 -> a4 -> a5 -> a6 -> a7 -> a8 -> a9 -> a10 -> a11"
            )]
        );
    }

    #[test]
    fn too_deep_chain_is_reported_once() {
        let errors = errors_of(chain(14).as_bytes());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 4);
        assert!(errors[0].message.starts_with("alias 'a4' nests"));
    }

    #[test]
    fn loop_is_an_error_naming_the_alias() {
        assert_eq!(
            error_lines("a: b\nb: |/bin/b,\n   a\n"),
            vec![format!("{FILE}:3: alias loop: a -> b -> a")]
        );
    }

    #[test]
    fn loop_is_reported_once_even_when_referenced() {
        assert_eq!(
            error_lines("c: a\na: b\nb: a\nd: c, |/bin/d\n"),
            vec![format!("{FILE}:3: alias loop: a -> b -> a")]
        );
    }

    #[test]
    fn self_loop_is_an_error() {
        assert_eq!(
            error_lines("me: \"|/bin/x\", ME\n"),
            vec![format!("{FILE}:1: alias loop: me -> me")]
        );
    }

    // --- unsupported targets ---------------------------------------------

    #[test]
    fn unsupported_targets_are_warnings_and_resolve_unsupported() {
        let text = "mbox: /var/mail/x\nrel: ./x\ninc: :include:/etc/list\nlocal: bob\nok: |/bin/ok\nodd: |/bin/a,\n     two words\n";
        let loaded = load_ok(text);
        let tail = "mail to this alias (and to aliases including it) will be rejected";
        assert_eq!(
            warning_lines(&loaded),
            vec![
                format!("{FILE}:1: warning: alias 'mbox': '/var/mail/x': delivery to a file is not supported; {tail}"),
                format!("{FILE}:2: warning: alias 'rel': './x': delivery to a file is not supported; {tail}"),
                format!("{FILE}:3: warning: alias 'inc': ':include:/etc/list': :include: is not supported; {tail}"),
                format!("{FILE}:4: warning: alias 'local': 'bob' is not a defined alias (local users are not supported); {tail}"),
                format!("{FILE}:7: warning: alias 'odd': unsupported target 'two words'; {tail}"),
            ]
        );
        assert_eq!(loaded.table.len(), 6);
        for (alias, line) in [
            ("mbox", 1),
            ("rel", 2),
            ("inc", 3),
            ("local", 4),
            ("odd", 6),
        ] {
            assert_eq!(
                loaded.table.resolve(alias),
                Resolution::Unsupported {
                    alias: alias.to_string(),
                    line
                },
                "{alias}"
            );
        }
        assert_eq!(
            loaded.table.resolve("MBOX+ext"),
            Resolution::Unsupported {
                alias: "mbox".into(),
                line: 1
            }
        );
        assert_eq!(targets(&loaded.table, "ok"), vec![pipe("ok", "/bin/ok")]);
    }

    #[test]
    fn invalid_forward_is_a_warning() {
        let loaded = load_ok("a: user@\nb: user@@example.com\nc: x@bad..example\n");
        assert_eq!(loaded.warnings.len(), 3);
        assert!(loaded.warnings[0]
            .message
            .contains("'user@' is not a valid forwarding address"));
        assert_eq!(
            loaded.warnings.iter().map(|w| w.line).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(matches!(
            loaded.table.resolve("c"),
            Resolution::Unsupported { .. }
        ));
    }

    #[test]
    fn urls_are_http_targets_and_a_bad_one_is_an_error_at_its_line() {
        let loaded = load_ok(
            "hook: https://App.example/mail/in?queue=1, \"http://127.0.0.1:8080/x\"\nteam: \"|/bin/t\", hook\n",
        );
        let http = |via: &str, url: &str| Expanded {
            via_alias: via.into(),
            target: Target::Http { url: url.into() },
        };
        assert_eq!(
            targets(&loaded.table, "team"),
            vec![
                pipe("team", "/bin/t"),
                http("hook", "https://app.example/mail/in?queue=1"),
                http("hook", "http://127.0.0.1:8080/x"),
            ]
        );
        let errors = error_lines(
            "a: https://\nb: |/bin/b\nc: http://exa mple.org/\nd: https://h.example/#frag\n",
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with("/etc/mailnode/aliases:1: alias 'a': invalid URL 'https://'"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("/etc/mailnode/aliases:3: alias 'c': invalid URL"),
            "{errors:?}"
        );
        assert!(
            errors[2].contains(":4: alias 'd': invalid URL 'https://h.example/#frag': a #fragment"),
            "{errors:?}"
        );
    }

    #[test]
    fn handlers_are_known_by_name_and_an_unknown_one_is_an_error_at_its_line() {
        let known = vec!["store".to_string()];
        let loaded =
            parse_with_handlers(b"archive: @store, |/bin/a\n", Path::new(FILE), &known).unwrap();
        assert_eq!(
            targets(&loaded.table, "archive")[0].target,
            Target::Handler {
                name: "store".into()
            }
        );
        assert_eq!(
            targets(&loaded.table, "archive")[0].target.to_string(),
            "@store"
        );
        let errors = match parse_with_handlers(b"x: |/bin/x\na: @stor\n", Path::new(FILE), &known) {
            Err(LoadError::Invalid(errors)) => errors,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            errors[0].to_string(),
            "/etc/mailnode/aliases:2: alias 'a': unknown handler '@stor'; registered: store"
        );
        // The mailnode program registers none.
        assert_eq!(
            error_lines("a: @store\n"),
            vec!["/etc/mailnode/aliases:1: alias 'a': unknown handler '@store'; none is registered (handlers exist only in a program that embeds mailnode)"]
        );
    }

    #[test]
    fn unsupported_target_anywhere_in_expansion_rejects_whole_alias() {
        let loaded = load_ok(
            "front: \"|/bin/a\", back\nback: \"|/bin/b\", /var/mail/b\nmixed: \"|/bin/m\", nobody\n",
        );
        assert_eq!(loaded.warnings.len(), 2);
        assert_eq!(
            loaded.table.resolve("front"),
            Resolution::Unsupported {
                alias: "front".into(),
                line: 1
            }
        );
        assert_eq!(
            loaded.table.resolve("mixed"),
            Resolution::Unsupported {
                alias: "mixed".into(),
                line: 3
            }
        );
    }

    #[test]
    fn unsupported_exact_alias_does_not_fall_back_to_user() {
        let loaded = load_ok("a: |/bin/a\na+b: /tmp/file\n");
        assert_eq!(
            loaded.table.resolve("a+b"),
            Resolution::Unsupported {
                alias: "a+b".into(),
                line: 2
            }
        );
    }

    // --- load errors -----------------------------------------------------

    #[test]
    fn missing_colon() {
        assert_eq!(
            error_lines("a: |/bin/a\nbroken line\nb: |/bin/b\n"),
            vec![format!("{FILE}:2: missing ':' after alias name")]
        );
    }

    #[test]
    fn broken_header_continuations_are_not_reported_again() {
        assert_eq!(
            error_lines("nocolon\n   |/bin/x\n   \"unterminated\n"),
            vec![format!("{FILE}:1: missing ':' after alias name")]
        );
    }

    #[test]
    fn empty_name() {
        assert_eq!(
            error_lines("a: |/bin/a\n: |/bin/b\n"),
            vec![format!("{FILE}:2: empty alias name")]
        );
    }

    #[test]
    fn empty_target_list() {
        assert_eq!(
            error_lines("a: |/bin/a\nempty:   \n# comment\n\nb: |/bin/b\nlast:"),
            vec![
                format!("{FILE}:2: alias 'empty' has no targets"),
                format!("{FILE}:6: alias 'last' has no targets"),
            ]
        );
    }

    #[test]
    fn targets_only_on_continuation_lines_are_fine() {
        let loaded = load_ok("a:\n  |/bin/a\n");
        assert_eq!(targets(&loaded.table, "a"), vec![pipe("a", "/bin/a")]);
    }

    #[test]
    fn empty_pipe_command() {
        assert_eq!(
            error_lines("a: |   \nb: \"|  \"\nc: |/bin/c,\n   \"|\"\n"),
            vec![
                format!("{FILE}:1: empty pipe command"),
                format!("{FILE}:2: empty pipe command"),
                format!("{FILE}:4: empty pipe command"),
            ]
        );
    }

    #[test]
    fn unterminated_quote() {
        assert_eq!(
            error_lines("a: \"|/bin/a\nb: |/bin/b\nc: \"|/bin/c\",\n   \"|/bin/d \\\"\n"),
            vec![
                format!("{FILE}:1: unterminated quote"),
                format!("{FILE}:4: unterminated quote"),
            ]
        );
    }

    #[test]
    fn duplicate_alias_is_case_insensitive() {
        assert_eq!(
            error_lines("Sales: |/bin/a\nother: |/bin/b\nsales: |/bin/c\n"),
            vec![format!(
                "{FILE}:3: duplicate alias 'sales' (first defined at line 1)"
            )]
        );
    }

    #[test]
    fn invalid_alias_names() {
        assert_eq!(
            error_lines(
                "bad name: |/bin/a\n\"quoted\": |/bin/b\na,b: |/bin/c\ntab\there: |/bin/d\n"
            ),
            vec![
                format!("{FILE}:1: invalid alias name 'bad name': contains white space"),
                format!("{FILE}:2: invalid alias name '\"quoted\"': contains a quote"),
                format!("{FILE}:3: invalid alias name 'a,b': contains a comma"),
                format!("{FILE}:4: invalid alias name 'tab\there': contains white space"),
            ]
        );
    }

    #[test]
    fn invalid_utf8_reports_its_line() {
        assert_eq!(
            errors_of(b"a: |/bin/a\nb: |/bin/\xff\xfe\nc: |/bin/c\n")
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![format!("{FILE}:2: invalid UTF-8")]
        );
    }

    #[test]
    fn nul_byte_reports_its_line() {
        assert_eq!(
            errors_of(b"a: |/bin/a\r\nb: |/bin/\0b\r\n")
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![format!("{FILE}:2: NUL byte in line")]
        );
    }

    #[test]
    fn continuation_without_previous_entry() {
        assert_eq!(
            error_lines("# header comment\n  |/bin/a\n  |/bin/b\na: |/bin/c\n"),
            vec![format!(
                "{FILE}:2: continuation line without a preceding alias"
            )]
        );
    }

    #[test]
    fn misplaced_commas() {
        assert_eq!(
            error_lines(
                "a: , |/bin/a\nb: \"|/bin/b\",, \"|/bin/c\"\nc: \"|/bin/c\",\nd: |/bin/d\n"
            ),
            vec![
                format!("{FILE}:1: empty target before ','"),
                format!("{FILE}:2: empty target before ','"),
                format!("{FILE}:3: trailing ',' without a following target"),
            ]
        );
    }

    #[test]
    fn text_after_quoted_target_needs_a_comma() {
        assert_eq!(
            error_lines("a: \"|/bin/a\" \"|/bin/b\"\nb: \"|/bin/b\"x\n"),
            vec![
                format!("{FILE}:1: missing ',' between targets"),
                format!("{FILE}:2: missing ',' between targets"),
            ]
        );
    }

    #[test]
    fn empty_quoted_target() {
        assert_eq!(
            error_lines("a: \"  \"\n"),
            vec![format!("{FILE}:1: empty quoted target")]
        );
    }

    #[test]
    fn all_errors_are_reported_together_in_line_order() {
        let text = "loop: loop\nok: |/bin/ok\nbad name: |/bin/x\nnocolon\ndup: |/bin/a\nDUP: |/bin/b\nx: \"|/bin/unterminated\nmbox: /var/mail/x\n";
        let errors = errors_of(text.as_bytes());
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![1, 3, 4, 6, 7]
        );
        let err = parse(text.as_bytes(), Path::new(FILE)).unwrap_err();
        assert_eq!(
            err.to_string(),
            [
                format!("{FILE}:1: alias loop: loop -> loop"),
                format!("{FILE}:3: invalid alias name 'bad name': contains white space"),
                format!("{FILE}:4: missing ':' after alias name"),
                format!("{FILE}:6: duplicate alias 'DUP' (first defined at line 5)"),
                format!("{FILE}:7: unterminated quote"),
            ]
            .join("\n")
        );
    }

    #[test]
    fn error_and_warning_display_formats() {
        let error = AliasError {
            file: PathBuf::from("/x/aliases"),
            line: 7,
            message: "boom".into(),
        };
        assert_eq!(error.to_string(), "/x/aliases:7: boom");
        let warning = AliasWarning {
            file: PathBuf::from("/x/aliases"),
            line: 8,
            message: "hmm".into(),
        };
        assert_eq!(warning.to_string(), "/x/aliases:8: warning: hmm");
    }

    // --- load ------------------------------------------------------------

    #[test]
    fn load_missing_file_is_a_read_error() {
        let path =
            std::env::temp_dir().join(format!("mailnode-aliases-missing-{}", std::process::id()));
        match load(&path) {
            Err(LoadError::Read { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected LoadError::Read, got {other:?}"),
        }
        let message = load(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}: cannot read aliases file: ", path.display())),
            "{message}"
        );
    }

    #[test]
    fn load_reads_and_parses_file() {
        let dir = std::env::temp_dir().join(format!("mailnode-aliases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("aliases");
        std::fs::write(
            &path,
            SAMPLE.replace("oncall@partner.example", "/var/mail/ops"),
        )
        .unwrap();
        let result = load(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        let loaded = result.unwrap();
        assert_eq!(loaded.table.len(), 5);
        assert_eq!(loaded.warnings.len(), 1);
        assert_eq!(loaded.warnings[0].file, path);
        assert_eq!(loaded.warnings[0].line, 5);
        assert_eq!(targets(&loaded.table, "team").len(), 3);
    }
}

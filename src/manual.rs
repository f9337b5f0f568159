//! `mailnode man` and `mailnode completions`: the manual pages and the
//! shell completions, made at run time (a build script's output has no
//! fixed place a package could take it from).
//!
//! The command pages come from the clap definition itself (clap_mangen),
//! so they cannot drift from what the program accepts. The two file-format
//! pages, mailnode.toml(5) and mailnode-aliases(5), are docs/configuration.md
//! and docs/aliases.md turned into roff here: the docs stay the one text.

use std::path::{Path, PathBuf};

/// The file-format pages: (name, section, title, the Markdown they are made from).
const FORMAT_PAGES: [(&str, &str, &str, &str); 2] = [
    (
        "mailnode.toml",
        "5",
        "the configuration file of mailnode",
        include_str!("../docs/configuration.md"),
    ),
    (
        "mailnode-aliases",
        "5",
        "the aliases file of mailnode",
        include_str!("../docs/aliases.md"),
    ),
];

/// Writes every page into `dir`; returns their paths.
pub fn write_pages(command: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut write = |name: String, page: Vec<u8>| -> std::io::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, page)?;
        written.push(path);
        Ok(())
    };
    let man = |command: clap::Command| {
        clap_mangen::Man::new(command)
            .section("8")
            .manual("mailnode manual")
    };
    let mut page = Vec::new();
    man(command.clone()).render(&mut page)?;
    write("mailnode.8".into(), page)?;
    // A page per subcommand, and per subcommand of those (`ctl status`),
    // named as the pages that list them refer to them.
    let version = command.get_version().unwrap_or_default().to_string();
    let mut pending: Vec<(String, clap::Command)> = command
        .get_subcommands()
        .map(|sub| (format!("mailnode-{}", sub.get_name()), sub.clone()))
        .collect();
    while let Some((name, sub)) = pending.pop() {
        pending.extend(
            sub.get_subcommands()
                .map(|inner| (format!("{name}-{}", inner.get_name()), inner.clone())),
        );
        let sub = sub.name(name.clone()).version(version.clone());
        let mut page = Vec::new();
        man(sub).render(&mut page)?;
        write(format!("{name}.8"), page)?;
    }
    for (name, section, title, markdown) in FORMAT_PAGES {
        write(
            format!("{name}.{section}"),
            markdown_page(name, section, title, markdown).into_bytes(),
        )?;
    }
    Ok(written)
}

/// Prints the completion script of `shell` ("bash", "zsh" or "fish").
pub fn completions(mut command: clap::Command, shell: &str) {
    use clap_complete::Shell;
    let shell = match shell {
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        _ => Shell::Bash,
    };
    clap_complete::generate(shell, &mut command, "mailnode", &mut std::io::stdout());
}

/// A man page from one of the docs' Markdown pages: headings, paragraphs,
/// lists, code blocks and tables (set as preformatted text), with inline
/// code in bold and links reduced to their text.
fn markdown_page(name: &str, section: &str, title: &str, markdown: &str) -> String {
    let mut out = format!(
        ".TH {} {section} \"\" \"mailnode {}\" \"mailnode manual\"\n.SH NAME\n{} \\- {title}\n",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION"),
        escape(name),
    );
    let mut in_code = false;
    let mut paragraph_open = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            if in_code {
                out.push_str(".fi\n.RE\n");
            } else {
                out.push_str(".PP\n.RS 4\n.nf\n");
            }
            in_code = !in_code;
            paragraph_open = false;
            continue;
        }
        if in_code {
            out.push_str(&escape_line(&escape(line)));
            out.push('\n');
            continue;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            paragraph_open = false;
            continue;
        }
        if let Some(heading) = line.strip_prefix("# ") {
            // The page's own title: NAME already says it.
            let _ = heading;
            continue;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            out.push_str(&format!(".SH {}\n", escape(&plain(heading)).to_uppercase()));
            paragraph_open = false;
            continue;
        }
        if let Some(heading) = line
            .strip_prefix("### ")
            .or_else(|| line.strip_prefix("#### "))
        {
            out.push_str(&format!(".SS {}\n", escape(&plain(heading))));
            paragraph_open = false;
            continue;
        }
        if trimmed.starts_with('|') {
            // A table row: kept as a line of text; the separator row dropped.
            if trimmed.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')) {
                continue;
            }
            if !paragraph_open {
                out.push_str(".PP\n");
                paragraph_open = true;
            } else {
                out.push_str(".br\n");
            }
            let cells: Vec<String> = trimmed
                .trim_matches('|')
                .split(" | ")
                .map(|c| inline(c.trim()))
                .collect();
            out.push_str(&cells.join(" \\(em "));
            out.push('\n');
            continue;
        }
        if let Some(item) = trimmed
            .strip_prefix("- ")
            .or_else(|| trimmed.strip_prefix("* "))
        {
            out.push_str(".IP \\(bu 2\n");
            out.push_str(&inline(item));
            out.push('\n');
            paragraph_open = true;
            continue;
        }
        if let Some((number, item)) = trimmed.split_once(". ") {
            if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
                out.push_str(&format!(".IP {number}. 4\n"));
                out.push_str(&inline(item));
                out.push('\n');
                paragraph_open = true;
                continue;
            }
        }
        if !paragraph_open {
            out.push_str(".PP\n");
            paragraph_open = true;
        }
        out.push_str(&inline(trimmed));
        out.push('\n');
    }
    if in_code {
        out.push_str(".fi\n.RE\n");
    }
    out.push_str(".SH SEE ALSO\n\\fBmailnode\\fR(8)\n");
    out
}

/// Inline Markdown as roff: `code` and **strong** in bold, links as their
/// text.
fn inline(text: &str) -> String {
    let text = plain_links(text);
    let mut out = String::new();
    let mut bold = false;
    let mut rest = text.as_str();
    while let Some(at) = rest.find(['`', '*']) {
        out.push_str(&escape(&rest[..at]));
        let marker = &rest[at..];
        let (len, toggle) = if marker.starts_with("**") {
            (2, true)
        } else if marker.starts_with('`') {
            (1, true)
        } else {
            // A lone `*` (a glob, an emphasis): kept as it is.
            (1, false)
        };
        if toggle {
            out.push_str(if bold { "\\fR" } else { "\\fB" });
            bold = !bold;
        } else {
            out.push('*');
        }
        rest = &marker[len..];
    }
    out.push_str(&escape(rest));
    if bold {
        out.push_str("\\fR");
    }
    escape_line(&out)
}

/// `[text](target)` as `text`.
fn plain_links(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|i| open + i) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|i| close + i) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Heading text without Markdown marks.
fn plain(text: &str) -> String {
    plain_links(text).replace(['`', '*'], "")
}

/// Backslashes and hyphens as roff wants them.
fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

/// A line that would begin with `.` or `'` is a request to roff: `\&`
/// makes it text.
fn escape_line(line: &str) -> String {
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_roff_that_cannot_run_requests() {
        let page = markdown_page(
            "x",
            "5",
            "a test",
            "# Title\n\n## A section\n\nSome `code` and **bold**, a [link](y.md).\n\n- one\n- two\n\n```\n.dangerous\nback\\slash\n```\n\n| key | default |\n|---|---|\n| `a` | `1` |\n",
        );
        assert!(page.starts_with(".TH X 5 "), "{page}");
        assert!(page.contains(".SH A SECTION\n"), "{page}");
        assert!(
            page.contains("Some \\fBcode\\fR and \\fBbold\\fR, a link."),
            "{page}"
        );
        assert!(page.contains(".IP \\(bu 2\none\n"), "{page}");
        assert!(
            page.contains(".nf\n\\&.dangerous\nback\\eslash\n.fi\n"),
            "{page}"
        );
        assert!(page.contains("key \\(em default\n"), "{page}");
        assert!(!page.contains("|---"), "{page}");
    }
}

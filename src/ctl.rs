//! `mailnode ctl`: the control protocol from the shell. Human output in the
//! spirit of `mailq`, or `--json`. Exit 0 on an ok reply, 1 on an error
//! reply, 69 (EX_UNAVAILABLE) when no server answers, 64 on bad usage.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailnode::config::{self, Config};
use mailnode::control::{QueueEntry, Request, Response};
use mailnode::sysexits::{EX_CONFIG, EX_UNAVAILABLE, EX_USAGE};
use serde_json::Value;

use crate::DEFAULT_CONFIG;

pub fn run(config: Option<PathBuf>, control: Option<PathBuf>, json: bool, words: &[String]) -> u8 {
    let Some(request) = request(words) else {
        eprintln!(
            "mailnode ctl: unknown command {:?}; try: status, queue [--limit N] [--after ID], queue show|flush|delete|hold|release|bounce ID, aliases reload, aliases lookup ADDRESS, tls reload, pause, resume",
            words.join(" ")
        );
        return EX_USAGE;
    };
    let (path, from) = match control {
        Some(p) => (p, "--control".to_string()),
        None => match socket_from_config(config) {
            Ok(found) => found,
            Err(problems) => {
                for p in problems {
                    eprintln!("{p}");
                }
                return EX_CONFIG;
            }
        },
    };
    let response = match exchange(&path, &request) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!(
                "mailnode ctl: permission denied on {}: run as the server's user or root",
                path.display()
            );
            return 1;
        }
        Err(e) => {
            eprintln!(
                "mailnode ctl: no server answers at {} ({e}); that socket comes from {from}: name the server's config file with -c FILE, or its socket with --control PATH",
                path.display()
            );
            return EX_UNAVAILABLE;
        }
    };
    if !response.ok {
        eprintln!(
            "mailnode ctl: {}",
            response.error.unwrap_or_else(|| "error".into())
        );
        return 1;
    }
    let data = response.data.unwrap_or(Value::Null);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&data).unwrap_or_default()
        );
    } else {
        print_human(&request, &data);
        if let (Some(true), Some(last)) = (response.more, data.as_array().and_then(|a| a.last())) {
            let limit = match &request {
                Request::QueueList {
                    limit: Some(limit), ..
                } => format!(" --limit {limit}"),
                _ => String::new(),
            };
            println!(
                "-- more follow: mailnode ctl queue{limit} --after {}",
                scalar(&last["id"])
            );
        }
    }
    0
}

/// The config file of an installed node, which `ctl` falls back to.
const SYSTEM_CONFIG: &str = "/etc/mailnode/mailnode.toml";

/// The control socket, and in words where it came from.
fn socket_from_config(config: Option<PathBuf>) -> Result<(PathBuf, String), Vec<String>> {
    let path =
        config.or_else(|| default_config(Path::new(DEFAULT_CONFIG), Path::new(SYSTEM_CONFIG)));
    match path {
        Some(p) => {
            let config = config::load_files_only(&p)
                .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            Ok((config.control.socket, p.display().to_string()))
        }
        None => Ok((
            Config::default().control.socket,
            format!("the built-in default (neither {DEFAULT_CONFIG} nor {SYSTEM_CONFIG} exists)"),
        )),
    }
}

/// Without `-c`: the working directory's config (a development checkout),
/// else the installed one.
fn default_config(local: &Path, system: &Path) -> Option<PathBuf> {
    [local, system]
        .into_iter()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

/// The words of the command line as a request.
fn request(words: &[String]) -> Option<Request> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let id = |s: &str| s.to_string();
    Some(match w.as_slice() {
        ["status"] => Request::Status,
        ["queue", "show", i] => Request::QueueShow { id: id(i) },
        ["queue", "flush"] => Request::QueueFlush { id: None },
        ["queue", "flush", i] => Request::QueueFlush { id: Some(id(i)) },
        ["queue", "delete", i] => Request::QueueDelete { id: id(i) },
        ["queue", "hold", i] => Request::QueueHold { id: id(i) },
        ["queue", "release", i] => Request::QueueRelease { id: id(i) },
        ["queue", "bounce", i] => Request::QueueBounce { id: id(i) },
        ["queue", rest @ ..] => {
            let (limit, after) = listing(rest)?;
            Request::QueueList { limit, after }
        }
        ["aliases", "reload"] => Request::AliasesReload,
        ["tls", "reload"] => Request::TlsReload,
        ["aliases", "lookup", a] => Request::AliasesLookup {
            address: a.to_string(),
        },
        ["pause"] => Request::IntakePause,
        ["resume"] => Request::IntakeResume,
        _ => return None,
    })
}

/// `[list] [--limit N] [--after ID]`, the words after `queue`.
fn listing(words: &[&str]) -> Option<(Option<usize>, Option<String>)> {
    let mut words = match words {
        ["list", rest @ ..] => rest,
        rest => rest,
    };
    let (mut limit, mut after) = (None, None);
    while let [flag, value, rest @ ..] = words {
        match *flag {
            "--limit" => limit = Some(value.parse().ok().filter(|&n| n > 0)?),
            "--after" => after = Some(value.to_string()),
            _ => return None,
        }
        words = rest;
    }
    words.is_empty().then_some((limit, after))
}

fn exchange(path: &std::path::Path, request: &Request) -> std::io::Result<Response> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // A server that refuses us answers at once and hangs up, so our write
    // may fail while its answer waits to be read.
    let written = stream.write_all(&line);
    let mut reply = String::new();
    match BufReader::new(stream).read_line(&mut reply) {
        Ok(n) if n > 0 => serde_json::from_str(&reply).map_err(std::io::Error::other),
        Ok(_) => Err(written
            .err()
            .unwrap_or_else(|| std::io::ErrorKind::UnexpectedEof.into())),
        Err(e) => Err(written.err().unwrap_or(e)),
    }
}

fn print_human(request: &Request, data: &Value) {
    match request {
        Request::QueueList { .. } => {
            match serde_json::from_value::<Vec<QueueEntry>>(data.clone()) {
                Ok(entries) => print_queue(&entries),
                Err(_) => print_value(data, 0),
            }
        }
        _ => print_value(data, 0),
    }
}

/// A listing in the spirit of `mailq`.
fn print_queue(entries: &[QueueEntry]) {
    if entries.is_empty() {
        println!("Mail queue is empty");
        return;
    }
    println!(
        "{:<16} {:>9} {:>7} {:<9} Sender",
        "Queue ID", "Size", "Age", "State"
    );
    for e in entries {
        let sender = if e.sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{}>", e.sender)
        };
        println!(
            "{:<16} {:>9} {:>7} {:<9} {}",
            e.id,
            e.size,
            humantime::format_duration(Duration::from_secs(e.age_seconds))
                .to_string()
                .split(' ')
                .next()
                .unwrap_or(""),
            e.state,
            sender
        );
        for r in &e.recipients {
            // Program output: no control character reaches the terminal.
            let said: String = r
                .last_error
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let why = if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            };
            // The target too when it is not a program: which of an
            // alias's URLs or handlers failed is what the operator needs.
            let target = if r.target.is_empty() || r.target.starts_with('|') {
                String::new()
            } else {
                format!(" via {}", r.target)
            };
            println!(
                "{:>18} {}{} ({}, {} attempts{})",
                "->", r.address, target, r.state, r.attempts, why
            );
        }
    }
    println!(
        "-- {} message{}",
        entries.len(),
        if entries.len() == 1 { "" } else { "s" }
    );
}

fn print_value(v: &Value, indent: usize) {
    print!("{}", render_value(v, indent));
}

/// A reply's data as indented `key: value` lines; an empty table or list
/// says `none` rather than leaving its key hanging.
fn render_value(v: &Value, indent: usize) -> String {
    use std::fmt::Write;
    let pad = " ".repeat(indent);
    let empty = |v: &Value| match v {
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    };
    let mut out = String::new();
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    _ if empty(v) => {
                        let _ = writeln!(out, "{pad}{k}: none");
                    }
                    Value::Object(_) | Value::Array(_) => {
                        let _ = writeln!(out, "{pad}{k}:");
                        out.push_str(&render_value(v, indent + 2));
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}{k}: {}", scalar(v));
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) | Value::Array(_) if !empty(item) => {
                        let _ = writeln!(out, "{pad}-");
                        out.push_str(&render_value(item, indent + 2));
                    }
                    _ if empty(item) => {
                        let _ = writeln!(out, "{pad}- none");
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}- {}", scalar(item));
                    }
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other));
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Option<Request> {
        request(&line.split(' ').map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn queue_listings_page_with_limit_and_after() {
        let list = |limit, after: Option<&str>| {
            Some(Request::QueueList {
                limit,
                after: after.map(String::from),
            })
        };
        assert_eq!(words("queue"), list(None, None));
        assert_eq!(words("queue list"), list(None, None));
        assert_eq!(words("queue --limit 5"), list(Some(5), None));
        assert_eq!(
            words("queue list --after 0SV4W2X8Y9Z0001 --limit 5"),
            list(Some(5), Some("0SV4W2X8Y9Z0001"))
        );
        for bad in [
            "queue --limit 0",
            "queue --limit x",
            "queue --limit",
            "queue --bogus 1",
        ] {
            assert_eq!(words(bad), None, "{bad}");
        }
        assert_eq!(
            words("queue show X"),
            Some(Request::QueueShow { id: "X".into() })
        );
    }

    #[test]
    fn status_text_says_none_for_an_empty_table_instead_of_a_bare_key() {
        let data = serde_json::json!({
            "actor_restarts": {},
            "queue": {"active": 1, "held": 0},
            "listening": [],
        });
        assert_eq!(
            render_value(&data, 0),
            "actor_restarts: none\nlistening: none\nqueue:\n  active: 1\n  held: 0\n"
        );
    }

    #[test]
    fn without_c_the_local_config_wins_then_the_installed_one() {
        let dir = tempfile::tempdir().unwrap();
        let (local, system) = (
            dir.path().join("local.toml"),
            dir.path().join("system.toml"),
        );
        assert_eq!(default_config(&local, &system), None);
        std::fs::write(&system, "").unwrap();
        assert_eq!(default_config(&local, &system), Some(system.clone()));
        std::fs::write(&local, "").unwrap();
        assert_eq!(default_config(&local, &system), Some(local));
    }
}

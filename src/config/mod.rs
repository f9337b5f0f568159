//! Configuration of the mail node: reading the TOML file and turning it into
//! plain, validated data for the rest of the program.
//!
//! The key names are a public contract with operators, so they are spelled
//! here exactly as documented in `mailnode.toml`. Parsing happens in two
//! steps: the text is deserialized into private "raw" structs that keep the
//! source span of every value, then each value is checked and converted. The
//! spans let every complaint point at a line of the file, and the separate
//! checking step lets us report all bad values at once instead of making the
//! operator fix them one restart at a time.
//!
//! Paths are kept exactly as written; resolving relative paths is up to the
//! caller.
//!
//! The code: `types.rs` holds the configuration as the program uses it,
//! `raw.rs` the file's shape as read (every value with its span), and
//! `check.rs` turns the one into the other, naming each bad key with its
//! line.

mod check;
mod raw;
mod types;

use std::path::{Path, PathBuf};

use check::Checker;
use raw::RawConfig;
pub use types::*;

/// One problem with a config file.
///
/// Displays as `FILE:LINE: message`, or `FILE: message` when no line applies
/// (such as an unreadable file), the form editors and compilers use so the
/// location can be jumped to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {}", .file.display(), line_suffix(*.line), .message)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line of the offending text, if any.
    pub line: Option<usize>,
    /// What is wrong, naming the key and what was expected.
    pub message: String,
}

/// The `:LINE` part of an error's location, empty when no line applies.
fn line_suffix(line: Option<usize>) -> String {
    line.map(|line| format!(":{line}")).unwrap_or_default()
}

/// Reads and parses the config file at `path` (see [`parse`]).
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    parse(&read(path)?, path)
}

/// Reads and parses the config file at `path` without looking anything up
/// in the system (see [`parse_files_only`]).
pub fn load_files_only(path: &Path) -> Result<Config, Vec<ConfigError>> {
    parse_files_only(&read(path)?, path)
}

fn read(path: &Path) -> Result<String, Vec<ConfigError>> {
    std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot read config file: {e}"),
        }]
    })
}

/// Parses config `text`; `file` is only used to label errors.
///
/// A TOML syntax error, an unknown key or a value of the wrong type stops
/// parsing with that one error. Otherwise every bad value is reported, in
/// file order. Run as root (where `serve` starts programs as
/// `[delivery] user`), the user is looked up too, so that `check` refuses
/// what `serve` would.
pub fn parse(text: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
    parse_with(text, file, nix::unistd::geteuid().is_root())
}

/// [`parse`] without looking anything up in the system: what `mailnode
/// ctl` needs of a config (its control socket) must not depend on the user
/// database.
pub fn parse_files_only(text: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
    parse_with(text, file, false)
}

fn parse_with(text: &str, file: &Path, look_up_users: bool) -> Result<Config, Vec<ConfigError>> {
    let error_at = |e: &toml::de::Error, text: &str| {
        let message = e.message().lines().next().unwrap_or_default();
        let mut message = if message.is_empty() {
            "invalid TOML"
        } else {
            message
        }
        .to_string();
        if let Some(hint) = e
            .span()
            .and_then(|span| type_hint(text, span.start, &message))
        {
            message.push_str(hint);
        }
        ConfigError {
            file: file.to_path_buf(),
            line: e.span().map(|span| line_of(text, span.start)),
            message,
        }
    };
    // A syntax error leaves nothing to read further.
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(vec![error_at(&e, text)]);
    }
    // A value of the wrong type, or an unknown key, stops serde at the
    // first one: each is noted, its line blanked (spaces, so that every
    // offset and line number stays), and the rest read again, so that one
    // run of `check` reports every problem.
    let mut errors = Vec::new();
    let mut working = text.to_string();
    let raw = loop {
        match toml::from_str::<RawConfig>(&working) {
            Ok(raw) => break Some(raw),
            Err(e) => {
                errors.push(error_at(&e, &working));
                let Some(span) = e.span() else { break None };
                let start = working[..span.start.min(working.len())]
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                let end = working[start..]
                    .find('\n')
                    .map_or(working.len(), |i| start + i);
                working.replace_range(start..end, &" ".repeat(end - start));
                // A value over several lines cannot be blanked line by line.
                if errors.len() >= 100 || working.parse::<toml::Table>().is_err() {
                    break None;
                }
            }
        }
    };
    if let Some(raw) = raw {
        let mut checker = Checker {
            text,
            file,
            errors: Vec::new(),
            look_up_users,
        };
        let config = checker.config(raw);
        if errors.is_empty() && checker.errors.is_empty() {
            return Ok(config);
        }
        errors.extend(checker.errors);
    }
    errors.sort_by_key(|e| e.line);
    Err(errors)
}

/// Keys whose value is a duration written as a string.
const DURATION_KEYS: [&str; 9] = [
    "connect_limit",
    "command_timeout",
    "data_timeout",
    "timeout",
    "retry_min",
    "retry_max",
    "max_age",
    "handshake_timeout",
    "dns_timeout",
];

/// What to add to serde's "expected a string" when the key is a duration
/// given as a bare number (`command_timeout = 300`): the form it takes.
fn type_hint(text: &str, offset: usize, message: &str) -> Option<&'static str> {
    if !message.contains("expected a string") {
        return None;
    }
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let key = text[start..].split('=').next()?.trim();
    DURATION_KEYS
        .contains(&key)
        .then_some(": durations are strings with a unit, such as \"300s\" or \"5m\"")
}

/// 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use std::net::SocketAddr;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn file() -> &'static Path {
        Path::new("mailnode.toml")
    }

    // As root: the user is looked up whoever runs the tests.
    fn ok(text: &str) -> Config {
        match parse_with(text, file(), true) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected errors: {errors:?}"),
        }
    }

    fn errs(text: &str) -> Vec<ConfigError> {
        match parse_with(text, file(), true) {
            Ok(config) => panic!("expected errors, got {config:?}"),
            Err(errors) => errors,
        }
    }

    /// The single error `text` produces, as displayed.
    fn one_err(text: &str) -> String {
        let errors = errs(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].to_string()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn empty_text_gives_defaults() {
        let config = ok("");
        assert_eq!(config, Config::default());
        assert_eq!(config.hostname, system_hostname());
        assert!(!config.hostname.is_empty());
        assert_eq!(config.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(config.smtp.max_message_size, 26_214_400);
        assert_eq!(config.smtp.connect_limit, Duration::from_secs(1800));
        assert_eq!(config.queue.max_age, Duration::from_secs(3 * 86_400));
        assert_eq!(config.limits.connection_rate_per_ip.to_string(), "120/m");
        assert_eq!(config.limits.message_rate_per_ip.to_string(), "600/m");
        assert_eq!(config.control.mode, 0o600);
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9325".parse().unwrap())
        );
        assert_eq!(
            config.relay,
            RelayConfig {
                host: None,
                helo: None
            }
        );
        assert_eq!(config.log.level, LogLevel::Info);
        assert_eq!(config.delivery.user, "nobody");
        assert_eq!(config.delivery.spawner, SpawnerChoice::Auto);
    }

    #[test]
    fn shipped_file_parses_to_defaults() {
        let config = ok(include_str!("../../config/mailnode.toml"));
        assert_eq!(config, Config::default());
    }

    #[test]
    fn shipped_file_documents_every_key() {
        let text = include_str!("../../config/mailnode.toml");
        for key in [
            "#hostname = ",
            "[smtp]",
            "listen = [",
            "max_connections = ",
            "max_connections_per_ip = ",
            "max_message_size = ",
            "max_recipients = ",
            "connect_limit = ",
            "command_timeout = ",
            "data_timeout = ",
            "local_domains = ",
            "bare_lf = ",
            "[aliases]",
            "[spool]",
            "[delivery]",
            "mode = \"queue\"",
            "concurrency = ",
            "timeout = ",
            "user = ",
            "spawner = \"auto\"",
            "[queue]",
            "retry_min = ",
            "retry_max = ",
            "max_age = ",
            "[relay]",
            "host = ",
            "helo = ",
            "[limits]",
            "connection_rate_per_ip = ",
            "message_rate_per_ip = ",
            "[access]",
            "finicky = ",
            "deny = ",
            "[[access.channel]]",
            "name = ",
            "hosts = ",
            "[control]",
            "socket = ",
            "mode = \"0600\"",
            "[metrics]",
            "listen = \"",
            "[http]",
            "secret_file = ",
            "ca_file = ",
            "max_per_host = ",
            "[log]",
            "format = ",
            "level = ",
        ] {
            assert!(text.contains(key), "mailnode.toml lacks {key}");
        }
    }

    const FULL: &str = r#"
hostname = "mx.example.net"

[smtp]
listen = ["0.0.0.0:25", "[::1]:587"]
max_connections = 10
max_connections_per_ip = 2
max_message_size = 1048576
max_recipients = 7
connect_limit = "10m"
command_timeout = "45s"
data_timeout = "2m"
local_domains = ["Example.ORG", "mail.example.net"]
bare_lf = "normalize"

[aliases]
path = "/etc/mailnode/aliases"

[spool]
path = "/var/spool/mailnode"

[delivery]
mode = "inline"
concurrency = 3
timeout = "90s"
user = "mail"
spawner = "process"

[queue]
retry_min = "5m"
retry_max = "2h"
max_age = "5d"

[relay]
host = "smtp.example.com:587"
helo = "out.example.net"

[limits]
connection_rate_per_ip = "5/s"
message_rate_per_ip = "1000/h"

[access]
finicky = true
deny = ["192.0.2.0/24", "2001:db8::1"]

[[access.channel]]
name = "lan"
hosts = ["10.0.0.0/8"]

[[access.channel]]
name = "submission"
hosts = ["198.51.100.7", "2001:db8:1::/48"]

[control]
socket = "/run/mailnode/control.sock"
mode = "0660"

[metrics]
listen = "[::1]:9100"

[log]
format = "json"
level = "debug"
"#;

    #[test]
    fn full_file_reads_every_value() {
        let c = ok(FULL);
        assert_eq!(c.hostname, "mx.example.net");

        assert_eq!(
            c.smtp.listen,
            vec![
                "0.0.0.0:25".parse::<SocketAddr>().unwrap(),
                "[::1]:587".parse::<SocketAddr>().unwrap()
            ]
        );
        assert_eq!(c.smtp.max_connections, 10);
        assert_eq!(c.smtp.max_connections_per_ip, 2);
        assert_eq!(c.smtp.max_message_size, 1_048_576);
        assert_eq!(c.smtp.max_recipients, 7);
        assert_eq!(c.smtp.connect_limit, Duration::from_secs(600));
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(45));
        assert_eq!(c.smtp.data_timeout, Duration::from_secs(120));
        assert_eq!(
            c.smtp.local_domains,
            vec!["example.org", "mail.example.net"]
        );
        assert_eq!(c.smtp.bare_lf, BareLf::Normalize);

        assert_eq!(c.aliases.path, PathBuf::from("/etc/mailnode/aliases"));
        assert_eq!(c.spool.path, PathBuf::from("/var/spool/mailnode"));

        assert_eq!(c.delivery.mode, DeliveryMode::Inline);
        assert_eq!(c.delivery.concurrency, 3);
        assert_eq!(c.delivery.timeout, Duration::from_secs(90));
        assert_eq!(c.delivery.user, "mail");
        assert_eq!(c.delivery.spawner, SpawnerChoice::Process);

        assert_eq!(c.queue.retry_min, Duration::from_secs(300));
        assert_eq!(c.queue.retry_max, Duration::from_secs(7200));
        assert_eq!(c.queue.max_age, Duration::from_secs(5 * 86_400));

        assert_eq!(
            c.relay.host,
            Some(RelayHost {
                host: "smtp.example.com".to_string(),
                port: 587
            })
        );
        assert_eq!(c.relay.helo.as_deref(), Some("out.example.net"));

        assert_eq!(c.limits.connection_rate_per_ip.count.get(), 5);
        assert_eq!(c.limits.connection_rate_per_ip.per, Duration::from_secs(1));
        assert_eq!(c.limits.message_rate_per_ip.count.get(), 1000);
        assert_eq!(c.limits.message_rate_per_ip.per, Duration::from_secs(3600));

        assert!(c.access.finicky);
        assert_eq!(
            c.access.deny,
            vec![net("192.0.2.0/24"), net("2001:db8::1/128")]
        );
        assert_eq!(
            c.access.channel,
            vec![
                Channel {
                    name: "lan".to_string(),
                    hosts: vec![net("10.0.0.0/8")]
                },
                Channel {
                    name: "submission".to_string(),
                    hosts: vec![net("198.51.100.7/32"), net("2001:db8:1::/48")]
                },
            ]
        );

        assert_eq!(
            c.control.socket,
            PathBuf::from("/run/mailnode/control.sock")
        );
        assert_eq!(c.control.mode, 0o660);
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, LogLevel::Debug);
    }

    #[test]
    fn duration_forms_accepted() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("30m", Duration::from_secs(30 * 60)),
            ("3d", Duration::from_secs(3 * 86_400)),
        ] {
            let c = ok(&format!("[smtp]\ncommand_timeout = \"{text}\"\n"));
            assert_eq!(c.smtp.command_timeout, want, "{text}");
        }
    }

    #[test]
    fn bare_number_duration_rejected() {
        assert_eq!(
            one_err("[smtp]\nconnect_limit = \"30\"\n"),
            "mailnode.toml:2: smtp.connect_limit: invalid duration \"30\": expected a number and a unit such as \"30s\", \"30m\" or \"3d\""
        );
    }

    #[test]
    fn bad_and_zero_durations_rejected() {
        assert_eq!(
            one_err("[queue]\n\nmax_age = \"30x\"\n"),
            "mailnode.toml:3: queue.max_age: invalid duration \"30x\": expected a number and a unit such as \"30s\", \"30m\" or \"3d\""
        );
        let msg = one_err("[delivery]\ntimeout = \"0s\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: delivery.timeout: duration \"0s\" is zero"),
            "{msg}"
        );
        let msg = one_err("[smtp]\ndata_timeout = \"\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: smtp.data_timeout: invalid duration"),
            "{msg}"
        );
    }

    #[test]
    fn integer_where_string_expected_rejected() {
        let errors = errs("[smtp]\nmax_recipients = 5\ncommand_timeout = 30\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(3));
        assert!(
            errors[0].message.contains("expected a string"),
            "{}",
            errors[0]
        );
        assert!(errors[0].to_string().starts_with("mailnode.toml:3: "));

        let errors = errs("[control]\nmode = 0o600\n");
        assert_eq!(errors[0].line, Some(2));
    }

    #[test]
    fn string_where_integer_expected_rejected() {
        let errors = errs("[smtp]\nmax_connections = \"1000\"\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(2));
    }

    #[test]
    fn rates_accepted() {
        for (text, count, secs) in [("7/s", 7, 1), ("120/m", 120, 60), ("3600/h", 3600, 3600)] {
            let c = ok(&format!("[limits]\nmessage_rate_per_ip = \"{text}\"\n"));
            let rate = c.limits.message_rate_per_ip;
            assert_eq!(rate.count.get(), count);
            assert_eq!(rate.per, Duration::from_secs(secs));
            assert_eq!(rate.to_string(), text);
        }
    }

    #[test]
    fn bad_rates_rejected() {
        for text in [
            "0/m",
            "x/m",
            "10/d",
            "10",
            "-1/s",
            "+5/s",
            "10/",
            "/m",
            "10/m/s",
            "5000000000/s",
            " 5/s",
        ] {
            let msg = one_err(&format!("[limits]\nconnection_rate_per_ip = \"{text}\"\n"));
            assert_eq!(
                msg,
                format!(
                    "mailnode.toml:2: limits.connection_rate_per_ip: invalid rate {text:?}: expected N/s, N/m or N/h with N a positive integer, such as \"120/m\""
                )
            );
        }
        assert_eq!("1/x".parse::<Rate>(), Err(InvalidRate));
    }

    #[test]
    fn rate_display_of_other_period() {
        let rate = Rate {
            count: NonZeroU32::new(3).unwrap(),
            per: Duration::from_secs(120),
        };
        assert_eq!(rate.to_string(), "3/2m");
    }

    #[test]
    fn unknown_top_level_key_rejected_with_line() {
        let errors = errs("hostname = \"a.example\"\n\ncolour = \"blue\"\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(3));
        assert!(
            errors[0].message.starts_with("unknown field `colour`"),
            "{}",
            errors[0].message
        );
        assert!(!errors[0].message.contains('\n'));
        assert!(
            errors[0]
                .to_string()
                .starts_with("mailnode.toml:3: unknown field `colour`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_key_in_smtp_rejected_with_line() {
        let errors = errs("[smtp]\nmax_recipients = 5\nmax_recipient = 6\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(3));
        assert!(
            errors[0]
                .to_string()
                .starts_with("mailnode.toml:3: unknown field `max_recipient`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_key_in_channel_rejected() {
        let errors = errs("[[access.channel]]\nname = \"x\"\nhost = [\"::1\"]\n");
        assert_eq!(errors[0].line, Some(3));
        assert!(
            errors[0].message.contains("unknown field `host`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let errors = errs("[smtp]\nmax_recipients = 5\nlisten = [\"127.0.0.1:25\"\n[log]\n");
        assert_eq!(errors.len(), 1);
        assert!(matches!(errors[0].line, Some(3..=4)), "{:?}", errors[0]);
        assert!(!errors[0].message.contains('\n'));
    }

    #[test]
    fn several_validation_errors_reported_together() {
        let text = "\
[smtp]
connect_limit = \"30x\"
max_connections = 0

[delivery]
user = \"root\"

[control]
mode = \"999\"

[access]
deny = [\"10.0.0.0/33\"]
";
        let errors = errs(text);
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 5, "{shown:#?}");
        let lines: Vec<Option<usize>> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![Some(2), Some(3), Some(6), Some(9), Some(12)]);
        assert!(
            shown[0].starts_with("mailnode.toml:2: smtp.connect_limit: invalid duration \"30x\"")
        );
        assert!(shown[1].starts_with("mailnode.toml:3: smtp.max_connections: invalid value 0"));
        assert!(shown[2].starts_with("mailnode.toml:6: delivery.user: must not be \"root\""));
        assert!(shown[3].starts_with("mailnode.toml:9: control.mode: invalid mode \"999\""));
        assert!(
            shown[4].starts_with("mailnode.toml:12: access.deny: invalid network \"10.0.0.0/33\"")
        );
    }

    #[test]
    fn counts_must_be_positive() {
        for key in [
            "max_connections",
            "max_connections_per_ip",
            "max_message_size",
            "max_recipients",
        ] {
            let msg = one_err(&format!("[smtp]\n{key} = -1\n"));
            assert_eq!(
                msg,
                format!("mailnode.toml:2: smtp.{key}: invalid value -1: expected a whole number of at least 1")
            );
        }
        let msg = one_err("[delivery]\nconcurrency = 0\n");
        assert!(msg.starts_with("mailnode.toml:2: delivery.concurrency: invalid value 0"));
        assert_eq!(ok("[delivery]\nconcurrency = 1\n").delivery.concurrency, 1);
    }

    #[test]
    fn relay_host_parsing() {
        let host = |text: &str| ok(&format!("[relay]\nhost = {text:?}\n")).relay.host;
        let rh = |h: &str, port| {
            Some(RelayHost {
                host: h.to_string(),
                port,
            })
        };
        assert_eq!(host(""), None);
        assert_eq!(host("smarthost.example"), rh("smarthost.example", 25));
        assert_eq!(
            host("smarthost.example:2525"),
            rh("smarthost.example", 2525)
        );
        assert_eq!(host("192.0.2.5:465"), rh("192.0.2.5", 465));
        assert_eq!(host("[2001:db8::5]:587"), rh("2001:db8::5", 587));
        assert_eq!(host("[2001:db8::5]"), rh("2001:db8::5", 25));
        assert_eq!(host("2001:db8::5"), rh("2001:db8::5", 25));
        assert_eq!(host("relay:65535"), rh("relay", 65535));

        for bad in [
            ":25",
            "relay:0",
            "relay:65536",
            "relay:x",
            "relay:",
            "relay:+25",
            "re lay",
            "[::1]x",
            "[nothost]:25",
            "a..b:25",
        ] {
            let msg = one_err(&format!("[relay]\n\nhost = {bad:?}\n"));
            assert!(
                msg.starts_with(&format!(
                    "mailnode.toml:3: relay.host: invalid relay {bad:?}"
                )),
                "{msg}"
            );
        }
    }

    #[test]
    fn relay_host_display() {
        let v4 = RelayHost {
            host: "relay.example".to_string(),
            port: 25,
        };
        let v6 = RelayHost {
            host: "2001:db8::5".to_string(),
            port: 587,
        };
        assert_eq!(v4.to_string(), "relay.example:25");
        assert_eq!(v6.to_string(), "[2001:db8::5]:587");
    }

    #[test]
    fn relay_helo() {
        assert_eq!(ok("[relay]\nhelo = \"\"\n").relay.helo, None);
        assert_eq!(
            ok("[relay]\nhelo = \"out.example\"\n")
                .relay
                .helo
                .as_deref(),
            Some("out.example")
        );
        assert_eq!(
            ok("[relay]\nhelo = \"[192.0.2.1]\"\n")
                .relay
                .helo
                .as_deref(),
            Some("[192.0.2.1]")
        );
        let msg = one_err("[relay]\nhelo = \"not valid\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: relay.helo: invalid name"),
            "{msg}"
        );
    }

    #[test]
    fn metrics_listen() {
        assert_eq!(ok("[metrics]\nlisten = \"off\"\n").metrics.listen, None);
        assert_eq!(
            ok("[metrics]\nlisten = \"0.0.0.0:9000\"\n").metrics.listen,
            Some("0.0.0.0:9000".parse().unwrap())
        );
        let msg = one_err("[metrics]\nlisten = \"9000\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: metrics.listen: invalid address \"9000\""),
            "{msg}"
        );
        let msg = one_err("[metrics]\nlisten = \"Off\"\n");
        assert!(msg.starts_with("mailnode.toml:2: metrics.listen:"), "{msg}");
    }

    #[test]
    fn smtp_listen() {
        let c = ok("[smtp]\nlisten = [\"[::1]:2525\", \"127.0.0.1:25\"]\n");
        assert_eq!(
            c.smtp.listen,
            vec![
                "[::1]:2525".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:25".parse::<SocketAddr>().unwrap()
            ]
        );
        let msg = one_err("[smtp]\nlisten = []\n");
        assert!(
            msg.starts_with("mailnode.toml:2: smtp.listen: must list at least one address"),
            "{msg}"
        );
        let msg = one_err("[smtp]\nlisten = [\n  \"127.0.0.1:25\",\n  \"localhost:25\",\n]\n");
        assert!(
            msg.starts_with("mailnode.toml:4: smtp.listen: invalid address \"localhost:25\""),
            "{msg}"
        );
        let msg = one_err("[smtp]\nlisten = [\"127.0.0.1:25\", \"127.0.0.1:25\"]\n");
        assert!(msg.contains("listed twice"), "{msg}");
    }

    #[test]
    fn control_mode() {
        assert_eq!(ok("[control]\nmode = \"0600\"\n").control.mode, 0o600);
        assert_eq!(ok("[control]\nmode = \"755\"\n").control.mode, 0o755);
        assert_eq!(ok("[control]\nmode = \"0777\"\n").control.mode, 0o777);
        for bad in ["999", "01000", "1777", "", "+600", "rw", "00000600"] {
            let msg = one_err(&format!("[control]\nmode = {bad:?}\n"));
            assert!(
                msg.starts_with(&format!(
                    "mailnode.toml:2: control.mode: invalid mode {bad:?}"
                )),
                "{msg}"
            );
        }
    }

    #[test]
    fn deny_cidr_and_bare_ip() {
        let c = ok(
            "[access]\ndeny = [\"203.0.113.0/24\", \"198.51.100.9\", \"2001:db8::/32\", \"::1\"]\n",
        );
        assert_eq!(
            c.access.deny,
            vec![
                net("203.0.113.0/24"),
                net("198.51.100.9/32"),
                net("2001:db8::/32"),
                net("::1/128")
            ]
        );
        let errors =
            errs("[access]\ndeny = [\n\"203.0.113.0/24\",\n\"example.org\",\n\"1.2.3.4/40\",\n]\n");
        let lines: Vec<Option<usize>> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![Some(4), Some(5)]);
        assert!(errors[0]
            .message
            .starts_with("access.deny: invalid network \"example.org\""));
    }

    #[test]
    fn auth_is_off_by_default_and_its_keys_are_checked() {
        assert_eq!(ok("").auth, AuthConfig::default());
        assert!(!AuthConfig::default().enabled);
        let c = ok("[auth]\nenabled = true\nauthserv_id = \"mx.example.org\"\ndmarc_policy = \"enforce\"\nnameservers = [\"127.0.0.1:5353\"]\ndns_timeout = \"2s\"\n");
        assert_eq!(
            c.auth,
            AuthConfig {
                enabled: true,
                authserv_id: "mx.example.org".into(),
                dmarc_policy: DmarcPolicy::Enforce,
                nameservers: vec!["127.0.0.1:5353".parse().unwrap()],
                dns_timeout: Duration::from_secs(2),
            }
        );
        let msg = one_err("[auth]\ndmarc_policy = \"reject\"\n");
        assert!(msg.starts_with("mailnode.toml:2: auth.dmarc_policy: invalid value \"reject\": expected \"report\" or \"enforce\""), "{msg}");
        let msg = one_err("[auth]\nnameservers = [\"8.8.8.8\"]\n");
        assert!(
            msg.starts_with("mailnode.toml:2: auth.nameservers: invalid address \"8.8.8.8\""),
            "{msg}"
        );
        let msg = one_err("[auth]\nauthserv_id = \"not a name\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: auth.authserv_id: invalid name"),
            "{msg}"
        );
        let msg = one_err("[auth]\ndns_timeout = \"0s\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: auth.dns_timeout: duration \"0s\" is zero"),
            "{msg}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_wrong_types_and_unknown_keys_included() {
        let errors = errs(
            "[smtp]\ncommand_timeout = 300\nmax_connections = \"many\"\nbogus = 1\nmax_recipients = 0\n\n[queue]\nretry_min = \"0s\"\n",
        );
        let lines: Vec<Option<usize>> = errors.iter().map(|e| e.line).collect();
        assert_eq!(
            lines,
            vec![Some(2), Some(3), Some(4), Some(5), Some(8)],
            "{errors:#?}"
        );
        assert!(
            errors[2].message.contains("unknown field `bogus`"),
            "{errors:#?}"
        );
        // A syntax error is still alone: nothing after it can be read.
        assert_eq!(errs("[smtp\nmax_recipients = 0\n").len(), 1);
    }

    #[test]
    fn a_duration_given_as_a_number_gets_a_hint_with_the_form() {
        let msg = one_err("[smtp]\ncommand_timeout = 300\n");
        assert!(
            msg.starts_with("mailnode.toml:2: ")
                && msg.contains("expected a string")
                && msg.contains("durations are strings with a unit, such as \"300s\" or \"5m\""),
            "{msg}"
        );
        // Other keys that want a string get no duration hint.
        let msg = one_err("[smtp]\nbare_lf = 1\n");
        assert!(!msg.contains("durations"), "{msg}");
    }

    #[test]
    fn http_defaults_and_files_named_with_their_line() {
        assert_eq!(ok("").http, HttpConfig::default());
        let c = ok("[http]\ntimeout = \"5s\"\nsecret_file = \"/etc/mailnode/hook.key\"\nca_file = \"\"\nmax_per_host = 2\n");
        assert_eq!(c.http.timeout, Duration::from_secs(5));
        assert_eq!(c.http.max_per_host, 2);
        assert_eq!(c.http.ca_file, None);
        assert_eq!(
            c.http.secret_file,
            Some(FileSetting {
                path: PathBuf::from("/etc/mailnode/hook.key"),
                at: "mailnode.toml:3".into(),
            })
        );
        let msg = one_err("[http]\nmax_per_host = 0\n");
        assert!(
            msg.starts_with("mailnode.toml:2: http.max_per_host: invalid value 0"),
            "{msg}"
        );
        let msg = one_err("[http]\nproxy = \"x\"\n");
        assert!(msg.contains("unknown field `proxy`"), "{msg}");
    }

    #[test]
    fn tls_is_off_unless_a_certificate_is_named_and_needs_both_files() {
        assert_eq!(ok("").tls, None);
        assert_eq!(ok("[tls]\ncert = \"\"\n").tls, None);
        let c = ok("[smtp]\nlisten_tls = [\"127.0.0.1:465\"]\n[tls]\ncert = \"/etc/c.pem\"\nkey = \"/etc/k.pem\"\nmin_version = \"1.3\"\nhandshake_timeout = \"5s\"\nrequire = true\n");
        assert_eq!(
            c.tls,
            Some(TlsConfig {
                cert: "/etc/c.pem".into(),
                key: "/etc/k.pem".into(),
                min_version: TlsVersion::Tls13,
                handshake_timeout: Duration::from_secs(5),
                require: true,
            })
        );
        assert_eq!(c.smtp.listen_tls, vec!["127.0.0.1:465".parse().unwrap()]);
        let d = ok("[tls]\ncert = \"c\"\nkey = \"k\"\n").tls.unwrap();
        assert_eq!(d.min_version, TlsVersion::Tls12);
        assert_eq!(d.handshake_timeout, Duration::from_secs(30));
        assert!(!d.require);

        let msg = one_err("[tls]\ncert = \"c.pem\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: tls.key: must be set too"),
            "{msg}"
        );
        let msg = one_err("[tls]\ncert = \"c\"\nkey = \"k\"\nmin_version = \"1.1\"\n");
        assert!(
            msg.starts_with("mailnode.toml:4: tls.min_version: invalid value \"1.1\": expected \"1.2\" or \"1.3\""),
            "{msg}"
        );
        let msg = one_err("[tls]\ncert = \"\"\nrequire = true\n");
        assert!(
            msg.starts_with("mailnode.toml:3: tls.require: true needs tls.cert and tls.key"),
            "{msg}"
        );
        assert_eq!(ok("[tls]\nrequire = false\n").tls, None);
        let msg = one_err("[smtp]\nlisten_tls = [\"127.0.0.1:465\"]\n");
        assert!(
            msg.starts_with("mailnode.toml:2: smtp.listen_tls: needs [tls] cert and key"),
            "{msg}"
        );
        let msg = one_err("[smtp]\nlisten = [\"127.0.0.1:25\"]\nlisten_tls = [\"127.0.0.1:25\"]\n[tls]\ncert = \"c\"\nkey = \"k\"\n");
        assert!(
            msg.contains("smtp.listen_tls: address \"127.0.0.1:25\" is in smtp.listen too"),
            "{msg}"
        );
    }

    #[test]
    fn limits_exempt_defaults_to_loopback_and_takes_networks() {
        assert_eq!(
            ok("").limits.exempt,
            vec![net("127.0.0.0/8"), net("::1/128")]
        );
        let c = ok("[limits]\nexempt = [\"10.1.0.0/16\", \"192.0.2.7\"]\n");
        assert_eq!(
            c.limits.exempt,
            vec![net("10.1.0.0/16"), net("192.0.2.7/32")]
        );
        assert_eq!(
            ok("[limits]\nexempt = []\n").limits.exempt,
            Vec::<IpNet>::new()
        );
        let errors = errs("[limits]\nexempt = [\n\"localhost\",\n]\n");
        assert_eq!(errors[0].line, Some(3));
        assert!(errors[0]
            .message
            .starts_with("limits.exempt: invalid network \"localhost\""));
    }

    #[test]
    fn channels_default() {
        let c = ok("[access]\nfinicky = true\n");
        assert_eq!(c.access.channel, vec![Channel::local()]);
        assert_eq!(
            c.access.channel[0].hosts,
            vec![net("127.0.0.0/8"), net("::1/128")]
        );
        assert_eq!(c.access.channel[0].name, "local");
    }

    #[test]
    fn channels_custom() {
        let c = ok(
            "[[access.channel]]\nname = \"office\"\nhosts = [\"192.0.2.0/24\", \"192.0.2.200\"]\n",
        );
        assert_eq!(
            c.access.channel,
            vec![Channel {
                name: "office".to_string(),
                hosts: vec![net("192.0.2.0/24"), net("192.0.2.200/32")]
            }]
        );
        let c = ok("[[access.channel]]\nname = \"nobody\"\n");
        assert_eq!(c.access.channel[0].hosts, Vec::<IpNet>::new());
        let c = ok("[access]\nchannel = []\n");
        assert!(c.access.channel.is_empty());
    }

    #[test]
    fn channel_names_checked() {
        let text = "\
[[access.channel]]
name = \"a\"
hosts = [\"::1\"]

[[access.channel]]
name = \"a\"

[[access.channel]]
name = \"\"

[[access.channel]]
hosts = [\"bogus\"]
";
        let errors = errs(text);
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 4, "{shown:#?}");
        assert!(shown[0]
            .starts_with("mailnode.toml:6: access.channel.name: \"a\" is used by another channel"));
        assert!(shown[1].starts_with("mailnode.toml:9: access.channel.name: must not be empty"));
        // A missing name can only point at its table's header.
        assert!(shown[2].starts_with("mailnode.toml:11: access.channel: missing name"));
        assert!(shown[3]
            .starts_with("mailnode.toml:12: access.channel.hosts: invalid network \"bogus\""));
    }

    #[test]
    fn local_domains_lowercased_and_checked() {
        let c = ok("[smtp]\nlocal_domains = [\"Example.ORG\", \"MAIL-1.example.net\"]\n");
        assert_eq!(
            c.smtp.local_domains,
            vec!["example.org", "mail-1.example.net"]
        );
        for bad in [
            "",
            "a..b",
            "example.org.",
            "-a.example",
            "a-.example",
            "under_score.example",
            "sp ace.example",
            ".example",
        ] {
            let msg = one_err(&format!(
                "[smtp]\nlocal_domains = [\"ok.example\", {bad:?}]\n"
            ));
            assert!(
                msg.starts_with(&format!(
                    "mailnode.toml:2: smtp.local_domains: invalid domain {bad:?}"
                )),
                "{msg}"
            );
        }
    }

    #[test]
    fn delivery_user_checked() {
        let msg = one_err("[delivery]\nuser = \"root\"\n");
        assert_eq!(
            msg,
            "mailnode.toml:2: delivery.user: must not be \"root\": expected the name of an unprivileged user"
        );
        let msg = one_err("[delivery]\nuser = \"\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: delivery.user: must not be empty"),
            "{msg}"
        );
        assert_eq!(ok("[delivery]\nuser = \"mail\"\n").delivery.user, "mail");
        // What `serve` would refuse at start, `check` refuses with its line.
        for (user, says) in [
            ("nosuchuser", "no user \"nosuchuser\" on this system"),
            ("0", "no user \"0\" on this system"),
            ("ROOT", "no user \"ROOT\" on this system"),
            (" nobody", "no user \" nobody\" on this system"),
        ] {
            let text = format!("[delivery]\nuser = \"{user}\"\n");
            let msg = one_err(&text);
            assert!(
                msg.starts_with(&format!("mailnode.toml:2: delivery.user: {says}")),
                "{user:?}: {msg}"
            );
            // Not as root, programs run as mailnode's own user and the key
            // is not looked up, as `serve` does not; nor by `ctl`.
            assert!(parse_with(&text, file(), false).is_ok(), "{user:?}");
            assert!(parse_files_only(&text, file()).is_ok(), "{user:?}");
        }
    }

    #[test]
    fn retry_max_below_retry_min_rejected() {
        let msg = one_err("[queue]\nretry_min = \"10m\"\nretry_max = \"5m\"\n");
        assert_eq!(
            msg,
            "mailnode.toml:3: queue.retry_max: 5m is less than queue.retry_min 10m: expected retry_max >= retry_min"
        );
        // With retry_max left at its default, the line is retry_min's.
        let msg = one_err("[queue]\nretry_min = \"2h\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: queue.retry_max: 1h is less than"),
            "{msg}"
        );
        let c = ok("[queue]\nretry_min = \"5m\"\nretry_max = \"5m\"\n");
        assert_eq!(c.queue.retry_min, c.queue.retry_max);
        // A bad bound is reported once, not also compared.
        assert_eq!(
            errs("[queue]\nretry_min = \"x\"\nretry_max = \"1s\"\n").len(),
            1
        );
    }

    #[test]
    fn choices_checked() {
        assert_eq!(
            one_err("[smtp]\nbare_lf = \"fix\"\n"),
            "mailnode.toml:2: smtp.bare_lf: invalid value \"fix\": expected \"reject\" or \"normalize\""
        );
        assert_eq!(
            one_err("[log]\nlevel = \"verbose\"\n"),
            "mailnode.toml:2: log.level: invalid value \"verbose\": expected \"error\", \"warn\", \"info\", \"debug\" or \"trace\""
        );
        assert!(one_err("[log]\nformat = \"xml\"\n").starts_with("mailnode.toml:2: log.format:"));
        assert!(one_err("[delivery]\nmode = \"Queue\"\n")
            .starts_with("mailnode.toml:2: delivery.mode:"));
        assert_eq!(
            one_err("[delivery]\nuser = \"mail\"\nspawner = \"vfork\"\n"),
            "mailnode.toml:3: delivery.spawner: invalid value \"vfork\": expected \"auto\", \"clone\" or \"process\""
        );
        for spawner in ["auto", "clone", "process"] {
            let c = ok(&format!("[delivery]\nspawner = \"{spawner}\"\n"));
            assert_eq!(c.delivery.spawner.as_str(), spawner);
            assert_eq!(c.delivery.spawner.to_string(), spawner);
        }
        for level in ["error", "warn", "info", "debug", "trace"] {
            let c = ok(&format!("[log]\nlevel = \"{level}\"\n"));
            assert_eq!(c.log.level.as_str(), level);
            assert_eq!(c.log.level.to_string(), level);
        }
        assert!(LogLevel::Error < LogLevel::Trace);
    }

    #[test]
    fn hostname_checked() {
        assert_eq!(
            ok("hostname = \"MX1.example.org\"\n").hostname,
            "MX1.example.org"
        );
        let msg = one_err("\nhostname = \"bad host\"\n");
        assert!(
            msg.starts_with("mailnode.toml:2: hostname: invalid host name \"bad host\""),
            "{msg}"
        );
    }

    #[test]
    fn empty_paths_rejected() {
        let errors =
            errs("[aliases]\npath = \"\"\n[spool]\npath = \"\"\n[control]\nsocket = \"\"\n");
        let lines: Vec<Option<usize>> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![Some(2), Some(4), Some(6)]);
        assert!(errors[2]
            .message
            .starts_with("control.socket: must not be empty"));
    }

    #[test]
    fn error_display_forms() {
        let with_line = ConfigError {
            file: PathBuf::from("/etc/mailnode.toml"),
            line: Some(7),
            message: "bad".to_string(),
        };
        let without = ConfigError {
            line: None,
            ..with_line.clone()
        };
        assert_eq!(with_line.to_string(), "/etc/mailnode.toml:7: bad");
        assert_eq!(without.to_string(), "/etc/mailnode.toml: bad");
    }

    #[test]
    fn unreadable_file_reported_without_line() {
        let path = std::env::temp_dir().join(format!(
            "mailnode-config-missing-{}.toml",
            std::process::id()
        ));
        let errors = load(&path).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, None);
        assert_eq!(errors[0].file, path);
        let shown = errors[0].to_string();
        assert!(
            shown.starts_with(&format!("{}: cannot read config file: ", path.display())),
            "{shown}"
        );
    }

    #[test]
    fn load_reads_file() {
        let dir = std::env::temp_dir().join(format!("mailnode-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mailnode.toml");
        std::fs::write(&path, "[delivery]\nconcurrency = 4\n").unwrap();
        let config = load(&path).unwrap();
        assert_eq!(config.delivery.concurrency, 4);

        std::fs::write(&path, "[delivery]\nconcurrency = 0\n").unwrap();
        let errors = load(&path).unwrap_err();
        assert_eq!(errors[0].file, path);
        assert_eq!(errors[0].line, Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn line_of_counts_newlines() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
        assert_eq!(line_of("a\n", 100), 2);
    }
}

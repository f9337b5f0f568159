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

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// The whole configuration of a mail node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Name the node announces in its greeting and uses in HELO/EHLO.
    pub hostname: String,
    /// The SMTP listener.
    pub smtp: SmtpConfig,
    /// The aliases file.
    pub aliases: AliasesConfig,
    /// The message spool.
    pub spool: SpoolConfig,
    /// Local and remote delivery.
    pub delivery: DeliveryConfig,
    /// Retry policy of the delivery queue.
    pub queue: QueueConfig,
    /// Optional smarthost all outgoing mail goes through.
    pub relay: RelayConfig,
    /// Per-client rate limits.
    pub limits: LimitsConfig,
    /// Which clients may connect and through which channel.
    pub access: AccessConfig,
    /// The local control socket.
    pub control: ControlConfig,
    /// The metrics endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            smtp: SmtpConfig::default(),
            aliases: AliasesConfig::default(),
            spool: SpoolConfig::default(),
            delivery: DeliveryConfig::default(),
            queue: QueueConfig::default(),
            relay: RelayConfig::default(),
            limits: LimitsConfig::default(),
            access: AccessConfig::default(),
            control: ControlConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// The system's host name, or `localhost` when it cannot be had or is not
/// usable text.
pub fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Settings of the SMTP listener (`[smtp]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// Addresses to listen on; never empty.
    pub listen: Vec<SocketAddr>,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// Largest message accepted, in bytes.
    pub max_message_size: u64,
    /// Most recipients of one message.
    pub max_recipients: usize,
    /// Longest a connection may stay open.
    pub connect_limit: Duration,
    /// Longest wait for the next command.
    pub command_timeout: Duration,
    /// Longest wait for the message data.
    pub data_timeout: Duration,
    /// Domains delivered locally, lowercased.
    pub local_domains: Vec<String>,
    /// What to do with a line ending in a bare LF.
    pub bare_lf: BareLf,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            max_connections: 1000,
            max_connections_per_ip: 50,
            max_message_size: 26_214_400,
            max_recipients: 100,
            connect_limit: Duration::from_secs(30 * 60),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(3 * 60),
            local_domains: Vec::new(),
            bare_lf: BareLf::Reject,
        }
    }
}

/// Handling of bare LF line endings in message data (`smtp.bare_lf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BareLf {
    /// Refuse the message.
    #[default]
    Reject,
    /// Turn each bare LF into CRLF.
    Normalize,
}

impl BareLf {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            BareLf::Reject => "reject",
            BareLf::Normalize => "normalize",
        }
    }
}

impl fmt::Display for BareLf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Location of the aliases file (`[aliases]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasesConfig {
    /// Path of the aliases file, as written.
    pub path: PathBuf,
}

impl Default for AliasesConfig {
    fn default() -> Self {
        AliasesConfig {
            path: PathBuf::from("config/aliases"),
        }
    }
}

/// Location of the message spool (`[spool]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Path of the spool directory, as written.
    pub path: PathBuf,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("var/spool"),
        }
    }
}

/// Delivery settings (`[delivery]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Whether messages are queued or delivered while the client waits.
    pub mode: DeliveryMode,
    /// Most deliveries running at once; at least 1.
    pub concurrency: usize,
    /// Longest one delivery attempt may take.
    pub timeout: Duration,
    /// Unprivileged user that local deliveries run as; never `root`.
    pub user: String,
    /// How programs are started.
    pub spawner: SpawnerChoice,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: DeliveryMode::Queue,
            concurrency: 16,
            timeout: Duration::from_secs(10 * 60),
            user: "nobody".to_string(),
            spawner: SpawnerChoice::Auto,
        }
    }
}

/// When delivery happens (`delivery.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeliveryMode {
    /// Accept into the spool, deliver later.
    #[default]
    Queue,
    /// Deliver before answering the client.
    Inline,
}

impl DeliveryMode {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryMode::Queue => "queue",
            DeliveryMode::Inline => "inline",
        }
    }
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How programs are started (`delivery.spawner`): `clone` is the fast
/// spawner, `process` the portable one, `auto` takes clone where it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SpawnerChoice {
    /// `clone` where a probe at start-up shows it works, else `process`.
    #[default]
    Auto,
    /// `clone(CLONE_VM | CLONE_VFORK)`; refusing to start where it fails.
    Clone,
    /// `tokio::process`, which forks.
    Process,
}

impl SpawnerChoice {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            SpawnerChoice::Auto => "auto",
            SpawnerChoice::Clone => "clone",
            SpawnerChoice::Process => "process",
        }
    }
}

impl fmt::Display for SpawnerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Retry policy of the queue (`[queue]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// First wait before retrying a failed delivery.
    pub retry_min: Duration,
    /// Longest wait between retries; never below `retry_min`.
    pub retry_max: Duration,
    /// Age at which an undelivered message is bounced.
    pub max_age: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(60 * 60),
            max_age: Duration::from_secs(3 * 24 * 60 * 60),
        }
    }
}

/// Smarthost settings (`[relay]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelayConfig {
    /// Host all outgoing mail is sent to; `None` for direct delivery.
    pub host: Option<RelayHost>,
    /// Name to greet the relay with; `None` to use the node's hostname.
    pub helo: Option<String>,
}

/// Address of a smarthost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayHost {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port, 1 to 65535.
    pub port: u16,
}

impl fmt::Display for RelayHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An IPv6 literal needs brackets, or its colons would swallow the port.
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Per-client rate limits (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// New connections allowed from one address.
    pub connection_rate_per_ip: Rate,
    /// Messages accepted from one address.
    pub message_rate_per_ip: Rate,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connection_rate_per_ip: Rate::per_minute(120),
            message_rate_per_ip: Rate::per_minute(600),
        }
    }
}

/// A rate such as "120/m": `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events allowed in each period.
    pub count: NonZeroU32,
    /// Length of the period.
    pub per: Duration,
}

impl Rate {
    /// `count` events per minute, for the built-in defaults; 0 is taken as 1
    /// so that no count needs unwrapping.
    fn per_minute(count: u32) -> Rate {
        Rate {
            count: NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN),
            per: Duration::from_secs(60),
        }
    }
}

/// A rate that is not `N/s`, `N/m` or `N/h` with N a positive integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected N/s, N/m or N/h with N a positive integer, such as \"120/m\"")]
pub struct InvalidRate;

impl FromStr for Rate {
    type Err = InvalidRate;

    fn from_str(s: &str) -> Result<Rate, InvalidRate> {
        let (count, unit) = s.split_once('/').ok_or(InvalidRate)?;
        // u32's own parser would also take "+5"; only plain digits are meant.
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidRate);
        }
        let count = count
            .parse::<u32>()
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or(InvalidRate)?;
        let secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(InvalidRate),
        };
        Ok(Rate {
            count,
            per: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per == Duration::from_secs(1) {
            "s".to_string()
        } else if self.per == Duration::from_secs(60) {
            "m".to_string()
        } else if self.per == Duration::from_secs(3600) {
            "h".to_string()
        } else {
            // Only reachable for a Rate built in code; still say something true.
            humantime::format_duration(self.per).to_string()
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

/// Client access rules (`[access]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessConfig {
    /// Refuse clients whose address is in no channel (MMDF's "finicky").
    pub finicky: bool,
    /// Networks whose connections are refused.
    pub deny: Vec<IpNet>,
    /// Named groups of client networks.
    pub channel: Vec<Channel>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            finicky: false,
            deny: Vec::new(),
            channel: vec![Channel::local()],
        }
    }
}

/// A named group of client networks (`[[access.channel]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Unique, non-empty name.
    pub name: String,
    /// Networks belonging to the channel.
    pub hosts: Vec<IpNet>,
}

impl Channel {
    /// The default channel: the loopback networks, named "local".
    pub fn local() -> Channel {
        Channel {
            name: "local".to_string(),
            hosts: vec![
                IpNet::from(ipnet::Ipv4Net::new_assert([127, 0, 0, 0].into(), 8)),
                IpNet::from(IpAddr::from(Ipv6Addr::LOCALHOST)),
            ],
        }
    }
}

/// The control socket (`[control]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Path of the Unix socket, as written.
    pub socket: PathBuf,
    /// Permission bits of the socket, at most 0o777.
    pub mode: u32,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("var/run/mailnode.sock"),
            mode: 0o600,
        }
    }
}

/// The metrics endpoint (`[metrics]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address to serve metrics on; `None` when turned off.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9325))),
        }
    }
}

/// Logging (`[log]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogConfig {
    /// Shape of each log line.
    pub format: LogFormat,
    /// Least severe level written.
    pub level: LogLevel,
}

/// Shape of log lines (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Log verbosity (`log.level`), from least to most verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Normal operation.
    #[default]
    Info,
    /// Detail for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot read config file: {e}"),
        }]
    })?;
    parse(&text, path)
}

/// Parses config `text`; `file` is only used to label errors.
///
/// A TOML syntax error, an unknown key or a value of the wrong type stops
/// parsing with that one error. Otherwise every bad value is reported, in
/// file order.
pub fn parse(text: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().lines().next().unwrap_or_default();
        let message = if message.is_empty() {
            "invalid TOML"
        } else {
            message
        };
        vec![ConfigError {
            file: file.to_path_buf(),
            line: e.span().map(|span| line_of(text, span.start)),
            message: message.to_string(),
        }]
    })?;
    let mut checker = Checker {
        text,
        file,
        errors: Vec::new(),
    };
    let config = checker.config(raw);
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        let mut errors = checker.errors;
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
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

// The raw structs mirror the file. Values that need checking are kept as
// spanned text so a bad one can be reported with its line and without
// aborting the whole parse.

type Text = Option<Spanned<String>>;
type TextList = Option<Spanned<Vec<Spanned<String>>>>;
type Int = Option<Spanned<i64>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    hostname: Text,
    smtp: RawSmtp,
    aliases: RawPath,
    spool: RawPath,
    delivery: RawDelivery,
    queue: RawQueue,
    relay: RawRelay,
    limits: RawLimits,
    access: RawAccess,
    control: RawControl,
    metrics: RawMetrics,
    log: RawLog,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSmtp {
    listen: TextList,
    max_connections: Int,
    max_connections_per_ip: Int,
    max_message_size: Int,
    max_recipients: Int,
    connect_limit: Text,
    command_timeout: Text,
    data_timeout: Text,
    local_domains: TextList,
    bare_lf: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPath {
    path: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawDelivery {
    mode: Text,
    concurrency: Int,
    timeout: Text,
    user: Text,
    spawner: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawQueue {
    retry_min: Text,
    retry_max: Text,
    max_age: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    host: Text,
    helo: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    connection_rate_per_ip: Text,
    message_rate_per_ip: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAccess {
    finicky: Option<bool>,
    deny: TextList,
    channel: Option<Vec<Spanned<RawChannel>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawChannel {
    name: Text,
    hosts: TextList,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawControl {
    socket: Text,
    mode: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: Text,
    level: Text,
}

/// Checks raw values one by one, noting every problem and standing in the
/// default for a bad value so checking can go on.
struct Checker<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line_of(self.text, span.start)),
            message,
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let hostname = match raw.hostname {
            Some(value) => {
                let (span, name) = (value.span(), value.into_inner());
                if is_domain(&name) {
                    name
                } else {
                    self.error(
                        span,
                        format!(
                            "hostname: invalid host name {name:?}: expected a domain name such as \"mail.example.org\""
                        ),
                    );
                    String::new()
                }
            }
            None => system_hostname(),
        };
        Config {
            hostname,
            smtp: self.smtp(raw.smtp),
            aliases: AliasesConfig {
                path: self.path(
                    "aliases.path",
                    raw.aliases.path,
                    AliasesConfig::default().path,
                ),
            },
            spool: SpoolConfig {
                path: self.path("spool.path", raw.spool.path, SpoolConfig::default().path),
            },
            delivery: self.delivery(raw.delivery),
            queue: self.queue(raw.queue),
            relay: self.relay(raw.relay),
            limits: self.limits(raw.limits),
            access: self.access(raw.access),
            control: self.control(raw.control),
            metrics: self.metrics(raw.metrics),
            log: self.log(raw.log),
        }
    }

    fn smtp(&mut self, raw: RawSmtp) -> SmtpConfig {
        let d = SmtpConfig::default();
        SmtpConfig {
            listen: self.listen(raw.listen, d.listen),
            max_connections: self.count(
                "smtp.max_connections",
                raw.max_connections,
                d.max_connections,
            ),
            max_connections_per_ip: self.count(
                "smtp.max_connections_per_ip",
                raw.max_connections_per_ip,
                d.max_connections_per_ip,
            ),
            max_message_size: self.count(
                "smtp.max_message_size",
                raw.max_message_size,
                d.max_message_size,
            ),
            max_recipients: self.count("smtp.max_recipients", raw.max_recipients, d.max_recipients),
            connect_limit: self.duration("smtp.connect_limit", raw.connect_limit, d.connect_limit),
            command_timeout: self.duration(
                "smtp.command_timeout",
                raw.command_timeout,
                d.command_timeout,
            ),
            data_timeout: self.duration("smtp.data_timeout", raw.data_timeout, d.data_timeout),
            local_domains: self.local_domains(raw.local_domains),
            bare_lf: self.choice(
                "smtp.bare_lf",
                raw.bare_lf,
                d.bare_lf,
                &[BareLf::Reject, BareLf::Normalize],
                BareLf::as_str,
            ),
        }
    }

    fn listen(&mut self, raw: TextList, default: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let Some(list) = raw else {
            return default;
        };
        let (span, items) = (list.span(), list.into_inner());
        if items.is_empty() {
            self.error(
                span,
                "smtp.listen: must list at least one address such as \"127.0.0.1:2525\""
                    .to_string(),
            );
            return default;
        }
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(items.len());
        for item in items {
            match item.get_ref().parse::<SocketAddr>() {
                // Binding the same address twice would fail at startup anyway;
                // saying so here names the line.
                Ok(addr) if addrs.contains(&addr) => self.error(
                    item.span(),
                    format!("smtp.listen: address {:?} is listed twice", item.get_ref()),
                ),
                Ok(addr) => addrs.push(addr),
                Err(_) => self.error(
                    item.span(),
                    format!(
                        "smtp.listen: invalid address {:?}: expected IP:PORT such as \"127.0.0.1:2525\" or \"[::1]:2525\"",
                        item.get_ref()
                    ),
                ),
            }
        }
        addrs
    }

    fn local_domains(&mut self, raw: TextList) -> Vec<String> {
        let Some(list) = raw else {
            return Vec::new();
        };
        let mut domains = Vec::new();
        for item in list.into_inner() {
            if is_domain(item.get_ref()) {
                // Domains compare without regard to case; storing them
                // lowercased lets the rest of the program compare plainly.
                domains.push(item.get_ref().to_lowercase());
            } else {
                self.error(
                    item.span(),
                    format!(
                        "smtp.local_domains: invalid domain {:?}: expected a domain name such as \"example.org\" (letters, digits and hyphens, separated by dots)",
                        item.get_ref()
                    ),
                );
            }
        }
        domains
    }

    fn delivery(&mut self, raw: RawDelivery) -> DeliveryConfig {
        let d = DeliveryConfig::default();
        let user = match raw.user {
            None => d.user.clone(),
            Some(value) => {
                let (span, user) = (value.span(), value.into_inner());
                if user.trim().is_empty() {
                    self.error(
                        span,
                        "delivery.user: must not be empty: expected the name of an unprivileged user".to_string(),
                    );
                    d.user.clone()
                } else if user == "root" {
                    self.error(
                        span,
                        "delivery.user: must not be \"root\": expected the name of an unprivileged user".to_string(),
                    );
                    d.user.clone()
                } else {
                    user
                }
            }
        };
        DeliveryConfig {
            mode: self.choice(
                "delivery.mode",
                raw.mode,
                d.mode,
                &[DeliveryMode::Queue, DeliveryMode::Inline],
                DeliveryMode::as_str,
            ),
            concurrency: self.count("delivery.concurrency", raw.concurrency, d.concurrency),
            timeout: self.duration("delivery.timeout", raw.timeout, d.timeout),
            user,
            spawner: self.choice(
                "delivery.spawner",
                raw.spawner,
                d.spawner,
                &[
                    SpawnerChoice::Auto,
                    SpawnerChoice::Clone,
                    SpawnerChoice::Process,
                ],
                SpawnerChoice::as_str,
            ),
        }
    }

    fn queue(&mut self, raw: RawQueue) -> QueueConfig {
        let d = QueueConfig::default();
        // Remember where each bound came from, and whether it parsed, so the
        // comparison below only runs on good values and can name a line.
        let min_span = raw.retry_min.as_ref().map(Spanned::span);
        let max_span = raw.retry_max.as_ref().map(Spanned::span);
        let before = self.errors.len();
        let retry_min = self.duration("queue.retry_min", raw.retry_min, d.retry_min);
        let retry_max = self.duration("queue.retry_max", raw.retry_max, d.retry_max);
        let bounds_ok = self.errors.len() == before;
        if bounds_ok && retry_max < retry_min {
            if let Some(span) = max_span.or(min_span) {
                self.error(
                    span,
                    format!(
                        "queue.retry_max: {} is less than queue.retry_min {}: expected retry_max >= retry_min",
                        humantime::format_duration(retry_max),
                        humantime::format_duration(retry_min)
                    ),
                );
            }
        }
        QueueConfig {
            retry_min,
            retry_max,
            max_age: self.duration("queue.max_age", raw.max_age, d.max_age),
        }
    }

    fn relay(&mut self, raw: RawRelay) -> RelayConfig {
        let host = match raw.host {
            None => None,
            Some(value) if value.get_ref().is_empty() => None,
            Some(value) => match parse_relay_host(value.get_ref()) {
                Some(host) => Some(host),
                None => {
                    self.error(
                        value.span(),
                        format!(
                            "relay.host: invalid relay {:?}: expected \"host\" or \"host:port\" with a port from 1 to 65535, or \"\" for none",
                            value.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let helo = match raw.helo {
            None => None,
            Some(value) if value.get_ref().is_empty() => None,
            Some(value) => {
                if is_domain(value.get_ref())
                    || crate::protocol::command::is_address_literal(value.get_ref())
                {
                    Some(value.into_inner())
                } else {
                    self.error(
                        value.span(),
                        format!(
                            "relay.helo: invalid name {:?}: expected a domain name, an address literal such as \"[192.0.2.1]\", or \"\" to use hostname",
                            value.get_ref()
                        ),
                    );
                    None
                }
            }
        };
        RelayConfig { host, helo }
    }

    fn limits(&mut self, raw: RawLimits) -> LimitsConfig {
        let d = LimitsConfig::default();
        LimitsConfig {
            connection_rate_per_ip: self.rate(
                "limits.connection_rate_per_ip",
                raw.connection_rate_per_ip,
                d.connection_rate_per_ip,
            ),
            message_rate_per_ip: self.rate(
                "limits.message_rate_per_ip",
                raw.message_rate_per_ip,
                d.message_rate_per_ip,
            ),
        }
    }

    fn access(&mut self, raw: RawAccess) -> AccessConfig {
        let d = AccessConfig::default();
        let deny = match raw.deny {
            None => d.deny,
            Some(list) => self.networks("access.deny", list.into_inner()),
        };
        let channel = match raw.channel {
            None => d.channel,
            Some(raw_channels) => {
                let mut channels: Vec<Channel> = Vec::with_capacity(raw_channels.len());
                for raw_channel in raw_channels {
                    let table_span = raw_channel.span();
                    let raw_channel = raw_channel.into_inner();
                    let hosts = match raw_channel.hosts {
                        None => Vec::new(),
                        Some(list) => self.networks("access.channel.hosts", list.into_inner()),
                    };
                    let name = match raw_channel.name {
                        None => {
                            self.error(
                                table_span,
                                "access.channel: missing name: expected a non-empty, unique name"
                                    .to_string(),
                            );
                            continue;
                        }
                        Some(name) => name,
                    };
                    if name.get_ref().trim().is_empty() {
                        self.error(
                            name.span(),
                            "access.channel.name: must not be empty: expected a non-empty, unique name".to_string(),
                        );
                    } else if channels.iter().any(|c| c.name == *name.get_ref()) {
                        self.error(
                            name.span(),
                            format!(
                                "access.channel.name: {:?} is used by another channel: expected a unique name",
                                name.get_ref()
                            ),
                        );
                    } else {
                        channels.push(Channel {
                            name: name.into_inner(),
                            hosts,
                        });
                    }
                }
                channels
            }
        };
        AccessConfig {
            finicky: raw.finicky.unwrap_or(d.finicky),
            deny,
            channel,
        }
    }

    fn networks(&mut self, key: &str, items: Vec<Spanned<String>>) -> Vec<IpNet> {
        let mut nets = Vec::with_capacity(items.len());
        for item in items {
            match parse_network(item.get_ref()) {
                Some(net) => nets.push(net),
                None => self.error(
                    item.span(),
                    format!(
                        "{key}: invalid network {:?}: expected a CIDR such as \"192.0.2.0/24\" or \"2001:db8::/32\", or a bare IP address",
                        item.get_ref()
                    ),
                ),
            }
        }
        nets
    }

    fn control(&mut self, raw: RawControl) -> ControlConfig {
        let d = ControlConfig::default();
        let mode = match raw.mode {
            None => d.mode,
            Some(value) => match parse_mode(value.get_ref()) {
                Some(mode) => mode,
                None => {
                    self.error(
                        value.span(),
                        format!(
                            "control.mode: invalid mode {:?}: expected an octal permission string from \"0000\" to \"0777\", such as \"0600\"",
                            value.get_ref()
                        ),
                    );
                    d.mode
                }
            },
        };
        ControlConfig {
            socket: self.path("control.socket", raw.socket, d.socket),
            mode,
        }
    }

    fn metrics(&mut self, raw: RawMetrics) -> MetricsConfig {
        let d = MetricsConfig::default();
        let listen = match raw.listen {
            None => d.listen,
            Some(value) if value.get_ref() == "off" => None,
            Some(value) => match value.get_ref().parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(
                        value.span(),
                        format!(
                            "metrics.listen: invalid address {:?}: expected IP:PORT such as \"127.0.0.1:9325\", or \"off\"",
                            value.get_ref()
                        ),
                    );
                    d.listen
                }
            },
        };
        MetricsConfig { listen }
    }

    fn log(&mut self, raw: RawLog) -> LogConfig {
        let d = LogConfig::default();
        LogConfig {
            format: self.choice(
                "log.format",
                raw.format,
                d.format,
                &[LogFormat::Text, LogFormat::Json],
                LogFormat::as_str,
            ),
            level: self.choice(
                "log.level",
                raw.level,
                d.level,
                &[
                    LogLevel::Error,
                    LogLevel::Warn,
                    LogLevel::Info,
                    LogLevel::Debug,
                    LogLevel::Trace,
                ],
                LogLevel::as_str,
            ),
        }
    }

    fn duration(&mut self, key: &str, raw: Text, default: Duration) -> Duration {
        let Some(value) = raw else {
            return default;
        };
        // humantime already refuses a bare number ("time unit needed"), which
        // is what keeps "30" from silently meaning seconds.
        match humantime::parse_duration(value.get_ref()) {
            Ok(duration) if duration.is_zero() => {
                self.error(
                    value.span(),
                    format!(
                        "{key}: duration {:?} is zero: expected a duration greater than zero such as \"30s\"",
                        value.get_ref()
                    ),
                );
                default
            }
            Ok(duration) => duration,
            Err(_) => {
                self.error(
                    value.span(),
                    format!(
                        "{key}: invalid duration {:?}: expected a number and a unit such as \"30s\", \"30m\" or \"3d\"",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn count<T: TryFrom<i64> + Copy>(&mut self, key: &str, raw: Int, default: T) -> T {
        let Some(value) = raw else {
            return default;
        };
        let n = *value.get_ref();
        match T::try_from(n) {
            Ok(count) if n >= 1 => count,
            _ => {
                self.error(
                    value.span(),
                    format!("{key}: invalid value {n}: expected a whole number of at least 1"),
                );
                default
            }
        }
    }

    fn rate(&mut self, key: &str, raw: Text, default: Rate) -> Rate {
        let Some(value) = raw else {
            return default;
        };
        match value.get_ref().parse::<Rate>() {
            Ok(rate) => rate,
            Err(e) => {
                self.error(
                    value.span(),
                    format!("{key}: invalid rate {:?}: {e}", value.get_ref()),
                );
                default
            }
        }
    }

    fn path(&mut self, key: &str, raw: Text, default: PathBuf) -> PathBuf {
        let Some(value) = raw else {
            return default;
        };
        if value.get_ref().is_empty() {
            self.error(
                value.span(),
                format!("{key}: must not be empty: expected a path"),
            );
            return default;
        }
        PathBuf::from(value.into_inner())
    }

    fn choice<T: Copy>(
        &mut self,
        key: &str,
        raw: Text,
        default: T,
        options: &[T],
        name: fn(&T) -> &'static str,
    ) -> T {
        let Some(value) = raw else {
            return default;
        };
        if let Some(found) = options.iter().find(|o| name(o) == value.get_ref()) {
            return *found;
        }
        let names: Vec<String> = options.iter().map(|o| format!("{:?}", name(o))).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        self.error(
            value.span(),
            format!(
                "{key}: invalid value {:?}: expected {expected}",
                value.get_ref()
            ),
        );
        default
    }
}

/// Whether `s` is a domain name: dot-separated labels of ASCII letters,
/// digits and hyphens, no label empty or starting or ending with a hyphen.
fn is_domain(s: &str) -> bool {
    // The length limits are DNS's; a longer name could never be looked up.
    !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|label| crate::protocol::command::is_label(label, false))
}

/// Parses `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address;
/// the port defaults to 25, SMTP's.
fn parse_relay_host(s: &str) -> Option<RelayHost> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        inner.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => 25,
            _ => parse_port(after.strip_prefix(':')?)?,
        };
        (inner, port)
    } else if s.parse::<Ipv6Addr>().is_ok() {
        (s, 25)
    } else {
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (host, parse_port(port)?),
            None => (s, 25),
        };
        // An IPv4 address passes too: it is digits and dots.
        if !is_domain(host) {
            return None;
        }
        (host, port)
    };
    Some(RelayHost {
        host: host.to_string(),
        port,
    })
}

fn parse_port(s: &str) -> Option<u16> {
    // u16's parser takes a leading "+", which is no way to write a port.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&port| port != 0)
}

/// Parses a CIDR, or a bare address taken as a single-host network.
fn parse_network(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Parses an octal permission string such as "0600", at most 0o777.
fn parse_mode(s: &str) -> Option<u32> {
    // from_str_radix would take a sign; only octal digits are meant. The
    // length cap keeps a long string of zeros from being an odd success.
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok().filter(|&mode| mode <= 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> &'static Path {
        Path::new("mailnode.toml")
    }

    fn ok(text: &str) -> Config {
        match parse(text, file()) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected errors: {errors:?}"),
        }
    }

    fn errs(text: &str) -> Vec<ConfigError> {
        match parse(text, file()) {
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
        let config = ok(include_str!("../config/mailnode.toml"));
        assert_eq!(config, Config::default());
    }

    #[test]
    fn shipped_file_documents_every_key() {
        let text = include_str!("../config/mailnode.toml");
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
        assert_eq!(errors.len(), 1);
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
        assert_eq!(
            ok("[delivery]\nuser = \"mailnode\"\n").delivery.user,
            "mailnode"
        );
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

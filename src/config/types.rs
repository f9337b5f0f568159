//! The configuration as the rest of the program reads it: plain, checked
//! values, each section with its defaults.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

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
    /// STARTTLS and implicit TLS; `None` when `[tls]` names no certificate.
    pub tls: Option<TlsConfig>,
    /// Sender authentication (SPF, DKIM, DMARC).
    pub auth: AuthConfig,
    /// Delivery to `https://` and `http://` alias targets.
    pub http: HttpConfig,
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
            tls: None,
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
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
    /// Peers (load balancers) whose connections begin with a PROXY
    /// protocol header naming the client they relay.
    pub proxy_protocol_from: Vec<IpNet>,
    /// Addresses whose connections speak TLS from the first byte (port
    /// 465, RFC 8314); they need `[tls]`.
    pub listen_tls: Vec<SocketAddr>,
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
            proxy_protocol_from: Vec::new(),
            listen_tls: Vec::new(),
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
    /// Keep the files of delivered messages in `spare/` to hold the next
    /// ones (creating files is the dearest thing a message costs the file
    /// system); off, every removed file is unlinked at once.
    pub reuse_files: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("var/spool"),
            reuse_files: true,
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
    /// Clients free of the per-address limits and rates (Postfix's
    /// `mynetworks` for anvil): the local applications that hand mail
    /// over. `[smtp] max_connections` still counts them.
    pub exempt: Vec<IpNet>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connection_rate_per_ip: Rate::per_minute(120),
            message_rate_per_ip: Rate::per_minute(600),
            exempt: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|net| net.parse().ok())
                .collect(),
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

/// TLS (`[tls]`), present only when a certificate is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Oldest protocol version offered.
    pub min_version: TlsVersion,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
    /// MAIL before STARTTLS is refused with 530 5.7.0.
    pub require: bool,
}

/// `[tls] min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

/// Sender authentication (`[auth]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Check SPF, DKIM and DMARC for every message.
    pub enabled: bool,
    /// The name in `Authentication-Results:`; empty: the node's hostname.
    pub authserv_id: String,
    /// What a DMARC fail under `p=reject` does.
    pub dmarc_policy: DmarcPolicy,
    /// DNS servers to ask; empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// How long one DNS question may take.
    pub dns_timeout: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            authserv_id: String::new(),
            dmarc_policy: DmarcPolicy::Report,
            nameservers: Vec::new(),
            dns_timeout: Duration::from_secs(5),
        }
    }
}

/// `[http]`: how messages are POSTed to HTTP targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// One request, from connecting to the end of the response; past it
    /// the attempt is a temporary failure.
    pub timeout: Duration,
    /// The HMAC-SHA256 key behind `Mailnode-Signature`; `None`: unsigned.
    pub secret_file: Option<FileSetting>,
    /// Roots trusted beside the system's.
    pub ca_file: Option<FileSetting>,
    /// Requests in flight to one host (and port) at once.
    pub max_per_host: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Duration::from_secs(30),
            secret_file: None,
            ca_file: None,
            max_per_host: 8,
        }
    }
}

/// A file the configuration names and that is read when the node starts:
/// `at` says where it was named (`FILE:LINE`), for the error if it cannot
/// be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetting {
    pub path: PathBuf,
    pub at: String,
}

/// `[auth] dmarc_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DmarcPolicy {
    /// Results only: the header and the variables.
    #[default]
    Report,
    /// A DMARC fail under `p=reject` is refused with 550 5.7.1.
    Enforce,
}

impl DmarcPolicy {
    /// The value as spelled in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            DmarcPolicy::Report => "report",
            DmarcPolicy::Enforce => "enforce",
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

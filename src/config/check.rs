//! Turning the raw file into the configuration: every value checked,
//! every problem noted with its line, a default standing in for each bad
//! value so checking goes on.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::raw::*;
use super::types::*;
use super::{line_of, ConfigError};

/// A key's name in messages, `section.field`, made from the field itself so
/// the two cannot drift apart. `key!(self.how, "section", raw.field, d)`
/// checks `raw.field` with `how`, `d.field` standing in for a bad value.
macro_rules! key {
    ($section:literal, $field:ident) => {
        concat!($section, ".", stringify!($field))
    };
    ($checker:ident . $how:ident, $section:literal, $raw:ident . $field:ident, $default:ident) => {
        $checker.$how(key!($section, $field), $raw.$field, $default.$field)
    };
}

/// Checks raw values one by one, noting every problem and standing in the
/// default for a bad value so checking can go on.
pub(super) struct Checker<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a Path,
    pub(super) errors: Vec<ConfigError>,
    /// Look `[delivery] user` up in the user database, as `serve` does
    /// when it runs as root.
    pub(super) look_up_users: bool,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line_of(self.text, span.start)),
            message,
        });
    }

    pub(super) fn config(&mut self, raw: RawConfig) -> Config {
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
        let listen_tls_span = raw.smtp.listen_tls.as_ref().map(Spanned::span);
        let smtp = self.smtp(raw.smtp);
        let tls = self.tls(raw.tls);
        if let Some(span) = listen_tls_span {
            if tls.is_none() && !smtp.listen_tls.is_empty() {
                self.error(
                    span.clone(),
                    "smtp.listen_tls: needs [tls] cert and key: these listeners speak TLS from the first byte".to_string(),
                );
            }
            if let Some(both) = smtp.listen_tls.iter().find(|a| smtp.listen.contains(a)) {
                self.error(
                    span,
                    format!("smtp.listen_tls: address \"{both}\" is in smtp.listen too: a port speaks TLS from the start or offers STARTTLS, not both"),
                );
            }
        }
        Config {
            hostname,
            smtp,
            aliases: AliasesConfig {
                path: self.path(
                    "aliases.path",
                    raw.aliases.path,
                    AliasesConfig::default().path,
                ),
            },
            spool: SpoolConfig {
                path: self.path("spool.path", raw.spool.path, SpoolConfig::default().path),
                reuse_files: raw
                    .spool
                    .reuse_files
                    .unwrap_or(SpoolConfig::default().reuse_files),
            },
            delivery: self.delivery(raw.delivery),
            queue: self.queue(raw.queue),
            relay: self.relay(raw.relay),
            limits: self.limits(raw.limits),
            access: self.access(raw.access),
            control: self.control(raw.control),
            metrics: self.metrics(raw.metrics),
            log: self.log(raw.log),
            tls,
            auth: self.auth(raw.auth),
            http: self.http(raw.http),
        }
    }

    fn smtp(&mut self, raw: RawSmtp) -> SmtpConfig {
        let d = SmtpConfig::default();
        SmtpConfig {
            listen: self.listen(raw.listen, d.listen),
            max_connections: key!(self.count, "smtp", raw.max_connections, d),
            max_connections_per_ip: key!(self.count, "smtp", raw.max_connections_per_ip, d),
            max_message_size: key!(self.count, "smtp", raw.max_message_size, d),
            max_recipients: key!(self.count, "smtp", raw.max_recipients, d),
            connect_limit: key!(self.duration, "smtp", raw.connect_limit, d),
            command_timeout: key!(self.duration, "smtp", raw.command_timeout, d),
            data_timeout: key!(self.duration, "smtp", raw.data_timeout, d),
            local_domains: self.local_domains(raw.local_domains),
            bare_lf: self.choice(
                key!("smtp", bare_lf),
                raw.bare_lf,
                d.bare_lf,
                &[BareLf::Reject, BareLf::Normalize],
                BareLf::as_str,
            ),
            proxy_protocol_from: match raw.proxy_protocol_from {
                None => d.proxy_protocol_from,
                Some(list) => self.networks("smtp.proxy_protocol_from", list.into_inner()),
            },
            listen_tls: match raw.listen_tls {
                None => d.listen_tls,
                Some(list) => self.addresses("smtp.listen_tls", list.into_inner()),
            },
        }
    }

    /// `[tls]`: `None` unless a certificate is named (`cert = ""` is the
    /// documented way to leave TLS off). A certificate without its key, or
    /// the reverse, is a mistake worth a line, not a silent plain node.
    fn tls(&mut self, raw: RawTls) -> Option<TlsConfig> {
        let named = |t: &Text| t.as_ref().is_some_and(|v| !v.get_ref().is_empty());
        let (has_cert, has_key) = (named(&raw.cert), named(&raw.key));
        if !has_cert && !has_key {
            // Refusing mail in clear is a promise a node without a
            // certificate cannot keep: say so rather than take mail in clear.
            if let Some(span) = raw
                .require
                .as_ref()
                .filter(|r| *r.get_ref())
                .map(Spanned::span)
            {
                self.error(
                    span,
                    "tls.require: true needs tls.cert and tls.key: without a certificate no client could ever send mail".to_string(),
                );
            }
            return None;
        }
        if has_cert != has_key {
            let (missing, given) = if has_cert {
                ("key", &raw.cert)
            } else {
                ("cert", &raw.key)
            };
            if let Some(given) = given {
                self.error(
                    given.span(),
                    format!("tls.{missing}: must be set too: TLS needs both a certificate chain and its private key"),
                );
            }
            return None;
        }
        let d = TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            min_version: TlsVersion::default(),
            handshake_timeout: Duration::from_secs(30),
            require: false,
        };
        Some(TlsConfig {
            cert: self.path("tls.cert", raw.cert, d.cert.clone()),
            key: self.path("tls.key", raw.key, d.key.clone()),
            min_version: self.choice(
                key!("tls", min_version),
                raw.min_version,
                d.min_version,
                &[TlsVersion::Tls12, TlsVersion::Tls13],
                TlsVersion::as_str,
            ),
            handshake_timeout: key!(self.duration, "tls", raw.handshake_timeout, d),
            require: raw.require.map_or(d.require, Spanned::into_inner),
        })
    }

    fn auth(&mut self, raw: RawAuth) -> AuthConfig {
        let d = AuthConfig::default();
        let authserv_id = match raw.authserv_id {
            None => d.authserv_id.clone(),
            Some(value) => {
                let (span, id) = (value.span(), value.into_inner());
                if id.is_empty() || is_domain(&id) {
                    id
                } else {
                    self.error(
                        span,
                        format!("auth.authserv_id: invalid name {id:?}: expected a domain name such as \"mx.example.org\", or \"\" for the hostname"),
                    );
                    d.authserv_id.clone()
                }
            }
        };
        AuthConfig {
            enabled: raw.enabled.unwrap_or(d.enabled),
            authserv_id,
            dmarc_policy: self.choice(
                key!("auth", dmarc_policy),
                raw.dmarc_policy,
                d.dmarc_policy,
                &[DmarcPolicy::Report, DmarcPolicy::Enforce],
                DmarcPolicy::as_str,
            ),
            nameservers: match raw.nameservers {
                None => d.nameservers.clone(),
                Some(list) => self.addresses("auth.nameservers", list.into_inner()),
            },
            dns_timeout: key!(self.duration, "auth", raw.dns_timeout, d),
        }
    }

    fn http(&mut self, raw: RawHttp) -> HttpConfig {
        let d = HttpConfig::default();
        HttpConfig {
            timeout: key!(self.duration, "http", raw.timeout, d),
            secret_file: self.file_setting(raw.secret_file),
            ca_file: self.file_setting(raw.ca_file),
            max_per_host: key!(self.count, "http", raw.max_per_host, d),
        }
    }

    /// A file read at start-up; `""` (or no key) means none.
    fn file_setting(&mut self, raw: Text) -> Option<FileSetting> {
        let value = raw?;
        let at = format!(
            "{}:{}",
            self.file.display(),
            line_of(self.text, value.span().start)
        );
        let path = value.into_inner();
        (!path.is_empty()).then(|| FileSetting {
            path: PathBuf::from(path),
            at,
        })
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
        self.addresses("smtp.listen", items)
    }

    /// Listening addresses, each `IP:PORT` and listed once.
    fn addresses(&mut self, key: &str, items: Vec<Spanned<String>>) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(items.len());
        for item in items {
            match item.get_ref().parse::<SocketAddr>() {
                // Binding the same address twice would fail at startup anyway;
                // saying so here names the line.
                Ok(addr) if addrs.contains(&addr) => self.error(
                    item.span(),
                    format!("{key}: address {:?} is listed twice", item.get_ref()),
                ),
                Ok(addr) => addrs.push(addr),
                Err(_) => self.error(
                    item.span(),
                    format!(
                        "{key}: invalid address {:?}: expected IP:PORT such as \"127.0.0.1:2525\" or \"[::1]:2525\"",
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
            None => {
                if self.look_up_users {
                    if let Err(problem) = unprivileged_user(&d.user) {
                        // No line to point at: the default is in force.
                        self.errors.push(ConfigError {
                            file: self.file.to_path_buf(),
                            line: None,
                            message: format!("delivery.user (default): {problem}"),
                        });
                    }
                }
                d.user.clone()
            }
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
                } else if let Some(problem) = self
                    .look_up_users
                    .then(|| unprivileged_user(&user).err())
                    .flatten()
                {
                    // The same test `serve` makes before it starts, here so
                    // that `check` refuses what `serve` would.
                    self.error(span, format!("delivery.user: {problem}"));
                    d.user.clone()
                } else {
                    user
                }
            }
        };
        DeliveryConfig {
            mode: self.choice(
                key!("delivery", mode),
                raw.mode,
                d.mode,
                &[DeliveryMode::Queue, DeliveryMode::Inline],
                DeliveryMode::as_str,
            ),
            concurrency: key!(self.count, "delivery", raw.concurrency, d),
            timeout: key!(self.duration, "delivery", raw.timeout, d),
            user,
            spawner: self.choice(
                key!("delivery", spawner),
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
        let retry_min = key!(self.duration, "queue", raw.retry_min, d);
        let retry_max = key!(self.duration, "queue", raw.retry_max, d);
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
            max_age: key!(self.duration, "queue", raw.max_age, d),
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
            connection_rate_per_ip: key!(self.rate, "limits", raw.connection_rate_per_ip, d),
            message_rate_per_ip: key!(self.rate, "limits", raw.message_rate_per_ip, d),
            exempt: match raw.exempt {
                None => d.exempt,
                Some(list) => self.networks("limits.exempt", list.into_inner()),
            },
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
            socket: key!(self.path, "control", raw.socket, d),
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
                key!("log", format),
                raw.format,
                d.format,
                &[LogFormat::Text, LogFormat::Json],
                LogFormat::as_str,
            ),
            level: self.choice(
                key!("log", level),
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

/// Whether `user` names an account programs may run as: one that exists
/// (names are exact: " nobody", "ROOT" and "0" are no user) and has neither
/// uid 0 nor gid 0.
fn unprivileged_user(user: &str) -> Result<(), String> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(found)) if found.uid.is_root() || found.gid.as_raw() == 0 => Err(format!(
            "{user:?} has uid {} and gid {}: expected an unprivileged user, programs never run as root",
            found.uid, found.gid
        )),
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "no user {user:?} on this system: expected the name of an existing unprivileged user"
        )),
        Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
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

//! The file's shape as read: the raw structs mirror the file. Values that need checking are kept as
//! spanned text so a bad one can be reported with its line and without
//! aborting the whole parse.

use serde::Deserialize;
use toml::Spanned;

pub(super) type Text = Option<Spanned<String>>;
pub(super) type TextList = Option<Spanned<Vec<Spanned<String>>>>;
pub(super) type Int = Option<Spanned<i64>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) hostname: Text,
    pub(super) smtp: RawSmtp,
    pub(super) aliases: RawPath,
    pub(super) spool: RawSpool,
    pub(super) delivery: RawDelivery,
    pub(super) queue: RawQueue,
    pub(super) relay: RawRelay,
    pub(super) limits: RawLimits,
    pub(super) access: RawAccess,
    pub(super) control: RawControl,
    pub(super) metrics: RawMetrics,
    pub(super) log: RawLog,
    pub(super) tls: RawTls,
    pub(super) auth: RawAuth,
    pub(super) http: RawHttp,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSmtp {
    pub(super) listen: TextList,
    pub(super) max_connections: Int,
    pub(super) max_connections_per_ip: Int,
    pub(super) max_message_size: Int,
    pub(super) max_recipients: Int,
    pub(super) connect_limit: Text,
    pub(super) command_timeout: Text,
    pub(super) data_timeout: Text,
    pub(super) local_domains: TextList,
    pub(super) bare_lf: Text,
    pub(super) proxy_protocol_from: TextList,
    pub(super) listen_tls: TextList,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSpool {
    pub(super) path: Text,
    pub(super) reuse_files: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPath {
    pub(super) path: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDelivery {
    pub(super) mode: Text,
    pub(super) concurrency: Int,
    pub(super) timeout: Text,
    pub(super) user: Text,
    pub(super) spawner: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQueue {
    pub(super) retry_min: Text,
    pub(super) retry_max: Text,
    pub(super) max_age: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRelay {
    pub(super) host: Text,
    pub(super) helo: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) connection_rate_per_ip: Text,
    pub(super) message_rate_per_ip: Text,
    pub(super) exempt: TextList,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccess {
    pub(super) finicky: Option<bool>,
    pub(super) deny: TextList,
    pub(super) channel: Option<Vec<Spanned<RawChannel>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawChannel {
    pub(super) name: Text,
    pub(super) hosts: TextList,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawControl {
    pub(super) socket: Text,
    pub(super) mode: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub(super) listen: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: Text,
    pub(super) level: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) cert: Text,
    pub(super) key: Text,
    pub(super) min_version: Text,
    pub(super) handshake_timeout: Text,
    pub(super) require: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAuth {
    pub(super) enabled: Option<bool>,
    pub(super) authserv_id: Text,
    pub(super) dmarc_policy: Text,
    pub(super) nameservers: TextList,
    pub(super) dns_timeout: Text,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttp {
    pub(super) timeout: Text,
    pub(super) secret_file: Text,
    pub(super) ca_file: Text,
    pub(super) max_per_host: Int,
}

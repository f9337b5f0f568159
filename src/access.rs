//! Host access: which channel a client's address belongs to (MMDF names a
//! channel by the client's host). Pure functions over the configured nets.

use std::net::IpAddr;

use crate::config::Channel;

/// The channel name used when no channel is configured at all.
pub const DEFAULT_CHANNEL: &str = "default";

/// The first channel whose hosts contain `address`; with no match, the last
/// channel (SPEC: "no match: the last channel").
pub fn channel_for(address: IpAddr, channels: &[Channel]) -> &str {
    let address = canonical(address);
    channels
        .iter()
        .find(|c| c.hosts.iter().any(|net| net.contains(&address)))
        .or(channels.last())
        .map_or(DEFAULT_CHANNEL, |c| c.name.as_str())
}

/// An IPv4 client seen through an IPv6 socket (`::ffff:a.b.c.d`) is matched
/// as the IPv4 address it is.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str, hosts: &[&str]) -> Channel {
        Channel {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn first_match_names_the_channel_else_the_last() {
        let channels = vec![
            channel("local", &["127.0.0.0/8", "::1/128"]),
            channel("partners", &["192.0.2.0/24"]),
            channel("internet", &[]),
        ];
        assert_eq!(
            channel_for("127.0.0.5".parse().unwrap(), &channels),
            "local"
        );
        assert_eq!(channel_for("::1".parse().unwrap(), &channels), "local");
        assert_eq!(
            channel_for("::ffff:192.0.2.9".parse().unwrap(), &channels),
            "partners"
        );
        assert_eq!(
            channel_for("198.51.100.1".parse().unwrap(), &channels),
            "internet"
        );
        assert_eq!(
            channel_for("198.51.100.1".parse().unwrap(), &[]),
            DEFAULT_CHANNEL
        );
    }
}

//! Host access: which channel a client's address belongs to (MMDF names a
//! channel by the client's host). Pure functions over the configured nets.

use std::net::IpAddr;

use crate::config::{AccessConfig, Channel};

/// The channel name used when no channel is configured at all.
pub const DEFAULT_CHANNEL: &str = "default";

/// Whether a client may use the server, and its channel either way (the
/// channel names the client in logs even when it is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub channel: String,
    pub allowed: bool,
}

/// `deny` refuses outright; `finicky` refuses a client that is in no
/// channel (MMDF); everyone else is in the first channel that holds them,
/// or the last one.
pub fn admit(address: IpAddr, access: &AccessConfig) -> Admission {
    let address = canonical(address);
    let denied = access.deny.iter().any(|net| net.contains(&address));
    let matched = access
        .channel
        .iter()
        .find(|c| c.hosts.iter().any(|net| net.contains(&address)));
    Admission {
        channel: channel_for(address, &access.channel).to_string(),
        allowed: !denied && (matched.is_some() || !access.finicky),
    }
}

/// The first channel whose hosts contain `address`; with no match, the last
/// channel (the contract: "no match: the last channel").
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
    fn deny_and_finicky_refuse_and_channels_name_the_client() {
        let mut access = AccessConfig {
            finicky: false,
            deny: vec!["192.0.2.0/24".parse().unwrap()],
            channel: vec![
                channel("local", &["127.0.0.0/8"]),
                channel("partners", &["198.51.100.0/24"]),
            ],
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            admit(ip("127.0.0.1"), &access),
            Admission {
                channel: "local".into(),
                allowed: true
            }
        );
        assert!(!admit(ip("192.0.2.7"), &access).allowed, "denied net");
        assert!(
            !admit(ip("::ffff:192.0.2.7"), &access).allowed,
            "mapped denied"
        );
        let stranger = admit(ip("203.0.113.5"), &access);
        assert!(stranger.allowed);
        assert_eq!(stranger.channel, "partners", "no match: the last channel");
        access.finicky = true;
        assert!(
            !admit(ip("203.0.113.5"), &access).allowed,
            "finicky refuses strangers"
        );
        assert!(admit(ip("198.51.100.9"), &access).allowed);
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

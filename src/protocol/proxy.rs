//! The PROXY protocol header (versions 1 and 2) a load balancer sends
//! before anything else, naming the client it relays. Parsing is the `ppp`
//! crate's (zero-copy, both versions, and it tells a header cut short from
//! a broken one); this module adds what reading it off a socket needs: how
//! many bytes to read next without ever reading past the header (what
//! follows is the client's SMTP), the bounds, and the address to use.

use std::net::IpAddr;

use ppp::v1;
use ppp::v2;

/// The shortest header of either version (`PROXY UNKNOWN\r\n`): this many
/// bytes can always be read without reading past one.
pub const SHORTEST: usize = 15;

/// The longest version 1 header, CRLF included (its specification).
pub const LONGEST_V1: usize = 107;

/// The longest version 2 header accepted: the fixed 16 bytes and up to
/// this much of addresses and TLVs (a balancer's usual headers take a few
/// dozen bytes; SSL details a few hundred).
pub const LONGEST_V2: usize = 16 + 1024;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A whole header of `len` bytes: the client is `source`, or the peer
    /// itself when `None` (v2 `LOCAL`, v1 `UNKNOWN`: a health check; or an
    /// address family other than TCP over IPv4 or IPv6).
    Done { len: usize, source: Option<IpAddr> },
    /// Not whole yet: read exactly this many more bytes (one at a time
    /// when the length is not known yet, for version 1).
    Need(usize),
    /// Not a PROXY header, or a broken one.
    Invalid(String),
}

/// Parses `bytes`, everything received so far (at least [`SHORTEST`]).
pub fn parse(bytes: &[u8]) -> Header {
    if bytes.len() < SHORTEST {
        return Header::Need(SHORTEST - bytes.len());
    }
    if bytes.starts_with(V2_SIGNATURE) {
        return parse_v2(bytes);
    }
    if bytes.starts_with(b"PROXY ") {
        return parse_v1(bytes);
    }
    Header::Invalid("not a PROXY protocol header".into())
}

fn parse_v2(bytes: &[u8]) -> Header {
    if bytes.len() < 16 {
        return Header::Need(16 - bytes.len());
    }
    let total = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if total > LONGEST_V2 {
        return Header::Invalid(format!(
            "a version 2 header of {total} bytes (at most {LONGEST_V2})"
        ));
    }
    if bytes.len() < total {
        return Header::Need(total - bytes.len());
    }
    // LOCAL (a balancer's own connection): whatever the address block
    // says is to be ignored, as the specification asks of receivers.
    if bytes[12] == 0x20 {
        return Header::Done {
            len: total,
            source: None,
        };
    }
    match v2::Header::try_from(&bytes[..total]) {
        Ok(header) => {
            let source = match (header.protocol, header.addresses) {
                (v2::Protocol::Stream, v2::Addresses::IPv4(a)) => {
                    Some(IpAddr::V4(a.source_address))
                }
                (v2::Protocol::Stream, v2::Addresses::IPv6(a)) => {
                    Some(IpAddr::V6(a.source_address))
                }
                // Not a TCP client: the specification has the receiver use
                // the connection's own addresses.
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
                (protocol, _) => {
                    return Header::Invalid(format!(
                        "version 2: an IP client over {protocol:?}, not TCP"
                    ))
                }
            };
            Header::Done { len: total, source }
        }
        Err(e) => Header::Invalid(format!("version 2: {e}")),
    }
}

fn parse_v1(bytes: &[u8]) -> Header {
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        if bytes.len() >= LONGEST_V1 {
            return Header::Invalid(format!(
                "a version 1 header without CRLF in {LONGEST_V1} bytes"
            ));
        }
        return Header::Need(1);
    };
    let len = end + 2;
    if len > LONGEST_V1 {
        return Header::Invalid(format!(
            "a version 1 header of {len} bytes (at most {LONGEST_V1})"
        ));
    }
    // Whole up to its CRLF: an error is a broken header, never a short one.
    match v1::Header::try_from(&bytes[..len]) {
        Ok(header) => {
            let source = match header.addresses {
                v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                v1::Addresses::Unknown => None,
            };
            Header::Done { len, source }
        }
        Err(e) => Header::Invalid(format!("version 1: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Type};

    fn v2(command: Command, addresses: impl Into<v2::Addresses>) -> Vec<u8> {
        Builder::with_addresses(v2::Version::Two | command, Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    fn sock(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn version_1_names_the_client_and_unknown_keeps_the_peer() {
        let tcp4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(tcp4),
            Header::Done {
                len: 44,
                source: ip("192.0.2.7")
            }
        );
        let tcp6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 25\r\n";
        assert_eq!(
            parse(tcp6),
            Header::Done {
                len: tcp6.len(),
                source: ip("2001:db8::7")
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Header::Done {
                len: 15,
                source: None
            }
        );
    }

    #[test]
    fn version_2_names_the_client_and_local_keeps_the_peer() {
        let proxied = v2(
            Command::Proxy,
            (sock("192.0.2.7:51000"), sock("198.51.100.1:25")),
        );
        let mut with_smtp = proxied.clone();
        with_smtp.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&with_smtp),
            Header::Done {
                len: proxied.len(),
                source: ip("192.0.2.7")
            }
        );
        let local = v2(Command::Local, v2::Addresses::Unspecified);
        assert_eq!(
            parse(&local),
            Header::Done {
                len: 16,
                source: None
            }
        );
        // LOCAL with an IPv4 family but a short address block: its
        // addresses are ignored, so it is still a health check.
        let mut local_short = V2_SIGNATURE.to_vec();
        local_short.extend_from_slice(&[0x20, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(
            parse(&local_short),
            Header::Done {
                len: 20,
                source: None
            }
        );
        let with_tlv = Builder::with_addresses(
            v2::Version::Two | Command::Proxy,
            Protocol::Stream,
            (sock("[2001:db8::7]:1"), sock("[2001:db8::1]:25")),
        )
        .write_tlv(Type::NoOp, b"xyz".as_slice())
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            parse(&with_tlv),
            Header::Done {
                len: with_tlv.len(),
                source: ip("2001:db8::7")
            }
        );
    }

    #[test]
    fn a_header_read_in_pieces_asks_for_exactly_what_it_lacks() {
        let proxied = v2(
            Command::Proxy,
            (sock("192.0.2.7:51000"), sock("198.51.100.1:25")),
        );
        assert_eq!(parse(&proxied[..3]), Header::Need(12));
        assert_eq!(parse(&proxied[..15]), Header::Need(1));
        assert_eq!(parse(&proxied[..16]), Header::Need(proxied.len() - 16));
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 25\r\n";
        for cut in SHORTEST..v1.len() {
            assert_eq!(parse(&v1[..cut]), Header::Need(1), "{cut}");
        }
    }

    #[test]
    fn what_is_not_a_header_or_too_long_is_invalid() {
        for bad in [
            &b"EHLO client.example\r\n"[..],
            b"PROXY TCP4 192.0.2.7 nonsense 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 99999 25\r\n",
            b"PROXY\tTCP4 192.0.2.7 198.51.100.1 1 25\r\n",
        ] {
            assert!(matches!(parse(bad), Header::Invalid(_)), "{bad:?}");
        }
        let mut endless = b"PROXY TCP4 ".to_vec();
        endless.resize(LONGEST_V1, b'1');
        assert!(matches!(parse(&endless), Header::Invalid(_)));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Header::Invalid(_)));
        let datagram = Builder::with_addresses(
            v2::Version::Two | Command::Proxy,
            Protocol::Datagram,
            (sock("192.0.2.7:51000"), sock("198.51.100.1:25")),
        )
        .build()
        .unwrap();
        assert!(matches!(parse(&datagram), Header::Invalid(_)));
        let mut bad_version = V2_SIGNATURE.to_vec();
        bad_version.extend_from_slice(&[0x31, 0x11, 0, 12]);
        bad_version.extend_from_slice(&[0; 12]);
        assert!(matches!(parse(&bad_version), Header::Invalid(_)));
    }
}

//! The `Received:` header mailnode writes at the top of every message it
//! accepts: who connected, from where, through which channel, with what
//! protocol, under which queue id. Client text in it is made harmless.

use std::net::IpAddr;
use std::time::SystemTime;

use super::session::{ClientInfo, TlsInfo};

/// The protocol keyword of the Received header (RFC 3848, RFC 6531): an
/// `S` for TLS.
pub(super) fn protocol_name(esmtp: bool, smtputf8: bool, tls: bool) -> &'static str {
    match (esmtp, smtputf8, tls) {
        (true, true, false) => "UTF8SMTP",
        (true, true, true) => "UTF8SMTPS",
        (true, false, false) => "ESMTP",
        (true, false, true) => "ESMTPS",
        (false, _, false) => "SMTP",
        (false, _, true) => "SMTPS",
    }
}

pub(super) struct ReceivedInfo<'a> {
    pub(super) helo: Option<&'a str>,
    pub(super) client: &'a ClientInfo,
    pub(super) hostname: &'a str,
    pub(super) protocol: &'a str,
    pub(super) tls: Option<&'a TlsInfo>,
    pub(super) id: &'a str,
    pub(super) single_recipient: Option<&'a str>,
    pub(super) now: SystemTime,
}

/// Keeps client text from breaking out of the header: only characters that
/// cannot end a comment, a line or a field survive.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            let plain_ascii = c.is_ascii_graphic() && !"()\\<>;\"".contains(c);
            if plain_ascii || (!c.is_ascii() && !c.is_control()) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// `Received: from HELO ([IP]) (using TLSv1.3 with cipher C) by HOST
/// (mailnode) with ESMTPS id ID for <RCPT>; DATE`
pub(super) fn received_header(info: &ReceivedInfo<'_>) -> Vec<u8> {
    let helo = header_safe(info.helo.unwrap_or("unknown"));
    let date = time::OffsetDateTime::from(info.now)
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|_| String::from("Thu, 01 Jan 1970 00:00:00 +0000"));
    let address = match info.client.address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    // Postfix's place and words for the TLS comment, which log tools read.
    let tls = info.tls.map_or(String::new(), |tls| {
        format!(
            "\n\t(using {} with cipher {})",
            header_safe(&tls.version),
            header_safe(&tls.cipher)
        )
    });
    let mut h = format!(
        "Received: from {helo} ([{address}]){tls}\n\tby {} (mailnode, channel {}) with {} id {}",
        header_safe(info.hostname),
        header_safe(&info.client.channel),
        info.protocol,
        info.id
    );
    if let Some(rcpt) = info.single_recipient {
        h.push_str(&format!("\n\tfor <{}>", header_safe(rcpt)));
    }
    h.push_str(&format!(";\n\t{date}\n"));
    h.into_bytes()
}

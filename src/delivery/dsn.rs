//! Returning mail to its sender: an RFC 3464 delivery status notification
//! (multipart/report with a human part, a message/delivery-status part with
//! one block per failed recipient, and the original headers), built with
//! mail-builder. Sent from `<>` so it can never bounce back.

use std::time::{SystemTime, UNIX_EPOCH};

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;

use crate::spool::Envelope;

/// The most of the original header section a bounce carries.
pub const MAX_ORIGINAL_HEADERS: usize = 64 * 1024;

/// Builds the notification for deliveries `failed` of `envelope`.
/// `original_headers` is the message's header section (LF line ends).
pub fn build(
    envelope: &Envelope,
    failed: &[usize],
    hostname: &str,
    original_headers: &[u8],
    now: SystemTime,
) -> Vec<u8> {
    let mut human = format!(
        "This is the mail system at host {hostname}.\r\n\r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         It is attached below.\r\n\r\n"
    );
    let mut report = format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Mailnode-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        envelope.id,
        rfc2822(envelope.arrival)
    );
    for &i in failed {
        let Some(d) = envelope.deliveries.get(i) else {
            continue;
        };
        // The human part (UTF-8, encoded by mail-builder) carries the
        // program's words in full; the status part must stay 7-bit.
        human.push_str(&format!(
            "<{}>: {}\r\n",
            d.recipient,
            one_line(&d.last_error, HUMAN_LIMIT)
        ));
        let diagnostic = ascii(&one_line(&d.last_error, FIELD_LIMIT));
        report.push_str("\r\n");
        report.push_str(&format!(
            "Final-Recipient: {}\r\n",
            address_field(&d.recipient)
        ));
        report.push_str(&format!(
            "Original-Recipient: {}\r\n",
            address_field(&d.original_recipient)
        ));
        report.push_str("Action: failed\r\n");
        let status = if d.status.is_empty() {
            "5.0.0"
        } else {
            &d.status
        };
        report.push_str(&format!("Status: {status}\r\n"));
        report.push_str(&format!("Diagnostic-Code: X-mailnode; {diagnostic}\r\n"));
        if let Some(at) = d.last_attempt {
            report.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc2822(at)));
        }
    }
    let headers = crlf(&original_headers[..original_headers.len().min(MAX_ORIGINAL_HEADERS)]);
    let parts = vec![
        MimePart::new(ContentType::new("text/plain"), human),
        MimePart::new(
            ContentType::new("message/delivery-status"),
            report.into_bytes(),
        )
        .transfer_encoding("7bit"),
        MimePart::new(ContentType::new("text/rfc822-headers"), headers).transfer_encoding("8bit"),
    ];
    let seconds = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_string(),
            format!("MAILER-DAEMON@{hostname}"),
        ))
        .to(envelope.sender.clone())
        .subject("Undelivered Mail Returned to Sender")
        .date(seconds)
        .message_id(format!("{}.bounce@{hostname}", envelope.id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
            parts,
        ))
        .write_to_vec()
        .unwrap_or_default()
}

/// The header section of a stored message (up to the first empty line).
pub fn header_section(message: &[u8]) -> &[u8] {
    let mut start = 0;
    while let Some(end) = message[start..].iter().position(|&b| b == b'\n') {
        if message[start..start + end].is_empty() || &message[start..start + end] == b"\r" {
            return &message[..start];
        }
        start += end + 1;
    }
    message
}

/// Program output is at most 1 KiB; the human part shows all of it.
const HUMAN_LIMIT: usize = 1100;
/// A status field stays well inside the 998-octet line limit.
const FIELD_LIMIT: usize = 900;

/// Client or program text as one header-safe line.
fn one_line(text: &str, limit: usize) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
    line.chars().take(limit).collect()
}

/// message/delivery-status is 7-bit: other characters become `?`.
fn ascii(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// `rfc822; addr`, or RFC 6533's `utf-8; addr` for an SMTPUTF8 address
/// (its non-ASCII characters as `\x{HEX}`, keeping the part 7-bit).
fn address_field(address: &str) -> String {
    let address = one_line(address, FIELD_LIMIT);
    if address.is_ascii() {
        return format!("rfc822; {address}");
    }
    let encoded: String = address
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                format!("\\x{{{:X}}}", u32::from(c))
            }
        })
        .collect();
    format!("utf-8; {encoded}")
}

fn crlf(lf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lf.len() + lf.len() / 16);
    for &b in lf {
        if b == b'\n' && out.last() != Some(&b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

fn rfc2822(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliases::Target;
    use crate::spool::{Delivery, DeliveryState};

    #[test]
    fn report_names_each_failed_recipient_with_status_and_diagnostic() {
        let mut d = Delivery::new(
            "Support@example.org".into(),
            "support@example.org".into(),
            "support".into(),
            String::new(),
            "example.org".into(),
            Target::Pipe {
                command: "x".into(),
            },
        );
        d.state = DeliveryState::Failed;
        d.last_error = "program exited 67: no such\nqueue".into();
        d.record(
            SystemTime::now(),
            crate::delivery::status::EnhancedCode::PROGRAM_REFUSED,
            &d.last_error.clone(),
        );
        let env = Envelope::for_test("ID", "alice@example.org", SystemTime::now(), vec![d]);
        let msg = build(
            &env,
            &[0],
            "mx.example",
            b"Subject: hi\nFrom: a\n",
            SystemTime::now(),
        );
        let text = String::from_utf8(msg).unwrap();
        assert!(text.contains("multipart/report"), "{text}");
        assert!(
            text.contains("report-type=\"delivery-status\"")
                || text.contains("report-type=delivery-status")
        );
        assert!(text.contains("Final-Recipient: rfc822; support@example.org\r\n"));
        assert!(text.contains("Original-Recipient: rfc822; Support@example.org\r\n"));
        assert!(text.contains("Status: 5.3.0\r\n"));
        assert!(text.contains("Diagnostic-Code: X-mailnode; program exited 67: no such queue\r\n"));
        assert!(text.contains("Subject: hi\r\nFrom: a\r\n"));
        assert!(text.contains("Auto-Submitted: auto-replied"));
    }

    #[test]
    fn status_fields_stay_seven_bit() {
        assert_eq!(address_field("a@b"), "rfc822; a@b");
        assert_eq!(address_field("jörg@b"), "utf-8; j\\x{F6}rg@b");
        assert_eq!(ascii("café ✓"), "caf? ?");
        assert_eq!(one_line("a\r\nb\tc", 10), "a b c");
    }

    #[test]
    fn header_section_stops_at_the_empty_line() {
        assert_eq!(header_section(b"A: 1\nB: 2\n\nbody\n"), b"A: 1\nB: 2\n");
        assert_eq!(header_section(b"A: 1\n"), b"A: 1\n");
    }
}

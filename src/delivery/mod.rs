//! Leaving the node: what a program is given (environment, stdin headers)
//! and how it is run ([`program`]).

pub mod dsn;
pub mod program;
pub mod relay;
pub mod spawn;

use std::path::Path;

use crate::spool::Envelope;

/// Opens a queued message for delivery, refusing a file shorter than its
/// envelope says (`body_len`, see [`Envelope::body_len`]): damage found
/// before a program or a relay could take a cut message as whole.
pub fn open_message(path: &Path, body_len: Option<u64>) -> Result<std::fs::File, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if let Some(expected) = body_len {
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .len();
        if len < expected {
            return Err(format!(
                "queued message ends after {len} of its {expected} bytes"
            ));
        }
    }
    Ok(file)
}

/// The contract's environment for delivery `index` of `envelope`, on the
/// attempt about to be made. Client text reaches programs only this way,
/// never on their command line.
pub fn program_env(envelope: &Envelope, index: usize) -> Vec<(String, String)> {
    let Some(d) = envelope.deliveries.get(index) else {
        return Vec::new();
    };
    [
        ("SENDER", envelope.sender.clone()),
        ("RECIPIENT", d.recipient.clone()),
        ("ORIGINAL_RECIPIENT", d.original_recipient.clone()),
        ("LOCAL", d.local.clone()),
        ("DOMAIN", d.domain.clone()),
        ("EXTENSION", d.extension.clone()),
        ("CLIENT_ADDRESS", envelope.client_address.clone()),
        ("CLIENT_HELO", envelope.client_helo.clone()),
        ("QUEUE_ID", envelope.id.clone()),
        ("CHANNEL", envelope.channel.clone()),
        ("ATTEMPT", (d.attempts + 1).to_string()),
        ("DELIVERY_ID", envelope.delivery_id(index)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `Return-Path:` and `Delivered-To:`, the lines programs read before the
/// message (whose first header is our `Received:`).
pub fn stdin_prefix(envelope: &Envelope, index: usize) -> Vec<u8> {
    let recipient = envelope
        .deliveries
        .get(index)
        .map(|d| d.recipient.as_str())
        .unwrap_or_default();
    format!(
        "Return-Path: <{}>\nDelivered-To: {}\n",
        envelope.return_path, recipient
    )
    .into_bytes()
}

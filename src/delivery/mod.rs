//! Leaving the node: what a program is given (environment, stdin headers)
//! and how it is run ([`program`]).

pub mod dsn;
pub mod handler;
pub mod http;
pub mod program;
pub mod relay;
pub mod spawn;
pub mod status;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::delivery::status::DeliveryStatus;
use crate::spool::Envelope;

/// The result of one attempt.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub status: DeliveryStatus,
    /// False when no attempt was made (the worker was lost): it does not
    /// count towards `ATTEMPT` or the backoff.
    pub attempted: bool,
    /// How long the target asked to be left alone (an HTTP `Retry-After`).
    pub retry_after: Option<std::time::Duration>,
}

impl DeliveryReport {
    /// No attempt was made: the worker asked to make it is gone.
    pub fn worker_lost(why: impl std::fmt::Display) -> Self {
        DeliveryReport {
            status: DeliveryStatus::system_temporary(format!("delivery worker lost: {why}")),
            attempted: false,
            retry_after: None,
        }
    }
}

/// Why a queued message cannot be handed on.
#[derive(Debug, thiserror::Error)]
pub enum UnreadableMessage {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("queued message ends after {len} of its {expected} bytes")]
    Short { len: u64, expected: u64 },
}

/// Opens a queued message for delivery, refusing a file shorter than its
/// envelope says (`body_len`, see [`Envelope::body_len`]): damage found
/// before a program or a relay could take a cut message as whole.
pub fn open_message(path: &Path, body_len: Option<u64>) -> Result<File, UnreadableMessage> {
    open_message_sized(path, body_len).map(|(file, _)| file)
}

/// [`open_message`], with the file's length when opened.
pub fn open_message_sized(
    path: &Path,
    body_len: Option<u64>,
) -> Result<(File, u64), UnreadableMessage> {
    let (file, len) =
        crate::spool::open_regular_sized(path).map_err(|source| UnreadableMessage::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if let Some(expected) = body_len {
        if len < expected {
            return Err(UnreadableMessage::Short { len, expected });
        }
    }
    Ok((file, len))
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
        ("TLS_VERSION", envelope.tls_version.clone()),
        ("TLS_CIPHER", envelope.tls_cipher.clone()),
        ("AUTH_SPF", envelope.auth.spf.clone()),
        ("AUTH_DKIM", envelope.auth.dkim.clone()),
        ("AUTH_DMARC", envelope.auth.dmarc.clone()),
        ("AUTH_FROM_DOMAIN", envelope.auth.from_domain.clone()),
        ("ATTEMPT", (d.attempts + 1).to_string()),
        ("DELIVERY_ID", envelope.delivery_id(index)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `Return-Path:`, `Delivered-To:` and, with `[auth]`, our
/// `Authentication-Results:`: the lines programs read before the message
/// (whose first header is our `Received:`).
pub fn stdin_prefix(envelope: &Envelope, index: usize) -> Vec<u8> {
    let recipient = envelope
        .deliveries
        .get(index)
        .map(|d| d.recipient.as_str())
        .unwrap_or_default();
    format!(
        "Return-Path: <{}>\nDelivered-To: {}\n{}",
        envelope.return_path, recipient, envelope.auth.header
    )
    .into_bytes()
}

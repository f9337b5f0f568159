//! The embedder's handler (tcllib smtpd's `deliver`, aiosmtpd's
//! `handle_DATA`): an alias target `@NAME` hands each message to the
//! in-process handler the embedding program registered under NAME with
//! [`Hooks::handler`](crate::hooks::Hooks::handler). It gets the queue's
//! guarantees like a program: the message is durable before the 250,
//! retried, returned on a permanent failure, tracked per recipient. A
//! handler that panics or runs past `[delivery] timeout` is a temporary
//! failure; the node stays up.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::delivery::status::DeliveryStatus;

/// An embedder's delivery target. Return [`DeliveryStatus::DELIVERED`]
/// once the message is safe on your side, a `Temporary` status to have it
/// retried later, a `Permanent` one to return it to its sender.
///
/// Closures `Fn(HandedMessage) -> impl Future<Output = DeliveryStatus>`
/// are handlers too.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, message: HandedMessage) -> impl Future<Output = DeliveryStatus> + Send;
}

impl<F, Fut> Deliver for F
where
    F: Fn(HandedMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = DeliveryStatus> + Send,
{
    fn deliver(&self, message: HandedMessage) -> impl Future<Output = DeliveryStatus> + Send {
        self(message)
    }
}

/// One recipient's copy of one message, as a program would get it.
pub struct HandedMessage {
    /// The envelope sender; empty for `<>`.
    pub sender: String,
    /// The address after alias expansion, with its extension.
    pub recipient: String,
    /// The address given at `RCPT TO`.
    pub original_recipient: String,
    pub queue_id: String,
    /// The same on every attempt of this recipient of this message: the
    /// key to make a handler idempotent.
    pub delivery_id: String,
    /// 1 on the first attempt.
    pub attempt: u32,
    /// Everything a program gets in its environment (`SENDER`,
    /// `CLIENT_ADDRESS`, `CHANNEL`, `TLS_VERSION`, `AUTH_DMARC`, ...).
    pub variables: Vec<(String, String)>,
    /// The message as a program reads it on stdin: `Return-Path:`,
    /// `Delivered-To:`, then the message, with LF line ends.
    pub message: MessageReader,
}

impl HandedMessage {
    /// One of [`HandedMessage::variables`] by name.
    pub fn variable(&self, name: &str) -> Option<&str> {
        self.variables
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the message from the queue file, never all of it at once.
pub struct MessageReader {
    inner: tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::io::Take<tokio::fs::File>>,
}

impl MessageReader {
    pub(crate) fn new(prefix: Vec<u8>, file: std::fs::File, len: Option<u64>) -> Self {
        let file = tokio::fs::File::from_std(file).take(len.unwrap_or(u64::MAX));
        MessageReader {
            inner: AsyncReadExt::chain(std::io::Cursor::new(prefix), file),
        }
    }
}

impl AsyncRead for MessageReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

type Boxed = Pin<Box<dyn Future<Output = DeliveryStatus> + Send>>;

/// [`Deliver`] behind a pointer: its future is boxed, so handlers of
/// different types sit in one table.
trait ErasedDeliver: Send + Sync {
    fn deliver_boxed(self: Arc<Self>, message: HandedMessage) -> Boxed;
}

impl<H: Deliver> ErasedDeliver for H {
    fn deliver_boxed(self: Arc<Self>, message: HandedMessage) -> Boxed {
        Box::pin(async move { self.deliver(message).await })
    }
}

/// The registered handlers, by name.
#[derive(Clone, Default)]
pub struct Handlers {
    by_name: BTreeMap<String, Arc<dyn ErasedDeliver>>,
}

impl Handlers {
    pub(crate) fn insert(&mut self, name: String, handler: impl Deliver) {
        self.by_name.insert(name, Arc::new(handler));
    }

    /// The names `@NAME` alias targets may use.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// Hands `message` to handler `name`, within `timeout`.
    pub(crate) async fn deliver(
        &self,
        name: &str,
        message: HandedMessage,
        timeout: std::time::Duration,
    ) -> DeliveryStatus {
        let Some(handler) = self.by_name.get(name) else {
            // The aliases file was checked against these names; a message
            // queued by another embedder (or before a handler was dropped)
            // waits for it to come back, or for max_age.
            return DeliveryStatus::system_temporary(format!("no handler '@{name}' registered"));
        };
        let run = std::panic::AssertUnwindSafe(Arc::clone(handler).deliver_boxed(message));
        match tokio::time::timeout(timeout, run.catch_unwind()).await {
            Ok(Ok(status)) => status,
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                DeliveryStatus::system_temporary(format!("handler '@{name}' panicked: {what}"))
            }
            Err(_) => DeliveryStatus::system_temporary(format!(
                "handler '@{name}' did not finish within {} ([delivery] timeout)",
                humantime::format_duration(timeout)
            )),
        }
    }
}

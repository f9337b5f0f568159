//! Hooks for embedding (tcllib smtpd's validate_host / validate_sender /
//! validate_recipient): the program that starts a node in-process decides
//! who may connect, send and receive. A refusal of the host gets the same
//! dialogue as `access.deny` (554 5.7.1, then only QUIT); a refused sender
//! or recipient gets 550 5.7.1 for that command. And it may deliver
//! messages itself: [`Hooks::handler`] registers a target that aliases name
//! as `@NAME`.

use std::net::IpAddr;
use std::sync::Arc;

use crate::delivery::handler::{Deliver, Handlers};

type HostCheck = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;
type AddressCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Optional checks; each returns `true` to allow.
#[derive(Clone, Default)]
pub struct Hooks {
    validate_host: Option<HostCheck>,
    validate_sender: Option<AddressCheck>,
    validate_recipient: Option<AddressCheck>,
    handlers: Handlers,
}

impl Hooks {
    /// Called with the client's address before the greeting.
    pub fn validate_host(mut self, check: impl Fn(IpAddr) -> bool + Send + Sync + 'static) -> Self {
        self.validate_host = Some(Arc::new(check));
        self
    }

    /// Called with the sender (plain form, empty for `<>`) at MAIL.
    pub fn validate_sender(mut self, check: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.validate_sender = Some(Arc::new(check));
        self
    }

    /// Called with each recipient (plain form) at RCPT.
    pub fn validate_recipient(
        mut self,
        check: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.validate_recipient = Some(Arc::new(check));
        self
    }

    /// Registers `handler` as the target aliases name `@NAME`: `team:
    /// @store` hands each message for team to it. A name the aliases file
    /// uses but no handler has is an error when the node starts (and on
    /// reload). NAME is letters, digits, `-`, `_` and `.`; registering a
    /// name twice keeps the last.
    pub fn handler(mut self, name: impl Into<String>, handler: impl Deliver) -> Self {
        self.handlers.insert(name.into(), handler);
        self
    }

    pub(crate) fn handlers(&self) -> &Handlers {
        &self.handlers
    }

    pub(crate) fn host_allowed(&self, ip: IpAddr) -> bool {
        self.validate_host.as_ref().is_none_or(|f| f(ip))
    }

    pub(crate) fn sender_allowed(&self, sender: &str) -> bool {
        self.validate_sender.as_ref().is_none_or(|f| f(sender))
    }

    pub(crate) fn recipient_allowed(&self, recipient: &str) -> bool {
        self.validate_recipient
            .as_ref()
            .is_none_or(|f| f(recipient))
    }
}

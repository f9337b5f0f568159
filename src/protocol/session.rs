//! The SMTP session state machine: [`Event`]s in, [`Action`]s out.
//!
//! It never touches a socket, a file or another actor: it asks for that work
//! with actions (`Resolve`, `OpenBody`, `Commit`) and learns the outcome from
//! the next event. So every reply of the contract can be reached by a unit
//! test of this machine alone, and the actor that drives it stays thin.

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;

use super::command::{self, Address, Command, CommandError, MailParams, ReversePath};
use super::reply::{self, Reply};
use crate::aliases::Target;

/// What the machine needs to know of the node's configuration.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Lowercased; empty means every domain is local.
    pub local_domains: Vec<String>,
}

/// Who is on the other end.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub address: IpAddr,
    /// The access channel the client's address falls in.
    pub channel: String,
}

/// One place a recipient's mail goes after alias expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTarget {
    /// The address after expansion (`support+ext@example.org`): `RECIPIENT`
    /// and `Delivered-To`.
    pub recipient: String,
    /// The local part without the extension: `LOCAL`.
    pub local: String,
    /// The extension after `+`, empty when none: `EXTENSION`.
    pub extension: String,
    /// The recipient's domain, lowercased: `DOMAIN`.
    pub domain: String,
    pub target: Target,
}

/// A recipient accepted at RCPT, with everywhere its mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecipient {
    /// As the client gave it (plain form): `ORIGINAL_RECIPIENT`.
    pub original: String,
    pub targets: Vec<DeliveryTarget>,
}

/// The resolver's answer for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptDecision {
    Accept(Vec<DeliveryTarget>),
    Refuse(Reply),
}

/// Why the spool could not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    /// No space left (452 4.3.1).
    Full,
    /// Anything else (451 4.3.0).
    Unavailable,
}

impl StorageFailure {
    fn reply(self) -> Reply {
        match self {
            StorageFailure::Full => reply::INSUFFICIENT_STORAGE,
            StorageFailure::Unavailable => reply::LOCAL_ERROR,
        }
    }
}

/// Everything known about a message when its data is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageDraft {
    pub id: String,
    pub sender: ReversePath,
    pub params: MailParams,
    pub helo: String,
    pub recipients: Vec<AcceptedRecipient>,
    /// Content size as the client counted it (CRLF line ends).
    pub size: u64,
}

/// Input to the machine.
#[derive(Debug, Clone)]
pub enum Event {
    Connected,
    Command(Result<Command, CommandError>),
    Resolved(RcptDecision),
    /// The body file was created with this queue id (or could not be).
    BodyOpened {
        result: Result<String, StorageFailure>,
        now: SystemTime,
    },
    /// Content from the DATA reader (LF line ends, unstuffed).
    DataChunk(Bytes),
    /// The end of data, with the size the reader counted.
    DataEnd {
        size: u64,
        too_big: bool,
    },
    /// The DATA reader met a bare LF or CR and the policy is to refuse.
    DataRejected,
    Committed(Result<String, StorageFailure>),
    /// The client stayed silent too long.
    IdleTimeout,
    /// The session reached `connect_limit`.
    ConnectLimit,
}

/// Work the machine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Look the recipient up; answer with [`Event::Resolved`].
    Resolve(Address),
    /// Create the spool file for the body; answer with [`Event::BodyOpened`].
    OpenBody,
    /// Switch the input to DATA mode (the 354 reply precedes this action).
    EnterData,
    /// Append to the open body file.
    AppendBody(Bytes),
    /// Delete the open body file: the message will not be queued.
    DiscardBody,
    /// Make the message durable; answer with [`Event::Committed`].
    Commit(Box<MessageDraft>),
    /// Close the connection after the replies so far.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a command.
    Command,
    /// Waiting for [`Event::Resolved`].
    Resolving,
    /// Waiting for [`Event::BodyOpened`].
    Opening,
    /// Receiving message content.
    Data,
    /// Waiting for [`Event::Committed`].
    Committing,
    Closed,
}

#[derive(Debug)]
struct Transaction {
    sender: ReversePath,
    params: MailParams,
    recipients: Vec<AcceptedRecipient>,
    pending: Option<Address>,
    id: Option<String>,
}

/// One SMTP session's state.
#[derive(Debug)]
pub struct SessionMachine {
    config: std::sync::Arc<SessionConfig>,
    client: ClientInfo,
    helo: Option<String>,
    esmtp: bool,
    phase: Phase,
    transaction: Option<Transaction>,
}

impl SessionMachine {
    pub fn new(config: std::sync::Arc<SessionConfig>, client: ClientInfo) -> Self {
        SessionMachine {
            config,
            client,
            helo: None,
            esmtp: false,
            phase: Phase::Command,
            transaction: None,
        }
    }

    /// Whether the session is receiving message content.
    pub fn in_data(&self) -> bool {
        self.phase == Phase::Data
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Feeds one event; returns what to do, in order.
    #[must_use]
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        match event {
            Event::Connected => vec![Action::Reply(reply::greeting(&self.config.hostname))],
            Event::Command(cmd) => self.on_command(cmd),
            Event::Resolved(decision) => self.on_resolved(decision),
            Event::BodyOpened { result, now } => self.on_body_opened(result, now),
            Event::DataChunk(chunk) if self.phase == Phase::Data => {
                vec![Action::AppendBody(chunk)]
            }
            Event::DataEnd { size, too_big } if self.phase == Phase::Data => {
                self.on_data_end(size, too_big)
            }
            Event::DataRejected if self.phase == Phase::Data => {
                self.transaction = None;
                self.close_with(vec![Action::DiscardBody], reply::BARE_LF)
            }
            Event::Committed(result) if self.phase == Phase::Committing => {
                self.phase = Phase::Command;
                self.transaction = None;
                match result {
                    Ok(id) => vec![Action::Reply(reply::queued(&id))],
                    Err(failure) => vec![Action::Reply(failure.reply())],
                }
            }
            Event::IdleTimeout | Event::ConnectLimit => {
                let discard = if self.phase == Phase::Data {
                    vec![Action::DiscardBody]
                } else {
                    Vec::new()
                };
                let last = if matches!(event, Event::IdleTimeout) {
                    reply::IDLE_TIMEOUT
                } else {
                    reply::CONNECT_LIMIT
                };
                self.close_with(discard, last)
            }
            // An event out of its phase is a bug in the driver, not the
            // client's doing: refuse the transaction rather than guess.
            Event::DataChunk(_)
            | Event::DataEnd { .. }
            | Event::DataRejected
            | Event::Committed(_) => {
                self.transaction = None;
                self.phase = Phase::Command;
                vec![Action::Reply(reply::LOCAL_ERROR)]
            }
        }
    }

    fn close_with(&mut self, mut actions: Vec<Action>, last: Reply) -> Vec<Action> {
        self.phase = Phase::Closed;
        actions.push(Action::Reply(last));
        actions.push(Action::Close);
        actions
    }

    fn on_command(&mut self, cmd: Result<Command, CommandError>) -> Vec<Action> {
        if self.phase != Phase::Command {
            // Commands only arrive between transactions steps; anything else
            // means the driver fed input while we waited for an answer.
            return vec![Action::Reply(reply::BAD_SEQUENCE)];
        }
        let cmd = match cmd {
            Ok(cmd) => cmd,
            Err(e) => return vec![Action::Reply(e.reply())],
        };
        let reply = match cmd {
            Command::Helo(name) => self.on_helo(name, false),
            Command::Ehlo(name) => self.on_helo(name, true),
            Command::Mail { from, params } => self.on_mail(from, params),
            Command::Rcpt { to } => return self.on_rcpt(to),
            Command::Data => return self.on_data(),
            Command::Rset => {
                self.transaction = None;
                reply::OK
            }
            Command::Noop => reply::OK,
            Command::Vrfy => reply::CANNOT_VRFY,
            Command::Help => reply::HELP,
            Command::Quit => return self.close_with(Vec::new(), reply::BYE),
        };
        vec![Action::Reply(reply)]
    }

    /// HELO/EHLO: a new greeting also ends any transaction (RFC 5321 4.1.4).
    fn on_helo(&mut self, name: String, esmtp: bool) -> Reply {
        self.transaction = None;
        self.esmtp = esmtp;
        self.helo = Some(name);
        if esmtp {
            reply::ehlo(&self.config.hostname, self.config.max_message_size)
        } else {
            reply::helo(&self.config.hostname)
        }
    }

    fn on_mail(&mut self, from: ReversePath, params: MailParams) -> Reply {
        if self.transaction.is_some() {
            return reply::NESTED_MAIL;
        }
        if let ReversePath::Address(a) = &from {
            if !a.is_ascii() && !params.smtputf8 {
                return reply::NEED_SMTPUTF8;
            }
        }
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return reply::MESSAGE_TOO_BIG;
        }
        self.transaction = Some(Transaction {
            sender: from,
            params,
            recipients: Vec::new(),
            pending: None,
            id: None,
        });
        reply::SENDER_OK
    }

    fn on_rcpt(&mut self, to: Address) -> Vec<Action> {
        let max_recipients = self.config.max_recipients;
        let Some(tx) = self.transaction.as_mut() else {
            return vec![Action::Reply(reply::NEED_MAIL)];
        };
        if !to.is_ascii() && !tx.params.smtputf8 {
            return vec![Action::Reply(reply::NEED_SMTPUTF8)];
        }
        if tx.recipients.len() >= max_recipients {
            return vec![Action::Reply(reply::TOO_MANY_RECIPIENTS)];
        }
        if let Some(domain) = &to.domain {
            let domain = domain.to_lowercase();
            if !self.config.local_domains.is_empty()
                && !self.config.local_domains.contains(&domain)
            {
                return vec![Action::Reply(reply::DOMAIN_NOT_LOCAL)];
            }
        }
        tx.pending = Some(to.clone());
        self.phase = Phase::Resolving;
        vec![Action::Resolve(to)]
    }

    fn on_resolved(&mut self, decision: RcptDecision) -> Vec<Action> {
        let pending = match (self.phase, self.transaction.as_mut()) {
            (Phase::Resolving, Some(tx)) => tx.pending.take(),
            _ => None,
        };
        self.phase = Phase::Command;
        let (Some(address), Some(tx)) = (pending, self.transaction.as_mut()) else {
            return vec![Action::Reply(reply::LOCAL_ERROR)];
        };
        let reply = match decision {
            RcptDecision::Accept(targets) if !targets.is_empty() => {
                tx.recipients.push(AcceptedRecipient {
                    original: address.to_plain(),
                    targets,
                });
                reply::RECIPIENT_OK
            }
            RcptDecision::Accept(_) => reply::UNKNOWN_RECIPIENT,
            RcptDecision::Refuse(reply) => reply,
        };
        vec![Action::Reply(reply)]
    }

    fn on_data(&mut self) -> Vec<Action> {
        match &self.transaction {
            None => vec![Action::Reply(reply::NEED_MAIL)],
            Some(tx) if tx.recipients.is_empty() => {
                vec![Action::Reply(reply::NO_VALID_RECIPIENTS)]
            }
            Some(_) => {
                self.phase = Phase::Opening;
                vec![Action::OpenBody]
            }
        }
    }

    fn on_body_opened(
        &mut self,
        result: Result<String, StorageFailure>,
        now: SystemTime,
    ) -> Vec<Action> {
        if self.phase != Phase::Opening {
            return vec![Action::Reply(reply::LOCAL_ERROR)];
        }
        let id = match result {
            Ok(id) => id,
            Err(failure) => {
                self.phase = Phase::Command;
                self.transaction = None;
                return vec![Action::Reply(failure.reply())];
            }
        };
        let Some(tx) = self.transaction.as_mut() else {
            self.phase = Phase::Command;
            return vec![Action::DiscardBody, Action::Reply(reply::LOCAL_ERROR)];
        };
        let header = received_header(&ReceivedInfo {
            helo: self.helo.as_deref(),
            client: &self.client,
            hostname: &self.config.hostname,
            protocol: protocol_name(self.esmtp, tx.params.smtputf8),
            id: &id,
            single_recipient: match tx.recipients.as_slice() {
                [only] => Some(only.original.as_str()),
                _ => None,
            },
            now,
        });
        tx.id = Some(id);
        self.phase = Phase::Data;
        vec![
            Action::Reply(reply::START_DATA),
            Action::EnterData,
            Action::AppendBody(Bytes::from(header)),
        ]
    }

    fn on_data_end(&mut self, size: u64, too_big: bool) -> Vec<Action> {
        let tx = self.transaction.take();
        let (Some(tx), false) = (tx, too_big) else {
            self.phase = Phase::Command;
            let reply = if too_big {
                reply::MESSAGE_TOO_BIG
            } else {
                reply::LOCAL_ERROR
            };
            return vec![Action::DiscardBody, Action::Reply(reply)];
        };
        let Some(id) = tx.id else {
            self.phase = Phase::Command;
            return vec![Action::DiscardBody, Action::Reply(reply::LOCAL_ERROR)];
        };
        self.phase = Phase::Committing;
        vec![Action::Commit(Box::new(MessageDraft {
            id,
            sender: tx.sender,
            params: tx.params,
            helo: self.helo.clone().unwrap_or_default(),
            recipients: tx.recipients,
            size,
        }))]
    }
}

/// The protocol keyword of the Received header (RFC 3848, RFC 6531).
fn protocol_name(esmtp: bool, smtputf8: bool) -> &'static str {
    match (esmtp, smtputf8) {
        (true, true) => "UTF8SMTP",
        (true, false) => "ESMTP",
        (false, _) => "SMTP",
    }
}

struct ReceivedInfo<'a> {
    helo: Option<&'a str>,
    client: &'a ClientInfo,
    hostname: &'a str,
    protocol: &'a str,
    id: &'a str,
    single_recipient: Option<&'a str>,
    now: SystemTime,
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

/// `Received: from HELO ([IP]) by HOST (mailnode) with ESMTP id ID for <RCPT>; DATE`
fn received_header(info: &ReceivedInfo<'_>) -> Vec<u8> {
    let helo = header_safe(info.helo.unwrap_or("unknown"));
    let date = time::OffsetDateTime::from(info.now)
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|_| String::from("Thu, 01 Jan 1970 00:00:00 +0000"));
    let mut h = format!(
        "Received: from {helo} ([{}])\n\tby {} (mailnode) with {} id {}",
        info.client.address,
        header_safe(info.hostname),
        info.protocol,
        info.id
    );
    if let Some(rcpt) = info.single_recipient {
        h.push_str(&format!("\n\tfor <{}>", header_safe(rcpt)));
    }
    h.push_str(&format!(";\n\t{date}\n"));
    h.into_bytes()
}

/// Re-exported for the driver: the command parser.
pub use command::parse as parse_command;

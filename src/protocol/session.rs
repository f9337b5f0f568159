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
use super::forged_results::ForgedResultsFilter;
use super::headers::{HeaderScan, MAX_HOPS};
use super::received::{protocol_name, received_header, ReceivedInfo};
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
    /// `[tls]` is configured: EHLO in clear offers STARTTLS.
    pub starttls: bool,
    /// `[tls] require`: no MAIL in clear.
    pub tls_required: bool,
    /// `[auth] enabled`: incoming `Authentication-Results:` headers that
    /// claim this authserv-id are removed.
    pub authserv_id: Option<String>,
}

/// What a finished TLS handshake agreed on: all the machine learns of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// As OpenSSL and Postfix name it: `TLSv1.3`.
    pub version: String,
    /// The IANA name: `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
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

/// Inline mode's verdict on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InlineOutcome {
    /// Every delivery succeeded: `250 ... delivered as ID`.
    Delivered(String),
    /// Some delivery failed temporarily: 451 4.3.0, the client retries.
    Temporary,
    /// Otherwise some delivery failed for good: 554 5.3.0.
    Permanent,
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
    /// The session's TLS, if it had any.
    pub tls: Option<TlsInfo>,
    /// `Delivered-To:` addresses already in the message (lowercased): a
    /// delivery to one of them would be a mail loop.
    pub delivered_to: Vec<String>,
}

/// Input to the machine.
#[derive(Debug, Clone)]
pub enum Event {
    Connected,
    /// A command line as the client sent it, without its line end.
    Line(Bytes),
    /// A command already parsed, or a line the driver could not take
    /// (over-long).
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
    /// A check at the end of data refused the message (`[auth]` enforcing
    /// DMARC): nothing was queued.
    MessageRefused(Reply),
    /// Inline mode: what running the programs during DATA gave.
    DeliveredInline(InlineOutcome),
    /// The client may not use this server (access deny, finicky, the
    /// validate_host hook): the greeting refuses, then only QUIT is honoured.
    Refused,
    /// The answer to [`Action::CheckSender`]: admitted, or the refusal.
    SenderChecked(Result<(), Reply>),
    /// The node is going down: an idle session is told so and closed.
    Shutdown,
    /// The node is going down and cannot wait: even a message being
    /// received is dropped (the client hears 421 and sends it again later).
    Abort,
    /// The client stayed silent too long.
    IdleTimeout,
    /// The session reached `connect_limit`.
    ConnectLimit,
    /// The TLS handshake finished (after STARTTLS, or before the greeting
    /// on a `listen_tls` listener). The session starts over.
    TlsStarted(TlsInfo),
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
    /// May this sender start a transaction now (message rate, the
    /// validate_sender hook)? Answer with [`Event::SenderChecked`].
    CheckSender(ReversePath),
    /// After the replies so far, drop whatever the client sent beyond the
    /// STARTTLS line and perform the TLS handshake; answer with
    /// [`Event::TlsStarted`], or close if it fails.
    StartTls,
}

/// What a session is doing, with the data that belongs to that step and
/// no other: a transaction exists only while one is open, the address being
/// resolved only while it is.
#[derive(Debug)]
enum Phase {
    /// Waiting for a command, no transaction open.
    Idle,
    /// Waiting for [`Event::SenderChecked`] about this MAIL.
    CheckingSender {
        sender: ReversePath,
        params: MailParams,
    },
    /// Waiting for a command inside a transaction.
    Mail(Transaction),
    /// Waiting for [`Event::Resolved`] about `address`.
    Resolving {
        tx: Transaction,
        address: Address,
    },
    /// Waiting for [`Event::BodyOpened`].
    Opening(Transaction),
    /// Receiving the content of message `id`.
    Data {
        tx: Transaction,
        id: String,
        headers: HeaderScan,
        forged: Option<ForgedResultsFilter>,
    },
    /// Waiting for [`Event::Committed`] or [`Event::DeliveredInline`].
    Committing,
    /// The client was refused (access, a host hook): only QUIT is honoured.
    Refused,
    Closed,
}

impl Phase {
    /// Waiting for a command, inside `tx` if there is one.
    fn between(tx: Option<Transaction>) -> Phase {
        tx.map_or(Phase::Idle, Phase::Mail)
    }
}

#[derive(Debug)]
struct Transaction {
    sender: ReversePath,
    params: MailParams,
    recipients: Vec<AcceptedRecipient>,
}

/// What the metrics count of a session, as the machine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// The reply to a RCPT command (a malformed one included).
    Recipient(u16),
    /// The reply ending a message's data.
    Message(u16),
    /// The session closed, and why.
    Closed(CloseReason),
}

/// Why a session ended (`mailnode_smtp_sessions_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Quit,
    Timeout,
    ConnectLimit,
    Shutdown,
    Error,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::Timeout => "timeout",
            CloseReason::ConnectLimit => "connect_limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
        }
    }
}

/// The input whose first reply is counted, once it comes.
#[derive(Debug, Clone, Copy)]
enum Counting {
    Recipient,
    Message,
}

/// One SMTP session's state.
#[derive(Debug)]
pub struct SessionMachine {
    config: std::sync::Arc<SessionConfig>,
    client: ClientInfo,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    /// STARTTLS made the client forget its greeting: MAIL waits for a new one.
    needs_helo: bool,
    phase: Phase,
    /// The first reply still to come for an input that counts.
    counting: Option<Counting>,
    tallies: Vec<Tally>,
    /// The recipient of the RCPT being answered, as the client wrote it;
    /// the whole line of one that did not parse.
    rcpt_asked: Option<String>,
    rcpt_line: Option<Bytes>,
    refused: Vec<RefusedRecipient>,
}

/// A RCPT the session refused, for the log: operators look for why a
/// recipient bounced at the door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRecipient {
    /// The address as given (the whole line for a RCPT that did not parse).
    pub recipient: String,
    pub reply: Reply,
}

impl SessionMachine {
    pub fn new(config: std::sync::Arc<SessionConfig>, client: ClientInfo) -> Self {
        SessionMachine {
            config,
            client,
            helo: None,
            esmtp: false,
            tls: None,
            needs_helo: false,
            phase: Phase::Idle,
            counting: None,
            tallies: Vec::new(),
            rcpt_asked: None,
            rcpt_line: None,
            refused: Vec::new(),
        }
    }

    /// Whether the session is receiving message content (the driver asks
    /// its codec, which switches on [`Action::EnterData`]).
    #[cfg(test)]
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data { .. })
    }

    /// The HELO/EHLO name the client gave, if it gave one.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// What the metrics should count since the last call.
    pub fn take_tallies(&mut self) -> Vec<Tally> {
        std::mem::take(&mut self.tallies)
    }

    /// The recipients refused since the last call, with their replies.
    pub fn take_refused_recipients(&mut self) -> Vec<RefusedRecipient> {
        std::mem::take(&mut self.refused)
    }

    /// Feeds one event; returns what to do, in order.
    #[must_use]
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        match &event {
            // A malformed RCPT is a refused recipient all the same.
            Event::Line(line) if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"RCPT") => {
                self.counting = Some(Counting::Recipient);
                // Kept (a reference count, not a copy) for a RCPT that
                // does not parse; one that does names its address in
                // on_rcpt.
                self.rcpt_line = Some(line.clone());
            }
            Event::Command(Ok(Command::Rcpt { .. })) => self.counting = Some(Counting::Recipient),
            Event::DataEnd { .. } | Event::DataRejected => self.counting = Some(Counting::Message),
            _ => {}
        }
        let closing_as = match &event {
            Event::IdleTimeout => Some(CloseReason::Timeout),
            Event::ConnectLimit => Some(CloseReason::ConnectLimit),
            Event::Shutdown | Event::Abort => Some(CloseReason::Shutdown),
            _ => None,
        };
        let actions = self.step(event);
        let mut replies = actions.iter().filter_map(|a| match a {
            Action::Reply(r) => Some(r.code()),
            _ => None,
        });
        if let Some(code) = replies.clone().next() {
            match self.counting.take() {
                Some(Counting::Recipient) => {
                    self.tallies.push(Tally::Recipient(code));
                    let line = self.rcpt_line.take();
                    let asked = self.rcpt_asked.take().unwrap_or_else(|| {
                        line.map(|l| String::from_utf8_lossy(&l).into_owned())
                            .unwrap_or_default()
                    });
                    let reply = actions.iter().find_map(|a| match a {
                        Action::Reply(r) if r.code() >= 400 => Some(r.clone()),
                        _ => None,
                    });
                    if let Some(reply) = reply {
                        self.refused.push(RefusedRecipient {
                            recipient: asked,
                            reply,
                        });
                    }
                }
                Some(Counting::Message) => self.tallies.push(Tally::Message(code)),
                None => {}
            }
        }
        if actions.contains(&Action::Close) {
            let reason = closing_as.unwrap_or(if replies.any(|code| code == 221) {
                CloseReason::Quit
            } else {
                CloseReason::Error
            });
            self.tallies.push(Tally::Closed(reason));
        }
        actions
    }

    /// The phase is taken out for the event; an arm that puts none back
    /// leaves the session idle, with no transaction.
    fn step(&mut self, event: Event) -> Vec<Action> {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        match (phase, event) {
            (phase, Event::Connected) => {
                self.phase = phase;
                vec![Action::Reply(reply::greeting(&self.config.hostname))]
            }
            (_, Event::Refused) => {
                self.phase = Phase::Refused;
                vec![Action::Reply(reply::ACCESS_DENIED)]
            }
            (Phase::CheckingSender { sender, params }, Event::SenderChecked(verdict)) => {
                match verdict {
                    // A 421 means the service is closing the channel.
                    Err(refusal) if refusal.code() == 421 => self.close_with(Vec::new(), refusal),
                    Err(refusal) => vec![Action::Reply(refusal)],
                    Ok(()) => {
                        self.phase = Phase::Mail(Transaction {
                            sender,
                            params,
                            recipients: Vec::new(),
                        });
                        vec![Action::Reply(reply::SENDER_OK)]
                    }
                }
            }
            // A message in flight finishes first; the driver asks again.
            (Phase::Idle | Phase::Mail(_) | Phase::Refused, Event::Shutdown) => {
                self.close_with(Vec::new(), reply::SHUTTING_DOWN)
            }
            (phase, Event::Shutdown) => {
                self.phase = phase;
                Vec::new()
            }
            (phase, Event::Abort) => {
                self.close_with(Self::discard_in(&phase), reply::SHUTTING_DOWN)
            }
            (Phase::Idle, Event::TlsStarted(tls)) => {
                // RFC 3207 4.2: forget everything learnt in clear.
                self.helo = None;
                self.esmtp = false;
                self.needs_helo = true;
                self.tls = Some(tls);
                Vec::new()
            }
            (phase, Event::TlsStarted(_)) => {
                self.phase = phase;
                vec![Action::Reply(reply::LOCAL_ERROR)]
            }
            (phase, Event::Line(line)) => self.on_command(phase, command::parse(&line)),
            (phase, Event::Command(cmd)) => self.on_command(phase, cmd),
            (Phase::Resolving { tx, address }, Event::Resolved(decision)) => {
                self.on_resolved(tx, address, decision)
            }
            (Phase::Opening(tx), Event::BodyOpened { result, now }) => {
                self.on_body_opened(tx, result, now)
            }
            (
                Phase::Data {
                    tx,
                    id,
                    mut headers,
                    mut forged,
                },
                Event::DataChunk(chunk),
            ) => {
                headers.feed(&chunk);
                let kept = match forged.as_mut() {
                    Some(filter) => Bytes::from(filter.feed(&chunk)),
                    None => chunk,
                };
                self.phase = Phase::Data {
                    tx,
                    id,
                    headers,
                    forged,
                };
                if kept.is_empty() {
                    Vec::new()
                } else {
                    vec![Action::AppendBody(kept)]
                }
            }
            (
                Phase::Data {
                    tx,
                    id,
                    headers,
                    forged,
                },
                Event::DataEnd { size, too_big },
            ) => self.on_data_end(tx, id, headers, forged, size, too_big),
            (Phase::Data { .. }, Event::DataRejected) => {
                self.close_with(vec![Action::DiscardBody], reply::BARE_LF)
            }
            (Phase::Committing, Event::MessageRefused(refusal)) => vec![Action::Reply(refusal)],
            (Phase::Committing, Event::Committed(result)) => vec![Action::Reply(match result {
                Ok(id) => reply::queued(&id),
                Err(failure) => failure.reply(),
            })],
            (Phase::Committing, Event::DeliveredInline(outcome)) => {
                vec![Action::Reply(match outcome {
                    InlineOutcome::Delivered(id) => reply::delivered(&id),
                    InlineOutcome::Temporary => reply::INLINE_TEMPORARY,
                    InlineOutcome::Permanent => reply::INLINE_PERMANENT,
                })]
            }
            (phase, event @ (Event::IdleTimeout | Event::ConnectLimit)) => {
                let last = if matches!(event, Event::IdleTimeout) {
                    reply::IDLE_TIMEOUT
                } else {
                    reply::CONNECT_LIMIT
                };
                self.close_with(Self::discard_in(&phase), last)
            }
            // An answer nobody asked for is a bug in the driver, not the
            // client's doing: say so and leave the session where it was.
            (phase, Event::SenderChecked(_) | Event::Resolved(_) | Event::BodyOpened { .. }) => {
                self.phase = phase;
                vec![Action::Reply(reply::LOCAL_ERROR)]
            }
            // Message data or a commit out of their phase: the same kind of
            // bug; refuse the transaction rather than guess.
            (
                _,
                Event::DataChunk(_)
                | Event::DataEnd { .. }
                | Event::DataRejected
                | Event::Committed(_)
                | Event::MessageRefused(_)
                | Event::DeliveredInline(_),
            ) => vec![Action::Reply(reply::LOCAL_ERROR)],
        }
    }

    /// Closing during DATA drops the message being received.
    fn discard_in(phase: &Phase) -> Vec<Action> {
        if matches!(phase, Phase::Data { .. }) {
            vec![Action::DiscardBody]
        } else {
            Vec::new()
        }
    }

    fn close_with(&mut self, mut actions: Vec<Action>, last: Reply) -> Vec<Action> {
        self.phase = Phase::Closed;
        actions.push(Action::Reply(last));
        actions.push(Action::Close);
        actions
    }

    fn on_command(&mut self, phase: Phase, cmd: Result<Command, CommandError>) -> Vec<Action> {
        let tx = match phase {
            Phase::Refused => {
                self.phase = Phase::Refused;
                return match cmd {
                    Ok(Command::Quit) => self.close_with(Vec::new(), reply::BYE),
                    _ => vec![Action::Reply(reply::ONLY_QUIT)],
                };
            }
            Phase::Idle => None,
            Phase::Mail(tx) => Some(tx),
            // Commands only arrive between transaction steps; anything else
            // means the driver fed input while we waited for an answer.
            other => {
                self.phase = other;
                return vec![Action::Reply(reply::BAD_SEQUENCE)];
            }
        };
        let cmd = match cmd {
            Ok(cmd) => cmd,
            Err(e) => {
                self.phase = Phase::between(tx);
                return vec![Action::Reply(e.reply())];
            }
        };
        let reply = match cmd {
            // A new greeting also ends any transaction (RFC 5321 4.1.4).
            Command::Helo(name) => self.on_helo(name, false),
            Command::Ehlo(name) => self.on_helo(name, true),
            Command::Mail { from, params } => return self.on_mail(tx, from, params),
            Command::Rcpt { to } => return self.on_rcpt(tx, to),
            Command::Data => return self.on_data(tx),
            Command::Rset => {
                self.phase = Phase::Idle;
                reply::OK
            }
            Command::Quit => return self.close_with(Vec::new(), reply::BYE),
            Command::StartTls => return self.on_starttls(tx),
            other => {
                self.phase = Phase::between(tx);
                match other {
                    Command::Vrfy => reply::CANNOT_VRFY,
                    Command::Help => reply::HELP,
                    _ => reply::OK,
                }
            }
        };
        vec![Action::Reply(reply)]
    }

    fn on_starttls(&mut self, tx: Option<Transaction>) -> Vec<Action> {
        let refusal = if self.tls.is_some() {
            Some(reply::TLS_ALREADY_ACTIVE)
        } else if !self.config.starttls {
            Some(reply::TLS_NOT_AVAILABLE)
        } else if tx.is_some() {
            Some(reply::TLS_IN_TRANSACTION)
        } else {
            None
        };
        self.phase = Phase::between(tx);
        match refusal {
            Some(refusal) => vec![Action::Reply(refusal)],
            None => vec![Action::Reply(reply::READY_TO_START_TLS), Action::StartTls],
        }
    }

    fn on_helo(&mut self, name: String, esmtp: bool) -> Reply {
        self.phase = Phase::Idle;
        self.esmtp = esmtp;
        self.helo = Some(name);
        self.needs_helo = false;
        if esmtp {
            let starttls = self.config.starttls && self.tls.is_none();
            reply::ehlo(
                &self.config.hostname,
                self.config.max_message_size,
                starttls,
            )
        } else {
            reply::helo(&self.config.hostname)
        }
    }

    fn on_mail(
        &mut self,
        tx: Option<Transaction>,
        from: ReversePath,
        params: MailParams,
    ) -> Vec<Action> {
        if let Some(tx) = tx {
            self.phase = Phase::Mail(tx);
            return vec![Action::Reply(reply::NESTED_MAIL)];
        }
        if self.needs_helo {
            return vec![Action::Reply(reply::NEED_EHLO)];
        }
        if self.config.tls_required && self.tls.is_none() {
            return vec![Action::Reply(reply::TLS_REQUIRED)];
        }
        if let ReversePath::Address(a) = &from {
            if !a.is_ascii() && !params.smtputf8 {
                return vec![Action::Reply(reply::NEED_SMTPUTF8)];
            }
        }
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return vec![Action::Reply(reply::MESSAGE_TOO_BIG)];
        }
        self.phase = Phase::CheckingSender {
            sender: from.clone(),
            params,
        };
        vec![Action::CheckSender(from)]
    }

    fn on_rcpt(&mut self, tx: Option<Transaction>, to: Address) -> Vec<Action> {
        self.rcpt_asked = Some(to.to_plain());
        let Some(tx) = tx else {
            return vec![Action::Reply(reply::NEED_MAIL)];
        };
        let refusal = if !to.is_ascii() && !tx.params.smtputf8 {
            Some(reply::NEED_SMTPUTF8)
        } else if tx.recipients.len() >= self.config.max_recipients {
            Some(reply::TOO_MANY_RECIPIENTS)
        } else {
            to.domain
                .as_ref()
                .map(|domain| domain.to_lowercase())
                .filter(|domain| {
                    !self.config.local_domains.is_empty()
                        && !self.config.local_domains.contains(domain)
                })
                .map(|_| reply::DOMAIN_NOT_LOCAL)
        };
        if let Some(refusal) = refusal {
            self.phase = Phase::Mail(tx);
            return vec![Action::Reply(refusal)];
        }
        self.phase = Phase::Resolving {
            tx,
            address: to.clone(),
        };
        vec![Action::Resolve(to)]
    }

    fn on_resolved(
        &mut self,
        mut tx: Transaction,
        address: Address,
        decision: RcptDecision,
    ) -> Vec<Action> {
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
        self.phase = Phase::Mail(tx);
        vec![Action::Reply(reply)]
    }

    fn on_data(&mut self, tx: Option<Transaction>) -> Vec<Action> {
        match tx {
            None => vec![Action::Reply(reply::NEED_MAIL)],
            Some(tx) if tx.recipients.is_empty() => {
                self.phase = Phase::Mail(tx);
                vec![Action::Reply(reply::NO_VALID_RECIPIENTS)]
            }
            Some(tx) => {
                self.phase = Phase::Opening(tx);
                vec![Action::OpenBody]
            }
        }
    }

    fn on_body_opened(
        &mut self,
        tx: Transaction,
        result: Result<String, StorageFailure>,
        now: SystemTime,
    ) -> Vec<Action> {
        let id = match result {
            Ok(id) => id,
            Err(failure) => return vec![Action::Reply(failure.reply())],
        };
        let header = received_header(&ReceivedInfo {
            helo: self.helo.as_deref(),
            client: &self.client,
            hostname: &self.config.hostname,
            protocol: protocol_name(self.esmtp, tx.params.smtputf8, self.tls.is_some()),
            tls: self.tls.as_ref(),
            id: &id,
            single_recipient: match tx.recipients.as_slice() {
                [only] => Some(only.original.as_str()),
                _ => None,
            },
            now,
        });
        self.phase = Phase::Data {
            tx,
            id,
            headers: HeaderScan::default(),
            forged: self
                .config
                .authserv_id
                .as_deref()
                .map(ForgedResultsFilter::new),
        };
        vec![
            Action::Reply(reply::START_DATA),
            Action::EnterData,
            Action::AppendBody(Bytes::from(header)),
        ]
    }

    fn on_data_end(
        &mut self,
        tx: Transaction,
        id: String,
        headers: HeaderScan,
        forged: Option<ForgedResultsFilter>,
        size: u64,
        too_big: bool,
    ) -> Vec<Action> {
        if too_big {
            return vec![Action::DiscardBody, Action::Reply(reply::MESSAGE_TOO_BIG)];
        }
        if headers.hops > MAX_HOPS {
            return vec![Action::DiscardBody, Action::Reply(reply::TOO_MANY_HOPS)];
        }
        self.phase = Phase::Committing;
        // A message of headers alone ends inside its last field.
        let held = forged.map(|mut filter| filter.finish()).unwrap_or_default();
        let mut actions = Vec::with_capacity(2);
        if !held.is_empty() {
            actions.push(Action::AppendBody(Bytes::from(held)));
        }
        actions.push(Action::Commit(Box::new(MessageDraft {
            id,
            sender: tx.sender,
            params: tx.params,
            helo: self.helo.clone().unwrap_or_default(),
            recipients: tx.recipients,
            size,
            tls: self.tls.clone(),
            delivered_to: headers.delivered_to,
        })));
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    const HOST: &str = "mx.example.org";
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

    fn config() -> SessionConfig {
        SessionConfig {
            hostname: HOST.into(),
            max_message_size: 1000,
            max_recipients: 3,
            local_domains: Vec::new(),
            starttls: false,
            tls_required: false,
            authserv_id: None,
        }
    }

    fn machine_with(config: SessionConfig) -> SessionMachine {
        SessionMachine::new(
            Arc::new(config),
            ClientInfo {
                address: IpAddr::V4(CLIENT_IP),
                channel: "local".into(),
            },
        )
    }

    fn machine() -> SessionMachine {
        machine_with(config())
    }

    /// Feeds one command line, parsed as the driver would.
    /// A MAIL the driver admits at once (its check is tested on its own).
    fn cmd(m: &mut SessionMachine, line: &str) -> Vec<Action> {
        let actions = m.handle(Event::Command(command::parse(line.as_bytes())));
        match actions.as_slice() {
            [Action::CheckSender(_)] => m.handle(Event::SenderChecked(Ok(()))),
            _ => actions,
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn addr(local: &str, domain: &str) -> Address {
        Address {
            local: local.into(),
            domain: Some(domain.into()),
        }
    }

    fn pipe_target(recipient: &str) -> DeliveryTarget {
        let (local, domain) = recipient.split_once('@').unwrap();
        DeliveryTarget {
            recipient: recipient.into(),
            local: local.into(),
            extension: String::new(),
            domain: domain.into(),
            target: Target::Pipe {
                command: "/usr/local/bin/intake".into(),
            },
        }
    }

    /// The one reply the actions consist of; anything else fails the test.
    fn only_reply(actions: &[Action]) -> &Reply {
        match actions {
            [Action::Reply(r)] => r,
            other => panic!("expected exactly one reply, got {other:?}"),
        }
    }

    /// Asserts the actions are exactly one reply with this code and enhanced code.
    #[track_caller]
    fn assert_reply(actions: &[Action], code: u16, enhanced: &str) {
        let r = only_reply(actions);
        assert_eq!(r.code(), code, "{r}");
        assert_eq!(r.enhanced_code(), Some(enhanced), "{r}");
    }

    /// Asserts the actions are exactly `[Reply(code enhanced), Close]`.
    #[track_caller]
    fn assert_reply_and_close(actions: &[Action], code: u16, enhanced: &str) {
        match actions {
            [Action::Reply(r), Action::Close] => {
                assert_eq!(r.code(), code, "{r}");
                assert_eq!(r.enhanced_code(), Some(enhanced), "{r}");
            }
            other => panic!("expected a reply and Close, got {other:?}"),
        }
    }

    /// A session after `EHLO client.example`.
    fn greeted(config: SessionConfig) -> SessionMachine {
        let mut m = machine_with(config);
        assert_eq!(m.handle(Event::Connected).len(), 1);
        let a = cmd(&mut m, "EHLO client.example");
        assert_eq!(only_reply(&a).code(), 250);
        m
    }

    /// A session inside a transaction from `<sender@client.example>`.
    fn with_sender(config: SessionConfig) -> SessionMachine {
        let mut m = greeted(config);
        assert_reply(
            &cmd(&mut m, "MAIL FROM:<sender@client.example>"),
            250,
            "2.1.0",
        );
        m
    }

    /// RCPT that the resolver accepts: 250 2.1.5.
    fn accept_rcpt(m: &mut SessionMachine, address: &str) {
        let a = cmd(m, &format!("RCPT TO:<{address}>"));
        let (local, domain) = address.split_once('@').unwrap();
        assert_eq!(a, vec![Action::Resolve(addr(local, domain))]);
        let a = m.handle(Event::Resolved(RcptDecision::Accept(vec![pipe_target(
            address,
        )])));
        assert_reply(&a, 250, "2.1.5");
    }

    /// DATA up to the open body; returns the Received header appended.
    fn open_data(m: &mut SessionMachine, id: &str) -> String {
        assert_eq!(cmd(m, "DATA"), vec![Action::OpenBody]);
        let a = m.handle(Event::BodyOpened {
            result: Ok(id.into()),
            now: now(),
        });
        match a.as_slice() {
            [Action::Reply(r), Action::EnterData, Action::AppendBody(h)] => {
                assert_eq!(r.code(), 354, "{r}");
                assert_eq!(r.enhanced_code(), None, "{r}");
                assert!(m.in_data());
                String::from_utf8(h.to_vec()).unwrap()
            }
            other => panic!("expected 354, EnterData, AppendBody; got {other:?}"),
        }
    }

    /// A session in DATA with one accepted recipient and body `Q1`.
    fn in_data() -> SessionMachine {
        let mut m = with_sender(config());
        accept_rcpt(&mut m, "support@example.org");
        open_data(&mut m, "Q1");
        m
    }

    #[test]
    fn greeting_names_host_and_mailnode() {
        let mut m = machine();
        let a = m.handle(Event::Connected);
        let r = only_reply(&a);
        assert_eq!(r.code(), 220);
        assert_eq!(r.text(), format!("{HOST} ESMTP mailnode"));
        assert_eq!(r.to_bytes(), b"220 mx.example.org ESMTP mailnode\r\n");
    }

    #[test]
    fn ehlo_advertises_the_contract_extensions() {
        let mut m = machine();
        let a = cmd(&mut m, "EHLO client.example");
        let r = only_reply(&a);
        assert_eq!(r.code(), 250);
        let lines: Vec<&str> = r.text().split('\n').collect();
        assert_eq!(lines[0], HOST);
        for ext in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ] {
            assert!(lines[1..].contains(&ext), "{ext} missing from {lines:?}");
        }
        let a = cmd(&mut m, "HELO client.example");
        assert_eq!(only_reply(&a).code(), 250);
        assert_eq!(only_reply(&a).text(), HOST);
    }

    #[test]
    fn happy_transaction_then_a_second_one_in_the_same_session() {
        let mut m = with_sender(config());
        accept_rcpt(&mut m, "support@example.org");
        let header = open_data(&mut m, "Q1");
        assert!(header.starts_with("Received: from client.example ([192.0.2.7])"));
        assert!(header.contains(" id Q1"), "{header}");
        assert!(
            header.contains("\n\tfor <support@example.org>;"),
            "{header}"
        );
        assert!(header.ends_with('\n'), "{header}");

        let a = m.handle(Event::DataChunk(Bytes::from_static(
            b"Subject: hi\n\nbody\n",
        )));
        assert_eq!(
            a,
            vec![Action::AppendBody(Bytes::from_static(
                b"Subject: hi\n\nbody\n"
            ))]
        );
        let a = m.handle(Event::DataEnd {
            size: 20,
            too_big: false,
        });
        let draft = match a.as_slice() {
            [Action::Commit(d)] => d.clone(),
            other => panic!("expected Commit, got {other:?}"),
        };
        assert!(!m.in_data());
        assert_eq!(draft.id, "Q1");
        assert_eq!(
            draft.sender,
            ReversePath::Address(addr("sender", "client.example"))
        );
        assert_eq!(draft.helo, "client.example");
        assert_eq!(draft.size, 20);
        assert_eq!(
            draft.recipients,
            vec![AcceptedRecipient {
                original: "support@example.org".into(),
                targets: vec![pipe_target("support@example.org")],
            }]
        );
        let a = m.handle(Event::Committed(Ok("Q1".into())));
        assert_reply(&a, 250, "2.0.0");
        assert_eq!(only_reply(&a).text(), "2.0.0 Ok: queued as Q1");

        // The state is reset: a new MAIL is not nested, and only the new
        // transaction's recipients reach the next draft.
        assert_reply(&cmd(&mut m, "MAIL FROM:<>"), 250, "2.1.0");
        accept_rcpt(&mut m, "billing@example.org");
        accept_rcpt(&mut m, "team@example.org");
        let header = open_data(&mut m, "Q2");
        assert!(header.contains(" id Q2"), "{header}");
        assert!(!header.contains("for <"), "two recipients: {header}");
        let a = m.handle(Event::DataEnd {
            size: 7,
            too_big: false,
        });
        let [Action::Commit(draft)] = a.as_slice() else {
            panic!("expected Commit, got {a:?}");
        };
        assert_eq!(draft.id, "Q2");
        assert_eq!(draft.sender, ReversePath::Null);
        assert_eq!(draft.size, 7);
        let originals: Vec<&str> = draft
            .recipients
            .iter()
            .map(|r| r.original.as_str())
            .collect();
        assert_eq!(originals, ["billing@example.org", "team@example.org"]);
        let a = m.handle(Event::Committed(Ok("Q2".into())));
        assert_eq!(only_reply(&a).text(), "2.0.0 Ok: queued as Q2");
    }

    #[test]
    fn rset_clears_the_transaction() {
        let mut m = with_sender(config());
        accept_rcpt(&mut m, "support@example.org");
        assert_reply(&cmd(&mut m, "RSET"), 250, "2.0.0");
        assert_reply(&cmd(&mut m, "RCPT TO:<support@example.org>"), 503, "5.5.1");
        assert_reply(&cmd(&mut m, "DATA"), 503, "5.5.1");
        // And a new MAIL is accepted, not nested.
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
    }

    #[test]
    fn helo_and_ehlo_mid_transaction_reset_it() {
        for greeting in ["HELO other.example", "EHLO other.example"] {
            let mut m = with_sender(config());
            accept_rcpt(&mut m, "support@example.org");
            assert_eq!(only_reply(&cmd(&mut m, greeting)).code(), 250);
            assert_reply(&cmd(&mut m, "RCPT TO:<support@example.org>"), 503, "5.5.1");
            assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        }
    }

    #[test]
    fn quit_says_bye_and_closes() {
        let mut m = with_sender(config());
        assert_reply_and_close(&cmd(&mut m, "QUIT"), 221, "2.0.0");
        assert!(m.is_closed());
        assert_eq!(cmd(&mut m, "NOOP"), Vec::<Action>::new());
    }

    #[test]
    fn vrfy_noop_and_help() {
        let mut m = greeted(config());
        assert_reply(&cmd(&mut m, "VRFY support"), 252, "2.0.0");
        assert_reply(&cmd(&mut m, "NOOP"), 250, "2.0.0");
        assert_reply(&cmd(&mut m, "HELP"), 214, "2.0.0");
    }

    #[test]
    fn unknown_recipient_is_550_5_1_1() {
        let mut m = with_sender(config());
        let a = cmd(&mut m, "RCPT TO:<nobody@example.org>");
        assert_eq!(a, vec![Action::Resolve(addr("nobody", "example.org"))]);
        let a = m.handle(Event::Resolved(RcptDecision::Refuse(
            reply::UNKNOWN_RECIPIENT,
        )));
        assert_reply(&a, 550, "5.1.1");
        // The refused recipient does not count as accepted.
        assert_reply(&cmd(&mut m, "DATA"), 554, "5.5.1");
    }

    #[test]
    fn alias_of_unsupported_kind_is_550_5_1_1() {
        let mut m = with_sender(config());
        let a = cmd(&mut m, "RCPT TO:<archive@example.org>");
        assert_eq!(a, vec![Action::Resolve(addr("archive", "example.org"))]);
        let a = m.handle(Event::Resolved(RcptDecision::Refuse(
            reply::UNSUPPORTED_RECIPIENT,
        )));
        assert_reply(&a, 550, "5.1.1");
        // An acceptance with nowhere to deliver is refused the same way.
        let _ = cmd(&mut m, "RCPT TO:<empty@example.org>");
        let a = m.handle(Event::Resolved(RcptDecision::Accept(Vec::new())));
        assert_reply(&a, 550, "5.1.1");
        assert_reply(&cmd(&mut m, "DATA"), 554, "5.5.1");
    }

    #[test]
    fn domain_not_local_is_554_5_7_1_and_case_is_ignored() {
        let mut m = with_sender(SessionConfig {
            local_domains: vec!["example.org".into()],
            ..config()
        });
        assert_reply(
            &cmd(&mut m, "RCPT TO:<support@other.example>"),
            554,
            "5.7.1",
        );
        assert_reply(
            &cmd(&mut m, "RCPT TO:<support@example.org.evil>"),
            554,
            "5.7.1",
        );
        let a = cmd(&mut m, "RCPT TO:<support@EXAMPLE.Org>");
        assert_eq!(a, vec![Action::Resolve(addr("support", "EXAMPLE.Org"))]);
        let a = m.handle(Event::Resolved(RcptDecision::Accept(vec![pipe_target(
            "support@example.org",
        )])));
        assert_reply(&a, 250, "2.1.5");
    }

    #[test]
    fn empty_local_domains_accepts_any_domain() {
        let mut m = with_sender(config());
        let a = cmd(&mut m, "RCPT TO:<support@anything.example>");
        assert_eq!(
            a,
            vec![Action::Resolve(addr("support", "anything.example"))]
        );
    }

    #[test]
    fn too_many_recipients_is_452_4_5_3() {
        let mut m = with_sender(SessionConfig {
            max_recipients: 2,
            ..config()
        });
        // A refused recipient does not use up the allowance.
        let _ = cmd(&mut m, "RCPT TO:<nobody@example.org>");
        let a = m.handle(Event::Resolved(RcptDecision::Refuse(
            reply::UNKNOWN_RECIPIENT,
        )));
        assert_reply(&a, 550, "5.1.1");
        accept_rcpt(&mut m, "a@example.org");
        accept_rcpt(&mut m, "b@example.org");
        assert_reply(&cmd(&mut m, "RCPT TO:<c@example.org>"), 452, "4.5.3");
        // The transaction goes on with the two it has.
        assert_eq!(cmd(&mut m, "DATA"), vec![Action::OpenBody]);
    }

    #[test]
    fn bad_sequence_is_503_5_5_1() {
        let mut m = greeted(config());
        assert_reply(&cmd(&mut m, "DATA"), 503, "5.5.1");
        assert_reply(&cmd(&mut m, "RCPT TO:<support@example.org>"), 503, "5.5.1");
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 503, "5.5.1");
        // A command while the machine waits for the resolver.
        let _ = cmd(&mut m, "RCPT TO:<support@example.org>");
        assert_reply(&cmd(&mut m, "NOOP"), 503, "5.5.1");
    }

    #[test]
    fn data_without_accepted_recipient_is_554_5_5_1() {
        let mut m = with_sender(config());
        assert_reply(&cmd(&mut m, "DATA"), 554, "5.5.1");
    }

    #[test]
    fn unknown_command_is_500_5_5_2() {
        let mut m = greeted(config());
        assert_reply(&cmd(&mut m, "ETRN example.org"), 500, "5.5.2");
        assert_reply(&cmd(&mut m, "MAILX FROM:<a@b>"), 500, "5.5.2");
    }

    #[test]
    fn syntax_error_is_501_5_5_4() {
        let mut m = greeted(config());
        assert_reply(&cmd(&mut m, "EHLO"), 501, "5.5.4");
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example> SIZE=x"), 501, "5.5.4");
        assert_reply(&cmd(&mut m, "MAIL TO:<a@b.example>"), 501, "5.5.4");
        assert_reply(&cmd(&mut m, "HELO a\0b"), 501, "5.5.4");
    }

    #[test]
    fn line_too_long_is_500_5_5_6() {
        let mut m = greeted(config());
        let a = m.handle(Event::Command(Err(CommandError::LineTooLong)));
        assert_reply(&a, 500, "5.5.6");
        assert!(!m.is_closed());
    }

    #[test]
    fn malformed_address_is_501_5_1_3() {
        let mut m = greeted(config());
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@@b.example>"), 501, "5.1.3");
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        assert_reply(&cmd(&mut m, "RCPT TO:<a@b..example>"), 501, "5.1.3");
        assert_reply(&cmd(&mut m, "RCPT TO:<>"), 501, "5.1.3");
    }

    #[test]
    fn non_ascii_address_without_smtputf8_is_553_5_6_7() {
        let mut m = greeted(config());
        assert_reply(&cmd(&mut m, "MAIL FROM:<jörg@example.org>"), 553, "5.6.7");
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        assert_reply(&cmd(&mut m, "RCPT TO:<jörg@example.org>"), 553, "5.6.7");

        // With SMTPUTF8 both are taken.
        let mut m = greeted(config());
        assert_reply(
            &cmd(&mut m, "MAIL FROM:<jörg@example.org> SMTPUTF8"),
            250,
            "2.1.0",
        );
        let a = cmd(&mut m, "RCPT TO:<jörg@bücher.example>");
        assert_eq!(a, vec![Action::Resolve(addr("jörg", "bücher.example"))]);
    }

    #[test]
    fn size_parameter_above_limit_is_552_5_3_4() {
        let mut m = greeted(config());
        assert_reply(
            &cmd(&mut m, "MAIL FROM:<a@b.example> SIZE=1001"),
            552,
            "5.3.4",
        );
        // Refused: no transaction was started.
        assert_reply(&cmd(&mut m, "RCPT TO:<support@example.org>"), 503, "5.5.1");
        assert_reply(
            &cmd(&mut m, "MAIL FROM:<a@b.example> SIZE=1000"),
            250,
            "2.1.0",
        );
    }

    #[test]
    fn message_above_limit_is_552_5_3_4_and_discarded() {
        let mut m = in_data();
        let _ = m.handle(Event::DataChunk(Bytes::from_static(b"x\n")));
        let a = m.handle(Event::DataEnd {
            size: 5000,
            too_big: true,
        });
        match a.as_slice() {
            [Action::DiscardBody, Action::Reply(r)] => {
                assert_eq!(r.code(), 552, "{r}");
                assert_eq!(r.enhanced_code(), Some("5.3.4"), "{r}");
            }
            other => panic!("expected DiscardBody and 552, got {other:?}"),
        }
        assert!(!a.iter().any(|x| matches!(x, Action::Commit(_))));
        // The session goes on, without the transaction.
        assert_reply(&cmd(&mut m, "RCPT TO:<support@example.org>"), 503, "5.5.1");
    }

    #[test]
    fn bare_lf_is_521_5_5_2_close_and_nothing_committed() {
        let mut m = in_data();
        let a = m.handle(Event::DataRejected);
        match a.as_slice() {
            [Action::DiscardBody, Action::Reply(r), Action::Close] => {
                assert_eq!(r.code(), 521, "{r}");
                assert_eq!(r.enhanced_code(), Some("5.5.2"), "{r}");
            }
            other => panic!("expected DiscardBody, 521 and Close, got {other:?}"),
        }
        assert!(m.is_closed());
        // Whatever the reader still delivers commits nothing.
        let a = m.handle(Event::DataEnd {
            size: 10,
            too_big: false,
        });
        assert_eq!(a, Vec::<Action>::new());
        assert_eq!(cmd(&mut m, "QUIT"), Vec::<Action>::new());
    }

    #[test]
    fn storage_failure_opening_the_body_is_451_or_452() {
        for (failure, code, enhanced) in [
            (StorageFailure::Unavailable, 451, "4.3.0"),
            (StorageFailure::Full, 452, "4.3.1"),
        ] {
            let mut m = with_sender(config());
            accept_rcpt(&mut m, "support@example.org");
            assert_eq!(cmd(&mut m, "DATA"), vec![Action::OpenBody]);
            let a = m.handle(Event::BodyOpened {
                result: Err(failure),
                now: now(),
            });
            assert_reply(&a, code, enhanced);
            assert!(!m.in_data());
            // The session survives and can start over.
            assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        }
    }

    #[test]
    fn storage_failure_at_commit_is_451_or_452() {
        for (failure, code, enhanced) in [
            (StorageFailure::Unavailable, 451, "4.3.0"),
            (StorageFailure::Full, 452, "4.3.1"),
        ] {
            let mut m = in_data();
            let a = m.handle(Event::DataEnd {
                size: 3,
                too_big: false,
            });
            assert!(matches!(a.as_slice(), [Action::Commit(_)]), "{a:?}");
            let a = m.handle(Event::Committed(Err(failure)));
            assert_reply(&a, code, enhanced);
            assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        }
    }

    #[test]
    fn idle_timeout_is_421_4_4_2_and_close() {
        let mut m = greeted(config());
        assert_reply_and_close(&m.handle(Event::IdleTimeout), 421, "4.4.2");
        assert!(m.is_closed());

        // Inside DATA the open body is discarded first.
        let mut m = in_data();
        let a = m.handle(Event::IdleTimeout);
        assert_eq!(a.first(), Some(&Action::DiscardBody));
        assert_reply_and_close(&a[1..], 421, "4.4.2");
    }

    #[test]
    fn connect_limit_is_421_4_4_2_and_close() {
        let mut m = with_sender(config());
        assert_reply_and_close(&m.handle(Event::ConnectLimit), 421, "4.4.2");
        assert!(m.is_closed());
        assert_eq!(cmd(&mut m, "NOOP"), Vec::<Action>::new());

        let mut m = in_data();
        let a = m.handle(Event::ConnectLimit);
        assert_eq!(a.first(), Some(&Action::DiscardBody));
        assert_reply_and_close(&a[1..], 421, "4.4.2");
    }

    #[test]
    fn hostile_helo_stays_inside_the_received_header() {
        let mut m = machine();
        let _ = m.handle(Event::Connected);
        let hostile =
            "evil) (by trusted.example); <x@y> \"q\" \\ \tReceived: from forged ([10.0.0.1])";
        assert_eq!(
            only_reply(&cmd(&mut m, &format!("EHLO {hostile}"))).code(),
            250
        );
        assert_reply(&cmd(&mut m, "MAIL FROM:<a@b.example>"), 250, "2.1.0");
        accept_rcpt(&mut m, "support@example.org");
        let header = open_data(&mut m, "Q9");

        assert!(header.ends_with('\n'));
        let lines: Vec<&str> = header.trim_end_matches('\n').split('\n').collect();
        assert_eq!(lines.len(), 4, "{header}");
        assert!(lines[0].starts_with("Received: from "), "{header}");
        for line in &lines[1..] {
            assert!(line.starts_with('\t'), "continuation without tab: {line:?}");
        }
        assert!(!header.contains('\r'), "{header}");

        // The client's text is one token before our own comment: none of
        // its comment, address or field delimiters survive.
        let from = lines[0]
            .strip_prefix("Received: from ")
            .and_then(|rest| rest.strip_suffix(" ([192.0.2.7])"))
            .unwrap_or_else(|| panic!("first line out of shape: {:?}", lines[0]));
        assert!(!from.is_empty());
        assert!(
            !from.contains([' ', '\t', '(', ')', ';', '<', '>', '"', '\\']),
            "{from:?}"
        );
        assert_eq!(
            lines[1],
            "\tby mx.example.org (mailnode, channel local) with ESMTP id Q9"
        );
        assert_eq!(lines[2], "\tfor <support@example.org>;");
        assert!(lines[3].starts_with("\tTue, 14 Nov 2023"), "{header}");
        // Exactly our own structural characters, nothing of the client's.
        assert_eq!(header.matches('(').count(), 2, "{header}");
        assert_eq!(header.matches(')').count(), 2, "{header}");
        assert_eq!(header.matches(';').count(), 1, "{header}");
        assert_eq!(header.matches('<').count(), 1, "{header}");
        // The forged field name survives only as data inside the token.
        assert!(!header.contains("\nReceived:"), "{header}");
        assert!(!header.contains("\n\tReceived:"), "{header}");
    }

    #[test]
    fn received_header_protocol_follows_helo_and_smtputf8() {
        let mut m = machine();
        let _ = cmd(&mut m, "HELO old.example");
        let _ = cmd(&mut m, "MAIL FROM:<a@b.example>");
        accept_rcpt(&mut m, "support@example.org");
        let header = open_data(&mut m, "Q3");
        assert!(header.contains(" with SMTP id Q3"), "{header}");

        let mut m = greeted(config());
        let _ = cmd(&mut m, "MAIL FROM:<a@b.example> SMTPUTF8");
        accept_rcpt(&mut m, "support@example.org");
        let header = open_data(&mut m, "Q4");
        assert!(header.contains(" with UTF8SMTP id Q4"), "{header}");
    }

    #[test]
    fn a_refused_client_may_only_quit() {
        let mut m = machine();
        let greeting = m.handle(Event::Refused);
        assert_reply(&greeting, 554, "5.7.1");
        for line in [
            "EHLO x",
            "MAIL FROM:<a@b>",
            "RCPT TO:<c@d>",
            "DATA",
            "NOOP",
            "FROB",
        ] {
            let a = m.handle(Event::Command(command::parse(line.as_bytes())));
            assert_reply(&a, 503, "5.7.1");
        }
        let a = m.handle(Event::Command(command::parse(b"QUIT")));
        assert_reply_and_close(&a, 221, "2.0.0");
    }

    #[test]
    fn mail_waits_for_the_sender_check_and_honours_its_refusal() {
        let mut m = greeted(config());
        let a = m.handle(Event::Command(command::parse(b"MAIL FROM:<a@b.example>")));
        assert!(
            matches!(a.as_slice(), [Action::CheckSender(ReversePath::Address(_))]),
            "{a:?}"
        );
        assert_reply(
            &m.handle(Event::SenderChecked(Err(reply::MESSAGE_RATE))),
            450,
            "4.7.1",
        );
        // No transaction was opened: RCPT needs MAIL.
        assert_reply(&cmd(&mut m, "RCPT TO:<c@d.example>"), 503, "5.5.1");
        let a = m.handle(Event::Command(command::parse(b"MAIL FROM:<a@b.example>")));
        assert_eq!(a.len(), 1);
        assert_reply(
            &m.handle(Event::SenderChecked(Err(reply::SENDER_REFUSED))),
            550,
            "5.7.1",
        );
        let a = m.handle(Event::Command(command::parse(b"MAIL FROM:<a@b.example>")));
        assert_eq!(a.len(), 1);
        assert_reply(&m.handle(Event::SenderChecked(Ok(()))), 250, "2.1.0");
    }

    #[test]
    fn abort_drops_the_message_being_received_with_a_421() {
        let mut busy = with_sender(config());
        accept_rcpt(&mut busy, "support@example.org");
        let _header = open_data(&mut busy, "Q1");
        let a = busy.handle(Event::Abort);
        assert_eq!(a[0], Action::DiscardBody);
        assert_reply_and_close(&a[1..], 421, "4.3.2");
    }

    #[test]
    fn shutdown_closes_an_idle_session_but_not_one_in_data() {
        let mut idle = greeted(config());
        assert_reply_and_close(&idle.handle(Event::Shutdown), 421, "4.3.2");
        let mut busy = with_sender(config());
        accept_rcpt(&mut busy, "support@example.org");
        let _header = open_data(&mut busy, "Q1");
        assert!(busy.handle(Event::Shutdown).is_empty());
        assert!(busy.in_data());
    }

    /// A line as the driver sends it: unparsed.
    fn line(m: &mut SessionMachine, text: &str) -> Vec<Action> {
        m.handle(Event::Line(Bytes::copy_from_slice(text.as_bytes())))
    }

    #[test]
    fn the_machine_tallies_recipients_messages_and_why_it_closed() {
        let mut m = machine();
        assert_eq!(m.handle(Event::Connected).len(), 1);
        assert_reply(&line(&mut m, "RCPT TO:<a@example.org>"), 503, "5.5.1");
        assert_eq!(line(&mut m, "EHLO client.example").len(), 1);
        assert_eq!(m.take_tallies(), vec![Tally::Recipient(503)]);
        assert_eq!(line(&mut m, "MAIL FROM:<s@client.example>").len(), 1);
        assert_eq!(m.handle(Event::SenderChecked(Ok(()))).len(), 1);
        // A malformed RCPT is a refused recipient all the same.
        assert_eq!(only_reply(&line(&mut m, "rcpt TO:<@>")).code(), 501);
        // The reply to a RCPT comes once the resolver answered.
        let a = line(&mut m, "RCPT TO:<support@example.org>");
        assert_eq!(a, vec![Action::Resolve(addr("support", "example.org"))]);
        assert_eq!(m.take_tallies(), vec![Tally::Recipient(501)]);
        let a = m.handle(Event::Resolved(RcptDecision::Accept(vec![pipe_target(
            "support@example.org",
        )])));
        assert_reply(&a, 250, "2.1.5");
        assert_eq!(m.take_tallies(), vec![Tally::Recipient(250)]);
        open_data(&mut m, "Q1");
        let a = m.handle(Event::DataEnd {
            size: 10,
            too_big: false,
        });
        assert!(matches!(a.as_slice(), [Action::Commit(_)]));
        assert!(m.take_tallies().is_empty(), "counted before its reply");
        let a = m.handle(Event::Committed(Ok("Q1".into())));
        assert_reply(&a, 250, "2.0.0");
        assert_eq!(m.take_tallies(), vec![Tally::Message(250)]);
        assert_eq!(line(&mut m, "NOOP").len(), 1);
        assert!(m.take_tallies().is_empty());
        assert_reply_and_close(&line(&mut m, "QUIT"), 221, "2.0.0");
        assert_eq!(m.take_tallies(), vec![Tally::Closed(CloseReason::Quit)]);
    }

    #[test]
    fn each_refused_recipient_is_kept_for_the_log_with_its_reply() {
        let mut m = machine();
        let _ = m.handle(Event::Connected);
        let _ = line(&mut m, "EHLO client.example");
        let _ = line(&mut m, "MAIL FROM:<s@client.example>");
        let _ = m.handle(Event::SenderChecked(Ok(())));
        let _ = line(&mut m, "RCPT TO:<Nobody@example.org>");
        let _ = m.handle(Event::Resolved(RcptDecision::Refuse(
            reply::UNKNOWN_RECIPIENT,
        )));
        let _ = line(&mut m, "rcpt TO:<@>");
        let _ = line(&mut m, "RCPT TO:<support@example.org>");
        let _ = m.handle(Event::Resolved(RcptDecision::Accept(vec![pipe_target(
            "support@example.org",
        )])));
        let refused = m.take_refused_recipients();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert_eq!(
            refused[0],
            RefusedRecipient {
                recipient: "Nobody@example.org".into(),
                reply: reply::UNKNOWN_RECIPIENT,
            }
        );
        assert_eq!(refused[1].recipient, "rcpt TO:<@>");
        assert_eq!(refused[1].reply.code(), 501);
        assert!(m.take_refused_recipients().is_empty());
    }

    #[test]
    fn each_way_of_closing_is_tallied_with_its_reason() {
        let mut m = in_data();
        assert_eq!(m.take_tallies(), vec![Tally::Recipient(250)]);
        let _ = m.handle(Event::DataRejected);
        assert_eq!(
            m.take_tallies(),
            vec![Tally::Message(521), Tally::Closed(CloseReason::Error)]
        );
        for (event, reason) in [
            (Event::IdleTimeout, CloseReason::Timeout),
            (Event::ConnectLimit, CloseReason::ConnectLimit),
            (Event::Shutdown, CloseReason::Shutdown),
            (Event::Abort, CloseReason::Shutdown),
        ] {
            let mut m = greeted(config());
            let _ = m.handle(event);
            assert_eq!(m.take_tallies(), vec![Tally::Closed(reason)]);
        }
        // A sender check that answers 421 closes the session: an error.
        let mut m = greeted(config());
        let _ = line(&mut m, "MAIL FROM:<s@client.example>");
        let _ = m.handle(Event::SenderChecked(Err(reply::INTAKE_PAUSED)));
        assert_eq!(m.take_tallies(), vec![Tally::Closed(CloseReason::Error)]);
    }

    fn with_tls(require: bool) -> SessionConfig {
        SessionConfig {
            starttls: true,
            tls_required: require,
            ..config()
        }
    }

    fn tls13() -> TlsInfo {
        TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
        }
    }

    fn ehlo_offers_starttls(m: &mut SessionMachine) -> bool {
        let a = cmd(m, "EHLO client.example");
        only_reply(&a).text().lines().any(|l| l == "STARTTLS")
    }

    #[test]
    fn starttls_is_offered_in_clear_only_with_tls_and_answers_as_the_contract_says() {
        let mut plain = greeted(config());
        assert!(!ehlo_offers_starttls(&mut plain));
        assert_reply(&cmd(&mut plain, "STARTTLS"), 502, "5.5.1");

        let mut m = greeted(with_tls(false));
        assert!(ehlo_offers_starttls(&mut m));
        assert_reply(&cmd(&mut m, "STARTTLS now"), 501, "5.5.4");
        match cmd(&mut m, "starttls").as_slice() {
            [Action::Reply(r), Action::StartTls] => {
                assert_eq!((r.code(), r.enhanced_code()), (220, Some("2.0.0")))
            }
            other => panic!("expected 220 then StartTls, got {other:?}"),
        }
        assert_eq!(m.handle(Event::TlsStarted(tls13())), Vec::new());
        assert_reply(&cmd(&mut m, "STARTTLS"), 503, "5.5.1");
        assert!(!ehlo_offers_starttls(&mut m), "no STARTTLS inside TLS");
        assert_reply(&cmd(&mut m, "STARTTLS"), 503, "5.5.1");
    }

    #[test]
    fn after_the_handshake_the_session_starts_over_and_mail_waits_for_ehlo() {
        let mut m = greeted(with_tls(false));
        let _ = cmd(&mut m, "STARTTLS");
        let _ = m.handle(Event::TlsStarted(tls13()));
        assert_reply(&cmd(&mut m, "MAIL FROM:<s@client.example>"), 503, "5.5.1");
        assert_reply(&cmd(&mut m, "RCPT TO:<r@example.org>"), 503, "5.5.1");
        assert!(!ehlo_offers_starttls(&mut m));
        assert_reply(&cmd(&mut m, "MAIL FROM:<s@client.example>"), 250, "2.1.0");
        accept_rcpt(&mut m, "support@example.org");
        let header = open_data(&mut m, "Q7");
        assert!(
            header.contains("\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\n"),
            "{header}"
        );
        assert!(header.contains(" with ESMTPS id Q7"), "{header}");
        let _ = m.handle(Event::DataChunk(Bytes::from_static(
            b"Subject: s\n\nbody\n",
        )));
        match m
            .handle(Event::DataEnd {
                size: 20,
                too_big: false,
            })
            .as_slice()
        {
            [Action::Commit(draft)] => assert_eq!(draft.tls, Some(tls13())),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    #[test]
    fn starttls_inside_a_transaction_is_refused_and_the_transaction_kept() {
        let mut m = with_sender(with_tls(false));
        assert_reply(&cmd(&mut m, "STARTTLS"), 503, "5.5.1");
        accept_rcpt(&mut m, "support@example.org");
    }

    #[test]
    fn with_tls_required_mail_in_clear_gets_530_and_inside_tls_is_taken() {
        let mut m = greeted(with_tls(true));
        assert_reply(&cmd(&mut m, "MAIL FROM:<s@client.example>"), 530, "5.7.0");
        let _ = cmd(&mut m, "STARTTLS");
        let _ = m.handle(Event::TlsStarted(tls13()));
        let _ = cmd(&mut m, "EHLO client.example");
        assert_reply(&cmd(&mut m, "MAIL FROM:<s@client.example>"), 250, "2.1.0");
    }

    #[test]
    fn a_plain_session_says_esmtp_and_its_draft_has_no_tls() {
        let mut m = with_sender(with_tls(false));
        accept_rcpt(&mut m, "support@example.org");
        let header = open_data(&mut m, "Q8");
        assert!(header.contains(" with ESMTP id Q8"), "{header}");
        assert!(!header.contains("using"), "{header}");
        match m
            .handle(Event::DataEnd {
                size: 0,
                too_big: false,
            })
            .as_slice()
        {
            [Action::Commit(draft)] => assert_eq!(draft.tls, None),
            other => panic!("expected a commit, got {other:?}"),
        }
    }
}

//! Session (≈ Postfix's smtpd): one per connection. The actor holds the
//! protocol state machine and the body being received, and talks to the
//! AliasResolver, the spool writer and the QueueRunner. The socket is not
//! here: each connection's I/O task ([`serve_connection`]) owns it, sends
//! every frame to this actor, waits for the answer and writes it, so a
//! client that stops reading stops being read, and timeouts live in plain
//! `tokio::time`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::actors::alias_resolver::{AliasResolver, Resolve};
use crate::actors::delivery_worker::{Deliver, DeliveryWorker};
use crate::actors::queue_runner::Enqueued;
use crate::actors::Shared;
use crate::auth::{Authenticator, Refusal, SpfVerdict, Verdict};
use crate::delivery::status::{DeliveryStatus, EnhancedCode};
use crate::hooks::Hooks;
use crate::limits::KeyedLimiter;
use crate::protocol::codec::{Frame, SmtpCodec};
use crate::protocol::command::{self, ReversePath};
use crate::protocol::data::BareLineEnding;
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{
    Action, ClientInfo, CloseReason, Event, MessageDraft, RcptDecision, SessionConfig,
    SessionMachine, Tally, TlsInfo,
};
use crate::spool::AuthRecord;
use crate::spool::{DeliveryState, Envelope, IncomingBody, Spool};
use crate::telemetry;
use crate::tls::{Connection, HandshakeFailure, ServerTls};

/// How far the node is in going down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stopping {
    No,
    /// Idle sessions are told 421 4.3.2; a message in DATA may finish.
    Gracefully,
    /// Time is up: every session, even inside DATA, is told and closed.
    Now,
}

/// What every session shares.
#[derive(Clone)]
pub struct SessionDeps {
    pub config: Arc<SessionConfig>,
    pub limits: SessionLimits,
    pub spool: Spool,
    pub resolver: Shared<Addr<AliasResolver>>,
    /// Told of every message made durable (the QueueRunner, or in inetd
    /// mode whoever delivers after the session).
    pub queue: Arc<dyn Fn() -> Recipient<Enqueued> + Send + Sync>,
    /// Inline mode (`[delivery] mode = "inline"`): programs run during DATA
    /// on these workers and the reply waits for them.
    pub inline: Option<Vec<Shared<Addr<DeliveryWorker>>>>,
    /// `message_rate_per_ip`, counted at MAIL.
    pub message_rate: Arc<KeyedLimiter>,
    /// `[limits] exempt`: clients the message rate does not count.
    pub rate_exempt: Arc<[ipnet::IpNet]>,
    /// The embedding program's checks.
    pub hooks: Hooks,
    /// How far the node is in going down.
    pub shutdown: tokio::sync::watch::Receiver<Stopping>,
    /// Intake paused by the operator: sessions already open are told at MAIL.
    pub paused: Arc<std::sync::atomic::AtomicBool>,
    /// `[tls]`: the certificate in force, for STARTTLS and `listen_tls`.
    pub tls: Option<Arc<ServerTls>>,
    /// `[auth] enabled`: SPF, DKIM and DMARC for every message.
    pub auth: Option<Arc<Authenticator>>,
}

/// Timing and framing limits of the I/O task.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub connect_limit: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub bare_lf: BareLineEnding,
    pub max_message_size: u64,
}

/// Input from the I/O task; answered with what to write.
#[derive(Message)]
#[rtype(result = "Response")]
pub enum Input {
    Connected,
    /// Connected, but refused (access, the host hook).
    Refused,
    /// The node is going down.
    Shutdown,
    /// The node is going down and time is up, even inside DATA.
    Abort,
    Frame(Frame),
    IdleTimeout,
    ConnectLimit,
    /// The TLS handshake finished.
    TlsStarted(TlsInfo),
}

/// The connection is gone; drop whatever was being received.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected;

/// What the I/O task should do.
#[derive(Debug, Default)]
pub struct Response {
    pub replies: Vec<Reply>,
    pub enter_data: bool,
    pub close: bool,
    /// After these replies, the TLS handshake (STARTTLS).
    pub start_tls: bool,
    /// What the metrics count of this exchange.
    pub tallies: Vec<Tally>,
}

pub struct Session {
    machine: SessionMachine,
    client: ClientInfo,
    deps: Arc<SessionDeps>,
    body: Option<IncomingBody>,
    /// A write to the body file failed: the message must not be queued.
    body_failed: Option<crate::spool::SpoolError>,
    /// For the session's log line.
    started: std::time::Instant,
    messages: u32,
    /// `[auth]`: SPF of the transaction in progress, asked at MAIL.
    spf: Option<tokio::task::JoinHandle<SpfVerdict>>,
}

impl Session {
    pub fn new(deps: Arc<SessionDeps>, client: ClientInfo) -> Self {
        Session {
            machine: SessionMachine::new(Arc::clone(&deps.config), client.clone()),
            client,
            deps,
            body: None,
            body_failed: None,
            started: std::time::Instant::now(),
            messages: 0,
            spf: None,
        }
    }

    /// `[auth]`: SPF is asked as soon as MAIL is taken, so that its DNS
    /// questions run while the client sends the message.
    fn start_spf(&mut self, sender: &ReversePath) {
        if let Some(previous) = self.spf.take() {
            previous.abort();
        }
        if let Some(auth) = &self.deps.auth {
            let helo = self.machine.helo().unwrap_or_default().to_string();
            let asked = Arc::clone(auth).spf(self.client.address, helo, sender.to_plain());
            self.spf = Some(tokio::spawn(asked));
        }
    }

    /// Runs the machine's actions in order. The two that wait on another
    /// actor (Resolve, Commit) end the synchronous run; their answer is fed
    /// back to the machine and the remaining actions continue from there.
    fn run(
        &mut self,
        mut work: VecDeque<Action>,
        mut out: Response,
    ) -> ResponseActFuture<Self, Response> {
        while let Some(action) = work.pop_front() {
            match action {
                Action::Reply(r) => out.replies.push(r),
                Action::EnterData => out.enter_data = true,
                Action::Close => out.close = true,
                Action::StartTls => out.start_tls = true,
                Action::AppendBody(bytes) => self.append(&bytes),
                Action::DiscardBody => {
                    self.body = None;
                    self.body_failed = None;
                }
                Action::OpenBody => {
                    let now = SystemTime::now();
                    let result = match self.deps.spool.begin(now) {
                        Ok(body) => {
                            let id = body.id().to_string();
                            self.body = Some(body);
                            self.body_failed = None;
                            Ok(id)
                        }
                        Err(e) => {
                            tracing::error!("cannot start a queue file: {e}");
                            Err(e.storage_failure())
                        }
                    };
                    work.extend(self.machine.handle(Event::BodyOpened { result, now }));
                }
                Action::CheckSender(sender) => {
                    let paused = self.deps.paused.load(std::sync::atomic::Ordering::Relaxed);
                    let verdict = if paused {
                        Err(reply::INTAKE_PAUSED)
                    } else if !crate::limits::is_exempt(&self.deps.rate_exempt, self.client.address)
                        && self
                            .deps
                            .message_rate
                            .check_key(&self.client.address)
                            .is_err()
                    {
                        crate::telemetry::rate_limited("message");
                        Err(reply::MESSAGE_RATE)
                    } else if !self.deps.hooks.sender_allowed(&sender.to_plain()) {
                        Err(reply::SENDER_REFUSED)
                    } else if !self.deps.spool.has_intake_room() {
                        return self.wait_for_spool(sender, work, out);
                    } else {
                        self.start_spf(&sender);
                        Ok(())
                    };
                    work.extend(self.machine.handle(Event::SenderChecked(verdict)));
                }
                Action::Resolve(address)
                    if !self.deps.hooks.recipient_allowed(&address.to_plain()) =>
                {
                    let refused = RcptDecision::Refuse(reply::RECIPIENT_REFUSED);
                    work.extend(self.machine.handle(Event::Resolved(refused)));
                }
                Action::Resolve(address) => {
                    let asked = self.deps.resolver.get().send(Resolve(address));
                    return Box::pin(asked.into_actor(self).then(move |answer, act, _| {
                        let decision = answer.unwrap_or_else(|e| {
                            tracing::error!("alias resolver unavailable: {e}");
                            RcptDecision::Refuse(reply::LOCAL_ERROR)
                        });
                        work.extend(act.machine.handle(Event::Resolved(decision)));
                        act.run(work, out)
                    }));
                }
                Action::Commit(draft) => return self.commit(*draft, work, out),
            }
        }
        out.tallies = self.machine.take_tallies();
        for refused in self.machine.take_refused_recipients() {
            tracing::info!(
                client = %self.client.address,
                // Debug form: what a client wrote cannot forge log lines.
                recipient = ?refused.recipient,
                reply = %refused.reply,
                "recipient refused"
            );
        }
        Box::pin(actix::fut::ready(out))
    }

    /// The spool is behind its disk: a new transaction waits for it, so
    /// that what waits in memory for the disk stays bounded, and past the
    /// intake wait is refused with a temporary error.
    fn wait_for_spool(
        &mut self,
        sender: ReversePath,
        mut work: VecDeque<Action>,
        out: Response,
    ) -> ResponseActFuture<Self, Response> {
        let spool = self.deps.spool.clone();
        let room = async move { spool.wait_for_intake_room().await };
        Box::pin(room.into_actor(self).then(move |room, act, _| {
            telemetry::intake_backpressure(if room { "waited" } else { "refused" });
            let verdict = if room {
                act.start_spf(&sender);
                Ok(())
            } else {
                tracing::warn!(
                    client = %act.client.address,
                    "transaction refused: the spool is behind its disk"
                );
                Err(reply::SPOOL_BEHIND)
            };
            work.extend(act.machine.handle(Event::SenderChecked(verdict)));
            act.run(work, out)
        }))
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.body_failed.is_some() {
            return;
        }
        if let Some(body) = self.body.as_mut() {
            if let Err(e) = body.append(bytes) {
                tracing::error!("cannot write queue file: {e}");
                self.body_failed = Some(e);
            }
        }
    }

    fn commit(
        &mut self,
        draft: MessageDraft,
        mut work: VecDeque<Action>,
        out: Response,
    ) -> ResponseActFuture<Self, Response> {
        let body = self.body.take();
        let failed = self.body_failed.take();
        let (Some(body), None) = (body, failed.clone()) else {
            let failure = failed
                .map(|e| e.storage_failure())
                .unwrap_or(crate::protocol::session::StorageFailure::Unavailable);
            work.extend(self.machine.handle(Event::Committed(Err(failure))));
            return self.run(work, out);
        };
        let envelope = Envelope::accepted(draft, &self.client, SystemTime::now());
        match self.deps.auth.clone() {
            Some(auth) => self.authenticate(auth, body, envelope, work, out),
            None => self.commit_checked(body, envelope, work, out),
        }
    }

    /// `[auth]`: DKIM and DMARC on the body as received, with the SPF
    /// asked at MAIL; the verdict goes into the envelope, or, for a DMARC
    /// fail the operator enforces, the message is refused and dropped.
    fn authenticate(
        &mut self,
        auth: Arc<Authenticator>,
        mut body: IncomingBody,
        mut envelope: Envelope,
        mut work: VecDeque<Action>,
        out: Response,
    ) -> ResponseActFuture<Self, Response> {
        if let Err(e) = body.flush() {
            return self.flush_failed(&envelope.id, e, work, out);
        }
        let path = body.path().to_path_buf();
        let asked = self.spf.take();
        let (client, helo, sender) = (
            self.client.address,
            envelope.client_helo.clone(),
            envelope.sender.clone(),
        );
        let checked = async move {
            let spf = match asked {
                Some(asked) => asked.await.ok(),
                None => None,
            };
            let spf = match spf {
                Some(spf) => spf,
                // A session that started its transaction before this node
                // had [auth] cannot exist; asked now all the same.
                None => Arc::clone(&auth).spf(client, helo, sender).await,
            };
            let message = crate::auth::MessageFile::open(&path);
            auth.verify(message.bytes(), &spf).await
        };
        Box::pin(
            checked
                .into_actor(self)
                .then(move |verdict: Verdict, act, _| {
                    tracing::info!(
                        queue_id = %envelope.id,
                        spf = %verdict.spf,
                        dkim = %verdict.dkim,
                        dmarc = %verdict.dmarc,
                        from_domain = %verdict.from_domain,
                        "authenticated"
                    );
                    if let Some(refusal) = verdict.refusal {
                        let (why, answer) = match refusal {
                            Refusal::DmarcReject => {
                                ("DMARC fail under p=reject", reply::DMARC_REJECT)
                            }
                            Refusal::SeveralFromDomains => {
                                ("several From: domains", reply::SEVERAL_FROM_DOMAINS)
                            }
                        };
                        tracing::info!(
                            queue_id = %envelope.id,
                            client = %envelope.client_address,
                            from_domain = %verdict.from_domain,
                            "refused: {why}"
                        );
                        drop(body);
                        work.extend(act.machine.handle(Event::MessageRefused(answer)));
                        return act.run(work, out);
                    }
                    envelope.auth = AuthRecord {
                        spf: verdict.spf,
                        dkim: verdict.dkim,
                        dmarc: verdict.dmarc,
                        from_domain: verdict.from_domain,
                        header: verdict.header,
                    };
                    act.commit_checked(body, envelope, work, out)
                }),
        )
    }

    /// The body could not be written out: the message is not taken.
    fn flush_failed(
        &mut self,
        id: &str,
        e: crate::spool::SpoolError,
        mut work: VecDeque<Action>,
        out: Response,
    ) -> ResponseActFuture<Self, Response> {
        tracing::error!(queue_id = %id, "cannot write message: {e}");
        work.extend(
            self.machine
                .handle(Event::Committed(Err(e.storage_failure()))),
        );
        self.run(work, out)
    }

    /// The message as it stands is to be kept: queued, or in inline mode
    /// delivered now.
    fn commit_checked(
        &mut self,
        body: IncomingBody,
        mut envelope: Envelope,
        mut work: VecDeque<Action>,
        out: Response,
    ) -> ResponseActFuture<Self, Response> {
        if let Some(workers) = &self.deps.inline {
            let workers = workers.clone();
            return self.deliver_inline(body, envelope, workers, work, out);
        }
        let pending = self.deps.spool.commit(body, &mut envelope).wait();
        Box::pin(pending.into_actor(self).then(move |result, act, _| {
            let outcome = match result {
                Ok(()) => {
                    tracing::info!(
                        queue_id = %envelope.id,
                        client = %envelope.client_address,
                        sender = %envelope.sender,
                        recipients = envelope.deliveries.len(),
                        size = envelope.size,
                        "queued"
                    );
                    let id = envelope.id.clone();
                    act.messages += 1;
                    (act.deps.queue)().do_send(Enqueued(Box::new(envelope)));
                    Ok(id)
                }
                Err(e) => {
                    tracing::error!(queue_id = %envelope.id, "cannot queue message: {e}");
                    Err(e.storage_failure())
                }
            };
            work.extend(act.machine.handle(Event::Committed(outcome)));
            act.run(work, out)
        }))
    }
}

impl Session {
    /// Inline mode: every program runs now, on the body still in
    /// `incoming/`; the client hears the verdict, and nothing stays queued
    /// whatever it is.
    fn deliver_inline(
        &mut self,
        mut body: IncomingBody,
        envelope: Envelope,
        workers: Vec<Shared<Addr<DeliveryWorker>>>,
        mut work: VecDeque<Action>,
        out: Response,
    ) -> ResponseActFuture<Self, Response> {
        if let Err(e) = body.flush() {
            return self.flush_failed(&envelope.id, e, work, out);
        }
        let envelope = Arc::new(envelope);
        let path = body.path().to_path_buf();
        // Deliveries that failed at intake (a mail loop) count as refused.
        let mut refused: Vec<DeliveryStatus> = envelope
            .deliveries
            .iter()
            .filter(|d| d.state == DeliveryState::Failed)
            .map(|d| {
                let code = EnhancedCode::parse(&d.status).unwrap_or(EnhancedCode::PERMANENT);
                DeliveryStatus::Permanent(code, d.last_error.clone())
            })
            .collect();
        // Spread sessions over the workers rather than all starting at one.
        let first = envelope.id.bytes().map(usize::from).sum::<usize>();
        let attempts: Vec<_> = envelope
            .pending()
            .enumerate()
            .map(|(n, (index, _))| {
                workers[(first + n) % workers.len().max(1)]
                    .get()
                    .send(Deliver {
                        envelope: Arc::clone(&envelope),
                        index,
                        body: path.clone(),
                        in_flight: None,
                    })
            })
            .collect();
        let all = futures_util::future::join_all(attempts);
        Box::pin(all.into_actor(self).then(move |results, act, _| {
            // The programs are done with it: the body goes.
            drop(body);
            refused.extend(results.into_iter().map(|r| match r {
                Ok(report) => report.status,
                Err(e) => DeliveryStatus::system_temporary(format!("delivery worker lost: {e}")),
            }));
            let verdict = crate::queue::inline_verdict(&envelope.id, &refused);
            tracing::info!(queue_id = %envelope.id, sender = %envelope.sender, result = ?verdict, "inline delivery");
            work.extend(act.machine.handle(Event::DeliveredInline(verdict)));
            act.run(work, out)
        }))
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    /// One line per session: who, how long, how many messages.
    fn stopped(&mut self, _: &mut Self::Context) {
        // A transaction that never reached its end needs no SPF.
        if let Some(asked) = self.spf.take() {
            asked.abort();
        }
        tracing::info!(
            client = %self.client.address,
            channel = %self.client.channel,
            messages = self.messages,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "session"
        );
    }
}

impl Handler<Input> for Session {
    type Result = ResponseActFuture<Self, Response>;

    fn handle(&mut self, input: Input, _: &mut Self::Context) -> Self::Result {
        let event = match input {
            Input::Connected => Event::Connected,
            Input::Refused => Event::Refused,
            Input::Shutdown => Event::Shutdown,
            Input::Abort => Event::Abort,
            Input::IdleTimeout => Event::IdleTimeout,
            Input::ConnectLimit => Event::ConnectLimit,
            Input::TlsStarted(info) => Event::TlsStarted(info),
            Input::Frame(Frame::Line(line)) => Event::Line(line),
            Input::Frame(Frame::LineTooLong) => {
                Event::Command(Err(command::CommandError::LineTooLong))
            }
            Input::Frame(Frame::Data(chunk)) => Event::DataChunk(chunk),
            Input::Frame(Frame::DataEnd { size, too_big }) => Event::DataEnd { size, too_big },
            Input::Frame(Frame::DataRejected) => Event::DataRejected,
        };
        let actions = self.machine.handle(event);
        self.run(actions.into(), Response::default())
    }
}

impl Handler<Disconnected> for Session {
    type Result = ();

    fn handle(&mut self, _: Disconnected, ctx: &mut Self::Context) {
        self.body = None;
        ctx.stop();
    }
}

/// How a connection uses TLS.
pub enum TlsUse {
    /// No `[tls]`: STARTTLS gets 502.
    None,
    /// STARTTLS on request.
    OnRequest(Arc<ServerTls>),
    /// A `listen_tls` listener: the handshake comes first, then the greeting.
    AtOnce(Arc<ServerTls>),
}

/// The connection's I/O task: reads frames, asks the session, writes the
/// answers. Applies `connect_limit` (a hard deadline however busy the client
/// is) and the idle timeouts, and performs the TLS handshakes.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    session: Addr<Session>,
    limits: SessionLimits,
    allowed: bool,
    mut shutdown: tokio::sync::watch::Receiver<Stopping>,
    tls: TlsUse,
) {
    // A limit too large to add is as good as none.
    let deadline = Instant::now()
        .checked_add(limits.connect_limit)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86400));
    let mut framed = Framed::new(
        Connection::Plain(stream),
        SmtpCodec::new(limits.bare_lf, limits.max_message_size),
    );
    let greeting = if allowed {
        Input::Connected
    } else {
        Input::Refused
    };
    let (tls, mut pending) = match tls {
        TlsUse::None => (None, Some(greeting)),
        TlsUse::OnRequest(tls) => (Some(tls), Some(greeting)),
        TlsUse::AtOnce(tls) => match start_tls(framed, &tls, limits, deadline).await {
            Ok((encrypted, info)) => {
                framed = encrypted;
                if session.send(Input::TlsStarted(info)).await.is_err() {
                    return;
                }
                (Some(tls), Some(greeting))
            }
            Err(failure) => {
                tracing::info!("{failure}; connection closed");
                session.do_send(Disconnected);
                return;
            }
        },
    };
    // The stop level the session has been told about.
    let mut told = Stopping::No;
    // Why the session ended, for the metrics; a peer that just goes away
    // unless something else is found. Counted when the task ends, even if
    // it is dropped at shutdown.
    let mut ended = SessionGauge::open();
    loop {
        if let Some(input) = pending.take() {
            let Ok(response) = session.send(input).await else {
                // The session actor is gone: say so rather than hang up.
                let _ = write_replies(&mut framed, vec![reply::LOCAL_ERROR], true, limits).await;
                ended.reason = CloseReason::Error.as_str();
                break;
            };
            for tally in &response.tallies {
                match *tally {
                    Tally::Recipient(code) => telemetry::recipient(code),
                    Tally::Message(code) => telemetry::message(code),
                    Tally::Closed(reason) => ended.reason = reason.as_str(),
                }
            }
            if response.enter_data {
                framed.codec_mut().enter_data();
            }
            let more_commands_buffered =
                !framed.codec().in_data() && framed.read_buffer().contains(&b'\n');
            let flush = response.close || response.start_tls || !more_commands_buffered;
            if write_replies(&mut framed, response.replies, flush, limits)
                .await
                .is_err()
            {
                break;
            }
            if response.close {
                // A TLS session ends with close_notify, so the client can
                // tell the end from a cut.
                if let Connection::Tls(_) = framed.get_ref() {
                    let _ =
                        tokio::time::timeout(CLOSE_NOTIFY_WAIT, framed.get_mut().shutdown()).await;
                }
                break;
            }
            if response.start_tls {
                let Some(tls) = tls.as_deref() else {
                    // The machine offers STARTTLS only with [tls]: a bug.
                    tracing::error!("STARTTLS accepted without [tls]");
                    ended.reason = CloseReason::Error.as_str();
                    break;
                };
                match start_tls(framed, tls, limits, deadline).await {
                    Ok((encrypted, info)) => {
                        framed = encrypted;
                        pending = Some(Input::TlsStarted(info));
                        continue;
                    }
                    Err(failure) => {
                        tracing::info!("{failure}; connection closed");
                        ended.reason = CloseReason::Error.as_str();
                        break;
                    }
                }
            }
        }
        let in_data = framed.codec().in_data();
        let idle = if in_data {
            limits.data_timeout
        } else {
            limits.command_timeout
        };
        // Going down: a session between messages is told so now; one inside
        // DATA finishes its message first, unless time is up.
        let level = *shutdown.borrow();
        if level == Stopping::Now && told < Stopping::Now {
            told = Stopping::Now;
            pending = Some(Input::Abort);
            continue;
        }
        if level == Stopping::Gracefully && !in_data && told == Stopping::No {
            told = Stopping::Gracefully;
            pending = Some(Input::Shutdown);
            continue;
        }
        pending = Some(tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Input::ConnectLimit,
            changed = shutdown.changed(), if level < Stopping::Now => match changed {
                Ok(()) => continue,
                // The node's handle is gone: nothing will finish us nicely.
                Err(_) => {
                    told = Stopping::Now;
                    Input::Abort
                }
            },
            next = tokio::time::timeout(idle, framed.next()) => match next {
                Err(_) => Input::IdleTimeout,
                Ok(Some(Ok(frame))) => Input::Frame(frame),
                Ok(None) | Ok(Some(Err(_))) => break,
            },
        });
    }
    drop(ended);
    session.do_send(Disconnected);
}

/// Takes the connection into TLS. Whatever the client sent after its
/// STARTTLS line and before the handshake is dropped with the codec's read
/// buffer, never executed (plaintext injection, CVE-2011-0411); the codec
/// starts afresh inside TLS.
async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(
    framed: Framed<Connection<S>, SmtpCodec>,
    tls: &ServerTls,
    limits: SessionLimits,
    deadline: Instant,
) -> Result<(Framed<Connection<S>, SmtpCodec>, TlsInfo), HandshakeFailure> {
    let parts = framed.into_parts();
    if !parts.read_buf.is_empty() {
        tracing::info!(
            bytes = parts.read_buf.len(),
            "discarded what the client sent after STARTTLS, before the handshake"
        );
    }
    let stream = match parts.io {
        Connection::Plain(stream) => stream,
        Connection::Tls(_) => return Err(HandshakeFailure::AlreadyActive),
    };
    // connect_limit holds during a handshake too.
    let (encrypted, info) = tokio::time::timeout_at(deadline, tls.handshake(stream))
        .await
        .map_err(|_| HandshakeFailure::ConnectLimit)??;
    tracing::debug!(version = %info.version, cipher = %info.cipher, "TLS started");
    let codec = SmtpCodec::new(limits.bare_lf, limits.max_message_size);
    Ok((
        Framed::new(Connection::Tls(Box::new(encrypted)), codec),
        info,
    ))
}

/// How long a TLS session's close_notify may take to send.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// Counts a session open while it lives; closed, with its reason, on drop.
struct SessionGauge {
    reason: &'static str,
}

impl SessionGauge {
    fn open() -> Self {
        telemetry::session_opened();
        SessionGauge { reason: "peer" }
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        telemetry::session_closed(self.reason);
    }
}

async fn write_replies<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, SmtpCodec>,
    replies: Vec<Reply>,
    flush: bool,
    limits: SessionLimits,
) -> std::io::Result<()> {
    let write = async {
        for r in replies {
            framed.feed(r).await?;
        }
        if flush {
            framed.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    // A client that never reads its replies must not hold the session forever.
    tokio::time::timeout(limits.command_timeout, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

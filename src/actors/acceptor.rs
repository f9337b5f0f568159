//! Acceptor (≈ Postfix's master): owns the listening sockets and decides at
//! once about each connection: intake paused, over `max_connections`,
//! `max_connections_per_ip` or `connection_rate_per_ip` get their 421 and
//! are closed right here; the rest get a Session actor and an I/O task on
//! one of the session arbiters, round-robin, so sessions use every core.
//! Refused hosts (deny, finicky, the validate_host hook) still get a
//! session: the refusal dialogue is the session's. A connection from a
//! peer in `[smtp] proxy_protocol_from` (a load balancer) is handed to a
//! session arbiter at once, reads the PROXY header there, and is then
//! decided about as the client the header names.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::access;
use crate::actors::session::{serve_connection, Session, SessionDeps, Stopping, TlsUse};
use crate::config::AccessConfig;
use crate::limits::{ConnectionSlot, ConnectionTracker, Refusal};
use crate::protocol::proxy;
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::ClientInfo;
use crate::telemetry;

/// Stop accepting: the listeners close, open sessions go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

/// A connection accepted, and whether its listener is a `listen_tls` one.
struct Accepted(std::io::Result<(TcpStream, SocketAddr)>, bool);

/// How often the rate limiters forget addresses that have recovered.
const LIMITER_UPKEEP: Duration = Duration::from_secs(60);

pub struct Acceptor {
    /// Each with whether it speaks TLS from the first byte.
    listeners: Vec<(std::net::TcpListener, bool)>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    gate: Arc<Gate>,
}

/// What deciding about a connection needs: shared with the tasks that read
/// a load balancer's PROXY header first.
struct Gate {
    deps: Arc<SessionDeps>,
    access: AccessConfig,
    tracker: Arc<ConnectionTracker>,
    paused: Arc<AtomicBool>,
    /// `[smtp] proxy_protocol_from`.
    proxy_from: Vec<IpNet>,
    /// Connections whose PROXY header is being read: they hold no slot
    /// yet (the slot is the named client's), so they are bounded here, by
    /// `max_connections` as well.
    header_readers: Arc<Semaphore>,
}

/// A connection let in: its slot (held for the session's life), who the
/// client is, and whether it may send mail or only hears the refusal.
struct Admitted {
    slot: ConnectionSlot,
    client: ClientInfo,
    allowed: bool,
}

impl Acceptor {
    pub fn new(
        listeners: Vec<(std::net::TcpListener, bool)>,
        arbiters: Vec<ArbiterHandle>,
        deps: Arc<SessionDeps>,
        access: AccessConfig,
        tracker: Arc<ConnectionTracker>,
        paused: Arc<AtomicBool>,
        proxy_from: Vec<IpNet>,
    ) -> Self {
        Acceptor {
            listeners,
            arbiters,
            next_arbiter: 0,
            gate: Arc::new(Gate {
                deps,
                access,
                header_readers: Arc::new(Semaphore::new(tracker.capacity())),
                tracker,
                paused,
                proxy_from,
            }),
        }
    }
}

impl Actor for Acceptor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for (std_listener, implicit_tls) in self.listeners.drain(..) {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot use listener: {e}");
                    continue;
                }
            };
            let accepts = futures_util::stream::unfold(listener, move |listener| async move {
                let result = listener.accept().await;
                if let Err(e) = &result {
                    // Out of file descriptors and the like: say so and
                    // breathe instead of spinning on the error.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((Accepted(result, implicit_tls), listener))
            });
            ctx.add_stream(accepts);
        }
        ctx.run_interval(LIMITER_UPKEEP, |act, _| {
            act.gate.tracker.cleanup();
            crate::limits::forget_recovered(&act.gate.deps.message_rate);
        });
    }
}

/// Answers a connection turned away at once, without a session. A client
/// of a `listen_tls` listener waits for a TLS handshake and could not read
/// a reply in clear; a handshake only to refuse would cost more than the
/// limit saves, so it is just closed (it retries, as after a 421).
async fn turn_away(mut stream: TcpStream, reply: Reply, implicit_tls: bool) {
    if implicit_tls {
        return;
    }
    let bytes = reply.to_bytes();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&bytes)).await;
    let _ = stream.shutdown().await;
}

impl Gate {
    /// Decides about a connection from `address`, the client (the peer,
    /// or whom its PROXY header names): the reply that turns it away, or
    /// its admission.
    fn admit(&self, address: IpAddr) -> Result<Admitted, Reply> {
        if self.paused.load(Ordering::Relaxed) {
            telemetry::connection("over_capacity");
            return Err(reply::INTAKE_PAUSED);
        }
        let slot = self.tracker.admit(address).map_err(|refusal| {
            tracing::info!(client = %address, ?refusal, "connection refused");
            if refusal == Refusal::Rate {
                telemetry::connection("rate_limited");
                telemetry::rate_limited("connection");
            } else {
                telemetry::connection("over_capacity");
            }
            refusal.reply()
        })?;
        let admission = access::admit(address, &self.access);
        let allowed = admission.allowed && self.deps.hooks.host_allowed(address);
        telemetry::connection(if allowed { "accepted" } else { "denied" });
        tracing::debug!(client = %address, channel = %admission.channel, allowed, "connection");
        Ok(Admitted {
            slot,
            client: ClientInfo {
                address,
                channel: admission.channel,
            },
            allowed,
        })
    }

    /// Runs the session of an admitted connection to its end.
    async fn serve(&self, stream: TcpStream, admitted: Admitted, implicit_tls: bool) {
        // Held for the session's life: the count goes down when it ends.
        let _slot = admitted.slot;
        let deps = Arc::clone(&self.deps);
        let (limits, shutdown) = (deps.limits, deps.shutdown.clone());
        let tls = match deps.tls.clone() {
            None => TlsUse::None,
            Some(tls) if implicit_tls => TlsUse::AtOnce(tls),
            Some(tls) => TlsUse::OnRequest(tls),
        };
        // The I/O task's own lines (TLS) name the client.
        let span = tracing::info_span!("smtp", client = %admitted.client.address);
        let session = Session::new(deps, admitted.client).start();
        serve_connection(stream, session, limits, admitted.allowed, shutdown, tls)
            .instrument(span)
            .await;
    }

    /// A connection from a load balancer: its PROXY header first, then the
    /// same decision as for any other, about the client it names.
    async fn serve_proxied(
        &self,
        mut stream: TcpStream,
        peer: IpAddr,
        reading: OwnedSemaphorePermit,
        implicit_tls: bool,
    ) {
        let wait = self.deps.limits.command_timeout.min(PROXY_HEADER_WAIT);
        let header = read_proxy_header(&mut stream, wait).await;
        drop(reading);
        let address = match header {
            Ok(source) => {
                telemetry::proxy_header("ok");
                source.map_or(peer, access::canonical)
            }
            Err(failure) => {
                telemetry::proxy_header(failure.metric());
                tracing::info!(peer = %peer, "{failure}; connection closed without a greeting");
                return;
            }
        };
        if *self.deps.shutdown.borrow() != Stopping::No {
            return turn_away(stream, reply::SHUTTING_DOWN, implicit_tls).await;
        }
        tracing::debug!(client = %address, via = %peer, "PROXY header");
        match self.admit(address) {
            Ok(admitted) => self.serve(stream, admitted, implicit_tls).await,
            Err(reply) => turn_away(stream, reply, implicit_tls).await,
        }
    }
}

/// What a session arbiter's task is handed with a connection.
enum Handover {
    /// Decided about already: serve it.
    Admitted(Admitted),
    /// From a load balancer: read its PROXY header first (the permit
    /// counts it among the headers being read).
    ReadProxyHeader(OwnedSemaphorePermit),
}

/// At most this long for a PROXY header (or `command_timeout`, if shorter).
pub(crate) const PROXY_HEADER_WAIT: Duration = Duration::from_secs(10);

/// Why a load balancer's connection had no usable PROXY header.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyFailure {
    #[error("no PROXY header: {0}")]
    Missing(String),
    #[error("bad PROXY header: {0}")]
    Invalid(String),
}

impl ProxyFailure {
    fn metric(&self) -> &'static str {
        match self {
            ProxyFailure::Missing(_) => "missing",
            ProxyFailure::Invalid(_) => "invalid",
        }
    }
}

/// Reads a PROXY header, never a byte past it (what follows is the
/// client's SMTP): the client's address, or `None` to keep the peer's.
pub(crate) async fn read_proxy_header(
    stream: &mut (impl AsyncRead + Unpin),
    wait: Duration,
) -> Result<Option<IpAddr>, ProxyFailure> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut header = Vec::with_capacity(proxy::SHORTEST);
    let mut need = proxy::SHORTEST;
    loop {
        let start = header.len();
        header.resize(start + need, 0);
        match tokio::time::timeout_at(deadline, stream.read_exact(&mut header[start..])).await {
            Err(_) => {
                return Err(ProxyFailure::Missing(format!(
                    "none whole within {}",
                    humantime::format_duration(wait)
                )))
            }
            Ok(Err(e)) => return Err(ProxyFailure::Missing(format!("the connection ended: {e}"))),
            Ok(Ok(_)) => {}
        }
        match proxy::parse(&header) {
            proxy::Header::Done { source, .. } => return Ok(source),
            proxy::Header::Need(more) => need = more,
            proxy::Header::Invalid(why) => return Err(ProxyFailure::Invalid(why)),
        }
    }
}

impl StreamHandler<Accepted> for Acceptor {
    fn handle(&mut self, accepted: Accepted, _: &mut Self::Context) {
        let Accepted(Ok((stream, peer)), implicit_tls) = accepted else {
            return;
        };
        let peer_address = access::canonical(peer.ip());
        let proxied = self
            .gate
            .proxy_from
            .iter()
            .any(|net| net.contains(&peer_address));
        let handover = if proxied {
            let Ok(reading) = Arc::clone(&self.gate.header_readers).try_acquire_owned() else {
                telemetry::connection("over_capacity");
                actix::spawn(turn_away(stream, reply::TOO_MANY_CONNECTIONS, implicit_tls));
                return;
            };
            Handover::ReadProxyHeader(reading)
        } else {
            match self.gate.admit(peer_address) {
                Ok(admitted) => Handover::Admitted(admitted),
                Err(reply) => {
                    actix::spawn(turn_away(stream, reply, implicit_tls));
                    return;
                }
            }
        };
        // The socket is registered with this thread's reactor; hand it over
        // as a plain socket so the session's thread can register it there.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client = %peer, "cannot hand over connection: {e}");
                return;
            }
        };
        let Some(arbiter) = self
            .arbiters
            .get(self.next_arbiter % self.arbiters.len().max(1))
        else {
            return;
        };
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        let gate = Arc::clone(&self.gate);
        arbiter.spawn(async move {
            let stream = match TcpStream::from_std(std_stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(client = %peer, "cannot register connection: {e}");
                    return;
                }
            };
            // Replies are batched and flushed by the session itself. Left
            // to Nagle, a TLS write that follows another unacknowledged one
            // (the session tickets after a handshake, then the next reply)
            // waits for the client's delayed ACK: 40 ms per message.
            let _ = stream.set_nodelay(true);
            match handover {
                Handover::Admitted(admitted) => gate.serve(stream, admitted, implicit_tls).await,
                Handover::ReadProxyHeader(reading) => {
                    gate.serve_proxied(stream, peer_address, reading, implicit_tls)
                        .await
                }
            }
        });
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<StopAccepting> for Acceptor {
    type Result = ();

    fn handle(&mut self, _: StopAccepting, ctx: &mut Self::Context) {
        // Dropping the acceptor's streams closes the listening sockets.
        ctx.stop();
    }
}

//! Acceptor (≈ Postfix's master): owns the listening sockets and decides at
//! once about each connection: intake paused, over `max_connections`,
//! `max_connections_per_ip` or `connection_rate_per_ip` get their 421 and
//! are closed right here; the rest get a Session actor and an I/O task on
//! one of the session arbiters, round-robin, so sessions use every core.
//! Refused hosts (deny, finicky, the validate_host hook) still get a
//! session: the refusal dialogue is the session's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::access;
use crate::actors::session::{serve_connection, Session, SessionDeps};
use crate::config::AccessConfig;
use crate::limits::{ConnectionTracker, Refusal};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::ClientInfo;
use crate::telemetry;

/// Stop accepting: the listeners close, open sessions go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

struct Accepted(std::io::Result<(TcpStream, SocketAddr)>);

/// How often the rate limiters forget addresses that have recovered.
const LIMITER_UPKEEP: Duration = Duration::from_secs(60);

pub struct Acceptor {
    listeners: Vec<std::net::TcpListener>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    deps: Arc<SessionDeps>,
    access: AccessConfig,
    tracker: Arc<ConnectionTracker>,
    paused: Arc<AtomicBool>,
}

impl Acceptor {
    pub fn new(
        listeners: Vec<std::net::TcpListener>,
        arbiters: Vec<ArbiterHandle>,
        deps: Arc<SessionDeps>,
        access: AccessConfig,
        tracker: Arc<ConnectionTracker>,
        paused: Arc<AtomicBool>,
    ) -> Self {
        Acceptor {
            listeners,
            arbiters,
            next_arbiter: 0,
            deps,
            access,
            tracker,
            paused,
        }
    }
}

impl Actor for Acceptor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for std_listener in self.listeners.drain(..) {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot use listener: {e}");
                    continue;
                }
            };
            let accepts = futures_util::stream::unfold(listener, |listener| async move {
                let result = listener.accept().await;
                if let Err(e) = &result {
                    // Out of file descriptors and the like: say so and
                    // breathe instead of spinning on the error.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((Accepted(result), listener))
            });
            ctx.add_stream(accepts);
        }
        ctx.run_interval(LIMITER_UPKEEP, |act, _| {
            act.tracker.cleanup();
            crate::limits::forget_recovered(&act.deps.message_rate);
        });
    }
}

/// Answers a connection turned away at once, without a session.
fn turn_away(mut stream: TcpStream, reply: Reply) {
    actix::spawn(async move {
        let bytes = reply.to_bytes();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&bytes)).await;
        let _ = stream.shutdown().await;
    });
}

impl StreamHandler<Accepted> for Acceptor {
    fn handle(&mut self, accepted: Accepted, _: &mut Self::Context) {
        let Ok((stream, peer)) = accepted.0 else {
            return;
        };
        let address = access::canonical(peer.ip());
        if self.paused.load(Ordering::Relaxed) {
            telemetry::connection("over_capacity");
            return turn_away(stream, reply::INTAKE_PAUSED);
        }
        let slot = match self.tracker.admit(address) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::info!(client = %address, ?refusal, "connection refused");
                if refusal == Refusal::Rate {
                    telemetry::connection("rate_limited");
                    telemetry::rate_limited("connection");
                } else {
                    telemetry::connection("over_capacity");
                }
                return turn_away(stream, refusal.reply());
            }
        };
        let admission = access::admit(address, &self.access);
        let allowed = admission.allowed && self.deps.hooks.host_allowed(address);
        telemetry::connection(if allowed { "accepted" } else { "denied" });
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
        let client = ClientInfo {
            address,
            channel: admission.channel,
        };
        let deps = Arc::clone(&self.deps);
        let limits = deps.limits;
        let shutdown = deps.shutdown.clone();
        tracing::debug!(client = %peer, channel = %client.channel, allowed, "connection");
        arbiter.spawn(async move {
            // Held for the session's life: the count goes down when it ends.
            let _slot = slot;
            let stream = match TcpStream::from_std(std_stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(client = %peer, "cannot register connection: {e}");
                    return;
                }
            };
            let session = Session::new(deps, client).start();
            serve_connection(stream, session, limits, allowed, shutdown).await;
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

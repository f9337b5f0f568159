//! Acceptor (≈ Postfix's master): owns the listening sockets, accepts
//! connections and starts each one's Session actor and I/O task on one of
//! the session arbiters, round-robin, so sessions use every core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::net::{TcpListener, TcpStream};

use crate::actors::session::{serve_connection, Session, SessionDeps};
use crate::protocol::session::ClientInfo;

/// Stop accepting: the listeners close, open sessions go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

struct Accepted(std::io::Result<(TcpStream, SocketAddr)>);

pub struct Acceptor {
    listeners: Vec<std::net::TcpListener>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    deps: Arc<SessionDeps>,
    /// Names the client's channel from its address.
    channel_of: Arc<dyn Fn(std::net::IpAddr) -> String + Send + Sync>,
}

impl Acceptor {
    pub fn new(
        listeners: Vec<std::net::TcpListener>,
        arbiters: Vec<ArbiterHandle>,
        deps: Arc<SessionDeps>,
        channel_of: Arc<dyn Fn(std::net::IpAddr) -> String + Send + Sync>,
    ) -> Self {
        Acceptor {
            listeners,
            arbiters,
            next_arbiter: 0,
            deps,
            channel_of,
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
    }
}

impl StreamHandler<Accepted> for Acceptor {
    fn handle(&mut self, accepted: Accepted, _: &mut Self::Context) {
        let Ok((stream, peer)) = accepted.0 else {
            return;
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
        let address = crate::access::canonical(peer.ip());
        let client = ClientInfo {
            address,
            channel: (self.channel_of)(address),
        };
        let deps = Arc::clone(&self.deps);
        let limits = deps.limits;
        tracing::debug!(client = %peer, channel = %client.channel, "connection");
        arbiter.spawn(async move {
            let stream = match TcpStream::from_std(std_stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(client = %peer, "cannot register connection: {e}");
                    return;
                }
            };
            let session = Session::new(deps, client).start();
            serve_connection(stream, session, limits).await;
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

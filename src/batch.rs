//! The runs that end: `mailnode runq` (one pass over what is due, for
//! installations without a daemon) and `mailnode inetd` (one SMTP session on
//! stdin/stdout, for inetd, xinetd or systemd `Accept=yes`). Both use the
//! same actors as `serve`, on the current thread.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use tracing::Instrument;

use crate::actors::acceptor::{read_proxy_header, PROXY_HEADER_WAIT};
use crate::actors::collector::{Collector, TakeCollected};
use crate::actors::delivery_worker::DeliverySetup;
use crate::actors::queue_runner::QueueRunner;
use crate::actors::session::{serve_connection, Session, TlsUse};
use crate::actors::Shared;
use crate::config::Config;
use crate::delivery::http::HttpShared;
use crate::delivery::program::RunAs;
use crate::delivery::spawn;
use crate::hooks::Hooks;
use crate::protocol::session::ClientInfo;
use crate::queue::scheduler::Mode;
use crate::queue::InFlight;
use crate::spool::{Envelope, QueueLock, Spool, SpoolError};
use crate::{access, aliases, StartError};

/// How long an `inetd` session waits for another one's delivery to end.
const INETD_LOCK_WAIT: Duration = Duration::from_secs(30);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Messages that were due and attempted.
    pub attempted: usize,
}

/// `mailnode runq`: takes the queue lock (refused at once if `serve` or
/// another `runq` holds it), attempts every due message once, records
/// every result, and returns.
pub fn run_queue_once(config: Config) -> Result<PassSummary, StartError> {
    let lock = QueueLock::acquire(&config.spool.path, "runq", Duration::ZERO)?;
    let run_as = RunAs::for_delivery_user(&config.delivery.user)?;
    let spawner = spawn::choose(config.delivery.spawner)?;
    let http = Arc::new(HttpShared::new(&config.http)?);
    let (spool, writer) = Spool::open_with(&config.spool.path, config.spool.reuse_files)?;
    let report = spool.scan()?;
    report.log_damaged();
    // Retries expand aliases with the file as it is now; a file that does
    // not load does not keep queued mail from its programs.
    let table = match aliases::load(&config.aliases.path) {
        Ok(loaded) => Some(Shared::new(Arc::new(loaded.table))),
        Err(e) => {
            tracing::error!(
                "aliases not loaded, retries keep the targets their messages were accepted with: {e}"
            );
            None
        }
    };
    let now = SystemTime::now();
    let due: Vec<Envelope> = report
        .envelopes
        .into_iter()
        .filter(|e| !e.held && e.next_attempt <= now)
        .collect();
    let summary = PassSummary {
        attempted: due.len(),
    };
    let system = System::new();
    let setup =
        crate::node::delivery_setup(&config, &spool, run_as, spawner, http, &Hooks::default());
    system.block_on(one_pass(&config, &setup, due, table));
    // Dropping the system drops every actor and so every spool handle: the
    // writer then finishes its last batch.
    drop(system);
    // Every spool handle, the workers' setup's too, before the writer
    // is joined: it ends once the last one is gone.
    drop(setup);
    drop(spool);
    writer.join();
    drop(lock);
    Ok(summary)
}

async fn one_pass(
    config: &Config,
    setup: &DeliverySetup,
    due: Vec<Envelope>,
    table: Option<Shared<Arc<aliases::AliasTable>>>,
) {
    if due.is_empty() {
        return;
    }
    let workers = plain_workers(setup);
    let (done, finished) = tokio::sync::oneshot::channel();
    let in_flight = InFlight::default();
    let mut scheduler = crate::node::scheduler(config, Mode::OnePass, in_flight.clone(), table);
    scheduler.picked_up(due, std::time::SystemTime::now());
    let _runner = QueueRunner::new(
        scheduler,
        setup.spool.clone(),
        workers,
        in_flight,
        Some(done),
    )
    .start();
    let _ = finished.await;
}

/// `mailnode inetd`: one SMTP session on stdin/stdout into the spool. What
/// it accepted it then delivers itself, unless a queue runner (`serve`,
/// `runq`) holds the spool: then it is left to that one. Returns how many
/// messages the session accepted.
pub fn serve_stdio(config: Config) -> Result<usize, StartError> {
    let loaded = aliases::load(&config.aliases.path)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let run_as = RunAs::for_delivery_user(&config.delivery.user)?;
    let spawner = spawn::choose(config.delivery.spawner)?;
    let tls = match config.tls.clone() {
        Some(settings) => Some(Arc::new(crate::tls::ServerTls::new(settings)?)),
        None => None,
    };
    let auth = crate::auth::Authenticator::for_config(&config)?;
    let http = Arc::new(HttpShared::new(&config.http)?);
    let (spool, writer) = Spool::open_with(&config.spool.path, config.spool.reuse_files)?;
    let setup =
        crate::node::delivery_setup(&config, &spool, run_as, spawner, http, &Hooks::default());
    let peer = stdin_peer().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let system = System::new();
    let (accepted, lock) = system.block_on(async {
        let mut stdin = tokio::io::stdin();
        // A load balancer's connection opens with its PROXY header, as
        // over TCP.
        let address = if config
            .smtp
            .proxy_protocol_from
            .iter()
            .any(|net| net.contains(&peer))
        {
            let wait = config.smtp.command_timeout.min(PROXY_HEADER_WAIT);
            match read_proxy_header(&mut stdin, wait).await {
                Ok(source) => source.map_or(peer, access::canonical),
                Err(failure) => {
                    tracing::info!(peer = %peer, "{failure}; connection closed without a greeting");
                    return (0, None);
                }
            }
        } else {
            peer
        };
        let client = ClientInfo {
            address,
            channel: access::channel_for(address, &config.access.channel).to_string(),
        };
        let table = Shared::new(Arc::new(loaded.table));
        let resolver = crate::node::resolver_child(&config, table.clone(), Vec::new()).addr;
        let collector = Collector::default().start();
        let workers = plain_workers(&setup);
        // Nobody shuts a one-session process down from outside.
        let (_keep_running, shutdown) =
            tokio::sync::watch::channel(crate::actors::session::Stopping::No);
        let deps = Arc::new(crate::node::session_deps(
            &config,
            spool.clone(),
            resolver,
            {
                let collector = collector.clone();
                Arc::new(move || collector.clone().recipient())
            },
            workers,
            crate::node::SessionControls {
                hooks: crate::hooks::Hooks::default(),
                shutdown,
                paused: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                tls: tls.clone(),
                auth: auth.clone(),
            },
        ));
        let session = Session::new(Arc::clone(&deps), client).start();
        let stdio = tokio::io::join(stdin, tokio::io::stdout());
        // Refused hosts get the refusal dialogue here as over TCP.
        let allowed = crate::access::admit(address, &config.access).allowed;
        // STARTTLS works here as over TCP: TLS runs over any byte stream.
        let tls = match tls {
            Some(tls) => TlsUse::OnRequest(tls),
            None => TlsUse::None,
        };
        let span = tracing::info_span!("smtp", client = %address);
        serve_connection(
            stdio,
            session,
            deps.limits,
            allowed,
            deps.shutdown.clone(),
            tls,
        )
        .instrument(span)
        .await;
        let accepted = collector.send(TakeCollected).await.unwrap_or_default();
        let count = accepted.len();
        if accepted.is_empty() {
            return (0, None);
        }
        // Another inetd session delivering is soon done: wait for it a
        // little. A daemon or runq will deliver these themselves.
        let root = &config.spool.path;
        let lock = match QueueLock::acquire(root, "inetd", Duration::ZERO) {
            Err(SpoolError::Locked { holder, .. }) if holder.starts_with("inetd") => {
                QueueLock::acquire(root, "inetd", INETD_LOCK_WAIT)
            }
            other => other,
        };
        let Ok(lock) = lock else {
            tracing::info!(
                messages = count,
                holder = %QueueLock::holder(root),
                "another queue runner holds the spool; it will deliver"
            );
            return (count, None);
        };
        // While the session ran without the lock, a queue runner may have
        // worked these messages: only what is still queued and due now.
        let now = SystemTime::now();
        let due: Vec<Envelope> = accepted
            .iter()
            .filter_map(|e| spool.read_envelope(&e.id).ok())
            .filter(|e| !e.held && e.next_attempt <= now)
            .collect();
        one_pass(&config, &setup, due, Some(table)).await;
        (count, Some(lock))
    });
    drop(system);
    // Every spool handle, the workers' setup's too, before the writer
    // is joined: it ends once the last one is gone.
    drop(setup);
    drop(spool);
    writer.join();
    // Only now is every result on disk for the next queue runner.
    drop(lock);
    Ok(accepted)
}

/// Workers on this thread; nothing restarts them in a run that ends.
fn plain_workers(
    setup: &DeliverySetup,
) -> Vec<Shared<Addr<crate::actors::delivery_worker::DeliveryWorker>>> {
    crate::node::worker_children(setup, &[Arbiter::current()])
        .into_iter()
        .map(|child| child.addr)
        .collect()
}

/// The client's address when stdin is a socket (inetd, xinetd, systemd).
fn stdin_peer() -> Option<IpAddr> {
    use nix::sys::socket::{getpeername, SockaddrLike, SockaddrStorage};
    let peer: SockaddrStorage = getpeername(0).ok()?;
    let _ = peer.family()?;
    if let Some(v4) = peer.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    peer.as_sockaddr_in6()
        .map(|v6| access::canonical(IpAddr::V6(v6.ip())))
}

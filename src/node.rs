//! The node: [`Node`] builds the actor tree for a configuration (the
//! listeners, the spool, the supervisor and its children) and hands back a
//! [`NodeHandle`] that stops and shuts it down; the helpers here also build
//! the pieces `runq` and `inetd` use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use actix::prelude::*;

use crate::delivery::program::RunAsError;
use crate::{actors, aliases, config, delivery, limits, queue, spool, telemetry};

use crate::actors::acceptor::Acceptor;
use crate::actors::alias_resolver::AliasResolver;
use crate::actors::control_server::{ControlDeps, ControlServer};
use crate::actors::delivery_worker::{DeliverySetup, DeliveryWorker};
use crate::actors::metrics_server::MetricsServer;
use crate::actors::queue_runner::QueueRunner;
use crate::actors::session::{SessionDeps, SessionLimits, Stopping};
use crate::actors::supervisor::{
    Child, Children, DrainDeliveries, QueueStatus, ReloadAliases, Restarts, StopIntake,
    StopSupervising, Supervisor,
};
use crate::actors::Shared;
use crate::config::{BareLf, Config};
use crate::delivery::http::HttpShared;
use crate::delivery::program::RunAs;
use crate::delivery::relay::RelayTarget;
use crate::delivery::spawn::{ProgramSpawner, SpawnerError};
use crate::hooks::Hooks;
use crate::limits::ConnectionTracker;
use crate::protocol::data::BareLineEnding;
use crate::protocol::session::SessionConfig;
use crate::queue::QueueCounts;
use crate::queue::QueuePolicy;
use crate::spool::{QueueLock, Spool, SpoolError, SpoolWriter};
use crate::tls::{ServerTls, TlsError};
use std::sync::atomic::{AtomicBool, Ordering};

/// How long the relay may take to answer, per step (RFC 5321 4.5.3.2
/// suggests minutes; five is the usual client choice).
const RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How long `serve` waits for another queue runner to release the spool.
const SERVE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Aliases(#[from] aliases::LoadError),
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    DeliveryUser(#[from] RunAsError),
    #[error("{0}")]
    Spawner(#[from] SpawnerError),
    #[error("cannot start the actor system: {0}")]
    Runtime(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("{0}")]
    Http(#[from] crate::delivery::http::HttpSetupError),
    #[error("cannot create control socket {}: {source}", path.display())]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A non-blocking listening socket on `addr`, for the actors' runtime.
fn listen_on(addr: &SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let bind = || {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    bind().map_err(|source| StartError::Bind {
        addr: *addr,
        source,
    })
}

/// Starts nodes.
pub struct Node;

impl Node {
    /// Loads the aliases, binds the listeners, opens the spool (picking up
    /// what an earlier run left), starts the actors, and returns once the
    /// node accepts connections.
    pub fn start(config: Config) -> Result<NodeHandle, StartError> {
        Self::start_with(config, Hooks::default())
    }

    /// [`Node::start`] with the embedding program's checks.
    pub fn start_with(config: Config, hooks: Hooks) -> Result<NodeHandle, StartError> {
        Self::start_on(config, hooks, Vec::new())
    }

    /// [`Node::start_with`] on listening sockets already open (systemd
    /// socket activation); empty: bind `[smtp] listen`.
    pub fn start_on(
        config: Config,
        hooks: Hooks,
        inherited: Vec<std::net::TcpListener>,
    ) -> Result<NodeHandle, StartError> {
        let handler_names = hooks.handlers().names();
        let loaded = aliases::load_with_handlers(&config.aliases.path, &handler_names)?;
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        let run_as = RunAs::for_delivery_user(&config.delivery.user)?;
        let spawner = delivery::spawn::choose(config.delivery.spawner)?;
        let http = Arc::new(HttpShared::new(&config.http)?);
        telemetry::install();
        // Before any port opens: a node whose certificate cannot be used
        // must say so and not start, rather than serve mail in clear.
        let tls = match config.tls.clone() {
            Some(settings) => Some(Arc::new(ServerTls::new(settings)?)),
            // `check` refuses this in a file; an embedder's Config too.
            None if !config.smtp.listen_tls.is_empty() => {
                return Err(StartError::Tls(TlsError::NotConfigured))
            }
            None => None,
        };
        let auth = crate::auth::Authenticator::for_config(&config)?;
        // One queue runner per spool; a second `serve` waits a little (a
        // restart racing its predecessor's exit), then says so. Taken before
        // any port is opened: a node that may not start must not accept
        // connections it would only reset.
        let lock = QueueLock::acquire(&config.spool.path, "serve", SERVE_LOCK_WAIT)?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(listen_on(&addr)?),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let control_path = config.control.socket.clone();
        // Each listener with whether it speaks TLS from the first byte.
        let mut listeners: Vec<(std::net::TcpListener, bool)> = Vec::new();
        let (mut addrs, mut tls_addrs) = (Vec::new(), Vec::new());
        for listener in inherited {
            let addr = listener
                .set_nonblocking(true)
                .and_then(|()| listener.local_addr())
                .map_err(|source| StartError::Bind {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })?;
            // systemd's sockets are told apart by the addresses configured.
            let implicit_tls = tls.is_some() && config.smtp.listen_tls.contains(&addr);
            if implicit_tls {
                &mut tls_addrs
            } else {
                &mut addrs
            }
            .push(addr);
            listeners.push((listener, implicit_tls));
        }
        if !listeners.is_empty() && !config.smtp.listen_tls.is_empty() && tls_addrs.is_empty() {
            tracing::warn!(
                listen_tls = ?config.smtp.listen_tls,
                "no socket systemd passed has a listen_tls address: every one offers STARTTLS, none speaks TLS at once; list the sockets' own addresses (ListenStream=465 is [::]:465)"
            );
        }
        let configured: Vec<(SocketAddr, bool)> = if listeners.is_empty() {
            let plain = config.smtp.listen.iter().map(|a| (*a, false));
            let implicit = config.smtp.listen_tls.iter().map(|a| (*a, true));
            plain.chain(implicit.filter(|_| tls.is_some())).collect()
        } else {
            Vec::new()
        };
        for (addr, implicit_tls) in configured {
            let listener = listen_on(&addr)?;
            let bound = listener
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?;
            if implicit_tls {
                &mut tls_addrs
            } else {
                &mut addrs
            }
            .push(bound);
            listeners.push((listener, implicit_tls));
        }
        let (spool, writer) = Spool::open_with(&config.spool.path, config.spool.reuse_files)?;
        // After the queue lock: a second `serve` must not take over the
        // first one's socket.
        let control_listener = actors::control_server::bind(&control_path, config.control.mode)
            .map_err(|source| StartError::Control {
                path: control_path.clone(),
                source,
            })?;
        #[cfg(test)]
        let test_spool = Some(spool.clone());
        let report = spool.scan()?;
        report.log_damaged();
        if !report.envelopes.is_empty() || report.orphans_removed > 0 {
            tracing::info!(
                queued = report.envelopes.len(),
                orphans_removed = report.orphans_removed,
                "picked up the queue an earlier run left"
            );
        }

        let delivery = delivery_setup(&config, &spool, run_as, spawner, Arc::clone(&http), &hooks);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let table = Arc::new(loaded.table);
        let tracker = ConnectionTracker::new(
            config.smtp.max_connections,
            config.smtp.max_connections_per_ip,
            &config.limits.connection_rate_per_ip,
            config.limits.exempt.clone(),
        );
        let paused = Arc::new(AtomicBool::new(false));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(Stopping::No);
        let (failure_tx, failure_rx) = tokio::sync::watch::channel(None);
        let grace = Grace {
            sessions: config.smtp.data_timeout.min(MAX_GRACE),
            deliveries: config.delivery.timeout.min(MAX_GRACE),
        };
        let intake = Intake {
            hooks,
            tracker: Arc::clone(&tracker),
            paused: Arc::clone(&paused),
            shutdown: shutdown_rx,
            failure: failure_tx,
            tls: tls.clone(),
            auth,
        };
        let thread = std::thread::Builder::new()
            .name("mailnode-actors".into())
            .spawn(move || {
                let system = System::new();
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();
                let handles: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
                let supervisor = system.block_on(async move {
                    build_tree(
                        config,
                        spool,
                        table,
                        handler_names,
                        delivery,
                        report.envelopes,
                        listeners,
                        handles,
                        intake,
                        metrics_listener,
                        control_listener,
                    )
                });
                let _ = ready_tx.send((System::current(), supervisor));
                let _ = system.run();
                for arbiter in arbiters {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        let (system, supervisor) = ready_rx
            .recv()
            .map_err(|_| StartError::Runtime("actor system failed to start".into()))?;
        Ok(NodeHandle {
            addrs,
            tls_addrs,
            tls,
            http,
            metrics_addr,
            control_path,
            supervisor,
            system,
            thread: Some(thread),
            writer: Some(writer),
            lock: Some(lock),
            tracker,
            paused,
            shutdown: shutdown_tx,
            grace,
            failure: failure_rx,
            #[cfg(test)]
            spool: test_spool,
        })
    }
}

/// The relay, when `[relay] host` names one.
pub(crate) fn relay_target(config: &Config) -> Option<RelayTarget> {
    config.relay.host.as_ref().map(|r| RelayTarget {
        host: r.host.clone(),
        port: r.port,
        helo: config
            .relay
            .helo
            .clone()
            .unwrap_or_else(|| config.hostname.clone()),
        timeout: RELAY_TIMEOUT,
    })
}

pub(crate) fn queue_policy(config: &Config) -> QueuePolicy {
    QueuePolicy {
        retry_min: config.queue.retry_min,
        retry_max: config.queue.retry_max,
        max_age: config.queue.max_age,
    }
}

/// An empty queue scheduler for this configuration; with `table`, the aliases in force, retries
/// expand their recipients again.
pub(crate) fn scheduler(
    config: &Config,
    mode: queue::scheduler::Mode,
    in_flight: queue::InFlight,
    table: Option<Shared<Arc<aliases::AliasTable>>>,
) -> queue::scheduler::Scheduler {
    let scheduler = queue::scheduler::Scheduler::new(
        queue_policy(config),
        config.relay.host.is_some(),
        config.delivery.concurrency,
        mode,
        in_flight,
    )
    .with_max_per_host(config.http.max_per_host);
    match table {
        Some(table) => scheduler.with_aliases(queue::Aliases {
            table,
            hostname: config.hostname.clone(),
            can_forward: config.relay.host.is_some(),
        }),
        None => scheduler,
    }
}

/// What every delivery worker of a node is made with.
pub(crate) fn delivery_setup(
    config: &Config,
    spool: &Spool,
    run_as: Option<RunAs>,
    spawner: ProgramSpawner,
    http: Arc<HttpShared>,
    hooks: &Hooks,
) -> DeliverySetup {
    DeliverySetup {
        spool: spool.clone(),
        run_as,
        spawner,
        timeout: config.delivery.timeout,
        relay: relay_target(config),
        hostname: config.hostname.clone(),
        permits: Arc::new(tokio::sync::Semaphore::new(
            config.delivery.concurrency.max(1),
        )),
        http,
        handlers: hooks.handlers().clone(),
    }
}

/// One DeliveryWorker on each arbiter, each with the factory that makes
/// it again there.
pub(crate) fn worker_children(
    setup: &DeliverySetup,
    arbiters: &[ArbiterHandle],
) -> Vec<Child<DeliveryWorker>> {
    arbiters
        .iter()
        .map(|arbiter| {
            let arbiter = arbiter.clone();
            let setup = setup.clone();
            Child::start(
                "delivery_worker",
                Box::new(move || {
                    let setup = setup.clone();
                    DeliveryWorker::start_in_arbiter(&arbiter, move |_| DeliveryWorker::new(setup))
                }),
            )
        })
        .collect()
}

pub(crate) fn resolver_child(
    config: &Config,
    table: Shared<Arc<aliases::AliasTable>>,
    handler_names: Vec<String>,
) -> Child<AliasResolver> {
    let path = config.aliases.path.clone();
    let hostname = config.hostname.clone();
    let can_forward = config.relay.host.is_some();
    Child::start(
        "alias_resolver",
        Box::new(move || {
            AliasResolver::new(
                path.clone(),
                table.clone(),
                handler_names.clone(),
                hostname.clone(),
                can_forward,
            )
            .start()
        }),
    )
}

/// What the embedding program and the node's handle steer sessions with.
pub(crate) struct SessionControls {
    pub hooks: Hooks,
    pub shutdown: tokio::sync::watch::Receiver<Stopping>,
    pub paused: Arc<AtomicBool>,
    /// The certificate in force (reloaded through the node's handle).
    pub tls: Option<Arc<ServerTls>>,
    /// `[auth] enabled`: the checker every session shares.
    pub auth: Option<Arc<crate::auth::Authenticator>>,
}

/// What sessions share, from the configuration.
pub(crate) fn session_deps(
    config: &Config,
    spool: Spool,
    resolver: Shared<Addr<AliasResolver>>,
    queue: Arc<dyn Fn() -> Recipient<actors::queue_runner::Enqueued> + Send + Sync>,
    workers: Vec<Shared<Addr<DeliveryWorker>>>,
    controls: SessionControls,
) -> SessionDeps {
    let SessionControls {
        hooks,
        shutdown,
        paused,
        tls,
        auth,
    } = controls;
    let smtp = &config.smtp;
    SessionDeps {
        config: Arc::new(SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: smtp.max_message_size,
            max_recipients: smtp.max_recipients,
            local_domains: smtp.local_domains.clone(),
            starttls: tls.is_some(),
            tls_required: tls.is_some() && config.tls.as_ref().is_some_and(|t| t.require),
            authserv_id: auth.as_ref().map(|a| a.authserv_id().to_string()),
        }),
        limits: SessionLimits {
            connect_limit: smtp.connect_limit,
            command_timeout: smtp.command_timeout,
            data_timeout: smtp.data_timeout,
            bare_lf: match smtp.bare_lf {
                BareLf::Reject => BareLineEnding::Reject,
                BareLf::Normalize => BareLineEnding::Normalize,
            },
            max_message_size: smtp.max_message_size,
        },
        spool,
        resolver,
        queue,
        inline: (config.delivery.mode == config::DeliveryMode::Inline).then_some(workers),
        message_rate: Arc::new(limits::keyed(&config.limits.message_rate_per_ip)),
        rate_exempt: config.limits.exempt.clone().into(),
        hooks,
        shutdown,
        paused,
        tls,
        auth,
    }
}

/// What the Acceptor and the sessions share with the [`NodeHandle`].
struct Intake {
    tls: Option<Arc<ServerTls>>,
    auth: Option<Arc<crate::auth::Authenticator>>,
    hooks: Hooks,
    tracker: Arc<ConnectionTracker>,
    paused: Arc<AtomicBool>,
    shutdown: tokio::sync::watch::Receiver<Stopping>,
    failure: tokio::sync::watch::Sender<Option<String>>,
}

/// How long a graceful shutdown waits.
#[derive(Debug, Clone, Copy)]
struct Grace {
    /// For sessions to finish the message they are receiving.
    sessions: std::time::Duration,
    /// For running programs to finish.
    deliveries: std::time::Duration,
}

/// Before the graceful deadline, this long is kept to tell sessions still
/// inside DATA that time is up.
const ABORT_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// No graceful wait is longer than this; what is cut short is retried.
const MAX_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

#[allow(clippy::too_many_arguments)]
fn build_tree(
    config: Config,
    spool: Spool,
    table: Arc<aliases::AliasTable>,
    handler_names: Vec<String>,
    delivery: DeliverySetup,
    recovered: Vec<spool::Envelope>,
    listeners: Vec<(std::net::TcpListener, bool)>,
    arbiters: Vec<ArbiterHandle>,
    intake: Intake,
    metrics_listener: Option<std::net::TcpListener>,
    control_listener: std::os::unix::net::UnixListener,
) -> Addr<Supervisor> {
    // One table for both: a reload reaches the retries of queued mail too.
    let table = Shared::new(table);
    let resolver = resolver_child(&config, table.clone(), handler_names);
    let workers = worker_children(&delivery, &arbiters);
    let worker_addrs: Vec<_> = workers.iter().map(|w| w.addr.clone()).collect();
    let queue_runner = {
        let spool = spool.clone();
        let workers = worker_addrs.clone();
        let config = config.clone();
        // The first runner gets what start-up scanned; a restarted one
        // reads the spool again: the spool, not the dead actor, is the truth.
        // (Without start-up's clean-up: the writer is live.)
        let recovered = std::cell::RefCell::new(Some(recovered));
        let in_flight = queue::InFlight::default();
        Child::start(
            "queue_runner",
            Box::new(move || {
                let envelopes = recovered.borrow_mut().take().unwrap_or_else(|| {
                    spool.scan_new(|_| false).unwrap_or_else(|e| {
                        tracing::error!("cannot scan the queue: {e}");
                        Vec::new()
                    })
                });
                let mut scheduler = scheduler(
                    &config,
                    queue::scheduler::Mode::Daemon,
                    in_flight.clone(),
                    Some(table.clone()),
                );
                scheduler.picked_up(envelopes, std::time::SystemTime::now());
                QueueRunner::new(
                    scheduler,
                    spool.clone(),
                    workers.clone(),
                    in_flight.clone(),
                    None,
                )
                .start()
            }),
        )
    };
    let runner = queue_runner.addr.clone();
    let deps = Arc::new(session_deps(
        &config,
        spool,
        resolver.addr.clone(),
        Arc::new(move || runner.get().recipient()),
        worker_addrs,
        SessionControls {
            hooks: intake.hooks,
            shutdown: intake.shutdown,
            paused: Arc::clone(&intake.paused),
            tls: intake.tls.clone(),
            auth: intake.auth.clone(),
        },
    ));
    let access = config.access.clone();
    let proxy_from = config.smtp.proxy_protocol_from.clone();
    let (tracker, paused) = (Arc::clone(&intake.tracker), Arc::clone(&intake.paused));
    let acceptor = Child::start(
        "acceptor",
        Box::new(move || {
            // Copies of the listening sockets: a restarted acceptor listens
            // on the very same ports, and no connection is refused meanwhile
            // (they wait in the backlog).
            let listeners = listeners
                .iter()
                .filter_map(|(l, implicit_tls)| Some((l.try_clone().ok()?, *implicit_tls)))
                .collect();
            Acceptor::new(
                listeners,
                arbiters.clone(),
                Arc::clone(&deps),
                access.clone(),
                Arc::clone(&tracker),
                Arc::clone(&paused),
                proxy_from.clone(),
            )
            .start()
        }),
    );
    let metrics = metrics_listener.map(|listener| {
        Child::start(
            "metrics_server",
            Box::new(move || match listener.try_clone() {
                Ok(copy) => MetricsServer::new(copy).start(),
                // Without a socket copy the server cannot listen; an actor
                // that stops at once makes the supervisor try again.
                Err(e) => {
                    tracing::error!("cannot reuse the metrics socket: {e}");
                    MetricsServer::stopped().start()
                }
            }),
        )
    });
    let restarts = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let control_deps = ControlDeps {
        queue_runner: queue_runner.addr.clone(),
        resolver: resolver.addr.clone(),
        tracker: Arc::clone(&intake.tracker),
        paused: Arc::clone(&intake.paused),
        restarts: Arc::clone(&restarts),
        tls: intake.tls,
        started: std::time::Instant::now(),
        clients: Arc::new(tokio::sync::Semaphore::new(
            actors::control_server::MAX_CLIENTS,
        )),
    };
    let control = Child::start(
        "control_server",
        Box::new(move || match control_listener.try_clone() {
            Ok(copy) => ControlServer::new(copy, control_deps.clone()).start(),
            Err(e) => {
                tracing::error!("cannot reuse the control socket: {e}");
                ControlServer::stopped(control_deps.clone()).start()
            }
        }),
    );
    Supervisor::new(
        Children::new(acceptor, resolver, queue_runner, workers, metrics, control),
        intake.failure,
        restarts,
    )
    .start()
}

/// A running node.
pub struct NodeHandle {
    tls_addrs: Vec<SocketAddr>,
    tls: Option<Arc<ServerTls>>,
    http: Arc<HttpShared>,
    addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    control_path: std::path::PathBuf,
    supervisor: Addr<Supervisor>,
    system: System,
    thread: Option<JoinHandle<()>>,
    writer: Option<SpoolWriter>,
    /// Released last, once everything is on disk.
    lock: Option<QueueLock>,
    tracker: Arc<ConnectionTracker>,
    paused: Arc<AtomicBool>,
    shutdown: tokio::sync::watch::Sender<Stopping>,
    grace: Grace,
    failure: tokio::sync::watch::Receiver<Option<String>>,
    /// The node's spool, for tests that act as its disk; let go before the
    /// writer is joined.
    #[cfg(test)]
    spool: Option<Spool>,
}

impl NodeHandle {
    /// The addresses SMTP listens on (with the real port when 0 was asked).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The `listen_tls` addresses: TLS from the first byte.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// Re-reads `[tls]` cert and key (SIGHUP, `ctl tls reload`): the next
    /// handshake uses them, open sessions go on. On failure the old ones
    /// stay in force. Returns the new certificate's notAfter.
    pub fn reload_tls(&self) -> Result<std::time::SystemTime, TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Err(TlsError::NotConfigured),
        }
    }

    /// Re-reads `[http] secret_file` and `ca_file` (SIGHUP): the next
    /// request is signed with the new key, the next connection trusts the
    /// new roots. On failure the old ones stay in force. False when
    /// neither file is set.
    pub fn reload_http(&self) -> Result<bool, crate::delivery::http::HttpSetupError> {
        self.http.reload()
    }

    /// The control socket.
    pub fn control_path(&self) -> &std::path::Path {
        &self.control_path
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Releases the listeners; sessions in progress finish.
    pub fn stop(&self) {
        self.supervisor.do_send(StopIntake);
    }

    /// Re-reads the aliases file; on failure the old table stays in force.
    pub async fn reload_aliases(&self) -> Result<usize, aliases::ReloadError> {
        self.supervisor
            .send(ReloadAliases)
            .await
            .unwrap_or_else(|e| Err(aliases::ReloadError::NodeNotRunning(e)))
    }

    /// How many messages are queued, by state.
    pub async fn queue_counts(&self) -> Option<QueueCounts> {
        self.supervisor.send(QueueStatus).await.ok().flatten()
    }

    /// Refuses new sessions with 421 4.3.2 until [`NodeHandle::resume_intake`].
    pub fn pause_intake(&self) {
        self.paused.store(true, Ordering::Relaxed);
        telemetry::intake_paused(true);
    }

    /// Accepts new sessions again.
    pub fn resume_intake(&self) {
        self.paused.store(false, Ordering::Relaxed);
        telemetry::intake_paused(false);
    }

    /// Whether intake is paused.
    pub fn intake_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Turns `Some(reason)` when the Supervisor gives up (restart intensity
    /// exceeded): the process should exit non-zero.
    pub fn failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.failure.clone()
    }

    /// Whether every supervised actor is alive and answering (what the
    /// systemd watchdog is fed on).
    pub async fn healthy(&self) -> bool {
        let asked = self.supervisor.send(actors::supervisor::Health);
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), asked).await,
            Ok(Ok(true))
        )
    }

    /// Blocks a delivery worker's thread for `how_long`: for tests and drills.
    #[cfg(any(test, feature = "fault-injection"))]
    pub async fn inject_wedge(&self, how_long: std::time::Duration) {
        let _ = self
            .supervisor
            .send(actors::supervisor::InjectWedge(how_long))
            .await;
    }

    /// Actor restarts so far, by actor.
    pub async fn actor_restarts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.supervisor.send(Restarts).await.unwrap_or_default()
    }

    /// Makes the named actor panic (`acceptor`, `alias_resolver`,
    /// `queue_runner`, `delivery_worker`): for tests and chaos drills.
    #[cfg(any(test, feature = "fault-injection"))]
    pub async fn inject_fault(&self, actor: &'static str) -> bool {
        self.supervisor
            .send(actors::supervisor::InjectFault(actor))
            .await
            .unwrap_or(false)
    }

    /// SMTP sessions open now.
    pub fn sessions(&self) -> usize {
        self.tracker.open()
    }

    /// Ends everything and waits until every acknowledged change is on disk.
    /// Gracefully: the listeners close; idle sessions hear 421 4.3.2; a
    /// message being received is finished (bounded); running programs
    /// finish (bounded); what is cut short stays queued and is retried.
    pub fn shutdown(mut self) {
        self.shutdown_in_place();
    }

    fn shutdown_in_place(&mut self) {
        if self.thread.is_none() {
            return;
        }
        // One deadline for all of it, so the whole stop stays bounded.
        let deadline = std::time::Instant::now() + self.grace.sessions.max(self.grace.deliveries);
        self.supervisor.do_send(StopSupervising);
        self.supervisor.do_send(StopIntake);
        // No new programs from here on; what finishes sessions still queue
        // is delivered at the next start.
        let (drained_tx, drained) = std::sync::mpsc::channel();
        self.supervisor.do_send(DrainDeliveries(drained_tx));
        let _ = self.shutdown.send(Stopping::Gracefully);
        let wait_for_sessions = |until: std::time::Instant| {
            while self.tracker.open() > 0 && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        wait_for_sessions(deadline.checked_sub(ABORT_MARGIN).unwrap_or(deadline));
        // Whoever is still receiving a message hears 421 rather than a reset.
        let _ = self.shutdown.send(Stopping::Now);
        wait_for_sessions(deadline);
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Plain std waiting: this may run inside a caller's async runtime.
        let _ = drained.recv_timeout(left);
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        #[cfg(test)]
        drop(self.spool.take());
        if let Some(writer) = self.writer.take() {
            writer.join();
        }
        let _ = std::fs::remove_file(&self.control_path);
        self.lock = None;
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.shutdown_in_place();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// A node's config in `dir`, on port 0, with `aliases`.
    fn config_in(dir: &std::path::Path, aliases: &str) -> config::Config {
        let mut config = config::Config {
            hostname: "mx.test".into(),
            ..config::Config::default()
        };
        config.smtp.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.spool.path = dir.join("spool");
        config.aliases.path = dir.join("aliases");
        config.metrics.listen = None;
        config.control.socket = dir.join("ctl.sock");
        std::fs::write(&config.aliases.path, aliases).unwrap();
        config
    }

    /// Sends `line` and returns the reply's last line (multi-line replies
    /// read whole).
    fn exchange(reader: &mut BufReader<TcpStream>, line: &str) -> String {
        if !line.is_empty() {
            reader
                .get_mut()
                .write_all(format!("{line}\r\n").as_bytes())
                .unwrap();
        }
        loop {
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            if reply.len() < 4 || reply.as_bytes()[3] != b'-' {
                return reply;
            }
        }
    }

    fn session(addr: SocketAddr) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        assert!(exchange(&mut reader, "").starts_with("220"));
        assert!(exchange(&mut reader, "HELO client").starts_with("250"));
        reader
    }

    /// The node's Prometheus exposition.
    fn scrape(metrics: SocketAddr) -> String {
        use std::io::Read;
        let mut stream = TcpStream::connect(metrics).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    fn queue_one(addr: SocketAddr, rcpt: &str) {
        let mut s = session(addr);
        assert!(exchange(&mut s, "MAIL FROM:<a@example.org>").starts_with("250"));
        assert!(exchange(&mut s, &format!("RCPT TO:<{rcpt}>")).starts_with("250"));
        assert!(exchange(&mut s, "DATA").starts_with("354"));
        assert!(exchange(&mut s, "Subject: x\r\n\r\nx\r\n.").starts_with("250"));
    }

    #[test]
    fn a_message_a_rescan_already_delivered_is_not_tracked_again_when_its_session_reports_it() {
        use crate::actors::queue_runner::{Counts, Enqueued, QueueRunner};
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(dir.path()).unwrap();
        let system = System::new();
        let counts = system.block_on(async {
            let scheduler = queue::scheduler::Scheduler::new(
                queue_policy(&config::Config::default()),
                false,
                1,
                queue::scheduler::Mode::Daemon,
                queue::InFlight::default(),
            );
            // No workers: a message tracked again would be handed to one.
            let runner = QueueRunner::new(
                scheduler,
                spool.clone(),
                Vec::new(),
                queue::InFlight::default(),
                None,
            )
            .start();
            // Its session's word arrives after its file was removed.
            let done = crate::spool::Envelope::for_test_piped(
                "GONE",
                "a@example.org",
                1,
                std::time::SystemTime::now(),
            );
            runner.do_send(Enqueued(Box::new(done)));
            runner.send(Counts).await
        });
        let counts = counts.expect("the runner is still there");
        assert_eq!(counts, queue::QueueCounts::default(), "{counts:?}");
        drop(system);
        drop(spool);
        writer.join();
    }

    #[test]
    fn intake_waits_for_a_spool_behind_its_disk_and_past_the_wait_refuses_with_451() {
        let dir = tempfile::tempdir().unwrap();
        // Each delivery fails for now: its result is an envelope update.
        let mut config = config_in(dir.path(), "later: |exit 75\n");
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        let node = Node::start(config).unwrap();
        let addr = node.local_addrs()[0];
        let spool = node.spool.clone().unwrap();
        // A disk that stops answering the writer (commits still land).
        spool.hold_writer(true);
        for _ in 0..3 {
            queue_one(addr, "later@example.org");
        }
        spool.set_intake_bound(2, Duration::from_millis(1500));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while spool.has_intake_room() {
            assert!(
                std::time::Instant::now() < deadline,
                "the updates never waited for the writer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // A new transaction waits, then hears a temporary refusal.
        let mut refused = session(addr);
        let asked = std::time::Instant::now();
        let reply = exchange(&mut refused, "MAIL FROM:<a@example.org>");
        assert!(reply.starts_with("451 4.3.2"), "{reply}");
        assert!(
            asked.elapsed() >= Duration::from_millis(1500),
            "refused without waiting"
        );
        // The session goes on: a later transaction may be accepted.
        assert!(exchange(&mut refused, "NOOP").starts_with("250"));

        // One that waits is let through once the disk catches up.
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let released = Arc::clone(&released);
            std::thread::spawn(move || {
                let mut s = session(addr);
                let reply = exchange(&mut s, "MAIL FROM:<a@example.org>");
                (reply, released.load(std::sync::atomic::Ordering::SeqCst))
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        spool.hold_writer(false);
        let (reply, after_release) = waiter.join().unwrap();
        assert!(reply.starts_with("250"), "{reply}");
        assert!(after_release, "accepted while the spool was behind");
        let metrics = scrape(node.metrics_addr().unwrap());
        for series in [
            "mailnode_intake_backpressure_total{outcome=\"waited\"} ",
            "mailnode_intake_backpressure_total{outcome=\"refused\"} ",
        ] {
            let counted = metrics
                .lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok());
            assert!(counted.is_some_and(|n| n >= 1.0), "{series}: {metrics}");
        }
        drop(spool);
        node.shutdown();
    }

    #[test]
    fn start_up_finishes_messages_a_crash_left_fully_delivered() {
        use crate::aliases::Target;
        use crate::spool::{Delivery, DeliveryState, Envelope, Spool};
        use std::time::{Duration, SystemTime};

        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), "ok: |cat > /dev/null\n");
        // A message whose only delivery is recorded as done, as if the node died
        // before removing it.
        {
            let (spool, writer) = Spool::open(&config.spool.path).unwrap();
            let body = spool.begin(SystemTime::now()).unwrap();
            let id = body.id().to_string();
            let mut envelope = Envelope {
                id: id.clone(),
                sender: "a@example.org".into(),
                return_path: "a@example.org".into(),
                arrival: SystemTime::now(),
                client_address: "127.0.0.1".into(),
                client_helo: "client".into(),
                channel: "local".into(),
                size: 0,
                smtputf8: false,
                body_8bit: false,
                held: false,
                next_attempt: SystemTime::now(),
                deliveries: vec![{
                    let mut d = Delivery::new(
                        "ok@example.org".into(),
                        "ok@example.org".into(),
                        "ok".into(),
                        String::new(),
                        "example.org".into(),
                        Target::Pipe {
                            command: "exit 99".into(),
                        },
                    );
                    d.state = DeliveryState::Delivered;
                    d
                }],
                body_check: None,
                tls_version: String::new(),
                tls_cipher: String::new(),
                auth: Default::default(),
            };
            spool.commit(body, &mut envelope).wait_blocking().unwrap();
            drop(spool);
            writer.join();
        }
        let queue = config.spool.path.join("queue");
        // One sealed queue file.
        assert_eq!(std::fs::read_dir(&queue).unwrap().count(), 1);
        let node = Node::start(config).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let emptied = loop {
            if std::fs::read_dir(&queue).is_ok_and(|d| d.count() == 0) {
                break Some(());
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        node.shutdown();
        assert!(
            emptied.is_some(),
            "a delivered message stayed queued after restart"
        );
    }
}

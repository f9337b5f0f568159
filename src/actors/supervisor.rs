//! Supervisor: the top of the actor tree. It builds every long-lived actor
//! from a factory, watches them, and recreates one that died (a panic in a
//! handler kills only that actor; actix's own supervision does not restart
//! it). The others reach a child through a [`Shared`]
//! address the Supervisor swaps, so a restart is invisible to them. State
//! that must survive lives in the spool or in what the factory hands over.
//! Past the restart intensity (5 in 60 s) it stops intake and reports the
//! failure, so the process exits non-zero and systemd starts it afresh.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::actors::acceptor::{Acceptor, StopAccepting};
use crate::actors::alias_resolver::{AliasResolver, Reload};
use crate::actors::control_server::ControlServer;
use crate::actors::delivery_worker::DeliveryWorker;
use crate::actors::metrics_server::MetricsServer;
use crate::actors::queue_runner::{Counts, Drain, QueueRunner};
use crate::actors::Shared;
use crate::aliases::ReloadError;
use crate::queue::QueueCounts;

/// How often the children are looked at.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Restart intensity: more than this many restarts ...
const MAX_RESTARTS: usize = 5;
/// ... within this long is a failure a restart will not fix.
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Builds one actor afresh.
pub(crate) type Factory<A> = Box<dyn Fn() -> Addr<A>>;

/// One supervised actor: its address and how to make another.
pub(crate) struct Child<A: Actor> {
    pub(crate) name: &'static str,
    pub(crate) addr: Shared<Addr<A>>,
    pub(crate) factory: Factory<A>,
}

impl<A: Actor<Context = Context<A>>> Child<A> {
    pub(crate) fn start(name: &'static str, factory: Factory<A>) -> Self {
        Child {
            name,
            addr: Shared::new(factory()),
            factory,
        }
    }
}

/// A ping's answer: whether the actor answered in time.
type PingAnswer = std::pin::Pin<Box<dyn std::future::Future<Output = bool>>>;

/// What the Supervisor does with any child, whatever its actor.
pub(crate) trait Supervised {
    fn name(&self) -> &'static str;
    fn alive(&self) -> bool;
    fn restart(&self);
    fn ping(&self) -> PingAnswer;
    /// Makes the actor panic inside a handler.
    #[cfg(any(test, feature = "fault-injection"))]
    fn crash(&self);
}

/// The handlers every supervised actor has.
#[cfg(not(any(test, feature = "fault-injection")))]
pub(crate) trait SupervisedActor: Actor<Context = Context<Self>> + Handler<Ping> {}
#[cfg(not(any(test, feature = "fault-injection")))]
impl<A: Actor<Context = Context<A>> + Handler<Ping>> SupervisedActor for A {}
#[cfg(any(test, feature = "fault-injection"))]
pub(crate) trait SupervisedActor:
    Actor<Context = Context<Self>> + Handler<Ping> + Handler<Crash>
{
}
#[cfg(any(test, feature = "fault-injection"))]
impl<A: Actor<Context = Context<A>> + Handler<Ping> + Handler<Crash>> SupervisedActor for A {}

impl<A: SupervisedActor> Supervised for Child<A> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn alive(&self) -> bool {
        self.addr.get().connected()
    }

    fn restart(&self) {
        self.addr.set((self.factory)());
    }

    fn ping(&self) -> PingAnswer {
        let asked = self.addr.get().send(Ping).timeout(PING_TIMEOUT);
        Box::pin(async move { asked.await.is_ok() })
    }

    #[cfg(any(test, feature = "fault-injection"))]
    fn crash(&self) {
        self.addr.get().do_send(Crash);
    }
}

/// The supervised actors: all of them in one list, and the addresses of
/// those the Supervisor also sends messages of their own.
pub(crate) struct Children {
    list: Vec<Box<dyn Supervised>>,
    /// None once intake has stopped (`stop()`): a stopped acceptor is not
    /// restarted, and its factory (holding the listening sockets) is gone.
    acceptor: Option<Shared<Addr<Acceptor>>>,
    resolver: Shared<Addr<AliasResolver>>,
    queue_runner: Shared<Addr<QueueRunner>>,
    #[cfg(any(test, feature = "fault-injection"))]
    workers: Vec<Shared<Addr<DeliveryWorker>>>,
}

const ACCEPTOR: &str = "acceptor";

impl Children {
    /// `metrics` is None when `[metrics] listen = "off"`.
    pub(crate) fn new(
        acceptor: Child<Acceptor>,
        resolver: Child<AliasResolver>,
        queue_runner: Child<QueueRunner>,
        workers: Vec<Child<DeliveryWorker>>,
        metrics: Option<Child<MetricsServer>>,
        control: Child<ControlServer>,
    ) -> Self {
        debug_assert_eq!(acceptor.name, ACCEPTOR);
        let mut children = Children {
            list: Vec::new(),
            acceptor: Some(acceptor.addr.clone()),
            resolver: resolver.addr.clone(),
            queue_runner: queue_runner.addr.clone(),
            #[cfg(any(test, feature = "fault-injection"))]
            workers: workers.iter().map(|w| w.addr.clone()).collect(),
        };
        children.list.push(Box::new(acceptor));
        children.list.push(Box::new(resolver));
        children.list.push(Box::new(queue_runner));
        if let Some(metrics) = metrics {
            children.list.push(Box::new(metrics));
        }
        children.list.push(Box::new(control));
        for worker in workers {
            children.list.push(Box::new(worker));
        }
        children
    }

    /// Tells the acceptor to stop and drops it: dropping its factory drops
    /// the last copies of the listening sockets, so the ports really close.
    fn stop_acceptor(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.get().do_send(StopAccepting);
        }
        self.list.retain(|child| child.name() != ACCEPTOR);
    }
}

pub(crate) struct Supervisor {
    children: Children,
    /// Shared with the control server's `status`.
    restarts: Arc<std::sync::Mutex<BTreeMap<&'static str, u64>>>,
    recent: VecDeque<Instant>,
    /// Told once the restart intensity is exceeded.
    failure: tokio::sync::watch::Sender<Option<String>>,
    supervising: bool,
}

impl Supervisor {
    pub(crate) fn new(
        children: Children,
        failure: tokio::sync::watch::Sender<Option<String>>,
        restarts: Arc<std::sync::Mutex<BTreeMap<&'static str, u64>>>,
    ) -> Self {
        Supervisor {
            children,
            restarts,
            recent: VecDeque::new(),
            failure,
            supervising: true,
        }
    }

    fn watch(&mut self) {
        if !self.supervising {
            return;
        }
        let dead: Vec<usize> = (0..self.children.list.len())
            .filter(|&i| !self.children.list[i].alive())
            .collect();
        for i in dead {
            if !self.supervising {
                break;
            }
            self.restart(i);
        }
    }

    fn restart(&mut self, child: usize) {
        let name = self.children.list[child].name();
        let now = Instant::now();
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() > MAX_RESTARTS {
            let why = format!(
                "{} restarts within {}s (last: {name}); giving up so the service manager can start afresh",
                self.recent.len(),
                RESTART_WINDOW.as_secs()
            );
            tracing::error!("{why}");
            self.supervising = false;
            self.children.stop_acceptor();
            let _ = self.failure.send(Some(why));
            return;
        }
        if let Ok(mut counts) = self.restarts.lock() {
            *counts.entry(name).or_insert(0) += 1;
        }
        crate::telemetry::actor_restarted(name);
        tracing::warn!(actor = name, "actor died; restarting");
        self.children.list[child].restart();
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(WATCH_EVERY, |act, _| act.watch());
        ctx.run_interval(crate::memory::GIVE_BACK_EVERY, |_, _| {
            // Off the supervisor's thread: on a big heap it takes a while.
            actix_rt::task::spawn_blocking(|| {
                if crate::memory::give_back_free_heap() {
                    tracing::debug!("gave free heap back to the system");
                }
            });
        });
    }
}

/// Release the listeners; sessions in progress finish.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopIntake;

impl Handler<StopIntake> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: StopIntake, _: &mut Self::Context) {
        self.children.stop_acceptor();
    }
}

/// The node is going down: deaths are expected now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopSupervising;

impl Handler<StopSupervising> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: StopSupervising, _: &mut Self::Context) {
        self.supervising = false;
    }
}

/// Re-read the aliases file.
#[derive(Message)]
#[rtype(result = "Result<usize, ReloadError>")]
pub struct ReloadAliases;

impl Handler<ReloadAliases> for Supervisor {
    type Result = ResponseFuture<Result<usize, ReloadError>>;

    fn handle(&mut self, _: ReloadAliases, _: &mut Self::Context) -> Self::Result {
        let asked = self.children.resolver.get().send(Reload);
        Box::pin(async move {
            asked
                .await
                .unwrap_or_else(|e| Err(ReloadError::ResolverUnavailable(e)))
        })
    }
}

/// Start no more deliveries; the sender hears once the running ones are
/// done and recorded (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainDeliveries(pub std::sync::mpsc::Sender<()>);

impl Handler<DrainDeliveries> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: DrainDeliveries, _: &mut Self::Context) {
        self.children.queue_runner.get().do_send(Drain(msg.0));
    }
}

/// How many messages are queued, by state.
#[derive(Message)]
#[rtype(result = "Option<QueueCounts>")]
pub struct QueueStatus;

impl Handler<QueueStatus> for Supervisor {
    type Result = ResponseFuture<Option<QueueCounts>>;

    fn handle(&mut self, _: QueueStatus, _: &mut Self::Context) -> Self::Result {
        let asked = self.children.queue_runner.get().send(Counts);
        Box::pin(async move { asked.await.ok() })
    }
}

/// Restarts so far, by actor name.
#[derive(Message)]
#[rtype(result = "BTreeMap<&'static str, u64>")]
pub struct Restarts;

impl Handler<Restarts> for Supervisor {
    type Result = MessageResult<Restarts>;

    fn handle(&mut self, _: Restarts, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.restarts.lock().map(|r| r.clone()).unwrap_or_default())
    }
}

/// Answered at once by a live, unblocked actor.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Ping;

macro_rules! answer_pings {
    ($($actor:ty),*) => {$(
        impl Handler<Ping> for $actor {
            type Result = ();
            fn handle(&mut self, _: Ping, _: &mut Self::Context) {}
        }
    )*};
}

answer_pings!(
    Acceptor,
    AliasResolver,
    QueueRunner,
    DeliveryWorker,
    MetricsServer,
    ControlServer
);

/// How long a child may take to answer a ping before it counts as wedged.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether every child is alive and answering (the systemd watchdog is fed
/// only while this holds).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Health;

impl Handler<Health> for Supervisor {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _: Health, _: &mut Self::Context) -> Self::Result {
        if !self.supervising {
            return Box::pin(async { false });
        }
        let pings: Vec<PingAnswer> = self.children.list.iter().map(|c| c.ping()).collect();
        Box::pin(async move {
            futures_util::future::join_all(pings)
                .await
                .into_iter()
                .all(|alive| alive)
        })
    }
}

/// Makes an actor panic inside a handler (tests and the fault-injection
/// feature only).
#[cfg(any(test, feature = "fault-injection"))]
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Crash;

/// Blocks an actor's thread for a while: a wedged actor (tests and the
/// fault-injection feature only).
#[cfg(any(test, feature = "fault-injection"))]
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wedge(pub Duration);

/// Wedges the first delivery worker.
#[cfg(any(test, feature = "fault-injection"))]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectWedge(pub Duration);

#[cfg(any(test, feature = "fault-injection"))]
impl Handler<InjectWedge> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: InjectWedge, _: &mut Self::Context) {
        if let Some(w) = self.children.workers.first() {
            w.get().do_send(Wedge(msg.0));
        }
    }
}

#[cfg(any(test, feature = "fault-injection"))]
impl Handler<Wedge> for DeliveryWorker {
    type Result = ();

    fn handle(&mut self, msg: Wedge, _: &mut Self::Context) {
        std::thread::sleep(msg.0);
    }
}

/// Injects [`Crash`] into the named actor.
#[cfg(any(test, feature = "fault-injection"))]
#[derive(Message)]
#[rtype(result = "bool")]
pub struct InjectFault(pub &'static str);

#[cfg(any(test, feature = "fault-injection"))]
impl Handler<InjectFault> for Supervisor {
    type Result = bool;

    fn handle(&mut self, msg: InjectFault, _: &mut Self::Context) -> bool {
        let child = self.children.list.iter().find(|c| c.name() == msg.0);
        child.map(|c| c.crash()).is_some()
    }
}

/// Each supervised actor panics on [`Crash`].
#[cfg(any(test, feature = "fault-injection"))]
macro_rules! crash_on_demand {
    ($($actor:ty),*) => {$(
        impl Handler<Crash> for $actor {
            type Result = ();
            fn handle(&mut self, _: Crash, _: &mut Self::Context) {
                panic!("injected fault in {}", stringify!($actor));
            }
        }
    )*};
}

#[cfg(any(test, feature = "fault-injection"))]
crash_on_demand!(
    Acceptor,
    AliasResolver,
    QueueRunner,
    DeliveryWorker,
    MetricsServer,
    ControlServer
);

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::{Node, NodeHandle};

    /// A node whose `hold` alias refuses (75) until `go` exists in `out`.
    fn node(dir: &Path, out: &Path) -> NodeHandle {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(out).unwrap();
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o777)).unwrap();
        let o = out.display();
        let aliases = dir.join("aliases");
        std::fs::write(
            &aliases,
            format!("hold: |[ -e {o}/go ] || exit 75; cat > {o}/$QUEUE_ID\n"),
        )
        .unwrap();
        let mut config = Config {
            hostname: "mx.test".into(),
            ..Config::default()
        };
        config.smtp.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.aliases.path = aliases;
        config.spool.path = dir.join("spool");
        config.queue.retry_min = Duration::from_millis(200);
        config.queue.retry_max = Duration::from_millis(200);
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        config.control.socket = dir.join("ctl.sock");
        Node::start(config).unwrap()
    }

    /// One message to `hold`, over a fresh connection; returns its id.
    fn send(addr: SocketAddr) -> String {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut reply = || {
            let mut line = String::new();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line.as_bytes().get(3) != Some(&b'-') {
                    return line.trim_end().to_string();
                }
            }
        };
        assert!(reply().starts_with("220"));
        for cmd in [
            "HELO c",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<hold@example.org>",
            "DATA",
        ] {
            writer.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
            let r = reply();
            assert!(r.starts_with('2') || r.starts_with('3'), "{cmd}: {r}");
        }
        writer.write_all(b"Subject: s\r\n\r\nx\r\n.\r\n").unwrap();
        let queued = reply();
        assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
        writer.write_all(b"QUIT\r\n").unwrap();
        queued.rsplit(' ').next().unwrap().to_string()
    }

    fn poll<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(v) = f() {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[test]
    fn each_supervised_actor_is_restarted_after_a_panic_and_nothing_is_lost() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for actor in [
            "alias_resolver",
            "queue_runner",
            "delivery_worker",
            "acceptor",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let node = node(dir.path(), &out);
            let addr = node.local_addrs()[0];
            let before = send(addr);
            assert!(
                rt.block_on(node.inject_fault(actor)),
                "{actor}: no such actor"
            );
            let restarted = poll(|| {
                let counts = rt.block_on(node.actor_restarts());
                (counts.get(actor) == Some(&1)).then_some(())
            });
            assert!(restarted.is_some(), "{actor} was not restarted");
            std::fs::write(out.join("go"), b"").unwrap();
            // The node keeps serving, through the restarted actor too.
            let after = send(addr);
            for id in [&before, &after] {
                let delivered = poll(|| out.join(id).exists().then_some(()));
                assert!(delivered.is_some(), "{actor}: message {id} was lost");
            }
            node.shutdown();
        }
    }

    #[test]
    fn past_the_restart_intensity_the_node_gives_up() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), &dir.path().join("out"));
        let failure = node.failure();
        for n in 1..=MAX_RESTARTS as u64 {
            assert!(rt.block_on(node.inject_fault("alias_resolver")));
            let restarted = poll(|| {
                let counts = rt.block_on(node.actor_restarts());
                (counts.get("alias_resolver") == Some(&n)).then_some(())
            });
            assert!(restarted.is_some(), "restart {n} did not happen");
            assert!(failure.borrow().is_none());
        }
        assert!(rt.block_on(node.inject_fault("alias_resolver")));
        let gave_up = poll(|| failure.borrow().clone());
        assert!(gave_up.is_some_and(|why| why.contains("restarts within")));
        // Intake stopped: the listener is closed.
        let addr = node.local_addrs()[0];
        assert!(poll(|| TcpStream::connect(addr).is_err().then_some(())).is_some());
        node.shutdown();
    }

    #[test]
    fn a_restarted_queue_runner_never_runs_a_program_twice_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let node = node(dir.path(), &out);
        // Replace the alias with a slow program that logs its start and end.
        let o = out.display();
        std::fs::write(
            dir.path().join("aliases"),
            format!(
                "hold: |echo start >> {o}/log; sleep 1; echo end >> {o}/log; cat > {o}/$QUEUE_ID\n"
            ),
        )
        .unwrap();
        assert!(rt.block_on(node.reload_aliases()).is_ok());
        let id = send(node.local_addrs()[0]);
        let log = out.join("log");
        assert!(poll(|| std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("start")))
        .is_some());
        assert!(rt.block_on(node.inject_fault("queue_runner")));
        assert!(
            poll(|| out.join(&id).exists().then_some(())).is_some(),
            "never delivered"
        );
        // Give a wrongly started second run the time to show itself.
        let ends = poll(|| {
            let l = std::fs::read_to_string(&log).ok()?;
            (l.matches("start").count() == l.matches("end").count()).then_some(l)
        })
        .unwrap();
        assert!(
            !ends.contains("start\nstart"),
            "two runs overlapped:\n{ends}"
        );
        node.shutdown();
    }

    #[test]
    fn a_wedged_actor_makes_the_node_unhealthy_until_it_recovers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), &dir.path().join("out"));
        assert!(rt.block_on(node.healthy()));
        rt.block_on(node.inject_wedge(Duration::from_secs(4)));
        let wedged = poll(|| (!rt.block_on(node.healthy())).then_some(()));
        assert!(wedged.is_some(), "a wedged worker went unnoticed");
        let recovered = poll(|| rt.block_on(node.healthy()).then_some(()));
        assert!(recovered.is_some(), "health never came back");
        node.shutdown();
    }
}

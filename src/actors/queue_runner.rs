//! QueueRunner (≈ Postfix's qmgr): the actor around the queue
//! [`Scheduler`]. It feeds the scheduler its events (a message enqueued, a
//! worker's report, a spool write that landed, a retry time, an operator's
//! command) and carries out the commands that come back: hand a delivery
//! to a DeliveryWorker, write or remove a queue file, send a bounce, set a
//! timer. Every decision is the scheduler's.

use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::actors::delivery_worker::{Bounce, Deliver, DeliveryWorker};
use crate::actors::Shared;
use crate::control::queue::{answer, QueueCommand};
use crate::delivery::status::DeliveryStatus;
use crate::delivery::DeliveryReport;
use crate::queue::scheduler::{Command, Listed, Mode, Scheduler};
use crate::queue::{InFlight, QueueCounts};
use crate::spool::{Envelope, Spool};

/// How often the queue size gauges are brought up to date.
const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// How soon a failed write of delivery results is tried again.
const RECORD_RETRY: Duration = Duration::from_secs(1);
/// Bounds of how often the queue directory is looked at for messages other
/// processes (`mailnode inetd` sessions) left there.
const RESCAN_MIN: Duration = Duration::from_secs(1);
const RESCAN_MAX: Duration = Duration::from_secs(60);

/// A message was just made durable by a session.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Enqueued(pub Box<Envelope>);

/// Start no more deliveries; the sender hears once the running ones are
/// recorded. (A std channel: the node's handle waits on it from outside
/// any runtime.)
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Drain(pub std::sync::mpsc::Sender<()>);

/// A snapshot for status and tests: how many messages in each state.
#[derive(Message)]
#[rtype(result = "QueueCounts")]
pub(crate) struct Counts;

/// What to do once a piece of work the runner started (a delivery, a
/// spool write) has ended; see [`QueueRunner::when_done`].
struct Then(Box<Continuation>);

type Continuation = dyn FnOnce(&mut QueueRunner, &mut Context<QueueRunner>) + Send;

impl Message for Then {
    type Result = ();
}

/// `queue.list`: the messages after `after`, at most `limit`.
#[derive(Message)]
#[rtype(result = "Listing")]
pub(crate) struct List {
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// The answer to [`List`]: the messages, and whether more follow.
pub(crate) struct Listing {
    pub entries: Vec<Listed>,
    pub more: bool,
}

/// A [`QueueCommand`]; answered with the data of the reply or an error.
#[derive(Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
pub(crate) struct Control(pub QueueCommand);

pub(crate) struct QueueRunner {
    scheduler: Scheduler,
    spool: Spool,
    workers: Vec<Shared<Addr<DeliveryWorker>>>,
    next_worker: usize,
    in_flight: InFlight,
    wakeup: Option<SpawnHandle>,
    /// One pass (`runq`, `inetd`): told when it is over.
    pass_done: Option<tokio::sync::oneshot::Sender<()>>,
    drain_waiters: Vec<std::sync::mpsc::Sender<()>>,
}

impl QueueRunner {
    /// A runner around `scheduler`, which already holds what the spool had.
    /// `in_flight` is the scheduler's registry of running deliveries;
    /// `pass_done` (one pass: `runq`, `inetd`) is told when the pass is over.
    pub(crate) fn new(
        scheduler: Scheduler,
        spool: Spool,
        workers: Vec<Shared<Addr<DeliveryWorker>>>,
        in_flight: InFlight,
        pass_done: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Self {
        QueueRunner {
            scheduler,
            spool,
            workers,
            next_worker: 0,
            in_flight,
            wakeup: None,
            pass_done,
            drain_waiters: Vec::new(),
        }
    }

    /// Runs `then` on the runner with the output of `work` once it is done.
    /// The wait is a task of its own that reports back by message, not a
    /// future spawned in the actor's context: actix polls every future of a
    /// context each time the context wakes, so thousands of waiting
    /// removals made every event cost as much as their number.
    fn when_done<T: Send + 'static>(
        ctx: &mut Context<Self>,
        work: impl std::future::Future<Output = T> + 'static,
        then: impl FnOnce(&mut Self, &mut Context<Self>, T) + Send + 'static,
    ) {
        let runner = ctx.address();
        actix::spawn(async move {
            let output = work.await;
            // A runner that is gone takes its results with it, as it
            // would take the futures of its context; the spool and the
            // in-flight registry keep what matters.
            runner.do_send(Then(Box::new(move |act, ctx| then(act, ctx, output))));
        });
    }

    fn worker(&mut self) -> Addr<DeliveryWorker> {
        let worker = self.workers[self.next_worker % self.workers.len()].get();
        self.next_worker = self.next_worker.wrapping_add(1);
        worker
    }

    /// Carries out what the scheduler decided; each outcome goes back to it.
    fn execute(&mut self, ctx: &mut Context<Self>) {
        for command in self.scheduler.take_commands() {
            match command {
                Command::Dispatch {
                    id,
                    index,
                    envelope,
                } => {
                    let request = self.worker().send(Deliver {
                        envelope,
                        index,
                        body: self.spool.body_path(&id),
                        in_flight: Some(self.in_flight.start(&id, index)),
                    });
                    Self::when_done(ctx, request, move |act, ctx, result| {
                        let report = result.unwrap_or_else(DeliveryReport::worker_lost);
                        act.scheduler
                            .delivered(id, index, report, SystemTime::now());
                        act.execute(ctx);
                    });
                }
                Command::Record { id, envelope } => {
                    let written = self.spool.update(envelope).wait();
                    Self::when_done(ctx, written, move |act, ctx, result| {
                        act.scheduler.recorded(id, result, SystemTime::now());
                        act.execute(ctx);
                    });
                }
                Command::RecordLater { id } => {
                    ctx.run_later(RECORD_RETRY, move |act, ctx| {
                        act.scheduler.record_again(id, SystemTime::now());
                        act.execute(ctx);
                    });
                }
                Command::Persist {
                    id,
                    envelope,
                    expansion,
                } => {
                    let written = self.spool.update(envelope).wait();
                    Self::when_done(ctx, written, move |act, ctx, result| {
                        let now = SystemTime::now();
                        act.scheduler.persisted(&id, result, expansion, now);
                        act.execute(ctx);
                    });
                }
                Command::Remove { id, why } => {
                    let removal = self.spool.remove(&id, why.disposal()).wait();
                    // Answered once durable: "removed" is logged only when
                    // a power cut can no longer bring the message back.
                    Self::when_done(ctx, removal, move |act, ctx, result| {
                        match result {
                            Ok(()) => tracing::info!(queue_id = %id, "{}", why.done()),
                            Err(e) => tracing::error!(queue_id = %id, "{}: {e}", why.failed()),
                        }
                        act.scheduler.removed(&id);
                        act.execute(ctx);
                    });
                }
                Command::Bounce {
                    id,
                    envelope,
                    failed,
                } => {
                    let request = self.worker().send(Bounce {
                        envelope,
                        failed: failed.clone(),
                    });
                    Self::when_done(ctx, request, move |act, ctx, result| {
                        let status = result.unwrap_or_else(|e| {
                            DeliveryStatus::system_temporary(format!("delivery worker lost: {e}"))
                        });
                        act.scheduler.bounced(id, failed, status, SystemTime::now());
                        act.execute(ctx);
                    });
                }
                Command::WakeAt(at) => {
                    if let Some(handle) = self.wakeup.take() {
                        ctx.cancel_future(handle);
                    }
                    let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
                    self.wakeup = Some(ctx.run_later(delay, |act, ctx| {
                        act.wakeup = None;
                        act.scheduler.due(SystemTime::now());
                        act.execute(ctx);
                    }));
                }
                Command::PassDone => {
                    if let Some(done) = self.pass_done.take() {
                        let _ = done.send(());
                    }
                }
                Command::Drained => {
                    for waiter in self.drain_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                }
            }
        }
    }

    /// Picks up messages other processes put in the queue (an `inetd`
    /// session that could not deliver them itself).
    fn rescan(&mut self, ctx: &mut Context<Self>) {
        let scheduler = &self.scheduler;
        let found = match self.spool.scan_new(|id| scheduler.knows(id)) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!("cannot scan the queue: {e}");
                return;
            }
        };
        for envelope in &found {
            tracing::info!(queue_id = %envelope.id, "picked up from the queue directory");
        }
        self.scheduler.picked_up(found, SystemTime::now());
        self.execute(ctx);
    }
}

impl Actor for QueueRunner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.scheduler.start();
        self.execute(ctx);
        if self.scheduler.mode() == Mode::Daemon {
            let policy = self.scheduler.policy();
            let every = policy.retry_min.clamp(RESCAN_MIN, RESCAN_MAX);
            ctx.run_interval(every, |act, ctx| act.rescan(ctx));
            crate::telemetry::queue_max_age(policy.max_age);
            ctx.run_interval(GAUGE_EVERY, |act, _| {
                let c = act.scheduler.counts();
                crate::telemetry::queue_sizes(c.active, c.deferred, c.held);
                crate::telemetry::queue_oldest(act.scheduler.oldest(SystemTime::now()));
            });
        }
    }
}

impl Handler<Enqueued> for QueueRunner {
    type Result = ();

    fn handle(&mut self, msg: Enqueued, ctx: &mut Self::Context) {
        // A rescan may have found the message between the end of its commit
        // and this word from its session, and delivered and removed it
        // already: then its file is gone, and it must not be tracked again.
        if !self.spool.body_path(&msg.0.id).exists() {
            tracing::debug!(queue_id = %msg.0.id, "enqueued, but already done");
            return;
        }
        self.scheduler.enqueued(*msg.0, SystemTime::now());
        self.execute(ctx);
    }
}

impl Handler<Drain> for QueueRunner {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Self::Context) {
        self.drain_waiters.push(msg.0);
        self.scheduler.drain();
        self.execute(ctx);
    }
}

impl Handler<Counts> for QueueRunner {
    type Result = MessageResult<Counts>;

    fn handle(&mut self, _: Counts, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.scheduler.counts())
    }
}

impl Handler<List> for QueueRunner {
    type Result = MessageResult<List>;

    fn handle(&mut self, msg: List, _: &mut Self::Context) -> Self::Result {
        let (entries, more) = self.scheduler.list(msg.after.as_deref(), msg.limit);
        MessageResult(Listing { entries, more })
    }
}

impl Handler<Control> for QueueRunner {
    type Result = Result<serde_json::Value, String>;

    fn handle(&mut self, msg: Control, ctx: &mut Self::Context) -> Self::Result {
        let reply = answer(msg.0, &mut self.scheduler, SystemTime::now());
        self.execute(ctx);
        reply
    }
}

impl Handler<Then> for QueueRunner {
    type Result = ();

    fn handle(&mut self, msg: Then, ctx: &mut Context<Self>) {
        (msg.0)(self, ctx);
    }
}

//! QueueRunner (≈ Postfix's qmgr): knows every queued message, hands each
//! pending delivery to a DeliveryWorker as soon as the message is durable,
//! records every result in the spool before deciding anything else about
//! the message, then carries out the decision of [`crate::queue`]: remove,
//! retry later, return to the sender, or hold.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::actors::delivery_worker::{Bounce, Deliver, DeliveryReport, DeliveryWorker};
use crate::actors::supervisor::Shared;
use crate::delivery::program::DeliveryStatus;
use crate::queue::{self, QueuePolicy, Step};
use crate::spool::{Envelope, Spool, SpoolError};

/// How often the queue size gauges are brought up to date.
const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// How soon a failed write of delivery results is tried again.
const RECORD_RETRY: Duration = Duration::from_secs(1);
/// Bounds of how often the queue directory is looked at for messages other
/// processes (`mailnode inetd` sessions) left there.
const RESCAN_MIN: Duration = Duration::from_secs(1);
const RESCAN_MAX: Duration = Duration::from_secs(60);

/// How soon a message whose delivery another (dead) runner started is
/// looked at again.
const IN_FLIGHT_RECHECK: Duration = Duration::from_secs(1);

/// Deliveries running now, shared by every QueueRunner the Supervisor
/// builds: a restarted runner must not start a program its predecessor
/// started and that is still running.
#[derive(Clone, Default)]
pub struct InFlight(Arc<std::sync::Mutex<std::collections::HashSet<(String, usize)>>>);

impl InFlight {
    fn contains(&self, id: &str, index: usize) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(id.to_string(), index))
    }

    /// Registers a delivery; the guard ends the registration when the
    /// attempt ends, whoever is still waiting for it.
    fn start(&self, id: &str, index: usize) -> InFlightGuard {
        let key = (id.to_string(), index);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        InFlightGuard {
            set: self.clone(),
            key,
        }
    }
}

/// Held by the worker for the length of one attempt.
pub struct InFlightGuard {
    set: InFlight,
    key: (String, usize),
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// A message was just made durable by a session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueued(pub Box<Envelope>);

/// Start no more deliveries; the sender hears once the running ones are
/// recorded. (A std channel: the node's handle waits on it from outside
/// any runtime.)
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain(pub std::sync::mpsc::Sender<()>);

/// A snapshot for status and tests: how many messages in each state.
#[derive(Message)]
#[rtype(result = "QueueCounts")]
pub struct Counts;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Being delivered or waiting for a free worker.
    pub active: usize,
    /// Waiting for their next attempt.
    pub deferred: usize,
    /// Parked: failed with no way to return them, or put aside.
    pub held: usize,
}

struct Tracked {
    envelope: Arc<Envelope>,
    /// Deliveries handed to a worker and not yet answered.
    running: usize,
    /// Deliveries waiting in `ready`.
    waiting: usize,
    deferred_until: Option<SystemTime>,
    /// A bounce is being sent.
    bouncing: bool,
    /// Bounces tried and failed temporarily, for their backoff.
    bounce_attempts: u32,
}

pub struct QueueRunner {
    spool: Spool,
    workers: Vec<Shared<Addr<DeliveryWorker>>>,
    next_worker: usize,
    concurrency: usize,
    running: usize,
    policy: QueuePolicy,
    /// A relay is configured: failed mail can be returned.
    can_bounce: bool,
    messages: HashMap<String, Tracked>,
    ready: VecDeque<(String, usize)>,
    deferred: BTreeSet<(SystemTime, String)>,
    wakeup: Option<SpawnHandle>,
    /// Removed from memory, not yet from disk: a rescan must not revive them.
    removing: std::collections::HashSet<String>,
    /// Result writes still to land before their message is settled.
    recording: usize,
    /// `runq` and `inetd`: one pass over what is due, then say so here.
    one_pass: Option<tokio::sync::oneshot::Sender<()>>,
    /// Shutting down: no new deliveries; these wait for the running ones.
    draining: Option<Vec<std::sync::mpsc::Sender<()>>>,
    in_flight: InFlight,
}

impl QueueRunner {
    /// A runner for one pass (`runq`, `inetd`): attempts what is due once,
    /// settles every result, and signals `done` instead of waiting for
    /// retry times.
    pub fn one_pass(
        spool: Spool,
        workers: Vec<Shared<Addr<DeliveryWorker>>>,
        concurrency: usize,
        policy: QueuePolicy,
        can_bounce: bool,
        due: Vec<Envelope>,
        done: tokio::sync::oneshot::Sender<()>,
    ) -> Self {
        let mut runner = Self::new(
            spool,
            workers,
            concurrency,
            policy,
            can_bounce,
            due,
            InFlight::default(),
        );
        runner.one_pass = Some(done);
        runner
    }

    /// `recovered`: what an earlier run left in the spool; `in_flight`: the
    /// registry of running deliveries shared with earlier runners.
    pub fn new(
        spool: Spool,
        workers: Vec<Shared<Addr<DeliveryWorker>>>,
        concurrency: usize,
        policy: QueuePolicy,
        can_bounce: bool,
        recovered: Vec<Envelope>,
        in_flight: InFlight,
    ) -> Self {
        let mut runner = QueueRunner {
            spool,
            workers,
            next_worker: 0,
            concurrency: concurrency.max(1),
            running: 0,
            policy,
            can_bounce,
            messages: HashMap::new(),
            ready: VecDeque::new(),
            deferred: BTreeSet::new(),
            wakeup: None,
            removing: std::collections::HashSet::new(),
            recording: 0,
            one_pass: None,
            draining: None,
            in_flight,
        };
        let now = SystemTime::now();
        for envelope in recovered {
            let due = envelope.next_attempt;
            let id = envelope.id.clone();
            let held = envelope.held;
            runner.track(envelope);
            if held {
                continue;
            }
            if due <= now {
                runner.make_ready(&id);
            } else {
                runner.defer(&id, due);
            }
        }
        runner
    }

    fn track(&mut self, envelope: Envelope) {
        self.messages.insert(
            envelope.id.clone(),
            Tracked {
                envelope: Arc::new(envelope),
                running: 0,
                waiting: 0,
                deferred_until: None,
                bouncing: false,
                bounce_attempts: 0,
            },
        );
    }

    /// Queues every pending delivery of a message for a worker.
    fn make_ready(&mut self, id: &str) {
        let Some(t) = self.messages.get_mut(id) else {
            return;
        };
        if t.envelope.held {
            return;
        }
        if t.waiting > 0 || t.running > 0 {
            // Already queued or running here: queuing again would run a
            // program twice.
            return;
        }
        t.deferred_until = None;
        let busy_elsewhere = t
            .envelope
            .pending()
            .any(|(i, _)| self.in_flight.contains(id, i));
        if busy_elsewhere {
            // A predecessor's attempt is still running: wait for it to end
            // (its result is lost with that runner; this one tries again).
            let until = SystemTime::now() + IN_FLIGHT_RECHECK;
            self.defer(id, until);
            return;
        }
        let pending: Vec<usize> = t.envelope.pending().map(|(i, _)| i).collect();
        t.waiting += pending.len();
        self.ready
            .extend(pending.into_iter().map(|i| (id.to_string(), i)));
    }

    fn defer(&mut self, id: &str, until: SystemTime) {
        if let Some(t) = self.messages.get_mut(id) {
            t.deferred_until = Some(until);
            self.deferred.insert((until, id.to_string()));
        }
    }

    fn worker(&mut self) -> Addr<DeliveryWorker> {
        let worker = self.workers[self.next_worker % self.workers.len()].get();
        self.next_worker = self.next_worker.wrapping_add(1);
        worker
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.running < self.concurrency && self.draining.is_none() {
            let Some((id, index)) = self.ready.pop_front() else {
                break;
            };
            let worker = self.worker();
            let Some(t) = self.messages.get_mut(&id) else {
                continue;
            };
            t.waiting -= 1;
            t.running += 1;
            self.running += 1;
            let request = worker.send(Deliver {
                envelope: Arc::clone(&t.envelope),
                index,
                body: self.spool.body_path(&id),
                in_flight: Some(self.in_flight.start(&id, index)),
            });
            ctx.spawn(request.into_actor(self).map(move |result, act, ctx| {
                let report = result.unwrap_or_else(|e| DeliveryReport {
                    status: DeliveryStatus::Temporary(format!("delivery worker lost: {e}")),
                    code: "4.3.0".into(),
                    duration: Duration::ZERO,
                    attempted: false,
                });
                act.on_report(id, index, report, ctx);
            }));
        }
    }

    fn on_report(
        &mut self,
        id: String,
        index: usize,
        report: DeliveryReport,
        ctx: &mut Context<Self>,
    ) {
        self.running -= 1;
        if let Some(t) = self.messages.get_mut(&id) {
            t.running -= 1;
            queue::record_result(
                Arc::make_mut(&mut t.envelope),
                index,
                &report.status,
                &report.code,
                report.attempted,
                SystemTime::now(),
            );
            self.record_then_settle(id, ctx);
        }
        self.dispatch(ctx);
        self.finish_pass_if_done();
    }

    /// The results are on disk before anything else is decided about the
    /// message; a crash before that means a second delivery, never a lost
    /// one. A failed write is retried: until it lands the message is not
    /// settled (not removed, not rescheduled).
    fn record_then_settle(&mut self, id: String, ctx: &mut Context<Self>) {
        let Some(t) = self.messages.get(&id) else {
            return;
        };
        // Every delivery done and nothing else running: removing the
        // message records that as well as a rewrite would (a crash before
        // the removal lands means a second delivery, never a lost one), and
        // saves two fsyncs per message.
        let all_delivered = t.running == 0
            && t.waiting == 0
            && !t.envelope.held
            && t.envelope
                .deliveries
                .iter()
                .all(|d| d.state == crate::spool::DeliveryState::Delivered);
        if all_delivered {
            self.settle(&id, ctx);
            return;
        }
        let persisted = self.spool.update((*t.envelope).clone()).wait();
        self.recording += 1;
        ctx.spawn(persisted.into_actor(self).map(move |result, act, ctx| {
            act.recording -= 1;
            match result {
                Ok(()) => act.settle(&id, ctx),
                Err(SpoolError::NotFound(_)) => act.forget(&id),
                Err(e) => {
                    tracing::error!(queue_id = %id, "cannot record delivery result, retrying: {e}");
                    act.recording += 1;
                    ctx.run_later(RECORD_RETRY, move |act, ctx| {
                        act.recording -= 1;
                        act.record_then_settle(id, ctx);
                    });
                }
            }
            act.finish_pass_if_done();
        }));
    }

    /// Once no delivery of the message is running or waiting, carries out
    /// the queue policy's decision.
    fn settle(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(t) = self.messages.get_mut(id) else {
            return;
        };
        let busy = t.running > 0 || t.waiting > 0 || t.bouncing;
        // A message held while its last delivery ran may be done anyway.
        let finished = t.envelope.deliveries.iter().all(|d| {
            matches!(
                d.state,
                crate::spool::DeliveryState::Delivered | crate::spool::DeliveryState::Bounced
            )
        });
        if busy || t.deferred_until.is_some() || (t.envelope.held && !finished) {
            return;
        }
        let now = SystemTime::now();
        let step = queue::next_step(
            Arc::make_mut(&mut t.envelope),
            now,
            &self.policy,
            self.can_bounce,
        );
        match step {
            Step::Remove => {
                self.messages.remove(id);
                self.removing.insert(id.to_string());
                let removal = self.spool.remove(id).wait();
                let owned = id.to_string();
                ctx.spawn(removal.into_actor(self).map(move |result, act, _| {
                    if let Err(e) = result {
                        tracing::error!(queue_id = %owned, "cannot remove finished message: {e}");
                    }
                    act.removing.remove(&owned);
                }));
                tracing::info!(queue_id = %id, "done with every recipient; removed");
            }
            Step::Defer(until) => {
                Arc::make_mut(&mut t.envelope).next_attempt = until;
                self.persist(id, ctx);
                tracing::info!(queue_id = %id, retry_in = ?until.duration_since(now).unwrap_or_default(), "deferred");
                self.defer(id, until);
                self.arm_wakeup(ctx);
            }
            Step::Hold(why) => {
                Arc::make_mut(&mut t.envelope).held = true;
                self.persist(id, ctx);
                tracing::warn!(queue_id = %id, "held: {why}");
            }
            Step::Bounce(failed) => {
                t.bouncing = true;
                let envelope = Arc::clone(&t.envelope);
                // The expiry the policy may just have recorded goes to disk
                // before the bounce is sent.
                self.persist(id, ctx);
                let request = self.worker().send(Bounce {
                    envelope,
                    failed: failed.clone(),
                });
                let owned = id.to_string();
                ctx.spawn(request.into_actor(self).map(move |result, act, ctx| {
                    let status = result.unwrap_or_else(|e| {
                        DeliveryStatus::Temporary(format!("delivery worker lost: {e}"))
                    });
                    act.on_bounced(owned, failed, status, ctx);
                    act.finish_pass_if_done();
                }));
            }
        }
    }

    fn on_bounced(
        &mut self,
        id: String,
        failed: Vec<usize>,
        status: DeliveryStatus,
        ctx: &mut Context<Self>,
    ) {
        let Some(t) = self.messages.get_mut(&id) else {
            return;
        };
        t.bouncing = false;
        match status {
            DeliveryStatus::Delivered => {
                queue::mark_bounced(Arc::make_mut(&mut t.envelope), &failed);
                self.record_then_settle(id, ctx);
            }
            DeliveryStatus::Temporary(why) => {
                t.bounce_attempts += 1;
                let now = SystemTime::now();
                let until = self
                    .policy
                    .later(now, self.policy.delay_after(t.bounce_attempts));
                tracing::warn!(queue_id = %id, "bounce not sent, will retry: {why}");
                // On disk too, so a restart or a `runq` keeps the backoff.
                Arc::make_mut(&mut t.envelope).next_attempt = until;
                self.persist(&id, ctx);
                self.defer(&id, until);
                self.arm_wakeup(ctx);
            }
            DeliveryStatus::Permanent(why) => {
                Arc::make_mut(&mut t.envelope).held = true;
                self.persist(&id, ctx);
                tracing::warn!(queue_id = %id, "held: the relay refused the bounce: {why}");
            }
        }
    }

    /// Writes the envelope as it is now; the message's fate does not wait.
    fn persist(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(t) = self.messages.get(id) else {
            return;
        };
        let update = self.spool.update((*t.envelope).clone()).wait();
        let owned = id.to_string();
        ctx.spawn(
            update
                .into_actor(self)
                .map(move |result, act, _| match result {
                    Ok(()) => {}
                    Err(SpoolError::NotFound(_)) => act.forget(&owned),
                    Err(e) => tracing::error!(queue_id = %owned, "cannot update queue file: {e}"),
                }),
        );
    }

    /// The message left the spool behind our back (an operator, another
    /// queue runner): stop working on it.
    fn forget(&mut self, id: &str) {
        if self.messages.remove(id).is_some() {
            tracing::warn!(queue_id = %id, "queue file gone; no longer tracked");
        }
    }

    fn counts(&self) -> QueueCounts {
        let mut counts = QueueCounts::default();
        for t in self.messages.values() {
            if t.envelope.held {
                counts.held += 1;
            } else if t.deferred_until.is_some() {
                counts.deferred += 1;
            } else {
                counts.active += 1;
            }
        }
        counts
    }

    /// In one-pass mode, signals the end once nothing is running, waiting,
    /// being recorded or being bounced.
    fn finish_pass_if_done(&mut self) {
        if self.running == 0 && self.recording == 0 {
            for waiter in self.draining.iter_mut().flat_map(|w| w.drain(..)) {
                let _ = waiter.send(());
            }
        }
        if self.one_pass.is_none() {
            return;
        }
        let busy = self.running > 0
            || !self.ready.is_empty()
            || self.recording > 0
            || self.messages.values().any(|t| t.bouncing);
        if !busy {
            if let Some(done) = self.one_pass.take() {
                let _ = done.send(());
            }
        }
    }

    /// Picks up messages other processes put in the queue (an `inetd`
    /// session that could not deliver them itself).
    fn rescan(&mut self, ctx: &mut Context<Self>) {
        let report = match self
            .spool
            .scan_new(|id| self.messages.contains_key(id) || self.removing.contains(id))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot scan the queue: {e}");
                return;
            }
        };
        let now = SystemTime::now();
        for envelope in report {
            let id = envelope.id.clone();
            let (due, held) = (envelope.next_attempt, envelope.held);
            tracing::info!(queue_id = %id, "picked up from the queue directory");
            self.track(envelope);
            if held {
                continue;
            }
            if due <= now {
                self.make_ready(&id);
                self.settle(&id, ctx);
            } else {
                self.defer(&id, due);
            }
        }
        self.dispatch(ctx);
        self.arm_wakeup(ctx);
    }

    /// Wakes at the earliest deferred time.
    fn arm_wakeup(&mut self, ctx: &mut Context<Self>) {
        if self.one_pass.is_some() {
            // One pass attempts what is due now; later is for the daemon.
            return;
        }
        if let Some(handle) = self.wakeup.take() {
            ctx.cancel_future(handle);
        }
        if let Some((due, _)) = self.deferred.first() {
            let delay = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            self.wakeup = Some(ctx.run_later(delay, |act, ctx| {
                act.wakeup = None;
                act.release_due(ctx);
            }));
        }
    }

    fn release_due(&mut self, ctx: &mut Context<Self>) {
        let now = SystemTime::now();
        while let Some((due, id)) = self.deferred.first().cloned() {
            if due > now {
                break;
            }
            self.deferred.pop_first();
            let current = self.messages.get(&id).and_then(|t| t.deferred_until);
            if current == Some(due) {
                self.make_ready(&id);
                // Nothing pending (a bounce to retry, or a clock that stepped
                // back across a restart): settle instead of forgetting it.
                self.settle(&id, ctx);
            }
        }
        self.dispatch(ctx);
        self.arm_wakeup(ctx);
    }
}

impl Actor for QueueRunner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // A crash between recording the last result and acting on it leaves
        // messages with nothing pending: finish what was decided.
        let undecided: Vec<String> = self
            .messages
            .iter()
            .filter(|(_, t)| {
                !t.envelope.held
                    && t.deferred_until.is_none()
                    && t.envelope.pending().next().is_none()
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in undecided {
            self.settle(&id, ctx);
        }
        self.dispatch(ctx);
        self.arm_wakeup(ctx);
        if self.one_pass.is_none() {
            let every = self.policy.retry_min.clamp(RESCAN_MIN, RESCAN_MAX);
            ctx.run_interval(every, |act, ctx| act.rescan(ctx));
            crate::telemetry::queue_max_age(self.policy.max_age);
            ctx.run_interval(GAUGE_EVERY, |act, _| {
                let c = act.counts();
                crate::telemetry::queue_sizes(c.active, c.deferred, c.held);
                let now = SystemTime::now();
                let oldest = act
                    .messages
                    .values()
                    .filter(|t| !t.envelope.held)
                    .filter_map(|t| now.duration_since(t.envelope.arrival).ok())
                    .max()
                    .unwrap_or_default();
                crate::telemetry::queue_oldest(oldest);
            });
        }
        self.finish_pass_if_done();
    }
}

impl Handler<Enqueued> for QueueRunner {
    type Result = ();

    fn handle(&mut self, msg: Enqueued, ctx: &mut Self::Context) {
        let id = msg.0.id.clone();
        if self.messages.contains_key(&id) || self.removing.contains(&id) {
            // A rescan found it on disk first.
            return;
        }
        self.track(*msg.0);
        self.make_ready(&id);
        // A message whose every delivery failed at intake (a mail loop)
        // has nothing to run: return it at once.
        self.settle(&id, ctx);
        self.dispatch(ctx);
    }
}

impl Handler<Drain> for QueueRunner {
    type Result = ();

    fn handle(&mut self, msg: Drain, _: &mut Self::Context) {
        self.draining.get_or_insert_with(Vec::new).push(msg.0);
        self.finish_pass_if_done();
    }
}

impl Handler<Counts> for QueueRunner {
    type Result = MessageResult<Counts>;

    fn handle(&mut self, _: Counts, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.counts())
    }
}

/// What an operator asks of the queue (`mailnode ctl queue ...`).
#[derive(Debug, Clone)]
pub enum QueueCommand {
    List,
    Show(String),
    /// Attempt now: one message, or every deferred one.
    Flush(Option<String>),
    Delete(String),
    Hold(String),
    Release(String),
    /// Return to the sender now what is not yet delivered.
    Bounce(String),
}

/// A [`QueueCommand`]; answered with the data of the reply or an error.
#[derive(Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
pub struct Control(pub QueueCommand);

impl QueueRunner {
    fn state_of(t: &Tracked) -> &'static str {
        if t.envelope.held {
            "held"
        } else if t.deferred_until.is_some() {
            "deferred"
        } else {
            "active"
        }
    }

    fn entry(t: &Tracked, with_history: bool) -> crate::control::QueueEntry {
        use crate::control::{AttemptEntry, QueueEntry, RecipientEntry};
        use crate::spool::DeliveryState;
        let env = &t.envelope;
        let now = SystemTime::now();
        let recipients = env
            .deliveries
            .iter()
            .map(|d| RecipientEntry {
                address: d.recipient.clone(),
                original: d.original_recipient.clone(),
                state: match d.state {
                    DeliveryState::Pending => "pending",
                    DeliveryState::Delivered => "delivered",
                    DeliveryState::Failed => "failed",
                    DeliveryState::Bounced => "bounced",
                }
                .into(),
                attempts: d.attempts,
                last_error: d.last_error.clone(),
                history: if with_history {
                    d.history
                        .iter()
                        .map(|a| AttemptEntry {
                            at: humantime::format_rfc3339_seconds(a.at).to_string(),
                            status: a.status.clone(),
                            diagnostic: a.diagnostic.clone(),
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            })
            .collect::<Vec<_>>();
        QueueEntry {
            id: env.id.clone(),
            state: Self::state_of(t).into(),
            sender: env.sender.clone(),
            size: env.size,
            age_seconds: now.duration_since(env.arrival).map_or(0, |d| d.as_secs()),
            next_attempt_seconds: t
                .deferred_until
                .map(|at| at.duration_since(now).map_or(0, |d| d.as_secs())),
            last_error: env
                .deliveries
                .iter()
                .rev()
                .find(|d| !d.last_error.is_empty())
                .map(|d| d.last_error.clone())
                .unwrap_or_default(),
            recipients,
        }
    }

    fn control(
        &mut self,
        command: QueueCommand,
        ctx: &mut Context<Self>,
    ) -> Result<serde_json::Value, String> {
        let known = |runner: &Self, id: &str| {
            if runner.messages.contains_key(id) {
                Ok(())
            } else {
                Err(format!("no queued message {id}"))
            }
        };
        match command {
            QueueCommand::List => {
                let mut entries: Vec<_> = self
                    .messages
                    .values()
                    .map(|t| Self::entry(t, false))
                    .collect();
                entries.sort_by(|a, b| a.id.cmp(&b.id));
                serde_json::to_value(entries).map_err(|e| e.to_string())
            }
            QueueCommand::Show(id) => {
                known(self, &id)?;
                let t = &self.messages[&id];
                let mut v =
                    serde_json::to_value(Self::entry(t, true)).map_err(|e| e.to_string())?;
                let env = &t.envelope;
                v["client_address"] = env.client_address.clone().into();
                v["client_helo"] = env.client_helo.clone().into();
                v["channel"] = env.channel.clone().into();
                v["arrival"] = humantime::format_rfc3339_seconds(env.arrival)
                    .to_string()
                    .into();
                Ok(v)
            }
            QueueCommand::Flush(which) => {
                let ids: Vec<String> = match which {
                    Some(id) => {
                        known(self, &id)?;
                        if self.messages[&id].envelope.held {
                            return Err(format!("{id} is held; release it first"));
                        }
                        vec![id]
                    }
                    None => self
                        .messages
                        .iter()
                        .filter(|(_, t)| t.deferred_until.is_some() && !t.envelope.held)
                        .map(|(id, _)| id.clone())
                        .collect(),
                };
                for id in &ids {
                    if self
                        .messages
                        .get(id)
                        .is_some_and(|t| t.deferred_until.is_some())
                    {
                        self.make_ready(id);
                        self.settle(id, ctx);
                    }
                }
                self.dispatch(ctx);
                Ok(serde_json::json!({ "flushed": ids }))
            }
            QueueCommand::Delete(id) => {
                known(self, &id)?;
                let t = &self.messages[&id];
                if t.running > 0 || t.bouncing {
                    return Err(format!("{id} is being delivered; try again in a moment"));
                }
                self.ready.retain(|(r, _)| *r != id);
                self.messages.remove(&id);
                self.removing.insert(id.clone());
                let removal = self.spool.remove(&id).wait();
                let owned = id.clone();
                ctx.spawn(removal.into_actor(self).map(move |result, act, _| {
                    if let Err(e) = result {
                        tracing::error!(queue_id = %owned, "cannot delete message: {e}");
                    }
                    act.removing.remove(&owned);
                }));
                tracing::info!(queue_id = %id, "deleted by the operator");
                Ok(serde_json::json!({ "deleted": id }))
            }
            QueueCommand::Hold(id) => {
                known(self, &id)?;
                self.ready.retain(|(r, _)| *r != id);
                if let Some(t) = self.messages.get_mut(&id) {
                    t.waiting = 0;
                    Arc::make_mut(&mut t.envelope).held = true;
                }
                self.persist(&id, ctx);
                tracing::info!(queue_id = %id, "held by the operator");
                Ok(serde_json::json!({ "held": id }))
            }
            QueueCommand::Release(id) => {
                known(self, &id)?;
                if !self.messages[&id].envelope.held {
                    return Err(format!("{id} is not held"));
                }
                if let Some(t) = self.messages.get_mut(&id) {
                    Arc::make_mut(&mut t.envelope).held = false;
                    t.deferred_until = None;
                }
                self.persist(&id, ctx);
                self.make_ready(&id);
                self.settle(&id, ctx);
                self.dispatch(ctx);
                tracing::info!(queue_id = %id, "released by the operator");
                Ok(serde_json::json!({ "released": id }))
            }
            QueueCommand::Bounce(id) => {
                known(self, &id)?;
                let t = &self.messages[&id];
                if t.running > 0 || t.bouncing {
                    return Err(format!("{id} is being delivered; try again in a moment"));
                }
                if t.envelope.sender.is_empty() {
                    return Err(format!("{id} is from <>: it is never returned"));
                }
                if !self.can_bounce {
                    return Err(format!("{id} cannot be returned: no [relay] is configured"));
                }
                self.ready.retain(|(r, _)| *r != id);
                if let Some(t) = self.messages.get_mut(&id) {
                    t.waiting = 0;
                    t.deferred_until = None;
                    let env = Arc::make_mut(&mut t.envelope);
                    env.held = false;
                    let now = SystemTime::now();
                    for d in env
                        .deliveries
                        .iter_mut()
                        .filter(|d| d.state == crate::spool::DeliveryState::Pending)
                    {
                        d.state = crate::spool::DeliveryState::Failed;
                        d.last_error =
                            format!("returned by the operator; last error: {}", d.last_error);
                        let why = d.last_error.clone();
                        d.record(now, "5.0.0", &why);
                    }
                }
                self.record_then_settle(id.clone(), ctx);
                Ok(serde_json::json!({ "bounced": id }))
            }
        }
    }
}

impl Handler<Control> for QueueRunner {
    type Result = Result<serde_json::Value, String>;

    fn handle(&mut self, msg: Control, ctx: &mut Self::Context) -> Self::Result {
        self.control(msg.0, ctx)
    }
}

//! QueueRunner (≈ Postfix's qmgr): knows every queued message, hands each
//! pending delivery to a DeliveryWorker as soon as the message is durable,
//! records every result in the spool before deciding anything else about
//! the message, and schedules retries with a doubling backoff.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::actors::delivery_worker::{Deliver, DeliveryReport, DeliveryWorker};
use crate::delivery::program::DeliveryStatus;
use crate::spool::{DeliveryState, Envelope, Spool};

/// How soon a failed write of delivery results is tried again.
const RECORD_RETRY: Duration = Duration::from_secs(1);

/// A message was just made durable by a session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueued(pub Box<Envelope>);

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
    /// Parked: failed permanently with no way to return them, or put aside.
    pub held: usize,
}

/// Retry timing.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl RetryPolicy {
    /// The wait after the `attempts`-th failed attempt: `retry_min` doubling
    /// each attempt, never above `retry_max`.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(32);
        self.retry_min
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.retry_max)
    }
}

struct Tracked {
    envelope: Arc<Envelope>,
    /// Deliveries handed to a worker and not yet answered.
    running: usize,
    /// Deliveries waiting in `ready`.
    waiting: usize,
    deferred_until: Option<SystemTime>,
}

pub struct QueueRunner {
    spool: Spool,
    workers: Vec<Addr<DeliveryWorker>>,
    next_worker: usize,
    concurrency: usize,
    running: usize,
    retry: RetryPolicy,
    messages: HashMap<String, Tracked>,
    ready: VecDeque<(String, usize)>,
    deferred: BTreeSet<(SystemTime, String)>,
    wakeup: Option<SpawnHandle>,
}

impl QueueRunner {
    /// `recovered`: what an earlier run left in the spool.
    pub fn new(
        spool: Spool,
        workers: Vec<Addr<DeliveryWorker>>,
        concurrency: usize,
        retry: RetryPolicy,
        recovered: Vec<Envelope>,
    ) -> Self {
        let mut runner = QueueRunner {
            spool,
            workers,
            next_worker: 0,
            concurrency: concurrency.max(1),
            running: 0,
            retry,
            messages: HashMap::new(),
            ready: VecDeque::new(),
            deferred: BTreeSet::new(),
            wakeup: None,
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
            },
        );
    }

    /// Queues every pending delivery of a message for a worker.
    fn make_ready(&mut self, id: &str) {
        let Some(t) = self.messages.get_mut(id) else {
            return;
        };
        t.deferred_until = None;
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

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.running < self.concurrency {
            let Some((id, index)) = self.ready.pop_front() else {
                break;
            };
            let Some(t) = self.messages.get_mut(&id) else {
                continue;
            };
            t.waiting -= 1;
            t.running += 1;
            self.running += 1;
            let worker = &self.workers[self.next_worker % self.workers.len()];
            self.next_worker = self.next_worker.wrapping_add(1);
            let request = worker.send(Deliver {
                envelope: Arc::clone(&t.envelope),
                index,
            });
            ctx.spawn(request.into_actor(self).map(move |result, act, ctx| {
                let report = result.unwrap_or_else(|e| DeliveryReport {
                    status: DeliveryStatus::Temporary(format!("delivery worker lost: {e}")),
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
        let Some(t) = self.messages.get_mut(&id) else {
            self.dispatch(ctx);
            return;
        };
        t.running -= 1;
        if let Some(d) = Arc::make_mut(&mut t.envelope).deliveries.get_mut(index) {
            if report.attempted {
                d.attempts += 1;
                d.last_attempt = Some(SystemTime::now());
            }
            match report.status {
                DeliveryStatus::Delivered => {
                    d.state = DeliveryState::Delivered;
                    d.last_error.clear();
                }
                DeliveryStatus::Temporary(why) => d.last_error = why,
                DeliveryStatus::Permanent(why) => {
                    d.state = DeliveryState::Failed;
                    d.last_error = why;
                }
            }
        }
        self.record_then_settle(id, ctx);
        self.dispatch(ctx);
    }

    /// The results are on disk before anything else is decided about the
    /// message; a crash before that means a second delivery, never a lost
    /// one. A failed write is retried: until it lands the message is not
    /// settled (not removed, not rescheduled).
    fn record_then_settle(&mut self, id: String, ctx: &mut Context<Self>) {
        let Some(t) = self.messages.get(&id) else {
            return;
        };
        let persisted = self.spool.update((*t.envelope).clone()).wait();
        ctx.spawn(persisted.into_actor(self).map(move |result, act, ctx| match result {
            Ok(()) => act.settle(&id, ctx),
            Err(e) => {
                tracing::error!(queue_id = %id, "cannot record delivery result, retrying: {e}");
                ctx.run_later(RECORD_RETRY, move |act, ctx| act.record_then_settle(id, ctx));
            }
        }));
    }

    /// Once no delivery of the message is running or waiting: remove it,
    /// schedule its retry, or hold it.
    fn settle(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(t) = self.messages.get_mut(id) else {
            return;
        };
        if t.running > 0 || t.waiting > 0 || t.deferred_until.is_some() || t.envelope.held {
            return;
        }
        let env = &t.envelope;
        let pending_attempts = env.pending().map(|(_, d)| d.attempts).min();
        let failed = env
            .deliveries
            .iter()
            .any(|d| d.state == DeliveryState::Failed);
        match pending_attempts {
            Some(attempts) => {
                let now = SystemTime::now();
                let until = now
                    .checked_add(self.retry.delay_after(attempts))
                    .unwrap_or(now + Duration::from_secs(86400));
                let envelope = Arc::make_mut(&mut t.envelope);
                envelope.next_attempt = until;
                let update = self.spool.update(envelope.clone()).wait();
                let id_owned = id.to_string();
                ctx.spawn(update.into_actor(self).map(move |result, _, _| {
                    if let Err(e) = result {
                        tracing::error!(queue_id = %id_owned, "cannot record retry time: {e}");
                    }
                }));
                tracing::info!(queue_id = %id, retry_in = ?self.retry.delay_after(attempts), "deferred");
                self.defer(id, until);
                self.arm_wakeup(ctx);
            }
            None if failed => {
                // Returning mail to its sender needs [relay]; until it can be
                // sent the message is kept, visibly, as held.
                let envelope = Arc::make_mut(&mut t.envelope);
                envelope.held = true;
                let update = self.spool.update(envelope.clone()).wait();
                let id_owned = id.to_string();
                ctx.spawn(update.into_actor(self).map(move |result, _, _| {
                    if let Err(e) = result {
                        tracing::error!(queue_id = %id_owned, "cannot hold message: {e}");
                    }
                }));
                tracing::warn!(queue_id = %id, "failed permanently; held (no bounce can be sent)");
            }
            None => {
                self.messages.remove(id);
                let removal = self.spool.remove(id).wait();
                let id_owned = id.to_string();
                ctx.spawn(removal.into_actor(self).map(move |result, _, _| {
                    if let Err(e) = result {
                        tracing::error!(queue_id = %id_owned, "cannot remove delivered message: {e}");
                    }
                }));
                tracing::info!(queue_id = %id, "delivered to every recipient; removed");
            }
        }
    }

    /// Wakes at the earliest deferred time.
    fn arm_wakeup(&mut self, ctx: &mut Context<Self>) {
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
                // Nothing pending (a clock that stepped back across a
                // restart): finish the message instead of forgetting it.
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
            .filter(|(_, t)| !t.envelope.held && t.envelope.pending().next().is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in undecided {
            self.settle(&id, ctx);
        }
        self.dispatch(ctx);
        self.arm_wakeup(ctx);
    }
}

impl Handler<Enqueued> for QueueRunner {
    type Result = ();

    fn handle(&mut self, msg: Enqueued, ctx: &mut Self::Context) {
        let id = msg.0.id.clone();
        self.track(*msg.0);
        self.make_ready(&id);
        self.dispatch(ctx);
    }
}

impl Handler<Counts> for QueueRunner {
    type Result = MessageResult<Counts>;

    fn handle(&mut self, _: Counts, _: &mut Self::Context) -> Self::Result {
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
        MessageResult(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_retry_min_to_retry_max() {
        let p = RetryPolicy {
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
        };
        let delays: Vec<u64> = (1..=8).map(|a| p.delay_after(a).as_secs()).collect();
        assert_eq!(delays, vec![60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(p.delay_after(1000).as_secs(), 3600);
    }
}

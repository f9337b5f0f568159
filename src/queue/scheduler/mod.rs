//! The queue scheduler (≈ the state half of Postfix's qmgr), pure: it knows
//! every queued message and which of its deliveries are waiting, running or
//! deferred. Events come in as method calls (a message enqueued or picked up
//! from disk, a delivery's report, a write that landed, a retry that fell
//! due, an operator's command); what to do about them comes out as
//! [`Command`]s, taken with [`Scheduler::take_commands`] and carried out by
//! the QueueRunner actor, which reports each outcome back as another event.
//! Nothing here touches a file, a socket or a clock (`now` is always
//! given); the one thing shared is the registry of deliveries still running
//! for an earlier runner ([`InFlight`]), which it only reads.
//!
//! The rule that keeps mail safe: a delivery's result is recorded in the
//! spool ([`Command::Record`]) before anything else is decided about its
//! message, so a crash means a second delivery, never a lost one.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::aliases::Target;
use crate::delivery::http::host_of;
use crate::delivery::status::DeliveryStatus;
use crate::delivery::DeliveryReport;
use crate::queue::reexpand::{reexpand, Change};
use crate::queue::{next_step, record_result, Aliases, InFlight, QueuePolicy, Step};
use crate::spool::{DeliveryState, Disposal, Envelope, SpoolError};

mod operator;
mod ready;

use ready::Ready;

/// How soon a message whose delivery another (dead) runner started is
/// looked at again.
const IN_FLIGHT_RECHECK: Duration = Duration::from_secs(1);

/// Whether a message is being tried for the first time since it was
/// accepted, or again (a retry, an operator's flush or release, a pick-up
/// from disk): only then are its aliases expanded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    First,
    Again,
}

fn log_reexpansion(id: &str, changes: &[Change]) {
    for change in changes {
        match change {
            Change::Vanished { recipient, failed } => tracing::info!(
                queue_id = %id,
                %recipient,
                deliveries = failed,
                "the recipient's alias is gone: returning its pending deliveries (5.1.1)"
            ),
            Change::Retargeted {
                recipient,
                superseded,
                added,
            } => tracing::info!(
                queue_id = %id,
                %recipient,
                superseded,
                added,
                "the recipient's alias changed: retrying with the aliases in force"
            ),
        }
    }
}

/// Work for the QueueRunner; each names the event that answers it.
#[derive(Debug)]
pub(crate) enum Command {
    /// Attempt delivery `index`; answer with [`Scheduler::delivered`].
    Dispatch {
        id: String,
        index: usize,
        envelope: Arc<Envelope>,
    },
    /// Write delivery results; answer with [`Scheduler::recorded`].
    Record { id: String, envelope: Envelope },
    /// Write the envelope as it is now; the message's fate does not wait,
    /// unless `expansion`: then its deliveries, which a retry's alias
    /// expansion changed, wait for it. Answer with [`Scheduler::persisted`].
    Persist {
        id: String,
        envelope: Envelope,
        expansion: bool,
    },
    /// Try [`Command::Record`] again after a while: answer with
    /// [`Scheduler::record_again`].
    RecordLater { id: String },
    /// Remove the message from the spool; answer with [`Scheduler::removed`].
    Remove { id: String, why: Removal },
    /// Return deliveries `failed` to the sender; answer with
    /// [`Scheduler::bounced`].
    Bounce {
        id: String,
        envelope: Arc<Envelope>,
        failed: Vec<usize>,
    },
    /// The earliest deferred message falls due then: call
    /// [`Scheduler::due`]. Replaces any earlier wake-up.
    WakeAt(SystemTime),
    /// One-pass mode: everything that was due has been attempted and
    /// settled.
    PassDone,
    /// Draining: nothing is running or being recorded any more.
    Drained,
}

/// Why a message leaves the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Every recipient delivered: its files may be reused.
    Delivered,
    /// Done, some of it returned to its sender: erased, not reused.
    Returned,
    /// `ctl queue delete`: erased, not reused.
    Deleted,
}

impl Removal {
    /// Only a delivered message's files may hold the next ones: deleted or
    /// returned mail leaves no copy behind.
    pub(crate) fn disposal(self) -> Disposal {
        match self {
            Removal::Delivered => Disposal::Recycle,
            Removal::Returned | Removal::Deleted => Disposal::Erase,
        }
    }

    /// What the log says once the removal is durable.
    pub(crate) fn done(self) -> &'static str {
        match self {
            Removal::Delivered | Removal::Returned => "done with every recipient; removed",
            Removal::Deleted => "deleted by the operator; removed",
        }
    }

    /// What the log says when the removal failed.
    pub(crate) fn failed(self) -> &'static str {
        match self {
            Removal::Delivered | Removal::Returned => "cannot remove finished message",
            Removal::Deleted => "cannot delete message",
        }
    }
}

/// Where a message stands, as `ctl queue` and the gauges show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageState {
    /// Being delivered, or waiting for a free worker.
    Active,
    /// Waiting for its next attempt.
    Deferred,
    /// Parked: failed with no way to return it, or put aside.
    Held,
}

impl MessageState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MessageState::Active => "active",
            MessageState::Deferred => "deferred",
            MessageState::Held => "held",
        }
    }
}

/// A snapshot for status and tests: how many messages in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Being delivered or waiting for a free worker.
    pub active: usize,
    /// Waiting for their next attempt.
    pub deferred: usize,
    /// Parked: failed with no way to return them, or put aside.
    pub held: usize,
}

/// One queued message, read-only, for the control protocol.
pub(crate) struct MessageView<'a> {
    pub(crate) envelope: &'a Envelope,
    pub(crate) state: MessageState,
    /// When it is next attempted (deferred messages).
    pub(crate) next_attempt: Option<SystemTime>,
}

/// One message of a listing. The envelope is shared with the scheduler,
/// not copied: a listing of a long queue costs a pointer per message.
pub(crate) struct Listed {
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) state: MessageState,
    pub(crate) next_attempt: Option<SystemTime>,
}

impl Listed {
    pub(crate) fn view(&self) -> MessageView<'_> {
        MessageView {
            envelope: &self.envelope,
            state: self.state,
            next_attempt: self.next_attempt,
        }
    }
}

/// Why an operator's command was refused; the text is the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OperatorError {
    #[error("no queued message {0}")]
    NotQueued(String),
    #[error("{0} is held; release it first")]
    Held(String),
    #[error("{0} is not held")]
    NotHeld(String),
    #[error("{0} is being delivered; try again in a moment")]
    Busy(String),
    #[error("{0} is from <>: it is never returned")]
    FromNullSender(String),
    #[error("{0} cannot be returned: no [relay] is configured")]
    NoRelay(String),
}

/// `serve` keeps running and waits for retry times; `runq` and `inetd`
/// attempt what is due once, settle every result and say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Daemon,
    OnePass,
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
    /// Its deliveries wait for the envelope a retry's alias expansion
    /// changed to be written (see [`Command::Persist`]).
    recording_expansion: bool,
    /// The latest time a target of this round asked not to be tried
    /// before (an HTTP `Retry-After`).
    not_before: Option<SystemTime>,
}

impl Tracked {
    fn state(&self) -> MessageState {
        if self.envelope.held {
            MessageState::Held
        } else if self.deferred_until.is_some() {
            MessageState::Deferred
        } else {
            MessageState::Active
        }
    }

    fn view(&self) -> MessageView<'_> {
        MessageView {
            envelope: &self.envelope,
            state: self.state(),
            next_attempt: self.deferred_until,
        }
    }

    fn is_busy(&self) -> bool {
        self.running > 0 || self.waiting > 0 || self.bouncing || self.recording_expansion
    }
}

pub(crate) struct Scheduler {
    policy: QueuePolicy,
    /// A relay is configured: failed mail can be returned.
    can_bounce: bool,
    concurrency: usize,
    mode: Mode,
    in_flight: InFlight,
    /// The aliases in force, for retries (see `queue::reexpand`); `None`:
    /// retries keep the targets a message was accepted with.
    aliases: Option<Aliases>,
    messages: HashMap<String, Tracked>,
    ready: Ready,
    /// `[http] max_per_host`: HTTP deliveries to one host at once.
    max_per_host: usize,
    /// Running HTTP deliveries, with their host; the others hold one of
    /// `concurrency`'s slots.
    running_http: HashMap<(String, usize), String>,
    running_slots: usize,
    /// May hold stale entries: an entry counts only while it matches its
    /// message's `deferred_until`.
    deferred: BTreeSet<(SystemTime, String)>,
    /// Removed from memory, not yet from disk: a rescan must not revive them.
    removing: HashSet<String>,
    /// Dispatches not yet answered.
    running: usize,
    /// Result writes not yet landed (waiting to be retried included).
    recording: usize,
    /// Bounces not yet answered.
    bouncing: usize,
    /// Shutting down: no new deliveries.
    draining: bool,
    pass_done: bool,
    /// The wake-up last asked for.
    armed: Option<SystemTime>,
    commands: Vec<Command>,
}

impl Scheduler {
    /// `in_flight`: the registry of running deliveries shared with earlier
    /// schedulers of the same spool.
    pub(crate) fn new(
        policy: QueuePolicy,
        can_bounce: bool,
        concurrency: usize,
        mode: Mode,
        in_flight: InFlight,
    ) -> Self {
        Scheduler {
            policy,
            can_bounce,
            concurrency: concurrency.max(1),
            mode,
            in_flight,
            aliases: None,
            messages: HashMap::new(),
            ready: Ready::default(),
            max_per_host: 8,
            running_http: HashMap::new(),
            running_slots: 0,
            deferred: BTreeSet::new(),
            removing: HashSet::new(),
            running: 0,
            recording: 0,
            bouncing: 0,
            draining: false,
            pass_done: false,
            armed: None,
            commands: Vec::new(),
        }
    }

    /// At most `max_per_host` HTTP deliveries to one host at once.
    pub(crate) fn with_max_per_host(mut self, max_per_host: usize) -> Self {
        self.max_per_host = max_per_host.max(1);
        self
    }

    /// Retries expand their recipients' aliases again with `aliases`.
    pub(crate) fn with_aliases(mut self, aliases: Aliases) -> Self {
        self.aliases = Some(aliases);
        self
    }

    /// What is to be done now; empties the list.
    #[must_use]
    pub(crate) fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    // --- events ---------------------------------------------------------

    /// Messages found in the spool: what an earlier run left (before
    /// [`Scheduler::start`]), or what another process (`mailnode inetd`)
    /// put there since.
    pub(crate) fn picked_up(&mut self, envelopes: Vec<Envelope>, now: SystemTime) {
        // The wake-up timer runs on a monotonic clock: after the wall clock
        // jumped (a suspended VM, an NTP step) it may be far off. Each
        // rescan asks for it afresh, so due retries go out within one
        // rescan interval.
        self.armed = None;
        for envelope in envelopes {
            let id = envelope.id.clone();
            let (due, held) = (envelope.next_attempt, envelope.held);
            self.track(envelope);
            if held {
                continue;
            }
            if due <= now {
                self.make_ready(&id, Round::Again, now);
                // Nothing pending (a crash between recording the last
                // result and acting on it): finish what was decided.
                self.settle(&id, now);
            } else {
                self.defer(&id, due);
            }
        }
        self.after_event();
    }

    /// The runner has started: work may be handed out.
    pub(crate) fn start(&mut self) {
        self.after_event();
    }

    /// A session made a message durable.
    pub(crate) fn enqueued(&mut self, envelope: Envelope, now: SystemTime) {
        let id = envelope.id.clone();
        if self.knows(&id) {
            // A rescan found it on disk first.
            return;
        }
        self.track(envelope);
        self.make_ready(&id, Round::First, now);
        // A message whose every delivery failed at intake (a mail loop)
        // has nothing to run: return it at once.
        self.settle(&id, now);
        self.after_event();
    }

    /// The answer to [`Command::Dispatch`].
    pub(crate) fn delivered(
        &mut self,
        id: String,
        index: usize,
        report: DeliveryReport,
        now: SystemTime,
    ) {
        self.running -= 1;
        match self.running_http.remove(&(id.clone(), index)) {
            Some(host) => self.ready.http_done(&host),
            None => self.running_slots -= 1,
        }
        if let Some(t) = self.messages.get_mut(&id) {
            t.running -= 1;
            if let Some(wait) = report.retry_after {
                let asked = self.policy.later(now, wait);
                t.not_before = t.not_before.max(Some(asked));
            }
            record_result(
                Arc::make_mut(&mut t.envelope),
                index,
                &report.status,
                report.attempted,
                now,
            );
            self.record_then_settle(id, now);
        }
        self.after_event();
    }

    /// The answer to [`Command::Record`].
    pub(crate) fn recorded(&mut self, id: String, result: Result<(), SpoolError>, now: SystemTime) {
        match result {
            Ok(()) => {
                self.recording -= 1;
                self.settle(&id, now);
            }
            Err(SpoolError::NotFound(_)) => {
                self.recording -= 1;
                self.forget(&id);
            }
            Err(e) => {
                // Until the write lands the message is not settled (not
                // removed, not rescheduled); it stays counted as recording.
                tracing::error!(queue_id = %id, "cannot record delivery result, retrying: {e}");
                self.commands.push(Command::RecordLater { id });
            }
        }
        self.after_event();
    }

    /// The answer to [`Command::RecordLater`].
    pub(crate) fn record_again(&mut self, id: String, now: SystemTime) {
        self.recording -= 1;
        self.record_then_settle(id, now);
        self.after_event();
    }

    /// The answer to [`Command::Persist`].
    pub(crate) fn persisted(
        &mut self,
        id: &str,
        result: Result<(), SpoolError>,
        expansion: bool,
        now: SystemTime,
    ) {
        if expansion {
            self.recording -= 1;
            if let Some(t) = self.messages.get_mut(id) {
                t.recording_expansion = false;
            }
        }
        match result {
            Ok(()) if expansion => {
                self.make_ready(id, Round::First, now);
                self.settle(id, now);
            }
            Ok(()) => {}
            Err(SpoolError::NotFound(_)) => self.forget(id),
            Err(e) => {
                tracing::error!(queue_id = %id, "cannot update queue file: {e}");
                if expansion {
                    // Expanded again, and written, at the next try.
                    self.defer(id, now + IN_FLIGHT_RECHECK);
                }
            }
        }
        self.after_event();
    }

    /// The answer to [`Command::Remove`], whether or not it succeeded (the
    /// runner logs a failure; the file is then the next start-up's to
    /// judge).
    pub(crate) fn removed(&mut self, id: &str) {
        self.removing.remove(id);
        self.after_event();
    }

    /// The answer to [`Command::Bounce`].
    pub(crate) fn bounced(
        &mut self,
        id: String,
        failed: Vec<usize>,
        status: DeliveryStatus,
        now: SystemTime,
    ) {
        self.bouncing -= 1;
        if let Some(t) = self.messages.get_mut(&id) {
            t.bouncing = false;
            match status {
                DeliveryStatus::Delivered(_) => {
                    crate::queue::policy::mark_bounced(Arc::make_mut(&mut t.envelope), &failed);
                    self.record_then_settle(id, now);
                }
                DeliveryStatus::Temporary(_, why) => {
                    t.bounce_attempts += 1;
                    let until = self
                        .policy
                        .later(now, self.policy.delay_after(t.bounce_attempts));
                    tracing::warn!(queue_id = %id, "bounce not sent, will retry: {why}");
                    // On disk too, so a restart or a `runq` keeps the backoff.
                    Arc::make_mut(&mut t.envelope).next_attempt = until;
                    self.persist(&id);
                    self.defer(&id, until);
                }
                DeliveryStatus::Permanent(_, why) => {
                    Arc::make_mut(&mut t.envelope).held = true;
                    self.persist(&id);
                    tracing::warn!(queue_id = %id, "held: the relay refused the bounce: {why}");
                }
            }
        }
        self.after_event();
    }

    /// The wake-up asked for by [`Command::WakeAt`]: releases every
    /// deferred message that is due.
    pub(crate) fn due(&mut self, now: SystemTime) {
        self.armed = None;
        while let Some((due, id)) = self.deferred.first().cloned() {
            if due > now {
                break;
            }
            self.deferred.pop_first();
            let current = self.messages.get(&id).and_then(|t| t.deferred_until);
            if current == Some(due) {
                self.make_ready(&id, Round::Again, now);
                // Nothing pending (a bounce to retry, or a clock that stepped
                // back across a restart): settle instead of forgetting it.
                self.settle(&id, now);
            }
        }
        self.after_event();
    }

    /// Start no more deliveries; [`Command::Drained`] follows once the
    /// running ones are recorded.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
        self.after_event();
    }

    // --- queries --------------------------------------------------------

    pub(crate) fn policy(&self) -> QueuePolicy {
        self.policy
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Known here, or on its way out: a rescan must not pick it up.
    pub(crate) fn knows(&self, id: &str) -> bool {
        self.messages.contains_key(id) || self.removing.contains(id)
    }

    pub(crate) fn view(&self, id: &str) -> Result<MessageView<'_>, OperatorError> {
        self.tracked(id).map(Tracked::view)
    }

    /// The messages in id order (queue ids grow with time), those after
    /// `after` only, at most `limit`; and whether more follow.
    pub(crate) fn list(&self, after: Option<&str>, limit: Option<usize>) -> (Vec<Listed>, bool) {
        let mut ids: Vec<&String> = self
            .messages
            .keys()
            .filter(|id| after.is_none_or(|after| id.as_str() > after))
            .collect();
        let limit = limit.unwrap_or(usize::MAX);
        let more = ids.len() > limit;
        if more {
            // Only the first `limit` ids are sorted: a listing of a long
            // queue, asked for a batch at a time, stays linear per batch.
            ids.select_nth_unstable(limit);
            ids.truncate(limit);
        }
        ids.sort_unstable();
        let listed = ids
            .into_iter()
            .filter_map(|id| self.messages.get(id))
            .map(|t| Listed {
                envelope: Arc::clone(&t.envelope),
                state: t.state(),
                next_attempt: t.deferred_until,
            })
            .collect();
        (listed, more)
    }

    pub(crate) fn counts(&self) -> QueueCounts {
        let mut counts = QueueCounts::default();
        for t in self.messages.values() {
            match t.state() {
                MessageState::Active => counts.active += 1,
                MessageState::Deferred => counts.deferred += 1,
                MessageState::Held => counts.held += 1,
            }
        }
        counts
    }

    /// The age of the oldest message that is not held.
    pub(crate) fn oldest(&self, now: SystemTime) -> Duration {
        self.messages
            .values()
            .filter(|t| !t.envelope.held)
            .filter_map(|t| now.duration_since(t.envelope.arrival).ok())
            .max()
            .unwrap_or_default()
    }

    // --- the machinery --------------------------------------------------

    fn tracked(&self, id: &str) -> Result<&Tracked, OperatorError> {
        self.messages
            .get(id)
            .ok_or_else(|| OperatorError::NotQueued(id.to_string()))
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
                recording_expansion: false,
                not_before: None,
            },
        );
    }

    /// Queues every pending delivery of a message for a worker.
    fn make_ready(&mut self, id: &str, round: Round, now: SystemTime) {
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
            self.defer(id, now + IN_FLIGHT_RECHECK);
            return;
        }
        if let (Round::Again, Some(aliases)) = (round, &self.aliases) {
            // Nothing of the message runs or waits: its indexes may grow.
            let changes = reexpand(Arc::make_mut(&mut t.envelope), aliases, now);
            log_reexpansion(id, &changes);
            if !changes.is_empty() {
                // Written before any of it runs: after a crash the same
                // DELIVERY_ID must name the same target, whatever the
                // aliases then. Made ready once written.
                t.recording_expansion = true;
                self.recording += 1;
                let envelope = (*t.envelope).clone();
                self.commands.push(Command::Persist {
                    id: id.to_string(),
                    envelope,
                    expansion: true,
                });
                return;
            }
        }
        for (index, d) in t.envelope.pending() {
            let host = match &d.target {
                Target::Http { url } => Some(host_of(url).unwrap_or_else(|| url.clone())),
                _ => None,
            };
            self.ready.push(host, (id.to_string(), index));
            t.waiting += 1;
        }
    }

    fn defer(&mut self, id: &str, until: SystemTime) {
        if let Some(t) = self.messages.get_mut(id) {
            t.deferred_until = Some(until);
            self.deferred.insert((until, id.to_string()));
        }
    }

    fn dispatch(&mut self) {
        while !self.draining {
            let slot = if self.running_slots < self.concurrency {
                self.ready.next_slot().map(|item| (None, item))
            } else {
                None
            };
            let Some((host, (id, index))) = slot.or_else(|| {
                self.ready
                    .next_http(self.max_per_host)
                    .map(|(host, item)| (Some(host), item))
            }) else {
                break;
            };
            let Some(t) = self.messages.get_mut(&id) else {
                if let Some(host) = host {
                    self.ready.http_done(&host);
                }
                continue;
            };
            t.waiting -= 1;
            t.running += 1;
            self.running += 1;
            match host {
                Some(host) => {
                    self.running_http.insert((id.clone(), index), host);
                }
                None => self.running_slots += 1,
            }
            let envelope = Arc::clone(&t.envelope);
            self.commands.push(Command::Dispatch {
                id,
                index,
                envelope,
            });
        }
    }

    /// Results go to disk before anything else is decided about the
    /// message.
    fn record_then_settle(&mut self, id: String, now: SystemTime) {
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
            && t.envelope.deliveries.iter().all(|d| {
                matches!(
                    d.state,
                    DeliveryState::Delivered | DeliveryState::Superseded
                )
            });
        if all_delivered {
            self.settle(&id, now);
            return;
        }
        let envelope = (*t.envelope).clone();
        self.recording += 1;
        self.commands.push(Command::Record { id, envelope });
    }

    /// Once no delivery of the message is running or waiting, carries out
    /// the queue policy's decision.
    fn settle(&mut self, id: &str, now: SystemTime) {
        let Some(t) = self.messages.get_mut(id) else {
            return;
        };
        // A message held while its last delivery ran may be done anyway.
        let finished = t.envelope.deliveries.iter().all(|d| {
            matches!(
                d.state,
                DeliveryState::Delivered | DeliveryState::Bounced | DeliveryState::Superseded
            )
        });
        if t.is_busy() || t.deferred_until.is_some() || (t.envelope.held && !finished) {
            return;
        }
        let not_before = t.not_before.take();
        let step = next_step(
            Arc::make_mut(&mut t.envelope),
            now,
            &self.policy,
            self.can_bounce,
        );
        let step = match step {
            Step::Defer(until) => Step::Defer(self.policy.not_before(until, not_before, now)),
            other => other,
        };
        match step {
            Step::Remove => {
                let returned = t
                    .envelope
                    .deliveries
                    .iter()
                    .any(|d| d.state == DeliveryState::Bounced);
                let why = if returned {
                    Removal::Returned
                } else {
                    Removal::Delivered
                };
                // Logged by the runner once the removal is durable.
                self.remove(id, why);
            }
            Step::Defer(until) => {
                Arc::make_mut(&mut t.envelope).next_attempt = until;
                self.persist(id);
                tracing::info!(queue_id = %id, retry_in = ?until.duration_since(now).unwrap_or_default(), "deferred");
                self.defer(id, until);
            }
            Step::Hold(why) => {
                Arc::make_mut(&mut t.envelope).held = true;
                self.persist(id);
                tracing::warn!(queue_id = %id, "held: {why}");
            }
            Step::Bounce(failed) => {
                t.bouncing = true;
                self.bouncing += 1;
                let envelope = Arc::clone(&t.envelope);
                // The expiry the policy may just have recorded goes to disk
                // before the bounce is sent.
                self.persist(id);
                self.commands.push(Command::Bounce {
                    id: id.to_string(),
                    envelope,
                    failed,
                });
            }
        }
    }

    fn persist(&mut self, id: &str) {
        if let Some(t) = self.messages.get(id) {
            self.commands.push(Command::Persist {
                id: id.to_string(),
                envelope: (*t.envelope).clone(),
                expansion: false,
            });
        }
    }

    fn remove(&mut self, id: &str, why: Removal) {
        self.messages.remove(id);
        self.removing.insert(id.to_string());
        self.commands.push(Command::Remove {
            id: id.to_string(),
            why,
        });
    }

    /// The message left the spool behind our back (an operator, another
    /// queue runner): stop working on it.
    fn forget(&mut self, id: &str) {
        if self.messages.remove(id).is_some() {
            tracing::warn!(queue_id = %id, "queue file gone; no longer tracked");
        }
    }

    /// What every event ends with: hand out work, ask to be woken for the
    /// next retry, and say when a pass or a drain is over.
    fn after_event(&mut self) {
        self.dispatch();
        if self.mode == Mode::Daemon {
            let first = self.deferred.first().map(|(at, _)| *at);
            if first != self.armed {
                self.armed = first;
                if let Some(at) = first {
                    self.commands.push(Command::WakeAt(at));
                }
            }
        }
        if self.draining && self.running == 0 && self.recording == 0 {
            self.commands.push(Command::Drained);
        }
        let busy =
            self.running > 0 || !self.ready.is_empty() || self.recording > 0 || self.bouncing > 0;
        if self.mode == Mode::OnePass && !self.pass_done && !busy {
            self.pass_done = true;
            self.commands.push(Command::PassDone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::status::EnhancedCode;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn start_of_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + T0
    }

    fn policy() -> QueuePolicy {
        QueuePolicy {
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(3 * 86400),
        }
    }

    fn envelope(id: &str, sender: &str, recipients: usize, arrival: SystemTime) -> Envelope {
        Envelope::for_test_piped(id, sender, recipients, arrival)
    }

    fn scheduler(concurrency: usize, can_bounce: bool, mode: Mode) -> Scheduler {
        Scheduler::new(policy(), can_bounce, concurrency, mode, InFlight::default())
    }

    fn report(status: DeliveryStatus) -> DeliveryReport {
        DeliveryReport {
            status,
            attempted: true,
            retry_after: None,
        }
    }

    fn temporary() -> DeliveryStatus {
        DeliveryStatus::system_temporary("exit 75")
    }

    fn permanent() -> DeliveryStatus {
        DeliveryStatus::Permanent(EnhancedCode::PROGRAM_REFUSED, "exit 67".into())
    }

    /// The dispatches among `commands`, as (id, index).
    fn dispatched(commands: &[Command]) -> Vec<(String, usize)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Dispatch { id, index, .. } => Some((id.clone(), *index)),
                _ => None,
            })
            .collect()
    }

    fn kinds(commands: &[Command]) -> Vec<&'static str> {
        commands
            .iter()
            .map(|c| match c {
                Command::Dispatch { .. } => "dispatch",
                Command::Record { .. } => "record",
                Command::Persist { .. } => "persist",
                Command::RecordLater { .. } => "record-later",
                Command::Remove { .. } => "remove",
                Command::Bounce { .. } => "bounce",
                Command::WakeAt(_) => "wake",
                Command::PassDone => "pass-done",
                Command::Drained => "drained",
            })
            .collect()
    }

    /// A message whose deliveries go to `urls` (HTTP targets).
    fn posted(id: &str, urls: &[&str], now: SystemTime) -> Envelope {
        let mut env = envelope(id, "a@x", urls.len(), now);
        for (d, url) in env.deliveries.iter_mut().zip(urls) {
            d.target = Target::Http {
                url: url.to_string(),
            };
        }
        env
    }

    #[test]
    fn http_deliveries_wait_by_host_and_leave_the_program_slots_alone() {
        let now = start_of_time();
        let mut s = scheduler(1, true, Mode::Daemon).with_max_per_host(1);
        s.enqueued(
            posted(
                "H",
                &["http://slow/a", "http://slow/b", "http://fast/"],
                now,
            ),
            now,
        );
        s.enqueued(envelope("P", "a@x", 1, now), now);
        // The one program slot, one POST to each host.
        let mut first = dispatched(&s.take_commands());
        first.sort();
        assert_eq!(
            first,
            vec![
                ("H".to_string(), 0),
                ("H".to_string(), 2),
                ("P".to_string(), 0)
            ]
        );
        // The second POST to slow waits for the first, not for the others.
        s.delivered("H".into(), 2, report(DeliveryStatus::DELIVERED), now);
        s.delivered("P".into(), 0, report(DeliveryStatus::DELIVERED), now);
        assert!(dispatched(&s.take_commands()).is_empty());
        s.delivered("H".into(), 0, report(DeliveryStatus::DELIVERED), now);
        assert_eq!(dispatched(&s.take_commands()), vec![("H".to_string(), 1)]);
    }

    #[test]
    fn a_retry_after_defers_the_message_at_least_that_long() {
        let now = start_of_time();
        let mut s = scheduler(4, true, Mode::Daemon);
        s.enqueued(posted("H", &["http://app/"], now), now);
        let _ = s.take_commands();
        let mut busy = report(temporary());
        busy.retry_after = Some(Duration::from_secs(600));
        s.delivered("H".into(), 0, busy, now);
        s.recorded("H".into(), Ok(()), now);
        let wake = s.take_commands().into_iter().find_map(|c| match c {
            Command::WakeAt(at) => Some(at),
            _ => None,
        });
        // retry_min is a minute; the server asked for ten.
        assert_eq!(wake, Some(now + Duration::from_secs(600)));
    }

    #[test]
    fn a_message_delivered_everywhere_is_removed_without_a_rewrite() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 2, now), now);
        let commands = s.take_commands();
        assert_eq!(
            dispatched(&commands),
            vec![("A".to_string(), 0), ("A".to_string(), 1)]
        );
        s.delivered("A".into(), 0, report(DeliveryStatus::DELIVERED), now);
        // One still running: the first result is written down first.
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.recorded("A".into(), Ok(()), now);
        assert!(s.take_commands().is_empty());
        s.delivered("A".into(), 1, report(DeliveryStatus::DELIVERED), now);
        let commands = s.take_commands();
        assert!(
            matches!(&commands[..], [Command::Remove { id, why: Removal::Delivered }] if id == "A"),
            "{commands:?}"
        );
        assert!(
            s.knows("A"),
            "a rescan must not revive a message being removed"
        );
        s.removed("A");
        assert!(!s.knows("A"));
        assert_eq!(s.counts(), QueueCounts::default());
    }

    #[test]
    fn concurrency_bounds_the_dispatches_and_a_report_frees_a_slot() {
        let now = start_of_time();
        let mut s = scheduler(2, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 3, now), now);
        assert_eq!(dispatched(&s.take_commands()).len(), 2);
        s.enqueued(envelope("B", "a@x", 1, now), now);
        assert!(dispatched(&s.take_commands()).is_empty());
        s.delivered("A".into(), 0, report(DeliveryStatus::DELIVERED), now);
        assert_eq!(dispatched(&s.take_commands()), vec![("A".to_string(), 2)]);
    }

    #[test]
    fn a_temporary_failure_is_recorded_then_deferred_and_retried_when_due() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 1, now), now);
        let _ = s.take_commands();
        s.delivered("A".into(), 0, report(temporary()), now);
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        assert_eq!(s.counts().active, 1, "not settled before the record lands");
        s.recorded("A".into(), Ok(()), now);
        let commands = s.take_commands();
        let retry = now + Duration::from_secs(60);
        assert_eq!(kinds(&commands), vec!["persist", "wake"]);
        assert!(matches!(commands[1], Command::WakeAt(at) if at == retry));
        match &commands[0] {
            Command::Persist { envelope, .. } => assert_eq!(envelope.next_attempt, retry),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.counts().deferred, 1);
        s.due(retry - Duration::from_secs(1));
        assert!(dispatched(&s.take_commands()).is_empty(), "released early");
        s.due(retry);
        assert_eq!(dispatched(&s.take_commands()), vec![("A".to_string(), 0)]);
    }

    #[test]
    fn a_result_that_cannot_be_written_is_retried_and_nothing_is_settled_meanwhile() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 2, now), now);
        let _ = s.take_commands();
        s.delivered("A".into(), 0, report(DeliveryStatus::DELIVERED), now);
        s.delivered("A".into(), 1, report(permanent()), now);
        let _ = s.take_commands();
        s.recorded("A".into(), Err(SpoolError::WriterGone), now);
        assert_eq!(kinds(&s.take_commands()), vec!["record-later"]);
        s.recorded("A".into(), Err(SpoolError::WriterGone), now);
        let _ = s.take_commands();
        s.record_again("A".into(), now);
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.record_again("A".into(), now);
        let _ = s.take_commands();
        s.recorded("A".into(), Ok(()), now);
        assert_eq!(kinds(&s.take_commands()), vec!["persist", "bounce"]);
    }

    #[test]
    fn a_permanent_failure_is_returned_then_the_message_removed() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 1, now), now);
        let _ = s.take_commands();
        s.delivered("A".into(), 0, report(permanent()), now);
        let _ = s.take_commands();
        s.recorded("A".into(), Ok(()), now);
        let commands = s.take_commands();
        assert!(
            matches!(&commands[1], Command::Bounce { failed, .. } if failed == &[0]),
            "{commands:?}"
        );
        assert_eq!(
            s.delete("A"),
            Err(OperatorError::Busy("A".into())),
            "deleted while its bounce is out"
        );
        s.bounced("A".into(), vec![0], DeliveryStatus::DELIVERED, now);
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.recorded("A".into(), Ok(()), now);
        // Returned mail is erased, never kept for reuse.
        assert!(matches!(
            &s.take_commands()[..],
            [Command::Remove {
                why: Removal::Returned,
                ..
            }]
        ));
    }

    #[test]
    fn what_cannot_be_returned_is_held() {
        let now = start_of_time();
        for (sender, can_bounce) in [("", true), ("a@x", false)] {
            let mut s = scheduler(16, can_bounce, Mode::Daemon);
            s.enqueued(envelope("A", sender, 1, now), now);
            let _ = s.take_commands();
            s.delivered("A".into(), 0, report(permanent()), now);
            s.recorded("A".into(), Ok(()), now);
            assert_eq!(s.counts().held, 1, "sender {sender:?}, relay {can_bounce}");
            assert_eq!(
                s.bounce("A", now),
                Err(if can_bounce {
                    OperatorError::FromNullSender("A".into())
                } else {
                    OperatorError::NoRelay("A".into())
                })
            );
        }
    }

    #[test]
    fn a_bounce_the_relay_defers_is_retried_with_backoff() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 1, now), now);
        let _ = s.take_commands();
        s.delivered("A".into(), 0, report(permanent()), now);
        s.recorded("A".into(), Ok(()), now);
        let _ = s.take_commands();
        s.bounced("A".into(), vec![0], temporary(), now);
        let retry = now + Duration::from_secs(60);
        let commands = s.take_commands();
        assert_eq!(kinds(&commands), vec!["persist", "wake"]);
        s.due(retry);
        // Nothing to deliver; the bounce goes out again.
        assert_eq!(kinds(&s.take_commands()), vec!["persist", "bounce"]);
    }

    #[test]
    fn operator_hold_release_flush_and_delete() {
        let now = start_of_time();
        let mut s = scheduler(1, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 1, now), now);
        s.enqueued(envelope("B", "a@x", 1, now), now);
        assert_eq!(dispatched(&s.take_commands()), vec![("A".to_string(), 0)]);
        // B waits for the slot; held, it is not dispatched when A ends.
        s.hold("B").unwrap();
        assert_eq!(kinds(&s.take_commands()), vec!["persist"]);
        assert_eq!(s.release("A", now), Err(OperatorError::NotHeld("A".into())));
        assert_eq!(s.delete("A"), Err(OperatorError::Busy("A".into())));
        s.delivered("A".into(), 0, report(temporary()), now);
        s.recorded("A".into(), Ok(()), now);
        let commands = s.take_commands();
        assert!(dispatched(&commands).is_empty());
        assert_eq!(
            s.counts(),
            QueueCounts {
                active: 0,
                deferred: 1,
                held: 1
            }
        );
        assert_eq!(
            s.flush(Some("B".into()), now),
            Err(OperatorError::Held("B".into()))
        );
        assert_eq!(s.flush(None, now), Ok(vec!["A".to_string()]));
        assert_eq!(dispatched(&s.take_commands()), vec![("A".to_string(), 0)]);
        s.release("B", now).unwrap();
        assert_eq!(kinds(&s.take_commands()), vec!["persist"]);
        s.delivered("A".into(), 0, report(DeliveryStatus::DELIVERED), now);
        let commands = s.take_commands();
        assert_eq!(kinds(&commands), vec!["remove", "dispatch"]);
        s.removed("A");
        let _ = s.take_commands();
        assert_eq!(s.delete("A"), Err(OperatorError::NotQueued("A".into())));
        assert_eq!(s.view("B").map(|v| v.state), Ok(MessageState::Active));
        s.delivered("B".into(), 0, report(temporary()), now);
        s.recorded("B".into(), Ok(()), now);
        let _ = s.take_commands();
        s.delete("B").unwrap();
        // Deleted mail is erased, never kept for reuse.
        assert!(matches!(
            &s.take_commands()[..],
            [Command::Remove {
                why: Removal::Deleted,
                ..
            }]
        ));
    }

    #[test]
    fn an_operator_bounce_fails_what_is_pending_and_returns_it() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 2, now), now);
        let _ = s.take_commands();
        s.delivered("A".into(), 0, report(DeliveryStatus::DELIVERED), now);
        s.delivered("A".into(), 1, report(temporary()), now);
        s.recorded("A".into(), Ok(()), now);
        s.recorded("A".into(), Ok(()), now);
        let _ = s.take_commands();
        s.bounce("A", now).unwrap();
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.recorded("A".into(), Ok(()), now);
        let commands = s.take_commands();
        match &commands[..] {
            [Command::Persist { .. }, Command::Bounce {
                envelope, failed, ..
            }] => {
                assert_eq!(failed, &[1]);
                assert_eq!(envelope.deliveries[1].status, "5.0.0");
                assert!(envelope.deliveries[1]
                    .last_error
                    .contains("returned by the operator"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn draining_starts_nothing_new_and_says_when_the_running_are_recorded() {
        let now = start_of_time();
        let mut s = scheduler(1, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 2, now), now);
        let _ = s.take_commands();
        s.drain();
        assert!(s.take_commands().is_empty());
        s.delivered("A".into(), 0, report(DeliveryStatus::DELIVERED), now);
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.recorded("A".into(), Ok(()), now);
        assert_eq!(kinds(&s.take_commands()), vec!["drained"]);
    }

    #[test]
    fn one_pass_attempts_what_is_due_once_and_says_when_it_is_over() {
        let now = start_of_time();
        let later = now + Duration::from_secs(600);
        let mut s = scheduler(16, true, Mode::OnePass);
        let mut not_due = envelope("B", "a@x", 1, now);
        not_due.next_attempt = later;
        s.picked_up(vec![envelope("A", "a@x", 1, now), not_due], now);
        s.start();
        let commands = s.take_commands();
        assert_eq!(kinds(&commands), vec!["dispatch"], "no wake-up in one pass");
        s.delivered("A".into(), 0, report(temporary()), now);
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.recorded("A".into(), Ok(()), now);
        assert_eq!(kinds(&s.take_commands()), vec!["persist", "pass-done"]);
        s.persisted("A", Ok(()), false, now);
        assert!(s.take_commands().is_empty(), "the pass ends once");
    }

    #[test]
    fn start_up_keeps_held_mail_defers_what_is_not_due_and_finishes_what_was_decided() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        let mut held = envelope("H", "a@x", 1, now);
        held.held = true;
        let mut later = envelope("L", "a@x", 1, now);
        later.next_attempt = now + Duration::from_secs(30);
        let mut done = envelope("D", "a@x", 1, now);
        done.deliveries[0].state = DeliveryState::Delivered;
        s.picked_up(vec![held, later, done], now);
        s.start();
        let commands = s.take_commands();
        assert_eq!(kinds(&commands), vec!["remove", "wake"]);
        assert_eq!(
            s.counts(),
            QueueCounts {
                active: 0,
                deferred: 1,
                held: 1
            }
        );
    }

    #[test]
    fn a_delivery_still_running_for_a_dead_runner_is_not_started_again() {
        let now = start_of_time();
        let in_flight = InFlight::default();
        let guard = in_flight.start("A", 0);
        let mut s = Scheduler::new(policy(), true, 16, Mode::Daemon, in_flight);
        s.picked_up(vec![envelope("A", "a@x", 1, now)], now);
        s.start();
        let recheck = now + IN_FLIGHT_RECHECK;
        assert!(matches!(&s.take_commands()[..], [Command::WakeAt(at)] if *at == recheck));
        drop(guard);
        s.due(recheck);
        assert_eq!(dispatched(&s.take_commands()), vec![("A".to_string(), 0)]);
    }

    #[test]
    fn a_retry_writes_what_alias_expansion_changed_before_running_it_and_never_overlaps_a_predecessor(
    ) {
        let now = start_of_time();
        let table = crate::aliases::parse(b"r0: |fixed\n", std::path::Path::new("aliases"))
            .unwrap()
            .table;
        let in_flight = InFlight::default();
        let mut s = Scheduler::new(policy(), true, 16, Mode::Daemon, in_flight.clone())
            .with_aliases(Aliases {
                table: crate::actors::Shared::new(Arc::new(table)),
                hostname: "mx.test".into(),
                can_forward: false,
            });
        // r0 was accepted for `cat`, which failed once; r0 now names `fixed`.
        let mut deferred = envelope("A", "a@x", 1, now);
        deferred.deliveries[0].attempts = 1;
        s.picked_up(vec![deferred], now);
        s.start();
        let commands = s.take_commands();
        assert!(
            dispatched(&commands).is_empty(),
            "ran before it was written"
        );
        let written = commands.iter().find_map(|c| match c {
            Command::Persist {
                envelope,
                expansion: true,
                ..
            } => Some(envelope),
            _ => None,
        });
        let states: Vec<(DeliveryState, String)> = written
            .expect("the expansion is written")
            .deliveries
            .iter()
            .map(|d| (d.state, format!("{:?}", d.target)))
            .collect();
        assert_eq!(
            states,
            vec![
                (
                    DeliveryState::Superseded,
                    r#"Pipe { command: "cat" }"#.into()
                ),
                (
                    DeliveryState::Pending,
                    r#"Pipe { command: "fixed" }"#.into()
                ),
            ]
        );
        // A dead runner's attempt of that same delivery still runs: wait.
        let predecessor = in_flight.start("A", 1);
        s.persisted("A", Ok(()), true, now);
        let commands = s.take_commands();
        assert!(
            dispatched(&commands).is_empty(),
            "overlapped a running program"
        );
        drop(predecessor);
        s.due(now + IN_FLIGHT_RECHECK);
        let commands = s.take_commands();
        assert_eq!(dispatched(&commands), vec![("A".to_string(), 1)]);
        assert!(
            !commands.iter().any(|c| matches!(
                c,
                Command::Persist {
                    expansion: true,
                    ..
                }
            )),
            "nothing changed again"
        );
    }

    #[test]
    fn every_rescan_asks_for_the_wake_up_afresh() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        let mut later = envelope("L", "a@x", 1, now);
        later.next_attempt = now + Duration::from_secs(30);
        s.picked_up(vec![later], now);
        s.start();
        assert_eq!(kinds(&s.take_commands()), vec!["wake"]);
        s.enqueued(envelope("A", "a@x", 1, now), now);
        assert!(!kinds(&s.take_commands()).contains(&"wake"));
        // A rescan that finds nothing new still re-arms: the timer may have
        // gone astray with the wall clock.
        s.picked_up(Vec::new(), now + Duration::from_secs(5));
        assert!(
            matches!(&s.take_commands()[..], [Command::WakeAt(at)] if *at == now + Duration::from_secs(30))
        );
    }

    #[test]
    fn a_listing_pages_through_every_message_once_in_id_order() {
        let now = start_of_time();
        let mut s = scheduler(1, true, Mode::Daemon);
        // Enqueued out of id order.
        for n in [7, 3, 9, 1, 5, 2, 8, 4, 6, 0] {
            s.enqueued(envelope(&format!("M{n:02}"), "a@x", 1, now), now);
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = s.list(after.as_deref(), Some(3));
            assert!(page.len() <= 3);
            seen.extend(page.iter().map(|l| l.envelope.id.clone()));
            after = page.last().map(|l| l.envelope.id.clone());
            if !more {
                break;
            }
        }
        let all: Vec<String> = (0..10).map(|n| format!("M{n:02}")).collect();
        assert_eq!(seen, all);
        let (whole, more) = s.list(None, None);
        assert!(!more);
        assert_eq!(whole.len(), 10);
        assert_eq!(whole[0].state, MessageState::Active);
    }

    #[test]
    fn a_message_whose_file_vanished_is_forgotten() {
        let now = start_of_time();
        let mut s = scheduler(16, true, Mode::Daemon);
        s.enqueued(envelope("A", "a@x", 1, now), now);
        let _ = s.take_commands();
        s.delivered("A".into(), 0, report(temporary()), now);
        assert_eq!(kinds(&s.take_commands()), vec!["record"]);
        s.recorded("A".into(), Err(SpoolError::NotFound("A".into())), now);
        assert!(s.take_commands().is_empty());
        assert!(!s.knows("A"));
    }

    /// Random runs of the scheduler against a simulated runner that answers
    /// its commands in any order, with any outcome.
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum Op {
            Enqueue {
                recipients: usize,
                from_null: bool,
            },
            /// Answer the outstanding command at this position (modulo).
            Answer {
                which: usize,
                outcome: u8,
            },
            Advance {
                seconds: u64,
            },
            Operator {
                which: usize,
                kind: u8,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                2 => (1usize..4, any::<bool>())
                    .prop_map(|(recipients, from_null)| Op::Enqueue { recipients, from_null }),
                6 => (any::<usize>(), any::<u8>())
                    .prop_map(|(which, outcome)| Op::Answer { which, outcome }),
                1 => (0u64..4000).prop_map(|seconds| Op::Advance { seconds }),
                1 => (any::<usize>(), 0u8..5).prop_map(|(which, kind)| Op::Operator { which, kind }),
            ]
        }

        struct Run {
            s: Scheduler,
            now: SystemTime,
            outstanding: Vec<Command>,
            /// Deliveries that succeeded or failed for good.
            settled: BTreeMap<(String, usize), &'static str>,
            /// Every message ever enqueued, and whether its removal was asked.
            enqueued: BTreeMap<String, bool>,
            next_id: usize,
        }

        impl Run {
            fn new(concurrency: usize, can_bounce: bool) -> Self {
                Run {
                    s: scheduler(concurrency, can_bounce, Mode::Daemon),
                    now: start_of_time(),
                    outstanding: Vec::new(),
                    settled: BTreeMap::new(),
                    enqueued: BTreeMap::new(),
                    next_id: 0,
                }
            }

            /// Takes the scheduler's commands, checking each.
            fn collect(&mut self) -> Result<(), TestCaseError> {
                for command in self.s.take_commands() {
                    match &command {
                        Command::Dispatch {
                            id,
                            index,
                            envelope,
                        } => {
                            prop_assert!(
                                !self.settled.contains_key(&(id.clone(), *index)),
                                "{id}/{index} dispatched again after it {}",
                                self.settled[&(id.clone(), *index)]
                            );
                            prop_assert_eq!(
                                envelope.deliveries[*index].state,
                                DeliveryState::Pending
                            );
                        }
                        Command::Remove { id, .. } | Command::Bounce { id, .. } => {
                            // A message is settled only once none of its
                            // deliveries is running.
                            let running = self
                                .outstanding
                                .iter()
                                .any(|c| matches!(c, Command::Dispatch { id: d, .. } if d == id));
                            prop_assert!(!running, "{} settled while a delivery runs", id);
                            if matches!(command, Command::Remove { .. }) {
                                prop_assert!(self.enqueued.insert(id.clone(), true).is_some());
                            }
                        }
                        Command::WakeAt(_) | Command::PassDone | Command::Drained => continue,
                        _ => {}
                    }
                    self.outstanding.push(command);
                }
                self.check_counters()
            }

            /// The scheduler's counters are exactly what is outstanding.
            fn check_counters(&self) -> Result<(), TestCaseError> {
                let count =
                    |f: fn(&Command) -> bool| self.outstanding.iter().filter(|c| f(c)).count();
                prop_assert_eq!(
                    self.s.running,
                    count(|c| matches!(c, Command::Dispatch { .. }))
                );
                prop_assert_eq!(
                    self.s.recording,
                    count(|c| matches!(c, Command::Record { .. } | Command::RecordLater { .. }))
                );
                prop_assert_eq!(
                    self.s.bouncing,
                    count(|c| matches!(c, Command::Bounce { .. }))
                );
                prop_assert!(self.s.running <= self.s.concurrency);
                for (id, t) in &self.s.messages {
                    let queued = self.s.ready.iter().filter(|(r, _)| r == id).count();
                    prop_assert_eq!(t.waiting, queued, "{} waiting", id);
                    let running = self
                        .outstanding
                        .iter()
                        .filter(|c| matches!(c, Command::Dispatch { id: d, .. } if d == id))
                        .count();
                    prop_assert_eq!(t.running, running, "{} running", id);
                }
                Ok(())
            }

            fn enqueue(&mut self, recipients: usize, from_null: bool) -> Result<(), TestCaseError> {
                let id = format!("M{:04}", self.next_id);
                self.next_id += 1;
                let sender = if from_null { "" } else { "a@x" };
                self.enqueued.insert(id.clone(), false);
                self.s
                    .enqueued(envelope(&id, sender, recipients, self.now), self.now);
                self.collect()
            }

            /// Answers one outstanding command; `outcome` picks how it went
            /// (`final_round`: writes always land, so a run can end).
            fn answer(
                &mut self,
                which: usize,
                outcome: u8,
                final_round: bool,
            ) -> Result<(), TestCaseError> {
                if self.outstanding.is_empty() {
                    return Ok(());
                }
                let command = self.outstanding.remove(which % self.outstanding.len());
                let now = self.now;
                let write = if !final_round && outcome.is_multiple_of(5) {
                    Err(SpoolError::WriterGone)
                } else {
                    Ok(())
                };
                match command {
                    Command::Dispatch { id, index, .. } => {
                        let status = match outcome % 3 {
                            0 => DeliveryStatus::DELIVERED,
                            1 => temporary(),
                            _ => permanent(),
                        };
                        match status {
                            DeliveryStatus::Delivered(_) => {
                                self.settled.insert((id.clone(), index), "was delivered");
                            }
                            DeliveryStatus::Permanent(..) => {
                                self.settled.insert((id.clone(), index), "failed for good");
                            }
                            DeliveryStatus::Temporary(..) => {}
                        }
                        let mut report = report(status);
                        // Now and then the worker was lost before trying.
                        report.attempted = !outcome.is_multiple_of(7);
                        self.s.delivered(id, index, report, now);
                    }
                    Command::Record { id, .. } => self.s.recorded(id, write, now),
                    Command::RecordLater { id } => self.s.record_again(id, now),
                    Command::Persist { id, expansion, .. } => {
                        self.s.persisted(&id, write, expansion, now)
                    }
                    Command::Remove { id, .. } => self.s.removed(&id),
                    Command::Bounce { id, failed, .. } => {
                        let status = match outcome % 4 {
                            0 if !final_round => temporary(),
                            1 => permanent(),
                            _ => DeliveryStatus::DELIVERED,
                        };
                        self.s.bounced(id, failed, status, now);
                    }
                    Command::WakeAt(_) | Command::PassDone | Command::Drained => {}
                }
                self.collect()
            }

            fn operator(&mut self, which: usize, kind: u8) -> Result<(), TestCaseError> {
                let ids: Vec<String> = self.enqueued.keys().cloned().collect();
                let Some(id) = ids.get(which % ids.len().max(1)).cloned() else {
                    return Ok(());
                };
                let now = self.now;
                let bounced_pending: Vec<usize> = self
                    .s
                    .messages
                    .get(&id)
                    .map(|t| t.envelope.pending().map(|(i, _)| i).collect())
                    .unwrap_or_default();
                let result = match kind {
                    0 => self.s.hold(&id),
                    1 => self.s.release(&id, now),
                    2 => self.s.flush(Some(id.clone()), now).map(drop),
                    3 => self.s.delete(&id),
                    _ => self.s.bounce(&id, now),
                };
                if result.is_ok() && kind == 4 {
                    for index in bounced_pending {
                        self.settled
                            .insert((id.clone(), index), "was returned by the operator");
                    }
                }
                if result.is_ok() && kind == 3 {
                    self.enqueued.insert(id, true);
                }
                self.collect()
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// A settled delivery is never dispatched again; the counters
            /// are always exactly what is outstanding (so never below zero);
            /// and once every answer is in, each message is removed, held or
            /// deferred: none is left active with nothing running.
            #[test]
            fn every_message_ends_removed_held_or_deferred(
                concurrency in 1usize..4,
                can_bounce in any::<bool>(),
                ops in proptest::collection::vec(op(), 1..120),
                endings in proptest::collection::vec(any::<u8>(), 64),
            ) {
                let mut run = Run::new(concurrency, can_bounce);
                for op in ops {
                    match op {
                        Op::Enqueue { recipients, from_null } => run.enqueue(recipients, from_null)?,
                        Op::Answer { which, outcome } => run.answer(which, outcome, false)?,
                        Op::Advance { seconds } => {
                            run.now += Duration::from_secs(seconds);
                            let now = run.now;
                            run.s.due(now);
                            run.collect()?;
                        }
                        Op::Operator { which, kind } => run.operator(which, kind)?,
                    }
                }
                // Answer everything still out, in some order; writes land.
                let mut round = 0usize;
                while !run.outstanding.is_empty() {
                    prop_assert!(round < 100_000, "never came to rest");
                    let outcome = endings[round % endings.len()];
                    run.answer(outcome as usize, outcome, true)?;
                    round += 1;
                }
                prop_assert!(run.s.ready.is_empty());
                for (id, removal_asked) in &run.enqueued {
                    match run.s.view(id) {
                        Ok(view) => prop_assert_ne!(
                            view.state,
                            MessageState::Active,
                            "{} left active with nothing running or recording", id
                        ),
                        Err(_) => prop_assert!(*removal_asked, "{} vanished unremoved", id),
                    }
                }
            }
        }
    }
}

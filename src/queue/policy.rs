//! Queue policy, pure: how a delivery result is recorded, and what becomes
//! of a message once none of its deliveries is running: removed, retried
//! later (doubling from `retry_min` to `retry_max`), expired at `max_age`,
//! returned to its sender, or held. The QueueRunner actor only carries
//! these decisions out.

use std::time::{Duration, SystemTime};

use crate::delivery::status::{DeliveryStatus, EnhancedCode};
use crate::protocol::session::InlineOutcome;
use crate::spool::{DeliveryState, Envelope};

/// Retry timing and the age limit (`[queue]`).
#[derive(Debug, Clone, Copy)]
pub struct QueuePolicy {
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
}

impl QueuePolicy {
    /// The wait after the `attempts`-th failed attempt: `retry_min` doubling
    /// each attempt, never above `retry_max`.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(31);
        self.retry_min
            .saturating_mul(1u32 << doublings)
            .min(self.retry_max)
    }

    /// The retry time `backoff` gave, pushed back to what a target asked
    /// (`not_before`, an HTTP `Retry-After`), but never past `retry_max`
    /// from `now`: a server cannot park mail for longer than the operator
    /// allows.
    pub fn not_before(
        &self,
        backoff: SystemTime,
        not_before: Option<SystemTime>,
        now: SystemTime,
    ) -> SystemTime {
        match not_before {
            Some(asked) if asked > backoff => {
                asked.min(self.later(now, self.retry_max)).max(backoff)
            }
            _ => backoff,
        }
    }

    /// `now + delay`, saturating far in the future instead of overflowing.
    pub fn later(&self, now: SystemTime, delay: Duration) -> SystemTime {
        now.checked_add(delay)
            .unwrap_or(now + Duration::from_secs(365 * 86400))
    }
}

/// What to do with a message none of whose deliveries is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Every delivery is done (delivered or returned): forget the message.
    Remove,
    /// Some deliveries failed temporarily: try again then.
    Defer(SystemTime),
    /// Return these failed deliveries to the sender.
    Bounce(Vec<usize>),
    /// Park it, visibly, for an operator: it cannot be returned.
    Hold(String),
}

/// Records one attempt's result in the envelope. An attempt that was never
/// made (a lost worker) leaves the count alone.
pub fn record_result(
    env: &mut Envelope,
    index: usize,
    status: &DeliveryStatus,
    attempted: bool,
    now: SystemTime,
) {
    let Some(d) = env.deliveries.get_mut(index) else {
        return;
    };
    if attempted {
        d.attempts += 1;
        d.last_attempt = Some(now);
    }
    match status {
        DeliveryStatus::Delivered(_) => {
            d.state = DeliveryState::Delivered;
            d.last_error.clear();
        }
        DeliveryStatus::Temporary(_, why) => d.last_error = why.clone(),
        DeliveryStatus::Permanent(_, why) => {
            d.state = DeliveryState::Failed;
            d.last_error = why.clone();
        }
    }
    d.record(now, status.code(), status.diagnostic());
}

/// Decides the message's next step. Expiry happens here: once the message
/// is older than `max_age`, what is still pending fails with 4.4.7.
pub fn next_step(
    env: &mut Envelope,
    now: SystemTime,
    policy: &QueuePolicy,
    can_bounce: bool,
) -> Step {
    let age = now.duration_since(env.arrival).unwrap_or(Duration::ZERO);
    if env.pending().next().is_some() && age >= policy.max_age {
        let limit = humantime::format_duration(policy.max_age);
        for d in env
            .deliveries
            .iter_mut()
            .filter(|d| d.state == DeliveryState::Pending)
        {
            d.state = DeliveryState::Failed;
            d.last_error = format!(
                "message expired after {limit} in the queue; last error: {}",
                d.last_error
            );
            let why = d.last_error.clone();
            d.record(now, EnhancedCode::EXPIRED, &why);
        }
    }
    let failed: Vec<usize> = env
        .deliveries
        .iter()
        .enumerate()
        .filter(|(_, d)| d.state == DeliveryState::Failed)
        .map(|(i, _)| i)
        .collect();
    // The sender hears of a failure at once, not when the last of the
    // other recipients is settled.
    if !failed.is_empty() && !env.sender.is_empty() && can_bounce {
        return Step::Bounce(failed);
    }
    if let Some(attempts) = env.pending().map(|(_, d)| d.attempts).min() {
        return Step::Defer(policy.later(now, policy.delay_after(attempts)));
    }
    if failed.is_empty() {
        Step::Remove
    } else if env.sender.is_empty() {
        Step::Hold("failed; a message from <> is never returned".into())
    } else {
        Step::Hold("failed; no [relay] to return it to its sender through".into())
    }
}

/// Inline mode (UnderSMTPD): any temporary failure makes the client try
/// again later; otherwise any permanent failure refuses the message.
pub fn inline_verdict(id: &str, statuses: &[DeliveryStatus]) -> InlineOutcome {
    if statuses
        .iter()
        .any(|s| matches!(s, DeliveryStatus::Temporary(..)))
    {
        InlineOutcome::Temporary
    } else if statuses
        .iter()
        .any(|s| matches!(s, DeliveryStatus::Permanent(..)))
    {
        InlineOutcome::Permanent
    } else {
        InlineOutcome::Delivered(id.to_string())
    }
}

/// The sender has been told about these deliveries.
pub fn mark_bounced(env: &mut Envelope, failed: &[usize]) {
    for &i in failed {
        if let Some(d) = env.deliveries.get_mut(i) {
            if d.state == DeliveryState::Failed {
                d.state = DeliveryState::Bounced;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> QueuePolicy {
        QueuePolicy {
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(3 * 86400),
        }
    }

    fn envelope(sender: &str, n: usize, arrival: SystemTime) -> Envelope {
        Envelope::for_test_piped("ID", sender, n, arrival)
    }

    #[test]
    fn a_retry_after_delays_the_retry_up_to_retry_max_and_never_hastens_it() {
        let p = policy();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let backoff = now + Duration::from_secs(60);
        let at = |s: u64| Some(now + Duration::from_secs(s));
        assert_eq!(p.not_before(backoff, None, now), backoff);
        assert_eq!(p.not_before(backoff, at(10), now), backoff);
        assert_eq!(
            p.not_before(backoff, at(120), now),
            now + Duration::from_secs(120)
        );
        assert_eq!(
            p.not_before(backoff, at(86_400), now),
            now + p.retry_max,
            "capped at retry_max"
        );
    }

    #[test]
    fn backoff_doubles_from_retry_min_to_retry_max() {
        let delays: Vec<u64> = (1..=8).map(|a| policy().delay_after(a).as_secs()).collect();
        assert_eq!(delays, vec![60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(policy().delay_after(1000).as_secs(), 3600);
    }

    #[test]
    fn temporary_failures_defer_by_the_backoff_of_the_least_tried() {
        let now = SystemTime::now();
        let mut env = envelope("a@x", 2, now);
        let temp = DeliveryStatus::system_temporary("later");
        record_result(&mut env, 0, &temp, true, now);
        record_result(&mut env, 0, &temp, true, now);
        record_result(&mut env, 1, &DeliveryStatus::DELIVERED, true, now);
        assert_eq!(
            next_step(&mut env, now, &policy(), true),
            Step::Defer(now + Duration::from_secs(120))
        );
        assert_eq!(env.deliveries[0].history.len(), 2);
        assert_eq!(env.deliveries[0].status, "4.3.0");
    }

    #[test]
    fn all_delivered_is_removed_and_a_lost_worker_is_not_an_attempt() {
        let now = SystemTime::now();
        let mut env = envelope("a@x", 1, now);
        let lost = DeliveryStatus::system_temporary("worker lost");
        record_result(&mut env, 0, &lost, false, now);
        assert_eq!(env.deliveries[0].attempts, 0);
        record_result(&mut env, 0, &DeliveryStatus::DELIVERED, true, now);
        assert_eq!(env.deliveries[0].attempts, 1);
        assert_eq!(next_step(&mut env, now, &policy(), true), Step::Remove);
    }

    #[test]
    fn permanent_failures_bounce_unless_from_null_or_without_relay() {
        let now = SystemTime::now();
        let perm = DeliveryStatus::Permanent(EnhancedCode::PROGRAM_REFUSED, "exit 67".into());
        let mut env = envelope("a@x", 2, now);
        record_result(&mut env, 1, &perm, true, now);
        record_result(&mut env, 0, &DeliveryStatus::DELIVERED, true, now);
        assert_eq!(
            next_step(&mut env, now, &policy(), true),
            Step::Bounce(vec![1])
        );
        assert!(matches!(
            next_step(&mut env, now, &policy(), false),
            Step::Hold(_)
        ));
        mark_bounced(&mut env, &[1]);
        assert_eq!(next_step(&mut env, now, &policy(), true), Step::Remove);

        let mut from_null = envelope("", 1, now);
        record_result(&mut from_null, 0, &perm, true, now);
        assert!(matches!(
            next_step(&mut from_null, now, &policy(), true),
            Step::Hold(_)
        ));
    }

    #[test]
    fn inline_verdict_prefers_temporary_then_permanent() {
        let ok = DeliveryStatus::DELIVERED;
        let temp = DeliveryStatus::system_temporary("t");
        let perm = DeliveryStatus::Permanent(EnhancedCode::PROGRAM_REFUSED, "p".into());
        assert_eq!(
            inline_verdict("ID", &[ok.clone(), ok.clone()]),
            InlineOutcome::Delivered("ID".into())
        );
        assert_eq!(
            inline_verdict("ID", &[perm.clone(), temp]),
            InlineOutcome::Temporary
        );
        assert_eq!(inline_verdict("ID", &[ok, perm]), InlineOutcome::Permanent);
    }

    /// Two recipients: the first failed for good, the second waits to retry.
    fn one_failed_one_waiting(now: SystemTime) -> Envelope {
        let mut env = envelope("a@x", 2, now);
        record_result(
            &mut env,
            0,
            &DeliveryStatus::Permanent(EnhancedCode::PROGRAM_REFUSED, "67".into()),
            true,
            now,
        );
        record_result(
            &mut env,
            1,
            &DeliveryStatus::system_temporary("75"),
            true,
            now,
        );
        env
    }

    #[test]
    fn a_failure_is_returned_at_once_while_others_still_wait() {
        let now = SystemTime::now();
        let mut env = one_failed_one_waiting(now);
        assert_eq!(
            next_step(&mut env, now, &policy(), true),
            Step::Bounce(vec![0])
        );
        mark_bounced(&mut env, &[0]);
        assert_eq!(
            next_step(&mut env, now, &policy(), true),
            Step::Defer(now + Duration::from_secs(60))
        );
        // Without a relay the failure waits for the rest, then holds.
        let mut env = one_failed_one_waiting(now);
        assert!(matches!(
            next_step(&mut env, now, &policy(), false),
            Step::Defer(_)
        ));
    }

    #[test]
    fn past_max_age_pending_deliveries_expire_and_bounce() {
        let arrival = SystemTime::now() - Duration::from_secs(3 * 86400 + 1);
        let now = SystemTime::now();
        let mut env = envelope("a@x", 1, arrival);
        let temp = DeliveryStatus::system_temporary("exit 75");
        record_result(&mut env, 0, &temp, true, now);
        assert_eq!(
            next_step(&mut env, now, &policy(), true),
            Step::Bounce(vec![0])
        );
        let d = &env.deliveries[0];
        assert_eq!(d.state, DeliveryState::Failed);
        assert_eq!(d.status, "4.4.7");
        assert!(d.last_error.contains("expired") && d.last_error.contains("exit 75"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Waits start at retry_min, never shrink, never pass retry_max.
            #[test]
            fn retry_delays_grow_within_their_bounds(
                min_ms in 1u64..100_000,
                extra_ms in 0u64..10_000_000,
                attempts in 1u32..200,
            ) {
                let policy = QueuePolicy {
                    retry_min: Duration::from_millis(min_ms),
                    retry_max: Duration::from_millis(min_ms + extra_ms),
                    max_age: Duration::from_secs(5 * 86400),
                };
                let delay = policy.delay_after(attempts);
                prop_assert!(delay >= policy.retry_min && delay <= policy.retry_max);
                prop_assert!(policy.delay_after(attempts + 1) >= delay);
                prop_assert_eq!(policy.delay_after(1), policy.retry_min);
            }
        }
    }
}

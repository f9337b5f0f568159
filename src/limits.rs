//! Limits on clients: connections at once (all, and per address) and rates
//! per address (`connection_rate_per_ip`, `message_rate_per_ip`), the latter
//! with governor's keyed limiters. Their memory stays bounded: [`cleanup`]
//! forgets addresses whose quota has fully recovered.
//!
//! [`cleanup`]: ConnectionTracker::cleanup

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::Rate;
use crate::protocol::reply::{self, Reply};

/// A rate limiter with one bucket per client address.
pub type KeyedLimiter<C = DefaultClock> =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The quota for a configured rate: `count` at once, refilled evenly over
/// `per` (so "120/m" allows a burst of 120, then one every half second).
pub fn quota(rate: &Rate) -> Quota {
    let per_cell = rate.per / rate.count.get();
    Quota::with_period(per_cell.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(rate.count)
}

/// A keyed limiter on the system clock.
pub fn keyed(rate: &Rate) -> KeyedLimiter {
    RateLimiter::keyed(quota(rate))
}

/// Whether `ip` is in `[limits] exempt`.
pub fn is_exempt(exempt: &[IpNet], ip: IpAddr) -> bool {
    exempt.iter().any(|net| net.contains(&ip))
}

/// Forgets the addresses whose buckets are full again, and gives the memory
/// back: bounded however many addresses came by.
pub fn forget_recovered<C: Clock>(limiter: &KeyedLimiter<C>) {
    limiter.retain_recent();
    limiter.shrink_to_fit();
}

#[derive(Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Connections open now and the connection rate, checked at accept.
pub struct ConnectionTracker {
    open: Mutex<Open>,
    max_total: usize,
    max_per_ip: usize,
    rate: KeyedLimiter,
    /// `[limits] exempt`: free of the per-address limit and the rate.
    exempt: Vec<IpNet>,
}

impl ConnectionTracker {
    pub fn new(max_total: usize, max_per_ip: usize, rate: &Rate, exempt: Vec<IpNet>) -> Arc<Self> {
        Arc::new(ConnectionTracker {
            open: Mutex::new(Open::default()),
            max_total,
            max_per_ip,
            rate: keyed(rate),
            exempt,
        })
    }

    /// Admits a connection from `ip`, or names the 421 that refuses it.
    /// The slot is given back when the returned guard drops. An exempt
    /// address meets `max_connections` only.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.max_total {
            return Err(Refusal::OverCapacity);
        }
        let mine = open.per_ip.get(&ip).copied().unwrap_or(0);
        if !is_exempt(&self.exempt, ip) {
            if mine >= self.max_per_ip {
                return Err(Refusal::PerAddress);
            }
            if self.rate.check_key(&ip).is_err() {
                return Err(Refusal::Rate);
            }
        }
        open.total += 1;
        open.per_ip.insert(ip, mine + 1);
        Ok(ConnectionSlot {
            tracker: Arc::clone(self),
            ip,
        })
    }

    /// `max_connections`.
    pub fn capacity(&self) -> usize {
        self.max_total
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Periodic upkeep of the rate limiter's memory.
    pub fn cleanup(&self) {
        forget_recovered(&self.rate);
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&ip);
            }
        }
    }
}

/// Why a connection is turned away at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections`: 421 4.3.2.
    OverCapacity,
    /// `max_connections_per_ip`: 421 4.7.0.
    PerAddress,
    /// `connection_rate_per_ip`: 421 4.7.0.
    Rate,
}

impl Refusal {
    pub fn reply(self) -> Reply {
        match self {
            Refusal::OverCapacity => reply::TOO_MANY_CONNECTIONS,
            Refusal::PerAddress => reply::TOO_MANY_FROM_YOU,
            Refusal::Rate => reply::CONNECTION_RATE,
        }
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct ConnectionSlot {
    tracker: Arc<ConnectionTracker>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.tracker.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::Ipv4Addr;
    use std::num::NonZeroU32;

    fn rate(count: u32, per: Duration) -> Rate {
        Rate {
            count: NonZeroU32::new(count).unwrap(),
            per,
        }
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn an_exempt_address_meets_only_the_overall_limit() {
        let exempt: IpNet = "0.0.0.0/30".parse().unwrap();
        let t = ConnectionTracker::new(4, 1, &rate(1, Duration::from_secs(3600)), vec![exempt]);
        // ip(1) is exempt: neither one at a time nor one an hour holds it.
        let held: Vec<ConnectionSlot> = (0..4).map(|_| t.admit(ip(1)).unwrap()).collect();
        assert_eq!(t.admit(ip(1)).err(), Some(Refusal::OverCapacity));
        drop(held);
        // ip(9) is not.
        let _one = t.admit(ip(9)).unwrap();
        assert_eq!(t.admit(ip(9)).err(), Some(Refusal::PerAddress));
        assert!(is_exempt(&[exempt], ip(3)));
        assert!(!is_exempt(&[exempt], ip(4)));
    }

    #[test]
    fn connection_counts_are_enforced_and_given_back() {
        let t = ConnectionTracker::new(3, 2, &rate(1000, Duration::from_secs(1)), Vec::new());
        let a1 = t.admit(ip(1)).unwrap();
        let _a2 = t.admit(ip(1)).unwrap();
        assert_eq!(t.admit(ip(1)).err(), Some(Refusal::PerAddress));
        let _b1 = t.admit(ip(2)).unwrap();
        assert_eq!(t.admit(ip(3)).err(), Some(Refusal::OverCapacity));
        drop(a1);
        assert_eq!(t.open(), 2);
        assert!(t.admit(ip(1)).is_ok());
        assert_eq!(Refusal::OverCapacity.reply().enhanced_code(), Some("4.3.2"));
        assert_eq!(Refusal::PerAddress.reply().enhanced_code(), Some("4.7.0"));
        assert_eq!(Refusal::Rate.reply().code(), 421);
    }

    #[test]
    fn rates_trigger_and_recover() {
        let clock = FakeRelativeClock::default();
        let limiter: KeyedLimiter<FakeRelativeClock> = RateLimiter::new(
            quota(&rate(3, Duration::from_secs(60))),
            DefaultKeyedStateStore::default(),
            clock.clone(),
        );
        for _ in 0..3 {
            assert!(limiter.check_key(&ip(1)).is_ok());
        }
        assert!(limiter.check_key(&ip(1)).is_err(), "a burst past the quota");
        assert!(
            limiter.check_key(&ip(2)).is_ok(),
            "another address has its own"
        );
        clock.advance(Duration::from_secs(20));
        assert!(
            limiter.check_key(&ip(1)).is_ok(),
            "one cell back after 20 s"
        );
        assert!(limiter.check_key(&ip(1)).is_err());
    }

    #[test]
    fn a_hundred_thousand_addresses_leave_no_memory_behind() {
        let clock = FakeRelativeClock::default();
        let limiter: KeyedLimiter<FakeRelativeClock> = RateLimiter::new(
            quota(&rate(120, Duration::from_secs(60))),
            DefaultKeyedStateStore::default(),
            clock.clone(),
        );
        for n in 0..100_000 {
            assert!(limiter.check_key(&ip(n)).is_ok());
        }
        assert_eq!(limiter.len(), 100_000);
        // Nothing is forgotten while a bucket is still refilling...
        forget_recovered(&limiter);
        assert_eq!(limiter.len(), 100_000);
        // ...and everything once the quota period has passed.
        clock.advance(Duration::from_secs(61));
        forget_recovered(&limiter);
        assert_eq!(limiter.len(), 0);
    }
}

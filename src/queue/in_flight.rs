//! The deliveries running now, shared by every QueueRunner the Supervisor
//! builds: a restarted runner must not start a program its predecessor
//! started and that is still running.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

type Key = (String, usize);

/// A set of (queue id, delivery index), cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<Mutex<HashSet<Key>>>);

impl InFlight {
    fn set(&self) -> MutexGuard<'_, HashSet<Key>> {
        // A panic while holding the lock cannot leave the set half-changed:
        // every change is a single insert or remove.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn contains(&self, id: &str, index: usize) -> bool {
        self.set().contains(&(id.to_string(), index))
    }

    /// Registers a delivery; the guard ends the registration when the
    /// attempt ends, whoever is still waiting for it.
    pub(crate) fn start(&self, id: &str, index: usize) -> InFlightGuard {
        let key = (id.to_string(), index);
        self.set().insert(key.clone());
        InFlightGuard {
            set: self.clone(),
            key,
        }
    }
}

/// Held by the worker for the length of one attempt.
pub(crate) struct InFlightGuard {
    set: InFlight,
    key: Key,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.set().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_is_in_flight_while_its_guard_lives() {
        let in_flight = InFlight::default();
        let other = in_flight.clone();
        let guard = in_flight.start("ID", 1);
        assert!(other.contains("ID", 1));
        assert!(!other.contains("ID", 0));
        drop(guard);
        assert!(!other.contains("ID", 1));
    }
}

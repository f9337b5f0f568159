//! The actors, one file each with its messages beside it. They are thin:
//! they own state, receive messages, call the pure modules, send messages.

pub mod acceptor;
pub mod alias_resolver;
pub mod collector;
pub mod control_server;
pub mod delivery_worker;
pub mod metrics_server;
pub mod queue_runner;
pub mod session;
pub mod supervisor;

use std::sync::{Arc, RwLock};

/// An actor's current address, swapped by the Supervisor when it restarts
/// the actor: whoever holds a `Shared` reaches the new one.
pub struct Shared<T>(Arc<RwLock<T>>);

impl<T: Clone> Shared<T> {
    pub fn new(value: T) -> Self {
        Shared(Arc::new(RwLock::new(value)))
    }

    pub fn get(&self) -> T {
        // Replacing the value is one assignment: a panic elsewhere cannot
        // leave it half-written.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

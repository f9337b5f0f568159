//! What an operator asks of the queue (`mailnode ctl queue ...`): attempt
//! now, delete, hold, release, return to the sender. Each is an event like
//! any other: it changes the scheduler's state and leaves commands.

use std::sync::Arc;
use std::time::SystemTime;

use super::{MessageState, OperatorError, Removal, Round, Scheduler};
use crate::delivery::status::EnhancedCode;
use crate::spool::DeliveryState;

impl Scheduler {
    /// Attempts now one message, or every deferred one; returns the ids.
    pub(crate) fn flush(
        &mut self,
        which: Option<String>,
        now: SystemTime,
    ) -> Result<Vec<String>, OperatorError> {
        let mut ids: Vec<String> = match which {
            Some(id) => {
                if self.tracked(&id)?.envelope.held {
                    return Err(OperatorError::Held(id));
                }
                vec![id]
            }
            None => self
                .messages
                .iter()
                .filter(|(_, t)| t.state() == MessageState::Deferred)
                .map(|(id, _)| id.clone())
                .collect(),
        };
        ids.sort();
        for id in &ids {
            if self
                .messages
                .get(id)
                .is_some_and(|t| t.deferred_until.is_some())
            {
                self.make_ready(id, Round::Again, now);
                self.settle(id, now);
            }
        }
        self.after_event();
        Ok(ids)
    }

    pub(crate) fn delete(&mut self, id: &str) -> Result<(), OperatorError> {
        let t = self.tracked(id)?;
        if t.running > 0 || t.bouncing {
            return Err(OperatorError::Busy(id.to_string()));
        }
        self.ready.remove_message(id);
        // Logged by the runner once the removal is durable.
        self.remove(id, Removal::Deleted);
        self.after_event();
        Ok(())
    }

    pub(crate) fn hold(&mut self, id: &str) -> Result<(), OperatorError> {
        self.tracked(id)?;
        self.ready.remove_message(id);
        if let Some(t) = self.messages.get_mut(id) {
            t.waiting = 0;
            Arc::make_mut(&mut t.envelope).held = true;
        }
        self.persist(id);
        tracing::info!(queue_id = %id, "held by the operator");
        self.after_event();
        Ok(())
    }

    pub(crate) fn release(&mut self, id: &str, now: SystemTime) -> Result<(), OperatorError> {
        if !self.tracked(id)?.envelope.held {
            return Err(OperatorError::NotHeld(id.to_string()));
        }
        if let Some(t) = self.messages.get_mut(id) {
            Arc::make_mut(&mut t.envelope).held = false;
            t.deferred_until = None;
        }
        self.persist(id);
        self.make_ready(id, Round::Again, now);
        self.settle(id, now);
        tracing::info!(queue_id = %id, "released by the operator");
        self.after_event();
        Ok(())
    }

    /// Returns to the sender now what is not yet delivered.
    pub(crate) fn bounce(&mut self, id: &str, now: SystemTime) -> Result<(), OperatorError> {
        let t = self.tracked(id)?;
        if t.running > 0 || t.bouncing {
            return Err(OperatorError::Busy(id.to_string()));
        }
        if t.envelope.sender.is_empty() {
            return Err(OperatorError::FromNullSender(id.to_string()));
        }
        if !self.can_bounce {
            return Err(OperatorError::NoRelay(id.to_string()));
        }
        self.ready.remove_message(id);
        if let Some(t) = self.messages.get_mut(id) {
            t.waiting = 0;
            t.deferred_until = None;
            let env = Arc::make_mut(&mut t.envelope);
            env.held = false;
            for d in env
                .deliveries
                .iter_mut()
                .filter(|d| d.state == DeliveryState::Pending)
            {
                d.state = DeliveryState::Failed;
                d.last_error = format!("returned by the operator; last error: {}", d.last_error);
                let why = d.last_error.clone();
                d.record(now, EnhancedCode::PERMANENT, &why);
            }
        }
        self.record_then_settle(id.to_string(), now);
        self.after_event();
        Ok(())
    }
}

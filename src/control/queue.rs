//! `queue.*` control commands: what they ask of the queue scheduler, and
//! the JSON of their replies.

use std::time::SystemTime;

use crate::control::{AttemptEntry, QueueEntry, RecipientEntry};
use crate::queue::scheduler::{MessageView, Scheduler};
use crate::spool::DeliveryState;

/// What an operator asks of the queue (`mailnode ctl queue ...`).
#[derive(Debug, Clone)]
pub(crate) enum QueueCommand {
    Show(String),
    /// Attempt now: one message, or every deferred one.
    Flush(Option<String>),
    Delete(String),
    Hold(String),
    Release(String),
    /// Return to the sender now what is not yet delivered.
    Bounce(String),
}

/// Carries out `command` on the scheduler; the reply's data, or the reason
/// it was refused. The scheduler's commands are left for its runner to take.
pub(crate) fn answer(
    command: QueueCommand,
    scheduler: &mut Scheduler,
    now: SystemTime,
) -> Result<serde_json::Value, String> {
    use serde_json::json;
    let refused = |e: crate::queue::scheduler::OperatorError| e.to_string();
    match command {
        QueueCommand::Show(id) => {
            let view = scheduler.view(&id).map_err(refused)?;
            let mut v = serde_json::to_value(entry(&view, true, now)).map_err(|e| e.to_string())?;
            let env = view.envelope;
            v["client_address"] = env.client_address.clone().into();
            v["client_helo"] = env.client_helo.clone().into();
            v["channel"] = env.channel.clone().into();
            v["tls_version"] = env.tls_version.clone().into();
            v["tls_cipher"] = env.tls_cipher.clone().into();
            // The [auth] verdict, as its program gets it (empty without).
            v["auth_spf"] = env.auth.spf.clone().into();
            v["auth_dkim"] = env.auth.dkim.clone().into();
            v["auth_dmarc"] = env.auth.dmarc.clone().into();
            v["auth_from_domain"] = env.auth.from_domain.clone().into();
            v["arrival"] = rfc3339(env.arrival).into();
            Ok(v)
        }
        QueueCommand::Flush(which) => {
            let ids = scheduler.flush(which, now).map_err(refused)?;
            Ok(json!({ "flushed": ids }))
        }
        QueueCommand::Delete(id) => {
            scheduler.delete(&id).map_err(refused)?;
            Ok(json!({ "deleted": id }))
        }
        QueueCommand::Hold(id) => {
            scheduler.hold(&id).map_err(refused)?;
            Ok(json!({ "held": id }))
        }
        QueueCommand::Release(id) => {
            scheduler.release(&id, now).map_err(refused)?;
            Ok(json!({ "released": id }))
        }
        QueueCommand::Bounce(id) => {
            scheduler.bounce(&id, now).map_err(refused)?;
            Ok(json!({ "bounced": id }))
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn delivery_state(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Pending => "pending",
        DeliveryState::Delivered => "delivered",
        DeliveryState::Failed => "failed",
        DeliveryState::Bounced => "bounced",
        DeliveryState::Superseded => "superseded",
    }
}

/// One message as `queue.list` shows it (`queue.show` adds the history).
pub(crate) fn entry(view: &MessageView<'_>, with_history: bool, now: SystemTime) -> QueueEntry {
    let env = view.envelope;
    let recipients = env
        .deliveries
        .iter()
        .map(|d| RecipientEntry {
            address: d.recipient.clone(),
            original: d.original_recipient.clone(),
            target: d.target.to_string(),
            state: delivery_state(d.state).into(),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
            history: if with_history {
                d.history
                    .iter()
                    .map(|a| AttemptEntry {
                        at: rfc3339(a.at),
                        status: a.status.clone(),
                        diagnostic: a.diagnostic.clone(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    QueueEntry {
        id: env.id.clone(),
        state: view.state.as_str().into(),
        sender: env.sender.clone(),
        size: env.size,
        age_seconds: now.duration_since(env.arrival).map_or(0, |d| d.as_secs()),
        next_attempt_seconds: view
            .next_attempt
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

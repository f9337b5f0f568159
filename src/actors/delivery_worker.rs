//! DeliveryWorker (≈ Postfix's pipe/local): runs one delivery when the
//! QueueRunner asks and answers with its typed outcome. It holds no queue
//! state, so it can die and be recreated without losing anything.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::aliases::Target;
use crate::delivery::program::{self, DeliveryStatus, ProgramRequest, RunAs};
use crate::delivery::{program_env, stdin_prefix};
use crate::spool::{Envelope, Spool};

/// Attempt delivery `index` of `envelope`.
#[derive(Message)]
#[rtype(result = "DeliveryReport")]
pub struct Deliver {
    pub envelope: Arc<Envelope>,
    pub index: usize,
}

/// The result of one attempt.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub status: DeliveryStatus,
    pub duration: Duration,
    /// False when no attempt was made (the worker was lost): it does not
    /// count towards `ATTEMPT` or the backoff.
    pub attempted: bool,
}

pub struct DeliveryWorker {
    spool: Spool,
    run_as: Option<RunAs>,
    timeout: Duration,
}

impl DeliveryWorker {
    pub fn new(spool: Spool, run_as: Option<RunAs>, timeout: Duration) -> Self {
        DeliveryWorker {
            spool,
            run_as,
            timeout,
        }
    }
}

impl Actor for DeliveryWorker {
    type Context = Context<Self>;
}

impl Handler<Deliver> for DeliveryWorker {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) -> Self::Result {
        let env = &msg.envelope;
        let Some(delivery) = env.deliveries.get(msg.index) else {
            return Box::pin(async {
                DeliveryReport {
                    status: DeliveryStatus::Permanent("no such delivery".into()),
                    duration: Duration::ZERO,
                    attempted: true,
                }
            });
        };
        let command = match &delivery.target {
            Target::Pipe { command } => command.clone(),
            Target::Forward { address } => {
                let status = DeliveryStatus::Permanent(format!(
                    "forwarding to {address} needs a relay, which this node does not use"
                ));
                return Box::pin(async move {
                    DeliveryReport {
                        status,
                        duration: Duration::ZERO,
                        attempted: true,
                    }
                });
            }
        };
        let request = ProgramRequest {
            command,
            env: program_env(env, msg.index),
            run_as: self.run_as.clone(),
            timeout: self.timeout,
            stdin_prefix: stdin_prefix(env, msg.index),
            body_path: self.spool.body_path(&env.id),
        };
        let id = env.id.clone();
        let recipient = delivery.recipient.clone();
        Box::pin(async move {
            let outcome = program::run(&request).await;
            let status = outcome.status();
            let output = String::from_utf8_lossy(&outcome.output);
            tracing::info!(
                queue_id = %id,
                recipient = %recipient,
                result = ?status,
                duration_ms = outcome.duration.as_millis() as u64,
                output = %output.trim(),
                "delivery attempt"
            );
            DeliveryReport {
                status,
                duration: outcome.duration,
                attempted: true,
            }
        })
    }
}

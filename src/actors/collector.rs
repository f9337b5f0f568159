//! Collector: stands in for the QueueRunner during an `inetd` session,
//! keeping the messages the session made durable so they can be delivered
//! once the session is over (or left to the daemon's queue runner).

use actix::prelude::*;

use crate::actors::queue_runner::Enqueued;
use crate::spool::Envelope;

/// Hands over what was collected.
#[derive(Message)]
#[rtype(result = "Vec<Envelope>")]
pub struct TakeCollected;

#[derive(Default)]
pub struct Collector {
    collected: Vec<Envelope>,
}

impl Actor for Collector {
    type Context = Context<Self>;
}

impl Handler<Enqueued> for Collector {
    type Result = ();

    fn handle(&mut self, msg: Enqueued, _: &mut Self::Context) {
        self.collected.push(*msg.0);
    }
}

impl Handler<TakeCollected> for Collector {
    type Result = MessageResult<TakeCollected>;

    fn handle(&mut self, _: TakeCollected, _: &mut Self::Context) -> Self::Result {
        MessageResult(std::mem::take(&mut self.collected))
    }
}

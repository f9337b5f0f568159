//! Supervisor: the top of the actor tree. It builds every long-lived actor,
//! keeps their addresses, and is the one place the embedding API and the
//! signal handlers talk to.

use actix::prelude::*;

use crate::actors::acceptor::{Acceptor, StopAccepting};
use crate::actors::alias_resolver::{AliasResolver, Reload};
use crate::actors::queue_runner::{Counts, Drain, QueueCounts, QueueRunner};

/// The addresses of the supervised actors.
pub struct Children {
    pub acceptor: Addr<Acceptor>,
    pub resolver: Addr<AliasResolver>,
    pub queue_runner: Addr<QueueRunner>,
}

pub struct Supervisor {
    children: Children,
}

impl Supervisor {
    pub fn new(children: Children) -> Self {
        Supervisor { children }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// Release the listeners; sessions in progress finish.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopIntake;

impl Handler<StopIntake> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: StopIntake, _: &mut Self::Context) {
        self.children.acceptor.do_send(StopAccepting);
    }
}

/// Re-read the aliases file.
#[derive(Message)]
#[rtype(result = "Result<usize, String>")]
pub struct ReloadAliases;

impl Handler<ReloadAliases> for Supervisor {
    type Result = ResponseFuture<Result<usize, String>>;

    fn handle(&mut self, _: ReloadAliases, _: &mut Self::Context) -> Self::Result {
        let asked = self.children.resolver.send(Reload);
        Box::pin(async move {
            asked
                .await
                .unwrap_or_else(|e| Err(format!("alias resolver unavailable: {e}")))
        })
    }
}

/// Start no more deliveries; answers once the running ones are done and
/// recorded (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainDeliveries;

impl Handler<DrainDeliveries> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: DrainDeliveries, _: &mut Self::Context) -> Self::Result {
        let asked = self.children.queue_runner.send(Drain);
        Box::pin(async move {
            let _ = asked.await;
        })
    }
}

/// How many messages are queued, by state.
#[derive(Message)]
#[rtype(result = "Option<QueueCounts>")]
pub struct QueueStatus;

impl Handler<QueueStatus> for Supervisor {
    type Result = ResponseFuture<Option<QueueCounts>>;

    fn handle(&mut self, _: QueueStatus, _: &mut Self::Context) -> Self::Result {
        let asked = self.children.queue_runner.send(Counts);
        Box::pin(async move { asked.await.ok() })
    }
}

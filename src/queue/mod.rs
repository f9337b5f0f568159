//! The queue's decisions, pure: [`policy`] says what becomes of a message
//! once none of its deliveries is running, and [`scheduler`] keeps the state
//! of every queued message and turns events (a message enqueued, a result
//! reported, a retry due, an operator's command) into commands (dispatch,
//! record, remove, bounce) that the QueueRunner actor carries out.

pub(crate) mod in_flight;
pub(crate) mod policy;
pub(crate) mod reexpand;
pub(crate) mod scheduler;

pub(crate) use in_flight::{InFlight, InFlightGuard};
pub use policy::QueuePolicy;
pub(crate) use policy::{inline_verdict, next_step, record_result, Step};
pub(crate) use reexpand::Aliases;
pub use scheduler::QueueCounts;

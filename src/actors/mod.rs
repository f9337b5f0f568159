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

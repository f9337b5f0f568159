//! SMTP, free of I/O: command parsing, the DATA reader, replies, the session
//! state machine, and the codec that frames a byte stream for them.

pub mod codec;
pub mod command;
pub mod data;
pub mod forged_results;
pub mod headers;
pub mod proxy;
mod received;
pub mod reply;
pub mod session;

//! mailnode: a supervised SMTP mail node that accepts mail for the addresses
//! in an aliases file and pipes each message into the program its alias
//! names, keeping every accepted message in a durable queue until the
//! program has taken it.
//!
//! The crate is also a library: [`Node::start`] runs a node in-process from a
//! [`config::Config`] (port 0 works; [`NodeHandle::local_addrs`] tells the
//! bound addresses), [`NodeHandle::stop`] releases the listeners while
//! sessions finish, and [`NodeHandle::shutdown`] ends everything.

// The README's code is compiled with the tests, so its embedding example
// cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub(crate) mod access;
pub(crate) mod actors;
pub mod aliases;
pub(crate) mod auth;
pub(crate) mod batch;
pub mod config;
pub mod control;
pub(crate) mod delivery;
pub mod hooks;
pub(crate) mod limits;
pub(crate) mod memory;
mod node;
// Public only to the fuzz targets (fuzz/), which drive the parsers directly.
#[cfg(feature = "fuzzing")]
pub mod protocol;
#[cfg(not(feature = "fuzzing"))]
pub(crate) mod protocol;
pub(crate) mod queue;
pub mod send;
pub mod spool;
pub mod sysexits;
pub(crate) mod telemetry;
pub mod tls;

pub use batch::{run_queue_once, serve_stdio, PassSummary};
pub use delivery::handler::{Deliver, HandedMessage, MessageReader};
pub use delivery::http::HttpSetupError;
pub use delivery::program::RunAsError;
pub use delivery::spawn::raise_open_file_limit;
pub use delivery::status::{DeliveryStatus, EnhancedCode};
pub use node::{Node, NodeHandle, StartError};
pub use queue::QueueCounts;

/// The version, with the git commit when the build had one:
/// `0.1.0 (git 1a2b3c4d5e6f)`.
pub const VERSION: &str = env!("MAILNODE_VERSION");

/// An error and its causes on one line, each said once: most errors here
/// already name their cause in their own text (`cannot create control
/// socket X: Not a directory`), which a plain walk of the chain would say
/// a second time.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut said = String::new();
    let mut cause = Some(e);
    while let Some(error) = cause {
        let text = error.to_string();
        if !said.contains(&text) {
            if !said.is_empty() {
                said.push_str(": ");
            }
            said.push_str(&text);
        }
        cause = error.source();
    }
    said
}

/// Reads `[http] secret_file` and `ca_file` as a starting node would, for
/// `mailnode check`.
pub fn check_http(config: &config::HttpConfig) -> Result<(), delivery::http::HttpSetupError> {
    delivery::http::HttpShared::new(config).map(|_| ())
}

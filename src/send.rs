//! `mailnode send`: the seed's `smtp` talker. Sends one message to an SMTP
//! server and says how it went in a sysexits code, so shell scripts and
//! cron jobs can act on it.

use crate::delivery::relay::{self, Outgoing, RelayTarget};
use crate::sysexits::{EX_TEMPFAIL, EX_USAGE};

/// How long the server may take to answer, per step.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What a send came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// 0 sent; 67 (EX_NOUSER) a recipient refused with 5xx; 69
    /// (EX_UNAVAILABLE) another 5xx; 75 (EX_TEMPFAIL) 4xx, no connection or
    /// a timeout; 64 (EX_USAGE) bad arguments.
    pub exit: u8,
    /// One line per problem, for the operator.
    pub problems: Vec<String>,
}

impl Report {
    fn usage(problem: String) -> Self {
        Report {
            exit: EX_USAGE,
            problems: vec![problem],
        }
    }
}

/// A send whose arguments are checked, waiting for its message: a usage
/// error is told before anything is read from a pipe that may never close.
#[derive(Debug, Clone)]
pub struct Sending {
    target: RelayTarget,
    sender: String,
    recipients: Vec<String>,
}

/// Checks the arguments of a send to `target` (`HOST` or `HOST:PORT`, port
/// 25 by default), greeting it as `helo` (default: this host's name).
/// Angle brackets around addresses are optional; an empty sender is `<>`.
pub fn prepare(
    helo: Option<String>,
    target: &str,
    sender: &str,
    recipients: &[String],
) -> Result<Sending, Report> {
    let Some((host, port)) = relay::parse_host_port(target) else {
        return Err(Report::usage(format!(
            "bad target {target:?}: expected HOST or HOST:PORT"
        )));
    };
    let sender = sender.trim_start_matches('<').trim_end_matches('>');
    let recipients: Vec<String> = recipients
        .iter()
        .map(|r| r.trim_start_matches('<').trim_end_matches('>').to_string())
        .collect();
    if recipients.iter().any(String::is_empty) {
        return Err(Report::usage("empty recipient".into()));
    }
    let has_control = |a: &str| a.chars().any(char::is_control);
    if has_control(sender) || recipients.iter().any(|r| has_control(r)) {
        return Err(Report::usage(
            "addresses must not contain control characters".into(),
        ));
    }
    Ok(Sending {
        target: RelayTarget {
            host,
            port,
            helo: helo.unwrap_or_else(crate::config::system_hostname),
            timeout: TIMEOUT,
        },
        sender: sender.to_string(),
        recipients,
    })
}

impl Sending {
    /// Sends `message` and says how it went.
    pub fn send(self, message: &[u8]) -> Report {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                return Report {
                    exit: EX_TEMPFAIL,
                    problems: vec![e.to_string()],
                }
            }
        };
        let (sender, recipients) = (self.sender.as_str(), &self.recipients);
        let outgoing = Outgoing {
            sender,
            recipients,
            body_8bit: !message.is_ascii(),
            smtputf8: !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()),
        };
        let outcome = runtime.block_on(relay::send(&self.target, &outgoing, message));
        let mut problems = Vec::new();
        match &outcome {
            Err(e) => problems.push(e.to_string()),
            Ok(o) => {
                for r in o.refused.iter().chain(o.data.iter()) {
                    if !r.is_positive() {
                        problems.push(r.to_string());
                    }
                }
                for (rcpt, r) in recipients.iter().zip(&o.recipients) {
                    if !r.is_positive() {
                        problems.push(format!("<{rcpt}>: {r}"));
                    }
                }
            }
        }
        Report {
            exit: relay::exit_status(&outcome),
            problems,
        }
    }
}

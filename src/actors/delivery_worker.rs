//! DeliveryWorker (≈ Postfix's pipe/local and smtp): runs one delivery when
//! the QueueRunner asks (a program, a POST to an HTTP target, the
//! embedder's handler, or a forward through `[relay]`), or
//! returns a message to its sender, and answers with the typed outcome. It
//! holds no queue state, so it can die and be recreated losing nothing.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use tokio::io::AsyncReadExt;

use crate::aliases::Target;
use crate::delivery::handler::{HandedMessage, Handlers, MessageReader};
use crate::delivery::http::{HttpClient, HttpShared};
use crate::delivery::program::{self, ProgramRequest, RunAs};
use crate::delivery::relay::{self, Outgoing, RelayTarget};
use crate::delivery::spawn::ProgramSpawner;
use crate::delivery::status::{DeliveryStatus, EnhancedCode};
use crate::delivery::{dsn, program_env, stdin_prefix, DeliveryReport, UnreadableMessage};
use crate::queue::InFlightGuard;
use crate::spool::{Envelope, Spool};

/// Attempt delivery `index` of `envelope`.
#[derive(Message)]
#[rtype(result = "DeliveryReport")]
pub struct Deliver {
    pub envelope: Arc<Envelope>,
    pub index: usize,
    /// The message: in `queue/`, or in `incoming/` for inline delivery.
    pub body: std::path::PathBuf,
    /// Held until the attempt ends (queued deliveries).
    pub in_flight: Option<InFlightGuard>,
}

/// Return deliveries `failed` of `envelope` to its sender.
#[derive(Message)]
#[rtype(result = "DeliveryStatus")]
pub struct Bounce {
    pub envelope: Arc<Envelope>,
    pub failed: Vec<usize>,
}

/// What every delivery worker is made with; one per node, cloned into each
/// worker (and into a restarted one).
#[derive(Clone)]
pub struct DeliverySetup {
    pub spool: Spool,
    pub run_as: Option<RunAs>,
    pub spawner: ProgramSpawner,
    /// `[delivery] timeout`: a program's, and a handler's.
    pub timeout: Duration,
    pub relay: Option<RelayTarget>,
    pub hostname: String,
    /// `[delivery] concurrency`, shared by every worker: programs and
    /// handlers running at once, whether the queue or an inline session
    /// asked. HTTP deliveries take a permit of their host instead.
    pub permits: Arc<tokio::sync::Semaphore>,
    pub http: Arc<HttpShared>,
    pub handlers: Handlers,
}

pub struct DeliveryWorker {
    setup: DeliverySetup,
    /// This worker's HTTP client (its pool of keep-alive connections lives
    /// on this worker's runtime), made at its first HTTP delivery.
    http_client: Option<Arc<HttpClient>>,
}

impl DeliveryWorker {
    pub fn new(setup: DeliverySetup) -> Self {
        DeliveryWorker {
            setup,
            http_client: None,
        }
    }

    fn http_client(&mut self) -> Result<Arc<HttpClient>, String> {
        if let Some(client) = self.http_client.as_ref().filter(|c| c.is_current()) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(HttpClient::new(Arc::clone(&self.setup.http))?);
        self.http_client = Some(Arc::clone(&client));
        Ok(client)
    }
}

impl Actor for DeliveryWorker {
    type Context = Context<Self>;
}

impl Handler<Deliver> for DeliveryWorker {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) -> Self::Result {
        let env = Arc::clone(&msg.envelope);
        let index = msg.index;
        let body_path = msg.body;
        let in_flight = msg.in_flight;
        let http_client = match env.deliveries.get(index).map(|d| &d.target) {
            Some(Target::Http { .. }) => Some(self.http_client()),
            _ => None,
        };
        let setup = self.setup.clone();
        Box::pin(async move {
            let started = Instant::now();
            let Some(delivery) = env.deliveries.get(index) else {
                return DeliveryReport {
                    status: DeliveryStatus::Permanent(
                        EnhancedCode::PERMANENT,
                        "no such delivery".into(),
                    ),
                    attempted: true,
                    retry_after: None,
                };
            };
            let mut retry_after = None;
            let (status, output) = match &delivery.target {
                Target::Pipe { command } => {
                    // Never closed, so acquiring only waits.
                    let _permit = setup.permits.acquire_owned().await.ok();
                    let request = ProgramRequest {
                        command: command.clone(),
                        env: program_env(&env, index),
                        run_as: setup.run_as,
                        spawner: setup.spawner,
                        timeout: setup.timeout,
                        stdin_prefix: stdin_prefix(&env, index),
                        body_path,
                        body_len: env.body_len(),
                    };
                    let outcome = program::run(&request).await;
                    let output = String::from_utf8_lossy(&outcome.output).trim().to_string();
                    (outcome.status(), output)
                }
                Target::Forward { address } => {
                    let _permit = setup.permits.acquire_owned().await.ok();
                    let status = forward(setup.relay.as_ref(), &env, address, &body_path).await;
                    (status, String::new())
                }
                Target::Http { url } => match http_client {
                    Some(Ok(client)) => {
                        let sent = Instant::now();
                        let outcome = client.post(url, &env, index, &body_path).await;
                        crate::telemetry::http_response(
                            http_class(&outcome.status),
                            sent.elapsed(),
                        );
                        retry_after = outcome.retry_after;
                        (outcome.status, String::new())
                    }
                    Some(Err(why)) => (DeliveryStatus::system_temporary(why), String::new()),
                    // Made above for every HTTP target.
                    None => (
                        DeliveryStatus::system_temporary("no HTTP client"),
                        String::new(),
                    ),
                },
                Target::Handler { name } => {
                    let _permit = setup.permits.acquire_owned().await.ok();
                    let status = match crate::delivery::open_message(&body_path, env.body_len()) {
                        Ok(file) => {
                            let message = handed_message(&env, index, file);
                            setup.handlers.deliver(name, message, setup.timeout).await
                        }
                        Err(e) => DeliveryStatus::system_temporary(e.to_string()),
                    };
                    (status, String::new())
                }
            };
            let duration = started.elapsed();
            let outcome = match status {
                DeliveryStatus::Delivered(_) => "delivered",
                DeliveryStatus::Temporary(..) => "deferred",
                DeliveryStatus::Permanent(..) => "bounced",
            };
            // Here, so inline deliveries count too.
            crate::telemetry::delivery(outcome, duration);
            crate::telemetry::delivery_by_target(delivery.target.kind(), outcome);
            tracing::info!(
                queue_id = %env.id,
                recipient = %delivery.recipient,
                target = delivery.target.kind(),
                attempt = delivery.attempts + 1,
                result = ?status,
                status = %status.code(),
                duration_ms = duration.as_millis() as u64,
                // Debug form: the program's newlines cannot forge log lines.
                output = ?output,
                "delivery attempt"
            );
            drop(in_flight);
            DeliveryReport {
                status,
                attempted: true,
                retry_after,
            }
        })
    }
}

/// The `class` label of `mailnode_http_responses_total`.
fn http_class(status: &DeliveryStatus) -> &'static str {
    let diagnostic = status.diagnostic();
    match status {
        DeliveryStatus::Delivered(_) => "2xx",
        _ if diagnostic.starts_with("HTTP 3") => "3xx",
        _ if diagnostic.starts_with("HTTP 4") => "4xx",
        _ if diagnostic.starts_with("HTTP 5") => "5xx",
        _ => "failed",
    }
}

/// Delivery `index` of `env` as a handler gets it.
fn handed_message(env: &Envelope, index: usize, file: std::fs::File) -> HandedMessage {
    let d = &env.deliveries[index];
    HandedMessage {
        sender: env.sender.clone(),
        recipient: d.recipient.clone(),
        original_recipient: d.original_recipient.clone(),
        queue_id: env.id.clone(),
        delivery_id: env.delivery_id(index),
        attempt: d.attempts + 1,
        variables: program_env(env, index),
        message: MessageReader::new(stdin_prefix(env, index), file, env.body_len()),
    }
}

/// An address alias: the message goes on through the relay with its
/// original envelope sender.
async fn forward(
    relay: Option<&RelayTarget>,
    env: &Envelope,
    address: &str,
    body_path: &std::path::Path,
) -> DeliveryStatus {
    let Some(relay) = relay else {
        return DeliveryStatus::Permanent(
            EnhancedCode::NOT_CONFIGURED,
            format!("forwarding to {address} needs [relay]"),
        );
    };
    let body = match crate::delivery::open_message(body_path, env.body_len()) {
        Ok(f) => tokio::fs::File::from_std(f).take(env.body_len().unwrap_or(u64::MAX)),
        Err(e) => return DeliveryStatus::system_temporary(e.to_string()),
    };
    let recipients = [address.to_string()];
    let message = Outgoing {
        sender: &env.return_path,
        recipients: &recipients,
        body_8bit: env.body_8bit,
        smtputf8: env.smtputf8,
    };
    relay::recipient_status(&relay::send(relay, &message, body).await, 0)
}

impl Handler<Bounce> for DeliveryWorker {
    type Result = ResponseFuture<DeliveryStatus>;

    fn handle(&mut self, msg: Bounce, _: &mut Self::Context) -> Self::Result {
        let relay = self.setup.relay.clone();
        let hostname = self.setup.hostname.clone();
        let body_path = self.setup.spool.body_path(&msg.envelope.id);
        Box::pin(async move {
            return_to_sender(
                relay.as_ref(),
                &hostname,
                &msg.envelope,
                &msg.failed,
                &body_path,
            )
            .await
        })
    }
}

/// Sends the sender a delivery status notification for deliveries
/// `failed`, quoting the message's header section.
async fn return_to_sender(
    relay: Option<&RelayTarget>,
    hostname: &str,
    env: &Envelope,
    failed: &[usize],
    body_path: &std::path::Path,
) -> DeliveryStatus {
    let Some(relay) = relay else {
        return DeliveryStatus::Permanent(
            EnhancedCode::NOT_CONFIGURED,
            "no [relay] to return the message through".into(),
        );
    };
    // Only the message's own bytes: its sealed envelope follows them.
    let most = env.body_len().unwrap_or(u64::MAX);
    let mut head = Vec::new();
    match crate::delivery::open_message(body_path, env.body_len()) {
        Ok(file) => {
            if let Err(e) = tokio::fs::File::from_std(file)
                .take(most.min(dsn::MAX_ORIGINAL_HEADERS as u64))
                .read_to_end(&mut head)
                .await
            {
                return DeliveryStatus::system_temporary(format!("cannot read the message: {e}"));
            }
        }
        // Damage no retry can mend: the sender still hears of the failure,
        // without the message's headers quoted from a cut file.
        Err(e @ UnreadableMessage::Short { .. }) => {
            tracing::warn!(queue_id = %env.id, "returning the message without quoting it: {e}");
        }
        Err(e) => return DeliveryStatus::system_temporary(e.to_string()),
    }
    let notice = dsn::build(
        env,
        failed,
        hostname,
        dsn::header_section(&head),
        SystemTime::now(),
    );
    let recipients = [env.return_path.clone()];
    let message = Outgoing {
        sender: "",
        recipients: &recipients,
        body_8bit: true,
        smtputf8: env.smtputf8,
    };
    let status = relay::recipient_status(&relay::send(relay, &message, &notice[..]).await, 0);
    tracing::info!(queue_id = %env.id, to = %env.sender, result = ?status, "bounce");
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::BodyCheck;

    /// A queue file cut short of the 1000 bytes its envelope records, and a
    /// relay where nobody listens: had the message been sent, the failure
    /// would be the connection's.
    fn cut_message(dir: &std::path::Path) -> (std::path::PathBuf, Envelope, RelayTarget) {
        let path = dir.join("cut.msg");
        std::fs::write(&path, b"Subject: x\n\ncut sh").unwrap();
        let mut env = Envelope::for_test(
            "0000000000000AA",
            "a@example.org",
            SystemTime::now(),
            vec![],
        );
        env.body_check = Some(BodyCheck {
            len: 1000,
            crc32: 0,
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = RelayTarget {
            host: "127.0.0.1".into(),
            port,
            helo: "test".into(),
            timeout: Duration::from_secs(2),
        };
        (path, env, relay)
    }

    fn is_cut(status: &DeliveryStatus) -> bool {
        matches!(status, DeliveryStatus::Temporary(_, e) if e.contains("of its 1000 bytes"))
    }

    #[tokio::test]
    async fn a_queue_file_shorter_than_its_envelope_is_never_forwarded() {
        let dir = tempfile::tempdir().unwrap();
        let (path, env, relay) = cut_message(dir.path());
        let status = forward(Some(&relay), &env, "x@example.org", &path).await;
        assert_eq!(status.code().to_string(), "4.3.0");
        assert!(is_cut(&status), "{status:?}");
    }

    #[tokio::test]
    async fn a_queue_file_shorter_than_its_envelope_is_still_returned_unquoted() {
        let dir = tempfile::tempdir().unwrap();
        let (path, env, relay) = cut_message(dir.path());
        let status = return_to_sender(Some(&relay), "mx.test", &env, &[], &path).await;
        // It went as far as the relay (nobody listens there): a cut file is
        // no reason to keep the sender from hearing, and retrying would
        // never mend it.
        assert_eq!(status.code(), EnhancedCode::NO_CONNECTION, "{status:?}");
    }
}

//! ControlServer (≈ Postfix's postqueue/postsuper): the admin socket. One
//! JSON request per line, one JSON reply per line (`src/control/`). Peers
//! of another uid than ours are refused unless they are root.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::actors::alias_resolver::{AliasResolver, Reload, Resolve};
use crate::actors::queue_runner::{Control, List, QueueRunner};
use crate::actors::Shared;
use crate::control::queue::{entry, QueueCommand};
use crate::control::{Request, Response};
use crate::limits::ConnectionTracker;
use crate::protocol::command::{self, Command};
use crate::protocol::session::RcptDecision;

/// The longest request line we read.
const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may stay silent, or leave a reply unread.
const IDLE: Duration = Duration::from_secs(60);
/// Control clients served at once; more are told to try again. With one
/// request in flight per client, this bounds what replies can hold.
pub(crate) const MAX_CLIENTS: usize = 16;
/// A listing is written in pieces of about this size: however long the
/// queue, no reply is ever whole in memory.
const CHUNK: usize = 64 * 1024;
/// A listing asks the queue runner for this many messages at a time.
const LIST_BATCH: usize = 256;

/// What the control commands reach.
#[derive(Clone)]
pub struct ControlDeps {
    pub queue_runner: Shared<Addr<QueueRunner>>,
    pub resolver: Shared<Addr<AliasResolver>>,
    pub tracker: Arc<ConnectionTracker>,
    pub paused: Arc<AtomicBool>,
    pub restarts: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    /// The certificate in force, for `tls reload`.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    pub started: Instant,
    /// [`MAX_CLIENTS`] permits, shared by restarted servers.
    pub clients: Arc<tokio::sync::Semaphore>,
}

/// Creates the socket: a stale one left by a crash is replaced, the
/// directory is made if missing, the mode is the configured one.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

struct Peer(std::io::Result<UnixStream>);

pub struct ControlServer {
    listener: Option<std::os::unix::net::UnixListener>,
    deps: ControlDeps,
}

impl ControlServer {
    pub fn new(listener: std::os::unix::net::UnixListener, deps: ControlDeps) -> Self {
        ControlServer {
            listener: Some(listener),
            deps,
        }
    }

    /// A server with no socket: it stops at once (and is tried again).
    pub fn stopped(deps: ControlDeps) -> Self {
        ControlServer {
            listener: None,
            deps,
        }
    }
}

impl Actor for ControlServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(listener) = self
            .listener
            .take()
            .and_then(|l| UnixListener::from_std(l).ok())
        else {
            tracing::error!("cannot serve the control socket");
            ctx.stop();
            return;
        };
        let peers = futures_util::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            if r.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some((Peer(r), l))
        });
        ctx.add_stream(peers);
    }
}

impl StreamHandler<Peer> for ControlServer {
    fn handle(&mut self, peer: Peer, _: &mut Self::Context) {
        let Ok(stream) = peer.0 else { return };
        let deps = self.deps.clone();
        actix::spawn(async move {
            let _ = serve_peer(stream, deps).await;
        });
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

async fn serve_peer(stream: UnixStream, deps: ControlDeps) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let allowed = stream
        .peer_cred()
        .map(|c| c.uid() == me || c.uid() == 0)
        .unwrap_or(false);
    let (read, mut write) = stream.into_split();
    if !allowed {
        let refusal = Response::error("permission denied: not the server's user or root");
        return send(&mut write, &refusal).await;
    }
    let Ok(_client) = Arc::clone(&deps.clients).try_acquire_owned() else {
        let busy = Response::error(format!(
            "too many control clients at once ({MAX_CLIENTS}); try again"
        ));
        return send(&mut write, &busy).await;
    };
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST));
    while let Ok(Some(next)) = tokio::time::timeout(IDLE, lines.next()).await {
        let line = match next {
            Ok(line) => line,
            Err(e) => {
                // Too long, or not UTF-8: say so, then hang up.
                return send(&mut write, &Response::error(format!("bad request: {e}"))).await;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        // One request at a time: the next line is read only once this
        // reply is written, so a client that pipelines and never reads
        // holds one reply, not one per request.
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => execute(request, &deps, &mut write).await?,
            Err(e) => send(&mut write, &Response::error(format!("bad request: {e}"))).await?,
        }
    }
    Ok(())
}

/// Writes `bytes`, or gives up on a client that has not read them within
/// [`IDLE`].
async fn write_within(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    bytes: &[u8],
) -> std::io::Result<()> {
    tokio::time::timeout(IDLE, write.write_all(bytes))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// `queue.list`, written as one reply line but built a piece at a time:
/// its memory is bounded by [`CHUNK`] and a batch of [`LIST_BATCH`]
/// messages, not by the queue, and a slow reader keeps no more than one
/// batch of envelopes from being freed or updated in place.
async fn send_listing(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    deps: &ControlDeps,
    mut after: Option<String>,
    limit: Option<usize>,
) -> std::io::Result<()> {
    if limit == Some(0) {
        return send(
            write,
            &Response::error("queue.list: limit must be at least 1"),
        )
        .await;
    }
    let paged = after.is_some() || limit.is_some();
    let mut left = limit.unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(CHUNK + 4096);
    let mut first = true;
    let mut begun = false;
    let more = loop {
        let batch = Some(left.min(LIST_BATCH));
        let runner = deps.queue_runner.get();
        let listing = match runner
            .send(List {
                after: after.take(),
                limit: batch,
            })
            .await
        {
            Ok(listing) => listing,
            Err(e) if !begun => {
                let lost = Response::error(format!("queue runner unavailable: {e}"));
                return send(write, &lost).await;
            }
            // Part of the reply is out: it cannot turn into an error now.
            Err(_) => return Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if !begun {
            out.extend_from_slice(br#"{"ok":true,"data":["#);
            begun = true;
        }
        let now = std::time::SystemTime::now();
        for listed in &listing.entries {
            if !first {
                out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut out, &entry(&listed.view(), false, now))
                .map_err(std::io::Error::other)?;
            if out.len() >= CHUNK {
                write_within(write, &out).await?;
                out.clear();
            }
        }
        left -= listing.entries.len();
        after = listing.entries.last().map(|l| l.envelope.id.clone());
        if !listing.more || left == 0 || after.is_none() {
            break listing.more;
        }
    };
    out.push(b']');
    if paged {
        out.extend_from_slice(format!(r#","more":{more}"#).as_bytes());
    }
    out.extend_from_slice(b"}\n");
    write_within(write, &out).await
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
    line.push(b'\n');
    write_within(write, &line).await
}

async fn queue(deps: &ControlDeps, command: QueueCommand) -> Response {
    match deps.queue_runner.get().send(Control(command)).await {
        Ok(Ok(data)) => Response::ok(data),
        Ok(Err(e)) => Response::error(e),
        Err(e) => Response::error(format!("queue runner unavailable: {e}")),
    }
}

/// Carries out one request and writes its reply.
async fn execute(
    request: Request,
    deps: &ControlDeps,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let response = match request {
        Request::Status => {
            let counts = match deps
                .queue_runner
                .get()
                .send(crate::actors::queue_runner::Counts)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    let lost = Response::error(format!("queue runner unavailable: {e}"));
                    return send(write, &lost).await;
                }
            };
            let restarts = deps.restarts.lock().map(|r| r.clone()).unwrap_or_default();
            Response::ok(serde_json::json!({
                "version": crate::VERSION,
                "uptime_seconds": deps.started.elapsed().as_secs(),
                "sessions": deps.tracker.open(),
                "queue": {
                    "active": counts.active,
                    "deferred": counts.deferred,
                    "held": counts.held,
                },
                "intake": if deps.paused.load(Ordering::Relaxed) { "paused" } else { "accepting" },
                "actor_restarts": restarts,
            }))
        }
        Request::QueueList { limit, after } => {
            return send_listing(write, deps, after, limit).await
        }
        Request::QueueShow { id } => queue(deps, QueueCommand::Show(id)).await,
        Request::QueueFlush { id } => queue(deps, QueueCommand::Flush(id)).await,
        Request::QueueDelete { id } => queue(deps, QueueCommand::Delete(id)).await,
        Request::QueueHold { id } => queue(deps, QueueCommand::Hold(id)).await,
        Request::QueueRelease { id } => queue(deps, QueueCommand::Release(id)).await,
        Request::QueueBounce { id } => queue(deps, QueueCommand::Bounce(id)).await,
        Request::AliasesReload => match deps.resolver.get().send(Reload).await {
            Ok(Ok(n)) => Response::ok(serde_json::json!({ "aliases": n })),
            Ok(Err(e)) => Response::error(e.to_string()),
            Err(e) => {
                Response::error(crate::aliases::ReloadError::ResolverUnavailable(e).to_string())
            }
        },
        Request::AliasesLookup { address } => lookup(deps, &address).await,
        Request::TlsReload => reload_tls(deps),
        Request::IntakePause => {
            deps.paused.store(true, Ordering::Relaxed);
            crate::telemetry::intake_paused(true);
            Response::ok(serde_json::json!({ "intake": "paused" }))
        }
        Request::IntakeResume => {
            deps.paused.store(false, Ordering::Relaxed);
            crate::telemetry::intake_paused(false);
            Response::ok(serde_json::json!({ "intake": "accepting" }))
        }
    };
    send(write, &response).await
}

/// What an address resolves to, exactly as RCPT would see it.
async fn lookup(deps: &ControlDeps, address: &str) -> Response {
    let line = format!(
        "RCPT TO:<{}>",
        address.trim_start_matches('<').trim_end_matches('>')
    );
    let Ok(Command::Rcpt { to }) = command::parse(line.as_bytes()) else {
        return Response::error(format!("not an address: {address}"));
    };
    match deps.resolver.get().send(Resolve(to)).await {
        Ok(RcptDecision::Accept(targets)) => Response::ok(serde_json::json!({
            "address": address,
            "accepted": true,
            "targets": targets.iter().map(|t| serde_json::json!({
                "recipient": t.recipient,
                "target": t.target.to_string(),
            })).collect::<Vec<_>>(),
        })),
        Ok(RcptDecision::Refuse(reply)) => Response::ok(serde_json::json!({
            "address": address,
            "accepted": false,
            "reply": reply.to_string(),
        })),
        Err(e) => Response::error(format!("alias resolver unavailable: {e}")),
    }
}

/// `tls reload`: the next handshake uses the files' certificate; on
/// failure the one in force stays, and the operator reads why.
fn reload_tls(deps: &ControlDeps) -> Response {
    let result = match &deps.tls {
        Some(tls) => tls.reload(),
        None => Err(crate::tls::TlsError::NotConfigured),
    };
    match result {
        Ok(not_after) => {
            let not_after = humantime::format_rfc3339_seconds(not_after).to_string();
            tracing::info!(%not_after, "TLS certificate reloaded");
            Response::ok(serde_json::json!({ "tls": "reloaded", "not_after": not_after }))
        }
        Err(e) => {
            tracing::error!("TLS certificate not reloaded, the old one stays in force: {e}");
            Response::error(format!("{e}; the certificate in force is unchanged"))
        }
    }
}

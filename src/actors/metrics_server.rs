//! MetricsServer: answers `GET /metrics` on `[metrics] listen` with the
//! Prometheus text exposition. A minimal HTTP/1.1 responder, enough for a
//! Prometheus scrape or curl, so the node needs no web framework.

use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::telemetry;

/// The most of a request we read; a scrape request is a few hundred bytes.
const MAX_REQUEST: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct Scrape(std::io::Result<(TcpStream, SocketAddr)>);

pub struct MetricsServer {
    listener: Option<std::net::TcpListener>,
}

impl MetricsServer {
    pub fn new(listener: std::net::TcpListener) -> Self {
        MetricsServer {
            listener: Some(listener),
        }
    }

    /// A server with nothing to serve: it stops as soon as it starts.
    pub fn stopped() -> Self {
        MetricsServer { listener: None }
    }
}

impl Actor for MetricsServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(listener) = self.listener.take() else {
            ctx.stop();
            return;
        };
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                let scrapes = futures_util::stream::unfold(listener, |l| async move {
                    let r = l.accept().await;
                    if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Some((Scrape(r), l))
                });
                ctx.add_stream(scrapes);
            }
            Err(e) => tracing::error!("cannot serve metrics: {e}"),
        }
    }
}

impl StreamHandler<Scrape> for MetricsServer {
    fn handle(&mut self, scrape: Scrape, _: &mut Self::Context) {
        if let Ok((stream, _)) = scrape.0 {
            actix::spawn(async move {
                let _ = tokio::time::timeout(IO_TIMEOUT, answer(stream)).await;
            });
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, kind, body) = match (method, path) {
        (b"GET", b"/metrics") => match telemetry::render() {
            Some(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "no recorder\n".into(),
            ),
        },
        (b"GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

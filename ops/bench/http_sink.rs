//! http-sink: the HTTP end of the benchmark's `http` part, the same for
//! mailnode's HTTP targets and for Postfix piping into curl.
//!
//!     http-sink PORT LOGFILE
//!
//! Listens on 127.0.0.1:PORT and answers every POST `200 OK` on a kept-open
//! HTTP/1.1 connection (`Expect: 100-continue` answered, `Connection:
//! close` honoured). Like ops/bench/sink.c for programs, it appends the
//! value of the message's Message-Id: header, one line per request with a
//! single write (O_APPEND), to LOGFILE: "delivered" is that log reaching N
//! lines. Prints "listening" once it accepts connections. One thread, so
//! that its CPU time is easy to read and the same for both servers.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(log)) = (args.next(), args.next()) else {
        return Err("usage: http-sink PORT LOGFILE".into());
    };
    let port: u16 = port.parse()?;
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o666)
        .open(log)?;
    let log = Arc::new(Mutex::new(log));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("listening");
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                if let Err(e) = serve(stream, log).await {
                    eprintln!("http-sink: {e}");
                }
            });
        }
    })
}

/// Requests on one connection until the client closes it.
async fn serve(
    stream: tokio::net::TcpStream,
    log: Arc<Mutex<std::fs::File>>,
) -> std::io::Result<()> {
    let mut stream = BufReader::with_capacity(64 * 1024, stream);
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let (mut length, mut close, mut expect) = (0usize, false, false);
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "expect" => expect = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        if expect {
            stream
                .get_mut()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await?;
        let id = message_id(&body).unwrap_or("(no-message-id)");
        {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.write_all(format!("{id}\n").as_bytes())?;
        }
        let answer: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        };
        stream.get_mut().write_all(answer).await?;
        if close {
            return Ok(());
        }
    }
}

/// The value of the header section's Message-Id: field.
fn message_id(message: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(message).ok()?;
    text.split('\n')
        .take_while(|l| !l.trim_end_matches('\r').is_empty())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("message-id")
                .then(|| value.trim())
        })
}

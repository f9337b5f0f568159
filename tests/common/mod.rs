//! Shared by the integration tests: a node on port 0 with its own temporary
//! spool and aliases, a raw SMTP client, and bounded polling.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mailnode::config::Config;
use mailnode::{Node, NodeHandle};

/// A running node and the directories the test owns.
pub struct TestNode {
    pub node: Option<NodeHandle>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// Where test programs write what they received (world-writable: when
    /// the tests run as root, programs run as `nobody`).
    pub outbox: PathBuf,
    pub spool: PathBuf,
}

/// A temporary directory that programs running as `nobody` can use.
pub fn shared_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).expect("outbox");
    std::fs::set_permissions(&outbox, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    (dir, outbox)
}

/// A test config: port 0, short timeouts and retries, paths in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config {
        hostname: "mx.test".into(),
        ..Config::default()
    };
    config.smtp.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.spool.path = dir.join("spool");
    config.aliases.path = dir.join("aliases");
    config.queue.retry_min = Duration::from_millis(200);
    config.queue.retry_max = Duration::from_secs(1);
    config.delivery.timeout = Duration::from_secs(20);
    // Metrics on a port of their own only where a test asks for them.
    config.metrics.listen = None;
    config.control.socket = dir.join("ctl.sock");
    config
}

impl TestNode {
    /// Starts a node whose aliases file is `aliases`; `OUTBOX` in it is
    /// replaced by the outbox path.
    pub fn start(aliases: &str) -> TestNode {
        Self::start_with(aliases, |_| {})
    }

    pub fn start_with(aliases: &str, adjust: impl FnOnce(&mut Config)) -> TestNode {
        Self::start_hooked(aliases, adjust, mailnode::hooks::Hooks::default())
    }

    pub fn start_hooked(
        aliases: &str,
        adjust: impl FnOnce(&mut Config),
        hooks: mailnode::hooks::Hooks,
    ) -> TestNode {
        let (dir, outbox) = shared_tempdir();
        let mut config = test_config(dir.path());
        std::fs::write(
            &config.aliases.path,
            aliases.replace("OUTBOX", &outbox.display().to_string()),
        )
        .expect("write aliases");
        adjust(&mut config);
        let spool = config.spool.path.clone();
        let node = Node::start_with(config, hooks).expect("node starts");
        let addr = node.local_addrs()[0];
        TestNode {
            node: Some(node),
            addr,
            dir,
            outbox,
            spool,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Files in `queue/` (two per queued message).
    pub fn queue_files(&self) -> usize {
        std::fs::read_dir(self.spool.join("queue"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn incoming_files(&self) -> usize {
        std::fs::read_dir(self.spool.join("incoming"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown();
        }
    }
}

/// One parsed reply: code, enhanced code (if any), full text.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

impl Reply {
    pub fn is(&self, code: u16, enhanced: &str) -> bool {
        self.code == code && self.enhanced == enhanced
    }
}

/// A raw SMTP client: writes exactly the bytes it is given.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Client {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    /// Writes if the server still takes it; false once it has hung up.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).is_ok()
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> Reply {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read reply");
            assert!(n > 0, "connection closed while waiting for a reply");
            let line = line.trim_end_matches(['\r', '\n']);
            assert!(line.len() >= 3, "short reply line {line:?}");
            text.push_str(line);
            text.push('\n');
            if line.as_bytes().get(3) != Some(&b'-') {
                let code: u16 = line[..3].parse().expect("reply code");
                let enhanced = line
                    .get(4..)
                    .and_then(|t| t.split_whitespace().next())
                    .filter(|w| w.split('.').count() == 3 && w.starts_with(['2', '4', '5']))
                    .unwrap_or("")
                    .to_string();
                return Reply {
                    code,
                    enhanced,
                    text,
                };
            }
        }
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Greeting, EHLO, MAIL and RCPT (answers not checked), then DATA,
    /// which must be answered 354.
    pub fn open_data(&mut self, helo: &str, from: &str, rcpt: &str) {
        self.reply();
        self.cmd(&format!("EHLO {helo}"));
        self.cmd(&format!("MAIL FROM:<{from}>"));
        self.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(self.cmd("DATA").code, 354);
    }

    /// One whole message (greeting to QUIT); `body` without the final dot.
    /// Returns the queue id of the `250`.
    pub fn send_message(mut self, helo: &str, from: &str, rcpt: &str, body: &str) -> String {
        assert_eq!(self.reply().code, 220);
        self.cmd(&format!("EHLO {helo}"));
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.is(250, "2.1.0"), "{r:?}");
        let r = self.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.is(250, "2.1.5"), "{r:?}");
        assert_eq!(self.cmd("DATA").code, 354);
        self.send(body.as_bytes());
        self.send(b".\r\n");
        let id = queued_id(&self.reply());
        self.cmd("QUIT");
        id
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// Polls `check` every 20 ms until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `path` exists and its content is stable.
pub fn wait_for_file(path: &Path) -> Vec<u8> {
    wait_for(Duration::from_secs(20), || {
        let first = std::fs::read(path).ok()?;
        std::thread::sleep(Duration::from_millis(30));
        let second = std::fs::read(path).ok()?;
        (first == second).then_some(second)
    })
    .unwrap_or_else(|| panic!("{} never appeared", path.display()))
}

/// Parses `env` output (one VAR=value a line).
pub fn parse_env(text: &[u8]) -> std::collections::BTreeMap<String, String> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The queue id of a `250 2.0.0 Ok: queued as ID` reply.
pub fn queued_id(reply: &Reply) -> String {
    assert!(reply.is(250, "2.0.0"), "not queued: {reply:?}");
    reply
        .text
        .trim()
        .rsplit(' ')
        .next()
        .expect("id")
        .to_string()
}

/// Runs python3 with `script`, passing `args`; returns stdout, panics on failure.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One message an SMTP sink received.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub helo: String,
    pub from: String,
    pub rcpts: Vec<String>,
    /// Content with dot-stuffing undone and CRLF line ends.
    pub data: Vec<u8>,
}

/// A small SMTP server standing in for `[relay]`: records what it is sent
/// and refuses recipients `refuse` names (with the reply it returns).
pub struct Sink {
    pub addr: SocketAddr,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<SinkMessage>>>,
}

type Refusal = dyn Fn(&str) -> Option<String> + Send + Sync;

impl Sink {
    pub fn start(refuse: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Sink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("sink binds");
        let addr = listener.local_addr().expect("sink addr");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = std::sync::Arc::clone(&received);
        let refuse: std::sync::Arc<Refusal> = std::sync::Arc::new(refuse);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let store = std::sync::Arc::clone(&store);
                let refuse = std::sync::Arc::clone(&refuse);
                std::thread::spawn(move || sink_session(stream, &store, &*refuse));
            }
        });
        Sink { addr, received }
    }

    pub fn messages(&self) -> Vec<SinkMessage> {
        self.received.lock().expect("sink lock").clone()
    }

    /// Waits until the sink holds at least `n` messages.
    pub fn wait_for(&self, n: usize) -> Vec<SinkMessage> {
        wait_for(Duration::from_secs(30), || {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
        .unwrap_or_else(|| panic!("the sink never got {n} messages: {:?}", self.messages()))
    }
}

fn sink_session(stream: TcpStream, store: &std::sync::Mutex<Vec<SinkMessage>>, refuse: &Refusal) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut say = |text: &str| writer.write_all(text.as_bytes()).is_ok();
    if !say("220 sink ESMTP\r\n") {
        return;
    }
    let mut current = SinkMessage {
        helo: String::new(),
        from: String::new(),
        rcpts: Vec::new(),
        data: Vec::new(),
    };
    let path = |line: &str| {
        let start = line.find('<').map_or(0, |i| i + 1);
        let end = line.rfind('>').unwrap_or(line.len());
        line.get(start..end).unwrap_or("").to_string()
    };
    loop {
        let mut raw = Vec::new();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw).trim_end().to_string();
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let ok = match verb.as_str() {
            "EHLO" | "HELO" => {
                current.helo = line[4..].trim().to_string();
                say("250-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
            }
            "MAIL" => {
                current.from = path(&line);
                current.rcpts.clear();
                say("250 2.1.0 ok\r\n")
            }
            "RCPT" => {
                let rcpt = path(&line);
                match refuse(&rcpt) {
                    Some(reply) => say(&format!("{reply}\r\n")),
                    None => {
                        current.rcpts.push(rcpt);
                        say("250 2.1.5 ok\r\n")
                    }
                }
            }
            "DATA" => {
                if !say("354 go ahead\r\n") {
                    return;
                }
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    match reader.read_until(b'\n', &mut l) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    if l.starts_with(b"..") {
                        l.remove(0);
                    }
                    data.extend_from_slice(&l);
                }
                current.data = data;
                store.lock().expect("sink lock").push(current.clone());
                say("250 2.0.0 queued\r\n")
            }
            "QUIT" => {
                say("221 bye\r\n");
                return;
            }
            "RSET" | "NOOP" => say("250 ok\r\n"),
            _ => say("500 what\r\n"),
        };
        if !ok {
            return;
        }
    }
}

/// A port free on 127.0.0.1 now, for a server that cannot be given port 0.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// The log lines a `mailnode serve` child has written so far.
pub type ServeLog = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Reads a `mailnode serve` child's stderr (taken from it) on a thread of
/// its own, keeping every line; the address it said it listens on for SMTP.
pub fn listening_address(child: &mut std::process::Child) -> (SocketAddr, ServeLog) {
    let stderr = child.stderr.take().expect("serve's stderr is piped");
    let log: ServeLog = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = std::sync::Arc::clone(&log);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Kept first: whoever hears the address finds its line logged.
            lines.lock().expect("log lock").push(line.clone());
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .filter(|_| line.contains("listening for SMTP"))
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve reported its listening address");
    (addr, log)
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test certificate authority in `dir`, and server certificates it signs.
pub struct Pki {
    pub dir: PathBuf,
    /// The authority's certificate, for clients to trust.
    pub ca: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=mailnode test CA",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let ca = dir.join("ca.pem");
        Pki { dir, ca }
    }

    /// A server certificate for localhost and 127.0.0.1 named `cn`, valid
    /// for `days`: (certificate, key).
    pub fn server(&self, cn: &str, days: u32) -> (PathBuf, PathBuf) {
        let (key, csr, cert) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!(
                    "{}",
                    std::process::id() as u64 * 1000 + days as u64 + cn.len() as u64
                ),
                "-days",
                &days.to_string(),
                "-extfile",
                "server.ext",
                "-out",
                &cert,
            ],
        );
        (self.dir.join(cert), self.dir.join(key))
    }
}

/// One series' value from `/metrics` at `addr` (the series with its
/// labels, as Prometheus prints it), if exported.
pub fn metric_value(addr: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// One control request on a fresh connection; the reply line, parsed.
pub fn control_request(socket: &Path, request: &str) -> serde_json::Value {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(format!("{request}\n").as_bytes())
        .expect("request");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("a JSON reply")
}

const SERVER: &str = include_str!("http_target.py");

/// A scripted HTTP(S) server (tests/common/http_target.py) on 127.0.0.1.
pub struct HttpTarget {
    child: std::process::Child,
    pub port: u16,
    records: tempfile::TempDir,
}

/// One request the server received.
#[derive(Debug)]
pub struct Request {
    /// The port of the connection it came on: one port, one connection.
    pub client_port: u16,
    pub path: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub received_at: f64,
    /// `None` while the body is still coming (or was never read).
    pub body: Option<Vec<u8>>,
    pub body_file: PathBuf,
}

impl Request {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

impl HttpTarget {
    pub fn start(plan: serde_json::Value) -> HttpTarget {
        Self::start_tls(plan, None)
    }

    pub fn start_tls(plan: serde_json::Value, tls: Option<&(PathBuf, PathBuf)>) -> HttpTarget {
        let records = tempfile::tempdir().expect("tempdir");
        let mut command = std::process::Command::new("python3");
        command
            .arg("-c")
            .arg(SERVER)
            .arg(records.path())
            .arg(plan.to_string());
        if let Some((cert, key)) = tls {
            command.arg(cert).arg(key);
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the server's port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("server said {line:?}"));
        HttpTarget {
            child,
            port,
            records,
        }
    }

    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        let mut found = Vec::new();
        for n in 0.. {
            let meta = self.records.path().join(format!("{n}.json"));
            let Ok(text) = std::fs::read(&meta) else {
                break;
            };
            let meta: serde_json::Value = serde_json::from_slice(&text).expect("record");
            let body_file = self.records.path().join(format!("{n}.body"));
            found.push(Request {
                client_port: meta["client_port"]
                    .as_u64()
                    .expect("the client's port recorded") as u16,
                path: meta["path"].as_str().unwrap_or_default().to_string(),
                headers: meta["headers"]
                    .as_object()
                    .expect("headers")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect(),
                received_at: meta["received_at"].as_f64().unwrap_or_default(),
                body: std::fs::read(&body_file).ok(),
                body_file,
            });
        }
        found
    }

    /// Waits for `n` requests whose bodies are all in.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<Request> {
        wait_for(limit, || {
            let found = self.requests();
            (found.len() >= n && found.iter().all(|r| r.body.is_some())).then_some(found)
        })
        .unwrap_or_else(|| panic!("{n} requests never came: {:?}", self.requests()))
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn answer_200() -> serde_json::Value {
    serde_json::json!([{"status": 200}])
}

/// A `mailnode serve` child, the address it reported and its log lines.
pub struct Served {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal");
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Served {
    serve_from(serve_command(args, cwd, env))
}

/// The `mailnode serve` command [`serve`] runs.
pub fn serve_command(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mailnode"));
    command
        .arg("serve")
        .args(args)
        // Never the fixed default metrics port: tests run side by side.
        .args(["--metrics", "127.0.0.1:0"])
        .current_dir(cwd)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    command
}

/// Starts `command` (a [`serve_command`]) and waits for its address.
pub fn serve_from(mut command: std::process::Command) -> Served {
    let mut child = command.spawn().expect("serve starts");
    let (addr, log) = listening_address(&mut child);
    Served { child, addr, log }
}

/// A field of `/proc/PID/status` in KiB: `VmRSS` (resident now) or `VmHWM`
/// (the peak).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

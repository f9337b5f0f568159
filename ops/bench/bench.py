#!/usr/bin/env python3
"""Measurements of the mailnode benchmark; ops/bench/run sets the stage.

    bench.py --workdir DIR --repo DIR --mailnode BIN --sink BIN --postfix-config DIR
    bench.py inline-peer PORT SINK LOG     (the aiosmtpd peer, started by the above)

Parts (BENCH_ONLY, comma-separated; default all):
  compare  Postfix (pipe transport) then mailnode, queue mode, 4 KB, 20 and 1 sessions
  sizes    mailnode alone: 100 sessions 4 KB, 100 KB and 10 MB messages, memory vs 4 KB
  inline   mailnode in inline mode vs an aiosmtpd peer that runs the sink before 250
  backlog  100,000 queued messages: start-up to first 250, memory, drain rate
  idle     10,000 idle connections: memory, latency of a message beside them
  window   the duplicate window: last delivery to durable removal, p50/p99/max (20 sessions)
  tls      Postfix (smtpd_tls_security_level = may) then mailnode, the same certificate,
           20 sessions, a full STARTTLS handshake per message; CPU per handshake
  auth     mailnode with [auth] off, then on against a local dnsmasq, 20 sessions of
           DKIM-signed 4 KB messages whose SPF, DKIM and DMARC all pass
  http     mailnode delivering to a program, then to an HTTP target on a local
           keep-alive sink (ops/bench/http_sink.rs), then Postfix piping into
           `curl --data-binary @-` to the same sink: 20 sessions of 4 KB, and the
           delivery of a queue alone (a drain), with the CPU per delivery

Load is Postfix's smtp-source, one connection per message; for TLS, which
smtp-source cannot speak, ops/bench/smtp_load.rs (the same for both servers). Each server
delivers to the same sink program (ops/bench/sink.c), which appends the
message's Message-Id to a log: "delivered" is the log reaching N lines, and
exactly-once is N lines holding N different ids, still N a second later.

Progress goes to stderr; the report (markdown) to stdout and WORKDIR/results.md.
Standard library only, except aiosmtpd for the inline peer.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import pwd
import resource
import shlex
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"
PORT_POSTFIX = 10025
PORT_MAILNODE = 10026
PORT_PEER = 10027
PORT_HTTP_SINK = 10028
SENDER = "bench@bench.test"
RCPT = "sink@bench.test"
PROBE_RCPT = "probe@bench.test"
KB = 1024
MB = 1024 * 1024


class BenchError(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_int(name, default):
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


# --------------------------------------------------------------------------
# /proc: process trees and their memory


def ppid_map():
    m = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        m[int(name)] = int(fields[1])
    return m


def process_tree(root):
    """root and all its descendants (pids)."""
    children = {}
    for pid, ppid in ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_kib(path, key):
    """The kB value of `key` in a /proc file of "Key: value kB" lines; 0 if
    absent (or the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def status_kib(pid, key):
    return proc_kib(f"/proc/{pid}/status", key)


_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
KCMP_VM = 1


def same_address_space(a, b):
    """Whether processes a and b share one address space: a child between
    vfork (clone with CLONE_VM, as mailnode starts programs) and exec is the
    parent's memory, not more of it. kcmp(2); False if it cannot tell."""
    if SYS_KCMP is None:
        return False
    return _libc.syscall(SYS_KCMP, a, b, KCMP_VM, 0, 0) == 0


def tree_pss_kib(root):
    """PSS summed over the tree, each address space once."""
    counted, total = [], 0
    for p in process_tree(root):
        if any(same_address_space(p, c) for c in counted):
            continue
        counted.append(p)
        total += pss_kib(p)
    return total


def mib(kib):
    return kib / 1024.0


class Sampler(threading.Thread):
    """Every interval: PSS summed over a server's process tree, and the RSS
    of its main process; keeps the peaks."""

    def __init__(self, root_pid, main_pid=None, interval=0.2):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.main_pid = main_pid
        self.interval = interval
        self.peak_pss = 0
        self.peak_rss = 0
        self.samples = 0
        self._halt = threading.Event()

    def sample(self):
        self.peak_pss = max(self.peak_pss, tree_pss_kib(self.root_pid))
        if self.main_pid:
            self.peak_rss = max(self.peak_rss, status_kib(self.main_pid, "VmRSS"))
        self.samples += 1

    def run(self):
        self.sample()
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


# --------------------------------------------------------------------------
# The delivery log written by the sink


class DeliveryLog:
    def __init__(self, path):
        self.path = path
        self.fd = None
        self.reset()

    def reset(self):
        """Empty the log (creating it writable by the sink's user)."""
        if self.fd is not None:
            os.close(self.fd)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o666)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.fchown(fd, nobody.pw_uid, nobody.pw_gid)
        self.fd = fd
        self.offset = 0
        self.lines = 0

    def count(self):
        while True:
            data = os.pread(self.fd, 1 << 20, self.offset)
            if not data:
                return self.lines
            self.lines += data.count(b"\n")
            self.offset += len(data)

    def ids(self):
        with open(self.path, "rb") as f:
            return f.read().splitlines()


def wait_lines(dlog, n, deadline, what):
    while dlog.count() < n:
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: {dlog.lines} of {n} messages delivered before the timeout")
        time.sleep(0.01)
    return time.monotonic()


# --------------------------------------------------------------------------
# SMTP helpers


def wait_banner(port, timeout, proc=None, what="server"):
    """Until the port greets with 220; returns the time it did."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before answering on port {port}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.settimeout(5)
                line = s.makefile("rb").readline()
                if line.startswith(b"220"):
                    t = time.monotonic()
                    try:
                        s.sendall(b"QUIT\r\n")
                    except OSError:
                        pass
                    return t
                last = repr(line[:80])
        except OSError as e:
            last = str(e)
        time.sleep(0.02)
    raise BenchError(f"{what}: no 220 greeting on {HOST}:{port} within {timeout} s ({last})")


def port_free(port, udp=False):
    with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def one_message(port, rcpt, msgid, timeout=60):
    msg = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: bench probe\r\n"
        f"Message-Id: {msgid}\r\n\r\nprobe\r\n"
    )
    with smtplib.SMTP(HOST, port, timeout=timeout) as s:
        s.sendmail(SENDER, [rcpt], msg)


def tree_cpu_seconds(root):
    """CPU time (user + system) of root's process tree, including children
    it has reaped (Postfix's master reaps its smtpd processes)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the ")": state is fields[0]; utime, stime, cutime, cstime
        # are fields 14-17 of stat(5), here 11-14.
        ticks += sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def make_pki(workdir):
    """A test CA and a certificate for localhost it signs (P-256, as a
    modern MX would have): the same files for both servers."""
    d = os.path.join(workdir, "pki")
    os.makedirs(d, exist_ok=True)
    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=bench CA")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2",
         "-days", "30", "-extfile", "server.ext", "-out", "server.pem")
    os.chmod(os.path.join(d, "server.key"), 0o644)
    return {k: os.path.join(d, f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


class AuthDns:
    """dnsmasq on a loopback port serving bench.test's SPF (127.0.0.1),
    DKIM key and DMARC record (p=reject), and a 4 KB message signed for
    bench.test by dkimpy (Debian's python3-dkim) with From, To and Subject
    signed, so that its Message-Id, outside the signature, can be made
    unique per message (@@N@@) by the load client."""

    PORT = 10053

    def __init__(self, workdir):
        d = os.path.join(workdir, "auth")
        os.makedirs(d, exist_ok=True)
        subprocess.run(["dknewkey", "--ktype", "rsa", "bench"], cwd=d, check=True, capture_output=True)
        with open(os.path.join(d, "bench.dns")) as f:
            public = f.read().strip()
        parts = ",".join(public[i:i + 250] for i in range(0, len(public), 250))
        self.port = self.PORT
        if not port_free(self.port, udp=True):
            raise BenchError(f"UDP port {self.port} is in use: stop what listens there")
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             "--bind-interfaces", f"--listen-address={HOST}", f"--port={self.port}", "--pid-file=",
             # Authoritative for the zone `test`, as a real zone's servers
             # are: answers with a TTL (dnsmasq's default for its own records
             # is 0, nothing could be cached), NXDOMAIN with the zone's SOA
             # (so that it is cached too).
             "--auth-server=ns.test,127.0.0.1", "--auth-zone=test", "--auth-ttl=300", "--local-ttl=300",
             "--txt-record=bench.test,v=spf1 ip4:127.0.0.1 -all",
             f"--txt-record=bench._domainkey.bench.test,{parts}",
             "--txt-record=_dmarc.bench.test,v=DMARC1; p=reject"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        body = ("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuv\r\n" * 60)
        message = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: auth bench\r\n\r\n{body}").encode()
        signed = subprocess.run(
            ["/usr/bin/python3", "-c",
             "import sys, dkim; key = open(sys.argv[1], 'rb').read(); m = sys.stdin.buffer.read(); "
             "sys.stdout.buffer.write(dkim.sign(m, b'bench', b'bench.test', key, "
             "include_headers=[b'from', b'to', b'subject']) + m)",
             os.path.join(d, "bench.key")],
            input=message, capture_output=True, check=True).stdout
        head, sep, rest = signed.partition(b"\r\n\r\n")
        self.template = os.path.join(d, "template.eml")
        with open(self.template, "wb") as f:
            f.write(head + f"\r\nMessage-Id: <auth-@@N@@.{os.getpid()}@bench.test>".encode() + sep + rest)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def smtp_source_cmd(port, sessions, size, n):
    return [
        "smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(n),
        "-f", SENDER, "-t", RCPT, f"{HOST}:{port}",
    ]


def load_timeout(n, size):
    return 120 + n * 0.05 + n * size / 2e6


# --------------------------------------------------------------------------
# Servers


class Server:
    name = "?"
    port = 0
    main_is_root = True

    def root_pid(self):
        raise NotImplementedError

    def queue_count(self):
        return 0

    def wait_queue_empty(self, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            n = self.queue_count()
            if n == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {n} messages still queued after {timeout} s")
            time.sleep(0.1)


class Postfix(Server):
    name = "postfix"
    port = PORT_POSTFIX

    def __init__(self, confdir):
        self.confdir = confdir
        q = subprocess.run(["postconf", "-c", confdir, "-h", "queue_directory"],
                           capture_output=True, text=True, check=True)
        self.queue_dir = q.stdout.strip()
        self.pidfile = os.path.join(self.queue_dir, "pid", "master.pid")
        self.maillog = subprocess.run(["postconf", "-c", confdir, "-h", "maillog_file"],
                                      capture_output=True, text=True, check=True).stdout.strip()
        self.running = False

    def start(self):
        if not port_free(self.port):
            raise BenchError(f"port {self.port} is in use: stop what listens there")
        log("postfix start")
        r = subprocess.run(["postfix", "-c", self.confdir, "start"], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"postfix start failed: {r.stdout}{r.stderr}\n{tail(self.maillog)}")
        self.running = True
        wait_banner(self.port, 30, what="postfix")

    def set_tls(self, cert, key):
        """STARTTLS offered (smtpd_tls_security_level = may) with this
        certificate, or, with None, not at all."""
        if cert:
            settings = ["smtpd_tls_security_level = may", f"smtpd_tls_cert_file = {cert}",
                        f"smtpd_tls_key_file = {key}", "smtpd_tls_loglevel = 0"]
        else:
            settings = ["smtpd_tls_security_level = none"]
        subprocess.run(["postconf", "-c", self.confdir, "-e", *settings], check=True, capture_output=True)

    def root_pid(self):
        with open(self.pidfile) as f:
            return int(f.read().split()[0])

    def queue_count(self):
        n = 0
        for d in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.queue_dir, d)):
                n += len(files)
        return n

    def stop(self):
        if not self.running:
            return
        log("postfix stop")
        try:
            pid = self.root_pid()
        except (OSError, ValueError):
            pid = None
        subprocess.run(["postfix", "-c", self.confdir, "stop"], capture_output=True)
        self.running = False
        if pid:
            deadline = time.monotonic() + 30
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def problems(self):
        out = []
        try:
            with open(self.maillog, errors="replace") as f:
                for line in f:
                    if any(w in line for w in (" warning:", " error:", " fatal:", " panic:")):
                        out.append(line.rstrip())
        except OSError:
            pass
        return out


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 :].split()[0] != b"Z"
    except OSError:
        return False


def tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class Mailnode(Server):
    name = "mailnode"
    port = PORT_MAILNODE

    def __init__(self, binary, workdir, sink, dlog_path):
        self.binary = binary
        self.dir = os.path.join(workdir, "mailnode")
        self.sink = sink
        self.dlog_path = dlog_path
        self.spool = os.path.join(self.dir, "spool")
        self.socket = os.path.join(self.dir, "ctl.sock")
        self.proc = None
        self.errfile = None
        self.conf = None
        self.stderr_notes = []
        os.makedirs(self.dir, exist_ok=True)
        # Each server's stderr is appended to across its restarts within a
        # run; an earlier run's lines would show up in this run's notes.
        for name in os.listdir(self.dir):
            if name.startswith("serve-") and name.endswith(".stderr"):
                os.remove(os.path.join(self.dir, name))

    @property
    def spool_extra(self):
        # BENCH_REUSE_FILES=false measures the cost of [spool] reuse_files = false.
        value = os.environ.get("BENCH_REUSE_FILES", "").strip().lower()
        if value in ("", "true"):
            return ""
        if value != "false":
            raise BenchError(f"BENCH_REUSE_FILES: expected true or false, got {value!r}")
        return "reuse_files = false\n"

    def write_config(self, label, mode="queue", alias_lines=None, log_level="warn", log_format="text", extra=""):
        aliases = os.path.join(self.dir, f"aliases-{label}")
        if alias_lines is None:
            alias_lines = [f"sink: |{self.sink} {self.dlog_path}"]
        with open(aliases, "w") as f:
            f.write("\n".join(alias_lines) + "\n")
        conf = os.path.join(self.dir, f"{label}.toml")
        with open(conf, "w") as f:
            f.write(f"""# mailnode benchmark configuration ({label}); written by ops/bench/bench.py
hostname = "mailnode.bench.test"

[smtp]
listen = ["{HOST}:{self.port}"]
max_connections = 20000
max_connections_per_ip = 20000
local_domains = []

[aliases]
path = "{aliases}"

[spool]
path = "{self.spool}"
{self.spool_extra}
[delivery]
mode = "{mode}"

[limits]
connection_rate_per_ip = "1000000/s"
message_rate_per_ip = "1000000/s"

[control]
socket = "{self.socket}"

[metrics]
listen = "off"

[log]
level = "{log_level}"
format = "{log_format}"
{extra}""")
        r = subprocess.run([self.binary, "check", "-c", conf], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"mailnode check -c {conf} failed ({r.returncode}):\n{r.stderr}")
        return conf

    def start(self, conf, label, wipe=True, wait=True):
        if self.proc is not None:
            raise BenchError("mailnode already running")
        if not port_free(self.port):
            raise BenchError(f"port {self.port} is in use: stop what listens there")
        if wipe:
            shutil.rmtree(self.spool, ignore_errors=True)
        self.conf = conf
        self.label = label
        self.errfile = os.path.join(self.dir, f"serve-{label}.stderr")
        log(f"mailnode serve -c {conf}")
        err = open(self.errfile, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([self.binary, "serve", "-c", conf],
                                     stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        if wait:
            wait_banner(self.port, 60, self.proc, what="mailnode serve")
        return t0

    def root_pid(self):
        return self.proc.pid

    def queue_count(self):
        r = subprocess.run([self.binary, "ctl", "-c", self.conf, "--json", "status"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"mailnode ctl status failed ({r.returncode}): {r.stderr.strip()}")
        q = json.loads(r.stdout)["queue"]
        return sum(int(v) for v in q.values())

    def _collect_stderr(self):
        try:
            with open(self.errfile, errors="replace") as f:
                lines = [l.rstrip() for l in f if l.strip()]
        except OSError:
            lines = []
        if lines:
            self.stderr_notes.append((self.label, lines))

    def stop(self, timeout=90):
        if self.proc is None:
            return
        log("mailnode stop (SIGTERM)")
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"mailnode did not stop within {timeout} s: SIGKILL")
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self._collect_stderr()
        if rc != 0:
            raise BenchError(f"mailnode serve exited with status {rc} on SIGTERM; see {self.errfile}")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self._collect_stderr()


class InlinePeer(Server):
    """The aiosmtpd peer: this same file, run as `bench.py inline-peer`."""

    name = "aiosmtpd"
    port = PORT_PEER

    def __init__(self, workdir, sink, dlog_path):
        self.sink = sink
        self.dlog_path = dlog_path
        self.errfile = os.path.join(workdir, "inline-peer.stderr")
        self.proc = None

    def cmd(self):
        return [sys.executable, os.path.abspath(__file__), "inline-peer",
                str(self.port), self.sink, self.dlog_path]

    def start(self):
        if not port_free(self.port):
            raise BenchError(f"port {self.port} is in use: stop what listens there")
        log("starting the aiosmtpd peer")
        err = open(self.errfile, "ab")
        self.proc = subprocess.Popen(self.cmd(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        wait_banner(self.port, 30, self.proc, what="aiosmtpd peer")

    def root_pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------
# One measured run


def cpu_ticks():
    """(steal, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return fields[7], sum(fields[:8])


def settle_disk(timeout=30):
    """Write back what earlier runs left dirty before the next one starts.
    Otherwise a run pays for its predecessor's writeback (and, on a disk
    mounted with discard, its trims): a latency-bound one-session run after a
    20-session one measured at a quarter of its speed, whichever server."""
    os.sync()
    deadline = time.monotonic() + timeout
    while proc_kib("/proc/meminfo", "Dirty") + proc_kib("/proc/meminfo", "Writeback") > 1024 and time.monotonic() < deadline:
        time.sleep(0.1)


def measure(server, dlog, sessions, size, n, label, client=None):
    server.wait_queue_empty()
    dlog.reset()
    settle_disk()
    root = server.root_pid()
    main = root if isinstance(server, Mailnode) else None
    sampler = Sampler(root, main)
    sampler.start()
    cmd = (client or smtp_source_cmd)(server.port, sessions, size, n)
    timeout = load_timeout(n, size)
    errpath = os.path.join(os.path.dirname(os.path.dirname(dlog.path)), "smtp-source.stderr")
    with open(errpath, "wb") as err:
        steal0, total0 = cpu_ticks()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = t0 + timeout
        t_acc = t_del = None
        try:
            while t_acc is None or t_del is None:
                now = time.monotonic()
                if t_acc is None and proc.poll() is not None:
                    t_acc = now
                    steal1, total1 = cpu_ticks()
                    if proc.returncode != 0:
                        raise BenchError(f"{label}: smtp-source exited {proc.returncode}: {tail(errpath, 5).strip()}"
                                         f"\n  command: {shlex.join(cmd)}")
                if t_del is None and dlog.count() >= n:
                    t_del = now
                if now > deadline:
                    raise BenchError(f"{label}: timeout after {timeout:.0f} s: smtp-source "
                                     f"{'done' if t_acc else 'still running'}, {dlog.lines} of {n} delivered")
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Late duplicates would show up now.
    time.sleep(1.0)
    lines = dlog.count()
    sampler.stop()
    hwm = status_kib(main, "VmHWM") if main else 0
    ids = dlog.ids()
    unique = len(set(ids))
    r = {
        "label": label, "server": server.name, "sessions": sessions, "size": size, "n": n,
        "accepted_s": t_acc - t0, "delivered_s": t_del - t0,
        "accepted_rate": n / (t_acc - t0), "delivered_rate": n / (t_del - t0),
        "peak_pss_kib": sampler.peak_pss, "peak_rss_kib": sampler.peak_rss, "hwm_kib": hwm,
        "lines": lines, "unique": unique, "exactly_once": lines == n and unique == n,
        # The share of CPU time the hypervisor gave to other guests while
        # the load ran: the host's noise, the same for both servers' runs.
        "steal_pct": 100.0 * (steal1 - steal0) / max(1, total1 - total0),
    }
    log(f"  {label}: N={n} accepted {r['accepted_rate']:.0f}/s delivered {r['delivered_rate']:.0f}/s "
        f"PSS {mib(r['peak_pss_kib']):.1f} MiB" + (f" RSS {mib(r['peak_rss_kib']):.1f} MiB" if main else "")
        + f" steal {r['steal_pct']:.0f} %"
        + ("" if r["exactly_once"] else f"  EXACTLY-ONCE FAILED: {lines} lines, {unique} unique"))
    server.wait_queue_empty()
    return r


def summarize(runs):
    def med(k):
        return statistics.median(r[k] for r in runs)
    s = dict(runs[0])
    for k in ("accepted_rate", "delivered_rate", "peak_pss_kib", "peak_rss_kib", "accepted_s", "delivered_s",
              "steal_pct"):
        s[k] = med(k)
    s["hwm_kib"] = max(r["hwm_kib"] for r in runs)  # VmHWM: the peak since the server started
    s["exactly_once"] = all(r["exactly_once"] for r in runs)
    s["runs"] = runs
    return s


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        self.runs = env_int("BENCH_RUNS", 1 if self.quick else 3)
        self.fixed_n = env_int("BENCH_N", 200 if self.quick else 0)
        self.backlog_n = env_int("BENCH_BACKLOG", 2000 if self.quick else 100_000)
        self.idle_n = env_int("BENCH_IDLE", 500 if self.quick else 10_000)
        only = os.environ.get("BENCH_ONLY", "").strip()
        self.parts = [p.strip() for p in only.split(",") if p.strip()] if only else \
            ["compare", "sizes", "inline", "backlog", "idle", "window", "tls", "auth", "http"]
        for p in self.parts:
            if p not in ("compare", "sizes", "inline", "backlog", "idle", "window", "tls", "auth", "http"):
                raise BenchError(f"BENCH_ONLY: unknown part {p!r}")
        self.workdir = args.workdir
        self.dlog = DeliveryLog(os.path.join(self.workdir, "out", "delivered.log"))
        self.postfix = Postfix(args.postfix_config)
        self.mailnode = Mailnode(args.mailnode, self.workdir, args.sink, self.dlog.path)
        self.peer = InlinePeer(self.workdir, args.sink, self.dlog.path)
        self.results = {}
        self.notes = []
        self.started = time.time()

    # -- N: fixed, or sized so that a run takes about 10 s
    def size_n(self, server, sessions, size, label, floor=500, client=None):
        if self.fixed_n:
            return self.fixed_n
        r = measure(server, self.dlog, sessions, size, 300, f"{label} calibration", client)
        return max(floor, int(round(r["delivered_rate"] * 10)))

    def load(self, server, sessions, size, label, n=None, client=None):
        if n is None:
            n = self.size_n(server, sessions, size, label, client=client)
        runs = [measure(server, self.dlog, sessions, size, n, f"{label} run {i + 1}/{self.runs}", client)
                for i in range(self.runs)]
        return summarize(runs)

    # -- parts

    def part_compare(self):
        conf = self.mailnode.write_config("queue")
        out = []
        for sessions in (20, 1):
            for server in (self.postfix, self.mailnode):
                label = f"{server.name} {sessions} sess 4 KB"
                log(f"compare: {label}")
                if server is self.postfix:
                    server.start()
                else:
                    server.start(conf, f"compare-{sessions}")
                try:
                    out.append(self.load(server, sessions, 4 * KB, label))
                finally:
                    server.stop()
        self.results["compare"] = out

    def part_sizes(self):
        conf = self.mailnode.write_config("queue")
        out = []
        loads = [(20, 4 * KB, None), (100, 4 * KB, None), (20, 100 * KB, None),
                 (5, 10 * MB, 5 if self.quick else 30)]
        for sessions, size, n in loads:
            label = f"mailnode {sessions} sess {fmt_size(size)}"
            log(f"sizes: {label}")
            self.mailnode.start(conf, f"sizes-{sessions}-{size}")
            try:
                out.append(self.load(self.mailnode, sessions, size, label, n))
            finally:
                self.mailnode.stop()
        self.results["sizes"] = out

    def part_inline(self):
        conf = self.mailnode.write_config("inline", mode="inline")
        out = []
        for server in (self.peer, self.mailnode):
            label = f"{server.name} inline 20 sess 4 KB"
            log(f"inline: {label}")
            if server is self.peer:
                server.start()
            else:
                server.start(conf, "inline")
            try:
                out.append(self.load(server, 20, 4 * KB, label))
            finally:
                server.stop()
        self.results["inline"] = out

    def part_backlog(self):
        mn = self.mailnode
        n = self.backlog_n
        gate = os.path.join(self.workdir, "gate")
        probe_log = DeliveryLog(os.path.join(self.workdir, "out", "probe.log"))
        conf = mn.write_config("backlog", alias_lines=[
            f"sink: |{self.args.sink} {self.dlog.path} {gate}",
            f"probe: |{self.args.sink} {probe_log.path}",
        ])
        self.dlog.reset()
        with open(gate, "w"):
            pass
        # 1. Fill the queue behind the closed gate.
        mn.start(conf, "backlog-fill")
        cmd = smtp_source_cmd(mn.port, 20, 4 * KB, n)
        log(f"backlog: queueing {n} messages: {shlex.join(cmd)}")
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=load_timeout(n, 4 * KB))
        except subprocess.TimeoutExpired:
            raise BenchError(f"backlog fill: smtp-source still running after {load_timeout(n, 4 * KB):.0f} s")
        fill_s = time.monotonic() - t0
        if r.returncode != 0:
            raise BenchError(f"backlog fill: smtp-source exited {r.returncode}: {r.stderr.strip()[-500:]}")
        log(f"backlog: queued in {fill_s:.1f} s ({n / fill_s:.0f}/s); kill -9 serve")
        mn.kill9()
        # The sinks waiting at the gate (and their shells) outlive serve: end them.
        killed = kill_gated(gate)
        delivered_early = self.dlog.count()
        if delivered_early:
            self.notes.append(f"backlog: {delivered_early} messages were delivered while the gate was closed")
        os.unlink(gate)
        # 2. Restart on the same spool and measure.
        probe_log.reset()
        t_launch = mn.start(conf, "backlog-drain", wipe=False, wait=False)
        sampler = Sampler(mn.proc.pid, mn.proc.pid)
        sampler.start()
        t_banner = wait_banner(mn.port, 300, mn.proc, what="mailnode serve (backlog)")
        t_250 = None
        attempts = 0
        last_err = ""
        deadline = t_launch + 300
        while t_250 is None:
            attempts += 1
            try:
                one_message(mn.port, PROBE_RCPT, f"<backlog-probe-{attempts}@bench.test>")
                t_250 = time.monotonic()
            except (OSError, smtplib.SMTPException) as e:
                last_err = str(e)
                if time.monotonic() > deadline:
                    raise BenchError(f"backlog: no 250 within 300 s of starting serve ({last_err})")
                time.sleep(0.01)
        rss_startup = status_kib(mn.proc.pid, "VmRSS")
        pss_startup = tree_pss_kib(mn.proc.pid)
        t_done = wait_lines(self.dlog, n, t_launch + 120 + n * 0.05, "backlog drain")
        time.sleep(1.0)
        lines = self.dlog.count()
        sampler.stop()
        ids = self.dlog.ids()
        hwm = status_kib(mn.proc.pid, "VmHWM")
        mn.wait_queue_empty(timeout=300)
        mn.stop()
        res = {
            "n": n, "fill_s": fill_s, "fill_rate": n / fill_s, "killed_gated": killed,
            "delivered_early": delivered_early,
            "to_banner_s": t_banner - t_launch, "to_250_s": t_250 - t_launch, "probe_attempts": attempts,
            "rss_startup_kib": rss_startup, "pss_startup_kib": pss_startup,
            "peak_rss_kib": sampler.peak_rss, "peak_pss_kib": sampler.peak_pss, "hwm_kib": hwm,
            "drain_s": t_done - t_launch, "drain_rate": n / (t_done - t_launch),
            "lines": lines, "unique": len(set(ids)),
            "exactly_once": lines == n and len(set(ids)) == n,
            "probe_delivered": probe_log.count(),
        }
        log(f"backlog: 250 after {res['to_250_s']:.2f} s, drained {n} in {res['drain_s']:.1f} s "
            f"({res['drain_rate']:.0f}/s), RSS start-up {mib(rss_startup):.1f} MiB peak {mib(sampler.peak_rss):.1f} MiB")
        self.results["backlog"] = res

    def part_idle(self):
        mn = self.mailnode
        k = self.idle_n
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < k + 200:
            raise BenchError(f"idle: open-file limit {hard} is too low for {k} connections")
        conf = mn.write_config("queue")
        mn.start(conf, "idle")
        socks = []
        try:
            pid = mn.proc.pid
            time.sleep(0.5)
            rss0, pss0 = status_kib(pid, "VmRSS"), tree_pss_kib(pid)
            log(f"idle: opening {k} connections")
            t0 = time.monotonic()
            for i in range(k):
                s = socket.create_connection((HOST, mn.port), timeout=30)
                s.settimeout(30)
                banner = b""
                while not banner.endswith(b"\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        raise BenchError(f"idle: connection {i + 1} closed before the greeting")
                    banner += chunk
                if not banner.startswith(b"220"):
                    raise BenchError(f"idle: connection {i + 1} greeted with {banner[:80]!r}")
                socks.append(s)
            open_s = time.monotonic() - t0
            time.sleep(1.0)
            rss1, pss1 = status_kib(pid, "VmRSS"), tree_pss_kib(pid)
            self.dlog.reset()
            lat = []
            for i in range(5):
                t = time.monotonic()
                try:
                    one_message(mn.port, RCPT, f"<idle-{i}@bench.test>")
                except (OSError, smtplib.SMTPException) as e:
                    raise BenchError(f"idle: a message beside {k} idle connections failed: {e}")
                lat.append(time.monotonic() - t)
            wait_lines(self.dlog, 5, time.monotonic() + 60, "idle")
            rss2 = status_kib(pid, "VmRSS")
            alive = sum(1 for s in socks if still_open(s))
            res = {
                "k": k, "open_s": open_s, "rss_before_kib": rss0, "pss_before_kib": pss0,
                "rss_kib": rss1, "pss_kib": pss1, "rss_after_msgs_kib": rss2,
                "per_conn_kib": (rss1 - rss0) / k, "latencies": lat, "max_latency": max(lat),
                "still_open": alive,
            }
            log(f"idle: {k} connections: RSS {mib(rss1):.1f} MiB PSS {mib(pss1):.1f} MiB; "
                f"one message: max {max(lat) * 1000:.0f} ms; {alive} still open")
            self.results["idle"] = res
        finally:
            for s in socks:
                s.close()
            mn.stop()

    def part_window(self):
        """The duplicate window: from a message's last delivery (the program
        exited 0) to its removal being durable, which the log's "removed"
        line marks. A power cut in between delivers the message again."""
        conf = self.mailnode.write_config("window", log_level="info", log_format="json")
        label = "mailnode 20 sess 4 KB, info logs"
        log(f"window: {label}")
        self.mailnode.start(conf, "window")
        try:
            n = self.size_n(self.mailnode, 20, 4 * KB, label)
            r = measure(self.mailnode, self.dlog, 20, 4 * KB, n, label)
        finally:
            self.mailnode.stop()
        delivered, removed = {}, {}
        with open(self.mailnode.errfile, errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                fields = entry.get("fields", {})
                qid = fields.get("queue_id")
                if qid is None:
                    continue
                at = datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
                if fields.get("message") == "delivery attempt" and fields.get("status", "").startswith("2"):
                    delivered[qid] = max(at, delivered.get(qid, at))
                elif fields.get("message", "").endswith("removed"):
                    removed[qid] = at
        windows = sorted((removed[q] - delivered[q]) * 1000 for q in removed if q in delivered)
        if not windows:
            raise BenchError("window: no message was logged both delivered and removed")
        def pct(p):
            return windows[min(len(windows) - 1, int(round(p / 100 * (len(windows) - 1))))]
        self.results["window"] = {
            "label": label, "n": n, "measured": len(windows), "accepted_rate": r["accepted_rate"],
            "delivered_rate": r["delivered_rate"], "exactly_once": r["exactly_once"],
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": windows[-1],
        }
        log(f"  window: p50 {pct(50):.1f} ms, p99 {pct(99):.1f} ms, max {windows[-1]:.1f} ms over {len(windows)} messages")

    def part_tls(self):
        pki = make_pki(self.workdir)
        load_client = self.args.load_client

        def client(port, sessions, size, n):
            return [load_client, str(port), str(sessions), str(n), str(size), pki["ca"]]

        conf = self.mailnode.write_config(
            "tls", extra=f'[tls]\ncert = "{pki["cert"]}"\nkey = "{pki["key"]}"\n')
        out, handshakes = [], []
        n_handshakes = 500 if self.quick else 5000
        for server in (self.postfix, self.mailnode):
            label = f"{server.name} 20 sess 4 KB STARTTLS"
            log(f"tls: {label}")
            if server is self.postfix:
                self.postfix.set_tls(pki["cert"], pki["key"])
                server.start()
            else:
                server.start(conf, "tls")
            try:
                handshakes.append(self.handshakes(server, client, n_handshakes))
                out.append(self.load(server, 20, 4 * KB, label, client=client))
            finally:
                server.stop()
                if server is self.postfix:
                    self.postfix.set_tls(None, None)
        self.results["tls"] = {"load": out, "handshakes": handshakes}

    def part_auth(self):
        dns = AuthDns(self.workdir)
        try:
            client = lambda port, sessions, size, n: [  # noqa: E731
                self.args.load_client, str(port), str(sessions), str(n), str(size), "-",
                "--clear", "--template", dns.template]
            off = self.mailnode.write_config("auth-off")
            on = self.mailnode.write_config(
                "auth-on", extra=f'[auth]\nenabled = true\nnameservers = ["{HOST}:{dns.port}"]\n'
                                 'dns_timeout = "2s"\n')
            out = []
            for conf, label in ((off, "mailnode auth off"), (on, "mailnode auth on")):
                log(f"auth: {label}")
                self.mailnode.start(conf, label.replace(" ", "-"))
                try:
                    out.append(self.load(self.mailnode, 20, 4 * KB, f"{label} 20 sess 4 KB", client=client))
                finally:
                    self.mailnode.stop()
            self.results["auth"] = out
        finally:
            dns.stop()

    def part_http(self):
        sink = HttpSink(self.args.http_sink, PORT_HTTP_SINK, self.dlog.path)
        url = f"http://{HOST}:{PORT_HTTP_SINK}/mail"
        # The drains fill the queue with deliveries that fail at once and
        # are not retried for an hour: the program's log refuses it, the
        # HTTP sink is not running, Postfix defers its transport.
        program = self.mailnode.write_config("http-program", extra='[queue]\nretry_min = "1h"\nretry_max = "1h"\n')
        # As many deliveries in flight as the programs get ([delivery]
        # concurrency, 16 by default; [http] max_per_host is 8).
        http = self.mailnode.write_config("http-http", alias_lines=[f"sink: {url}"],
                                          extra='[queue]\nretry_min = "1h"\nretry_max = "1h"\n'
                                                '[http]\nmax_per_host = 16\n')
        drain_n = self.fixed_n or env_int("BENCH_DRAIN", 20_000)
        load, drains = [], []
        try:
            for conf, label in ((program, "mailnode program"), (http, "mailnode http")):
                log(f"http: {label}")
                if "http" in label:
                    sink.start()
                self.mailnode.start(conf, label.replace(" ", "-"))
                try:
                    load.append(self.load(self.mailnode, 20, 4 * KB, f"{label} 20 sess 4 KB"))
                    drains.append(median_drain([self.drain(self.mailnode, sink, label, drain_n)
                                                for _ in range(self.runs)]))
                finally:
                    self.mailnode.stop()
                    sink.stop()
            log("http: postfix pipe to curl")
            self.postfix_transport("curlpipe")
            self.postfix.start()
            try:
                sink.start()
                load.append(self.load(self.postfix, 20, 4 * KB, "postfix curl 20 sess 4 KB"))
                sink.stop()
                drains.append(median_drain([self.drain(self.postfix, sink, "postfix curl", max(200, drain_n // 20))
                                            for _ in range(self.runs)]))
            finally:
                self.postfix.stop()
                sink.stop()
                self.postfix_transport("sinkpipe")
        finally:
            sink.stop()
        self.results["http"] = {"load": load, "drains": drains}

    def postfix_transport(self, transport, deferred=False):
        settings = [f"transport_maps = inline:{{ {RCPT}={transport}: }}",
                    f"defer_transports = {transport if deferred else ''}"]
        subprocess.run(["postconf", "-c", self.postfix.confdir, "-e", *settings], check=True,
                       capture_output=True)
        if self.postfix.running:
            subprocess.run(["postfix", "-c", self.postfix.confdir, "reload"], check=True, capture_output=True)

    def drain(self, server, sink, label, n):
        """Queues n messages (20 sessions, 4 KB) whose delivery fails at once
        and waits an hour, then makes the target take mail and flushes the
        queue: the rate and CPU of delivery alone, intake out of the way."""
        http = "http" in label or "curl" in label
        # Filled while the HTTP sink is down: each first POST is refused.
        sink.stop()
        server.wait_queue_empty()
        self.dlog.reset()
        if server is self.postfix:
            self.postfix_transport("curlpipe", deferred=True)
        elif not http:
            os.chmod(self.dlog.path, 0o444)
            os.chown(self.dlog.path, 0, 0)
        cmd = smtp_source_cmd(server.port, 20, 4 * KB, n)
        log(f"  {label} drain: queueing {n}")
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=load_timeout(n, 4 * KB))
        if r.returncode != 0:
            raise BenchError(f"{label} drain: smtp-source exited {r.returncode}: {r.stderr.strip()[-500:]}")
        deadline = time.monotonic() + 120
        while self.dlog.count() == 0 and server.queue_count() < n:
            if time.monotonic() > deadline:
                raise BenchError(f"{label} drain: {server.queue_count()} of {n} queued")
            time.sleep(0.1)
        # Every first attempt made and failed before the clock starts.
        time.sleep(2.0)
        self.dlog.reset()
        if http:
            sink.start()
        settle_disk()
        root = server.root_pid()
        cpu0 = tree_cpu_seconds(root)
        sink_cpu0 = sink.cpu_seconds() if http else 0.0
        t0 = time.monotonic()
        if server is self.postfix:
            self.postfix_transport("curlpipe")
            subprocess.run(["postqueue", "-c", self.postfix.confdir, "-f"], check=True, capture_output=True)
        else:
            subprocess.run([self.mailnode.binary, "ctl", "-c", self.mailnode.conf, "queue", "flush"],
                           check=True, capture_output=True)
        t1 = wait_lines(self.dlog, n, t0 + 60 + n * 0.1, f"{label} drain")
        cpu = tree_cpu_seconds(root) - cpu0
        sink_cpu = (sink.cpu_seconds() - sink_cpu0) if http else 0.0
        time.sleep(1.0)
        lines, ids = self.dlog.count(), self.dlog.ids()
        res = {"label": label, "n": n, "drain_s": t1 - t0, "rate": n / (t1 - t0),
               "cpu_ms": 1000 * cpu / n, "sink_cpu_ms": 1000 * sink_cpu / n,
               "exactly_once": lines == n and len(set(ids)) == n}
        log(f"  {label} drain: {n} in {res['drain_s']:.1f} s ({res['rate']:.0f}/s), "
            f"{res['cpu_ms']:.2f} ms of server CPU per delivery, sink {res['sink_cpu_ms']:.2f} ms"
            + ("" if res["exactly_once"] else f"  EXACTLY-ONCE FAILED: {lines} lines"))
        server.wait_queue_empty()
        return res

    def handshakes(self, server, client, n):
        """The server's CPU time (its whole process tree) per session of n
        STARTTLS sessions without mail (EHLO, STARTTLS, handshake, QUIT),
        and per session of n in clear (EHLO, QUIT), 20 at a time, after a
        warm-up (Postfix starts its smtpd processes on demand); their
        difference is what TLS itself costs."""
        settle_disk()
        root = server.root_pid()

        def run(mode, count):
            cpu0 = tree_cpu_seconds(root)
            t0 = time.monotonic()
            r = subprocess.run(client(server.port, 20, 0, count) + [mode], capture_output=True, text=True,
                               timeout=300)
            took = time.monotonic() - t0
            if r.returncode != 0:
                raise BenchError(f"{server.name}: smtp-load {mode} failed: {r.stdout}{r.stderr[-500:]}")
            return count / took, 1000 * (tree_cpu_seconds(root) - cpu0) / count

        run("--handshake-only", 200)
        rate, cpu_ms = run("--handshake-only", n)
        _, plain_ms = run("--plain-only", n)
        h = {"server": server.name, "n": n, "rate": rate, "cpu_ms": cpu_ms, "plain_ms": plain_ms,
             "tls_ms": cpu_ms - plain_ms}
        log(f"  {server.name}: {n} STARTTLS sessions at {rate:.0f}/s, {cpu_ms:.2f} ms of server CPU each; "
            f"in clear {plain_ms:.2f} ms; TLS itself {h['tls_ms']:.2f} ms")
        return h

    def run(self):
        for part in ("compare", "sizes", "inline", "backlog", "idle", "window", "tls", "auth", "http"):
            if part in self.parts:
                getattr(self, f"part_{part}")()

    def cleanup(self):
        for srv in (self.mailnode, self.peer, self.postfix):
            try:
                srv.stop()
            except Exception as e:  # keep cleaning up
                log(f"cleanup: {srv.name}: {e}")


def still_open(s):
    s.setblocking(False)
    try:
        data = s.recv(1, socket.MSG_PEEK)
        return data != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def median_drain(runs):
    """The run of median rate, with every run's rate beside it."""
    ordered = sorted(runs, key=lambda d: d["rate"])
    middle = dict(ordered[len(ordered) // 2])
    middle["rates"] = [d["rate"] for d in runs]
    middle["exactly_once"] = all(d["exactly_once"] for d in runs)
    return middle


class HttpSink:
    """ops/bench/http_sink.rs: answers POSTs 200 on kept-open connections and
    logs each message's Message-Id, as the sink program does."""

    def __init__(self, binary, port, log_path):
        self.binary, self.port, self.log_path = binary, port, log_path
        self.proc = None

    def start(self):
        if self.proc is not None:
            return
        if not port_free(self.port):
            raise BenchError(f"port {self.port} is in use: stop what listens there")
        self.proc = subprocess.Popen([self.binary, str(self.port), self.log_path],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if self.proc.stdout.readline().strip() != b"listening":
            raise BenchError("http-sink did not start")

    def cpu_seconds(self):
        return tree_cpu_seconds(self.proc.pid)

    def stop(self):
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None


def kill_gated(gate):
    """SIGKILL the processes (shells, sinks) whose command line names our
    gate file: the deliveries a killed serve left waiting at it."""
    needle = gate.encode()
    victims = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if needle in f.read():
                    victims.append(int(name))
        except OSError:
            pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(victims)


def fmt_size(b):
    if b >= MB:
        return f"{b // MB} MB"
    return f"{b // KB} KB"


# --------------------------------------------------------------------------
# Report


def machine_info(args):
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    fs = "?"
    best = ""
    wd = os.path.realpath(args.workdir)
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, typ, opts = line.split()[:4]
            if (wd == mnt or wd.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, f"{typ} on {mnt} ({dev}, {opts})"
    commit = sh(["git", "-C", args.repo, "rev-parse", "--short=12", "HEAD"])
    if sh(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    return [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu),
        ("Memory", mem),
        ("Kernel", platform.release()),
        ("Work dir", f"{args.workdir}: {fs}"),
        ("mailnode", f"{commit}, {sh([args.mailnode, '--version'])}"),
        ("Postfix", sh(["postconf", "-d", "-h", "mail_version"])),
        ("Load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("Open-file limit", str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])),
    ]


def ratio(a, b):
    return f"{a / b:.2f}×" if b else "n/a"


def eo(r):
    return "yes" if r["exactly_once"] else f"**NO** ({r['lines']} lines, {r['unique']} unique)"


def report(b, machine, error=None):
    out = []
    w = out.append
    mode = "quick (BENCH_QUICK=1: small N, not for publishing)" if b.quick else "full"
    w(f"## mailnode benchmark, {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(b.started))}")
    w("")
    w(f"Mode: {mode}; each figure is the median of {b.runs} run{'s' if b.runs != 1 else ''}"
      + ("" if b.fixed_n else "; N sized by a 300-message calibration run so that a run lasts about 10 s")
      + ". Load: `smtp-source`, one connection per message. Both servers deliver to the same "
        f"sink program (`ops/bench/sink.c`, {b.args.sink_build} build), run as `nobody`. *accepted/s* = N / wall time of smtp-source; "
        "*delivered/s* = N / time from smtp-source's start until the sink's log holds N lines; "
        "*exactly-once* = N lines with N different Message-Ids, still N a second later; "
        "*peak PSS* = the largest sum of `Pss` over the server's whole process tree (sampled every 200 ms), "
        "Postfix's master and all its children, mailnode and its programs.")
    w("")
    w("### Machine")
    w("")
    w("| | |")
    w("|---|---|")
    for k, v in machine:
        w(f"| {k} | {v} |")
    w("")
    if error:
        w(f"**The benchmark stopped with an error:** {error}")
        w("")

    cmp_ = b.results.get("compare")
    if cmp_:
        w("### Postfix vs mailnode (queue mode, 4 KB messages)")
        w("")
        w("| server | sessions | N | accepted/s | delivered/s | peak PSS MiB | exactly-once | mailnode peak RSS / VmHWM MiB "
          "| accepted/s of each run (host steal %) | host steal % |")
        w("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        for r in cmp_:
            rss = f"{mib(r['peak_rss_kib']):.1f} / {mib(r['hwm_kib']):.1f}" if r["server"] == "mailnode" else "—"
            each = " / ".join(f"{run['accepted_rate']:.0f} ({run['steal_pct']:.0f} %)" for run in r["runs"])
            w(f"| {r['server']} | {r['sessions']} | {r['n']} | {r['accepted_rate']:.0f} | "
              f"{r['delivered_rate']:.0f} | {mib(r['peak_pss_kib']):.1f} | {eo(r)} | {rss} | {each} | {r['steal_pct']:.0f} |")
        w("")
        w("| mailnode / postfix | accepted/s | delivered/s | peak PSS |")
        w("|---|---:|---:|---:|")
        for sessions in (20, 1):
            p = next((r for r in cmp_ if r["server"] == "postfix" and r["sessions"] == sessions), None)
            m = next((r for r in cmp_ if r["server"] == "mailnode" and r["sessions"] == sessions), None)
            if p and m:
                w(f"| {sessions} session{'s' if sessions > 1 else ''} | {ratio(m['accepted_rate'], p['accepted_rate'])} | "
                  f"{ratio(m['delivered_rate'], p['delivered_rate'])} | {ratio(m['peak_pss_kib'], p['peak_pss_kib'])} |")
        w("")

    sizes = b.results.get("sizes")
    if sizes:
        base = sizes[0]
        w("### mailnode alone: sessions and message sizes (queue mode)")
        w("")
        w("Peak RSS is sampled every 200 ms; VmHWM is the kernel's high-water mark of mailnode's RSS "
          "since that server was started (calibration included), so it also catches short peaks.")
        w("")
        w("| load | N | accepted/s | delivered/s | MB/s in | peak RSS MiB | VmHWM MiB | peak PSS MiB | RSS vs 4 KB×20 | PSS vs 4 KB×20 | exactly-once |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in sizes:
            w(f"| {r['sessions']} sessions × {fmt_size(r['size'])} | {r['n']} | {r['accepted_rate']:.1f} | "
              f"{r['delivered_rate']:.1f} | {r['accepted_rate'] * r['size'] / MB:.1f} | "
              f"{mib(r['peak_rss_kib']):.1f} | {mib(r['hwm_kib']):.1f} | {mib(r['peak_pss_kib']):.1f} | "
              f"{ratio(r['peak_rss_kib'], base['peak_rss_kib'])} | {ratio(r['peak_pss_kib'], base['peak_pss_kib'])} | {eo(r)} |")
        w("")

    inl = b.results.get("inline")
    if inl:
        w("### Inline mode (250 only after the program exited 0), 20 sessions, 4 KB")
        w("")
        w("| server | N | accepted/s | delivered/s | peak PSS MiB | exactly-once |")
        w("|---|---:|---:|---:|---:|---|")
        for r in inl:
            w(f"| {r['server']} | {r['n']} | {r['accepted_rate']:.0f} | {r['delivered_rate']:.0f} | "
              f"{mib(r['peak_pss_kib']):.1f} | {eo(r)} |")
        if len(inl) == 2:
            w("")
            w(f"mailnode / aiosmtpd: accepted/s {ratio(inl[1]['accepted_rate'], inl[0]['accepted_rate'])}, "
              f"peak PSS {ratio(inl[1]['peak_pss_kib'], inl[0]['peak_pss_kib'])}.")
        w("")

    bl = b.results.get("backlog")
    if bl:
        w(f"### Backlog: {bl['n']:,} queued messages (mailnode)")
        w("")
        w("| | |")
        w("|---|---|")
        w(f"| queued behind a closed gate (20 sessions) | {bl['fill_s']:.1f} s ({bl['fill_rate']:.0f}/s), then `kill -9` "
          f"(and {bl['killed_gated']} waiting programs) |")
        w(f"| launch of `serve` → 220 greeting | {bl['to_banner_s']:.2f} s |")
        w(f"| launch of `serve` → 250 for a new message | {bl['to_250_s']:.2f} s ({bl['probe_attempts']} attempt{'s' if bl['probe_attempts'] != 1 else ''}) |")
        w(f"| RSS / tree PSS at that 250 | {mib(bl['rss_startup_kib']):.1f} / {mib(bl['pss_startup_kib']):.1f} MiB |")
        w(f"| peak RSS / tree PSS during the drain | {mib(bl['peak_rss_kib']):.1f} / {mib(bl['peak_pss_kib']):.1f} MiB (VmHWM {mib(bl['hwm_kib']):.1f} MiB) |")
        w(f"| drain: launch → all {bl['n']:,} delivered | {bl['drain_s']:.1f} s = **{bl['drain_rate']:.0f} msg/s** |")
        w(f"| exactly-once | {eo(bl)}; delivered while gated: {bl['delivered_early']}; probe delivered: {bl['probe_delivered']} |")
        w("")

    idle = b.results.get("idle")
    if idle:
        w(f"### {idle['k']:,} idle connections (mailnode)")
        w("")
        w("| | |")
        w("|---|---|")
        w(f"| opened and greeted | {idle['k']:,} in {idle['open_s']:.1f} s; {idle['still_open']:,} still open at the end |")
        w(f"| RSS / tree PSS before | {mib(idle['rss_before_kib']):.1f} / {mib(idle['pss_before_kib']):.1f} MiB |")
        w(f"| RSS / tree PSS with them open | {mib(idle['rss_kib']):.1f} / {mib(idle['pss_kib']):.1f} MiB "
          f"({idle['per_conn_kib']:.1f} KiB RSS per connection) |")
        w(f"| one message beside them, connect → 250 (5 tries) | max **{idle['max_latency'] * 1000:.0f} ms** "
          f"(all: {', '.join(f'{x * 1000:.0f}' for x in idle['latencies'])} ms) |")
        w("")

    win = b.results.get("window")
    if win:
        w("### The duplicate window (mailnode, 20 sessions, 4 KB, info logs in JSON)")
        w("")
        w("From a message's last delivery (the log's \"delivery attempt\" line of its program's success) "
          "to its removal being durable (the \"removed\" line): a power cut in between delivers it again.")
        w("")
        w("| N | accepted/s | delivered/s | messages measured | p50 | p99 | max | exactly-once |")
        w("|---:|---:|---:|---:|---:|---:|---:|---|")
        w(f"| {win['n']} | {win['accepted_rate']:.0f} | {win['delivered_rate']:.0f} | {win['measured']} | "
          f"{win['p50_ms']:.1f} ms | {win['p99_ms']:.1f} ms | {win['max_ms']:.1f} ms | {eo(win)} |")
        w("")

    tls = b.results.get("tls")
    if tls:
        w("### TLS: a full STARTTLS handshake per message (20 sessions, 4 KB)")
        w("")
        w("The same certificate (P-256, signed by a CA made for the run) for both; Postfix with "
          "`smtpd_tls_security_level = may`, mailnode with `[tls]`. Load: `ops/bench/smtp_load.rs` "
          "(`smtp-load`), one connection per message: EHLO, STARTTLS, a full handshake (resumption off), "
          "EHLO, MAIL, RCPT, DATA, QUIT. *CPU per STARTTLS session*: the server's whole process tree's CPU "
          "time over sessions without mail (EHLO, STARTTLS, handshake, QUIT), after a warm-up, divided by "
          "their number; *in clear*: the same for EHLO and QUIT alone; *TLS itself*: the difference. Postfix "
          "logs each connection (through postlogd, in its tree) where mailnode, at `warn`, logs nothing: "
          "that is in the two session figures, not in their difference. *sessions/s alone* is bounded by "
          "the load client, one thread near a full core there.")
        w("")
        w("| server | N | accepted/s | delivered/s | peak PSS MiB | exactly-once | STARTTLS sessions/s alone "
          "| CPU per STARTTLS session | in clear | TLS itself |")
        w("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
        for r in tls["load"]:
            h = next((h for h in tls["handshakes"] if h["server"] == r["server"]), None)
            hs = (f"{h['rate']:.0f} | {h['cpu_ms']:.2f} ms | {h['plain_ms']:.2f} ms | {h['tls_ms']:.2f} ms"
                  if h else "— | — | — | —")
            w(f"| {r['server']} | {r['n']} | {r['accepted_rate']:.0f} | {r['delivered_rate']:.0f} | "
              f"{mib(r['peak_pss_kib']):.1f} | {eo(r)} | {hs} |")
        w("")
        p = next((r for r in tls["load"] if r["server"] == "postfix"), None)
        m = next((r for r in tls["load"] if r["server"] == "mailnode"), None)
        ph = next((h for h in tls["handshakes"] if h["server"] == "postfix"), None)
        mh = next((h for h in tls["handshakes"] if h["server"] == "mailnode"), None)
        if p and m:
            w("| mailnode / postfix | accepted/s | delivered/s | peak PSS | CPU per STARTTLS session | TLS itself |")
            w("|---|---:|---:|---:|---:|---:|")
            cpu = (f"{ratio(mh['cpu_ms'], ph['cpu_ms'])} | {ratio(mh['tls_ms'], ph['tls_ms'])}"
                   if ph and mh else "n/a | n/a")
            w(f"| 20 sessions, STARTTLS | {ratio(m['accepted_rate'], p['accepted_rate'])} | "
              f"{ratio(m['delivered_rate'], p['delivered_rate'])} | {ratio(m['peak_pss_kib'], p['peak_pss_kib'])} | {cpu} |")
            w("")

    auth = b.results.get("auth")
    if auth:
        w("### Sender authentication: [auth] off and on (mailnode, 20 sessions, 4 KB, DKIM-signed)")
        w("")
        w("The same DKIM-signed message (dkimpy, RSA 2048, From/To/Subject signed; a unique Message-Id "
          "outside the signature) sent by `smtp-load --clear --template`, one connection per message, "
          "against mailnode with `[auth]` off and then on, asking a local dnsmasq (SPF, DKIM key and "
          "DMARC record of bench.test, authoritative for the zone with TTL 300 s: every check passes, and "
          "hickory caches the answers, as it would a real zone's).")
        w("")
        w("| [auth] | N | accepted/s | delivered/s | peak PSS MiB | exactly-once |")
        w("|---|---:|---:|---:|---:|---|")
        for r in auth:
            w(f"| {r['label'].split(' 20 sess')[0].replace('mailnode auth ', '')} | {r['n']} | "
              f"{r['accepted_rate']:.0f} | {r['delivered_rate']:.0f} | {mib(r['peak_pss_kib']):.1f} | {eo(r)} |")
        if len(auth) == 2:
            w("")
            w(f"On / off: accepted {ratio(auth[1]['accepted_rate'], auth[0]['accepted_rate'])}, "
              f"delivered {ratio(auth[1]['delivered_rate'], auth[0]['delivered_rate'])}.")
        w("")

    http = b.results.get("http")
    if http:
        w("### Delivery to an HTTP target (20 sessions, 4 KB)")
        w("")
        w("mailnode delivering to the sink program, then POSTing to an HTTP target on a local keep-alive "
          f"sink (`ops/bench/http_sink.rs`, one thread, port {PORT_HTTP_SINK}), then Postfix piping each "
          "message into `curl -sS --fail -H Expect: -H Content-Type:message/rfc822 --data-binary @-` to the "
          "same sink. *Load*: the usual 20 sessions of smtp-source; *drain*: N messages queued while their "
          "target fails at once (retried an hour later), then the target mended and the queue flushed: "
          "delivery alone. *CPU per delivery*: the server's process tree (programs, curl), and the HTTP "
          "sink's apart.")
        w("")
        w("| load | N | accepted/s | delivered/s | peak PSS MiB | exactly-once |")
        w("|---|---:|---:|---:|---:|---|")
        for r in http["load"]:
            w(f"| {r['label'].split(' 20 sess')[0]} | {r['n']} | {r['accepted_rate']:.0f} | "
              f"{r['delivered_rate']:.0f} | {mib(r['peak_pss_kib']):.1f} | {eo(r)} |")
        w("")
        w("| drain (median of the runs) | N | delivered/s | every run | server CPU per delivery | sink CPU per delivery | exactly-once |")
        w("|---|---:|---:|---|---:|---:|---|")
        for d in http["drains"]:
            rates = ", ".join(f"{r:.0f}" for r in d.get("rates", [d["rate"]]))
            w(f"| {d['label']} | {d['n']} | {d['rate']:.0f} | {rates} | {d['cpu_ms']:.3f} ms | {d['sink_cpu_ms']:.3f} ms | "
              f"{'yes' if d['exactly_once'] else 'NO'} |")
        drains = {d["label"]: d for d in http["drains"]}
        loads = {r["label"].split(" 20 sess")[0]: r for r in http["load"]}
        if len(drains) == 3 and len(loads) == 3:
            w("")
            w(f"HTTP / program: load delivered {ratio(loads['mailnode http']['delivered_rate'], loads['mailnode program']['delivered_rate'])}, "
              f"drain {ratio(drains['mailnode http']['rate'], drains['mailnode program']['rate'])}. "
              f"mailnode HTTP / Postfix curl: load delivered {ratio(loads['mailnode http']['delivered_rate'], loads['postfix curl']['delivered_rate'])}, "
              f"drain {ratio(drains['mailnode http']['rate'], drains['postfix curl']['rate'])}.")
        w("")

    w("### How it was run")
    w("")
    w("```sh")
    knobs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                     if k.startswith("BENCH_") and k != "BENCH_DIR" or k == "BENCH_DIR" and v != "/var/tmp/mailnode-bench")
    w(f"{knobs + ' ' if knobs else ''}ops/bench/run   # as root, on Debian 12")
    w(f"# load, for each server, sessions S, size L, messages N:")
    w(f"smtp-source -s S -l L -m N -f {SENDER} -t {RCPT} {HOST}:PORT   # postfix {PORT_POSTFIX}, mailnode {PORT_MAILNODE}, aiosmtpd {PORT_PEER}")
    w(f"postfix -c {b.postfix.confdir} start")
    w(f"{b.args.mailnode} serve -c {os.path.join(b.mailnode.dir, 'queue.toml')}   # inline.toml, backlog.toml likewise")
    w(f"{shlex.join(b.peer.cmd())}   # the inline peer")
    w("```")
    w("")
    pc = subprocess.run(["postconf", "-c", b.postfix.confdir, "-n"], capture_output=True, text=True).stdout
    pm = subprocess.run(["postconf", "-c", b.postfix.confdir, "-M", "127.0.0.1:10025/inet", "sinkpipe/unix"],
                        capture_output=True, text=True).stdout
    w("Postfix (an instance of its own; `postconf -n`, and the two master.cf lines the benchmark adds; "
      "nothing runs chrooted; everything else is Debian's default). Differences that remain between the two "
      "servers, by design: Postfix logs every delivery (`maillog_file`, through postlogd, counted in its PSS) "
      "while mailnode runs with `[log] level = \"warn\"`; Postfix runs up to 20 pipe deliveries at once "
      "(`default_destination_concurrency_limit`), mailnode 16 (`[delivery] concurrency`). Both start the "
      "sink directly, without a shell (mailnode runs a command that is an absolute path and plain words "
      "as `/bin/sh -c` would, without starting one).")
    w("")
    w("```")
    w(pc.rstrip())
    w(pm.rstrip())
    w("```")
    w("")
    qconf = os.path.join(b.mailnode.dir, "queue.toml")
    if os.path.exists(qconf):
        w("mailnode (`queue.toml`; `inline.toml` adds `mode = \"inline\"`; every other key is the default):")
        w("")
        w("```toml")
        with open(qconf) as f:
            w(f.read().rstrip())
        w("```")
        w("")
        w(f"Aliases: `sink: |{b.args.sink} {b.dlog.path}` (backlog: the same with a gate file argument).")
        w("")
    notes = list(b.notes)
    for label, lines in b.mailnode.stderr_notes:
        notes.append(f"mailnode serve ({label}) wrote {len(lines)} line(s) to stderr, e.g. `{lines[0][:200]}`")
    probs = b.postfix.problems()
    if probs:
        notes.append(f"Postfix logged {len(probs)} warning/error line(s), e.g. `{probs[0][:200]}`")
    if notes:
        w("### Notes")
        w("")
        for n in notes:
            w(f"- {n}")
        w("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# The inline peer (aiosmtpd)


def inline_peer(port, sink, logpath):
    import asyncio
    from aiosmtpd.smtp import SMTP

    kwargs = {}
    if os.geteuid() == 0:  # like mailnode: the program never runs as root
        nobody = pwd.getpwnam("nobody")
        kwargs = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            try:
                proc = await asyncio.create_subprocess_exec(
                    sink, logpath, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, **kwargs)
                await proc.communicate(envelope.original_content)
            except OSError:
                return "451 4.3.0 cannot run the program"
            if proc.returncode == 0:
                return "250 2.0.0 Ok: delivered"
            return "451 4.3.0 program failed"

    async def main():
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="aiosmtpd.bench.test"), HOST, port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


# --------------------------------------------------------------------------


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "inline-peer":
        port, sink, logpath = sys.argv[2:5]
        inline_peer(int(port), sink, logpath)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--mailnode", required=True)
    ap.add_argument("--sink", required=True)
    ap.add_argument("--sink-build", default="freestanding", choices=["freestanding", "libc"],
                    help="how ops/bench/run built the sink (for the report)")
    ap.add_argument("--postfix-config", required=True)
    ap.add_argument("--load-client", required=True, help="the SMTP load client for TLS and [auth] (ops/bench/smtp_load.rs)")
    ap.add_argument("--http-sink", required=True, help="the HTTP sink of part http (ops/bench/http_sink.rs)")
    args = ap.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    args.mailnode = os.path.abspath(args.mailnode)

    # Servers and clients inherit the highest open-file limit allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"interrupted by signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    try:
        b = Bench(args)
    except BenchError as e:
        log(f"error: {e}")
        return 2
    machine = machine_info(args)
    error = None
    try:
        b.run()
    except (BenchError, KeyboardInterrupt) as e:
        error = str(e) or type(e).__name__
        log(f"error: {error}")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        log(f"error: {error}")
        import traceback
        traceback.print_exc()
    finally:
        b.cleanup()
    text = report(b, machine, error)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"machine": machine, "results": b.results, "error": error}, f, indent=1, default=str)
    print(text)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())

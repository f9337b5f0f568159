#!/usr/bin/env python3
"""The mailnode soak (issue 19, point 9); ops/bench/soak sets the stage.

    soak.py --workdir DIR --repo DIR --mailnode BIN --sink BIN --minutes M
    soak.py sender ...    one load process (started by the above)
    soak.py hostile ...   the hostile clients (started by the above)

What runs, for M minutes (SOAK_MINUTES, default 30), against one `serve`:

- normal senders at half the peak rate. The peak is measured first: 20
  sessions of unpaced 4 KB messages, 5 per connection, for 20 s, with the
  same sender code, against a node of its own that is stopped afterwards;
  the soak then paces at half of it. Each message is timed from the final
  "." of its DATA to the reply;
- hostile clients, from 127.0.0.2 so that the log tells them apart, each
  kind bounded in count: slowloris (silent, or trickling commands or data a
  byte a second), pipelined floods (hundreds of commands in one write, read
  or never read), smuggling attempts (LF.LF, CRLF.LF, LF.CRLF inside DATA
  followed by another transaction) and connect/close floods;
- failing programs as alias targets for a few % of the messages: exit 75,
  1, 64 and 67, killed by a signal, hanging past the short [delivery]
  timeout, writing 1 MiB of output before reading, closing stdin unread;
  permanent failures are returned to a relay this script runs (a small SMTP
  catcher), so the queue does not fill with held mail; temporary ones are
  retried until a short [queue] max_age, then returned too;
- an aliases reload every 10 s (the file rewritten with another rotating
  alias each time; `mailnode ctl aliases reload` and SIGHUP in turn);
- `mailnode ctl queue` every second;
- SIGKILL of serve at the middle (and of the programs it was running, as
  systemd's control-group kill would), then an immediate restart on the
  same spool and ports.

Every 10 s: RSS, PSS (smaps_rollup), open fds, threads and CPU of the serve
process, the queue (`ctl status`) and the node's Prometheus counters. At the
end: samples.csv (every 10 s), minutes.csv and a table per minute, soak.png
(gnuplot), checks (every acknowledged message delivered, nothing smuggled,
failing programs bounced, what the node logged at WARN/ERROR) and the
verdict, as markdown on stdout and in WORKDIR/soak.md.

Progress goes to stderr. Standard library only (and gnuplot for the plot).
"""

import argparse
import array
import asyncio
import bisect
import ctypes
import json
import math
import os
import platform
import pwd
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HOST = "127.0.0.1"
HOSTILE_SOURCE = "127.0.0.2"  # hostile clients connect from here: their log lines and limits are their own
DOMAIN = "soak.test"
SENDER = f"soak@{DOMAIN}"
KB = 1024
SAMPLE_S = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The delivery targets of the normal senders: (alias, share of the messages,
# message size). The rest of the messages go to "sink". The hang program's
# share is set from the rate (one message every HANG_EVERY_S seconds), since
# each of them holds a delivery slot for the whole [delivery] timeout on
# every attempt: a share of the rate would let it take all 16 slots.
FAILING = [
    # alias             share   size      what the program does
    ("fail-exit75",     0.010,  4 * KB),  # exit 75: temporary, retried
    ("fail-exit1",      0.005,  4 * KB),  # exit 1: temporary too (not a sysexits code; docs/programs.md)
    ("fail-exit64",     0.005,  4 * KB),  # exit 64: permanent, returned
    ("fail-exit67",     0.005,  4 * KB),  # exit 67: permanent, returned
    ("fail-signal",     0.005,  4 * KB),  # kill -KILL $$: temporary
    ("fail-hang",       None,   4 * KB),  # sleep past the timeout: killed, temporary
    ("fail-noisy",      0.005,  256 * KB),  # 1 MiB on stdout+stderr before reading stdin, then exit 0
    ("fail-nostdin",    0.005,  256 * KB),  # closes stdin unread (256 KB: more than a pipe holds), exit 0
]
HANG_EVERY_S = 10.0
TEMPORARY = {"fail-exit75", "fail-exit1", "fail-signal", "fail-hang"}
PERMANENT = {"fail-exit64", "fail-exit67"}
SUCCEEDING = {"fail-noisy", "fail-nostdin"}

FAIL_SCRIPT = r"""#!/bin/sh
# A delivery program of the mailnode soak that fails the way $1 says; it
# logs "QUEUE_ID ATTEMPT" to $2/fail-$1.log first. Written by ops/bench/soak.py.
kind=$1
printf '%s %s\n' "$QUEUE_ID" "$ATTEMPT" >> "$2/fail-$kind.log"
case $kind in
  exit75) cat >/dev/null; echo "soak: try again later"; exit 75 ;;
  exit1) cat >/dev/null; echo "soak: exit 1"; exit 1 ;;
  exit64) cat >/dev/null; echo "soak: usage error" >&2; exit 64 ;;
  exit67) cat >/dev/null; echo "soak: no such user"; exit 67 ;;
  signal) kill -KILL $$ ;;
  hang) exec sleep 3600 ;;
  noisy)
    # Output first, stdin afterwards: a node that wrote all of stdin before
    # reading the output would deadlock here until the timeout.
    head -c 524288 /dev/zero | tr '\0' o
    head -c 524288 /dev/zero | tr '\0' e >&2
    cat >/dev/null; exit 0 ;;
  nostdin) exec 0<&-; exit 0 ;;
esac
echo "soak: unknown kind $kind"; exit 64
"""


class SoakError(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_kib(path, key):
    """The value of `key` in a /proc file of "Key: value [kB]" lines; 0 if
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


def pss_kib(pid):
    return proc_kib(f"/proc/{pid}/smaps_rollup", "Pss")


class DeliveryLog:
    """A log the sink (running as nobody) appends one line per message to."""

    def __init__(self, path):
        self.path = path
        self.reset()

    def reset(self):
        """Empty it, writable by the sink's user."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        nobody = pwd.getpwnam("nobody")
        os.fchown(fd, nobody.pw_uid, nobody.pw_gid)
        os.fchmod(fd, 0o666)
        os.close(fd)

    def count(self):
        with open(self.path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def env_float(name, default):
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def free_port():
    """A port nothing listens on now (for the metrics endpoint, which does
    not log the address it got from port 0)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted sequence; None if empty."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


# ==========================================================================
# The normal senders: `soak.py sender`, one asyncio process each


class Pacer:
    """Hands out send times `interval` apart, shared by the sessions of one
    process (asyncio: taking a slot is atomic). A slot more than a second in
    the past is dropped and counted as missed, so that after a stall (the
    restart) the senders do not burst to catch up."""

    def __init__(self, rate):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = None
        self.missed = 0

    async def wait(self):
        if not self.interval:
            return
        now = time.monotonic()
        if self.next is None:
            self.next = now
        slot = self.next
        if slot < now - 1.0:
            self.missed += int((now - 1.0 - slot) / self.interval)
            slot = now - 1.0
        self.next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


async def read_reply(reader):
    """The code of one SMTP reply (multi-line replies read whole)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


class Sender:
    """Sessions that each send `per_conn` messages per connection, paced by
    a shared Pacer, and append one record per message to `out`:

        T LAT_US CODE KIND SEQ

    T: time.monotonic() of the outcome; LAT_US: microseconds from the final
    "." to the reply (-1 if it never got that far); CODE: the reply to the
    end of data, or of the command that failed; -1 no connection, 0
    connection lost before a reply; KIND: index into the mix; SEQ: the
    message's number (its Message-Id is <TAG.SEQ@soak.test>)."""

    def __init__(self, a):
        self.a = a
        self.mix = json.loads(a.mix)  # [[alias, weight, size], ...]
        self.cum = []
        total = 0.0
        for _, w, _ in self.mix:
            total += w
            self.cum.append(total)
        self.total = total
        self.rng = random.Random(a.seed)
        line = b"x" * 70 + b"\r\n"
        self.filler = {}
        for _, _, size in self.mix:
            self.filler.setdefault(size, line * max(1, (size - 200) // len(line)))
        self.seq = 0
        self.pacer = Pacer(a.rate)
        self.out = open(a.out, "w", buffering=1 << 16)
        self.stop_at = time.monotonic() + a.seconds
        self.stopping = False
        self.sent = 0

    def done(self):
        return self.stopping or time.monotonic() >= self.stop_at

    def record(self, lat_us, code, kind, seq):
        self.out.write(f"{time.monotonic():.4f} {lat_us} {code} {kind} {seq}\n")

    def pick(self):
        return bisect.bisect_right(self.cum, self.rng.random() * self.total)

    def message(self, kind, seq):
        alias, _, size = self.mix[kind]
        head = (f"From: soak <{SENDER}>\r\nTo: <{alias}@{DOMAIN}>\r\n"
                f"Subject: soak {self.a.tag}.{seq}\r\nMessage-Id: <{self.a.tag}.{seq}@{DOMAIN}>\r\n\r\n")
        return head.encode() + self.filler[size]

    async def session(self):
        """One connection: greeting, EHLO, up to per_conn messages, QUIT."""
        try:
            reader, writer = await asyncio.open_connection(HOST, self.a.port)
        except OSError:
            self.record(-1, -1, 0, -1)
            await asyncio.sleep(0.1)  # the node is down (the restart): do not spin
            return
        # Zero buffer limits: drain() returns only once everything written is
        # in the kernel, so the clock starts when the final "." is sent.
        writer.transport.set_write_buffer_limits(high=0)
        kind, seq = 0, -1
        try:
            async with asyncio.timeout(30):
                if await read_reply(reader) != 220:
                    return
                writer.write(b"EHLO sender.soak.test\r\n")
                if await read_reply(reader) != 250:
                    return
            for _ in range(self.a.per_conn):
                await self.pacer.wait()
                if self.done():
                    break
                kind = self.pick()
                self.seq += 1
                seq = self.seq
                async with asyncio.timeout(60):
                    failed = None
                    for cmd in (f"MAIL FROM:<{SENDER}>\r\n", f"RCPT TO:<{self.mix[kind][0]}@{DOMAIN}>\r\n",
                                "DATA\r\n"):
                        writer.write(cmd.encode())
                        code = await read_reply(reader)
                        if code >= 400 or (cmd == "DATA\r\n" and code != 354):
                            failed = code
                            break
                    if failed is not None:
                        self.record(-1, failed, kind, seq)
                        seq = -1
                        writer.write(b"RSET\r\n")
                        await read_reply(reader)
                        continue
                    writer.write(self.message(kind, seq))
                    await writer.drain()
                    writer.write(b".\r\n")
                    t = time.monotonic()
                    code = await read_reply(reader)
                    self.record(int((time.monotonic() - t) * 1e6), code, kind, seq)
                    self.sent += 1
                    seq = -1
            async with asyncio.timeout(10):
                writer.write(b"QUIT\r\n")
                await read_reply(reader)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            if seq >= 0:  # lost in the middle of a message: no reply to it
                self.record(-1, 0, kind, seq)
        finally:
            writer.close()

    async def worker(self):
        n = 0
        while not self.done() and n < 10_000_000:  # bounded by time, and by count
            n += 1
            await self.session()

    async def flusher(self):
        while not self.done():
            await asyncio.sleep(1.0)
            self.out.flush()

    async def run(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(self, "stopping", True))
        tasks = [asyncio.create_task(self.worker()) for _ in range(self.a.sessions)]
        fl = asyncio.create_task(self.flusher())
        # A session stuck on a reply when the time is up gets 15 s more.
        await asyncio.wait(tasks, timeout=self.a.seconds + 15)
        for t in tasks + [fl]:
            t.cancel()
        await asyncio.gather(*tasks, fl, return_exceptions=True)
        self.out.close()
        with open(self.a.out + ".json", "w") as f:
            json.dump({"missed": self.pacer.missed, "sent": self.sent}, f)


def sender_main(argv):
    ap = argparse.ArgumentParser(prog="soak.py sender")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0.0, help="messages/s of this process; 0: as fast as it goes")
    ap.add_argument("--sessions", type=int, required=True)
    ap.add_argument("--per-conn", type=int, default=5)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--mix", required=True)
    ap.add_argument("--seed", type=int, default=1)
    asyncio.run(Sender(ap.parse_args(argv)).run())
    return 0


# ==========================================================================
# The hostile clients: `soak.py hostile`, one asyncio process


class Hostile:
    def __init__(self, a):
        self.a = a
        self.port = a.port
        self.stop_at = time.monotonic() + a.seconds
        self.stopping = False
        self.stats = {}
        self.unannounced = []  # monotonic times of closes by the server without a 421
        self.rng = random.Random(7)

    def done(self):
        return self.stopping or time.monotonic() >= self.stop_at

    def count(self, kind, what, n=1):
        d = self.stats.setdefault(kind, {})
        d[what] = d.get(what, 0) + n

    async def connect(self):
        return await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port, local_addr=(HOSTILE_SOURCE, 0)), 10)

    async def pause(self, seconds):
        """Sleeps, but wakes up for the end of the run."""
        end = time.monotonic() + seconds
        while not self.done() and time.monotonic() < end:
            await asyncio.sleep(min(0.5, end - time.monotonic()))

    @staticmethod
    async def read_lines(reader, sink):
        """Collects reply lines until the server closes."""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                sink.append(line)
        except OSError:
            return

    # -- slowloris: a connection held open by a byte a second, or by nothing

    async def slowloris(self, i):
        variant = ("silent", "commands", "data", "commands")[i % 4]
        kind = f"slowloris-{variant}"
        rounds = 0
        while not self.done() and rounds < 10_000:
            rounds += 1
            try:
                reader, writer = await self.connect()
            except (OSError, asyncio.TimeoutError):
                self.count(kind, "connect failed")
                await self.pause(1.0)
                continue
            self.count(kind, "connections")
            lines = []
            listener = asyncio.create_task(self.read_lines(reader, lines))
            t0 = time.monotonic()
            if variant == "data":
                writer.write(b"EHLO slowloris.example\r\nMAIL FROM:<slow@soak.test>\r\n"
                             b"RCPT TO:<hostile@soak.test>\r\nDATA\r\n")
                trickle = b"Subject: slow\r\n\r\n" + b"s" * 10_000
            elif variant == "commands":
                trickle = (b"EHLO slowloris.example\r\nMAIL FROM:<slow@soak.test>\r\n"
                           b"RCPT TO:<hostile@soak.test>\r\nDATA\r\n" + b"s" * 10_000)
            else:
                trickle = b""
            pos = 0
            # Until the server closes, or our own lifetime for a connection.
            while not listener.done() and time.monotonic() - t0 < self.a.slow_lifetime and not self.done():
                if pos < len(trickle):
                    try:
                        writer.write(trickle[pos:pos + 1])
                    except OSError:
                        break
                    pos += 1
                await asyncio.wait([listener], timeout=1.0)
            held = time.monotonic() - t0
            if listener.done():
                last = lines[-1][:40].decode("latin-1").strip() if lines else "(nothing)"
                if last.startswith("421"):
                    self.count(kind, f"closed by the server with {last[:9]}")
                else:
                    # Only the SIGKILL should do this; the report checks the times.
                    self.count(kind, f"closed by the server without a 421 (last reply {last[:3]})")
                    if len(self.unannounced) < 100_000:
                        self.unannounced.append(round(time.monotonic(), 3))
                self.count(kind, "seconds held in all, until the server closed", round(held))
            elif self.done():
                self.count(kind, "still open at the end of the soak")
            else:
                self.count(kind, "closed by us at its lifetime")
            listener.cancel()
            writer.close()
            await self.pause(1.0)

    # -- pipelined floods: hundreds of commands in one write

    FLOOD_COMMANDS = [
        b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY postmaster\r\n",
        b"MAIL FROM:<flood@soak.test>\r\n", b"RCPT TO:<nobody-here@soak.test>\r\n",
        b"RCPT TO:<hostile@soak.test>\r\n", b"XYZZY\r\n", b"A" * 600 + b"\r\n",
        b"MAIL FROM:<a\x01b@soak.test>\r\n", b"EHLO again.example\r\n",
    ]

    async def flood(self, i):
        kind = "pipelined flood"
        rounds = 0
        while not self.done() and rounds < 100_000:
            rounds += 1
            reads = rounds % 2 == 0  # every other round never reads a reply
            cmds = [self.rng.choice(self.FLOOD_COMMANDS) for _ in range(self.a.flood_commands)]
            payload = b"EHLO flood.example\r\n" + b"".join(cmds) + b"QUIT\r\n"
            try:
                reader, writer = await self.connect()
            except (OSError, asyncio.TimeoutError):
                self.count(kind, "connect failed")
                await self.pause(1.0)
                continue
            self.count(kind, "rounds that read" if reads else "rounds that never read")
            try:
                writer.write(payload)
                if reads:
                    lines = []
                    try:
                        await asyncio.wait_for(self.read_lines(reader, lines), 30)
                    except asyncio.TimeoutError:
                        self.count(kind, "reader: no close within 30 s")
                    finals = sum(1 for l in lines if l[3:4] == b" ")
                    # The greeting, EHLO, each command and QUIT: one reply each.
                    expected = 1 + 1 + len(cmds) + 1
                    self.count(kind, "reader: one reply per command" if finals == expected
                               else f"reader: {finals} replies for {expected} expected")
                else:
                    await self.pause(self.a.nonreader_hold)
            except OSError:
                self.count(kind, "connection error")
            finally:
                writer.close()
            await self.pause(0.5)

    # -- smuggling: a bare line end and a dot inside DATA, then another transaction

    SMUGGLE_SEQUENCES = [b"\n.\n", b"\r\n.\n", b"\n.\r\n"]

    async def smuggle(self, i):
        kind = "smuggling"
        rounds = 0
        while not self.done() and rounds < 100_000:
            rounds += 1
            seq = self.SMUGGLE_SEQUENCES[(rounds + i) % len(self.SMUGGLE_SEQUENCES)]
            name = repr(seq.decode())
            try:
                reader, writer = await self.connect()
            except (OSError, asyncio.TimeoutError):
                self.count(kind, "connect failed")
                await self.pause(1.0)
                continue
            try:
                async with asyncio.timeout(20):
                    await read_reply(reader)
                    for cmd in (b"EHLO smuggler.example\r\n", b"MAIL FROM:<smuggler@soak.test>\r\n",
                                b"RCPT TO:<hostile@soak.test>\r\n", b"DATA\r\n"):
                        writer.write(cmd)
                        code = await read_reply(reader)
                    if code != 354:
                        self.count(kind, f"{name}: DATA answered {code}")
                        continue
                    writer.write(b"Subject: outer\r\n\r\nhello" + seq +
                                 b"MAIL FROM:<evil@soak.test>\r\nRCPT TO:<smuggled@soak.test>\r\nDATA\r\n"
                                 b"Subject: smuggled\r\nMessage-Id: <smuggled@soak.test>\r\n\r\nsmuggled\r\n"
                                 b".\r\n")
                    lines = []
                    # Replies to the lines above, if any, before we end the
                    # outer message properly and quit.
                    try:
                        await asyncio.wait_for(self.read_lines(reader, lines), 2)
                    except asyncio.TimeoutError:
                        pass
                    if not reader.at_eof():
                        writer.write(b"\r\n.\r\nQUIT\r\n")
                        try:
                            await asyncio.wait_for(self.read_lines(reader, lines), 5)
                        except asyncio.TimeoutError:
                            pass
                    codes = [l[:3].decode("latin-1") for l in lines if l[3:4] == b" "]
                    self.count(kind, f"{name}: replies {' '.join(codes) or '(none)'}"
                                     f"{'' if reader.at_eof() else ', still open'}")
            except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                self.count(kind, f"{name}: {type(e).__name__}")
            finally:
                writer.close()
            await self.pause(1.0)

    # -- connect/close floods

    async def connect_flood(self):
        kind = "connect/close flood"
        variants = ("close at once", "reset at once", "close after the greeting", "QUIT unread")
        n = 0
        interval = 1.0 / self.a.connect_rate
        next_t = time.monotonic()
        while not self.done() and n < 10_000_000:
            variant = variants[n % len(variants)]
            n += 1
            next_t += interval
            try:
                reader, writer = await self.connect()
                sock = writer.get_extra_info("socket")
                if variant == "reset at once":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                elif variant == "close after the greeting":
                    await asyncio.wait_for(reader.readline(), 10)
                elif variant == "QUIT unread":
                    writer.write(b"QUIT\r\n")
                writer.close()
                self.count(kind, variant)
            except (OSError, asyncio.TimeoutError):
                self.count(kind, "connect failed")
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_t = time.monotonic()  # fell behind (the restart): no burst

    async def dump(self):
        while not self.done():
            await asyncio.sleep(5.0)
            self.write_stats()

    def write_stats(self):
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"stats": self.stats, "closed_without_421": self.unannounced}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.a.out)

    async def run(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(self, "stopping", True))
        tasks = [asyncio.create_task(self.slowloris(i)) for i in range(self.a.slowloris)]
        tasks += [asyncio.create_task(self.flood(i)) for i in range(self.a.flooders)]
        tasks += [asyncio.create_task(self.smuggle(i)) for i in range(self.a.smugglers)]
        if self.a.connect_rate > 0:
            tasks.append(asyncio.create_task(self.connect_flood()))
        tasks.append(asyncio.create_task(self.dump()))
        await asyncio.wait(tasks, timeout=self.a.seconds + 40)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.write_stats()


def hostile_main(argv):
    ap = argparse.ArgumentParser(prog="soak.py hostile")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slowloris", type=int, default=24)
    ap.add_argument("--slow-lifetime", type=float, default=150.0)
    ap.add_argument("--flooders", type=int, default=4)
    ap.add_argument("--flood-commands", type=int, default=400)
    ap.add_argument("--nonreader-hold", type=float, default=30.0)
    ap.add_argument("--smugglers", type=int, default=2)
    ap.add_argument("--connect-rate", type=float, default=40.0)
    asyncio.run(Hostile(ap.parse_args(argv)).run())
    return 0


# ==========================================================================
# The relay: catches the bounces (delivery status notifications)


class Catcher:
    """A minimal SMTP server that takes every message (the node's [relay])
    and counts the DSNs by reported recipient and status."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}  # (alias, status) -> n
        self.messages = 0
        catcher = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 60

            def handle(self):
                w = self.wfile.write
                w(b"220 catcher.soak.test ESMTP\r\n")
                for _ in range(10_000):  # commands per connection, bounded
                    line = self.rfile.readline(4096)
                    if not line:
                        return
                    verb = line[:4].upper()
                    if verb == b"EHLO" or verb == b"HELO":
                        w(b"250 catcher.soak.test\r\n")
                    elif verb == b"DATA":
                        w(b"354 go ahead\r\n")
                        data, size = [], 0
                        for _ in range(1_000_000):  # lines, bounded
                            l = self.rfile.readline(1 << 16)
                            if not l or l == b".\r\n":
                                break
                            size += len(l)
                            if size < (1 << 20):
                                data.append(l)
                        catcher.take(b"".join(data))
                        w(b"250 2.0.0 caught\r\n")
                    elif verb == b"QUIT":
                        w(b"221 bye\r\n")
                        return
                    else:
                        w(b"250 ok\r\n")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass  # a client (the node) that went away: nothing to report

        self.server = Server((HOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, data):
        text = data.decode("utf-8", "replace")
        rcpts = re.findall(r"^Final-Recipient:\s*rfc822;\s*(\S+?)\s*$", text, re.M | re.I)
        statuses = re.findall(r"^Status:\s*(\d\.\d{1,3}\.\d{1,3})\s*$", text, re.M)
        with self.lock:
            self.messages += 1
            for rcpt, status in zip(rcpts, statuses):
                key = (rcpt.split("@")[0].lower(), status)
                self.counts[key] = self.counts.get(key, 0) + 1

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ==========================================================================
# The node


class Serve:
    """One `mailnode serve` at a time: start (port 0 the first time, the same
    port after), SIGKILL, SIGTERM; each start logs to serve-N-LABEL.log."""

    def __init__(self, binary, workdir, conf, metrics_port):
        self.binary = binary
        self.workdir = workdir
        self.conf = conf
        self.metrics_port = metrics_port
        self.proc = None
        self.starts = 0
        self.logs = []  # (label, path, pid)
        self.port = 0
        self.ready = threading.Event()  # set once the running serve has said it listens

    def start(self, label, port=0, timeout=60):
        if self.proc is not None:
            raise SoakError("serve already running")
        self.starts += 1
        path = os.path.join(self.workdir, f"serve-{self.starts}-{label}.log")
        errf = open(path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [self.binary, "serve", "-c", self.conf, "--listen", f"{HOST}:{port}",
             "--metrics", f"{HOST}:{self.metrics_port}"],
            stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
        errf.close()
        self.logs.append((label, path, self.proc.pid))
        # The address is in the log line `listening for SMTP addr=IP:PORT`
        # (as tests/cli.rs reads it); serve logs at info for that reason.
        deadline = t0 + timeout
        while True:
            with open(path, "rb") as f:
                for line in f:
                    if b"listening for SMTP" in line:
                        m = re.search(rb"addr=(\S+):(\d+)", line)
                        if m:
                            self.port = int(m.group(2))
                            self.ready.set()
                            return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise SoakError(f"serve exited with status {self.proc.returncode} at start: {tail(path)}")
            if time.monotonic() > deadline:
                raise SoakError(f"serve did not say it listens within {timeout} s: {tail(path)}")
            time.sleep(0.02)

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def kill9(self):
        self.ready.clear()
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self, timeout=90):
        """SIGTERM; returns (exit status, seconds it took)."""
        if self.proc is None:
            return None, 0.0
        self.ready.clear()
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"serve did not stop within {timeout} s of SIGTERM: SIGKILL")
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc, time.monotonic() - t0

    def ctl(self, *words, timeout=30):
        """`mailnode ctl --json WORDS...`: (exit status, parsed JSON or None, stderr)."""
        try:
            r = subprocess.run([self.binary, "ctl", "-c", self.conf, "--json", *words],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, None, "timed out"
        data = None
        if r.returncode == 0:
            try:
                data = json.loads(r.stdout)
            except ValueError:
                pass
        return r.returncode, data, r.stderr.strip()

    def metrics(self):
        """The Prometheus series as {"name{labels}": value}; {} if no answer."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(l.rstrip() for l in f.readlines()[-n:])
    except OSError:
        return "(no log)"


# --- the programs a killed serve leaves behind -------------------------------

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Programs of a SIGKILLed serve are reparented to us, not to init, so
    that we can end them as systemd's control-group kill would (and the hang
    program's `sleep 3600` does not outlive the soak)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log("warning: cannot become a child subreaper; orphaned programs will be left to init")


def orphans(uid):
    """Our children that run as the delivery user: programs whose serve died
    (ours run as root), and (pid, state) of each."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            st = os.stat(f"/proc/{name}")
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[1]) == me and st.st_uid == uid:
            out.append((int(name), fields[0].decode()))
    return out


def end_orphans(uid, kill):
    """Reaps the zombies among them; with kill, SIGKILLs the live ones and
    their process groups first. Returns how many were killed."""
    killed = 0
    for _ in range(5):  # a killed shell's children are reparented in turn
        found = orphans(uid)
        if not found:
            break
        for pid, state in found:
            if state != "Z" and kill:
                for target in (lambda: os.killpg(os.getpgid(pid), signal.SIGKILL),
                               lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        target()
                    except OSError:
                        pass
                killed += 1
            if state == "Z" or kill:
                try:
                    os.waitpid(pid, 0 if kill else os.WNOHANG)
                except ChildProcessError:
                    pass
        if not kill:
            break
        time.sleep(0.05)
    return killed


# ==========================================================================
# The soak


def read_proc(pid):
    """RSS, PSS (KiB), open fds, threads and CPU ticks of one process."""
    out = {"rss_kib": status_kib(pid, "VmRSS"), "pss_kib": pss_kib(pid),
           "threads": status_kib(pid, "Threads"), "fds": None, "cpu_ticks": None}
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        out["cpu_ticks"] = int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        pass
    return out


def cpu_ticks():
    """(steal, idle + iowait, user + nice + system, total) jiffies of all
    CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[7], fields[3] + fields[4], sum(fields[:3]), sum(fields[:8])


def tree_ticks(root):
    """CPU ticks (user + system) used by root and every live descendant,
    with what each has reaped (cutime, cstime): a process that ends moves
    its time into its parent's, so the sum only grows. For the soak: this
    script, its clients, serve and the programs."""
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        stats[int(name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))
    children = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return total


def anatomy(pid):
    """What a process's threads and descriptors are, by kind: thread names
    ("tokio-runtime-w": 2, ...) and fd targets ("socket": 40, "pipe": 6,
    files by directory): to say what grew."""
    threads, fds = {}, {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            threads[name] = threads.get(name, 0) + 1
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kind = target.split(":")[0] if ":" in target and not target.startswith("/") else os.path.dirname(target)
            fds[kind] = fds.get(kind, 0) + 1
    except OSError:
        pass
    return {"threads": threads, "fds": fds}


def fmt_anatomy(d):
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


class Records:
    """Reads the senders' record files as they grow: per 10-s bin the
    latencies of the 4 KB messages, counts of 250s and of failures, and
    which sink messages got a 250 (a bitmap per sender tag)."""

    def __init__(self, paths, mix, t0):
        self.paths = paths  # tag -> path
        self.offsets = {tag: 0 for tag in paths}
        self.rest = {tag: b"" for tag in paths}
        self.mix = mix
        self.t0 = t0
        self.bins = {}  # bin -> {"lat": array, "ok": n, "bad": n}
        self.acked = {tag: bytearray() for tag in paths}
        self.acked_n = 0
        self.by_kind = [{} for _ in mix]  # per kind: code -> n
        self.first_250_after = {}  # t -> first 250's t after it (for the restart)

    def bin(self, t):
        k = int((t - self.t0) // SAMPLE_S)
        b = self.bins.get(k)
        if b is None:
            b = self.bins[k] = {"lat": array.array("I"), "ok": 0, "bad": 0}
        return b

    def update(self):
        for tag, path in self.paths.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[tag])
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            self.offsets[tag] += len(data)
            data = self.rest[tag] + data
            lines = data.split(b"\n")
            self.rest[tag] = lines.pop()
            acked = self.acked[tag]
            for line in lines:
                t, lat, code, kind, seq = line.split()
                t, lat, code, kind, seq = float(t), int(lat), int(code), int(kind), int(seq)
                counts = self.by_kind[kind]
                counts[code] = counts.get(code, 0) + 1
                b = self.bin(t)
                if code == 250:
                    b["ok"] += 1
                    if self.mix[kind][2] == 4 * KB:
                        b["lat"].append(lat)
                    if kind == 0:
                        if seq >= len(acked):
                            acked.extend(bytes(seq + 1024 - len(acked)))
                        acked[seq] = 1
                        self.acked_n += 1
                else:
                    b["bad"] += 1

    def times_of(self, wanted):
        """{(tag, seq): time of its record} for a few messages."""
        out = {}
        by_tag = {}
        for tag, seq in wanted:
            by_tag.setdefault(tag, set()).add(str(seq).encode())
        for tag, seqs in by_tag.items():
            with open(self.paths[tag], "rb") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 5 and parts[4] in seqs:
                        out[(tag, int(parts[4]))] = float(parts[0])
        return out

    def first_250(self, after_t):
        """The time of the first 250 at or after after_t, or None."""
        best = None
        for path in self.paths.values():
            with open(path, "rb") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 5 and parts[2] == b"250":
                        t = float(parts[0])
                        if t >= after_t and (best is None or t < best):
                            best = t
                            break
        return best


class SinkLog:
    """The sink's log of Message-Ids, read as it grows: how often each
    <TAG.SEQ@soak.test> was delivered."""

    PATTERN = re.compile(rb"<([a-z]\d+)\.(\d+)@soak\.test>")

    def __init__(self, path, tags):
        self.path = path
        self.offset = 0
        self.rest = b""
        self.seen = {tag: bytearray() for tag in tags}
        self.lines = 0
        self.foreign = 0

    def update(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        data = self.rest + data
        lines = data.split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            self.lines += 1
            m = self.PATTERN.search(line)
            if not m or m.group(1).decode() not in self.seen:
                self.foreign += 1
                continue
            seen, seq = self.seen[m.group(1).decode()], int(m.group(2))
            if seq >= len(seen):
                seen.extend(bytes(seq + 1024 - len(seen)))
            seen[seq] = min(255, seen[seq] + 1)

    def compare(self, acked):
        """(acknowledged but not delivered, extra deliveries, delivered
        without a 250 (lost replies around the kill), and the (tag, seq) of
        the messages delivered more than once, at most 1,000)."""
        missing = dup = unacked = 0
        dups = []
        for tag, a in acked.items():
            s = self.seen[tag]
            for seq in range(max(len(a), len(s))):
                got = s[seq] if seq < len(s) else 0
                ack = a[seq] if seq < len(a) else 0
                if ack and not got:
                    missing += 1
                if got > 1:
                    dup += got - 1
                    if len(dups) < 1000:
                        dups.append((tag, seq))
                if got and not ack:
                    unacked += 1
        return missing, dup, unacked, dups


class Soak:
    def __init__(self, args):
        self.args = args
        self.workdir = args.workdir
        self.minutes = args.minutes
        self.soak_s = args.minutes * 60.0
        # The "first 5 minutes" of a 30-minute soak, scaled for shorter ones;
        # and the window a figure is taken over for the verdict: a minute, or
        # 1/30 of the soak (at least two samples) when it is shorter.
        self.warmup_s = self.soak_s / 6.0
        self.window_s = min(60.0, max(2 * SAMPLE_S, self.soak_s / 30.0))
        self.kill_at = self.soak_s / 2.0
        # Temporary failures are returned after max_age; the queue reaches
        # its steady size once the first of them expire, before the warm-up
        # ends: 3 minutes in a 30-minute soak, 20 s at least.
        self.max_age_s = int(min(180, max(20, 0.6 * self.warmup_s)))
        self.out = os.path.join(self.workdir, "out")
        self.spool = os.path.join(self.workdir, "spool")
        self.conf = os.path.join(self.workdir, "mailnode.toml")
        self.aliases = os.path.join(self.workdir, "aliases")
        self.fail = os.path.join(self.workdir, "fail")
        self.nobody = pwd.getpwnam("nobody")
        self.sink_log_path = os.path.join(self.out, "delivered.log")
        self.senders = []
        self.hostile = None
        self.catcher = None
        self.serve = None
        self.samples = []
        self.notes = []
        self.stop_threads = threading.Event()
        self.ctl_stats = {"queue": [], "reload": [], "lookup": []}  # (t, rc, seconds)
        self.reload_gen = 0
        self.lock = threading.Lock()
        self.restart = {}
        self.t0 = None
        self.calibration = {}
        self.final = {}
        self.listing_words = None
        self.anatomy_before_kill = None
        self.n_senders = max(1, int(os.environ.get("SOAK_SENDERS", "2")))
        self.sessions = max(self.n_senders, int(os.environ.get("SOAK_SESSIONS", "20")))
        self.per_conn = max(1, int(os.environ.get("SOAK_PER_CONN", "5")))
        self.calib_s = env_float("SOAK_CALIBRATION_SECONDS", 20.0)

    # -- files -------------------------------------------------------------

    def prepare(self):
        for name in os.listdir(self.workdir):
            if name.startswith(("serve-", "sender-", "calib-")) or name in (
                    "hostile.json", "samples.csv", "minutes.csv", "soak.png", "soak.gp", "soak.md"):
                os.remove(os.path.join(self.workdir, name))
        shutil.rmtree(self.spool, ignore_errors=True)
        shutil.rmtree(self.out, ignore_errors=True)
        os.makedirs(self.out)
        os.chown(self.out, self.nobody.pw_uid, self.nobody.pw_gid)
        os.chmod(self.out, 0o755)
        with open(self.fail, "w") as f:
            f.write(FAIL_SCRIPT)
        os.chmod(self.fail, 0o755)
        self.sink_log = DeliveryLog(self.sink_log_path)  # created writable by nobody

    def alias_lines(self):
        sink, out = self.args.sink, self.out
        lines = [f"# mailnode soak aliases, generation {self.reload_gen}; written by ops/bench/soak.py",
                 f"sink: |{sink} {out}/delivered.log",
                 f"hostile: |{sink} {out}/hostile.log",
                 f"smuggled: |{sink} {out}/smuggled.log"]
        for alias, _, _ in FAILING:
            lines.append(f"{alias}: |{self.fail} {alias[5:]} {out}")
        # A different alias in each generation: a reload that took effect
        # is seen in `ctl aliases lookup`.
        lines.append(f"gen-{self.reload_gen}: |/bin/true")
        return lines

    def write_aliases(self):
        tmp = self.aliases + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(self.alias_lines()) + "\n")
        os.replace(tmp, self.aliases)  # a reload never sees half a file
        return len(self.alias_lines()) - 1

    def write_config(self):
        with open(self.conf, "w") as f:
            f.write(f"""# mailnode soak configuration; written by ops/bench/soak.py
hostname = "mailnode.soak.test"

[smtp]
listen = ["{HOST}:0"]
# serve wants 5 descriptors per connection + 256 within its open-file limit.
max_connections = 2000
max_connections_per_ip = 1000
local_domains = []
# Short, so that the slowloris clients meet them many times in a soak.
command_timeout = "20s"
data_timeout = "20s"
connect_limit = "2m"

[aliases]
path = "{self.aliases}"

[spool]
path = "{self.spool}"

[delivery]
# Short, so that the hanging program is killed many times.
timeout = "5s"

[queue]
# Temporary failures are retried quickly and returned after max_age, so the
# queue reaches a steady size early in the soak.
retry_min = "5s"
retry_max = "30s"
max_age = "{self.max_age_s}s"

[relay]
# This script's catcher: bounces are sent there.
host = "{HOST}:{self.catcher.port}"

[limits]
# The senders all come from 127.0.0.1.
connection_rate_per_ip = "1000000/s"
message_rate_per_ip = "1000000/s"

[control]
socket = "{os.path.join(self.workdir, 'run', 'mailnode.sock')}"

[metrics]
listen = "off"   # given on the command line (--metrics)

[log]
# info: the "listening for SMTP addr=" line gives the port, and every
# session and delivery is logged, as operators run it.
level = "info"
""")
        r = subprocess.run([self.args.mailnode, "check", "-c", self.conf], capture_output=True, text=True)
        if r.returncode != 0:
            raise SoakError(f"mailnode check -c {self.conf} failed ({r.returncode}):\n{r.stderr}")

    def mix(self, rate):
        """[[alias, weight, size]]: the sink gets what the failing ones do not."""
        out = [["sink", 0.0, 4 * KB]]
        for alias, share, size in FAILING:
            if share is None:  # the hang program: one message every HANG_EVERY_S
                share = 1.0 / (HANG_EVERY_S * rate)
            out.append([alias, share, size])
        out[0][1] = 1.0 - sum(w for _, w, _ in out[1:])
        return out

    # -- processes ------------------------------------------------------------

    def start_senders(self, tag, rate, sessions, seconds, mix):
        procs = []
        per = sessions // self.n_senders
        for i in range(self.n_senders):
            out = os.path.join(self.workdir, f"{tag}-{i}.rec")
            cmd = [sys.executable, os.path.abspath(__file__), "sender", "--port", str(self.serve.port),
                   "--rate", f"{rate / self.n_senders:.3f}", "--sessions", str(per + (i < sessions % self.n_senders)),
                   "--per-conn", str(self.per_conn), "--seconds", f"{seconds:.1f}", "--out", out,
                   "--tag", f"{tag[0]}{i}", "--mix", json.dumps(mix), "--seed", str(1000 + i)]
            procs.append((f"{tag[0]}{i}", out, subprocess.Popen(cmd, stdin=subprocess.DEVNULL)))
        return procs

    @staticmethod
    def wait_procs(procs, timeout):
        deadline = time.monotonic() + timeout
        for _, _, p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # -- calibration ---------------------------------------------------------

    def calibrate(self):
        """The peak: unpaced senders, 4 KB messages to the sink only, against
        a node of its own, stopped (SIGTERM) and wiped afterwards, so that
        the soak's first process starts from nothing."""
        log(f"calibration: {self.sessions} sessions, 4 KB, {self.per_conn} per connection, {self.calib_s:.0f} s, unpaced")
        self.serve.start("calibration")
        procs = self.start_senders("calib", 0.0, self.sessions, self.calib_s, [["sink", 1.0, 4 * KB]])
        self.wait_procs(procs, self.calib_s + 30)
        ok, lats, bad = 0, [], 0
        for _, path, _ in procs:
            with open(path) as f:
                for line in f:
                    _, lat, code, _, _ = line.split()
                    if code == "250":
                        ok += 1
                        lats.append(int(lat))
                    else:
                        bad += 1
        if not ok:
            raise SoakError("calibration: no message got a 250")
        lats.sort()
        rate = ok / self.calib_s
        # Wait for the deliveries, so that the peak was a sustainable one.
        deadline = time.monotonic() + 120
        while self.sink_log.count() < ok and time.monotonic() < deadline:
            time.sleep(0.1)
        delivered = self.sink_log.count()
        rc, took = self.serve.stop()
        self.calibration = {"rate": rate, "ok": ok, "bad": bad, "p50_ms": percentile(lats, 50) / 1000,
                            "p99_ms": percentile(lats, 99) / 1000, "delivered": delivered,
                            "stop_rc": rc, "stop_s": took}
        log(f"calibration: {rate:.0f} msg/s ({ok} in {self.calib_s:.0f} s, {bad} without 250), "
            f"250 p50 {self.calibration['p50_ms']:.1f} ms p99 {self.calibration['p99_ms']:.1f} ms; "
            f"{delivered} delivered; serve stopped with {rc} in {took:.1f} s")
        if rc != 0:
            self.notes.append(f"The calibration node exited with status {rc} on SIGTERM.")
        shutil.rmtree(self.spool, ignore_errors=True)
        self.sink_log.reset()

    # -- background duties: ctl queue every second, a reload every 10 s -------

    def queue_lister(self):
        n = 0
        while not self.stop_threads.wait(1.0) and n < 1_000_000:
            n += 1
            t = time.monotonic()
            rc, _, _ = self.serve.ctl(*self.listing_words)
            self.ctl_stats["queue"].append((t - self.t0, rc, time.monotonic() - t))

    def reloader(self):
        n = 0
        while not self.stop_threads.wait(10.0) and n < 100_000:
            n += 1
            with self.lock:
                self.reload_gen += 1
                gen = self.reload_gen
                expected = self.write_aliases()
                pid = self.serve.pid if self.serve.ready.is_set() else None
            t = time.monotonic()
            if gen % 2:  # ctl and SIGHUP in turn
                rc, data, err = self.serve.ctl("aliases", "reload")
                if rc == 0 and (data or {}).get("aliases") != expected:
                    rc = -2  # answered, but not with the table just written
            else:
                if pid is None:  # serve is restarting: a SIGHUP now could hit it before its handler
                    self.ctl_stats["reload"].append((t - self.t0, "skipped", 0.0))
                    continue
                os.kill(pid, signal.SIGHUP)
                rc = "hup"
                time.sleep(0.2)  # SIGHUP is not answered: give it a moment before the lookup
            self.ctl_stats["reload"].append((t - self.t0, rc, time.monotonic() - t))
            lrc, data, _ = self.serve.ctl("aliases", "lookup", f"gen-{gen}@{DOMAIN}")
            accepted = lrc == 0 and bool((data or {}).get("accepted"))
            self.ctl_stats["lookup"].append((t - self.t0, "ok" if accepted else lrc, 0.0))

    # -- sampling --------------------------------------------------------------

    def sample(self):
        t = time.monotonic() - self.t0
        pid = self.serve.pid
        s = {"t": t, "pid": pid or 0}
        if pid:
            s.update(read_proc(pid))
        rc, data, _ = self.serve.ctl("status", timeout=10)
        if rc == 0 and data:
            q = data.get("queue", {})
            s.update({"q_active": q.get("active"), "q_deferred": q.get("deferred"), "q_held": q.get("held"),
                      "sessions": data.get("sessions"),
                      "actor_restarts": sum((data.get("actor_restarts") or {}).values())})
        m = self.serve.metrics()
        for key, name in (('mailnode_deliveries_total{outcome="delivered"}', "m_delivered"),
                          ('mailnode_deliveries_total{outcome="deferred"}', "m_deferred"),
                          ('mailnode_deliveries_total{outcome="bounced"}', "m_bounced"),
                          ('mailnode_smtp_messages_total{outcome="accepted"}', "m_accepted"),
                          ("process_open_fds", "m_open_fds")):
            if key in m:
                s[name] = m[key]
        s["steal"], s["idle_ticks"], s["busy_ticks"], s["total_ticks"] = cpu_ticks()
        s["soak_ticks"] = tree_ticks(os.getpid())
        self.samples.append(s)
        end_orphans(self.nobody.pw_uid, kill=False)  # reap zombies of programs reparented to us
        return s

    def progress(self, s):
        self.records.update()
        b = self.records.bins.get(int(s["t"] // SAMPLE_S) - 1, {"lat": [], "ok": 0, "bad": 0})
        lat = sorted(b["lat"])
        p99 = percentile(lat, 99)
        log(f"t={s['t']:5.0f}s pid={s.get('pid')} rss={s.get('rss_kib', 0) / 1024:.1f}MiB "
            f"pss={s.get('pss_kib', 0) / 1024:.1f}MiB fds={s.get('fds')} thr={s.get('threads')} "
            f"queue={(s.get('q_active') or 0) + (s.get('q_deferred') or 0) + (s.get('q_held') or 0)} "
            f"250/s={b['ok'] / SAMPLE_S:.0f} no250={b['bad']} p99={'-' if p99 is None else f'{p99 / 1000:.1f}ms'}")

    # -- the kill and the restart -----------------------------------------------

    def kill_and_restart(self):
        self.anatomy_before_kill = anatomy(self.serve.pid)
        t_kill = time.monotonic()
        old = self.serve.pid
        log(f"t={t_kill - self.t0:.0f}s: SIGKILL serve (pid {old}) and restart on the same spool and port")
        with self.lock:  # no SIGHUP to a serve being started
            self.serve.kill9()
            # What it was running: shells and sinks reparented to us (as
            # systemd's control-group kill would end them with it).
            killed = end_orphans(self.nobody.pw_uid, kill=True)
            t_start = time.monotonic()
            up = self.serve.start("after-kill", port=self.serve.port)
        queued = None
        with open(self.serve.logs[-1][1], "rb") as f:
            m = re.search(rb"picked up the queue an earlier run left queued=(\d+)", f.read())
            if m:
                queued = int(m.group(1))
        self.restart = {"t_kill": t_kill - self.t0, "old_pid": old, "new_pid": self.serve.pid, "queued": queued,
                        "programs_killed": killed, "start_to_listen_s": up,
                        "kill_to_listen_s": time.monotonic() - t_kill, "t_start": t_start - self.t0}
        log(f"serve back (pid {self.serve.pid}) {self.restart['kill_to_listen_s']:.2f} s after the kill "
            f"({killed} orphaned programs killed)")

    # -- the run -------------------------------------------------------------------

    def run(self):
        self.prepare()
        become_subreaper()
        self.catcher = Catcher()
        self.write_aliases()
        self.write_config()
        self.serve = Serve(self.args.mailnode, self.workdir, self.conf, free_port())
        self.calibrate()

        peak = self.calibration["rate"]
        rate = peak / 2.0
        self.rate = rate
        mix = self.mix(rate)
        self.mix_used = mix
        log(f"soak: {self.minutes:g} min at {rate:.0f} msg/s (half of {peak:.0f}); kill at {self.kill_at:.0f} s; "
            f"warm-up {self.warmup_s:.0f} s; max_age {self.max_age_s} s")
        self.serve.start("soak")
        self.first_pid = self.serve.pid

        # `ctl queue --limit N` as docs/control.md says, if this binary's
        # ctl knows it (after `--`: its argument parser takes --limit for an
        # option of ctl's own otherwise); the whole listing if not.
        rc, _, err = self.serve.ctl("--", "queue", "--limit", "200")
        if rc == 0:
            self.listing_words = ["--", "queue", "--limit", "200"]
        else:
            self.listing_words = ["queue"]
            self.notes.append(f"This binary's `ctl` has no `queue --limit` (`ctl -- queue --limit 200` exited {rc}: "
                              f"{err[:160]!r}); the soak lists the whole queue every second.")
        rc, _, err = self.serve.ctl("queue", "--limit", "200")
        if rc != 0 and self.listing_words[0] == "--":
            self.notes.append(f"`mailnode ctl queue --limit 200`, as docs/control.md writes it, exits {rc}: "
                              f"{err.splitlines()[0][:160] if err else ''!r}.")

        hostile_out = os.path.join(self.workdir, "hostile.json")
        self.t0 = time.monotonic()
        self.senders = self.start_senders("sender", rate, self.sessions, self.soak_s, mix)
        self.records = Records({tag: path for tag, path, _ in self.senders}, mix, self.t0)
        self.sink = SinkLog(self.sink_log_path, [tag for tag, _, _ in self.senders])
        hcmd = [sys.executable, os.path.abspath(__file__), "hostile", "--port", str(self.serve.port),
                "--seconds", f"{self.soak_s:.1f}", "--out", hostile_out]
        for env, flag in (("SOAK_SLOWLORIS", "--slowloris"), ("SOAK_FLOODERS", "--flooders"),
                          ("SOAK_SMUGGLERS", "--smugglers"), ("SOAK_CONNECT_RATE", "--connect-rate")):
            if os.environ.get(env, "").strip():
                hcmd += [flag, os.environ[env].strip()]
        self.hostile = subprocess.Popen(hcmd, stdin=subprocess.DEVNULL)
        threads = [threading.Thread(target=self.queue_lister, daemon=True),
                   threading.Thread(target=self.reloader, daemon=True)]
        for th in threads:
            th.start()

        killed = False
        next_sample = self.t0
        end = self.t0 + self.soak_s
        steps = 0
        while steps < 1_000_000:
            steps += 1
            now = time.monotonic()
            if not killed and now >= self.t0 + self.kill_at:
                killed = True
                self.kill_and_restart()
                continue
            if now >= next_sample:
                self.progress(self.sample())
                next_sample += SAMPLE_S
                if next_sample > end + 0.5:
                    break
                continue
            if self.serve.proc.poll() is not None:
                raise SoakError(f"serve (pid {self.serve.pid}) exited with status {self.serve.proc.returncode} "
                                f"during the soak: {tail(self.serve.logs[-1][1])}")
            wake = next_sample if killed else min(next_sample, self.t0 + self.kill_at)
            time.sleep(max(0.0, min(0.2, wake - now)))

        log("soak time is up: stopping the load")
        self.stop_threads.set()
        self.hostile.terminate()
        self.wait_procs(self.senders, 30)
        try:
            self.hostile.wait(30)
        except subprocess.TimeoutExpired:
            self.hostile.kill()
            self.hostile.wait()
        for th in threads:
            th.join(40)
        self.finish()

    def finish(self):
        """Every acknowledged sink message delivered? Then the last queue
        listing, the node stopped with SIGTERM, and what it logged."""
        self.records.update()
        if self.restart:
            t = self.records.first_250(self.t0 + self.restart["t_kill"])
            self.restart["first_250_after_s"] = None if t is None else t - self.t0 - self.restart["t_kill"]
        t_end = time.monotonic()
        deadline = t_end + 180
        while True:
            self.sink.update()
            missing, dup, unacked, dups = self.sink.compare(self.records.acked)
            if missing == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.final["drain_s"] = time.monotonic() - t_end
        self.final["missing"], self.final["dup"], self.final["unacked"] = missing, dup, unacked
        # At least once allows a repeat only for what was delivered just
        # before the SIGKILL: the others are counted apart.
        times = self.records.times_of(dups)
        kill = self.t0 + self.restart["t_kill"] if self.restart else None
        self.final["dup_near_kill"] = sum(1 for t in times.values() if kill is not None and abs(t - kill) <= 2.0)
        self.final["dup_examples"] = [f"<{tag}.{seq}@{DOMAIN}> (250 at {times.get((tag, seq), 0) - self.t0:.1f} s)"
                                      for tag, seq in dups[:5]]
        self.final["acked"] = self.records.acked_n
        self.final["sink_lines"] = self.sink.lines
        log(f"acknowledged to the sink: {self.records.acked_n}; not delivered {missing}; "
            f"duplicates {dup}; delivered without a 250 {unacked} (after {self.final['drain_s']:.1f} s)")
        rc, data, err = self.serve.ctl("queue", timeout=120)
        left = {}
        if rc == 0 and isinstance(data, list):
            for entry in data:
                for r in entry.get("recipients", []):
                    if r.get("state") in ("pending", "failed"):
                        alias = r.get("address", "").split("@")[0]
                        left[alias] = left.get(alias, 0) + 1
        self.final["left"] = left
        self.final["status"] = self.serve.ctl("status")[1] or {}
        self.final["hwm_kib"] = status_kib(self.serve.pid, "VmHWM")
        self.final["anatomy"] = anatomy(self.serve.pid)
        rc, took = self.serve.stop()
        self.final["stop_rc"], self.final["stop_s"] = rc, took
        log(f"serve stopped (SIGTERM): status {rc} in {took:.1f} s")
        end_orphans(self.nobody.pw_uid, kill=True)
        self.catcher.stop()

    def cleanup(self):
        self.stop_threads.set()
        for _, _, p in self.senders:
            if p.poll() is None:
                p.terminate()
        if self.hostile is not None and self.hostile.poll() is None:
            self.hostile.terminate()
        for _, _, p in self.senders + ([("", "", self.hostile)] if self.hostile else []):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.serve is not None and self.serve.proc is not None:
            rc, _ = self.serve.stop(timeout=60)
            log(f"cleanup: serve stopped with status {rc}")
        end_orphans(self.nobody.pw_uid, kill=True)


# ==========================================================================
# Report


def fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def window_values(samples, key, lo, hi, pid=None):
    """The samples of `key` taken in [lo, hi) (of one process)."""
    return [s[key] for s in samples if lo <= s["t"] < hi and s.get(key) is not None
            and (pid is None or s["pid"] == pid)]


def window_median(samples, key, lo, hi, pid=None):
    vals = window_values(samples, key, lo, hi, pid)
    return statistics.median(vals) if vals else None


class Report:
    def __init__(self, soak, machine, error):
        self.s = soak
        self.machine = machine
        self.error = error
        self.minutes = []
        self.bins = []

    # -- per 10 s and per minute --------------------------------------------

    def build(self):
        s = self.s
        recs = s.records
        n_min = int(math.ceil(s.soak_s / 60.0 - 1e-9))
        samples = s.samples
        rt = s.restart.get("t_kill")
        for m in range(1, n_min + 1):
            lo, hi = (m - 1) * 60.0, m * 60.0
            sm = [x for x in samples if lo <= x["t"] < hi]
            lat = array.array("I")
            ok = bad = 0
            for k in range(int(lo // SAMPLE_S), int(hi // SAMPLE_S)):
                b = recs.bins.get(k)
                if b:
                    lat.extend(b["lat"])
                    ok += b["ok"]
                    bad += b["bad"]
            lat = sorted(lat)
            pids = []
            for x in sm:
                if x["pid"] and x["pid"] not in pids:
                    pids.append(x["pid"])
            row = {
                "minute": m, "pids": pids, "n_samples": len(sm),
                "rss_mib": self.med(sm, "rss_kib", 1 / 1024), "pss_mib": self.med(sm, "pss_kib", 1 / 1024),
                "fds": self.med(sm, "fds"), "threads": self.med(sm, "threads"),
                "queue": self.med_queue(sm), "ok": ok, "bad": bad, "rate": ok / 60.0,
                "p50_ms": None if not lat else percentile(lat, 50) / 1000,
                "p99_ms": None if not lat else percentile(lat, 99) / 1000,
                "max_ms": None if not lat else lat[-1] / 1000,
                "cpu_pct": self.cpu_pct(sm),
                "machine_pct": self.machine_pct(lo, hi)[0],
                "other_pct": self.machine_pct(lo, hi)[1],
                "restart": rt is not None and lo <= rt < hi,
                "warmup": hi <= s.warmup_s + 1e-9,
            }
            row.update(self.deliveries(m))
            self.minutes.append(row)
        for k in sorted(recs.bins):
            b = recs.bins[k]
            lat = sorted(b["lat"])
            self.bins.append({"t": (k + 1) * SAMPLE_S, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                              "ok": b["ok"], "bad": b["bad"]})

    @staticmethod
    def med(sm, key, scale=1.0):
        vals = [x[key] for x in sm if x.get(key) is not None]
        return statistics.median(vals) * scale if vals else None

    @staticmethod
    def med_queue(sm):
        vals = [(x.get("q_active") or 0) + (x.get("q_deferred") or 0) + (x.get("q_held") or 0)
                for x in sm if x.get("q_active") is not None]
        return statistics.median(vals) if vals else None

    def cpu_pct(self, sm):
        """serve's CPU over the minute (both processes' shares at the restart)."""
        total, span = 0, 0.0
        prev = None
        for x in self.s.samples:
            if prev is not None and x in sm and x.get("cpu_ticks") is not None and prev.get("cpu_ticks") is not None \
                    and x["pid"] == prev["pid"]:
                total += x["cpu_ticks"] - prev["cpu_ticks"]
                span += x["t"] - prev["t"]
            prev = x
        return 100.0 * total / CLK_TCK / span if span else None

    def machine_pct(self, lo, hi):
        """Over [lo, hi), as % of all CPUs: (busy, used by processes outside
        the soak: other work on the machine, which the latency pays for)."""
        sm = [x for x in self.s.samples if lo <= x["t"] <= hi + 1e-6 and "idle_ticks" in x]
        if len(sm) < 2:
            return None, None
        a, b = sm[0], sm[-1]
        total = b["total_ticks"] - a["total_ticks"]
        if not total:
            return None, None
        busy = 100.0 * (total - (b["idle_ticks"] - a["idle_ticks"])) / total
        other = 100.0 * ((b["busy_ticks"] - a["busy_ticks"]) - (b["soak_ticks"] - a["soak_ticks"])) / total
        return busy, max(0.0, other)

    def deliveries(self, m):
        """Counter deltas over the minute (a counter that went down was
        reset by the restart: its new value is the delta)."""
        out = {}
        lo, hi = (m - 1) * 60.0, m * 60.0
        for key in ("m_delivered", "m_deferred", "m_bounced"):
            d = 0
            prev = None
            for x in self.s.samples:
                v = x.get(key)
                if v is None:
                    continue
                if prev is not None and lo < x["t"] <= hi + 1e-6:
                    d += v - prev if v >= prev else v
                prev = v
            out[key] = int(d)
        return out

    # -- files ------------------------------------------------------------------

    def write_csv(self):
        wd = self.s.workdir
        cols = ["t", "pid", "rss_kib", "pss_kib", "fds", "threads", "cpu_ticks", "idle_ticks", "busy_ticks",
                "soak_ticks", "total_ticks",
                "q_active", "q_deferred", "q_held",
                "sessions", "actor_restarts", "m_accepted", "m_delivered", "m_deferred", "m_bounced", "m_open_fds"]
        lat = {b["t"]: b for b in self.bins}
        with open(os.path.join(wd, "samples.csv"), "w") as f:
            f.write(",".join(["t_s", "minute"] + cols[1:] + ["ok_250_10s", "no_250_10s", "p50_ms_10s", "p99_ms_10s"]) + "\n")
            for x in self.s.samples:
                b = lat.get(int(round(x["t"] / SAMPLE_S)) * SAMPLE_S, {})
                row = [f"{x['t']:.1f}", str(int(x["t"] // 60) + 1)]
                row += ["" if x.get(c) is None else str(x.get(c)) for c in cols[1:]]
                row += [str(b.get("ok", "")), str(b.get("bad", "")),
                        fmt(None if b.get("p50_ms") is None else b["p50_ms"] / 1000, ".3f", ""),
                        fmt(None if b.get("p99_ms") is None else b["p99_ms"] / 1000, ".3f", "")]
                f.write(",".join(row) + "\n")
        with open(os.path.join(wd, "minutes.csv"), "w") as f:
            f.write("minute,pids,rss_mib,pss_mib,fds,threads,queue,cpu_pct,machine_pct,other_pct,ok_250,no_250,rate_250,p50_ms,p99_ms,max_ms,"
                    "delivered,deferred,bounced,restart\n")
            for r in self.minutes:
                f.write(",".join([str(r["minute"]), "/".join(map(str, r["pids"])), fmt(r["rss_mib"], ".2f", ""),
                                  fmt(r["pss_mib"], ".2f", ""), fmt(r["fds"], ".0f", ""), fmt(r["threads"], ".0f", ""),
                                  fmt(r["queue"], ".0f", ""), fmt(r["cpu_pct"], ".1f", ""),
                                  fmt(r["machine_pct"], ".1f", ""), fmt(r["other_pct"], ".1f", ""), str(r["ok"]), str(r["bad"]),
                                  f"{r['rate']:.1f}", fmt(r["p50_ms"], ".3f", ""), fmt(r["p99_ms"], ".3f", ""),
                                  fmt(r["max_ms"], ".3f", ""), str(r["m_delivered"]), str(r["m_deferred"]),
                                  str(r["m_bounced"]), "1" if r["restart"] else "0"]) + "\n")

    def plot(self):
        """soak.png with gnuplot: memory, fds and threads, queue, latency;
        dashed lines at the end of the warm-up and at the restart."""
        wd = self.s.workdir
        gp = os.path.join(wd, "soak.gp")
        png = os.path.join(wd, "soak.png")
        header = open(os.path.join(wd, "samples.csv")).readline().strip().split(",")
        c = {name: i + 1 for i, name in enumerate(header)}
        marks = [f"set arrow from {self.s.warmup_s / 60:.3f}, graph 0 to {self.s.warmup_s / 60:.3f}, graph 1 "
                 f"nohead dt 3 lc rgb 'gray50'"]
        if self.s.restart:
            k = self.s.restart["t_kill"] / 60
            marks.append(f"set arrow from {k:.3f}, graph 0 to {k:.3f}, graph 1 nohead dt 2 lw 2 lc rgb 'red'")
        marks = "\n".join(marks)
        title_restart = (f"SIGKILL + restart at {self.s.restart['t_kill'] / 60:.2f} min (red), "
                         if self.s.restart else "")
        data = "'samples.csv'"
        col = lambda name, scale="": f"(valid({c[name]}) ? ${c[name]}{scale} : NaN)"
        script = f"""# written by ops/bench/soak.py; run in {wd}: gnuplot soak.gp
set terminal pngcairo size 1100,1400 font ',10'
set output 'soak.png'
set datafile separator ','
set datafile missing ''
# Each legend just above its panel, where it hides no data; the same
# margins in every panel, so that the x axes line up.
set key at graph 0, graph 1 left bottom horizontal samplen 2
set tmargin 2.5
set lmargin 10
set rmargin 10
set grid
set xrange [0:{self.s.soak_s / 60:.2f}]
set multiplot layout 4,1 title "mailnode soak: {self.s.minutes:g} min, {self.s.rate:.0f} msg/s; {title_restart}end of warm-up at {self.s.warmup_s / 60:.1f} min (gray)"
{marks}
set ylabel 'MiB'
set yrange [0:*]
plot {data} every ::1 using 1:{col('rss_kib', '/1024')} with linespoints pt 7 ps 0.4 title 'RSS (serve)', \\
     {data} every ::1 using 1:{col('pss_kib', '/1024')} with linespoints pt 7 ps 0.4 title 'PSS (serve)'
set ylabel 'count'
set y2label 'threads'
set y2tics
set ytics nomirror
set y2range [0:*]
plot {data} every ::1 using 1:{col('fds')} axes x1y1 with linespoints pt 7 ps 0.4 title 'open fds', \\
     {data} every ::1 using 1:{col('threads')} axes x1y2 with linespoints pt 7 ps 0.4 title 'threads (right axis)'
unset y2label
unset y2tics
set ytics mirror
set ylabel 'messages'
plot {data} every ::1 using 1:{col('q_active')} with lines title 'queue: active', \\
     {data} every ::1 using 1:{col('q_deferred')} with lines title 'deferred', \\
     {data} every ::1 using 1:{col('q_held')} with lines title 'held', \\
     {data} every ::1 using 1:{col('sessions')} with lines dt 2 title 'SMTP sessions open'
set ylabel 'ms (log)'
set xlabel 'minutes since the start of the soak'
set logscale y
set yrange [*:*]
plot {data} every ::1 using 1:{col('p50_ms_10s')} with linespoints pt 7 ps 0.4 title '250 latency p50 (10-s bins)', \\
     {data} every ::1 using 1:{col('p99_ms_10s')} with linespoints pt 7 ps 0.4 title 'p99'
unset multiplot
"""
        # x is minutes: t_s/60.
        script = script.replace("using 1:", "using ($1/60):")
        with open(gp, "w") as f:
            f.write(script)
        if not shutil.which("gnuplot"):
            self.s.notes.append("gnuplot is not installed: no soak.png (soak.gp is written).")
            return
        r = subprocess.run(["gnuplot", "soak.gp"], cwd=wd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(png):
            self.s.notes.append(f"gnuplot failed ({r.returncode}): {r.stderr.strip()[:300]}")

    # -- verdict ------------------------------------------------------------------

    def comparisons(self):
        """For RSS, fds, threads (and PSS, shown): the growth within the
        first process (after its warm-up, to the kill), within the restarted
        one (after its own warm-up, to the end), and across the two."""
        s = self.s
        w, warm = s.window_s, s.warmup_s
        out = []
        spans = []
        # Samples are taken at 0, 10, 20, ... s (a few ms late): the windows
        # are laid on that timeline, half a second early, so that [30, 50)
        # holds the samples of 30 and 40 s whatever their delay. The sample
        # at the kill is the restarted process's; the one at the end is in
        # its last window.
        e = 0.5
        last = s.soak_s + SAMPLE_S - e
        if s.restart:
            a_pid, b_pid = s.restart["old_pid"], s.restart["new_pid"]
            spans.append(("before the kill", a_pid, warm - e, s.kill_at - e))
            spans.append(("after the restart", b_pid, s.kill_at + warm - e, last))
        else:
            spans.append(("whole soak", s.first_pid, warm - e, last))
        for key, label, scale, unit in (("rss_kib", "RSS", 1 / 1024, " MiB"), ("fds", "open fds", 1, ""),
                                        ("threads", "threads", 1, ""), ("pss_kib", "PSS", 1 / 1024, " MiB")):
            for name, pid, lo, hi in spans:
                ref_lo, ref_hi = lo, lo + w
                end_lo, end_hi = hi - w, hi
                if end_lo < ref_hi:
                    out.append({"metric": label, "span": name, "ok": None, "key": key,
                                "text": f"{label}, {name}: n/a ({(hi - lo):.0f} s of this process after its warm-up: "
                                        f"too short for two {w:.0f}-s windows)"})
                    continue
                a = window_median(s.samples, key, ref_lo, ref_hi, pid)
                b = window_median(s.samples, key, end_lo, end_hi, pid)
                if a is None or b is None:
                    out.append({"metric": label, "span": name, "ok": None, "key": key,
                                "text": f"{label}, {name}: n/a (no samples)"})
                    continue
                g = 100.0 * (b - a) / a if a else 0.0
                # The samples' range in each window: how much of the growth is noise.
                ra = window_values(s.samples, key, ref_lo, ref_hi, pid)
                rb = window_values(s.samples, key, end_lo, end_hi, pid)
                spread = lambda v: f"{min(v) * scale:.1f}–{max(v) * scale:.1f}"
                # Shown with the samples' own times, in minutes.
                at = lambda v_lo, v_hi: f"{(v_lo + e) / 60:.2f}–{(v_hi + e - SAMPLE_S) / 60:.2f} min"
                out.append({"metric": label, "span": name, "ok": g < 5.0, "key": key, "growth": g,
                            "text": f"{label}, {name} (pid {pid}): {a * scale:.1f}{unit} at {at(ref_lo, ref_hi)} "
                                    f"({len(ra)} samples, {spread(ra)}) → {b * scale:.1f}{unit} at {at(end_lo, end_hi)} "
                                    f"({len(rb)} samples, {spread(rb)}): **{g:+.1f} %**"})
            if s.restart:
                a = window_median(s.samples, key, warm - e, warm + w - e, s.restart["old_pid"])
                b = window_median(s.samples, key, last - w, last, s.restart["new_pid"])
                if a is not None and b is not None and a:
                    g = 100.0 * (b - a) / a
                    out.append({"metric": label, "span": "across", "ok": None, "key": key, "growth": g, "info": True,
                                "text": f"{label}, first process after its warm-up → last window of the restarted one "
                                        f"(a new process; shown, not judged): {a * scale:.1f}{unit} → {b * scale:.1f}{unit}: "
                                        f"{g:+.1f} %"})
        return out

    def latency_check(self):
        rows = [r for r in self.minutes if r["p99_ms"] is not None]
        if not rows:
            return {"ok": None, "text": "p99 latency: n/a (no 250s)"}
        first = self.minutes[0]
        if first["p99_ms"] is None:
            return {"ok": None, "text": "p99 latency: n/a (no 250 in the first minute)"}
        # Judged: every full minute after the warm-up but the restart's.
        judged = [r for r in rows if not r["warmup"] and not r["restart"] and r["minute"] > 1
                  and r["minute"] * 60 <= self.s.soak_s + 1e-6]
        if not judged:
            return {"ok": None, "text": f"p99 latency: n/a (no whole minute after the warm-up but the restart's); "
                                        f"first minute {first['p99_ms']:.1f} ms"}
        worst = max(judged, key=lambda r: r["p99_ms"])
        last = judged[-1]
        ok = worst["p99_ms"] <= 2 * first["p99_ms"]
        rs = [r for r in self.minutes if r["restart"]]
        extra = (f"; the restart minute ({rs[0]['minute']}), not judged: {fmt(rs[0]['p99_ms'])} ms" if rs else "")
        return {"ok": ok, "text": f"p99 latency: first minute {first['p99_ms']:.1f} ms; worst minute after the warm-up "
                                  f"(minute {worst['minute']}) {worst['p99_ms']:.1f} ms = "
                                  f"**{worst['p99_ms'] / first['p99_ms']:.2f}×**, last minute {last['p99_ms']:.1f} ms = "
                                  f"{last['p99_ms'] / first['p99_ms']:.2f}× (limit 2×){extra}"}

    # -- the log -----------------------------------------------------------------

    NOTABLE_INFO = ("picked up from the queue directory", "picked up the queue an earlier run left",
                    "connection refused")

    def log_problems(self):
        """WARN and ERROR lines of every serve, by kind (the message with its
        variable fields left out), with a count and an example; and counts
        of a few INFO lines worth a look."""
        kinds = {}
        panics = 0
        self.notable = {}
        for label, path, pid in self.s.serve.logs:
            try:
                f = open(path, errors="replace")
            except OSError:
                continue
            with f:
                for line in f:
                    if "panicked" in line:
                        panics += 1
                    for pattern in self.NOTABLE_INFO if "picked up" in line or "refused" in line else ():
                        if pattern in line:
                            key = (label, pattern)
                            if key not in self.notable:
                                self.notable[key] = [0, line.strip()[:300]]
                            self.notable[key][0] += 1
                    if " WARN " not in line and " ERROR " not in line:
                        continue  # (most lines: split only the few that matter)
                    parts = line.split(None, 3)
                    if len(parts) < 4 or parts[1] not in ("WARN", "ERROR"):
                        continue
                    msg = re.sub(r"\b\w+=(\"[^\"]*\"|\S+)", "", parts[3]).strip()
                    msg = re.sub(r"\d+", "N", msg)[:140]
                    key = (label, parts[1], parts[2].rstrip(":"), msg)
                    if key not in kinds:
                        kinds[key] = [0, line.strip()[:300]]
                    kinds[key][0] += 1
        return kinds, panics

    # -- markdown -----------------------------------------------------------------

    def markdown(self):
        s = self.s
        out = []
        w = out.append
        started = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(s.started_wall))
        w(f"## mailnode soak, {started} ({s.minutes:g} minutes)")
        w("")
        if self.error:
            w(f"**The soak stopped with an error:** {self.error}")
            w("")
        cal = s.calibration
        if cal:
            w(f"Calibration: {s.sessions} sessions of unpaced 4 KB messages, {s.per_conn} per connection, "
              f"{s.n_senders} sender processes, {s.calib_s:.0f} s: **{cal['rate']:.0f} msg/s** got their 250 "
              f"(p50 {cal['p50_ms']:.1f} ms, p99 {cal['p99_ms']:.1f} ms; {cal['bad']} without one). The senders are "
              f"Python (asyncio), so this is the peak of this client and mailnode together on this machine, not "
              f"mailnode's own (`ops/bench/run` measures that with smtp-source).")
            w("")
        if hasattr(s, "rate"):
            soak_ok = sum(r["ok"] for r in self.minutes)
            missed = 0
            for _, path, _ in s.senders:
                try:
                    with open(path + ".json") as f:
                        missed += json.load(f).get("missed", 0)
                except (OSError, ValueError):
                    pass
            fail_share = sum(m[1] for m in s.mix_used[1:]) * 100
            w(f"Soak: paced at **{s.rate:.0f} msg/s** (half the peak), {s.sessions} sessions, {s.per_conn} messages "
              f"per connection; {soak_ok} got a 250 (**{soak_ok / s.soak_s:.0f} msg/s** on average; {missed} send slots "
              f"dropped because the senders were more than 1 s behind). {fail_share:.1f} % of the messages go to failing programs "
              f"(below), the rest to the sink. Latency: from the final `.` to the reply, 4 KB messages only. "
              f"Resources: the serve process alone, median of the six 10-s samples of the minute; queue: `ctl status`, "
              f"active + deferred + held; CPU: serve's, % of one core; machine: all CPUs busy, % (100 = every "
              f"core), and in brackets the share of it used by processes outside the soak (anything else running on "
              f"the machine, which the latency pays for too); deliveries: the node's counters.")
            w("")
        if s.restart:
            r = s.restart
            w(f"**Restart**: SIGKILL of serve (pid {r['old_pid']}) at {r['t_kill']:.0f} s (minute "
              f"{int(r['t_kill'] // 60) + 1}), with the {r['programs_killed']} program(s) it was running (as systemd's control-group kill would); the new serve "
              f"(pid {r['new_pid']}, same spool and port) picked up {r.get('queued')} queued messages and listened "
              f"{r['kill_to_listen_s']:.2f} s after the kill; "
              f"first 250 {fmt(r.get('first_250_after_s'), '.2f')} s after it.")
            w("")
        w("| min | serve pid | RSS MiB | PSS MiB | fds | threads | CPU % | machine % (others) | queue | 250/s | p50 ms "
          "| p99 ms | max ms | no 250 | delivered / deferred / bounced | note |")
        w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for r in self.minutes:
            note = []
            if r["restart"]:
                note.append(f"**SIGKILL + restart at {s.restart['t_kill']:.0f} s**")
            if r["warmup"]:
                note.append("warm-up")
            if r["minute"] * 60 > s.soak_s + 1e-6:
                note.append("partial minute")
            w(f"| {r['minute']} | {' → '.join(map(str, r['pids']))} | {fmt(r['rss_mib'])} | {fmt(r['pss_mib'])} | "
              f"{fmt(r['fds'], '.0f')} | {fmt(r['threads'], '.0f')} | {fmt(r['cpu_pct'], '.0f')} | "
              f"{fmt(r['machine_pct'], '.0f')} ({fmt(r['other_pct'], '.0f')}) | "
              f"{fmt(r['queue'], '.0f')} | {r['rate']:.0f} | {fmt(r['p50_ms'], '.2f')} | {fmt(r['p99_ms'], '.2f')} | "
              f"{fmt(r['max_ms'], '.0f')} | {r['bad']} | {r['m_delivered']} / {r['m_deferred']} / {r['m_bounced']} | "
              f"{', '.join(note)} |")
        w("")
        w("![mailnode soak: memory, fds and threads, queue, latency](soak.png)")
        w("")
        w(f"(`soak.png`, `samples.csv` (every 10 s) and `minutes.csv` are in {s.workdir}; copy the PNG next to "
          f"RESULTS.md for the link above.)")
        w("")

        # Verdict
        w("### Verdict")
        w("")
        scale_note = ("" if abs(s.soak_s - 1800) < 1 else
                      f" This soak lasted {s.minutes:g} minutes, so the warm-up is {s.warmup_s:.0f} s (5 of 30 "
                      f"minutes, scaled) and a window is {s.window_s:.0f} s (a minute, or 1/30 of the soak when shorter).")
        w(f"Growth is judged after a warm-up of {s.warmup_s / 60:.1f} minutes, from the first window after it to the "
          f"last one, for each serve process on its own: the SIGKILL at the middle starts a new process, whose memory, "
          f"fds and threads start from nothing, so the first process is judged from its warm-up to the kill, and the "
          f"restarted one from its own warm-up (the same length, counted from its start) to the end. The "
          f"comparison across the two is shown too, not judged. Each figure is the median of the 10-s samples in its "
          f"window (their range in brackets): open fds and threads follow the sessions and programs open at the "
          f"instant, so a leak shows as a climbing range, not as one sample.{scale_note} Latency: the p99 of every whole minute "
          f"after the warm-up, but the restart's, against 2× the first minute's.")
        w("")
        checks = self.comparisons()
        lat = self.latency_check()
        judged = [c for c in checks if not c.get("info") and c["metric"] != "PSS"]
        for c in checks:
            mark = "" if c.get("info") or c["metric"] == "PSS" else (
                " — ok" if c["ok"] else (" — n/a" if c["ok"] is None else " — **over 5 %**"))
            if c["metric"] == "PSS" and not c.get("info"):
                mark = " (shown, not judged)"
            w(f"- {c['text']}{mark}")
        w(f"- {lat['text']} — " + ("ok" if lat["ok"] else ("n/a" if lat["ok"] is None else "**over 2×**")))
        w("")
        results = [c["ok"] for c in judged] + [lat["ok"]]
        failed = [f"{c['metric']} ({c['span']}, {c['growth']:+.1f} %)" for c in judged if c["ok"] is False]
        if lat["ok"] is False:
            failed.append("p99 latency")
        if failed:
            verdict = "**not flat**: " + ", ".join(failed)
        elif any(r is None for r in results):
            verdict = "**inconclusive**: some criteria could not be judged (n/a above)"
        else:
            verdict = "**flat**: RSS, fds and threads grew less than 5 % in each process, p99 within 2× of the first minute's"
        if self.error:
            verdict += " (the soak did not complete)"
        w(f"Verdict: {verdict}.")
        w("")
        self.verdict = verdict

        # Checks
        w("### Checks")
        w("")
        f = s.final
        if f:
            w(f"- Every message acknowledged for the sink delivered: {f['acked']} acknowledged, "
              f"**{f['missing']} not delivered** (waited {f['drain_s']:.1f} s after the load stopped); "
              f"{f['dup']} extra deliveries, {f['dup_near_kill']} of them of messages acknowledged within 2 s of the "
              f"SIGKILL (at least once allows those){'' if f['dup'] == f['dup_near_kill'] else ': **the others are not explained by the kill**, e.g. ' + ', '.join(f['dup_examples'])}; "
              f"{f['unacked']} delivered without their 250 having arrived (in flight at the kill).")
        try:
            with open(os.path.join(s.out, "smuggled.log"), "rb") as fh:
                smuggled = fh.read().count(b"\n")
        except OSError:
            smuggled = 0
        try:
            with open(os.path.join(s.out, "hostile.log"), "rb") as fh:
                hostile_delivered = fh.read().count(b"\n")
        except OSError:
            hostile_delivered = 0
        w(f"- Smuggled transactions delivered: **{smuggled}**; hostile clients' messages delivered: {hostile_delivered}.")
        if f:
            w(f"- Final SIGTERM: serve exited with status **{f['stop_rc']}** in {f['stop_s']:.1f} s; VmHWM of the "
              f"restarted process {f['hwm_kib'] / 1024:.1f} MiB; actor restarts (`ctl status`): "
              f"{f['status'].get('actor_restarts') or 'none'}.")
        if s.anatomy_before_kill:
            a = s.anatomy_before_kill
            w(f"- The first process just before the SIGKILL: threads {fmt_anatomy(a['threads'])}; "
              f"fds {fmt_anatomy(a['fds'])}.")
        if f.get("anatomy"):
            a = f["anatomy"]
            w(f"- The restarted process at the end, before SIGTERM: threads {fmt_anatomy(a['threads'])}; "
              f"fds {fmt_anatomy(a['fds'])}.")
        q = s.ctl_stats["queue"]
        if q:
            fails = [x for x in q if x[1] != 0]
            in_restart = [x for x in fails if s.restart and s.restart["t_kill"] <= x[0] <= s.restart["t_kill"] + 10]
            durs = sorted(x[2] for x in q if x[1] == 0)
            w(f"- `mailnode ctl {' '.join(s.listing_words)}` every second: {len(q)} calls, {len(fails)} failed "
              f"({len(in_restart)} of them within 10 s of the kill); time p50 {fmt(percentile(durs, 50) * 1000 if durs else None, '.0f')} ms, "
              f"max {fmt(durs[-1] * 1000 if durs else None, '.0f')} ms.")
        rl = s.ctl_stats["reload"]
        if rl:
            by_ctl = [x for x in rl if isinstance(x[1], int)]
            hups = [x for x in rl if x[1] == "hup"]
            skipped = [x for x in rl if x[1] == "skipped"]
            lk = s.ctl_stats["lookup"]
            w(f"- Aliases reloads every 10 s: {len(by_ctl)} by `ctl aliases reload` ({sum(1 for x in by_ctl if x[1] == 0)} "
              f"answered with the new table's size), {len(hups)} by SIGHUP, {len(skipped)} skipped while serve restarted; "
              f"the new generation's alias resolved after {sum(1 for x in lk if x[1] == 'ok')} of {len(lk)}.")
        w("")

        # Failing programs
        w("#### Failing programs")
        w("")
        w(f"`[delivery] timeout = \"5s\"`, `[queue] retry_min = \"5s\"`, `retry_max = \"30s\"`, "
          f"`max_age = \"{s.max_age_s}s\"`; bounces go to a catcher this script runs as `[relay] host`. Exit 1 is a "
          f"temporary failure (docs/programs.md: only 64–78 but 71 and 75 are permanent), not a bounce. "
          f"Runs: lines the program logged (one per attempt); returned: DSNs the catcher got, by status; left: "
          f"recipients still pending in the queue at the end.")
        w("")
        w("| alias | share | acknowledged | runs | runs per message | returned (status: n) | left in queue | expected |")
        w("|---|---:|---:|---:|---:|---|---:|---|")
        recs = s.records if hasattr(s, "records") else None
        for k, (alias, share, size) in enumerate(s.mix_used if hasattr(s, "mix_used") else []):
            if k == 0:
                continue
            acked = recs.by_kind[k].get(250, 0) if recs else 0
            try:
                with open(os.path.join(s.out, f"fail-{alias[5:]}.log"), "rb") as fh:
                    runs = fh.read().count(b"\n")
            except OSError:
                runs = 0
            with s.catcher.lock:
                ret = {st: n for (a, st), n in s.catcher.counts.items() if a == alias}
            expected = ("returned at once, 5.3.0" if alias in PERMANENT else
                        "delivered (exit 0)" if alias in SUCCEEDING else
                        f"retried, returned 4.4.7 after max_age")
            w(f"| {alias} | {share * 100:.2f} % | {acked} | {runs} | {runs / acked if acked else 0:.1f} | "
              f"{', '.join(f'{st}: {n}' for st, n in sorted(ret.items())) or '–'} | {f.get('left', {}).get(alias, 0)} "
              f"| {expected} |")
        w("")
        if s.catcher:
            w(f"The catcher got {s.catcher.messages} messages in all.")
            w("")

        # Hostile
        w("#### Hostile clients (from 127.0.0.2)")
        w("")
        try:
            with open(os.path.join(s.workdir, "hostile.json")) as fh:
                hj = json.load(fh)
        except (OSError, ValueError):
            hj = {}
        hs = hj.get("stats", {})
        unannounced = hj.get("closed_without_421", [])
        if unannounced and s.restart:
            k = s.t0 + s.restart["t_kill"]
            at_kill = sum(1 for t in unannounced if k - 0.5 <= t <= k + 2.0)
            w(f"Slowloris connections the server closed without a 421: {len(unannounced)}, {at_kill} of them "
              f"within 2 s of the SIGKILL (a killed process says nothing).")
            w("")
        elif unannounced:
            w(f"Slowloris connections the server closed without a 421: {len(unannounced)}.")
            w("")
        if hs:
            w("| client | what happened | count |")
            w("|---|---|---:|")
            for kind in sorted(hs):
                for what, n in sorted(hs[kind].items()):
                    w(f"| {kind} | {what} | {n} |")
        else:
            w("(no statistics from the hostile process)")
        w("")

        # Log
        kinds, panics = self.log_problems()
        w("#### What serve logged at WARN and ERROR")
        w("")
        if not kinds and not panics:
            w("Nothing.")
        else:
            if panics:
                w(f"**{panics} line(s) mention a panic.**")
                w("")
            w("| serve | level | target | message (fields left out) | count | example |")
            w("|---|---|---|---|---:|---|")
            for (label, level, target, msg), (n, ex) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
                w(f"| {label} | {level} | {target} | {msg.replace('|', '/')} | {n} | `{ex.replace('|', '/')[:200]}` |")
        w("")
        if self.notable:
            w("INFO lines worth a look (\"picked up from the queue directory\" outside a start means the rescan, "
              "which is for mail other processes queue, found a message this serve was still committing):")
            w("")
            w("| serve | line | count | example |")
            w("|---|---|---:|---|")
            for (label, pattern), (n, ex) in sorted(self.notable.items()):
                w(f"| {label} | {pattern} | {n} | `{ex.replace('|', '/')[:200]}` |")
            w("")

        if s.notes:
            w("### Notes")
            w("")
            for n in s.notes:
                w(f"- {n}")
            w("")

        w("### Machine and run")
        w("")
        w("| | |")
        w("|---|---|")
        for k, v in self.machine:
            w(f"| {k} | {v} |")
        if len(s.samples) >= 2:
            a, b = s.samples[0], s.samples[-1]
            steal = 100.0 * (b["steal"] - a["steal"]) / max(1, b["total_ticks"] - a["total_ticks"])
            busy = 100.0 - 100.0 * (b["idle_ticks"] - a["idle_ticks"]) / max(1, b["total_ticks"] - a["total_ticks"])
            w(f"| Host steal during the soak | {steal:.1f} % |")
            w(f"| Machine busy during the soak (all CPUs) | {busy:.0f} % |")
        w(f"| Load average at the end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |")
        w("")
        knobs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                         if k.startswith(("SOAK_", "BENCH_")))
        w("```sh")
        w(f"{knobs + ' ' if knobs else ''}ops/bench/soak   # as root, on Debian 12")
        w("```")
        w("")
        w("mailnode's configuration (`mailnode.toml` in the work dir; every other key is the default):")
        w("")
        w("```toml")
        with open(s.conf) as fh:
            w(fh.read().rstrip())
        w("```")
        return "\n".join(out)


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
    commit = sh(["git", "-C", args.repo, "rev-parse", "--short=12", "HEAD"])
    if sh(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    return [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu),
        ("Kernel", platform.release()),
        ("Repository", commit),
        ("mailnode binary", f"{args.mailnode} ({sh([args.mailnode, '--version'])}, "
                            f"built {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(args.mailnode)))})"),
        ("Load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "sender":
        return sender_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "hostile":
        return hostile_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--mailnode", required=True)
    ap.add_argument("--sink", required=True)
    ap.add_argument("--minutes", type=float, default=30.0)
    args = ap.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    args.mailnode = os.path.abspath(args.mailnode)
    if os.geteuid() != 0:
        log("error: run as root (programs run as nobody)")
        return 2
    if args.minutes <= 0:
        log("error: --minutes must be positive")
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"interrupted by signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    soak = Soak(args)
    soak.started_wall = time.time()
    machine = machine_info(args)
    error = None
    try:
        soak.run()
    except (SoakError, KeyboardInterrupt) as e:
        error = str(e) or type(e).__name__
        log(f"error: {error}")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        log(f"error: {error}")
        import traceback
        traceback.print_exc()
    finally:
        soak.cleanup()
    if not soak.samples:
        return 1
    if not hasattr(soak, "records"):
        return 1
    soak.records.update()
    rep = Report(soak, machine, error)
    rep.build()
    rep.write_csv()
    rep.plot()
    text = rep.markdown()
    with open(os.path.join(args.workdir, "soak.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    log(f"verdict: {rep.verdict}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())

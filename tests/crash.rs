//! Crash consistency (issue 8): the real binary killed with SIGKILL at
//! arbitrary moments while clients send and programs deliver, restarted on
//! the same spool, round after round. Every message that got `250` is
//! delivered at least once to each of its two recipients, a recipient the
//! spool had marked done (or a message it had removed) is never delivered
//! again, the server always starts again, and nothing is left behind in the
//! spool.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mailnode::spool::read_queued;
use mailnode::spool::DeliveryState;

const BIN: &str = env!("CARGO_BIN_EXE_mailnode");
const ROUNDS: u64 = 50;

fn start(config: &str, dir: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["serve", "-c", config, "--metrics", "off"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let (addr, _log) = listening_address(&mut child);
    (child, addr)
}

/// Programs outlive a SIGKILLed server (each runs in a process group of
/// its own) and may still be about to write their outbox file. As this
/// process's orphans (it is their subreaper) they are waited for, so the
/// spool and the outbox are read only once every leftover run is on record.
fn reap_leftover_programs() {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer; no Child handle of ours
        // is alive at this point (the server was waited for).
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            -1 => return, // ECHILD: nothing left
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            0 => panic!("programs of a killed server still running after 30 s"),
            _ => {}
        }
    }
}

/// How many times each delivery (`DELIVERY_ID`) has run so far: one outbox
/// file `DELIVERY_ID.PID` per run.
fn runs_so_far(outbox: &Path) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for entry in std::fs::read_dir(outbox).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((delivery, _pid)) = name.rsplit_once('.') {
            *runs.entry(delivery.to_string()).or_insert(0) += 1;
        }
    }
    runs
}

/// With the server dead: the deliveries that must never run again, each
/// with how often it has run. Done means recorded as such in its envelope,
/// or run and its whole message removed from `queue/`.
fn settled_deliveries(spool: &Path, outbox: &Path) -> HashMap<String, usize> {
    let runs = runs_so_far(outbox);
    let mut queued = HashSet::new();
    let mut settled = HashMap::new();
    for entry in std::fs::read_dir(spool.join("queue")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".msg") else {
            continue;
        };
        queued.insert(id.to_string());
        let envelope = read_queued(&spool.join("queue"), id)
            .unwrap_or_else(|e| panic!("{name} after SIGKILL: {e}"));
        for (index, delivery) in envelope.deliveries.iter().enumerate() {
            if delivery.state != DeliveryState::Pending {
                let id = envelope.delivery_id(index);
                let count = runs.get(&id).copied().unwrap_or(0);
                settled.insert(id, count);
            }
        }
    }
    for (delivery, count) in runs {
        let message = delivery.rsplit_once('.').map_or("", |(message, _)| message);
        if !queued.contains(message) {
            settled.insert(delivery, count);
        }
    }
    settled
}

/// Sends messages until the connection fails; returns the ids acknowledged.
fn send_until_killed(addr: SocketAddr, acked: &Mutex<Vec<String>>) {
    let one = || -> std::io::Result<String> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut reply = || -> std::io::Result<String> {
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(line.trim_end().to_string());
                }
            }
        };
        reply()?;
        for cmd in [
            "HELO c",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<rec@example.org>",
            "RCPT TO:<other@example.org>",
            "DATA",
        ] {
            writer.write_all(format!("{cmd}\r\n").as_bytes())?;
            reply()?;
        }
        writer.write_all(b"Subject: crash\r\n\r\nbody\r\n.\r\n")?;
        let queued = reply()?;
        let _ = writer.write_all(b"QUIT\r\n");
        queued
            .strip_prefix("250 2.0.0 Ok: queued as ")
            .map(str::to_string)
            .ok_or_else(|| std::io::Error::other(queued))
    };
    for _ in 0..1000 {
        match one() {
            Ok(id) => acked.lock().unwrap().push(id),
            Err(_) => return,
        }
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing_over_many_rounds() {
    let (dir, outbox) = shared_tempdir();
    let o = outbox.display().to_string();
    let aliases = dir.path().join("aliases");
    // A delivery that takes a moment, so kills land during deliveries too.
    std::fs::write(
        &aliases,
        format!("rec: |cat > {o}/$DELIVERY_ID.$$; sleep 0.05\nother: |cat > {o}/$DELIVERY_ID.$$\n"),
    )
    .unwrap();
    let config = dir.path().join("mailnode.toml");
    std::fs::write(
        &config,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[aliases]\npath = \"{}\"\n[spool]\npath = \"{}\"\n[control]\nsocket = \"{}\"\n[queue]\nretry_min = \"100ms\"\nretry_max = \"200ms\"\n[limits]\nconnection_rate_per_ip = \"100000/s\"\nmessage_rate_per_ip = \"100000/s\"\n",
            aliases.display(),
            dir.path().join("spool").display(),
            dir.path().join("ctl.sock").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    // SAFETY: a plain prctl on this process.
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(subreaper, 0, "PR_SET_CHILD_SUBREAPER");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut seed: u64 = 0x5DEECE66D;
    let spool = dir.path().join("spool");
    // Delivery -> how often it had run when the spool first showed it done.
    let mut settled: HashMap<String, usize> = HashMap::new();
    for _ in 0..ROUNDS {
        let (mut child, addr) = start(&config, dir.path());
        let sender = {
            let acked = Arc::clone(&acked);
            std::thread::spawn(move || send_until_killed(addr, &acked))
        };
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(20 + (seed >> 33) % 250);
        std::thread::sleep(after);
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        sender.join().unwrap();
        reap_leftover_programs();
        for (delivery, count) in settled_deliveries(&spool, &outbox) {
            settled.entry(delivery).or_insert(count);
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > ROUNDS as usize,
        "too little traffic to mean anything: {}",
        acked.len()
    );

    // One last run delivers whatever the kills left queued.
    let (mut child, _) = start(&config, dir.path());
    // Both recipients of the message ran.
    let delivered = |runs: &HashMap<String, usize>, id: &String| {
        runs.contains_key(&format!("{id}.0")) && runs.contains_key(&format!("{id}.1"))
    };
    let all = wait_for(Duration::from_secs(120), || {
        let queue_empty = std::fs::read_dir(dir.path().join("spool/queue"))
            .ok()?
            .count()
            == 0;
        let runs = runs_so_far(&outbox);
        (queue_empty && acked.iter().all(|id| delivered(&runs, id))).then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    reap_leftover_programs();
    let runs = runs_so_far(&outbox);
    let lost: Vec<&String> = acked.iter().filter(|id| !delivered(&runs, id)).collect();
    assert!(
        all.is_some(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    assert!(
        settled.len() > ROUNDS as usize,
        "too few deliveries settled between kills to mean anything: {}",
        settled.len()
    );
    let again: Vec<(&String, usize, usize)> = settled
        .iter()
        .filter_map(|(delivery, &then)| {
            let now = runs.get(delivery).copied().unwrap_or(0);
            (now != then).then_some((delivery, then, now))
        })
        .collect();
    assert!(
        again.is_empty(),
        "deliveries run again after the spool marked them done (id, runs then, runs at the end): {again:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/incoming"))
            .unwrap()
            .count(),
        0,
        "leftovers in incoming/"
    );
}

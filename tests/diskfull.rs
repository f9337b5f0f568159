//! A full disk (issue 8): the spool on a small tmpfs. The client hears
//! 452 4.3.1, no partial queue entry is left, and mail flows again once
//! space returns. Needs root to mount (as CI runs).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_spool_is_a_452_and_mail_flows_again_once_space_returns() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let (dir, _outbox) = shared_tempdir();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&spool)
        .status()
        .expect("mount runs");
    assert!(status.success(), "cannot mount a tmpfs");
    let _mounted = Mounted(spool.clone());

    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "hold: |exit 75\n").unwrap();
    let mut config = test_config(dir.path());
    config.spool.path = spool.clone();
    config.aliases.path = aliases;
    config.queue.retry_min = Duration::from_secs(3600);
    config.queue.retry_max = Duration::from_secs(3600);
    let node = mailnode::Node::start(config).unwrap();
    let addr = node.local_addrs()[0];

    // Leave a little room, then send more than fits.
    let filler = spool.join("filler");
    std::fs::write(&filler, vec![0u8; 900 * 1024]).unwrap();
    let send = |lines: usize| {
        let mut c = Client::connect(addr);
        c.open_data("client", "a@example.org", "hold@example.org");
        c.send(b"Subject: big\r\n\r\n");
        let line = format!("{}\r\n", "x".repeat(98));
        for _ in 0..lines {
            c.send(line.as_bytes());
        }
        c.send(b".\r\n");
        c.reply()
    };
    let refused = send(3000); // about 300 KB
    assert!(refused.is(452, "4.3.1"), "{refused:?}");
    let queue = spool.join("queue");
    let incoming = spool.join("incoming");
    assert_eq!(
        std::fs::read_dir(&queue).unwrap().count(),
        0,
        "a partial queue entry"
    );
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "a partial body"
    );

    // Space returns: the same message is taken.
    std::fs::remove_file(&filler).unwrap();
    let taken = send(3000);
    queued_id(&taken);
    node.shutdown();
}

//! A node embedded in a program that files mail itself: every message for
//! `tickets@` is written to a directory by an in-process handler, with the
//! queue's guarantees (on disk before the 250, retried, returned when it
//! fails for good).
//!
//! ```sh
//! cargo run --example maildir_handler -- 127.0.0.1:2525 /tmp/tickets
//! swaks --server 127.0.0.1:2525 --to tickets@localhost
//! ls /tmp/tickets/mail
//! ```

use std::path::{Path, PathBuf};

use mailnode::config::Config;
use mailnode::hooks::Hooks;
use mailnode::{Deliver, DeliveryStatus, HandedMessage, Node};

/// Files each message as `DELIVERY_ID.eml`. A message handed over again
/// (after a crash between the filing and the node writing it down) finds
/// its file and is not filed twice.
struct Maildir {
    dir: PathBuf,
}

impl Deliver for Maildir {
    async fn deliver(&self, mut mail: HandedMessage) -> DeliveryStatus {
        let done = self.dir.join(format!("{}.eml", mail.delivery_id));
        if done.exists() {
            return DeliveryStatus::DELIVERED;
        }
        let partial = self.dir.join(format!(".{}.partial", mail.delivery_id));
        match file(&mut mail, &partial, &done).await {
            Ok(()) => DeliveryStatus::DELIVERED,
            // A full disk mends itself sooner or later: try again.
            Err(e) => DeliveryStatus::temporary(format!("{}: {e}", done.display())),
        }
    }
}

/// Written whole and synced before it gets its name: a reader of the
/// directory never sees half a message.
async fn file(mail: &mut HandedMessage, partial: &Path, done: &Path) -> std::io::Result<()> {
    let mut out = tokio::fs::File::create(partial).await?;
    tokio::io::copy(&mut mail.message, &mut out).await?;
    out.sync_all().await?;
    tokio::fs::rename(partial, done).await
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(dir)) = (args.next(), args.next()) else {
        return Err("usage: maildir_handler LISTEN_ADDRESS DIRECTORY".into());
    };
    let dir = PathBuf::from(dir);
    let mail = dir.join("mail");
    std::fs::create_dir_all(&mail)?;
    let aliases = dir.join("aliases");
    std::fs::write(&aliases, "tickets: @maildir\npostmaster: tickets\n")?;

    let mut config = Config::default();
    config.smtp.listen = vec![listen.parse()?];
    config.aliases.path = aliases;
    config.spool.path = dir.join("spool");
    config.control.socket = dir.join("control.sock");
    config.metrics.listen = None;
    let hooks = Hooks::default().handler("maildir", Maildir { dir: mail });
    let node = Node::start_with(config, hooks)?;
    println!("listening on {}; Ctrl-C to stop", node.local_addrs()[0]);

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(tokio::signal::ctrl_c())?;
    node.shutdown();
    Ok(())
}

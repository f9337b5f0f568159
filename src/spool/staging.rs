//! Staging: the fsyncs that make a new message's body and envelope durable in
//! `incoming/`, run on a small pool of threads before the writer renames them
//! into `queue/`.
//!
//! Why a pool: an fsync mostly waits for the disk, and the file system
//! merges fsyncs that wait together into one journal commit. Staging many
//! sessions' files at once, and each message's body and envelope side by
//! side, costs about one disk flush where a single thread would pay one per
//! file; the writer thread is left with renames and the shared directory
//! fsync.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_channel::{Receiver, Sender};

use super::envelope::{encode, Envelope};
use super::spare::{Existing, Spares};
use super::writer::{self, Job, Reply};
use super::{IncomingBody, SpoolError};

/// Enough threads for the fsyncs of a burst of sessions to wait together;
/// each is idle (blocked on a channel) when there is no mail.
pub(super) const STAGING_THREADS: usize = 4;

/// Staging threads only call fsync and write small files.
const STAGING_STACK: usize = 128 * 1024;

pub(super) type Task = Box<dyn FnOnce() + Send>;

/// Starts the pool; the threads end when every [`Sender`] of `tasks` is gone.
pub(super) fn start(tasks: Receiver<Task>) -> Result<(), SpoolError> {
    for n in 0..STAGING_THREADS {
        let tasks = tasks.clone();
        std::thread::Builder::new()
            .name(format!("spool-stage-{n}"))
            .stack_size(STAGING_STACK)
            .spawn(move || {
                while let Ok(task) = tasks.recv() {
                    task();
                }
            })
            .map_err(|e| SpoolError::io("start spool staging thread", e))?;
    }
    Ok(())
}

/// A new message on its way to the writer: the two halves finish on
/// different threads, and whichever finishes last hands the message on.
struct Staged {
    body: Option<IncomingBody>,
    body_synced: Option<Result<(), SpoolError>>,
    envelope_written: Option<Result<PathBuf, SpoolError>>,
    reply: Option<Reply>,
    writer: Sender<Job>,
}

impl Staged {
    fn both_done(&self) -> bool {
        self.body_synced.is_some() && self.envelope_written.is_some()
    }

    /// Sends the message to the writer, or answers with the first failure.
    /// A body dropped here removes its files from `incoming/`.
    fn finish(&mut self) {
        let (Some(mut body), Some(reply)) = (self.body.take(), self.reply.take()) else {
            return;
        };
        let envelope = self.envelope_written.take();
        if let Some(Ok(path)) = &envelope {
            body.set_envelope_path(path.clone());
        }
        let outcome = match (self.body_synced.take(), envelope) {
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
            (Some(Ok(())), Some(Ok(envelope_path))) => Ok(envelope_path),
            _ => Err(SpoolError::WriterGone),
        };
        match outcome {
            Ok(envelope_path) => {
                // If the writer has stopped, the job drops with its reply
                // sender and the session hears WriterGone.
                let _ = self.writer.send(Job::Commit {
                    body,
                    envelope_path,
                    reply,
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Queues the staging of one message: body fsync and envelope write run in
/// parallel; the writer gets the message once both are durable.
pub(super) fn stage(
    tasks: &Sender<Task>,
    writer: &Sender<Job>,
    spares: &Arc<Spares>,
    mut body: IncomingBody,
    envelope: &Envelope,
    envelope_path: PathBuf,
    reply: Reply,
) {
    let encoded = encode(envelope);
    // The body's buffer is flushed here, on the caller's thread, so the
    // staging thread only waits for the disk.
    let flushed = body.flush();
    let staged = Arc::new(Mutex::new(Staged {
        body: None,
        body_synced: None,
        envelope_written: None,
        reply: Some(reply),
        writer: writer.clone(),
    }));
    if let Err(e) = flushed {
        let mut s = staged.lock().unwrap_or_else(PoisonError::into_inner);
        s.body = Some(body);
        s.body_synced = Some(Err(e));
        s.envelope_written = Some(Err(SpoolError::WriterGone));
        s.finish();
        return;
    }
    let for_body = Arc::clone(&staged);
    let body_task: Task = Box::new(move || {
        let synced = body.sync();
        let mut s = for_body.lock().unwrap_or_else(PoisonError::into_inner);
        s.body = Some(body);
        s.body_synced = Some(synced);
        if s.both_done() {
            s.finish();
        }
    });
    let spares = Arc::clone(spares);
    let envelope_task: Task = Box::new(move || {
        let written =
            match writer::write_synced(&spares, &envelope_path, &encoded, Existing::Refuse) {
                Ok(()) => Ok(envelope_path),
                Err(e) => {
                    let _ = std::fs::remove_file(&envelope_path);
                    Err(e)
                }
            };
        let mut s = staged.lock().unwrap_or_else(PoisonError::into_inner);
        s.envelope_written = Some(written);
        if s.both_done() {
            s.finish();
        }
    });
    // A send fails only once the pool is gone, that is while the node shuts
    // down; running the task here keeps the message's fate decided anyway.
    for task in [body_task, envelope_task] {
        if let Err(crossbeam_channel::SendError(task)) = tasks.send(task) {
            task();
        }
    }
}

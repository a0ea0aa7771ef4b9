//! Early writeback of a blob while a writer is still writing it.
//!
//! Publishing a blob fsyncs it (see [`crate::store`]). Left to itself, the kernel writes a
//! layer's data to disk only then, on the critical path. Starting the writeback early
//! (`sync_file_range`) was not enough on these machines: the disk is virtual, and the flush
//! that makes data durable costs in proportion to what was written since the last one, so
//! the final fsync of the test image's 200 MiB base layer still took 0.2 s. A [`Writeback`]
//! makes what the writer has written so far durable every 50 ms (`fdatasync` on a thread of
//! its own), so the disk works while the layer streams; [`Writeback::finish`] then syncs the
//! rest on that thread while the caller goes on (hashing the blob), and the store's own
//! fsync finds nothing left: 0.01 s. Advisory only: a failure here costs time, never data
//! (the store's fsync still runs and reports).

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

const PERIOD: Duration = Duration::from_millis(50);

/// Follows one file (which may not exist yet) until [`Writeback::finish`] or drop.
pub struct Writeback {
    /// `()` sent: finish with a whole sync; dropped: stop at once.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writeback {
    /// Starts following `path`.
    pub fn follow(path: &Path) -> Writeback {
        let (stop, stopped) = mpsc::channel::<()>();
        let followed = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                let mut file = None;
                let finish = loop {
                    match stopped.recv_timeout(PERIOD) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) => break true,
                        Err(RecvTimeoutError::Disconnected) => break false,
                    }
                    file = file.or_else(|| std::fs::File::open(&followed).ok());
                    if let Some(f) = &file {
                        let _ = f.sync_data();
                    }
                };
                if finish && let Some(f) = file.or_else(|| std::fs::File::open(&followed).ok()) {
                    let _ = f.sync_all();
                }
            })
            .ok();
        Writeback { stop: Some(stop), thread }
    }

    /// Stops following and syncs the whole file on the thread, while the caller goes on;
    /// [`Syncing::wait`] waits for it.
    pub fn finish(mut self) -> Syncing {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        Syncing { _thread: self }
    }
}

/// The sync [`Writeback::finish`] started (dropping it waits too).
pub struct Syncing {
    /// Held for its drop, which joins the thread once the sync is done.
    _thread: Writeback,
}

impl Syncing {
    /// Waits for the sync to end.
    pub fn wait(self) {
        drop(self);
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

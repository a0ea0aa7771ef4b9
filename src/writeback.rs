//! Early writeback of a blob while a tool is still writing it.
//!
//! Publishing a blob fsyncs it (see [`crate::store`]). Left to itself, the kernel writes a
//! layer's data to disk only then, on the critical path: 0.5 s for the test image's 200 MiB
//! base layer on this disk. A [`Writeback`] asks the kernel every 50 ms to start writing
//! whatever of the file is dirty (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not
//! wait for the disk), so the disk works while the layer streams and the final fsync finds
//! little left. Advisory only: a failure here costs time, never data (the fsync still runs).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

const PERIOD: Duration = Duration::from_millis(50);

/// Follows one file (which may not exist yet) until [`Writeback::finish`] or drop.
pub struct Writeback {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
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
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PERIOD) {
                    if file.is_none() {
                        file = std::fs::File::open(&followed).ok();
                    }
                    if let Some(f) = &file {
                        start_writeback(f);
                    }
                }
            })
            .ok();
        Writeback { stop: Some(stop), thread, path: path.to_owned() }
    }

    /// Stops following, then syncs the file on a thread of its own, so that the disk's part
    /// overlaps whatever comes before the store's fsync (hashing the blob), which then finds
    /// nothing left to write. Wait for it with [`Syncing::wait`].
    pub fn finish(mut self) -> Syncing {
        self.stop_thread();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("sync".into())
            .spawn(move || std::fs::File::open(&path).and_then(|f| f.sync_all()))
            .ok();
        Syncing { thread }
    }

    fn stop_thread(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sync [`Writeback::finish`] started.
pub struct Syncing {
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Syncing {
    /// Waits for the sync to end. Advisory like the rest: its error is the store's fsync's to
    /// report, which follows.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncing {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Starts (does not wait for) the writeback of every dirty page of `file`.
fn start_writeback(file: &std::fs::File) {
    // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

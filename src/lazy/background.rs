//! Background completion: the chunks nobody has read yet, fetched one at a time, base layer
//! first, within a bandwidth share, and never while a read is waiting (reads first).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Cause, LazyBlob, LazyError};

/// How long background completion waits before looking again when reads are in flight.
const YIELD: Duration = Duration::from_millis(5);

/// The bandwidth background completion may take, in bytes per second (0: all of it);
/// changeable while it runs.
#[derive(Debug)]
pub struct Share {
    bytes_per_second: AtomicU64,
}

impl Share {
    /// At most `bytes_per_second` (0: no limit).
    pub fn new(bytes_per_second: u64) -> Share {
        Share { bytes_per_second: AtomicU64::new(bytes_per_second) }
    }

    /// No limit.
    pub fn unlimited() -> Share {
        Share::new(0)
    }

    /// Lifts the limit.
    pub fn lift(&self) {
        self.bytes_per_second.store(0, Ordering::SeqCst);
    }

    /// How long to wait after `bytes` taken since `since` to stay within the share.
    fn wait_after(&self, bytes: u64, since: Instant) -> Duration {
        let rate = self.bytes_per_second.load(Ordering::SeqCst);
        if rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 / rate as f64).saturating_sub(since.elapsed())
    }
}

/// The running completion thread.
pub(super) struct Background {
    share: Arc<Share>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), LazyError>>,
}

impl Background {
    /// Starts completing `blobs` within `share`.
    pub(super) fn start(blobs: Vec<Arc<LazyBlob>>, share: Share) -> Background {
        let share = Arc::new(share);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (share.clone(), stop.clone());
        let thread = std::thread::spawn(move || fill(&blobs, &s, &st));
        Background { share, stop, thread }
    }

    /// Lifts the share and waits until every chunk is in.
    pub(super) fn finish(self) -> Result<(), LazyError> {
        self.share.lift();
        self.join()
    }

    /// Stops after the chunk on its way (a run that failed keeps what it has).
    pub(super) fn stop(self) -> Result<(), LazyError> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    fn join(self) -> Result<(), LazyError> {
        match self.thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Fetches every missing chunk of `blobs` (base first) within `share`, yielding to reads,
/// until done or `stop`.
pub(super) fn fill(blobs: &[Arc<LazyBlob>], share: &Share, stop: &AtomicBool) -> Result<(), LazyError> {
    let since = Instant::now();
    let mut taken = 0u64;
    for blob in blobs {
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Reads first: while any lower has a reader waiting, wait.
            if blobs.iter().any(|b| b.reading.load(Ordering::SeqCst) > 0) {
                std::thread::sleep(YIELD);
                continue;
            }
            let wait = share.wait_after(taken, since);
            if !wait.is_zero() {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
            let Some(c) = blob.next_missing() else { break };
            blob.ensure(c, Cause::Background)
                .map_err(|source| LazyError::Background { layer: blob.digest().clone(), source })?;
            taken += super::CHUNK;
        }
    }
    Ok(())
}

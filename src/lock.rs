//! Advisory whole-file locks (`flock`) held by RAII guards. Before blocking on a lock that
//! someone else holds, "waiting for lock on …" goes to stderr.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::FlockOperation;

/// A held lock; released when dropped (closing the file releases it).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Many holders at once (builds sharing the store).
    pub fn shared(path: &Path) -> io::Result<FileLock> {
        Self::acquire(path, true)
    }

    /// One holder (rm, gc; the producer of a layer blob).
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        Self::acquire(path, false)
    }

    fn acquire(path: &Path, shared: bool) -> io::Result<FileLock> {
        let file = File::options().read(true).write(true).create(true).truncate(false).open(path)?;
        let (try_op, op) = if shared {
            (FlockOperation::NonBlockingLockShared, FlockOperation::LockShared)
        } else {
            (FlockOperation::NonBlockingLockExclusive, FlockOperation::LockExclusive)
        };
        match rustix::fs::flock(&file, try_op) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                crate::progress::info(&format!("waiting for lock on {}", path.display()));
                rustix::fs::flock(&file, op)?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_locks_coexist_and_exclude_an_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = FileLock::shared(&p).unwrap();
        let _b = FileLock::shared(&p).unwrap();
        let f = File::open(&p).unwrap();
        assert!(rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(a);
        drop(_b);
        rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}

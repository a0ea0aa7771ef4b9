//! Advisory whole-file locks (`flock`) held by RAII guards. Before blocking on a lock that
//! someone else holds, "waiting for lock on …" goes to stderr.
//!
//! A lock file is made `0644`, whatever the umask, so that other users sharing a store can
//! open it to take a shared lock; a shared lock opens the file read-only, so it can be taken
//! on a store the caller cannot write (another user's, or a read-only mount).

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::fs::FlockOperation;

/// Mode of a lock file: readable by everyone, so anyone can hold it shared.
const LOCK_FILE_MODE: u32 = 0o644;

/// A held lock; released when dropped (closing the file releases it).
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Many holders at once (builds sharing the store), creating the lock file if missing.
    pub fn shared(path: &Path) -> io::Result<FileLock> {
        Self::acquire(open_or_create(path)?, path, true)
    }

    /// [`FileLock::shared`] of an existing lock file, opened read-only (readers of a store
    /// they cannot write); `NotFound` if there is none.
    pub fn shared_existing(path: &Path) -> io::Result<FileLock> {
        Self::acquire(File::open(path)?, path, true)
    }

    /// One holder (rm, gc; the producer of a layer blob).
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        Self::acquire(open_or_create(path)?, path, false)
    }

    fn acquire(file: File, path: &Path, shared: bool) -> io::Result<FileLock> {
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
        Ok(FileLock { file })
    }

    /// Whether the locked file is still the one at `path`: one removed while we waited for
    /// it (a finished lazy completion removes its cache, lock and all) locks nothing.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(held), Ok(now)) => (held.dev(), held.ino()) == (now.dev(), now.ino()),
            _ => false,
        }
    }
}

/// The lock file at `path`, read-write; made with [`LOCK_FILE_MODE`] if it did not exist.
fn open_or_create(path: &Path) -> io::Result<File> {
    match File::options().read(true).write(true).create_new(true).open(path) {
        Ok(file) => {
            file.set_permissions(std::fs::Permissions::from_mode(LOCK_FILE_MODE))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            File::options().read(true).write(true).open(path)
        }
        Err(e) => Err(e),
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
        let _b = FileLock::shared_existing(&p).unwrap();
        let f = File::open(&p).unwrap();
        assert!(rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(a);
        drop(_b);
        rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    }

    #[test]
    fn a_shared_lock_needs_only_read_access_and_lock_files_are_0644() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        drop(FileLock::exclusive(&p).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, LOCK_FILE_MODE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        let _shared = FileLock::shared_existing(&p).unwrap();
        let missing = FileLock::shared_existing(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}

//! Where a layer's tree is staged before mkfs: in memory (tmpfs) when it fits, else on disk
//! in the store's `tmp/`.
//!
//! Memory is the default for two reasons. It is fast: creating tens of thousands of files on
//! a disk filesystem costs several times the decompression (measured here: 25 s on disk vs
//! 5 s on tmpfs for a 1 GB, 51k-file layer). And it keeps EROFS blobs reproducible:
//! mkfs.erofs 1.5 stores each inode's xattrs in the order `llistxattr` returns them, which on
//! tmpfs is the (sorted) order vmrootfs sets them in, while a disk filesystem may reorder them
//! (ext4 lists in-inode xattrs before those that spilled into a block).

use std::path::{Path, PathBuf};

use crate::store::{Store, StoreError};

/// Staging policy (`--staging`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StagingPolicy {
    /// tmpfs when the layer is likely to fit in half the free tmpfs space, else disk.
    #[default]
    Auto,
    /// Always tmpfs (fails if a layer does not fit).
    Memory,
    /// Always the store's `tmp/` directory.
    Disk,
}

/// Chooses staging directories for layers.
#[derive(Debug, Clone)]
pub struct Stager {
    policy: StagingPolicy,
    tmpfs: Option<PathBuf>,
}

const TMPFS_MAGIC: u64 = 0x0102_1994;
/// Assumed unpacked/compressed ratio when sizing a layer before unpacking it.
const EXPANSION: u64 = 5;

/// `/dev/shm` when it is a tmpfs that takes every xattr namespace a layer uses.
fn usable_tmpfs() -> Option<PathBuf> {
    let shm = Path::new("/dev/shm");
    let st = rustix::fs::statfs(shm).ok()?;
    if st.f_type as u64 != TMPFS_MAGIC {
        return None;
    }
    // tmpfs takes user.* xattrs only since Linux 6.6.
    let probe = tempfile::Builder::new().prefix("vmrootfs-probe-").tempfile_in(shm).ok()?;
    rustix::fs::setxattr(probe.path(), "user.vmrootfs", b"1", rustix::fs::XattrFlags::empty()).ok()?;
    rustix::fs::setxattr(probe.path(), "trusted.vmrootfs", b"1", rustix::fs::XattrFlags::empty()).ok()?;
    Some(shm.to_owned())
}

impl Stager {
    pub fn new(policy: StagingPolicy) -> Stager {
        let tmpfs = if policy == StagingPolicy::Disk { None } else { usable_tmpfs() };
        Stager { policy, tmpfs }
    }

    /// A fresh staging directory for a layer of `compressed_size` bytes (if known), removed
    /// when dropped. `jobs` layers may be staged at once.
    pub fn dir(
        &self,
        store: &Store,
        compressed_size: Option<u64>,
        jobs: usize,
    ) -> Result<tempfile::TempDir, StoreError> {
        if let Some(tmpfs) = &self.tmpfs {
            let fits = || {
                let need = compressed_size.map_or(2 << 30, |s| s.saturating_mul(EXPANSION));
                rustix::fs::statvfs(tmpfs)
                    .map(|v| need.saturating_mul(2 * jobs.max(1) as u64) <= v.f_bavail * v.f_frsize)
                    .unwrap_or(false)
            };
            if self.policy == StagingPolicy::Memory || fits() {
                let prefix = format!("vmrootfs-stage-{}-", std::process::id());
                return tempfile::Builder::new()
                    .prefix(&prefix)
                    .tempdir_in(tmpfs)
                    .map_err(|source| StoreError::Io { path: tmpfs.clone(), source });
            }
        }
        store.staging("layer-")
    }
}

/// Removes tmpfs staging directories left by processes that no longer run (a build killed
/// mid-layer). Returns how many it removed.
pub fn remove_stale() -> usize {
    let Some(tmpfs) = usable_tmpfs() else { return 0 };
    let Ok(entries) = std::fs::read_dir(&tmpfs) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) =
            name.to_str().and_then(|n| n.strip_prefix("vmrootfs-stage-")).and_then(|r| r.split('-').next())
        else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

//! ext4 via `mkfs.ext4 -d` from a staging tree, then a fix-up pass.
//!
//! Sized from the tree's counts (see [`size_blocks`]). Reproducible with e2fsprogs 1.47.0:
//! built-in defaults instead of the host's mke2fs.conf, `E2FSPROGS_FAKE_TIME` for superblock
//! and creation times, UUID and directory hash seed from the chain ID, entries added in sorted
//! order (mke2fs scans with alphasort; `LC_ALL=C` makes that byte order). mke2fs copies each
//! staged file's ctime (the moment of extraction) and only whole seconds of mtime, and does
//! not copy the root's mode and mtime: [`super::ext4_fixup`] rewrites those fields in the
//! inode table. `lost+found` is removed with debugfs (it would show in the merged root).

use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::ext4_fixup;
use super::tool::{self, Tool, ToolError};
use crate::layer::meta::{BLOCK, TreeStats};

/// Fixed "now" for mke2fs and debugfs (superblock times, reserved inodes). Not 0: e2fsprogs
/// reads 0 as "unset" and takes the clock.
const FAKE_TIME: &str = "1";
const INODE_SIZE: u64 = 256;
const BLOCKS_PER_GROUP: u64 = 32768;

#[derive(Debug, Clone)]
pub struct Ext4 {
    mkfs: Tool,
    debugfs: Tool,
}

impl Ext4 {
    pub fn detect() -> Result<Self, ToolError> {
        Ok(Ext4 {
            mkfs: Tool::find("mkfs.ext4", "e2fsprogs", &["-V"], "1.47.0")?,
            debugfs: Tool::find("debugfs", "e2fsprogs", &["-V"], "1.47.0")?,
        })
    }

    pub fn describe(&self) -> String {
        format!("mkfs.ext4 {}", self.mkfs.version)
    }

    /// Makes `out` from the normalized stream spooled at `tar`, whose counts are `stats`.
    pub fn make_from_tar(
        &self,
        tar: &Path,
        stats: &TreeStats,
        chain_id: &Digest,
        out: &Path,
    ) -> Result<(), BackendError> {
        let _ = (stats, chain_id, out, &self.mkfs, &self.debugfs);
        Err(BackendError::Spool {
            path: tar.to_owned(),
            source: std::io::Error::other("ext4 from a tar: not yet"),
        })
    }
}

/// Blocks and inodes for an ext4 image of a tree: everything the content needs plus the
/// metadata mke2fs lays out for that size, with a small margin — never short, little waste.
pub fn size_blocks(s: &TreeStats) -> (u64, u64) {
    let inodes = s.inodes + 16;
    let dir_blocks = s.dirs + (s.dirent_bytes * 5 / 4).div_ceil(BLOCK);
    // Extent tree blocks for big files (fragmentation is low in a fresh image).
    let extent_blocks = s.file_bytes / (64 << 20) + 1;
    let content = s.data_blocks + s.extra_blocks + dir_blocks + extent_blocks + 4; // + lost+found
    let inode_table = (inodes * INODE_SIZE).div_ceil(BLOCK);
    let mut total = content + inode_table + 64;
    // Per group: block and inode bitmaps, superblock backup and descriptors, inode table slack.
    let groups = total.div_ceil(BLOCKS_PER_GROUP);
    total += groups * 4 + groups * 2;
    total += total / 50;
    (total.max(256), inodes)
}

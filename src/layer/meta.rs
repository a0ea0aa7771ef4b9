//! What vmrootfs keeps of an entry (mode, owner, times, xattrs) and the counts that size an
//! ext4 image.

/// Block size used to count data blocks and estimate filesystem sizes.
pub const BLOCK: u64 = 4096;

/// Ownership, permissions, time and xattrs of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name. In a [`super::dirindex::DirIndex`] never
    /// `trusted.overlay.*` (those belong to one layer).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Counts that size an ext4 image for a layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeStats {
    /// Inodes (files, dirs, whiteouts; not extra hardlinks).
    pub inodes: u64,
    pub dirs: u64,
    /// 4 KiB blocks of file data that are not all zeros.
    pub data_blocks: u64,
    /// Blocks for long symlink targets and xattrs that do not fit in an inode.
    pub extra_blocks: u64,
    /// Bytes of directory entries (names plus headers).
    pub dirent_bytes: u64,
    /// Bytes of file content, holes included.
    pub file_bytes: u64,
}

/// `trusted.overlay.*` and `user.overlay.*` steer overlayfs (redirects, metacopy, opaque);
/// only the conversion itself may set them, never a layer's tar.
pub fn is_reserved_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

//! What vmrootfs keeps of an entry: mode, owner, times, xattrs.

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

/// `trusted.overlay.*` and `user.overlay.*` steer overlayfs (redirects, metacopy, opaque);
/// only the conversion itself may set them, never a layer's tar.
pub fn is_reserved_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

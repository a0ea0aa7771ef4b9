//! What vmrootfs keeps of an entry: mode, owner, times, xattrs.

/// Ownership, permissions, time and xattrs of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// What kind of inode an entry makes, for the xattrs the kernel lets it have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrHolder {
    File,
    Dir,
    /// Symlinks, devices, FIFOs: the kernel refuses `user.*` xattrs on them.
    Special,
}

/// Why an entry's xattrs cannot be what applying the layer gives.
#[derive(Debug, thiserror::Error)]
#[error("xattr {name}")]
pub struct XattrRefused {
    pub name: String,
    #[source]
    pub source: super::acl::AclError,
}

/// The xattrs an entry of permission bits `mode` keeps once the layer is applied (setxattr,
/// then chmod): `user.*` dropped where the kernel refuses them, POSIX ACLs as the kernel keeps
/// them ([`super::acl`]); an ACL the kernel refuses is an error. `xattrs` stay sorted.
pub fn applied_xattrs(
    holder: XattrHolder,
    mode: u32,
    xattrs: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), XattrRefused> {
    use super::acl;
    if holder == XattrHolder::Special {
        xattrs.retain(|(k, _)| !k.starts_with(b"user."));
    }
    let refused = |k: &[u8], source| XattrRefused { name: String::from_utf8_lossy(k).into_owned(), source };
    let mut kept = Vec::with_capacity(xattrs.len());
    for (k, v) in xattrs.drain(..) {
        let v = match k.as_slice() {
            acl::ACCESS => match acl::applied_access(&v, mode).map_err(|e| refused(&k, e))? {
                Some(v) => v,
                None => continue,
            },
            acl::DEFAULT => {
                acl::applied_default(&v, holder == XattrHolder::Dir).map_err(|e| refused(&k, e))?
            }
            _ => v,
        };
        kept.push((k, v));
    }
    *xattrs = kept;
    Ok(())
}

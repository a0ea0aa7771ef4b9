//! Writes one layer's entries into a staging directory, the layer's own tree.
//!
//! Every path is resolved component by component from the staging root with
//! `O_NOFOLLOW | O_DIRECTORY`, so no symlink, whether the layer made it or not, is ever
//! followed while writing; nothing can land outside the root. Parents a tar does not list are
//! created as *implicit* directories and get their final metadata from the layers below in
//! [`LayerTree::finish`].
//!
//! Staging timestamps: each entry's mtime is set exactly; its **atime carries the mtime's
//! nanoseconds as seconds**, because `mke2fs -d` copies only whole seconds of mtime but does
//! copy atime, and the ext4 backend moves them back (see `backend::ext4_fixup`).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags, makedev};
use rustix::io::Errno;

use super::dirindex::{DirIndex, DirMeta, NodeKind};
use super::path::split_parent;

/// Block size used to detect holes and to estimate filesystem sizes.
pub const BLOCK: u64 = 4096;

/// Why writing one entry failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    #[error("parent {0:?} is not a directory in this layer")]
    ParentNotDir(String),
    #[error("hardlink target {0:?} is not an earlier file of this layer")]
    BadHardlink(String),
    #[error("opaque marker inside {0:?}, which is not a directory in this layer")]
    OpaqueOnNonDir(String),
    #[error("entry would replace the layer root with a non-directory")]
    RootNotDir,
    #[error("{op} {path:?}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading entry data")]
    Data(#[source] io::Error),
}

fn io_err<'a>(op: &'static str, path: &'a [u8]) -> impl FnOnce(Errno) -> TreeError + 'a {
    move |e| TreeError::Io { op, path: super::path::display(path), source: e.into() }
}

/// Ownership, permissions, time and xattrs of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name. In a [`DirIndex`] never `trusted.overlay.*`
    /// (those belong to one layer).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Special files a layer may contain.
#[derive(Debug, Clone, Copy)]
pub enum NodeType {
    Fifo,
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
}

/// Counts that size an ext4 image for this tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeStats {
    /// Inodes (files, dirs, links to new inodes, whiteouts).
    pub inodes: u64,
    pub dirs: u64,
    /// 4 KiB blocks of file data that are not holes.
    pub data_blocks: u64,
    /// Blocks for long symlink targets and xattrs that do not fit in an inode.
    pub extra_blocks: u64,
    /// Bytes of directory entries (names plus headers).
    pub dirent_bytes: u64,
    /// Bytes of file content, holes included.
    pub file_bytes: u64,
}

/// The result of [`LayerTree::finish`]: the layer's directories with final metadata.
pub struct FinishedTree {
    pub dirs: DirIndex,
    pub opaque: BTreeSet<Vec<u8>>,
    pub stats: TreeStats,
}

/// One layer's staging tree being written.
pub struct LayerTree {
    root: OwnedFd,
    root_path: PathBuf,
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    explicit_dirs: DirIndex,
    implicit_dirs: BTreeSet<Vec<u8>>,
    opaque: BTreeSet<Vec<u8>>,
    stats: TreeStats,
    buf: Vec<u8>,
}

const DIR_FLAGS: OFlags =
    OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

fn os(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(p)
}

fn ts(sec: i64, nsec: u32) -> Timespec {
    Timespec { tv_sec: sec, tv_nsec: nsec as _ }
}

/// Staging timestamps of an entry: the exact mtime, and an atime that carries what
/// `mke2fs -d` drops — see [`encode_mtime_extra`].
fn staging_times(mtime_sec: i64, mtime_nsec: u32) -> Timestamps {
    Timestamps {
        last_access: ts(encode_mtime_extra(mtime_sec, mtime_nsec) as i64, 0),
        last_modification: ts(mtime_sec, mtime_nsec),
    }
}

/// What ext4 keeps beyond a 32-bit mtime — nanoseconds and the epoch bits (which 2^32-second
/// era the time is in) — packed as `epoch * 10^9 + nsec`, a number below 2^32.
pub fn encode_mtime_extra(mtime_sec: i64, mtime_nsec: u32) -> u32 {
    let epoch = ((mtime_sec - mtime_sec as i32 as i64) >> 32) & 3;
    epoch as u32 * 1_000_000_000 + mtime_nsec.min(999_999_999)
}

fn is_whiteout(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// `trusted.overlay.*` and `user.overlay.*` steer overlayfs (redirects, metacopy, opaque);
/// only the conversion itself may set them, never a layer's tar.
pub fn is_reserved_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

impl LayerTree {
    /// Starts a tree in the empty directory `root_path`.
    pub fn new(root_path: &Path) -> io::Result<Self> {
        let root = rustix::fs::open(root_path, DIR_FLAGS, Mode::empty())?;
        let mut implicit_dirs = BTreeSet::new();
        implicit_dirs.insert(Vec::new());
        Ok(LayerTree {
            root,
            root_path: root_path.to_owned(),
            parent_cache: None,
            explicit_dirs: DirIndex::default(),
            implicit_dirs,
            opaque: BTreeSet::new(),
            stats: TreeStats { inodes: 1, dirs: 1, ..Default::default() },
            buf: vec![0; 256 * 1024],
        })
    }

    /// Opens directory `dir` (a layer path) without following symlinks. With `create`, missing
    /// components become implicit directories and whiteouts in the way become opaque ones.
    fn open_dir(&mut self, dir: &[u8], create: bool) -> Result<OwnedFd, TreeError> {
        let mut cur =
            rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty()).map_err(io_err("open", b""))?;
        if dir.is_empty() {
            return Ok(cur);
        }
        let mut end = 0;
        for comp in dir.split(|&b| b == b'/') {
            end += comp.len();
            let prefix = &dir[..end];
            end += 1;
            cur = match rustix::fs::openat(&cur, os(comp), DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    self.mkdir_implicit(&cur, comp, prefix)?;
                    rustix::fs::openat(&cur, os(comp), DIR_FLAGS, Mode::empty())
                        .map_err(io_err("open", prefix))?
                }
                Err(Errno::NOTDIR | Errno::LOOP) if create => {
                    let st = rustix::fs::statat(&cur, os(comp), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(io_err("stat", prefix))?;
                    if !is_whiteout(&st) {
                        return Err(TreeError::ParentNotDir(super::path::display(prefix)));
                    }
                    // Whited out, then used as a parent in the same layer: the directory is
                    // new here and hides the lower one.
                    rustix::fs::unlinkat(&cur, os(comp), AtFlags::empty())
                        .map_err(io_err("unlink", prefix))?;
                    self.stats.inodes -= 1;
                    self.mkdir_implicit(&cur, comp, prefix)?;
                    self.opaque.insert(prefix.to_vec());
                    rustix::fs::openat(&cur, os(comp), DIR_FLAGS, Mode::empty())
                        .map_err(io_err("open", prefix))?
                }
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    return Err(TreeError::ParentNotDir(super::path::display(prefix)));
                }
                Err(e) => return Err(io_err("open", prefix)(e)),
            };
        }
        Ok(cur)
    }

    fn mkdir_implicit(&mut self, parent: &OwnedFd, name: &[u8], path: &[u8]) -> Result<(), TreeError> {
        rustix::fs::mkdirat(parent, os(name), Mode::from_raw_mode(0o755)).map_err(io_err("mkdir", path))?;
        self.implicit_dirs.insert(path.to_vec());
        self.count_new(name, true);
        Ok(())
    }

    fn count_new(&mut self, name: &[u8], dir: bool) {
        self.stats.inodes += 1;
        self.stats.dirent_bytes += (8 + name.len() as u64).next_multiple_of(4);
        if dir {
            self.stats.dirs += 1;
        }
    }

    /// The parent's fd (cached for runs of entries in one directory) and the final name.
    fn parent<'p>(&mut self, path: &'p [u8]) -> Result<(OwnedFd, &'p [u8]), TreeError> {
        let (parent, name) = split_parent(path);
        let dup_err = |e| TreeError::Io { op: "dup", path: super::path::display(parent), source: e };
        if let Some((cached, fd)) = &self.parent_cache
            && cached == parent
        {
            return Ok((fd.try_clone().map_err(dup_err)?, name));
        }
        let fd = self.open_dir(parent, true)?;
        let clone = fd.try_clone().map_err(dup_err)?;
        self.parent_cache = Some((parent.to_vec(), clone));
        Ok((fd, name))
    }

    /// Clears whatever is at `name` in `parent` so a new entry can take its place. Returns
    /// what was there.
    fn clear(&mut self, parent: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<NodeKind, TreeError> {
        let st = match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(NodeKind::Missing),
            Err(e) => return Err(io_err("stat", path)(e)),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let full = self.root_path.join(os(path));
            std::fs::remove_dir_all(&full).map_err(|e| TreeError::Io {
                op: "remove",
                path: super::path::display(path),
                source: e,
            })?;
            let under = |p: &Vec<u8>| p == path || (p.starts_with(path) && p.get(path.len()) == Some(&b'/'));
            self.implicit_dirs.retain(|p| !under(p));
            self.opaque.retain(|p| !under(p));
            self.explicit_dirs.retain(|p| !under(p));
            self.parent_cache = None;
            Ok(NodeKind::Dir)
        } else {
            rustix::fs::unlinkat(parent, os(name), AtFlags::empty()).map_err(io_err("unlink", path))?;
            Ok(NodeKind::NonDir)
        }
    }

    /// A directory entry.
    pub fn write_dir(&mut self, path: &[u8], meta: EntryMeta) -> Result<(), TreeError> {
        if path.is_empty() {
            self.implicit_dirs.remove(path);
            self.explicit_dirs.insert(Vec::new(), meta);
            return Ok(());
        }
        let (parent, name) = self.parent(path)?;
        match rustix::fs::statat(&parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(st) => {
                if is_whiteout(&st) {
                    self.opaque.insert(path.to_vec());
                }
                rustix::fs::unlinkat(&parent, os(name), AtFlags::empty()).map_err(io_err("unlink", path))?;
                rustix::fs::mkdirat(&parent, os(name), Mode::from_raw_mode(0o700))
                    .map_err(io_err("mkdir", path))?;
                self.stats.dirs += 1;
            }
            Err(Errno::NOENT) => {
                rustix::fs::mkdirat(&parent, os(name), Mode::from_raw_mode(0o700))
                    .map_err(io_err("mkdir", path))?;
                self.count_new(name, true);
            }
            Err(e) => return Err(io_err("stat", path)(e)),
        }
        self.implicit_dirs.remove(path);
        self.explicit_dirs.insert(path.to_vec(), meta);
        Ok(())
    }

    /// A regular file; its data is read from `data`, runs of zero blocks become holes.
    pub fn write_file(
        &mut self,
        path: &[u8],
        meta: &EntryMeta,
        data: &mut dyn Read,
    ) -> Result<(), TreeError> {
        let (parent, name) = self.non_dir_slot(path)?;
        let fd = rustix::fs::openat(
            &parent,
            os(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err("create", path))?;
        let file = File::from(fd);
        let mut offset = 0u64;
        loop {
            let n = read_full(data, &mut self.buf).map_err(TreeError::Data)?;
            if n == 0 {
                break;
            }
            let chunk = &self.buf[..n];
            let mut i = 0;
            while i < n {
                let end = (i + BLOCK as usize).min(n);
                if chunk[i..end].iter().all(|&b| b == 0) {
                    i = end;
                    continue;
                }
                let mut j = end;
                while j < n {
                    let e = (j + BLOCK as usize).min(n);
                    if chunk[j..e].iter().all(|&b| b == 0) {
                        break;
                    }
                    j = e;
                }
                file.write_all_at(&chunk[i..j], offset + i as u64).map_err(|e| TreeError::Io {
                    op: "write",
                    path: super::path::display(path),
                    source: e,
                })?;
                self.stats.data_blocks += (j - i).div_ceil(BLOCK as usize) as u64;
                i = j;
            }
            offset += n as u64;
        }
        file.set_len(offset).map_err(|e| TreeError::Io {
            op: "truncate",
            path: super::path::display(path),
            source: e,
        })?;
        self.stats.file_bytes += offset;
        self.count_new(name, false);
        self.apply_fd_meta(file.as_fd(), path, meta, false)
    }

    /// A symbolic link; its target is stored as given and never resolved.
    pub fn write_symlink(&mut self, path: &[u8], target: &[u8], meta: &EntryMeta) -> Result<(), TreeError> {
        let (parent, name) = self.non_dir_slot(path)?;
        rustix::fs::symlinkat(os(target), &parent, os(name)).map_err(io_err("symlink", path))?;
        if target.len() >= 60 {
            self.stats.extra_blocks += 1;
        }
        self.count_new(name, false);
        self.apply_at_meta(&parent, name, path, meta, false)
    }

    /// A FIFO or device node.
    pub fn write_node(&mut self, path: &[u8], node: NodeType, meta: &EntryMeta) -> Result<(), TreeError> {
        let (parent, name) = self.non_dir_slot(path)?;
        let (ft, dev) = match node {
            NodeType::Fifo => (FileType::Fifo, 0),
            NodeType::Char { major, minor } => (FileType::CharacterDevice, makedev(major, minor)),
            NodeType::Block { major, minor } => (FileType::BlockDevice, makedev(major, minor)),
        };
        rustix::fs::mknodat(&parent, os(name), ft, Mode::from_raw_mode(0o600), dev)
            .map_err(io_err("mknod", path))?;
        self.count_new(name, false);
        self.apply_at_meta(&parent, name, path, meta, true)
    }

    /// A hardlink to `target`, which must be an earlier non-directory entry of this layer.
    pub fn write_hardlink(&mut self, path: &[u8], target: &[u8]) -> Result<(), TreeError> {
        let bad = || TreeError::BadHardlink(super::path::display(target));
        let (tparent, tname) = split_parent(target);
        if tname.is_empty() {
            return Err(bad());
        }
        let tdir = self.open_dir(tparent, false).map_err(|_| bad())?;
        let st = rustix::fs::statat(&tdir, os(tname), AtFlags::SYMLINK_NOFOLLOW).map_err(|_| bad())?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory || is_whiteout(&st) {
            return Err(bad());
        }
        if target == path {
            return Ok(());
        }
        let (parent, name) = self.non_dir_slot(path)?;
        rustix::fs::linkat(&tdir, os(tname), &parent, os(name), AtFlags::empty())
            .map_err(io_err("link", path))?;
        self.stats.dirent_bytes += (8 + name.len() as u64).next_multiple_of(4);
        Ok(())
    }

    /// `.wh.NAME`: an overlayfs whiteout (char 0:0), unless this layer already has an entry
    /// there: the whiteout then applies to lower layers only (OCI image spec), which for a
    /// directory means it becomes opaque.
    pub fn write_whiteout(&mut self, path: &[u8], mtime_sec: i64) -> Result<(), TreeError> {
        if path.is_empty() {
            return Err(TreeError::RootNotDir);
        }
        let (parent, name) = self.parent(path)?;
        match rustix::fs::statat(&parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                self.opaque.insert(path.to_vec());
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(Errno::NOENT) => {
                rustix::fs::mknodat(&parent, os(name), FileType::CharacterDevice, Mode::empty(), 0)
                    .map_err(io_err("mknod", path))?;
                self.count_new(name, false);
                let meta =
                    EntryMeta { mode: 0, uid: 0, gid: 0, mtime_sec, mtime_nsec: 0, xattrs: Vec::new() };
                self.apply_at_meta(&parent, name, path, &meta, true)
            }
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }

    /// `.wh..wh..opq` in `dir`.
    pub fn write_opaque(&mut self, dir: &[u8]) -> Result<(), TreeError> {
        self.open_dir(dir, true).map_err(|e| match e {
            TreeError::ParentNotDir(_) => TreeError::OpaqueOnNonDir(super::path::display(dir)),
            e => e,
        })?;
        self.opaque.insert(dir.to_vec());
        Ok(())
    }

    /// Makes room for a non-directory at `path` and returns its parent and name.
    fn non_dir_slot<'p>(&mut self, path: &'p [u8]) -> Result<(OwnedFd, &'p [u8]), TreeError> {
        if path.is_empty() {
            return Err(TreeError::RootNotDir);
        }
        let (parent, name) = self.parent(path)?;
        self.clear(parent.as_fd(), name, path)?;
        Ok((parent, name))
    }

    fn set_xattrs(
        &mut self,
        path: &[u8],
        xattrs: &[(Vec<u8>, Vec<u8>)],
        mut set: impl FnMut(&[u8], &[u8]) -> Result<(), Errno>,
    ) -> Result<(), TreeError> {
        // mkfs.erofs and mke2fs store xattrs in the order `llistxattr` gives. tmpfs (≥ 6.6, the
        // only kind vmrootfs stages on) lists them by descending name whatever the insertion
        // order; a disk filesystem usually in insertion order. Setting them in descending
        // order makes both agree, so blobs do not depend on where the tree was staged.
        let mut sorted: Vec<&(Vec<u8>, Vec<u8>)> =
            xattrs.iter().filter(|(k, _)| !is_reserved_xattr(k)).collect();
        sorted.sort_by(|a, b| b.0.cmp(&a.0));
        let mut bytes = 0u64;
        for (k, v) in sorted {
            set(k, v).map_err(io_err("setxattr", path))?;
            bytes += (k.len() + v.len() + 20) as u64;
        }
        // ext4 keeps about 100 bytes of xattrs in a 256-byte inode; more takes a block.
        if bytes > 96 {
            self.stats.extra_blocks += 1;
        }
        Ok(())
    }

    fn apply_fd_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        path: &[u8],
        meta: &DirMeta,
        opaque: bool,
    ) -> Result<(), TreeError> {
        rustix::fs::fchown(fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
            .map_err(io_err("chown", path))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777)).map_err(io_err("chmod", path))?;
        self.set_xattrs(path, &meta.xattrs, |k, v| rustix::fs::fsetxattr(fd, k, v, XattrFlags::empty()))?;
        if opaque {
            rustix::fs::fsetxattr(fd, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(io_err("setxattr", path))?;
        }
        rustix::fs::futimens(fd, &staging_times(meta.mtime_sec, meta.mtime_nsec))
            .map_err(io_err("utimens", path))
    }

    /// Metadata for entries that cannot be opened for writing (symlinks, nodes).
    fn apply_at_meta(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        path: &[u8],
        meta: &EntryMeta,
        chmod: bool,
    ) -> Result<(), TreeError> {
        rustix::fs::chownat(
            parent,
            os(name),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io_err("chown", path))?;
        if chmod {
            rustix::fs::chmodat(parent, os(name), Mode::from_raw_mode(meta.mode & 0o7777), AtFlags::empty())
                .map_err(io_err("chmod", path))?;
        }
        if !meta.xattrs.is_empty() {
            let proc_path = proc_fd_path(parent.as_fd(), name);
            self.set_xattrs(path, &meta.xattrs, |k, v| {
                rustix::fs::lsetxattr(&proc_path, k, v, XattrFlags::empty())
            })?;
        }
        rustix::fs::utimensat(
            parent,
            os(name),
            &staging_times(meta.mtime_sec, meta.mtime_nsec),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io_err("utimens", path))
    }

    /// What `path` is in this layer's tree (for [`DirIndex::apply_layer`]).
    pub fn kind_of(&mut self, path: &[u8]) -> NodeKind {
        let (parent, name) = split_parent(path);
        let Ok(dir) = self.open_dir(parent, false) else {
            return NodeKind::Missing;
        };
        match rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => NodeKind::Dir,
            Ok(_) => NodeKind::NonDir,
            Err(_) => NodeKind::Missing,
        }
    }

    /// Gives every directory its final metadata — implicit ones what `lower` (the merged view
    /// of the layers below) says — and marks opaque directories.
    pub fn finish(&mut self, lower: &DirIndex) -> Result<FinishedTree, TreeError> {
        self.parent_cache = None;
        let mut dirs = DirIndex::default();
        for path in std::mem::take(&mut self.implicit_dirs) {
            let meta = lower.get(&path).cloned().unwrap_or_else(DirMeta::fallback);
            dirs.insert(path, meta);
        }
        for (path, meta) in std::mem::take(&mut self.explicit_dirs).into_entries() {
            let mut meta = meta;
            meta.xattrs.retain(|(k, _)| !is_reserved_xattr(k));
            meta.xattrs.sort();
            dirs.insert(path, meta);
        }
        for (path, meta) in dirs.iter() {
            let fd = self.open_dir(path, false)?;
            let fd = rustix::fs::openat(
                &fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err("open", path))?;
            let opaque = self.opaque.contains(path);
            self.apply_fd_meta(fd.as_fd(), path, meta, opaque)?;
        }
        Ok(FinishedTree { dirs, opaque: self.opaque.clone(), stats: self.stats })
    }
}

/// `/proc/self/fd/N/name`: reaches `name` inside an already-opened directory without
/// resolving the directory's path again (used for `lsetxattr` on symlinks and nodes).
fn proc_fd_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(os(name));
    p
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn meta(mode: u32) -> EntryMeta {
        EntryMeta { mode, uid: 0, gid: 0, mtime_sec: 1_700_000_000, mtime_nsec: 123, xattrs: Vec::new() }
    }

    #[test]
    fn zero_blocks_become_holes_and_content_survives() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::new(dir.path()).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[600_000..600_010].copy_from_slice(b"0123456789");
        tree.write_file(b"sparse", &meta(0o644), &mut &data[..]).unwrap();
        let path = dir.path().join("sparse");
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (m.mtime(), m.mtime_nsec(), m.atime()),
            (1_700_000_000, 123, 123),
            "atime carries mtime's ns"
        );
        assert!(
            m.blocks() * 512 <= 2 * BLOCK,
            "only the written block is allocated: {} bytes",
            m.blocks() * 512
        );
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn implicit_parents_take_lower_metadata_on_finish() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::new(dir.path()).unwrap();
        tree.write_file(b"usr/bin/tool", &meta(0o755), &mut &b"x"[..]).unwrap();
        tree.write_dir(b"usr/lib", meta(0o700)).unwrap();
        let mut lower = DirIndex::default();
        let usr = DirMeta { mode: 0o751, uid: 7, gid: 8, mtime_sec: 42, mtime_nsec: 0, xattrs: vec![] };
        lower.insert(b"usr".to_vec(), usr.clone());
        let finished = tree.finish(&lower).unwrap();
        assert_eq!(finished.dirs.get(b"usr"), Some(&usr));
        assert_eq!(finished.dirs.get(b"usr/bin"), Some(&DirMeta::fallback()), "unknown below: fallback");
        assert_eq!(finished.dirs.get(b"usr/lib").unwrap().mode, 0o700, "explicit entries keep their own");
        let m = std::fs::metadata(dir.path().join("usr")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid(), m.mtime()), (0o751, 7, 8, 42));
    }

    #[test]
    fn whiteout_then_child_makes_an_opaque_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::new(dir.path()).unwrap();
        tree.write_whiteout(b"d", 0).unwrap();
        tree.write_file(b"d/new", &meta(0o644), &mut &b"x"[..]).unwrap();
        let finished = tree.finish(&DirIndex::default()).unwrap();
        assert!(finished.opaque.contains(b"d".as_slice()));
        let opaque =
            rustix::fs::getxattr(dir.path().join("d"), "trusted.overlay.opaque", &mut [0u8; 8]).unwrap();
        assert_eq!(opaque, 1);
    }

    #[test]
    fn reserved_overlay_xattrs_from_a_tar_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::new(dir.path()).unwrap();
        let mut m = meta(0o644);
        m.xattrs = vec![
            (b"trusted.overlay.redirect".to_vec(), b"/etc".to_vec()),
            (b"user.kept".to_vec(), b"v".to_vec()),
        ];
        tree.write_file(b"f", &m, &mut &b"x"[..]).unwrap();
        let p = dir.path().join("f");
        assert!(rustix::fs::getxattr(&p, "trusted.overlay.redirect", &mut [0u8; 16]).is_err());
        assert_eq!(rustix::fs::getxattr(&p, "user.kept", &mut [0u8; 16]).unwrap(), 1);
    }
}

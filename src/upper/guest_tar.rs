//! `vmrootfs guest-tar DIR`, run in `commit`'s guest (see [`crate::commit`]): writes the
//! overlayfs upper directory DIR to stdout as an OCI layer tar, in the crate's own pax form
//! (`layer::pax`, the tar every layer is normalized into).
//!
//! What overlayfs keeps in an upper becomes what the OCI layer format says: a whiteout (a
//! character device 0:0) becomes an empty `.wh.NAME`, an opaque directory
//! (`trusted.overlay.opaque` or `user.overlay.opaque` = `y`) the directory and a
//! `DIR/.wh..wh..opq`; everything else goes with its owner, mode, mtime (ns), xattrs
//! (the overlay's own dropped), device numbers and hardlinks (a file's second path and on are
//! hardlinks to its first). A redirect or metacopy xattr is refused: `run` mounts the overlay
//! without them, so one is a crafted upper. Sockets cannot be in a tar and are left out, said
//! on stderr.
//!
//! With `extents`, a regular file's data is not copied but named: where it lies on the upper
//! drive ([`super::extent_tar`]); the host reads it from the upper file.
//!
//! The host trusts none of this: the tar goes through the same normalizer and checks as any
//! layer (see [`crate::commit`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::layer::meta::EntryMeta;
use crate::layer::pax::{TarKind, TarWriter};

/// What an entry of the upper becomes in the layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Written as it is (with the overlay's xattrs dropped).
    Keep,
    /// A whiteout: an empty `.wh.NAME` in its place.
    Whiteout,
    /// An opaque directory: the directory, then `.wh..wh..opq` in it.
    OpaqueDir,
    /// Left out, with the reason (a socket).
    Skip(&'static str),
    /// Refused: the upper uses an overlayfs feature `run` turns off.
    Refuse(&'static str),
}

/// The kind of an upper entry, as [`decide`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperKind {
    /// A directory.
    Dir,
    /// A character device with its device number.
    Char {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A socket.
    Socket,
    /// Anything else (files, symlinks, block devices, FIFOs).
    Other,
}

/// What the entry of `kind` with `xattrs` becomes in the layer.
pub fn decide(kind: UpperKind, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Decision {
    let get = |name: &[u8]| xattrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
    for feature in ["redirect", "metacopy"] {
        for ns in ["trusted", "user"] {
            if get(format!("{ns}.overlay.{feature}").as_bytes()).is_some() {
                return Decision::Refuse(if feature == "redirect" {
                    "an overlayfs redirect (run mounts the upper with redirect_dir=off)"
                } else {
                    "an overlayfs metacopy file (run mounts the upper with metacopy=off)"
                });
            }
        }
    }
    match kind {
        UpperKind::Char { major: 0, minor: 0 } => Decision::Whiteout,
        UpperKind::Dir
            if get(b"trusted.overlay.opaque") == Some(b"y") || get(b"user.overlay.opaque") == Some(b"y") =>
        {
            Decision::OpaqueDir
        }
        UpperKind::Socket => Decision::Skip("a socket cannot be in a tar"),
        _ => Decision::Keep,
    }
}

/// Why the upper could not be written out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestTarError {
    /// Reading an entry or writing the tar failed.
    #[error("{path}")]
    Io {
        /// The entry (or `-` for stdout).
        path: std::path::PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// An entry the layer cannot hold.
    #[error("{path}: {why}")]
    Refused {
        /// The entry.
        path: std::path::PathBuf,
        /// Why.
        why: &'static str,
    },
}

/// Writes the upper directory `root` to `out` as a layer tar; with `extents`, regular files
/// whose data ext4 keeps in plain blocks as extent references ([`super::extent_tar`]).
pub fn write_upper(root: &Path, out: impl Write, extents: bool) -> Result<(), GuestTarError> {
    let mut w = Walk { tar: TarWriter::new(out), links: HashMap::new(), buf: vec![0; 1 << 20], extents };
    w.dir(root, &[])?;
    w.tar.finish().map_err(|source| GuestTarError::Io { path: "-".into(), source })?;
    Ok(())
}

struct Walk<W: Write> {
    tar: TarWriter<W>,
    /// (device, inode) of files with more than one link → the layer path written first.
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
    /// Name regular files' data by extents instead of copying it.
    extents: bool,
}

impl<W: Write> Walk<W> {
    /// Writes the entries of the directory `dir` (layer path `rel`), sorted by name.
    fn dir(&mut self, dir: &Path, rel: &[u8]) -> Result<(), GuestTarError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| GuestTarError::Io { path, source }
        };
        let mut names: Vec<_> = fs_err::read_dir(dir)
            .map_err(io(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(dir))?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let child: Vec<u8> =
                if rel.is_empty() { name.as_bytes().to_vec() } else { [rel, b"/", name.as_bytes()].concat() };
            self.entry(&path, &child, name.as_bytes())?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &[u8], name: &[u8]) -> Result<(), GuestTarError> {
        let io = |source| GuestTarError::Io { path: path.to_owned(), source };
        let out = |source| GuestTarError::Io { path: "-".into(), source };
        let m = fs_err::symlink_metadata(path).map_err(io)?;
        let ft = m.file_type();
        let (major, minor) = (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()));
        let kind = if ft.is_dir() {
            UpperKind::Dir
        } else if ft.is_char_device() {
            UpperKind::Char { major, minor }
        } else if ft.is_socket() {
            UpperKind::Socket
        } else {
            UpperKind::Other
        };
        let xattrs = read_xattrs(path).map_err(io)?;
        let mut meta = EntryMeta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            xattrs: xattrs
                .iter()
                .filter(|(n, _)| !crate::layer::meta::is_reserved_xattr(n))
                .cloned()
                .collect(),
        };
        match decide(kind, &xattrs) {
            Decision::Refuse(why) => return Err(GuestTarError::Refused { path: path.to_owned(), why }),
            Decision::Skip(why) => {
                eprintln!("vmrootfs guest-tar: {} left out: {why}", path.display());
                return Ok(());
            }
            Decision::Whiteout => {
                let parent = &rel[..rel.len() - name.len()];
                let wh = [parent, b".wh.", name].concat();
                meta.xattrs.clear();
                return self.tar.header(&wh, TarKind::File { size: 0 }, &meta).map_err(out);
            }
            Decision::OpaqueDir => {
                self.tar.header(rel, TarKind::Dir, &meta).map_err(out)?;
                let marker = [rel, b"/.wh..wh..opq"].concat();
                let marker_meta = EntryMeta { mode: 0o644, xattrs: Vec::new(), ..meta };
                self.tar.header(&marker, TarKind::File { size: 0 }, &marker_meta).map_err(out)?;
                return self.dir(path, rel);
            }
            Decision::Keep => {}
        }
        if ft.is_dir() {
            self.tar.header(rel, TarKind::Dir, &meta).map_err(out)?;
            return self.dir(path, rel);
        }
        if m.nlink() > 1 {
            match self.links.get(&(m.dev(), m.ino())) {
                Some(first) => {
                    let first = first.clone();
                    return self.tar.header(rel, TarKind::Hardlink(&first), &meta).map_err(out);
                }
                None => {
                    self.links.insert((m.dev(), m.ino()), rel.to_vec());
                }
            }
        }
        if ft.is_symlink() {
            let target = fs_err::read_link(path).map_err(io)?;
            return self.tar.header(rel, TarKind::Symlink(target.as_os_str().as_bytes()), &meta).map_err(out);
        }
        let special = if ft.is_char_device() {
            Some(TarKind::Char { major, minor })
        } else if ft.is_block_device() {
            Some(TarKind::Block { major, minor })
        } else if ft.is_fifo() {
            Some(TarKind::Fifo)
        } else {
            None
        };
        if let Some(kind) = special {
            return self.tar.header(rel, kind, &meta).map_err(out);
        }
        let size = m.len();
        let mut file = fs_err::File::open(path).map_err(io)?;
        // Only a size ustar can hold goes by extents (the host writes it into the header).
        if self.extents
            && (1..=0o77777777777).contains(&size)
            && let Some(extents) = super::extent_tar::file_extents(file.file(), size).map_err(io)?
        {
            let value = super::extent_tar::encode(size, &extents);
            let named = [(super::extent_tar::EXTENTS_KEY, value.as_slice())];
            return self.tar.header_with_records(rel, TarKind::File { size: 0 }, &meta, &named).map_err(out);
        }
        self.tar.header(rel, TarKind::File { size }, &meta).map_err(out)?;
        let mut left = size;
        while left > 0 {
            let want = self.buf.len().min(left as usize);
            let n = file.read(&mut self.buf[..want]).map_err(io)?;
            if n == 0 {
                // The header promised `size` bytes: a file that shrank is an error, not a
                // short entry that would shift every entry after it.
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while read",
                )));
            }
            self.tar.data(&self.buf[..n]).map_err(out)?;
            left -= n as u64;
        }
        self.tar.pad(size).map_err(out)
    }
}

/// The entry's xattrs, sorted by name.
fn read_xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names)?;
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(path, name, &mut value)?;
        value.truncate(len);
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_markers_become_layer_markers() {
        let x = |n: &str, v: &str| vec![(n.as_bytes().to_vec(), v.as_bytes().to_vec())];
        let file = UpperKind::Other;
        type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;
        let table: Vec<(UpperKind, Xattrs, Decision)> = vec![
            (UpperKind::Char { major: 0, minor: 0 }, vec![], Decision::Whiteout),
            (UpperKind::Char { major: 1, minor: 3 }, vec![], Decision::Keep),
            (UpperKind::Dir, x("trusted.overlay.opaque", "y"), Decision::OpaqueDir),
            (UpperKind::Dir, x("user.overlay.opaque", "y"), Decision::OpaqueDir),
            (UpperKind::Dir, x("trusted.overlay.opaque", "x"), Decision::Keep),
            (UpperKind::Dir, x("user.other", "y"), Decision::Keep),
            (file, x("trusted.overlay.opaque", "y"), Decision::Keep),
            (UpperKind::Socket, vec![], Decision::Skip("a socket cannot be in a tar")),
        ];
        for (kind, xattrs, want) in table {
            assert_eq!(decide(kind, &xattrs), want, "{kind:?} {xattrs:?}");
        }
        assert!(matches!(decide(UpperKind::Dir, &x("trusted.overlay.redirect", "/a")), Decision::Refuse(_)));
        assert!(matches!(decide(file, &x("user.overlay.metacopy", "")), Decision::Refuse(_)));
    }

    #[test]
    fn an_upper_tree_becomes_a_layer_tar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs_err::create_dir(root.join("etc")).unwrap();
        fs_err::write(root.join("etc/hosts"), b"127.0.0.1 here\n").unwrap();
        fs_err::hard_link(root.join("etc/hosts"), root.join("etc/hosts2")).unwrap();
        std::os::unix::fs::symlink("../etc/hosts", root.join("link")).unwrap();
        let mut tar = Vec::new();
        write_upper(root, &mut tar, false).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, tar::EntryType, String)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let link = e.link_name().unwrap().map(|l| l.display().to_string()).unwrap_or_default();
                (e.path().unwrap().display().to_string(), e.header().entry_type(), link)
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("etc/".to_string(), tar::EntryType::Directory, String::new()),
                ("etc/hosts".into(), tar::EntryType::Regular, String::new()),
                ("etc/hosts2".into(), tar::EntryType::Link, "etc/hosts".into()),
                ("link".into(), tar::EntryType::Symlink, "../etc/hosts".into()),
            ]
        );
    }
}

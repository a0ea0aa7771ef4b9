//! Filesystem backends: one layer's normalized entries → one image file, made as the entries
//! come ([`Making`], the normalizer's output): by vmrootfs's own EROFS and ext4 writers, given
//! each entry on the layer's own thread ([`native`], [`crate::erofs::write`], [`ext4`]), or by
//! `mkfs.erofs --tar=f` reading them as a pax tar ([`crate::layer::pax`]) from a pipe
//! (`VMROOTFS_EROFS_WRITER=mkfs`).

mod block_out;
mod erofs;
mod erofs_native;
mod ext4;
mod native;

pub(crate) use block_out::{BlockOut, PieceError};
pub use ext4::Ext4Error;
pub use native::is_zero;
#[cfg(test)]
pub(crate) use native::peak_heap_per_small_file;
pub mod tool;

use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::layer::meta::EntryMeta;
use crate::layer::normalize::{EntryKind, NormalizeError, Output, data_ended_early};
use crate::layer::pax::{TarKind, TarWriter};
use native::EntryWriter;
use tool::ToolError;

/// Version of the layer → blob recipe of each filesystem ([`FsType::recipe`]). Bump it whenever
/// that filesystem's blob bytes or meaning change; it is part of every stored blob's path
/// (`layers/<fs>-v<N>/`), so blobs of an older recipe stay usable by the records naming them
/// and are collected once unused.
///
/// - 2: made from the normalized stream (erofs-utils ≥ 1.8 `--tar=f`, e2fsprogs ≥ 1.47.1
///   `mke2fs -d TAR`), without root.
/// - 3 (EROFS only): no inlined file tails (`-E noinline_data`), the layout `mkfs.erofs`'
///   rebuild mode takes as a source, so `build --merge` can reference the layer blobs' data;
///   new directories above the base opaque; a base layer keeps no whiteouts or opaque markers
///   (they hide nothing there, and the EROFS image layer format forbids them).
/// - 4 (EROFS only): file data in stream order (`--sort=none`), written once as it arrives
///   instead of moved into path order at the end.
/// - 3 (ext4 only): written by vmrootfs itself ([`ext4`]) in one pass, file data in stream
///   order, no superblock backups, images exactly as large as their content.
/// - 5 (EROFS), 4 (ext4): metadata as applying the layer gives it (issue 17): POSIX ACLs
///   agree with the mode, the last of two PAX records of an xattr wins, `user.*` xattrs are
///   dropped where the kernel refuses them, whiteouts that hide nothing are dropped, old
///   archivers' dataless entries read as GNU tar reads them; ext4 times clamped, not wrapped.
///   Still what `VMROOTFS_EROFS_WRITER=mkfs` makes ([`EROFS_MKFS_RECIPE`]).
/// - 6 (EROFS only): written by vmrootfs itself ([`crate::erofs::write`]) in one pass, the
///   same bytes on every host: file data in stream order as whole blocks, files with zero
///   chunks chunk-based with holes, directories and symlinks inline where they fit, 4 KiB
///   blocks whatever the page size (issue 21).
pub const EROFS_RECIPE: u32 = 6;
/// The recipe of blobs made by `mkfs.erofs` (`VMROOTFS_EROFS_WRITER=mkfs`).
pub const EROFS_MKFS_RECIPE: u32 = 5;
/// The environment variable that picks the EROFS writer: `vmrootfs` (default) or `mkfs`
/// (erofs-utils' `mkfs.erofs`, the reference implementation and the differential check).
pub const EROFS_WRITER_ENV: &str = "VMROOTFS_EROFS_WRITER";
/// The first EROFS recipe without inlined file tails: its blobs and later ones can be merged.
pub const EROFS_MERGEABLE_RECIPE: u32 = 3;
pub const EXT4_RECIPE: u32 = 4;

/// Filesystem type of the blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// EROFS written by vmrootfs itself from the layer stream (or by mkfs.erofs --tar=f,
    /// erofs-utils ≥ 1.8, with `VMROOTFS_EROFS_WRITER=mkfs`), uncompressed.
    Erofs,
    /// ext4 written by vmrootfs itself from the layer stream (no journal, no external tool).
    Ext4,
}

impl FsType {
    /// Its name as `--fs` and the store's directories spell it.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }

    /// The version of this filesystem's layer → blob recipe that new blobs are made with.
    /// Per filesystem: each counts its own changes.
    pub fn recipe(self) -> u32 {
        match self {
            // An unknown writer name builds nothing ([`Backend::detect`] refuses it).
            FsType::Erofs if matches!(erofs_writer(), Ok(ErofsWriter::Mkfs)) => EROFS_MKFS_RECIPE,
            FsType::Erofs => EROFS_RECIPE,
            FsType::Ext4 => EXT4_RECIPE,
        }
    }
}

/// Which program writes EROFS blobs ([`EROFS_WRITER_ENV`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErofsWriter {
    /// vmrootfs's own writer ([`crate::erofs::write`]), recipe [`EROFS_RECIPE`].
    Vmrootfs,
    /// `mkfs.erofs --tar=f`, recipe [`EROFS_MKFS_RECIPE`].
    Mkfs,
}

/// The EROFS writer [`EROFS_WRITER_ENV`] picks.
pub fn erofs_writer() -> Result<ErofsWriter, ToolError> {
    match std::env::var(EROFS_WRITER_ENV).as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("vmrootfs") => Ok(ErofsWriter::Vmrootfs),
        Ok("mkfs") => Ok(ErofsWriter::Mkfs),
        Ok(other) => Err(ToolError::UnknownErofsWriter { value: other.to_owned() }),
        Err(std::env::VarError::NotUnicode(v)) => {
            Err(ToolError::UnknownErofsWriter { value: v.to_string_lossy().into_owned() })
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Making an image failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error(transparent)]
    Erofs(#[from] crate::erofs::write::ErofsError),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The filesystem of `path` filled up while a tool wrote it: the tool's later complaints
    /// (checksums of what it could not write) are consequences, logged with `-v`.
    #[error("writing {path}")]
    NoSpace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the free space of {path}")]
    FreeSpace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fixing up {path}")]
    Fixup {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A backend with its tools found and checked.
#[derive(Debug, Clone)]
pub enum Backend {
    /// EROFS by `mkfs.erofs`.
    Erofs(erofs::Erofs),
    /// EROFS by vmrootfs.
    ErofsNative(erofs_native::ErofsNative),
    /// ext4 blobs.
    Ext4(ext4::Ext4),
}

impl Backend {
    /// Locates and version-checks the tools `fs` needs.
    pub fn detect(fs: FsType) -> Result<Backend, ToolError> {
        Ok(match fs {
            FsType::Erofs => match erofs_writer()? {
                ErofsWriter::Vmrootfs => Backend::ErofsNative(erofs_native::ErofsNative),
                ErofsWriter::Mkfs => Backend::Erofs(erofs::Erofs::detect()?),
            },
            FsType::Ext4 => Backend::Ext4(ext4::Ext4),
        })
    }

    /// The filesystem it makes.
    pub fn fs(&self) -> FsType {
        match self {
            Backend::Erofs(_) | Backend::ErofsNative(_) => FsType::Erofs,
            Backend::Ext4(_) => FsType::Ext4,
        }
    }

    /// Tool names and versions, for logs and benchmarks.
    pub fn describe(&self) -> String {
        match self {
            Backend::Erofs(b) => b.describe(),
            Backend::ErofsNative(b) => b.describe(),
            Backend::Ext4(b) => b.describe(),
        }
    }

    /// Whether a repeated entry's xattrs are added to those the entry has (`mkfs.erofs
    /// --tar`), rather than replacing them (vmrootfs's writers).
    pub fn adds_repeated_xattrs(&self) -> bool {
        matches!(self, Backend::Erofs(_))
    }

    /// The most bytes of file data a layer made in `dir` may hold, holes included, when this
    /// backend writes holes as zeros (mkfs.erofs' tar mode does): the free space of `dir`'s
    /// filesystem, which a layer must never fill. `None` when holes stay holes (vmrootfs's
    /// own writers).
    pub fn data_room(&self, dir: &Path) -> Result<Option<u64>, BackendError> {
        match self {
            Backend::Erofs(_) => {
                let st = rustix::fs::statvfs(dir)
                    .map_err(|e| BackendError::FreeSpace { path: dir.to_owned(), source: e.into() })?;
                Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
            }
            Backend::ErofsNative(_) | Backend::Ext4(_) => Ok(None),
        }
    }

    /// Starts making the image `out` of one layer's normalized stream, which the caller then
    /// puts into the returned [`Making`] (a normalizer's [`Output`]). `chain_id` seeds the UUID
    /// and hash seed, so the same stack gives the same bytes.
    pub fn start(&self, chain_id: &Digest, out: &Path) -> Result<Making, BackendError> {
        let job = match self {
            Backend::Erofs(b) => {
                let streaming = b.start(chain_id, out)?;
                Job::Tool(b.clone(), TarWriter::new(BufWriter::with_capacity(1 << 20, streaming)))
            }
            Backend::ErofsNative(b) => Job::Erofs(b.create(chain_id, out)?),
            Backend::Ext4(b) => Job::Ext4(b.create(chain_id, out)?),
        };
        Ok(Making { job, out: out.to_owned(), failed: None })
    }
}

/// An image being made: the normalizer's [`Output`], then [`Making::finish`].
pub struct Making {
    job: Job,
    out: PathBuf,
    /// The error a writer of vmrootfs's stopped with, for [`Making::failure`] (the normalizer
    /// is only told that writing failed).
    failed: Option<BackendError>,
}

enum Job {
    /// `mkfs.erofs` reading the stream as a pax tar from a pipe.
    Tool(erofs::Erofs, TarWriter<BufWriter<tool::Streaming>>),
    /// vmrootfs's EROFS writer, given each entry on the layer's own thread: a file's data read
    /// from the layer straight into its blocks, no tar in between.
    Erofs(crate::erofs::write::ImageWriter),
    /// vmrootfs's ext4 writer, likewise.
    Ext4(ext4::image::ImageWriter),
}

impl Making {
    /// Finishes the image (a writer of vmrootfs's writes its metadata now).
    pub fn finish(self) -> Result<(), BackendError> {
        let result = match self.job {
            Job::Tool(b, tar) => b.finish(tar.into_inner().into_parts().0, &self.out),
            Job::Erofs(w) => EntryWriter::finish(w),
            Job::Ext4(w) => EntryWriter::finish(w),
        };
        result.map_err(|e| at_output(&self.out, e))
    }

    /// After a failed write: the writer's own error (mkfs exited, the disk is full), when it
    /// stopped with one.
    pub fn failure(self) -> Option<BackendError> {
        let failure = match self.job {
            Job::Tool(_, tar) => tar.into_inner().into_parts().0.finish().err().map(BackendError::Tool),
            Job::Erofs(_) | Job::Ext4(_) => self.failed,
        };
        failure.map(|e| at_output(&self.out, e))
    }

    /// Gives an entry to a writer of vmrootfs's.
    fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), BackendError> {
        match &mut self.job {
            Job::Erofs(w) => EntryWriter::add(w, path, entry, meta),
            Job::Ext4(w) => EntryWriter::add(w, path, entry, meta),
            Job::Tool(..) => unreachable!("a tool takes the tar stream"),
        }
    }

    /// Keeps a writer's error for [`Making::failure`]; the normalizer's error for it.
    fn stopped(&mut self, e: BackendError) -> NormalizeError {
        let told = NormalizeError::Write(std::io::Error::other(e.to_string()));
        self.failed = Some(e);
        told
    }
}

impl Output for Making {
    fn entry(&mut self, path: &[u8], kind: TarKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError> {
        if let Job::Tool(_, tar) = &mut self.job {
            return tar.entry(path, kind, meta);
        }
        let entry = match kind {
            TarKind::Dir => EntryKind::Dir,
            TarKind::Symlink(target) => EntryKind::Symlink(target),
            TarKind::Hardlink(target) => EntryKind::Hardlink(target),
            TarKind::Char { major, minor } => EntryKind::Char { major, minor },
            TarKind::Block { major, minor } => EntryKind::Block { major, minor },
            TarKind::Fifo => EntryKind::Fifo,
            TarKind::File { .. } => unreachable!("files come through Output::file"),
        };
        self.add(path, entry, meta).map_err(|e| self.stopped(e))
    }

    fn file(
        &mut self,
        path: &[u8],
        size: u64,
        data: &mut dyn Read,
        meta: &EntryMeta,
    ) -> Result<(), NormalizeError> {
        if let Job::Tool(_, tar) = &mut self.job {
            return tar.file(path, size, data, meta);
        }
        let mut data = Watched { inner: data, left: size, ended: false, error: None };
        let added = self.add(path, EntryKind::File { size, data: &mut data }, meta);
        added.map_err(|e| data.blame().unwrap_or_else(|| self.stopped(e)))
    }

    fn end(&mut self) -> Result<(), NormalizeError> {
        match &mut self.job {
            Job::Tool(_, tar) => tar.end(),
            Job::Erofs(_) | Job::Ext4(_) => Ok(()),
        }
    }
}

/// A file's data on its way from the layer into a writer: whether a failure was the layer's
/// (a read error, or the data ending early) rather than the writer's.
struct Watched<'a> {
    inner: &'a mut dyn Read,
    /// Bytes of the file not read yet.
    left: u64,
    /// A read found the end of the data.
    ended: bool,
    error: Option<std::io::Error>,
}

impl Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.ended |= n == 0 && !buf.is_empty();
                self.left = self.left.saturating_sub(n as u64);
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(kind.into())
            }
        }
    }
}

impl Watched<'_> {
    /// The layer's error behind a writer's failure, if the layer's data was the cause.
    fn blame(self) -> Option<NormalizeError> {
        if let Some(e) = self.error {
            return Some(NormalizeError::Data(e));
        }
        (self.ended && self.left > 0).then(|| NormalizeError::Data(data_ended_early(self.left)))
    }
}

/// `err` of the writer of `out`, naming `out` where the writer did not, and a tool that failed
/// on a full filesystem as the full filesystem (its first cause).
fn at_output(out: &Path, err: BackendError) -> BackendError {
    match err {
        BackendError::Ext4(Ext4Error::Write(source))
        | BackendError::Erofs(crate::erofs::write::ErofsError::Write(source)) => {
            BackendError::Write { path: out.to_owned(), source }
        }
        BackendError::Tool(tool) if filesystem_full(out) => {
            crate::progress::debug(&format!("on the full filesystem: {tool}"));
            BackendError::NoSpace { path: out.to_owned(), source: rustix::io::Errno::NOSPC.into() }
        }
        e => e,
    }
}

/// Free space below which a failed write to a filesystem is taken for a full one: less than
/// one write of a tool's buffer can still land.
const FULL_BELOW: u64 = 1 << 20;

/// Whether the filesystem holding `file` is (nearly) out of blocks or out of inodes.
fn filesystem_full(file: &Path) -> bool {
    let dir = file.parent().unwrap_or(file);
    // A filesystem that cannot even be asked is not known to be full: the tool's error stays.
    rustix::fs::statvfs(dir)
        .is_ok_and(|st| st.f_bavail.saturating_mul(st.f_frsize) < FULL_BELOW || st.f_favail == 0)
}

/// A UUID made from bytes `offset..offset+16` of a sha256 digest, with the version (4) and
/// variant bits set.
pub(crate) fn uuid_bytes(digest: &Digest, offset: usize) -> [u8; 16] {
    let hex = &digest.digest()[offset * 2..offset * 2 + 32];
    let mut b: [u8; 16] =
        std::array::from_fn(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).expect("hex digest"));
    b[6] = 0x40 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x0f);
    b
}

/// [`uuid_bytes`] in its usual spelling (`8-4-4-4-12` hex digits).
fn uuid_from(digest: &Digest, offset: usize) -> String {
    let h: String = uuid_bytes(digest, offset).iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Checks an image with its filesystem's own checker (`fsck.erofs`, `e2fsck -fn`). `devices`
/// are the extra devices of a multi-device EROFS image (a merged image's layer blobs, in
/// device-table order), empty for a self-contained one.
pub fn fsck(fs: FsType, image: &Path, devices: &[PathBuf]) -> Result<(), ToolError> {
    let (tool, mut cmd) = match fs {
        FsType::Erofs => {
            let mut c = tool::Tool::find("fsck.erofs", "erofs-utils", &["-V"], "1.5")?.command();
            for d in devices {
                let mut arg = std::ffi::OsString::from("--device=");
                arg.push(d);
                c.arg(arg);
            }
            ("fsck.erofs", c)
        }
        FsType::Ext4 => {
            let mut c = tool::Tool::find("e2fsck", "e2fsprogs", &["-V"], "1.47.0")?.command();
            c.arg("-fn");
            ("e2fsck", c)
        }
    };
    tool::run(tool, cmd.arg(image)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_io::FailsAfter;

    fn meta() -> EntryMeta {
        EntryMeta { mode: 0o644, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0, xattrs: Vec::new() }
    }

    /// A file handed to one of vmrootfs's writers: a failure of the layer's data is the
    /// layer's error (as the tar output reports it), a refusal of the writer is the writer's,
    /// kept for `failure`.
    #[test]
    fn a_writer_s_failure_and_the_layer_s_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let chain: Digest = crate::digest::sha256_of(b"chain");
        for fs in [FsType::Erofs, FsType::Ext4] {
            let backend = match fs {
                FsType::Erofs => Backend::ErofsNative(erofs_native::ErofsNative),
                FsType::Ext4 => Backend::Ext4(ext4::Ext4),
            };
            let mut making = backend.start(&chain, &dir.path().join(fs.name())).unwrap();
            making.entry(b"", TarKind::Dir, &EntryMeta { mode: 0o755, ..meta() }).unwrap();

            let short = making.file(b"short", 10, &mut &b"12345"[..], &meta()).unwrap_err();
            let NormalizeError::Data(e) = short else { panic!("{fs}: {short:?}") };
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{fs}");
            assert_eq!(e.to_string(), "entry data ends 5 bytes early", "{fs}");

            let broken = making
                .file(
                    b"broken",
                    10,
                    &mut FailsAfter { data: b"123", error: || std::io::ErrorKind::ConnectionReset.into() },
                    &meta(),
                )
                .unwrap_err();
            let NormalizeError::Data(e) = broken else { panic!("{fs}: {broken:?}") };
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{fs}");
            assert!(making.failed.is_none(), "{fs}: the layer's failures are not the writer's");

            let long = [b'n'; 300];
            let refused = making.file(&long, 1, &mut &b"x"[..], &meta()).unwrap_err();
            assert!(matches!(refused, NormalizeError::Write(_)), "{fs}: {refused:?}");
            let own = making.failure().expect("the writer's own error").to_string();
            assert!(own.contains("nnnn"), "{fs}: names the entry: {own}");
        }
    }
}

//! Filesystem backends: one layer's normalized stream (a pax tar, see [`crate::layer::pax`])
//! → one image file, made by an external tool reading the stream: `mkfs.erofs --tar=f` from a
//! pipe; `mke2fs -d` from a spool file (it needs the image size up front, which the stream's
//! counts give only once it has ended).

mod erofs;
mod ext4;

pub use erofs::{Erofs, fix_build_time};
pub mod ext4_fixup;
pub mod tool;

use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::layer::meta::TreeStats;
use tool::ToolError;

/// Version of the layer → blob recipe of each filesystem ([`FsType::recipe`]). Bump it whenever
/// that filesystem's blob bytes or meaning change; it is part of every stored blob's path
/// (`layers/<fs>-v<N>/`), so blobs of an older recipe stay usable by the records naming them
/// and are collected once unused.
///
/// - 2: made from the normalized stream (erofs-utils ≥ 1.8 `--tar=f`, e2fsprogs ≥ 1.47.1
///   `mke2fs -d TAR`), without root. Still ext4's.
/// - 3 (EROFS only): no inlined file tails (`-E noinline_data`), the layout `mkfs.erofs`'
///   rebuild mode takes as a source, so `build --merge` can reference the layer blobs' data;
///   new directories above the base opaque; a base layer keeps no whiteouts or opaque markers
///   (they hide nothing there, and the EROFS image layer format forbids them).
/// - 4 (EROFS only): file data in stream order (`--sort=none`), written once as it arrives
///   instead of moved into path order at the end.
pub const EROFS_RECIPE: u32 = 4;
/// The first EROFS recipe without inlined file tails: its blobs and later ones can be merged.
pub const EROFS_MERGEABLE_RECIPE: u32 = 3;
pub const EXT4_RECIPE: u32 = 2;

/// Filesystem type of the blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// EROFS made with mkfs.erofs --tar=f (erofs-utils ≥ 1.8), uncompressed.
    Erofs,
    /// ext4 made with mke2fs -d from the layer stream (e2fsprogs ≥ 1.47.1), no journal.
    Ext4,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }

    /// The version of this filesystem's layer → blob recipe that new blobs are made with.
    /// Per filesystem: recipes 3 and 4 changed only EROFS blobs, so ext4 stores keep theirs.
    pub fn recipe(self) -> u32 {
        match self {
            FsType::Erofs => EROFS_RECIPE,
            FsType::Ext4 => EXT4_RECIPE,
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
    #[error("writing {path}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("xattr name {name:?} cannot be written to ext4 (debugfs takes names of printable ASCII)")]
    XattrName { name: String },
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
    Erofs(erofs::Erofs),
    Ext4(ext4::Ext4),
}

impl Backend {
    /// Locates and version-checks the tools `fs` needs.
    pub fn detect(fs: FsType) -> Result<Backend, ToolError> {
        Ok(match fs {
            FsType::Erofs => Backend::Erofs(erofs::Erofs::detect()?),
            FsType::Ext4 => Backend::Ext4(ext4::Ext4::detect()?),
        })
    }

    pub fn fs(&self) -> FsType {
        match self {
            Backend::Erofs(_) => FsType::Erofs,
            Backend::Ext4(_) => FsType::Ext4,
        }
    }

    /// Tool names and versions, for logs and benchmarks.
    pub fn describe(&self) -> String {
        match self {
            Backend::Erofs(b) => b.describe(),
            Backend::Ext4(b) => b.describe(),
        }
    }

    /// Starts making the image `out` of one layer's normalized stream, which the caller then
    /// writes into the returned [`Making`]. `chain_id` seeds the UUID and hash seed, so the
    /// same stack gives the same bytes; `tmp` is a private scratch directory.
    pub fn start(&self, chain_id: &Digest, out: &Path, tmp: &Path) -> Result<Making, BackendError> {
        let job = match self {
            Backend::Erofs(b) => Job::Erofs(b.start(chain_id, out)?),
            Backend::Ext4(_) => {
                let path = tmp.join("layer.tar");
                let file = fs_err::File::create(&path)
                    .map_err(|source| BackendError::Spool { path: path.clone(), source })?;
                Job::Ext4 { spool: SparseSpool::new(file.into_parts().0), path }
            }
        };
        Ok(Making {
            backend: self.clone(),
            job,
            chain_id: chain_id.clone(),
            out: out.to_owned(),
            tmp: tmp.to_owned(),
        })
    }
}

/// An image being made: write the normalized stream into it, then [`Making::finish`].
pub struct Making {
    backend: Backend,
    job: Job,
    chain_id: Digest,
    out: PathBuf,
    tmp: PathBuf,
}

enum Job {
    Erofs(tool::Streaming),
    Ext4 { spool: SparseSpool, path: PathBuf },
}

impl Making {
    /// Ends the stream (whose counts are `stats`) and finishes the image.
    pub fn finish(self, stats: &TreeStats) -> Result<(), BackendError> {
        match (self.backend, self.job) {
            (Backend::Erofs(b), Job::Erofs(streaming)) => b.finish(streaming, &self.out),
            (Backend::Ext4(b), Job::Ext4 { spool, path }) => {
                spool.finish().map_err(|source| BackendError::Spool { path: path.clone(), source })?;
                b.make_from_tar(&path, stats, &self.chain_id, &self.out, &self.tmp)
            }
            _ => unreachable!("a job belongs to its backend"),
        }
    }

    /// After a failed write: the tool's own error, when it exited with one.
    pub fn failure(self) -> Option<BackendError> {
        match self.job {
            Job::Erofs(streaming) => streaming.finish().err().map(BackendError::Tool),
            Job::Ext4 { .. } => None,
        }
    }
}

impl Write for Making {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.job {
            Job::Erofs(s) => s.write(buf),
            Job::Ext4 { spool, .. } => spool.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.job {
            Job::Erofs(s) => s.flush(),
            Job::Ext4 { spool, .. } => spool.flush(),
        }
    }
}

/// A spool file written sequentially in which every aligned 64 KiB run of zeros is left a
/// hole: a sparse file in a layer (a few KB of tar for many GB of holes) costs no disk space
/// or disk writes, and mke2fs, which skips zero blocks, keeps its holes.
pub struct SparseSpool {
    file: std::fs::File,
    pos: u64,
}

impl SparseSpool {
    const CHUNK: u64 = 64 << 10;

    fn new(file: std::fs::File) -> Self {
        SparseSpool { file, pos: 0 }
    }

    /// Sets the length (a trailing hole has no bytes written) and flushes to the page cache.
    fn finish(self) -> std::io::Result<()> {
        self.file.set_len(self.pos)
    }
}

impl Write for SparseSpool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut rest = buf;
        while !rest.is_empty() {
            let room = (Self::CHUNK - self.pos % Self::CHUNK) as usize;
            let (piece, tail) = rest.split_at(room.min(rest.len()));
            let whole_chunk = piece.len() as u64 == Self::CHUNK;
            if !(whole_chunk && piece.iter().all(|&b| b == 0)) {
                self.file.write_all_at(piece, self.pos)?;
            }
            self.pos += piece.len() as u64;
            rest = tail;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A UUID made from bytes `offset..offset+16` of a sha256 digest.
fn uuid_from(digest: &Digest, offset: usize) -> String {
    let h = &digest.digest()[offset * 2..offset * 2 + 32];
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
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

//! Filesystem backends: one layer's normalized stream (a pax tar, see [`crate::layer::pax`])
//! → one image file, made by an external tool reading the stream: `mkfs.erofs --tar=f` from a
//! pipe; `mke2fs -d` from a spool file (it needs the image size up front, which the stream's
//! counts give only once it has ended).

mod erofs;
mod ext4;
pub mod ext4_fixup;
pub mod tool;

use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::layer::meta::TreeStats;
use tool::ToolError;

/// Version of the layer → blob recipe. Bump it whenever a blob's bytes or meaning change; it
/// is part of every stored blob's path (`layers/<fs>-v<N>/`). 2: made from the normalized
/// stream (erofs-utils ≥ 1.8 `--tar=f`, e2fsprogs ≥ 1.47.1 `mke2fs -d TAR`), without root.
pub const RECIPE_VERSION: u32 = 2;

/// Filesystem type of the blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// EROFS made with mkfs.erofs (erofs-utils ≥ 1.5), uncompressed.
    Erofs,
    /// ext4 made with mkfs.ext4 -d (e2fsprogs ≥ 1.47.0), no journal.
    Ext4,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
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
                Job::Ext4 { spool: std::io::BufWriter::with_capacity(1 << 20, file.into_parts().0), path }
            }
        };
        Ok(Making { backend: self.clone(), job, chain_id: chain_id.clone(), out: out.to_owned() })
    }

    /// Whether the normalized stream should carry the ext4 fix-up's time records.
    pub fn wants_time_extra(&self) -> bool {
        matches!(self, Backend::Ext4(_))
    }
}

/// An image being made: write the normalized stream into it, then [`Making::finish`].
pub struct Making {
    backend: Backend,
    job: Job,
    chain_id: Digest,
    out: PathBuf,
}

enum Job {
    Erofs(tool::Streaming),
    Ext4 { spool: std::io::BufWriter<std::fs::File>, path: PathBuf },
}

impl Making {
    /// Ends the stream (whose counts are `stats`) and finishes the image.
    pub fn finish(self, stats: &TreeStats) -> Result<(), BackendError> {
        match (self.backend, self.job) {
            (Backend::Erofs(b), Job::Erofs(streaming)) => b.finish(streaming, &self.out),
            (Backend::Ext4(b), Job::Ext4 { spool, path }) => {
                let spool_err = |source| BackendError::Spool { path: path.clone(), source };
                spool.into_inner().map_err(|e| spool_err(e.into_error()))?;
                b.make_from_tar(&path, stats, &self.chain_id, &self.out)
            }
            _ => unreachable!("a job belongs to its backend"),
        }
    }
}

impl Making {
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

/// A UUID made from bytes `offset..offset+16` of a sha256 digest.
fn uuid_from(digest: &Digest, offset: usize) -> String {
    let h = &digest.digest()[offset * 2..offset * 2 + 32];
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// Checks an image with its filesystem's own checker (`fsck.erofs`, `e2fsck -fn`).
pub fn fsck(fs: FsType, image: &Path) -> Result<(), ToolError> {
    let (tool, mut cmd) = match fs {
        FsType::Erofs => {
            ("fsck.erofs", tool::Tool::find("fsck.erofs", "erofs-utils", &["-V"], "1.5")?.command())
        }
        FsType::Ext4 => {
            let mut c = tool::Tool::find("e2fsck", "e2fsprogs", &["-V"], "1.47.0")?.command();
            c.arg("-fn");
            ("e2fsck", c)
        }
    };
    tool::run(tool, cmd.arg(image)).map(|_| ())
}

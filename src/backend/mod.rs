//! Filesystem backends: one finished layer tree → one image file, made by an external tool.

mod erofs;
mod ext4;
pub mod ext4_fixup;
pub mod tool;

use std::path::Path;

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::layer::tree::FinishedTree;
use tool::ToolError;

/// Version of the layer → blob recipe. Bump it whenever a blob's bytes or meaning change; it
/// is part of every stored blob's path (`layers/<fs>-v<N>/`).
pub const RECIPE_VERSION: u32 = 1;

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

    /// Makes the image `out` of the tree staged in `staging`. `chain_id` seeds the UUID and
    /// hash seed, so the same stack gives the same bytes.
    pub fn make(
        &self,
        staging: &Path,
        tree: &FinishedTree,
        chain_id: &Digest,
        out: &Path,
    ) -> Result<(), BackendError> {
        match self {
            Backend::Erofs(b) => b.make(staging, chain_id, out),
            Backend::Ext4(b) => b.make(staging, tree, chain_id, out),
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

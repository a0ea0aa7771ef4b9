//! JSON records: the image record kept per tag, the build result, and per-layer records.

use oci_spec::image::{Digest, ImageConfiguration};
use serde::{Deserialize, Serialize};

use crate::backend::FsType;

/// One lower layer blob of an image, base first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lower {
    /// Absolute path of the blob in the store.
    pub path: std::path::PathBuf,
    pub fs: FsType,
    pub chain_id: Digest,
    pub diff_id: Digest,
    /// The compressed layer's digest in the source.
    pub digest: Digest,
    /// Bytes of the blob file.
    pub size: u64,
    /// sha256 hex of the blob file, for integrity checks.
    pub blob_sha256: String,
}

/// What a runtime needs from the OCI config to start the image's process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl From<&ImageConfiguration> for RuntimeConfig {
    fn from(c: &ImageConfiguration) -> Self {
        let Some(cfg) = c.config() else {
            return RuntimeConfig::default();
        };
        RuntimeConfig {
            entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
            cmd: cfg.cmd().clone().unwrap_or_default(),
            env: cfg.env().clone().unwrap_or_default(),
            working_dir: cfg.working_dir().clone().unwrap_or_default(),
            user: cfg.user().clone().unwrap_or_default(),
        }
    }
}

/// The record stored for a tag (`images/<escaped tag>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub tag: String,
    pub source: String,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub platform: String,
    pub created_at: String,
    pub lowers: Vec<Lower>,
    /// Bytes on disk of all lowers.
    pub size: u64,
    pub config: RuntimeConfig,
    /// The whole image flattened into one blob (`build --squash`), for runtimes without
    /// overlayfs or with more layers than drives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squashed: Option<SquashedBlob>,
}

impl ImageRecord {
    /// Every blob the record references: the lowers and the squashed blob.
    pub fn blobs(&self) -> impl Iterator<Item = (&std::path::Path, FsType, &str)> {
        self.lowers
            .iter()
            .map(|l| (l.path.as_path(), l.fs, l.blob_sha256.as_str()))
            .chain(self.squashed.iter().map(|s| (s.path.as_path(), s.fs, s.blob_sha256.as_str())))
    }
}

/// A flattened image blob, keyed by the image's top chain ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquashedBlob {
    pub path: std::path::PathBuf,
    pub fs: FsType,
    /// Chain ID of the top layer: the blob is that whole stack.
    pub chain_id: Digest,
    pub size: u64,
    pub blob_sha256: String,
}

/// What `build` returns (and `build --json` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    #[serde(flatten)]
    pub record: ImageRecord,
    /// True when no layer had to be converted.
    pub cached: bool,
}

/// Kept beside each layer blob (`<chain hex>.json`): what the blob is, without re-hashing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub chain_id: Digest,
    pub diff_id: Digest,
    pub fs: FsType,
    pub recipe: u32,
    pub size: u64,
    pub blob_sha256: String,
    /// The tool that made the blob, e.g. `mkfs.erofs 1.5`.
    pub tool: String,
}

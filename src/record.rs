//! JSON records: the image record kept per tag, the build result, and per-layer records.
//!
//! Records name blobs by what identifies them ([`BlobId`]: kind, filesystem, recipe version,
//! chain ID), never by path: only the store knows where a blob lives, so a store reached by
//! another spelling of its path, or moved, is the same store. Output for runtimes
//! (`build --json`, `inspect --json`) adds each blob's absolute path ([`Located`]), derived by
//! the store at output time.

use std::path::PathBuf;

use oci_spec::image::{Digest, ImageConfiguration, Sha256Digest};
use serde::{Deserialize, Serialize};

use crate::backend::FsType;
use crate::digest::{self, InvalidDigest};
use crate::verity::VerityInfo;

/// Which of a stack's blobs: one layer's, the whole stack flattened (`build --squash`), or the
/// merged metadata over the stack's layer blobs (`build --merge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlobKind {
    /// One layer's blob.
    Layer,
    /// The whole stack flattened.
    Squashed,
    /// A merged blob of this format (2 for those vmrootfs writes now; 1 for those of
    /// `mkfs.erofs`' rebuild mode).
    Merged {
        /// The merged blob's format.
        format: u32,
    },
}

/// What identifies a blob in the store; the store derives its path from this alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobId {
    /// Which of a stack's blobs.
    pub kind: BlobKind,
    /// Its filesystem.
    pub fs: FsType,
    /// The recipe version that made it ([`FsType::recipe`] for new blobs).
    pub recipe: u32,
    /// Chain ID of the layer (for a squashed blob: of the top layer), validated sha256.
    pub chain_id: Sha256Digest,
}

impl BlobId {
    /// The id of a blob of `chain_id`; refuses a chain ID that is not a sha256 digest.
    pub fn new(kind: BlobKind, fs: FsType, recipe: u32, chain_id: &Digest) -> Result<BlobId, InvalidDigest> {
        Ok(BlobId { kind, fs, recipe, chain_id: digest::require_sha256("chain_id", chain_id)? })
    }
}

/// A blob with its absolute path in the store, for output to runtimes; never persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Located<T> {
    /// The blob's absolute path in the store.
    pub path: PathBuf,
    /// The blob's dm-verity tree (`build --verity`): the hash device of a dm-verity table
    /// whose data device is `path`, or the bytes that follow the blob in the pushed layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity_tree: Option<PathBuf>,
    /// The dm-verity table's `hash_start_block` for the tree appended to the blob (`blob ‖
    /// tree`, the pushed layer): `hash_offset / block_size + 1`, the tree's first block being
    /// veritysetup's superblock. In the tree file alone (`verity_tree`) the hashes start at
    /// block 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity_hash_start_block: Option<u64>,
    /// Where the blob starts on the image's single disk (`export --single-disk`: the merged
    /// blob, then the lowers base first), in bytes; for images with a merged blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_offset: Option<u64>,
    /// The blob's record.
    #[serde(flatten)]
    pub blob: T,
}

impl<T> Located<T> {
    /// `blob` at `path`, its tree (if any) at `verity_tree`, with the hash start of `verity`.
    pub fn new(
        path: PathBuf,
        verity_tree: Option<PathBuf>,
        verity: Option<&VerityInfo>,
        blob: T,
    ) -> Located<T> {
        let verity_hash_start_block = verity.map(|v| v.hash_offset / v.block_size.max(1) + 1);
        Located { path, verity_tree, verity_hash_start_block, disk_offset: None, blob }
    }
}

impl LocatedRecord {
    /// Sets each blob's [`Located::disk_offset`] when the image has a merged blob.
    pub fn with_disk_offsets(mut self) -> LocatedRecord {
        if let Some(m) = &mut self.merged {
            m.disk_offset = Some(0);
            let mut at = m.size;
            for l in &mut self.lowers {
                l.disk_offset = Some(at);
                at += l.size;
            }
        }
        self
    }
}

impl<T> std::ops::Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.blob
    }
}

/// One lower layer blob of an image, base first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lower {
    /// Filesystem of the blob.
    pub fs: FsType,
    /// Recipe version of the blob.
    pub recipe: u32,
    /// Chain ID of the layer: the stack up to it (the blob's key in the store).
    pub chain_id: Digest,
    /// Digest of the layer's uncompressed tar (for an EROFS source: of the blob).
    pub diff_id: Digest,
    /// The compressed layer's digest in the source.
    pub digest: Digest,
    /// Bytes of the blob file.
    pub size: u64,
    /// sha256 hex of the blob file, for integrity checks.
    pub blob_sha256: String,
    /// The blob's dm-verity tree (`build --verity`), kept beside it in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityInfo>,
}

/// What a runtime needs from the OCI config to start the image's process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// `Entrypoint`: the program and its first arguments.
    pub entrypoint: Vec<String>,
    /// `Cmd`: the arguments after the entrypoint (or the command, without one).
    pub cmd: Vec<String>,
    /// `Env`: `NAME=value` pairs.
    pub env: Vec<String>,
    /// `WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `User`: `uid[:gid]` or a name (empty: root).
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

impl Lower {
    /// The blob's identity in the store.
    pub fn id(&self) -> Result<BlobId, InvalidDigest> {
        BlobId::new(BlobKind::Layer, self.fs, self.recipe, &self.chain_id)
    }
}

/// The record stored for a tag (`images/<escaped tag>.json`): `ImageRecord` as stored, with
/// blob identities only; [`LocatedRecord`] (the same with each blob's path) for output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord<L = Lower, S = SquashedBlob, M = MergedBlob> {
    /// The tag it is recorded under.
    pub tag: String,
    /// The source it was built from, as given (`oci-archive:…`, a registry reference).
    pub source: String,
    /// Digest of the source manifest.
    pub manifest_digest: Digest,
    /// Digest of the source config.
    pub config_digest: Digest,
    /// The platform built (`linux/amd64`).
    pub platform: String,
    /// When it was recorded (RFC 3339).
    pub created_at: String,
    /// The layer blobs, base first: overlayfs's `lowerdir` takes them top first.
    pub lowers: Vec<L>,
    /// Bytes on disk of all lowers.
    pub size: u64,
    /// How to start the image's process.
    pub config: RuntimeConfig,
    /// The whole image flattened into one blob (`build --squash`), for runtimes without
    /// overlayfs or with more layers than drives.
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub squashed: Option<S>,
    /// One EROFS metadata blob presenting the merged tree over the lowers' blobs
    /// (`build --merge`): one drive for the whole image with `export --single-disk`.
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub merged: Option<M>,
}

/// An image record with the store path of each blob: what runtimes get.
pub type LocatedRecord = ImageRecord<Located<Lower>, Located<SquashedBlob>, Located<MergedBlob>>;

impl<L, S, M> ImageRecord<L, S, M> {
    /// The same record with each lower, the squashed and the merged blob mapped.
    pub fn map_blobs<L2, S2, M2, E>(
        self,
        mut lower: impl FnMut(L) -> Result<L2, E>,
        squashed: impl FnOnce(S) -> Result<S2, E>,
        merged: impl FnOnce(M) -> Result<M2, E>,
    ) -> Result<ImageRecord<L2, S2, M2>, E> {
        Ok(ImageRecord {
            tag: self.tag,
            source: self.source,
            manifest_digest: self.manifest_digest,
            config_digest: self.config_digest,
            platform: self.platform,
            created_at: self.created_at,
            lowers: self.lowers.into_iter().map(&mut lower).collect::<Result<_, _>>()?,
            size: self.size,
            config: self.config,
            squashed: self.squashed.map(squashed).transpose()?,
            merged: self.merged.map(merged).transpose()?,
        })
    }
}

impl ImageRecord {
    /// Every blob the record references (the lowers, the squashed and the merged blob), with
    /// the sha256 hex the record gives for it.
    pub fn blobs(&self) -> Result<Vec<(BlobId, &str)>, InvalidDigest> {
        let lowers = self.lowers.iter().map(|l| Ok((l.id()?, l.blob_sha256.as_str())));
        let squashed = self.squashed.iter().map(|s| Ok((s.id()?, s.blob_sha256.as_str())));
        let merged = self.merged.iter().map(|m| Ok((m.id()?, m.blob_sha256.as_str())));
        lowers.chain(squashed).chain(merged).collect()
    }
}

/// A flattened image blob, keyed by the image's top chain ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquashedBlob {
    /// Filesystem of the blob.
    pub fs: FsType,
    /// Recipe version of the blob.
    pub recipe: u32,
    /// Chain ID of the top layer: the blob is that whole stack.
    pub chain_id: Digest,
    /// Bytes of the blob file.
    pub size: u64,
    /// sha256 hex of the blob file.
    pub blob_sha256: String,
}

impl SquashedBlob {
    /// The blob's identity in the store.
    pub fn id(&self) -> Result<BlobId, InvalidDigest> {
        BlobId::new(BlobKind::Squashed, self.fs, self.recipe, &self.chain_id)
    }
}

/// The merged metadata blob of an image (EROFS only), keyed by the image's top chain ID. It
/// holds no file data: its device table names the stack's layer blobs, base first, as devices
/// 1…n, each mapped (`mapped_blkaddr`) where it follows the blob and the layers below in one
/// concatenation, so the same blob serves a mount with one device per layer and one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedBlob {
    /// Filesystem of the blob (EROFS).
    pub fs: FsType,
    /// Recipe version of the blob (that of the layer blobs it references).
    pub recipe: u32,
    /// Chain ID of the top layer: the blob is the merged tree of that whole stack.
    pub chain_id: Digest,
    /// Bytes of the blob file.
    pub size: u64,
    /// sha256 hex of the blob file.
    pub blob_sha256: String,
    /// What made it (2: vmrootfs's merge writer); records from before the field name
    /// blobs of mkfs.erofs' rebuild mode, format 1.
    #[serde(default = "crate::merge::mkfs_merge_format")]
    pub format: u32,
    /// The blob's dm-verity tree (`build --merge --verity`), kept beside it in the store; with
    /// the layers' trees, every block `run --merged` reads is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityInfo>,
}

impl MergedBlob {
    /// The blob's identity in the store.
    pub fn id(&self) -> Result<BlobId, InvalidDigest> {
        BlobId::new(BlobKind::Merged { format: self.format }, self.fs, self.recipe, &self.chain_id)
    }
}

/// What `build` returns (and `build --json` prints): the record, with blob paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    /// The image's record, with each blob's path.
    #[serde(flatten)]
    pub record: LocatedRecord,
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
    /// sha256 hex of the `.dirs` sidecar (local conversions; pulled blobs have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirs_sha256: Option<String>,
    /// sha256 hex of the `.own` sidecar that older versions wrote beside local EROFS
    /// conversions (merged format 1 read it); kept readable, never written now, checked by
    /// nothing (nothing reads the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_sha256: Option<String>,
}

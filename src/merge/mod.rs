//! `build --merge`: one EROFS metadata blob for a whole image, the merged tree of its layers
//! (whiteouts and opaque directories applied, as the overlay stack shows it), whose files'
//! data stays in the stored layer blobs, reached through EROFS multi-device addressing. No
//! file data is copied, so images that share a base share its bytes; the blob is small (the
//! metadata only). Written by vmrootfs from the layers' own directories ([`tree`] reads them
//! with [`crate::erofs::read`], [`write`](mod@write) writes the image); needs no root and no tool.
//!
//! The same stack gives the same bytes (no build time; the UUID from the top chain ID).
//! Cached by the image's top chain ID and [`MERGE_FORMAT`]
//! (`layers/erofs-v<N>/merged2-<chain hex>.erofs`), like `--squash`.
//!
//! The blob serves three ways: mounted with one device per layer (`mount -t erofs -o
//! device=L0,device=L1,… merged`, device order = lowers order, base first), or as one disk
//! that is the blob followed by the layer blobs ([`disk`]: a VMDK descriptor of flat extents
//! over the stored files, or a raw concatenated copy), which a kernel ≥ 6.4 mounts alone.

pub mod disk;
pub mod layout;
pub mod tree;
pub mod write;

use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use crate::backend::FsType;
use crate::erofs::read::{Image, ReadError};
use crate::record::{Lower, MergedBlob};
use crate::store::{Store, StoreError};
use layout::LayoutError;

/// The format of the merged blobs `build --merge` makes, part of their name in the store
/// (`merged<N>-<chain hex>.erofs`), so a blob of another format is never reused:
/// - 1: `mkfs.erofs`' rebuild mode (`--ovlfs-strip=1`) with vmrootfs's fix-ups, EROFS layer
///   recipes 3–5; refused a directory made opaque and then added to, lost the root's xattrs.
/// - 2: written by vmrootfs ([`tree`], [`write`](mod@write)) over layer blobs of any EROFS recipe from 3.
pub const MERGE_FORMAT: u32 = 2;

/// The format of a merged blob whose record does not say (made before formats were recorded).
pub fn mkfs_merge_format() -> u32 {
    1
}

/// Why making a merged blob or exporting a single disk failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a layer blob failed.
    #[error("reading a layer blob to merge")]
    Read(#[from] ReadError),
    /// The layers' trees could not be merged.
    #[error("merging the layers' trees")]
    Tree(#[from] tree::TreeError),
    /// Writing the merged blob failed.
    #[error("writing the merged blob")]
    Write(#[from] write::WriteError),
    /// The image has no layers.
    #[error("an image with no layers has nothing to merge")]
    NoLayers,
    /// A layer blob that is not EROFS.
    #[error(
        "layer {chain_id} is {fs}: a merged image is EROFS over EROFS layer blobs (build with --fs erofs)"
    )]
    NotErofs {
        /// The layer's chain ID.
        chain_id: Digest,
        /// Its filesystem.
        fs: FsType,
    },
    /// A layer blob of an EROFS recipe too old to merge.
    #[error(
        "layer {chain_id} was made by EROFS recipe {recipe}, whose inlined file tails a merged image cannot reference (recipe {} or later: build the image again)",
        crate::backend::EROFS_MERGEABLE_RECIPE
    )]
    OldRecipe {
        /// The layer's chain ID.
        chain_id: Digest,
        /// The recipe that made its blob.
        recipe: u32,
    },
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A layer blob's layout could not be read.
    #[error("{path}")]
    Layout {
        /// The layer blob.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: LayoutError,
    },
    /// Making the merged blob's dm-verity tree failed.
    #[error("making the dm-verity tree of the merged blob")]
    Verity(#[from] crate::verity::VerityError),
    /// The stored merged blob is not the bytes its record names.
    #[error(
        "{path}: the merged blob's sha256 is {found}, not the recorded {recorded}: it is damaged (remove the image and build it again)"
    )]
    Damaged {
        /// The merged blob.
        path: PathBuf,
        /// The sha256 hex its record gives.
        recorded: String,
        /// The sha256 hex of its bytes.
        found: String,
    },
    /// Export of an image built without `--merge`.
    #[error("{tag} has no merged blob: build it with --merge")]
    NotMerged {
        /// The image's tag.
        tag: String,
    },
    /// The export path is something other than a regular file.
    #[error(
        "{path} is a {kind}: export writes a new file and replaces only a regular file (remove it or choose another path)"
    )]
    NotARegularFile {
        /// The export's path.
        path: PathBuf,
        /// What is there (`directory`, `symlink`, …).
        kind: &'static str,
    },
    /// A blob path a VMDK descriptor cannot quote.
    #[error("{path}: a VMDK descriptor cannot name a path with a double quote or a line break")]
    UnquotablePath {
        /// The path.
        path: PathBuf,
    },
}

impl MergeError {
    /// Whether a layer blob is what the merge cannot use (not EROFS, an old recipe, a layout
    /// or inlined file tails it cannot reference), as opposed to the store or the writing
    /// failing: a build that has the layers' tar source may convert them instead.
    pub fn is_unmergeable_blob(&self) -> bool {
        match self {
            MergeError::Read(e) | MergeError::Tree(tree::TreeError::Read(e)) => {
                !matches!(e, ReadError::Io { .. })
            }
            MergeError::Tree(_) | MergeError::Layout { .. } | MergeError::OldRecipe { .. } => true,
            _ => false,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io { path: path.to_owned(), source }
}

fn layout_at(path: &Path) -> impl FnOnce(LayoutError) -> MergeError + '_ {
    move |source| MergeError::Layout { path: path.to_owned(), source }
}

/// The merged blob of `lowers` (base first), made unless stored; with `verity`, with its
/// dm-verity tree, made unless stored beside it.
pub fn merge(store: &Store, lowers: &[Lower], verity: bool) -> Result<MergedBlob, MergeError> {
    let top = &lowers.last().ok_or(MergeError::NoLayers)?.chain_id;
    for l in lowers {
        if l.fs != FsType::Erofs {
            return Err(MergeError::NotErofs { chain_id: l.chain_id.clone(), fs: l.fs });
        }
        // Another producer's blob (recipe 0) is judged by the reader, file by file.
        if l.recipe != crate::pull::IMPORTED_RECIPE && l.recipe < crate::backend::EROFS_MERGEABLE_RECIPE {
            return Err(MergeError::OldRecipe { chain_id: l.chain_id.clone(), recipe: l.recipe });
        }
    }
    let _lock = store.lock_merge(top)?;
    let mut record = match store.merged(top)? {
        Some(done) => done,
        None => make(store, lowers, top)?,
    };
    if verity {
        record.verity = Some(ensure_verity(store, &record)?);
    }
    Ok(record)
}

/// The dm-verity tree of the stored merged blob `record`: the one beside it if it is the
/// tree of these bytes, else made now. The caller holds the merge lock.
fn ensure_verity(store: &Store, record: &MergedBlob) -> Result<crate::verity::VerityInfo, MergeError> {
    let id = record.id().map_err(StoreError::from)?;
    if let Some(v) = store.verity_beside(&id, record.size, &record.blob_sha256)? {
        return Ok(v);
    }
    let work = store.staging("verity-")?;
    let tree = work.path().join("tree");
    let blob = store.blob_path(&id);
    let salt = crate::verity::salt_for(&record.chain_id).map_err(StoreError::from)?;
    let built = crate::verity::build_tree(&blob, &salt, &tree)?;
    // A tree of damaged bytes is never made: it would vouch for them.
    if built.blob_sha256 != record.blob_sha256 {
        return Err(MergeError::Damaged {
            path: blob,
            recorded: record.blob_sha256.clone(),
            found: built.blob_sha256,
        });
    }
    store.publish_verity_of(&id, &tree, &built.info, &record.blob_sha256)?;
    Ok(built.info)
}

/// Makes and publishes the merged blob of `lowers`, whose top chain ID is `top`.
fn make(store: &Store, lowers: &[Lower], top: &Digest) -> Result<MergedBlob, MergeError> {
    let blobs = lowers.iter().map(|l| Ok(store.blob_path(&l.id()?)));
    let blobs = blobs.collect::<Result<Vec<_>, crate::digest::InvalidDigest>>().map_err(StoreError::from)?;
    let images = blobs.iter().map(|b| Image::open(b)).collect::<Result<Vec<_>, _>>()?;
    let mut layer_blocks = Vec::with_capacity(images.len());
    for (image, path) in images.iter().zip(&blobs) {
        layer_blocks.push(
            layout::blocks_of(image.bytes, crate::erofs::format::BLOCK as u64).map_err(layout_at(path))?,
        );
    }
    let tree = tree::MergedTree::of(&images)?;
    let work = store.staging("merge-")?;
    let out = work.path().join("blob");
    let seed = crate::digest::sha256_of(format!("merge {top}").as_bytes());
    write::write(&tree, &layer_blocks, crate::backend::uuid_bytes(&seed, 0), &out)?;
    let record = MergedBlob {
        fs: FsType::Erofs,
        recipe: FsType::Erofs.recipe(),
        chain_id: top.clone(),
        size: fs_err::metadata(&out).map_err(io_at(&out))?.len(),
        blob_sha256: crate::digest::sha256_file_hex(&out).map_err(io_at(&out))?,
        format: MERGE_FORMAT,
        verity: None,
    };
    store.publish_merge(&out, &record)?;
    Ok(record)
}

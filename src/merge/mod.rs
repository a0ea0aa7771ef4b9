//! `build --merge`: one EROFS metadata blob for a whole image, the merged tree of its layers
//! (whiteouts and opaque directories applied, as the overlay stack shows it), whose files'
//! data stays in the stored layer blobs, reached through EROFS multi-device addressing. No
//! file data is copied, so images that share a base share its bytes; the blob is small (the
//! metadata only). Needs no root (no mounts): `mkfs.erofs`' rebuild mode reads the layer
//! images as files ([`crate::backend::Erofs::merge`]).
//!
//! After mkfs: the root directory takes the top layer's attributes, each device's
//! `mapped_blkaddr` is set for the single-disk layout ([`layout`]), and the build time is
//! zeroed (checksum recomputed), so the same stack gives the same bytes. Cached by the image's
//! top chain ID (`layers/erofs-v<N>/merged-<chain hex>.erofs`), like `--squash`.
//!
//! The blob serves three ways: mounted with one device per layer (`mount -t erofs -o
//! device=L0,device=L1,… merged`, device order = lowers order, base first), or as one disk
//! that is the blob followed by the layer blobs ([`disk`]: a VMDK descriptor of flat extents
//! over the stored files, or a raw concatenated copy), which a kernel ≥ 6.4 mounts alone.

pub mod check;
pub mod disk;
pub mod layout;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use crate::backend::tool::ToolError;
use crate::backend::{Erofs, FsType};
use crate::record::{Lower, MergedBlob};
use crate::store::{Store, StoreError};
use layout::LayoutError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("an image with no layers has nothing to merge")]
    NoLayers,
    #[error(
        "layer {chain_id} is {fs}: a merged image is EROFS over EROFS layer blobs (build with --fs erofs)"
    )]
    NotErofs { chain_id: Digest, fs: FsType },
    #[error(
        "layer {chain_id} was made by EROFS recipe {recipe}, whose inlined file tails mkfs.erofs cannot reference (recipe {} or later: build the image again)",
        crate::backend::EROFS_MERGEABLE_RECIPE
    )]
    OldRecipe { chain_id: Digest, recipe: u32 },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Layout {
        path: PathBuf,
        #[source]
        source: LayoutError,
    },
    #[error("making the dm-verity tree of the merged blob")]
    Verity(#[from] crate::verity::VerityError),
    #[error(
        "{path}: the merged blob's sha256 is {found}, not the recorded {recorded}: it is damaged (remove the image and build it again)"
    )]
    Damaged { path: PathBuf, recorded: String, found: String },
    #[error("{tag} has no merged blob: build it with --merge")]
    NotMerged { tag: String },
    #[error(
        "{path} is a {kind}: export writes a new file and replaces only a regular file (remove it or choose another path)"
    )]
    NotARegularFile { path: PathBuf, kind: &'static str },
    #[error("{path}: a VMDK descriptor cannot name a path with a double quote or a line break")]
    UnquotablePath { path: PathBuf },
    #[error(
        "directory /{path}: mkfs.erofs' rebuild mode would merge layer {top}'s directory with layer {below}'s, which overlayfs does not (an opaque directory or a removal at or below layer {stop} hides it); this image cannot be merged (use --squash, or the layer stack)",
        path = crate::layer::path::display(&.0.path),
        top = .0.top + 1,
        stop = .0.stop + 1,
        below = .0.below + 1
    )]
    Unmergeable(check::Unmergeable),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io { path: path.to_owned(), source }
}

fn layout_at(path: &Path) -> impl FnOnce(LayoutError) -> MergeError + '_ {
    move |source| MergeError::Layout { path: path.to_owned(), source }
}

/// The merged blob of `lowers` (base first), made unless stored; with `verity`, with its
/// dm-verity tree, made unless stored beside it.
pub fn merge(store: &Store, erofs: &Erofs, lowers: &[Lower], verity: bool) -> Result<MergedBlob, MergeError> {
    let top = &lowers.last().ok_or(MergeError::NoLayers)?.chain_id;
    for l in lowers {
        if l.fs != FsType::Erofs {
            return Err(MergeError::NotErofs { chain_id: l.chain_id.clone(), fs: l.fs });
        }
        if l.recipe < crate::backend::EROFS_MERGEABLE_RECIPE {
            return Err(MergeError::OldRecipe { chain_id: l.chain_id.clone(), recipe: l.recipe });
        }
    }
    let _lock = store.lock_merge(top)?;
    let mut record = match store.merged(top)? {
        Some(done) => done,
        None => make(store, erofs, lowers, top)?,
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
fn make(store: &Store, erofs: &Erofs, lowers: &[Lower], top: &Digest) -> Result<MergedBlob, MergeError> {
    let mut views = Vec::with_capacity(lowers.len());
    let mut own = Vec::with_capacity(lowers.len());
    for l in lowers {
        let id = l.id().map_err(StoreError::from)?;
        views.push(store.stack_dirs(&id)?);
        own.push(store.own_dirs(&id)?);
    }
    if let Some(bad) = check::unmergeable(&views, &own) {
        return Err(MergeError::Unmergeable(bad));
    }
    let work = store.staging("merge-")?;
    let out = work.path().join("blob");
    let blobs = lowers.iter().map(|l| Ok(store.blob_path(&l.id()?)));
    let blobs = blobs.collect::<Result<Vec<_>, crate::digest::InvalidDigest>>().map_err(StoreError::from)?;
    let seed = crate::digest::sha256_of(format!("merge {top}").as_bytes());
    erofs.merge(&seed, &out, &blobs)?;
    fix_up(&out, &blobs)?;
    crate::backend::fix_build_time(&out).map_err(io_at(&out))?;
    let record = MergedBlob {
        fs: FsType::Erofs,
        recipe: FsType::Erofs.recipe(),
        chain_id: top.clone(),
        size: fs_err::metadata(&out).map_err(io_at(&out))?.len(),
        blob_sha256: crate::digest::sha256_file_hex(&out).map_err(io_at(&out))?,
        verity: None,
    };
    store.publish_merge(&out, &record)?;
    Ok(record)
}

/// Gives the merged image `meta` its root attributes from the top layer blob and maps each of
/// the `layers` (base first) in its device table for the single-disk layout.
fn fix_up(meta: &Path, layers: &[PathBuf]) -> Result<(), MergeError> {
    let f = fs_err::OpenOptions::new().read(true).write(true).open(meta).map_err(io_at(meta))?;
    let mut block0 = vec![0u8; 4096];
    f.file().read_exact_at(&mut block0, 0).map_err(io_at(meta))?;
    let sb = layout::superblock(&block0).map_err(layout_at(meta))?;
    if sb.extra_devices != layers.len() {
        let source = LayoutError::DeviceCount { expected: layers.len(), found: sb.extra_devices };
        return Err(MergeError::Layout { path: meta.to_owned(), source });
    }
    let table_at = sb.device_table.ok_or(LayoutError::NoDeviceTable).map_err(layout_at(meta))?;

    // The root directory as the top layer has it (what overlayfs shows for the merged root).
    let top = layers.last().expect("one layer at least (checked by the caller)");
    let attrs = {
        let t = fs_err::File::open(top).map_err(io_at(top))?;
        let mut top0 = vec![0u8; 4096];
        t.file().read_exact_at(&mut top0, 0).map_err(io_at(top))?;
        let top_sb = layout::superblock(&top0).map_err(layout_at(top))?;
        let mut inode = [0u8; 64];
        t.file().read_exact_at(&mut inode, top_sb.root_inode).map_err(io_at(top))?;
        layout::root_attrs(&inode).map_err(layout_at(top))?
    };
    let mut inode = [0u8; 64];
    f.file().read_exact_at(&mut inode, sb.root_inode).map_err(io_at(meta))?;
    layout::set_root_attrs(&mut inode, &attrs).map_err(layout_at(meta))?;
    f.file().write_all_at(&inode, sb.root_inode).map_err(io_at(meta))?;

    // Pad the metadata image to whole blocks: the first layer starts right after it.
    let len = f.metadata().map_err(io_at(meta))?.len();
    let meta_blocks = len.div_ceil(sb.block_size);
    f.set_len(meta_blocks * sb.block_size).map_err(io_at(meta))?;
    let mut device_blocks = Vec::with_capacity(layers.len());
    for l in layers {
        let bytes = fs_err::metadata(l).map_err(io_at(l))?.len();
        device_blocks.push(layout::blocks_of(bytes, sb.block_size).map_err(layout_at(l))?);
    }
    let mut table = vec![0u8; layers.len() * 128];
    f.file().read_exact_at(&mut table, table_at).map_err(io_at(meta))?;
    layout::set_device_table(&mut table, meta_blocks, &device_blocks).map_err(layout_at(meta))?;
    f.file().write_all_at(&table, table_at).map_err(io_at(meta))?;
    f.sync_all().map_err(io_at(meta))
}

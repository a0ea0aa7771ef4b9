//! Building an image that is already EROFS (the EROFS image layer format, as `push` writes
//! it): the layer blobs are streamed into the store as they are — checked against the
//! descriptor digest, decompressed for `+zstd` and checked against the layer's DiffID — with
//! no mkfs at all, in parallel, up to `jobs` at a time.
//!
//! A blob made by vmrootfs (its `dev.vmrootfs.source.chain-id` and `dev.vmrootfs.recipe`
//! annotations) is stored under the key a local conversion of its tar layer uses, so pulling
//! the converted image and building the tar image store nothing twice. The claimed key only
//! selects bytes: what is stored there is reused only when it is the bytes the descriptor
//! names, and a pulled blob that differs from it is kept under a key of its own (see
//! `fetch_one`). A blob from another producer is stored under its own chain ID as recipe
//! [`IMPORTED_RECIPE`].

use std::io::{self, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use oci_spec::image::Digest;

use crate::backend::FsType;
use crate::digest::{self, HashingReader, HashingWriter};
use crate::erofs_image::{self, ErofsLayer, Role};
use crate::progress::{LayerProgress, Reporter};
use crate::record::{BlobId, BlobKind, LayerRecord, Lower};
use crate::source::{ImageSource, LayerRef, ResolvedImage};
use crate::store::{LayerSlot, Store, StoreError};
use crate::verity::VerityInfo;

/// The recipe version recorded for EROFS blobs vmrootfs did not make: they are stored as they
/// came (`layers/erofs-v0/`), keyed by their own chain ID.
pub const IMPORTED_RECIPE: u32 = 0;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("reading the blob")]
    Read(#[source] io::Error),
    #[error("streaming the blob into {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Digest(#[from] digest::DigestMismatch),
    #[error("the blob is {found} bytes, not the {expected} its descriptor says")]
    Size { expected: u64, found: u64 },
    #[error("the layer unpacks to more than --max-layer-size ({max} bytes)")]
    TooLarge { max: u64 },
    #[error("annotation {key} = {value:?} is not {expected}")]
    BadAnnotation { key: &'static str, value: String, expected: &'static str },
    #[error(transparent)]
    InvalidDigest(#[from] digest::InvalidDigest),
    #[error(transparent)]
    Verity(#[from] crate::verity::VerityError),
    #[error("its dm-verity tree gives root digest {found}, not the annotated {annotated}")]
    VerityMismatch { annotated: String, found: String },
    #[error(
        "{blocks} blocks of its dm-verity tree are not the tree of its blob (whose root digest {root} is the annotated one)"
    )]
    VerityTreeDiffers { blocks: u64, root: String },
}

/// Where one pulled layer goes in the store, and what its record says.
struct Target {
    id: BlobId,
    /// The diff ID recorded: the tar layer's for vmrootfs blobs, else the EROFS layer's.
    diff_id: Digest,
    tool: String,
}

/// The store key of layer `i` (see the module doc).
fn target(image: &ResolvedImage, chain: &[Digest], i: usize, spec: &str) -> Result<Target, PullError> {
    let a = &image.layers[i].annotations;
    let annotated = |key: &'static str| -> Result<Option<Digest>, PullError> {
        a.get(key)
            .map(|v| {
                v.parse::<Digest>().map_err(|_| PullError::BadAnnotation {
                    key,
                    value: v.clone(),
                    expected: "a digest",
                })
            })
            .transpose()
    };
    let made_by = a.get(erofs_image::TOOL).map(|t| format!(", made by {t}")).unwrap_or_default();
    let tool = format!("pulled from {spec}{made_by}");
    match (
        annotated(erofs_image::SOURCE_CHAIN_ID)?,
        annotated(erofs_image::SOURCE_DIFF_ID)?,
        a.get(erofs_image::RECIPE),
    ) {
        (Some(chain_id), Some(diff_id), Some(recipe)) => {
            let recipe = recipe.parse().map_err(|_| PullError::BadAnnotation {
                key: erofs_image::RECIPE,
                value: recipe.clone(),
                expected: "a recipe version number",
            })?;
            Ok(Target { id: BlobId::new(BlobKind::Layer, FsType::Erofs, recipe, &chain_id)?, diff_id, tool })
        }
        _ => Ok(Target {
            id: BlobId::new(BlobKind::Layer, FsType::Erofs, IMPORTED_RECIPE, &chain[i])?,
            diff_id: image.diff_ids[i].clone(),
            tool,
        }),
    }
}

/// Stores the layers of the EROFS image `image` (classified as `layers`); the lowers of its
/// record, base first, and whether every blob was stored already.
pub fn pull(
    store: &Store,
    source: &dyn ImageSource,
    image: &ResolvedImage,
    layers: &[ErofsLayer],
    jobs: usize,
    max_layer_bytes: u64,
    reporter: &Reporter,
) -> Result<(Vec<Lower>, bool), (Digest, Box<PullError>)> {
    let chain = digest::chain_ids(&image.diff_ids);
    let spec = source.describe();
    let wanted: Vec<usize> = (0..layers.len()).filter(|&i| layers[i].role == Role::Lower).collect();
    let total = wanted.len();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let fetched = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(total.max(1)) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = wanted.get(k) else { break };
                    let layer = &image.layers[i];
                    let result = (|| {
                        let t = target(image, &chain, i, &spec)?;
                        let pulled = fetch_one(
                            store,
                            source,
                            layer,
                            &layers[i],
                            &t,
                            &chain[i],
                            k,
                            total,
                            max_layer_bytes,
                            reporter,
                        )?;
                        if !pulled.was_stored {
                            fetched.fetch_add(1, Ordering::SeqCst);
                        }
                        let r = pulled.record;
                        Ok(Lower {
                            fs: FsType::Erofs,
                            recipe: r.recipe,
                            chain_id: r.chain_id,
                            diff_id: r.diff_id,
                            digest: layer.digest.clone(),
                            size: r.size,
                            blob_sha256: r.blob_sha256,
                            verity: pulled.verity,
                        })
                    })();
                    results
                        .lock()
                        .expect("lock")
                        .push((k, result.map_err(|e| (layer.digest.clone(), Box::new(e)))));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("lock");
    results.sort_by_key(|(k, _)| *k);
    let lowers = results.into_iter().map(|(_, r)| r).collect::<Result<Vec<_>, _>>()?;
    Ok((lowers, fetched.load(Ordering::SeqCst) == 0))
}

/// A pulled layer: its record, its dm-verity tree, whether it was stored already.
struct Pulled {
    record: LayerRecord,
    verity: Option<VerityInfo>,
    was_stored: bool,
}

/// The layer as stored under `id`, if it is provably the bytes the descriptor names: the
/// blob's sha256 is the layer's DiffID, or, for a layer with a dm-verity tree, the stored
/// tree is the blob's, with the annotated root, and `blob ‖ tree` hashes to the DiffID.
fn stored_as_named(
    store: &Store,
    id: &BlobId,
    diff_id: &Digest,
    verity: Option<&(u64, Digest)>,
) -> Result<Option<Pulled>, PullError> {
    let LayerSlot::Published(record) = store.layer_slot(id)? else { return Ok(None) };
    let named = |sha256: &str| diff_id.to_string() == format!("sha256:{sha256}");
    let found = match verity {
        None => named(&record.blob_sha256).then_some(None),
        Some((offset, root)) => store
            .layer_verity_of(id)?
            .filter(|v| named(&v.sha256) && v.hash_offset == *offset && v.root_digest == *root)
            .map(Some),
    };
    Ok(found.map(|verity| Pulled { record, verity, was_stored: true }))
}

/// One layer: the stored blob if the store has the bytes its descriptor names under the key
/// `t` (see [`target`]), else fetched, checked and published. Fetched bytes go under `t` when
/// nothing is stored there; when the same blob is, only its missing dm-verity tree is
/// published; when other bytes are, the layer is stored under the key of its own content
/// (recipe [`IMPORTED_RECIPE`], the chain ID of this image's DiffIDs `own_chain`), and
/// neither blob's record changes.
#[allow(clippy::too_many_arguments)]
fn fetch_one(
    store: &Store,
    source: &dyn ImageSource,
    layer: &LayerRef,
    classified: &ErofsLayer,
    t: &Target,
    own_chain: &Digest,
    index: usize,
    total: usize,
    max_layer_bytes: u64,
    reporter: &Reporter,
) -> Result<Pulled, PullError> {
    let annotated = verity_of(layer)?;
    if let Some(p) = stored_as_named(store, &t.id, &classified.diff_id, annotated.as_ref())? {
        reporter.cached(index, total, &layer.digest);
        return Ok(p);
    }
    // Kept apart by an earlier pull (see below): reused when it is the bytes named.
    let own = BlobId::new(BlobKind::Layer, FsType::Erofs, IMPORTED_RECIPE, own_chain)?;
    if own != t.id
        && let Some(p) = stored_as_named(store, &own, &classified.diff_id, annotated.as_ref())?
    {
        reporter.cached(index, total, &layer.digest);
        return Ok(p);
    }
    let _lock = store.lock_layer_blob(&t.id)?;
    if let Some(p) = stored_as_named(store, &t.id, &classified.diff_id, annotated.as_ref())? {
        reporter.cached(index, total, &layer.digest);
        return Ok(p);
    }
    let progress = reporter.fetch(index, total, &layer.digest, layer.size);
    let result = (|| {
        let work = store.staging("pull-")?;
        let fetched =
            fetch(source, layer, classified, t, annotated.clone(), work.path(), max_layer_bytes, &progress)?;
        let slot = store.layer_slot(&t.id)?;
        // Under the claimed key only the tree a local `build --verity` makes there may go.
        let apart_why = if !fetched.salted_for_key {
            "its dm-verity tree is salted for another chain ID than the one its annotations claim".to_string()
        } else {
            match slot {
                // The same blob, without the tree this layer has (never made, or its
                // publication cut short): the tree is published beside it.
                LayerSlot::Published(stored) if stored.blob_sha256 == fetched.record.blob_sha256 => {
                    if let Some((tree, v)) = &fetched.verity {
                        store.publish_verity_of(&t.id, tree, v, &stored.blob_sha256)?;
                    }
                    return Ok(Pulled {
                        record: stored,
                        verity: fetched.verity.map(|(_, v)| v),
                        was_stored: false,
                    });
                }
                LayerSlot::Published(stored) => {
                    format!(
                        "the store holds other bytes (sha256 {}) under the key its annotations claim",
                        stored.blob_sha256
                    )
                }
                // Nothing there, or a damaged blob that no record expects other bytes of.
                LayerSlot::Absent | LayerSlot::Damaged(_) => {
                    match publish(store, &t.id, fetched.record.clone(), &fetched.verity, &fetched.blob) {
                        Ok(p) => return Ok(p),
                        Err(PullError::Store(e @ StoreError::WouldReplaceDamaged(_))) => {
                            format!("the blob under the key its annotations claim is kept: {e}")
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        reporter.line(&format!(
            "layer {}/{total} {}: {apart_why} ({}): kept under a key of its own",
            index + 1,
            layer.digest,
            store.blob_path(&t.id).display()
        ));
        // An imported layer's key is its own: its lock is held already.
        let _own_lock = if own == t.id { None } else { Some(store.lock_layer_blob(&own)?) };
        if let Some(p) = stored_as_named(store, &own, &classified.diff_id, annotated.as_ref())? {
            return Ok(Pulled { was_stored: false, ..p });
        }
        let record = LayerRecord {
            chain_id: own_chain.clone(),
            diff_id: classified.diff_id.clone(),
            recipe: IMPORTED_RECIPE,
            ..fetched.record
        };
        publish(store, &own, record, &fetched.verity, &fetched.blob)
    })();
    match &result {
        Ok(p) => progress.done(p.record.size),
        Err(_) => progress.failed(),
    }
    result
}

/// Publishes a fetched blob as `id` with `record`, then its dm-verity tree, if it has one.
fn publish(
    store: &Store,
    id: &BlobId,
    record: LayerRecord,
    verity: &Option<(std::path::PathBuf, VerityInfo)>,
    blob: &std::path::Path,
) -> Result<Pulled, PullError> {
    store.publish_pulled_layer(blob, &record)?;
    if let Some((tree, v)) = verity {
        store.publish_verity_of(id, tree, v, &record.blob_sha256)?;
    }
    Ok(Pulled { record, verity: verity.as_ref().map(|(_, v)| v.clone()), was_stored: false })
}

/// A layer fetched into staging, checked against its descriptor, DiffID and annotated root.
struct Fetched {
    blob: std::path::PathBuf,
    /// Its record under the key `t` claims.
    record: LayerRecord,
    /// Its dm-verity tree (split off the blob) and the tree's record.
    verity: Option<(std::path::PathBuf, VerityInfo)>,
    /// False when its tree is salted otherwise than a local `build --verity` salts the tree of
    /// the key `t` claims: such a tree is never stored under that key.
    salted_for_key: bool,
}

/// Streams layer `layer` into `work` and checks it.
#[allow(clippy::too_many_arguments)]
fn fetch(
    source: &dyn ImageSource,
    layer: &LayerRef,
    classified: &ErofsLayer,
    t: &Target,
    annotated: Option<(u64, Digest)>,
    work: &std::path::Path,
    max_layer_bytes: u64,
    progress: &LayerProgress,
) -> Result<Fetched, PullError> {
    let out = work.join("blob");
    let file = fs_err::File::create(&out).map_err(|e| PullError::Write { path: out.clone(), source: e })?;
    let writeback = crate::writeback::Writeback::follow(&out);
    // A raw blob is its own uncompressed data: one hash does for both digests.
    let mut sink = MaybeHashing::new(file, classified.zstd);
    let counted = Counting { inner: source.open_layer(layer)?, progress: &|n| progress.inc(n) };
    let mut raw = HashingReader::new(counted);
    let limit = max_layer_bytes.saturating_add(1);
    let copied = if classified.zstd {
        let decoder = zstd::stream::Decoder::new(&mut raw).map_err(PullError::Read)?;
        copy_in_large_pieces(&mut decoder.take(limit), &mut sink)
    } else {
        copy_in_large_pieces(&mut (&mut raw).take(limit), &mut sink)
    };
    // The copy fails on either side: a failed download is a read, anything else the write.
    let n = copied.map_err(|e| {
        if crate::source::registry::is_download_error(&e) {
            PullError::Read(e)
        } else {
            PullError::Write { path: out.clone(), source: e }
        }
    })?;
    if n > max_layer_bytes {
        return Err(PullError::TooLarge { max: max_layer_bytes });
    }
    let (found, read, _) = raw.finish().map_err(PullError::Read)?;
    if let Some(expected) = layer.size
        && expected != read
    {
        return Err(PullError::Size { expected, found: read });
    }
    digest::check("layer blob", &layer.digest, &found)?;
    let (unpacked, size, file) = sink.finish();
    drop(writeback);
    file.sync_all().map_err(|e| PullError::Write { path: out.clone(), source: e })?;
    let unpacked = unpacked.unwrap_or(found);
    digest::check("layer DiffID (uncompressed digest)", &classified.diff_id, &unpacked)?;
    let chain_id: Digest = t.id.chain_id.clone().into();
    // A vmrootfs layer with a dm-verity tree: the blob and its tree are stored apart, as a
    // local `build --verity` keeps them, the tree checked against the annotated root.
    let tree = work.join("tree");
    // The blob's own sha256: the DiffID's, unless a tree came after it (`check` hashes it).
    let (verity, blob_sha256) = match annotated {
        Some((hash_offset, root)) => {
            if hash_offset % crate::verity::BLOCK_SIZE != 0 || hash_offset > size {
                return Err(PullError::BadAnnotation {
                    key: erofs_image::VERITY_HASH_OFFSET,
                    value: hash_offset.to_string(),
                    expected: "a multiple of 4096 within the layer",
                });
            }
            split_off(&out, hash_offset, &tree)?;
            // The tree is checked with the salt it carries: the root the annotation names is
            // that of the tree the descriptor names, whatever key the layer is stored under.
            let salt = crate::verity::tree_salt(&tree, hash_offset)?;
            let checked = crate::verity::check(&out, &salt, &tree)?;
            if checked.root_digest != root {
                return Err(PullError::VerityMismatch {
                    annotated: root.to_string(),
                    found: checked.root_digest.to_string(),
                });
            }
            if checked.differing_tree_blocks != 0 {
                return Err(PullError::VerityTreeDiffers {
                    blocks: checked.differing_tree_blocks,
                    root: root.to_string(),
                });
            }
            let info = crate::verity::VerityInfo {
                hash_offset,
                root_digest: root,
                salt: hex::encode(&salt),
                block_size: crate::verity::BLOCK_SIZE,
                algorithm: "sha256".into(),
                tree_size: size - hash_offset,
                tree_sha256: digest::sha256_file_hex(&tree).map_err(PullError::Read)?,
                sha256: unpacked.digest().to_string(),
            };
            (Some((tree, info)), checked.blob_sha256)
        }
        None => (None, unpacked.digest().to_string()),
    };
    // An imported layer's key is its own, whatever its producer salted the tree with.
    let salted_for_key = match &verity {
        Some((_, v)) if t.id.recipe != IMPORTED_RECIPE => {
            v.salt == hex::encode(crate::verity::salt_for(&chain_id)?)
        }
        _ => true,
    };
    let record = LayerRecord {
        chain_id,
        diff_id: t.diff_id.clone(),
        fs: FsType::Erofs,
        recipe: t.id.recipe,
        size: verity.as_ref().map_or(size, |(_, v)| v.hash_offset),
        blob_sha256,
        tool: t.tool.clone(),
        dirs_sha256: None,
        own_sha256: None,
    };
    Ok(Fetched { blob: out, record, verity, salted_for_key })
}

/// The `org.erofs.dmverity.*` annotations of a layer, from any producer: `(hash_offset, root
/// digest)`. Its block size was checked by [`erofs_image::classify`] (4096 bytes, the only
/// size vmrootfs checks and opens); the salt and the block sizes are read from the tree's
/// superblock and checked when the layer arrives.
pub(crate) fn verity_of(layer: &LayerRef) -> Result<Option<(u64, Digest)>, PullError> {
    let a = &layer.annotations;
    let (Some(offset), Some(root)) =
        (a.get(erofs_image::VERITY_HASH_OFFSET), a.get(erofs_image::VERITY_ROOT_DIGEST))
    else {
        return Ok(None);
    };
    let bad = |key: &'static str, value: &str, expected: &'static str| PullError::BadAnnotation {
        key,
        value: value.to_string(),
        expected,
    };
    let offset = offset.parse().map_err(|_| bad(erofs_image::VERITY_HASH_OFFSET, offset, "a byte offset"))?;
    let root = root.parse().map_err(|_| bad(erofs_image::VERITY_ROOT_DIGEST, root, "a digest"))?;
    Ok(Some((offset, root)))
}

/// Moves the bytes of `file` from `at` on into the new file `tail`, and cuts `file` there.
fn split_off(file: &std::path::Path, at: u64, tail: &std::path::Path) -> Result<(), PullError> {
    let write_err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| PullError::Write { path, source }
    };
    let mut from = fs_err::OpenOptions::new().read(true).write(true).open(file).map_err(write_err(file))?;
    io::Seek::seek(&mut from, io::SeekFrom::Start(at)).map_err(write_err(file))?;
    let mut to = fs_err::File::create(tail).map_err(write_err(tail))?;
    io::copy(&mut from, &mut to).map_err(write_err(tail))?;
    from.set_len(at).map_err(write_err(file))?;
    Ok(())
}

/// A writer that hashes what passes (for `+zstd` blobs) or only counts it (raw ones).
enum MaybeHashing<W> {
    Hashing(HashingWriter<W>),
    Counting(W, u64),
}

impl<W: io::Write> MaybeHashing<W> {
    fn new(inner: W, hash: bool) -> Self {
        if hash { MaybeHashing::Hashing(HashingWriter::new(inner)) } else { MaybeHashing::Counting(inner, 0) }
    }

    /// The digest (if hashed), the bytes written and the writer.
    fn finish(self) -> (Option<Digest>, u64, W) {
        match self {
            MaybeHashing::Hashing(h) => {
                let (d, n, w) = h.finish();
                (Some(d), n, w)
            }
            MaybeHashing::Counting(w, n) => (None, n, w),
        }
    }
}

impl<W: io::Write> io::Write for MaybeHashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MaybeHashing::Hashing(h) => h.write(buf),
            MaybeHashing::Counting(w, n) => {
                let k = w.write(buf)?;
                *n += k as u64;
                Ok(k)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MaybeHashing::Hashing(h) => h.flush(),
            MaybeHashing::Counting(w, _) => w.flush(),
        }
    }
}

/// `io::copy` through a 1 MiB buffer instead of 8 KiB, written straight to the file: a copy
/// of each byte fewer (no `BufWriter`) and a write a MiB rather than 128 of them.
fn copy_in_large_pieces(from: &mut impl Read, to: &mut impl io::Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let filled = digest::read_full(from, &mut buf)?;
        if filled == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..filled])?;
        total += filled as u64;
    }
}

/// Counts bytes read, for progress.
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Fn(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

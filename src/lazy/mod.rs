//! Lazy start (issue 19): a layer blob served to a guest before it has all arrived.
//!
//! A [`BlockSource`] is a read-only byte range of fixed length whose reads return only
//! verified bytes: a lazily fetched registry blob ([`LazyBlob`]), or (in tests, and for blobs
//! already in the store) a plain file. The guest-facing servers — an NBD server for QEMU
//! ([`nbd`]), a FUSE filesystem for runtimes that take only paths — read through this trait
//! alone, so they neither know nor care where the bytes come from.
//!
//! ```text
//! let image = lazy::open(&store, "127.0.0.1:5000/lab/deb:v1", &registry_opts, &platform)?;
//! let sources = image.sources();          // one per lower, base first: serve these
//! image.start_background(share);          // the rest arrives at most `share` bytes/s
//! …                                       // the guest runs
//! let built = image.complete(&store, None, &reporter)?; // all of it, published, recorded
//! ```
//!
//! Only images `push --verity` made, uncompressed, can be read this way: every block is
//! checked against the layer's dm-verity tree before anyone sees it, and a chunk is a range
//! of the stored blob itself. Anything else is refused by [`open`], saying what is needed.
//! A completed cache whose sha256 is the descriptor's is published through the ordinary
//! pull (`pull.rs`): the same checks, locks and crash rules as any pulled blob.

mod background;
mod blob;
pub mod completer;
pub mod nbd;

pub use background::Share;
pub use blob::{CHUNK, Cause, Fetch, LazyBlob};

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use oci_spec::image::Digest;

use crate::erofs_image::Role;
use crate::platform::Platform;
use crate::progress::Reporter;
use crate::record::BuildResult;
use crate::source::registry::RegistrySource;
use crate::source::{ImageSource, LayerRef, RegistryOptions, ResolvedImage, SourceError};
use crate::store::Store;

/// Why a lazy image could not be opened, read or completed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyError {
    /// The registry or the reference failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Not an EROFS image: there are no blobs to read by range.
    #[error(
        "{reference} is not an EROFS image: --lazy reads the layers `vmrootfs push --verity` publishes (build it, then push it with --verity)"
    )]
    NotErofs {
        /// The image.
        reference: String,
    },
    /// A compressed layer: its bytes cannot be read by range.
    #[error(
        "layer {index} ({layer}) of {reference} is zstd-compressed: --lazy reads uncompressed layers by range (push it without --zstd)"
    )]
    Compressed {
        /// The image.
        reference: String,
        /// Layer index, base = 0.
        index: usize,
        /// Its digest.
        layer: Digest,
    },
    /// A layer without a dm-verity tree: its blocks could not be checked as they arrive.
    #[error(
        "layer {index} ({layer}) of {reference} has no dm-verity tree: --lazy checks every block against it (push the image with --verity)"
    )]
    NoVerity {
        /// The image.
        reference: String,
        /// Layer index, base = 0.
        index: usize,
        /// Its digest.
        layer: Digest,
    },
    /// A layer's annotations are not usable.
    #[error("layer {layer}")]
    Annotation {
        /// The layer.
        layer: Digest,
        /// What is wrong.
        #[source]
        source: Box<crate::pull::PullError>,
    },
    /// The annotated hash offset cannot be a blob's size.
    #[error(
        "layer {layer}: dm-verity hash offset {hash_offset} is not a positive multiple of 4096 below its size {size}"
    )]
    BadHashOffset {
        /// The layer.
        layer: Digest,
        /// The annotated offset.
        hash_offset: u64,
        /// The descriptor's size.
        size: u64,
    },
    /// A range of the blob could not be fetched.
    #[error("fetching layer {layer} from the registry")]
    Fetch {
        /// The layer.
        layer: Digest,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry sent fewer bytes than a chunk has.
    #[error("layer {layer}: the registry sent {got} of the {len} bytes at {offset}")]
    ShortChunk {
        /// The layer.
        layer: Digest,
        /// Where the chunk begins.
        offset: u64,
        /// Its length.
        len: u64,
        /// Bytes that came.
        got: u64,
    },
    /// The layer's tree is not the tree of the manifest's root digest.
    #[error("layer {layer}: its dm-verity tree")]
    Tree {
        /// The layer.
        layer: Digest,
        /// Why.
        #[source]
        source: Box<crate::verity::VerityError>,
    },
    /// The registry served a block that is not the layer's.
    #[error(
        "layer {index} ({layer}): block {block} from the registry does not match its dm-verity hash; it was not used"
    )]
    Corrupt {
        /// The layer.
        layer: Digest,
        /// Layer index, base = 0.
        index: usize,
        /// The 4 KiB block.
        block: u64,
    },
    /// The cache in the store could not be read or written.
    #[error("lazy cache {path}")]
    Cache {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Background completion failed.
    #[error("completing layer {layer} in the background")]
    Background {
        /// The layer.
        layer: Digest,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Publishing the completed blobs failed.
    #[error("publishing the completed blobs")]
    Publish(#[source] Box<crate::builder::BuildError>),
    /// `build --lazy` under a tag that names another stored image.
    #[error(
        "{tag} names a stored image of manifest {manifest}: `vmrootfs rm {tag}` first, or record this one under another --tag"
    )]
    TagTaken {
        /// The tag.
        tag: String,
        /// The stored image's manifest digest.
        manifest: Digest,
    },
    /// `lazy-complete` was not started as `run --lazy` starts it.
    #[error("lazy-complete: {0} (it is started by `run --lazy`)")]
    Completer(String),
}

use std::io;

pub(crate) mod fuse;

/// A read-only, fixed-length source of verified bytes, shared between server threads.
pub trait BlockSource: Send + Sync {
    /// Length in bytes (fixed for the source's lifetime).
    fn len(&self) -> u64;
    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`, which must lie within
    /// [`BlockSource::len`]; blocks until they are present and verified. Bytes that fail
    /// verification are never returned: the read fails (`io::ErrorKind::InvalidData`), and the
    /// server answers the guest with EIO.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A plain file as a [`BlockSource`] (a blob already in the store, and tests).
pub struct FileSource {
    file: std::fs::File,
    len: u64,
}

impl FileSource {
    /// The file at `path`, its length taken now.
    pub fn open(path: &std::path::Path) -> io::Result<FileSource> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl BlockSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read beyond the end of the source"));
        }
        self.file.read_exact_at(buf, offset)
    }
}

/// An image whose lowers are [`LazyBlob`]s (see the module doc).
pub struct LazyImage {
    spec: String,
    reference: String,
    /// The image pinned to its manifest digest (`host/repo@sha256:…`).
    pinned: String,
    image: ResolvedImage,
    /// One per lower, base first (a layer listed twice is one blob twice).
    lowers: Vec<Arc<LazyBlob>>,
    /// Each distinct blob once: what is fetched, counted and published.
    blobs: Vec<Arc<LazyBlob>>,
    opened: Instant,
    background: Option<background::Background>,
}

/// Opens the EROFS image `reference` in a registry for lazy reading: resolves it for
/// `platform`, refuses what cannot be read by range and checked block by block, and opens
/// (or resumes) each lower's cache in `store`, its dm-verity tree fetched and proved against
/// the manifest's root digest. Fetches no data block.
pub fn open(
    store: &Store,
    reference: &str,
    opts: &RegistryOptions,
    platform: &Platform,
) -> Result<LazyImage, LazyError> {
    store.require_writable()?;
    let registry = Arc::new(RegistrySource::new(reference, opts)?);
    let image = registry.resolve(platform)?;
    let spec = registry.describe();
    let Some(erofs) = &image.erofs else {
        return Err(LazyError::NotErofs { reference: reference.to_string() });
    };
    let opened = Instant::now();
    let mut lowers: Vec<Arc<LazyBlob>> = Vec::new();
    let mut blobs: Vec<Arc<LazyBlob>> = Vec::new();
    for (index, (layer, classified)) in
        image.layers.iter().zip(erofs).filter(|(_, c)| c.role == Role::Lower).enumerate()
    {
        let (hash_offset, root) = checked_layer(reference, index, layer, classified.zstd)?;
        // The same blob twice: one cache (its lock is held once), read by both lowers.
        if let Some(same) = blobs.iter().find(|b| b.digest() == &layer.digest) {
            lowers.push(same.clone());
            continue;
        }
        let dir = store.lazy_cache_dir(&layer.digest)?;
        let size = layer.size.unwrap_or_default();
        let blob = LazyBlob::open(
            index,
            layer.digest.clone(),
            size,
            hash_offset,
            &root,
            registry.clone(),
            dir,
            opened,
        )?;
        let blob = Arc::new(blob);
        lowers.push(blob.clone());
        blobs.push(blob);
    }
    let pinned = registry.pinned(&image.manifest_digest);
    Ok(LazyImage {
        spec,
        reference: reference.to_string(),
        pinned,
        image,
        lowers,
        blobs,
        opened,
        background: None,
    })
}

/// Layer `index`'s hash offset and root digest, if it can be read lazily.
fn checked_layer(
    reference: &str,
    index: usize,
    layer: &LayerRef,
    zstd: bool,
) -> Result<(u64, Digest), LazyError> {
    if zstd {
        return Err(LazyError::Compressed {
            reference: reference.to_string(),
            index,
            layer: layer.digest.clone(),
        });
    }
    let annotated = crate::pull::verity_of(layer)
        .map_err(|e| LazyError::Annotation { layer: layer.digest.clone(), source: Box::new(e) })?;
    annotated.ok_or_else(|| LazyError::NoVerity {
        reference: reference.to_string(),
        index,
        layer: layer.digest.clone(),
    })
}

impl LazyImage {
    /// The lowers, base first, as the servers read them.
    pub fn sources(&self) -> Vec<Arc<dyn BlockSource>> {
        self.lowers.iter().map(|b| b.clone() as Arc<dyn BlockSource>).collect()
    }

    /// The image pinned to its manifest digest: `host/repo@sha256:…`.
    pub fn pinned(&self) -> &str {
        &self.pinned
    }

    /// The lowers, base first.
    pub fn lowers(&self) -> &[Arc<LazyBlob>] {
        &self.lowers
    }

    /// The image as the registry describes it (config, layers, dm-verity annotations).
    pub fn image(&self) -> &ResolvedImage {
        &self.image
    }

    /// The canonical spelling of the image (`docker://…`).
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Seconds since the image was opened (the time base of [`LazyImage::fetch_log`]).
    pub fn elapsed(&self) -> f64 {
        self.opened.elapsed().as_secs_f64()
    }

    /// Data bytes fetched so far, all lowers.
    pub fn fetched_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.fetched_bytes()).sum()
    }

    /// Data bytes of all lowers (trees not counted).
    pub fn data_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.len()).sum()
    }

    /// Every chunk fetched so far, all lowers, in time order: the bytes-fetched curve.
    pub fn fetch_log(&self) -> Vec<Fetch> {
        let mut log: Vec<Fetch> = self.blobs.iter().flat_map(|b| b.fetch_log()).collect();
        log.sort_by(|a, b| a.at.total_cmp(&b.at));
        log
    }

    /// The lowers that met a block failing verification, base = 0.
    pub fn corrupt_layers(&self) -> Vec<(usize, Digest)> {
        self.blobs
            .iter()
            .filter(|b| b.failed_verification())
            .map(|b| (b.index(), b.digest().clone()))
            .collect()
    }

    /// Starts fetching the chunks nobody has read yet, within `share`, yielding to reads.
    pub fn start_background(&mut self, share: Share) {
        if self.background.is_none() {
            self.background = Some(background::Background::start(self.blobs.clone(), share));
        }
    }

    /// Fetches whatever is missing at full speed, then publishes every completed blob as an
    /// ordinary pulled blob (checked against its descriptor digest, DiffID and root digest,
    /// under the store's locks) and records the image as `tag` (default: the reference);
    /// removes the caches once published. A block failing verification ends it with
    /// [`LazyError::Corrupt`], nothing published.
    pub fn complete(
        mut self,
        store: &Store,
        tag: Option<&str>,
        reporter: &Reporter,
    ) -> Result<BuildResult, LazyError> {
        let started = self.opened.elapsed();
        if let Some(bg) = self.background.take() {
            bg.finish()?;
        }
        background::fill(&self.blobs, &Share::unlimited(), &std::sync::atomic::AtomicBool::new(false))?;
        crate::progress::debug(&format!(
            "lazy: complete after {:.2}s ({:.2}s since the background was told to finish)",
            self.opened.elapsed().as_secs_f64(),
            (self.opened.elapsed() - started).as_secs_f64()
        ));
        for b in &self.blobs {
            b.sync()?;
        }
        let _store_lock = store.lock_shared()?;
        let builder = crate::builder::Builder::new(store.clone(), crate::builder::BuildOptions::default())
            .map_err(|e| LazyError::Publish(Box::new(e)))?;
        let erofs = self.image.erofs.clone().expect("open took only EROFS images");
        let cached = Cached { spec: self.spec.clone(), blobs: &self.blobs };
        let reference = self.reference.clone();
        let built = builder
            .store_erofs_image(&reference, tag, &cached, &self.image, &erofs, reporter)
            .map_err(|e| LazyError::Publish(Box::new(e)))?;
        // The image is stored now: a lazy record of the tag is replaced by the record.
        store.remove_lazy_record(tag.unwrap_or(&reference))?;
        self.remove_caches()?;
        Ok(built)
    }
}

/// `build REF --lazy`: opens `reference` as [`open`] does (its lowers' trees fetched and proved,
/// no data block) and records it as `tag` (default: the reference) without storing it, pinned
/// to its manifest digest: `run TAG` boots it lazily. An image stored under `tag` already is
/// left as it is (`None`).
pub fn record(
    store: &Store,
    reference: &str,
    tag: Option<&str>,
    opts: &RegistryOptions,
    platform: &Platform,
) -> Result<Option<crate::store::LazyRecord>, LazyError> {
    let tag = tag.unwrap_or(reference);
    store.check_tag(tag)?;
    let _store_lock = store.lock_shared()?;
    let image = open(store, reference, opts, platform)?;
    match store.get(tag) {
        Ok(r) if r.manifest_digest == image.image.manifest_digest => return Ok(None),
        Ok(r) => return Err(LazyError::TagTaken { tag: tag.to_string(), manifest: r.manifest_digest }),
        Err(_) => {}
    }
    let record = crate::store::LazyRecord {
        tag: tag.to_string(),
        source: image.pinned.clone(),
        manifest_digest: image.image.manifest_digest.clone(),
        layers: image.blobs.iter().map(|b| b.digest().clone()).collect(),
        data_bytes: image.data_bytes(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    store.put_lazy_record(&record)?;
    Ok(Some(record))
}

impl LazyImage {
    /// Removes the caches this opening made, unused: the image was recorded meanwhile (by the
    /// completion of another run, whose caches' locks [`open`] waited for).
    pub fn discard(mut self) -> Result<(), LazyError> {
        if let Some(bg) = self.background.take() {
            bg.stop()?;
        }
        self.remove_caches()
    }

    fn remove_caches(&self) -> Result<(), LazyError> {
        self.blobs.iter().try_for_each(|b| b.remove_cache())
    }
}

impl Drop for LazyImage {
    /// Stops background completion after its chunk on the way: what is cached stays for the
    /// next run to resume (or gc to remove).
    fn drop(&mut self) {
        if let Some(bg) = self.background.take()
            && let Err(e) = bg.stop()
        {
            crate::progress::debug(&format!(
                "lazy: background completion: {}",
                crate::progress::error_chain(&e)
            ));
        }
    }
}

/// The completed caches as an image source: what publishing reads the blobs from.
struct Cached<'a> {
    spec: String,
    blobs: &'a [Arc<LazyBlob>],
}

impl ImageSource for Cached<'_> {
    fn describe(&self) -> String {
        self.spec.clone()
    }

    /// Never asked: the image was resolved when it was opened.
    fn resolve(&self, _platform: &Platform) -> Result<ResolvedImage, SourceError> {
        Err(SourceError::NotFound(format!("{} (the lazy caches hold only its layers)", self.spec)))
    }

    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        let blob = self
            .blobs
            .iter()
            .find(|b| b.digest() == &layer.digest)
            .ok_or_else(|| SourceError::MissingBlob(layer.digest.to_string()))?;
        let path = blob.cache_path();
        let file =
            fs_err::File::open(&path).map_err(|source| SourceError::Io { path: path.clone(), source })?;
        Ok(Box::new(file))
    }
}

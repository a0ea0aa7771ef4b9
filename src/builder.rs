//! The build: source → resolved image → one blob per layer (in parallel, skipping stored
//! layers) → image record.
//!
//! Layers convert concurrently, taken base first: up to `jobs` stream at a time (download,
//! decompress, normalize into mkfs: the CPU work). A layer's stream is written without waiting
//! for anyone; only before giving its implicit parent directories their metadata does it
//! wait for the directory index of the layer below (ready as soon as that layer has
//! streamed, before its mkfs ends). A layer waiting so gives its turn to stream to the next
//! layer, and up to `2 × jobs` layers are under way at once: an upper layer, small beside the
//! base, would otherwise idle a core until the base had streamed. Taking layers base first,
//! and never waiting for a lower layer while holding a turn, means the layer waited for has
//! always started and can finish, so the wait cannot deadlock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use oci_spec::image::Digest;

use crate::backend::tool::ToolError;
use crate::backend::{Backend, BackendError, FsType};
use crate::digest::{self, chain_ids};
use crate::layer::dirindex::DirIndex;
use crate::layer::normalize::{NormalizeError, Normalizer};
use crate::layer::{self, LayerError};
use crate::platform::Platform;
use crate::progress::Reporter;
use crate::record::{BuildResult, ImageRecord, LayerRecord, Lower, RuntimeConfig};
use crate::source::{self, ImageSource, ResolvedImage, SourceError};
use crate::store::{LayerSlot, LayerState, Store, StoreError};
use crate::verity::VerityInfo;

/// Why [`Builder::build`] failed. Causes below the variants shown here are reached through
/// [`std::error::Error::source`]; `{:#}` of an `anyhow` wrapper prints the whole chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The source image could not be opened or read (a missing file, a registry refusal, a
    /// manifest that is not an image).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A tool the build needs is missing or failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// Converting one layer failed.
    #[error("layer {digest}")]
    Layer {
        /// The layer's digest in the source manifest.
        digest: Digest,
        /// What went wrong.
        #[source]
        source: Box<LayerFailure>,
    },
    /// Making the dm-verity tree of a layer blob already in the store failed (`verity`).
    #[error("dm-verity tree of the stored layer {chain_id}")]
    Verity {
        /// The layer's chain ID.
        chain_id: Digest,
        /// What went wrong.
        #[source]
        source: Box<LayerFailure>,
    },
    /// Flattening the image (`squash`) failed.
    #[error("squashing the image")]
    Squash(#[from] crate::squash::SquashError),
    /// `squash` asked for without root.
    #[error("--squash needs root: it loop-mounts the layer blobs and stacks them with overlayfs")]
    SquashNeedsRoot,
    /// `squash` asked for an image without layers.
    #[error("--squash: the image has no layers, so there is nothing to flatten (build it without --squash)")]
    SquashNoLayers,
    /// Fetching one layer of an EROFS image failed.
    #[error("layer {digest}")]
    Pull {
        /// The layer's digest in the source manifest.
        digest: Digest,
        /// What went wrong.
        #[source]
        source: Box<crate::pull::PullError>,
    },
    /// An EROFS image asked for as blobs of another filesystem.
    #[error("the image is an EROFS image (its layers are EROFS already): it cannot give --fs {fs} blobs")]
    ErofsImageIsErofs {
        /// The filesystem asked for.
        fs: FsType,
    },
    /// `squash` asked for an EROFS image.
    #[error("--squash is not supported for EROFS images yet: build without it")]
    ErofsImageNoSquash,
    /// Making the merged blob (`merge`) failed.
    #[error("merging the image")]
    Merge(#[from] crate::merge::MergeError),
    /// `merge` asked for with blobs other than EROFS.
    #[error("--merge makes EROFS metadata over EROFS layer blobs: build with --fs erofs")]
    MergeNeedsErofs,
    /// `merge` asked for an image without layers.
    #[error("--merge: the image has no layers, so there is nothing to merge (build it without --merge)")]
    MergeNoLayers,
}

/// What went wrong with one layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerFailure {
    /// Reading the layer from the source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The layer could not be unpacked (a corrupt or hostile archive, a size limit).
    #[error(transparent)]
    Unpack(#[from] LayerError),
    /// The layer's entries could not be put in filesystem order.
    #[error(transparent)]
    Normalize(#[from] NormalizeError),
    /// Writing the filesystem blob failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Publishing the blob into the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The finished blob could not be read back to hash it.
    #[error("hashing the finished blob")]
    Hash(#[source] std::io::Error),
    /// Making the blob's dm-verity tree failed.
    #[error("making the dm-verity tree")]
    Verity(#[from] crate::verity::VerityError),
    /// Not converted because a layer below it failed.
    #[error("the layer below failed")]
    LowerFailed,
    /// A stored blob the build would reuse is not the bytes its record names.
    #[error(
        "the stored blob {path} is not what its record names{}: `vmrootfs verify` says which images use it",
        found.as_ref().map(|f| format!(" (its sha256 is {f})")).unwrap_or_default()
    )]
    DamagedBlob {
        /// The stored blob.
        path: std::path::PathBuf,
        /// Its sha256 hex, if it could be read.
        found: Option<String>,
    },
}

impl LayerFailure {
    /// Failures that only follow from another layer's failure.
    fn is_consequence(&self) -> bool {
        matches!(self, LayerFailure::LowerFailed | LayerFailure::Unpack(LayerError::Cancelled))
    }
}

/// The error to report when writing into the backend failed: the backend's own (mkfs exited,
/// a writer stopped), if the failure was its doing, else `failure`.
fn writer_failure(making: crate::backend::Making, failure: LayerFailure) -> LayerFailure {
    if !matches!(failure, LayerFailure::Unpack(LayerError::Output(_))) {
        return failure;
    }
    making.failure().map_or(failure, LayerFailure::Backend)
}

/// Options of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Filesystem of the layer blobs (default EROFS).
    pub fs: FsType,
    /// The platform picked from a multi-platform image (default: this host's).
    pub platform: Platform,
    /// Layers streamed at once (default: the number of CPUs).
    pub jobs: usize,
    /// Most bytes a layer may unpack to; more fails the build (decompression bombs).
    pub max_layer_bytes: u64,
    /// Also make one flattened blob of the whole image.
    pub squash: bool,
    /// Also make one merged EROFS metadata blob over the layer blobs (EROFS only).
    pub merge: bool,
    /// Give every layer blob a dm-verity tree (kept beside it in the store).
    pub verity: bool,
    /// Credentials and plain-HTTP hosts for registry sources.
    pub registry: crate::source::RegistryOptions,
    /// Pull an EROFS image `vmrootfs push` made from the source (a referrer of its manifest,
    /// same recipe) instead of converting, when the registry has one (erofs only).
    pub use_converted: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            fs: FsType::Erofs,
            platform: Platform::host(),
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            max_layer_bytes: 64 << 30,
            squash: false,
            merge: false,
            verity: false,
            registry: Default::default(),
            use_converted: false,
        }
    }
}

/// Builds images into a store.
pub struct Builder {
    store: Store,
    opts: BuildOptions,
    /// Found when a layer first needs converting: pulling an EROFS image needs no tools.
    backend: std::sync::OnceLock<Backend>,
}

/// The record of `image` from `source` with `lowers`, tagged `tag` (default: `spec`).
fn new_record(
    spec: &str,
    tag: Option<&str>,
    source: &dyn ImageSource,
    image: &ResolvedImage,
    lowers: Vec<Lower>,
) -> ImageRecord {
    ImageRecord {
        tag: tag.unwrap_or(spec).to_string(),
        source: source.describe(),
        manifest_digest: image.manifest_digest.clone(),
        config_digest: image.config_digest.clone(),
        platform: image.platform.clone(),
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        size: lowers.iter().map(|l| l.size).sum(),
        lowers,
        config: RuntimeConfig::from(&image.config),
        squashed: None,
        merged: None,
    }
}

/// Directory index of each layer being converted, handed from a layer to the one above.
struct DirSlots {
    state: Mutex<Vec<Slot>>,
    ready: Condvar,
}

#[derive(Clone)]
enum Slot {
    Pending,
    Ready(Arc<DirIndex>),
    Failed,
}

impl DirSlots {
    fn set(&self, i: usize, slot: Slot) {
        let mut s = self.state.lock().expect("slot lock");
        if matches!(s[i], Slot::Pending) {
            s[i] = slot;
        }
        self.ready.notify_all();
    }

    fn wait(&self, i: usize) -> Option<Arc<DirIndex>> {
        let mut s = self.state.lock().expect("slot lock");
        loop {
            match &s[i] {
                Slot::Ready(d) => return Some(d.clone()),
                Slot::Failed => return None,
                Slot::Pending => s = self.ready.wait(s).expect("slot lock"),
            }
        }
    }
}

/// Turns to stream a layer: `jobs` of them, each held while one layer streams, given in the
/// order of the conversion plan (the `k` of [`Builder::convert_all`]): the layer planned
/// first never waits behind a later one that reached the queue before it.
struct Turns {
    state: Mutex<TurnState>,
    returned: Condvar,
}

struct TurnState {
    free: usize,
    /// The plan position the next turn goes to.
    next: usize,
}

impl Turns {
    fn new(n: usize) -> Turns {
        Turns { state: Mutex::new(TurnState { free: n.max(1), next: 0 }), returned: Condvar::new() }
    }

    /// Waits for a turn for plan position `k`, once every earlier one had theirs; the turn is
    /// given back when the guard drops. Every position from 0 on must take its turn.
    fn take(&self, k: usize) -> Turn<'_> {
        let mut state = self.state.lock().expect("turn lock");
        while state.free == 0 || state.next != k {
            state = self.returned.wait(state).expect("turn lock");
        }
        state.free -= 1;
        state.next = k + 1;
        self.returned.notify_all();
        Turn(self)
    }
}

struct Turn<'a>(&'a Turns);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("turn lock").free += 1;
        self.0.returned.notify_all();
    }
}

/// Everything one layer conversion needs to know about the image.
struct Plan<'a> {
    source: &'a dyn ImageSource,
    image: &'a ResolvedImage,
    chain: &'a [Digest],
    stored: &'a [Option<LayerRecord>],
    slots: DirSlots,
    turns: Turns,
    cancel: AtomicBool,
    reporter: &'a Reporter,
}

impl Builder {
    /// A builder into `store`; refuses `merge` without EROFS. Its tools are found (and
    /// checked) when the first layer needs them.
    pub fn new(store: Store, opts: BuildOptions) -> Result<Builder, BuildError> {
        if opts.merge && opts.fs != FsType::Erofs {
            return Err(BuildError::MergeNeedsErofs);
        }
        Ok(Builder { store, opts, backend: std::sync::OnceLock::new() })
    }

    /// The backend of `--fs`, its tools checked the first time (before any layer is fetched).
    fn backend(&self) -> Result<&Backend, BuildError> {
        if let Some(b) = self.backend.get() {
            return Ok(b);
        }
        let detected = Backend::detect(self.opts.fs)?;
        Ok(self.backend.get_or_init(|| detected))
    }

    /// The store it builds into.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Builds `spec` and records it as `tag` (default: `spec`). `spec` is a registry reference
    /// (`alpine:3.20`, `docker://REF`, `127.0.0.1:5000/lab/img:tag`), `oci:DIR[:TAG]`,
    /// `oci-archive:FILE[:TAG]` or `docker-archive:FILE[:REF]`. An EROFS image (one `push`
    /// made, or containerd's) is pulled as it is, without conversion. Layers already in the
    /// store are reused; `reporter` shows progress on stderr.
    pub fn build(
        &self,
        spec: &str,
        tag: Option<&str>,
        reporter: &Reporter,
    ) -> Result<BuildResult, BuildError> {
        self.store.require_writable()?;
        self.store.check_tag(tag.unwrap_or(spec))?;
        let source = source::open(spec, &self.opts.registry)?;
        self.build_from(&*source, spec, tag, reporter)
    }

    /// [`Builder::build`] of an image from `source` (spelled `spec`), which the caller made
    /// (`commit`'s new image: the base's stored layers and the committed one).
    pub(crate) fn build_from(
        &self,
        source: &dyn ImageSource,
        spec: &str,
        tag: Option<&str>,
        reporter: &Reporter,
    ) -> Result<BuildResult, BuildError> {
        let image = source.resolve(&self.opts.platform)?;
        if self.opts.squash && image.layers.is_empty() {
            return Err(BuildError::SquashNoLayers);
        }
        if self.opts.merge && image.layers.is_empty() {
            return Err(BuildError::MergeNoLayers);
        }
        // Shared store lock for the whole build: no GC between publishing blobs and the record.
        let _store_lock = self.store.lock_shared()?;
        if let Some(erofs) = &image.erofs {
            return self.store_erofs_image(spec, tag, source, &image, erofs, reporter);
        }
        // Squashed blobs are made only over layers converted here (see `store_erofs_image`):
        // with --squash, the image is converted, as if no converted one existed.
        if self.opts.use_converted && self.opts.squash {
            reporter.line(
                "--use-converted is not used with --squash (it is made only from layers converted here): converting",
            );
        }
        let wants_converted = self.opts.use_converted && self.opts.fs == FsType::Erofs && !self.opts.squash;
        if wants_converted
            && let Some(converted) = source.converted(&image.manifest_digest, FsType::Erofs.recipe())?
        {
            reporter.line(&format!("using the converted image {converted} (--use-converted)"));
            let source = source::open(&converted, &self.opts.registry)?;
            let image = source.resolve(&self.opts.platform)?;
            if let Some(erofs) = &image.erofs {
                // A blob the merge cannot read (another producer's inlined file tails) is
                // converted here instead; the pulled blobs stay until `gc`.
                match self.store_erofs_image(spec, tag, &*source, &image, erofs, reporter) {
                    Err(BuildError::Merge(e)) if e.is_unmergeable_blob() => reporter.line(&format!(
                        "--merge: the converted image's layers cannot be merged ({}): converting",
                        crate::progress::error_chain(&e)
                    )),
                    done => return done,
                }
            }
        }
        for l in &image.layers {
            layer::check_media_type(&l.media_type)
                .map_err(|e| BuildError::Layer { digest: l.digest.clone(), source: Box::new(e.into()) })?;
        }
        let fs = self.opts.fs;
        let chain = chain_ids(&image.diff_ids);
        let stored = chain.iter().map(|c| self.store.layer(fs, c)).collect::<Result<Vec<_>, _>>()?;
        let missing: Vec<usize> = (0..chain.len()).filter(|&i| stored[i].is_none()).collect();
        let total = chain.len();
        for (i, l) in image.layers.iter().enumerate().filter(|(i, _)| stored[*i].is_some()) {
            reporter.cached(i, total, &l.digest);
        }
        if !missing.is_empty() || self.opts.squash {
            self.backend()?;
        }
        let plan = Plan {
            source,
            image: &image,
            chain: &chain,
            stored: &stored,
            slots: DirSlots { state: Mutex::new(vec![Slot::Pending; total]), ready: Condvar::new() },
            turns: Turns::new(self.opts.jobs),
            cancel: AtomicBool::new(false),
            reporter,
        };
        let converted = self.convert_all(&plan, &missing)?;
        let mut lowers = Vec::with_capacity(total);
        let mut trees_made = 0;
        for i in 0..total {
            let done = converted.iter().find(|(j, ..)| *j == i);
            let rec = stored[i].clone().or_else(|| done.map(|(_, r, _)| r.clone()));
            let rec = rec.expect("every layer is stored or converted");
            let verity = match (self.opts.verity, done.and_then(|(_, _, v)| v.clone())) {
                (false, _) => None,
                (true, Some(v)) => Some(v),
                (true, None) => {
                    let (v, made) = self.ensure_verity(&chain[i])?;
                    if made {
                        trees_made += 1;
                        let short = &image.layers[i].digest.digest()[..12];
                        reporter
                            .line(&format!("layer {}/{total} sha256:{short}: dm-verity tree made", i + 1));
                    }
                    Some(v)
                }
            };
            lowers.push(Lower {
                fs,
                recipe: rec.recipe,
                chain_id: chain[i].clone(),
                diff_id: image.diff_ids[i].clone(),
                digest: image.layers[i].digest.clone(),
                size: rec.size,
                blob_sha256: rec.blob_sha256,
                verity,
            });
        }
        let mut record = new_record(spec, tag, source, &image, lowers);
        let mut squash_cached = true;
        if self.opts.squash {
            let top = chain.last().ok_or(BuildError::SquashNoLayers)?;
            squash_cached = self.store.squashed(fs, top)?.is_some();
            if !squash_cached && !rustix::process::geteuid().is_root() {
                return Err(BuildError::SquashNeedsRoot);
            }
            record.squashed = Some(crate::squash::squash(&self.store, self.backend()?, &record.lowers)?);
        }
        let mut merge_cached = true;
        if self.opts.merge {
            if self.backend()?.fs() != FsType::Erofs {
                return Err(BuildError::MergeNeedsErofs);
            }
            let top = chain.last().ok_or(BuildError::MergeNoLayers)?;
            merge_cached = self.store.merged(top)?.is_some();
            record.merged = Some(crate::merge::merge(&self.store, &record.lowers, self.opts.verity)?);
        }
        self.put_record(&image, &record)?;
        let cached = missing.is_empty() && squash_cached && merge_cached && trees_made == 0;
        Ok(BuildResult { record: self.store.locate(record)?, cached })
    }

    /// Records `record`, keeping the source's own manifest and config beside it (what `push`
    /// needs to republish the image).
    fn put_record(&self, image: &ResolvedImage, record: &ImageRecord) -> Result<(), BuildError> {
        if let Some(bytes) = &image.manifest_bytes {
            self.store.put_source_json(&image.manifest_digest, bytes)?;
        }
        self.store.put_source_json(&image.config_digest, &image.config_bytes)?;
        self.store.put_record(record)?;
        Ok(())
    }

    /// Builds an image that is EROFS already: its blobs are stored as they are ([`crate::pull`]);
    /// with `--merge`, the merged blob is made over them ([`crate::merge`]; a blob it cannot
    /// read ends in [`BuildError::Merge`], before anything is recorded). Also how a lazy
    /// image's completed caches are published ([`crate::lazy`]).
    pub(crate) fn store_erofs_image(
        &self,
        spec: &str,
        tag: Option<&str>,
        source: &dyn ImageSource,
        image: &ResolvedImage,
        layers: &[crate::erofs_image::ErofsLayer],
        reporter: &Reporter,
    ) -> Result<BuildResult, BuildError> {
        if self.opts.fs != FsType::Erofs {
            return Err(BuildError::ErofsImageIsErofs { fs: self.opts.fs });
        }
        if self.opts.squash {
            return Err(BuildError::ErofsImageNoSquash);
        }
        let (mut lowers, mut cached) = crate::pull::pull(
            &self.store,
            source,
            image,
            layers,
            self.opts.jobs,
            self.opts.max_layer_bytes,
            reporter,
        )
        .map_err(|(digest, source)| BuildError::Pull { digest, source })?;
        if self.opts.verity {
            // Layers pulled without a tree get one here, as a local `build --verity` would.
            for l in lowers.iter_mut().filter(|l| l.verity.is_none() && l.recipe == FsType::Erofs.recipe()) {
                let (info, made) = self.ensure_verity(&l.chain_id)?;
                cached &= !made;
                l.verity = Some(info);
            }
        }
        let mut record = new_record(spec, tag, source, image, lowers);
        if self.opts.merge {
            let top = &record.lowers.last().ok_or(BuildError::MergeNoLayers)?.chain_id;
            cached &= self.store.merged(top)?.is_some();
            record.merged = Some(crate::merge::merge(&self.store, &record.lowers, self.opts.verity)?);
        }
        self.put_record(image, &record)?;
        Ok(BuildResult { record: self.store.locate(record)?, cached })
    }

    /// The dm-verity tree of the stored layer `chain_id`, made now if missing or not the tree
    /// of the blob beside it (under the layer lock, looking again once it is held); true when
    /// it was made. The blob must hash to what its record says: a tree of damaged bytes is
    /// never made.
    fn ensure_verity(&self, chain_id: &Digest) -> Result<(crate::verity::VerityInfo, bool), BuildError> {
        let fs = self.opts.fs;
        if let Some(v) = self.store.layer_verity(fs, chain_id)? {
            return Ok((v, false));
        }
        let _layer_lock = self.store.lock_layer(fs, chain_id)?;
        if let Some(v) = self.store.layer_verity(fs, chain_id)? {
            return Ok((v, false));
        }
        let layer_failure =
            |e: LayerFailure| BuildError::Verity { chain_id: chain_id.clone(), source: Box::new(e) };
        let id = crate::record::BlobId::new(crate::record::BlobKind::Layer, fs, fs.recipe(), chain_id)
            .map_err(StoreError::from)?;
        let blob = self.store.blob_path(&id);
        let recorded = match self.store.layer_slot(&id)? {
            LayerSlot::Published(r) => r.blob_sha256,
            LayerSlot::Absent | LayerSlot::Damaged(_) => {
                return Err(layer_failure(LayerFailure::DamagedBlob { path: blob, found: None }));
            }
        };
        let work = self.store.staging("verity-")?;
        let tree = work.path().join("tree");
        let salt = crate::verity::salt_for(chain_id).map_err(StoreError::from)?;
        let built = crate::verity::build_tree(&blob, &salt, &tree).map_err(|e| layer_failure(e.into()))?;
        if built.blob_sha256 != recorded {
            return Err(layer_failure(LayerFailure::DamagedBlob {
                path: blob,
                found: Some(built.blob_sha256),
            }));
        }
        self.store.publish_verity(fs, chain_id, &tree, &built.info, &recorded)?;
        Ok((built.info, true))
    }

    /// Converts the `missing` layers, `jobs` streaming at a time; the first real failure wins.
    ///
    /// The largest layer streams first, the others in image order: a layer's blob can only be
    /// hashed once its stream has ended (its superblock is written last), so the largest
    /// layer's stream and then that hash are the longest chain of work, and the others fit
    /// beside and after it.
    fn convert_all(
        &self,
        plan: &Plan<'_>,
        missing: &[usize],
    ) -> Result<Vec<(usize, LayerRecord, Option<VerityInfo>)>, BuildError> {
        let size = |i: usize| plan.image.layers[i].size.unwrap_or(0);
        let mut order = missing.to_vec();
        if let Some(largest) = (0..order.len()).max_by_key(|&k| (size(order[k]), std::cmp::Reverse(k))) {
            order[..=largest].rotate_right(1);
        }
        let next = AtomicUsize::new(0);
        let done = Mutex::new(Vec::new());
        let failed = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..(2 * self.opts.jobs.max(1)).min(order.len()) {
                s.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&i) = order.get(k) else { break };
                        let turn = plan.turns.take(k);
                        match self.convert_one(plan, i, turn) {
                            Ok((rec, verity)) => done.lock().expect("lock").push((i, rec, verity)),
                            Err(e) => {
                                plan.cancel.store(true, Ordering::SeqCst);
                                plan.slots.set(i, Slot::Failed);
                                failed.lock().expect("lock").push((i, e));
                            }
                        }
                    }
                });
            }
        });
        let mut failed = failed.into_inner().expect("lock");
        failed.sort_by_key(|(i, e)| (e.is_consequence(), *i));
        if let Some((i, source)) = failed.into_iter().next() {
            return Err(BuildError::Layer {
                digest: plan.image.layers[i].digest.clone(),
                source: Box::new(source),
            });
        }
        Ok(done.into_inner().expect("lock"))
    }

    fn lower_dirs(&self, plan: &Plan<'_>, i: usize) -> Result<Arc<DirIndex>, LayerFailure> {
        if i == 0 {
            return Ok(Arc::new(DirIndex::default()));
        }
        if plan.stored[i - 1].is_some() {
            return Ok(Arc::new(self.store.dir_index(self.opts.fs, &plan.chain[i - 1])?));
        }
        plan.slots.wait(i - 1).ok_or(LayerFailure::LowerFailed)
    }

    /// Converts layer `i` (and, with `--verity`, makes its tree in the same read as the
    /// blob's hash), streaming it on `turn`, which it gives back once the stream has ended.
    fn convert_one(
        &self,
        plan: &Plan<'_>,
        i: usize,
        turn: Turn<'_>,
    ) -> Result<(LayerRecord, Option<VerityInfo>), LayerFailure> {
        let layer = &plan.image.layers[i];
        let fs = self.opts.fs;
        // The layer lock, then a second look: another build may have made the blob meanwhile.
        let _layer_lock = self.store.lock_layer(fs, &plan.chain[i])?;
        match self.store.layer_state(fs, &plan.chain[i])? {
            LayerState::Ready(record) => {
                plan.slots.set(i, Slot::Ready(Arc::new(self.store.dir_index(fs, &plan.chain[i])?)));
                plan.reporter.line(&format!(
                    "layer {}/{} {}: stored by another build meanwhile",
                    i + 1,
                    plan.chain.len(),
                    layer.digest
                ));
                return Ok((record, None));
            }
            // Converted again; publishing replaces the blob only if it is damaged or the same
            // bytes (a pulled blob, which has no sidecars).
            LayerState::Unusable { why, .. } => plan.reporter.line(&format!(
                "layer {}/{} {}: the stored blob cannot be reused as it is ({why}): converting it again",
                i + 1,
                plan.chain.len(),
                layer.digest
            )),
            LayerState::Absent => {}
        }
        let progress = plan.reporter.layer(i, plan.chain.len(), &layer.digest, layer.size);
        let started = std::time::Instant::now();
        let result = (|| {
            let work = self.store.staging("layer-")?;
            let out = work.path().join("blob");
            let backend = self.backend.get().expect("detected before any layer converts");
            let writeback = crate::writeback::Writeback::follow(&out);
            let mut making = backend.start(&plan.chain[i], &out)?;
            // EROFS layers above the base mark their new directories opaque, so that
            // `build --merge` shows what overlayfs shows (see `Normalizer::opaque_new_dirs`);
            // an EROFS base layer keeps no whiteouts or opaque markers (the EROFS image layer
            // format forbids them there; see `Normalizer::base_layer`).
            let erofs = fs == FsType::Erofs;
            // The normalizer writes through a borrow: whichever write fails, even the last ones
            // of `finish`, the backend is still here to say why (a writer's own error).
            let mut normalizer = Normalizer::new(&mut making, self.opts.max_layer_bytes)
                .opaque_new_dirs(erofs && i > 0)
                .marker_only_on_repeat(backend.adds_repeated_xattrs())
                .data_room(backend.data_room(work.path())?);
            if erofs && i == 0 {
                normalizer = normalizer.base_layer();
            }
            let blob = plan.source.open_layer(layer)?;
            let streamed = layer::stream(
                blob,
                Some(&layer.digest),
                layer.size,
                &plan.image.diff_ids[i],
                self.opts.max_layer_bytes,
                &plan.cancel,
                &|n| progress.inc(n),
                &mut normalizer,
            );
            if let Err(e) = streamed {
                drop(normalizer);
                return Err(writer_failure(making, e.into()));
            }
            drop(turn);
            let streamed_at = std::time::Instant::now();
            let lower = self.lower_dirs(plan, i)?;
            let finished = match normalizer.finish(&lower) {
                Ok((finished, _)) => finished,
                Err(NormalizeError::Write(e)) => {
                    return Err(writer_failure(making, LayerError::Output(e).into()));
                }
                Err(e) => return Err(e.into()),
            };
            let merged = Arc::new(finished.merged);
            plan.slots.set(i, Slot::Ready(merged.clone()));
            progress.step(self.opts.fs.name());
            making.finish()?;
            let syncing = writeback.finish();
            let made_at = std::time::Instant::now();
            let tree = work.path().join("tree");
            let (blob_sha256, verity) = if self.opts.verity {
                let salt =
                    crate::verity::salt_for(&plan.chain[i]).map_err(crate::verity::VerityError::from)?;
                let built = crate::verity::build_tree(&out, &salt, &tree)?;
                (built.blob_sha256, Some(built.info))
            } else {
                (digest::sha256_file_hex(&out).map_err(LayerFailure::Hash)?, None)
            };
            let hashed_at = std::time::Instant::now();
            syncing.wait();
            let synced_at = std::time::Instant::now();
            let size = fs_err::metadata(&out).map_err(LayerFailure::Hash)?.len();
            let record = LayerRecord {
                chain_id: plan.chain[i].clone(),
                diff_id: plan.image.diff_ids[i].clone(),
                fs: self.opts.fs,
                recipe: self.opts.fs.recipe(),
                size,
                blob_sha256,
                tool: backend.describe(),
                dirs_sha256: None,
                own_sha256: None,
            };
            let record = self.store.publish_layer(&out, &merged, &record)?;
            if let Some(v) = &verity {
                self.store.publish_verity(fs, &plan.chain[i], &tree, v, &record.blob_sha256)?;
            }
            crate::progress::debug(&format!(
                "layer {}: streamed in {:.2}s, waited for the layer below and {} for {:.2}s, \
                 hashed{} in {:.2}s, waited {:.2}s more for the disk, published in {:.2}s",
                i + 1,
                (streamed_at - started).as_secs_f64(),
                self.opts.fs,
                (made_at - streamed_at).as_secs_f64(),
                if self.opts.verity { " (and made its dm-verity tree)" } else { "" },
                (hashed_at - made_at).as_secs_f64(),
                (synced_at - hashed_at).as_secs_f64(),
                synced_at.elapsed().as_secs_f64()
            ));
            Ok((record, verity))
        })();
        match &result {
            Ok((r, _)) => progress.done(r.size),
            Err(_) => progress.failed(),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_go_in_plan_order_whoever_asks_first() {
        let turns = Turns::new(1);
        let taken = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let first = turns.take(0);
            // Positions 2 and 1 ask while 0 streams; 2 asks first.
            for k in [2, 1] {
                let (turns, taken) = (&turns, &taken);
                s.spawn(move || {
                    let _turn = turns.take(k);
                    taken.lock().unwrap().push(k);
                });
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            taken.lock().unwrap().push(0);
            drop(first);
        });
        assert_eq!(taken.into_inner().unwrap(), [0, 1, 2]);
    }
}

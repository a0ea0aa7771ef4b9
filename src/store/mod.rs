//! The content-addressed store of layer blobs and image records, and the only code that knows
//! its layout.
//!
//! ```text
//! <root>/                               $VMROOTFS_STORE, else $XDG_DATA_HOME/vmrootfs,
//!   meta.json                           else ~/.local/share/vmrootfs
//!                                       {"format": 2}; format 1 is upgraded on open
//!                                       (records only, see upgrade.rs); another is refused
//!   .lock                               the store lock
//!   layers/<fs>-v<N>/<chain hex>.<fs>       layer blob, read-only; N = recipe version
//!   layers/<fs>-v<N>/<chain hex>.dirs       directories of the stack up to this layer
//!   layers/<fs>-v<N>/<chain hex>.json       LayerRecord: size and sha256 of the blob, and
//!                                       the sha256 of its .dirs
//!   layers/<fs>-v<N>/<chain hex>.own        older stores only (merged format 1 read it):
//!                                       read by nothing now, removed with its blob
//!   layers/<fs>-v<N>/<chain hex>.<fs>.lock  the layer lock
//!   layers/<fs>-v<N>/<chain hex>.verity     the blob's dm-verity tree (`build --verity`):
//!                                       superblock + hash blocks, as appended to the blob
//!                                       in a pushed layer (see crate::verity)
//!   layers/<fs>-v<N>/<chain hex>.verity.json  its VerityInfo and the sha256 of the blob it
//!                                       is the tree of; written after the tree, so a tree
//!                                       whose .verity.json names the blob is complete
//!   layers/<fs>-v<N>/squash-<chain hex>.<fs>  the whole stack flattened (`build --squash`),
//!                                       with its `.json` record and `.lock`
//!   layers/erofs-v<N>/merged2-<chain hex>.erofs  merged metadata over the stack's layer blobs
//!                                       (`build --merge`), with its `.json` and `.lock`
//!                                       (`merged-`: format 1, see `merge::MERGE_FORMAT`)
//!   images/<escaped tag>.json           ImageRecord, one per tag
//!   sources/<sha256 hex>.json           a source manifest or config, as the source served
//!                                       it, kept for `push` while a record names it
//!   oci/sha256/<sha256 hex>             OCI blobs vmrootfs authored or keeps (a committed
//!                                       layer's tar, a new image's config and manifest),
//!                                       read-only, kept while a record names them (oci.rs)
//!   vm/                                 `run`'s cache, rebuilt on demand, emptied by gc
//!     vmlinux-<bzImage sha256 hex>      the kernel unpacked to its ELF, keyed by content
//!                                       (the initramfs is made per run, in tmp/)
//!   lazy/<layer digest hex>/            a lazy blob's cache (`run --lazy`, see crate::lazy):
//!     blob                              `blob ‖ tree` as the descriptor names it, sparse:
//!                                       only verified chunks written
//!     present                           one byte per chunk, 1 once its bytes are synced
//!     .lock                             held by the one process filling the cache
//!                                       (a completed blob is published as any pulled
//!                                       one and its cache removed; gc removes the rest,
//!                                       but for the caches of lazy records)
//!   lazy/complete-<hex>.log             a detached completion's log (lazy::completer),
//!                                       removed once it recorded the image
//!   lazy-images/<escaped tag>.json      LazyRecord: an image recorded by `build --lazy`,
//!                                       not stored yet (lazy_record.rs)
//!   tmp/                                staging; anything here is garbage
//! ```
//!
//! `<chain hex>` is the 64 hex digits of a sha256 chain ID: only sha256 digests are accepted
//! from sources, so names need no algorithm.
//!
//! # Sharing and read-only stores
//!
//! A store is readable by everyone and written by its owner: directories are made `0755`,
//! records, sidecars and `meta.json` `0644`, blobs and verity trees `0444`, lock files
//! `0644`, whatever the umask (a group or a single user restricts access with the mode of
//! the store's root, which vmrootfs leaves as it finds it). Another user, or anyone on a
//! read-only mount of the store, runs the commands that only read it (`ls`, `inspect`,
//! `verify`, `push`, `export` to a file elsewhere): [`Store::open`] creates nothing in a store
//! it cannot write, and the shared store lock opens `.lock` read-only.
//!
//! # Identity, not location
//!
//! Records name each blob by its [`BlobId`] (kind, filesystem, recipe version, chain ID);
//! nothing persisted holds a path. Paths are derived here, from the root the store was
//! opened at ([`Store::locate`]), so the same store reached through a
//! symlink, a `..` path or a new mount point is the same store, and a store can be moved.
//! GC marks by identity. Output for runtimes (`build --json`, `inspect --json`) carries
//! absolute paths, derived at output time.
//!
//! # Publication
//!
//! Every file is written as a temp file (in `tmp/` for blobs, beside the target for small
//! files), fsynced, renamed into place, and its directory fsynced. A layer's `.dirs` and
//! `.json` are published before its blob, so a blob that exists is complete and described;
//! an image record is published only after all its blobs. A crash at any point leaves
//! records that point at complete blobs, and garbage only in `tmp/` (and in stale
//! `vmrootfs-stage-<pid>-*` directories of dead processes on tmpfs).
//!
//! A published blob is never replaced by other bytes: only one of the same bytes is, or a
//! damaged one (see `Store::layer_slot`) by the bytes every image record naming it expects;
//! a tree is reused only beside the blob its `.verity.json` names.
//!
//! # Locks
//!
//! One protocol, kept everywhere (`flock`):
//!
//! 1. **Store lock** `.lock`: *shared* for the whole of a build, for `verify`, and for a
//!    `run` from reading its record until the guest has exited; *exclusive* for `rm` and `gc`.
//!    So GC never runs while a build is between publishing a blob and writing the record
//!    that references it, nor deletes a running guest's drives or its `tmp/vm-*`.
//! 2. **Layer lock** `<blob>.lock`, exclusive, held by the producer of a blob while it
//!    converts. After taking it the producer looks for the finished blob again and converts
//!    only if it is still missing: concurrent builds convert each shared layer once.
//!
//! Order: store lock before layer locks. A build takes layer locks base first, and a holder of
//! one waits only on layers below it, so waits cannot form a cycle. Blocking on a lock prints
//! "waiting for lock on …" first.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

mod gc;
mod lazy_record;
mod oci;

pub use lazy_record::LazyRecord;
mod upgrade;
mod verify;

pub use gc::GcReport;
pub use oci::{OciBlob, VerifiedOciBlob};
pub use verify::BadBlob;

use crate::backend::FsType;
use crate::digest::InvalidDigest;
use crate::layer::dirindex::DirIndex;
use crate::lock::FileLock;
use crate::record::{
    BlobId, BlobKind, ImageRecord, LayerRecord, Located, LocatedRecord, MergedBlob, SquashedBlob,
};
use crate::verity::VerityInfo;

/// Version of the on-disk layout written in `meta.json`. 2: records name blobs by identity
/// (no paths), sha256 chain IDs only.
pub const FORMAT: u32 = 2;

/// The longest file name Linux filesystems take (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// Mode of the store's directories: everyone may read and search, the owner writes.
const DIR_MODE: u32 = 0o755;
/// Mode of records, sidecars, `meta.json` and kept sources: everyone may read.
const FILE_MODE: u32 = 0o644;
/// Mode of published blobs and verity trees: read-only for all, the owner included.
const BLOB_MODE: u32 = 0o444;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing a file of the store failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The store has a layout version this vmrootfs does not read.
    #[error("store {path} has format {found}, this vmrootfs reads format {FORMAT}")]
    UnknownFormat {
        /// The store's `meta.json`.
        path: PathBuf,
        /// The format it gives.
        found: String,
    },
    /// A record of an older layout that cannot be upgraded.
    #[error("cannot upgrade record {path} to store format {FORMAT}: {reason}")]
    Unupgradable {
        /// The record.
        path: PathBuf,
        /// Why it cannot be upgraded.
        reason: String,
    },
    /// No image recorded under this tag.
    #[error("no image tagged {0:?} in the store")]
    NoSuchTag(String),
    /// The tag names an image recorded lazily (`build --lazy`), not stored yet.
    #[error(
        "{0} is recorded lazily (build --lazy): its layers are not stored yet; `vmrootfs run {0}` boots it, fetching them, `vmrootfs rm {0}` forgets it"
    )]
    Lazy(String),
    /// A tag whose record file name would be too long.
    #[error(
        "tag {tag} is too long: its record's file name would be {len} bytes (each byte outside [A-Za-z0-9._-] takes 3), and a file name holds at most {NAME_MAX}; choose a shorter --tag"
    )]
    TagTooLong {
        /// The tag.
        tag: String,
        /// Bytes of its record's file name.
        len: usize,
    },
    /// A record that is not valid JSON of its type.
    #[error("corrupt record {path}")]
    BadRecord {
        /// The record.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A record that names a blob by a digest that is not sha256.
    #[error("record {path} names a blob by a bad chain ID")]
    BadRecordDigest {
        /// The record.
        path: PathBuf,
        /// What is wrong with the digest.
        #[source]
        source: InvalidDigest,
    },
    /// A digest that is not sha256.
    #[error(transparent)]
    Digest(#[from] InvalidDigest),
    /// Bytes put into the store are not the digest they were expected to be: nothing was
    /// published.
    #[error(transparent)]
    Mismatch(#[from] crate::digest::DigestMismatch),
    /// No store was given and there is no home directory for the default one.
    #[error("no home directory: set VMROOTFS_STORE or pass --store")]
    NoHome,
    /// A change asked of a store this process cannot write.
    #[error(
        "store {root} is not writable by this process (a read-only mount, or another user's store): it can be read (ls, inspect, verify, push, export), not changed"
    )]
    ReadOnly {
        /// The store's root.
        root: PathBuf,
    },
    /// A published blob would be replaced by other bytes (never done).
    #[error(
        "{path} holds other bytes (sha256 {stored}, {tool}) than this conversion made (sha256 {new}); \
         a published blob is never replaced: remove the images that use it (`vmrootfs rm`, \
         `vmrootfs gc`) to convert the layer here"
    )]
    WouldReplace {
        /// The published blob.
        path: PathBuf,
        /// Its sha256 hex.
        stored: String,
        /// The tool its record says made it.
        tool: String,
        /// The sha256 hex of the bytes made now.
        new: String,
    },
    /// Records were removed, then deleting their blobs failed.
    #[error(
        "{} removed, but then {what}; run `vmrootfs gc` once that is fixed to remove what is left",
        removed_tags(.removed)
    )]
    AfterRemoval {
        /// The tags whose records are gone.
        removed: Vec<String>,
        /// What failed after the removal.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<StoreError>,
    },
    /// A damaged blob kept because records name other bytes than those made now.
    #[error(transparent)]
    WouldReplaceDamaged(Box<DamagedBlobKept>),
    /// Mounts left under `tmp/`: nothing was removed.
    #[error(
        "mounted under {tmp}: {} (left by a killed `build --squash` of an older vmrootfs?): nothing was removed; unmount them (umount -R) and run again",
        .mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    MountedInTmp {
        /// The store's `tmp/`.
        tmp: PathBuf,
        /// The mount points found under it.
        mounts: Vec<PathBuf>,
    },
}

/// `tag a was`, `tags a, b were`.
fn removed_tags(tags: &[String]) -> String {
    match tags {
        [one] => format!("tag {one} was"),
        many => format!("tags {} were", many.join(", ")),
    }
}

/// A damaged layer blob that image records name as other bytes than those about to replace it
/// (see `Store::publish_layer`).
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} cannot be used as it is ({why}), but the records of {} name its bytes as sha256 \
     {expected}, not the sha256 {new} of the bytes made now: it is kept; build those images \
     again from their sources, or remove them (`vmrootfs rm`, `vmrootfs gc`), then build this \
     one again",
    tags.join(", ")
)]
pub struct DamagedBlobKept {
    /// The damaged blob.
    pub path: PathBuf,
    /// Why it cannot be used.
    pub why: LayerDamage,
    /// The tags whose records name it.
    pub tags: Vec<String>,
    /// The sha256 hex those records give.
    pub expected: String,
    /// The sha256 hex of the bytes made now.
    pub new: String,
}

/// What the store holds under a layer key (see [`Store::layer_slot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LayerSlot {
    Absent,
    /// A blob with a readable record of its size.
    Published(LayerRecord),
    /// A blob that cannot be used as it is.
    Damaged(LayerDamage),
}

/// What a tar build finds under a layer key (see [`Store::layer_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LayerState {
    Absent,
    Ready(LayerRecord),
    /// A blob is there but cannot be reused as it is: a pulled blob (no sidecars) or a damaged
    /// one. `record` is its readable record, if it has one.
    Unusable {
        record: Option<LayerRecord>,
        why: LayerDamage,
    },
}

/// Why a published layer blob cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerDamage {
    /// A sidecar (`.json`, `.dirs`, `.own`) is missing.
    #[error("{path} is missing")]
    NoSidecar {
        /// The missing file.
        path: PathBuf,
    },
    /// The layer record cannot be read.
    #[error("{path} is unreadable")]
    UnreadableRecord {
        /// The record.
        path: PathBuf,
    },
    /// The blob is not the size its record gives.
    #[error("{path} is {size} bytes, its record says {recorded}")]
    WrongSize {
        /// The blob.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The size its record gives.
        recorded: u64,
    },
    /// A sidecar is not the bytes the layer record names.
    #[error("{path} is not what its layer's record names")]
    SidecarChanged {
        /// The sidecar.
        path: PathBuf,
    },
}

/// A `.verity.json` sidecar: the tree's [`VerityInfo`] and the sha256 of the blob it is the
/// tree of (absent in stores older than this field: such a tree is made again).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredVerity {
    #[serde(default)]
    blob_sha256: Option<String>,
    #[serde(flatten)]
    info: VerityInfo,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// An opened store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Whether this process can write it; if not, it is only read (see [`Store::open`]).
    writable: bool,
}

/// The store lock `.lock`, held until dropped. Empty for a store that this process cannot
/// write and that has no lock file.
#[derive(Debug)]
pub struct StoreLock {
    _file: Option<FileLock>,
}

impl Store {
    /// `$XDG_DATA_HOME/vmrootfs`, else `~/.local/share/vmrootfs` (`$VMROOTFS_STORE` is read
    /// by the CLI).
    pub fn default_root() -> Result<PathBuf, StoreError> {
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("vmrootfs"));
        }
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).ok_or(StoreError::NoHome)?;
        Ok(PathBuf::from(home).join(".local/share/vmrootfs"))
    }

    /// Opens the store at `root`, creating it if needed; refuses an unknown format. A store
    /// the caller cannot write (a read-only mount, a mirror, another user's store) is opened
    /// as it is, for the commands that only read it: nothing is created in it.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = std::path::absolute(root.into()).map_err(io_at(Path::new(".")))?;
        if !root.exists() {
            create_dir(&root)?;
        }
        let writable = is_writable(&root);
        if writable {
            for dir in ["layers", "images", "tmp"] {
                create_dir(&root.join(dir))?;
            }
        }
        let meta = root.join("meta.json");
        match fs_err::read(&meta) {
            Ok(bytes) => {
                // Unparsable JSON is reported as an unknown format "unreadable".
                let found = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("format").cloned())
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| "unreadable".to_string());
                match found.parse::<u32>() {
                    Ok(n) if n == FORMAT => {}
                    Ok(1) => Store { root: root.clone(), writable }.upgrade_from_1(&meta)?,
                    _ => return Err(StoreError::UnknownFormat { path: meta, found }),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && writable => {
                write_atomic(&meta, format!("{{\"format\": {FORMAT}}}\n").as_bytes())?;
            }
            Err(e) => {
                return Err(StoreError::Io { path: meta, source: e });
            }
        }
        let store = Store { root, writable };
        if writable {
            // Made now, so that readers who cannot create it find it (see `lock_shared`).
            drop(store.lock(true)?);
        }
        Ok(store)
    }

    /// Whether this process can write the store (see [`Store::open`]).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Refuses to start changing a store this process cannot write.
    pub(crate) fn require_writable(&self) -> Result<(), StoreError> {
        if self.writable { Ok(()) } else { Err(StoreError::ReadOnly { root: self.root.clone() }) }
    }

    /// The directory it was opened at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, shared: bool) -> Result<StoreLock, StoreError> {
        let path = self.root.join(".lock");
        let lock = match (shared, self.writable) {
            (true, true) => FileLock::shared(&path),
            // Read-only, so a reader needs no write access to the store.
            (true, false) => match FileLock::shared_existing(&path) {
                Ok(lock) => Ok(lock),
                // A store this process cannot write and that has no lock file (every store
                // opened writable has one): no lock to take, and none for us to make.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StoreLock { _file: None }),
                Err(e) => Err(e),
            },
            (false, _) => FileLock::exclusive(&path),
        };
        let lock = lock.map_err(|source| StoreError::Io { path, source })?;
        Ok(StoreLock { _file: Some(lock) })
    }

    /// The store lock, shared: held by builds and by the commands that read blobs (verify,
    /// push, export, run). Needs no write access. A runtime holds it while a guest has blobs
    /// attached, so that `rm` and `gc` (which take it exclusive) wait instead of deleting them.
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        self.lock(true)
    }

    /// The store lock, exclusive: held by `rm` and `gc`.
    pub fn lock_exclusive(&self) -> Result<StoreLock, StoreError> {
        self.lock(false)
    }

    /// The lock of one layer blob, held while producing it.
    pub(crate) fn lock_layer(&self, fs: FsType, chain_id: &Digest) -> Result<FileLock, StoreError> {
        self.lock_blob(&new_id(BlobKind::Layer, fs, chain_id)?)
    }

    /// The producer lock `<blob>.lock` of a blob.
    fn lock_blob(&self, id: &BlobId) -> Result<FileLock, StoreError> {
        create_dir(&self.layer_dir(id.fs, id.recipe))?;
        let mut path = self.blob_path(id).into_os_string();
        path.push(".lock");
        let path = PathBuf::from(path);
        FileLock::exclusive(&path).map_err(|source| StoreError::Io { path, source })
    }

    /// Every image record, sorted by tag.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut records = Vec::new();
        for entry in fs_err::read_dir(&dir).map_err(io_at(&dir))? {
            let path = entry.map_err(io_at(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !name.ends_with(".json") || name.starts_with(".tmp-") {
                continue;
            }
            records.push(read_record(&path)?);
        }
        records.sort_by(|a: &ImageRecord, b| a.tag.cmp(&b.tag));
        Ok(records)
    }

    /// Removes the records of `tags` (all must exist; a lazy record goes with its caches),
    /// then collects what became garbage.
    /// Everything that can be checked is checked before a record is deleted: the tags exist
    /// and every record of the store reads (GC marks from all of them). A failure after a
    /// record is gone says which tags were removed ([`StoreError::AfterRemoval`]).
    pub fn remove(&self, tags: &[String]) -> Result<GcReport, StoreError> {
        self.require_writable()?;
        let _lock = self.lock_exclusive()?;
        self.check_nothing_mounted_in_tmp()?;
        for tag in tags {
            if !self.record_path(tag).exists() && !self.lazy_record_path(tag).exists() {
                return Err(StoreError::NoSuchTag(tag.clone()));
            }
        }
        self.list()?;
        // A lazy record goes first: its caches are garbage then.
        for tag in tags {
            self.remove_lazy_record(tag)?;
        }
        let mut removed = Vec::new();
        let after = |removed: &Vec<String>, what: String| {
            let removed = removed.clone();
            move |source| StoreError::AfterRemoval { removed, what, source: Box::new(source) }
        };
        for tag in tags.iter().filter(|t| self.record_path(t).exists()) {
            let path = self.record_path(tag);
            let result =
                fs_err::remove_file(&path).map_err(|e| StoreError::Io { path: path.clone(), source: e });
            match result {
                Ok(()) => removed.push(tag.clone()),
                Err(e) if removed.is_empty() => return Err(e),
                Err(e) => return Err(after(&removed, format!("removing tag {tag} failed"))(e)),
            }
        }
        let images = self.root.join("images");
        sync_dir(&images).map_err(after(&removed, "syncing the removal failed".into()))?;
        self.collect_garbage().map_err(after(&removed, "collecting garbage failed".into()))
    }

    /// Deletes layer blobs no record references and clears `tmp/` (see [`GcReport`]).
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        self.require_writable()?;
        let _lock = self.lock_exclusive()?;
        self.check_nothing_mounted_in_tmp()?;
        self.collect_garbage()
    }

    fn layer_dir(&self, fs: FsType, recipe: u32) -> PathBuf {
        self.root.join("layers").join(format!("{fs}-v{recipe}"))
    }

    /// Where the blob `id` lives, under the root the store was opened at.
    pub(crate) fn blob_path(&self, id: &BlobId) -> PathBuf {
        self.layer_dir(id.fs, id.recipe).join(format!("{}.{}", stem(id), id.fs))
    }

    /// `<stem>.<ext>` beside the blob `id`: its `.json` record, its `.dirs` index.
    fn sidecar(&self, id: &BlobId, ext: &str) -> PathBuf {
        self.layer_dir(id.fs, id.recipe).join(format!("{}.{ext}", stem(id)))
    }

    /// `record` with the path of each of its blobs, for output to runtimes.
    pub fn locate(&self, record: ImageRecord) -> Result<LocatedRecord, StoreError> {
        let at = |id: Result<BlobId, InvalidDigest>| id.map(|id| self.blob_path(&id));
        let located = record.map_blobs(
            |l| {
                let id = l.id()?;
                let verity_tree = l.verity.as_ref().map(|_| self.sidecar(&id, "verity"));
                let verity = l.verity.clone();
                Ok::<_, InvalidDigest>(Located::new(self.blob_path(&id), verity_tree, verity.as_ref(), l))
            },
            |s| Ok(Located::new(at(s.id())?, None, None, s)),
            |m| {
                let id = m.id()?;
                let verity_tree = m.verity.as_ref().map(|_| self.sidecar(&id, "verity"));
                let verity = m.verity.clone();
                Ok(Located::new(self.blob_path(&id), verity_tree, verity.as_ref(), m))
            },
        )?;
        Ok(located.with_disk_offsets())
    }

    /// The stored squashed blob of the stack up to `chain_id`, if published.
    pub(crate) fn squashed(&self, fs: FsType, chain_id: &Digest) -> Result<Option<SquashedBlob>, StoreError> {
        self.published_record(&new_id(BlobKind::Squashed, fs, chain_id)?)
    }

    /// The producer lock of a squashed blob.
    pub(crate) fn lock_squash(&self, fs: FsType, chain_id: &Digest) -> Result<FileLock, StoreError> {
        self.lock_blob(&new_id(BlobKind::Squashed, fs, chain_id)?)
    }

    /// Publishes a finished squashed blob (in `tmp/`) with its record.
    pub(crate) fn publish_squash(&self, blob: &Path, record: &SquashedBlob) -> Result<PathBuf, StoreError> {
        self.publish_with_record(blob, &record.id()?, record)
    }

    /// The stored merged blob of the stack up to `chain_id`, if published.
    pub(crate) fn merged(&self, chain_id: &Digest) -> Result<Option<MergedBlob>, StoreError> {
        self.published_record(&new_id(MERGED, FsType::Erofs, chain_id)?)
    }

    /// The producer lock of a merged blob.
    pub(crate) fn lock_merge(&self, chain_id: &Digest) -> Result<FileLock, StoreError> {
        self.lock_blob(&new_id(MERGED, FsType::Erofs, chain_id)?)
    }

    /// Publishes a finished merged blob (in `tmp/`) with its record.
    pub(crate) fn publish_merge(&self, blob: &Path, record: &MergedBlob) -> Result<PathBuf, StoreError> {
        self.publish_with_record(blob, &record.id()?, record)
    }

    /// The `.json` record of the blob `id`, if the blob is published (a blob without its
    /// record counts as not stored).
    fn published_record<T: serde::de::DeserializeOwned>(&self, id: &BlobId) -> Result<Option<T>, StoreError> {
        if !self.blob_path(id).exists() {
            return Ok(None);
        }
        read_sidecar(&self.sidecar(id, "json"))
    }

    /// Publishes `blob` (in `tmp/`) as the blob `id`: its `.json` record first, then the blob.
    fn publish_with_record(
        &self,
        blob: &Path,
        id: &BlobId,
        record: &impl serde::Serialize,
    ) -> Result<PathBuf, StoreError> {
        create_dir(&self.layer_dir(id.fs, id.recipe))?;
        let json = serde_json::to_vec_pretty(record).expect("a blob record serializes");
        write_atomic(&self.sidecar(id, "json"), &json)?;
        let dest = self.blob_path(id);
        publish_blob(blob, &dest)?;
        Ok(dest)
    }

    /// The stored layer, if its blob, its record and its sidecars are published and look
    /// undamaged (see [`Store::layer_state`]): what a tar build may reuse.
    pub(crate) fn layer(&self, fs: FsType, chain_id: &Digest) -> Result<Option<LayerRecord>, StoreError> {
        match self.layer_state(fs, chain_id)? {
            LayerState::Ready(r) => Ok(Some(r)),
            LayerState::Absent | LayerState::Unusable { .. } => Ok(None),
        }
    }

    /// What the store holds under the current recipe's key of `chain_id`, for a tar build.
    /// A layer is ready when its blob has the size its `.json` record gives and its `.dirs`
    /// sidecar is there with the sha256 the record names (a pulled blob has none: it is not a
    /// local conversion, whose `.dirs` the next layer needs); anything
    /// else is unusable as it is, and the build converts the layer again (see
    /// [`Store::publish_layer`] for what it may then replace).
    pub(crate) fn layer_state(&self, fs: FsType, chain_id: &Digest) -> Result<LayerState, StoreError> {
        let id = new_id(BlobKind::Layer, fs, chain_id)?;
        let record = match self.layer_slot(&id)? {
            LayerSlot::Absent => return Ok(LayerState::Absent),
            LayerSlot::Damaged(why) => return Ok(LayerState::Unusable { record: None, why }),
            LayerSlot::Published(r) => r,
        };
        let path = self.sidecar(&id, "dirs");
        let found = match crate::digest::sha256_file_hex(&path) {
            Ok(found) => found,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(LayerState::Unusable {
                    record: Some(record),
                    why: LayerDamage::NoSidecar { path },
                });
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        if record.dirs_sha256.as_ref().is_some_and(|want| *want != found) {
            return Ok(LayerState::Unusable {
                record: Some(record),
                why: LayerDamage::SidecarChanged { path },
            });
        }
        Ok(LayerState::Ready(record))
    }

    /// The layer blob `id` and its `.json` record as published, checked only for what costs
    /// nothing: the record parses and the blob file has the recorded size.
    pub(crate) fn layer_slot(&self, id: &BlobId) -> Result<LayerSlot, StoreError> {
        let blob = self.blob_path(id);
        let size = match fs_err::metadata(&blob) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LayerSlot::Absent),
            Err(e) => return Err(StoreError::Io { path: blob, source: e }),
        };
        let path = self.sidecar(id, "json");
        let record: LayerRecord = match read_sidecar(&path) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(LayerSlot::Damaged(LayerDamage::NoSidecar { path })),
            Err(StoreError::BadRecord { .. }) => {
                return Ok(LayerSlot::Damaged(LayerDamage::UnreadableRecord { path }));
            }
            Err(e) => return Err(e),
        };
        if record.size != size {
            return Ok(LayerSlot::Damaged(LayerDamage::WrongSize {
                path: blob,
                size,
                recorded: record.size,
            }));
        }
        Ok(LayerSlot::Published(record))
    }

    /// The stored dm-verity tree of a layer blob of the current recipe (see
    /// [`Store::layer_verity_of`]).
    pub(crate) fn layer_verity(
        &self,
        fs: FsType,
        chain_id: &Digest,
    ) -> Result<Option<VerityInfo>, StoreError> {
        self.layer_verity_of(&new_id(BlobKind::Layer, fs, chain_id)?)
    }

    /// The dm-verity record of the layer blob `id` (of any recipe), if its tree is published
    /// and is the tree of the blob beside it: its `.verity.json` names the sha256 and size the
    /// blob's record gives, and the tree file has the size it names. Anything else (a tree
    /// published without its `.verity.json`, one left from other bytes, a damaged one) counts
    /// as no tree, and the caller makes it again.
    pub(crate) fn layer_verity_of(&self, id: &BlobId) -> Result<Option<VerityInfo>, StoreError> {
        let LayerSlot::Published(record) = self.layer_slot(id)? else { return Ok(None) };
        self.verity_beside(id, record.size, &record.blob_sha256)
    }

    /// The dm-verity record of the blob `id` whose record gives `size` and `blob_sha256`, if
    /// its tree is published and is the tree of those bytes (see [`Store::layer_verity_of`]).
    pub(crate) fn verity_beside(
        &self,
        id: &BlobId,
        size: u64,
        blob_sha256: &str,
    ) -> Result<Option<VerityInfo>, StoreError> {
        let tree = self.sidecar(id, "verity");
        let tree_size = match fs_err::metadata(&tree) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path: tree, source: e }),
        };
        let stored: StoredVerity = match read_sidecar(&self.sidecar(id, "verity.json")) {
            Ok(Some(v)) => v,
            Ok(None) | Err(StoreError::BadRecord { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let beside = stored.blob_sha256.as_deref() == Some(blob_sha256)
            && stored.info.hash_offset == size
            && stored.info.tree_size == tree_size;
        Ok(beside.then_some(stored.info))
    }

    /// Publishes the dm-verity tree `tree` (in `tmp/`) of a published layer blob whose sha256
    /// is `blob_sha256`, then its record. The caller holds the layer lock.
    pub(crate) fn publish_verity(
        &self,
        fs: FsType,
        chain_id: &Digest,
        tree: &Path,
        info: &VerityInfo,
        blob_sha256: &str,
    ) -> Result<PathBuf, StoreError> {
        self.publish_verity_of(&new_id(BlobKind::Layer, fs, chain_id)?, tree, info, blob_sha256)
    }

    /// [`Store::publish_verity`] for the layer blob `id` (of any recipe). A tree already there
    /// is replaced: it is not the tree of this blob, or the caller would have reused it.
    pub(crate) fn publish_verity_of(
        &self,
        id: &BlobId,
        tree: &Path,
        info: &VerityInfo,
        blob_sha256: &str,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.sidecar(id, "verity");
        publish_blob(tree, &dest)?;
        let stored = StoredVerity { blob_sha256: Some(blob_sha256.to_string()), info: info.clone() };
        let json = serde_json::to_vec_pretty(&stored).expect("a verity record serializes");
        write_atomic(&self.sidecar(id, "verity.json"), &json)?;
        Ok(dest)
    }

    /// Where the dm-verity tree of the blob `id` lives (see [`Store::publish_verity`]).
    pub(crate) fn verity_tree_path(&self, id: &BlobId) -> PathBuf {
        self.sidecar(id, "verity")
    }

    /// The directories of the stack up to `chain_id`.
    pub(crate) fn dir_index(&self, fs: FsType, chain_id: &Digest) -> Result<DirIndex, StoreError> {
        let path = self.sidecar(&new_id(BlobKind::Layer, fs, chain_id)?, "dirs");
        let file = fs_err::File::open(&path).map_err(|e| StoreError::Io { path: path.clone(), source: e })?;
        DirIndex::read_from(io::BufReader::new(file)).map_err(io_at(&path))
    }

    /// Where `run`'s cache keeps the ELF kernel unpacked from the bzImage whose sha256 is
    /// `bzimage` (`vm/vmlinux-<hex>`); creates `vm/`. Publish it with [`write_atomic`].
    pub(crate) fn vmlinux_path(&self, bzimage: &Digest) -> Result<PathBuf, StoreError> {
        let hex = crate::digest::require_sha256("kernel image digest", bzimage)?;
        let dir = self.root.join("vm");
        create_dir(&dir)?;
        Ok(dir.join(format!("vmlinux-{}", hex.digest())))
    }

    /// The cache directory of the lazy blob whose descriptor digest is `layer`
    /// (`lazy/<hex>/`); created if missing. Its files are [`crate::lazy`]'s.
    pub(crate) fn lazy_cache_dir(&self, layer: &Digest) -> Result<PathBuf, StoreError> {
        let hex = crate::digest::require_sha256("layer digest", layer)?;
        let dir = self.root.join("lazy");
        create_dir(&dir)?;
        let dir = dir.join(hex.digest());
        create_dir(&dir)?;
        Ok(dir)
    }

    /// Keeps a source manifest or config (`bytes`, whose sha256 is `digest`) for `push`.
    pub(crate) fn put_source_json(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.source_json_path(digest)?;
        if path.exists() {
            return Ok(());
        }
        create_dir(path.parent().expect("a sources/ path"))?;
        write_atomic(&path, bytes)
    }

    /// A kept source manifest or config, if this store has it (stores older than `push`, and
    /// docker archives' manifests, have none).
    pub(crate) fn source_json(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.source_json_path(digest)?;
        match fs_err::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn source_json_path(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        let hex = crate::digest::require_sha256("source manifest or config digest", digest)?;
        Ok(self.root.join("sources").join(format!("{}.json", hex.digest())))
    }

    /// Publishes a layer blob pulled ready-made (`blob`, in `tmp/`) with its record; it has no
    /// directory index, so a tar build that needs one converts the layer again (same bytes).
    /// What is under its key already is replaced only as [`Store::publish_layer`] says.
    pub(crate) fn publish_pulled_layer(
        &self,
        blob: &Path,
        record: &LayerRecord,
    ) -> Result<PathBuf, StoreError> {
        let id = BlobId::new(BlobKind::Layer, record.fs, record.recipe, &record.chain_id)?;
        self.check_replaceable(&id, &record.blob_sha256)?;
        self.publish_with_record(blob, &id, record)
    }

    /// Whether the layer blob `id` may be published as bytes of sha256 `new`: nothing is
    /// there, or the same bytes are, or a damaged blob (see [`Store::layer_slot`]) that no
    /// image record names as other bytes. Its `.json` may be what is damaged, so the image
    /// records are what says which bytes it held. The caller holds the layer lock.
    fn check_replaceable(&self, id: &BlobId, new: &str) -> Result<(), StoreError> {
        match self.layer_slot(id)? {
            LayerSlot::Absent => Ok(()),
            LayerSlot::Published(stored) if stored.blob_sha256 == new => Ok(()),
            LayerSlot::Published(stored) => Err(StoreError::WouldReplace {
                path: self.blob_path(id),
                stored: stored.blob_sha256,
                tool: stored.tool,
                new: new.to_string(),
            }),
            LayerSlot::Damaged(why) => {
                let mut tags = Vec::new();
                let mut expected = String::new();
                for record in self.list()? {
                    if let Some((_, sha256)) = record.blobs()?.into_iter().find(|(b, s)| b == id && *s != new)
                    {
                        expected = sha256.to_string();
                        tags.push(record.tag.clone());
                    }
                }
                if tags.is_empty() {
                    return Ok(());
                }
                Err(StoreError::WouldReplaceDamaged(Box::new(DamagedBlobKept {
                    path: self.blob_path(id),
                    why,
                    tags,
                    expected,
                    new: new.to_string(),
                })))
            }
        }
    }

    /// The layer lock of blob `id` (of any recipe).
    pub(crate) fn lock_layer_blob(&self, id: &BlobId) -> Result<FileLock, StoreError> {
        self.lock_blob(id)
    }

    /// A fresh staging directory under `tmp/`, removed when dropped.
    pub(crate) fn staging(&self, prefix: &str) -> Result<tempfile::TempDir, StoreError> {
        let tmp = self.root.join("tmp");
        tempfile::Builder::new().prefix(prefix).tempdir_in(&tmp).map_err(io_at(&tmp))
    }

    /// A work directory for what is made from the store but not kept in it (`push`'s
    /// compressed layers): [`Store::staging`], or the system's temp directory when this
    /// process cannot write the store.
    pub(crate) fn scratch(&self, prefix: &str) -> Result<tempfile::TempDir, StoreError> {
        if self.writable {
            return self.staging(prefix);
        }
        let tmp = std::env::temp_dir();
        tempfile::Builder::new().prefix(prefix).tempdir_in(&tmp).map_err(io_at(&tmp))
    }

    /// Publishes a finished blob (`blob`, in `tmp/`) with its directory index and its record
    /// (which gets the index's sha256); returns the record as published.
    ///
    /// A blob published under the same key with another sha256 in its readable record is
    /// never replaced ([`StoreError::WouldReplace`]); one whose record is missing or
    /// unreadable, or whose size is not the recorded one (it is damaged: see
    /// [`Store::layer_state`]), is replaced only when no image record names it as other bytes
    /// ([`StoreError::WouldReplaceDamaged`]).
    pub(crate) fn publish_layer(
        &self,
        blob: &Path,
        dirs: &DirIndex,
        record: &LayerRecord,
    ) -> Result<LayerRecord, StoreError> {
        let id = BlobId::new(BlobKind::Layer, record.fs, record.recipe, &record.chain_id)?;
        self.check_replaceable(&id, &record.blob_sha256)?;
        let dir = self.layer_dir(id.fs, id.recipe);
        create_dir(&dir)?;
        let mut record = record.clone();
        record.dirs_sha256 = Some(write_atomic_hashed(&self.sidecar(&id, "dirs"), |out| dirs.write_to(out))?);
        self.publish_with_record(blob, &id, &record)?;
        Ok(record)
    }

    /// Refuses a tag whose record could not be written (its file name too long), before a
    /// build does any work for it.
    pub(crate) fn check_tag(&self, tag: &str) -> Result<(), StoreError> {
        let len = record_name(tag).len();
        if len > NAME_MAX {
            return Err(StoreError::TagTooLong { tag: tag.to_string(), len });
        }
        Ok(())
    }

    fn record_path(&self, tag: &str) -> PathBuf {
        self.root.join("images").join(record_name(tag))
    }

    /// Writes (or replaces) the record of `record.tag`.
    pub(crate) fn put_record(&self, record: &ImageRecord) -> Result<(), StoreError> {
        record.blobs()?;
        let mut json = serde_json::to_vec_pretty(record).expect("an image record serializes");
        json.push(b'\n');
        write_atomic(&self.record_path(&record.tag), &json)
    }

    /// The record of `tag`.
    pub fn get(&self, tag: &str) -> Result<ImageRecord, StoreError> {
        let path = self.record_path(tag);
        match read_record(&path) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                if self.lazy_record_path(tag).exists() {
                    return Err(StoreError::Lazy(tag.to_string()));
                }
                Err(StoreError::NoSuchTag(tag.to_string()))
            }
            r => r,
        }
    }
}

/// The id of the current recipe's blob of `chain_id`.
fn new_id(kind: BlobKind, fs: FsType, chain_id: &Digest) -> Result<BlobId, StoreError> {
    Ok(BlobId::new(kind, fs, fs.recipe(), chain_id)?)
}

/// The kind of merged blob `build --merge` makes now.
const MERGED: BlobKind = BlobKind::Merged { format: crate::merge::MERGE_FORMAT };

/// A blob's file name without extension: `<chain hex>`, `squash-<chain hex>`,
/// `merged-<chain hex>` (merged, format 1) or `merged<format>-<chain hex>`.
fn stem(id: &BlobId) -> String {
    match id.kind {
        BlobKind::Layer => id.chain_id.digest().to_string(),
        BlobKind::Squashed => format!("squash-{}", id.chain_id.digest()),
        BlobKind::Merged { format: 1 } => format!("merged-{}", id.chain_id.digest()),
        BlobKind::Merged { format } => format!("merged{format}-{}", id.chain_id.digest()),
    }
}

/// The id of the blob file `dir_name/file_name`, if it is one (not a sidecar or lock).
fn parse_blob_name(dir_name: &str, file_name: &str) -> Option<(BlobId, bool)> {
    let (fs, recipe) = dir_name.split_once("-v")?;
    let fs = <FsType as clap::ValueEnum>::value_variants().iter().copied().find(|f| f.name() == fs)?;
    let recipe: u32 = recipe.parse().ok()?;
    let (stem, ext) = file_name.split_once('.')?;
    let (kind, hex) = if let Some(hex) = stem.strip_prefix("squash-") {
        (BlobKind::Squashed, hex)
    } else if let Some(rest) = stem.strip_prefix("merged") {
        let (format, hex) = rest.split_once('-')?;
        let format = if format.is_empty() { 1 } else { format.parse().ok().filter(|&f| f > 1)? };
        (BlobKind::Merged { format }, hex)
    } else {
        (BlobKind::Layer, stem)
    };
    let chain_id = hex.parse().ok()?;
    Some((BlobId { kind, fs, recipe, chain_id }, ext == fs.name()))
}

/// An image record, its blob ids checked.
fn read_record(path: &Path) -> Result<ImageRecord, StoreError> {
    let bytes = fs_err::read(path).map_err(io_at(path))?;
    let record: ImageRecord = serde_json::from_slice(&bytes)
        .map_err(|source| StoreError::BadRecord { path: path.to_owned(), source })?;
    record.blobs().map_err(|source| StoreError::BadRecordDigest { path: path.to_owned(), source })?;
    Ok(record)
}

/// A blob's `.json` sidecar; `None` when it is missing (the blob then counts as not stored).
fn read_sidecar<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs_err::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Io { path: path.to_owned(), source: e }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::BadRecord { path: path.to_owned(), source })
}

/// Makes the finished blob `blob` read-only and durable, then renames it to `dest`.
fn publish_blob(blob: &Path, dest: &Path) -> Result<(), StoreError> {
    let file = fs_err::File::open(blob).map_err(|e| StoreError::Io { path: blob.to_owned(), source: e })?;
    file.set_permissions(std::fs::Permissions::from_mode(BLOB_MODE)).map_err(io_at(blob))?;
    file.sync_all().map_err(io_at(blob))?;
    rename_durably(blob, dest)
}

/// Whether this process may create files in `dir`: false on a read-only mount and in a
/// directory of another user.
fn is_writable(dir: &Path) -> bool {
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok()
}

/// Creates the store directory `dir` (and its parents) if missing, mode [`DIR_MODE`] whatever
/// the umask (the sharing policy, see the module doc).
fn create_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs_err::create_dir_all(dir).map_err(io_at(dir))?;
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io_at(dir))
}

/// The file name of the record of `tag` in `images/`.
fn record_name(tag: &str) -> String {
    format!("{}.json", escape_tag(tag))
}

/// Tag → file name: bytes outside `[A-Za-z0-9._-]` become `%XX`, so every tag maps to one
/// plain file name and back.
pub(crate) fn escape_tag(tag: &str) -> String {
    let mut out = String::with_capacity(tag.len());
    for b in tag.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' && !out.is_empty() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Temp file beside `path` → write → fsync → rename → fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes into the temp file (for outputs too big to hold in
/// memory, such as a single-disk image). `path` must have a parent directory.
pub(crate) fn write_atomic_with<T>(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> io::Result<T>,
) -> Result<T, StoreError> {
    let dir = path.parent().expect("store paths have a parent");
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_at(dir))?;
    // The temp file is made 0600; what is published is readable by all (the sharing policy).
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(FILE_MODE)).map_err(io_at(tmp.path()))?;
    let written = write(tmp.as_file_mut()).map_err(io_at(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_at(path))?;
    tmp.persist(path).map_err(|e| StoreError::Io { path: path.to_owned(), source: e.error })?;
    sync_dir(dir)?;
    Ok(written)
}

/// [`write_atomic_with`] of what `write` writes through a buffer, hashed on the way (a
/// sidecar is streamed to its file, never held whole in memory); returns its sha256 hex.
fn write_atomic_hashed(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<String, StoreError> {
    write_atomic_with(path, |file| {
        let mut out = io::BufWriter::new(crate::digest::HashingWriter::new(file));
        write(&mut out)?;
        let (digest, _, _) = out.into_inner().map_err(io::IntoInnerError::into_error)?.finish();
        Ok(digest.digest().to_string())
    })
}

fn rename_durably(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs_err::rename(from, to).map_err(|e| StoreError::Io { path: to.to_owned(), source: e })?;
    sync_dir(to.parent().expect("store paths have a parent"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs_err::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Io { path: dir.to_owned(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_tag_table() {
        let cases = [
            ("alpine", "alpine"),
            ("alpine:3.20", "alpine%3A3.20"),
            ("docker.io/library/alpine:3.20", "docker.io%2Flibrary%2Falpine%3A3.20"),
            ("..", "%2E."),
            (".hidden", "%2Ehidden"),
            ("a%b", "a%25b"),
        ];
        for (tag, want) in cases {
            assert_eq!(escape_tag(tag), want, "{tag}");
        }
    }

    #[test]
    fn open_refuses_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        Store::open(dir.path()).unwrap();
        fs_err::write(dir.path().join("meta.json"), "{\"format\": 99}").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("format 99"), "{err}");
    }

    #[test]
    fn blob_names_parse_back_to_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chain: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let merged = [BlobKind::Merged { format: 1 }, BlobKind::Merged { format: 2 }];
        for kind in [BlobKind::Layer, BlobKind::Squashed].into_iter().chain(merged) {
            for fs in [FsType::Erofs, FsType::Ext4] {
                let id = BlobId::new(kind, fs, 7, &chain).unwrap();
                let path = store.blob_path(&id);
                let dir_name = path.parent().unwrap().file_name().unwrap().to_str().unwrap();
                let name = path.file_name().unwrap().to_str().unwrap();
                assert_eq!(parse_blob_name(dir_name, name), Some((id.clone(), true)), "{}", path.display());
                let json = store.sidecar(&id, "json");
                assert_eq!(
                    parse_blob_name(dir_name, json.file_name().unwrap().to_str().unwrap()),
                    Some((id, false))
                );
            }
        }
        assert_eq!(parse_blob_name("erofs-v2", ".tmp-abc"), None);
        assert_eq!(parse_blob_name("erofs-v2", "notahash.erofs"), None);
        assert_eq!(parse_blob_name("zfs-v2", &format!("{}.zfs", "ab".repeat(32))), None);
    }

    /// The `.dirs` sidecar is streamed to its file, not rendered in memory first: publishing a layer of 200,000 directories holds a few buffers, not the text.
    #[test]
    fn publishing_a_layer_holds_at_most_16_heap_bytes_per_directory() {
        use crate::layer::dirindex::DirMeta;
        const DIRS: usize = 200_000;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = |n: usize| format!("usr/share/many/dir-{n:07}").into_bytes();
        let dirs: DirIndex = (0..DIRS).map(|n| (path(n), DirMeta::fallback())).collect();
        let blob = store.root.join("tmp").join("layer.ext4");
        fs_err::write(&blob, b"blob").unwrap();
        let record = LayerRecord {
            chain_id: format!("sha256:{}", "cd".repeat(32)).parse().unwrap(),
            diff_id: format!("sha256:{}", "ef".repeat(32)).parse().unwrap(),
            fs: FsType::Ext4,
            recipe: FsType::Ext4.recipe(),
            size: 4,
            blob_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"blob")),
            tool: "test".to_string(),
            dirs_sha256: None,
            own_sha256: None,
        };
        let (published, peak) = crate::heap_meter::peak_during(|| store.publish_layer(&blob, &dirs, &record));
        let published = published.unwrap();
        println!("{} heap bytes per directory at the peak ({peak} for {DIRS})", peak / DIRS);
        assert!(peak / DIRS <= 16, "{} heap bytes per directory", peak / DIRS);

        let id = BlobId::new(BlobKind::Layer, FsType::Ext4, record.recipe, &record.chain_id).unwrap();
        let mut text = Vec::new();
        dirs.write_to(&mut text).unwrap();
        assert_eq!(fs_err::read(store.sidecar(&id, "dirs")).unwrap(), text);
        let sha = |b: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b));
        assert_eq!(published.dirs_sha256.as_deref(), Some(sha(&text).as_str()));
        assert_eq!(published.own_sha256, None);
        assert!(!store.sidecar(&id, "own").exists(), "no .own sidecar");
    }
}

//! Serving an image's lowers as plain files (`vmrootfs serve`), for runtimes that take only
//! paths — Firecracker, Cloud Hypervisor — and for loop devices.
//!
//! ```text
//! DIR/lower0 … DIR/lower<n-1>   the lowers, base first, read-only, each the exact size of
//!                               its blob, named as the runtime kit names its drives
//! ```
//!
//! DIR is a read-only FUSE mount answered by vmrootfs: each read of a file is a read of its
//! lower's [`BlockSource`]: the stored blob ([`serve`]), or a lazy blob of an image in a
//! registry ([`serve_lazy`]: fetched by chunk as it is read, every block checked against
//! the layer's dm-verity tree first, the rest fetched in the background). A failed read (a
//! block failing verification, a registry that stays away) is EIO. A runtime configuration or
//! a kit ([`Server::write_kit`]) names these paths, which stay the same whatever the store's
//! layout and wherever it is.
//!
//! The shared store lock is held while serving, so `rm` and `gc` wait: the blobs stay.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use crate::lazy::fuse::{FuseError, Unmounted};
use crate::lazy::fuse::{FuseMount, ServedFile};
use crate::lazy::{BlockSource, FileSource, LazyError, LazyImage, Share};
use crate::store::{Store, StoreError, StoreLock};
use crate::vm::VmError;
use crate::vm::kit::{self, Kit, KitOptions};
use crate::{BuildResult, FsType, Platform, RegistryOptions};

/// Options of [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Threads answering the kernel's requests: a read waiting for its bytes holds one.
    pub threads: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { threads: 8 }
    }
}

/// A served lower.
#[derive(Debug, Clone, Serialize)]
pub struct ServedLower {
    /// Its file name in the mount: `lower<i>`, as the kit names the drive.
    pub name: String,
    /// Its absolute path: what a runtime attaches.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its filesystem.
    pub fs: FsType,
    /// The stored blob it serves ([`serve`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob: Option<PathBuf>,
    /// The registry layer it serves ([`serve_lazy`]): its digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// What is being served.
#[derive(Debug, Clone, Serialize)]
pub struct Served {
    /// The image's tag, or its registry reference ([`serve_lazy`]).
    pub tag: String,
    /// The mount point (absolute).
    pub dir: PathBuf,
    /// The lowers, base first.
    pub lowers: Vec<ServedLower>,
}

/// A failure to serve an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The store could not be read or locked, or has no such image.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored blob could not be opened.
    #[error("opening the stored blob {}", path.display())]
    Blob {
        /// The blob.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The mount point could not be made.
    #[error("creating the mount point {}", path.display())]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Mounting or unmounting failed.
    #[error(transparent)]
    Fuse(#[from] FuseError),
    /// The registry image could not be opened for lazy reading, or not completed.
    #[error(transparent)]
    Lazy(Box<LazyError>),
    /// The kit could not be written.
    #[error(transparent)]
    Kit(Box<VmError>),
}

impl From<LazyError> for ServeError {
    fn from(e: LazyError) -> Self {
        ServeError::Lazy(Box::new(e))
    }
}

impl From<VmError> for ServeError {
    fn from(e: VmError) -> Self {
        ServeError::Kit(Box::new(e))
    }
}

/// An image being served; detached if dropped while mounted (see [`Server::stop`]).
pub struct Server {
    served: Served,
    mount: FuseMount,
    /// The lazy image served ([`serve_lazy`]).
    lazy: Option<LazyImage>,
    _store_lock: StoreLock,
}

/// Mounts the lowers of the image tagged `tag` on `dir` (created if missing) and serves them
/// until [`Server::stop`]. Needs root (`mount(2)`) and `/dev/fuse`.
pub fn serve(store: &Store, tag: &str, dir: &Path, opts: &ServeOptions) -> Result<Server, ServeError> {
    let store_lock = store.lock_shared()?;
    let record = store.locate(store.get(tag)?)?;
    let dir = mount_point(dir)?;
    let mut lowers = Vec::new();
    let mut files = Vec::new();
    for (i, lower) in record.lowers.iter().enumerate() {
        let source = FileSource::open(&lower.path)
            .map_err(|source| ServeError::Blob { path: lower.path.clone(), source })?;
        let name = crate::vm::kit::lower_name(i);
        lowers.push(ServedLower {
            path: dir.join(&name),
            size: source.len(),
            fs: lower.fs,
            blob: Some(lower.path.clone()),
            layer: None,
            name: name.clone(),
        });
        files.push(ServedFile { name, source: Arc::new(source) });
    }
    let mount = FuseMount::mount(&dir, files, opts.threads)?;
    let served = Served { tag: tag.to_string(), dir, lowers };
    Ok(Server { served, mount, lazy: None, _store_lock: store_lock })
}

/// Mounts the lowers of the EROFS image `reference` in a registry (pushed uncompressed with
/// `--verity`) on `dir`, read lazily ([`crate::lazy`]): a read fetches the chunk that holds
/// it and returns only verified bytes; the rest arrives in the background within `background`.
/// [`Server::complete`] then publishes the blobs. Needs root and `/dev/fuse`.
pub fn serve_lazy(
    store: &Store,
    reference: &str,
    dir: &Path,
    opts: &ServeOptions,
    registry: &RegistryOptions,
    background: Share,
) -> Result<Server, ServeError> {
    let store_lock = store.lock_shared()?;
    let mut image = crate::lazy::open(store, reference, registry, &Platform::host())?;
    let dir = mount_point(dir)?;
    let mut lowers = Vec::new();
    let mut files = Vec::new();
    for (i, blob) in image.lowers().iter().enumerate() {
        let name = kit::lower_name(i);
        lowers.push(ServedLower {
            path: dir.join(&name),
            size: blob.len(),
            fs: FsType::Erofs,
            blob: None,
            layer: Some(blob.digest().to_string()),
            name: name.clone(),
        });
        files.push(ServedFile { name, source: blob.clone() });
    }
    let mount = FuseMount::mount(&dir, files, opts.threads)?;
    image.start_background(background);
    let served = Served { tag: reference.to_string(), dir, lowers };
    Ok(Server { served, mount, lazy: Some(image), _store_lock: store_lock })
}

/// `dir`, created if missing, as an absolute path.
fn mount_point(dir: &Path) -> Result<PathBuf, ServeError> {
    let error = |source| ServeError::MountPoint { path: dir.to_owned(), source };
    fs_err::create_dir_all(dir).map_err(error)?;
    std::path::absolute(dir).map_err(error)
}

impl Server {
    /// What is served, and where.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// Unmounts the files. When one is still open (a loop device, a running VM), the mount is
    /// detached from its directory instead ([`Unmounted::Detached`]) and its users are served
    /// until they close it: wait for [`Server::finished`], or end the process (their reads
    /// then fail).
    pub fn stop(&mut self) -> Result<Unmounted, ServeError> {
        Ok(self.mount.unmount()?)
    }

    /// Whether nothing is served any more: stopped, and no detached file still open.
    pub fn finished(&self) -> bool {
        self.mount.finished()
    }

    /// Writes the image's runtime kit (layer stack) into `dir`, its drives the served files
    /// (`opts.served_lowers` is set to the mount); for a lazy image, each lower is opened
    /// through dm-verity in the guest too, with the tree proved against the manifest.
    pub fn write_kit(&self, store: &Store, dir: &Path, opts: &KitOptions) -> Result<Kit, ServeError> {
        let served = &self.served.dir;
        Ok(match &self.lazy {
            None => {
                let opts = KitOptions { served_lowers: Some(served.clone()), ..opts.clone() };
                kit::write(store, &self.served.tag, dir, &opts)?
            }
            Some(image) => kit::write_lazy_served(store, &self.served.tag, image, served, dir, opts)?,
        })
    }

    /// For a lazy image ([`serve_lazy`]): fetches what is still missing, publishes the blobs
    /// as ordinary stored blobs and records the image under its reference, as `build` would;
    /// `None` for a stored image. Call after [`Server::stop`]; interrupted (the process
    /// ended), what was fetched stays cached for the next lazy read of the image (or `gc`).
    pub fn complete(mut self, store: &Store) -> Result<Option<BuildResult>, ServeError> {
        match self.lazy.take() {
            None => Ok(None),
            Some(image) => Ok(Some(image.complete(store, None, &crate::progress::Reporter::new())?)),
        }
    }
}

/// SIGINT and SIGTERM, blocked (in the calling thread and the threads it starts afterwards:
/// make this before [`serve`]) and taken by [`StopSignals::wait`] instead.
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread.
    pub fn block() -> io::Result<StopSignals> {
        // SAFETY: the set is initialised by sigemptyset before use; the calls only read and
        // write the set and this thread's mask.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
                0 => Ok(StopSignals(set)),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
    }

    /// Waits for SIGINT or SIGTERM, at most `timeout` (for ever if `None`); the signal's
    /// number, or `None` when the time ran out.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<i32> {
        loop {
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs() as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            });
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: the set was initialised in `block`; a null info and a null or valid
            // timespec are what sigtimedwait takes.
            let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), ts_ptr) };
            if sig > 0 {
                return Some(sig);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return None,
                // EINTR (another signal, handled elsewhere): wait on.
                _ => continue,
            }
        }
    }
}

//! `build --squash`: the whole image flattened into one blob, whiteouts applied, for runtimes
//! without overlayfs or with more layers than drives.
//!
//! The layer blobs are loop-mounted and stacked read-only with overlayfs, so the kernel itself
//! applies whiteouts and opaque directories; the merged tree is walked into a normalized
//! stream, as if it were one layer (every attribute kept, hardlinks kept), and made into one
//! image by the backend. Cached by the image's top chain ID. Needs root (mounts).

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backend::tool::{self, ToolError};
use crate::backend::{Backend, BackendError, Making};
use crate::layer::dirindex::DirIndex;
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::{EntryKind, NormalizeError, Normalizer};
use crate::record::{Lower, SquashedBlob};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SquashError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("copying {path:?} from the merged tree")]
    Copy {
        path: String,
        #[source]
        source: NormalizeError,
    },
    #[error("an image with no layers has nothing to flatten")]
    NoLayers,
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lowers and the overlay, mounted under a directory of their own. [`Mounts::unmount`]
/// unmounts them in reverse order and then removes the directory — unless an unmount fails:
/// then the directory stays (removing it would reach into a live mount) and the error says so.
/// Dropped without `unmount` (on an error path), it does the same and warns on stderr.
struct Mounts {
    points: Vec<PathBuf>,
    dir: Option<tempfile::TempDir>,
}

impl Mounts {
    fn unmount(mut self) -> Result<(), ToolError> {
        let result = self.unmount_all();
        self.points.clear(); // reported here, not again by Drop
        result
    }

    /// Unmounts in reverse order; on the first failure leaves the rest (and the directory).
    fn unmount_all(&mut self) -> Result<(), ToolError> {
        while let Some(m) = self.points.last() {
            if let Err(e) = tool::run("umount", Command::new("umount").arg(m)) {
                if let Some(dir) = self.dir.take() {
                    let _still_mounted_below = dir.keep(); // never remove it
                }
                return Err(e);
            }
            self.points.pop();
        }
        self.dir.take();
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            eprintln!("warning: {e}; left mounted (and not removed): {:?}", self.points);
        }
    }
}

fn mount(args: &[&str], source: &Path, target: &Path) -> Result<(), ToolError> {
    tool::run("mount", Command::new("mount").args(args).arg(source).arg(target)).map(|_| ())
}

/// The squashed blob of `lowers` (base first), made unless stored.
pub fn squash(store: &Store, backend: &Backend, lowers: &[Lower]) -> Result<SquashedBlob, SquashError> {
    let fs = backend.fs();
    let top = &lowers.last().ok_or(SquashError::NoLayers)?.chain_id;
    let _lock = store.lock_squash(fs, top)?;
    if let Some(done) = store.squashed(fs, top)? {
        return Ok(done);
    }
    let work = store.staging("squash-")?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SquashError::Io { path, source }
    };
    let mnt = store.staging("squash-mnt-")?;
    let mnt_dir = mnt.path().to_owned();
    let mut mounts = Mounts { points: Vec::new(), dir: Some(mnt) };
    let mut dirs = Vec::new();
    for (i, l) in lowers.iter().enumerate() {
        let mp = mnt_dir.join(format!("l{i}"));
        fs_err::create_dir(&mp).map_err(io(&mp))?;
        let blob = store.blob_path(&l.id().map_err(StoreError::from)?);
        mount(&["-t", l.fs.name(), "-o", "loop,ro"], &blob, &mp)?;
        mounts.points.push(mp.clone());
        dirs.push(mp.display().to_string());
    }
    let merged = mnt_dir.join("merged");
    fs_err::create_dir(&merged).map_err(io(&merged))?;
    dirs.reverse();
    let opts = format!("ro,lowerdir={}", dirs.join(":"));
    mount(&["-t", "overlay", "-o", &opts], Path::new("overlay"), &merged)?;
    mounts.points.push(merged.clone());

    let out = work.path().join("blob");
    let seed = crate::digest::sha256_of(format!("squash {top}").as_bytes());
    let making = backend.start(&seed, &out)?;
    let mut normalizer = Normalizer::new(std::io::BufWriter::new(making), u64::MAX);
    if let Err(e) = copy_tree(&merged, &mut normalizer) {
        return Err(writer_failure(normalizer.into_inner(), e));
    }
    let copy_err = |source| SquashError::Copy { path: "/".into(), source };
    let (_, sink) = normalizer.finish(&DirIndex::default()).map_err(copy_err)?;
    mounts.unmount()?;
    let making = match sink.into_inner() {
        Ok(making) => making,
        Err(e) => {
            let (error, sink) = e.into_parts();
            return Err(writer_failure(sink, copy_err(NormalizeError::Write(error))));
        }
    };
    making.finish()?;
    let record = SquashedBlob {
        fs,
        recipe: fs.recipe(),
        chain_id: top.clone(),
        size: fs_err::metadata(&out).map_err(io(&out))?.len(),
        blob_sha256: crate::digest::sha256_file_hex(&out).map_err(io(&out))?,
    };
    store.publish_squash(&out, &record)?;
    Ok(record)
}

/// The error to report when writing the stream into the backend failed: the writer's own
/// (mkfs exited, the disk is full), if it stopped with one, else `failure`.
fn writer_failure(sink: std::io::BufWriter<Making>, failure: SquashError) -> SquashError {
    if !matches!(failure, SquashError::Copy { source: NormalizeError::Write(_), .. }) {
        return failure;
    }
    let (making, _) = sink.into_parts();
    making.failure().map_or(failure, SquashError::Backend)
}

/// An entry's metadata, every xattr included: one that cannot be read is an error, never
/// silently left out of the squashed blob.
fn meta_of(path: &Path, m: &std::fs::Metadata) -> Result<EntryMeta, SquashError> {
    let err = |source: rustix::io::Errno| SquashError::Io { path: path.to_owned(), source: source.into() };
    let mut xattrs = Vec::new();
    let mut names = vec![0u8; 64 * 1024]; // XATTR_LIST_MAX
    let n = rustix::fs::llistxattr(path, &mut names).map_err(err)?;
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 * 1024]; // XATTR_SIZE_MAX
        let len = rustix::fs::lgetxattr(path, name, &mut value).map_err(err)?;
        value.truncate(len);
        xattrs.push((name.to_vec(), value));
    }
    xattrs.sort();
    Ok(EntryMeta {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_sec: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        xattrs,
    })
}

/// Streams the merged tree at `root` into `tree`, every attribute and hardlink kept.
fn copy_tree<W: std::io::Write>(root: &Path, tree: &mut Normalizer<W>) -> Result<(), SquashError> {
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for entry in walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name() {
        let entry = entry.map_err(|e| SquashError::Io { path: root.to_owned(), source: e.into() })?;
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("under the root").as_os_str().as_bytes().to_vec();
        let m = std::fs::symlink_metadata(path)
            .map_err(|source| SquashError::Io { path: path.to_owned(), source })?;
        let meta = meta_of(path, &m)?;
        let ft = m.file_type();
        let err = |source| SquashError::Copy { path: crate::layer::path::display(&rel), source };
        if !ft.is_dir() && m.nlink() > 1 {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                tree.put(&rel, EntryKind::Hardlink(first), &meta).map_err(err)?;
                continue;
            }
            links.insert((m.dev(), m.ino()), rel.clone());
        }
        let result = if ft.is_dir() {
            tree.put(&rel, EntryKind::Dir, &meta)
        } else if ft.is_file() {
            let mut f = std::fs::File::open(path)
                .map_err(|source| SquashError::Io { path: path.to_owned(), source })?;
            tree.put(&rel, EntryKind::File { size: m.len(), data: &mut f }, &meta)
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path)
                .map_err(|source| SquashError::Io { path: path.to_owned(), source })?;
            tree.put(&rel, EntryKind::Symlink(target.as_os_str().as_bytes()), &meta)
        } else {
            let (major, minor) = (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()));
            let node = if ft.is_fifo() {
                EntryKind::Fifo
            } else if ft.is_char_device() {
                EntryKind::Char { major, minor }
            } else if ft.is_block_device() {
                EntryKind::Block { major, minor }
            } else {
                continue; // sockets cannot come from a layer tar
            };
            tree.put(&rel, node, &meta)
        };
        result.map_err(err)?;
    }
    Ok(())
}

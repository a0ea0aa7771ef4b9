//! `build --squash`: the whole image flattened into one blob, whiteouts applied, for runtimes
//! without overlayfs or with more layers than drives.
//!
//! The layer blobs are loop-mounted and stacked read-only with overlayfs, so the kernel itself
//! applies whiteouts and opaque directories; the merged tree is walked into a normalized
//! stream, as if it were one layer (every attribute kept, hardlinks kept), and made into one
//! image by the backend. Cached by the image's top chain ID. Needs root (mounts).
//!
//! The mounting happens in a private mount namespace ([`crate::mountns`]): no mount of a
//! squash is ever seen outside it, and none outlives it, however the build ends.

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
    #[error(transparent)]
    MountNamespace(#[from] crate::mountns::MountNsError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn mount(args: &[&str], source: &Path, target: &Path, cwd: &Path) -> Result<(), ToolError> {
    tool::run("mount", Command::new("mount").current_dir(cwd).args(args).arg(source).arg(target)).map(|_| ())
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
    let mnt = store.staging("squash-mnt-")?;
    let out = work.path().join("blob");
    // The mounts exist only in this namespace: gone when it is, even if we are killed.
    crate::mountns::in_private_namespace(|| flatten(store, backend, lowers, mnt.path(), &out))?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SquashError::Io { path, source }
    };
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

/// Mounts `lowers` under `mnt` (`l<i>`, base = 0), stacks them with overlayfs and writes the
/// merged tree as one image to `out`. Runs in a private mount namespace, which takes the
/// mounts with it: nothing here unmounts.
///
/// The overlay's `lowerdir` names the lowers relative to `mnt` (the mount runs there): its
/// options must fit in one page, which 128 absolute store paths do not, while `l<i>:` is at
/// most 5 bytes a layer up to overlayfs's own limit of 500 lowers.
fn flatten(
    store: &Store,
    backend: &Backend,
    lowers: &[Lower],
    mnt: &Path,
    out: &Path,
) -> Result<(), SquashError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SquashError::Io { path, source }
    };
    let mut names = Vec::new();
    for (i, l) in lowers.iter().enumerate() {
        let name = format!("l{i}");
        let mp = mnt.join(&name);
        fs_err::create_dir(&mp).map_err(io(&mp))?;
        let blob = store.blob_path(&l.id().map_err(StoreError::from)?);
        mount(&["-n", "-t", l.fs.name(), "-o", "loop,ro"], &blob, &mp, mnt)?;
        names.push(name);
    }
    let merged = mnt.join("merged");
    fs_err::create_dir(&merged).map_err(io(&merged))?;
    names.reverse();
    let opts = format!("ro,lowerdir={}", names.join(":"));
    mount(&["-n", "-t", "overlay", "-o", &opts], Path::new("overlay"), &merged, mnt)?;

    let top = &lowers.last().ok_or(SquashError::NoLayers)?.chain_id;
    let seed = crate::digest::sha256_of(format!("squash {top}").as_bytes());
    let mut making = backend.start(&seed, out)?;
    let mut normalizer = Normalizer::new(&mut making, u64::MAX);
    if let Err(e) = copy_tree(&merged, &mut normalizer) {
        drop(normalizer);
        return Err(writer_failure(making, e));
    }
    let copy_err = |source| SquashError::Copy { path: "/".into(), source };
    if let Err(e) = normalizer.finish(&DirIndex::default()) {
        return Err(writer_failure(making, copy_err(e)));
    }
    making.finish()?;
    Ok(())
}

/// The error to report when writing into the backend failed: the writer's own (mkfs exited,
/// the disk is full), if it stopped with one, else `failure`.
fn writer_failure(making: Making, failure: SquashError) -> SquashError {
    if !matches!(failure, SquashError::Copy { source: NormalizeError::Write(_), .. }) {
        return failure;
    }
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
fn copy_tree(root: &Path, tree: &mut Normalizer<&mut Making>) -> Result<(), SquashError> {
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

//! A persistent upper (`run --upper FILE`): an ext4 filesystem in a sparse file that the guest
//! mounts as overlayfs's writable layer (`upper/` and `work/` on it), so that the next guest
//! sees what one wrote, and `commit` turns it into a layer ([`crate::commit`]).
//!
//! The host makes the file: an empty filesystem, `mke2fs` on a sparse file of the nominal
//! size, with lazy inode tables and journal (the guest mounts it `noinit_itable`), so that it
//! costs what is written. The host never mounts it: a guest wrote it, so it is untrusted,
//! and only a guest reads it (`commit`'s guest streams it out as a tar).
//!
//! Beside it, `FILE.vmrootfs.json` ([`UpperBinding`], written by the host only) binds it to the
//! image it was made over: the tag, and the identity of that image (its layers' filesystem
//! and chain IDs, and its config digest). `run` refuses an upper under another image, naming
//! both, and `commit` refuses one whose tag now names another image.
//!
//! While a guest uses the file, `run` and `commit` hold an exclusive `flock` on it: a second
//! `run` or `commit` with the same file fails at once, saying so.

pub mod extent_tar;
pub mod guest_tar;

use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::backend::FsType;
use crate::backend::tool::{Tool, ToolError};
use crate::record::ImageRecord;

/// Nominal size of an upper made without `--upper-size`: it costs only what is written.
pub const DEFAULT_SIZE: u64 = 10 << 30;

/// The smallest upper `mke2fs` is asked for: the journal and the metadata need room.
const MIN_SIZE: u64 = 64 << 20;

/// Why an upper could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpperError {
    /// Reading or writing the upper or its binding failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// `mke2fs` is missing or failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// Another `run` or `commit` holds the upper.
    #[error("the upper {0} is in use by another vmrootfs run or commit")]
    InUse(PathBuf),
    /// The file exists but no binding says which image it was made over.
    #[error(
        "{path} exists but is not a vmrootfs upper ({binding} is missing): give a new file to make one, or remove it"
    )]
    NotAnUpper {
        /// The file.
        path: PathBuf,
        /// The binding that should be beside it.
        binding: PathBuf,
    },
    /// The binding beside the upper cannot be read.
    #[error("{path} is not a readable upper binding")]
    BadBinding {
        /// The binding.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The upper was made over another image.
    #[error(
        "the upper {path} was made over {bound} (config {bound_config}), not over {tag} (config {config}): run {bound} with it, or give another file"
    )]
    OtherImage {
        /// The upper.
        path: PathBuf,
        /// The tag it was made over.
        bound: String,
        /// That image's config digest.
        bound_config: String,
        /// The tag it was used with.
        tag: String,
        /// That image's config digest.
        config: String,
    },
    /// The tag the upper was made over now names another image (or none).
    #[error(
        "the upper {path} was made over the image then tagged {tag} (config {bound_config}), and {tag} now names {now}: tag that image again to commit it"
    )]
    BaseGone {
        /// The upper.
        path: PathBuf,
        /// The tag.
        tag: String,
        /// The config digest the upper was made over.
        bound_config: String,
        /// What the tag names now.
        now: String,
    },
    /// `--upper-size` is too small for a filesystem.
    #[error("--upper-size {0} is too small: an upper needs at least 64M")]
    TooSmall(u64),
}

/// What identifies the image an upper was made over: its layer stack and its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIdentity {
    /// The filesystem of its layer blobs.
    pub fs: Option<FsType>,
    /// Its layers' chain IDs, base first.
    pub chain_ids: Vec<Digest>,
    /// Its config's digest.
    pub config_digest: Digest,
}

impl ImageIdentity {
    /// The identity of `record`.
    pub fn of(record: &ImageRecord) -> ImageIdentity {
        ImageIdentity {
            fs: record.lowers.first().map(|l| l.fs),
            chain_ids: record.lowers.iter().map(|l| l.chain_id.clone()).collect(),
            config_digest: record.config_digest.clone(),
        }
    }
}

/// `FILE.vmrootfs.json`: the image an upper was made over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpperBinding {
    /// Version of this file's layout.
    pub format: u32,
    /// The tag the upper was made over.
    pub tag: String,
    /// What that tag named then.
    pub image: ImageIdentity,
}

/// Version of [`UpperBinding`]'s layout.
const BINDING_FORMAT: u32 = 1;

/// An upper held for one guest: locked until dropped.
#[derive(Debug)]
pub struct Upper {
    path: PathBuf,
    binding: UpperBinding,
    /// The open file holding the `flock`.
    file: std::fs::File,
}

impl Upper {
    /// The upper at `path` for a guest of the image tagged `tag` (`record`): made with
    /// `size` bytes nominal if missing and bound to that image, else checked to be bound to
    /// it. Locked until dropped.
    pub fn for_run(path: &Path, size: u64, tag: &str, record: &ImageRecord) -> Result<Upper, UpperError> {
        let io = |source| UpperError::Io { path: path.to_owned(), source };
        let fresh = match fs_err::OpenOptions::new().read(true).write(true).create_new(true).open(path) {
            Ok(file) => Some(file.into_parts().0),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
            Err(e) => return Err(io(e)),
        };
        let Some(file) = fresh else {
            let upper = Upper::open(path)?;
            let wanted = ImageIdentity::of(record);
            if upper.binding.image != wanted {
                return Err(UpperError::OtherImage {
                    path: path.to_owned(),
                    bound: upper.binding.tag.clone(),
                    bound_config: upper.binding.image.config_digest.to_string(),
                    tag: tag.to_string(),
                    config: wanted.config_digest.to_string(),
                });
            }
            return Ok(upper);
        };
        lock(&file, path)?;
        let binding =
            UpperBinding { format: BINDING_FORMAT, tag: tag.to_string(), image: ImageIdentity::of(record) };
        // A failure leaves no file behind that would be taken for an upper.
        let made = make_filesystem(&file, path, size).and_then(|()| write_binding(path, &binding));
        if let Err(e) = made {
            let _ = fs_err::remove_file(path);
            return Err(e);
        }
        crate::progress::info(&format!(
            "made the upper {} ({} MiB nominal, over {tag})",
            path.display(),
            size >> 20
        ));
        Ok(Upper { path: path.to_owned(), binding, file })
    }

    /// The existing upper at `path` with its binding, locked until dropped.
    pub fn open(path: &Path) -> Result<Upper, UpperError> {
        let io = |source| UpperError::Io { path: path.to_owned(), source };
        let file = fs_err::OpenOptions::new().read(true).write(true).open(path).map_err(io)?.into_parts().0;
        lock(&file, path)?;
        let binding_path = binding_path(path);
        let text = match fs_err::read(&binding_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(UpperError::NotAnUpper { path: path.to_owned(), binding: binding_path });
            }
            Err(source) => return Err(UpperError::Io { path: binding_path, source }),
        };
        let binding: UpperBinding = serde_json::from_slice(&text)
            .map_err(|source| UpperError::BadBinding { path: binding_path.clone(), source })?;
        if binding.format != BINDING_FORMAT {
            let source = serde::de::Error::custom(format!(
                "format {} (this vmrootfs reads {BINDING_FORMAT})",
                binding.format
            ));
            return Err(UpperError::BadBinding { path: binding_path, source });
        }
        Ok(Upper { path: path.to_owned(), binding, file })
    }

    /// Refuses the upper unless `record`, now tagged as the binding says, is still the image
    /// it was made over (`commit`).
    pub fn check_base(&self, record: Option<&ImageRecord>) -> Result<(), UpperError> {
        let bound = &self.binding.image;
        match record {
            Some(r) if &ImageIdentity::of(r) == bound => Ok(()),
            other => Err(UpperError::BaseGone {
                path: self.path.clone(),
                tag: self.binding.tag.clone(),
                bound_config: bound.config_digest.to_string(),
                now: other.map_or("no image".into(), |r| format!("the image of config {}", r.config_digest)),
            }),
        }
    }

    /// The upper's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open upper file (locked): where `commit` reads the data its guest names by extent.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// The image it was made over.
    pub fn binding(&self) -> &UpperBinding {
        &self.binding
    }

    /// Makes what a guest wrote durable on the host (QEMU writes through the page cache).
    pub fn sync(&self) -> Result<(), UpperError> {
        self.file.sync_all().map_err(|source| UpperError::Io { path: self.path.clone(), source })
    }
}

/// `FILE.vmrootfs.json`.
pub fn binding_path(upper: &Path) -> PathBuf {
    let mut name = upper.as_os_str().to_owned();
    name.push(".vmrootfs.json");
    PathBuf::from(name)
}

/// Takes the exclusive `flock` on the upper, or fails at once if someone holds it.
fn lock(file: &std::fs::File, path: &Path) -> Result<(), UpperError> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(UpperError::InUse(path.to_owned())),
        Err(e) => Err(UpperError::Io { path: path.to_owned(), source: e.into() }),
    }
}

/// An empty ext4 filesystem of `size` bytes in the (new, empty) file: sparse, root owned by
/// root, inode tables and journal left for the kernel to initialise lazily.
fn make_filesystem(file: &std::fs::File, path: &Path, size: u64) -> Result<(), UpperError> {
    if size < MIN_SIZE {
        return Err(UpperError::TooSmall(size));
    }
    file.set_len(size).map_err(|source| UpperError::Io { path: path.to_owned(), source })?;
    let mke2fs = Tool::find("mke2fs", "e2fsprogs", &["-V"], "1.43")?;
    crate::backend::tool::run(
        "mke2fs",
        mke2fs
            .command()
            .args(["-q", "-F", "-t", "ext4", "-L", "vmrootfs-upper"])
            .args(["-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1"])
            .arg(path),
    )?;
    file.sync_all().map_err(|source| UpperError::Io { path: path.to_owned(), source })
}

/// Writes the binding beside the upper: a temp file, fsynced, renamed into place.
fn write_binding(upper: &Path, binding: &UpperBinding) -> Result<(), UpperError> {
    let path = binding_path(upper);
    let io = |source| UpperError::Io { path: path.clone(), source };
    let text = serde_json::to_vec_pretty(binding).expect("a binding serializes");
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let mut f = fs_err::File::create(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, &text).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs_err::rename(&tmp, &path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs_err::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

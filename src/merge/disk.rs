//! `export --single-disk`: a merged image as one drive, the merged blob followed by the layer
//! blobs (base first) — the order of its device table, whose `mapped_blkaddr`s say where each
//! layer starts on that disk.
//!
//! - **VMDK** (QEMU, and runtimes that read VMDK descriptors): a text descriptor whose flat
//!   extents point at the stored blobs; nothing is copied. It names them by absolute path, so
//!   it stays valid while the image's record does and the store does not move. Its extents
//!   are `RDONLY`: no runtime writes the shared blobs through it (see [`ExtentAccess`]).
//! - **raw** (Firecracker and every runtime that takes raw files only): one file, the blobs
//!   concatenated; a copy of the whole image.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{MergeError, io_at};
use crate::record::LocatedRecord;
use crate::store::Store;

/// One stored file of a single disk, in disk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub path: PathBuf,
    pub bytes: u64,
}

/// The disk layout of `record`'s merged image: its merged blob, then its lowers.
pub fn extents(record: &LocatedRecord) -> Result<Vec<Extent>, MergeError> {
    let merged = record.merged.as_ref().ok_or_else(|| MergeError::NotMerged { tag: record.tag.clone() })?;
    let paths = std::iter::once(&merged.path).chain(record.lowers.iter().map(|l| &l.path));
    let mut out = Vec::new();
    for path in paths {
        let bytes = fs_err::metadata(path).map_err(io_at(path))?.len();
        super::layout::blocks_of(bytes, 4096)
            .map_err(|source| MergeError::Layout { path: path.clone(), source })?;
        out.push(Extent { path: path.clone(), bytes });
    }
    Ok(out)
}

/// Byte offset of each extent on the disk.
pub fn offsets(extents: &[Extent]) -> Vec<u64> {
    extents
        .iter()
        .scan(0u64, |at, e| {
            let start = *at;
            *at += e.bytes;
            Some(start)
        })
        .collect()
}

const SECTOR: u64 = 512;
/// Largest extent of a `twoGbMaxExtentFlat` disk, in sectors (2 GiB).
const MAX_EXTENT_SECTORS: u64 = (2 << 30) / SECTOR;

/// What a VMDK's extents let a runtime do with the stored blobs they name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentAccess {
    /// `RDONLY`: the descriptor itself forbids writes, whoever opens it and however (the
    /// blobs' 0444 mode does not stop root). For every descriptor handed out (`export`).
    ReadOnly,
    /// `RW`: the only access QEMU (10 and before) reads; it skips `RDONLY` extents and then
    /// finds no disk at all. Only for a descriptor QEMU alone opens, as a `readonly=on` drive,
    /// in a run's private staging directory (`run --merged`).
    QemuReadOnlyDrive,
}

/// A VMDK descriptor (`twoGbMaxExtentFlat`, flat extents of at most 2 GiB) of a disk made of
/// `extents`, with `access` on each extent. `cid` is the content id (any value that changes
/// with the content).
pub fn vmdk_descriptor(extents: &[Extent], cid: u32, access: ExtentAccess) -> Result<String, MergeError> {
    let access = match access {
        ExtentAccess::ReadOnly => "RDONLY",
        ExtentAccess::QemuReadOnlyDrive => "RW",
    };
    let mut lines = String::new();
    let mut total = 0u64;
    for e in extents {
        let name = e.path.to_str().filter(|s| !s.contains(['"', '\n', '\r']));
        let name = name.ok_or_else(|| MergeError::UnquotablePath { path: e.path.clone() })?;
        let sectors = e.bytes.div_ceil(SECTOR);
        let mut offset = 0;
        while offset < sectors {
            let n = (sectors - offset).min(MAX_EXTENT_SECTORS);
            lines += &format!("{access} {n} FLAT \"{name}\" {offset}\n");
            offset += n;
        }
        total += sectors;
    }
    let cylinders = (total / (16 * 63)).clamp(1, 65535);
    Ok(format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"twoGbMaxExtentFlat\"\n\
         \n\
         # Extent description\n\
         {lines}\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n"
    ))
}

/// Which single-disk form to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A VMDK descriptor over the stored blobs (no copy).
    Vmdk,
    /// One raw file, the blobs concatenated.
    Raw,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Exported {
    /// The file written.
    pub path: PathBuf,
    /// The disk's size in bytes (for VMDK: of the disk it describes).
    pub disk_bytes: u64,
    /// Bytes written to `path`.
    pub file_bytes: u64,
    /// The blobs on the disk, in disk order: the merged blob, then the lowers base first
    /// (an older kernel mounts them as loop devices at these offsets).
    pub parts: Vec<DiskPart>,
}

/// One stored blob on a single disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskPart {
    pub path: PathBuf,
    /// Byte offset on the disk.
    pub offset: u64,
    pub bytes: u64,
}

/// The parts of a disk made of `extents`.
fn parts(extents: &[Extent]) -> Vec<DiskPart> {
    extents
        .iter()
        .zip(offsets(extents))
        .map(|(e, offset)| DiskPart { path: e.path.clone(), offset, bytes: e.bytes })
        .collect()
}

/// The content id of a VMDK of `record`: the first 32 bits of its merged blob's sha256.
fn cid_of(record: &LocatedRecord) -> u32 {
    let hex = record.merged.as_ref().map(|m| m.blob_sha256.as_str()).unwrap_or_default();
    // A record whose sha256 is not hex fails `verify`; the CID only has to differ between
    // contents, so such a record gets 0 rather than no disk.
    hex.get(..8).and_then(|h| u32::from_str_radix(h, 16).ok()).unwrap_or(0)
}

/// Refuses an export target that exists and is not a regular file: the export replaces
/// `file` by renaming a new file onto it, which would replace a device node, FIFO or symlink
/// (and fails, or panics for `/`, on a directory).
fn check_target(file: &Path) -> Result<(), MergeError> {
    let kind = match fs_err::symlink_metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(file)(e)),
        Ok(m) => m.file_type(),
    };
    use std::os::unix::fs::FileTypeExt;
    let kind = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "directory"
    } else if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_fifo() {
        "FIFO"
    } else {
        "socket"
    };
    Err(MergeError::NotARegularFile { path: file.to_owned(), kind })
}

/// Writes the single disk of the merged image tagged `tag` to `file` (replaced atomically;
/// only a regular file is replaced), holding the shared store lock so no `gc` or `rm` removes
/// a blob while it is read.
pub fn export(store: &Store, tag: &str, file: &Path, format: DiskFormat) -> Result<Exported, MergeError> {
    let file = std::path::absolute(file).map_err(io_at(file))?;
    check_target(&file)?;
    let _lock = store.lock_shared()?;
    let record = store.locate(store.get(tag)?)?;
    let extents = extents(&record)?;
    let disk_bytes = extents.iter().map(|e| e.bytes).sum();
    match format {
        DiskFormat::Vmdk => {
            let text = vmdk_descriptor(&extents, cid_of(&record), ExtentAccess::ReadOnly)?;
            crate::store::write_atomic_with(&file, |out| {
                out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
                out.write_all(text.as_bytes())
            })?;
            Ok(Exported { path: file, disk_bytes, file_bytes: text.len() as u64, parts: parts(&extents) })
        }
        DiskFormat::Raw => {
            write_raw(&extents, &file)?;
            Ok(Exported { path: file, disk_bytes, file_bytes: disk_bytes, parts: parts(&extents) })
        }
    }
}

/// Writes the raw single disk of `extents` (the blobs concatenated) to `file`, replaced
/// atomically, readable by runtimes. The caller holds the store lock.
pub fn write_raw(extents: &[Extent], file: &Path) -> Result<(), MergeError> {
    crate::store::write_atomic_with(file, |out| {
        // A disk for runtimes, readable by them (the temp file is made 0600).
        out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        for e in extents {
            let mut src = fs_err::File::open(&e.path)?;
            let n = std::io::copy(&mut src, &mut out)?;
            if n != e.bytes {
                return Err(std::io::Error::other(format!(
                    "{} changed size while copied ({} bytes, then {n})",
                    e.path.display(),
                    e.bytes
                )));
            }
        }
        out.flush()
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmdk_lists_each_blob_in_order_and_splits_at_2_gib() {
        let extents = [
            Extent { path: "/s/merged-a.erofs".into(), bytes: 8192 },
            Extent { path: "/s/big.erofs".into(), bytes: (5 << 30) + 4096 },
        ];
        let d = vmdk_descriptor(&extents, 0xabc, ExtentAccess::ReadOnly).unwrap();
        let ext: Vec<&str> = d.lines().filter(|l| l.contains(" FLAT ")).collect();
        assert_eq!(
            ext,
            [
                "RDONLY 16 FLAT \"/s/merged-a.erofs\" 0",
                "RDONLY 4194304 FLAT \"/s/big.erofs\" 0",
                "RDONLY 4194304 FLAT \"/s/big.erofs\" 4194304",
                "RDONLY 2097160 FLAT \"/s/big.erofs\" 8388608",
            ]
        );
        let qemu = vmdk_descriptor(&extents, 0xabc, ExtentAccess::QemuReadOnlyDrive).unwrap();
        assert_eq!(qemu, d.replace("RDONLY ", "RW "));
        assert!(d.starts_with("# Disk DescriptorFile\nversion=1\nCID=00000abc\n"), "{d}");
        assert_eq!(offsets(&extents), [0, 8192]);
    }

    #[test]
    fn vmdk_refuses_a_path_it_cannot_quote() {
        let e = [Extent { path: "/s/a\"b".into(), bytes: 4096 }];
        assert!(matches!(
            vmdk_descriptor(&e, 0, ExtentAccess::ReadOnly),
            Err(MergeError::UnquotablePath { .. })
        ));
    }
}

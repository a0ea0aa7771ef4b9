//! Garbage collection, under the exclusive store lock: layer files whose blob no image record
//! references (marked by [`BlobId`], never by path), everything in `tmp/`, leftovers of
//! atomic writes, the `vm/` cache (rebuilt on demand) and lazy blobs' caches left by killed
//! runs (`lazy/`: a running one holds the shared store lock, so gc never meets it).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::oci::is_oci_blob_name;
use super::{Store, StoreError, io_at, parse_blob_name};
use crate::record::{BlobId, ImageRecord};

/// What a GC removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Layer blobs deleted (with their sidecar and lock files).
    pub layers: usize,
    /// Bytes of the deleted blobs.
    pub bytes: u64,
    /// Entries removed from `tmp/` (and half-written `.tmp-*` files beside records).
    pub tmp: usize,
    /// Files removed from `run`'s cache `vm/` (rebuilt on demand).
    pub vm: usize,
    /// Caches of lazy blobs removed from `lazy/` (left by a killed `run --lazy`).
    pub lazy: usize,
    /// Kept source manifests and configs no record names any more.
    pub sources: usize,
    /// Blobs of the OCI area (`oci/sha256/`) no record names any more (their bytes are
    /// counted in `bytes`).
    pub oci_blobs: usize,
}

/// The files of one blob id found in a layer directory.
#[derive(Default)]
struct BlobFiles {
    blob: Option<PathBuf>,
    /// Sidecars (`.json`, `.dirs`) and the `.lock`.
    others: Vec<PathBuf>,
}

impl Store {
    /// Fails, before anything is deleted, when something is mounted under `tmp/`: clearing
    /// it would stop half-way (`Read-only file system`, `Device or resource busy`). vmrootfs
    /// mounts only in namespaces of its own (see [`crate::mountns`]), so such a mount is
    /// someone else's, or an older version's.
    pub(super) fn check_nothing_mounted_in_tmp(&self) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp");
        let real = fs_err::canonicalize(&tmp).map_err(io_at(&tmp))?;
        let table = Path::new("/proc/self/mountinfo");
        let text = fs_err::read_to_string(table).map_err(io_at(table))?;
        let mounts: Vec<PathBuf> =
            text.lines().filter_map(mount_point).filter(|p| p.starts_with(&real) && *p != real).collect();
        if mounts.is_empty() { Ok(()) } else { Err(StoreError::MountedInTmp { tmp, mounts }) }
    }

    /// The collection itself; the caller holds the exclusive store lock.
    pub(super) fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        let records = self.list()?;
        let mut referenced: HashSet<BlobId> = HashSet::new();
        for r in &records {
            referenced.extend(r.blobs()?.into_iter().map(|(id, _)| id));
        }
        let mut report = GcReport::default();
        let layers = self.root.join("layers");
        for dir in fs_err::read_dir(&layers).map_err(io_at(&layers))? {
            let dir = dir.map_err(io_at(&layers))?.path();
            if !dir.is_dir() {
                continue;
            }
            let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let mut found: BTreeMap<String, (BlobId, BlobFiles)> = BTreeMap::new();
            for entry in fs_err::read_dir(&dir).map_err(io_at(&dir))? {
                let path = entry.map_err(io_at(&dir))?.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
                if name.starts_with(".tmp-") {
                    // A write_atomic that never finished (the store lock is ours: none runs).
                    remove(&path)?;
                    report.tmp += 1;
                    continue;
                }
                // Names this store does not make are not its to delete.
                let Some((id, is_blob)) = parse_blob_name(&dir_name, name) else { continue };
                let stem = name.split('.').next().unwrap_or_default().to_string();
                let files = &mut found.entry(stem).or_insert_with(|| (id, BlobFiles::default())).1;
                if is_blob {
                    files.blob = Some(path);
                } else {
                    files.others.push(path);
                }
            }
            for (id, files) in found.into_values() {
                if referenced.contains(&id) {
                    continue;
                }
                // The blob first, then its sidecars: a crash in between leaves sidecars without
                // a blob, which count as not stored (see `Store::layer`).
                if let Some(blob) = &files.blob {
                    report.bytes += fs_err::metadata(blob).map_err(io_at(blob))?.len();
                    remove(blob)?;
                    super::sync_dir(&dir)?;
                    report.layers += 1;
                }
                for path in &files.others {
                    remove(path)?;
                }
            }
        }
        let sources = self.root.join("sources");
        if sources.exists() {
            let kept: HashSet<String> = records
                .iter()
                .flat_map(|r| [&r.manifest_digest, &r.config_digest])
                .map(|d| format!("{}.json", d.digest()))
                .collect();
            for entry in fs_err::read_dir(&sources).map_err(io_at(&sources))? {
                let path = entry.map_err(io_at(&sources))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                if !kept.contains(&name) {
                    remove(&path)?;
                    report.sources += 1;
                }
            }
        }
        self.collect_oci_blobs(&records, &mut report)?;
        let images = self.root.join("images");
        for entry in fs_err::read_dir(&images).map_err(io_at(&images))? {
            let path = entry.map_err(io_at(&images))?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-")) {
                remove(&path)?;
                report.tmp += 1;
            }
        }
        report.tmp += clear_dir(&self.root.join("tmp"))?;
        // Everything in `vm/` is rebuilt on demand, so all of it goes, not only entries of
        // kernels no longer installed. (A `run` beside gc is safe only once `run` holds the
        // shared store lock: issue 10, item 4.)
        let vm = self.root.join("vm");
        if vm.exists() {
            report.vm += clear_dir(&vm)?;
        }
        // Lazy blobs' caches: those of lazy records are kept; the rest were left by killed runs.
        let lazy = self.root.join("lazy");
        if lazy.exists() {
            let kept = self.lazily_recorded_blobs()?;
            report.lazy += clear_dir_except(&lazy, &kept)?;
        }
        Ok(report)
    }
}

impl Store {
    /// Deletes the blobs of the OCI area that no record names: a record keeps each lower's
    /// `digest`, its `config_digest` and its `manifest_digest`.
    fn collect_oci_blobs(&self, records: &[ImageRecord], report: &mut GcReport) -> Result<(), StoreError> {
        let dir = self.oci_dir();
        if !dir.exists() {
            return Ok(());
        }
        let kept: HashSet<&str> = records
            .iter()
            .flat_map(|r| r.lowers.iter().map(|l| &l.digest).chain([&r.config_digest, &r.manifest_digest]))
            .map(|d| d.digest())
            .collect();
        for entry in fs_err::read_dir(&dir).map_err(io_at(&dir))? {
            let path = entry.map_err(io_at(&dir))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            // Names this store does not make are not its to delete.
            if !is_oci_blob_name(name) || kept.contains(name) {
                continue;
            }
            report.bytes += fs_err::metadata(&path).map_err(io_at(&path))?.len();
            remove(&path)?;
            report.oci_blobs += 1;
        }
        super::sync_dir(&dir)
    }
}

/// The mount point of a `/proc/self/mountinfo` line (5th field; `\ooo` octal escapes undone).
fn mount_point(line: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let field = line.split(' ').nth(4)?.as_bytes();
    let mut bytes = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal =
            field.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok());
        match (field[i], octal) {
            (b'\\', Some(b)) => {
                bytes.push(b);
                i += 4;
            }
            (b, _) => {
                bytes.push(b);
                i += 1;
            }
        }
    }
    Some(std::ffi::OsString::from_vec(bytes).into())
}

fn remove(path: &Path) -> Result<(), StoreError> {
    fs_err::remove_file(path).map_err(|e| StoreError::Io { path: path.to_owned(), source: e })
}

/// Removes everything inside `dir`; returns how many entries there were.
fn clear_dir(dir: &Path) -> Result<usize, StoreError> {
    clear_dir_except(dir, &HashSet::new())
}

/// [`clear_dir`] but for the entries named in `kept`.
fn clear_dir_except(dir: &Path, kept: &HashSet<String>) -> Result<usize, StoreError> {
    let mut n = 0;
    for entry in fs_err::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        if kept.contains(entry.file_name().to_string_lossy().as_ref()) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() && !path.is_symlink() {
            fs_err::remove_dir_all(&path)
        } else {
            fs_err::remove_file(&path)
        };
        result.map_err(|e| StoreError::Io { path: path.clone(), source: e })?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes_undone() {
        let line = "36 35 98:0 / /mnt/a\\040b\\134c rw,noatime master:1 - ext3 /dev/root rw";
        assert_eq!(mount_point(line), Some(PathBuf::from("/mnt/a b\\c")));
        assert_eq!(mount_point("short line"), None);
    }
}

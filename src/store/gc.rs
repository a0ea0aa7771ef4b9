//! Garbage collection, under the exclusive store lock: layer files that no image record
//! references, and everything in `tmp/`.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;

use super::{Store, StoreError, io_at};

/// What a GC removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Layer blobs deleted (with their sidecar and lock files).
    pub layers: usize,
    /// Bytes of the deleted blobs.
    pub bytes: u64,
    /// Entries removed from `tmp/`.
    pub tmp: usize,
}

impl Store {
    /// The collection itself; the caller holds the exclusive store lock.
    pub(super) fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        let records = self.list()?;
        let referenced: HashSet<&Path> = records.iter().flat_map(|r| r.blobs().map(|(p, _, _)| p)).collect();
        let mut report = GcReport::default();
        let layers = self.root.join("layers");
        for dir in fs_err::read_dir(&layers).map_err(io_at(&layers))? {
            let dir = dir.map_err(io_at(&layers))?.path();
            if !dir.is_dir() {
                continue;
            }
            for entry in fs_err::read_dir(&dir).map_err(io_at(&dir))? {
                let path = entry.map_err(io_at(&dir))?.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
                // Every file of a layer starts with `<64 hex>.`; the blob is `<hex>.<fs>`.
                let Some((stem, _)) = name.split_once('.') else { continue };
                let stem = stem.to_string();
                let fs_ext = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('-').next());
                let blob = dir.join(format!("{stem}.{}", fs_ext.unwrap_or_default()));
                if referenced.contains(blob.as_path()) {
                    continue;
                }
                if path == blob {
                    report.layers += 1;
                    report.bytes += path.metadata().map(|m| m.len()).unwrap_or(0);
                }
                fs_err::remove_file(&path).map_err(|e| StoreError::Io { path: path.clone(), source: e })?;
            }
        }
        report.tmp += clear_dir(&self.root.join("tmp"))?;
        Ok(report)
    }
}

/// Removes everything inside `dir`; returns how many entries there were.
fn clear_dir(dir: &Path) -> Result<usize, StoreError> {
    let mut n = 0;
    for entry in fs_err::read_dir(dir).map_err(io_at(dir))? {
        let path = entry.map_err(io_at(dir))?.path();
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

//! Lazy records (`build REF --lazy`): an image recorded before its layers are fetched.
//!
//! `lazy-images/<escaped tag>.json` names the registry image pinned to its manifest digest
//! (`host/repo@sha256:…`: a tag moved later does not change what it runs), its lowers' blob
//! digests and their data bytes. The lowers' caches in `lazy/` (their dm-verity trees already
//! fetched and proved) belong to it: `gc` keeps them. `run TAG` boots it lazily and, once
//! complete, the ordinary record replaces it ([`crate::lazy::LazyImage::complete`]); `rm TAG`
//! forgets it with its caches. Every other command asks for the stored image and is told it
//! is lazy ([`StoreError::Lazy`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, create_dir, io_at, record_name, write_atomic};

/// An image recorded lazily.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LazyRecord {
    /// The tag it is recorded under.
    pub tag: String,
    /// The registry image, pinned: `host/repo@sha256:…`.
    pub source: String,
    /// Its manifest digest.
    pub manifest_digest: Digest,
    /// The lowers' blob digests, base first (each blob once).
    pub layers: Vec<Digest>,
    /// Data bytes of those blobs (what a complete fetch brings).
    pub data_bytes: u64,
    /// When it was recorded (RFC 3339).
    pub created_at: String,
}

impl Store {
    pub(super) fn lazy_record_path(&self, tag: &str) -> PathBuf {
        self.root.join("lazy-images").join(record_name(tag))
    }

    /// Records `record` (replacing a lazy record of its tag).
    pub(crate) fn put_lazy_record(&self, record: &LazyRecord) -> Result<(), StoreError> {
        self.require_writable()?;
        self.check_tag(&record.tag)?;
        let path = self.lazy_record_path(&record.tag);
        create_dir(path.parent().expect("lazy-images/"))?;
        let mut json = serde_json::to_vec_pretty(record).expect("a lazy record serializes");
        json.push(b'\n');
        write_atomic(&path, &json)
    }

    /// The lazy record of `tag`, if there is one.
    pub fn lazy_record(&self, tag: &str) -> Result<Option<LazyRecord>, StoreError> {
        read_lazy_record(&self.lazy_record_path(tag))
    }

    /// Every lazy record, by tag.
    pub fn lazy_records(&self) -> Result<Vec<LazyRecord>, StoreError> {
        let dir = self.root.join("lazy-images");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut records = Vec::new();
        for entry in fs_err::read_dir(&dir).map_err(io_at(&dir))? {
            let name = entry.map_err(io_at(&dir))?.file_name();
            let name = name.to_string_lossy();
            if !name.ends_with(".json") || name.starts_with(".tmp-") {
                continue;
            }
            records.extend(read_lazy_record(&dir.join(name.as_ref()))?);
        }
        records.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok(records)
    }

    /// Forgets the lazy record of `tag` (its caches stay until `gc` or `rm`); whether there
    /// was one.
    pub(crate) fn remove_lazy_record(&self, tag: &str) -> Result<bool, StoreError> {
        let path = self.lazy_record_path(tag);
        match fs_err::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// The hex digests of the blobs whose caches lazy records keep.
    pub(super) fn lazily_recorded_blobs(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self.lazy_records()?.iter().flat_map(|r| &r.layers).map(|d| d.digest().to_string()).collect())
    }
}

/// The lazy record in the file `path`, if there is one.
fn read_lazy_record(path: &Path) -> Result<Option<LazyRecord>, StoreError> {
    let io = |source| StoreError::Io { path: path.to_owned(), source };
    match fs_err::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| io(std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
    }
}

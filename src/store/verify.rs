//! `verify`: every blob an image record references is re-hashed against the record and
//! checked with its filesystem's own checker (a merged blob together with its layer blobs, its
//! devices).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{Store, StoreError};
use crate::backend::{self, FsType};
use crate::record::BlobKind;

/// A blob to check: its filesystem, the sha256 its records give, its extra devices (for a
/// merged blob, the lowers), and the tags referencing it.
struct ToCheck {
    fs: FsType,
    sha256: String,
    devices: Vec<PathBuf>,
    tags: Vec<String>,
}

/// A referenced blob that is missing, altered or corrupt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadBlob {
    pub path: PathBuf,
    /// Tags whose records reference it.
    pub tags: Vec<String>,
    pub problem: String,
}

impl Store {
    /// Checks the blobs of `tags` (all records when empty), under the shared store lock.
    /// Returns the bad ones; an empty list means all is well.
    pub fn verify(&self, tags: &[String]) -> Result<Vec<BadBlob>, StoreError> {
        let _lock = self.lock_shared()?;
        let records = if tags.is_empty() {
            self.list()?
        } else {
            tags.iter().map(|t| self.get(t)).collect::<Result<Vec<_>, _>>()?
        };
        let mut blobs: BTreeMap<PathBuf, ToCheck> = BTreeMap::new();
        for r in &records {
            let lowers = r.lowers.iter().map(|l| Ok(self.blob_path(&l.id()?)));
            let lowers = lowers.collect::<Result<Vec<_>, crate::digest::InvalidDigest>>()?;
            for (id, sha) in r.blobs()? {
                let devices = if id.kind == BlobKind::Merged { lowers.clone() } else { Vec::new() };
                let entry = blobs.entry(self.blob_path(&id)).or_insert_with(|| ToCheck {
                    fs: id.fs,
                    sha256: sha.to_string(),
                    devices,
                    tags: Vec::new(),
                });
                entry.tags.push(r.tag.clone());
            }
        }
        let mut bad = Vec::new();
        for (path, ToCheck { fs, sha256: want, devices, tags }) in blobs {
            let problem = match crate::digest::sha256_file_hex(&path) {
                Err(e) => Some(format!("cannot read: {e}")),
                Ok(found) if found != want => Some(format!("sha256 {found}, record says {want}")),
                Ok(_) => backend::fsck(fs, &path, &devices).err().map(|e| format!("{e}")),
            };
            if let Some(problem) = problem {
                bad.push(BadBlob { path, tags, problem });
            }
        }
        Ok(bad)
    }
}

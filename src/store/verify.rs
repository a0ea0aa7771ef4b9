//! `verify`: every blob an image record references is re-hashed against the record and
//! checked with its filesystem's own checker.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{Store, StoreError};
use crate::backend::{self, FsType};

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
        let mut blobs: BTreeMap<PathBuf, (FsType, String, Vec<String>)> = BTreeMap::new();
        for r in &records {
            for (id, sha) in r.blobs()? {
                let entry = blobs.entry(self.blob_path(&id)).or_insert((id.fs, sha.to_string(), Vec::new()));
                entry.2.push(r.tag.clone());
            }
        }
        let mut bad = Vec::new();
        for (path, (fs, want, tags)) in blobs {
            let problem = match crate::digest::sha256_file_hex(&path) {
                Err(e) => Some(format!("cannot read: {e}")),
                Ok(found) if found != want => Some(format!("sha256 {found}, record says {want}")),
                Ok(_) => backend::fsck(fs, &path).err().map(|e| format!("{e}")),
            };
            if let Some(problem) = problem {
                bad.push(BadBlob { path, tags, problem });
            }
        }
        Ok(bad)
    }
}

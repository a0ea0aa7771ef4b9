//! `verify`: every blob an image record references is re-hashed against the record and
//! checked with its filesystem's own checker (a merged blob together with its layer blobs, its
//! devices); a lower with a dm-verity tree also has the tree recomputed from the blob, its root
//! digest compared with the record's and the stored tree with the recomputed one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

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
        // The trees to recompute: blob path → (lower index, chain ID, tree, recorded root).
        let mut trees: BTreeMap<PathBuf, Vec<(usize, Digest, PathBuf, Digest)>> = BTreeMap::new();
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
            for (i, l) in r.lowers.iter().enumerate() {
                let Some(v) = &l.verity else { continue };
                let id = l.id()?;
                let want = (i, l.chain_id.clone(), self.verity_tree_path(&id), v.root_digest.clone());
                let list = trees.entry(self.blob_path(&id)).or_default();
                if !list.contains(&want) {
                    list.push(want);
                }
            }
        }
        let mut bad = Vec::new();
        for (path, ToCheck { fs, sha256: want, devices, tags }) in blobs {
            let mut problems = Vec::new();
            match crate::digest::sha256_file_hex(&path) {
                Err(e) => problems.push(format!("cannot read: {e}")),
                Ok(found) if found != want => problems.push(format!("sha256 {found}, record says {want}")),
                Ok(_) => problems.extend(backend::fsck(fs, &path, &devices).err().map(|e| format!("{e}"))),
            }
            for (i, chain_id, tree, root) in trees.get(&path).into_iter().flatten() {
                problems.extend(check_tree(*i, &path, chain_id, tree, root));
            }
            if !problems.is_empty() {
                bad.push(BadBlob { path, tags, problem: problems.join("; ") });
            }
        }
        Ok(bad)
    }
}

/// What is wrong with the dm-verity tree of lower `index` (blob `blob`), if anything.
fn check_tree(index: usize, blob: &Path, chain_id: &Digest, tree: &Path, root: &Digest) -> Option<String> {
    let lower = format!("lower {index} (chain {chain_id})");
    match crate::verity::check(blob, chain_id, tree) {
        Err(e) => {
            let mut msg = format!("{lower}: cannot check its dm-verity tree: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg += &format!(": {c}");
                cause = c.source();
            }
            Some(msg)
        }
        Ok(c) if &c.root_digest != root => Some(format!(
            "{lower}: dm-verity root digest of the blob is {}, record says {root}",
            c.root_digest
        )),
        Ok(c) if c.differing_tree_blocks > 0 => Some(format!(
            "{lower}: {} block(s) of the stored dm-verity tree {} differ from the blob's",
            c.differing_tree_blocks,
            tree.display()
        )),
        Ok(_) => None,
    }
}

//! `verify`: every blob an image record references is re-hashed against every record that
//! names it (and every blob of the store's OCI area a record names, against its digest: see
//! `oci.rs`) and checked with its filesystem's own checker (a merged blob together with its
//! layer blobs, its devices); each file the blob's use depends on is checked too (its `.json`
//! record, a layer's `.dirs`, a tree's `.verity.json`; an older store's `.own` is not
//! checked: nothing reads it, so its bytes cannot change what a build or a mount makes); a lower with a dm-verity
//! tree also has the tree recomputed from the blob, its root digest compared with the
//! record's and the stored tree with the recomputed one. Each bad blob comes with how to
//! repair it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use serde::Serialize;

use super::{Store, StoreError, StoredVerity, read_sidecar};
use crate::backend;
use crate::layer::dirindex::DirIndex;
use crate::progress::error_chain;
use crate::record::{BlobId, BlobKind, ImageRecord, LayerRecord};
use crate::verity::VerityInfo;

/// A blob to check: its id, its extra devices (for a merged blob, the lowers), and what each
/// record naming it expects.
struct ToCheck {
    id: BlobId,
    devices: Vec<PathBuf>,
    expected: Vec<Expected>,
}

/// What one image record expects of a blob.
struct Expected {
    tag: String,
    /// The record's `source`, for the repair hint.
    source: String,
    sha256: String,
    size: u64,
    /// The lower's index and dm-verity record, for a lower with a tree.
    verity: Option<(usize, VerityInfo)>,
}

/// A referenced blob that is missing, altered or corrupt, or a file it depends on that is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadBlob {
    /// The blob (or the file it depends on).
    pub path: PathBuf,
    /// Tags whose records reference it and are affected.
    pub tags: Vec<String>,
    /// What is wrong with it.
    pub problem: String,
    /// The commands that repair it: building each affected image again converts (or fetches)
    /// what is damaged.
    pub repair: String,
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
            for (id, expected) in expectations(r)? {
                let devices = if matches!(id.kind, BlobKind::Merged { .. }) {
                    let lowers = r.lowers.iter().map(|l| Ok(self.blob_path(&l.id()?)));
                    lowers.collect::<Result<Vec<_>, crate::digest::InvalidDigest>>()?
                } else {
                    Vec::new()
                };
                let entry = blobs.entry(self.blob_path(&id)).or_insert_with(|| ToCheck {
                    id: id.clone(),
                    devices,
                    expected: Vec::new(),
                });
                entry.expected.push(expected);
            }
        }
        let mut bad = Vec::new();
        for (path, check) in blobs {
            // Problems of the blob itself concern every record naming it; a record's own
            // expectations only that record.
            let mut shared = Vec::new();
            let mut own: Vec<Vec<String>> = check.expected.iter().map(|_| Vec::new()).collect();
            match crate::digest::sha256_file_hex(&path) {
                Err(e) => shared.push(format!("cannot read: {e}")),
                Ok(found) => {
                    let size = fs_err::metadata(&path).map(|m| m.len()).ok();
                    for (e, problems) in check.expected.iter().zip(&mut own) {
                        if found != e.sha256 {
                            problems
                                .push(format!("sha256 {found}, the record of {} says {}", e.tag, e.sha256));
                        } else if Some(e.size) != size {
                            problems.push(format!(
                                "{} bytes, the record of {} says {}",
                                size.map_or("unknown".into(), |s| s.to_string()),
                                e.tag,
                                e.size
                            ));
                        }
                    }
                    if own.iter().all(Vec::is_empty) {
                        shared.extend(
                            backend::fsck(check.id.fs, &path, &check.devices).err().map(|e| format!("{e}")),
                        );
                    }
                }
            }
            shared.extend(self.check_sidecars(&check.id, &path));
            for (e, problems) in check.expected.iter().zip(&mut own) {
                let Some((i, v)) = &e.verity else { continue };
                let chain_id: Digest = check.id.chain_id.clone().into();
                let lower = format!("lower {i} (chain {chain_id})");
                let tree = self.verity_tree_path(&check.id);
                problems.extend(check_tree(&lower, &path, &tree, v));
                problems.extend(self.check_verity_record(&lower, &check.id, v));
            }
            let affected: Vec<&Expected> = check
                .expected
                .iter()
                .zip(&own)
                .filter(|(_, p)| !shared.is_empty() || !p.is_empty())
                .map(|(e, _)| e)
                .collect();
            if affected.is_empty() {
                continue;
            }
            let mut problems = shared;
            let mut seen = std::collections::BTreeSet::new();
            problems.extend(own.into_iter().flatten().filter(|p| seen.insert(p.clone())));
            let repair = affected
                .iter()
                .map(|e| format!("vmrootfs build {} --tag {}", e.source, e.tag))
                .collect::<Vec<_>>()
                .join("; ");
            bad.push(BadBlob {
                path,
                tags: affected.iter().map(|e| e.tag.clone()).collect(),
                problem: problems.join("; "),
                repair: format!("build again (`{repair}`): damaged files are converted or fetched again"),
            });
        }
        bad.extend(self.check_oci_blobs(&records)?);
        Ok(bad)
    }

    /// What is wrong with the files beside the blob `id` that its use depends on: its `.json`
    /// record (which must describe the blob), and a layer's `.dirs` (which must read back,
    /// and have the sha256 the record names, when it names one).
    fn check_sidecars(&self, id: &BlobId, blob: &Path) -> Vec<String> {
        let json = self.sidecar(id, "json");
        let size = fs_err::metadata(blob).map(|m| m.len()).ok();
        let mut problems = Vec::new();
        let record: Option<LayerRecord> = match id.kind {
            BlobKind::Layer => match read_sidecar::<LayerRecord>(&json) {
                Ok(Some(r)) => {
                    if Some(r.size) != size {
                        problems.push(format!(
                            "{} gives size {}, the blob is {} bytes",
                            json.display(),
                            r.size,
                            size.map_or("unreadable".into(), |s| s.to_string())
                        ));
                    }
                    Some(r)
                }
                Ok(None) => {
                    problems.push(format!("{} is missing", json.display()));
                    None
                }
                Err(e) => {
                    problems.push(error_chain(&e));
                    None
                }
            },
            BlobKind::Squashed | BlobKind::Merged { .. } => {
                match read_sidecar::<serde_json::Value>(&json) {
                    Ok(Some(_)) => {}
                    Ok(None) => problems.push(format!("{} is missing", json.display())),
                    Err(e) => problems.push(error_chain(&e)),
                }
                None
            }
        };
        let Some(record) = record else { return problems };
        problems.extend(
            self.check_listing(id, "dirs", record.dirs_sha256.as_deref(), |r| {
                DirIndex::read_from(r).map(drop)
            }),
        );
        problems
    }

    /// What is wrong with the listing sidecar `ext` (`.dirs`) of the layer `id`: it must have
    /// the sha256 `want` (when the record names one: local conversions) and read back.
    /// Pulled layers have none.
    fn check_listing(
        &self,
        id: &BlobId,
        ext: &str,
        want: Option<&str>,
        parse: impl FnOnce(io::BufReader<fs_err::File>) -> io::Result<()>,
    ) -> Option<String> {
        let path = self.sidecar(id, ext);
        match (fs_err::File::open(&path), want) {
            (Err(e), None) if e.kind() == io::ErrorKind::NotFound => None,
            (Err(e), _) => Some(format!("cannot read {}: {e}", path.display())),
            (Ok(file), want) => {
                if let Err(e) = parse(io::BufReader::new(file)) {
                    return Some(format!("{} is unreadable: {e}", path.display()));
                }
                match (crate::digest::sha256_file_hex(&path), want) {
                    (Ok(found), Some(want)) if found != want => {
                        Some(format!("{} has sha256 {found}, the layer's record says {want}", path.display()))
                    }
                    (Err(e), _) => Some(format!("cannot read {}: {e}", path.display())),
                    _ => None,
                }
            }
        }
    }

    /// What is wrong with the `.verity.json` of the layer `id`, which must hold the tree
    /// record `want` (the image record's) of this blob.
    fn check_verity_record(&self, lower: &str, id: &BlobId, want: &VerityInfo) -> Option<String> {
        let path = self.sidecar(id, "verity.json");
        let stored: StoredVerity = match read_sidecar(&path) {
            Ok(Some(v)) => v,
            Ok(None) => return Some(format!("{lower}: {} is missing", path.display())),
            Err(e) => return Some(format!("{lower}: {}", error_chain(&e))),
        };
        let record = read_sidecar::<LayerRecord>(&self.sidecar(id, "json")).ok().flatten();
        if stored.info != *want {
            Some(format!("{lower}: {} is not the tree record the image record holds", path.display()))
        } else if record.is_some_and(|r| stored.blob_sha256.as_deref().is_some_and(|s| s != r.blob_sha256)) {
            Some(format!("{lower}: {} names the sha256 of other bytes than the blob's", path.display()))
        } else {
            None
        }
    }
}

/// Each blob `record` references, with what it expects of it.
fn expectations(record: &ImageRecord) -> Result<Vec<(BlobId, Expected)>, crate::digest::InvalidDigest> {
    let expected = |sha256: &str, size: u64, verity: Option<(usize, VerityInfo)>| Expected {
        tag: record.tag.clone(),
        source: record.source.clone(),
        sha256: sha256.to_string(),
        size,
        verity,
    };
    let mut out = Vec::new();
    for (i, l) in record.lowers.iter().enumerate() {
        out.push((l.id()?, expected(&l.blob_sha256, l.size, l.verity.clone().map(|v| (i, v)))));
    }
    if let Some(s) = &record.squashed {
        out.push((s.id()?, expected(&s.blob_sha256, s.size, None)));
    }
    if let Some(m) = &record.merged {
        out.push((m.id()?, expected(&m.blob_sha256, m.size, None)));
    }
    Ok(out)
}

/// What is wrong with the dm-verity tree `tree` of `lower` (blob `blob`), if anything: it is
/// recomputed with the salt of the record `want`, as the guest's table uses it.
fn check_tree(lower: &str, blob: &Path, tree: &Path, want: &VerityInfo) -> Option<String> {
    let root = &want.root_digest;
    match want.salt_bytes().and_then(|salt| crate::verity::check(blob, &salt, tree)) {
        Err(e) => Some(format!("{lower}: cannot check its dm-verity tree: {}", error_chain(&e))),
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

//! Upgrading a store of an older layout format in place, under the exclusive store lock.
//!
//! Format 1 records named each blob by its absolute path (`lowers[].path`, `squashed.path`);
//! format 2 names it by identity. The path's directory, `layers/<fs>-v<N>/`, gives the recipe
//! version, so every format-1 record converts without touching a blob: the old blobs keep
//! working beside the new recipe's, and `gc` removes them once no record uses them.

use std::path::Path;

use serde_json::Value;

use super::{FORMAT, Store, StoreError, io_at, write_atomic};

impl Store {
    /// Rewrites every format-1 record as format 2, then `meta.json`.
    pub(super) fn upgrade_from_1(&self, meta: &Path) -> Result<(), StoreError> {
        let _lock = self.lock_exclusive()?;
        if read_format(meta)? == Some(FORMAT) {
            return Ok(()); // another process upgraded it while we waited
        }
        let images = self.root.join("images");
        for entry in fs_err::read_dir(&images).map_err(io_at(&images))? {
            let path = entry.map_err(io_at(&images))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = fs_err::read(&path).map_err(io_at(&path))?;
            let mut record: Value = serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::BadRecord { path: path.clone(), source })?;
            let obj = record.as_object_mut().ok_or_else(|| StoreError::Unupgradable {
                path: path.clone(),
                reason: "the record is not a JSON object".into(),
            })?;
            let mut blobs: Vec<&mut Value> = Vec::new();
            for (key, value) in obj.iter_mut() {
                match (key.as_str(), value) {
                    ("lowers", Value::Array(lowers)) => blobs.extend(lowers.iter_mut()),
                    ("squashed", squashed @ Value::Object(_)) => blobs.push(squashed),
                    _ => {}
                }
            }
            for blob in blobs {
                name_by_identity(blob)
                    .map_err(|reason| StoreError::Unupgradable { path: path.clone(), reason })?;
            }
            let text = serde_json::to_vec_pretty(&record).expect("a JSON value serializes");
            write_atomic(&path, &text)?;
        }
        write_atomic(meta, format!("{{\"format\": {FORMAT}}}\n").as_bytes())
    }
}

/// The `format` number in `meta.json`, `None` when it has none.
pub(super) fn read_format(meta: &Path) -> Result<Option<u32>, StoreError> {
    let bytes = fs_err::read(meta).map_err(io_at(meta))?;
    Ok(serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("format").and_then(Value::as_u64))
        .and_then(|n| u32::try_from(n).ok()))
}

/// `{"path": "…/layers/erofs-v1/<hex>.erofs", …}` → `{"recipe": 1, …}`.
fn name_by_identity(blob: &mut Value) -> Result<(), String> {
    let obj = blob.as_object_mut().ok_or("a blob entry is not an object")?;
    if obj.contains_key("recipe") {
        return Ok(());
    }
    let path = obj.remove("path").ok_or("a blob entry has neither path nor recipe")?;
    let path = path.as_str().ok_or("a blob path is not a string")?;
    let fs = obj.get("fs").and_then(Value::as_str).ok_or("a blob entry has no fs")?;
    let dir = Path::new(path).parent().and_then(Path::file_name).and_then(|d| d.to_str()).unwrap_or("");
    let recipe: u32 = dir
        .strip_prefix(&format!("{fs}-v"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("blob path {path:?} is not under layers/{fs}-v<N>/"))?;
    obj.insert("recipe".into(), recipe.into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_1_store_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs_err::create_dir_all(root.join("images")).unwrap();
        fs_err::write(root.join("meta.json"), "{\"format\": 1}").unwrap();
        let hex = "ab".repeat(32);
        let d = format!("sha256:{}", "cd".repeat(32));
        let record = serde_json::json!({
            "tag": "old", "source": "oci:/x:t", "manifest_digest": d, "config_digest": d,
            "platform": "linux/amd64", "created_at": "2026-11-22T12:00:00Z", "size": 10,
            "config": {"entrypoint": [], "cmd": [], "env": [], "working_dir": "", "user": ""},
            "lowers": [{"path": format!("/elsewhere/layers/erofs-v1/{hex}.erofs"), "fs": "erofs",
                        "chain_id": format!("sha256:{hex}"), "diff_id": d, "digest": d,
                        "size": 10, "blob_sha256": "00"}],
            "squashed": null
        });
        fs_err::write(root.join("images/old.json"), record.to_string()).unwrap();
        let store = Store::open(root).unwrap();
        assert_eq!(read_format(&root.join("meta.json")).unwrap(), Some(FORMAT));
        let got = store.get("old").unwrap();
        assert_eq!(got.lowers[0].recipe, 1);
        let located = store.locate(got).unwrap();
        assert_eq!(located.lowers[0].path, root.join(format!("layers/erofs-v1/{hex}.erofs")));
    }

    #[test]
    fn a_blob_path_outside_any_recipe_directory_is_reported() {
        let mut blob = serde_json::json!({"path": "/x/y.erofs", "fs": "erofs"});
        assert!(name_by_identity(&mut blob).unwrap_err().contains("/x/y.erofs"));
    }
}

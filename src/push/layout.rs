//! Push destinations on disk: an OCI image layout directory (`oci:DIR[:TAG]`, added to or
//! created) and an OCI archive (`oci-archive:FILE[:TAG]`, a tar of a layout, written whole
//! beside FILE and renamed into place, so a failed push leaves no half archive).
//!
//! A blob's name is a claim until its bytes are hashed: every layer blob is hashed as it is
//! written and must equal its name (else the push fails naming the stored file), and a blob
//! already in a layout counts as present only when its bytes hash to its name (else it is
//! replaced).

use std::io::{self, Write};
use std::path::Path;

use super::{Composed, PushError, PushedLayer, io_at};
use crate::digest;

const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The index entry of the pushed manifest, tagged `tag`, with `erofs` in its platform's
/// `os.features` (spec §5.4).
fn index_entry(composed: &Composed, tag: &str) -> serde_json::Value {
    serde_json::json!({
        "mediaType": super::MANIFEST_TYPE,
        "digest": digest::sha256_of(&composed.manifest).to_string(),
        "size": composed.manifest.len(),
        "annotations": {REF_NAME: tag},
        "platform": composed.platform,
    })
}

/// `blobs/sha256/<hex>` of a digest.
fn blob_name(d: &oci_spec::image::Digest) -> String {
    format!("blobs/sha256/{}", d.digest())
}

/// Writes into the layout `dir`: the blobs it lacks, then `index.json` with `tag` now naming
/// the pushed manifest (an entry of the same tag is replaced).
pub fn write_dir(dir: &Path, tag: &str, composed: &Composed) -> Result<Vec<PushedLayer>, PushError> {
    let blobs = dir.join("blobs/sha256");
    fs_err::create_dir_all(&blobs).map_err(io_at(&blobs))?;
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        write_new(&layout, LAYOUT)?;
    }
    let mut pushed = Vec::new();
    for blob in &composed.layers {
        let dest = dir.join(blob_name(&blob.digest));
        let existed = holds(&dest, &blob.digest, blob.size)?;
        if !existed {
            let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&blobs).map_err(io_at(&blobs))?;
            let out = io::BufWriter::with_capacity(1 << 20, tmp.as_file());
            let mut hashing = digest::HashingWriter::new(out);
            io::copy(&mut blob.open()?, &mut hashing).map_err(io_at(tmp.path()))?;
            let (found, size, out) = hashing.finish();
            out.into_inner()
                .map_err(|e| PushError::Io { path: tmp.path().to_owned(), source: e.into_error() })?;
            blob.check(&found, size)?;
            publish(tmp, &dest)?;
        }
        pushed.push(PushedLayer {
            media_type: blob.media_type.clone(),
            digest: blob.digest.to_string(),
            size: blob.size,
            existed,
            mounted: false,
        });
    }
    for bytes in [&composed.config, &composed.manifest] {
        let digest = digest::sha256_of(bytes);
        let dest = dir.join(blob_name(&digest));
        if !holds(&dest, &digest, bytes.len() as u64)? {
            write_new(&dest, bytes)?;
        }
    }
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = match fs_err::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PushError::Io {
            path: index_path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []})
        }
        Err(e) => return Err(PushError::Io { path: index_path, source: e }),
    };
    let manifests = index.get_mut("manifests").and_then(|m| m.as_array_mut()).ok_or_else(|| {
        PushError::Io { path: index_path.clone(), source: io::Error::other("no manifests list") }
    })?;
    manifests.retain(|m| m["annotations"][REF_NAME] != tag);
    manifests.push(index_entry(composed, tag));
    write_new(&index_path, &serde_json::to_vec(&index).expect("an index serializes"))?;
    Ok(pushed)
}

/// Writes an OCI archive holding only the pushed image, tagged `tag`.
pub fn write_archive(file: &Path, tag: &str, composed: &Composed) -> Result<Vec<PushedLayer>, PushError> {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_at(dir))?;
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, tmp.as_file()));
    let mut add = |name: &str, size: u64, data: &mut dyn io::Read| -> Result<(), PushError> {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data).map_err(io_at(file))
    };
    add("oci-layout", LAYOUT.len() as u64, &mut &LAYOUT[..])?;
    let mut pushed = Vec::new();
    for blob in &composed.layers {
        let mut hashing = digest::HashingReader::new(blob.open()?);
        add(&blob_name(&blob.digest), blob.size, &mut hashing)?;
        // To the end: bytes beyond the descriptor's size are a mismatch too.
        let (found, size, _) = hashing.finish().map_err(io_at(&blob.parts[0]))?;
        blob.check(&found, size)?;
        pushed.push(PushedLayer {
            media_type: blob.media_type.clone(),
            digest: blob.digest.to_string(),
            size: blob.size,
            existed: false,
            mounted: false,
        });
    }
    for bytes in [&composed.config, &composed.manifest] {
        add(&blob_name(&digest::sha256_of(bytes)), bytes.len() as u64, &mut &bytes[..])?;
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [index_entry(composed, tag)]});
    let index = serde_json::to_vec(&index).expect("an index serializes");
    add("index.json", index.len() as u64, &mut &index[..])?;
    let mut out = tar.into_inner().map_err(io_at(file))?;
    out.flush().map_err(io_at(file))?;
    drop(out);
    tmp.as_file().sync_all().map_err(io_at(file))?;
    tmp.persist(file).map_err(|e| PushError::Io { path: file.to_owned(), source: e.error })?;
    Ok(pushed)
}

/// Whether the layout file `path` is the blob `digest` of `size` bytes: present with other
/// bytes counts as absent (to be replaced).
fn holds(path: &Path, digest: &oci_spec::image::Digest, size: u64) -> Result<bool, PushError> {
    match fs_err::metadata(path) {
        Ok(m) if m.len() != size => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(PushError::Io { path: path.to_owned(), source: e }),
    }
    Ok(digest::sha256_file_hex(path).map_err(io_at(path))? == digest.digest())
}

/// `bytes` to `path` through a temp file and a rename.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), PushError> {
    let dir = path.parent().expect("a layout path has a parent");
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_at(dir))?;
    tmp.write_all(bytes).map_err(io_at(path))?;
    publish(tmp, path)
}

/// Renames the finished temp file `tmp` to `path`, readable by all (as `docker` and `skopeo`
/// leave layout files).
fn publish(tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), PushError> {
    let readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    tmp.as_file().set_permissions(readable).map_err(io_at(tmp.path()))?;
    tmp.persist(path).map_err(|e| PushError::Io { path: path.to_owned(), source: e.error })?;
    Ok(())
}

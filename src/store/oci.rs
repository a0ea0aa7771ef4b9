//! The store's OCI area, `oci/sha256/<hex>`: OCI blobs vmrootfs authored or must keep to push
//! an image in standard OCI form — a committed layer's tar, a new image's config
//! JSON and manifest — content-addressed by their sha256.
//!
//! - **Put** ([`Store::put_oci_blob`]) streams a reader into `tmp/`, hashing on the way,
//!   checks the digest against the expected one when given, then publishes by rename
//!   (fsync, `0444`, directory fsync). A blob already there with the same size is kept ("already
//!   exists" is success); one of another size is damaged, and the verified bytes replace it:
//!   the name is the digest, so only those bytes belong under it.
//!   A file this process staged in `tmp/` and hashed as it wrote it (a committed layer's tar)
//!   is *adopted* instead: moved into place the same way, not copied.
//! - **Open** ([`Store::open_oci_blob`]) gives a reader that hashes what it reads and fails at
//!   the end of the bytes, before reporting the end, when they are not the digest (or the
//!   size) asked for: a consumer streaming it to a registry or a file never sees a clean end of
//!   wrong bytes. [`Store::verify_oci_blob`] reads it whole that way.
//! - **GC** keeps exactly the blobs some image record names: a lower's `digest`, the record's
//!   `config_digest` and `manifest_digest` (see `gc.rs`).
//!
//! The caller of a put holds the store lock shared and writes the record that names the blob
//! before releasing it, as for layer blobs: GC takes the lock exclusive, so it never deletes a
//! blob between its put and its record.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{Digest, Sha256Digest};
use sha2::{Digest as _, Sha256};

use super::{BLOB_MODE, BadBlob, Store, StoreError, create_dir, io_at, sync_dir};
use crate::digest;
use crate::record::ImageRecord;

/// A blob in the OCI area: its digest and size (what a descriptor needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciBlob {
    /// `sha256:<hex>` of its bytes.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// A blob of the OCI area being read, checked against its digest as it is read: at the end of
/// its bytes, a read fails with [`io::ErrorKind::InvalidData`] (its message names the file and
/// both digests) instead of returning the end, when the bytes are not the digest asked for.
pub struct VerifiedOciBlob {
    file: io::BufReader<fs_err::File>,
    path: PathBuf,
    expected: OciBlob,
    hasher: Sha256,
    read: u64,
}

impl VerifiedOciBlob {
    /// The digest and size the bytes are checked against.
    pub fn blob(&self) -> &OciBlob {
        &self.expected
    }

    /// The end of the bytes: an error unless they are the expected digest and size.
    fn check_end(&mut self) -> io::Result<()> {
        let found = digest::sha256_digest(&std::mem::take(&mut self.hasher).finalize());
        let size_ok = self.read == self.expected.size;
        match digest::check("stored OCI blob", &self.expected.digest, &found) {
            Ok(()) if size_ok => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: stored OCI blob is not {} ({} bytes): found {found}, {} bytes; `vmrootfs verify` checks the store",
                    self.path.display(),
                    self.expected.digest,
                    self.expected.size,
                    self.read
                ),
            )),
        }
    }
}

impl Read for VerifiedOciBlob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.check_end()?;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

impl Store {
    /// Where the OCI blob `digest` lives; only a sha256 digest names a file. (A push sends the
    /// file as it is: a layout write checks the bytes it copies, a registry the digest of an
    /// upload.)
    pub(crate) fn oci_blob_path(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        let hex: Sha256Digest = digest::require_sha256("OCI blob digest", digest)?;
        Ok(self.oci_dir().join(hex.digest()))
    }

    /// `oci/sha256/`.
    pub(super) fn oci_dir(&self) -> PathBuf {
        self.root.join("oci").join("sha256")
    }

    /// Streams `from` into the OCI area and publishes it under its sha256; refuses bytes whose
    /// digest is not `expected` when one is given ([`StoreError::Mismatch`], nothing
    /// published). The caller holds the store lock shared (see the module doc).
    pub fn put_oci_blob(&self, from: impl Read, expected: Option<&Digest>) -> Result<OciBlob, StoreError> {
        self.require_writable()?;
        if let Some(want) = expected {
            // A digest that names no file is refused before anything is read.
            self.oci_blob_path(want)?;
        }
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile::Builder::new().prefix("oci-").tempfile_in(&tmp_dir).map_err(io_at(&tmp_dir))?;
        let mut out = io::BufWriter::with_capacity(1 << 20, digest::HashingWriter::new(tmp.as_file()));
        let mut from = from;
        io::copy(&mut from, &mut out).map_err(io_at(tmp.path()))?;
        let (found, size, _) = out.into_inner().map_err(|e| io_at(tmp.path())(e.into_error()))?.finish();
        if let Some(want) = expected {
            digest::check("OCI blob", want, &found)?;
        }
        // Moved into place; the temp file's drop then finds nothing to remove.
        self.adopt_oci_file(tmp.path(), &found, size)
    }

    /// Publishes `file`, written by this process in the store's `tmp/` (a [`Store::staging`]
    /// directory) and hashed as it was written, as the OCI blob `digest` of `size` bytes:
    /// moved, not copied (a committed layer is 100 MB that were just hashed). A blob already
    /// there with that size is kept. The caller holds the store lock shared.
    pub(crate) fn adopt_oci_file(
        &self,
        file: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<OciBlob, StoreError> {
        self.require_writable()?;
        let dest = self.oci_blob_path(digest)?;
        match fs_err::metadata(&dest) {
            Ok(m) if m.len() == size => return Ok(OciBlob { digest: digest.clone(), size }),
            Ok(_) => {} // damaged: replaced by the verified bytes below
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io { path: dest, source: e }),
        }
        create_dir(dest.parent().expect("oci/sha256"))?;
        let staged = fs_err::File::open(file).map_err(io_at(file))?;
        staged.set_permissions(std::fs::Permissions::from_mode(BLOB_MODE)).map_err(io_at(file))?;
        staged.sync_all().map_err(io_at(file))?;
        fs_err::rename(file, &dest).map_err(io_at(&dest))?;
        sync_dir(dest.parent().expect("oci/sha256"))?;
        Ok(OciBlob { digest: digest.clone(), size })
    }

    /// [`Store::put_oci_blob`] of bytes in memory (a config, a manifest).
    pub fn put_oci_bytes(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<OciBlob, StoreError> {
        self.put_oci_blob(bytes, expected)
    }

    /// The OCI blob `digest` if the area holds it (its digest and the size of its file; the
    /// bytes are checked when read), else `None`.
    pub fn oci_blob(&self, digest: &Digest) -> Result<Option<OciBlob>, StoreError> {
        let path = self.oci_blob_path(digest)?;
        match fs_err::metadata(&path) {
            Ok(m) => Ok(Some(OciBlob { digest: digest.clone(), size: m.len() })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Opens the OCI blob `digest`, expected to be `size` bytes when given (a descriptor's
    /// size), for reading through the check of [`VerifiedOciBlob`]; `None` when the area does
    /// not hold it.
    pub fn open_oci_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Option<VerifiedOciBlob>, StoreError> {
        let path = self.oci_blob_path(digest)?;
        let file = match fs_err::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let size = match size {
            Some(s) => s,
            None => file.metadata().map_err(io_at(&path))?.len(),
        };
        Ok(Some(VerifiedOciBlob {
            file: io::BufReader::with_capacity(1 << 20, file),
            path,
            expected: OciBlob { digest: digest.clone(), size },
            hasher: Sha256::new(),
            read: 0,
        }))
    }

    /// Reads the OCI blob `digest` whole and checks it is those bytes: `Ok(None)` when it is
    /// not in the area, [`StoreError::Io`] (kind `InvalidData`) when its bytes are not
    /// `digest`.
    pub fn verify_oci_blob(&self, digest: &Digest) -> Result<Option<OciBlob>, StoreError> {
        let Some(mut blob) = self.open_oci_blob(digest, None)? else { return Ok(None) };
        let path = blob.path.clone();
        io::copy(&mut blob, &mut io::sink()).map_err(io_at(&path))?;
        Ok(Some(blob.expected))
    }
}

impl Store {
    /// The blobs of the OCI area that `records` name (a lower's `digest`, `config_digest`,
    /// `manifest_digest`) and that are not their digest any more, read whole (for `verify`).
    /// A digest the area does not hold is not checked: the source holds it.
    pub(super) fn check_oci_blobs(&self, records: &[ImageRecord]) -> Result<Vec<BadBlob>, StoreError> {
        let mut named: BTreeMap<String, (&Digest, Vec<String>)> = BTreeMap::new();
        for r in records {
            for d in r.lowers.iter().map(|l| &l.digest).chain([&r.config_digest, &r.manifest_digest]) {
                let (_, tags) = named.entry(d.to_string()).or_insert_with(|| (d, Vec::new()));
                if !tags.contains(&r.tag) {
                    tags.push(r.tag.clone());
                }
            }
        }
        let mut bad = Vec::new();
        for (digest, tags) in named.into_values() {
            let problem = match self.verify_oci_blob(digest) {
                Ok(_) => continue,
                Err(StoreError::Io { source, .. }) => source.to_string(),
                Err(e) => return Err(e),
            };
            bad.push(BadBlob {
                path: self.oci_blob_path(digest)?,
                repair: format!(
                    "the OCI area holds the only copy of what vmrootfs authored: commit again, or remove the image (`vmrootfs rm {}`)",
                    tags.join(" ")
                ),
                tags,
                problem,
            });
        }
        Ok(bad)
    }
}

/// Whether `name` in `oci/sha256/` is a blob of the area (64 lowercase hex), not a stray file.
pub(super) fn is_oci_blob_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Lower, RuntimeConfig};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        r.read_to_end(&mut v)?;
        Ok(v)
    }

    #[test]
    fn a_put_blob_reads_back_verified_and_a_second_put_keeps_it() {
        let (_dir, store) = store();
        let bytes = b"a committed layer's tar.gz".repeat(10_000);
        let want = digest::sha256_of(&bytes);
        let put = store.put_oci_blob(&bytes[..], Some(&want)).unwrap();
        assert_eq!(put, OciBlob { digest: want.clone(), size: bytes.len() as u64 });
        let path = store.oci_blob_path(&want).unwrap();
        assert_eq!(path, store.root().join("oci/sha256").join(want.digest()));
        assert_eq!(fs_err::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(read_all(store.open_oci_blob(&want, Some(put.size)).unwrap().unwrap()).unwrap(), bytes);
        assert_eq!(store.put_oci_bytes(&bytes, None).unwrap(), put);
        assert_eq!(store.oci_blob(&want).unwrap(), Some(put.clone()));
        assert_eq!(store.verify_oci_blob(&want).unwrap(), Some(put));
        assert_eq!(fs_err::read_dir(store.root().join("tmp")).unwrap().count(), 0, "nothing left in tmp/");
    }

    #[test]
    fn bytes_that_are_not_the_expected_digest_are_refused_and_nothing_is_published() {
        let (_dir, store) = store();
        let want = digest::sha256_of(b"the promised bytes");
        let err = store.put_oci_bytes(b"other bytes", Some(&want)).unwrap_err().to_string();
        assert!(err.contains(&want.to_string()), "{err}");
        assert!(err.contains(&digest::sha256_of(b"other bytes").to_string()), "{err}");
        assert_eq!(store.oci_blob(&want).unwrap(), None);
        assert_eq!(store.oci_blob(&digest::sha256_of(b"other bytes")).unwrap(), None);
        assert_eq!(fs_err::read_dir(store.root().join("tmp")).unwrap().count(), 0, "nothing left in tmp/");
        let sha512: Digest = format!("sha512:{}", "ab".repeat(64)).parse().unwrap();
        let err = store.put_oci_bytes(b"x", Some(&sha512)).unwrap_err().to_string();
        assert!(err.contains("sha256 digests only"), "{err}");
    }

    #[test]
    fn a_changed_stored_blob_fails_at_its_end_naming_it_and_a_put_repairs_a_damaged_one() {
        let (_dir, store) = store();
        let bytes = b"config json".to_vec();
        let put = store.put_oci_bytes(&bytes, None).unwrap();
        let path = store.oci_blob_path(&put.digest).unwrap();
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        fs_err::write(&path, b"config jsoN").unwrap();
        let err = read_all(store.open_oci_blob(&put.digest, Some(put.size)).unwrap().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&put.digest.to_string()), "{err}");
        let err = crate::progress::error_chain(&store.verify_oci_blob(&put.digest).unwrap_err());
        assert!(err.contains(&put.digest.to_string()), "{err}");
        // A size other than the descriptor's fails too, even with the right bytes.
        fs_err::write(&path, &bytes).unwrap();
        let short = store.open_oci_blob(&put.digest, Some(put.size + 1)).unwrap().unwrap();
        assert_eq!(read_all(short).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A truncated blob (another size) is replaced by the verified bytes of a put.
        fs_err::write(&path, b"config").unwrap();
        store.put_oci_bytes(&bytes, Some(&put.digest)).unwrap();
        assert_eq!(fs_err::read(&path).unwrap(), bytes);
    }

    fn record(tag: &str, layer: &Digest, config: &Digest, manifest: &Digest) -> ImageRecord {
        let chain: Digest = format!("sha256:{}", "cd".repeat(32)).parse().unwrap();
        ImageRecord {
            tag: tag.into(),
            source: "oci:somewhere".into(),
            manifest_digest: manifest.clone(),
            config_digest: config.clone(),
            platform: "linux/amd64".into(),
            created_at: "2026-12-06T00:00:00Z".into(),
            lowers: vec![Lower {
                fs: crate::backend::FsType::Erofs,
                recipe: 1,
                chain_id: chain.clone(),
                diff_id: chain,
                digest: layer.clone(),
                size: 1,
                blob_sha256: "ab".repeat(32),
                verity: None,
            }],
            size: 1,
            config: RuntimeConfig::default(),
            squashed: None,
            merged: None,
        }
    }

    #[test]
    fn verify_reports_a_changed_oci_blob_a_record_names() {
        let (_dir, store) = store();
        let put = |b: &[u8]| store.put_oci_bytes(b, None).unwrap().digest;
        let (layer, config, manifest) = (put(b"layer"), put(b"config"), put(b"manifest"));
        store.put_record(&record("committed", &layer, &config, &manifest)).unwrap();
        assert_eq!(store.check_oci_blobs(&store.list().unwrap()).unwrap(), Vec::new());
        let path = store.oci_blob_path(&config).unwrap();
        fs_err::write(&path, b"confiG").unwrap();
        let bad = store.check_oci_blobs(&store.list().unwrap()).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!((bad[0].path.clone(), bad[0].tags.clone()), (path, vec!["committed".to_string()]));
        assert!(bad[0].problem.contains(&config.to_string()), "{}", bad[0].problem);
    }

    #[test]
    fn gc_keeps_exactly_the_oci_blobs_a_record_names() {
        let (_dir, store) = store();
        let put = |b: &[u8]| store.put_oci_bytes(b, None).unwrap().digest;
        let (layer, config, manifest) = (put(b"layer"), put(b"config"), put(b"manifest"));
        let orphan = put(b"a layer of an image since removed");
        store.put_record(&record("kept", &layer, &config, &manifest)).unwrap();
        let stray = store.oci_dir().join("not-a-blob");
        fs_err::write(&stray, b"").unwrap();
        let report = store.gc().unwrap();
        assert_eq!(report.oci_blobs, 1);
        assert_eq!(report.bytes, b"a layer of an image since removed".len() as u64);
        for d in [&layer, &config, &manifest] {
            assert!(store.oci_blob(d).unwrap().is_some(), "{d} kept");
        }
        assert_eq!(store.oci_blob(&orphan).unwrap(), None);
        assert!(stray.exists(), "a name the store does not make is left alone");
        store.remove(&["kept".to_string()]).unwrap();
        for d in [&layer, &config, &manifest] {
            assert_eq!(store.oci_blob(d).unwrap(), None, "{d} collected with its record");
        }
    }
}

//! SHA-256 hashing of streams as they are read, and checks against expected digests.

use std::io::{self, Read};

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::{Digest as _, Sha256};

/// A digest did not match what the manifest, config or record promised.
#[derive(Debug, thiserror::Error)]
#[error("{what} digest mismatch: expected {expected}, found {found}")]
pub struct DigestMismatch {
    /// What was hashed ("layer blob", "diff_id", "config", …).
    pub what: &'static str,
    pub expected: String,
    pub found: String,
}

/// Passes bytes through and feeds them to SHA-256 on the way.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Reads what is left to the end (a tar reader stops before trailing padding) and returns
    /// the `sha256:` digest of everything that passed through.
    pub fn finish(mut self) -> io::Result<(Digest, u64, R)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((sha256_digest(&self.hasher.finalize()), self.bytes, self.inner))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// `sha256:<hex>` of a finished hash.
pub fn sha256_digest(hash: &[u8]) -> Digest {
    format!("sha256:{}", hex::encode(hash)).parse().expect("a sha256 hex string is a valid digest")
}

/// SHA-256 of a byte slice, as a digest.
pub fn sha256_of(bytes: &[u8]) -> Digest {
    sha256_digest(&Sha256::digest(bytes))
}

/// SHA-256 hex of a whole file, streamed.
pub fn sha256_file_hex(path: &std::path::Path) -> io::Result<String> {
    let mut reader = HashingReader::new(fs_err::File::open(path)?);
    io::copy(&mut reader, &mut io::sink())?;
    Ok(hex::encode(reader.hasher.finalize()))
}

/// Checks `found` against `expected`; only sha256 digests are accepted as expectations.
pub fn check(what: &'static str, expected: &Digest, found: &Digest) -> Result<(), DigestMismatch> {
    if expected.algorithm() != &DigestAlgorithm::Sha256 || expected.digest() != found.digest() {
        return Err(DigestMismatch { what, expected: expected.to_string(), found: found.to_string() });
    }
    Ok(())
}

/// ChainID of a layer stack (OCI image spec): `ChainID(L0) = DiffID(L0)`,
/// `ChainID(L0…Ln) = sha256(ChainID(L0…Ln-1) + " " + DiffID(Ln))`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => sha256_of(format!("{parent} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_reader_hashes_all_bytes_including_unread_tail() {
        let mut r = HashingReader::new(&b"hello world"[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        let (digest, n, _) = r.finish().unwrap();
        assert_eq!(n, 11);
        assert_eq!(digest.digest(), "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
    }

    #[test]
    fn chain_id_follows_the_oci_definition() {
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], sha256_of(format!("{a} {b}").as_bytes()));
        assert_ne!(chain[1], b);
    }

    #[test]
    fn check_reports_both_digests() {
        let a = sha256_of(b"a");
        let b = sha256_of(b"b");
        let err = check("layer blob", &a, &b).unwrap_err().to_string();
        assert!(err.contains(&a.to_string()) && err.contains(&b.to_string()), "{err}");
        check("layer blob", &a, &a).unwrap();
    }
}

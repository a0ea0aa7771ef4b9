//! SHA-256 hashing of streams as they are read, and checks against expected digests.

use std::io::{self, Read};

use oci_spec::image::{Digest, DigestAlgorithm, Sha256Digest};
use sha2::{Digest as _, Sha256};

/// A digest from a manifest, config or record that vmrootfs cannot use. Only sha256 is
/// accepted: it is what every store name and every check is made of.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidDigest {
    #[error("{field}: {value:?} is not a well-formed digest")]
    Malformed {
        /// Where the digest came from, e.g. `config rootfs.diff_ids[2]`.
        field: String,
        value: String,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("{field}: {value} is a {algorithm} digest; vmrootfs accepts sha256 digests only")]
    Unsupported { field: String, value: String, algorithm: String },
}

/// Parses `value` (found at `field`) as a sha256 digest: `sha256:` and 64 lowercase hex.
pub fn parse_sha256(field: &str, value: &str) -> Result<Digest, InvalidDigest> {
    let d: Digest = value.parse().map_err(|source| InvalidDigest::Malformed {
        field: field.to_string(),
        value: value.to_string(),
        source,
    })?;
    require_sha256(field, &d)?;
    Ok(d)
}

/// `d` (found at `field`) as a [`Sha256Digest`]; any other algorithm is refused.
pub fn require_sha256(field: &str, d: &Digest) -> Result<Sha256Digest, InvalidDigest> {
    let unsupported = || InvalidDigest::Unsupported {
        field: field.to_string(),
        value: d.to_string(),
        algorithm: d.algorithm().to_string(),
    };
    if d.algorithm() != &DigestAlgorithm::Sha256 {
        return Err(unsupported());
    }
    // oci_spec guarantees 64 lowercase hex for a parsed sha256 digest; the parse re-checks.
    d.digest().parse().map_err(|source| InvalidDigest::Malformed {
        field: field.to_string(),
        value: d.to_string(),
        source,
    })
}

/// A digest did not match what the manifest, config or record promised.
#[derive(Debug, thiserror::Error)]
#[error("{what} digest mismatch: expected {expected}, found {found}")]
pub struct DigestMismatch {
    /// What was hashed ("layer blob", "diff_id", "config", …).
    pub what: &'static str,
    pub expected: String,
    pub found: String,
}

/// SHA-256 computed on a thread of its own once a stream passes [`OffThread::CHUNK`]
/// bytes: a layer's stream is read, hashed (blob digest), decompressed, hashed again (diff ID)
/// and normalized on one thread, where the two hashes were 0.2 s of the test image's 1.2 s
/// base layer. Bytes are copied into chunks ([`OffThread::update`]) or handed over whole
/// ([`OffThread::update_owned`]); the thread hands chunks back for reuse ([`OffThread::spent`]).
pub struct OffThread {
    pending: Vec<u8>,
    worker: Option<HashWorker>,
}

struct HashWorker {
    chunks: std::sync::mpsc::SyncSender<Vec<u8>>,
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: std::thread::JoinHandle<Sha256>,
}

impl OffThread {
    /// Bytes handed to the thread at a time by [`OffThread::update`].
    const CHUNK: usize = 256 << 10;

    pub fn new() -> Self {
        OffThread { pending: Vec::new(), worker: None }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.pending.capacity() == 0 {
                self.pending = self.spare();
                self.pending.reserve(Self::CHUNK);
            }
            let room = Self::CHUNK - self.pending.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.pending.extend_from_slice(now);
            bytes = rest;
            if self.pending.len() == Self::CHUNK {
                let full = std::mem::take(&mut self.pending);
                self.send(full);
            }
        }
    }

    /// Hashes `chunk` (after every byte given before) without copying it.
    pub fn update_owned(&mut self, chunk: Vec<u8>) {
        if !self.pending.is_empty() {
            let part = std::mem::take(&mut self.pending);
            self.send(part);
        }
        self.send(chunk);
    }

    /// An empty buffer: one the thread has hashed, when there is one.
    fn spare(&mut self) -> Vec<u8> {
        let mut v = self.spent().unwrap_or_default();
        v.clear();
        v
    }

    /// A chunk given to [`OffThread::update_owned`] that the thread has hashed, as it was
    /// given (its length kept, so refilling it to that length needs no zeroing), when one is
    /// back.
    pub fn spent(&mut self) -> Option<Vec<u8>> {
        self.worker.as_ref().and_then(|w| w.spent.try_recv().ok())
    }

    fn send(&mut self, chunk: Vec<u8>) {
        let worker = self.worker.get_or_insert_with(|| {
            let (chunks, received) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            let (give_back, spent) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                let mut hasher = Sha256::new();
                for chunk in received {
                    hasher.update(&chunk);
                    let _ = give_back.send(chunk);
                }
                hasher
            });
            HashWorker { chunks, spent, thread }
        });
        // Fails only if the thread panicked, which `state` reports.
        let _ = worker.chunks.send(chunk);
    }

    /// The hash state after every byte given (to go on hashing more).
    pub fn state(self) -> Sha256 {
        let mut hasher = match self.worker {
            None => Sha256::new(),
            Some(w) => {
                drop(w.chunks);
                w.thread.join().expect("the hashing thread does not panic")
            }
        };
        hasher.update(&self.pending);
        hasher
    }

    /// The hash of every byte given.
    pub fn finalize(self) -> [u8; 32] {
        self.state().finalize().into()
    }
}

impl Default for OffThread {
    fn default() -> Self {
        Self::new()
    }
}

/// Passes bytes through and feeds them to SHA-256 ([`OffThread`]) on the way.
pub struct HashingReader<R> {
    inner: R,
    hasher: OffThread,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: OffThread::new(), bytes: 0 }
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

/// Passes bytes through to a writer and feeds them to SHA-256 ([`OffThread`]) on the way.
pub struct HashingWriter<W> {
    inner: W,
    hasher: OffThread,
    bytes: u64,
}

impl<W: io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: OffThread::new(), bytes: 0 }
    }

    /// The `sha256:` digest and length of everything written, and the writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (sha256_digest(&self.hasher.finalize()), self.bytes, self.inner)
    }
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
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
    let (state, _) = hash_in_chunks(&mut fs_err::File::open(path)?, |_| Ok(()))?;
    Ok(hex::encode(state.finalize()))
}

/// Reads `from` to its end in 1 MiB chunks, shows each to `each` and hashes it on a thread of
/// its own ([`OffThread`]): one read and no copy serve both. Returns the hash state after every
/// byte (to go on hashing more) and the number of bytes.
pub fn hash_in_chunks(
    from: &mut impl Read,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<(Sha256, u64)> {
    const CHUNK: usize = 1 << 20;
    let mut hasher = OffThread::new();
    let mut total = 0u64;
    loop {
        // A chunk back from the hash keeps its length: only a shorter one's rest is zeroed.
        let mut chunk = hasher.spent().unwrap_or_default();
        chunk.resize(CHUNK, 0);
        let filled = read_full(from, &mut chunk)?;
        chunk.truncate(filled);
        if filled > 0 {
            each(&chunk)?;
            total += filled as u64;
            hasher.update_owned(chunk);
        }
        if filled < CHUNK {
            return Ok((hasher.state(), total));
        }
    }
}

/// Reads into all of `buf` unless the stream ends first; the bytes read.
pub fn read_full<R: Read + ?Sized>(from: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
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
    fn only_sha256_digests_are_accepted() {
        let hex = "ab".repeat(32);
        assert!(parse_sha256("f", &format!("sha256:{hex}")).is_ok());
        let cases = [
            (format!("foo:{hex}"), "foo digest"),
            (format!("sha512:{}", "ab".repeat(64)), "sha512 digest"),
            (format!("sha256:{}", "AB".repeat(32)), "not a well-formed digest"),
            (format!("sha256:{}", "ab".repeat(31)), "not a well-formed digest"),
            (hex.clone(), "not a well-formed digest"),
        ];
        for (value, want) in cases {
            let err = parse_sha256("config rootfs.diff_ids[1]", &value).unwrap_err().to_string();
            assert!(err.starts_with("config rootfs.diff_ids[1]: ") && err.contains(want), "{value}: {err}");
        }
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

//! One lazy blob: a registry layer pushed uncompressed with `--verity` (`blob ‖ tree`), read
//! by chunk as it is asked for.
//!
//! ```text
//! descriptor bytes:  [ data chunk 0 | chunk 1 | … | chunk n-1 ][ dm-verity tree ]
//!                    0              CHUNK                     hash_offset        size
//! cache (store):     lazy/<digest hex>/blob     the same bytes, sparse: verified chunks only
//!                    lazy/<digest hex>/present  one byte per data chunk: 1 = written
//! ```
//!
//! At open the tree is fetched (one range request) and proved against the manifest's root
//! digest ([`LeafHashes::check`]), then written at `hash_offset` in the cache. A read of a
//! chunk not present fetches it (a range request through the registry code pulls use:
//! its auth, retries and resumption), checks every 4 KiB block against its leaf hash, writes
//! it into the cache, marks it present, and only then copies it out. A block that fails is
//! never written nor returned: the read fails with `InvalidData` naming the layer and block,
//! and [`LazyBlob::failed_verification`] is set for `run` to name the layer.
//!
//! `present` is a hint, not a proof: a chunk it marks is verified again when a cache is
//! reopened (a killed run resumes there), so a write lost in a crash is fetched again, never
//! served. Only one process fills a cache at a time (its `.lock`).

use std::collections::HashSet;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use oci_spec::image::Digest;

use super::{BlockSource, LazyError};
use crate::lock::FileLock;
use crate::source::registry::RegistrySource;
use crate::verity::{BLOCK_SIZE, LeafHashes};

/// Bytes fetched per range request: AWS Lambda's chunk size (Brooker et al., ATC 2023), a
/// multiple of the 4 KiB verity block.
pub const CHUNK: u64 = 512 << 10;

/// Who asked for a chunk: what the bytes-fetched curve tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// A read of the guest (or of any [`BlockSource`] reader).
    Read,
    /// Background completion.
    Background,
}

/// One chunk fetched: when (since the image was opened), how many bytes, for whom.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetch {
    /// Seconds since the image was opened.
    pub at: f64,
    /// Layer index (base = 0).
    pub layer: usize,
    /// Bytes fetched.
    pub bytes: u64,
    /// Who asked.
    pub cause: Cause,
}

/// Which chunks are in the cache, and which are on their way.
struct Chunks {
    present: Vec<bool>,
    fetching: HashSet<u64>,
}

/// A registry layer served by chunks as they are read (see the module doc).
pub struct LazyBlob {
    /// Base = 0.
    index: usize,
    digest: Digest,
    registry: std::sync::Arc<RegistrySource>,
    leaves: LeafHashes,
    root: Digest,
    /// Bytes of the filesystem (the tree begins here).
    hash_offset: u64,
    dir: PathBuf,
    cache: fs_err::File,
    present_file: fs_err::File,
    chunks: Mutex<Chunks>,
    arrived: Condvar,
    /// Reads waiting for or copying bytes: background completion yields to them.
    pub(super) reading: AtomicUsize,
    failed: AtomicBool,
    fetched: AtomicU64,
    opened: Instant,
    log: Mutex<Vec<Fetch>>,
    _lock: FileLock,
}

impl LazyBlob {
    /// Opens (or resumes) the cache of layer `index` in `dir` and fetches and proves its tree.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        index: usize,
        digest: Digest,
        size: u64,
        hash_offset: u64,
        root: &Digest,
        registry: std::sync::Arc<RegistrySource>,
        dir: PathBuf,
        opened: Instant,
    ) -> Result<LazyBlob, LazyError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LazyError::Cache { path, source }
        };
        if hash_offset == 0 || !hash_offset.is_multiple_of(BLOCK_SIZE) || hash_offset >= size {
            return Err(LazyError::BadHashOffset { layer: digest, hash_offset, size });
        }
        let lock_path = dir.join(".lock");
        let lock = loop {
            fs_err::create_dir_all(&dir).map_err(io(&dir))?;
            let lock = FileLock::exclusive(&lock_path).map_err(io(&lock_path))?;
            // Waited for a completion that then removed the cache: make it anew.
            if lock.is_at(&lock_path) {
                break lock;
            }
        };
        let tree_name = dir.join("tree");
        let mut tree = Vec::new();
        registry
            .open_range(digest.to_string(), hash_offset, Some(size))
            .take(size - hash_offset + 1)
            .read_to_end(&mut tree)
            .map_err(|source| LazyError::Fetch { layer: digest.clone(), source })?;
        let leaves = LeafHashes::check(&tree, hash_offset, root, &tree_name)
            .map_err(|source| LazyError::Tree { layer: digest.clone(), source: Box::new(source) })?;
        // Also a file of its own: what the guest's dm-verity reads (the `hashes` drive).
        fs_err::write(&tree_name, &tree).map_err(io(&tree_name))?;
        let path = dir.join("blob");
        let cache =
            fs_err::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
        let cache = cache.map_err(io(&path))?;
        cache.set_len(size).map_err(io(&path))?;
        // Only a tree of the announced size is the descriptor's; a longer one fails its digest.
        let end = (tree.len() as u64).min(size - hash_offset);
        cache.file().write_all_at(&tree[..end as usize], hash_offset).map_err(io(&path))?;
        let n = hash_offset.div_ceil(CHUNK);
        let present_path = dir.join("present");
        let present_file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&present_path);
        let present_file = present_file.map_err(io(&present_path))?;
        let mut marks = vec![0u8; n as usize];
        let had = present_file.metadata().map_err(io(&present_path))?.len();
        if had == n {
            present_file.file().read_exact_at(&mut marks, 0).map_err(io(&present_path))?;
        } else {
            present_file.set_len(0).map_err(io(&present_path))?;
            present_file.set_len(n).map_err(io(&present_path))?;
        }
        let blob = LazyBlob {
            index,
            digest,
            registry,
            leaves,
            root: root.clone(),
            hash_offset,
            dir,
            cache,
            present_file,
            chunks: Mutex::new(Chunks { present: vec![false; n as usize], fetching: HashSet::new() }),
            arrived: Condvar::new(),
            reading: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            fetched: AtomicU64::new(0),
            opened,
            log: Mutex::new(Vec::new()),
            _lock: lock,
        };
        blob.resume(&marks)?;
        Ok(blob)
    }

    /// Takes the chunks `marks` says are present once their bytes are proved again.
    fn resume(&self, marks: &[u8]) -> Result<(), LazyError> {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut chunks = self.chunks.lock().expect("chunks lock");
        for (c, _) in marks.iter().enumerate().filter(|(_, m)| **m == 1) {
            let c = c as u64;
            let (start, len) = self.chunk_range(c);
            let buf = &mut buf[..len as usize];
            let path = self.dir.join("blob");
            self.cache
                .file()
                .read_exact_at(buf, start)
                .map_err(|source| LazyError::Cache { path, source })?;
            if self.first_bad_block(c, buf).is_none() {
                chunks.present[c as usize] = true;
            } else {
                self.mark(c, 0)?;
            }
        }
        Ok(())
    }

    /// Layer index, base = 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The layer's descriptor digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The proved dm-verity tree (superblock block first), as a file.
    pub fn tree_path(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// The tree's root digest (the manifest's).
    pub fn root_digest(&self) -> &Digest {
        &self.root
    }

    /// The tree's salt, in hex.
    pub fn salt_hex(&self) -> String {
        hex::encode(self.leaves.salt())
    }

    /// The cache file (`blob ‖ tree`), complete once [`LazyBlob::is_complete`].
    pub fn cache_path(&self) -> PathBuf {
        self.dir.join("blob")
    }

    /// Whether a block that failed verification was met: the registry served other bytes.
    pub fn failed_verification(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Bytes fetched from the registry for data chunks (the tree not counted).
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::SeqCst)
    }

    /// The chunks fetched so far, in order.
    pub fn fetch_log(&self) -> Vec<Fetch> {
        self.log.lock().expect("log lock").clone()
    }

    /// Data chunks.
    pub fn chunk_count(&self) -> u64 {
        self.hash_offset.div_ceil(CHUNK)
    }

    /// Whether every data chunk is in the cache.
    pub fn is_complete(&self) -> bool {
        self.chunks.lock().expect("chunks lock").present.iter().all(|p| *p)
    }

    /// The first chunk not in the cache nor on its way, if any.
    pub(super) fn next_missing(&self) -> Option<u64> {
        let chunks = self.chunks.lock().expect("chunks lock");
        (0..chunks.present.len() as u64)
            .find(|c| !chunks.present[*c as usize] && !chunks.fetching.contains(c))
    }

    /// Byte range of data chunk `c`: its start and length.
    fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * CHUNK;
        (start, CHUNK.min(self.hash_offset - start))
    }

    /// The first 4 KiB block of chunk `c` (its bytes `buf`) that its leaf hash refutes.
    fn first_bad_block(&self, c: u64, buf: &[u8]) -> Option<u64> {
        let first = c * CHUNK / BLOCK_SIZE;
        buf.chunks(BLOCK_SIZE as usize)
            .enumerate()
            .map(|(i, block)| (first + i as u64, block))
            .find(|(b, block)| !self.leaves.verifies(*b, block))
            .map(|(b, _)| b)
    }

    /// Writes chunk `c`'s mark into `present`.
    fn mark(&self, c: u64, value: u8) -> Result<(), LazyError> {
        let path = self.dir.join("present");
        self.present_file.file().write_all_at(&[value], c).map_err(|source| LazyError::Cache { path, source })
    }

    /// Makes chunk `c` present: waits for it if it is on its way, else fetches, proves and
    /// writes it.
    pub(super) fn ensure(&self, c: u64, cause: Cause) -> io::Result<()> {
        let mut chunks = self.chunks.lock().expect("chunks lock");
        loop {
            if chunks.present[c as usize] {
                return Ok(());
            }
            if !chunks.fetching.contains(&c) {
                break;
            }
            chunks = self.arrived.wait(chunks).expect("chunks lock");
        }
        chunks.fetching.insert(c);
        drop(chunks);
        let fetched = self.fetch(c, cause);
        let mut chunks = self.chunks.lock().expect("chunks lock");
        chunks.fetching.remove(&c);
        if fetched.is_ok() {
            chunks.present[c as usize] = true;
        }
        self.arrived.notify_all();
        fetched.map_err(|e| {
            let kind = if matches!(e, LazyError::Corrupt { .. }) {
                io::ErrorKind::InvalidData
            } else {
                io::ErrorKind::Other
            };
            io::Error::new(kind, e)
        })
    }

    /// Fetches chunk `c`, proves each block and writes it into the cache and its mark.
    fn fetch(&self, c: u64, cause: Cause) -> Result<(), LazyError> {
        let (start, len) = self.chunk_range(c);
        let mut buf = Vec::with_capacity(len as usize);
        self.registry
            .open_range(self.digest.to_string(), start, Some(start + len))
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|source| LazyError::Fetch { layer: self.digest.clone(), source })?;
        self.fetched.fetch_add(buf.len() as u64, Ordering::SeqCst);
        if buf.len() as u64 != len {
            return Err(LazyError::ShortChunk {
                layer: self.digest.clone(),
                offset: start,
                len,
                got: buf.len() as u64,
            });
        }
        if let Some(block) = self.first_bad_block(c, &buf) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(LazyError::Corrupt { layer: self.digest.clone(), index: self.index, block });
        }
        let path = self.dir.join("blob");
        self.cache.file().write_all_at(&buf, start).map_err(|source| LazyError::Cache { path, source })?;
        self.mark(c, 1)?;
        let at = self.opened.elapsed().as_secs_f64();
        self.log.lock().expect("log lock").push(Fetch { at, layer: self.index, bytes: len, cause });
        Ok(())
    }

    /// Writes the cache out to disk (before it is published).
    pub(super) fn sync(&self) -> Result<(), LazyError> {
        let path = self.dir.join("blob");
        self.cache.file().sync_all().map_err(|source| LazyError::Cache { path, source })
    }

    /// Removes the cache (once published).
    pub(super) fn remove_cache(&self) -> Result<(), LazyError> {
        fs_err::remove_dir_all(&self.dir)
            .map_err(|source| LazyError::Cache { path: self.dir.clone(), source })
    }
}

/// RAII count of a reader in [`LazyBlob::reading`].
struct Reading<'a>(&'a AtomicUsize);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockSource for LazyBlob {
    /// The filesystem's bytes (`hash_offset`): the tree is not part of the drive.
    fn len(&self) -> u64 {
        self.hash_offset
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= self.hash_offset);
        let Some(end) = end else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read beyond the end of the source"));
        };
        self.reading.fetch_add(1, Ordering::SeqCst);
        let _reading = Reading(&self.reading);
        if buf.is_empty() {
            return Ok(());
        }
        for c in offset / CHUNK..=(end - 1) / CHUNK {
            self.ensure(c, Cause::Read)?;
        }
        self.cache.file().read_exact_at(buf, offset)
    }
}

//! dm-verity hash trees for layer blobs (`build --verity`), computed here rather than by
//! `veritysetup format` (same bytes; see [`build_tree`] for why).
//!
//! The tree of a blob of `hash_offset` bytes (a multiple of 4096) is what the EROFS image
//! layer format (§3.5) appends to it: a 4096-byte block holding the dm-verity superblock
//! (veritysetup's format, version 1), then the hash levels, top level first, as
//! `veritysetup format --hash-offset=<hash_offset> blob blob` writes them. Data and hash
//! blocks are 4096 bytes, the hash is sha256 of `salt ‖ block` (hash type 1). A tree is a
//! function of its blob and its salt (the superblock UUID is derived from the salt): a tree
//! made here is salted with the layer's chain ID ([`salt_for`]), so the same blob always gets
//! the same tree and root digest; a pulled tree keeps the salt its superblock holds
//! ([`tree_salt`]). Whoever checks or uses a stored tree takes the salt from its record
//! ([`VerityInfo::salt_bytes`]), never from the key it is stored under. The kernel's table
//! then reads `hash_start_block = hash_offset / 4096 + 1`.
//!
//! The store keeps the tree beside the blob (see [`crate::store`]): `blob ‖ tree` is the
//! pushed layer, and `run` hands the trees to the guest on one extra drive.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// dm-verity data and hash block size.
pub const BLOCK_SIZE: u64 = 4096;
/// `log2(BLOCK_SIZE / 32)`: sha256 hashes per hash block, as a shift.
const HASHES_PER_BLOCK_BITS: u32 = 7;
/// Bytes of the superblock's salt field: the longest salt a tree can have.
const MAX_SALT: usize = 256;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerityError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {size} bytes is not a whole number of {BLOCK_SIZE}-byte dm-verity blocks")]
    NotAligned { path: PathBuf, size: u64 },
    #[error("{path} is empty: dm-verity needs at least one data block")]
    Empty { path: PathBuf },
    #[error(transparent)]
    Digest(#[from] crate::digest::InvalidDigest),
    #[error("{path} does not begin with a dm-verity superblock of the kind vmrootfs reads ({what})")]
    BadSuperblock { path: PathBuf, what: &'static str },
    #[error("salt {salt:?} is not 1 to {MAX_SALT} bytes of hex")]
    BadSalt { salt: String },
    #[error(
        "{path}: hash block {block} of the dm-verity tree does not hash to its entry above it (root digest {root})"
    )]
    TreeMismatch { path: PathBuf, block: u64, root: String },
    #[error(
        "{path}: the dm-verity tree is {found} bytes, fewer than the {needed} its blob's {data_blocks} blocks need"
    )]
    TreeTooShort { path: PathBuf, found: u64, needed: u64, data_blocks: u64 },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> VerityError + '_ {
    move |source| VerityError::Io { path: path.to_owned(), source }
}

/// What a lower's record says about its tree (`lowers[].verity` in image records and
/// `--json`); what `push` writes as the `org.erofs.dmverity.*` annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityInfo {
    /// Where the tree begins in `blob ‖ tree`, in bytes: the blob's size, a multiple of
    /// `block_size` (`org.erofs.dmverity.hash_offset`). The tree covers `[0, hash_offset)`.
    pub hash_offset: u64,
    /// Root digest, `sha256:<64 hex>` (`org.erofs.dmverity.root_digest`); the hex part is what
    /// `veritysetup` and the kernel table take.
    pub root_digest: Digest,
    /// The salt, in hex (for a tree made here, the chain ID's 32 bytes); also in the tree's
    /// superblock. What the tree is checked with, and what the guest's table gets.
    pub salt: String,
    /// Data and hash block size in bytes: 4096 (`org.erofs.dmverity.block_size`).
    pub block_size: u64,
    /// Hash algorithm: `sha256`.
    pub algorithm: String,
    /// Bytes of the tree: the superblock block plus the hash blocks.
    pub tree_size: u64,
    /// sha256 hex of the tree's bytes.
    pub tree_sha256: String,
    /// sha256 hex of `blob ‖ tree`: the digest of the layer `push` uploads.
    pub sha256: String,
}

impl VerityInfo {
    /// The root digest's 64 hex digits.
    pub fn root_hex(&self) -> &str {
        self.root_digest.digest()
    }

    /// Data blocks the tree covers.
    pub fn data_blocks(&self) -> u64 {
        self.hash_offset / BLOCK_SIZE
    }

    /// The salt's bytes.
    pub fn salt_bytes(&self) -> Result<Vec<u8>, VerityError> {
        let bad = || VerityError::BadSalt { salt: self.salt.clone() };
        let salt = hex::decode(&self.salt).map_err(|_| bad())?;
        if salt.is_empty() || salt.len() > MAX_SALT {
            return Err(bad());
        }
        Ok(salt)
    }
}

/// The tree of one blob, with the blob's own sha256 (hashed in the same read).
#[derive(Debug, Clone)]
pub struct BuiltTree {
    pub info: VerityInfo,
    /// sha256 hex of the blob (`[0, hash_offset)`).
    pub blob_sha256: String,
}

/// The salt of the trees made here for a layer: its chain ID's 32 bytes.
pub fn salt_for(chain_id: &Digest) -> Result<[u8; 32], crate::digest::InvalidDigest> {
    let hex = crate::digest::require_sha256("chain_id", chain_id)?;
    let mut salt = [0u8; 32];
    hex::decode_to_slice(hex.digest(), &mut salt).expect("a sha256 digest is 64 hex digits");
    Ok(salt)
}

/// Superblock UUID of the trees salted with `salt`: bytes 16..32 of
/// sha256("vmrootfs verity sha256:" ‖ salt hex). For a chain ID's salt that is
/// sha256("vmrootfs verity " ‖ chain ID), the UUID trees have always had.
fn uuid_for(salt: &[u8]) -> [u8; 16] {
    let h = Sha256::new().chain_update(b"vmrootfs verity sha256:").chain_update(hex::encode(salt)).finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&h[16..32]);
    u[6] = (u[6] & 0x0f) | 0x40; // version 4
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
    u
}

/// Hash blocks per level for `data_blocks` data blocks, level 0 (hashes of data blocks)
/// first; the kernel's `verity_ctr` arithmetic. Empty for a single data block: its hash is
/// the root.
fn level_blocks(data_blocks: u64) -> Vec<u64> {
    let mut levels = 0u32;
    while HASHES_PER_BLOCK_BITS * levels < 64 && (data_blocks - 1) >> (HASHES_PER_BLOCK_BITS * levels) != 0 {
        levels += 1;
    }
    (0..levels)
        .map(|i| {
            let shift = (i + 1) * HASHES_PER_BLOCK_BITS;
            (data_blocks + (1u64 << shift) - 1) >> shift
        })
        .collect()
}

/// veritysetup's on-disk superblock (512 bytes, little-endian), at the start of the tree.
fn superblock(uuid: &[u8; 16], salt: &[u8], data_blocks: u64) -> Vec<u8> {
    let mut sb = Vec::with_capacity(512);
    sb.extend_from_slice(b"verity\0\0");
    sb.extend_from_slice(&1u32.to_le_bytes()); // version
    sb.extend_from_slice(&1u32.to_le_bytes()); // hash type: salt first
    sb.extend_from_slice(uuid);
    let mut alg = [0u8; 32];
    alg[..6].copy_from_slice(b"sha256");
    sb.extend_from_slice(&alg);
    sb.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb.extend_from_slice(&data_blocks.to_le_bytes());
    sb.extend_from_slice(&(salt.len() as u16).to_le_bytes());
    sb.extend_from_slice(&[0u8; 6]);
    let mut s = [0u8; 256];
    s[..salt.len()].copy_from_slice(salt);
    sb.extend_from_slice(&s);
    sb.resize(512, 0);
    sb
}

/// The salt in the superblock of the stored tree `tree` of a blob of `hash_offset` bytes.
/// The superblock must be one vmrootfs writes (version 1, hash type 1, sha256, 4096-byte
/// blocks, the blob's data blocks); [`check`] then compares the rest of it.
pub fn tree_salt(tree: &Path, hash_offset: u64) -> Result<Vec<u8>, VerityError> {
    let mut sb = [0u8; 512];
    let file = fs_err::File::open(tree).map_err(io_at(tree))?;
    file.file().read_exact_at(&mut sb, 0).map_err(io_at(tree))?;
    salt_in(&sb, hash_offset, tree)
}

/// The salt in the superblock `sb` of a tree (named `tree` in errors); see [`tree_salt`].
fn salt_in(sb: &[u8; 512], hash_offset: u64, tree: &Path) -> Result<Vec<u8>, VerityError> {
    let bad = |what| VerityError::BadSuperblock { path: tree.to_owned(), what };
    let le32 = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().expect("4 bytes"));
    if &sb[..8] != b"verity\0\0" {
        return Err(bad("no `verity` magic"));
    }
    if le32(8) != 1 || le32(12) != 1 {
        return Err(bad("not version 1 with hash type 1"));
    }
    if sb[32..38] != *b"sha256" || sb[38..64].iter().any(|&b| b != 0) {
        return Err(bad("not sha256"));
    }
    if le32(64) != BLOCK_SIZE as u32 || le32(68) != BLOCK_SIZE as u32 {
        return Err(bad("blocks other than 4096 bytes"));
    }
    if u64::from_le_bytes(sb[72..80].try_into().expect("8 bytes")) != hash_offset / BLOCK_SIZE {
        return Err(bad("its data block count is not the blob's"));
    }
    let salt_size = usize::from(u16::from_le_bytes([sb[80], sb[81]]));
    if salt_size == 0 || salt_size > MAX_SALT {
        return Err(bad("a salt of no bytes or more than 256"));
    }
    Ok(sb[88..88 + salt_size].to_vec())
}

/// The checked leaves of a tree held in memory: the hash of every data block, each proved by
/// the hash blocks above it up to the root digest. What a lazy blob checks each arriving
/// 4 KiB block against ([`LeafHashes::verifies`]).
#[derive(Debug, Clone)]
pub struct LeafHashes {
    salt: Vec<u8>,
    salted: Sha256,
    /// Level 0 (or the root alone, for a blob of one block): 32 bytes per data block.
    leaves: Vec<u8>,
    data_blocks: u64,
}

impl LeafHashes {
    /// Checks `tree` (superblock block, then the hash levels top first, as [`build_tree`]
    /// writes them; named `name` in errors) of a blob of `hash_offset` bytes against `root`,
    /// with the salt its superblock holds.
    pub fn check(
        tree: &[u8],
        hash_offset: u64,
        root: &Digest,
        name: &Path,
    ) -> Result<LeafHashes, VerityError> {
        let root_hex = crate::digest::require_sha256("dm-verity root digest", root)?;
        let mut want_root = [0u8; 32];
        hex::decode_to_slice(root_hex.digest(), &mut want_root).expect("a sha256 digest is 64 hex digits");
        if hash_offset == 0 || !hash_offset.is_multiple_of(BLOCK_SIZE) {
            return Err(VerityError::NotAligned { path: name.to_owned(), size: hash_offset });
        }
        let data_blocks = hash_offset / BLOCK_SIZE;
        let blocks = level_blocks(data_blocks);
        let needed = (1 + blocks.iter().sum::<u64>()) * BLOCK_SIZE;
        if (tree.len() as u64) < needed {
            return Err(VerityError::TreeTooShort {
                path: name.to_owned(),
                found: tree.len() as u64,
                needed,
                data_blocks,
            });
        }
        let sb: &[u8; 512] = tree[..512].try_into().expect("the tree has its superblock block");
        let salt = salt_in(sb, hash_offset, name)?;
        let salted = Sha256::new().chain_update(&salt);
        let hash = |block: &[u8]| -> [u8; 32] { salted.clone().chain_update(block).finalize().into() };
        let bs = BLOCK_SIZE as usize;
        // Levels lie top first after the superblock block; each block's hash is an entry of
        // the level above it, the top block's the root.
        let mut above: Vec<u8> = want_root.to_vec();
        let mut at = 1usize;
        for &n in blocks.iter().rev() {
            let level = &tree[at * bs..(at + n as usize) * bs];
            for (j, block) in level.chunks(bs).enumerate() {
                if above[j * 32..j * 32 + 32] != hash(block) {
                    return Err(VerityError::TreeMismatch {
                        path: name.to_owned(),
                        block: (at + j) as u64,
                        root: root.to_string(),
                    });
                }
            }
            above = level.to_vec();
            at += n as usize;
        }
        Ok(LeafHashes { salt, salted, leaves: above, data_blocks })
    }

    /// The salt the tree's superblock holds (what the guest's dm-verity table takes).
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// Whether `block` (4096 bytes) is data block `index` of the blob.
    pub fn verifies(&self, index: u64, block: &[u8]) -> bool {
        let at = index as usize * 32;
        index < self.data_blocks
            && block.len() == BLOCK_SIZE as usize
            && self.leaves[at..at + 32] == self.salted.clone().chain_update(block).finalize()[..]
    }
}

/// Where computed tree blocks go: written to the tree file, or compared with a stored one.
trait TreeSink {
    fn put(&mut self, offset: u64, block: &[u8]) -> io::Result<()>;
}

struct WriteTo<'a>(&'a std::fs::File);

impl TreeSink for WriteTo<'_> {
    fn put(&mut self, offset: u64, block: &[u8]) -> io::Result<()> {
        self.0.write_all_at(block, offset)
    }
}

/// Compares with a stored tree; counts the blocks that differ (or cannot be read).
struct CompareWith<'a> {
    file: &'a std::fs::File,
    differing: u64,
    buf: Vec<u8>,
}

/// Where the superblock's UUID lies in the tree's first block.
const SUPERBLOCK_UUID: std::ops::Range<usize> = 16..32;

impl TreeSink for CompareWith<'_> {
    /// Compares `block` with the stored one. The superblock's UUID is the producer's (nothing
    /// reads it: dm-verity takes its parameters from the table): another producer's tree
    /// (`veritysetup` draws a random one) is the blob's tree when all else is equal.
    fn put(&mut self, offset: u64, block: &[u8]) -> io::Result<()> {
        self.buf.resize(block.len(), 0);
        let read = self.file.read_exact_at(&mut self.buf, offset);
        if offset == 0 && read.is_ok() {
            self.buf[SUPERBLOCK_UUID].copy_from_slice(&block[SUPERBLOCK_UUID]);
        }
        match read {
            Ok(()) if self.buf == block => {}
            Ok(()) => self.differing += 1,
            // A stored tree shorter than it should be differs; other errors are errors.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.differing += 1,
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// The streaming tree computation: one partial hash block per level, each full block put at
/// its place and its hash passed up.
struct Levels<'a, S> {
    salted: Sha256,
    /// Block index in the tree of each level's first block.
    start: Vec<u64>,
    written: Vec<u64>,
    pending: Vec<Vec<u8>>,
    root: Option<[u8; 32]>,
    sink: &'a mut S,
}

impl<S: TreeSink> Levels<'_, S> {
    fn hash(&self, block: &[u8]) -> [u8; 32] {
        self.salted.clone().chain_update(block).finalize().into()
    }

    fn push(&mut self, level: usize, hash: [u8; 32]) -> io::Result<()> {
        if level == self.start.len() {
            self.root = Some(hash);
            return Ok(());
        }
        self.pending[level].extend_from_slice(&hash);
        if self.pending[level].len() == BLOCK_SIZE as usize {
            self.flush(level)?;
        }
        Ok(())
    }

    fn flush(&mut self, level: usize) -> io::Result<()> {
        let mut block = std::mem::take(&mut self.pending[level]);
        block.resize(BLOCK_SIZE as usize, 0);
        let at = (self.start[level] + self.written[level]) * BLOCK_SIZE;
        self.sink.put(at, &block)?;
        self.written[level] += 1;
        let h = self.hash(&block);
        self.push(level + 1, h)
    }

    /// Flushes the partial blocks, lowest level first; returns the root digest.
    fn finish(mut self) -> io::Result<[u8; 32]> {
        for level in 0..self.start.len() {
            if !self.pending[level].is_empty() {
                self.flush(level)?;
            }
        }
        Ok(self.root.expect("the top level has one block, whose hash is the root"))
    }
}

/// Computes the tree of `blob` salted with `salt` into `sink`, hashing the blob on the way.
/// Also returns the sha256 state after the blob's bytes, to go on with the tree's.
fn compute<S: TreeSink>(blob: &Path, salt: &[u8], sink: &mut S) -> Result<(BuiltTree, Sha256), VerityError> {
    let file = fs_err::File::open(blob).map_err(io_at(blob))?;
    let size = file.metadata().map_err(io_at(blob))?.len();
    if size == 0 {
        return Err(VerityError::Empty { path: blob.to_owned() });
    }
    if size % BLOCK_SIZE != 0 {
        return Err(VerityError::NotAligned { path: blob.to_owned(), size });
    }
    let data_blocks = size / BLOCK_SIZE;
    let blocks = level_blocks(data_blocks);
    let mut start = vec![0u64; blocks.len()];
    let mut next = 1; // block 0 holds the superblock
    for level in (0..blocks.len()).rev() {
        start[level] = next;
        next += blocks[level];
    }
    let sb = superblock(&uuid_for(salt), salt, data_blocks);
    let mut sb_block = sb;
    sb_block.resize(BLOCK_SIZE as usize, 0);
    let io = |source| VerityError::Io { path: blob.to_owned(), source };
    sink.put(0, &sb_block).map_err(io)?;
    let mut levels = Levels {
        salted: Sha256::new_with_prefix(salt),
        written: vec![0; blocks.len()],
        pending: vec![Vec::with_capacity(BLOCK_SIZE as usize); blocks.len()],
        start,
        root: None,
        sink,
    };
    // The blob's own sha256 on a second thread, fed the chunks the tree is made of: the two
    // hashes take the time of one when a core is free.
    let mut file = file;
    let (whole, read) = crate::digest::hash_in_chunks(&mut file, |chunk| {
        for block in chunk.chunks(BLOCK_SIZE as usize) {
            let h = levels.hash(block);
            levels.push(0, h)?;
        }
        Ok(())
    })
    .map_err(io)?;
    if read != size {
        return Err(io(io::ErrorKind::UnexpectedEof.into()));
    }
    let root = levels.finish().map_err(io)?;
    let built = BuiltTree {
        info: VerityInfo {
            hash_offset: size,
            root_digest: format!("sha256:{}", hex::encode(root)).parse().expect("sha256:<hex> is a digest"),
            salt: hex::encode(salt),
            block_size: BLOCK_SIZE,
            algorithm: "sha256".into(),
            tree_size: next * BLOCK_SIZE,
            tree_sha256: String::new(),
            sha256: String::new(),
        },
        blob_sha256: hex::encode(whole.clone().finalize()),
    };
    Ok((built, whole))
}

/// Fills in the digests of the tree and of `blob ‖ tree` (`whole`: the state after the
/// blob's bytes), reading the tree back.
fn digests(info: &mut VerityInfo, mut whole: Sha256, tree: &Path) -> Result<(), VerityError> {
    let bytes = fs_err::read(tree).map_err(io_at(tree))?;
    info.tree_sha256 = hex::encode(Sha256::digest(&bytes));
    whole.update(&bytes);
    info.sha256 = hex::encode(whole.finalize());
    Ok(())
}

/// Writes the tree of `blob` (a filesystem image of whole 4096-byte blocks) salted with `salt`
/// (for a layer converted here, [`salt_for`] its chain ID) to the new file `tree`. One read of the blob, single-threaded sha256: on this machine
/// (sha-ni) it takes less time than `veritysetup format` and needs no tool; `veritysetup
/// verify` accepts what it writes (tests/store.rs).
pub fn build_tree(blob: &Path, salt: &[u8], tree: &Path) -> Result<BuiltTree, VerityError> {
    let out = fs_err::File::create_new(tree).map_err(io_at(tree))?;
    let (mut built, whole) = compute(blob, salt, &mut WriteTo(out.file()))?;
    // Not synced here: publishing the tree does that.
    out.set_len(built.info.tree_size).map_err(io_at(tree))?;
    digests(&mut built.info, whole, tree)?;
    Ok(built)
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The root digest recomputed from the blob.
    pub root_digest: Digest,
    /// Blocks of the stored tree that differ from the recomputed one.
    pub differing_tree_blocks: u64,
    /// sha256 hex of the blob.
    pub blob_sha256: String,
}

/// Recomputes the tree of `blob` salted with `salt` (the salt its record gives) and compares
/// it, block by block, with the stored `tree`.
pub fn check(blob: &Path, salt: &[u8], tree: &Path) -> Result<Checked, VerityError> {
    let file = fs_err::File::open(tree).map_err(io_at(tree))?;
    let mut sink = CompareWith { file: file.file(), differing: 0, buf: Vec::new() };
    let (built, _) = compute(blob, salt, &mut sink)?;
    let stored = file.metadata().map_err(io_at(tree))?.len();
    let extra = u64::from(stored != built.info.tree_size);
    Ok(Checked {
        root_digest: built.info.root_digest,
        differing_tree_blocks: sink.differing + extra,
        blob_sha256: built.blob_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of the tree of a blob of `hash_offset` bytes (superblock block included), from
    /// the level sizes alone: what the builder's own count must agree with.
    fn tree_size(hash_offset: u64) -> u64 {
        (1 + level_blocks(hash_offset / BLOCK_SIZE).iter().sum::<u64>()) * BLOCK_SIZE
    }

    #[test]
    fn level_sizes_follow_the_kernel() {
        assert_eq!(level_blocks(1), Vec::<u64>::new());
        assert_eq!(level_blocks(2), vec![1]);
        assert_eq!(level_blocks(128), vec![1]);
        assert_eq!(level_blocks(129), vec![2, 1]);
        assert_eq!(level_blocks(128 * 128), vec![128, 1]);
        assert_eq!(level_blocks(128 * 128 + 1), vec![129, 2, 1]);
        assert_eq!(tree_size(4096), 4096);
        assert_eq!(tree_size(2 * 4096), 2 * 4096);
    }

    #[test]
    fn superblock_layout() {
        let sb = superblock(&[7; 16], &[0xab; 32], 5);
        assert_eq!(sb.len(), 512);
        assert_eq!(&sb[..8], b"verity\0\0");
        assert_eq!(&sb[64..72], &[0, 0x10, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(&sb[72..80], &5u64.to_le_bytes());
        assert_eq!(&sb[80..82], &32u16.to_le_bytes());
        assert_eq!(&sb[88..120], &[0xab; 32]);
    }

    #[test]
    fn a_chain_salt_gives_the_uuid_trees_always_had() {
        let chain: Digest = format!("sha256:{}", "3c".repeat(32)).parse().unwrap();
        let h = Sha256::new().chain_update(b"vmrootfs verity ").chain_update(chain.to_string()).finalize();
        let mut old = [0u8; 16];
        old.copy_from_slice(&h[16..32]);
        old[6] = (old[6] & 0x0f) | 0x40;
        old[8] = (old[8] & 0x3f) | 0x80;
        assert_eq!(uuid_for(&salt_for(&chain).unwrap()), old);
    }

    #[test]
    fn a_tree_is_checked_with_the_salt_its_superblock_holds() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, vec![9u8; 3 * 4096]).unwrap();
        let tree = dir.path().join("tree");
        let salt = [0x5a; 32];
        let built = build_tree(&blob, &salt, &tree).unwrap();
        assert_eq!(tree_salt(&tree, 3 * 4096).unwrap(), salt);
        let ok = check(&blob, &salt, &tree).unwrap();
        assert_eq!((ok.root_digest, ok.differing_tree_blocks), (built.info.root_digest.clone(), 0));
        let other = check(&blob, &[0x5b; 32], &tree).unwrap();
        assert_ne!(other.root_digest, built.info.root_digest, "another salt, another tree");
        assert!(tree_salt(&tree, 4 * 4096).is_err(), "a superblock for other data blocks");
    }

    #[test]
    fn check_finds_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        let data: Vec<u8> = (0..300 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&blob, &data).unwrap();
        let chain: Digest = format!("sha256:{}", "cd".repeat(32)).parse().unwrap();
        let tree = dir.path().join("tree");
        let built = build_tree(&blob, &salt_for(&chain).unwrap(), &tree).unwrap();
        assert_eq!(built.info.tree_size, tree_size(data.len() as u64));
        assert_eq!(std::fs::metadata(&tree).unwrap().len(), built.info.tree_size);
        let ok = check(&blob, &salt_for(&chain).unwrap(), &tree).unwrap();
        assert_eq!((ok.root_digest.clone(), ok.differing_tree_blocks), (built.info.root_digest.clone(), 0));
        let mut bad = data.clone();
        bad[200 * 4096 + 17] ^= 1;
        std::fs::write(&blob, &bad).unwrap();
        let found = check(&blob, &salt_for(&chain).unwrap(), &tree).unwrap();
        assert_ne!(found.root_digest, built.info.root_digest);
        // Level 0's block of data block 200 and the top level's block.
        assert_eq!(found.differing_tree_blocks, 2);
    }

    #[test]
    fn leaf_hashes_prove_each_block_and_refuse_a_changed_tree() {
        let dir = tempfile::tempdir().unwrap();
        for blocks in [1u32, 2, 129, 300] {
            let blob = dir.path().join(format!("blob{blocks}"));
            let data: Vec<u8> = (0..blocks * 4096).map(|i| (i * 13 % 251) as u8).collect();
            std::fs::write(&blob, &data).unwrap();
            let tree = dir.path().join(format!("tree{blocks}"));
            let built = build_tree(&blob, &[0x11; 32], &tree).unwrap();
            let bytes = std::fs::read(&tree).unwrap();
            let root = &built.info.root_digest;
            let leaves = LeafHashes::check(&bytes, data.len() as u64, root, &tree).unwrap();
            for (i, block) in data.chunks(4096).enumerate() {
                assert!(leaves.verifies(i as u64, block), "block {i} of {blocks}");
                let mut bad = block.to_vec();
                bad[9] ^= 1;
                assert!(!leaves.verifies(i as u64, &bad), "flipped block {i} of {blocks}");
            }
            assert!(!leaves.verifies(u64::from(blocks), &data[..4096]), "beyond the blob");
            if blocks > 1 {
                let mut changed = bytes.clone();
                let last = changed.len() - 1;
                changed[last] ^= 1;
                let e = LeafHashes::check(&changed, data.len() as u64, root, &tree).unwrap_err();
                assert!(matches!(e, VerityError::TreeMismatch { .. }), "{e}");
                let e = LeafHashes::check(&bytes[..4096], data.len() as u64, root, &tree).unwrap_err();
                assert!(matches!(e, VerityError::TreeTooShort { .. }), "{e}");
            }
        }
    }

    #[test]
    fn check_finds_a_changed_tree_block() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, vec![5u8; 200 * 4096]).unwrap();
        let chain: Digest = format!("sha256:{}", "ef".repeat(32)).parse().unwrap();
        let tree = dir.path().join("tree");
        let built = build_tree(&blob, &salt_for(&chain).unwrap(), &tree).unwrap();
        let mut bytes = std::fs::read(&tree).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&tree, &bytes).unwrap();
        let found = check(&blob, &salt_for(&chain).unwrap(), &tree).unwrap();
        assert_eq!((found.root_digest, found.differing_tree_blocks), (built.info.root_digest, 1));
        std::fs::write(&tree, &bytes[..4096]).unwrap();
        assert!(
            check(&blob, &salt_for(&chain).unwrap(), &tree).unwrap().differing_tree_blocks > 0,
            "a cut tree differs"
        );
    }
}

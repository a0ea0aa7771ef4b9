//! Hashed directories (ext4's htree): a directory of more than one block gets an index, so
//! the kernel finds a name from its hash in the root (and at most one index node) and one
//! leaf block, instead of reading the whole directory.
//!
//! Layout: logical block 0 is the root (`.`, `..`, then index entries), then the index nodes
//! (only when the leaves are more than the root can list), then the leaves: ordinary
//! directory blocks holding the entries sorted by hash. An index entry names the hash of its
//! block's first entry; bit 0 set says that hash continues from the block before.

use super::disk::{self, BLOCK, Dirent};

/// Index entries in the root and in an index node: the space after their headers, less the
/// checksum tail (8 bytes each entry, 8 the tail).
const ROOT_LIMIT: usize = (BLOCK - 32 - 8) / 8;
const NODE_LIMIT: usize = (BLOCK - 8 - 8) / 8;
/// The hash the superblock names (`s_def_hash_version`), signed characters (`s_flags`).
pub const HALF_MD4: u8 = 1;

/// Most leaf blocks a two-level index addresses.
pub const MAX_LEAVES: usize = ROOT_LIMIT * NODE_LIMIT;

/// Whether directory entries of `dirent_bytes` in all ([`disk::dirent_len`] of each name)
/// certainly need more than `max_leaves` leaf blocks: each leaf holds at most
/// [`disk::DIR_SPACE`] bytes of them. (Packing wastes up to one entry per leaf, so a
/// directory just below the bound may still not fit: [`blocks`] says so then.)
pub fn too_many_for(dirent_bytes: usize, max_leaves: usize) -> bool {
    dirent_bytes > max_leaves.saturating_mul(disk::DIR_SPACE)
}

/// A directory with more entries than two levels of index hold (about 25 million).
#[derive(Debug, thiserror::Error)]
#[error("directory of {0} entries is more than a two-level ext4 index holds")]
pub struct TooManyEntries(pub usize);

/// The blocks of the indexed directory `ino` (parent `parent`) holding `entries`; names are
/// hashed with the superblock's `hash_seed`.
pub fn blocks(
    ino: u32,
    parent: u32,
    entries: &[Dirent<'_>],
    csum_seed: u32,
    hash_seed: &[u8; 16],
) -> Result<Vec<u8>, TooManyEntries> {
    let hash_seed: [u32; 4] =
        std::array::from_fn(|i| u32::from_le_bytes(hash_seed[i * 4..][..4].try_into().unwrap()));
    let hash_seed = &hash_seed;
    let mut sorted: Vec<(u32, &Dirent<'_>)> =
        entries.iter().map(|e| (name_hash(e.name, hash_seed), e)).collect();
    sorted.sort_by_key(|(hash, _)| *hash);
    let (leaves, firsts) = disk::pack_dirents(ino, sorted.iter().map(|(_, e)| *e), csum_seed);
    let n = firsts.len();
    let node_count = if n <= ROOT_LIMIT { 0 } else { n.div_ceil(NODE_LIMIT) };
    if node_count > ROOT_LIMIT {
        return Err(TooManyEntries(entries.len()));
    }
    let first_leaf = 1 + node_count as u32;
    let index: Vec<(u32, u32)> = firsts
        .iter()
        .enumerate()
        .map(|(i, &first)| {
            let hash = sorted[first].0;
            let continued = first > 0 && sorted[first - 1].0 == hash;
            (hash | continued as u32, first_leaf + i as u32)
        })
        .collect();
    let mut out = vec![0u8; BLOCK];
    if node_count == 0 {
        root(&mut out, ino, parent, 0, &index, csum_seed);
    } else {
        let mut up = Vec::with_capacity(node_count);
        for (i, chunk) in index.chunks(NODE_LIMIT).enumerate() {
            let mut node = vec![0u8; BLOCK];
            disk::put16(&mut node, 4, BLOCK as u16); // an empty entry over the whole block
            index_entries(&mut node, 8, NODE_LIMIT, chunk, ino, csum_seed);
            out.extend_from_slice(&node);
            up.push((chunk[0].0, 1 + i as u32));
        }
        root(&mut out[..BLOCK], ino, parent, 1, &up, csum_seed);
    }
    out.extend_from_slice(&leaves);
    Ok(out)
}

/// The root block: `.` and `..` (which spans the rest of the block), the index header, the
/// entries.
fn root(b: &mut [u8], ino: u32, parent: u32, levels: u8, index: &[(u32, u32)], seed: u32) {
    disk::put32(b, 0, ino);
    disk::put16(b, 4, 12);
    b[6] = 1;
    b[7] = 2; // directory
    b[8] = b'.';
    disk::put32(b, 12, parent);
    disk::put16(b, 16, (BLOCK - 12) as u16);
    b[18] = 2;
    b[19] = 2;
    b[20..22].copy_from_slice(b"..");
    b[28] = HALF_MD4;
    b[29] = 8; // info length
    b[30] = levels;
    index_entries(b, 32, ROOT_LIMIT, index, ino, seed);
}

/// Index entries at `at`: the count and limit over the first entry's hash (which is never
/// read: the first block holds everything below the second's hash), then the checksum tail
/// after `limit` entries.
fn index_entries(b: &mut [u8], at: usize, limit: usize, index: &[(u32, u32)], ino: u32, seed: u32) {
    disk::put16(b, at, limit as u16);
    disk::put16(b, at + 2, index.len() as u16);
    for (i, &(hash, block)) in index.iter().enumerate() {
        if i > 0 {
            disk::put32(b, at + i * 8, hash);
        }
        disk::put32(b, at + i * 8 + 4, block);
    }
    let tail = at + limit * 8;
    let mut csum = disk::crc(disk::crc(seed, &ino.to_le_bytes()), &[0; 4]);
    csum = disk::crc(csum, &b[..at + index.len() * 8]);
    csum = disk::crc(csum, &[0; 8]);
    disk::put32(b, tail + 4, csum);
}

/// ext4's half-MD4 name hash (`ext4fs_dirhash`, signed characters), bit 0 cleared.
pub fn name_hash(name: &[u8], seed: &[u32; 4]) -> u32 {
    let mut buf = if seed.iter().any(|&w| w != 0) {
        *seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let mut rest = name;
    loop {
        half_md4_transform(&mut buf, &str_to_hash_words(rest));
        if rest.len() <= 32 {
            break;
        }
        rest = &rest[32..];
    }
    let hash = buf[1] & !1;
    if hash == 0x7fff_ffff << 1 { (0x7fff_ffff - 1) << 1 } else { hash }
}

/// Eight words from up to 32 bytes of the name, padded with a pattern of its remaining length.
fn str_to_hash_words(msg: &[u8]) -> [u32; 8] {
    let pad = {
        let p = (msg.len() as u32) | ((msg.len() as u32) << 8);
        p | (p << 16)
    };
    let mut words = [pad; 8];
    let mut val = pad;
    let mut n = 0;
    for (i, &c) in msg.iter().take(32).enumerate() {
        val = (c as i8 as i32 as u32).wrapping_add(val << 8);
        if i % 4 == 3 {
            words[n] = val;
            n += 1;
            val = pad;
        }
    }
    if n < 8 {
        words[n] = val;
    }
    words
}

fn half_md4_transform(buf: &mut [u32; 4], x: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a.wrapping_add($f($b, $c, $d)).wrapping_add($x).rotate_left($s)
        };
    }
    round!(f, a, b, c, d, x[0], 3);
    round!(f, d, a, b, c, x[1], 7);
    round!(f, c, d, a, b, x[2], 11);
    round!(f, b, c, d, a, x[3], 19);
    round!(f, a, b, c, d, x[4], 3);
    round!(f, d, a, b, c, x[5], 7);
    round!(f, c, d, a, b, x[6], 11);
    round!(f, b, c, d, a, x[7], 19);
    round!(g, a, b, c, d, x[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, x[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[6].wrapping_add(K2), 13);
    round!(h, a, b, c, d, x[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, x[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[4].wrapping_add(K3), 15);
    for (w, v) in buf.iter_mut().zip([a, b, c, d]) {
        *w = w.wrapping_add(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_early_size_check_never_refuses_what_fits() {
        // With a small bound: entries that certainly need more than 2 leaves, and ones that fit.
        for name_len in [1usize, 13, 100, 255] {
            let name = vec![b'n'; name_len];
            let per = disk::dirent_len(name_len);
            for count in [1usize, 10, 2 * disk::DIR_SPACE / per, 2 * disk::DIR_SPACE / per + 1, 100] {
                let entries: Vec<Dirent<'_>> = (0..count)
                    .map(|i| Dirent { name: &name, ino: 11 + i as u32, kind: disk::FileType::Regular })
                    .collect();
                let (_, firsts) = disk::pack_dirents(2, entries.iter(), 0);
                let refused = too_many_for(count * per, 2);
                assert_eq!(refused, count * per > 2 * disk::DIR_SPACE, "{name_len} × {count}");
                if refused {
                    assert!(firsts.len() > 2, "{name_len} × {count}: refused, so more than 2 leaves");
                }
            }
        }
        // The bound fits the u32 running sum the writer keeps per directory.
        const { assert!(MAX_LEAVES * disk::DIR_SPACE < u32::MAX as usize) };
    }

    /// Values from e2fsprogs: `debugfs -R "dx_hash -h half_md4 [-s SEED] NAME"`.
    #[test]
    fn names_hash_as_e2fsprogs_hashes_them() {
        let seed = [0x6745_2301, 0xefcd_ab89, 0x6745_2301, 0xefcd_ab89]; // 01234567-89ab-cdef-0123-456789abcdef
        assert_eq!(name_hash(b"hello", &[0; 4]), 0x1746_da32, "a zero seed: the default one");
        assert_eq!(name_hash(b"hello", &seed), 0xa26e_4a80);
        assert_eq!(name_hash(&[b'x'; 70], &seed), 0x2b6b_6870, "three rounds of 32 bytes");
    }
}

//! ext4's on-disk structures, as vmrootfs writes them: 4 KiB blocks, 256-byte inodes, 32-byte
//! group descriptors, extents, directory blocks (indexed by [`super::htree`] beyond one),
//! xattrs in the inode and in one block, and metadata_csum checksums (crc32c) on all of them. Field offsets are the kernel's
//! (`fs/ext4/ext4.h`, `xattr.h`).

pub const BLOCK: usize = 4096;
pub const INODE_SIZE: usize = 256;
pub const BLOCKS_PER_GROUP: u64 = 32768;
pub const DESC_SIZE: usize = 32;
pub const ROOT_INO: u32 = 2;
pub const FIRST_INO: u32 = 11;
/// Extent entries in the inode's `i_block`, and in one tree block (after its header and
/// before its checksum tail).
pub const EXTENTS_IN_INODE: usize = 4;
pub const EXTENTS_IN_BLOCK: usize = (BLOCK - 12 - 4) / 12;
/// Longest initialized extent.
pub const MAX_EXTENT_LEN: u32 = 32768;

const EXTRA_ISIZE: u16 = 32;
/// In-inode xattr space: after the 128-byte base inode and its 32 extra bytes.
const IBODY_START: usize = 128 + EXTRA_ISIZE as usize;

const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
/// Superblock backups only in the groups `s_backup_bgs` names, here none.
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

pub const EXTENTS_FL: u32 = 0x80000;
/// A directory with a hash index ([`super::htree`]).
pub const INDEX_FL: u32 = 0x1000;
const BG_INODE_ZEROED: u16 = 0x4;
const EXTENT_MAGIC: u16 = 0xF30A;
const XATTR_MAGIC: u32 = 0xEA02_0000;

pub(super) fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub(super) fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// ext4's crc32c: explicit seed, no final inversion (Linux `ext4_chksum`).
pub fn crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The seed of every metadata checksum: the crc of the filesystem UUID.
pub fn csum_seed(uuid: &[u8; 16]) -> u32 {
    crc(!0, uuid)
}

/// The earliest and latest second an ext4 inode (256 bytes, two epoch bits) can hold:
/// 1901-12-13 and 2446-05-10.
const TIME_MIN: i64 = -(1 << 31);
const TIME_MAX: i64 = (1 << 34) - (1 << 31) - 1;

/// ext4's split of a time: the low 32 bits of seconds (read as signed), and the extra field
/// `nsec << 2 | epoch`, whose two epoch bits say which 2^32-second era the time is in. A time
/// outside ext4's range is clamped to its nearer end with no nanoseconds, as the kernel
/// (`timestamp_truncate`) stores it when GNU tar sets it.
pub fn split_time(sec: i64, nsec: u32) -> (u32, u32) {
    let (sec, nsec) =
        if (TIME_MIN..=TIME_MAX).contains(&sec) { (sec, nsec) } else { (sec.clamp(TIME_MIN, TIME_MAX), 0) };
    let epoch = ((sec - sec as i32 as i64) >> 32) & 3;
    (sec as u32, (nsec.min(999_999_999) << 2) | epoch as u32)
}

/// The layout numbers of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u64,
    pub groups: u32,
    /// 32768, or fewer when the inodes need more groups than the blocks do.
    pub blocks_per_group: u64,
    pub inodes_per_group: u32,
    /// Inode table blocks per group.
    pub table_blocks: u32,
}

impl Geometry {
    pub fn gdt_blocks(&self) -> u64 {
        (self.groups as u64 * DESC_SIZE as u64).div_ceil(BLOCK as u64)
    }

    /// Blocks in group `g` (the last may be short).
    pub fn blocks_in_group(&self, g: u32) -> u64 {
        (self.blocks - g as u64 * self.blocks_per_group).min(self.blocks_per_group)
    }
}

/// Totals the superblock records.
pub struct Totals {
    pub free_blocks: u64,
    pub free_inodes: u32,
}

/// The 1024-byte superblock (at byte 1024 of the image). All times 0; UUID and directory hash
/// seed given, so the same input gives the same bytes.
pub fn superblock(g: &Geometry, t: &Totals, uuid: &[u8; 16], hash_seed: &[u8; 16]) -> [u8; 1024] {
    let mut sb = [0u8; 1024];
    put32(&mut sb, 0x00, g.groups * g.inodes_per_group);
    put32(&mut sb, 0x04, g.blocks as u32);
    put32(&mut sb, 0x0C, t.free_blocks as u32);
    put32(&mut sb, 0x10, t.free_inodes);
    put32(&mut sb, 0x18, 2); // log2(block size) - 10
    put32(&mut sb, 0x1C, 2); // clusters are blocks
    put32(&mut sb, 0x20, g.blocks_per_group as u32);
    put32(&mut sb, 0x24, g.blocks_per_group as u32);
    put32(&mut sb, 0x28, g.inodes_per_group);
    put16(&mut sb, 0x36, 0xFFFF); // no mount-count checks
    put16(&mut sb, 0x38, 0xEF53);
    put16(&mut sb, 0x3A, 1); // clean
    put16(&mut sb, 0x3C, 1); // errors: continue
    put32(&mut sb, 0x4C, 1); // dynamic revision
    put32(&mut sb, 0x54, FIRST_INO);
    put16(&mut sb, 0x58, INODE_SIZE as u16);
    put32(&mut sb, 0x5C, COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2);
    put32(&mut sb, 0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG);
    put32(
        &mut sb,
        0x64,
        RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM,
    );
    sb[0x68..0x78].copy_from_slice(uuid);
    sb[0xEC..0xFC].copy_from_slice(hash_seed);
    sb[0xFC] = super::htree::HALF_MD4;
    put32(&mut sb, 0x100, 0x000C); // default mount options: user_xattr, acl
    put16(&mut sb, 0x15C, EXTRA_ISIZE);
    put16(&mut sb, 0x15E, EXTRA_ISIZE);
    put32(&mut sb, 0x160, 0x1); // signed directory hash
    sb[0x174] = 4; // 16 groups per flex group
    sb[0x175] = 1; // crc32c
    let csum = crc(!0, &sb[..0x3FC]);
    put32(&mut sb, 0x3FC, csum);
    sb
}

/// One group's descriptor.
pub struct GroupDesc {
    pub block_bitmap: u32,
    pub inode_bitmap: u32,
    pub inode_table: u32,
    pub free_blocks: u16,
    pub free_inodes: u16,
    pub used_dirs: u16,
    /// Inodes at the end of the group's table never used.
    pub unused_inodes: u16,
}

impl GroupDesc {
    /// The descriptor of group `group`, with the checksums of its bitmaps and itself.
    pub fn encode(&self, group: u32, block_bitmap: &[u8], inode_bitmap: &[u8], seed: u32) -> [u8; DESC_SIZE] {
        let mut d = [0u8; DESC_SIZE];
        put32(&mut d, 0x00, self.block_bitmap);
        put32(&mut d, 0x04, self.inode_bitmap);
        put32(&mut d, 0x08, self.inode_table);
        put16(&mut d, 0x0C, self.free_blocks);
        put16(&mut d, 0x0E, self.free_inodes);
        put16(&mut d, 0x10, self.used_dirs);
        put16(&mut d, 0x12, BG_INODE_ZEROED);
        put16(&mut d, 0x18, crc(seed, block_bitmap) as u16);
        put16(&mut d, 0x1A, crc(seed, inode_bitmap) as u16);
        put16(&mut d, 0x1C, self.unused_inodes);
        let csum = crc(crc(seed, &group.to_le_bytes()), &d);
        put16(&mut d, 0x1E, csum as u16);
        d
    }
}

/// What an inode is, as its mode's type bits and a directory entry's file type say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Regular,
    Dir,
    Char,
    Block,
    Fifo,
    Symlink,
}

impl FileType {
    fn mode_bits(self) -> u16 {
        match self {
            FileType::Fifo => 0o010000,
            FileType::Char => 0o020000,
            FileType::Dir => 0o040000,
            FileType::Block => 0o060000,
            FileType::Regular => 0o100000,
            FileType::Symlink => 0o120000,
        }
    }

    fn dirent_type(self) -> u8 {
        match self {
            FileType::Regular => 1,
            FileType::Dir => 2,
            FileType::Char => 3,
            FileType::Block => 4,
            FileType::Fifo => 5,
            FileType::Symlink => 7,
        }
    }
}

/// Everything one inode records.
pub struct InodeFields<'a> {
    pub kind: FileType,
    /// Permission bits, setuid, setgid and sticky.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// As [`split_time`] gives it.
    pub mtime: (u32, u32),
    pub links: u16,
    /// Blocks the inode owns (data, extent tree, xattr block).
    pub blocks: u64,
    pub flags: u32,
    pub i_block: [u8; 60],
    pub xattr_block: u32,
    /// xattr entries and values kept in the inode ([`Xattrs::ibody`]).
    pub ibody: &'a [u8],
}

/// A 256-byte inode with its checksum. Every time (access, change, modification, creation)
/// is the modification time, so nothing depends on when the image was made.
pub fn inode(f: &InodeFields<'_>, ino: u32, seed: u32) -> [u8; INODE_SIZE] {
    let mut b = [0u8; INODE_SIZE];
    put16(&mut b, 0x00, f.kind.mode_bits() | (f.perm & 0o7777));
    put16(&mut b, 0x02, f.uid as u16);
    put32(&mut b, 0x04, f.size as u32);
    let (sec, extra) = f.mtime;
    for off in [0x08, 0x0C, 0x10, 0x90] {
        put32(&mut b, off, sec);
    }
    for off in [0x84, 0x88, 0x8C, 0x94] {
        put32(&mut b, off, extra);
    }
    put16(&mut b, 0x18, f.gid as u16);
    put16(&mut b, 0x1A, f.links);
    let sectors = f.blocks * (BLOCK as u64 / 512);
    put32(&mut b, 0x1C, sectors as u32);
    put32(&mut b, 0x20, f.flags);
    b[0x28..0x64].copy_from_slice(&f.i_block);
    put32(&mut b, 0x68, f.xattr_block);
    put32(&mut b, 0x6C, (f.size >> 32) as u32);
    put16(&mut b, 0x74, (sectors >> 32) as u16);
    put16(&mut b, 0x78, (f.uid >> 16) as u16);
    put16(&mut b, 0x7A, (f.gid >> 16) as u16);
    put16(&mut b, 0x80, EXTRA_ISIZE);
    if !f.ibody.is_empty() {
        put32(&mut b, IBODY_START, XATTR_MAGIC);
        b[IBODY_START + 4..IBODY_START + 4 + f.ibody.len()].copy_from_slice(f.ibody);
    }
    let mut csum = crc(seed, &ino.to_le_bytes());
    csum = crc(csum, &[0; 4]); // generation
    csum = crc(csum, &b);
    put16(&mut b, 0x7C, csum as u16);
    put16(&mut b, 0x82, (csum >> 16) as u16);
    b
}

/// `i_block` of a device node: the old 16-bit encoding when it fits, else the new one.
/// `None` when Linux cannot represent the numbers (major ≥ 2^12 or minor ≥ 2^20).
pub fn device_block(major: u32, minor: u32) -> Option<[u8; 60]> {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut b, 0, (major << 8) | minor);
    } else if major < 1 << 12 && minor < 1 << 20 {
        put32(&mut b, 4, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
    } else {
        return None;
    }
    Some(b)
}

/// One extent: `len` blocks of file data from logical block `logical` at physical `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub len: u32,
    pub start: u64,
}

/// A node of an extent tree: a header, then leaf extents or index entries
/// `(first logical block, child block)`. `max` is 4 in the inode, [`EXTENTS_IN_BLOCK`] in a block.
pub fn extent_node(out: &mut [u8], max: usize, depth: u16, leaves: &[Extent], index: &[(u32, u64)]) {
    let entries = leaves.len() + index.len();
    debug_assert!(entries <= max && (leaves.is_empty() || index.is_empty()));
    put16(out, 0, EXTENT_MAGIC);
    put16(out, 2, entries as u16);
    put16(out, 4, max as u16);
    put16(out, 6, depth);
    for (i, e) in leaves.iter().enumerate() {
        let o = 12 + i * 12;
        put32(out, o, e.logical);
        put16(out, o + 4, e.len as u16);
        put16(out, o + 6, (e.start >> 32) as u16);
        put32(out, o + 8, e.start as u32);
    }
    for (i, (logical, child)) in index.iter().enumerate() {
        let o = 12 + i * 12;
        put32(out, o, *logical);
        put32(out, o + 4, *child as u32);
        put16(out, o + 8, (*child >> 32) as u16);
    }
}

/// Sets the checksum tail of an extent tree block of inode `ino`.
pub fn seal_extent_block(block: &mut [u8], ino: u32, seed: u32) {
    let tail = 12 + EXTENTS_IN_BLOCK * 12;
    let csum = crc(crc(crc(seed, &ino.to_le_bytes()), &[0; 4]), &block[..tail]);
    put32(block, tail, csum);
}

/// One directory entry to write.
pub struct Dirent<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    pub kind: FileType,
}

/// Bytes a directory entry takes.
pub const fn dirent_len(name_len: usize) -> usize {
    (8 + name_len).next_multiple_of(4)
}

/// Space for entries in a directory block (its last 12 bytes are the checksum tail).
pub const DIR_SPACE: usize = BLOCK - 12;

/// The blocks of directory `ino` (parent `parent`): `.`, `..`, then `entries`, each block
/// ending in its checksum tail.
pub fn dir_blocks(ino: u32, parent: u32, entries: &[Dirent<'_>], seed: u32) -> Vec<u8> {
    let dot = [
        Dirent { name: b".", ino, kind: FileType::Dir },
        Dirent { name: b"..", ino: parent, kind: FileType::Dir },
    ];
    pack_dirents(ino, dot.iter().chain(entries), seed).0
}

/// `entries` of directory `ino` packed into blocks in their order, each block ending in its
/// checksum tail; also the index of each block's first entry.
pub fn pack_dirents<'a, 'n: 'a>(
    ino: u32,
    entries: impl Iterator<Item = &'a Dirent<'n>>,
    seed: u32,
) -> (Vec<u8>, Vec<usize>) {
    let mut out = vec![0u8; BLOCK];
    let mut firsts = vec![0];
    let (mut block, mut at, mut last) = (0usize, 0usize, 0usize);
    for (i, e) in entries.enumerate() {
        let len = dirent_len(e.name.len());
        if at + len > DIR_SPACE {
            put16(&mut out, block + last + 4, (DIR_SPACE - last) as u16);
            seal_dir_block(&mut out[block..block + BLOCK], ino, seed);
            block += BLOCK;
            out.resize(block + BLOCK, 0);
            firsts.push(i);
            at = 0;
        }
        let o = block + at;
        put32(&mut out, o, e.ino);
        put16(&mut out, o + 4, len as u16);
        out[o + 6] = e.name.len() as u8;
        out[o + 7] = e.kind.dirent_type();
        out[o + 8..o + 8 + e.name.len()].copy_from_slice(e.name);
        last = at;
        at += len;
    }
    put16(&mut out, block + last + 4, (DIR_SPACE - last) as u16);
    seal_dir_block(&mut out[block..block + BLOCK], ino, seed);
    (out, firsts)
}

fn seal_dir_block(block: &mut [u8], ino: u32, seed: u32) {
    put16(block, DIR_SPACE + 4, 12); // rec_len of the tail; inode 0, name_len 0
    block[DIR_SPACE + 7] = 0xDE;
    let csum = crc(crc(crc(seed, &ino.to_le_bytes()), &[0; 4]), &block[..DIR_SPACE]);
    put32(block, DIR_SPACE + 8, csum);
}

/// An xattr that ext4 cannot store.
#[derive(Debug, thiserror::Error)]
pub enum XattrError {
    #[error("xattr {0:?} is in no namespace ext4 has (user., trusted., security., system.)")]
    Namespace(String),
    #[error("xattr {0:?} is not a valid POSIX ACL")]
    BadAcl(String),
    #[error("xattrs take more than the inode and one 4 KiB block (at {0:?})")]
    TooMany(String),
}

/// An inode's xattrs, encoded: the part kept in the inode and the xattr block, if any (whose
/// checksum [`seal_xattr_block`] sets once its block number is known).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Xattrs {
    pub ibody: Vec<u8>,
    pub block: Option<Vec<u8>>,
}

/// Name prefixes and their ext4 index; the longest match wins, and the ACL names are whole.
const PREFIXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
    (b"system.", 7),
];

struct Entry {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
    hash: u32,
}

impl Entry {
    fn len(&self) -> usize {
        (16 + self.name.len()).next_multiple_of(4)
    }

    fn value_len(&self) -> usize {
        self.value.len().next_multiple_of(4)
    }

    fn write(&self, out: &mut [u8], value_offs: usize) {
        out[0] = self.name.len() as u8;
        out[1] = self.index;
        put16(out, 2, value_offs as u16);
        put32(out, 8, self.value.len() as u32);
        put32(out, 12, self.hash);
        out[16..16 + self.name.len()].copy_from_slice(&self.name);
    }
}

/// The kernel's `ext4_xattr_hash_entry` (names hashed as signed chars, as x86 kernels have).
fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut h: u32 = 0;
    for &c in name {
        h = (h << 5) ^ (h >> 27) ^ (c as i8 as i32 as u32);
    }
    for w in value.chunks(4) {
        let mut word = [0u8; 4];
        word[..w.len()].copy_from_slice(w);
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(word);
    }
    h
}

/// Encodes `xattrs` (full names, values as the VFS gives them): sorted as the kernel looks
/// them up, in the inode while they fit, the rest in one block.
pub fn xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Xattrs, XattrError> {
    let shown = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    let mut entries = Vec::with_capacity(xattrs.len());
    for (full, value) in xattrs {
        let &(prefix, index) = PREFIXES
            .iter()
            .find(|(p, i)| if matches!(i, 2 | 3) { full == p } else { full.starts_with(p) })
            .ok_or_else(|| XattrError::Namespace(shown(full)))?;
        let name = full[prefix.len()..].to_vec();
        if name.len() > 255 {
            return Err(XattrError::Namespace(shown(full)));
        }
        let value = if matches!(index, 2 | 3) {
            acl_to_disk(value).ok_or_else(|| XattrError::BadAcl(shown(full)))?
        } else {
            value.clone()
        };
        entries.push(Entry { index, hash: entry_hash(&name, &value), name, value });
    }
    entries.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));

    // In the inode: entries from the front, values from the back, 4 zero bytes after the
    // last entry; value offsets count from the first entry.
    let space = INODE_SIZE - IBODY_START - 4;
    let mut ibody = vec![0u8; space];
    let (mut at, mut values) = (0usize, space);
    let mut rest = Vec::new();
    for e in entries {
        if at + e.len() + 4 + e.value_len() <= values {
            values -= e.value_len();
            ibody[values..values + e.value.len()].copy_from_slice(&e.value);
            e.write(&mut ibody[at..], values);
            at += e.len();
        } else {
            rest.push(e);
        }
    }
    let ibody = if at == 0 { Vec::new() } else { ibody };
    if rest.is_empty() {
        return Ok(Xattrs { ibody, block: None });
    }
    // The block: a 32-byte header, entries, 4 zero bytes, values from the end.
    let mut block = vec![0u8; BLOCK];
    put32(&mut block, 0, XATTR_MAGIC);
    put32(&mut block, 4, 1); // refcount
    put32(&mut block, 8, 1); // blocks
    let (mut at, mut values) = (32usize, BLOCK);
    let mut hash: u32 = 0;
    for e in &rest {
        if at + e.len() + 4 + e.value_len() > values {
            return Err(XattrError::TooMany(shown(&e.name)));
        }
        values -= e.value_len();
        block[values..values + e.value.len()].copy_from_slice(&e.value);
        e.write(&mut block[at..], values);
        at += e.len();
        hash = (hash << 16) ^ (hash >> 16) ^ e.hash;
    }
    put32(&mut block, 0x0C, hash);
    Ok(Xattrs { ibody, block: Some(block) })
}

/// Sets the checksum of the xattr block at block number `nr`.
pub fn seal_xattr_block(block: &mut [u8], nr: u64, seed: u32) {
    put32(block, 0x10, 0);
    let csum = crc(crc(seed, &nr.to_le_bytes()), block);
    put32(block, 0x10, csum);
}

/// A POSIX ACL from the VFS xattr format (version 2; entries of tag, perm, id) to ext4's
/// (version 1; the id only for named users and groups). `None` if malformed.
fn acl_to_disk(value: &[u8]) -> Option<Vec<u8>> {
    use crate::layer::acl::{GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ};
    let (header, body) = value.split_at_checked(4)?;
    if u32::from_le_bytes(header.try_into().ok()?) != 2 || body.len() % 8 != 0 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in body.chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&tag) {
            return None;
        }
        out.extend_from_slice(&e[0..4]);
        if tag == USER || tag == GROUP {
            out.extend_from_slice(&e[4..8]);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_split_into_seconds_and_epoch_bits() {
        assert_eq!(split_time(1_700_000_000, 5), (1_700_000_000, 5 << 2));
        // Before 1970: negative low word, epoch 0 (kernel: (s32)low + (epoch << 32)).
        assert_eq!(split_time(-86_400, 0), ((-86_400i32) as u32, 0));
        // 2100: past i32, epoch 1.
        let t = 4_102_444_800i64;
        let (sec, extra) = split_time(t, 0);
        assert_eq!(sec as i32 as i64 + ((extra as i64 & 3) << 32), t);
        // Outside the range: clamped, not wrapped (1890 must not become 2436).
        let read = |(sec, extra): (u32, u32)| (sec as i32 as i64 + ((extra as i64 & 3) << 32), extra >> 2);
        assert_eq!(read(split_time(-2_500_000_000, 7)), (TIME_MIN, 0));
        assert_eq!(read(split_time(20_000_000_000, 7)), (TIME_MAX, 0));
        assert_eq!(read(split_time(TIME_MIN, 7)), (TIME_MIN, 7));
    }

    #[test]
    fn acls_lose_the_ids_of_unnamed_entries() {
        // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in
            [(1u16, 6u16, u32::MAX), (2, 4, 1000), (4, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
        {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let disk = acl_to_disk(&vfs).unwrap();
        assert_eq!(disk.len(), 4 + 4 * 4 + 8);
        assert_eq!(&disk[..4], &1u32.to_le_bytes());
        assert_eq!(&disk[8..16], &[2, 0, 4, 0, 0xE8, 3, 0, 0]);
        assert!(acl_to_disk(&vfs[..7]).is_none());
        assert!(acl_to_disk(&[1, 0, 0, 0]).is_none());
    }

    #[test]
    fn xattrs_fill_the_inode_then_one_block() {
        let small = vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())];
        let x = xattrs(&small).unwrap();
        assert!(x.block.is_none());
        assert_eq!(x.ibody[1], 4, "trusted. index");
        assert_eq!(&x.ibody[16..30], b"overlay.opaque");
        let big = vec![(b"user.a".to_vec(), vec![7u8; 200]), (b"user.b".to_vec(), b"v".to_vec())];
        let x = xattrs(&big).unwrap();
        assert_eq!(x.ibody[16], b'b', "user.a does not fit in the inode, user.b does");
        let block = x.block.expect("a block for user.a");
        assert_eq!((block[32], block[33], block[48]), (1, 1, b'a'), "one-byte name, user. index");
        let huge = vec![(b"user.a".to_vec(), vec![1u8; 5000])];
        assert!(matches!(xattrs(&huge), Err(XattrError::TooMany(_))));
        assert!(matches!(xattrs(&[(b"os2.x".to_vec(), vec![])]), Err(XattrError::Namespace(_))));
    }
}

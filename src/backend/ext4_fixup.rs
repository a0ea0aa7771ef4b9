//! Reading and patching an ext4 image that `mke2fs -d` made from a layer's normalized stream.
//!
//! mke2fs's tar reader keeps only whole seconds of mtime (and none before 1970 or after 2106),
//! gives atime, ctime and crtime values of its own, and drops owners it cannot map. The
//! fix-up walks the image's directory tree ([`Image::walk`]: path → inode, read from the
//! directory blocks through the extent tree), then writes each inode's owner, permission bits
//! and times exactly as the stream has them — atime = ctime = crtime = mtime, nanoseconds and
//! epoch bits included, so no field depends on when the image was made — and recomputes its
//! checksum (metadata_csum).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::layer::meta::EntryMeta;

const SB_OFFSET: u64 = 1024;
const ROOT_INO: u32 = 2;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENTS_FL: u32 = 0x80000;
const FT_DIR: u8 = 2;
/// Longest extent tree the walk follows (ext4's own limit is 5).
const MAX_EXTENT_DEPTH: u16 = 8;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// ext4's crc32c: no final inversion, explicit seed (Linux `ext4_chksum`).
fn ext4_crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// An ext4 image opened for reading inodes and directories and rewriting inodes.
pub struct Image {
    f: File,
    block_size: u64,
    inodes_per_group: u64,
    inode_size: usize,
    /// First block of each group's inode table.
    tables: Vec<u64>,
    csum_seed: Option<u32>,
}

impl Image {
    pub fn open(path: &Path) -> io::Result<Image> {
        let f = fs_err::OpenOptions::new().read(true).write(true).open(path)?.into_parts().0;
        let mut sb = [0u8; 1024];
        f.read_exact_at(&mut sb, SB_OFFSET)?;
        if le16(&sb, 0x38) != 0xEF53 {
            return Err(invalid("not an ext4 image (bad superblock magic)".into()));
        }
        let block_size = 1024u64 << le32(&sb, 0x18);
        let blocks = le32(&sb, 0x4) as u64;
        let first_data_block = le32(&sb, 0x14) as u64;
        let blocks_per_group = le32(&sb, 0x20) as u64;
        let incompat = le32(&sb, 0x60);
        let ro_compat = le32(&sb, 0x64);
        let csum_seed = (ro_compat & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 { le32(&sb, 0x270) } else { ext4_crc(!0, &sb[0x68..0x78]) }
        });
        let inode_size = if le32(&sb, 0x4C) == 0 { 128 } else { le16(&sb, 0x58) as usize };
        let desc_size = if incompat & INCOMPAT_64BIT != 0 { le16(&sb, 0xFE) as usize } else { 32 };
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        let mut descs = vec![0u8; groups as usize * desc_size];
        f.read_exact_at(&mut descs, (first_data_block + 1) * block_size)?;
        let tables = descs
            .chunks(desc_size)
            .map(|d| le32(d, 0x8) as u64 | if desc_size >= 64 { (le32(d, 0x28) as u64) << 32 } else { 0 })
            .collect();
        Ok(Image { f, block_size, inodes_per_group: le32(&sb, 0x28) as u64, inode_size, tables, csum_seed })
    }

    fn inode_offset(&self, ino: u32) -> io::Result<u64> {
        let i = ino as u64 - 1;
        let table = self
            .tables
            .get((i / self.inodes_per_group) as usize)
            .ok_or_else(|| invalid(format!("inode {ino} is beyond the last group")))?;
        Ok(table * self.block_size + (i % self.inodes_per_group) * self.inode_size as u64)
    }

    pub fn read_inode(&self, ino: u32) -> io::Result<Vec<u8>> {
        let mut inode = vec![0u8; self.inode_size];
        self.f.read_exact_at(&mut inode, self.inode_offset(ino)?)?;
        Ok(inode)
    }

    /// Writes `inode` back with its checksum recomputed.
    pub fn write_inode(&self, ino: u32, inode: &mut [u8]) -> io::Result<()> {
        if let Some(seed) = self.csum_seed {
            set_checksum(inode, ino, seed);
        }
        self.f.write_all_at(inode, self.inode_offset(ino)?)
    }

    /// Physical blocks of an inode's data, in logical order (holes skipped).
    fn data_blocks(&self, ino: u32, inode: &[u8]) -> io::Result<Vec<u64>> {
        if le32(inode, I_FLAGS) & EXTENTS_FL == 0 {
            return Err(invalid(format!("inode {ino} does not use extents")));
        }
        let mut blocks = Vec::new();
        self.extent_node(ino, &inode[I_BLOCK..I_BLOCK + 60], MAX_EXTENT_DEPTH, &mut blocks)?;
        Ok(blocks)
    }

    fn extent_node(&self, ino: u32, node: &[u8], depth_left: u16, out: &mut Vec<u64>) -> io::Result<()> {
        let bad = |what: &str| invalid(format!("inode {ino}: bad extent tree ({what})"));
        if le16(node, 0) != EXTENT_MAGIC {
            return Err(bad("magic"));
        }
        let (entries, depth) = (le16(node, 2) as usize, le16(node, 6));
        if depth >= depth_left || 12 + entries * 12 > node.len() {
            return Err(bad("size"));
        }
        for e in node[12..12 + entries * 12].chunks(12) {
            if depth == 0 {
                let len = le16(e, 4) as u64;
                let len = if len > 32768 { len - 32768 } else { len };
                let start = ((le16(e, 6) as u64) << 32) | le32(e, 8) as u64;
                out.extend(start..start + len);
            } else {
                let leaf = ((le16(e, 8) as u64) << 32) | le32(e, 4) as u64;
                let mut block = vec![0u8; self.block_size as usize];
                self.f.read_exact_at(&mut block, leaf * self.block_size)?;
                self.extent_node(ino, &block, depth, out)?;
            }
        }
        Ok(())
    }

    /// The entries of directory `ino` other than `.` and `..`: (name, inode, file type).
    fn dir_entries(&self, ino: u32) -> io::Result<Vec<(Vec<u8>, u32, u8)>> {
        let inode = self.read_inode(ino)?;
        let mut entries = Vec::new();
        let mut block = vec![0u8; self.block_size as usize];
        for b in self.data_blocks(ino, &inode)? {
            self.f.read_exact_at(&mut block, b * self.block_size)?;
            let mut at = 0;
            while at + 8 <= block.len() {
                let (child, rec_len) = (le32(&block, at), le16(&block, at + 4) as usize);
                let (name_len, ftype) = (block[at + 6] as usize, block[at + 7]);
                if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
                    return Err(invalid(format!("directory inode {ino}: bad entry at block {b}")));
                }
                let name = &block[at + 8..at + 8 + name_len];
                if child != 0 && name != b"." && name != b".." {
                    entries.push((name.to_vec(), child, ftype));
                }
                at += rec_len;
            }
        }
        Ok(entries)
    }

    /// Every path in the image (layer path bytes; the root is `b""`) with its inode.
    pub fn walk(&self) -> io::Result<Vec<(Vec<u8>, u32)>> {
        let mut found = vec![(Vec::new(), ROOT_INO)];
        let mut dirs = vec![(Vec::new(), ROOT_INO)];
        while let Some((dir, ino)) = dirs.pop() {
            for (name, child, ftype) in self.dir_entries(ino)? {
                let path = if dir.is_empty() { name } else { [&dir[..], b"/", &name].concat() };
                if ftype == FT_DIR {
                    dirs.push((path.clone(), child));
                }
                found.push((path, child));
            }
        }
        Ok(found)
    }
}

/// Inode field offsets (ext4 on-disk inode).
const I_MODE: usize = 0x0;
const I_UID: usize = 0x2;
const I_ATIME: usize = 0x8;
const I_CTIME: usize = 0xC;
const I_MTIME: usize = 0x10;
const I_GID: usize = 0x18;
const I_FLAGS: usize = 0x20;
const I_BLOCK: usize = 0x28;
const I_GENERATION: usize = 0x64;
const I_UID_HIGH: usize = 0x78;
const I_GID_HIGH: usize = 0x7A;
const I_CHECKSUM_LO: usize = 0x7C;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CHECKSUM_HI: usize = 0x82;
const I_CTIME_EXTRA: usize = 0x84;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8C;
const I_CRTIME: usize = 0x90;
const I_CRTIME_EXTRA: usize = 0x94;

/// ext4's split of a time: the low 32 bits of seconds (read as signed), and the extra field
/// `nsec << 2 | epoch`, whose two epoch bits say which 2^32-second era the time is in.
pub fn ext4_time(sec: i64, nsec: u32) -> (u32, u32) {
    let epoch = ((sec - sec as i32 as i64) >> 32) & 3;
    (sec as u32, (nsec.min(999_999_999) << 2) | epoch as u32)
}

/// Sets owner, permission bits and all four times (= mtime) of an inode from `meta`.
pub fn set_fields(inode: &mut [u8], meta: &EntryMeta) {
    let mode = (le16(inode, I_MODE) & 0o170000) | (meta.mode & 0o7777) as u16;
    put16(inode, I_MODE, mode);
    put16(inode, I_UID, meta.uid as u16);
    put16(inode, I_UID_HIGH, (meta.uid >> 16) as u16);
    put16(inode, I_GID, meta.gid as u16);
    put16(inode, I_GID_HIGH, (meta.gid >> 16) as u16);
    let (sec, extra) = ext4_time(meta.mtime_sec, meta.mtime_nsec);
    for off in [I_ATIME, I_CTIME, I_MTIME] {
        put32(inode, off, sec);
    }
    let extra_isize = if inode.len() > 128 { le16(inode, I_EXTRA_ISIZE) as usize } else { 0 };
    let has = |end: usize| 128 + extra_isize >= end;
    if has(I_ATIME_EXTRA + 4) {
        for off in [I_CTIME_EXTRA, I_MTIME_EXTRA, I_ATIME_EXTRA] {
            put32(inode, off, extra);
        }
    }
    if has(I_CRTIME_EXTRA + 4) {
        put32(inode, I_CRTIME, sec);
        put32(inode, I_CRTIME_EXTRA, extra);
    }
}

fn set_checksum(inode: &mut [u8], ino: u32, seed: u32) {
    let extra_isize = if inode.len() > 128 { le16(inode, I_EXTRA_ISIZE) as usize } else { 0 };
    let has_hi = 128 + extra_isize >= I_CHECKSUM_HI + 2;
    put16(inode, I_CHECKSUM_LO, 0);
    if has_hi {
        put16(inode, I_CHECKSUM_HI, 0);
    }
    let mut crc = ext4_crc(seed, &ino.to_le_bytes());
    crc = ext4_crc(crc, &inode[I_GENERATION..I_GENERATION + 4]);
    crc = ext4_crc(crc, inode);
    put16(inode, I_CHECKSUM_LO, crc as u16);
    if has_hi {
        put16(inode, I_CHECKSUM_HI, (crc >> 16) as u16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_split_into_seconds_and_epoch_bits() {
        assert_eq!(ext4_time(1_700_000_000, 5), (1_700_000_000, 5 << 2));
        // Before 1970: negative low word, epoch 0 (kernel: (s32)low + (epoch << 32)).
        assert_eq!(ext4_time(-86_400, 0), ((-86_400i32) as u32, 0));
        // 2100: past i32, epoch 1.
        let t = 4_102_444_800i64;
        let (sec, extra) = ext4_time(t, 0);
        assert_eq!(sec as i32 as i64 + ((extra as i64 & 3) << 32), t);
    }
}

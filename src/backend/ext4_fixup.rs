//! In-place fix-up of an ext4 image made by `mke2fs -d` from a vmrootfs staging tree.
//!
//! For every in-use inode: mtime's nanoseconds and epoch bits are restored from atime (the
//! staging tree carries them there, see `layer::tree::encode_mtime_extra`), and atime, ctime
//! and crtime are set equal to mtime, so no field depends on when the layer was extracted. The root inode gets the
//! layer root's mode and mtime. Inode checksums (metadata_csum) are recomputed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::layer::dirindex::DirMeta;
use crate::layer::meta::encode_mtime_extra;

const SB_OFFSET: u64 = 1024;
const ROOT_INO: u64 = 2;
const FIRST_INO_DEFAULT: u64 = 11;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const BG_INODE_UNINIT: u16 = 0x1;

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

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Superblock fields the fix-up needs.
struct Geometry {
    block_size: u64,
    inodes_per_group: u64,
    inode_size: usize,
    groups: u64,
    desc_size: usize,
    gdt_offset: u64,
    first_ino: u64,
    csum_seed: Option<u32>,
}

fn read_geometry(f: &File) -> io::Result<Geometry> {
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, SB_OFFSET)?;
    if le16(&sb, 0x38) != 0xEF53 {
        return Err(invalid("not an ext4 image (bad superblock magic)"));
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
    let rev = le32(&sb, 0x4C);
    Ok(Geometry {
        block_size,
        inodes_per_group: le32(&sb, 0x28) as u64,
        inode_size: if rev == 0 { 128 } else { le16(&sb, 0x58) as usize },
        groups: (blocks - first_data_block).div_ceil(blocks_per_group),
        desc_size: if incompat & INCOMPAT_64BIT != 0 { le16(&sb, 0xFE) as usize } else { 32 },
        gdt_offset: (first_data_block + 1) * block_size,
        first_ino: if rev == 0 { FIRST_INO_DEFAULT } else { le32(&sb, 0x54) as u64 },
        csum_seed,
    })
}

/// Rewrites the times of every in-use inode and the root's mode (see the module doc).
pub fn fix_times(image: &Path, root: &DirMeta) -> io::Result<()> {
    let f = fs_err::OpenOptions::new().read(true).write(true).open(image)?.into_parts().0;
    let g = read_geometry(&f)?;
    let mut desc = vec![0u8; g.desc_size];
    let mut bitmap = vec![0u8; g.block_size as usize];
    let mut inode = vec![0u8; g.inode_size];
    for group in 0..g.groups {
        f.read_exact_at(&mut desc, g.gdt_offset + group * g.desc_size as u64)?;
        if le16(&desc, 0x12) & BG_INODE_UNINIT != 0 {
            continue;
        }
        let hi = |o: usize| {
            if g.desc_size >= 64 { (le32(&desc, o) as u64) << 32 } else { 0 }
        };
        let bitmap_block = le32(&desc, 0x4) as u64 | hi(0x24);
        let table_block = le32(&desc, 0x8) as u64 | hi(0x28);
        f.read_exact_at(&mut bitmap, bitmap_block * g.block_size)?;
        for i in 0..g.inodes_per_group {
            if bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                continue;
            }
            let ino = group * g.inodes_per_group + i + 1;
            if ino < g.first_ino && ino != ROOT_INO {
                continue;
            }
            let at = table_block * g.block_size + i * g.inode_size as u64;
            f.read_exact_at(&mut inode, at)?;
            fix_inode(&mut inode, ino, (ino == ROOT_INO).then_some(root), g.csum_seed);
            f.write_all_at(&inode, at)?;
        }
    }
    f.sync_all()
}

/// Inode field offsets (ext4 on-disk inode).
const I_MODE: usize = 0x0;
const I_ATIME: usize = 0x8;
const I_CTIME: usize = 0xC;
const I_MTIME: usize = 0x10;
const I_GENERATION: usize = 0x64;
const I_CHECKSUM_LO: usize = 0x7C;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CHECKSUM_HI: usize = 0x82;
const I_CTIME_EXTRA: usize = 0x84;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8C;
const I_CRTIME: usize = 0x90;
const I_CRTIME_EXTRA: usize = 0x94;

fn fix_inode(inode: &mut [u8], ino: u64, root: Option<&DirMeta>, csum_seed: Option<u32>) {
    let extra = if inode.len() > 128 { le16(inode, I_EXTRA_ISIZE) as usize } else { 0 };
    let len = inode.len();
    let has = |end: usize| len > 128 && 128 + extra >= end;
    let (mtime, packed) = match root {
        Some(r) => {
            let mode = (le16(inode, I_MODE) & 0o170000) | (r.mode & 0o7777) as u16;
            put16(inode, I_MODE, mode);
            (r.mtime_sec as u32, encode_mtime_extra(r.mtime_sec, r.mtime_nsec))
        }
        None => (le32(inode, I_MTIME), le32(inode, I_ATIME)),
    };
    let (epoch, nsec) = (packed / 1_000_000_000, packed % 1_000_000_000);
    put32(inode, I_MTIME, mtime);
    put32(inode, I_ATIME, mtime);
    put32(inode, I_CTIME, mtime);
    if has(I_MTIME_EXTRA + 4) {
        let x = (nsec << 2) | (epoch & 3);
        for off in [I_CTIME_EXTRA, I_MTIME_EXTRA, I_ATIME_EXTRA] {
            put32(inode, off, x);
        }
        if has(I_CRTIME_EXTRA + 4) {
            put32(inode, I_CRTIME, mtime);
            put32(inode, I_CRTIME_EXTRA, x);
        }
    }
    if let Some(seed) = csum_seed {
        let has_hi = has(I_CHECKSUM_HI + 2);
        put16(inode, I_CHECKSUM_LO, 0);
        if has_hi {
            put16(inode, I_CHECKSUM_HI, 0);
        }
        let mut crc = ext4_crc(seed, &(ino as u32).to_le_bytes());
        crc = ext4_crc(crc, &inode[I_GENERATION..I_GENERATION + 4]);
        crc = ext4_crc(crc, inode);
        put16(inode, I_CHECKSUM_LO, crc as u16);
        if has_hi {
            put16(inode, I_CHECKSUM_HI, (crc >> 16) as u16);
        }
    }
}

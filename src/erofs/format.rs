//! EROFS's on-disk structures, the subset vmrootfs writes and reads: the superblock, compact
//! (32-byte) and extended (64-byte) inodes, directory entries, inline xattrs with the built-in
//! name prefixes, chunk-based files (4-byte block map or 8-byte chunk indexes) and the device
//! table of multi-device images. Field offsets are the kernel's (`fs/erofs/erofs_fs.h`); every
//! feature here is one Linux 5.15 mounts (chunk-based files and the device table came in 5.15,
//! the rest earlier). No compression, no long xattr prefixes, no fragments.
//!
//! ```text
//! byte 0: 1024 bytes free │ superblock (128) │ … block 1..: data, then the metadata area
//! metadata area (from `meta_blkaddr`): inodes on 32-byte slots, nid = slot number; each inode
//!   is followed by its inline xattrs, then its inline data or its chunk map
//! ```
//!
//! Pure: encoding and decoding of byte arrays, no I/O. Multi-byte fields are little-endian.

/// The superblock's offset in the image.
pub const SUPER_OFFSET: usize = 1024;
/// Bytes of the superblock vmrootfs writes (no extension slots).
pub const SUPER_SIZE: usize = 128;
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// log2 of the block size: 4096-byte blocks on every host (what every kernel mounts whatever
/// its page size).
pub const BLOCK_BITS: u8 = 12;
pub const BLOCK: usize = 1 << BLOCK_BITS;
/// Inodes sit on slots of this many bytes of the metadata area; an inode's nid is its slot.
pub const SLOT_BITS: u32 = 5;
pub const SLOT: usize = 1 << SLOT_BITS;
/// The longest name of a directory entry.
pub const NAME_LEN: usize = 255;
/// The block address of a hole: a null chunk of a chunk-based file.
pub const NULL_ADDR: u32 = u32::MAX;

/// The superblock carries a crc32c of its block from [`SUPER_OFFSET`] on ([`superblock_checksum`]).
pub const COMPAT_SB_CHKSUM: u32 = 0x1;
/// Chunk-based files (`EROFS_INODE_CHUNK_BASED`), Linux 5.15.
pub const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// A device table (`extra_devices`, `devt_slotoff`), Linux 5.15.
pub const INCOMPAT_DEVICE_TABLE: u32 = 0x8;

/// How an inode's data is laid out (`i_format` bits 1–3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Whole blocks from `raw_blkaddr`, the last one zero-padded.
    FlatPlain = 0,
    /// Compressed, full indexes (vmrootfs reads no compressed layout).
    CompressedFull = 1,
    /// Whole blocks from `raw_blkaddr`, the last partial block's bytes inline after the inode
    /// and its xattrs (not crossing a block boundary).
    FlatInline = 2,
    /// Compressed, compact indexes.
    CompressedCompact = 3,
    /// Chunks of `BLOCK << chunk_bits` bytes, each mapped by a block map entry or a chunk index
    /// after the inode and its xattrs; `NULL_ADDR` is a hole.
    ChunkBased = 4,
}

impl DataLayout {
    /// The layout of `i_format`'s bits 1–3; `None` for an unknown one.
    pub fn from_bits(bits: u16) -> Option<DataLayout> {
        Some(match bits {
            0 => DataLayout::FlatPlain,
            1 => DataLayout::CompressedFull,
            2 => DataLayout::FlatInline,
            3 => DataLayout::CompressedCompact,
            4 => DataLayout::ChunkBased,
            _ => return None,
        })
    }
}

/// The superblock (128 bytes at [`SUPER_OFFSET`]), the fields vmrootfs uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    pub checksum: u32,
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub root_nid: u16,
    /// Inodes in the image.
    pub inos: u64,
    /// The time of compact inodes (which have none of their own).
    pub build_time: u64,
    pub build_time_nsec: u32,
    /// Blocks of the image (for statfs).
    pub blocks: u32,
    /// The block where nid 0 is.
    pub meta_blkaddr: u32,
    /// The block where shared xattrs start (0: none).
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    /// Devices besides this one (multi-device images).
    pub extra_devices: u16,
    /// The device table's offset in units of [`DEVICE_SLOT`] bytes.
    pub devt_slotoff: u16,
}

impl Superblock {
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.checksum);
        put32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        // 13: sb_extslots, 0
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.build_time);
        put32(&mut b, 32, self.build_time_nsec);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        // 84: available_compr_algs / lz4_max_distance, 0
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        // 90: dirblkbits (0: directory blocks are filesystem blocks), 91: xattr_prefix_count,
        // 92: xattr_prefix_start, 96: packed_nid, 104: xattr_filter_reserved, then reserved.
        b
    }

    /// The superblock in `b` (its [`SUPER_SIZE`] bytes), `None` without EROFS's magic.
    pub fn decode(b: &[u8; SUPER_SIZE]) -> Option<Superblock> {
        if get32(b, 0) != MAGIC {
            return None;
        }
        Some(Superblock {
            checksum: get32(b, 4),
            feature_compat: get32(b, 8),
            blkszbits: b[12],
            root_nid: get16(b, 14),
            inos: get64(b, 16),
            build_time: get64(b, 24),
            build_time_nsec: get32(b, 32),
            blocks: get32(b, 36),
            meta_blkaddr: get32(b, 40),
            xattr_blkaddr: get32(b, 44),
            uuid: b[48..64].try_into().expect("16 bytes"),
            volume_name: b[64..80].try_into().expect("16 bytes"),
            feature_incompat: get32(b, 80),
            extra_devices: get16(b, 86),
            devt_slotoff: get16(b, 88),
        })
    }
}

/// The superblock checksum: Linux's `crc32c(~0, …)` (no final inversion) over the superblock's
/// block from [`SUPER_OFFSET`] to its end, with the checksum field zero.
pub fn superblock_checksum(block_from_super: &[u8]) -> u32 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&block_from_super[..8]);
    head[4..8].fill(0);
    let crc = crc32c::crc32c_append(0, &head);
    !crc32c::crc32c_append(crc, &block_from_super[8..])
}

/// Bytes of a compact and of an extended inode.
pub const COMPACT_INODE: usize = 32;
pub const EXTENDED_INODE: usize = 64;

/// An inode's fixed part, compact or extended ([`Inode::extended`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// 64 bytes with 32-bit owners, a 64-bit size and its own mtime; else 32 bytes with
    /// 16-bit owners and nlink, a 32-bit size and the superblock's build time.
    pub extended: bool,
    pub layout: DataLayout,
    /// `i_xattr_icount`: see [`xattr_icount`].
    pub xattr_icount: u16,
    /// Type and permission bits (`S_IFMT | 0o7777`).
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// `raw_blkaddr` (flat layouts), `rdev` (devices, [`encode_dev`]) or the chunk format
    /// (chunk-based, [`chunk_format`]).
    pub i_u: u32,
    /// The inode number stat shows on 32-bit systems.
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended only.
    pub mtime: u64,
    pub mtime_nsec: u32,
}

impl Inode {
    /// Bytes of this inode's fixed part.
    pub fn size_on_disk(&self) -> usize {
        if self.extended { EXTENDED_INODE } else { COMPACT_INODE }
    }

    fn format(&self) -> u16 {
        ((self.layout as u16) << 1) | self.extended as u16
    }

    /// The extended form (64 bytes).
    pub fn encode_extended(&self) -> [u8; EXTENDED_INODE] {
        let mut b = [0u8; EXTENDED_INODE];
        put16(&mut b, 0, self.format());
        put16(&mut b, 2, self.xattr_icount);
        put16(&mut b, 4, self.mode);
        // 6: i_reserved
        put64(&mut b, 8, self.size);
        put32(&mut b, 16, self.i_u);
        put32(&mut b, 20, self.ino);
        put32(&mut b, 24, self.uid);
        put32(&mut b, 28, self.gid);
        put64(&mut b, 32, self.mtime);
        put32(&mut b, 40, self.mtime_nsec);
        put32(&mut b, 44, self.nlink);
        b
    }

    /// The compact form (32 bytes); `None` when a field does not fit it.
    pub fn encode_compact(&self) -> Option<[u8; COMPACT_INODE]> {
        let small = |v: u64, max: u64| (v <= max).then_some(v);
        let mut b = [0u8; COMPACT_INODE];
        put16(&mut b, 0, self.format());
        put16(&mut b, 2, self.xattr_icount);
        put16(&mut b, 4, self.mode);
        put16(&mut b, 6, small(self.nlink.into(), u16::MAX.into())? as u16);
        put32(&mut b, 8, small(self.size, u32::MAX.into())? as u32);
        // 12: i_reserved (an mtime relative to the build time with the feature COMPAT_MTIME,
        // 0x2, Linux 6.10, which vmrootfs never sets)
        put32(&mut b, 16, self.i_u);
        put32(&mut b, 20, self.ino);
        put16(&mut b, 24, small(self.uid.into(), u16::MAX.into())? as u16);
        put16(&mut b, 26, small(self.gid.into(), u16::MAX.into())? as u16);
        Some(b)
    }

    /// The inode starting at `b[0]`: `b` holds at least [`COMPACT_INODE`] bytes, and
    /// [`EXTENDED_INODE`] when bit 0 of its first byte says extended. `None` for a short
    /// buffer or an unknown data layout.
    pub fn decode(b: &[u8]) -> Option<Inode> {
        let format = get16(b.get(..2)?, 0);
        let layout = DataLayout::from_bits((format >> 1) & 0x7)?;
        if format & 1 == 1 {
            let b = b.get(..EXTENDED_INODE)?;
            Some(Inode {
                extended: true,
                layout,
                xattr_icount: get16(b, 2),
                mode: get16(b, 4),
                size: get64(b, 8),
                i_u: get32(b, 16),
                ino: get32(b, 20),
                uid: get32(b, 24),
                gid: get32(b, 28),
                mtime: get64(b, 32),
                mtime_nsec: get32(b, 40),
                nlink: get32(b, 44),
            })
        } else {
            let b = b.get(..COMPACT_INODE)?;
            Some(Inode {
                extended: false,
                layout,
                xattr_icount: get16(b, 2),
                mode: get16(b, 4),
                nlink: get16(b, 6).into(),
                size: get32(b, 8).into(),
                i_u: get32(b, 16),
                ino: get32(b, 20),
                uid: get16(b, 24).into(),
                gid: get16(b, 26).into(),
                mtime: 0,
                mtime_nsec: 0,
            })
        }
    }
}

/// `S_IFMT` and the file type bits EROFS inodes use (those of Linux).
pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;

/// A device number as `rdev` holds it (Linux `new_encode_dev`): 12 bits of major, 20 of minor.
pub fn encode_dev(major: u32, minor: u32) -> Option<u32> {
    (major < 1 << 12 && minor < 1 << 20).then_some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// `rdev` → (major, minor) (Linux `new_decode_dev`): the unit tests' check of [`encode_dev`].
#[cfg(test)]
fn decode_dev(rdev: u32) -> (u32, u32) {
    ((rdev & 0xfff00) >> 8, (rdev & 0xff) | ((rdev >> 12) & 0xfff00))
}

/// The chunk-based `i_u` field's low 5 bits: log2 of the chunk size in blocks.
pub const CHUNK_BLKBITS_MASK: u16 = 0x1f;
/// Set: 8-byte [`ChunkIndex`] entries (with a device id); clear: a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;

/// The `i_u` of a chunk-based inode with chunks of `BLOCK << chunk_bits` bytes.
pub fn chunk_format(chunk_bits: u8, indexes: bool) -> u32 {
    debug_assert!(u16::from(chunk_bits) <= CHUNK_BLKBITS_MASK);
    u32::from(u16::from(chunk_bits) | if indexes { CHUNK_FORMAT_INDEXES } else { 0 })
}

/// Bytes of a block map entry (a little-endian block address).
pub const BLOCK_MAP_ENTRY: usize = 4;
/// Bytes of a [`ChunkIndex`].
pub const CHUNK_INDEX: usize = 8;

/// One chunk's place, in the 8-byte form: `blkaddr` on device `device_id` (0: this image;
/// `i + 1`: the `i`th entry of the device table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkIndex {
    pub device_id: u16,
    pub blkaddr: u32,
}

impl ChunkIndex {
    pub fn encode(&self) -> [u8; CHUNK_INDEX] {
        let mut b = [0u8; CHUNK_INDEX];
        // 0: advise, 0
        put16(&mut b, 2, self.device_id);
        put32(&mut b, 4, self.blkaddr);
        b
    }

    pub fn decode(b: &[u8; CHUNK_INDEX]) -> ChunkIndex {
        ChunkIndex { device_id: get16(b, 2), blkaddr: get32(b, 4) }
    }
}

/// Where the chunk map of a chunk-based inode starts: after the inode and its inline xattrs,
/// aligned to its entry size (`inode_end` counts from the start of the metadata area).
pub fn chunk_map_start(inode_end: u64, indexes: bool) -> u64 {
    inode_end.next_multiple_of(if indexes { CHUNK_INDEX } else { BLOCK_MAP_ENTRY } as u64)
}

/// Bytes of a [`Dirent`].
pub const DIRENT: usize = 12;

/// Directory entry file types (Linux `FT_*`).
pub const FT_UNKNOWN: u8 = 0;
pub const FT_REG_FILE: u8 = 1;
/// A directory.
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

/// The directory entry file type of inode mode `mode`.
pub fn file_type(mode: u16) -> u8 {
    match mode & S_IFMT {
        S_IFREG => FT_REG_FILE,
        S_IFDIR => FT_DIR,
        S_IFCHR => FT_CHRDEV,
        S_IFBLK => FT_BLKDEV,
        S_IFIFO => FT_FIFO,
        S_IFSOCK => FT_SOCK,
        S_IFLNK => FT_SYMLINK,
        _ => FT_UNKNOWN,
    }
}

/// A directory entry. A directory block holds the entries, sorted by name bytes (the kernel
/// looks names up by binary search, across blocks and within one), then their names back to
/// back, unterminated; the first entry's `nameoff` / [`DIRENT`] is the block's entry count,
/// and a name ends where the next begins, or at the block's (or the directory's) end or first
/// NUL. No entry spans two blocks; `.` and `..` are entries like the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub nid: u64,
    /// Offset of the name in the directory block.
    pub nameoff: u16,
    pub file_type: u8,
}

impl Dirent {
    pub fn encode(&self) -> [u8; DIRENT] {
        let mut b = [0u8; DIRENT];
        put64(&mut b, 0, self.nid);
        put16(&mut b, 8, self.nameoff);
        b[10] = self.file_type;
        b
    }

    pub fn decode(b: &[u8; DIRENT]) -> Dirent {
        Dirent { nid: get64(b, 0), nameoff: get16(b, 8), file_type: b[10] }
    }
}

/// How a directory's entries, with names of these lengths in order, fill its blocks: the
/// range of entries each block holds (a block is full when the next entry and its name no
/// longer fit; one block at least), and the bytes the last block uses.
pub fn dir_blocks(name_lens: impl IntoIterator<Item = usize>) -> (Vec<std::ops::Range<usize>>, usize) {
    let mut blocks = Vec::new();
    let (mut start, mut used, mut count) = (0, 0, 0);
    for len in name_lens {
        if used + DIRENT + len > BLOCK {
            blocks.push(start..count);
            (start, used) = (count, 0);
        }
        used += DIRENT + len;
        count += 1;
    }
    blocks.push(start..count);
    (blocks, used)
}

/// Writes one directory block's entries — (name, nid, file type), sorted by name — at the
/// start of `block`: their dirents, then their names. Returns the bytes used.
pub fn encode_dir_block<'a>(
    entries: impl ExactSizeIterator<Item = (&'a [u8], u64, u8)>,
    block: &mut [u8],
) -> usize {
    let mut nameoff = entries.len() * DIRENT;
    for (i, (name, nid, file_type)) in entries.enumerate() {
        block[i * DIRENT..][..DIRENT]
            .copy_from_slice(&Dirent { nid, nameoff: nameoff as u16, file_type }.encode());
        block[nameoff..][..name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
    nameoff
}

/// Bytes of the inline xattr header: a name filter (unused, 0), the count of shared xattr
/// ids that follow it, reserved bytes.
pub const XATTR_IBODY_HEADER: usize = 12;
/// Bytes of an xattr entry's head: name length, name index, value size.
pub const XATTR_ENTRY_HEAD: usize = 4;

/// The inline xattr header with no shared xattrs (vmrootfs keeps every xattr inline).
pub fn xattr_ibody_header(shared_count: u8) -> [u8; XATTR_IBODY_HEADER] {
    let mut b = [0u8; XATTR_IBODY_HEADER];
    b[4] = shared_count;
    b
}

/// `i_xattr_icount` of an inode with `ibody` bytes of inline xattrs (header, shared ids and
/// entries, a multiple of 4): 0 for none. `None` beyond what the field counts.
pub fn xattr_icount(ibody: usize) -> Option<u16> {
    if ibody == 0 {
        return Some(0);
    }
    debug_assert!(ibody >= XATTR_IBODY_HEADER && ibody.is_multiple_of(4));
    u16::try_from((ibody - XATTR_IBODY_HEADER) / 4 + 1).ok()
}

/// Bytes of inline xattrs `i_xattr_icount` says an inode has.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 { 0 } else { XATTR_IBODY_HEADER + 4 * (usize::from(icount) - 1) }
}

/// Bytes an xattr entry takes: its head, name and value, padded to 4.
pub fn xattr_entry_size(name_len: usize, value_len: usize) -> usize {
    (XATTR_ENTRY_HEAD + name_len + value_len).next_multiple_of(4)
}

/// Appends one inline xattr entry to `out`: its head (name length, name index, value size),
/// the name without its prefix, the value, padded to 4 bytes. The caller has checked that the
/// name fits a `u8` length and the value a `u16` size.
pub fn push_xattr_entry(out: &mut Vec<u8>, name_index: u8, name: &[u8], value: &[u8]) {
    debug_assert!(name.len() <= usize::from(u8::MAX) && value.len() <= usize::from(u16::MAX));
    let mut head = [0u8; XATTR_ENTRY_HEAD];
    head[0] = name.len() as u8;
    head[1] = name_index;
    put16(&mut head, 2, value.len() as u16);
    out.extend_from_slice(&head);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The built-in xattr name prefixes and their indexes. The POSIX ACLs are whole names (their
/// entries have an empty name) and keep the VFS's value format.
pub const XATTR_PREFIXES: &[(&[u8], u8)] = &[
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"lustre.", 5),
    (b"security.", 6),
];

/// A full xattr name → its prefix index and the rest of the name; `None` outside the
/// built-in namespaces.
pub fn split_xattr_name(full: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES.iter().find_map(|&(prefix, index)| {
        let whole = matches!(index, 2 | 3);
        let rest = full.strip_prefix(prefix)?;
        (!whole || rest.is_empty()).then_some((index, rest))
    })
}

/// The prefix of name index `index`, `None` for an unknown one.
pub fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    XATTR_PREFIXES.iter().find(|&&(_, i)| i == index).map(|&(p, _)| p)
}

/// Bytes of a device table slot.
pub const DEVICE_SLOT: usize = 128;

/// One extra device of a multi-device image: its tag (e.g. a digest), its size in blocks and
/// where its blocks appear in the image's flat block address space (0: only by device id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    pub tag: [u8; 64],
    pub blocks: u32,
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    pub fn encode(&self) -> [u8; DEVICE_SLOT] {
        let mut b = [0u8; DEVICE_SLOT];
        b[..64].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.mapped_blkaddr);
        b
    }

    /// The slot `encode` wrote (the unit tests' round trip).
    #[cfg(test)]
    fn decode(b: &[u8; DEVICE_SLOT]) -> DeviceSlot {
        DeviceSlot {
            tag: b[..64].try_into().expect("64 bytes"),
            blocks: get32(b, 64),
            mapped_blkaddr: get32(b, 68),
        }
    }
}

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
fn get16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}
fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(extended: bool) -> Inode {
        Inode {
            extended,
            layout: DataLayout::ChunkBased,
            xattr_icount: 7,
            mode: S_IFREG | 0o4755,
            nlink: 3,
            size: 60 << 30,
            i_u: chunk_format(9, false),
            ino: 42,
            uid: 1000,
            gid: 100,
            mtime: if extended { 1_700_000_000 } else { 0 },
            mtime_nsec: if extended { 5 } else { 0 },
        }
    }

    #[test]
    fn inodes_round_trip_in_both_forms() {
        let e = inode(true);
        assert_eq!(Inode::decode(&e.encode_extended()), Some(e.clone()));
        // i_format: layout 4 in bits 1–3, extended in bit 0; i_size at 8, i_nlink at 44.
        assert_eq!(e.encode_extended()[0], (4 << 1) | 1);
        assert_eq!(&e.encode_extended()[44..48], &3u32.to_le_bytes());
        let small = Inode { size: 4096, ..inode(false) };
        let b = small.encode_compact().expect("fits");
        assert_eq!(Inode::decode(&b), Some(small));
        assert_eq!(inode(false).encode_compact(), None, "60 GiB needs the extended form");
        assert_eq!(Inode { uid: 70_000, size: 1, ..inode(false) }.encode_compact(), None);
    }

    #[test]
    fn superblock_round_trips_and_checksums_like_linux() {
        let sb = Superblock {
            feature_compat: COMPAT_SB_CHKSUM,
            blkszbits: BLOCK_BITS,
            root_nid: 36,
            inos: 9,
            blocks: 12,
            meta_blkaddr: 3,
            uuid: [7; 16],
            feature_incompat: INCOMPAT_CHUNKED_FILE,
            ..Default::default()
        };
        let mut block = vec![0u8; BLOCK - SUPER_OFFSET];
        block[..SUPER_SIZE].copy_from_slice(&sb.encode());
        let crc = superblock_checksum(&block);
        block[4..8].copy_from_slice(&crc.to_le_bytes());
        // The checksum ignores its own field: the block with it filled checks the same.
        assert_eq!(superblock_checksum(&block), crc);
        assert_eq!(
            crc,
            !crc32c::crc32c_append(0, &{
                let mut b = block.clone();
                b[4..8].fill(0);
                b
            })
        );
        let decoded = Superblock::decode(block[..SUPER_SIZE].try_into().unwrap()).unwrap();
        assert_eq!(decoded, Superblock { checksum: crc, ..sb });
        assert_eq!(Superblock::decode(&[0; SUPER_SIZE]), None);
    }

    #[test]
    fn devices_encode_as_linux_new_encode_dev() {
        assert_eq!(encode_dev(0, 0), Some(0));
        assert_eq!(encode_dev(8, 1), Some(0x801));
        assert_eq!(encode_dev(259, 0x12345), Some(0x1231_0345));
        assert_eq!(decode_dev(0x1231_0345), (259, 0x12345));
        assert_eq!(encode_dev(1 << 12, 0), None);
    }

    #[test]
    fn xattr_names_split_on_the_built_in_prefixes() {
        assert_eq!(split_xattr_name(b"user.mime"), Some((1, &b"mime"[..])));
        assert_eq!(split_xattr_name(b"trusted.overlay.opaque"), Some((4, &b"overlay.opaque"[..])));
        assert_eq!(split_xattr_name(b"security.capability"), Some((6, &b"capability"[..])));
        assert_eq!(split_xattr_name(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(split_xattr_name(b"system.posix_acl_defaultx"), None);
        assert_eq!(split_xattr_name(b"system.other"), None);
        assert_eq!(xattr_prefix(6), Some(&b"security."[..]));
        // Header + (icount - 1) * 4 bytes.
        assert_eq!(xattr_icount(12 + 8 + 12), Some(6));
        assert_eq!(xattr_ibody_size(6), 32);
        assert_eq!(xattr_entry_size(6, 1), 12);
    }

    #[test]
    fn small_structures_round_trip() {
        let d = Dirent { nid: 1 << 40, nameoff: 36, file_type: FT_DIR };
        assert_eq!(Dirent::decode(&d.encode()), d);
        let c = ChunkIndex { device_id: 2, blkaddr: 77 };
        assert_eq!(ChunkIndex::decode(&c.encode()), c);
        let s = DeviceSlot { tag: [1; 64], blocks: 10, mapped_blkaddr: 20 };
        assert_eq!(DeviceSlot::decode(&s.encode()), s);
        assert_eq!(chunk_map_start(70, true), 72);
        assert_eq!(chunk_map_start(70, false), 72);
        assert_eq!(chunk_map_start(68, false), 68);
    }
}

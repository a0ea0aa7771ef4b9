//! The few on-disk fields of an EROFS image that a merged metadata image needs set after
//! `mkfs.erofs` wrote it (Linux `fs/erofs/erofs_fs.h`): the root inode's attributes and the
//! device table. Pure functions over byte buffers; the caller reads and writes the image.
//!
//! - Rebuild mode gives the merged root directory mode 0777 and the build time as mtime, not
//!   what overlayfs shows (the top layer's root). [`set_root_attrs`] copies mode bits, owner
//!   and mtime from the top layer blob's root inode.
//! - Device `i + 1` is layer `i`; its slot's `mapped_blkaddr` says where that device starts
//!   when the metadata image and the layer images are concatenated, in that order, on one
//!   disk (a kernel ≥ 6.4 then mounts the disk alone). [`set_device_table`] writes the
//!   addresses from the images' sizes (and checks each slot's block count), so the layout does
//!   not depend on what a given erofs-utils version leaves there.
//!
//! The superblock checksum covers block 0 from the superblock on; recompute it afterwards
//! ([`crate::backend::fix_build_time`] does, as it zeroes the build time).

/// Byte offset of the superblock in the image.
pub const SB_OFFSET: usize = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const INCOMPAT_DEVICE_TABLE: u32 = 0x8;
const SLOT_SIZE: usize = 128;
const INODE_SLOT: u64 = 32;

/// A field of the image that is not as a merged image needs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("not an EROFS image (bad superblock magic)")]
    Magic,
    #[error("block size 2^{0} is not supported (4096-byte blocks only)")]
    BlockSize(u8),
    #[error("the image has no device table")]
    NoDeviceTable,
    #[error("the device table has {found} devices, the stack has {expected} layers")]
    DeviceCount { expected: usize, found: usize },
    #[error("device {device} has {found} blocks in the device table, its image has {expected}")]
    DeviceBlocks { device: usize, expected: u64, found: u32 },
    #[error("image of {bytes} bytes is not a whole number of 4096-byte blocks")]
    Unaligned { bytes: u64 },
    #[error("the disk would have more than 2^32 blocks")]
    TooBig,
    #[error("the root inode is compact, not extended (no owner or mtime fields to set)")]
    CompactRoot,
    #[error("buffer too short for the {what}")]
    Short { what: &'static str },
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// What [`superblock`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u64,
    /// Byte offset of the root inode in the image.
    pub root_inode: u64,
    pub extra_devices: usize,
    /// Byte offset of the device table, if the image has one.
    pub device_table: Option<u64>,
}

/// Reads the superblock from the image's first 4096 bytes.
pub fn superblock(block0: &[u8]) -> Result<Superblock, LayoutError> {
    if block0.len() < 4096 {
        return Err(LayoutError::Short { what: "superblock" });
    }
    let sb = &block0[SB_OFFSET..];
    if u32_at(sb, 0) != MAGIC {
        return Err(LayoutError::Magic);
    }
    let bits = sb[0x0c];
    if bits != 12 {
        return Err(LayoutError::BlockSize(bits));
    }
    let block_size = 1u64 << bits;
    let root_nid = u64::from(u16_at(sb, 0x0e));
    let meta_blkaddr = u64::from(u32_at(sb, 0x28));
    let has_table = u32_at(sb, 0x50) & INCOMPAT_DEVICE_TABLE != 0;
    Ok(Superblock {
        block_size,
        root_inode: meta_blkaddr * block_size + root_nid * INODE_SLOT,
        extra_devices: if has_table { usize::from(u16_at(sb, 0x56)) } else { 0 },
        device_table: has_table.then(|| u64::from(u16_at(sb, 0x58)) * SLOT_SIZE as u64),
    })
}

/// The attributes of a directory that a merged root takes from the top layer's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootAttrs {
    /// Permission bits (07777).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
}

/// The attributes of an extended inode (its first 64 bytes).
pub fn root_attrs(inode: &[u8]) -> Result<RootAttrs, LayoutError> {
    if inode.len() < 64 {
        return Err(LayoutError::Short { what: "inode" });
    }
    if u16_at(inode, 0) & 1 == 0 {
        return Err(LayoutError::CompactRoot);
    }
    Ok(RootAttrs {
        mode: u16_at(inode, 0x04) & 0o7777,
        uid: u32_at(inode, 0x18),
        gid: u32_at(inode, 0x1c),
        mtime: u64::from_le_bytes(inode[0x20..0x28].try_into().expect("8 bytes")),
        mtime_nsec: u32_at(inode, 0x28),
    })
}

/// Writes `attrs` into an extended inode (its first 64 bytes), keeping its file type.
pub fn set_root_attrs(inode: &mut [u8], attrs: &RootAttrs) -> Result<(), LayoutError> {
    root_attrs(inode)?; // the same checks
    let mode = (u16_at(inode, 0x04) & !0o7777) | (attrs.mode & 0o7777);
    inode[0x04..0x06].copy_from_slice(&mode.to_le_bytes());
    inode[0x18..0x1c].copy_from_slice(&attrs.uid.to_le_bytes());
    inode[0x1c..0x20].copy_from_slice(&attrs.gid.to_le_bytes());
    inode[0x20..0x28].copy_from_slice(&attrs.mtime.to_le_bytes());
    inode[0x28..0x2c].copy_from_slice(&attrs.mtime_nsec.to_le_bytes());
    Ok(())
}

/// Blocks of an image of `bytes` bytes, which must be whole blocks.
pub fn blocks_of(bytes: u64, block_size: u64) -> Result<u64, LayoutError> {
    if !bytes.is_multiple_of(block_size) {
        return Err(LayoutError::Unaligned { bytes });
    }
    Ok(bytes / block_size)
}

/// Sets each slot's `mapped_blkaddr` in `table` (the device table's bytes) for a disk that is
/// the metadata image (`meta_blocks`) followed by the devices (`device_blocks`, layer 0 first),
/// after checking that each slot's block count is its image's. Returns the disk's blocks.
pub fn set_device_table(
    table: &mut [u8],
    meta_blocks: u64,
    device_blocks: &[u64],
) -> Result<u64, LayoutError> {
    if table.len() < device_blocks.len() * SLOT_SIZE {
        return Err(LayoutError::Short { what: "device table" });
    }
    let mut at = meta_blocks;
    for (i, &blocks) in device_blocks.iter().enumerate() {
        let slot = &mut table[i * SLOT_SIZE..(i + 1) * SLOT_SIZE];
        let found = u32_at(slot, 64);
        if u64::from(found) != blocks {
            return Err(LayoutError::DeviceBlocks { device: i + 1, expected: blocks, found });
        }
        let mapped = u32::try_from(at).map_err(|_| LayoutError::TooBig)?;
        slot[68..72].copy_from_slice(&mapped.to_le_bytes());
        at = at.checked_add(blocks).ok_or(LayoutError::TooBig)?;
    }
    u32::try_from(at).map_err(|_| LayoutError::TooBig)?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block0(extra_devices: u16, with_table: bool) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        let sb = &mut b[SB_OFFSET..];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[0x0c] = 12;
        sb[0x0e..0x10].copy_from_slice(&52u16.to_le_bytes());
        if with_table {
            sb[0x50..0x54].copy_from_slice(&INCOMPAT_DEVICE_TABLE.to_le_bytes());
        }
        sb[0x56..0x58].copy_from_slice(&extra_devices.to_le_bytes());
        sb[0x58..0x5a].copy_from_slice(&9u16.to_le_bytes());
        b
    }

    #[test]
    fn superblock_fields() {
        let sb = superblock(&block0(4, true)).unwrap();
        assert_eq!(
            sb,
            Superblock { block_size: 4096, root_inode: 52 * 32, extra_devices: 4, device_table: Some(1152) }
        );
        assert_eq!(superblock(&block0(4, false)).unwrap().device_table, None);
        let mut bad = block0(1, true);
        bad[SB_OFFSET] ^= 1;
        assert_eq!(superblock(&bad), Err(LayoutError::Magic));
        let mut small = block0(1, true);
        small[SB_OFFSET + 0x0c] = 9;
        assert_eq!(superblock(&small), Err(LayoutError::BlockSize(9)));
        assert_eq!(superblock(&[0; 100]), Err(LayoutError::Short { what: "superblock" }));
    }

    fn table(blocks: &[u32]) -> Vec<u8> {
        let mut t = vec![0u8; blocks.len() * SLOT_SIZE];
        for (i, b) in blocks.iter().enumerate() {
            t[i * SLOT_SIZE + 64..i * SLOT_SIZE + 68].copy_from_slice(&b.to_le_bytes());
        }
        t
    }

    #[test]
    fn device_table_maps_each_layer_after_the_ones_before() {
        let mut t = table(&[100, 7, 1]);
        assert_eq!(set_device_table(&mut t, 3, &[100, 7, 1]).unwrap(), 111);
        let mapped: Vec<u32> = (0..3).map(|i| u32_at(&t, i * SLOT_SIZE + 68)).collect();
        assert_eq!(mapped, [3, 103, 110]);
    }

    #[test]
    fn device_table_refuses_what_does_not_fit() {
        let mut t = table(&[100, 7]);
        assert_eq!(
            set_device_table(&mut t, 3, &[100, 8]),
            Err(LayoutError::DeviceBlocks { device: 2, expected: 8, found: 7 })
        );
        let mut t = table(&[u32::MAX, 2]);
        assert_eq!(set_device_table(&mut t, 3, &[u64::from(u32::MAX), 2]), Err(LayoutError::TooBig));
        assert_eq!(set_device_table(&mut [0; 10], 1, &[1]), Err(LayoutError::Short { what: "device table" }));
        assert_eq!(blocks_of(4097, 4096), Err(LayoutError::Unaligned { bytes: 4097 }));
        assert_eq!(blocks_of(8192, 4096), Ok(2));
    }

    #[test]
    fn root_attrs_round_trip_and_keep_the_file_type() {
        let mut inode = vec![0u8; 64];
        inode[0] = 1; // extended
        inode[0x04..0x06].copy_from_slice(&(0o040777u16).to_le_bytes());
        let want = RootAttrs { mode: 0o1755, uid: 7, gid: 8, mtime: 1_796_118_876, mtime_nsec: 5 };
        set_root_attrs(&mut inode, &want).unwrap();
        assert_eq!(root_attrs(&inode).unwrap(), want);
        assert_eq!(u16_at(&inode, 0x04), 0o041755);
        let mut compact = vec![0u8; 64];
        assert_eq!(set_root_attrs(&mut compact, &want), Err(LayoutError::CompactRoot));
    }
}

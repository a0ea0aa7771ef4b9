//! Writes a [`MergedTree`] as one metadata-only EROFS image over its layer images:
//!
//! ```text
//! block 0: superblock (1024) | device table: slot i = layer i, device i + 1 (1152) |
//! inodes from there on (meta_blkaddr 0), root first, then breadth first in name order:
//!   extended inode | inline xattrs | a directory's or symlink's last block (inline) or a
//!   regular file's chunk indexes (device i + 1, block in layer i; holes stay holes)
//! blocks after the inodes: the directory and symlink blocks that did not fit inline
//! ```
//!
//! Every inode is extended (each keeps its own mtime) and every xattr inline; a regular file
//! is chunk-based, its chunks on the devices: a flat file of `n` blocks is one chunk of
//! `next_power_of_two(n)` blocks (the file's size ends it), a chunked one keeps its layer's
//! chunks. Each device's `mapped_blkaddr` is where it starts when the image and the layers,
//! in that order, are one disk ([`super::disk`]). No build time; the UUID comes from a seed:
//! the same tree gives the same bytes.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::tree::{Leaf, MergedTree, ROOT};
use crate::erofs::format::{self as f, DataLayout, Superblock};
use crate::erofs::read::{FileData, Xattr};

/// Bytes of a block, an inode slot and a chunk index.
const BLOCK: u64 = f::BLOCK as u64;
const SLOT: u64 = f::SLOT as u64;
const CHUNK_INDEX: u64 = f::CHUNK_INDEX as u64;

/// Why a merged tree cannot be written as EROFS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("{path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the xattrs of one file take {bytes} bytes (an inode holds at most 262148)", path = crate::layer::path::display(path))]
    XattrsTooBig { path: Vec<u8>, bytes: u64 },
    #[error("the merged image would have more than 2^32 blocks, with its layers")]
    TooBig,
    #[error(
        "{layers} layers: their device table leaves no room for the root inode's number (at most about 16000 layers)"
    )]
    TooManyLayers { layers: usize },
}

/// One inode of the image: the node it writes and what is computed for it.
struct Slot {
    node: usize,
    nlink: u32,
    /// The parent directory's slot (directories only).
    parent: usize,
    /// Absolute byte offset (nid * 32).
    offset: u64,
    layout: DataLayout,
    size: u64,
    xattr_icount: u16,
    /// Bytes of this inode's data stored in blocks after the metadata, and their first block.
    plain_bytes: u64,
    plain_start: u32,
}

/// Bytes of the inline xattr area of `xattrs` (0 for none).
fn xattr_area(xattrs: &[Xattr]) -> usize {
    if xattrs.is_empty() {
        return 0;
    }
    f::XATTR_IBODY_HEADER
        + xattrs.iter().map(|x| f::xattr_entry_size(x.suffix.len(), x.value.len())).sum::<usize>()
}

/// A directory's entries with `.` and `..`, sorted by name (the order lookups search in):
/// (name, slot, file type).
fn dir_listing<'t>(
    tree: &'t MergedTree,
    slots: &[Slot],
    slot_of: &[usize],
    dir: usize,
) -> Vec<(&'t [u8], usize, u8)> {
    let mut all: Vec<(&[u8], usize, u8)> =
        vec![(b".", dir, f::FT_DIR), (b"..", slots[dir].parent, f::FT_DIR)];
    for (name, child) in tree.entries(slots[dir].node) {
        all.push((name, slot_of[child], f::file_type(tree.nodes[child].attrs.mode)));
    }
    all.sort_by(|a, b| a.0.cmp(b.0));
    all
}

/// The entries each directory block holds, for names of these lengths in order, and the
/// directory's size in bytes (the last block as long as it is used).
fn dir_layout(name_lens: impl IntoIterator<Item = usize>) -> (Vec<std::ops::Range<usize>>, u64) {
    let (blocks, last) = f::dir_blocks(name_lens);
    let size = (blocks.len() as u64 - 1) * BLOCK + last as u64;
    (blocks, size)
}

/// The chunk table of a file: chunk bits and, per chunk, (device, block).
fn chunks_of(layer: usize, size: u64, data: &FileData) -> (u8, Vec<(u16, u32)>) {
    let device = (layer + 1) as u16;
    match data {
        FileData::Empty => (0, Vec::new()),
        FileData::InlineTail => unreachable!("the merged tree refuses inlined tails"),
        FileData::Blocks { start } => {
            let blocks = size.div_ceil(BLOCK);
            let bits =
                (blocks.next_power_of_two().trailing_zeros()).min(u32::from(f::CHUNK_BLKBITS_MASK)) as u8;
            let count = blocks.div_ceil(1 << bits);
            let table = (0..count).map(|k| (device, start + (k << bits) as u32)).collect();
            (bits, table)
        }
        FileData::Chunks { chunk_bits, blocks } => {
            let table =
                blocks.iter().map(|&b| if b == f::NULL_ADDR { (0, b) } else { (device, b) }).collect();
            (*chunk_bits, table)
        }
    }
}

/// Writes `tree` to `out` (created), over layer images of `layer_blocks` blocks each (base
/// first), with the UUID `uuid`. Returns the image's size in blocks.
pub fn write(tree: &MergedTree, layer_blocks: &[u64], uuid: [u8; 16], out: &Path) -> Result<u64, WriteError> {
    let io = |source| WriteError::Io { path: out.to_owned(), source };
    let devices = u16::try_from(layer_blocks.len())
        .map_err(|_| WriteError::TooManyLayers { layers: layer_blocks.len() })?;

    let (mut slots, slot_of) = assign_slots(tree);
    let table_end =
        (f::SUPER_OFFSET as u64) + f::SUPER_SIZE as u64 + u64::from(devices) * f::DEVICE_SLOT as u64;
    let meta_blocks = place(tree, &mut slots, &slot_of, table_end)?;
    let mut block = meta_blocks;
    for slot in &mut slots {
        if slot.plain_bytes > 0 {
            slot.plain_start = u32::try_from(block).map_err(|_| WriteError::TooBig)?;
            block += slot.plain_bytes.div_ceil(BLOCK);
        }
    }
    let image_blocks = block;
    let root_nid = u16::try_from(slots[ROOT].offset / SLOT)
        .map_err(|_| WriteError::TooManyLayers { layers: layer_blocks.len() })?;
    let mut mapped = Vec::with_capacity(layer_blocks.len());
    let mut disk_blocks = image_blocks;
    for &blocks in layer_blocks {
        mapped.push((
            u32::try_from(blocks).map_err(|_| WriteError::TooBig)?,
            u32::try_from(disk_blocks).map_err(|_| WriteError::TooBig)?,
        ));
        disk_blocks += blocks;
    }
    u32::try_from(disk_blocks).map_err(|_| WriteError::TooBig)?;
    // Write: inodes in order, then the plain blocks in slot order.
    let file = fs_err::OpenOptions::new().read(true).write(true).create_new(true).open(out).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let pad_to = |w: &mut BufWriter<fs_err::File>, pos: &mut u64, to: u64| -> std::io::Result<()> {
        std::io::copy(&mut std::io::repeat(0).take(to - *pos), w)?;
        *pos = to;
        Ok(())
    };
    let mut plain: Vec<(usize, Vec<u8>)> = Vec::new();
    for (s, slot) in slots.iter().enumerate() {
        pad_to(&mut w, &mut pos, slot.offset).map_err(io)?;
        let node = &tree.nodes[slot.node];
        let mut fields = f::Inode {
            extended: true,
            layout: slot.layout,
            xattr_icount: slot.xattr_icount,
            mode: node.attrs.mode,
            nlink: slot.nlink,
            size: slot.size,
            i_u: 0,
            ino: s as u32 + 1,
            uid: node.attrs.uid,
            gid: node.attrs.gid,
            mtime: node.attrs.mtime,
            mtime_nsec: node.attrs.mtime_nsec,
        };
        // The data after the inode and xattrs: a tail, a chunk table or nothing.
        let mut after = Vec::new();
        match &node.leaf {
            Leaf::Dir(_) | Leaf::Symlink(_) => {
                let bytes = match &node.leaf {
                    Leaf::Dir(_) => dir_bytes(&dir_listing(tree, &slots, &slot_of, s), &slots),
                    Leaf::Symlink(t) => t.clone(),
                    _ => unreachable!(),
                };
                fields.i_u = slot.plain_start;
                let (head, tail) = bytes.split_at(slot.plain_bytes as usize);
                if !head.is_empty() {
                    plain.push((s, head.to_vec()));
                }
                if slot.layout == DataLayout::FlatInline {
                    after = tail.to_vec();
                }
            }
            Leaf::File(r) => {
                let (bits, table) = chunks_of(r.layer, node.attrs.size, &r.data);
                if !table.is_empty() {
                    fields.i_u = f::chunk_format(bits, true);
                    let head = slot.offset
                        + f::EXTENDED_INODE as u64
                        + f::xattr_ibody_size(slot.xattr_icount) as u64;
                    after.resize((head.next_multiple_of(CHUNK_INDEX) - head) as usize, 0);
                    for (device, blkaddr) in table {
                        after.extend(f::ChunkIndex { device_id: device, blkaddr }.encode());
                    }
                }
            }
            Leaf::Special => fields.i_u = node.attrs.i_u,
        }
        let mut record = fields.encode_extended().to_vec();
        record.extend(xattr_body(&node.xattrs));
        record.extend(after);
        w.write_all(&record).map_err(io)?;
        pos += record.len() as u64;
    }
    pad_to(&mut w, &mut pos, meta_blocks * BLOCK).map_err(io)?;
    for (s, bytes) in plain {
        pad_to(&mut w, &mut pos, u64::from(slots[s].plain_start) * BLOCK).map_err(io)?;
        w.write_all(&bytes).map_err(io)?;
        pos += bytes.len() as u64;
    }
    pad_to(&mut w, &mut pos, image_blocks * BLOCK).map_err(io)?;

    // Block 0: superblock and device table, then its checksum.
    let sb = Superblock {
        feature_compat: f::COMPAT_SB_CHKSUM,
        blkszbits: f::BLOCK_BITS,
        root_nid,
        inos: slots.len() as u64,
        blocks: image_blocks as u32,
        uuid,
        feature_incompat: f::INCOMPAT_CHUNKED_FILE | f::INCOMPAT_DEVICE_TABLE,
        extra_devices: devices,
        devt_slotoff: (((f::SUPER_OFFSET as u64) + f::SUPER_SIZE as u64) / f::DEVICE_SLOT as u64) as u16,
        ..Default::default()
    };
    let mut head = sb.encode().to_vec();
    for (blocks, mapped_blkaddr) in mapped {
        head.extend(f::DeviceSlot { tag: [0; 64], blocks, mapped_blkaddr }.encode());
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    let block0_len = f::BLOCK;
    let mut block0 = vec![0u8; block0_len];
    file.file().read_exact_at(&mut block0, 0).map_err(io)?;
    let sb_at = f::SUPER_OFFSET;
    let in_block0 = head.len().min(block0_len - sb_at);
    block0[sb_at..sb_at + in_block0].copy_from_slice(&head[..in_block0]);
    let crc = f::superblock_checksum(&block0[sb_at..]);
    block0[sb_at + 4..sb_at + 8].copy_from_slice(&crc.to_le_bytes());
    file.file().write_all_at(&block0, 0).map_err(io)?;
    // A device table longer than block 0 (more than 23 layers) goes on after it.
    if head.len() > in_block0 {
        file.file().write_all_at(&head[in_block0..], BLOCK).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    Ok(image_blocks)
}

/// The slots of `tree`'s inodes: the root, then breadth first in name order, a non-directory
/// once per origin (its hardlinks share it); and the slot of each reachable node.
fn assign_slots(tree: &MergedTree) -> (Vec<Slot>, Vec<usize>) {
    // At most one slot per node: no growth beyond that.
    let mut slots = Vec::with_capacity(tree.nodes.len());
    slots.push(Slot::new(ROOT, ROOT));
    let mut slot_of = vec![usize::MAX; tree.nodes.len()];
    slot_of[ROOT] = 0;
    let mut by_origin: HashMap<(usize, u64), usize> = HashMap::new();
    let mut dir = 0;
    while dir < slots.len() {
        if matches!(tree.nodes[slots[dir].node].leaf, Leaf::Dir(_)) {
            let mut subdirs = 0;
            for (_, child) in tree.entries(slots[dir].node) {
                let node = &tree.nodes[child];
                let slot = if matches!(node.leaf, Leaf::Dir(_)) {
                    subdirs += 1;
                    slots.push(Slot::new(child, dir));
                    slots.len() - 1
                } else if node.attrs.nlink > 1 {
                    // Only an inode with more than one link in its layer can be reached twice.
                    *by_origin.entry(node.origin).or_insert_with(|| {
                        slots.push(Slot::new(child, dir));
                        slots.len() - 1
                    })
                } else {
                    slots.push(Slot::new(child, dir));
                    slots.len() - 1
                };
                slots[slot].nlink += 1;
                slot_of[child] = slot;
            }
            slots[dir].nlink = 2 + subdirs;
        }
        dir += 1;
    }
    (slots, slot_of)
}

/// Sizes each slot's inode and places it, from byte `start` on; returns the blocks the
/// inodes take (the blocks of directories and symlinks too big to inline follow them).
fn place(tree: &MergedTree, slots: &mut [Slot], slot_of: &[usize], start: u64) -> Result<u64, WriteError> {
    let mut at = start.next_multiple_of(SLOT);
    for s in 0..slots.len() {
        let node = &tree.nodes[slots[s].node];
        let area = xattr_area(&node.xattrs);
        let icount = f::xattr_icount(area).ok_or_else(|| WriteError::XattrsTooBig {
            path: path_of(tree, slots, slot_of, s),
            bytes: area as u64,
        })?;
        let head = f::EXTENDED_INODE as u64 + f::xattr_ibody_size(icount) as u64;
        let (layout, size, tail_or_table) = match &node.leaf {
            Leaf::Dir(_) => {
                let listing = dir_listing(tree, slots, slot_of, s);
                let (_, size) = dir_layout(listing.iter().map(|e| e.0.len()));
                (DataLayout::FlatInline, size, 0)
            }
            Leaf::Symlink(target) => (DataLayout::FlatInline, target.len() as u64, 0),
            Leaf::File(r) => {
                let (_, table) = chunks_of(r.layer, node.attrs.size, &r.data);
                if table.is_empty() {
                    (DataLayout::FlatPlain, node.attrs.size, 0)
                } else {
                    let pad = (at + head).next_multiple_of(CHUNK_INDEX) - (at + head);
                    (DataLayout::ChunkBased, node.attrs.size, pad + table.len() as u64 * CHUNK_INDEX)
                }
            }
            Leaf::Special => (DataLayout::FlatPlain, 0, 0),
        };
        let slot = &mut slots[s];
        slot.xattr_icount = icount;
        slot.size = size;
        slot.layout = layout;
        let mut record = head + tail_or_table;
        if layout == DataLayout::FlatInline {
            // The last block inline, unless inode, xattrs and it do not fit one block.
            let tail = size - size.saturating_sub(1) / BLOCK * BLOCK;
            if head + tail > BLOCK {
                slot.layout = DataLayout::FlatPlain;
                slot.plain_bytes = size;
            } else {
                slot.plain_bytes = size - tail;
                // The kernel wants the inode, its xattrs and the tail in one block.
                if at % BLOCK + head + tail > BLOCK {
                    at = at.next_multiple_of(BLOCK);
                }
                record += tail;
            }
        }
        slot.offset = at;
        at = (at + record).next_multiple_of(SLOT);
    }
    Ok(at.div_ceil(BLOCK))
}

impl Slot {
    fn new(node: usize, parent: usize) -> Slot {
        Slot {
            node,
            nlink: 0,
            parent,
            offset: 0,
            layout: DataLayout::FlatPlain,
            size: 0,
            xattr_icount: 0,
            plain_bytes: 0,
            plain_start: 0,
        }
    }
}

/// A directory's blocks: entries then names per block, the last block as long as it is used.
fn dir_bytes(listing: &[(&[u8], usize, u8)], slots: &[Slot]) -> Vec<u8> {
    let (blocks, size) = dir_layout(listing.iter().map(|e| e.0.len()));
    let mut out = vec![0; size as usize];
    for (i, range) in blocks.into_iter().enumerate() {
        let entries = listing[range].iter().map(|&(name, slot, ft)| (name, slots[slot].offset / SLOT, ft));
        f::encode_dir_block(entries, &mut out[i * f::BLOCK..]);
    }
    out
}

/// The inline xattr area of `xattrs` (empty for none): header, then each entry padded to 4.
fn xattr_body(xattrs: &[Xattr]) -> Vec<u8> {
    if xattrs.is_empty() {
        return Vec::new();
    }
    let mut out = f::xattr_ibody_header(0).to_vec();
    for x in xattrs {
        // Lengths as the layer blob had them: a name suffix of at most 255 bytes, a value of
        // at most 65535.
        f::push_xattr_entry(&mut out, x.index, &x.suffix, &x.value);
    }
    out
}

/// The path of slot `s` (for error messages), from the root.
fn path_of(tree: &MergedTree, slots: &[Slot], slot_of: &[usize], s: usize) -> Vec<u8> {
    let mut parts = Vec::new();
    let mut at = s;
    while at != 0 {
        let parent = slots[at].parent;
        let name = tree.entries(slots[parent].node).find(|&(_, c)| slot_of[c] == at).map(|(n, _)| n.to_vec());
        parts.push(name.unwrap_or_default());
        at = parent;
    }
    parts.reverse();
    parts.join(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_entries_fill_blocks_without_splitting_one() {
        // (name lengths, entries per block, directory size)
        let cases: &[(&[usize], &[usize], u64)] = &[
            (&[1, 2], &[2], 24 + 3),
            // 4096 = 12 * 128 + 20 * 128 + 0: 128 entries of 20-byte names fill a block exactly.
            (&[20; 128], &[128], 4096),
            (&[20; 129], &[128, 1], 4096 + 32),
            (&[255; 20], &[15, 5], 4096 + 5 * (12 + 255)),
        ];
        for (lens, blocks, size) in cases {
            let (ranges, found) = dir_layout(lens.iter().copied());
            let counts: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            assert_eq!((counts, found), (blocks.to_vec(), *size), "{lens:?}");
        }
    }

    #[test]
    fn file_data_maps_to_chunks_on_its_layers_device() {
        let blocks = |start| FileData::Blocks { start };
        // (layer, size, data) → (chunk bits, indexes)
        assert_eq!(chunks_of(0, 1, &blocks(7)), (0, vec![(1, 7)]));
        assert_eq!(chunks_of(2, 4096 * 3, &blocks(10)), (2, vec![(3, 10)]), "3 blocks: one chunk of 4");
        assert_eq!(chunks_of(1, 4096 * 4 + 1, &blocks(10)), (3, vec![(2, 10)]));
        // More blocks than the largest chunk (2^31 blocks) covers: two chunks.
        let huge = (4096u64 << 31) + 1;
        assert_eq!(chunks_of(0, huge, &blocks(0)), (31, vec![(1, 0), (1, 1 << 31)]));
        let chunked = FileData::Chunks { chunk_bits: 8, blocks: vec![5, f::NULL_ADDR, 9] };
        assert_eq!(
            chunks_of(4, 1 << 22, &chunked),
            (8, vec![(5, 5), (0, f::NULL_ADDR), (5, 9)]),
            "holes stay holes"
        );
        assert_eq!(chunks_of(0, 0, &FileData::Empty), (0, vec![]));
    }
}

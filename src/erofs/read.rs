//! Reads an uncompressed EROFS image with 4096-byte blocks ([`super::format`]): superblock,
//! inodes (compact and extended), directories, inline and shared xattrs, and the data
//! mapping of a file (flat, flat with an inlined last block, chunk-based).
//!
//! The images come from registries, so every field is checked before it is used: an offset
//! or length past the end of the image, a name that is no name, a chunk table longer than the
//! image, an unknown layout or feature ends in a [`ReadError`] naming the image and the inode.
//! Nothing is allocated by a claimed size before the image is known to hold that many bytes,
//! and a reader walking directories refuses a directory it reaches twice
//! ([`ReadError::DirectoryTwice`]), so a looping tree ends.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self as f, DataLayout, Superblock};

/// Bytes of a block.
const BLOCK: u64 = f::BLOCK as u64;

/// An image that cannot be read as an EROFS layer.
// Each variant's message says what it is; not public API (tests/merge.rs matches variants
// through lib.rs's #[doc(hidden)] `erofs_merge`), so no doc comment per variant and field.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an EROFS image (no superblock magic)")]
    NotErofs { path: PathBuf },
    #[error("{path}: block size 2^{bits} (4096-byte blocks only)")]
    BlockSize { path: PathBuf, bits: u8 },
    #[error("{path}: unsupported incompatible features {features:#x} (compressed or newer images)")]
    Features { path: PathBuf, features: u32 },
    #[error("{path}: {what} at byte {offset} ({len} bytes) lies past the image's end ({image_bytes} bytes)")]
    PastEnd { path: PathBuf, what: &'static str, offset: u64, len: u64, image_bytes: u64 },
    #[error("{path}: inode {nid} has data layout {layout} (uncompressed layouts 0, 2 and 4 only)")]
    Layout { path: PathBuf, nid: u64, layout: u8 },
    #[error("{path}: inode {nid} has chunk format {format:#x}")]
    ChunkFormat { path: PathBuf, nid: u64, format: u16 },
    #[error("{path}: inode {nid} has a chunk on device {device}: a layer image has no devices")]
    ChunkDevice { path: PathBuf, nid: u64, device: u16 },
    #[error("{path}: inode {nid}'s data (blocks {start}..{end}) lies past the image's {blocks} blocks")]
    DataPastEnd { path: PathBuf, nid: u64, start: u64, end: u64, blocks: u64 },
    #[error("{path}: directory inode {nid}, block {block}: {problem}")]
    Directory { path: PathBuf, nid: u64, block: u64, problem: DirectoryProblem },
    #[error("{path}: inode {nid}'s xattrs: {problem}")]
    Xattr { path: PathBuf, nid: u64, problem: XattrProblem },
    #[error("{path}: directory inode {nid} is reached twice (a looping or shared directory)")]
    DirectoryTwice { path: PathBuf, nid: u64 },
    #[error("{path}: inode {nid} is {found}, not {expected}")]
    FileType { path: PathBuf, nid: u64, expected: &'static str, found: &'static str },
    #[error("{path}: inode {nid} claims {size} bytes for a {what} (at most {max})")]
    TooBig { path: PathBuf, nid: u64, what: &'static str, size: u64, max: u64 },
}

/// What is wrong with a directory block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryProblem {
    #[error("its first name offset {0} is not a whole number of entries inside the block")]
    FirstNameOffset(u16),
    #[error("entry {0}'s name offset is out of order or past the block")]
    NameOffset(usize),
    #[error("entry {0} has an empty name, or one longer than 255 bytes, or one with '/' or NUL")]
    Name(usize),
}

/// What is wrong with an inode's xattrs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XattrProblem {
    #[error("its {0} shared ids do not fit its inline area")]
    SharedCount(u8),
    #[error("an entry runs past the inline area")]
    EntryPastEnd,
    #[error("an entry has name index {0} (long name prefixes are not supported)")]
    NameIndex(u8),
}

/// An EROFS image open for reading.
#[derive(Debug)]
pub struct Image {
    file: fs_err::File,
    /// Its superblock, as read.
    pub superblock: Superblock,
    /// The image's length in bytes.
    pub bytes: u64,
}

/// An inode as read: its fields and its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub nid: u64,
    pub fields: f::Inode,
    /// Byte offset of the inode in the image.
    pub offset: u64,
}

impl Inode {
    pub fn file_type(&self) -> u8 {
        f::file_type(self.fields.mode)
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == f::FT_DIR
    }
    /// Byte offset of what follows the inode and its inline xattrs.
    fn after_xattrs(&self) -> u64 {
        self.offset + self.fields.size_on_disk() as u64 + f::xattr_ibody_size(self.fields.xattr_icount) as u64
    }
}

/// One xattr: its name index (1 `user.`, 2 `system.posix_acl_access`, 3
/// `system.posix_acl_default`, 4 `trusted.`, 6 `security.`), the rest of its name, its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    pub index: u8,
    pub suffix: Vec<u8>,
    pub value: Vec<u8>,
}

/// One directory entry other than `.` and `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
}

/// Where a regular file's bytes are in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// No bytes.
    Empty,
    /// `ceil(size / 4096)` blocks from `start`.
    Blocks { start: u32 },
    /// Chunks of `4096 << chunk_bits` bytes, each at a block of the image or a hole
    /// ([`f::NULL_ADDR`]).
    Chunks { chunk_bits: u8, blocks: Vec<u32> },
    /// The last block is stored inside the metadata (FLAT_INLINE): not addressable by block.
    InlineTail,
}

/// The largest directory or symlink vmrootfs reads whole (a directory of ~1M entries).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
const MAX_SYMLINK_BYTES: u64 = 4096;

impl Image {
    /// Opens `path` and checks its superblock.
    pub fn open(path: &Path) -> Result<Image, ReadError> {
        let file =
            fs_err::File::open(path).map_err(|source| ReadError::Io { path: path.to_owned(), source })?;
        let bytes = file.metadata().map_err(|source| ReadError::Io { path: path.to_owned(), source })?.len();
        let mut image = Image { file, superblock: Superblock::default(), bytes };
        let mut raw = [0u8; f::SUPER_SIZE];
        image.read_at(&mut raw, f::SUPER_OFFSET as u64, "superblock")?;
        let sb = Superblock::decode(&raw).ok_or_else(|| ReadError::NotErofs { path: path.to_owned() })?;
        if sb.blkszbits != f::BLOCK_BITS {
            return Err(ReadError::BlockSize { path: path.to_owned(), bits: sb.blkszbits });
        }
        let known = f::INCOMPAT_CHUNKED_FILE | f::INCOMPAT_DEVICE_TABLE;
        if sb.feature_incompat & !known != 0 {
            return Err(ReadError::Features {
                path: path.to_owned(),
                features: sb.feature_incompat & !known,
            });
        }
        image.superblock = sb;
        Ok(image)
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Reads `buf.len()` bytes at `offset`, which must lie inside the image.
    fn read_at(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<(), ReadError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.bytes) {
            return Err(ReadError::PastEnd {
                path: self.path().to_owned(),
                what,
                offset,
                len,
                image_bytes: self.bytes,
            });
        }
        self.file
            .file()
            .read_exact_at(buf, offset)
            .map_err(|source| ReadError::Io { path: self.path().to_owned(), source })
    }

    /// The image's blocks, whole or not.
    fn blocks(&self) -> u64 {
        self.bytes.div_ceil(BLOCK)
    }

    /// The root directory's inode.
    pub fn root(&self) -> Result<Inode, ReadError> {
        self.inode(u64::from(self.superblock.root_nid))
    }

    /// The inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode, ReadError> {
        let offset = nid
            .checked_mul(f::SLOT as u64)
            .and_then(|o| o.checked_add(u64::from(self.superblock.meta_blkaddr) * BLOCK))
            .unwrap_or(u64::MAX);
        let mut raw = [0u8; f::EXTENDED_INODE];
        self.read_at(&mut raw[..f::COMPACT_INODE], offset, "inode")?;
        if raw[0] & 1 != 0 {
            self.read_at(&mut raw, offset, "inode")?;
        }
        let layout = (raw[0] >> 1) & 0x7;
        let mut fields = match f::Inode::decode(&raw) {
            Some(i)
                if matches!(
                    i.layout,
                    DataLayout::FlatPlain | DataLayout::FlatInline | DataLayout::ChunkBased
                ) =>
            {
                i
            }
            _ => return Err(ReadError::Layout { path: self.path().to_owned(), nid, layout }),
        };
        if !fields.extended {
            fields.mtime = self.superblock.build_time;
            fields.mtime_nsec = self.superblock.build_time_nsec;
        }
        Ok(Inode { nid, fields, offset })
    }

    /// Reads `len` bytes of the flat (plain or inline) data of `inode` from `pos`.
    fn read_flat(&self, inode: &Inode, pos: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let size = inode.fields.size;
        let blocks = size.div_ceil(BLOCK);
        let inline = inode.fields.layout == DataLayout::FlatInline;
        let plain_blocks = if inline { blocks.saturating_sub(1) } else { blocks };
        let start = u64::from(inode.fields.i_u);
        if start + plain_blocks > self.blocks() && plain_blocks > 0 {
            return Err(ReadError::DataPastEnd {
                path: self.path().to_owned(),
                nid: inode.nid,
                start,
                end: start + plain_blocks,
                blocks: self.blocks(),
            });
        }
        let block = pos / BLOCK;
        if block < plain_blocks {
            self.read_at(buf, (start + block) * BLOCK + pos % BLOCK, "file data")
        } else {
            let tail_at = inode.after_xattrs();
            // The kernel refuses a tail that crosses a block boundary; so does this reader.
            let tail_len = size - plain_blocks * BLOCK;
            if tail_at % BLOCK + tail_len > BLOCK {
                return Err(ReadError::PastEnd {
                    path: self.path().to_owned(),
                    what: "inline data (crosses a block boundary)",
                    offset: tail_at,
                    len: tail_len,
                    image_bytes: self.bytes,
                });
            }
            self.read_at(buf, tail_at + (pos - plain_blocks * BLOCK), "inline data")
        }
    }

    fn expect_type(&self, inode: &Inode, ft: u8, expected: &'static str) -> Result<(), ReadError> {
        if inode.file_type() == ft {
            return Ok(());
        }
        Err(ReadError::FileType {
            path: self.path().to_owned(),
            nid: inode.nid,
            expected,
            found: type_name(inode.file_type()),
        })
    }

    /// The size of `inode`, a directory or symlink, which must be stored flat and hold at most
    /// `max` bytes: what `what` names is refused otherwise.
    fn flat_within(&self, inode: &Inode, max: u64, what: &'static str) -> Result<u64, ReadError> {
        let size = inode.fields.size;
        if inode.fields.layout == DataLayout::ChunkBased || size > max {
            return Err(ReadError::TooBig { path: self.path().to_owned(), nid: inode.nid, what, size, max });
        }
        Ok(size)
    }

    /// The entries of directory `inode`, without `.` and `..`, in on-disk order.
    pub fn dir_entries(&self, inode: &Inode) -> Result<Vec<DirEntry>, ReadError> {
        self.expect_type(inode, f::FT_DIR, "a directory")?;
        let size = self.flat_within(inode, MAX_DIRECTORY_BYTES, "directory (or one not stored flat)")?;
        let mut out = Vec::new();
        let mut block = vec![0u8; f::BLOCK];
        for b in 0..size.div_ceil(BLOCK) {
            let len = (size - b * BLOCK).min(BLOCK) as usize;
            self.read_flat(inode, b * BLOCK, &mut block[..len])?;
            parse_dir_block(&block[..len], &mut out).map_err(|problem| ReadError::Directory {
                path: self.path().to_owned(),
                nid: inode.nid,
                block: b,
                problem,
            })?;
        }
        Ok(out)
    }

    /// The target of symlink `inode`.
    pub fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>, ReadError> {
        self.expect_type(inode, f::FT_SYMLINK, "a symbolic link")?;
        let size = self.flat_within(inode, MAX_SYMLINK_BYTES, "symbolic link (or one not stored flat)")?;
        let mut target = vec![0u8; size as usize];
        let mut done = 0;
        while done < target.len() {
            let n = (target.len() - done).min(f::BLOCK - done % f::BLOCK);
            self.read_flat(inode, done as u64, &mut target[done..done + n])?;
            done += n;
        }
        Ok(target)
    }

    /// Where regular file `inode`'s bytes are.
    pub fn file_data(&self, inode: &Inode) -> Result<FileData, ReadError> {
        self.expect_type(inode, f::FT_REG_FILE, "a regular file")?;
        let size = inode.fields.size;
        let nid = inode.nid;
        let path = || self.path().to_owned();
        if size == 0 {
            return Ok(FileData::Empty);
        }
        match inode.fields.layout {
            DataLayout::FlatInline => Ok(FileData::InlineTail),
            DataLayout::FlatPlain => {
                let start = u64::from(inode.fields.i_u);
                let end = start + size.div_ceil(BLOCK);
                if end > self.blocks() {
                    return Err(ReadError::DataPastEnd {
                        path: path(),
                        nid,
                        start,
                        end,
                        blocks: self.blocks(),
                    });
                }
                Ok(FileData::Blocks { start: inode.fields.i_u })
            }
            _ => {
                let format = inode.fields.i_u as u16;
                if format & !(f::CHUNK_BLKBITS_MASK | f::CHUNK_FORMAT_INDEXES) != 0 {
                    return Err(ReadError::ChunkFormat { path: path(), nid, format });
                }
                let chunk_bits = (format & f::CHUNK_BLKBITS_MASK) as u8;
                let chunk_bytes_log2 = u32::from(chunk_bits) + u32::from(f::BLOCK_BITS);
                let count = size.div_ceil(1u64 << chunk_bytes_log2);
                let indexes = format & f::CHUNK_FORMAT_INDEXES != 0;
                let unit = if indexes { f::CHUNK_INDEX } else { f::BLOCK_MAP_ENTRY } as u64;
                // The map's alignment counts from the metadata area's start, a block boundary.
                let table_at = f::chunk_map_start(inode.after_xattrs(), indexes);
                // The table must be in the image before it is read (or allocated for).
                let table_len = count.saturating_mul(unit);
                if table_at.checked_add(table_len).is_none_or(|end| end > self.bytes) {
                    return Err(ReadError::PastEnd {
                        path: path(),
                        what: "chunk table",
                        offset: table_at,
                        len: table_len,
                        image_bytes: self.bytes,
                    });
                }
                let mut raw = vec![0u8; table_len as usize];
                self.read_at(&mut raw, table_at, "chunk table")?;
                let chunk_blocks = 1u64 << chunk_bits;
                let mut blocks = Vec::with_capacity(count as usize);
                for (i, entry) in raw.chunks_exact(unit as usize).enumerate() {
                    let (device, blkaddr) = if indexes {
                        let index = f::ChunkIndex::decode(entry.try_into().expect("an 8-byte index"));
                        (index.device_id, index.blkaddr)
                    } else {
                        (0, u32::from_le_bytes(entry.try_into().expect("a 4-byte entry")))
                    };
                    if blkaddr != f::NULL_ADDR {
                        if device != 0 {
                            return Err(ReadError::ChunkDevice { path: path(), nid, device });
                        }
                        // The last chunk holds only what is left of the file.
                        let chunk_len = (size - i as u64 * (chunk_blocks << f::BLOCK_BITS))
                            .min(chunk_blocks << f::BLOCK_BITS)
                            .div_ceil(BLOCK);
                        let start = u64::from(blkaddr);
                        if start + chunk_len > self.blocks() {
                            let end = start + chunk_len;
                            return Err(ReadError::DataPastEnd {
                                path: path(),
                                nid,
                                start,
                                end,
                                blocks: self.blocks(),
                            });
                        }
                    }
                    blocks.push(blkaddr);
                }
                Ok(FileData::Chunks { chunk_bits, blocks })
            }
        }
    }

    /// The xattrs of `inode`, shared ones first, in on-disk order.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, ReadError> {
        let area = f::xattr_ibody_size(inode.fields.xattr_icount);
        if area == 0 {
            return Ok(Vec::new());
        }
        let problem = |problem| ReadError::Xattr { path: self.path().to_owned(), nid: inode.nid, problem };
        // At most 12 + 65534 * 4 bytes: the u16 count bounds it.
        let mut body = vec![0u8; area];
        self.read_at(&mut body, inode.offset + inode.fields.size_on_disk() as u64, "inline xattrs")?;
        let shared = body[4];
        let mut at = f::XATTR_IBODY_HEADER + usize::from(shared) * 4;
        if at > body.len() {
            return Err(problem(XattrProblem::SharedCount(shared)));
        }
        let mut out = Vec::new();
        for i in 0..usize::from(shared) {
            let id_at = f::XATTR_IBODY_HEADER + i * 4;
            let id = u32::from_le_bytes(body[id_at..id_at + 4].try_into().expect("4 bytes"));
            let offset = u64::from(self.superblock.xattr_blkaddr) * BLOCK + u64::from(id) * 4;
            let mut head = [0u8; f::XATTR_ENTRY_HEAD];
            self.read_at(&mut head, offset, "shared xattr")?;
            let (name_len, index, value_len) = entry_head(&head);
            let mut rest = vec![0u8; name_len + value_len];
            self.read_at(&mut rest, offset + f::XATTR_ENTRY_HEAD as u64, "shared xattr")?;
            out.push(xattr_of(index, &rest, name_len).map_err(problem)?);
        }
        while at + f::XATTR_ENTRY_HEAD <= body.len() {
            let (name_len, index, value_len) = entry_head(&body[at..]);
            let end = at + f::xattr_entry_size(name_len, value_len);
            if end > body.len() {
                return Err(problem(XattrProblem::EntryPastEnd));
            }
            let rest = &body[at + f::XATTR_ENTRY_HEAD..at + f::XATTR_ENTRY_HEAD + name_len + value_len];
            out.push(xattr_of(index, rest, name_len).map_err(problem)?);
            at = end;
        }
        Ok(out)
    }
}

/// An xattr entry's head: name length, name index, value length.
fn entry_head(b: &[u8]) -> (usize, u8, usize) {
    (usize::from(b[0]), b[1], usize::from(u16::from_le_bytes([b[2], b[3]])))
}

fn xattr_of(index: u8, name_and_value: &[u8], name_len: usize) -> Result<Xattr, XattrProblem> {
    if f::xattr_prefix(index).is_none() {
        return Err(XattrProblem::NameIndex(index));
    }
    let (suffix, value) = name_and_value.split_at(name_len);
    Ok(Xattr { index, suffix: suffix.to_vec(), value: value.to_vec() })
}

/// Appends the entries of one directory block (`block`: its bytes within the directory's
/// size) to `out`, skipping `.` and `..`.
fn parse_dir_block(block: &[u8], out: &mut Vec<DirEntry>) -> Result<(), DirectoryProblem> {
    let dirent =
        |i: usize| f::Dirent::decode(block[i * f::DIRENT..(i + 1) * f::DIRENT].try_into().expect("12 bytes"));
    if block.len() < f::DIRENT {
        return Err(DirectoryProblem::FirstNameOffset(0));
    }
    let first = dirent(0).nameoff;
    let n = usize::from(first) / f::DIRENT;
    if n == 0 || !usize::from(first).is_multiple_of(f::DIRENT) || usize::from(first) > block.len() {
        return Err(DirectoryProblem::FirstNameOffset(first));
    }
    for i in 0..n {
        let d = dirent(i);
        let start = usize::from(d.nameoff);
        let end = if i + 1 < n {
            usize::from(dirent(i + 1).nameoff)
        } else {
            // The last name runs to the end of the block or its first NUL.
            let rest = block.get(start..).ok_or(DirectoryProblem::NameOffset(i))?;
            start + rest.iter().position(|&b| b == 0).unwrap_or(rest.len())
        };
        if start < usize::from(first) || end < start || end > block.len() {
            return Err(DirectoryProblem::NameOffset(i));
        }
        let name = &block[start..end];
        if name.is_empty() || name.len() > f::NAME_LEN || name.contains(&b'/') || name.contains(&0) {
            return Err(DirectoryProblem::Name(i));
        }
        if name == b"." || name == b".." {
            continue;
        }
        out.push(DirEntry { name: name.to_vec(), nid: d.nid, file_type: d.file_type });
    }
    Ok(())
}

fn type_name(ft: u8) -> &'static str {
    match ft {
        f::FT_REG_FILE => "a regular file",
        f::FT_DIR => "a directory",
        f::FT_CHRDEV => "a character device",
        f::FT_BLKDEV => "a block device",
        f::FT_FIFO => "a FIFO",
        f::FT_SOCK => "a socket",
        f::FT_SYMLINK => "a symbolic link",
        _ => "of an unknown type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(entries: &[(&[u8], u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        let mut nameoff = entries.len() * f::DIRENT;
        for (name, nid) in entries {
            b.extend(f::Dirent { nid: *nid, nameoff: nameoff as u16, file_type: f::FT_REG_FILE }.encode());
            nameoff += name.len();
        }
        for (name, _) in entries {
            b.extend(*name);
        }
        b
    }

    #[test]
    fn directory_blocks_parse_and_hostile_ones_are_refused() {
        let mut out = Vec::new();
        parse_dir_block(&block(&[(b".", 1), (b"..", 1), (b"a", 5), (b"bc", 6)]), &mut out).unwrap();
        let names: Vec<_> = out.iter().map(|e| (e.name.as_slice(), e.nid)).collect();
        assert_eq!(names, [(&b"a"[..], 5), (&b"bc"[..], 6)]);

        let mut padded = block(&[(b"x", 1)]);
        padded.extend([0; 10]);
        out.clear();
        parse_dir_block(&padded, &mut out).unwrap();
        assert_eq!(out[0].name, b"x");

        let mut bad = block(&[(b"a", 1), (b"b", 2)]);
        bad[8] = 13; // first name offset not a multiple of 12
        assert_eq!(parse_dir_block(&bad, &mut out), Err(DirectoryProblem::FirstNameOffset(13)));
        let mut bad = block(&[(b"a", 1), (b"b", 2)]);
        bad[12 + 8] = 0xff; // second name offset past the block
        assert_eq!(parse_dir_block(&bad, &mut out), Err(DirectoryProblem::NameOffset(0)));
        assert_eq!(parse_dir_block(&block(&[(b"a/b", 1)]), &mut out), Err(DirectoryProblem::Name(0)));
        assert_eq!(parse_dir_block(&[0; 5], &mut out), Err(DirectoryProblem::FirstNameOffset(0)));
        assert_eq!(parse_dir_block(&[0; 4096], &mut out), Err(DirectoryProblem::FirstNameOffset(0)));
    }
}

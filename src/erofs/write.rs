//! An EROFS image written in one pass over a layer's entries.
//!
//! File data goes out as it arrives, block after block from block 1, so the data of the whole
//! layer is one sequential write and nothing is staged. A file is whole blocks
//! (`FLAT_PLAIN`, the last block zero-padded: no tail is ever inlined, so a merged image can
//! address every file's data in the layer blob); a file with all-zero chunks (64 KiB to 1 MiB)
//! is chunk-based, its zero chunks holes (null entries of a 4-byte block map) that take no
//! blocks. The tree
//! (inodes, names, xattrs) is kept in memory, compactly (names interned in a [`PathTree`], a
//! directory's entries a list through its children's ids, a fixed-size record per inode);
//! when the entries end, [`ImageWriter::finish`] writes after the data the directory blocks
//! that do not fit inline, then the metadata area, and last the superblock.
//!
//! ```text
//! block 0: superblock at 1024 │ 1..: file data in stream order │ directory and symlink blocks
//!   │ metadata area (meta_blkaddr): inodes in entry order, the root first (nid 0), each
//!     followed by its inline xattrs, then its inline directory entries or symlink target
//!     (within the inode's block), or its chunk map
//! ```
//!
//! On-disk features, all mounted by Linux 5.15: extended (64-byte) inodes only, so every file
//! keeps its own mtime, 32-bit owners and a 64-bit size; inline xattrs with the built-in name
//! prefixes (no shared xattrs, no long prefixes); `FLAT_PLAIN` and `FLAT_INLINE` (directories
//! and symlinks only) and chunk-based files with a block map; 4096-byte blocks whatever the
//! host's page size. Overlayfs whiteouts (char 0:0) and opaque markers
//! (`trusted.overlay.opaque`) are entries and xattrs of the stream like any other.
//!
//! Reproducible: no clock (build time 0), no randomness; inodes in entry order, directory
//! entries sorted by name (the kernel's lookup is a binary search), UUID given by the caller.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{
    self, BLOCK, BLOCK_MAP_ENTRY, DataLayout, EXTENDED_INODE, Inode, NULL_ADDR, SLOT, Superblock,
};
use crate::backend::{BlockOut, PieceError, is_zero};
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;
use crate::layer::path;
use crate::layer::pathtree::{PathId, PathTree};

/// File data is read and written in pieces of this size; the largest chunk of a chunk-based
/// file.
const PIECE: usize = 1 << 20;
/// log2 of the most blocks in one chunk: a chunk fills at most one [`PIECE`].
const MAX_CHUNK_BITS: u8 = (PIECE / BLOCK).trailing_zeros() as u8;
/// log2 of the fewest blocks in one chunk (64 KiB): a hole is at least that long. Shorter runs
/// of zeros (padding in binaries, a zero page here and there) stay data, so such files stay
/// one flat run of blocks (one mapping for the kernel, not one per block), and a chunk map is
/// at most 1/16384 of its file.
const MIN_CHUNK_BITS: u8 = 4;
/// A file with holes gets the smallest chunks (from [`MIN_CHUNK_BITS`]) that keep its chunk
/// map at most this many entries (64 KiB), up to [`MAX_CHUNK_BITS`]: a 60 GiB file has 1 MiB
/// chunks.
const MAX_CHUNKS: u64 = 16384;
/// The most links to one inode vmrootfs writes (what ext4 allows).
const MAX_LINKS: u32 = 65000;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErofsError {
    #[error("entry {path:?}: {problem}")]
    Entry { path: String, problem: String },
    #[error("the image needs more than EROFS's 2^32 blocks of 4 KiB (16 TiB)")]
    TooBig,
    #[error("reading entry {path:?}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the image")]
    Write(#[source] io::Error),
}

fn entry_error(path: &[u8], problem: impl Into<String>) -> ErofsError {
    ErofsError::Entry { path: path::display(path), problem: problem.into() }
}

/// No path: the end of a directory's list of children (the root is no one's child).
const NO_PATH: PathId = PathTree::ROOT;
/// No inode: a path no longer linked (it was below a directory a non-directory replaced).
const NO_INO: u32 = u32::MAX;
/// The root directory's inode.
const ROOT_INO: u32 = 0;

/// Where a file's data is.
enum Data {
    /// Blocks from `start`, one after the other.
    Blocks { start: u32 },
    /// Chunks of `BLOCK << bits` bytes: `count` entries of [`ImageWriter::chunk_maps`] from
    /// `first`, [`NULL_ADDR`] for a hole.
    Chunks { bits: u8, first: u64, count: u32 },
}

enum Kind {
    /// Entries: the paths `first`, then each one's [`ImageWriter::next_sibling`] up to `last`,
    /// in entry order ([`NO_PATH`] when empty).
    Dir {
        parent: u32,
        first: PathId,
        last: PathId,
    },
    File {
        size: u64,
        data: Data,
    },
    /// Target: `len` bytes of [`ImageWriter::targets`] from `at`.
    Symlink {
        at: u64,
        len: u16,
    },
    /// A character or block device (`S_IFCHR`/`S_IFBLK`) and its `rdev`.
    Device {
        ifmt: u16,
        rdev: u32,
    },
    Fifo,
}

/// An inode: its kind, attributes and inline xattrs (encoded, header included).
struct Node {
    kind: Kind,
    mtime_sec: i64,
    xattrs: Option<Box<[u8]>>,
    uid: u32,
    gid: u32,
    mtime_nsec: u32,
    perm: u16,
    links: u32,
}

impl Node {
    fn ifmt(&self) -> u16 {
        match &self.kind {
            Kind::Dir { .. } => format::S_IFDIR,
            Kind::File { .. } => format::S_IFREG,
            Kind::Symlink { .. } => format::S_IFLNK,
            Kind::Device { ifmt, .. } => *ifmt,
            Kind::Fifo => format::S_IFIFO,
        }
    }

    fn xattr_bytes(&self) -> usize {
        self.xattrs.as_ref().map_or(0, |x| x.len())
    }
}

/// An image being written: [`ImageWriter::add`] each entry, then [`ImageWriter::finish`].
pub struct ImageWriter {
    file: File,
    /// The sequential writer of the data, then of the directory and symlink blocks.
    out: BlockOut,
    /// Next block `out` writes.
    next: u64,
    tree: Tree,
    /// The chunk map of the file being written.
    file_map: Vec<u32>,
    uuid: [u8; 16],
}

/// The image's inodes and paths.
struct Tree {
    /// Inode `n` is `nodes[n]`; `None` once no longer linked.
    nodes: Vec<Option<Node>>,
    /// Every path of the image; `path_ino[id]` is path `id`'s inode ([`NO_INO`] once
    /// unlinked), `next_sibling[id]` the next entry of its directory.
    paths: PathTree,
    path_ino: Vec<u32>,
    next_sibling: Vec<PathId>,
    /// The block maps of all chunk-based files, each file's in a run.
    chunk_maps: Vec<u32>,
    /// The targets of all symlinks, back to back.
    targets: Vec<u8>,
}

enum DataError {
    Piece(PieceError),
    TooBig,
}

impl ImageWriter {
    /// Starts the image `out` (created, or truncated).
    pub fn create(out: &Path, uuid: [u8; 16]) -> io::Result<ImageWriter> {
        let file = fs_err::File::create(out)?.into_parts().0;
        let mut data = file.try_clone()?;
        data.seek(SeekFrom::Start(BLOCK as u64))?;
        let root = Node {
            kind: Kind::Dir { parent: ROOT_INO, first: NO_PATH, last: NO_PATH },
            mtime_sec: 0,
            xattrs: None,
            uid: 0,
            gid: 0,
            mtime_nsec: 0,
            perm: 0o755,
            links: 1,
        };
        Ok(ImageWriter {
            file,
            out: BlockOut::new(data, PIECE),
            next: 1,
            tree: Tree {
                nodes: vec![Some(root)],
                paths: PathTree::default(),
                path_ino: vec![ROOT_INO],
                next_sibling: vec![NO_PATH],
                chunk_maps: Vec::new(),
                targets: Vec::new(),
            },
            file_map: Vec::new(),
            uuid,
        })
    }

    /// Adds the entry at layer path `path` (`b""` is the root; a hardlink's target is a layer
    /// path too). A later entry for a path replaces the earlier: a directory's metadata, or a
    /// non-directory altogether.
    pub fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), ErofsError> {
        let xattrs = || encode_xattrs(&meta.xattrs).map_err(|problem| entry_error(path, problem));
        let (parent_id, existing_id) = if path.is_empty() {
            (None, Some(PathTree::ROOT))
        } else {
            match self.tree.paths.find_parent(path) {
                Some((dir, name)) => (Some(dir), self.tree.paths.child(dir, name)),
                None => (None, None),
            }
        };
        let existing = existing_id.map(|id| self.tree.path_ino[id as usize]).filter(|&i| i != NO_INO);
        let existing_dir = existing.filter(|&i| self.tree.is_dir(i));
        if let EntryKind::Dir = entry
            && let Some(ino) = existing_dir
        {
            let xattrs = xattrs()?;
            let node = self.tree.node_mut(ino);
            set_attrs(node, meta, xattrs);
            return Ok(());
        }
        if path.is_empty() {
            return Err(entry_error(path, "a non-directory cannot replace the root"));
        }
        let name = path::split_parent(path).1;
        if name.len() > format::NAME_LEN {
            return Err(entry_error(path, "name longer than 255 bytes"));
        }
        let (parent_id, parent) = match parent_id.map(|id| (id, self.tree.path_ino[id as usize])) {
            Some((id, p)) if p != NO_INO && self.tree.is_dir(p) => (id, p),
            _ => return Err(entry_error(path, "parent is not an earlier directory of the stream")),
        };
        if let Some(dir) = existing_dir {
            // First, so that a hardlink to something below it finds nothing there.
            self.unlink_below(dir);
        }
        let ino = match entry {
            EntryKind::Hardlink(target) => {
                let target_ino = match self.tree.paths.find(target).map(|id| self.tree.path_ino[id as usize])
                {
                    Some(t) if t != NO_INO && !self.tree.is_dir(t) => t,
                    _ => return Err(entry_error(path, "hardlink target is not an earlier non-directory")),
                };
                if existing == Some(target_ino) {
                    return Ok(());
                }
                if self.tree.node(target_ino).links >= MAX_LINKS {
                    return Err(entry_error(path, format!("more than {MAX_LINKS} links to one file")));
                }
                target_ino
            }
            other => {
                let xattrs = xattrs()?;
                let kind = self.new_kind(path, parent, other)?;
                let mut node = Node {
                    kind,
                    mtime_sec: 0,
                    xattrs: None,
                    uid: 0,
                    gid: 0,
                    mtime_nsec: 0,
                    perm: 0,
                    links: 0,
                };
                set_attrs(&mut node, meta, xattrs);
                self.tree.nodes.push(Some(node));
                (self.tree.nodes.len() - 1) as u32
            }
        };
        self.tree.node_mut(ino).links += 1;
        match (existing_id, existing) {
            (Some(id), Some(old)) => {
                self.tree.path_ino[id as usize] = ino;
                self.tree.node_mut(old).links -= 1;
                if self.tree.node(old).links == 0 {
                    self.tree.nodes[old as usize] = None;
                }
            }
            (unlinked, _) => {
                let id = match unlinked {
                    // Named before, below a directory since replaced: linked anew here.
                    Some(id) => {
                        (self.tree.path_ino[id as usize], self.tree.next_sibling[id as usize]) =
                            (ino, NO_PATH);
                        id
                    }
                    None => {
                        let id = self
                            .tree
                            .paths
                            .add_child(parent_id, name)
                            .map_err(|e| entry_error(path, e.to_string()))?;
                        self.tree.path_ino.push(ino);
                        self.tree.next_sibling.push(NO_PATH);
                        id
                    }
                };
                let Kind::Dir { first, last, .. } = &mut self.tree.node_mut(parent).kind else {
                    unreachable!("checked above")
                };
                let before = std::mem::replace(last, id);
                if before == NO_PATH {
                    *first = id;
                } else {
                    self.tree.next_sibling[before as usize] = id;
                }
            }
        }
        Ok(())
    }

    /// Unlinks everything below directory inode `dir`, which a non-directory is replacing.
    /// Their data blocks stay where they are, unused.
    fn unlink_below(&mut self, dir: u32) {
        let mut dirs = vec![dir];
        while let Some(d) = dirs.pop() {
            let Kind::Dir { first, .. } = self.tree.node(d).kind else { unreachable!("a directory") };
            let mut child = first;
            while child != NO_PATH {
                let ino = std::mem::replace(&mut self.tree.path_ino[child as usize], NO_INO);
                if ino != NO_INO {
                    if self.tree.is_dir(ino) {
                        dirs.push(ino);
                    }
                    let node = self.tree.node_mut(ino);
                    node.links -= 1;
                    if node.links == 0 && !matches!(node.kind, Kind::Dir { .. }) {
                        self.tree.nodes[ino as usize] = None;
                    }
                }
                child = self.tree.next_sibling[child as usize];
            }
            if d != dir {
                self.tree.nodes[d as usize] = None;
            }
        }
    }

    /// The inode kind of a new entry, writing its data.
    fn new_kind(&mut self, path: &[u8], parent: u32, entry: EntryKind<'_>) -> Result<Kind, ErofsError> {
        let device = |ifmt, major, minor| match format::encode_dev(major, minor) {
            Some(rdev) => Ok(Kind::Device { ifmt, rdev }),
            None => Err(entry_error(path, format!("device {major}:{minor} is beyond what Linux numbers"))),
        };
        Ok(match entry {
            EntryKind::Dir => Kind::Dir { parent, first: NO_PATH, last: NO_PATH },
            EntryKind::File { size, data } => {
                let data = self.file_data(size, data).map_err(|e| match e {
                    DataError::Piece(PieceError::Read(source)) => {
                        ErofsError::Read { path: path::display(path), source }
                    }
                    DataError::Piece(PieceError::Write(e)) => ErofsError::Write(e),
                    DataError::TooBig => ErofsError::TooBig,
                })?;
                Kind::File { size, data }
            }
            EntryKind::Symlink([]) => return Err(entry_error(path, "empty symlink target")),
            EntryKind::Symlink(target) if target.len() < BLOCK => {
                let at = self.tree.targets.len() as u64;
                self.tree.targets.extend_from_slice(target);
                Kind::Symlink { at, len: target.len() as u16 }
            }
            EntryKind::Symlink(_) => return Err(entry_error(path, "symlink target of 4096 bytes or more")),
            EntryKind::Char { major, minor } => device(format::S_IFCHR, major, minor)?,
            EntryKind::Block { major, minor } => device(format::S_IFBLK, major, minor)?,
            EntryKind::Fifo => Kind::Fifo,
            EntryKind::Hardlink(_) => unreachable!("linked, not made"),
        })
    }

    /// Writes `size` bytes of `data` at the end of the data so far: whole blocks, or, when a
    /// chunk of it is all zeros, chunks with holes for those.
    fn file_data(&mut self, size: u64, data: &mut dyn Read) -> Result<Data, DataError> {
        let blocks = size.div_ceil(BLOCK as u64);
        if self.next + blocks > u64::from(u32::MAX) {
            return Err(DataError::TooBig);
        }
        let bits = chunk_bits(blocks);
        let chunk = BLOCK << bits;
        let start = self.next as u32;
        self.file_map.clear();
        let (mut left, mut holes) = (size, false);
        while left > 0 {
            let (n, padded) = self.out.read_piece(data, left, BLOCK).map_err(DataError::Piece)?;
            left -= n as u64;
            for at in (0..padded).step_by(chunk) {
                let c = at..padded.min(at + chunk);
                if is_zero(&self.out.piece()[c.clone()]) {
                    holes = true;
                    self.file_map.push(NULL_ADDR);
                } else {
                    self.file_map.push(self.next as u32);
                    self.next += (c.len() / BLOCK) as u64;
                    self.out.keep(c);
                }
            }
        }
        if !holes {
            return Ok(Data::Blocks { start });
        }
        let first = self.tree.chunk_maps.len() as u64;
        self.tree.chunk_maps.extend_from_slice(&self.file_map);
        Ok(Data::Chunks { bits, first, count: self.file_map.len() as u32 })
    }

    /// Writes the directory and symlink blocks and the metadata area after the data, then
    /// the superblock, and sets the image's length.
    pub fn finish(mut self) -> Result<(), ErofsError> {
        let write = |r: io::Result<()>| r.map_err(ErofsError::Write);
        // Where each inode goes in the metadata area and what it inlines; how many blocks
        // the directories and symlinks that do not fit inline need before it.
        let mut placed: Vec<Placed> = Vec::with_capacity(self.tree.nodes.len());
        let (mut at, mut extra_blocks, mut inos) = (0u64, 0u64, 0u64);
        for ino in 0..self.tree.nodes.len() as u32 {
            let Some(node) = &self.tree.nodes[ino as usize] else {
                placed.push(Placed::NONE);
                continue;
            };
            inos += 1;
            let fixed = (EXTENDED_INODE + node.xattr_bytes()) as u64;
            let (tail, full_blocks, map) = match &node.kind {
                Kind::Dir { .. } => {
                    let (blocks, last) = dir_blocks(&self.tree.listing(ino));
                    (Some(last), blocks.len() as u64 - 1, 0)
                }
                Kind::Symlink { len, .. } => (Some(*len as usize), 0, 0),
                Kind::File { data: Data::Chunks { count, .. }, .. } => (None, 0, *count as u64),
                _ => (None, 0, 0),
            };
            extra_blocks += full_blocks;
            let mut inline = false;
            if let Some(tail) = tail {
                let whole = fixed + tail as u64;
                if whole <= BLOCK as u64 {
                    if at % BLOCK as u64 + whole > BLOCK as u64 {
                        at = at.next_multiple_of(BLOCK as u64);
                    }
                    inline = true;
                } else {
                    extra_blocks += 1;
                }
            }
            if at % BLOCK as u64 + EXTENDED_INODE as u64 > BLOCK as u64 {
                at = at.next_multiple_of(BLOCK as u64);
            }
            let nid = u32::try_from(at / SLOT as u64).map_err(|_| ErofsError::TooBig)?;
            placed.push(Placed { nid, inline });
            at += fixed + if inline { tail.unwrap_or(0) as u64 } else { 0 } + map * BLOCK_MAP_ENTRY as u64;
            at = at.next_multiple_of(SLOT as u64);
        }
        let meta_blkaddr = self.next + extra_blocks;
        let meta_blocks = at.div_ceil(BLOCK as u64).max(1);
        let total = meta_blkaddr + meta_blocks;
        if total > u64::from(u32::MAX) {
            return Err(ErofsError::TooBig);
        }

        // Positioned writes: `out` keeps writing the directory blocks meanwhile (the two
        // share the file's offset).
        let mut meta =
            PositionedWriter { file: &self.file, at: meta_blkaddr * BLOCK as u64, buf: Vec::new() };
        let mut meta_at = 0u64;
        let mut number = 0u32;
        let mut dir_block = vec![0u8; BLOCK];
        for ino in 0..self.tree.nodes.len() as u32 {
            let Some(node) = &self.tree.nodes[ino as usize] else { continue };
            let p = placed[ino as usize];
            number += 1;
            let mut inode = Inode {
                extended: true,
                layout: DataLayout::FlatPlain,
                xattr_icount: format::xattr_icount(node.xattr_bytes()).expect("checked when added"),
                mode: node.ifmt() | node.perm,
                nlink: node.links,
                size: 0,
                i_u: NULL_ADDR,
                ino: number,
                uid: node.uid,
                gid: node.gid,
                mtime: node.mtime_sec as u64,
                mtime_nsec: node.mtime_nsec,
            };
            // Inline bytes after the xattrs: a directory's last block, a symlink's target or
            // a chunk map.
            let mut inline: Vec<u8> = Vec::new();
            match &node.kind {
                Kind::Dir { .. } => {
                    let listing = self.tree.listing(ino);
                    inode.nlink = 2 + listing
                        .iter()
                        .filter(|&&(n, i)| !matches!(n, b"." | b"..") && self.tree.is_dir(i))
                        .count() as u32;
                    let (blocks, _) = dir_blocks(&listing);
                    let start = self.next;
                    for (i, range) in blocks.iter().enumerate() {
                        let used =
                            encode_dir_block(&listing[range.clone()], &placed, &self.tree, &mut dir_block);
                        let last = i + 1 == blocks.len();
                        inode.size += if last { used as u64 } else { BLOCK as u64 };
                        if last && p.inline {
                            inline.extend_from_slice(&dir_block[..used]);
                        } else {
                            write(self.out.write_all(&dir_block))?;
                            self.next += 1;
                        }
                    }
                    if self.next > start {
                        inode.i_u = start as u32;
                    }
                    inode.layout = if p.inline { DataLayout::FlatInline } else { DataLayout::FlatPlain };
                }
                Kind::Symlink { at, len } => {
                    let target = &self.tree.targets[*at as usize..][..*len as usize];
                    inode.size = *len as u64;
                    if p.inline {
                        inode.layout = DataLayout::FlatInline;
                        inline.extend_from_slice(target);
                    } else {
                        dir_block.fill(0);
                        dir_block[..target.len()].copy_from_slice(target);
                        write(self.out.write_all(&dir_block))?;
                        inode.i_u = self.next as u32;
                        self.next += 1;
                    }
                }
                Kind::File { size, data } => {
                    inode.size = *size;
                    match data {
                        Data::Blocks { start } => {
                            if *size > 0 {
                                inode.i_u = *start;
                            }
                        }
                        Data::Chunks { bits, first, count } => {
                            inode.layout = DataLayout::ChunkBased;
                            inode.i_u = format::chunk_format(*bits, false);
                            for a in &self.tree.chunk_maps[*first as usize..][..*count as usize] {
                                inline.extend_from_slice(&a.to_le_bytes());
                            }
                        }
                    }
                }
                Kind::Device { rdev, .. } => inode.i_u = *rdev,
                Kind::Fifo => inode.i_u = 0,
            }
            let pos = u64::from(p.nid) * SLOT as u64;
            write(meta.write_all(&vec![0u8; (pos - meta_at) as usize]))?;
            write(meta.write_all(&inode.encode_extended()))?;
            if let Some(x) = &node.xattrs {
                write(meta.write_all(x))?;
            }
            write(meta.write_all(&inline))?;
            meta_at = pos + (EXTENDED_INODE + node.xattr_bytes() + inline.len()) as u64;
        }
        debug_assert_eq!(self.next, meta_blkaddr, "the blocks counted before the metadata");
        write(meta.write_all(&vec![0u8; (meta_blocks * BLOCK as u64 - meta_at) as usize]))?;
        write(self.out.flush())?;
        write(meta.flush())?;

        let mut sb = Superblock {
            feature_compat: format::COMPAT_SB_CHKSUM,
            blkszbits: format::BLOCK_BITS,
            root_nid: u16::try_from(placed[ROOT_INO as usize].nid).expect("the root is the first inode"),
            inos,
            blocks: total as u32,
            meta_blkaddr: meta_blkaddr as u32,
            uuid: self.uuid,
            feature_incompat: if self.tree.chunk_maps.is_empty() { 0 } else { format::INCOMPAT_CHUNKED_FILE },
            ..Superblock::default()
        };
        let mut head = vec![0u8; BLOCK];
        head[format::SUPER_OFFSET..][..format::SUPER_SIZE].copy_from_slice(&sb.encode());
        sb.checksum = format::superblock_checksum(&head[format::SUPER_OFFSET..]);
        head[format::SUPER_OFFSET..][..format::SUPER_SIZE].copy_from_slice(&sb.encode());
        write(self.file.write_all_at(&head, 0))?;
        write(self.file.set_len(total * BLOCK as u64))
    }
}

impl Tree {
    /// A linked inode (every inode a path names is one).
    fn node(&self, ino: u32) -> &Node {
        self.nodes[ino as usize].as_ref().expect("a linked inode")
    }

    fn node_mut(&mut self, ino: u32) -> &mut Node {
        self.nodes[ino as usize].as_mut().expect("a linked inode")
    }

    fn is_dir(&self, ino: u32) -> bool {
        matches!(self.node(ino).kind, Kind::Dir { .. })
    }

    /// The entries of directory `ino`, `.` and `..` included, sorted by name.
    fn listing(&self, ino: u32) -> Vec<(&[u8], u32)> {
        let Kind::Dir { parent, first, .. } = self.node(ino).kind else { unreachable!("a directory") };
        let mut entries = vec![(&b"."[..], ino), (&b".."[..], parent)];
        let mut child = first;
        while child != NO_PATH {
            let i = self.path_ino[child as usize];
            if i != NO_INO {
                entries.push((self.paths.name(child), i));
            }
            child = self.next_sibling[child as usize];
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        entries
    }
}

/// A buffered writer at an offset of its own, by positioned writes.
struct PositionedWriter<'f> {
    file: &'f File,
    at: u64,
    buf: Vec<u8>,
}

impl Write for PositionedWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= PIECE {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.buf, self.at)?;
        self.at += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Where an inode is in the metadata area and whether its last block or target is inline.
#[derive(Clone, Copy)]
struct Placed {
    nid: u32,
    inline: bool,
}

impl Placed {
    const NONE: Placed = Placed { nid: u32::MAX, inline: false };
}

/// The ranges of `listing` each directory block holds, and the bytes its last block uses.
fn dir_blocks(listing: &[(&[u8], u32)]) -> (Vec<std::ops::Range<usize>>, usize) {
    format::dir_blocks(listing.iter().map(|(name, _)| name.len()))
}

/// Encodes one directory block of `entries` into `block` (zero-padded); returns the bytes used.
fn encode_dir_block(entries: &[(&[u8], u32)], placed: &[Placed], tree: &Tree, block: &mut [u8]) -> usize {
    block.fill(0);
    let entries = entries.iter().map(|&(name, ino)| {
        (name, u64::from(placed[ino as usize].nid), format::file_type(tree.node(ino).ifmt()))
    });
    format::encode_dir_block(entries, block)
}

/// log2 of the blocks per chunk of a file of `blocks` blocks with holes.
fn chunk_bits(blocks: u64) -> u8 {
    let mut bits = MIN_CHUNK_BITS;
    while bits < MAX_CHUNK_BITS && blocks.div_ceil(1 << bits) > MAX_CHUNKS {
        bits += 1;
    }
    bits
}

fn set_attrs(node: &mut Node, meta: &EntryMeta, xattrs: Option<Box<[u8]>>) {
    node.mtime_sec = meta.mtime_sec;
    node.mtime_nsec = meta.mtime_nsec;
    node.uid = meta.uid;
    node.gid = meta.gid;
    node.perm = (meta.mode & 0o7777) as u16;
    node.xattrs = xattrs;
}

/// `xattrs` (full names, values as the VFS gives them) as an inode's inline xattrs: the
/// header, then each entry in name order; `None` for none.
fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Option<Box<[u8]>>, String> {
    if xattrs.is_empty() {
        return Ok(None);
    }
    let mut b = format::xattr_ibody_header(0).to_vec();
    for (full, value) in xattrs {
        let shown = || String::from_utf8_lossy(full).into_owned();
        let (index, name) = format::split_xattr_name(full)
            .ok_or_else(|| format!("xattr {} is in a namespace EROFS has no prefix for", shown()))?;
        u8::try_from(name.len()).map_err(|_| format!("xattr name {} is too long", shown()))?;
        u16::try_from(value.len()).map_err(|_| format!("xattr {} has a value of 64 KiB or more", shown()))?;
        format::push_xattr_entry(&mut b, index, name, value);
    }
    format::xattr_icount(b.len()).ok_or_else(|| "more xattr bytes than an EROFS inode holds".to_string())?;
    Ok(Some(b.into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21: at most 250 heap bytes per entry at the peak (the ext4 writer's bound of issue
    /// 13), the finishing pass included.
    #[test]
    fn a_layer_of_small_files_takes_at_most_250_heap_bytes_per_entry() {
        let per_entry =
            crate::backend::peak_heap_per_small_file(|out| ImageWriter::create(out, [1; 16]).unwrap());
        assert!(per_entry <= 250, "{per_entry} heap bytes per entry at the peak");
    }

    #[test]
    fn chunks_grow_with_the_file_to_keep_the_map_small() {
        assert_eq!(chunk_bits(0), MIN_CHUNK_BITS);
        assert_eq!(chunk_bits(MAX_CHUNKS << MIN_CHUNK_BITS), MIN_CHUNK_BITS);
        assert_eq!(chunk_bits((MAX_CHUNKS << MIN_CHUNK_BITS) + 1), MIN_CHUNK_BITS + 1);
        // 60 GiB: 1 MiB chunks (the largest), 61440 of them.
        assert_eq!(chunk_bits((60 << 30) / BLOCK as u64), MAX_CHUNK_BITS);
    }

    #[test]
    fn directory_blocks_break_before_an_entry_that_does_not_fit() {
        let long = [b'x'; 255];
        let listing: Vec<(&[u8], u32)> = (0..16).map(|_| (&long[..], 0)).collect();
        // 267 bytes an entry: 15 in the first block (4005 bytes), 1 in the second.
        assert_eq!(dir_blocks(&listing), (vec![0..15, 15..16], 267));
    }

    #[test]
    fn xattrs_encode_with_their_prefix_index() {
        let x = encode_xattrs(&[(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]).unwrap().unwrap();
        // Header, then head (len 14, index 4, value 1), name, value, padded to 4.
        assert_eq!(x.len(), 12 + 4 + 16);
        assert_eq!(&x[12..16], &[14, 4, 1, 0]);
        assert_eq!(&x[16..31], b"overlay.opaquey");
        assert!(encode_xattrs(&[(b"system.foo".to_vec(), b"1".to_vec())]).is_err());
        assert!(encode_xattrs(&[]).unwrap().is_none());
    }
}

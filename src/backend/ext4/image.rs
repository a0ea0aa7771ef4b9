//! An ext4 image written in one pass over a layer's entries.
//!
//! File data goes out as it arrives, block after block from a fixed start (a block of zeros
//! is left a hole), so the data of the whole layer is one sequential write and nothing is
//! staged. The tree (inodes, directory entries, xattrs) is kept in memory, compactly (names
//! interned in a [`PathTree`], a directory's entries a list through its children's ids, a
//! fixed-size record per inode, extents in one array: about 100 bytes a file); when the entries
//! end, [`ImageWriter::finish`] writes after the data every directory block, extent tree
//! block and xattr block, then the bitmaps and inode tables of all groups (flex_bg lets them
//! live anywhere), and last the superblock and group descriptors at the front. The image
//! is exactly as large as its content: the size is known only at the end, and nothing had
//! to know it before.
//!
//! ```text
//! block 0: superblock │ 1..: group descriptors │ ..DATA_START: free │ file data, symlinks
//!   │ directories, extent trees, xattr blocks │ block bitmaps │ inode bitmaps │ inode tables
//! ```
//!
//! Reproducible: no clock, no randomness; inode numbers in entry order, directory entries
//! in entry order, UUID and hash seed given by the caller.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::disk::{
    self, BLOCK, BLOCKS_PER_GROUP, Dirent, EXTENTS_FL, EXTENTS_IN_BLOCK, EXTENTS_IN_INODE, Extent, FIRST_INO,
    FileType, GroupDesc, INDEX_FL, INODE_SIZE, InodeFields, MAX_EXTENT_LEN, ROOT_INO, Xattrs,
};
use super::htree;
use crate::backend::native::is_zero;
use crate::backend::{BlockOut, PieceError};
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;
use crate::layer::path;
use crate::layer::pathtree::{PathId, PathTree};

/// Group descriptor blocks reserved before the data: 16 blocks of 128 descriptors, so an
/// image of up to 2048 groups (256 GiB, or 64 Mi inodes).
const GDT_RESERVED: u64 = 16;
const DATA_START: u64 = 1 + GDT_RESERVED;
const MAX_GROUPS: u32 = (GDT_RESERVED as usize * BLOCK / disk::DESC_SIZE) as u32;
/// Most inodes per group: one bitmap block's bits.
const MAX_INODES_PER_GROUP: u32 = (BLOCK * 8) as u32;
const INODES_PER_BLOCK: u32 = (BLOCK / INODE_SIZE) as u32;
/// ext4's most links to one inode.
const MAX_LINKS: u32 = 65000;
/// File data is read and written in pieces of this size.
const CHUNK: usize = 1 << 20;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ext4Error {
    #[error("entry {path:?}: {problem}")]
    Entry { path: String, problem: String },
    #[error("the image needs {groups} block groups; vmrootfs writes at most {MAX_GROUPS} (256 GiB)")]
    TooBig { groups: u64 },
    #[error("reading entry {path:?}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the image")]
    Write(#[source] io::Error),
}

/// Owner, permissions and encoded xattrs of an inode: a layer has few distinct ones, so each
/// is kept once ([`ImageWriter::owners`]) and inodes hold its index.
#[derive(PartialEq, Eq, Hash)]
struct Owner {
    uid: u32,
    gid: u32,
    perm: u16,
    /// `None` for an inode without xattrs (most of them).
    xattrs: Option<Box<Xattrs>>,
}

/// No path: the end of a directory's list of children (the root is no one's child).
const NO_PATH: PathId = PathTree::ROOT;
/// No inode: a path no longer linked (it was below a directory a non-directory replaced).
const NO_INO: u32 = 0;

enum Kind {
    /// Entries: the paths `first`, then each one's [`ImageWriter::next_sibling`] up to `last`,
    /// in entry order ([`NO_PATH`] when empty); `dirent_bytes` is what their directory
    /// entries take ([`disk::dirent_len`] of each name, saturating).
    Dir {
        parent: u32,
        first: PathId,
        last: PathId,
        dirent_bytes: u32,
    },
    /// Extents: `count` of [`ImageWriter::extents`] from `first`.
    File {
        size: u64,
        first: u64,
        count: u32,
    },
    /// Target: `len` bytes of [`ImageWriter::targets`] from `at`.
    FastSymlink {
        at: u64,
        len: u8,
    },
    SlowSymlink {
        len: u16,
        block: u64,
    },
    Device {
        kind: FileType,
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// An inode: 40 bytes.
struct Node {
    kind: Kind,
    /// As [`disk::split_time`] gives it.
    mtime: (u32, u32),
    /// Its [`Owner`]'s index.
    owner: u32,
    links: u16,
}

impl Node {
    fn file_type(&self) -> FileType {
        match &self.kind {
            Kind::Dir { .. } => FileType::Dir,
            Kind::File { .. } => FileType::Regular,
            Kind::FastSymlink { .. } | Kind::SlowSymlink { .. } => FileType::Symlink,
            Kind::Device { kind, .. } => *kind,
            Kind::Fifo => FileType::Fifo,
        }
    }
}

/// An image being written: [`ImageWriter::add`] each entry, then [`ImageWriter::finish`].
pub struct ImageWriter {
    file: File,
    /// The sequential writer of everything after the group descriptors.
    out: BlockOut,
    /// Next block `out` writes.
    next: u64,
    /// Inode `n` is `nodes[n - 1]`; `None` for the reserved ones (1, 3–10) and any no longer
    /// linked.
    nodes: Vec<Option<Node>>,
    /// Every path of the image; `path_ino[id]` is path `id`'s inode ([`NO_INO`] once unlinked),
    /// `next_sibling[id]` the next entry of its directory.
    paths: PathTree,
    path_ino: Vec<u32>,
    next_sibling: Vec<PathId>,
    /// The extents of all files, each file's in a run.
    extents: Vec<Extent>,
    /// The targets of all fast symlinks, back to back.
    targets: Vec<u8>,
    /// The distinct owners so far, each with its index.
    owners: HashMap<Owner, u32>,
    uuid: [u8; 16],
    hash_seed: [u8; 16],
    seed: u32,
}

fn entry_error(path: &[u8], problem: impl Into<String>) -> Ext4Error {
    Ext4Error::Entry { path: path::display(path), problem: problem.into() }
}

impl ImageWriter {
    /// Starts the image `out` (created, or truncated).
    pub fn create(out: &Path, uuid: [u8; 16], hash_seed: [u8; 16]) -> io::Result<ImageWriter> {
        let file = fs_err::File::create(out)?.into_parts().0;
        let mut data = file.try_clone()?;
        data.seek(SeekFrom::Start(DATA_START * BLOCK as u64))?;
        let mut nodes: Vec<Option<Node>> = (1..FIRST_INO).map(|_| None).collect();
        nodes[ROOT_INO as usize - 1] = Some(Node {
            kind: Kind::Dir { parent: ROOT_INO, first: NO_PATH, last: NO_PATH, dirent_bytes: 0 },
            mtime: disk::split_time(0, 0),
            owner: 0,
            links: 0,
        });
        let root_owner = Owner { uid: 0, gid: 0, perm: 0o755, xattrs: None };
        Ok(ImageWriter {
            file,
            out: BlockOut::new(data, CHUNK),
            next: DATA_START,
            nodes,
            paths: PathTree::default(),
            path_ino: vec![ROOT_INO],
            next_sibling: vec![NO_PATH],
            extents: Vec::new(),
            targets: Vec::new(),
            owners: HashMap::from([(root_owner, 0)]),
            uuid,
            hash_seed,
            seed: disk::csum_seed(&uuid),
        })
    }

    /// A linked inode (every inode a path names is one).
    fn node(&self, ino: u32) -> &Node {
        self.nodes[ino as usize - 1].as_ref().expect("a linked inode")
    }

    fn node_mut(&mut self, ino: u32) -> &mut Node {
        self.nodes[ino as usize - 1].as_mut().expect("a linked inode")
    }

    fn is_dir(&self, ino: u32) -> bool {
        matches!(self.node(ino).kind, Kind::Dir { .. })
    }

    /// Adds the entry at layer path `path` (`b""` is the root; a hardlink's target is a layer
    /// path too). A later entry for a path replaces the earlier: a directory's metadata, or a
    /// non-directory altogether.
    pub fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), Ext4Error> {
        // Its time and owner's index.
        let attrs = |owners: &mut HashMap<Owner, u32>| -> Result<((u32, u32), u32), Ext4Error> {
            let xattrs = disk::xattrs(&meta.xattrs).map_err(|e| entry_error(path, e.to_string()))?;
            let none = xattrs.ibody.is_empty() && xattrs.block.is_none();
            let owner = Owner {
                uid: meta.uid,
                gid: meta.gid,
                perm: (meta.mode & 0o7777) as u16,
                xattrs: (!none).then(|| Box::new(xattrs)),
            };
            let next = owners.len() as u32;
            Ok((disk::split_time(meta.mtime_sec, meta.mtime_nsec), *owners.entry(owner).or_insert(next)))
        };
        // The parent's path and this path's, when they are there.
        let (parent_id, existing_id) = if path.is_empty() {
            (None, Some(PathTree::ROOT))
        } else {
            match self.paths.find_parent(path) {
                Some((dir, name)) => (Some(dir), self.paths.child(dir, name)),
                None => (None, None),
            }
        };
        let existing = existing_id.map(|id| self.path_ino[id as usize]).filter(|&i| i != NO_INO);
        let existing_dir = existing.filter(|&i| self.is_dir(i));
        if let EntryKind::Dir = entry
            && let Some(ino) = existing_dir
        {
            let (mtime, owner) = attrs(&mut self.owners)?;
            let node = self.node_mut(ino);
            (node.mtime, node.owner) = (mtime, owner);
            return Ok(());
        }
        if path.is_empty() {
            return Err(entry_error(path, "a non-directory cannot replace the root"));
        }
        let name = path::split_parent(path).1;
        if name.len() > 255 {
            return Err(entry_error(path, "name longer than 255 bytes"));
        }
        let (parent_id, parent) = match parent_id.map(|id| (id, self.path_ino[id as usize])) {
            Some((id, p)) if p != NO_INO && self.is_dir(p) => (id, p),
            _ => return Err(entry_error(path, "parent is not an earlier directory of the stream")),
        };
        if let Some(dir) = existing_dir {
            // First, so that a hardlink to something below it finds nothing there.
            self.unlink_below(dir);
        }
        let ino = match entry {
            EntryKind::Hardlink(target) => {
                let target_ino = match self.paths.find(target).map(|id| self.path_ino[id as usize]) {
                    Some(t) if t != NO_INO && !self.is_dir(t) => t,
                    _ => return Err(entry_error(path, "hardlink target is not an earlier non-directory")),
                };
                if existing == Some(target_ino) {
                    return Ok(());
                }
                if u32::from(self.node(target_ino).links) >= MAX_LINKS {
                    return Err(entry_error(path, format!("more than {MAX_LINKS} links to one file")));
                }
                target_ino
            }
            other => {
                let (mtime, owner) = attrs(&mut self.owners)?;
                let kind = self.new_kind(path, parent, other)?;
                self.nodes.push(Some(Node { kind, mtime, owner, links: 0 }));
                self.nodes.len() as u32
            }
        };
        self.node_mut(ino).links += 1;
        match (existing_id, existing) {
            (Some(id), Some(old)) => {
                self.path_ino[id as usize] = ino;
                self.node_mut(old).links -= 1;
                if self.node(old).links == 0 {
                    self.nodes[old as usize - 1] = None;
                }
            }
            (unlinked, _) => {
                let id = match unlinked {
                    // Named before, below a directory since replaced: linked anew here.
                    Some(id) => {
                        (self.path_ino[id as usize], self.next_sibling[id as usize]) = (ino, NO_PATH);
                        id
                    }
                    None => {
                        let id = self
                            .paths
                            .add_child(parent_id, name)
                            .map_err(|e| entry_error(path, e.to_string()))?;
                        self.path_ino.push(ino);
                        self.next_sibling.push(NO_PATH);
                        id
                    }
                };
                let Kind::Dir { first, last, dirent_bytes, .. } = &mut self.node_mut(parent).kind else {
                    unreachable!("checked above")
                };
                *dirent_bytes = dirent_bytes.saturating_add(disk::dirent_len(name.len()) as u32);
                let too_many = htree::too_many_for(*dirent_bytes as usize, htree::MAX_LEAVES);
                let before = std::mem::replace(last, id);
                if before == NO_PATH {
                    *first = id;
                } else {
                    self.next_sibling[before as usize] = id;
                }
                // A directory too large for a two-level index fails now, not once the layer
                // has streamed.
                if too_many {
                    let parent_path = path::split_parent(path).0;
                    return Err(entry_error(
                        parent_path,
                        "directory whose entries' names need more blocks than a two-level ext4 index holds",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Unlinks everything below directory inode `dir`, which a non-directory is replacing (a
    /// later entry replaces an earlier one, as applying the layer in order does). Their data
    /// blocks stay where they are, unused.
    fn unlink_below(&mut self, dir: u32) {
        let mut dirs = vec![dir];
        while let Some(d) = dirs.pop() {
            let Kind::Dir { first, .. } = self.node(d).kind else { unreachable!("a directory") };
            let mut child = first;
            while child != NO_PATH {
                let ino = std::mem::replace(&mut self.path_ino[child as usize], NO_INO);
                if self.is_dir(ino) {
                    dirs.push(ino);
                }
                let node = self.node_mut(ino);
                node.links -= 1;
                if node.links == 0 && !matches!(node.kind, Kind::Dir { .. }) {
                    self.nodes[ino as usize - 1] = None;
                }
                child = self.next_sibling[child as usize];
            }
            if d != dir {
                self.nodes[d as usize - 1] = None;
            }
        }
    }

    /// The inode kind of a new entry, writing its data.
    fn new_kind(&mut self, path: &[u8], parent: u32, entry: EntryKind<'_>) -> Result<Kind, Ext4Error> {
        let device = |kind, major, minor| match disk::device_block(major, minor) {
            Some(_) => Ok(Kind::Device { kind, major, minor }),
            None => Err(entry_error(path, format!("device {major}:{minor} is beyond what Linux numbers"))),
        };
        Ok(match entry {
            EntryKind::Dir => Kind::Dir { parent, first: NO_PATH, last: NO_PATH, dirent_bytes: 0 },
            EntryKind::File { size, data } => {
                if size.div_ceil(BLOCK as u64) > u32::MAX as u64 {
                    return Err(entry_error(path, "file larger than ext4's 16 TiB"));
                }
                let first = self.extents.len();
                self.file_data(size, data).map_err(|e| match e {
                    PieceError::Read(source) => Ext4Error::Read { path: path::display(path), source },
                    PieceError::Write(e) => Ext4Error::Write(e),
                })?;
                let count = self.extents.len() - first;
                // A file of at most 16 TiB has at most 2^32 blocks, so as many extents.
                Kind::File { size, first: first as u64, count: count as u32 }
            }
            EntryKind::Symlink([]) => {
                return Err(entry_error(path, "empty symlink target"));
            }
            EntryKind::Symlink(target) if target.len() < 60 => {
                let at = self.targets.len() as u64;
                self.targets.extend_from_slice(target);
                Kind::FastSymlink { at, len: target.len() as u8 }
            }
            EntryKind::Symlink(target) if target.len() < BLOCK => {
                let mut block = vec![0u8; BLOCK];
                block[..target.len()].copy_from_slice(target);
                self.out.write_all(&block).map_err(Ext4Error::Write)?;
                self.next += 1;
                Kind::SlowSymlink { len: target.len() as u16, block: self.next - 1 }
            }
            EntryKind::Symlink(_) => return Err(entry_error(path, "symlink target of 4096 bytes or more")),
            EntryKind::Char { major, minor } => device(FileType::Char, major, minor)?,
            EntryKind::Block { major, minor } => device(FileType::Block, major, minor)?,
            EntryKind::Fifo => Kind::Fifo,
            EntryKind::Hardlink(_) => unreachable!("linked, not made"),
        })
    }

    /// Writes `size` bytes of `data` at the end of the data so far, all-zero blocks left
    /// holes; appends its extents to [`ImageWriter::extents`].
    fn file_data(&mut self, size: u64, data: &mut dyn Read) -> Result<(), PieceError> {
        let first = self.extents.len();
        let (mut left, mut logical) = (size, 0u64);
        while left > 0 {
            let (n, padded) = self.out.read_piece(data, left, BLOCK)?;
            left -= n as u64;
            let blocks = padded / BLOCK;
            let zero = |out: &BlockOut, b: usize| is_zero(&out.piece()[b * BLOCK..(b + 1) * BLOCK]);
            let mut b = 0;
            while b < blocks {
                if zero(&self.out, b) {
                    b += 1;
                    continue;
                }
                let run = b;
                while b < blocks && !zero(&self.out, b) {
                    b += 1;
                }
                self.out.keep(run * BLOCK..b * BLOCK);
                push_extent(
                    &mut self.extents,
                    first,
                    (logical + run as u64) as u32,
                    (b - run) as u32,
                    self.next,
                );
                self.next += (b - run) as u64;
            }
            logical += blocks as u64;
        }
        Ok(())
    }

    /// The distinct owners, each at its index, taken from [`ImageWriter::owners`].
    fn owner_list(&mut self) -> Vec<Owner> {
        let mut owners: Vec<(u32, Owner)> = self.owners.drain().map(|(owner, at)| (at, owner)).collect();
        owners.sort_unstable_by_key(|(at, _)| *at);
        owners.into_iter().map(|(_, owner)| owner).collect()
    }

    /// Writes the metadata after the data, then the bitmaps, inode tables, group descriptors
    /// and superblock, and sets the image's length.
    pub fn finish(mut self) -> Result<(), Ext4Error> {
        let data_end = self.next;
        let owners = self.owner_list();
        let mut placed = Placement::default();
        for i in 0..self.nodes.len() {
            self.place(i as u32 + 1, &owners, &mut placed).map_err(Ext4Error::Write)?;
        }
        let meta_end = self.next;
        let g = geometry(meta_end, self.nodes.len() as u32)?;
        let (descs, bitmaps, totals) = self.group_summaries(&g, data_end, meta_end);
        let ipg = g.inodes_per_group as usize;
        let write = |r: io::Result<()>| r.map_err(Ext4Error::Write);
        write(self.out.write_all(&bitmaps))?;
        // The inode tables of all groups, one after the other: inode by inode (through `out`'s
        // buffer), not a group's table at a time (8 MiB).
        for ino in 1..=g.groups as usize * ipg {
            let inode = match self.nodes.get(ino - 1) {
                Some(Some(node)) => self.encode(node, ino as u32, &owners[node.owner as usize], &placed),
                _ => [0; INODE_SIZE],
            };
            write(self.out.write_all(&inode))?;
        }
        write(self.out.flush())?;

        let mut head = vec![0u8; (1 + g.gdt_blocks() as usize) * BLOCK];
        head[1024..2048].copy_from_slice(&disk::superblock(&g, &totals, &self.uuid, &self.hash_seed));
        head[BLOCK..BLOCK + descs.len()].copy_from_slice(&descs);
        write(self.file.write_all_at(&head, 0))?;
        write(self.file.set_len(g.blocks * BLOCK as u64))
    }

    /// The group descriptors, the block and inode bitmaps of all groups (in that order, as
    /// they are written from `block_bitmaps` on, the inode tables after them) and the free
    /// counts, for the data written up to `data_end`.
    fn group_summaries(
        &self,
        g: &disk::Geometry,
        data_end: u64,
        block_bitmaps: u64,
    ) -> (Vec<u8>, Vec<u8>, disk::Totals) {
        let inode_bitmaps = block_bitmaps + g.groups as u64;
        let tables = inode_bitmaps + g.groups as u64;
        let tables_end = tables + g.groups as u64 * g.table_blocks as u64;
        let mut used = Bitmap::new(g.blocks);
        used.set_range(0, 1 + g.gdt_blocks());
        for node in self.nodes.iter().flatten() {
            match &node.kind {
                Kind::File { first, count, .. } => {
                    for e in &self.extents[*first as usize..][..*count as usize] {
                        used.set_range(e.start, e.start + e.len as u64);
                    }
                }
                Kind::SlowSymlink { block, .. } => used.set_range(*block, block + 1),
                _ => {}
            }
        }
        used.set_range(data_end, tables_end);

        let ipg = g.inodes_per_group as usize;
        let mut descs = Vec::with_capacity(g.groups as usize * disk::DESC_SIZE);
        let mut bitmaps = Vec::with_capacity(2 * g.groups as usize * BLOCK);
        let mut inode_maps = Vec::with_capacity(g.groups as usize * BLOCK);
        let mut totals = disk::Totals { free_blocks: 0, free_inodes: 0 };
        for group in 0..g.groups {
            let first = group as u64 * g.blocks_per_group;
            let n = g.blocks_in_group(group);
            let mut block_map = vec![0xFFu8; BLOCK];
            let mut free_blocks = 0;
            for b in 0..g.blocks_per_group {
                let in_use = b >= n || used.get(first + b);
                if !in_use {
                    block_map[(b / 8) as usize] &= !(1 << (b % 8));
                    free_blocks += (b < n) as u64;
                }
            }
            let mut inode_map = vec![0xFFu8; BLOCK];
            let (mut free_inodes, mut dirs, mut last_used) = (0u32, 0u16, 0usize);
            for i in 0..ipg {
                let ino = group as usize * ipg + i + 1;
                let in_use = ino < FIRST_INO as usize || self.nodes.get(ino - 1).is_some_and(Option::is_some);
                if in_use {
                    last_used = i + 1;
                    dirs += matches!(self.nodes.get(ino - 1), Some(Some(Node { kind: Kind::Dir { .. }, .. })))
                        as u16;
                } else {
                    inode_map[i / 8] &= !(1 << (i % 8));
                    free_inodes += 1;
                }
            }
            let desc = GroupDesc {
                block_bitmap: (block_bitmaps + group as u64) as u32,
                inode_bitmap: (inode_bitmaps + group as u64) as u32,
                inode_table: (tables + group as u64 * g.table_blocks as u64) as u32,
                free_blocks: free_blocks as u16,
                free_inodes: free_inodes as u16,
                used_dirs: dirs,
                unused_inodes: (ipg - last_used) as u16,
            };
            descs.extend_from_slice(&desc.encode(
                group,
                &block_map[..(g.blocks_per_group / 8) as usize],
                &inode_map[..ipg / 8],
                self.seed,
            ));
            totals.free_blocks += free_blocks;
            totals.free_inodes += free_inodes;
            bitmaps.extend_from_slice(&block_map);
            inode_maps.extend_from_slice(&inode_map);
        }
        bitmaps.extend_from_slice(&inode_maps);
        (descs, bitmaps, totals)
    }

    /// Writes inode `ino`'s metadata blocks (directory blocks, extent tree, xattr block) at
    /// the end of the image so far, noting in `placed` where they went.
    fn place(&mut self, ino: u32, owners: &[Owner], placed: &mut Placement) -> io::Result<()> {
        let Some(node) = &self.nodes[ino as usize - 1] else { return Ok(()) };
        let owner = &owners[node.owner as usize];
        let extents = match node.kind {
            Kind::Dir { parent, first, .. } => {
                let mut entries: Vec<Dirent<'_>> = Vec::new();
                let mut child = first;
                while child != NO_PATH {
                    let child_ino = self.path_ino[child as usize];
                    entries.push(Dirent {
                        name: self.paths.name(child),
                        ino: child_ino,
                        kind: self.node(child_ino).file_type(),
                    });
                    child = self.next_sibling[child as usize];
                }
                let links = 2 + entries.iter().filter(|e| e.kind == FileType::Dir).count() as u32;
                let mut blocks = disk::dir_blocks(ino, parent, &entries, self.seed);
                let indexed = blocks.len() > BLOCK;
                if indexed {
                    blocks =
                        htree::blocks(ino, parent, &entries, self.seed, &self.hash_seed).map_err(|e| {
                            let at = self
                                .path_ino
                                .iter()
                                .position(|&i| i == ino)
                                .map(|id| self.paths.path(id as PathId));
                            io::Error::other(entry_error(at.as_deref().unwrap_or(b"?"), e.to_string()))
                        })?;
                }
                let dir = PlacedDir {
                    start: self.next,
                    blocks: (blocks.len() / BLOCK) as u32,
                    indexed,
                    links: if links > MAX_LINKS { 1 } else { links as u16 },
                };
                self.out.write_all(&blocks)?;
                self.next += dir.blocks as u64;
                placed.dirs.push((ino, dir));
                dir.extents()
            }
            Kind::File { first, count, .. } => self.extents[first as usize..][..count as usize].to_vec(),
            _ => Vec::new(),
        };
        if extents.len() > EXTENTS_IN_INODE {
            let tree = self.extent_tree(ino, &extents)?;
            placed.trees.push((ino, tree));
        }
        if let Some(block) = owner.xattrs.as_ref().and_then(|x| x.block.as_ref()) {
            let mut block = block.clone();
            disk::seal_xattr_block(&mut block, self.next, self.seed);
            self.out.write_all(&block)?;
            placed.xattr_blocks.push((ino, self.next as u32));
            self.next += 1;
        }
        Ok(())
    }

    /// Inode `ino` as its table holds it.
    fn encode(&self, node: &Node, ino: u32, a: &Owner, placed: &Placement) -> [u8; INODE_SIZE] {
        let mut f = InodeFields {
            kind: node.file_type(),
            perm: a.perm,
            uid: a.uid,
            gid: a.gid,
            size: 0,
            mtime: node.mtime,
            links: node.links,
            blocks: 0,
            flags: 0,
            i_block: [0; 60],
            xattr_block: 0,
            ibody: a.xattrs.as_ref().map_or(&[], |x| &x.ibody),
        };
        let extents: Option<Vec<Extent>> = match node.kind {
            Kind::Dir { .. } => {
                let dir = find(&placed.dirs, ino).expect("every directory is placed");
                f.size = dir.blocks as u64 * BLOCK as u64;
                f.links = dir.links;
                if dir.indexed {
                    f.flags = INDEX_FL;
                }
                Some(dir.extents())
            }
            Kind::File { size, first, count } => {
                f.size = size;
                Some(self.extents[first as usize..][..count as usize].to_vec())
            }
            Kind::SlowSymlink { len, block } => {
                f.size = len as u64;
                Some(vec![Extent { logical: 0, len: 1, start: block }])
            }
            Kind::FastSymlink { at, len } => {
                f.size = len as u64;
                f.i_block[..len as usize].copy_from_slice(&self.targets[at as usize..][..len as usize]);
                None
            }
            Kind::Device { major, minor, .. } => {
                f.i_block = disk::device_block(major, minor).expect("checked when added");
                None
            }
            Kind::Fifo => None,
        };
        if let Some(extents) = extents {
            f.flags |= EXTENTS_FL;
            f.blocks = extents.iter().map(|e| e.len as u64).sum::<u64>();
            match find(&placed.trees, ino) {
                Some(tree) => {
                    f.i_block = *tree.root;
                    f.blocks += tree.blocks;
                }
                None => disk::extent_node(&mut f.i_block, EXTENTS_IN_INODE, 0, &extents, &[]),
            }
        }
        if let Some(&block) = find(&placed.xattr_blocks, ino) {
            f.xattr_block = block;
            f.blocks += 1;
        }
        disk::inode(&f, ino, self.seed)
    }

    /// Writes the nodes of an extent tree over `extents` (more than fit in the inode) but its
    /// root, which goes in the inode.
    fn extent_tree(&mut self, ino: u32, extents: &[Extent]) -> io::Result<ExtentTree> {
        let start = self.next;
        let mut block = vec![0u8; BLOCK];
        let mut level: Vec<(u32, u64)> = Vec::new();
        for leaves in extents.chunks(EXTENTS_IN_BLOCK) {
            block.fill(0);
            disk::extent_node(&mut block, EXTENTS_IN_BLOCK, 0, leaves, &[]);
            disk::seal_extent_block(&mut block, ino, self.seed);
            self.out.write_all(&block)?;
            level.push((leaves[0].logical, self.next));
            self.next += 1;
        }
        let mut depth = 1;
        while level.len() > EXTENTS_IN_INODE {
            let mut up = Vec::new();
            for index in level.chunks(EXTENTS_IN_BLOCK) {
                block.fill(0);
                disk::extent_node(&mut block, EXTENTS_IN_BLOCK, depth, &[], index);
                disk::seal_extent_block(&mut block, ino, self.seed);
                self.out.write_all(&block)?;
                up.push((index[0].0, self.next));
                self.next += 1;
            }
            level = up;
            depth += 1;
        }
        let mut root = Box::new([0u8; 60]);
        disk::extent_node(&mut *root, EXTENTS_IN_INODE, depth, &[], &level);
        Ok(ExtentTree { root, blocks: self.next - start })
    }
}

/// Where [`ImageWriter::finish`] put what is not in a node: each list in inode order.
#[derive(Default)]
struct Placement {
    dirs: Vec<(u32, PlacedDir)>,
    trees: Vec<(u32, ExtentTree)>,
    /// The block holding the xattrs that did not fit in the inode.
    xattr_blocks: Vec<(u32, u32)>,
}

/// The entry `ino` of a [`Placement`] list.
fn find<T>(list: &[(u32, T)], ino: u32) -> Option<&T> {
    list.binary_search_by_key(&ino, |(i, _)| *i).ok().map(|at| &list[at].1)
}

/// A directory's blocks, one run from `start`.
#[derive(Clone, Copy)]
struct PlacedDir {
    start: u64,
    blocks: u32,
    /// A hashed (htree) directory.
    indexed: bool,
    links: u16,
}

impl PlacedDir {
    fn extents(&self) -> Vec<Extent> {
        let mut extents = Vec::new();
        push_extent(&mut extents, 0, 0, self.blocks, self.start);
        extents
    }
}

/// An extent tree written beside the inode: its root (the inode's `i_block`) and how many
/// blocks its other nodes take.
struct ExtentTree {
    root: Box<[u8; 60]>,
    blocks: u64,
}

/// Appends `len` blocks at logical `logical`, physical `start` to the extents of one file,
/// `extents[first..]`, merging with its last extent when both continue it.
fn push_extent(extents: &mut Vec<Extent>, first: usize, mut logical: u32, mut len: u32, mut start: u64) {
    if extents.len() > first
        && let Some(last) = extents.last_mut()
        && last.logical + last.len == logical
        && last.start + last.len as u64 == start
    {
        let take = len.min(MAX_EXTENT_LEN - last.len);
        last.len += take;
        (logical, len, start) = (logical + take, len - take, start + take as u64);
    }
    while len > 0 {
        let take = len.min(MAX_EXTENT_LEN);
        extents.push(Extent { logical, len: take, start });
        (logical, len, start) = (logical + take, len - take, start + take as u64);
    }
}

/// The smallest layout holding `content_end` blocks of content and `inodes` inodes, with
/// each group's bitmaps and inode table after the content. Groups hold 32768 blocks, fewer
/// when the inodes need more groups than the blocks do (a group has at most 32768 inodes).
fn geometry(content_end: u64, inodes: u32) -> Result<disk::Geometry, Ext4Error> {
    let mut groups =
        content_end.div_ceil(BLOCKS_PER_GROUP).max(inodes.div_ceil(MAX_INODES_PER_GROUP) as u64).max(1);
    loop {
        if groups > MAX_GROUPS as u64 {
            return Err(Ext4Error::TooBig { groups });
        }
        let ipg = inodes.div_ceil(groups as u32).next_multiple_of(INODES_PER_BLOCK).max(INODES_PER_BLOCK);
        let table_blocks = ipg / INODES_PER_BLOCK;
        let mut blocks = content_end + groups * (2 + table_blocks as u64);
        let by_blocks = blocks.div_ceil(BLOCKS_PER_GROUP);
        if by_blocks > groups {
            groups = by_blocks;
            continue;
        }
        let blocks_per_group =
            if by_blocks == groups { BLOCKS_PER_GROUP } else { blocks.div_ceil(groups).next_multiple_of(8) };
        // The last group must hold at least one block.
        blocks = blocks.max((groups - 1) * blocks_per_group + 1);
        return Ok(disk::Geometry {
            blocks,
            groups: groups as u32,
            blocks_per_group,
            inodes_per_group: ipg,
            table_blocks,
        });
    }
}

/// A bit per block of the image.
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize])
    }

    fn set_range(&mut self, from: u64, to: u64) {
        for b in from..to {
            self.0[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn get(&self, b: u64) -> bool {
        self.0.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_until_the_longest_and_split_at_holes() {
        let mut e = Vec::new();
        push_extent(&mut e, 0, 0, 10, 100);
        push_extent(&mut e, 0, 10, 5, 110);
        assert_eq!(e, [Extent { logical: 0, len: 15, start: 100 }]);
        push_extent(&mut e, 0, 20, 1, 115); // a hole of 5 blocks before
        assert_eq!(e.len(), 2);
        let mut e = Vec::new();
        push_extent(&mut e, 0, 0, MAX_EXTENT_LEN + 3, 7);
        assert_eq!(e[1], Extent { logical: MAX_EXTENT_LEN, len: 3, start: 7 + MAX_EXTENT_LEN as u64 });
        // Another file's extents follow in the same array: never merged with the one before.
        let mut e = vec![Extent { logical: 0, len: 1, start: 7 }];
        push_extent(&mut e, 1, 1, 1, 8);
        assert_eq!(e[1], Extent { logical: 1, len: 1, start: 8 });
    }

    #[test]
    fn geometry_fits_content_and_inodes() {
        let g = geometry(100, 20).unwrap();
        assert_eq!((g.groups, g.inodes_per_group, g.blocks_per_group), (1, 32, BLOCKS_PER_GROUP));
        assert_eq!(g.blocks, 100 + 2 + 2);
        // 100k inodes in a small image: groups of fewer blocks, none padded out.
        let g = geometry(3000, 100_000).unwrap();
        assert!(g.groups >= 4 && g.inodes_per_group <= MAX_INODES_PER_GROUP);
        assert!(g.groups as u64 * g.inodes_per_group as u64 >= 100_000);
        assert!(g.blocks < 3000 + 100_000 / 16 + 100, "{} blocks", g.blocks);
        assert_eq!(g.blocks.div_ceil(g.blocks_per_group), g.groups as u64);
        // Content across groups.
        let g = geometry(5 * BLOCKS_PER_GROUP, 1000).unwrap();
        assert_eq!(g.groups, 6);
        assert!(matches!(geometry(300 << 18, 10), Err(Ext4Error::TooBig { .. })));
    }

    /// Issue 17 item 24: the writer held ~400 bytes per file (paths as keys, names per
    /// directory entry, a large record per inode, a vector of extents per file).
    #[test]
    fn a_layer_of_small_files_takes_at_most_180_heap_bytes_per_entry() {
        let per_entry = crate::backend::peak_heap_per_small_file(|out| {
            ImageWriter::create(out, [1; 16], [2; 16]).unwrap()
        });
        assert!(per_entry <= 180, "{per_entry} heap bytes per entry at the peak");
    }

    /// Issue 17 item 24: a layer of directories, as a build converts it: the normalizer and
    /// the writer hold their trees at once (on two threads; here in lockstep on one, so that
    /// one meter sees both), and the normalizer's finished layer lives until the image is done.
    #[test]
    fn a_layer_of_directories_through_the_normalizer_and_the_writer_takes_at_most_220_heap_bytes_per_directory()
     {
        use crate::layer::dirindex::DirIndex;
        use crate::layer::normalize::Normalizer;
        const PARENTS: usize = 700;
        const DIRS: usize = PARENTS * 300;
        let dir = tempfile::tempdir().unwrap();
        let meta = EntryMeta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        };
        let names = (0..PARENTS).flat_map(|d| {
            std::iter::once(format!("data/d{d:03}"))
                .chain((0..300).map(move |s| format!("data/d{d:03}/subdir-{s:03}")))
        });
        let ((), peak) = crate::heap_meter::peak_during(|| {
            let mut normalizer = Normalizer::tar(io::sink(), u64::MAX);
            let mut w = ImageWriter::create(&dir.path().join("image"), [1; 16], [2; 16]).unwrap();
            normalizer.entry(b"data/", EntryKind::Dir, &meta).unwrap();
            w.add(b"data", EntryKind::Dir, &meta).unwrap();
            for name in names {
                normalizer.entry(name.as_bytes(), EntryKind::Dir, &meta).unwrap();
                w.add(name.as_bytes(), EntryKind::Dir, &meta).unwrap();
            }
            let (done, _) = normalizer.finish(&DirIndex::default()).unwrap();
            w.finish().unwrap();
            assert_eq!(done.merged.iter().count(), 1 + 1 + PARENTS + DIRS);
        });
        let per_dir = peak / DIRS;
        assert!(
            per_dir <= 220,
            "{per_dir} heap bytes per directory at the peak ({peak} for {DIRS} directories)"
        );
    }
}

//! One layer's entries → the normalized stream, entry by entry into an [`Output`]: a clean
//! pax tar that mkfs reads as is ([`TarWriter`]), or one of vmrootfs's own image writers,
//! which read each file's data straight from the layer (see [`crate::backend`]).
//!
//! The normalizer applies the layer semantics in one pass, holding only an index of the paths
//! this layer made (no file data, no staging tree; a [`PathTree`] and a few bytes per path):
//!
//! - `.wh.NAME` becomes a whiteout (char 0:0) — unless this layer has an entry there: a
//!   whiteout applies to lower layers only (OCI image spec), so a directory of this layer
//!   becomes opaque and anything else stays, whichever comes first in the tar. Whiteouts are
//!   written at the end of the stream, where this layer has no entry, so a whiteout never
//!   replaces an entry of the stream. A whiteout below a non-directory of this layer is
//!   redundant (the non-directory hides everything below it) and dropped; so is one whose
//!   parent is no directory below (it hides nothing).
//! - `.wh..wh..opq` in D becomes `trusted.overlay.opaque=y` on D; other `.wh..wh.*` markers
//!   are dropped, and so are `trusted.overlay.*`/`user.overlay.*` xattrs from the tar.
//! - Every directory is listed before anything inside it: parents the tar does not list are
//!   emitted as *implicit* directories when first needed, and once the stream has ended and
//!   the lower layers' directories are known ([`Normalizer::finish`]) emitted again with the
//!   metadata applying the layers in order gives them; opaque directories get their marker
//!   then too. mkfs takes a repeated directory's later metadata.
//! - A later entry at a path replaces the earlier one, as applying the layer in order does
//!   (GNU tar 1.34, containerd): a directory replaced by a non-directory takes everything
//!   below it along, and a directory replacing a non-directory is new, so opaque. Backends
//!   take a repeated path's later entry.
//! - Paths are made relative; a `..` that escapes, an entry below a non-directory, and a
//!   hardlink to anything but an earlier non-directory of this layer are errors.
//!
//! The output never asks mkfs to follow a symlink or create anything outside its root.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::num::NonZeroU32;

use super::dirindex::{DirIndex, DirMeta, NodeKind};
use super::meta::{EntryMeta, XattrHolder, XattrRefused, applied_xattrs, is_reserved_xattr};
use super::path::{self, EntryAction, PathError};
use super::pathtree::{PathId, PathTree, PathTreeFull};
use super::pax::{TarKind, TarWriter};

/// Why an entry could not be normalized.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NormalizeError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    TooManyPaths(#[from] PathTreeFull),
    #[error("parent {0:?} is not a directory in this layer")]
    ParentNotDir(String),
    #[error("hardlink target {0:?} is not an earlier file of this layer")]
    BadHardlink(String),
    #[error("hardlink target {0:?} escapes the layer root")]
    LinkEscapes(String),
    #[error("opaque marker inside {0:?}, which is not a directory in this layer")]
    OpaqueOnNonDir(String),
    #[error("entry would replace the layer root with a non-directory")]
    RootNotDir,
    #[error(
        "layer holds more than {limit} bytes of file data (a sparse or decompression bomb?); raise the limit with --max-layer-size"
    )]
    TooLarge { limit: u64 },
    /// The backend writes holes as zeros, so this file would not fit in the store.
    #[error(
        "file of {size} bytes (holes included: mkfs.erofs writes them as zeros) does not fit: with the layer's files before it, that is more than the {room} bytes free in the store"
    )]
    NoRoom { size: u64, room: u64 },
    #[error(transparent)]
    Xattr(#[from] XattrRefused),
    #[error("reading entry data")]
    Data(#[source] io::Error),
    #[error("writing the normalized layer stream")]
    Write(#[source] io::Error),
}

/// Where a [`Normalizer`] puts the layer's entries, in stream order.
pub trait Output {
    /// An entry without data (`kind` is never a file: files come through [`Output::file`]).
    fn entry(&mut self, path: &[u8], kind: TarKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError>;
    /// A regular file of `size` bytes, read from `data`. Failing to read is the error's
    /// `Data` (an early end too), failing to write its `Write`.
    fn file(
        &mut self,
        path: &[u8],
        size: u64,
        data: &mut dyn Read,
        meta: &EntryMeta,
    ) -> Result<(), NormalizeError>;
    /// The stream has ended.
    fn end(&mut self) -> Result<(), NormalizeError>;
}

impl<O: Output + ?Sized> Output for &mut O {
    fn entry(&mut self, path: &[u8], kind: TarKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError> {
        (**self).entry(path, kind, meta)
    }

    fn file(
        &mut self,
        path: &[u8],
        size: u64,
        data: &mut dyn Read,
        meta: &EntryMeta,
    ) -> Result<(), NormalizeError> {
        (**self).file(path, size, data, meta)
    }

    fn end(&mut self) -> Result<(), NormalizeError> {
        (**self).end()
    }
}

/// The error for a file's data that ended `left` bytes before its size: the layer's fault,
/// whoever was reading it.
pub(crate) fn data_ended_early(left: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("entry data ends {left} bytes early"))
}

/// Reads the next piece of a file's data for an [`Output`], of which `left` bytes remain, into
/// `buf` (as much as it holds), and zeroes it up to a whole number of `block`-byte blocks (1:
/// no padding). Returns the bytes read and that padded length; data that ends early is
/// [`data_ended_early`].
pub(crate) fn read_piece(
    data: &mut dyn Read,
    buf: &mut [u8],
    left: u64,
    block: usize,
) -> io::Result<(usize, usize)> {
    let want = left.min(buf.len() as u64) as usize;
    let n = crate::digest::read_full(data, &mut buf[..want])?;
    if n < want {
        return Err(data_ended_early(left - n as u64));
    }
    let padded = n.next_multiple_of(block);
    buf[n..padded].fill(0);
    Ok((n, padded))
}

/// What an entry is, as the layer's tar gives it.
pub enum EntryKind<'a> {
    File {
        size: u64,
        data: &'a mut dyn Read,
    },
    Dir,
    Symlink(&'a [u8]),
    /// Target as written in the tar (normalized here).
    Hardlink(&'a [u8]),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// What a path is in this layer so far.
#[derive(Debug, Clone, Copy)]
enum Node {
    /// A directory: its metadata in [`Normalizer::dir_metas`]; `None` while implicit (its
    /// metadata comes from the layers below).
    Dir(Option<u32>),
    NonDir,
    /// A whiteout, written at the end unless the layer puts something here, with the mtime
    /// [`Normalizer::whiteout_mtimes`] holds at this index (so that a node takes 8 bytes).
    Whiteout(u32),
}

/// The layer after its stream ended: what the next layer and the backends need.
pub struct FinishedLayer {
    /// The merged directories of the stack up to this layer (stored as the `.dirs` sidecar).
    pub merged: DirIndex,
}

/// Turns one layer's entries into the normalized stream put into `O`.
pub struct Normalizer<O: Output> {
    out: O,
    /// Every path this layer named; `nodes[id]` is what path `id` is (the root's is unused).
    paths: PathTree,
    nodes: Vec<Node>,
    /// The distinct metadata of the directories the tar lists (most share theirs).
    dir_metas: Vec<EntryMeta>,
    /// Where each metadata is in `dir_metas`.
    dir_meta_ids: HashMap<EntryMeta, u32>,
    /// The mtimes of the whiteouts, in the order they came.
    whiteout_mtimes: Vec<i64>,
    /// The parent directory of the last entry, known to be a directory with directories
    /// above it (forgotten when a directory is replaced), so its siblings skip the walk.
    last_parent: Option<(Vec<u8>, PathId)>,
    /// The root's own metadata, when the tar lists it.
    root: Option<EntryMeta>,
    opaque: BTreeSet<Vec<u8>>,
    /// Mark opaque every directory the stack below does not have (see
    /// [`Normalizer::opaque_new_dirs`]).
    opaque_new: bool,
    /// A directory written a second time (to mark it opaque) carries only the marker (see
    /// [`Normalizer::marker_only_on_repeat`]).
    marker_only: bool,
    /// Bytes of file data so far (logical: holes of sparse members count), and the bound.
    file_bytes: u64,
    limit: u64,
    /// Free bytes of the store, when the backend writes holes as zeros (see
    /// [`Normalizer::data_room`]).
    room: Option<u64>,
    /// The image's base layer: nothing below for whiteouts or opaque markers to hide.
    base: bool,
}

impl<W: Write> Normalizer<TarWriter<W>> {
    /// A normalizer writing the stream to `out` as a pax tar (see [`Normalizer::new`]).
    pub fn tar(out: W, limit: u64) -> Self {
        Normalizer::new(TarWriter::new(out), limit)
    }
}

impl<O: Output> Normalizer<O> {
    /// `limit`: most bytes of file data (logical, holes included) the layer may hold.
    pub fn new(out: O, limit: u64) -> Self {
        Normalizer {
            out,
            paths: PathTree::default(),
            nodes: vec![Node::Dir(None)],
            dir_metas: Vec::new(),
            dir_meta_ids: HashMap::new(),
            whiteout_mtimes: Vec::new(),
            last_parent: None,
            root: None,
            opaque: BTreeSet::new(),
            opaque_new: false,
            marker_only: false,
            file_bytes: 0,
            limit,
            room: None,
            base: false,
        }
    }

    /// For the image's base layer: its whiteouts and opaque markers hide nothing, so they are
    /// dropped (the EROFS image layer format forbids them there, §3.6).
    pub fn base_layer(mut self) -> Self {
        self.base = true;
        self
    }

    /// Also marks opaque (`trusted.overlay.opaque=y`) each directory of the layer that is not a
    /// directory in the stack below (`lower` of [`Normalizer::finish`]), for a layer above the
    /// base. It changes nothing overlayfs shows — below such a directory there is nothing it
    /// would merge with — but `mkfs.erofs`' rebuild mode (`build --merge` up to EROFS recipe 5)
    /// merges a directory with every lower layer's directory of that path unless it is opaque,
    /// so without the marker a directory removed by a whiteout and made again by a later layer
    /// would bring the removed files back into the merged image.
    pub fn opaque_new_dirs(mut self, on: bool) -> Self {
        self.opaque_new = on;
        self
    }

    /// A directory the tar listed, which finishing marks opaque and so writes again, is
    /// written again with the opaque marker as its only xattr: `mkfs.erofs --tar` adds a
    /// repeated entry's xattrs to those it has, so repeating the directory's own xattrs would
    /// give it each of them twice.
    pub fn marker_only_on_repeat(mut self, on: bool) -> Self {
        self.marker_only = on;
        self
    }

    /// Refuses a file, before any of it is written, once the layer's file data (holes
    /// included) would exceed `room` bytes: for a backend that writes holes as zeros, `room`
    /// is the store's free space, which the layer must never fill.
    pub fn data_room(mut self, room: Option<u64>) -> Self {
        self.room = room;
        self
    }

    /// The output, for a stream that ends in failure.
    pub fn into_inner(self) -> O {
        self.out
    }

    /// One tar entry named `raw` (as in the tar): whiteouts and markers are interpreted.
    pub fn entry(&mut self, raw: &[u8], kind: EntryKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError> {
        match path::classify(raw)? {
            EntryAction::Skip => Ok(()),
            EntryAction::Opaque(dir) => self.opaque_marker(&dir),
            EntryAction::Whiteout(p) => self.whiteout(&p, meta.mtime_sec),
            EntryAction::Write(p) => self.put(&p, kind, meta),
        }
    }

    /// An entry at layer path `path` (already normalized; no whiteout meaning).
    pub fn put(&mut self, path: &[u8], kind: EntryKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError> {
        let mut meta = meta.clone();
        meta.xattrs.retain(|(k, _)| !is_reserved_xattr(k));
        let holder = match kind {
            EntryKind::Dir => XattrHolder::Dir,
            EntryKind::File { .. } | EntryKind::Hardlink(_) => XattrHolder::File,
            _ => XattrHolder::Special,
        };
        applied_xattrs(holder, meta.mode, &mut meta.xattrs)?;
        if path.is_empty() {
            if !matches!(kind, EntryKind::Dir) {
                return Err(NormalizeError::RootNotDir);
            }
            self.emit(path, TarKind::Dir, &meta)?;
            self.root = Some(meta);
            return Ok(());
        }
        let Some(parent) = self.parents(path)? else {
            return Err(NormalizeError::ParentNotDir(path::display(path::split_parent(path).0)));
        };
        let name = path::split_parent(path).1;
        let existing = self.paths.child(parent, name);
        if let EntryKind::Dir = kind {
            // A new directory where this layer had a whiteout or a non-directory (which hid
            // the lower directory): nothing below shows through.
            if let Some(Node::Whiteout(_) | Node::NonDir) = existing.map(|id| self.nodes[id as usize]) {
                self.opaque.insert(path.to_vec());
            }
            self.emit(path, TarKind::Dir, &meta)?;
            // Listed again, the later metadata counts.
            let dir_metas = &mut self.dir_metas;
            let at = *self.dir_meta_ids.entry(meta).or_insert_with_key(|meta| {
                dir_metas.push(meta.clone());
                (dir_metas.len() - 1) as u32
            });
            self.set(parent, name, existing, Node::Dir(Some(at)))?;
            return Ok(());
        }
        if let EntryKind::Hardlink(raw_target) = kind {
            let target = path::normalize(raw_target)
                .map_err(|_| NormalizeError::LinkEscapes(path::display(raw_target)))?;
            if !matches!(self.paths.find(&target).map(|id| self.nodes[id as usize]), Some(Node::NonDir)) {
                return Err(NormalizeError::BadHardlink(path::display(&target)));
            }
            if target == path {
                return Ok(());
            }
            self.replace_with_non_dir(path, parent, name, existing)?;
            if !matches!(self.paths.find(&target).map(|id| self.nodes[id as usize]), Some(Node::NonDir)) {
                // The target was below the directory this link replaces: gone with it.
                return Err(NormalizeError::BadHardlink(path::display(&target)));
            }
            self.emit(path, TarKind::Hardlink(&target), &meta)?;
            return Ok(());
        }
        self.replace_with_non_dir(path, parent, name, existing)?;
        match kind {
            EntryKind::File { size, data } => self.file(path, size, data, &meta)?,
            EntryKind::Symlink(target) => self.emit(path, TarKind::Symlink(target), &meta)?,
            EntryKind::Char { major, minor } => self.emit(path, TarKind::Char { major, minor }, &meta)?,
            EntryKind::Block { major, minor } => self.emit(path, TarKind::Block { major, minor }, &meta)?,
            EntryKind::Fifo => self.emit(path, TarKind::Fifo, &meta)?,
            EntryKind::Dir | EntryKind::Hardlink(_) => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Records that `name` in directory `parent` (path `existing`, when it has one) is `node`.
    fn set(
        &mut self,
        parent: PathId,
        name: &[u8],
        existing: Option<PathId>,
        node: Node,
    ) -> Result<PathId, NormalizeError> {
        Ok(match existing {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                let id = self.paths.add_child(parent, name)?;
                self.nodes.push(node);
                id
            }
        })
    }

    /// Makes sure every ancestor of `path` is a directory of this layer, creating implicit
    /// ones. Returns the parent, or `None` when an ancestor is a non-directory of this layer.
    fn parents(&mut self, path: &[u8]) -> Result<Option<PathId>, NormalizeError> {
        let dir = path::split_parent(path).0;
        if let Some((last, id)) = &self.last_parent
            && last.as_slice() == dir
        {
            return Ok(Some(*id));
        }
        let mut at = PathTree::ROOT;
        for (end, name) in components(dir) {
            let anc = &dir[..end];
            let existing = self.paths.child(at, name);
            match existing.map(|id| (id, self.nodes[id as usize])) {
                Some((id, Node::Dir(_))) => {
                    at = id;
                    continue;
                }
                Some((_, Node::NonDir)) => return Ok(None),
                // Whited out, then used as a parent in the same layer: the directory is new
                // here and hides the lower one.
                Some((_, Node::Whiteout(_))) => {
                    self.opaque.insert(anc.to_vec());
                }
                None => {}
            }
            self.implicit_dir(anc)?;
            at = self.set(at, name, existing, Node::Dir(None))?;
        }
        self.last_parent = Some((dir.to_vec(), at));
        Ok(Some(at))
    }

    /// Writes the header of an implicit directory (the caller records it).
    fn implicit_dir(&mut self, path: &[u8]) -> Result<(), NormalizeError> {
        self.emit(path, TarKind::Dir, &DirMeta::fallback())
    }

    /// Bookkeeping before a non-directory takes `path` (`name` in `parent`, id `existing`).
    /// A directory of this layer there goes, with everything this layer put below it: the
    /// path gets a new id with nothing below (the backends drop what is below too).
    fn replace_with_non_dir(
        &mut self,
        path: &[u8],
        parent: PathId,
        name: &[u8],
        existing: Option<PathId>,
    ) -> Result<(), NormalizeError> {
        let mut existing = existing;
        if let Some(id) = existing
            && let Node::Dir(_) = self.nodes[id as usize]
        {
            let renewed = self.paths.renew(id)?;
            self.nodes.push(Node::NonDir);
            existing = Some(renewed);
            let mut below = path.to_vec();
            below.push(b'/');
            let mut after = path.to_vec();
            after.push(b'/' + 1);
            let gone: Vec<Vec<u8>> = self.opaque.range(below..after).cloned().collect();
            for p in gone {
                self.opaque.remove(&p);
            }
            self.opaque.remove(path);
            self.last_parent = None;
        }
        self.set(parent, name, existing, Node::NonDir)?;
        Ok(())
    }

    fn file(
        &mut self,
        path: &[u8],
        size: u64,
        data: &mut dyn Read,
        meta: &EntryMeta,
    ) -> Result<(), NormalizeError> {
        self.file_bytes = self.file_bytes.saturating_add(size);
        if self.file_bytes > self.limit {
            return Err(NormalizeError::TooLarge { limit: self.limit });
        }
        if let Some(room) = self.room
            && self.file_bytes > room
        {
            return Err(NormalizeError::NoRoom { size, room });
        }
        self.out.file(path, size, data, meta)
    }

    /// `.wh.NAME` at `path`.
    fn whiteout(&mut self, path: &[u8], mtime_sec: i64) -> Result<(), NormalizeError> {
        if path.is_empty() {
            return Err(NormalizeError::RootNotDir);
        }
        let Some(parent) = self.parents(path)? else {
            return Ok(()); // below a non-directory of this layer: already hidden
        };
        let name = path::split_parent(path).1;
        match self.paths.child(parent, name).map(|id| self.nodes[id as usize]) {
            Some(Node::Dir(_)) => {
                self.opaque.insert(path.to_vec());
            }
            Some(_) => {}
            None => {
                let at = u32::try_from(self.whiteout_mtimes.len()).map_err(|_| PathTreeFull)?;
                self.set(parent, name, None, Node::Whiteout(at))?;
                self.whiteout_mtimes.push(mtime_sec);
            }
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`.
    fn opaque_marker(&mut self, dir: &[u8]) -> Result<(), NormalizeError> {
        if !dir.is_empty() {
            let not_dir = || NormalizeError::OpaqueOnNonDir(path::display(dir));
            let Some(parent) = self.parents(dir)? else {
                return Err(not_dir());
            };
            let name = path::split_parent(dir).1;
            let existing = self.paths.child(parent, name);
            match existing.map(|id| self.nodes[id as usize]) {
                Some(Node::Dir(_)) => {}
                Some(Node::NonDir) => return Err(not_dir()),
                Some(Node::Whiteout(_)) | None => {
                    self.implicit_dir(dir)?;
                    self.set(parent, name, existing, Node::Dir(None))?;
                }
            }
        }
        self.opaque.insert(dir.to_vec());
        Ok(())
    }

    fn emit(&mut self, path: &[u8], kind: TarKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError> {
        self.out.entry(path, kind, meta)
    }

    /// Ends the stream: gives implicit directories (and the root, if the tar did not list it)
    /// the metadata `lower` — the merged directories of the layers below — has for them, marks
    /// opaque directories, and writes the end of the archive. Returns the sink and what the
    /// next layer and the backend need.
    pub fn finish(mut self, lower: &DirIndex) -> Result<(FinishedLayer, O), NormalizeError> {
        let final_meta = |p: &[u8], own: Option<EntryMeta>| {
            own.or_else(|| lower.get(p).cloned()).unwrap_or_else(DirMeta::fallback)
        };
        let root_implicit = self.root.is_none();
        // The base layer's whiteouts hide nothing: left out of the stream and the tree.
        let whiteouts_kept = !self.base;
        let (paths, nodes, mtimes) = (&mut self.paths, &self.nodes, &self.whiteout_mtimes);
        let mut whiteouts: Vec<(Vec<u8>, i64)> = (nodes.iter().enumerate())
            .filter_map(|(id, n)| match n {
                Node::Whiteout(at) if whiteouts_kept => {
                    let p = paths.path(id as PathId);
                    // Not one below a directory a non-directory replaced.
                    (paths.find(&p) == Some(id as PathId)).then_some((p, mtimes[*at as usize]))
                }
                _ => None,
            })
            .collect();
        // The layer's directories, sorted by path: their paths back to back in `names`, each
        // with where it starts there, its length and its own metadata's index + 1 in
        // `dir_metas` (none when implicit), so that their `DirIndex` is built in order without
        // a heap copy of every path or metadata at once.
        let count = self.nodes.iter().filter(|n| matches!(n, Node::Dir(_))).count();
        let mut names = Vec::new();
        let mut dirs: Vec<(usize, u32, Option<NonZeroU32>)> = Vec::with_capacity(count);
        for (id, node) in self.nodes.iter().enumerate().skip(1) {
            if let Node::Dir(own) = *node {
                let p = self.paths.path(id as PathId);
                if self.paths.find(&p) != Some(id as PathId) {
                    continue; // below a directory a non-directory replaced, or that directory
                }
                names.extend_from_slice(&p);
                let own = own.map(|at| NonZeroU32::new(at + 1).expect("fewer than 4 Gi metadata"));
                dirs.push((names.len() - p.len(), p.len() as u32, own));
            }
        }
        names.shrink_to_fit();
        // The tree tells the merged view what a lower directory is in this layer; with nothing
        // below, it is not asked again, so it goes before the layer's index is built.
        if lower.is_empty() {
            (self.paths, self.nodes) = (PathTree::default(), Vec::new());
        }
        let path = |&(start, len, _): &(usize, u32, Option<NonZeroU32>)| &names[start..][..len as usize];
        dirs.sort_unstable_by(|a, b| path(a).cmp(path(b)));
        let root = final_meta(b"", self.root.take());
        self.dir_meta_ids = HashMap::new();
        let dir_metas = std::mem::take(&mut self.dir_metas);
        // Per directory of `layer_dirs`, in its order: whether the tar did not list it.
        let mut implicit = Vec::with_capacity(dirs.len() + 1);
        implicit.push(root_implicit);
        let layer_dirs = DirIndex::from_sorted(
            names.len(),
            std::iter::once((&b""[..], root)).chain(dirs.iter().map(|dir| {
                implicit.push(dir.2.is_none());
                let own = dir.2.map(|at| dir_metas[at.get() as usize - 1].clone());
                (path(dir), final_meta(path(dir), own))
            })),
        );
        drop((dirs, names, dir_metas));
        if self.base {
            self.opaque.clear();
        }
        if self.opaque_new {
            for (p, _) in layer_dirs.iter().filter(|(p, _)| !p.is_empty() && lower.get(p).is_none()) {
                self.opaque.insert(p.to_vec());
            }
        }
        for ((p, meta), &implicit) in layer_dirs.iter().zip(&implicit) {
            let opaque = self.opaque.contains(p);
            if implicit || opaque {
                let mut m = meta.clone();
                if opaque {
                    if !implicit && self.marker_only {
                        m.xattrs.clear();
                    }
                    m.xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
                    m.xattrs.sort();
                }
                self.out.entry(p, TarKind::Dir, &m)?;
            }
        }
        drop(implicit);
        whiteouts.retain(|(p, _)| hides_something(p, lower, &self.opaque));
        whiteouts.sort();
        for (p, mtime_sec) in whiteouts {
            let meta = EntryMeta { mode: 0, uid: 0, gid: 0, mtime_sec, mtime_nsec: 0, xattrs: Vec::new() };
            self.emit(&p, TarKind::Char { major: 0, minor: 0 }, &meta)?;
        }
        let (paths, nodes) = (&mut self.paths, &self.nodes);
        let merged = lower.apply_layer(layer_dirs, &self.opaque, |p| {
            match paths.find(p).map(|id| nodes[id as usize]) {
                Some(Node::Dir(_)) => NodeKind::Dir,
                Some(Node::Whiteout(_)) if !whiteouts_kept => NodeKind::Missing,
                Some(_) => NodeKind::NonDir,
                None => NodeKind::Missing,
            }
        });
        self.out.end()?;
        Ok((FinishedLayer { merged }, self.out))
    }
}

/// The names of a layer path with where each ends: `a/bc` → `(1, a)`, `(4, bc)`.
fn components(path: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut start = 0;
    path.split(|&b| b == b'/')
        .map(move |name| {
            let end = start + name.len();
            start = end + 1;
            (end, name)
        })
        .filter(|(_, name)| !name.is_empty())
}

/// Whether a whiteout at `path` may hide something: only when its parent is a directory
/// below (`lower`, the merged directories of the layers below) that this layer does not make
/// opaque. Anything else would show in the layer's blob as a name with nothing behind it.
fn hides_something(path: &[u8], lower: &DirIndex, opaque: &BTreeSet<Vec<u8>>) -> bool {
    let parent = path::split_parent(path).0;
    lower.get(parent).is_some() && !opaque.contains(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> EntryMeta {
        EntryMeta { mode, uid: 0, gid: 0, mtime_sec: 1_700_000_000, mtime_nsec: 0, xattrs: Vec::new() }
    }

    /// (path, type flag, mode, opaque?) of every entry in a normalized stream, in order.
    fn entries(bytes: &[u8]) -> Vec<(String, char, u32, bool)> {
        let mut ar = tar::Archive::new(bytes);
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let opaque = e
                    .pax_extensions()
                    .unwrap()
                    .map(|p| p.flatten().any(|x| x.key_bytes() == b"SCHILY.xattr.trusted.overlay.opaque"))
                    .unwrap_or(false);
                let h = e.header();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    h.entry_type().as_byte() as char,
                    h.mode().unwrap(),
                    opaque,
                )
            })
            .collect()
    }

    fn run(
        feed: impl FnOnce(&mut Normalizer<TarWriter<Vec<u8>>>),
        lower: &DirIndex,
    ) -> (Vec<(String, char, u32, bool)>, DirIndex) {
        let mut n = Normalizer::tar(Vec::new(), u64::MAX);
        feed(&mut n);
        let (done, out) = n.finish(lower).unwrap();
        (entries(&out.into_inner()), done.merged)
    }

    fn file(n: &mut Normalizer<TarWriter<Vec<u8>>>, p: &str) -> Result<(), NormalizeError> {
        n.entry(p.as_bytes(), EntryKind::File { size: 1, data: &mut &b"x"[..] }, &meta(0o644))
    }

    #[test]
    fn implicit_parents_come_first_and_take_lower_metadata_at_the_end() {
        let mut lower = DirIndex::default();
        lower.insert(b"".to_vec(), meta(0o700));
        lower.insert(b"usr".to_vec(), meta(0o751));
        let (entries, merged) = run(|n| file(n, "usr/bin/tool").unwrap(), &lower);
        let names: Vec<(&str, char, u32)> = entries.iter().map(|(p, t, m, _)| (p.as_str(), *t, *m)).collect();
        assert_eq!(
            names,
            [
                ("usr/", '5', 0o755),
                ("usr/bin/", '5', 0o755),
                ("usr/bin/tool", '0', 0o644),
                ("./", '5', 0o700),
                ("usr/", '5', 0o751),
                ("usr/bin/", '5', 0o755),
            ]
        );
        assert_eq!(merged.get(b"usr").unwrap().mode, 0o751);
    }

    #[test]
    fn whiteouts_opaque_dirs_and_redundant_whiteouts() {
        let mut lower = DirIndex::default();
        lower.insert(b"".to_vec(), meta(0o755));
        lower.insert(b"etc".to_vec(), meta(0o755));
        let (entries, _) = run(
            |n| {
                n.entry(b"etc/.wh.motd", EntryKind::Fifo, &meta(0)).unwrap();
                n.entry(b"d/", EntryKind::Dir, &meta(0o711)).unwrap();
                n.entry(b"d/.wh..wh..opq", EntryKind::Fifo, &meta(0)).unwrap();
                n.entry(b"skel", EntryKind::File { size: 0, data: &mut &b""[..] }, &meta(0o644)).unwrap();
                n.entry(b"skel/.wh..bashrc", EntryKind::Fifo, &meta(0)).unwrap();
                file(n, "r").unwrap();
                n.entry(b".wh.r", EntryKind::Fifo, &meta(0)).unwrap();
                n.entry(b"a/.wh..wh.plnk", EntryKind::Fifo, &meta(0)).unwrap();
                n.entry(b"new/.wh.ghost", EntryKind::Fifo, &meta(0)).unwrap();
            },
            &lower,
        );
        let has = |p: &str, t: char| entries.iter().any(|(q, u, _, _)| q == p && *u == t);
        assert!(has("etc/motd", '3'), "whiteout → char 0:0: {entries:?}");
        assert!(!entries.iter().any(|(p, ..)| p.contains(".wh.")), "no .wh. names: {entries:?}");
        assert!(
            entries.iter().any(|(p, t, m, o)| p == "d/" && *t == '5' && *m == 0o711 && *o),
            "{entries:?}"
        );
        assert!(!has("r", '3'), "a whiteout of this layer's own file is dropped: {entries:?}");
        assert!(!has("new/ghost", '3'), "nothing below a new directory to hide: {entries:?}");
    }

    #[test]
    fn a_base_layer_keeps_no_whiteouts_or_opaque_markers() {
        let mut n = Normalizer::tar(Vec::new(), u64::MAX).base_layer();
        n.entry(b"etc/.wh.motd", EntryKind::Fifo, &meta(0)).unwrap();
        n.entry(b"d/", EntryKind::Dir, &meta(0o711)).unwrap();
        n.entry(b"d/.wh..wh..opq", EntryKind::Fifo, &meta(0)).unwrap();
        file(&mut n, "d/f").unwrap();
        let (_, out) = n.finish(&DirIndex::default()).unwrap();
        let entries = entries(&out.into_inner());
        assert!(!entries.iter().any(|(p, ..)| p == "etc/motd"), "no whiteout: {entries:?}");
        assert!(entries.iter().all(|(.., opaque)| !opaque), "no opaque marker: {entries:?}");
        assert!(entries.iter().any(|(p, t, m, _)| p == "d/" && *t == '5' && *m == 0o711), "{entries:?}");
        assert!(entries.iter().any(|(p, ..)| p == "d/f"), "{entries:?}");
    }

    #[test]
    fn refusals() {
        let mut n = Normalizer::tar(Vec::new(), u64::MAX);
        n.entry(b"link", EntryKind::Symlink(b"/etc"), &meta(0o777)).unwrap();
        assert!(matches!(file(&mut n, "link/planted"), Err(NormalizeError::ParentNotDir(p)) if p == "link"));
        assert!(matches!(
            n.entry(b"h", EntryKind::Hardlink(b"etc/shadow"), &meta(0)),
            Err(NormalizeError::BadHardlink(_))
        ));
        assert!(matches!(
            n.entry(b"h", EntryKind::Hardlink(b"../x"), &meta(0)),
            Err(NormalizeError::LinkEscapes(_))
        ));
        assert!(matches!(file(&mut n, "a/../../x"), Err(NormalizeError::Path(PathError::Escapes))));
        assert!(matches!(file(&mut n, "./"), Err(NormalizeError::RootNotDir)));
        let mut small = Normalizer::tar(Vec::new(), 10);
        let r = small.entry(b"big", EntryKind::File { size: 11, data: &mut &[0u8; 11][..] }, &meta(0o644));
        assert!(matches!(r, Err(NormalizeError::TooLarge { limit: 10 })));
    }

    #[test]
    fn a_later_entry_replaces_an_earlier_one_of_another_type() {
        let mut lower = DirIndex::default();
        lower.insert(b"".to_vec(), meta(0o755));
        lower.insert(b"f".to_vec(), meta(0o755));
        let (entries, merged) = run(
            |n| {
                n.entry(b"x/", EntryKind::Dir, &meta(0o700)).unwrap();
                file(n, "x/child").unwrap();
                n.entry(b"x/sub/", EntryKind::Dir, &meta(0o700)).unwrap();
                file(n, "x").unwrap(); // the directory and what is below it go
                file(n, "f").unwrap();
                file(n, "f").unwrap(); // a file again is fine: the later one wins
                n.entry(b"f/", EntryKind::Dir, &meta(0o751)).unwrap();
                file(n, "f/in").unwrap();
            },
            &lower,
        );
        assert!(
            entries.iter().any(|(p, t, ..)| p == "x" && *t == '0'),
            "the file replaces the directory: {entries:?}"
        );
        assert!(
            entries.iter().any(|(p, t, m, o)| p == "f/" && *t == '5' && *m == 0o751 && *o),
            "a new directory over a file is opaque: {entries:?}"
        );
        assert!(
            !entries
                .iter()
                .skip_while(|(p, t, ..)| !(p == "x" && *t == '0'))
                .any(|(p, ..)| p.starts_with("x/")),
            "nothing below x is written again: {entries:?}"
        );
        assert!(merged.get(b"x").is_none() && merged.get(b"x/sub").is_none(), "x is a file now");
        assert_eq!(merged.get(b"f").map(|m| m.mode), Some(0o751));
        // A whiteout and a directory at one path: the directory, made opaque.
        let (entries, _) = run(
            |n| {
                n.entry(b".wh.w", EntryKind::Fifo, &meta(0)).unwrap();
                n.entry(b"w/", EntryKind::Dir, &meta(0o711)).unwrap();
            },
            &DirIndex::default(),
        );
        assert!(entries.iter().any(|(p, t, _, o)| p == "w/" && *t == '5' && *o), "{entries:?}");
        assert!(!entries.iter().any(|(p, t, ..)| p == "w" && *t == '3'), "{entries:?}");
    }

    /// Issue 17 item 24: the normalizer held ~250 bytes per file (a map keyed by full paths).
    #[test]
    fn a_layer_of_small_files_takes_at_most_70_heap_bytes_per_entry() {
        const FILES: usize = 200_000;
        let (names, data) = ((0..FILES).map(|i| format!("data/d{:03}/file-{i:06}", i / 1000)), [b'x'; 64]);
        let ((), peak) = crate::heap_meter::peak_during(|| {
            let mut n = Normalizer::tar(io::sink(), u64::MAX);
            for (i, name) in names.enumerate() {
                let size = (i % 64) as u64;
                n.entry(
                    name.as_bytes(),
                    EntryKind::File { size, data: &mut &data[..size as usize] },
                    &meta(0o644),
                )
                .unwrap();
            }
            let (done, _) = n.finish(&DirIndex::default()).unwrap();
            assert_eq!(done.merged.iter().count(), 1 + 1 + FILES / 1000);
        });
        let per_entry = peak / FILES;
        assert!(per_entry <= 70, "{per_entry} heap bytes per entry at the peak ({peak} for {FILES} files)");
    }

    /// Issue 17 item 24: a layer of directories held ~250 heap bytes per directory while it
    /// finished (its `DirIndex` and `OwnDirs` as maps keyed by heap copies of full paths),
    /// then ~136 (its tree kept while the index of a base layer was built).
    #[test]
    fn a_layer_of_directories_takes_at_most_100_heap_bytes_per_directory() {
        const DIRS: usize = 200_000;
        let names = (0..DIRS / 1000)
            .map(|d| format!("tree/d{d:03}"))
            .chain((0..DIRS).map(|i| format!("tree/d{:03}/dir-{i:06}", i / 1000)));
        let ((), peak) = crate::heap_meter::peak_during(|| {
            let mut n = Normalizer::tar(io::sink(), u64::MAX);
            for name in names {
                n.entry(name.as_bytes(), EntryKind::Dir, &meta(0o755)).unwrap();
            }
            let (done, _) = n.finish(&DirIndex::default()).unwrap();
            assert_eq!(done.merged.iter().count(), 1 + 1 + DIRS / 1000 + DIRS);
            assert_eq!(done.merged.get(b"tree/d007/dir-007123").map(|m| m.mode), Some(0o755));
        });
        let per_dir = peak / DIRS;
        assert!(
            per_dir <= 100,
            "{per_dir} heap bytes per directory at the peak ({peak} for {DIRS} directories)"
        );
    }
}

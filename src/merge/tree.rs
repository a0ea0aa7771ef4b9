//! The merged tree of a stack of EROFS layer images, as overlayfs shows it: the layers
//! applied base first, each entry of a layer replacing the entry of that name below it,
//! except that a directory over a directory merges with it unless it is opaque
//! (`trusted.overlay.opaque=y`); a whiteout (a character device 0:0) removes the entry below
//! and leaves nothing. A merged directory and the root take the attributes and xattrs of
//! their topmost layer. `trusted.overlay.*` xattrs are overlayfs's own markers and are left
//! out, as overlayfs hides them.
//!
//! Files keep a reference to their data in their layer ([`Leaf::File`]); their bytes are never
//! read. Hardlinks within a layer stay one inode ([`Node::origin`]).

use std::collections::{BTreeMap, HashSet};

use crate::erofs::format as f;
use crate::erofs::read::{FileData, Image, Inode, ReadError, Xattr};

/// The deepest directory nesting read (a path of 4096 bytes has at most 2048 levels).
const MAX_DEPTH: usize = 2048;

/// A stack that cannot be merged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// A layer blob could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A file whose last block is inside its image's metadata.
    #[error(
        "{layer}: file {path} keeps its last block inside the metadata (an inlined tail), which another image cannot reference",
        layer = .layer.display(), path = crate::layer::path::display(path)
    )]
    InlinedTail {
        /// The layer blob.
        layer: std::path::PathBuf,
        /// The file.
        path: Vec<u8>,
    },
    /// Directories nested deeper than the merge follows.
    #[error("{layer}: directories nest deeper than {MAX_DEPTH} levels", layer = .layer.display())]
    TooDeep {
        /// The layer blob.
        layer: std::path::PathBuf,
    },
}

/// A regular file's data: which layer (0: the base) and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub layer: usize,
    pub data: FileData,
}

/// What a node is, besides its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// Entries by name (`BTreeMap`: the sorted order directories are written in).
    Dir(BTreeMap<Box<[u8]>, usize>),
    File(FileRef),
    Symlink(Vec<u8>),
    /// Devices, FIFOs, sockets: their attributes are all there is (`rdev` in `i_u`).
    Special,
}

/// One node of the merged tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The layer and inode it comes from: nodes with the same origin are hardlinks.
    pub origin: (usize, u64),
    /// The inode's attributes as its layer has them (mode, owner, mtime, size, rdev).
    pub attrs: f::Inode,
    pub xattrs: Vec<Xattr>,
    pub leaf: Leaf,
}

/// The merged tree: nodes in an arena, the root first. Nodes removed by a later layer stay
/// in the arena, unreachable.
#[derive(Debug, Default)]
pub struct MergedTree {
    /// The nodes; index 0 is the root.
    pub nodes: Vec<Node>,
}

pub const ROOT: usize = 0;

/// One layer's walk: its image and number, the directories it has reached (each once), and
/// the path of the directory it is in (for errors).
struct LayerWalk<'a> {
    image: &'a Image,
    layer: usize,
    visited: HashSet<u64>,
    path: Vec<u8>,
}

fn is_trusted(x: &Xattr) -> bool {
    f::xattr_prefix(x.index) == Some(b"trusted.")
}

fn is_overlay_marker(x: &Xattr) -> bool {
    is_trusted(x) && x.suffix.starts_with(b"overlay.")
}

fn is_opaque(xattrs: &[Xattr]) -> bool {
    xattrs.iter().any(|x| is_trusted(x) && x.suffix == b"overlay.opaque" && x.value == b"y")
}

fn is_whiteout(inode: &Inode) -> bool {
    inode.file_type() == f::FT_CHRDEV && inode.fields.i_u == 0
}

impl MergedTree {
    /// The merged tree of `layers`, base first.
    pub fn of(layers: &[Image]) -> Result<MergedTree, TreeError> {
        let mut tree = MergedTree::default();
        for (i, image) in layers.iter().enumerate() {
            let root = image.root()?;
            let xattrs = image.xattrs(&root)?;
            if tree.nodes.is_empty() {
                tree.nodes.push(Node {
                    origin: (i, root.nid),
                    attrs: root.fields.clone(),
                    xattrs: Vec::new(),
                    leaf: Leaf::Dir(BTreeMap::new()),
                });
            }
            tree.set_dir_attrs(ROOT, &root, xattrs);
            let mut walk =
                LayerWalk { image, layer: i, visited: HashSet::from([root.nid]), path: Vec::new() };
            tree.apply_dir(&mut walk, &root, ROOT, 0)?;
        }
        Ok(tree)
    }

    /// The entries of directory node `node` (empty for a non-directory).
    pub fn entries(&self, node: usize) -> impl Iterator<Item = (&[u8], usize)> {
        let map = match &self.nodes[node].leaf {
            Leaf::Dir(m) => Some(m),
            _ => None,
        };
        map.into_iter().flatten().map(|(k, v)| (&**k, *v))
    }

    fn set_dir_attrs(&mut self, node: usize, inode: &Inode, xattrs: Vec<Xattr>) {
        let n = &mut self.nodes[node];
        n.attrs = inode.fields.clone();
        n.xattrs = xattrs.into_iter().filter(|x| !is_overlay_marker(x)).collect();
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Applies the walked layer's directory `dir` (at `walk.path`) onto the merged directory
    /// `node`.
    fn apply_dir(
        &mut self,
        walk: &mut LayerWalk,
        dir: &Inode,
        node: usize,
        depth: usize,
    ) -> Result<(), TreeError> {
        let image = walk.image;
        let layer = walk.layer;
        if depth >= MAX_DEPTH {
            return Err(TreeError::TooDeep { layer: image.path().to_owned() });
        }
        for entry in image.dir_entries(dir)? {
            let inode = image.inode(entry.nid)?;
            let len = walk.path.len();
            walk.path.push(b'/');
            walk.path.extend_from_slice(&entry.name);
            let below = match &self.nodes[node].leaf {
                Leaf::Dir(m) => m.get(entry.name.as_slice()).copied(),
                _ => unreachable!("apply_dir is called on directories"),
            };
            let placed = if is_whiteout(&inode) {
                None
            } else if inode.is_dir() {
                if !walk.visited.insert(inode.nid) {
                    return Err(
                        ReadError::DirectoryTwice { path: image.path().to_owned(), nid: inode.nid }.into()
                    );
                }
                let xattrs = image.xattrs(&inode)?;
                let merge_into =
                    below.filter(|&b| matches!(self.nodes[b].leaf, Leaf::Dir(_)) && !is_opaque(&xattrs));
                let child = match merge_into {
                    Some(b) => b,
                    None => self.push(Node {
                        origin: (layer, inode.nid),
                        attrs: inode.fields.clone(),
                        xattrs: Vec::new(),
                        leaf: Leaf::Dir(BTreeMap::new()),
                    }),
                };
                self.set_dir_attrs(child, &inode, xattrs);
                self.apply_dir(walk, &inode, child, depth + 1)?;
                Some(child)
            } else {
                let xattrs: Vec<Xattr> =
                    image.xattrs(&inode)?.into_iter().filter(|x| !is_overlay_marker(x)).collect();
                let leaf = match inode.file_type() {
                    f::FT_REG_FILE => {
                        let data = image.file_data(&inode)?;
                        if data == FileData::InlineTail {
                            return Err(TreeError::InlinedTail {
                                layer: image.path().to_owned(),
                                path: walk.path.clone(),
                            });
                        }
                        Leaf::File(FileRef { layer, data })
                    }
                    f::FT_SYMLINK => Leaf::Symlink(image.symlink_target(&inode)?),
                    _ => Leaf::Special,
                };
                Some(self.push(Node {
                    origin: (layer, inode.nid),
                    attrs: inode.fields.clone(),
                    xattrs,
                    leaf,
                }))
            };
            walk.path.truncate(len);
            let Leaf::Dir(map) = &mut self.nodes[node].leaf else { unreachable!("checked above") };
            match placed {
                Some(child) => map.insert(entry.name.into_boxed_slice(), child),
                None => map.remove(entry.name.as_slice()),
            };
        }
        Ok(())
    }
}

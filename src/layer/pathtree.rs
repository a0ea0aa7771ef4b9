//! The paths of one layer as a tree of interned names: about 20 bytes per path, where a map
//! keyed by full paths costs a heap allocation of the whole path (and the map's own entry)
//! for every file. The normalizer and the ext4 writer each keep one, with what they know of
//! each path in a `Vec` indexed by its [`PathId`].
//!
//! A path is its parent's id and its last name; names are stored back to back in one buffer
//! (a path's name ends where the next path's begins), and an open-addressing table of ids,
//! hashed by (parent, name), finds a child. Paths are only ever added, so ids are stable.

use std::hash::{BuildHasher, RandomState};

/// A path of the tree; the root (`b""`) is [`PathTree::ROOT`].
pub type PathId = u32;

/// The tree cannot hold more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the layer's paths take more than 4 GiB of names, or number more than 4 Gi")]
pub struct PathTreeFull;

/// One path: its parent and where its name ends in [`PathTree::names`].
#[derive(Clone, Copy)]
struct PathNode {
    parent: PathId,
    name_end: u32,
}

/// Every path a layer named so far, root included.
pub struct PathTree {
    nodes: Vec<PathNode>,
    names: Vec<u8>,
    /// Open addressing, linear probing: `id + 1` of a path, `0` for an empty slot (the root is
    /// never in it). A power of two long, at most 3/4 full.
    slots: Vec<u32>,
    /// Randomly keyed, so a layer cannot choose names that all land in one slot.
    hasher: RandomState,
    /// The last directory [`PathTree::find_parent`] resolved, to skip the walk for its siblings.
    last_dir: (Vec<u8>, PathId),
}

impl Default for PathTree {
    fn default() -> Self {
        PathTree {
            nodes: vec![PathNode { parent: Self::ROOT, name_end: 0 }],
            names: Vec::new(),
            slots: vec![0; 16],
            hasher: RandomState::new(),
            last_dir: (Vec::new(), Self::ROOT),
        }
    }
}

impl PathTree {
    pub const ROOT: PathId = 0;

    pub fn parent(&self, id: PathId) -> PathId {
        self.nodes[id as usize].parent
    }

    /// The last name of `id` (`b""` for the root).
    pub fn name(&self, id: PathId) -> &[u8] {
        let start = if id == Self::ROOT { 0 } else { self.nodes[id as usize - 1].name_end as usize };
        &self.names[start..self.nodes[id as usize].name_end as usize]
    }

    /// The full layer path of `id`.
    pub fn path(&self, id: PathId) -> Vec<u8> {
        let mut names = Vec::new();
        let mut at = id;
        while at != Self::ROOT {
            names.push(self.name(at));
            at = self.parent(at);
        }
        names.reverse();
        names.join(&b'/')
    }

    fn slot_of(&self, parent: PathId, name: &[u8]) -> usize {
        self.hasher.hash_one((parent, name)) as usize & (self.slots.len() - 1)
    }

    /// The child `name` of `parent`, if there is one.
    pub fn child(&self, parent: PathId, name: &[u8]) -> Option<PathId> {
        let mask = self.slots.len() - 1;
        let mut at = self.slot_of(parent, name);
        loop {
            match self.slots[at] {
                0 => return None,
                s => {
                    let id = s - 1;
                    if self.nodes[id as usize].parent == parent && self.name(id) == name {
                        return Some(id);
                    }
                }
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds `name` under `parent`, which must not have it yet.
    pub fn add_child(&mut self, parent: PathId, name: &[u8]) -> Result<PathId, PathTreeFull> {
        debug_assert!(self.child(parent, name).is_none());
        let id = PathId::try_from(self.nodes.len()).map_err(|_| PathTreeFull)?;
        let name_end = u32::try_from(self.names.len() + name.len()).map_err(|_| PathTreeFull)?;
        if id == u32::MAX {
            return Err(PathTreeFull);
        }
        self.names.extend_from_slice(name);
        self.nodes.push(PathNode { parent, name_end });
        self.place(id);
        if self.nodes.len() * 4 > self.slots.len() * 3 {
            self.grow();
        }
        Ok(id)
    }

    /// Gives path `id` (not the root) a new id with no children: what was below it is no longer
    /// found, though its ids stay valid for [`PathTree::path`] (they then name a path that
    /// [`PathTree::find`] no longer gives them). For a directory replaced by a non-directory.
    pub fn renew(&mut self, id: PathId) -> Result<PathId, PathTreeFull> {
        debug_assert!(id != Self::ROOT);
        let new = PathId::try_from(self.nodes.len()).map_err(|_| PathTreeFull)?;
        let name = self.name(id).to_vec();
        let name_end = u32::try_from(self.names.len() + name.len()).map_err(|_| PathTreeFull)?;
        if new == u32::MAX {
            return Err(PathTreeFull);
        }
        let parent = self.parent(id);
        let mask = self.slots.len() - 1;
        let mut at = self.slot_of(parent, &name);
        while self.slots[at] != id + 1 {
            at = (at + 1) & mask;
        }
        self.names.extend_from_slice(&name);
        self.nodes.push(PathNode { parent, name_end });
        self.slots[at] = new + 1;
        if self.nodes.len() * 4 > self.slots.len() * 3 {
            self.grow();
        }
        self.last_dir = (Vec::new(), Self::ROOT);
        Ok(new)
    }

    fn place(&mut self, id: PathId) {
        let mask = self.slots.len() - 1;
        let mut at = self.slot_of(self.nodes[id as usize].parent, self.name(id));
        while self.slots[at] != 0 {
            at = (at + 1) & mask;
        }
        self.slots[at] = id + 1;
    }

    /// Doubles the table and places again every path it holds (renewed ones are not in it).
    fn grow(&mut self) {
        let doubled = vec![0; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        for id in old.into_iter().filter(|&s| s != 0).map(|s| s - 1) {
            self.place(id);
        }
    }

    /// The id of layer path `path` (`b""` is the root), if every name on the way is there.
    pub fn find(&mut self, path: &[u8]) -> Option<PathId> {
        if path.is_empty() {
            return Some(Self::ROOT);
        }
        let (dir, name) = self.find_parent(path)?;
        self.child(dir, name)
    }

    /// The id of the parent of `path` (not the root) and `path`'s last name, if every name
    /// up to the parent is there. Remembers the parent, so its next child costs no walk.
    pub fn find_parent<'p>(&mut self, path: &'p [u8]) -> Option<(PathId, &'p [u8])> {
        let (dir, name) = super::path::split_parent(path);
        if dir == self.last_dir.0.as_slice() {
            return Some((self.last_dir.1, name));
        }
        let mut at = Self::ROOT;
        for name in dir.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            at = self.child(at, name)?;
        }
        self.last_dir = (dir.to_vec(), at);
        Some((at, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_found_by_name_and_rebuilt_from_ids() {
        let mut t = PathTree::default();
        let usr = t.add_child(PathTree::ROOT, b"usr").unwrap();
        let bin = t.add_child(usr, b"bin").unwrap();
        let mut files = Vec::new();
        for i in 0..10_000 {
            files.push(t.add_child(bin, format!("f{i}").as_bytes()).unwrap());
        }
        let other = t.add_child(PathTree::ROOT, b"bin").unwrap();
        assert_eq!(t.find(b""), Some(PathTree::ROOT));
        assert_eq!(t.find(b"usr/bin"), Some(bin));
        assert_eq!(t.find(b"bin"), Some(other));
        assert_eq!(t.find(b"usr/bin/f9999"), Some(files[9999]));
        assert_eq!(t.find(b"usr/bin/f10000"), None);
        assert_eq!(t.find(b"usr/lib/f1"), None);
        assert_eq!(t.child(usr, b"bin"), Some(bin));
        assert_eq!(t.child(other, b"f1"), None);
        assert_eq!(t.path(files[1234]), b"usr/bin/f1234");
        assert_eq!(t.path(PathTree::ROOT), b"");
        assert_eq!((t.name(bin), t.parent(bin)), (&b"bin"[..], usr));
        assert_eq!(t.find_parent(b"usr/bin/new"), Some((bin, &b"new"[..])));
        assert_eq!(t.find_parent(b"usr/lib/new"), None);
        assert_eq!(t.nodes.len(), 10_004);
    }

    #[test]
    fn a_renewed_path_has_nothing_below_it() {
        let mut t = PathTree::default();
        let x = t.add_child(PathTree::ROOT, b"x").unwrap();
        let child = t.add_child(x, b"child").unwrap();
        assert_eq!(t.find(b"x/child"), Some(child));
        let renewed = t.renew(x).unwrap();
        assert_ne!(renewed, x);
        assert_eq!(t.find(b"x"), Some(renewed));
        assert_eq!(t.find(b"x/child"), None);
        assert_eq!(t.path(renewed), b"x");
        for i in 0..1000 {
            t.add_child(renewed, format!("f{i}").as_bytes()).unwrap(); // grows the table
        }
        assert_eq!((t.find(b"x"), t.find(b"x/child")), (Some(renewed), None));
        assert_eq!(t.find(b"x/f999").map(|id| t.path(id)), Some(b"x/f999".to_vec()));
    }
}

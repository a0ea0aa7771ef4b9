//! The directories of a layer stack and their metadata, as applying the layers in order gives.
//!
//! Layer tars may omit a parent directory they did not change. Such a parent must carry the
//! metadata it has below, or overlayfs would show the upper copy's default mode. A
//! [`DirIndex`] is computed per chain ID (the merged view of layers `0..=n`) and stored beside
//! the layer's blob, so the next layer up can look its implicit parents up without reading
//! any lower layer again.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead, Write};

use super::path::ancestors;

/// Metadata of one directory: the same fields as any entry's.
pub type DirMeta = super::meta::EntryMeta;

impl DirMeta {
    /// A directory that no layer below describes (what `mkdir -p` would give, at the epoch).
    pub fn fallback() -> Self {
        DirMeta { mode: 0o755, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0, xattrs: Vec::new() }
    }
}

/// What a path is in one layer's own entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Missing,
    Dir,
    /// Anything else, whiteouts included: it hides the lower directory.
    NonDir,
}

/// Directory path (layer path bytes, root = `b""`) → metadata, in path order: the paths back
/// to back in one buffer, the metadata interned (most directories share theirs), ~20 bytes a
/// directory besides its path. Looked up by binary search; built whole, in path order.
#[derive(Debug, Clone, Default)]
pub struct DirIndex {
    /// The paths back to back, in path order.
    names: Vec<u8>,
    /// Per directory: where its path ends in `names`, and its metadata's index in `metas`.
    dirs: Vec<(usize, u32)>,
    /// The distinct metadata.
    metas: Vec<DirMeta>,
}

/// Equal when they list the same directories with the same metadata.
impl PartialEq for DirIndex {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for DirIndex {}

/// From directories in path order (in any other order they are sorted; of two with the same
/// path the later counts).
impl FromIterator<(Vec<u8>, DirMeta)> for DirIndex {
    fn from_iter<I: IntoIterator<Item = (Vec<u8>, DirMeta)>>(dirs: I) -> Self {
        let dirs = dirs.into_iter();
        let mut build = Build::default();
        build.index.dirs.reserve_exact(dirs.size_hint().0);
        let mut sorted = true;
        for (path, meta) in dirs {
            sorted &= build.index.dirs.is_empty() || build.index.last_path() < &path[..];
            build.push(&path, meta);
        }
        if sorted {
            return build.index;
        }
        let mut all: Vec<(Vec<u8>, DirMeta)> = build.index.into_entries().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0)); // stable: of equal paths the later stays later
        let mut build = Build::default();
        let mut all = all.into_iter().peekable();
        while let Some((path, meta)) = all.next() {
            if all.peek().is_none_or(|(next, _)| *next != path) {
                build.push(&path, meta);
            }
        }
        build.index
    }
}

/// A [`DirIndex`] being built in path order, with its metadata interned.
#[derive(Default)]
struct Build {
    index: DirIndex,
    ids: HashMap<DirMeta, u32>,
}

impl Build {
    fn push(&mut self, path: &[u8], meta: DirMeta) {
        let metas = &mut self.index.metas;
        let id = *self.ids.entry(meta).or_insert_with_key(|meta| {
            metas.push(meta.clone());
            (metas.len() - 1) as u32
        });
        self.index.names.extend_from_slice(path);
        self.index.dirs.push((self.index.names.len(), id));
    }
}

impl DirIndex {
    /// From directories in path order, each path once, whose paths take `path_bytes` bytes in
    /// all: what `collect` gives, without the spare room a growing buffer leaves.
    pub fn from_sorted<'a>(path_bytes: usize, dirs: impl IntoIterator<Item = (&'a [u8], DirMeta)>) -> Self {
        let dirs = dirs.into_iter();
        let mut build = Build::default();
        build.index.names.reserve_exact(path_bytes);
        build.index.dirs.reserve_exact(dirs.size_hint().0);
        for (path, meta) in dirs {
            debug_assert!(build.index.dirs.is_empty() || build.index.last_path() < path);
            build.push(path, meta);
        }
        build.index
    }

    /// How many directories.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// No directories.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    fn path_at(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.dirs[i - 1].0 };
        &self.names[start..self.dirs[i].0]
    }

    fn last_path(&self) -> &[u8] {
        self.path_at(self.dirs.len() - 1)
    }

    /// The directory at `path`, if there is one.
    pub fn get(&self, path: &[u8]) -> Option<&DirMeta> {
        let (mut lo, mut hi) = (0, self.dirs.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.path_at(mid).cmp(path) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(&self.metas[self.dirs[mid].1 as usize]),
            }
        }
        None
    }

    /// The directories in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &DirMeta)> {
        (0..self.dirs.len()).map(|i| (self.path_at(i), &self.metas[self.dirs[i].1 as usize]))
    }

    /// The directories in path order, owned.
    pub fn into_entries(self) -> impl Iterator<Item = (Vec<u8>, DirMeta)> {
        let entries: Vec<_> = self.iter().map(|(p, m)| (p.to_vec(), m.clone())).collect();
        entries.into_iter()
    }

    /// Adds or replaces one directory (rebuilds the index: for the unit tests' small ones).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, path: Vec<u8>, meta: DirMeta) {
        let all = std::mem::take(self).into_entries().chain(std::iter::once((path, meta)));
        *self = all.collect();
    }

    /// The merged view after one more layer: `self` is the view below; `layer_dirs` are the
    /// layer's own directories (explicit and implicit, with final metadata); `opaque` its
    /// opaque directories; `kind_in_layer` tells what a path is in the layer's own tree.
    pub fn apply_layer(
        &self,
        layer_dirs: DirIndex,
        opaque: &BTreeSet<Vec<u8>>,
        mut kind_in_layer: impl FnMut(&[u8]) -> NodeKind,
    ) -> DirIndex {
        let mut memo: HashMap<Vec<u8>, NodeKind> = HashMap::new();
        let mut kind = |p: &[u8]| {
            if let Some(k) = memo.get(p) {
                return *k;
            }
            let k = kind_in_layer(p);
            memo.insert(p.to_vec(), k);
            k
        };
        if self.dirs.is_empty() {
            return layer_dirs;
        }
        let mut merged = Build::default();
        let mut upper = layer_dirs.iter().peekable();
        'lower: for (path, meta) in self.iter() {
            for anc in ancestors(path).chain(std::iter::once(path)) {
                let is_self = anc.len() == path.len();
                if !is_self && opaque.contains(anc) {
                    continue 'lower;
                }
                if anc.is_empty() {
                    continue;
                }
                match kind(anc) {
                    NodeKind::NonDir => continue 'lower,
                    NodeKind::Missing => break,
                    NodeKind::Dir => {}
                }
            }
            // The layer's own directories before it, and in its place (theirs is final).
            while let Some((p, m)) = upper.next_if(|(p, _)| *p <= path) {
                merged.push(p, m.clone());
            }
            if merged.index.dirs.is_empty() || merged.index.last_path() != path {
                merged.push(path, meta.clone());
            }
        }
        for (p, m) in upper {
            merged.push(p, m.clone());
        }
        merged.index
    }

    /// Writes the index as text, one directory a line:
    /// `hex(path) mode uid gid mtime_sec mtime_nsec [hex(name)=hex(value) …]`.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        for (path, m) in self.iter() {
            write!(
                out,
                "{} {:o} {} {} {} {}",
                hex::encode(path),
                m.mode,
                m.uid,
                m.gid,
                m.mtime_sec,
                m.mtime_nsec
            )?;
            for (k, v) in &m.xattrs {
                write!(out, " {}={}", hex::encode(k), hex::encode(v))?;
            }
            writeln!(out)?;
        }
        out.flush()
    }

    /// Reads what [`DirIndex::write_to`] wrote.
    pub fn read_from(input: impl BufRead) -> io::Result<DirIndex> {
        let bad = |line: usize| io::Error::new(io::ErrorKind::InvalidData, format!("line {line}"));
        let mut dirs = Vec::new();
        for (n, line) in input.lines().enumerate() {
            let line = line?;
            let mut f = line.split(' ');
            let mut next = || f.next().ok_or_else(|| bad(n + 1));
            let path = hex::decode(next()?).map_err(|_| bad(n + 1))?;
            let mode = u32::from_str_radix(next()?, 8).map_err(|_| bad(n + 1))?;
            let uid = next()?.parse().map_err(|_| bad(n + 1))?;
            let gid = next()?.parse().map_err(|_| bad(n + 1))?;
            let mtime_sec = next()?.parse().map_err(|_| bad(n + 1))?;
            let mtime_nsec = next()?.parse().map_err(|_| bad(n + 1))?;
            let mut xattrs = Vec::new();
            for kv in f {
                let (k, v) = kv.split_once('=').ok_or_else(|| bad(n + 1))?;
                xattrs
                    .push((hex::decode(k).map_err(|_| bad(n + 1))?, hex::decode(v).map_err(|_| bad(n + 1))?));
            }
            dirs.push((path, DirMeta { mode, uid, gid, mtime_sec, mtime_nsec, xattrs }));
        }
        Ok(dirs.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> DirMeta {
        DirMeta { mode, ..DirMeta::fallback() }
    }

    fn index(entries: &[(&str, u32)]) -> DirIndex {
        let mut i = DirIndex::default();
        for (p, m) in entries {
            i.insert(p.as_bytes().to_vec(), meta(*m));
        }
        i
    }

    fn paths(i: &DirIndex) -> Vec<String> {
        i.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect()
    }

    #[test]
    fn apply_layer_table() {
        let lower = index(&[
            ("", 0o755),
            ("usr", 0o755),
            ("usr/share", 0o755),
            ("tmp", 0o1777),
            ("opt", 0o700),
            ("opt/a", 0o700),
        ]);
        struct Case {
            name: &'static str,
            layer: Vec<(&'static str, u32)>,
            opaque: Vec<&'static str>,
            tree: Vec<(&'static str, NodeKind)>,
            expect: Vec<&'static str>,
            expect_mode: Vec<(&'static str, u32)>,
        }
        let cases = vec![
            Case {
                name: "untouched lower dirs stay",
                layer: vec![],
                opaque: vec![],
                tree: vec![],
                expect: vec!["", "opt", "opt/a", "tmp", "usr", "usr/share"],
                expect_mode: vec![("tmp", 0o1777)],
            },
            Case {
                name: "layer dir overrides metadata",
                layer: vec![("tmp", 0o755)],
                opaque: vec![],
                tree: vec![("tmp", NodeKind::Dir)],
                expect: vec!["", "opt", "opt/a", "tmp", "usr", "usr/share"],
                expect_mode: vec![("tmp", 0o755)],
            },
            Case {
                name: "whiteout removes dir and descendants",
                layer: vec![],
                opaque: vec![],
                tree: vec![("opt", NodeKind::NonDir)],
                expect: vec!["", "tmp", "usr", "usr/share"],
                expect_mode: vec![],
            },
            Case {
                name: "file replacing a nested dir",
                layer: vec![],
                opaque: vec![],
                tree: vec![("usr", NodeKind::Dir), ("usr/share", NodeKind::NonDir)],
                expect: vec!["", "opt", "opt/a", "tmp", "usr"],
                expect_mode: vec![],
            },
            Case {
                name: "opaque dir hides lower children, keeps its own",
                layer: vec![("opt", 0o711), ("opt/b", 0o755)],
                opaque: vec!["opt"],
                tree: vec![("opt", NodeKind::Dir)],
                expect: vec!["", "opt", "opt/b", "tmp", "usr", "usr/share"],
                expect_mode: vec![("opt", 0o711)],
            },
            Case {
                name: "opaque root hides everything below",
                layer: vec![("", 0o755)],
                opaque: vec![""],
                tree: vec![],
                expect: vec![""],
                expect_mode: vec![],
            },
        ];
        for c in cases {
            let layer = index(&c.layer);
            let opaque: BTreeSet<Vec<u8>> = c.opaque.iter().map(|p| p.as_bytes().to_vec()).collect();
            let tree: HashMap<&[u8], NodeKind> = c.tree.iter().map(|(p, k)| (p.as_bytes(), *k)).collect();
            let merged = lower.apply_layer(layer, &opaque, |p| *tree.get(p).unwrap_or(&NodeKind::Missing));
            assert_eq!(paths(&merged), c.expect, "{}", c.name);
            for (p, mode) in c.expect_mode {
                assert_eq!(merged.get(p.as_bytes()).unwrap().mode, mode, "{}: {p}", c.name);
            }
        }
    }

    #[test]
    fn text_form_round_trips() {
        let mut i = DirIndex::default();
        i.insert(b"".to_vec(), meta(0o755));
        i.insert(
            b"a \xff/b".to_vec(),
            DirMeta {
                mode: 0o4711,
                uid: 200000,
                gid: 7,
                mtime_sec: -5,
                mtime_nsec: 123456789,
                xattrs: vec![(b"user.x".to_vec(), b"\x00\x01 =".to_vec())],
            },
        );
        let mut buf = Vec::new();
        i.write_to(&mut buf).unwrap();
        assert_eq!(DirIndex::read_from(&buf[..]).unwrap(), i);
        assert!(DirIndex::read_from(&b"zz 1"[..]).is_err());
    }
}

//! The directories of a layer stack and their metadata, as applying the layers in order gives.
//!
//! Layer tars may omit a parent directory they did not change. Such a parent must carry the
//! metadata it has below, or overlayfs would show the upper copy's default mode. A
//! [`DirIndex`] is computed per chain ID (the merged view of layers `0..=n`) and stored beside
//! the layer's blob, so the next layer up can look its implicit parents up without reading
//! any lower layer again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// Directory path (layer path bytes, root = `b""`) → metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirIndex {
    dirs: BTreeMap<Vec<u8>, DirMeta>,
}

/// From directories in path order (fastest, and most compact, when sorted).
impl FromIterator<(Vec<u8>, DirMeta)> for DirIndex {
    fn from_iter<I: IntoIterator<Item = (Vec<u8>, DirMeta)>>(dirs: I) -> Self {
        DirIndex { dirs: dirs.into_iter().collect() }
    }
}

impl DirIndex {
    pub fn get(&self, path: &[u8]) -> Option<&DirMeta> {
        self.dirs.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &DirMeta)> {
        self.dirs.iter()
    }

    pub fn into_entries(self) -> impl Iterator<Item = (Vec<u8>, DirMeta)> {
        self.dirs.into_iter()
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Vec<u8>) -> bool) {
        self.dirs.retain(|k, _| keep(k));
    }

    pub fn insert(&mut self, path: Vec<u8>, meta: DirMeta) {
        self.dirs.insert(path, meta);
    }

    /// The merged view after one more layer: `self` is the view below; `layer_dirs` are the
    /// layer's own directories (explicit and implicit, with final metadata); `opaque` its
    /// opaque directories; `kind_in_layer` tells what a path is in the layer's own tree.
    pub fn apply_layer(
        &self,
        mut layer_dirs: DirIndex,
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
        let mut kept = Vec::new();
        'lower: for (path, meta) in &self.dirs {
            for anc in ancestors(path).chain(std::iter::once(&path[..])) {
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
            kept.push((path.clone(), meta.clone()));
        }
        // Built from sorted runs, the map's nodes are full (inserted one by one, half full).
        let mut merged: DirIndex = kept.into_iter().collect();
        merged.dirs.append(&mut layer_dirs.dirs);
        merged
    }

    /// Writes the index as text, one directory a line:
    /// `hex(path) mode uid gid mtime_sec mtime_nsec [hex(name)=hex(value) …]`.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        for (path, m) in &self.dirs {
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
        let mut index = DirIndex::default();
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
            index.dirs.insert(path, DirMeta { mode, uid, gid, mtime_sec, mtime_nsec, xattrs });
        }
        Ok(index)
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
        i.dirs.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
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

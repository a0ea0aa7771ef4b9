//! The directories of one layer's own tree (explicit and implicit, the root included) and
//! which of them are opaque: what `build --merge` needs to know which directories the
//! overlay stack would not merge with the layers below (see [`crate::merge`]). Stored beside
//! each EROFS layer blob as the `.own` sidecar.

use std::io::{self, BufRead, Write};

use super::dirindex::DirIndex;

/// Directory path (layer path bytes, root = `b""`) → opaque?, in path order: the paths back
/// to back in one buffer, looked up by binary search; built whole, in path order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnDirs {
    /// The paths back to back, in path order.
    names: Vec<u8>,
    /// Per directory: where its path ends in `names`.
    ends: Vec<usize>,
    /// Per directory: whether it is opaque.
    opaque: Vec<bool>,
}

/// From directories and whether each is opaque, best in path order (in any other order they
/// are sorted; of two with the same path the later counts).
impl<P: AsRef<[u8]>> FromIterator<(P, bool)> for OwnDirs {
    fn from_iter<I: IntoIterator<Item = (P, bool)>>(dirs: I) -> Self {
        let mut own = OwnDirs::default();
        let mut sorted = true;
        for (path, opaque) in dirs {
            let path = path.as_ref();
            sorted &= own.ends.is_empty() || own.path_at(own.ends.len() - 1) < path;
            own.push(path, opaque);
        }
        if sorted {
            return own;
        }
        let mut all: Vec<(Vec<u8>, bool)> = own.iter().map(|(p, o)| (p.to_vec(), o)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0)); // stable: of equal paths the later stays later
        let mut own = OwnDirs::default();
        let mut all = all.into_iter().peekable();
        while let Some((path, opaque)) = all.next() {
            if all.peek().is_none_or(|(next, _)| *next != path) {
                own.push(&path, opaque);
            }
        }
        own
    }
}

impl OwnDirs {
    /// The directories of `dirs` (a layer's own), each opaque when `opaque` says so; as
    /// compact as the index (no spare room).
    pub fn of_index(dirs: &DirIndex, mut opaque: impl FnMut(&[u8]) -> bool) -> Self {
        let mut own = OwnDirs {
            names: Vec::with_capacity(dirs.path_bytes()),
            ends: Vec::with_capacity(dirs.len()),
            opaque: Vec::with_capacity(dirs.len()),
        };
        for (path, _) in dirs.iter() {
            own.push(path, opaque(path));
        }
        own
    }

    fn push(&mut self, path: &[u8], opaque: bool) {
        self.names.extend_from_slice(path);
        self.ends.push(self.names.len());
        self.opaque.push(opaque);
    }

    fn path_at(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.names[start..self.ends[i]]
    }

    /// Adds or replaces one directory (rebuilds the list: for the unit tests' small ones).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, path: Vec<u8>, opaque: bool) {
        let own = std::mem::take(self);
        *self = own.iter().map(|(p, o)| (p.to_vec(), o)).chain(std::iter::once((path, opaque))).collect();
    }

    /// `Some(opaque)` when the layer's own tree has `path` as a directory.
    pub fn get(&self, path: &[u8]) -> Option<bool> {
        let (mut lo, mut hi) = (0, self.ends.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.path_at(mid).cmp(path) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.opaque[mid]),
            }
        }
        None
    }

    /// The directories in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], bool)> {
        (0..self.ends.len()).map(|i| (self.path_at(i), self.opaque[i]))
    }

    /// One line per directory: `<0|1> <hex path>`.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        for (path, opaque) in self.iter() {
            writeln!(out, "{} {}", u8::from(opaque), hex::encode(path))?;
        }
        out.flush()
    }

    /// Reads what [`OwnDirs::write_to`] wrote.
    pub fn read_from(input: impl BufRead) -> io::Result<OwnDirs> {
        let mut dirs = Vec::new();
        for (n, line) in input.lines().enumerate() {
            let line = line?;
            let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("line {}", n + 1));
            let (flag, hex) = line.split_once(' ').ok_or_else(bad)?;
            let opaque = match flag {
                "0" => false,
                "1" => true,
                _ => return Err(bad()),
            };
            dirs.push((hex::decode(hex).map_err(|_| bad())?, opaque));
        }
        Ok(dirs.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let mut own = OwnDirs::default();
        own.insert(Vec::new(), false);
        own.insert(b"etc/default".to_vec(), true);
        own.insert(b"caf\xe9".to_vec(), false);
        let mut text = Vec::new();
        own.write_to(&mut text).unwrap();
        assert_eq!(OwnDirs::read_from(&text[..]).unwrap(), own);
        assert!(OwnDirs::read_from(&b"2 00\n"[..]).is_err());
        assert!(OwnDirs::read_from(&b"1 zz\n"[..]).is_err());
        assert!(OwnDirs::read_from(&b"1\n"[..]).is_err());
    }
}

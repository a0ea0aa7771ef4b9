//! The directories of one layer's own tree (explicit and implicit, the root included) and
//! which of them are opaque: what `build --merge` needs to know which directories the
//! overlay stack would not merge with the layers below (see [`crate::merge`]). Stored beside
//! each EROFS layer blob as the `.own` sidecar.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};

/// Directory path (layer path bytes, root = `b""`) → opaque?
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnDirs {
    dirs: BTreeMap<Vec<u8>, bool>,
}

/// From directories and whether each is opaque.
impl FromIterator<(Vec<u8>, bool)> for OwnDirs {
    fn from_iter<I: IntoIterator<Item = (Vec<u8>, bool)>>(dirs: I) -> Self {
        OwnDirs { dirs: dirs.into_iter().collect() }
    }
}

impl OwnDirs {
    pub fn insert(&mut self, path: Vec<u8>, opaque: bool) {
        self.dirs.insert(path, opaque);
    }

    /// `Some(opaque)` when the layer's own tree has `path` as a directory.
    pub fn get(&self, path: &[u8]) -> Option<bool> {
        self.dirs.get(path).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, bool)> {
        self.dirs.iter().map(|(p, o)| (p, *o))
    }

    /// One line per directory: `<0|1> <hex path>`.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        for (path, opaque) in &self.dirs {
            writeln!(out, "{} {}", u8::from(*opaque), hex::encode(path))?;
        }
        out.flush()
    }

    /// Reads what [`OwnDirs::write_to`] wrote.
    pub fn read_from(input: impl BufRead) -> io::Result<OwnDirs> {
        let mut own = OwnDirs::default();
        for (n, line) in input.lines().enumerate() {
            let line = line?;
            let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("line {}", n + 1));
            let (flag, hex) = line.split_once(' ').ok_or_else(bad)?;
            let opaque = match flag {
                "0" => false,
                "1" => true,
                _ => return Err(bad()),
            };
            own.dirs.insert(hex::decode(hex).map_err(|_| bad())?, opaque);
        }
        Ok(own)
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

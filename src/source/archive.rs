//! Random access to the members of an uncompressed tar file, without extracting it: the
//! headers are scanned once (seeking over data) and members are read in place.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{SourceError, io_at};
use crate::layer::entry::{entry_link, entry_path};
use crate::layer::path::normalize;

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

/// An indexed tar archive.
#[derive(Debug)]
pub struct TarArchive {
    path: PathBuf,
    members: HashMap<String, Member>,
}

fn clean(name: &[u8]) -> Option<String> {
    normalize(name).ok().and_then(|p| String::from_utf8(p).ok())
}

impl TarArchive {
    pub fn open(path: &Path) -> Result<TarArchive, SourceError> {
        let mut file = fs_err::File::open(path).map_err(io_at(path))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io_at(path))?;
        if magic[..n].starts_with(&[0x1f, 0x8b]) || magic[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(SourceError::CompressedArchive { path: path.to_owned() });
        }
        file.seek(SeekFrom::Start(0)).map_err(io_at(path))?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(io_at(path))? {
            let entry = entry.map_err(io_at(path))?;
            let Some(name) = clean(&entry_path(&entry)) else {
                continue;
            };
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    Member::File { offset: entry.raw_file_position(), size: entry.size() }
                }
                tar::EntryType::Symlink => {
                    let target = entry_link(&entry);
                    let parent = name.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                    let joined = if target.starts_with(b"/") {
                        target.to_vec()
                    } else {
                        [parent.as_bytes(), b"/", &target].concat()
                    };
                    let Some(t) = clean(&joined) else { continue };
                    Member::Link(t)
                }
                tar::EntryType::Link => {
                    let Some(t) = clean(&entry_link(&entry)) else {
                        continue;
                    };
                    Member::Link(t)
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(TarArchive { path: path.to_owned(), members })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn resolve(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = clean(name.as_bytes())?;
        for _ in 0..8 {
            match self.members.get(&name)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(t) => name = t.clone(),
            }
        }
        None
    }

    /// Opens member `name` (symlinks and hardlinks inside the archive are followed).
    pub fn member(&self, name: &str) -> Result<impl Read + Send + use<>, SourceError> {
        let (offset, size) = self.resolve(name).ok_or_else(|| SourceError::Io {
            path: self.path.join(name),
            source: io::Error::new(io::ErrorKind::NotFound, "no such member in the archive"),
        })?;
        let mut file = fs_err::File::open(&self.path).map_err(io_at(&self.path))?;
        file.seek(SeekFrom::Start(offset)).map_err(io_at(&self.path))?;
        Ok(io::BufReader::with_capacity(256 * 1024, file).take(size))
    }
}

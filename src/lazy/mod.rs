//! Lazy start (issue 19): a layer blob served to a guest before it has all arrived.
//!
//! A [`BlockSource`] is a read-only byte range of fixed length whose reads return only
//! verified bytes: a lazily fetched registry blob, or (in tests, and for blobs already in the
//! store) a plain file. The guest-facing servers — an NBD server for QEMU, a FUSE filesystem
//! for runtimes that take only paths — read through this trait alone, so they neither know
//! nor care where the bytes come from.

use std::io;

/// A read-only, fixed-length source of verified bytes, shared between server threads.
pub trait BlockSource: Send + Sync {
    /// Length in bytes (fixed for the source's lifetime).
    fn len(&self) -> u64;
    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`, which must lie within
    /// [`BlockSource::len`]; blocks until they are present and verified. Bytes that fail
    /// verification are never returned: the read fails (`io::ErrorKind::InvalidData`), and the
    /// server answers the guest with EIO.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A plain file as a [`BlockSource`] (a blob already in the store, and tests).
pub struct FileSource {
    file: std::fs::File,
    len: u64,
}

impl FileSource {
    /// The file at `path`, its length taken now.
    pub fn open(path: &std::path::Path) -> io::Result<FileSource> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl BlockSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read beyond the end of the source"));
        }
        self.file.read_exact_at(buf, offset)
    }
}

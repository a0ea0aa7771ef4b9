//! What vmrootfs's own writers (ext4, EROFS) share: the [`EntryWriter`] interface the builder
//! feeds each normalized entry into, on the layer's own thread (see [`super::Making`]), and
//! the test of whether a block of file data is a hole ([`is_zero`]).

#[cfg(test)]
use std::path::Path;

use super::BackendError;
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;

/// An image writer fed entry by entry.
pub trait EntryWriter: Sized {
    /// Adds the entry at layer path `path` (`b""` is the root; a hardlink's target is a layer
    /// path too). A later entry for a path replaces the earlier.
    fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), BackendError>;
    /// Writes the metadata and finishes the image.
    fn finish(self) -> Result<(), BackendError>;
}

/// Whether a block is all zeros (a hole, for the writers that keep holes).
pub fn is_zero(block: &[u8]) -> bool {
    block.chunks_exact(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The peak heap bytes per entry of writing a layer of `FILES` small files (0–63 bytes each,
/// 1,000 per directory) with the writer `create` makes in `dir`, its finish included: the
/// memory test both writers are held to.
#[cfg(test)]
pub(crate) fn peak_heap_per_small_file<W: EntryWriter>(create: impl FnOnce(&Path) -> W) -> usize {
    use crate::layer::meta::EntryMeta;
    const FILES: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let meta = |mode| EntryMeta {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let data = [b'x'; 64];
    let ((), peak) = crate::heap_meter::peak_during(|| {
        let mut w = create(&dir.path().join("image"));
        w.add(b"data", EntryKind::Dir, &meta(0o755)).unwrap();
        for i in 0..FILES {
            if i % 1000 == 0 {
                w.add(format!("data/d{:03}", i / 1000).as_bytes(), EntryKind::Dir, &meta(0o755)).unwrap();
            }
            let size = i % 64;
            let name = format!("data/d{:03}/file-{i:06}", i / 1000);
            w.add(
                name.as_bytes(),
                EntryKind::File { size: size as u64, data: &mut &data[..size] },
                &meta(0o644),
            )
            .unwrap();
        }
        w.finish().unwrap();
    });
    peak / FILES
}

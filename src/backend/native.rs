//! The writers vmrootfs owns (ext4, EROFS) run on a thread that reads the layer's normalized
//! stream as the builder writes it and hands each entry to an [`EntryWriter`]: file data
//! straight to its place, the metadata once the stream ends. No external tool, no spool.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use super::BackendError;
use crate::layer::entry::{self, entry_meta};
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;

/// Chunks of stream in flight between the builder and the writing thread.
const IN_FLIGHT: usize = 8;
/// Bytes of stream gathered into one chunk before it is sent.
const CHUNK: usize = 1 << 20;

/// An image writer fed entry by entry.
pub trait EntryWriter: Sized {
    /// Adds the entry at layer path `path` (`b""` is the root; a hardlink's target is a layer
    /// path too). A later entry for a path replaces the earlier.
    fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), BackendError>;
    /// Writes the metadata and finishes the image.
    fn finish(self) -> Result<(), BackendError>;
    /// The error for an entry of the stream this writer cannot take as it is.
    fn refused(path: String, problem: String) -> BackendError;
}

/// Starts a thread named `name` that makes `out` with the writer `create` gives, from the
/// stream then written into the returned [`Streaming`].
pub fn start<W: EntryWriter>(
    name: &str,
    out: &Path,
    create: impl FnOnce(&Path) -> Result<W, BackendError> + Send + 'static,
) -> Streaming {
    let (tx, rx) = sync_channel::<Vec<u8>>(IN_FLIGHT);
    let (back, spare) = channel();
    let out: PathBuf = out.to_owned();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let reader = ChunkReader { rx, back, current: Vec::new(), at: 0 };
            write_image(reader, create(&out)?)
        })
        .expect("spawning a thread");
    Streaming { tx: Some(tx), spare, pending: Vec::new(), thread: Some(thread), stopped: None }
}

/// Reads the normalized stream into `image` and finishes it.
fn write_image<W: EntryWriter>(stream: impl Read, mut image: W) -> Result<(), BackendError> {
    let mut archive = tar::Archive::new(stream);
    let bad = |source| BackendError::Stream { source };
    for e in archive.entries().map_err(bad)? {
        let mut e = e.map_err(bad)?;
        let raw = entry::entry_path(&e);
        let path = stream_path(&raw);
        let refused = |problem: String| W::refused(String::from_utf8_lossy(&raw).into_owned(), problem);
        let meta = entry_meta(&mut e).map_err(|e| refused(e.to_string()))?;
        let link = stream_path(&entry::entry_link(&e));
        let kind = e.header().entry_type();
        let (major, minor) = if kind.is_character_special() || kind.is_block_special() {
            entry::device(e.header()).map_err(|e| refused(e.to_string()))?
        } else {
            (0, 0)
        };
        let size = e.size();
        let new = match kind {
            tar::EntryType::Regular => EntryKind::File { size, data: &mut e },
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink(&link),
            tar::EntryType::Link => EntryKind::Hardlink(&link),
            tar::EntryType::Char => EntryKind::Char { major, minor },
            tar::EntryType::Block => EntryKind::Block { major, minor },
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => {
                return Err(refused(format!("unexpected entry type {other:?} in the normalized stream")));
            }
        };
        image.add(&path, new, &meta)?;
    }
    image.finish()
}

/// A path as the normalized stream writes it (`./`, `dir/`, `file`) → layer path bytes.
fn stream_path(raw: &[u8]) -> Vec<u8> {
    let p = raw.strip_suffix(b"/").unwrap_or(raw);
    if p == b"." { Vec::new() } else { p.to_vec() }
}

/// The builder's end of the stream: writes gather into chunks of [`CHUNK`] bytes sent to the
/// writing thread (whose emptied chunks come back for reuse), so it needs no buffer in front
/// of it. Dropped without [`Streaming::finish`], the thread is stopped and joined.
pub struct Streaming {
    tx: Option<SyncSender<Vec<u8>>>,
    spare: Receiver<Vec<u8>>,
    /// The chunk being gathered.
    pending: Vec<u8>,
    thread: Option<JoinHandle<Result<(), BackendError>>>,
    /// The writer's error, once a write found it stopped (kept for [`Streaming::failure`]).
    stopped: Option<BackendError>,
}

impl Streaming {
    /// Ends the stream and waits for the image.
    pub fn finish(mut self) -> Result<(), BackendError> {
        // A failed send leaves the writer's error in `stopped`.
        let _ = self.send_pending();
        self.tx = None;
        if let Some(e) = self.stopped.take() {
            return Err(e);
        }
        self.join().unwrap_or(Ok(()))
    }

    /// After a failed write: the writer's own error, when it stopped with one.
    pub fn failure(mut self) -> Option<BackendError> {
        self.tx = None;
        self.stopped.take().or_else(|| self.join().and_then(Result::err))
    }

    fn join(&mut self) -> Option<Result<(), BackendError>> {
        let thread = self.thread.take()?;
        Some(thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    }

    /// Sends the chunk gathered so far, if any.
    fn send_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let mut next = self.spare.try_recv().unwrap_or_default();
        next.clear();
        if tx.send(std::mem::replace(&mut self.pending, next)).is_err() {
            // The writer stopped: its error is the cause, given by `failure` (as a tool's is).
            self.tx = None;
            self.stopped = self.join().and_then(Result::err);
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        Ok(())
    }
}

impl Write for Streaming {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tx.is_none() {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        if self.pending.capacity() == 0 {
            self.pending.reserve(CHUNK);
        }
        let n = buf.len().min(CHUNK - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() == CHUNK {
            self.send_pending()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.tx = None;
        let _ = self.join();
    }
}

/// The writing thread's end: the chunks as one byte stream (ends when the sender is gone).
struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    back: Sender<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            let Ok(next) = self.rx.recv() else { return Ok(0) };
            let done = std::mem::replace(&mut self.current, next);
            let _ = self.back.send(done);
            self.at = 0;
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Reads the next piece of an entry's data, of which `left` bytes remain, into `buf` (as much
/// as it holds), and zeroes it up to a whole number of `block`-byte blocks. Returns the bytes
/// read and that padded length; data that ends early is an `UnexpectedEof` naming how early.
pub fn read_piece(
    data: &mut dyn Read,
    buf: &mut [u8],
    left: u64,
    block: usize,
) -> io::Result<(usize, usize)> {
    let want = left.min(buf.len() as u64) as usize;
    let n = crate::digest::read_full(data, &mut buf[..want])?;
    if n < want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("entry data ends {} bytes early", left - n as u64),
        ));
    }
    let padded = n.next_multiple_of(block);
    buf[n..padded].fill(0);
    Ok((n, padded))
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

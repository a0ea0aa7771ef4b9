//! One layer: its compressed byte stream → verified tar entries → the normalized entries, into
//! an image writer (or as the pax tar mkfs reads).
//!
//! ```text
//! blob ─sha256 = digest?─▶ gzip | zstd | none (by magic) ─sha256 = diff_id?─▶ tar entries
//!      ─normalize (whiteouts, parents, path safety)─▶ entries ─▶ writer (or pax tar ─▶ mkfs)
//! ```

pub mod acl;
pub mod ahead;
pub mod dirindex;
pub mod entry;
pub mod gunzip;
pub mod meta;
pub mod normalize;
pub mod path;
pub mod pathtree;
pub mod pax;
pub mod sparse;

use std::io::{self, BufRead, Read};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::image::Digest;

use crate::digest::{self, DigestMismatch};
use normalize::{EntryKind, NormalizeError, Normalizer, Output};

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("corrupt or truncated layer stream")]
    Stream(#[source] io::Error),
    /// The bytes stopped coming (the registry, the network), rather than being wrong.
    #[error("downloading the layer")]
    Download(#[source] io::Error),
    #[error(transparent)]
    Digest(#[from] DigestMismatch),
    #[error("entry {path:?}")]
    Entry {
        path: String,
        #[source]
        source: EntryError,
    },
    #[error("writing the normalized layer into its image")]
    Output(#[source] io::Error),
    #[error("cancelled because another layer failed")]
    Cancelled,
    #[error(
        "layer unpacks to more than {limit} bytes (a decompression bomb?); raise the limit with --max-layer-size"
    )]
    TooLarge { limit: u64 },
    #[error("layer blob is longer than the {expected} bytes its descriptor says (reading stopped there)")]
    BlobTooLong { expected: u64 },
    #[error("layer blob is {found} bytes, not the {expected} bytes its descriptor says")]
    BlobTooShort { expected: u64, found: u64 },
}

impl LayerError {
    /// A failure reading the layer's bytes: a download that failed, or bytes that are wrong.
    fn from_stream(e: io::Error) -> LayerError {
        if crate::source::registry::is_download_error(&e) {
            LayerError::Download(e)
        } else {
            LayerError::Stream(e)
        }
    }
}

/// Why one tar entry was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error(transparent)]
    Normalize(#[from] NormalizeError),
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    #[error("bad PAX sparse map: {0}")]
    BadSparseMap(String),
    #[error("bad PAX record {0:?}")]
    BadPax(String),
    #[error("bad header")]
    Header(#[source] io::Error),
    #[error("header field {field} is not an octal number: {text:?}")]
    BadNumber { field: &'static str, text: String },
    #[error("a {kind} entry claiming {size} bytes of data: tar readers disagree on whether they are there")]
    DataOnDataless { kind: &'static str, size: u64 },
    #[error("{field} 4294967295 is (uid_t)-1, which chown takes as \"leave unchanged\"")]
    NoChangeId { field: &'static str },
    #[error("{field} {value} does not fit in {bits} bits")]
    OutOfRange { field: &'static str, value: i128, bits: u32 },
}

/// Layer media types vmrootfs converts (compression is then told from the bytes).
pub const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

pub fn check_media_type(media_type: &str) -> Result<(), LayerError> {
    if LAYER_MEDIA_TYPES.contains(&media_type) {
        Ok(())
    } else {
        Err(LayerError::UnsupportedMediaType(media_type.to_string()))
    }
}

/// A decompressor chosen from the stream's first bytes.
enum Decoder<R: BufRead> {
    Gzip(Box<gunzip::Gunzip<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Plain(R),
}

impl<R: BufRead> Decoder<R> {
    fn sniff(mut r: R) -> io::Result<Self> {
        let head = r.fill_buf()?;
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Decoder::Gzip(Box::new(gunzip::Gunzip::new(r)))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(r)?)
        } else {
            Decoder::Plain(r)
        })
    }

    fn into_inner(self) -> R {
        match self {
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
            Decoder::Plain(r) => r,
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Plain(r) => r.read(buf),
        }
    }
}

/// Calls `on_read` with the size of every chunk read (for progress bars).
struct Progress<'a, R> {
    inner: R,
    on_read: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// Fails reads once more than `limit` bytes came through, and remembers that it did.
struct Limit<'a, R> {
    inner: R,
    left: u64,
    hit: &'a AtomicBool,
}

impl<R: Read> Read for Limit<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(left) => self.left = left,
            None => {
                self.hit.store(true, Ordering::Relaxed);
                return Err(io::Error::other("layer size limit exceeded"));
            }
        }
        Ok(n)
    }
}

/// How a blob's length differed from its descriptor's size.
#[derive(Debug, Clone, Copy)]
enum WrongSize {
    Longer,
    Shorter(u64),
}

/// Passes at most `expected + 1` bytes of a blob, and fails once its length is known to differ
/// from `expected`: at byte `expected + 1`, or at an end before `expected`. A source can then
/// not stream more than the descriptor says, however the bytes decompress.
struct SizeCheck<'a, R> {
    inner: R,
    expected: u64,
    seen: u64,
    wrong: &'a OnceLock<WrongSize>,
}

impl<R: Read> Read for SizeCheck<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = (self.expected.saturating_add(1) - self.seen).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.seen += n as u64;
        let wrong = match n {
            _ if self.seen > self.expected => WrongSize::Longer,
            0 if self.seen < self.expected => WrongSize::Shorter(self.seen),
            _ => return Ok(n),
        };
        // Set once: the first wrong read decides; later reads only repeat it.
        let _ = self.wrong.set(wrong);
        Err(io::Error::other(match wrong {
            WrongSize::Longer => "layer blob longer than its descriptor says",
            WrongSize::Shorter(_) => "layer blob shorter than its descriptor says",
        }))
    }
}

/// Streams one layer blob through the normalizer, checking the blob digest (when known) and
/// the diff_id as the bytes go by, and reading no more than `expected_size` (when known) plus
/// one byte. Nothing is held in memory beyond one buffer.
#[allow(clippy::too_many_arguments)]
pub fn stream<O: Output>(
    blob: impl Read + Send,
    expected_digest: Option<&Digest>,
    expected_size: Option<u64>,
    diff_id: &Digest,
    max_bytes: u64,
    cancel: &AtomicBool,
    on_read: &(dyn Fn(u64) + Sync),
    normalizer: &mut Normalizer<O>,
) -> Result<(), LayerError> {
    let wrong_size = OnceLock::new();
    let sized: Box<dyn Read + Send + '_> = match expected_size {
        Some(expected) => Box::new(SizeCheck { inner: blob, expected, seen: 0, wrong: &wrong_size }),
        None => Box::new(blob),
    };
    let raw = Progress { inner: sized, on_read };
    let hit = AtomicBool::new(false);
    // A wrong blob size, then the size limit, explain any stream error that follows them.
    let fault = || match (wrong_size.get(), expected_size) {
        (Some(WrongSize::Longer), Some(expected)) => Some(LayerError::BlobTooLong { expected }),
        (Some(WrongSize::Shorter(found)), Some(expected)) => {
            Some(LayerError::BlobTooShort { expected, found: *found })
        }
        _ if hit.load(Ordering::Relaxed) => Some(LayerError::TooLarge { limit: max_bytes }),
        _ => None,
    };
    let failed = |e: LayerError| fault().unwrap_or(e);
    let stream_error = |e: io::Error| failed(LayerError::from_stream(e));
    // The blob is read (and hashed) on a thread of its own, and decompressed on another,
    // ahead of the tar reader (see `ahead`).
    let (found_digest, found_diff_id) = std::thread::scope(|s| {
        let blob = ahead::ReadAhead::start(s, "read-blob", raw);
        let decoder = Decoder::sniff(blob).map_err(stream_error)?;
        let limited = Limit { inner: decoder, left: max_bytes, hit: &hit };
        let mut archive = tar::Archive::new(ahead::ReadAhead::start(s, "inflate", limited));
        stream_entries(&mut archive, normalizer, cancel).map_err(&failed)?;
        if let Some(e) = fault() {
            return Err(e);
        }
        let (found_diff_id, limited) = archive.into_inner().finish().map_err(stream_error)?;
        // The rest of the blob after the compressed stream (none in a well-formed layer)
        // counts too.
        let (found_digest, _) = limited.inner.into_inner().finish().map_err(stream_error)?;
        Ok((found_digest, found_diff_id))
    })?;
    if let Some(e) = fault() {
        return Err(e);
    }
    if let Some(expected) = expected_digest {
        digest::check("layer blob", expected, &found_digest)?;
    }
    digest::check("layer diff_id", diff_id, &found_diff_id)?;
    Ok(())
}

fn stream_entries<R: Read, O: Output>(
    archive: &mut tar::Archive<R>,
    normalizer: &mut Normalizer<O>,
    cancel: &AtomicBool,
) -> Result<(), LayerError> {
    for entry in archive.entries().map_err(LayerError::from_stream)? {
        if cancel.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled);
        }
        let mut entry = entry.map_err(LayerError::from_stream)?;
        let raw_path = entry::entry_path(&entry);
        apply_entry(normalizer, &mut entry).map_err(|source| match source {
            EntryError::Normalize(NormalizeError::Data(e)) => LayerError::from_stream(e),
            EntryError::Normalize(NormalizeError::Write(e)) => LayerError::Output(e),
            EntryError::Normalize(NormalizeError::TooLarge { limit }) => LayerError::TooLarge { limit },
            source => LayerError::Entry { path: path::display(&raw_path), source },
        })?;
    }
    Ok(())
}

fn apply_entry<R: Read, O: Output>(
    normalizer: &mut Normalizer<O>,
    entry: &mut tar::Entry<'_, R>,
) -> Result<(), EntryError> {
    use tar::EntryType as T;
    let meta = entry::entry_meta(entry)?;
    let raw_path = entry::entry_path(entry);
    let header = entry.header();
    let kind = header.entry_type();
    if let Some(dataless) = entry::dataless_kind(kind, &raw_path)
        && entry.size() > 0
    {
        return Err(EntryError::DataOnDataless { kind: dataless, size: entry.size() });
    }
    let device = entry::device;
    let link = || entry::entry_link(entry);
    let kind = match kind {
        // A regular file named `…/` is a directory (v7 archivers wrote them so), as GNU tar,
        // bsdtar and Go read it.
        T::Regular if raw_path.ends_with(b"/") => EntryKind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => {
            let stored = entry.size();
            if let Some(sparse) = entry::pax_sparse(entry)? {
                let path = sparse.name.clone().unwrap_or(raw_path);
                let size = sparse.real_size;
                let mut data = sparse.expand(entry, stored)?;
                return Ok(normalizer.entry(&path, EntryKind::File { size, data: &mut data }, &meta)?);
            }
            return Ok(normalizer.entry(&raw_path, EntryKind::File { size: stored, data: entry }, &meta)?);
        }
        T::Directory => EntryKind::Dir,
        T::Symlink => return Ok(normalizer.entry(&raw_path, EntryKind::Symlink(&link()), &meta)?),
        T::Link => return Ok(normalizer.entry(&raw_path, EntryKind::Hardlink(&link()), &meta)?),
        T::Char => {
            let (major, minor) = device(header)?;
            EntryKind::Char { major, minor }
        }
        T::Block => {
            let (major, minor) = device(header)?;
            EntryKind::Block { major, minor }
        }
        T::Fifo => EntryKind::Fifo,
        T::XGlobalHeader => return Ok(()),
        // A GNU volume label names the archive, not a file: GNU tar skips it too.
        other if other.as_byte() == b'V' => return Ok(()),
        other => return Err(EntryError::UnsupportedType(other.as_byte() as char)),
    };
    Ok(normalizer.entry(&raw_path, kind, &meta)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert!(check_media_type("application/vnd.oci.image.layer.v1.tar+zstd").is_ok());
        assert!(check_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip").is_ok());
        let err = check_media_type("application/vnd.example.unknown").unwrap_err();
        assert!(err.to_string().contains("application/vnd.example.unknown"));
    }
}

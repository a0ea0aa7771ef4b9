//! One layer: its compressed byte stream → verified tar entries → its own tree on disk.
//!
//! ```text
//! blob ─sha256 = digest?─▶ gzip | zstd | none (by magic) ─sha256 = diff_id?─▶ tar entries
//!      ─classify (whiteouts, path safety)─▶ LayerTree (staging dir)
//! ```

pub mod dirindex;
pub mod path;
pub mod tree;

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::image::Digest;

use crate::digest::{self, DigestMismatch, HashingReader};
use path::{EntryAction, PathError};
use tree::{EntryMeta, LayerTree, NodeType, TreeError};

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("corrupt or truncated layer stream")]
    Stream(#[source] io::Error),
    #[error(transparent)]
    Digest(#[from] DigestMismatch),
    #[error("entry {path:?}")]
    Entry {
        path: String,
        #[source]
        source: EntryError,
    },
    #[error("staging directory {path}")]
    Staging {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cancelled because another layer failed")]
    Cancelled,
    #[error(
        "layer unpacks to more than {limit} bytes (a decompression bomb?); raise the limit with --max-layer-size"
    )]
    TooLarge { limit: u64 },
}

/// Why one tar entry was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    #[error("PAX sparse files (GNU.sparse.*) are not supported")]
    PaxSparse,
    #[error("bad PAX record {0:?}")]
    BadPax(String),
    #[error("bad header")]
    Header(#[source] io::Error),
    #[error("hardlink target {0:?} escapes the layer root")]
    LinkEscapes(String),
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
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Plain(R),
}

impl<R: BufRead> Decoder<R> {
    fn sniff(mut r: R) -> io::Result<Self> {
        let head = r.fill_buf()?;
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
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

/// Streams one layer blob into the empty directory `staging`, checking the blob digest (when
/// known) and the diff_id as the bytes go by. Nothing is held in memory beyond one buffer.
#[allow(clippy::too_many_arguments)]
pub fn unpack(
    blob: impl Read,
    expected_digest: Option<&Digest>,
    diff_id: &Digest,
    staging: &Path,
    max_bytes: u64,
    cancel: &AtomicBool,
    on_read: &(dyn Fn(u64) + Sync),
) -> Result<LayerTree, LayerError> {
    let raw = HashingReader::new(Progress { inner: blob, on_read });
    let buffered = BufReader::with_capacity(256 * 1024, raw);
    let decoder = Decoder::sniff(buffered).map_err(LayerError::Stream)?;
    let hit = AtomicBool::new(false);
    let limited = Limit { inner: decoder, left: max_bytes, hit: &hit };
    let mut archive = tar::Archive::new(HashingReader::new(limited));
    let mut tree =
        LayerTree::new(staging).map_err(|source| LayerError::Staging { path: staging.to_owned(), source })?;
    let result = unpack_entries(&mut archive, &mut tree, cancel);
    let too_large = LayerError::TooLarge { limit: max_bytes };
    if hit.load(Ordering::Relaxed) {
        return Err(too_large);
    }
    result?;
    let finished = archive.into_inner().finish();
    if hit.load(Ordering::Relaxed) {
        return Err(too_large);
    }
    let (found_diff_id, _, limited) = finished.map_err(LayerError::Stream)?;
    let (found_digest, _, _) =
        limited.inner.into_inner().into_inner().finish().map_err(LayerError::Stream)?;
    if let Some(expected) = expected_digest {
        digest::check("layer blob", expected, &found_digest)?;
    }
    digest::check("layer diff_id", diff_id, &found_diff_id)?;
    Ok(tree)
}

fn unpack_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    tree: &mut LayerTree,
    cancel: &AtomicBool,
) -> Result<(), LayerError> {
    for entry in archive.entries().map_err(LayerError::Stream)? {
        if cancel.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled);
        }
        let mut entry = entry.map_err(LayerError::Stream)?;
        let raw_path = entry.path_bytes().into_owned();
        apply_entry(tree, &mut entry).map_err(|source| match source {
            EntryError::Tree(TreeError::Data(e)) => LayerError::Stream(e),
            source => LayerError::Entry { path: path::display(&raw_path), source },
        })?;
    }
    Ok(())
}

fn apply_entry<R: Read>(tree: &mut LayerTree, entry: &mut tar::Entry<'_, R>) -> Result<(), EntryError> {
    use tar::EntryType as T;
    let action = path::classify(&entry.path_bytes())?;
    let meta = entry_meta(entry)?;
    let path = match action {
        EntryAction::Skip => return Ok(()),
        EntryAction::Opaque(dir) => return Ok(tree.write_opaque(&dir)?),
        EntryAction::Whiteout(p) => return Ok(tree.write_whiteout(&p, meta.mtime_sec)?),
        EntryAction::Write(p) => p,
    };
    let header = entry.header();
    let kind = header.entry_type();
    let device = |h: &tar::Header| -> Result<(u32, u32), EntryError> {
        let major = h.device_major().map_err(EntryError::Header)?.unwrap_or(0);
        let minor = h.device_minor().map_err(EntryError::Header)?.unwrap_or(0);
        Ok((major, minor))
    };
    match kind {
        T::Regular | T::Continuous | T::GNUSparse => tree.write_file(&path, &meta, entry)?,
        T::Directory => tree.write_dir(&path, meta)?,
        T::Symlink => {
            let target = entry.link_name_bytes().unwrap_or_default().into_owned();
            tree.write_symlink(&path, &target, &meta)?
        }
        T::Link => {
            let target = entry.link_name_bytes().unwrap_or_default();
            let target =
                path::normalize(&target).map_err(|_| EntryError::LinkEscapes(path::display(&target)))?;
            tree.write_hardlink(&path, &target)?
        }
        T::Char => {
            let (major, minor) = device(header)?;
            tree.write_node(&path, NodeType::Char { major, minor }, &meta)?
        }
        T::Block => {
            let (major, minor) = device(header)?;
            tree.write_node(&path, NodeType::Block { major, minor }, &meta)?
        }
        T::Fifo => tree.write_node(&path, NodeType::Fifo, &meta)?,
        T::XGlobalHeader => {}
        other => return Err(EntryError::UnsupportedType(other.as_byte() as char)),
    }
    Ok(())
}

/// Header fields with PAX overrides (`mtime` with nanoseconds, large `uid`/`gid`,
/// `SCHILY.xattr.*`).
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<EntryMeta, EntryError> {
    let h = entry.header();
    let mut meta = EntryMeta {
        mode: h.mode().map_err(EntryError::Header)? & 0o7777,
        uid: h.uid().map_err(EntryError::Header)? as u32,
        gid: h.gid().map_err(EntryError::Header)? as u32,
        mtime_sec: header_mtime(h).map_err(EntryError::Header)?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions().map_err(EntryError::Header)? {
        for ext in pax {
            let ext = ext.map_err(EntryError::Header)?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            let bad = || EntryError::BadPax(String::from_utf8_lossy(key).into_owned());
            let num = || std::str::from_utf8(value).ok().and_then(|v| v.parse::<u32>().ok()).ok_or_else(bad);
            match key {
                b"mtime" => {
                    let v = std::str::from_utf8(value).map_err(|_| bad())?;
                    (meta.mtime_sec, meta.mtime_nsec) = parse_pax_time(v).ok_or_else(bad)?;
                }
                b"uid" => meta.uid = num()?,
                b"gid" => meta.gid = num()?,
                k if k.starts_with(b"GNU.sparse.") => return Err(EntryError::PaxSparse),
                k => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        meta.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    meta.xattrs.sort();
    Ok(meta)
}

/// The header's mtime, signed: GNU base-256 encodes times before 1970 as negative numbers,
/// which `tar::Header::mtime` reads as huge unsigned ones.
fn header_mtime(h: &tar::Header) -> io::Result<i64> {
    let field = &h.as_old().mtime;
    if field[0] & 0x80 == 0 {
        return Ok(h.mtime()? as i64);
    }
    let mut value: i64 = if field[0] & 0x40 != 0 { -1 } else { 0 };
    value = (value << 6) | (field[0] & 0x3f) as i64;
    for &b in &field[1..] {
        value = (value << 8) | b as i64;
    }
    Ok(value)
}

/// A PAX time (`"1700000000.5"`, `"-1.25"`) as seconds and nanoseconds (floor semantics).
pub fn parse_pax_time(v: &str) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (sec, frac) = v.split_once('.').unwrap_or((v, ""));
    if sec.is_empty() || !sec.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let sec: i64 = sec.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    Some(match (neg, nsec) {
        (false, n) => (sec, n),
        (true, 0) => (-sec, 0),
        (true, n) => (-sec - 1, 1_000_000_000 - n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_time_table() {
        let cases = [
            ("1700000000", Some((1700000000, 0))),
            ("1700000000.5", Some((1700000000, 500_000_000))),
            ("1.123456789123", Some((1, 123_456_789))),
            ("-1.25", Some((-2, 750_000_000))),
            ("-3", Some((-3, 0))),
            ("", None),
            ("abc", None),
            ("1.x", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_pax_time(input), expected, "{input}");
        }
    }

    #[test]
    fn media_types() {
        assert!(check_media_type("application/vnd.oci.image.layer.v1.tar+zstd").is_ok());
        assert!(check_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip").is_ok());
        let err = check_media_type("application/vnd.example.unknown").unwrap_err();
        assert!(err.to_string().contains("application/vnd.example.unknown"));
    }
}

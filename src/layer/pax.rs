//! Writes the normalized layer stream as a POSIX pax tar: what `mkfs.erofs --tar=f` reads (a
//! normalizer [`Output`]), and the commit guest's listing.
//!
//! Each entry is a ustar header, preceded by a pax extended header (`x`) only when ustar cannot
//! say something exactly: a long path or link target, nanoseconds or a negative/huge mtime,
//! ids ≥ 2^21, a size ≥ 8 GiB, xattrs (`SCHILY.xattr.NAME`, binary values).

use std::io::{self, Read, Write};

use super::meta::EntryMeta;
use super::normalize::{NormalizeError, Output, read_piece};

pub(crate) const BLOCK: usize = 512;

/// What an entry is, as written to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarKind<'a> {
    File { size: u64 },
    Dir,
    Symlink(&'a [u8]),
    Hardlink(&'a [u8]),
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

impl TarKind<'_> {
    fn flag(&self) -> u8 {
        match self {
            TarKind::File { .. } => b'0',
            TarKind::Hardlink(_) => b'1',
            TarKind::Symlink(_) => b'2',
            TarKind::Char { .. } => b'3',
            TarKind::Block { .. } => b'4',
            TarKind::Dir => b'5',
            TarKind::Fifo => b'6',
        }
    }
}

/// A pax tar writer over any byte sink (a pipe into mkfs.erofs, a file).
pub struct TarWriter<W: Write> {
    out: W,
    /// File data on its way from a reader to `out` ([`Output::file`]).
    buf: Vec<u8>,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out, buf: Vec::new() }
    }

    /// The sink, as it is.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)
    }

    /// Writes one entry's headers. `path` is a layer path (`b""` is the root, written `./`).
    /// A regular file's data must follow through [`TarWriter::data`] and [`TarWriter::pad`].
    pub fn header(&mut self, path: &[u8], kind: TarKind<'_>, meta: &EntryMeta) -> io::Result<()> {
        self.header_with_records(path, kind, meta, &[])
    }

    /// [`TarWriter::header`] with `extra` pax records (a vendor's `KEY=VALUE`s) after the
    /// entry's own.
    pub fn header_with_records(
        &mut self,
        path: &[u8],
        kind: TarKind<'_>,
        meta: &EntryMeta,
        extra: &[(&[u8], &[u8])],
    ) -> io::Result<()> {
        let name: Vec<u8> = match (path.is_empty(), kind) {
            (true, _) => b"./".to_vec(),
            (false, TarKind::Dir) => [path, b"/"].concat(),
            (false, _) => path.to_vec(),
        };
        let link = match kind {
            TarKind::Symlink(t) | TarKind::Hardlink(t) => t,
            _ => b"",
        };
        let size = match kind {
            TarKind::File { size } => size,
            _ => 0,
        };
        let mut pax = Vec::new();
        if name.len() > 100 {
            record(&mut pax, b"path", &name);
        }
        if link.len() > 100 {
            record(&mut pax, b"linkpath", link);
        }
        let octal_time = meta.mtime_nsec == 0 && (0..0o77777777777).contains(&meta.mtime_sec);
        if !octal_time {
            record(&mut pax, b"mtime", pax_time(meta.mtime_sec, meta.mtime_nsec).as_bytes());
        }
        if meta.uid > 0o7777777 {
            record(&mut pax, b"uid", meta.uid.to_string().as_bytes());
        }
        if meta.gid > 0o7777777 {
            record(&mut pax, b"gid", meta.gid.to_string().as_bytes());
        }
        if size > 0o77777777777 {
            record(&mut pax, b"size", size.to_string().as_bytes());
        }
        for (k, v) in &meta.xattrs {
            record(&mut pax, &[b"SCHILY.xattr.", k.as_slice()].concat(), v);
        }
        for (k, v) in extra {
            record(&mut pax, k, v);
        }
        if !pax.is_empty() {
            let mut h = ustar(b"././@PaxHeader", b'x', 0o644, 0, 0, 0, pax.len() as u64, b"", (0, 0));
            checksum(&mut h);
            self.put(&h)?;
            self.put(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let dev = match kind {
            TarKind::Char { major, minor } | TarKind::Block { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let mtime = if octal_time { meta.mtime_sec as u64 } else { meta.mtime_sec.max(0) as u64 };
        let mut h = ustar(&name, kind.flag(), meta.mode & 0o7777, meta.uid, meta.gid, mtime, size, link, dev);
        checksum(&mut h);
        self.put(&h)
    }

    /// A chunk of the current file's data.
    pub fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(bytes)
    }

    /// Zero padding after `len` bytes of data, up to the next 512-byte block.
    pub fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// The end-of-archive marker; returns the sink, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        self.end_archive()?;
        Ok(self.out)
    }

    /// The end-of-archive marker, flushed.
    pub fn end_archive(&mut self) -> io::Result<()> {
        self.put(&[0u8; 2 * BLOCK])?;
        self.out.flush()
    }
}

/// The stream as a pax tar written to `W` (for mkfs, or anything else that reads a tar).
impl<W: Write> Output for TarWriter<W> {
    fn entry(&mut self, path: &[u8], kind: TarKind<'_>, meta: &EntryMeta) -> Result<(), NormalizeError> {
        self.header(path, kind, meta).map_err(NormalizeError::Write)
    }

    fn file(
        &mut self,
        path: &[u8],
        size: u64,
        data: &mut dyn Read,
        meta: &EntryMeta,
    ) -> Result<(), NormalizeError> {
        self.header(path, TarKind::File { size }, meta).map_err(NormalizeError::Write)?;
        if self.buf.is_empty() {
            self.buf = vec![0; 256 << 10];
        }
        let mut left = size;
        while left > 0 {
            let (n, _) = read_piece(data, &mut self.buf, left, 1).map_err(NormalizeError::Data)?;
            self.out.write_all(&self.buf[..n]).map_err(NormalizeError::Write)?;
            left -= n as u64;
        }
        self.pad(size).map_err(NormalizeError::Write)
    }

    fn end(&mut self) -> Result<(), NormalizeError> {
        self.end_archive().map_err(NormalizeError::Write)
    }
}

/// A pax time: `sec` or `sec.nnnnnnnnn`; before 1970 the value is negative with the fraction
/// counted toward zero (`-1.25` is 1.25 s before the epoch), as POSIX reads it.
fn pax_time(sec: i64, nsec: u32) -> String {
    match (sec < 0, nsec) {
        (_, 0) => sec.to_string(),
        (false, n) => format!("{sec}.{n:09}"),
        (true, n) => format!("-{}.{:09}", -(sec + 1), 1_000_000_000 - n),
    }
}

/// Appends one pax record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
pub(crate) fn record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[allow(clippy::too_many_arguments)]
fn ustar(
    name: &[u8],
    flag: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    size: u64,
    link: &[u8],
    (major, minor): (u32, u32),
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    copy_trunc(&mut h[0..100], name);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], if uid > 0o7777777 { 0 } else { uid as u64 });
    octal(&mut h[116..124], if gid > 0o7777777 { 0 } else { gid as u64 });
    octal(&mut h[124..136], if size > 0o77777777777 { 0 } else { size });
    octal(&mut h[136..148], mtime.min(0o77777777777));
    h[156] = flag;
    copy_trunc(&mut h[157..257], link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], (major as u64).min(0o7777777));
    octal(&mut h[337..345], (minor as u64).min(0o7777777));
    h
}

fn copy_trunc(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Zero-padded octal with a terminating NUL, filling the field.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

fn checksum(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn meta(mode: u32) -> EntryMeta {
        EntryMeta { mode, uid: 0, gid: 0, mtime_sec: 1_700_000_000, mtime_nsec: 0, xattrs: Vec::new() }
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        record(&mut out, b"path", &[b'a'; 93]);
        assert_eq!(out.len(), 103, "{}", String::from_utf8_lossy(&out));
        assert!(out.starts_with(b"103 path="));
        out.clear();
        record(&mut out, b"k", b"v");
        assert_eq!(out, b"6 k=v\n");
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(5, 0), "5");
        assert_eq!(pax_time(5, 7), "5.000000007");
        assert_eq!(pax_time(-2, 750_000_000), "-1.250000000");
        assert_eq!(pax_time(-3, 0), "-3");
        for (s, n) in [(-2i64, 750_000_000u32), (1, 5), (-86400, 0)] {
            assert_eq!(crate::layer::entry::parse_pax_time(&pax_time(s, n)), Some((s, n)));
        }
    }

    /// What the tar crate (an independent reader) sees in a written stream.
    #[test]
    fn tar_crate_reads_back_every_field() {
        let mut w = TarWriter::new(Vec::new());
        let long = vec![b'd'; 150];
        let mut m = meta(0o4755);
        m.uid = 3_000_000;
        m.gid = 4_294_967_295;
        m.mtime_sec = -86_400;
        m.mtime_nsec = 5;
        m.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2, 0, 0xff])];
        w.header(b"", TarKind::Dir, &meta(0o755)).unwrap();
        w.header(&long, TarKind::File { size: 3 }, &m).unwrap();
        w.data(b"abc").unwrap();
        w.pad(3).unwrap();
        w.header(b"l", TarKind::Symlink(&long), &meta(0o777)).unwrap();
        w.header(b"wh", TarKind::Char { major: 0, minor: 0 }, &meta(0)).unwrap();
        let bytes = w.finish().unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut entries = ar.entries().unwrap();
        let root = entries.next().unwrap().unwrap();
        assert_eq!(&*root.path_bytes(), b"./");
        let mut f = entries.next().unwrap().unwrap();
        assert_eq!(&*f.path_bytes(), &long[..]);
        let pax: Vec<(String, Vec<u8>)> = f
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.key().unwrap().to_string(), e.value_bytes().to_vec()))
            .collect();
        let get = |k: &str| pax.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("uid").unwrap(), b"3000000");
        assert_eq!(get("gid").unwrap(), b"4294967295");
        assert_eq!(get("mtime").unwrap(), b"-86399.999999995");
        assert_eq!(get("SCHILY.xattr.security.capability").unwrap(), vec![1, 0, 0, 2, 0, 0xff]);
        assert_eq!(f.header().mode().unwrap(), 0o4755);
        let mut data = String::new();
        f.read_to_string(&mut data).unwrap();
        assert_eq!(data, "abc");
        let l = entries.next().unwrap().unwrap();
        assert_eq!(&*l.link_name_bytes().unwrap(), &long[..]);
        let wh = entries.next().unwrap().unwrap();
        assert_eq!(wh.header().entry_type(), tar::EntryType::Char);
        assert!(entries.next().is_none());
    }
}

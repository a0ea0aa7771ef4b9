//! Extent references: how `commit`'s guest names a file's data instead of copying it.
//!
//! Copying 100 MB through an emulated guest costs seconds; naming where the bytes already are
//! costs nothing. The guest (`guest-tar --extents`) asks the upper's ext4 where each regular
//! file's data lies on the upper drive (`FS_IOC_FIEMAP`) and writes the entry with no data and
//! a pax record `VMROOTFS.extents` = `SIZE LOGICAL:PHYSICAL:LENGTH …` (bytes; holes are the
//! gaps). The host ([`resolve`]) turns that stream into a plain layer tar, reading each named
//! range from the upper file itself — the drive the guest saw, byte for byte.
//!
//! Nothing here trusts the guest: a range must lie inside the upper file and inside the file's
//! size, in order and without overlap, and no byte of the upper may be named twice (ext4
//! shares no blocks between files), or the entry is refused, named; the layer is capped at
//! the most a layer may unpack to. The bytes of the upper
//! file are the guest's own writing (or zeros), so a range pointing elsewhere in it yields
//! only what the guest could have written as data anyway; nothing of the host's is reachable.
//! A file whose data ext4 does not keep as plain blocks (inline, encrypted, delayed) goes in
//! band, as before. The stream then goes through the normalizer like any layer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use crate::layer::pax::{self, BLOCK};

/// The pax key of an entry whose data is named by extents of the upper drive.
pub const EXTENTS_KEY: &[u8] = b"VMROOTFS.extents";

/// The longest pax header [`resolve`] reads: a file of 4096 extents fits many times over.
const MAX_PAX: u64 = 1 << 20;

/// The most extents the guest names for one file; a file more fragmented goes in band.
const MAX_EXTENTS: usize = 4096;

/// A run of a file's data on the upper drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the drive.
    pub physical: u64,
    /// Bytes.
    pub length: u64,
}

/// The value of [`EXTENTS_KEY`] for a file of `size` bytes with data at `extents`.
pub fn encode(size: u64, extents: &[Extent]) -> Vec<u8> {
    let mut s = size.to_string();
    for e in extents {
        s.push_str(&format!(" {}:{}:{}", e.logical, e.physical, e.length));
    }
    s.into_bytes()
}

/// The file size and extents of an [`EXTENTS_KEY`] value.
fn decode(value: &[u8]) -> Result<(u64, Vec<Extent>), String> {
    let text = std::str::from_utf8(value).map_err(|_| "extents that are not text".to_string())?;
    let mut words = text.split(' ');
    let number = |w: &str| w.parse::<u64>().map_err(|_| format!("{w:?} in its extents is not a number"));
    let size = number(words.next().unwrap_or_default())?;
    let extents = words
        .map(|w| {
            let mut parts = w.split(':');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(l), Some(p), Some(n), None) => {
                    Ok(Extent { logical: number(l)?, physical: number(p)?, length: number(n)? })
                }
                _ => Err(format!("{w:?} is not an extent (LOGICAL:PHYSICAL:LENGTH)")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((size, extents))
}

/// Where the data of `file` (`size` bytes) lies on its filesystem's device, by `FS_IOC_FIEMAP`;
/// none when some of it is not in plain blocks of the device (inline, encoded, encrypted, not
/// yet allocated) or it has more than `MAX_EXTENTS` (4096) extents: it goes in band then.
/// Unwritten (preallocated) extents read as zeros and are left out, like holes.
pub fn file_extents(file: &File, size: u64) -> io::Result<Option<Vec<Extent>>> {
    use std::os::fd::AsRawFd;
    const FLAG_SYNC: u32 = 0x1;
    const LAST: u32 = 0x1;
    const UNWRITTEN: u32 = 0x800;
    /// Flags of extents whose bytes are the device's blocks as they are.
    const PLAIN: u32 = LAST | UNWRITTEN | 0x1000 /* MERGED */ | 0x2000 /* SHARED */;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const BATCH: usize = 128;
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct RawExtent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        reserved: u32,
        extents: [RawExtent; BATCH],
    }
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < size {
        let mut map = Fiemap {
            start,
            length: size - start,
            flags: FLAG_SYNC,
            mapped: 0,
            count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `map` is a `struct fiemap` with room for `count` extents, as the ioctl wants.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mapped = &map.extents[..(map.mapped as usize).min(BATCH)];
        for e in mapped {
            if e.flags & !PLAIN != 0 {
                return Ok(None);
            }
            let end = e.logical.saturating_add(e.length).min(size);
            if e.flags & UNWRITTEN == 0 && e.logical < end {
                out.push(Extent { logical: e.logical, physical: e.physical, length: end - e.logical });
            }
        }
        match mapped.last() {
            Some(e) if e.flags & LAST == 0 => start = e.logical.saturating_add(e.length),
            _ => break,
        }
        if out.len() > MAX_EXTENTS {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Why the guest's stream could not be made a layer tar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// An entry's extents or headers are not what [`resolve`] accepts.
    #[error("the guest's entry {entry}: {why}")]
    Entry {
        /// The entry's path as the guest wrote it.
        entry: String,
        /// Why.
        why: String,
    },
    /// The layer would be bigger than allowed (`--max-layer-size`).
    #[error("the layer from the guest's listing is over {max} bytes (the most a layer may unpack to)")]
    TooBig {
        /// The most bytes allowed.
        max: u64,
    },
    /// The stream itself is cut short or malformed.
    #[error("the guest's tar: {0}")]
    Stream(String),
    /// Reading the stream or the upper, or writing the layer, failed.
    #[error("{what}")]
    Io {
        /// What was being read or written.
        what: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

/// Turns the guest's stream `guest` into a plain tar on `out`: every entry as it is, but one
/// with [`EXTENTS_KEY`] gets its size in its header and its data read from `upper` (the upper
/// drive the guest read) at the extents named, zeros in the gaps. Ends after the end-of-archive
/// marker. Writes at most `max_bytes` (a guest naming one extent for many files could
/// otherwise fill the disk).
pub fn resolve(guest: impl Read, upper: &File, out: impl Write, max_bytes: u64) -> Result<(), ResolveError> {
    let mut capped = Capped::new(out, max_bytes);
    resolve_into(guest, upper, &mut capped).map_err(|e| match e {
        ResolveError::Io { source, .. }
            if capped.exceeded() || source.kind() == io::ErrorKind::FileTooLarge =>
        {
            ResolveError::TooBig { max: max_bytes }
        }
        e => e,
    })
}

/// A writer that takes at most `left` bytes: past them every write fails ([`Capped::exceeded`]).
pub struct Capped<W> {
    inner: W,
    left: u64,
    exceeded: bool,
}

impl<W: Write> Capped<W> {
    /// `inner`, taking at most `max` bytes.
    pub fn new(inner: W, max: u64) -> Capped<W> {
        Capped { inner, left: max, exceeded: false }
    }

    /// Whether a write went past the cap.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            self.exceeded = true;
            return Err(io::Error::new(io::ErrorKind::FileTooLarge, "past the most bytes allowed"));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn resolve_into(mut guest: impl Read, upper: &File, mut out: impl Write) -> Result<(), ResolveError> {
    let upper_len =
        upper.metadata().map_err(|source| ResolveError::Io { what: "the upper".into(), source })?.len();
    let write = |source| ResolveError::Io { what: "writing the layer".into(), source };
    let mut header = tar::Header::new_old();
    // What the last pax header said of the next entry: its extents, size and path.
    let mut extents: Option<Vec<u8>> = None;
    let mut pax_size: Option<u64> = None;
    let mut pax_path: Option<Vec<u8>> = None;
    let mut claimed = Claimed::default();
    loop {
        if !read_block(&mut guest, header.as_mut_bytes())? {
            return Err(ResolveError::Stream("it ends before its end-of-archive marker".into()));
        }
        if header.as_bytes().iter().all(|&b| b == 0) {
            out.write_all(header.as_bytes()).map_err(write)?;
            if !read_block(&mut guest, header.as_mut_bytes())? || header.as_bytes().iter().any(|&b| b != 0) {
                return Err(ResolveError::Stream("one zero block where the end marker has two".into()));
            }
            return out.write_all(header.as_bytes()).map_err(write);
        }
        let size = header.entry_size().map_err(|e| ResolveError::Stream(e.to_string()))?;
        match header.entry_type().as_byte() {
            b'x' => {
                if size > MAX_PAX {
                    return Err(ResolveError::Stream(format!("a pax header of {size} bytes")));
                }
                let data = read_data(&mut guest, size)?;
                let mut records = tar::PaxExtensions::new(&data[..size as usize])
                    .map(|r| r.map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec())))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|_| ResolveError::Stream("a malformed pax record".into()))?;
                let named = records.iter().position(|(k, _)| k == EXTENTS_KEY);
                if let Some(i) = named {
                    extents = Some(records.remove(i).1);
                }
                let value = |key: &[u8]| records.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
                pax_path = value(b"path");
                let number = |v: Vec<u8>| {
                    let n = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok());
                    n.ok_or_else(|| ResolveError::Stream("a pax size that is not a number".into()))
                };
                pax_size = value(b"size").map(number).transpose()?;
                if named.is_none() {
                    // Nothing of ours in it: the header goes on as it came.
                    out.write_all(header.as_bytes()).map_err(write)?;
                    out.write_all(&data).map_err(write)?;
                    continue;
                }
                if records.is_empty() {
                    continue;
                }
                let mut body = Vec::new();
                for (k, v) in &records {
                    pax::record(&mut body, k, v);
                }
                header.set_size(body.len() as u64);
                header.set_cksum();
                out.write_all(header.as_bytes()).map_err(write)?;
                out.write_all(&body).map_err(write)?;
                out.write_all(&[0; BLOCK][..padding(body.len() as u64)]).map_err(write)?;
            }
            flag => {
                let data_len = pax_size.take().unwrap_or(size);
                let named = extents.take();
                // Long-name and global headers describe what follows: they keep the pax state.
                let path =
                    if matches!(flag, b'g' | b'L' | b'K') { pax_path.clone() } else { pax_path.take() };
                let entry =
                    String::from_utf8_lossy(&path.unwrap_or_else(|| header.path_bytes().into_owned()))
                        .into_owned();
                match named {
                    Some(value) => {
                        let bad = |why: String| ResolveError::Entry { entry: entry.clone(), why };
                        if !matches!(flag, b'0' | 0) || data_len != 0 {
                            return Err(bad("extents on an entry that is not an empty regular file".into()));
                        }
                        let (file_size, list) = decode(&value).map_err(bad)?;
                        if file_size > 0o77777777777 {
                            return Err(bad(format!("extents for a file of {file_size} bytes")));
                        }
                        check_extents(file_size, &list, upper_len).map_err(bad)?;
                        claimed.claim(&list).map_err(bad)?;
                        header.set_size(file_size);
                        header.set_cksum();
                        out.write_all(header.as_bytes()).map_err(write)?;
                        copy_extents(upper, file_size, &list, &mut out)?;
                        out.write_all(&[0; BLOCK][..padding(file_size)]).map_err(write)?;
                    }
                    None => {
                        out.write_all(header.as_bytes()).map_err(write)?;
                        let padded = data_len.div_ceil(BLOCK as u64) * BLOCK as u64;
                        let copied = io::copy(&mut (&mut guest).take(padded), &mut out)
                            .map_err(|source| ResolveError::Io { what: "the guest's tar".into(), source })?;
                        if copied != padded {
                            return Err(ResolveError::Stream(format!("the data of {entry} is cut short")));
                        }
                    }
                }
            }
        }
    }
}

/// The ranges of the upper that extents have named so far. ext4 has no shared extents (a
/// second link of a file is a hardlink entry, not a second copy), so no byte of the upper
/// belongs to two entries: a guest naming one twice is refused, which bounds the layer by the
/// upper's size.
#[derive(Default)]
struct Claimed(std::collections::BTreeMap<u64, u64>);

impl Claimed {
    /// Claims each extent's range of the upper, or says which was named before.
    fn claim(&mut self, extents: &[Extent]) -> Result<(), String> {
        for e in extents {
            let end = e.physical + e.length;
            let before = self.0.range(..end).next_back();
            if let Some((&start, &stop)) = before.filter(|&(_, &stop)| stop > e.physical) {
                return Err(format!(
                    "extent {}:{}:{} names bytes {start}..{stop} of the upper that another extent named",
                    e.logical, e.physical, e.length
                ));
            }
            self.0.insert(e.physical, end);
        }
        Ok(())
    }
}

/// Checks that `extents` lie in a file of `size` bytes, in order, and on an upper of
/// `upper_len` bytes.
fn check_extents(size: u64, extents: &[Extent], upper_len: u64) -> Result<(), String> {
    let mut end = 0;
    for e in extents {
        let past = |a: u64, b: u64| a.checked_add(b).is_none_or(|x| x > size);
        if e.length == 0 || e.logical < end || past(e.logical, e.length) {
            return Err(format!(
                "extent {}:{}:{} is empty, out of order or past the file's {size} bytes",
                e.logical, e.physical, e.length
            ));
        }
        if e.physical.checked_add(e.length).is_none_or(|x| x > upper_len) {
            return Err(format!(
                "extent {}:{}:{} is outside the upper's {upper_len} bytes",
                e.logical, e.physical, e.length
            ));
        }
        end = e.logical + e.length;
    }
    Ok(())
}

/// Writes `size` bytes of a file: the `extents` read from `upper`, zeros between them.
fn copy_extents(
    upper: &File,
    size: u64,
    extents: &[Extent],
    out: &mut impl Write,
) -> Result<(), ResolveError> {
    let write = |source| ResolveError::Io { what: "writing the layer".into(), source };
    let zeros = |out: &mut dyn Write, mut n: u64| -> Result<(), ResolveError> {
        static ZERO: [u8; 64 << 10] = [0; 64 << 10];
        while n > 0 {
            let k = n.min(ZERO.len() as u64) as usize;
            out.write_all(&ZERO[..k]).map_err(write)?;
            n -= k as u64;
        }
        Ok(())
    };
    let mut buf = vec![0u8; (1 << 20).min(size as usize)];
    let mut at = 0;
    for e in extents {
        zeros(out, e.logical - at)?;
        let mut done = 0;
        while done < e.length {
            let k = (e.length - done).min(buf.len() as u64) as usize;
            upper
                .read_exact_at(&mut buf[..k], e.physical + done)
                .map_err(|source| ResolveError::Io { what: "reading the upper".into(), source })?;
            out.write_all(&buf[..k]).map_err(write)?;
            done += k as u64;
        }
        at = e.logical + e.length;
    }
    zeros(out, size - at)
}

/// Reads one 512-byte block; false at a clean end of the stream.
fn read_block(r: &mut impl Read, block: &mut [u8; BLOCK]) -> Result<bool, ResolveError> {
    let mut got = 0;
    while got < BLOCK {
        match r.read(&mut block[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ResolveError::Stream("it ends inside a header".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(ResolveError::Io { what: "the guest's tar".into(), source }),
        }
    }
    Ok(true)
}

/// Reads `size` bytes of data and their padding.
fn read_data(r: &mut impl Read, size: u64) -> Result<Vec<u8>, ResolveError> {
    let mut data = vec![0u8; size as usize + padding(size)];
    r.read_exact(&mut data).map_err(|_| ResolveError::Stream("a pax header is cut short".into()))?;
    Ok(data)
}

/// Zero bytes after `len` bytes of data, to the next block.
fn padding(len: u64) -> usize {
    ((BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::meta::EntryMeta;
    use crate::layer::pax::{TarKind, TarWriter};

    fn meta() -> EntryMeta {
        EntryMeta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 5,
            xattrs: vec![(b"user.a".to_vec(), b"b".to_vec())],
        }
    }

    /// An upper file of 64 KiB whose n-th 4 KiB block is filled with the byte n.
    fn upper() -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..16u8).flat_map(|n| vec![n; 4096]).collect();
        fs_err::write(f.path(), bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    /// A guest stream with one in-band file and one named by `value`.
    fn stream(value: &[u8]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        w.header(b"a", TarKind::File { size: 3 }, &meta()).unwrap();
        w.data(b"abc").unwrap();
        w.pad(3).unwrap();
        w.header_with_records(b"big", TarKind::File { size: 0 }, &meta(), &[(EXTENTS_KEY, value)]).unwrap();
        w.header(b"d", TarKind::Dir, &meta()).unwrap();
        w.finish().unwrap()
    }

    /// Path, data and pax records of each entry.
    type ReadBack = Vec<(String, Vec<u8>, Vec<(String, Vec<u8>)>)>;

    fn read_back(tar: &[u8]) -> ReadBack {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let pax: Vec<(String, Vec<u8>)> = e
                    .pax_extensions()
                    .unwrap()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        let p = p.unwrap();
                        (p.key().unwrap().to_string(), p.value_bytes().to_vec())
                    })
                    .collect();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, data, pax)
            })
            .collect()
    }

    #[test]
    fn named_extents_become_the_files_data_with_zeros_in_the_gaps() {
        let (_f, upper) = upper();
        // 10,000 bytes: 100 bytes of block 2, a hole, then 4,000 bytes of block 7 at offset 6,000.
        let value = encode(
            10_000,
            &[
                Extent { logical: 0, physical: 2 * 4096, length: 100 },
                Extent { logical: 6000, physical: 7 * 4096, length: 4000 },
            ],
        );
        let mut out = Vec::new();
        resolve(stream(&value).as_slice(), &upper, &mut out, u64::MAX).unwrap();
        let entries = read_back(&out);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["a", "big", "d/"]);
        assert_eq!(entries[0].1, b"abc");
        let mut want = vec![2u8; 100];
        want.resize(6000, 0);
        want.resize(10_000, 7);
        assert_eq!(entries[1].1, want);
        // The entry keeps its own pax records (ns mtime, xattr); the extents record is gone.
        let keys: Vec<&str> = entries[1].2.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["mtime", "SCHILY.xattr.user.a"]);
    }

    #[test]
    fn extents_outside_the_upper_or_the_file_are_refused_naming_the_entry() {
        let (_f, upper) = upper();
        let e = |logical, physical, length| Extent { logical, physical, length };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (encode(100, &[e(0, 65_536 - 50, 100)]), "outside the upper's 65536 bytes"),
            (encode(100, &[e(0, u64::MAX - 10, 100)]), "outside the upper"),
            (encode(100, &[e(50, 0, 100)]), "past the file's 100 bytes"),
            (encode(100, &[e(50, 0, 10), e(40, 0, 10)]), "out of order"),
            (encode(100, &[e(0, 0, 0)]), "empty"),
            (b"100 1:2".to_vec(), "is not an extent"),
            (b"x".to_vec(), "is not a number"),
        ];
        for (value, want) in cases {
            let err = resolve(stream(&value).as_slice(), &upper, &mut Vec::new(), u64::MAX)
                .unwrap_err()
                .to_string();
            assert!(err.contains("entry big") && err.contains(want), "{err} (wanted {want})");
        }
    }

    #[test]
    fn bytes_of_the_upper_named_twice_are_refused() {
        let (_f, upper) = upper();
        let e = |logical, physical, length| Extent { logical, physical, length };
        for (first, second) in [
            (e(0, 4096, 4096), e(0, 4096, 4096)),
            (e(0, 4096, 4096), e(0, 8191, 10)),
            (e(0, 8192, 4096), e(0, 4000, 4200)),
        ] {
            let mut w = TarWriter::new(Vec::new());
            for (name, ext) in [(&b"a"[..], first), (&b"b"[..], second)] {
                let value = encode(ext.length, &[Extent { logical: 0, ..ext }]);
                w.header_with_records(name, TarKind::File { size: 0 }, &meta(), &[(EXTENTS_KEY, &value)])
                    .unwrap();
            }
            let err = resolve(w.finish().unwrap().as_slice(), &upper, &mut Vec::new(), u64::MAX)
                .unwrap_err()
                .to_string();
            assert!(err.contains("entry b") && err.contains("another extent named"), "{err}");
        }
        // Adjacent ranges are fine.
        let mut w = TarWriter::new(Vec::new());
        for (name, physical) in [(&b"a"[..], 4096), (&b"b"[..], 8192)] {
            let value = encode(4096, &[e(0, physical, 4096)]);
            w.header_with_records(name, TarKind::File { size: 0 }, &meta(), &[(EXTENTS_KEY, &value)])
                .unwrap();
        }
        resolve(w.finish().unwrap().as_slice(), &upper, &mut Vec::new(), u64::MAX).unwrap();
    }

    #[test]
    fn a_layer_past_the_cap_is_refused() {
        let (_f, upper) = upper();
        let mut w = TarWriter::new(Vec::new());
        let data = vec![7u8; 65_536];
        for i in 0..100 {
            w.header(format!("f{i}").as_bytes(), TarKind::File { size: 65_536 }, &meta()).unwrap();
            w.data(&data).unwrap();
        }
        let stream = w.finish().unwrap();
        let mut out = Vec::new();
        let err = resolve(stream.as_slice(), &upper, &mut out, 1 << 20).unwrap_err();
        assert!(matches!(err, ResolveError::TooBig { max: 1048576 }), "{err}");
        assert!(out.len() <= 1 << 20, "{} bytes written", out.len());
        let mut out = Vec::new();
        resolve(stream.as_slice(), &upper, &mut out, 16 << 20).unwrap();
        assert_eq!(out, stream, "in-band entries pass as they are");
    }

    #[test]
    fn a_stream_cut_short_is_an_error() {
        let (_f, upper) = upper();
        let full = stream(&encode(3, &[Extent { logical: 0, physical: 0, length: 3 }]));
        for cut in [100, 512 + 100, full.len() - 512] {
            assert!(resolve(&full[..cut], &upper, &mut Vec::new(), u64::MAX).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn fiemap_names_where_a_files_bytes_are() {
        // The test's own filesystem: the extents read back from the device give the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs_err::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let Some(extents) = file_extents(&file, data.len() as u64).unwrap() else {
            panic!("the test's filesystem keeps a 300 kB file in plain blocks")
        };
        assert!(!extents.is_empty());
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), data.len() as u64);
        assert_eq!(extents[0].logical, 0);
    }
}

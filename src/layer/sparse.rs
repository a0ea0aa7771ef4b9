//! PAX sparse members — what GNU tar writes for `--sparse --format=posix` — in the three
//! formats GNU tar has used: 0.0 (`GNU.sparse.offset`/`numbytes` record pairs), 0.1
//! (`GNU.sparse.map`) and 1.0 (the map at the start of the member's data). The member is read
//! back as the file it stands for: `GNU.sparse.name` (or the header's path), the real size,
//! and a reader that gives zeros for the holes and the stored bytes for the data segments.

use std::io::{self, Read};

use super::EntryError;

/// Longest 1.0 map vmrootfs reads (it is part of the member's stored bytes, and a hostile one
/// could be long; GNU tar writes one line per segment).
const MAX_MAP_BYTES: u64 = 16 << 20;

/// The sparse layout of one member, from its PAX records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaxSparse {
    /// `GNU.sparse.name`: the file's real name (the header's path is a placeholder).
    pub name: Option<Vec<u8>>,
    pub real_size: u64,
    /// `(offset, length)` of each data segment; `None` for 1.0 (the map is in the data).
    map: Option<Vec<(u64, u64)>>,
}

impl PaxSparse {
    /// The sparse layout the records describe, or `None` for an ordinary member.
    pub fn from_records<'a>(
        records: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Option<PaxSparse>, EntryError> {
        let (mut name, mut size, mut major) = (None, None, None);
        let (mut map_01, mut offsets, mut lengths) = (None, Vec::new(), Vec::new());
        let mut any = false;
        for (key, value) in records {
            let Some(k) = key.strip_prefix(b"GNU.sparse.") else { continue };
            any = true;
            let bad = || EntryError::BadPax(String::from_utf8_lossy(key).into_owned());
            let num = || -> Result<u64, EntryError> {
                std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok()).ok_or_else(bad)
            };
            match k {
                b"name" => name = Some(value.to_vec()),
                b"size" | b"realsize" => size = Some(num()?),
                b"major" => major = Some(num()?),
                b"minor" | b"numblocks" => {}
                b"offset" => offsets.push(num()?),
                b"numbytes" => lengths.push(num()?),
                b"map" => {
                    let text = std::str::from_utf8(value).map_err(|_| bad())?;
                    let nums: Vec<u64> = text
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| s.trim().parse().map_err(|_| bad()))
                        .collect::<Result<_, _>>()?;
                    if !nums.len().is_multiple_of(2) {
                        return Err(bad());
                    }
                    map_01 = Some(nums.chunks(2).map(|p| (p[0], p[1])).collect::<Vec<_>>());
                }
                _ => return Err(bad()),
            }
        }
        if !any {
            return Ok(None);
        }
        let real_size = size.ok_or(EntryError::BadPax("GNU.sparse.size".into()))?;
        let map = match (major, map_01) {
            (Some(1), _) => None,
            (_, Some(map)) => Some(map),
            _ if offsets.len() == lengths.len() => Some(offsets.into_iter().zip(lengths).collect()),
            _ => return Err(EntryError::BadPax("GNU.sparse.offset".into())),
        };
        let sparse = PaxSparse { name, real_size, map };
        if let Some(map) = &sparse.map {
            check_map(map, real_size)?;
        }
        Ok(Some(sparse))
    }

    /// The file's contents, read from the member's stored bytes `data` (`stored` of them).
    pub fn expand<R: Read>(&self, mut data: R, stored: u64) -> Result<Expand<R>, EntryError> {
        let (map, map_bytes) = match &self.map {
            Some(map) => (map.clone(), 0),
            None => read_map_1_0(&mut data, stored)?,
        };
        check_map(&map, self.real_size)?;
        let data_bytes: u64 = map.iter().map(|(_, len)| len).sum();
        if map_bytes + data_bytes != stored {
            return Err(EntryError::BadSparseMap(format!(
                "the map's segments hold {data_bytes} bytes, the member stores {}",
                stored.saturating_sub(map_bytes)
            )));
        }
        Ok(Expand { inner: data, map, next: 0, pos: 0, size: self.real_size })
    }
}

/// Segments in order, not overlapping, inside the file.
fn check_map(map: &[(u64, u64)], size: u64) -> Result<(), EntryError> {
    let mut end = 0u64;
    for &(off, len) in map {
        let seg_end = off.checked_add(len).filter(|&e| e <= size);
        match seg_end {
            Some(e) if off >= end => end = e,
            _ => {
                return Err(EntryError::BadSparseMap(format!(
                    "segment {off}+{len} overlaps another or ends beyond the file's {size} bytes"
                )));
            }
        }
    }
    Ok(())
}

/// Format 1.0: decimal numbers one per line — the count, then offset and length of each
/// segment — padded with NULs to a 512-byte boundary. Returns the map and its bytes.
fn read_map_1_0(data: &mut impl Read, stored: u64) -> Result<(Vec<(u64, u64)>, u64), EntryError> {
    let mut used = 0u64;
    let limit = stored.min(MAX_MAP_BYTES);
    let mut next_number = || -> Result<u64, EntryError> {
        let mut digits = Vec::new();
        loop {
            let mut b = [0u8; 1];
            if used >= limit || data.read(&mut b).map_err(EntryError::Header)? == 0 {
                return Err(EntryError::BadSparseMap("the map ends early".into()));
            }
            used += 1;
            match b[0] {
                b'\n' => break,
                d @ b'0'..=b'9' if digits.len() < 20 => digits.push(d),
                _ => return Err(EntryError::BadSparseMap("a map number is not a decimal".into())),
            }
        }
        std::str::from_utf8(&digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| EntryError::BadSparseMap("an empty map number".into()))
    };
    let count = next_number()?;
    let mut map = Vec::new();
    for _ in 0..count {
        map.push((next_number()?, next_number()?));
    }
    let padded = used.next_multiple_of(512);
    let pad = padded - used;
    if padded > stored {
        return Err(EntryError::BadSparseMap("the map's padding ends beyond the member".into()));
    }
    io::copy(&mut data.take(pad), &mut io::sink()).map_err(EntryError::Header)?;
    Ok((map, padded))
}

/// A sparse file's contents: zeros in the holes, the member's bytes in the segments.
pub struct Expand<R> {
    inner: R,
    map: Vec<(u64, u64)>,
    /// Index of the first segment not wholly read.
    next: usize,
    pos: u64,
    size: u64,
}

impl<R: Read> Read for Expand<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        while let Some(&(off, len)) = self.map.get(self.next) {
            if self.pos < off + len {
                break;
            }
            self.next += 1;
        }
        let (pos, room) = (self.pos, buf.len() as u64);
        let want = |to: u64| (to - pos).min(room) as usize;
        let n = match self.map.get(self.next) {
            Some(&(off, len)) if self.pos >= off => {
                let n = self.inner.read(&mut buf[..want(off + len)])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sparse member ends early"));
                }
                n
            }
            Some(&(off, _)) => {
                let n = want(off);
                buf[..n].fill(0);
                n
            }
            None => {
                let n = want(self.size);
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Option<PaxSparse>, EntryError> {
        let r = records(pairs);
        PaxSparse::from_records(r.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
    }

    fn read_all(s: &PaxSparse, stored: &[u8]) -> Result<Vec<u8>, EntryError> {
        let mut out = Vec::new();
        s.expand(stored, stored.len() as u64)?.read_to_end(&mut out).map_err(EntryError::Header)?;
        Ok(out)
    }

    #[test]
    fn the_three_formats_expand_to_the_same_file() {
        let want: Vec<u8> = [vec![0; 3], b"ab".to_vec(), vec![0; 5], b"c".to_vec(), vec![0; 2]].concat();
        let v00 = parse(&[
            ("GNU.sparse.size", "13"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "3"),
            ("GNU.sparse.numbytes", "2"),
            ("GNU.sparse.offset", "10"),
            ("GNU.sparse.numbytes", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(read_all(&v00, b"abc").unwrap(), want);
        let v01 =
            parse(&[("GNU.sparse.size", "13"), ("GNU.sparse.map", "3,2,10,1"), ("GNU.sparse.name", "f")])
                .unwrap()
                .unwrap();
        assert_eq!(v01.name.as_deref(), Some(&b"f"[..]));
        assert_eq!(read_all(&v01, b"abc").unwrap(), want);
        let v10 =
            parse(&[("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.realsize", "13")])
                .unwrap()
                .unwrap();
        let mut stored = b"2\n3\n2\n10\n1\n".to_vec();
        stored.resize(512, 0);
        stored.extend_from_slice(b"abc");
        assert_eq!(read_all(&v10, &stored).unwrap(), want);
        assert_eq!(parse(&[("path", "x")]).unwrap(), None);
    }

    #[test]
    fn bad_maps_are_refused() {
        let overlap = parse(&[("GNU.sparse.size", "10"), ("GNU.sparse.map", "0,5,3,2")]);
        assert!(matches!(overlap, Err(EntryError::BadSparseMap(_))));
        let beyond = parse(&[("GNU.sparse.size", "10"), ("GNU.sparse.map", "8,5")]);
        assert!(matches!(beyond, Err(EntryError::BadSparseMap(_))));
        let odd = parse(&[("GNU.sparse.size", "10"), ("GNU.sparse.map", "1,2,3")]);
        assert!(matches!(odd, Err(EntryError::BadPax(_))));
        let s = parse(&[("GNU.sparse.size", "10"), ("GNU.sparse.map", "0,4")]).unwrap().unwrap();
        assert!(matches!(read_all(&s, b"ab"), Err(EntryError::BadSparseMap(_))), "stored bytes short");
        let v10 = parse(&[("GNU.sparse.major", "1"), ("GNU.sparse.realsize", "10")]).unwrap().unwrap();
        assert!(matches!(read_all(&v10, b"1\n0\n"), Err(EntryError::BadSparseMap(_))), "map ends early");
    }
}

//! One tar header, read into what vmrootfs keeps of it: mode, owner, times (PAX nanoseconds,
//! GNU base-256 negative times) and xattrs (`SCHILY.xattr.*`); numeric fields and names read
//! as GNU tar, bsdtar and Go read them.

use std::io::Read;

use super::EntryError;
use super::meta::EntryMeta;
use super::sparse::PaxSparse;

/// Header fields with PAX overrides (`mtime` with nanoseconds, large `uid`/`gid`,
/// `SCHILY.xattr.*`).
pub fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<EntryMeta, EntryError> {
    let h = entry.header().as_old();
    let mtime = number("mtime", &h.mtime)?;
    let mut meta = EntryMeta {
        mode: unsigned("mode", &h.mode)? & 0o7777,
        uid: id("uid", number("uid", &h.uid)?)?,
        gid: id("gid", number("gid", &h.gid)?)?,
        mtime_sec: i64::try_from(mtime).map_err(|_| EntryError::OutOfRange {
            field: "mtime",
            value: mtime,
            bits: 64,
        })?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions().map_err(EntryError::Header)? {
        for ext in pax {
            let ext = ext.map_err(EntryError::Header)?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            let bad = || EntryError::BadPax(String::from_utf8_lossy(key).into_owned());
            let num = |field| {
                let v =
                    std::str::from_utf8(value).ok().and_then(|v| v.parse::<i128>().ok()).ok_or_else(bad)?;
                id(field, v)
            };
            match key {
                b"mtime" => {
                    let v = std::str::from_utf8(value).map_err(|_| bad())?;
                    (meta.mtime_sec, meta.mtime_nsec) = parse_pax_time(v).ok_or_else(bad)?;
                }
                b"uid" => meta.uid = num("uid")?,
                b"gid" => meta.gid = num("gid")?,
                k if k.starts_with(b"GNU.sparse.") => {} // see [`pax_sparse`]
                k => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        // A later record for the same xattr replaces the earlier one, as
                        // setting it again would.
                        meta.xattrs.retain(|(n, _)| n != name);
                        meta.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    meta.xattrs.sort();
    Ok(meta)
}

/// The sparse layout of a PAX sparse member (`GNU.sparse.*` records), if it is one.
pub fn pax_sparse<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<PaxSparse>, EntryError> {
    let Some(pax) = entry.pax_extensions().map_err(EntryError::Header)? else {
        return Ok(None);
    };
    let records: Vec<(Vec<u8>, Vec<u8>)> = pax
        .map(|r| r.map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec())))
        .collect::<Result<_, _>>()
        .map_err(EntryError::Header)?;
    PaxSparse::from_records(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
}

/// Device major and minor of a character or block device header (ustar and GNU headers keep
/// them at the same offsets).
pub fn device(h: &tar::Header) -> Result<(u32, u32), EntryError> {
    let bytes = h.as_bytes();
    Ok((unsigned("devmajor", &bytes[329..337])?, unsigned("devminor", &bytes[337..345])?))
}

/// What an entry of type `kind` named `path` is, when it carries no data (links, devices,
/// FIFOs, directories, and a regular-file header named `…/`: a v7 directory). The tar reader
/// gives such an entry no data when the readers agree it has none (vendor/tar
/// `carries_no_data`); one still claiming data is one they disagree on.
pub fn dataless_kind(kind: tar::EntryType, path: &[u8]) -> Option<&'static str> {
    use tar::EntryType as T;
    match kind {
        T::Link => Some("hardlink"),
        T::Symlink => Some("symlink"),
        T::Char => Some("character device"),
        T::Block => Some("block device"),
        T::Directory => Some("directory"),
        T::Fifo => Some("FIFO"),
        T::Regular if path.ends_with(b"/") => Some("directory"),
        _ => None,
    }
}

/// A numeric header field as GNU tar, bsdtar and Go read it: octal digits padded with spaces
/// or NULs (a field of only NULs or spaces, seen in real archives, is 0), or GNU base-256
/// (high bit set; the next bit is the sign, for times before 1970).
pub fn number(field: &'static str, bytes: &[u8]) -> Result<i128, EntryError> {
    if let Some(&first) = bytes.first()
        && first & 0x80 != 0
    {
        // At most 12 bytes: 94 bits and a sign fit in an i128.
        let mut value: i128 = if first & 0x40 != 0 { -1 } else { 0 };
        value = (value << 6) | (first & 0x3f) as i128;
        for &b in &bytes[1..] {
            value = (value << 8) | b as i128;
        }
        return Ok(value);
    }
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let Some(start) = bytes.iter().position(|b| !pad(b)) else {
        return Ok(0);
    };
    let end = bytes.iter().rposition(|b| !pad(b)).map_or(start, |e| e + 1);
    let digits = &bytes[start..end];
    if !digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err(EntryError::BadNumber { field, text: String::from_utf8_lossy(bytes).into_owned() });
    }
    // At most 12 octal digits: 36 bits.
    Ok(digits.iter().fold(0i128, |v, &d| (v << 3) | (d - b'0') as i128))
}

/// A numeric field that must fit in 32 unsigned bits (ids, mode, device numbers): 2^32 must
/// not become 0, root.
fn unsigned(field: &'static str, bytes: &[u8]) -> Result<u32, EntryError> {
    let value = number(field, bytes)?;
    u32::try_from(value).map_err(|_| EntryError::OutOfRange { field, value, bits: 32 })
}

/// A uid or gid: 32 unsigned bits, and not 4294967295, which is `(uid_t)-1` to chown ("leave
/// unchanged"), so applying the layer could never give it.
fn id(field: &'static str, value: i128) -> Result<u32, EntryError> {
    match u32::try_from(value) {
        Ok(u32::MAX) => Err(EntryError::NoChangeId { field }),
        Ok(v) => Ok(v),
        Err(_) => Err(EntryError::OutOfRange { field, value, bits: 32 }),
    }
}

/// A name as C strings end: at its first NUL. GNU long names (`L`/`K` entries) are C
/// strings; GNU tar, bsdtar and Go cut them there, where the tar crate keeps what follows.
/// (A PAX `path` with a NUL is cut the same way, as GNU tar does.)
pub fn c_string(name: &[u8]) -> &[u8] {
    name.iter().position(|&b| b == 0).map_or(name, |end| &name[..end])
}

/// The entry's path (GNU long name, PAX `path` or header name), up to a NUL.
pub fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> Vec<u8> {
    c_string(&entry.path_bytes()).to_vec()
}

/// The entry's link target (GNU long link, PAX `linkpath` or header field), up to a NUL; empty
/// when the entry names none.
pub fn entry_link<R: Read>(entry: &tar::Entry<'_, R>) -> Vec<u8> {
    entry.link_name_bytes().map(|l| c_string(&l).to_vec()).unwrap_or_default()
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
    fn number_table() {
        let base256 = |bytes: &[u8]| {
            let mut f = [0u8; 8];
            f[8 - bytes.len()..].copy_from_slice(bytes);
            f[0] |= 0x80;
            f
        };
        let cases: [(&[u8], Option<i128>); 11] = [
            (b"0000644\0", Some(0o644)),
            (b"  644 \0\0", Some(0o644)),
            (b"\0\0\0\0\0\0\0\0", Some(0)),
            (b"        ", Some(0)),
            (b"0001750\0", Some(1000)),
            (b"00008\0\0\0", None),
            (b"12 34\0\0\0", None),
            (b"x\0\0\0\0\0\0\0", None),
            (&base256(&[1, 0, 0, 0, 0]), Some(1 << 32)),
            (&base256(&[0xff, 0xff, 0xff, 0xff]), Some(u32::MAX as i128)),
            (&[0xff; 8], Some(-1)),
        ];
        for (bytes, want) in cases {
            assert_eq!(number("uid", bytes).ok(), want, "{bytes:?}");
        }
    }

    #[test]
    fn ids_of_32_bits_or_more_and_minus_one_are_refused() {
        let mut h = tar::Header::new_gnu();
        for (id_value, ok) in [
            (0u64, true),
            (u32::MAX as u64 - 1, true),
            (u32::MAX as u64, false),
            (1 << 32, false),
            (1 << 40, false),
        ] {
            h.set_uid(id_value);
            h.set_gid(id_value);
            for (field, bytes) in [("uid", h.as_old().uid), ("gid", h.as_old().gid)] {
                match number(field, &bytes).and_then(|v| id(field, v)) {
                    Ok(v) => assert!(ok && v as u64 == id_value, "{field} {id_value}"),
                    Err(e) => {
                        assert!(!ok, "{field} {id_value}: {e}");
                        assert!(e.to_string().contains(&format!("{field} {id_value}")), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn c_string_table() {
        for (name, want) in [(&b"a/b"[..], &b"a/b"[..]), (b"a/b\0junk", b"a/b"), (b"\0x", b""), (b"", b"")] {
            assert_eq!(c_string(name), want);
        }
    }

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
}

//! One tar header, read into what vmrootfs keeps of it: mode, owner, times (PAX nanoseconds,
//! GNU base-256 negative times) and xattrs (`SCHILY.xattr.*`).

use std::io::{self, Read};

use super::EntryError;
use super::meta::EntryMeta;

/// Header fields with PAX overrides (`mtime` with nanoseconds, large `uid`/`gid`,
/// `SCHILY.xattr.*`).
pub fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<EntryMeta, EntryError> {
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
}

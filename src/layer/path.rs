//! Pure path and whiteout logic for tar entries: no I/O, table-tested.
//!
//! Paths inside a layer are kept as raw bytes (tar names need not be UTF-8), relative to the
//! layer root, `/`-separated, with no `.`/`..`/empty components. The root itself is `b""`.

/// Prefix of an OCI whiteout entry.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Why an entry path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("path escapes the layer root")]
    Escapes,
    #[error("whiteout names no file")]
    EmptyWhiteout,
}

/// What a tar entry asks for, decided from its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryAction {
    /// Create (or replace) the entry at this path.
    Write(Vec<u8>),
    /// `.wh.NAME`: hide `NAME` of the layers below (an overlayfs whiteout at this path).
    Whiteout(Vec<u8>),
    /// `.wh..wh..opq`: this directory hides everything below it in lower layers.
    Opaque(Vec<u8>),
    /// Another `.wh..wh.*` marker (AUFS metadata): dropped.
    Skip,
}

/// Cleans a raw tar name into a layer path: leading `/` and `.` components dropped, `..`
/// resolved lexically; a `..` that would climb above the root is an error.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                parts.pop().ok_or(PathError::Escapes)?;
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

/// Splits a layer path into parent and final name (`b"a/b"` → `(b"a", b"b")`).
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// Joins a parent layer path and a name.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() { name.to_vec() } else { [parent, b"/", name].concat() }
}

/// The strict ancestors of a layer path, root (`b""`) first: `a/b/c` → `"", a, a/b`.
pub fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let ends = path.iter().enumerate().filter(|&(_, &b)| b == b'/').map(|(i, _)| i);
    std::iter::once(&path[..0]).chain(ends.map(move |i| &path[..i])).filter(move |a| a.len() < path.len())
}

/// Decides what a tar entry name means (see [`EntryAction`]).
pub fn classify(raw: &[u8]) -> Result<EntryAction, PathError> {
    let path = normalize(raw)?;
    let (parent, name) = split_parent(&path);
    if name == OPAQUE_MARKER {
        return Ok(EntryAction::Opaque(parent.to_vec()));
    }
    if name.starts_with(b".wh..wh.") {
        return Ok(EntryAction::Skip);
    }
    if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
        if target.is_empty() || target == b"." || target == b".." {
            return Err(PathError::EmptyWhiteout);
        }
        return Ok(EntryAction::Whiteout(join(parent, target)));
    }
    Ok(EntryAction::Write(path))
}

/// Printable form of a layer path for error messages (lossy for non-UTF-8 bytes).
pub fn display(path: &[u8]) -> String {
    if path.is_empty() { "/".to_string() } else { String::from_utf8_lossy(path).into_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EntryAction::*;

    #[test]
    fn classify_table() {
        let cases: &[(&[u8], Result<EntryAction, PathError>)] = &[
            (b"etc/passwd", Ok(Write(b"etc/passwd".to_vec()))),
            (b"./etc/passwd", Ok(Write(b"etc/passwd".to_vec()))),
            (b"/etc//passwd", Ok(Write(b"etc/passwd".to_vec()))),
            (b"etc/", Ok(Write(b"etc".to_vec()))),
            (b"./", Ok(Write(b"".to_vec()))),
            (b"/", Ok(Write(b"".to_vec()))),
            (b"a/./b/../c", Ok(Write(b"a/c".to_vec()))),
            (b"a/../../etc/shadow", Err(PathError::Escapes)),
            (b"../x", Err(PathError::Escapes)),
            (b"/../x", Err(PathError::Escapes)),
            (b"..", Err(PathError::Escapes)),
            (b"a/..", Ok(Write(b"".to_vec()))),
            (b"etc/.wh.passwd", Ok(Whiteout(b"etc/passwd".to_vec()))),
            (b".wh.etc", Ok(Whiteout(b"etc".to_vec()))),
            (b"./.wh.etc", Ok(Whiteout(b"etc".to_vec()))),
            (b"usr/share/.wh..wh..opq", Ok(Opaque(b"usr/share".to_vec()))),
            (b".wh..wh..opq", Ok(Opaque(b"".to_vec()))),
            (b"a/.wh..wh.plnk", Ok(Skip)),
            (b"a/.wh..wh.aufs", Ok(Skip)),
            (b"a/.wh.", Err(PathError::EmptyWhiteout)),
            (b"a/.wh..", Err(PathError::EmptyWhiteout)),
            (b"a/.wh...", Err(PathError::EmptyWhiteout)),
            (b"a/x.wh.y", Ok(Write(b"a/x.wh.y".to_vec()))),
            (b"\xff\xfe/\x80", Ok(Write(b"\xff\xfe/\x80".to_vec()))),
            (b"../.wh.x", Err(PathError::Escapes)),
        ];
        for (raw, expected) in cases {
            assert_eq!(&classify(raw), expected, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn split_join_ancestors() {
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(join(b"", b"c"), b"c");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
        let anc: Vec<&[u8]> = ancestors(b"a/b/c").collect();
        assert_eq!(anc, vec![&b""[..], &b"a"[..], &b"a/b"[..]]);
        assert_eq!(ancestors(b"a").collect::<Vec<_>>(), vec![&b""[..]]);
        assert!(ancestors(b"").next().is_none());
    }
}

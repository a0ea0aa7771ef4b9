//! POSIX ACLs in a layer's xattrs (`system.posix_acl_access` and `…_default`, the VFS format:
//! version 2, then entries of tag, permissions and id), kept as the kernel keeps them once the
//! layer is applied: the ACL set with setxattr, then the mode with chmod.

/// Entry tags, in the order the kernel requires them.
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
/// The id of an entry that names no one, as the kernel reports it.
const NO_ID: u32 = u32::MAX;

/// One ACL entry: tag, permissions (rwx bits), id.
type AclEntry = (u16, u16, u32);

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

/// Why the kernel would refuse an ACL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AclError {
    #[error("not a version 2 POSIX ACL of 8-byte entries")]
    Malformed,
    #[error("entry tag {0:#x} is not a POSIX ACL tag")]
    UnknownTag(u16),
    #[error("entries out of order or repeated (at tag {0:#x})")]
    Order(u16),
    #[error("permissions {0:#o} are more than rwx")]
    Perm(u16),
    #[error("no owner, owning group or other entry")]
    Incomplete,
    #[error("named user or group entries without a mask entry")]
    NoMask,
    #[error("a default ACL on a non-directory")]
    DefaultOnNonDir,
}

/// The entries of a valid ACL (the kernel's `posix_acl_valid`).
fn parse(value: &[u8]) -> Result<Vec<AclEntry>, AclError> {
    let (header, body) = value.split_at_checked(4).ok_or(AclError::Malformed)?;
    if header != 2u32.to_le_bytes() || body.len() % 8 != 0 {
        return Err(AclError::Malformed);
    }
    let mut entries = Vec::with_capacity(body.len() / 8);
    let mut last: Option<(u16, u32)> = None;
    for e in body.chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let named = tag == USER || tag == GROUP;
        let id = if named { u32::from_le_bytes([e[4], e[5], e[6], e[7]]) } else { NO_ID };
        if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&tag) {
            return Err(AclError::UnknownTag(tag));
        }
        if perm & !7 != 0 {
            return Err(AclError::Perm(perm));
        }
        let in_order = match last {
            None => true,
            Some((t, i)) => t < tag || (named && t == tag && i < id),
        };
        if !in_order {
            return Err(AclError::Order(tag));
        }
        last = Some((tag, id));
        entries.push((tag, perm, id));
    }
    let has = |t| entries.iter().any(|e| e.0 == t);
    if !(has(USER_OBJ) && has(GROUP_OBJ) && has(OTHER)) {
        return Err(AclError::Incomplete);
    }
    if (has(USER) || has(GROUP)) && !has(MASK) {
        return Err(AclError::NoMask);
    }
    Ok(entries)
}

fn encode(entries: &[AclEntry]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The access ACL a file of permission bits `mode` has after setxattr(`value`) and
/// chmod(`mode`): the owner and other entries, and the mask (or, without one, the owning
/// group entry) take their bits from the mode; a minimal ACL (the three entries the mode
/// already says) is no xattr at all (`None`). An ACL the kernel refuses is an error.
pub fn applied_access(value: &[u8], mode: u32) -> Result<Option<Vec<u8>>, AclError> {
    let mut entries = parse(value)?;
    if entries.len() == 3 {
        return Ok(None);
    }
    let bits = |shift: u32| ((mode >> shift) & 7) as u16;
    let has_mask = entries.iter().any(|e| e.0 == MASK);
    for (tag, perm, _) in &mut entries {
        match *tag {
            USER_OBJ => *perm = bits(6),
            MASK => *perm = bits(3),
            GROUP_OBJ if !has_mask => *perm = bits(3),
            OTHER => *perm = bits(0),
            _ => {}
        }
    }
    Ok(Some(encode(&entries)))
}

/// The default ACL a directory keeps after setxattr(`value`) (chmod leaves it alone); the
/// kernel refuses one on anything but a directory.
pub fn applied_default(value: &[u8], is_dir: bool) -> Result<Vec<u8>, AclError> {
    if !is_dir {
        return Err(AclError::DefaultOnNonDir);
    }
    Ok(encode(&parse(value)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_acls_as_applied() {
        let full = [
            (USER_OBJ, 6, NO_ID),
            (USER, 4, 1000),
            (GROUP_OBJ, 1, NO_ID),
            (MASK, 7, NO_ID),
            (OTHER, 0, NO_ID),
        ];
        let want = [
            (USER_OBJ, 7, NO_ID),
            (USER, 4, 1000),
            (GROUP_OBJ, 1, NO_ID),
            (MASK, 5, NO_ID),
            (OTHER, 5, NO_ID),
        ];
        assert_eq!(applied_access(&encode(&full), 0o4755), Ok(Some(encode(&want))));
        let minimal = [(USER_OBJ, 6, 7), (GROUP_OBJ, 4, 7), (OTHER, 4, 7)];
        assert_eq!(applied_access(&encode(&minimal), 0o644), Ok(None));
        let cases: [(&[AclEntry], AclError); 5] = [
            (
                &[(USER_OBJ, 6, NO_ID), (USER, 4, 1), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)],
                AclError::NoMask,
            ),
            (&[(USER_OBJ, 6, NO_ID), (OTHER, 4, NO_ID)], AclError::Incomplete),
            (&[(GROUP_OBJ, 6, NO_ID), (USER_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)], AclError::Order(USER_OBJ)),
            (&[(USER_OBJ, 8, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)], AclError::Perm(8)),
            (&[(USER_OBJ, 6, NO_ID), (0x40, 4, NO_ID)], AclError::UnknownTag(0x40)),
        ];
        for (entries, err) in cases {
            assert_eq!(applied_access(&encode(entries), 0o644), Err(err), "{entries:?}");
        }
        assert_eq!(applied_access(&[2, 0, 0], 0o644), Err(AclError::Malformed));
        assert_eq!(applied_default(&encode(&minimal), false), Err(AclError::DefaultOnNonDir));
    }
}

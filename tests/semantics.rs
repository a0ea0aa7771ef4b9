//! Layer semantics checked on a real stack: blobs made by mkfs, loop-mounted, stacked with
//! overlayfs. Whiteouts, opaque directories, same-layer recreation and implicit parents.

mod fixture;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use fixture::*;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `cap_net_raw+ep` as a VFS_CAP_REVISION_2 `security.capability` value.
const CAP_NET_RAW: [u8; 20] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn layers() -> Vec<Layer> {
    let base = Layer::gzip(&[
        Entry::Dir { path: b"./".to_vec(), mode: 0o751, uid: 0, mtime: 1_500_000_000 },
        dir("gone", 0o755),
        file("gone/x", "x"),
        file("file-gone", "x"),
        dir("opq", 0o755),
        file("opq/lower", "lower"),
        dir("recreated", 0o755),
        file("recreated/old", "old"),
        dir("recreated2", 0o755),
        file("recreated2/old", "old"),
        file("replaced", "old"),
        Entry::Dir { path: b"opt".to_vec(), mode: 0o750, uid: 1234, mtime: 1_234_567_890 },
        Entry::Dir { path: b"opt/deep".to_vec(), mode: 0o711, uid: 42, mtime: 1_111_111_111 },
        dir("keep", 0o755),
        file("keep/a", "a"),
    ]);
    let upper = Layer::gzip(&[
        // No "./" and no "opt", "opt/deep" entries: they must keep the lower metadata.
        file("gone/../.wh.gone", ""),
        file(".wh.file-gone", ""),
        file("opq/.wh..wh..opq", ""),
        file("opq/upper", "upper"),
        // Whiteout then recreate: the new directory hides the old contents.
        file(".wh.recreated", ""),
        dir("recreated", 0o700),
        file("recreated/new", "new"),
        // Recreate then whiteout (reverse order): same result.
        dir("recreated2", 0o700),
        file("recreated2/new", "new"),
        file(".wh.recreated2", ""),
        // Whiteout then a file of the same name: the file wins.
        file(".wh.replaced", ""),
        file("replaced", "new"),
        file("opt/deep/added", "added"),
        file("keep/.wh..wh.plnk", ""),
        Entry::PaxFile {
            path: b"pax".to_vec(),
            data: b"#!/bin/sh\n".to_vec(),
            pax: vec![
                ("mtime".into(), b"1700000000.123456789".to_vec()),
                ("uid".into(), b"3000000".to_vec()),
                ("gid".into(), b"3000001".to_vec()),
                ("SCHILY.xattr.user.bin".into(), b"\x00\xff\x01".to_vec()),
                ("SCHILY.xattr.security.capability".into(), CAP_NET_RAW.to_vec()),
                ("SCHILY.xattr.trusted.overlay.redirect".into(), b"/etc".to_vec()),
            ],
        },
    ]);
    vec![base, upper]
}

fn check(fs: &str) {
    let dir = scratch(&format!("semantics-{fs}"));
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &layers());
    let lowers = build_lowers(&dir.path().join("store"), &layout, fs);
    assert_eq!(lowers.len(), 2);
    let stack = MountedStack::mount(&lowers);
    let root = stack.root();

    let pax = std::fs::metadata(root.join("pax")).unwrap();
    assert_eq!(
        (pax.mtime(), pax.mtime_nsec(), pax.uid(), pax.gid(), pax.permissions().mode() & 0o7777),
        (1_700_000_000, 123_456_789, 3_000_000, 3_000_001, 0o4755),
        "PAX mtime with ns, large ids, setuid"
    );
    assert_eq!(xattr(&root.join("pax"), "user.bin").as_deref(), Some(&b"\x00\xff\x01"[..]));
    assert_eq!(xattr(&root.join("pax"), "security.capability").as_deref(), Some(&CAP_NET_RAW[..]));
    assert_eq!(
        xattr(&stack.lower(1).join("pax"), "trusted.overlay.redirect"),
        None,
        "reserved xattr dropped"
    );

    assert_eq!(
        names(root),
        ["keep", "opq", "opt", "pax", "recreated", "recreated2", "replaced"],
        "whited-out entries are gone, nothing else is, no lost+found"
    );
    assert_eq!(names(&root.join("opq")), ["upper"], "opaque dir hides lower children");
    assert_eq!(names(&root.join("recreated")), ["new"], "whiteout + recreate hides old contents");
    assert_eq!(names(&root.join("recreated2")), ["new"], "recreate + whiteout hides old contents");
    assert_eq!(std::fs::read_to_string(root.join("replaced")).unwrap(), "new");
    assert_eq!(names(&root.join("keep")), ["a"], "other .wh..wh. markers are dropped");
    assert_eq!(std::fs::metadata(root.join("recreated")).unwrap().permissions().mode() & 0o7777, 0o700);

    for (path, mode, uid, mtime) in
        [("opt", 0o750, 1234, 1_234_567_890), ("opt/deep", 0o711, 42, 1_111_111_111)]
    {
        let m = std::fs::metadata(root.join(path)).unwrap();
        assert_eq!(
            (m.permissions().mode() & 0o7777, m.uid(), m.mtime()),
            (mode, uid, mtime),
            "implicit parent {path} keeps the lower metadata"
        );
    }
    assert_eq!(names(&root.join("opt/deep")), ["added"]);
    let r = std::fs::metadata(root).unwrap();
    assert_eq!(
        (r.permissions().mode() & 0o7777, r.mtime()),
        (0o751, 1_500_000_000),
        "root keeps lower metadata"
    );
}

#[test]
fn semantics_erofs() {
    check("erofs");
}

#[test]
fn semantics_ext4() {
    check("ext4");
}

/// A POSIX ACL xattr value (VFS format, version 2) of `(tag, perm, id)` entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

/// A file (mode 0o4755) after a PAX header with `records`.
fn pax_file(path: &str, records: &[(&str, &[u8])]) -> Entry {
    Entry::PaxFile {
        path: path.as_bytes().to_vec(),
        data: b"x".to_vec(),
        pax: records.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
    }
}

/// Names of the xattrs of `path` (not following a symlink).
fn xattr_names(path: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(path, &mut buf).unwrap();
    buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// The metadata a layer's blob shows is what applying the layer (GNU tar, containerd) gives:
/// mtimes outside ext4's range clamp to its ends (as the kernel clamps them), the last of
/// two records for one xattr wins, a POSIX ACL takes its mask (or group entry), owner and
/// other permissions from the mode as chmod sets them and a minimal one is no xattr at all,
/// `user.*` xattrs are dropped where the kernel refuses them (symlinks), and a whiteout that
/// hides nothing (no directory below could hold its name) is dropped.
#[test]
fn metadata_is_what_applying_the_layer_gives() {
    let base = Layer::gzip(&[dir("d", 0o755), file("d/present", "x")]);
    let upper = Layer::gzip(&[
        pax_file("old", &[("mtime", b"-2500000000")]),
        pax_file("future", &[("mtime", b"20000000000.5")]),
        pax_file("dup", &[("SCHILY.xattr.user.k", b"first"), ("SCHILY.xattr.user.k", b"second")]),
        pax_file(
            "acl",
            &[(
                "SCHILY.xattr.system.posix_acl_access",
                &acl(&[
                    (USER_OBJ, 6, NO_ID),
                    (USER, 4, 1000),
                    (GROUP_OBJ, 1, NO_ID),
                    (MASK, 7, NO_ID),
                    (OTHER, 0, NO_ID),
                ]),
            )],
        ),
        pax_file(
            "acl-minimal",
            &[(
                "SCHILY.xattr.system.posix_acl_access",
                &acl(&[(USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)]),
            )],
        ),
        pax_symlink("sym", "old", &[("SCHILY.xattr.user.k", b"v"), ("SCHILY.xattr.trusted.k", b"t")]),
        file("d/.wh.absent-file", ""),
        dir("new", 0o755),
        file("new/.wh.ghost", ""),
        file("implicit/.wh.ghost", ""),
        file("implicit/kept", "k"),
    ]);
    for fs in ["erofs", "ext4"] {
        let dir = scratch(&format!("applied-{fs}"));
        let layout = dir.path().join("layout");
        oci_layout(&layout, "t", &[base.clone(), upper.clone()]);
        let lowers = build_lowers(&dir.path().join("store"), &layout, fs);
        let stack = MountedStack::mount(&lowers);
        let (root, layer) = (stack.root(), stack.lower(1));
        let mtime = |p: &str| std::fs::metadata(root.join(p)).unwrap().mtime();
        if fs == "ext4" {
            assert_eq!(mtime("old"), -(1i64 << 31), "ext4: clamped to 1901, not wrapped");
            assert_eq!(mtime("future"), (1i64 << 34) - (1i64 << 31) - 1, "ext4: clamped to 2446");
        } else {
            assert_eq!(
                (mtime("old"), mtime("future")),
                (-2_500_000_000, 20_000_000_000),
                "erofs keeps 64 bits"
            );
        }
        assert_eq!(xattr_names(&root.join("dup")), ["user.k"], "{fs}: one entry");
        assert_eq!(
            xattr(&root.join("dup"), "user.k").as_deref(),
            Some(&b"second"[..]),
            "{fs}: the last wins"
        );
        let mode = 0o4755u16;
        let want = acl(&[
            (USER_OBJ, (mode >> 6) & 7, NO_ID),
            (USER, 4, 1000),
            (GROUP_OBJ, 1, NO_ID),
            (MASK, (mode >> 3) & 7, NO_ID),
            (OTHER, mode & 7, NO_ID),
        ]);
        assert_eq!(
            xattr(&root.join("acl"), "system.posix_acl_access"),
            Some(want),
            "{fs}: mask from the mode"
        );
        assert_eq!(
            xattr(&root.join("acl-minimal"), "system.posix_acl_access"),
            None,
            "{fs}: minimal ACL is the mode"
        );
        assert_eq!(xattr_names(&root.join("sym")), ["trusted.k"], "{fs}: no user.* on a symlink");
        assert_eq!(names(&layer.join("d")), ["absent-file"], "{fs}: a whiteout where something may be below");
        assert!(names(&layer.join("new")).is_empty(), "{fs}: nothing below a new directory to hide");
        assert_eq!(names(&layer.join("implicit")), ["kept"], "{fs}: nor below an implicit new one");
        assert_eq!(names(&root.join("d")), ["present"], "{fs}");
    }
}

/// What applying the layer cannot give is refused, naming the entry: an ACL with a named
/// entry and no mask (the kernel refuses it; every `open()` by a non-owner would fail), and
/// uid or gid 4294967295 (`(uid_t)-1`, "no change" to chown).
#[test]
fn entries_applying_cannot_give_are_refused() {
    let no_mask = acl(&[(USER_OBJ, 6, NO_ID), (USER, 4, 1000), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)]);
    let cases: [(&str, Entry, &str); 3] = [
        ("nomask", pax_file("f", &[("SCHILY.xattr.system.posix_acl_access", &no_mask)]), "mask"),
        ("uid", pax_file("f", &[("uid", b"4294967295")]), "4294967295"),
        ("gid", pax_file("f", &[("gid", b"4294967295")]), "4294967295"),
    ];
    for (name, entry, says) in cases {
        let dir = scratch(&format!("refused-{name}"));
        let layout = dir.path().join("layout");
        oci_layout(&layout, "t", &[Layer::gzip(&[entry])]);
        let (ok, _, err) = run(vmrootfs(&dir.path().join("store")).args([
            "build",
            &format!("oci:{}:t", layout.display()),
            "--fs",
            "ext4",
        ]));
        assert!(!ok, "{name}: refused");
        assert!(err.contains("entry \"f\"") && err.contains(says), "{name}: {err}");
    }
}

/// A path that changes type within one layer takes the later entry, as applying the layer in
/// order does (GNU tar 1.34, containerd): a file over a directory takes what was below it
/// along, and a directory over a file is new (nothing of a lower directory there shows).
#[test]
fn a_later_entry_replaces_an_earlier_one_of_another_type() {
    let base = Layer::gzip(&[dir("g", 0o755), file("g/lower", "l"), dir("d", 0o755), file("d/lower", "l")]);
    let upper = Layer::gzip(&[
        file("d/c", "c"),
        dir("d/sub", 0o755),
        file("d/sub/x", "x"),
        file("d", "now a file"),
        file("f", "a file"),
        dir("f", 0o711),
        file("f/in", "in"),
        file("g", "a file"),
        dir("g", 0o700),
        file("g/new", "new"),
        // A directory, then a file, then a directory again, with a name below it again.
        dir("h", 0o755),
        file("h/a", "first"),
        dir("h/s", 0o755),
        file("h", "a file"),
        dir("h", 0o755),
        file("h/a", "second"),
    ]);
    for fs in ["erofs", "ext4"] {
        let dir = scratch(&format!("type-change-{fs}"));
        let layout = dir.path().join("layout");
        oci_layout(&layout, "t", &[base.clone(), upper.clone()]);
        let lowers = build_lowers(&dir.path().join("store"), &layout, fs);
        if fs == "ext4" {
            for (blob, _) in &lowers {
                let (ok, out, err) = run(std::process::Command::new("e2fsck").arg("-fn").arg(blob));
                assert!(ok, "e2fsck {}: {out}{err}", blob.display());
            }
        }
        let stack = MountedStack::mount(&lowers);
        let root = stack.root();
        assert_eq!(std::fs::read_to_string(root.join("d")).unwrap(), "now a file", "{fs}");
        assert_eq!(names(&root.join("f")), ["in"], "{fs}");
        assert_eq!(std::fs::metadata(root.join("f")).unwrap().permissions().mode() & 0o7777, 0o711, "{fs}");
        assert_eq!(names(&root.join("g")), ["new"], "{fs}: the lower directory's contents are gone");
        assert_eq!(names(&stack.lower(1).join("f")), ["in"], "{fs}");
        assert_eq!(names(&root.join("h")), ["a"], "{fs}");
        assert_eq!(std::fs::read_to_string(root.join("h/a")).unwrap(), "second", "{fs}");
    }
}

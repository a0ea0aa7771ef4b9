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

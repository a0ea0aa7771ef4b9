//! The library as a runtime embeds it: only the public surface (`vmrootfs::…`), on the bundled
//! busybox image, through build, the store's records and the removal of what was built.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use vmrootfs::store::StoreError;
use vmrootfs::{BuildOptions, Builder, FsType, Store, progress::Reporter};

fn bundled() -> String {
    format!("oci-archive:{}/testdata/busybox.oci.tar:busybox", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn a_build_through_the_library_is_listed_located_verified_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let builder = Builder::new(store.clone(), BuildOptions::default()).unwrap();

    let built = builder.build(&bundled(), Some("busybox"), &Reporter::new()).unwrap();
    assert!(!built.cached);
    let record = &built.record;
    assert_eq!(record.tag, "busybox");
    assert_eq!(record.lowers.len(), 2, "busybox.oci.tar has two layers");
    for lower in &record.lowers {
        assert_eq!(lower.fs, FsType::Erofs);
        assert!(lower.path.starts_with(store.root()), "{}", lower.path.display());
        assert_eq!(std::fs::metadata(&lower.path).unwrap().len(), lower.size);
    }
    assert_eq!(record.size, record.lowers.iter().map(|l| l.size).sum::<u64>());

    // What a runtime that did not build the image finds in the store.
    assert_eq!(store.locate(store.get("busybox").unwrap()).unwrap(), *record);
    let listed = store.list().unwrap();
    assert_eq!(listed.iter().map(|r| r.tag.as_str()).collect::<Vec<_>>(), ["busybox"]);
    assert!(store.verify(&[]).unwrap().is_empty());

    let again = builder.build(&bundled(), Some("busybox"), &Reporter::new()).unwrap();
    assert!(again.cached, "every layer is in the store already");
    assert_eq!(again.record.lowers, record.lowers);

    // A flipped byte in a blob is found, named by path and tag.
    let top = &record.lowers[1].path;
    flip_first_byte(top);
    let bad = store.verify(&["busybox".to_string()]).unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!((&bad[0].path, &bad[0].tags[..]), (top, &["busybox".to_string()][..]));

    let removed = store.remove(&["busybox".to_string()]).unwrap();
    assert_eq!(removed.layers, 2, "{removed:?}");
    assert!(record.lowers.iter().all(|l| !l.path.exists()));
    assert!(matches!(store.get("busybox"), Err(StoreError::NoSuchTag(t)) if t == "busybox"));
    assert!(store.list().unwrap().is_empty());
    assert_eq!(store.gc().unwrap().layers, 0, "nothing left to collect");
}

/// Blobs are published read-only (0444): the owner makes one writable to damage it.
fn flip_first_byte(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

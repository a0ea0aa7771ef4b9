//! Layers are untrusted: every hostile case fails with a one-line error naming the layer and
//! the entry, writes nothing outside the store, and leaves no image record behind.

mod fixture;

use std::path::Path;

use fixture::*;

/// Builds a one-tag layout of `layers` and expects the build to fail. Returns stderr.
fn build_fails(name: &str, layers: Vec<Layer>, fs: &str) -> String {
    build_fails_edited(name, layers, fs, |_| {})
}

/// [`build_fails`] of a layout that `edit` changes after it is written.
fn build_fails_edited(name: &str, layers: Vec<Layer>, fs: &str, edit: impl FnOnce(&Path)) -> String {
    let dir = scratch(name);
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &layers);
    edit(&layout);
    let store = dir.path().join("store");
    let (ok, stdout, stderr) =
        run(vmrootfs(&store).args(["build", &format!("oci:{}:t", layout.display()), "--fs", fs, "--json"]));
    assert!(!ok, "build of {name} should fail; stdout: {stdout}");
    assert!(stdout.is_empty(), "nothing on stdout on failure: {stdout}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line: {stderr}");
    assert_no_record(&store);
    assert_tmp_empty(&store);
    eprintln!("{name}: {}", error_lines[0]);
    error_lines[0].to_string()
}

fn assert_no_record(store: &Path) {
    let images: Vec<_> = std::fs::read_dir(store.join("images")).map(|d| d.collect()).unwrap_or_default();
    assert!(images.is_empty(), "no image record after a failed build: {images:?}");
}

fn assert_tmp_empty(store: &Path) {
    let tmp: Vec<_> = std::fs::read_dir(store.join("tmp")).map(|d| d.collect()).unwrap_or_default();
    assert!(tmp.is_empty(), "staging cleaned up after a failed build: {tmp:?}");
}

#[test]
fn path_escaping_the_root_is_refused() {
    let layer = Layer::gzip(&[dir("a", 0o755), file("a/../../escaped-by-vmrootfs-test", "x")]);
    let digest = layer.digest.clone();
    let err = build_fails("escape", vec![layer], "erofs");
    assert!(err.contains(&digest), "names the layer digest: {err}");
    assert!(
        err.contains("a/../../escaped-by-vmrootfs-test") && err.contains("escapes"),
        "names the entry: {err}"
    );
    assert!(!Path::new(env!("CARGO_TARGET_TMPDIR")).join("escaped-by-vmrootfs-test").exists());
}

#[test]
fn writing_through_a_symlink_is_refused() {
    let outside = scratch("outside");
    let target = outside.path().to_str().unwrap().to_string();
    let layer = Layer::gzip(&[symlink("link", &target), file("link/planted", "x")]);
    let err = build_fails("symlink-parent", vec![layer], "erofs");
    assert!(err.contains("link/planted") && err.contains("not a directory"), "{err}");
    assert!(!outside.path().join("planted").exists(), "nothing written through the symlink");
}

/// A directory entry over a symlink of the same layer: the directory replaces the link, as
/// applying the layer in order does (GNU tar and containerd remove the link) — and nothing
/// touches the link's target.
#[test]
fn symlink_then_directory_entry_replaces_the_link_and_follows_nothing() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let outside = scratch("outside-dir");
    let target = outside.path().to_str().unwrap().to_string();
    std::fs::set_permissions(outside.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let dir_entry = Entry::Dir { path: b"link".to_vec(), mode: 0o777, uid: 1234, mtime: 1 };
    let layer = Layer::gzip(&[symlink("link", &target), dir_entry, file("link/inside", "x")]);
    for fs in ["erofs", "ext4"] {
        let dir = scratch(&format!("symlink-dir-{fs}"));
        let layout = dir.path().join("layout");
        oci_layout(&layout, "t", std::slice::from_ref(&layer));
        let lowers = build_lowers(&dir.path().join("store"), &layout, fs);
        let stack = MountedStack::mount(&lowers);
        let link = std::fs::symlink_metadata(stack.root().join("link")).unwrap();
        assert!(link.is_dir() && link.uid() == 1234, "{fs}: the directory, not the link");
        assert_eq!(std::fs::read_to_string(stack.root().join("link/inside")).unwrap(), "x", "{fs}");
    }
    let meta = std::fs::metadata(outside.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "link target untouched");
    assert_ne!(meta.uid(), 1234);
    assert!(!outside.path().join("inside").exists());
}

#[test]
fn hardlink_to_a_file_not_in_the_layer_is_refused() {
    let layer = Layer::gzip(&[hardlink("stolen", "etc/shadow")]);
    let err = build_fails("hardlink-missing", vec![layer], "erofs");
    assert!(err.contains("stolen") && err.contains("etc/shadow") && err.contains("hardlink"), "{err}");
}

#[test]
fn hardlink_escaping_the_root_is_refused() {
    let layer = Layer::gzip(&[hardlink("stolen", "../../../etc/passwd")]);
    let err = build_fails("hardlink-escape", vec![layer], "erofs");
    assert!(err.contains("stolen") && err.contains("escapes"), "{err}");
}

#[test]
fn hardlink_to_a_later_entry_is_refused() {
    let layer = Layer::gzip(&[hardlink("early", "late"), file("late", "x")]);
    let err = build_fails("hardlink-later", vec![layer], "erofs");
    assert!(err.contains("early") && err.contains("late"), "{err}");
}

#[test]
fn blob_digest_mismatch_names_both_digests() {
    let mut layer = Layer::gzip(&[file("f", "x")]);
    let good = layer.digest.clone();
    // The layout stores the blob under the digest the manifest promises; swap its bytes.
    layer.blob = gzip(&layer_tar(&[file("f", "y")]));
    let found = sha256(&layer.blob);
    let err = build_fails("digest", vec![layer], "erofs");
    assert!(err.contains(&good) && err.contains(&found), "expected and found digests: {err}");
}

#[test]
fn diff_id_mismatch_names_both_digests() {
    let mut layer = Layer::gzip(&[file("f", "x")]);
    let found = layer.diff_id.clone();
    layer.diff_id = sha256(b"something else");
    let expected = layer.diff_id.clone();
    let err = build_fails("diff-id", vec![layer], "ext4");
    assert!(err.contains(&expected) && err.contains(&found) && err.contains("diff_id"), "{err}");
}

#[test]
fn truncated_gzip_is_an_error() {
    let mut layer = Layer::gzip(&[file("f", &"data ".repeat(10_000))]);
    layer.blob.truncate(layer.blob.len() / 2);
    layer.digest = sha256(&layer.blob);
    let digest = layer.digest.clone();
    let err = build_fails("truncated", vec![layer], "erofs");
    assert!(err.contains(&digest) && err.contains("corrupt or truncated"), "{err}");
}

#[test]
fn corrupt_gzip_is_an_error() {
    let mut layer = Layer::gzip(&[file("f", &"data ".repeat(10_000))]);
    let mid = layer.blob.len() / 2;
    for b in &mut layer.blob[mid..mid + 16] {
        *b ^= 0x5a;
    }
    layer.digest = sha256(&layer.blob);
    let err = build_fails("corrupt", vec![layer], "erofs");
    assert!(err.contains("corrupt or truncated"), "{err}");
}

#[test]
fn truncated_tar_is_an_error() {
    let tar = layer_tar(&[file("f", &"data ".repeat(10_000))]);
    let cut = &tar[..3000];
    let blob = gzip(cut);
    let layer = Layer {
        digest: sha256(&blob),
        diff_id: sha256(cut),
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    let err = build_fails("truncated-tar", vec![layer], "erofs");
    assert!(err.contains("corrupt or truncated"), "{err}");
}

#[test]
fn unknown_media_type_is_refused() {
    let mut layer = Layer::gzip(&[file("f", "x")]);
    layer.media_type = "application/vnd.example.weird+gzip".into();
    let err = build_fails("media-type", vec![layer], "erofs");
    assert!(err.contains("application/vnd.example.weird+gzip"), "{err}");
}

#[test]
fn failure_in_an_upper_layer_leaves_no_record_and_no_staging() {
    let good = Layer::gzip(&[dir("etc", 0o755), file("etc/os-release", "x")]);
    let bad = Layer::gzip(&[file("../x", "y")]);
    let bad_digest = bad.digest.clone();
    let err = build_fails("upper-fails", vec![good, bad], "ext4");
    assert!(err.contains(&bad_digest), "names the failing layer: {err}");
}

#[test]
fn decompression_bomb_stops_at_the_limit() {
    // 32 MiB of zeros compresses to about 32 KiB.
    let zeros = "\0".repeat(32 << 20);
    let layer = Layer::gzip(&[file("bomb", &zeros)]);
    assert!(layer.blob.len() < 1 << 20);
    let digest = layer.digest.clone();
    let dir = scratch("bomb");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[layer]);
    let store = dir.path().join("store");
    let (ok, _, stderr) = run(vmrootfs(&store).args([
        "build",
        &format!("oci:{}:t", layout.display()),
        "--max-layer-size",
        "8M",
    ]));
    assert!(!ok);
    assert!(stderr.contains(&digest) && stderr.contains("more than 8388608 bytes"), "{stderr}");
    assert_no_record(&store);
    assert_tmp_empty(&store);
}

/// The descriptor's size bounds what is read: a longer blob stops at size + 1 bytes, a shorter
/// one is refused too, both naming the layer, the size promised and the size found.
#[test]
fn a_blob_of_another_size_than_its_descriptor_is_refused() {
    let layers = || vec![Layer::gzip(&[file("f", &"data ".repeat(10_000))])];
    let (digest, len) = (layers()[0].digest.clone(), layers()[0].blob.len() as u64);
    let err = build_fails_edited("blob-longer", layers(), "erofs", |l| set_layer_size(l, 0, len - 10));
    assert!(err.contains(&digest) && err.contains(&format!("longer than the {} bytes", len - 10)), "{err}");
    let err = build_fails_edited("blob-shorter", layers(), "erofs", |l| set_layer_size(l, 0, len + 10));
    assert!(err.contains(&digest) && err.contains(&format!("{len} bytes, not the {}", len + 10)), "{err}");
}

#[test]
fn ids_of_2_pow_32_and_more_are_refused() {
    // GNU base-256 numbers in the header (the tar crate writes them for ids >= 2^21).
    let entry = Entry::Dir { path: b"d".to_vec(), mode: 0o755, uid: 1 << 32, mtime: 1 };
    let err = build_fails("uid-2^32", vec![Layer::gzip(&[entry])], "erofs");
    assert!(err.contains("\"d\"") && err.contains("uid 4294967296"), "{err}");
}

//! Sparse members: a layer of a few KB can describe a file of many GB. Its logical size counts
//! against `--max-layer-size`, checked at the member's header, so an oversized one fails at
//! once — nothing written, nothing read beyond the header — and one within the bound converts
//! with equal contents (holes kept where the filesystem keeps them: ext4).

mod fixture;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::*;

/// A GNU tar layer (`--sparse`, GNU format) holding `name`: `logical` bytes, all holes but a
/// marker at the start and the end.
fn sparse_layer(dir: &Path, name: &str, logical: u64) -> Layer {
    sparse_layer_as(dir, name, logical, &["--format=gnu"])
}

/// The same, written by GNU tar with `format` options (e.g. PAX sparse versions).
fn sparse_layer_as(dir: &Path, name: &str, logical: u64, format: &[&str]) -> Layer {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = std::fs::File::create(src.join(name)).unwrap();
    f.set_len(logical).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", logical - 4).unwrap();
    let tar = dir.join("layer.tar");
    let ok = Command::new("tar")
        .arg("--sparse")
        .args(format)
        .args(["--owner=0", "--group=0", "--mtime=@1700000000", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(name)
        .status()
        .unwrap()
        .success();
    assert!(ok, "GNU tar failed");
    let bytes = std::fs::read(&tar).unwrap();
    assert!(bytes.len() < 64 << 10, "the layer tar is small: {} bytes", bytes.len());
    Layer::from_tar(&bytes)
}

/// `path` reads as `sparse_layer` made it: `logical` bytes, `head` and `tail` markers, zeros
/// between.
fn assert_marked_holes(path: &Path, logical: u64, what: &str) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len() as u64, logical, "{what}");
    assert_eq!(&data[..4], b"head", "{what}");
    assert_eq!(&data[data.len() - 4..], b"tail", "{what}");
    assert!(data[4..data.len() - 4].iter().all(|&b| b == 0), "{what}: holes read as zeros");
}

/// Bytes allocated on disk under `path` (what `du` counts).
fn du_bytes(path: &Path) -> u64 {
    let m = std::fs::symlink_metadata(path).unwrap();
    if m.is_dir() {
        std::fs::read_dir(path).unwrap().map(|e| du_bytes(&e.unwrap().path())).sum::<u64>() + m.blocks() * 512
    } else {
        m.blocks() * 512
    }
}

#[test]
fn a_multi_gb_sparse_file_over_the_bound_fails_fast_naming_it() {
    let dir = scratch("sparse-bound");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[sparse_layer(dir.path(), "huge", 6 << 30)]);
    for fs in ["erofs", "ext4"] {
        let store = dir.path().join(format!("store-{fs}"));
        let (ok, out, err) = run(vmrootfs(&store).args([
            "build",
            &format!("oci:{}:t", layout.display()),
            "--fs",
            fs,
            "--max-layer-size",
            "4G",
        ]));
        assert!(!ok, "{fs}: a 6 GiB file under a 4 GiB bound must fail");
        assert!(out.is_empty());
        assert!(
            err.contains("more than 4294967296 bytes") && err.contains("--max-layer-size"),
            "{fs}: {err}"
        );
        assert!(
            err.contains("entry \"huge\"") || err.contains("layer sha256:"),
            "{fs}: names the layer: {err}"
        );
        let tmp: Vec<_> = std::fs::read_dir(store.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "{fs}: tmp/ is left empty");
        let used = du_bytes(&store);
        assert!(used < 1 << 20, "{fs}: nothing beyond the bound was written (store holds {used} bytes)");
    }
}

#[test]
fn a_sparse_file_within_the_bound_converts_with_equal_contents() {
    let dir = scratch("sparse-ok");
    let layout = dir.path().join("layout");
    let logical: u64 = 96 << 20;
    oci_layout(&layout, "t", &[sparse_layer(dir.path(), "holey", logical)]);
    for fs in ["erofs", "ext4"] {
        let lowers = build_lowers(&dir.path().join(format!("store-{fs}")), &layout, fs);
        let stack = MountedStack::mount(&lowers);
        let path = stack.root().join("holey");
        assert_marked_holes(&path, logical, fs);
        if fs == "ext4" {
            let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(allocated <= 64 << 10, "ext4 keeps the holes: {allocated} bytes allocated");
            let blob = std::fs::metadata(&lowers[0].0).unwrap().len();
            assert!(blob < logical / 4, "ext4 blob is small: {blob} bytes");
        }
    }
}

/// Within the bound, ext4 and vmrootfs's EROFS keep a multi-GB file's holes all the way: the
/// writers skip zero blocks (ext4) or zero chunks (EROFS: null chunks of a chunk-based file)
/// as they stream by, so neither the blob nor the store's disk use grows with the file's size.
#[test]
fn a_multi_gb_sparse_file_within_the_bound_stays_sparse() {
    let dir = scratch("sparse-big");
    let layout = dir.path().join("layout");
    let logical: u64 = 6 << 30;
    oci_layout(&layout, "t", &[sparse_layer(dir.path(), "huge", logical)]);
    for fs in ["ext4", "erofs"] {
        let store = dir.path().join(format!("store-{fs}"));
        // Not `build_lowers`: mkfs.erofs, its reference writer for EROFS, writes holes as zeros.
        let (ok, out, err) = run(vmrootfs(&store).args([
            "build",
            &format!("oci:{}:t", layout.display()),
            "--fs",
            fs,
            "--json",
        ]));
        assert!(ok, "{fs}: {err}");
        let lowers = lowers_of(&serde_json::from_str(&out).unwrap());
        let used = du_bytes(&store);
        assert!(used < 8 << 20, "{fs}: the store holds {used} bytes for a 6 GiB sparse file");
        let blob = std::fs::metadata(&lowers[0].0).unwrap().len();
        assert!(blob < 4 << 20, "{fs}: a blob of {blob} bytes for a 6 GiB sparse file");
        let stack = MountedStack::mount(&lowers);
        let path = stack.root().join("huge");
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), logical, "{fs}");
        if fs == "ext4" {
            assert!(m.blocks() * 512 <= 64 << 10, "holes kept: {} bytes allocated", m.blocks() * 512);
        }
        let f = std::fs::File::open(&path).unwrap();
        // The markers, and zeros around them, at the chunk edges and in the middle.
        for (at, want) in [(0, &b"head"[..]), (logical - 4, b"tail")] {
            let mut got = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, at).unwrap();
            assert_eq!(&got, want, "{fs} at {at}");
        }
        for at in [4, 4096, 1 << 20, (1 << 20) - 8, logical / 2, logical - (1 << 20), logical - 4096] {
            let mut got = [0xffu8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, at).unwrap();
            assert_eq!(got, [0; 4], "{fs}: a hole reads as zeros at {at}");
        }
    }
}

/// PAX sparse members (`tar --sparse --format=posix`, formats 0.0, 0.1 and 1.0) convert to the
/// file they stand for: its real name and size, equal contents, in both filesystems.
#[test]
fn pax_sparse_members_of_every_version_convert() {
    let logical: u64 = 24 << 20;
    for version in ["0.0", "0.1", "1.0"] {
        let dir = scratch(&format!("pax-sparse-{version}"));
        let layout = dir.path().join("layout");
        let args = ["--format=posix", &format!("--sparse-version={version}")];
        oci_layout(&layout, "t", &[sparse_layer_as(dir.path(), "holey", logical, &args)]);
        for fs in ["erofs", "ext4"] {
            let lowers = build_lowers(&dir.path().join(format!("store-{fs}")), &layout, fs);
            let stack = MountedStack::mount(&lowers);
            let names: Vec<String> = std::fs::read_dir(stack.root())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, ["holey"], "{version} {fs}: the real name, no GNUSparseFile.N");
            assert_marked_holes(&stack.root().join("holey"), logical, &format!("{version} {fs}"));
        }
    }
}

/// A tmpfs mounted for the test's lifetime (a small store filesystem); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let (ok, _, err) =
            run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at));
        assert!(ok, "mount tmpfs: {err}");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// mkfs.erofs writes a sparse file's holes as zeros, so an EROFS layer it makes with a sparse
/// file larger than the store's free space is refused before anything is written, naming the
/// file, its size and the bound — instead of writing until the store's filesystem is full.
/// vmrootfs's own EROFS writer keeps the holes: the same layer fits.
#[test]
fn an_erofs_sparse_file_larger_than_the_stores_free_space_is_refused_before_writing() {
    let dir = scratch("sparse-store-full");
    let layout = dir.path().join("layout");
    let logical: u64 = 1 << 30;
    oci_layout(&layout, "t", &[sparse_layer(dir.path(), "huge", logical)]);
    let small = Tmpfs::mount(&dir.path().join("small"), "64m");
    let store = small.0.join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, _, err) = run(vmrootfs(&store).args(["build", &spec, "--fs", "erofs"]));
    assert!(ok, "vmrootfs's EROFS writer keeps the holes, so the layer fits: {err}");
    let (ok, out, err) =
        run(vmrootfs(&store).env(EROFS_WRITER_ENV, "mkfs").args(["build", &spec, "--fs", "erofs"]));
    assert!(!ok, "a 1 GiB sparse file cannot fit in a 64 MiB store as EROFS");
    assert!(out.is_empty());
    assert!(
        err.contains("\"huge\"") && err.contains(&logical.to_string()),
        "names the file and its size: {err}"
    );
    assert!(err.contains("free in the store"), "names the bound: {err}");
    let stat = rustix::fs::statvfs(&store).unwrap();
    let free = stat.f_bavail * stat.f_frsize;
    assert!(free > 60 << 20, "the store's filesystem was not filled: {free} bytes free");
    let tmp: Vec<_> = std::fs::read_dir(store.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "tmp/ is left empty");
    // ext4 keeps the holes: the same layer fits.
    let lowers = build_lowers(&store, &layout, "ext4");
    assert_eq!(lowers.len(), 1);
}

/// `build --merge` over vmrootfs's EROFS blobs keeps a sparse file's holes: the merged image
/// maps them as null chunks (neither blob holds the file's gigabyte), and the file reads back
/// right through it, markers and zeros.
#[test]
fn a_sparse_file_reads_back_through_a_merged_image() {
    let dir = scratch("sparse-merged");
    let layout = dir.path().join("layout");
    let logical: u64 = 1 << 30;
    let above = Layer::gzip(&[file("above", "a layer over the sparse one")]);
    oci_layout(&layout, "t", &[sparse_layer(dir.path(), "holey", logical), above]);
    let store = dir.path().join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, out, err) = run(vmrootfs(&store).args(["build", &spec, "--merge", "--json"]));
    assert!(ok, "{err}");
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    let merged = PathBuf::from(result["merged"]["path"].as_str().unwrap());
    let layers: Vec<PathBuf> = lowers_of(&result).into_iter().map(|(p, _)| p).collect();
    for blob in layers.iter().chain([&merged]) {
        let bytes = std::fs::metadata(blob).unwrap().len();
        assert!(bytes < 1 << 20, "{}: {bytes} bytes for a 1 GiB sparse file", blob.display());
    }
    let mounted = MountedErofs::mount(&merged, &layers);
    let path = mounted.root().join("holey");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), logical);
    let f = std::fs::File::open(&path).unwrap();
    for (at, want) in [(0, &b"head"[..]), (logical - 4, b"tail"), (4, &[0; 4]), (logical / 2, &[0; 4])] {
        let mut got = [0xffu8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, at).unwrap();
        assert_eq!(&got, want, "at {at}");
    }
    for at in [4096, 1 << 20, (1 << 20) - 8, logical - (1 << 20), logical - 4096] {
        let mut got = [0xffu8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, at).unwrap();
        assert_eq!(got, [0; 4], "a hole reads as zeros at {at}");
    }
    assert_eq!(std::fs::read_to_string(mounted.root().join("above")).unwrap(), "a layer over the sparse one");
}

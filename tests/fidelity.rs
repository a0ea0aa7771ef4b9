//! Fidelity on a real image made by independent tools (debootstrap, apt, umoci, skopeo,
//! Python's tarfile; see testdata/make-test-image.sh): every blob stack, loop-mounted and
//! stacked with overlayfs, equals `umoci unpack` of the same image — every path, type, mode,
//! owner, size, content hash, link target, device number, xattr, mtime and hardlink — for
//! both filesystems and every source form. And the blobs are byte-identical across stores.

mod fixture;

use std::path::{Path, PathBuf};

use fixture::treediff::diff_trees;
use fixture::*;

fn source(form: &str) -> String {
    let img = image().display();
    match form {
        "oci" => format!("oci:{img}/oci:test"),
        "oci-archive" => format!("oci-archive:{img}/image.oci.tar:test"),
        "docker-archive" => format!("docker-archive:{img}/image.docker.tar"),
        "oci-zstd" => format!("oci:{img}/oci-zstd:test"),
        _ => unreachable!(),
    }
}

/// Builds `spec` into `store`; returns the result JSON.
fn build(store: &Path, spec: &str, fs: &str) -> serde_json::Value {
    build_with(store, spec, fs, &[])
}

fn build_with(store: &Path, spec: &str, fs: &str, extra: &[&str]) -> serde_json::Value {
    let (ok, out, err) =
        run(vmrootfs(store).args(["build", spec, "--tag", "t", "--fs", fs, "--json"]).args(extra));
    assert!(ok, "build {spec} --fs {fs} failed: {err}");
    serde_json::from_str(&out).expect("build --json prints JSON")
}

fn lowers(result: &serde_json::Value) -> Vec<(PathBuf, String)> {
    lowers_of(result)
}

/// Every blob stack of `form` with `fs` equals umoci's tree; for EROFS, both the blobs
/// vmrootfs writes and those of mkfs.erofs (the reference writer).
fn check(form: &str, fs: &str) {
    let spec = source(form);
    let dir = scratch(&format!("fidelity-{form}-{fs}"));
    let writers: &[&str] = if fs == "erofs" { &["vmrootfs", "mkfs"] } else { &["vmrootfs"] };
    for writer in writers {
        let store = dir.path().join(format!("store-{writer}"));
        let (ok, out, err) = run(vmrootfs(&store)
            .env(EROFS_WRITER_ENV, writer)
            .args(["build", &spec, "--tag", "t", "--fs", fs, "--json"]));
        assert!(ok, "build {spec} --fs {fs} ({writer}) failed: {err}");
        let lowers = lowers(&serde_json::from_str(&out).expect("build --json prints JSON"));
        assert_eq!(lowers.len(), 4, "four layers, four blobs");
        let stack = MountedStack::mount(&lowers);
        let diffs = diff_trees(&image().join("reference/rootfs"), stack.root());
        assert!(
            diffs.is_empty(),
            "{} differences between umoci unpack and the {fs} stack ({writer}) from {form}:\n{}",
            diffs.len(),
            diffs.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

#[test]
fn oci_erofs() {
    check("oci", "erofs");
}
#[test]
fn oci_ext4() {
    check("oci", "ext4");
}
#[test]
fn oci_archive_erofs() {
    check("oci-archive", "erofs");
}
#[test]
fn oci_archive_ext4() {
    check("oci-archive", "ext4");
}
#[test]
fn docker_archive_erofs() {
    check("docker-archive", "erofs");
}
#[test]
fn docker_archive_ext4() {
    check("docker-archive", "ext4");
}
#[test]
fn oci_zstd_erofs() {
    check("oci-zstd", "erofs");
}
#[test]
fn oci_zstd_ext4() {
    check("oci-zstd", "ext4");
}

fn blob_hashes(result: &serde_json::Value) -> Vec<String> {
    lowers(result).iter().map(|(p, _)| sha256_file_hex(p).unwrap()).collect()
}

/// The same image built into two empty stores, one on disk and one on tmpfs, gives
/// byte-identical blobs (hashed from the files, not taken from the records).
#[test]
fn blobs_are_byte_identical_across_stores() {
    let spec = source("oci");
    let on_disk = scratch("repro-disk");
    let on_tmpfs = tempfile::Builder::new().prefix("vmrootfs-repro-").tempdir_in("/dev/shm").unwrap();
    for fs in ["erofs", "ext4"] {
        let a = blob_hashes(&build(&on_disk.path().join("store"), &spec, fs));
        let b = blob_hashes(&build(&on_tmpfs.path().join("store"), &spec, fs));
        assert_eq!(a.len(), 4);
        assert_eq!(a, b, "{fs} blobs differ between a store on disk and one on tmpfs");
    }
}

/// vmrootfs's EROFS blobs are a function of the layer stack and the recipe alone: the blobs of
/// the bundled busybox image (testdata/busybox.oci.tar) are these bytes on every host, whatever
/// its page size or erofs-utils. A change of these digests is a change of the recipe
/// (`EROFS_RECIPE`, src/backend/mod.rs).
#[test]
fn bundled_busybox_erofs_blobs_are_the_same_bytes_on_every_host() {
    let dir = scratch("busybox-pinned");
    let spec = format!("oci-archive:{}/testdata/busybox.oci.tar", env!("CARGO_MANIFEST_DIR"));
    let result = build(&dir.path().join("store"), &spec, "erofs");
    let pinned = [
        "0ad35181fc6e7dc1ba922e8fe51e82d38a1f34bccce8802277074aa26dd89789",
        "6a8f57e10a49441e9ff949425ca4e5c8b73b26ba16abbb7bcc5e48b1ef18f72e",
    ];
    assert_eq!(blob_hashes(&result), pinned, "hashed from the files");
    let recorded: Vec<&str> =
        result["lowers"].as_array().unwrap().iter().map(|l| l["blob_sha256"].as_str().unwrap()).collect();
    assert_eq!(recorded, pinned, "as the record has them");
    let stack = MountedStack::mount(&lowers(&result));
    assert!(stack.root().join("bin/busybox").is_file(), "and they mount (after fsck.erofs)");
}

/// An ordinary user in a container-like environment — uid 65534, no capabilities, a 64 MiB
/// `/dev/shm` — builds the same blobs as root does, and they pass the fidelity comparison.
#[test]
fn unprivileged_builds_with_a_small_shm_give_the_root_builds_blobs() {
    let dir = scratch("unprivileged");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let layout = dir.path().join("oci");
    let copied = std::process::Command::new("cp").arg("-r").arg(image().join("oci")).arg(&layout).status();
    assert!(copied.unwrap().success());
    assert!(
        std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&layout).status().unwrap().success()
    );
    let spec = format!("oci:{}:test", layout.display());
    for fs in ["erofs", "ext4"] {
        let root_result = build(&dir.path().join(format!("root-{fs}")), &spec, fs);
        let store = dir.path().join(format!("nobody-{fs}"));
        std::fs::create_dir(&store).unwrap();
        std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
        let script = format!(
            "mount -t tmpfs -o size=64m tmpfs /dev/shm && exec setpriv --reuid=65534 --regid=65534 \
             --clear-groups --inh-caps=-all {} --store {} build {spec} --tag t --fs {fs} --json",
            env!("CARGO_BIN_EXE_vmrootfs"),
            store.display()
        );
        let (ok, out, err) = run(std::process::Command::new("unshare").args(["-m", "sh", "-c", &script]));
        assert!(ok, "unprivileged {fs} build failed: {err}");
        let result: serde_json::Value = serde_json::from_str(&out).unwrap();
        for (path, _) in lowers(&result) {
            assert_eq!(
                std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap(),
                65534
            );
        }
        assert_eq!(
            blob_hashes(&result),
            blob_hashes(&root_result),
            "{fs}: unprivileged blobs differ from root's"
        );
        let stack = MountedStack::mount(&lowers(&result));
        let diffs = diff_trees(&image().join("reference/rootfs"), stack.root());
        assert!(diffs.is_empty(), "unprivileged {fs} stack differs from umoci unpack:\n{}", diffs.join("\n"));
        drop(stack);
        // The store commands need no root either (verify runs fsck.erofs / e2fsck).
        let as_nobody = |args: &[&str]| {
            let mut cmd = std::process::Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
                .arg(env!("CARGO_BIN_EXE_vmrootfs"))
                .arg("--store")
                .arg(&store)
                .args(args);
            let (ok, out, err) = run(&mut cmd);
            assert!(ok, "unprivileged `{}` failed ({fs}): {err}", args.join(" "));
            out
        };
        as_nobody(&["verify"]);
        assert!(as_nobody(&["ls", "--json"]).contains("\"t\""));
        assert!(as_nobody(&["inspect", "t", "--json"]).contains("chain_id"));
        as_nobody(&["rm", "t"]);
        as_nobody(&["gc"]);
        for (path, _) in lowers(&result) {
            assert!(!path.exists(), "{fs}: rm + gc as nobody removed {}", path.display());
        }
    }
}

/// `build --squash`: one blob of the whole image, whiteouts applied, equal to the reference.
fn check_squashed(fs: &str) {
    let dir = scratch(&format!("squash-{fs}"));
    let result = build_with(&dir.path().join("store"), &source("oci"), fs, &["--squash"]);
    let squashed = &result["squashed"];
    assert_eq!(squashed["chain_id"], result["lowers"][3]["chain_id"], "keyed by the top chain ID");
    let blob = PathBuf::from(squashed["path"].as_str().unwrap());
    assert_eq!(sha256_file_hex(&blob).unwrap(), squashed["blob_sha256"].as_str().unwrap());
    let stack = MountedStack::mount(&[(blob, fs.to_string())]);
    let diffs = diff_trees(&image().join("reference/rootfs"), stack.root());
    assert!(diffs.is_empty(), "squashed {fs} differs from umoci unpack:\n{}", diffs.join("\n"));
}

#[test]
fn squashed_erofs() {
    check_squashed("erofs");
}
#[test]
fn squashed_ext4() {
    check_squashed("ext4");
}

/// `build --merge`: the merged metadata blob over the layer blobs equals the reference when
/// mounted with one device per layer and as each single disk (raw through a loop device, and
/// the VMDK, which QEMU reads as the same bytes as the raw disk); the same stack gives the same
/// blob in another store.
#[test]
fn merged_erofs() {
    let dir = scratch("merged");
    let result = build_with(&dir.path().join("store"), &source("oci"), "erofs", &["--merge"]);
    let merged = &result["merged"];
    assert_eq!(merged["chain_id"], result["lowers"][3]["chain_id"], "keyed by the top chain ID");
    let blob = PathBuf::from(merged["path"].as_str().unwrap());
    assert_eq!(sha256_file_hex(&blob).unwrap(), merged["blob_sha256"].as_str().unwrap());
    let layers: Vec<PathBuf> = lowers(&result).into_iter().map(|(p, _)| p).collect();
    let reference = image().join("reference/rootfs");
    let data: u64 = layers.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let meta = std::fs::metadata(&blob).unwrap().len();
    assert!(meta * 50 < data, "metadata only: {meta} bytes over {data} bytes of layers");

    fsck_erofs_with_devices(&blob, &layers);
    let multi = MountedErofs::mount(&blob, &layers);
    let diffs = diff_trees(&reference, multi.root());
    assert!(
        diffs.is_empty(),
        "merged (one device per layer) differs from umoci unpack:\n{}",
        diffs.join("\n")
    );
    drop(multi);

    let store = dir.path().join("store");
    let raw = dir.path().join("disk.img");
    let vmdk = dir.path().join("disk.vmdk");
    let (ok, _, err) = run(vmrootfs(&store).args(["export", "t", "--single-disk"]).arg(&raw).arg("--raw"));
    assert!(ok, "export --raw: {err}");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), meta + data, "the blobs, concatenated");
    let single = MountedErofs::mount(&raw, &[]);
    let diffs = diff_trees(&reference, single.root());
    assert!(diffs.is_empty(), "merged raw single disk differs from umoci unpack:\n{}", diffs.join("\n"));
    // diff_trees leaves out trusted.overlay.* (overlayfs hides them); no overlayfs hides them
    // here, so none may be left (--ovlfs-strip=1).
    let (ok, out, err) = run(std::process::Command::new("getfattr")
        .args(["-R", "-h", "-d", "-m", "^trusted\\.overlay\\."])
        .arg(single.root()));
    assert!(ok, "getfattr: {err}");
    assert_eq!(out.trim(), "", "overlayfs xattrs left in the merged tree");
    drop(single);

    let (ok, _, err) = run(vmrootfs(&store).args(["export", "t", "--single-disk"]).arg(&vmdk));
    assert!(ok, "export (VMDK): {err}");
    let text = std::fs::read_to_string(&vmdk).unwrap();
    let extents: Vec<&str> = text.lines().filter(|l| l.contains(" FLAT ")).collect();
    assert_eq!(extents.len(), 5, "the merged blob, then four layers:\n{text}");
    assert!(extents.iter().all(|l| l.starts_with("RDONLY ")), "read-only extents: {text}");
    assert!(extents[0].contains(blob.to_str().unwrap()), "{text}");
    for (line, layer) in extents[1..].iter().zip(&layers) {
        assert!(line.contains(layer.to_str().unwrap()), "{line} is not {}", layer.display());
    }
    // QEMU (10) reads only RW extents and finds no disk in the exported, RDONLY descriptor
    // (2fcef56): it compares a copy that differs only in the access word of each extent.
    let for_qemu = dir.path().join("disk-rw.vmdk");
    std::fs::write(&for_qemu, text.replace("\nRDONLY ", "\nRW ")).unwrap();
    let (ok, out, err) = run(std::process::Command::new("qemu-img")
        .args(["compare", "-f", "vmdk", "-F", "raw"])
        .arg(&for_qemu)
        .arg(&raw));
    assert!(ok, "qemu-img compare: {out}{err}");
    assert!(out.contains("Images are identical"), "{out}");

    let again = build_with(&dir.path().join("store2"), &source("oci"), "erofs", &["--merge"]);
    assert_eq!(again["merged"]["blob_sha256"], merged["blob_sha256"], "reproducible merged blob");
}

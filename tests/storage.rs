//! The store on storage that misbehaves or is shared: a read-only mount, a full filesystem,
//! another user reading it, a blob that cannot be deleted, a record that is corrupt, and a tag
//! too long for a file name. Each with the error it must give, naming the file.

mod fixture;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::*;

fn busybox() -> String {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    format!("oci-archive:{}:busybox", demo.display())
}

/// A mount made by a test; unmounted (lazily if busy) when dropped.
struct Mount(PathBuf);

impl Mount {
    /// `src` bind-mounted read-only at `at`.
    fn read_only_bind(src: &Path, at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let (ok, _, err) = run(Command::new("mount").arg("--bind").arg(src).arg(at));
        assert!(ok, "bind mount: {err}");
        let m = Mount(at.to_owned());
        let (ok, _, err) = run(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(at));
        assert!(ok, "remount ro: {err}");
        m
    }

    /// A tmpfs of `size` at `at`.
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let (ok, _, err) =
            run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at));
        assert!(ok, "tmpfs: {err}");
        Mount(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let (ok, _, err) = run(Command::new("umount").arg(&self.0));
        if !ok {
            eprintln!("umount {}: {err}; detaching", self.0.display());
            run(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
}

fn build(store: &Path, source: &str, extra: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store).args(["build", source, "--json"]).args(extra));
    assert!(ok, "build {source}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn small_layer(name: &str) -> Layer {
    Layer::gzip(&[dir(name, 0o755), file(&format!("{name}/file"), name)])
}

/// Item 19: every command that only reads works on a store mounted read-only (with no `tmp/`,
/// as in a mirror that left it out): ls, inspect, verify, push to a layout and an archive
/// (raw and --zstd), export of a merged image to a file elsewhere.
#[test]
fn a_read_only_store_serves_every_command_that_only_reads() {
    let dir = scratch("ro-store");
    let store = dir.path().join("store");
    build(&store, &busybox(), &["--tag", "bb", "--merge"]);
    std::fs::remove_dir_all(store.join("tmp")).unwrap();
    let ro = dir.path().join("ro");
    let _mount = Mount::read_only_bind(&store, &ro);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let layout = format!("oci:{}:v1", out.join("layout").display());
    let archive = format!("oci-archive:{}:v1", out.join("bb.tar").display());
    let vmdk = out.join("bb.vmdk");
    let commands: Vec<Vec<&str>> = vec![
        vec!["ls"],
        vec!["inspect", "bb"],
        vec!["verify"],
        vec!["push", "bb", &layout],
        vec!["push", "bb", &archive, "--zstd"],
        vec!["export", "bb", "--single-disk", vmdk.to_str().unwrap()],
    ];
    for args in commands {
        let (ok, stdout, err) = run(vmrootfs(&ro).args(&args));
        assert!(ok, "{args:?} on a read-only store: {err}");
        if args[0] == "ls" {
            assert!(stdout.contains("bb"), "{stdout}");
        }
    }
    assert!(out.join("layout/index.json").exists() && out.join("bb.tar").exists() && vmdk.exists());
    assert!(!ro.join("tmp").exists(), "nothing was created in the store");
    // Commands that change the store refuse at once, naming it.
    for args in [vec!["build", &busybox(), "--tag", "again"], vec!["rm", "bb"], vec!["gc"]] {
        let (ok, _, err) = run(vmrootfs(&ro).args(&args));
        assert!(!ok, "{args:?} on a read-only store succeeded");
        assert!(err.contains(&format!("store {} is not writable", ro.display())), "{args:?}: {err}");
    }
}

/// Item 23: a store built under umask 077 is readable by another user (uid 65534): its files
/// are 0644 (blobs 0444), its directories 0755, and `ls`, `inspect` and `verify` work as
/// that user.
#[test]
fn a_store_built_under_umask_077_is_readable_by_another_user() {
    let dir = scratch("shared-store");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = dir.path().join("store");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("umask 077 && exec \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_vmrootfs"));
    cmd.arg("--store").arg(&store).args(["build", &busybox(), "--tag", "bb", "--merge"]);
    let (ok, _, err) = run(&mut cmd);
    assert!(ok, "{err}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let record = store.join("images/bb.json");
    assert_eq!(mode(&store), 0o755, "store root");
    assert_eq!(mode(&store.join("images")), 0o755);
    assert_eq!(mode(&record), 0o644, "image record");
    assert_eq!(mode(&store.join("meta.json")), 0o644);
    assert_eq!(mode(&store.join(".lock")), 0o644);
    for layers in std::fs::read_dir(store.join("layers")).unwrap() {
        let layers = layers.unwrap().path();
        assert_eq!(mode(&layers), 0o755, "{}", layers.display());
        for f in std::fs::read_dir(&layers).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_str().unwrap();
            let want = if name.ends_with(".erofs") { 0o444 } else { 0o644 };
            assert_eq!(mode(&f), want, "{}", f.display());
        }
    }
    for args in [vec!["ls"], vec!["inspect", "bb"], vec!["verify"]] {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        cmd.arg(env!("CARGO_BIN_EXE_vmrootfs")).arg("--store").arg(&store).args(&args);
        let (ok, out, err) = run(&mut cmd);
        assert!(ok, "{args:?} as uid 65534: {err}");
        if args[0] == "ls" {
            assert!(out.contains("bb"), "{out}");
        }
    }
}

/// Item 20: `rm` checks every record before it deletes one: with another record corrupt, it
/// fails naming that record and removes nothing.
#[test]
fn rm_refuses_before_removing_anything_when_another_record_is_corrupt() {
    let dir = scratch("rm-corrupt");
    let store = dir.path().join("store");
    for name in ["a", "b"] {
        let layout = dir.path().join(name);
        oci_layout(&layout, "t", &[small_layer(name)]);
        build(&store, &format!("oci:{}:t", layout.display()), &["--tag", name]);
    }
    let corrupt = store.join("images/b.json");
    std::fs::write(&corrupt, b"{\"tag\": \"b\", \"lowers\": [").unwrap();
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "a"]));
    assert!(!ok, "rm succeeded with a corrupt record beside");
    assert!(err.contains(&corrupt.display().to_string()), "names the corrupt record: {err}");
    assert!(store.join("images/a.json").exists(), "the tag was kept: {err}");
}

/// Item 20: when the garbage collection after removing a tag fails (a blob on a read-only
/// mount), `rm` says the tag was removed and what is left to collect.
#[test]
fn rm_says_the_tag_was_removed_when_collecting_fails_after() {
    let dir = scratch("rm-undeletable");
    let store = dir.path().join("store");
    let layout = dir.path().join("a");
    oci_layout(&layout, "t", &[small_layer("a")]);
    build(&store, &format!("oci:{}:t", layout.display()), &["--tag", "a"]);
    let layers = std::fs::read_dir(store.join("layers")).unwrap().next().unwrap().unwrap().path();
    let mount = Mount::read_only_bind(&layers, &layers);
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "a"]));
    drop(mount);
    assert!(!ok, "rm reports the failed collection");
    assert!(!store.join("images/a.json").exists());
    assert!(err.contains("tag a was removed"), "says the tag is gone: {err}");
    assert!(err.contains("Read-only file system") && err.contains(&layers.display().to_string()), "{err}");
    assert!(err.contains("vmrootfs gc"), "says how to collect what is left: {err}");
    let (ok, _, err) = run(vmrootfs(&store).arg("gc"));
    assert!(ok, "{err}");
}

/// Item 22: a build into a full store names the file it could not write and gives the first
/// cause (no space), for the ext4 writer, mkfs.erofs, and `--squash`.
#[test]
fn a_full_store_names_the_file_and_the_first_cause() {
    let dir = scratch("full-store");
    let layout = dir.path().join("l");
    let data = noise(24 << 20, 7);
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, "big.bin", &data[..]).unwrap();
        b.into_inner().unwrap()
    };
    oci_layout(&layout, "t", &[small_layer("base"), Layer::from_tar(&tar)]);
    let source = format!("oci:{}:t", layout.display());
    // For EROFS, one big file is refused before mkfs runs (item 12: file data beyond the free
    // space); 3000 files of 1000 bytes pass that bound (3 MB) but take a 4 KiB block each in
    // the image (no inlined tails): mkfs.erofs itself runs out of space.
    let small_files = dir.path().join("s");
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..3000u64 {
            let data = noise(1000, i + 1);
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(1_600_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    oci_layout(&small_files, "t", &[small_layer("base"), Layer::from_tar(&tar)]);
    let many = format!("oci:{}:t", small_files.display());
    for (fs, extra, size, source) in [
        ("ext4", &[][..], "8m", &source),
        ("erofs", &[][..], "8m", &many),
        ("ext4", &["--squash"][..], "30m", &source),
    ] {
        let at = dir.path().join(format!("store-{fs}-{}", extra.len()));
        let _mount = Mount::tmpfs(&at, size);
        let store = at.join("store");
        let (ok, _, err) = run(vmrootfs(&store).args(["build", source, "--fs", fs]).args(extra));
        assert!(!ok, "{fs} {extra:?}: the build fills {size}");
        let first = err.lines().find(|l| l.starts_with("error:")).unwrap_or_default().to_string();
        assert!(
            first.contains(&store.display().to_string()),
            "{fs} {extra:?} names a file in the store: {err}"
        );
        let nospace = first.find("No space left on device");
        assert!(nospace.is_some(), "{fs} {extra:?} gives the cause: {err}");
        for noise in ["Broken pipe", "Bad message", "chksum"] {
            assert!(!first.contains(noise), "{fs} {extra:?}: {noise:?} in the message: {err}");
        }
    }
}

/// Item 25: a tag whose escaped name is too long for a file name is refused before any layer
/// is converted.
#[test]
fn a_tag_too_long_for_a_file_name_is_refused_before_converting() {
    let dir = scratch("long-tag");
    let store = dir.path().join("store");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x")]);
    let tag = format!("registry.example/{}:v1", "a/".repeat(100));
    let (ok, _, err) =
        run(vmrootfs(&store).args(["build", &format!("oci:{}:t", layout.display()), "--tag", &tag]));
    assert!(!ok);
    assert!(err.contains("too long") && err.contains(&tag), "{err}");
    assert!(!err.contains("converting"), "no layer was converted: {err}");
    let layers: Vec<_> = std::fs::read_dir(store.join("layers")).unwrap().collect();
    assert!(layers.is_empty(), "nothing stored: {layers:?}");
}

//! The merged blob in the store (`build --merge`): cached by the top chain ID, shared layers
//! stay shared, kept by gc while an image references it, removed with its last image, checked
//! by verify together with its layer blobs; and the commands that need it say so when it is
//! missing. (Its tree against the reference, and booting it: tests/fidelity.rs `merged_erofs`
//! and tests/boot.rs `boot_merged`.)

mod fixture;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fixture::*;

fn small_layer(name: &str) -> Layer {
    Layer::gzip(&[dir(name, 0o755), file(&format!("{name}/file"), name)])
}

/// Builds `layout:t` as `tag` with `extra` flags; returns the result JSON.
fn build(store: &Path, layout: &Path, tag: &str, extra: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store)
        .args(["build", &format!("oci:{}:t", layout.display()), "--tag", tag, "--json"])
        .args(extra));
    assert!(ok, "build {tag}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn merged_path(result: &serde_json::Value) -> PathBuf {
    PathBuf::from(result["merged"]["path"].as_str().expect("a merged blob in the result"))
}

/// Every file under `layers/` (blobs, sidecars, locks).
fn layer_files(store: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for dir in std::fs::read_dir(store.join("layers")).unwrap() {
        for e in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            out.insert(e.unwrap().path());
        }
    }
    out
}

#[test]
fn merged_blobs_are_cached_kept_by_gc_and_go_with_their_last_image() {
    let dir = scratch("merge-gc");
    let base = small_layer("base");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    oci_layout(&a, "t", &[base.clone(), small_layer("one")]);
    oci_layout(&b, "t", &[base, small_layer("two")]);
    let store = dir.path().join("store");
    let ra = build(&store, &a, "a", &["--merge"]);
    let rb = build(&store, &b, "b", &["--merge"]);
    assert_eq!(ra["lowers"][0]["path"], rb["lowers"][0]["path"], "the base blob is shared");
    let (ma, mb) = (merged_path(&ra), merged_path(&rb));
    assert_ne!(ma, mb, "one merged blob per stack");
    assert_eq!(ra["merged"]["chain_id"], ra["lowers"][1]["chain_id"], "keyed by the top chain ID");
    assert!(
        ma.starts_with(store.join(format!("layers/erofs-v{}", vmrootfs::FsType::Erofs.recipe()))),
        "{}",
        ma.display()
    );

    // Built again: nothing converted, nothing merged, the same blob.
    let again = build(&store, &a, "a2", &["--merge"]);
    assert_eq!(again["cached"], true);
    assert_eq!(merged_path(&again), ma);
    // The same stack without --merge is not cached as merged, but reuses the layers.
    assert_eq!(build(&store, &a, "plain", &[])["merged"], serde_json::Value::Null);

    let before = layer_files(&store);
    let (ok, _, err) = run(vmrootfs(&store).arg("gc"));
    assert!(ok, "{err}");
    assert_eq!(layer_files(&store), before, "gc keeps referenced merged blobs and their files");

    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "a", "a2"]));
    assert!(ok, "{err}");
    assert!(!ma.exists(), "a's merged blob goes with its last merged image");
    let stem = ma.file_name().unwrap().to_str().unwrap().split('.').next().unwrap().to_string();
    let left: Vec<_> = layer_files(&store)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&stem))
        .collect();
    assert!(left.is_empty(), "its record and lock go too: {left:?}");
    assert!(mb.exists(), "b's stays");
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "b", "plain"]));
    assert!(ok, "{err}");
    assert_eq!(layer_files(&store), BTreeSet::new());
}

#[test]
fn verify_checks_the_merged_blob_with_its_layers() {
    let dir = scratch("merge-verify");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let merged = merged_path(&build(&store, &layout, "t", &["--merge"]));
    // fsck.erofs of a merged blob without its devices fails: passing means they were given.
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "a fresh merged image verifies: {err}");

    let mut bytes = std::fs::read(&merged).unwrap();
    bytes[1024 + 0x30] ^= 0x01; // a byte of the superblock's UUID
    std::fs::set_permissions(&merged, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&merged, &bytes).unwrap();
    let (ok, out, err) = run(vmrootfs(&store).args(["verify", "--json"]));
    assert!(!ok, "verify fails");
    let bad: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bad.as_array().unwrap().len(), 1, "only the merged blob: {bad}\n{err}");
    assert_eq!(bad[0]["path"], merged.display().to_string());
}

#[test]
fn merge_and_its_users_say_what_is_missing() {
    let dir = scratch("merge-errors");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x")]);
    let store = dir.path().join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, _, err) = run(vmrootfs(&store).args(["build", &spec, "--fs", "ext4", "--merge"]));
    assert!(!ok && err.contains("--merge") && err.contains("--fs erofs"), "{err}");

    build(&store, &layout, "plain", &[]);
    let disk = dir.path().join("disk.vmdk");
    let (ok, _, err) = run(vmrootfs(&store).args(["export", "plain", "--single-disk"]).arg(&disk));
    assert!(!ok && err.contains("plain has no merged blob: build it with --merge"), "{err}");
    assert!(!disk.exists());
    let (ok, _, err) = run(vmrootfs(&store).args(["run", "plain", "--merged", "--", "true"]));
    assert!(!ok && err.contains("plain has no merged blob"), "{err}");
}

/// The VMDK names the stored blobs, merged first, and the raw disk is those bytes in that
/// order; both are replaced atomically and readable by a runtime not running as us.
#[test]
fn export_writes_the_blobs_in_device_table_order() {
    let dir = scratch("merge-export");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y"), small_layer("z")]);
    let store = dir.path().join("store");
    let result = build(&store, &layout, "t", &["--merge"]);
    let mut blobs = vec![merged_path(&result)];
    blobs.extend(lowers_of(&result).into_iter().map(|(p, _)| p));

    let raw = dir.path().join("disk.img");
    std::fs::write(&raw, b"an older export").unwrap();
    let (ok, out, err) =
        run(vmrootfs(&store).args(["export", "t", "--json", "--raw", "--single-disk"]).arg(&raw));
    assert!(ok, "{err}");
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want: Vec<u8> = blobs.iter().flat_map(|b| std::fs::read(b).unwrap()).collect();
    assert_eq!(std::fs::read(&raw).unwrap(), want, "the blobs concatenated, merged first");
    assert_eq!(done["disk_bytes"], want.len());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&raw).unwrap().permissions().mode() & 0o777, 0o644);

    let vmdk = dir.path().join("disk.vmdk");
    let (ok, _, err) = run(vmrootfs(&store).args(["export", "t", "--single-disk"]).arg(&vmdk));
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&vmdk).unwrap();
    let named: Vec<PathBuf> = text
        .lines()
        .filter(|l| l.contains(" FLAT "))
        .map(|l| PathBuf::from(l.split('"').nth(1).unwrap()))
        .collect();
    assert_eq!(named, blobs, "{text}");
    let tmp: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(tmp.is_empty(), "no temp files left beside the exports: {tmp:?}");
}

/// A store whose image was recorded with recipe-2 EROFS blobs (inlined tails, which merging
/// cannot reference) keeps working: the old image inspects and verifies, a `--merge` build of
/// the same source converts into the current recipe and merges, and gc drops the old blobs
/// once no record names them.
#[test]
fn an_image_of_recipe_2_blobs_keeps_working_beside_merged_ones() {
    let dir = scratch("merge-old-recipe");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    build(&store, &layout, "old", &[]);
    // Make it a recipe-2 store, as vmrootfs before recipe 3 left it.
    std::fs::rename(
        store.join(format!("layers/erofs-v{}", vmrootfs::FsType::Erofs.recipe())),
        store.join("layers/erofs-v2"),
    )
    .unwrap();
    let as_recipe_2 = |path: &Path| {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        match v.get_mut("lowers") {
            Some(lowers) => lowers.as_array_mut().unwrap().iter_mut().for_each(|l| l["recipe"] = 2.into()),
            None => v["recipe"] = 2.into(),
        }
        std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    as_recipe_2(&store.join("images/old.json"));
    for e in std::fs::read_dir(store.join("layers/erofs-v2")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            as_recipe_2(&p);
        }
    }
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "old", "--json"]));
    assert!(ok, "{err}");
    assert!(out.contains("layers/erofs-v2/"), "{out}");
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{err}");

    let merged = build(&store, &layout, "new", &["--merge"]);
    assert_eq!(merged["cached"], false, "recipe-2 blobs are not reused");
    for (path, _) in lowers_of(&merged) {
        assert!(
            path.starts_with(store.join(format!("layers/erofs-v{}", vmrootfs::FsType::Erofs.recipe()))),
            "{}",
            path.display()
        );
    }
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{err}");
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "old"]));
    assert!(ok, "{err}");
    let left: Vec<_> = std::fs::read_dir(store.join("layers/erofs-v2")).unwrap().collect();
    assert!(left.is_empty(), "the recipe-2 blobs go with the last record naming them: {left:?}");
    assert!(merged_path(&merged).exists());
}

/// Merged blobs of format 1 were made by mkfs.erofs' rebuild mode: a store holding one keeps
/// its image verifying, and a `--merge` build of the same stack makes a new merged blob
/// (format 2, `merged2-…`) instead of reusing it; gc drops the old one with its last record.
#[test]
fn a_format_1_merged_blob_is_kept_for_its_image_but_not_reused() {
    let dir = scratch("merge-format-1");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let old = merged_path(&build(&store, &layout, "old", &["--merge"]));
    let name = old.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("merged2-"), "{name}");
    // Make it a format-1 blob, as vmrootfs before format 2 left it: its files renamed, its
    // records without a format.
    let layers = old.parent().unwrap().to_path_buf();
    for e in std::fs::read_dir(&layers).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(rest) = n.strip_prefix("merged2-") {
            std::fs::rename(&p, layers.join(format!("merged-{rest}"))).unwrap();
        }
    }
    let without_format = |path: &Path, merged: &dyn Fn(&mut serde_json::Value) -> &mut serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        merged(&mut v).as_object_mut().unwrap().remove("format").expect("a format field");
        std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    without_format(&store.join("images/old.json"), &|v| &mut v["merged"]);
    let old = layers.join(name.replacen("merged2-", "merged-", 1));
    without_format(&old.with_extension("json"), &|v| v);
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "old", "--json"]));
    assert!(ok && out.contains(old.to_str().unwrap()), "{out}{err}");
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "the format-1 image verifies: {err}");

    let new = build(&store, &layout, "new", &["--merge"]);
    assert_eq!(new["cached"], false, "the format-1 blob is not reused");
    let merged = merged_path(&new);
    assert_eq!(merged.file_name().unwrap().to_str().unwrap(), name, "a new format-2 blob");
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "old"]));
    assert!(ok, "{err}");
    assert!(!old.exists() && !old.with_extension("json").exists(), "the format-1 blob goes with its record");
    assert!(merged.exists());
}

/// `PaxFile` entry `path` with the xattr `name=value`.
fn with_xattr(path: &str, name: &str, value: &[u8]) -> Entry {
    Entry::PaxFile {
        path: path.as_bytes().to_vec(),
        data: path.as_bytes().to_vec(),
        pax: vec![(format!("SCHILY.xattr.{name}"), value.to_vec())],
    }
}

/// The merged blob applies the layers as overlayfs stacks them: on layers that whiteout,
/// recreate (a directory removed by one layer and made again by a later one included: the
/// files it had below stay hidden), make opaque, turn files into directories and back, and
/// change a lower directory's mode or a file's xattrs, the merged tree (one device per layer)
/// equals the overlay stack of the same blobs.
#[test]
fn merged_tree_equals_the_overlay_stack_on_tricky_layers() {
    let work = scratch("merge-tricky");
    let l0 = Layer::gzip(&[
        dir("a", 0o755),
        file("a/x", "x0"),
        file("a/y", "y0"),
        dir("d", 0o755),
        file("d/f", "f0"),
        file("top", "a file below"),
        dir("e", 0o755),
        file("e/z", "z0"),
        with_xattr("attr", "user.a", b"1"),
        dir("gone", 0o755),
        file("gone/inside", "i"),
        dir("gone/sub", 0o755),
        file("gone/sub/deep", "d"),
    ]);
    let l1 = Layer::gzip(&[
        dir("a", 0o700),
        file("a/.wh.x", ""),
        dir("d", 0o755),
        file("d/.wh..wh..opq", ""),
        file("d/g", "g1"),
        dir("top", 0o750),
        file("top/inner", "a dir above"),
        file("e", "a file above"),
        with_xattr("attr", "user.b", b"2"),
        file(".wh.gone", ""),
    ]);
    let l2 = Layer::gzip(&[
        dir("a", 0o700),
        file("a/x", "x2, back"),
        dir("gone", 0o711),
        file("gone/new", "n2"),
        dir("e", 0o755),
        file("e/again", "a dir again"),
    ]);
    let layout = work.path().join("l");
    oci_layout(&layout, "t", &[l0, l1, l2]);
    let store = work.path().join("store");
    let result = build(&store, &layout, "t", &["--merge"]);
    let lowers = lowers_of(&result);
    let layers: Vec<PathBuf> = lowers.iter().map(|(p, _)| p.clone()).collect();
    let stack = MountedStack::mount(&lowers);
    let merged = MountedErofs::mount(&merged_path(&result), &layers);
    let diffs = fixture::treediff::diff_trees(stack.root(), merged.root());
    assert!(diffs.is_empty(), "merged tree differs from the overlay stack:\n{}", diffs.join("\n"));
    fsck_erofs_with_devices(&merged_path(&result), &layers);
    // And the stack is what the layers say (so the comparison compares something).
    let root = merged.root();
    assert_eq!(std::fs::read_to_string(root.join("a/x")).unwrap(), "x2, back");
    assert!(!root.join("d/f").exists() && root.join("d/g").exists(), "d is opaque");
    assert!(root.join("top").is_dir() && root.join("e/again").is_file() && !root.join("e/z").exists());
    assert!(root.join("gone/new").exists());
    assert!(
        !root.join("gone/inside").exists() && !root.join("gone/sub").exists(),
        "removed, then made again"
    );
}

/// Builds `layers` with --merge and checks the merged tree (one device per layer) against the
/// overlay stack of the same blobs; returns the scratch directory, the build result and the
/// merged image, mounted.
fn merge_equals_stack(name: &str, layers: &[Layer]) -> (tempfile::TempDir, MountedErofs) {
    let work = scratch(name);
    let layout = work.path().join("l");
    oci_layout(&layout, "t", layers);
    let store = work.path().join("store");
    let result = build(&store, &layout, "t", &["--merge"]);
    let lowers = lowers_of(&result);
    let blobs: Vec<PathBuf> = lowers.iter().map(|(p, _)| p.clone()).collect();
    let stack = MountedStack::mount(&lowers);
    let merged = MountedErofs::mount(&merged_path(&result), &blobs);
    let diffs = fixture::treediff::diff_trees(stack.root(), merged.root());
    assert!(diffs.is_empty(), "merged tree differs from the overlay stack:\n{}", diffs.join("\n"));
    fsck_erofs_with_devices(&merged_path(&result), &blobs);
    (work, merged)
}

/// A directory made opaque by one layer and added to by a later one (which `mkfs.erofs`'
/// rebuild mode merged with every layer below, so vmrootfs refused it): the merged tree is
/// the overlay stack's, what the opaque directory hides stays hidden.
#[test]
fn a_directory_made_opaque_and_then_added_to_merges_as_overlayfs_stacks_it() {
    let l0 = Layer::gzip(&[dir("o", 0o755), file("o/old", "hidden by layer 2"), dir("o/sub", 0o755)]);
    let l1 = Layer::gzip(&[dir("o", 0o755), file("o/.wh..wh..opq", ""), file("o/mid", "m")]);
    let l2 = Layer::gzip(&[dir("o", 0o750), file("o/new", "n")]);
    let (_work, merged) = merge_equals_stack("merge-opaque-added", &[l0, l1, l2]);
    let o = merged.root().join("o");
    assert!(!o.join("old").exists() && !o.join("sub").exists(), "hidden by layer 2's opaque o");
    assert_eq!(std::fs::read_to_string(o.join("mid")).unwrap(), "m");
    assert_eq!(std::fs::read_to_string(o.join("new")).unwrap(), "n");
}

/// What the merged image stores itself: symlinks of every length (inline beside their inode
/// wherever one block holds both, else in blocks of their own), directories of many blocks,
/// and hardlinks (one inode, as in their layer, also when an upper layer replaces one link).
#[test]
fn merged_tree_equals_the_overlay_stack_on_long_links_big_directories_and_hardlinks() {
    let mut l0 = vec![dir("links", 0o755), dir("big", 0o755), file("h/a", "linked"), dir("h", 0o755)];
    for i in 0..60usize {
        let target = format!("/{}", "t".repeat(1 + i * 68));
        l0.push(symlink(&format!("links/l{i:02}"), &target));
    }
    l0.push(symlink("links/longest", &format!("/{}", "x".repeat(4090))));
    for i in 0..400 {
        l0.push(file(&format!("big/a-file-with-a-longish-name-{i:04}"), "x"));
    }
    l0.extend([hardlink("h/b", "h/a"), hardlink("h/c", "h/a")]);
    let l1 = Layer::gzip(&[
        dir("big", 0o755),
        file("big/.wh.a-file-with-a-longish-name-0007", ""),
        file("big/zz-added", "above"),
        dir("h", 0o755),
        file("h/c", "replaced above"),
    ]);
    let (_work, merged) = merge_equals_stack("merge-links-dirs", &[Layer::gzip(&l0), l1]);
    let root = merged.root();
    assert_eq!(std::fs::read_dir(root.join("big")).unwrap().count(), 400);
    assert_eq!(std::fs::read_link(root.join("links/longest")).unwrap().as_os_str().len(), 4091);
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (std::fs::metadata(root.join("h/a")).unwrap(), std::fs::metadata(root.join("h/b")).unwrap());
    assert_eq!(a.ino(), b.ino(), "h/a and h/b stay one inode");
}

/// A root directory entry (`./`) with an xattr in a PAX header.
fn root_with_xattr(name: &str, value: &[u8], mode: u32) -> Entry {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([(format!("SCHILY.xattr.{name}").as_str(), value)]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_path("./").unwrap();
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    Entry::Raw(b.into_inner().unwrap())
}

/// The merged root is the top layer's root, as overlayfs shows it: its mode, mtime and xattrs
/// (rebuild mode kept none of them).
#[test]
fn the_merged_root_keeps_the_top_layers_attributes_and_xattrs() {
    let l0 = Layer::gzip(&[root_with_xattr("user.base", b"0", 0o755), file("f", "0")]);
    let l1 = Layer::gzip(&[root_with_xattr("user.top", b"top value", 0o750), file("g", "1")]);
    let (_work, merged) = merge_equals_stack("merge-root-xattrs", &[l0, l1]);
    let root = merged.root();
    let mut value = [0u8; 64];
    let n = rustix::fs::lgetxattr(root, "user.top", &mut value).expect("user.top on the merged root");
    assert_eq!(&value[..n], b"top value");
    assert!(rustix::fs::lgetxattr(root, "user.base", &mut value).is_err(), "the base root's xattr is below");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(root).unwrap();
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o750, 1_700_000_000));
}

/// The exported VMDK gives no runtime a way to write the store: every extent is `RDONLY`, and
/// QEMU opening it read-write (as root, whom the blobs' 0444 mode does not stop) writes
/// nothing into the shared blobs.
#[test]
fn exported_vmdk_extents_are_read_only() {
    let dir = scratch("merge-export-ro");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let result = build(&store, &layout, "t", &["--merge"]);
    let mut blobs = vec![merged_path(&result)];
    blobs.extend(lowers_of(&result).into_iter().map(|(p, _)| p));
    let before: Vec<Vec<u8>> = blobs.iter().map(|b| std::fs::read(b).unwrap()).collect();

    let vmdk = dir.path().join("disk.vmdk");
    let (ok, _, err) = run(vmrootfs(&store).args(["export", "t", "--single-disk"]).arg(&vmdk));
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&vmdk).unwrap();
    let extents: Vec<&str> = text.lines().filter(|l| l.contains(" FLAT ")).collect();
    assert_eq!(extents.len(), blobs.len(), "{text}");
    assert!(extents.iter().all(|l| l.starts_with("RDONLY ")), "read-only extents: {text}");

    // Writes at the start (the merged blob) and in the last layer.
    let last = before.iter().map(|b| b.len() as u64).sum::<u64>() - 4096;
    for at in [0, last] {
        let write = format!("write -P 0x41 {at} 512");
        let (_, out, err) =
            run(std::process::Command::new("qemu-io").args(["-f", "vmdk", "-c", &write]).arg(&vmdk));
        assert!(!out.contains("wrote 512/512"), "qemu-io wrote through the VMDK at {at}: {out}{err}");
    }
    for (blob, bytes) in blobs.iter().zip(&before) {
        assert!(
            std::fs::read(blob).unwrap() == *bytes,
            "{} changed through the exported VMDK",
            blob.display()
        );
    }
}

/// `export` writes a new file and replaces only a regular file: a directory (`/` included), a
/// device node, a FIFO or a symlink at the target is refused with an error naming it, and
/// left as it was.
#[test]
fn export_refuses_targets_that_are_not_regular_files() {
    use std::os::unix::fs::FileTypeExt;
    let dir = scratch("merge-export-targets");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x")]);
    let store = dir.path().join("store");
    build(&store, &layout, "t", &["--merge"]);

    let node = dir.path().join("null-node");
    let status = std::process::Command::new("mknod").arg(&node).args(["c", "1", "3"]).status().unwrap();
    assert!(status.success(), "mknod");
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(dir.path().join("elsewhere.img"), &link).unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let cases = [
        (std::path::PathBuf::from("/"), "is a directory"),
        (sub.clone(), "is a directory"),
        (node.clone(), "is a character device"),
        (fifo.clone(), "is a FIFO"),
        (link.clone(), "is a symbolic link"),
    ];
    for (target, says) in &cases {
        for raw in [true, false] {
            let mut cmd = vmrootfs(&store);
            cmd.args(["export", "t", "--single-disk"]).arg(target);
            if raw {
                cmd.arg("--raw");
            }
            let (ok, _, err) = run(&mut cmd);
            assert!(!ok, "export onto {} (raw: {raw}) fails", target.display());
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                err.contains(&target.display().to_string()) && err.contains(says),
                "export onto {} (raw: {raw}): {err}",
                target.display()
            );
        }
    }
    assert!(std::fs::symlink_metadata(&node).unwrap().file_type().is_char_device(), "the node is kept");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is kept");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is kept");
    assert!(!dir.path().join("elsewhere.img").exists(), "nothing written through the link");
    assert!(sub.is_dir());
}

mod mkfs_images {
    //! The reader takes what `mkfs.erofs` makes from a directory too (compact inodes, shared
    //! xattrs, overlayfs whiteouts and opaque directories as devices and xattrs): two such
    //! images merged by vmrootfs mount as their overlay stack; one with an inlined file tail
    //! cannot be merged, and the error names the file.

    use super::*;
    use std::process::Command;
    use vmrootfs::erofs_merge::read::Image;
    use vmrootfs::erofs_merge::tree::{MergedTree, TreeError};

    fn sh(cmd: &mut Command) {
        let (ok, out, err) = run(cmd);
        assert!(ok, "{cmd:?}: {out}{err}");
    }

    /// `mkfs.erofs` of `src` into `out`, build time and every mtime 1700000000.
    fn mkfs(src: &Path, out: &Path, extra: &[&str]) {
        sh(Command::new("mkfs.erofs").arg("--quiet").arg("-T1700000000").args(extra).arg(out).arg(src));
    }

    fn setfattr(path: &Path, name: &str, value: &str) {
        sh(Command::new("setfattr").args(["-n", name, "-v", value]).arg(path));
    }

    #[test]
    fn two_mkfs_images_merge_equal_to_their_stack() {
        let work = scratch("merge-mkfs");
        let (src0, src1) = (work.path().join("src0"), work.path().join("src1"));
        for d in ["a", "o"] {
            std::fs::create_dir_all(src0.join(d)).unwrap();
        }
        for i in 0..5 {
            let f = src0.join(format!("a/f{i}"));
            std::fs::write(&f, format!("file {i} below")).unwrap();
            setfattr(&f, "user.same", "shared by five files"); // over the tolerance: shared
        }
        std::fs::write(src0.join("o/below"), "hidden by the opaque o above").unwrap();
        std::fs::write(src0.join("big"), vec![7u8; 3 * 4096 + 100]).unwrap();
        std::os::unix::fs::symlink("a/f0", src0.join("link")).unwrap();
        std::fs::create_dir_all(src1.join("a")).unwrap();
        std::fs::create_dir_all(src1.join("o")).unwrap();
        setfattr(&src1.join("o"), "trusted.overlay.opaque", "y");
        std::fs::write(src1.join("o/above"), "above").unwrap();
        std::fs::write(src1.join("a/f1"), "replaced above").unwrap();
        sh(Command::new("mknod").arg(src1.join("a/f2")).args(["c", "0", "0"])); // a whiteout
        let (l0, l1) = (work.path().join("l0.erofs"), work.path().join("l1.erofs"));
        mkfs(&src0, &l0, &["-Enoinline_data"]);
        mkfs(&src1, &l1, &["-Enoinline_data"]);

        let images = [Image::open(&l0).unwrap(), Image::open(&l1).unwrap()];
        let f0 = {
            let root = images[0].root().unwrap();
            assert!(!root.fields.extended, "mkfs made compact inodes");
            let a = images[0].dir_entries(&root).unwrap().into_iter().find(|e| e.name == b"a").unwrap();
            let a = images[0].inode(a.nid).unwrap();
            let f0 = images[0].dir_entries(&a).unwrap().into_iter().find(|e| e.name == b"f0").unwrap();
            images[0].inode(f0.nid).unwrap()
        };
        let raw = std::fs::read(&l0).unwrap();
        let shared_count = raw[f0.offset as usize + f0.fields.size_on_disk() + 4];
        assert_eq!(shared_count, 1, "a/f0's xattr is shared");

        let tree = MergedTree::of(&images).unwrap();
        let merged = work.path().join("merged.erofs");
        let blocks: Vec<u64> = images.iter().map(|i| i.bytes / 4096).collect();
        vmrootfs::erofs_merge::write::write(&tree, &blocks, [7; 16], &merged).unwrap();
        let layers = vec![l0.clone(), l1.clone()];
        let stack = MountedStack::mount(&[(l0, "erofs".into()), (l1, "erofs".into())]);
        let mounted = MountedErofs::mount(&merged, &layers);
        let diffs = fixture::treediff::diff_trees(stack.root(), mounted.root());
        assert!(diffs.is_empty(), "merged tree differs from the overlay stack:\n{}", diffs.join("\n"));
        fsck_erofs_with_devices(&merged, &layers);
        let root = mounted.root();
        assert!(!root.join("a/f2").exists() && !root.join("o/below").exists());
        assert_eq!(std::fs::read_to_string(root.join("a/f1")).unwrap(), "replaced above");
    }

    #[test]
    fn an_inlined_file_tail_is_refused_naming_the_file() {
        let work = scratch("merge-mkfs-inline");
        let src = work.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/small"), "a tail inlined by default").unwrap();
        let image = work.path().join("l.erofs");
        mkfs(&src, &image, &[]);
        let r = MergedTree::of(&[Image::open(&image).unwrap()]);
        let e = r.expect_err("an inlined tail");
        assert!(matches!(e, TreeError::InlinedTail { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(image.to_str().unwrap()) && text.contains("/d/small"), "{text}");
    }
}

mod hostile_blobs {
    //! Layer blobs come from registries: the EROFS reader that merges them ends every damaged
    //! or forged blob in one error naming the blob, never a panic, a loop or an allocation of
    //! what a field claims.

    use super::*;
    use vmrootfs::erofs_merge::format as f;
    use vmrootfs::erofs_merge::read::{Image, ReadError};
    use vmrootfs::erofs_merge::tree::{MergedTree, TreeError};

    /// A real layer blob of a few directories and files, built by vmrootfs.
    fn layer_blob(work: &Path) -> Vec<u8> {
        let layer = Layer::gzip(&[
            dir("a", 0o755),
            dir("a/b", 0o755),
            file("a/f", "in a"),
            file("g", "a file at the root"),
            with_xattr("x", "user.k", b"v"),
        ]);
        let layout = work.join("l");
        oci_layout(&layout, "t", &[layer]);
        let result = build(&work.join("store"), &layout, "t", &[]);
        std::fs::read(&lowers_of(&result)[0].0).unwrap()
    }

    /// The merged tree of `bytes` as the only layer, written to `work/name`.
    fn tree_of(work: &Path, name: &str, bytes: &[u8]) -> Result<MergedTree, TreeError> {
        let path = work.join(name);
        std::fs::write(&path, bytes).unwrap();
        let tree = MergedTree::of(&[Image::open(&path)?]);
        if let Err(e) = &tree {
            let text = format!("{e}");
            eprintln!("{name}: {text}");
            assert!(text.contains(path.to_str().unwrap()), "the error names the blob: {text}");
        }
        tree
    }

    /// The nid of `name` in the directory `dir` of `image`.
    fn nid_of(image: &Image, dir: u64, name: &str) -> u64 {
        let inode = image.inode(dir).unwrap();
        image.dir_entries(&inode).unwrap().into_iter().find(|e| e.name == name.as_bytes()).unwrap().nid
    }

    /// Random bytes of a real blob changed, many times over: each read ends (a tree, which
    /// then writes, or an error), none panics or hangs.
    #[test]
    fn randomly_damaged_blobs_never_panic() {
        let work = scratch("merge-hostile-random");
        let good = layer_blob(work.path());
        let path = work.path().join("damaged");
        let out = work.path().join("merged");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            // xorshift64*: deterministic, so a failure repeats.
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let (mut trees, mut errors) = (0, 0);
        for _ in 0..600 {
            let mut bytes = good.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            std::fs::write(&path, &bytes).unwrap();
            match Image::open(&path).map_err(TreeError::from).and_then(|i| MergedTree::of(&[i])) {
                Ok(tree) => {
                    trees += 1;
                    // Every 8th is written too (each write syncs): written or refused, as long
                    // as it ends. The file is absent the first time.
                    if trees % 8 == 1 {
                        let _ = std::fs::remove_file(&out);
                        let _ = vmrootfs::erofs_merge::write::write(
                            &tree,
                            &[bytes.len() as u64 / 4096],
                            [0; 16],
                            &out,
                        );
                    }
                }
                Err(_) => errors += 1,
            }
        }
        assert!(trees > 0 && errors > 0, "both outcomes happen: {trees} trees, {errors} errors");
    }

    #[test]
    fn truncated_garbage_and_forged_blobs_end_in_one_clean_error() {
        let work = scratch("merge-hostile");
        let good = layer_blob(work.path());
        assert!(tree_of(work.path(), "good", &good).is_ok(), "the blob itself reads");
        let image = Image::open(&work.path().join("good")).unwrap();
        let root = u64::from(image.superblock.root_nid);
        let (a, g) = (nid_of(&image, root, "a"), nid_of(&image, root, "g"));
        let b = nid_of(&image, a, "b");
        let at = |nid: u64| image.inode(nid).unwrap().offset as usize;
        let extended = |nid: u64| image.inode(nid).unwrap().fields.extended;

        // Cut anywhere: an error or, when only unread padding went, the tree; never a panic.
        for cut in (0..good.len()).step_by(256) {
            let r = tree_of(work.path(), "cut", &good[..cut]);
            if cut + 4096 <= good.len() {
                assert!(r.is_err(), "cut at {cut} of {}", good.len());
            }
        }
        assert!(matches!(
            tree_of(work.path(), "zeros", &[0; 8192]),
            Err(TreeError::Read(ReadError::NotErofs { .. }))
        ));

        // A looping directory: a/b is a again.
        let mut looping = good.clone();
        let mut pattern = b.to_le_bytes().to_vec();
        pattern.extend([0, 0, f::FT_DIR, 0]);
        let mut patched = 0;
        for i in 0..looping.len() - 12 {
            if looping[i..i + 8] == pattern[..8] && looping[i + 10..i + 12] == pattern[10..] {
                looping[i..i + 8].copy_from_slice(&a.to_le_bytes());
                patched += 1;
            }
        }
        assert!(patched >= 1, "found a's entry of b");
        let r = tree_of(work.path(), "loop", &looping);
        assert!(
            matches!(r, Err(TreeError::Read(ReadError::DirectoryTwice { nid, .. })) if nid == a),
            "{r:?}"
        );

        // Claimed sizes the blob does not hold: a file, a directory, xattrs, a chunk table.
        let size_at = |nid: u64| at(nid) + 8;
        let mut huge_file = good.clone();
        if extended(g) {
            huge_file[size_at(g)..size_at(g) + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        } else {
            huge_file[size_at(g)..size_at(g) + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        let r = tree_of(work.path(), "huge-file", &huge_file);
        assert!(matches!(r, Err(TreeError::Read(ReadError::DataPastEnd { .. }))), "{r:?}");

        let mut huge_dir = good.clone();
        let bytes =
            if extended(a) { (1u64 << 40).to_le_bytes().to_vec() } else { u32::MAX.to_le_bytes().to_vec() };
        huge_dir[size_at(a)..size_at(a) + bytes.len()].copy_from_slice(&bytes);
        let r = tree_of(work.path(), "huge-dir", &huge_dir);
        assert!(matches!(r, Err(TreeError::Read(ReadError::TooBig { .. }))), "{r:?}");

        let mut huge_xattrs = good.clone();
        huge_xattrs[at(g) + 2..at(g) + 4].copy_from_slice(&u16::MAX.to_le_bytes());
        let r = tree_of(work.path(), "huge-xattrs", &huge_xattrs);
        assert!(r.is_err(), "{r:?}");

        // A chunk-based file claiming 2^62 bytes in 4 KiB chunks: 2^50 chunk indexes.
        let mut huge_chunks = huge_file.clone();
        let format = u16::from_le_bytes([huge_chunks[at(g)], huge_chunks[at(g) + 1]]);
        let chunked = (format & 1) | ((f::DataLayout::ChunkBased as u16) << 1);
        huge_chunks[at(g)..at(g) + 2].copy_from_slice(&chunked.to_le_bytes());
        huge_chunks[at(g) + 0x10..at(g) + 0x14].copy_from_slice(&f::chunk_format(0, true).to_le_bytes());
        let r = tree_of(work.path(), "huge-chunks", &huge_chunks);
        assert!(matches!(r, Err(TreeError::Read(ReadError::PastEnd { what: "chunk table", .. }))), "{r:?}");

        // An entry naming an inode far past the end.
        let mut far = looping.clone();
        for i in 0..far.len() - 8 {
            if far[i..i + 8] == a.to_le_bytes() && far[i + 10] == f::FT_DIR {
                far[i..i + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            }
        }
        let r = tree_of(work.path(), "far", &far);
        assert!(matches!(r, Err(TreeError::Read(ReadError::PastEnd { what: "inode", .. }))), "{r:?}");
    }
}

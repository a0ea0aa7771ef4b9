//! The store under sharing, races and crashes: shared blobs, rm + gc, verify, concurrent
//! builds with gc running beside them, and builds SIGKILLed at random moments.

mod fixture;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fixture::treediff::diff_trees;
use fixture::*;

/// A layer of `size` random bytes in one file plus a marker file.
fn big_layer(name: &str, size: usize, seed: u64) -> Layer {
    let data = noise(size, seed);
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("{name}.bin"), &data[..]).unwrap();
        b.into_inner().unwrap()
    };
    Layer::from_tar(&tar)
}

fn small_layer(name: &str) -> Layer {
    Layer::gzip(&[dir(name, 0o755), file(&format!("{name}/file"), name)])
}

fn clone_layer(l: &Layer) -> Layer {
    Layer {
        blob: l.blob.clone(),
        media_type: l.media_type.clone(),
        digest: l.digest.clone(),
        diff_id: l.diff_id.clone(),
    }
}

/// Builds `layout:t` as `tag`; returns the result JSON.
fn build(store: &Path, layout: &Path, tag: &str) -> serde_json::Value {
    let (ok, out, err) =
        run(vmrootfs(store).args(["build", &format!("oci:{}:t", layout.display()), "--tag", tag, "--json"]));
    assert!(ok, "build {tag}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn lower_paths(result: &serde_json::Value) -> Vec<PathBuf> {
    result["lowers"].as_array().unwrap().iter().map(|l| PathBuf::from(l["path"].as_str().unwrap())).collect()
}

/// Blob files (not sidecars or locks) in the store.
fn blobs_on_disk(store: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for dir in std::fs::read_dir(store.join("layers")).unwrap() {
        let dir = dir.unwrap().path();
        let fs = dir.file_name().unwrap().to_str().unwrap().split('-').next().unwrap().to_string();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) == Some(fs.as_str()) {
                out.insert(p);
            }
        }
    }
    out
}

fn tmp_entries(store: &Path) -> usize {
    std::fs::read_dir(store.join("tmp")).unwrap().count()
}

#[test]
fn two_tags_that_share_a_base_layer_share_its_blob() {
    let dir = scratch("share");
    let base = small_layer("base");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    oci_layout(&a, "t", &[clone_layer(&base), small_layer("one")]);
    oci_layout(&b, "t", &[base, small_layer("two")]);
    let store = dir.path().join("store");
    let ra = lower_paths(&build(&store, &a, "a"));
    let rb = lower_paths(&build(&store, &b, "b"));
    assert_eq!(ra[0], rb[0], "one blob file for the shared base");
    assert_ne!(ra[1], rb[1]);
    assert_eq!(blobs_on_disk(&store).len(), 3);
}

#[test]
fn a_build_of_stored_layers_does_no_layer_work() {
    let dir = scratch("cached");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    assert_eq!(build(&store, &layout, "first")["cached"], false);
    let (ok, out, err) = run(vmrootfs(&store).args([
        "build",
        &format!("oci:{}:t", layout.display()),
        "--tag",
        "again",
        "--json",
    ]));
    assert!(ok, "{err}");
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["cached"], true);
    assert!(!err.contains("converting") && err.matches("stored, skipped").count() == 2, "{err}");
}

#[test]
fn rm_and_gc_leave_exactly_the_referenced_blobs_and_an_empty_tmp() {
    let dir = scratch("gc");
    let base = small_layer("base");
    let mid = small_layer("mid");
    let layouts = [
        ("a", vec![clone_layer(&base), clone_layer(&mid)]),
        ("b", vec![clone_layer(&base), clone_layer(&mid), small_layer("top-b")]),
        ("c", vec![clone_layer(&base), small_layer("only-c")]),
    ];
    let store = dir.path().join("store");
    let mut lowers = HashMap::new();
    for (name, layers) in layouts {
        let l = dir.path().join(name);
        oci_layout(&l, "t", &layers);
        lowers.insert(name, lower_paths(&build(&store, &l, name)));
    }
    assert_eq!(blobs_on_disk(&store).len(), 4, "chains: base, base+mid, base+mid+top-b, base+only-c");
    // Leftovers of an interrupted build.
    std::fs::create_dir_all(store.join("tmp/layer-dead/tree/etc")).unwrap();
    std::fs::write(store.join("tmp/blob-dead"), b"half a blob").unwrap();

    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "b"]));
    assert!(ok, "{err}");
    let expected: BTreeSet<PathBuf> = lowers["a"].iter().chain(&lowers["c"]).cloned().collect();
    assert_eq!(blobs_on_disk(&store), expected, "rm b removes only what a and c do not use");
    assert_eq!(tmp_entries(&store), 0);

    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "a", "c"]));
    assert!(ok, "{err}");
    assert!(blobs_on_disk(&store).is_empty());
    let dirs: Vec<PathBuf> =
        std::fs::read_dir(store.join("layers")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "one layer directory (erofs, this recipe): {dirs:?}");
    let left: Vec<_> = std::fs::read_dir(&dirs[0]).unwrap().collect();
    assert!(left.is_empty(), "sidecars and locks go with their blobs: {left:?}");

    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "nope"]));
    assert!(!ok && err.contains("no image tagged \"nope\""), "{err}");
}

#[test]
fn verify_catches_a_single_flipped_byte() {
    let dir = scratch("verify");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let lowers = lower_paths(&build(&store, &layout, "t"));
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "a fresh store verifies: {err}");

    let victim = &lowers[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::set_permissions(victim, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(victim, &bytes).unwrap();

    let (ok, out, err) = run(vmrootfs(&store).args(["verify", "--json"]));
    assert!(!ok, "verify fails");
    assert!(err.contains(&victim.display().to_string()), "names the bad blob: {err}");
    let bad: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bad.as_array().unwrap().len(), 1, "only the flipped blob: {bad}");
    assert_eq!(bad[0]["path"], victim.display().to_string());
}

/// Four builds in separate processes, of images that share layers, with `gc` looping beside
/// them: all succeed, every shared layer is converted exactly once, the store verifies.
#[test]
fn concurrent_builds_convert_each_shared_layer_once() {
    let dir = scratch("concurrent");
    let base = big_layer("base", 24 << 20, 1);
    let one = big_layer("one", 8 << 20, 2);
    let two = big_layer("two", 8 << 20, 3);
    let images: Vec<(&str, Vec<Layer>)> = vec![
        ("a", vec![clone_layer(&base), clone_layer(&one)]),
        ("b", vec![clone_layer(&base), clone_layer(&two)]),
        ("c", vec![clone_layer(&base), clone_layer(&one), small_layer("c")]),
        ("d", vec![clone_layer(&base), clone_layer(&two), small_layer("d")]),
    ];
    let store = dir.path().join("store");
    let mut children = Vec::new();
    for (name, layers) in &images {
        let layout = dir.path().join(name);
        oci_layout(&layout, "t", layers);
        children.push((*name, layout));
    }
    let done = AtomicBool::new(false);
    let mut gc_runs = 0;
    let outputs = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                let (ok, _, err) = run(vmrootfs(&store).arg("gc"));
                assert!(ok, "gc: {err}");
                n += 1;
            }
            n
        });
        let procs: Vec<_> = children
            .iter()
            .map(|(name, layout)| {
                let child = vmrootfs(&store)
                    .args(["build", &format!("oci:{}:t", layout.display()), "--tag", name, "--jobs", "2"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                (*name, child)
            })
            .collect();
        let outputs: Vec<(String, bool, String)> = procs
            .into_iter()
            .map(|(name, c)| {
                let out = c.wait_with_output().unwrap();
                (name.to_string(), out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
            })
            .collect();
        done.store(true, Ordering::SeqCst);
        gc_runs = gc.join().unwrap();
        outputs
    });
    for (name, ok, err) in &outputs {
        assert!(ok, "build {name} failed: {err}");
    }
    assert!(gc_runs >= 1);
    let all_stderr: String = outputs.iter().map(|(_, _, e)| e.as_str()).collect();
    for (layer, users) in [(&base, 4), (&one, 2), (&two, 2)] {
        let short = &layer.digest[..19];
        let lines: Vec<&str> = all_stderr.lines().filter(|l| l.contains(short)).collect();
        let converted = lines.iter().filter(|l| l.contains("converted in")).count();
        let reused = lines.iter().filter(|l| l.contains("stored")).count();
        assert_eq!(converted, 1, "layer {short} (in {users} images) converted exactly once:\n{all_stderr}");
        assert_eq!(reused, users - 1, "the other builds of {short} reused the blob:\n{all_stderr}");
    }
    let (ok, out, _) = run(vmrootfs(&store).args(["ls", "--json"]));
    assert!(ok);
    let records: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(records.as_array().unwrap().len(), 4);
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{err}");
}

/// Builds of the real test image killed with SIGKILL at random moments leave a store that
/// lists, verifies, rebuilds faithfully and collects down to an empty `tmp/`.
#[test]
fn sigkill_at_random_moments_leaves_a_consistent_store() {
    let img = image();
    let spec = format!("oci:{}/oci:test", img.display());
    let dir = scratch("sigkill");
    let store = dir.path().join("store");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("sigkill seed {seed}");
    let delays = noise(12, seed);
    for (i, d) in delays.iter().enumerate() {
        let fs = if i % 2 == 0 { "erofs" } else { "ext4" };
        let mut child = vmrootfs(&store)
            .args(["-q", "build", &spec, "--tag", &format!("t{i}"), "--fs", fs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*d as u64 * 8)); // 0..2 s
        let _ = child.kill();
        let _ = child.wait();
        // A killed tool may still be finishing a write: give it a few seconds to go, far
        // less than the for-good spinning this guards against.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut left = live_processes_mentioning(&store);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            left = live_processes_mentioning(&store);
        }
        assert!(left.is_empty(), "tools outlived the killed build {i} by 10 s: {left:?}");
        let (ok, _, err) = run(vmrootfs(&store).arg("ls"));
        assert!(ok, "ls after kill {i}: {err}");
        let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
        assert!(ok, "verify after kill {i} (at {} ms): {err}", *d as u64 * 8);
    }
    for fs in ["erofs", "ext4"] {
        let (ok, out, err) =
            run(vmrootfs(&store).args(["build", &spec, "--tag", "final", "--fs", fs, "--json"]));
        assert!(ok, "rebuild: {err}");
        let result: serde_json::Value = serde_json::from_str(&out).unwrap();
        let lowers: Vec<(PathBuf, String)> =
            lower_paths(&result).into_iter().map(|p| (p, fs.to_string())).collect();
        let stack = MountedStack::mount(&lowers);
        let diffs = diff_trees(&img.join("reference/rootfs"), stack.root());
        assert!(diffs.is_empty(), "rebuild after kills differs:\n{}", diffs.join("\n"));
    }
    let (ok, _, err) = run(vmrootfs(&store).arg("gc"));
    assert!(ok, "{err}");
    assert_eq!(tmp_entries(&store), 0);
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{err}");
}

/// Command lines of running (not zombie) processes that name `path`.
fn live_processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir = entry.path();
        let (Ok(stat), Ok(cmdline)) =
            (std::fs::read_to_string(dir.join("stat")), std::fs::read(dir.join("cmdline")))
        else {
            continue; // not a process, or gone meanwhile
        };
        let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if state != Some("Z") && cmdline.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

/// The blob paths a store reached at `store` gives for tag `tag` (`inspect --json`).
fn inspect_paths(store: &Path, tag: &str) -> Vec<PathBuf> {
    let (ok, out, err) = run(vmrootfs(store).args(["inspect", tag, "--json"]));
    assert!(ok, "inspect {tag}: {err}");
    lower_paths(&serde_json::from_str(&out).unwrap())
}

/// Item 1 of issue 10: a build through a symlink to the store, then `gc` through the real
/// path (and through a `..` spelling) must keep every blob a record references.
#[test]
fn gc_through_another_spelling_of_the_store_keeps_live_blobs() {
    let dir = scratch("spelling");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let dotdot = dir.path().join("sub/../real");

    let result = build(&link, &layout, "t");
    let blobs = blobs_on_disk(&real);
    assert_eq!(blobs.len(), 2, "{blobs:?}");
    for store in [&real, &dotdot, &link] {
        let (ok, out, err) = run(vmrootfs(store).args(["gc", "--json"]));
        assert!(ok, "gc via {}: {err}", store.display());
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["layers"], 0, "gc via {} removed live blobs: {report}", store.display());
        assert_eq!(blobs_on_disk(&real), blobs, "gc via {}", store.display());
        let (ok, _, err) = run(vmrootfs(store).arg("verify"));
        assert!(ok, "verify via {} after gc: {err}", store.display());
    }
    // `build --json` gives absolute paths, under the store as it was spelled.
    for p in lower_paths(&result) {
        assert!(p.is_absolute() && p.starts_with(&link) && p.exists(), "{}", p.display());
    }
    // Records hold no path: nothing in them names the store's location.
    for entry in std::fs::read_dir(real.join("images")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("\"path\""), "an image record holds a path: {text}");
    }
}

/// Item 1 of issue 10: a store moved with `mv` is the same store.
#[test]
fn a_moved_store_still_inspects_verifies_and_collects() {
    let dir = scratch("moved");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    build(&old, &layout, "t");
    let (ok, _, err) = run(Command::new("mv").arg(&old).arg(&new));
    assert!(ok, "{err}");
    let paths = inspect_paths(&new, "t");
    assert_eq!(paths.len(), 2);
    for p in &paths {
        assert!(p.starts_with(&new) && p.exists(), "inspect gives {} after the move", p.display());
    }
    let (ok, _, err) = run(vmrootfs(&new).arg("verify"));
    assert!(ok, "verify after the move: {err}");
    let (ok, out, err) = run(vmrootfs(&new).args(["gc", "--json"]));
    assert!(ok, "{err}");
    assert!(out.contains("\"layers\": 0"), "gc after the move removed live blobs: {out}");
    assert_eq!(blobs_on_disk(&new).len(), 2);
}

/// Item 7 of issue 10: a blob whose `.json` sidecar is gone (gc interrupted midway) counts as
/// not stored: the next build converts it again instead of failing.
#[test]
fn a_blob_without_its_record_sidecar_is_converted_again() {
    let dir = scratch("sidecar");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let lowers = lower_paths(&build(&store, &layout, "first"));
    let sidecar = lowers[1].with_extension("json");
    std::fs::remove_file(&sidecar).unwrap();

    let (ok, out, err) = run(vmrootfs(&store).args([
        "build",
        &format!("oci:{}:t", layout.display()),
        "--tag",
        "second",
        "--json",
    ]));
    assert!(ok, "build after losing {}: {err}", sidecar.display());
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["cached"], false, "the layer without its sidecar is converted again");
    assert_eq!(err.matches("stored, skipped").count(), 1, "{err}");
    assert!(sidecar.exists(), "the sidecar is published again");
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{err}");
}

/// Item 8 of issue 10: only sha256 digests are accepted from configs and manifests; a diff_id
/// `foo:<hex of a stored chain>` must not pass for the stored layer.
#[test]
fn digests_that_are_not_sha256_are_refused_with_the_field_named() {
    let dir = scratch("digests");
    let store = dir.path().join("store");
    let good = dir.path().join("good");
    oci_layout(&good, "t", &[small_layer("x")]);
    build(&store, &good, "good");

    type Case = (&'static str, fn(&mut Layer), &'static [&'static str]);
    let cases: [Case; 4] = [
        (
            "foreign algorithm in a diff_id",
            |l| l.diff_id = format!("foo:{}", &l.diff_id[7..]),
            &["rootfs.diff_ids[0]", "foo:"],
        ),
        (
            "sha512 diff_id",
            |l| l.diff_id = format!("sha512:{}", "ab".repeat(64)),
            &["rootfs.diff_ids[0]", "sha512", "sha256"],
        ),
        ("malformed diff_id", |l| l.diff_id = format!("sha256:{}", "AB".repeat(32)), &["rootfs.diff_ids[0]"]),
        (
            "sha512 layer digest",
            |l| l.digest = format!("sha512:{}", "cd".repeat(64)),
            &["layers[0].digest", "sha512"],
        ),
    ];
    for (what, spoil, wanted) in cases {
        let layout = dir.path().join(what.replace(' ', "-"));
        let mut layer = small_layer("x");
        spoil(&mut layer);
        oci_layout(&layout, "t", &[layer]);
        let (ok, out, err) = run(vmrootfs(&store).args(["build", &format!("oci:{}:t", layout.display())]));
        assert!(!ok, "{what}: build succeeded: {out}{err}");
        eprintln!("{what}: {}", err.trim());
        assert!(!err.contains("stored, skipped") && !err.contains("panicked"), "{what}: {err}");
        for w in wanted {
            assert!(err.contains(w), "{what}: the error names {w:?}: {err}");
        }
    }
    let (ok, out, _) = run(vmrootfs(&store).args(["ls", "--json"]));
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().len(), 1);
}

/// Item 12 of issue 10: `vm/` is a cache rebuilt on demand; gc empties it.
#[test]
fn gc_empties_the_vm_cache() {
    let dir = scratch("vmcache");
    let store = dir.path().join("store");
    let (ok, _, err) = run(vmrootfs(&store).arg("ls"));
    assert!(ok, "{err}");
    std::fs::create_dir_all(store.join("vm")).unwrap();
    std::fs::write(store.join("vm").join(format!("vmlinux-{}", "ab".repeat(32))), b"\x7fELF stale").unwrap();
    let (ok, out, err) = run(vmrootfs(&store).args(["gc", "--json"]));
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["vm"], 1, "{report}");
    assert_eq!(std::fs::read_dir(store.join("vm")).unwrap().count(), 0);
}

/// Item 6 of issue 10: an image with no layers must not panic, with or without `--squash`.
#[test]
fn a_zero_layer_image_gives_a_clear_answer_not_a_panic() {
    let dir = scratch("zero");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[]);
    let store = dir.path().join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, _, err) = run(vmrootfs(&store).args(["build", &spec, "--tag", "squashed", "--squash"]));
    assert!(!err.contains("panicked"), "{err}");
    assert!(!ok && err.contains("no layers"), "--squash of a zero-layer image: {err}");
    eprintln!("--squash of a zero-layer image: {}", err.trim());
    let (ok, out, err) = run(vmrootfs(&store).args(["build", &spec, "--tag", "plain", "--json"]));
    assert!(!err.contains("panicked"), "{err}");
    assert!(ok, "a zero-layer image without --squash builds: {err}");
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["lowers"].as_array().unwrap().len(), 0);
    let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{err}");
}

/// The store's lock protocol as the commands keep it: a build runs beside a holder of the
/// shared store lock; `gc` and `rm` wait for it ("waiting for lock on …") and finish once it
/// is released; a build waits for a holder of the exclusive lock.
#[test]
fn commands_keep_the_store_lock_protocol() {
    let dir = scratch("lock-protocol");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[small_layer("a")]);
    let store = dir.path().join("store");
    build(&store, &layout, "first");
    let spawn = |args: &[&str]| {
        vmrootfs(&store).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let still_running = |child: &mut std::process::Child| {
        std::thread::sleep(Duration::from_millis(1500));
        child.try_wait().unwrap().is_none()
    };
    let finish = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let spec = format!("oci:{}:t", layout.display());

    let shared = vmrootfs::Store::open(&store).unwrap().lock_shared().unwrap();
    let (ok, err) = finish(spawn(&["build", &spec, "--tag", "second"]));
    assert!(ok, "a build runs beside a shared holder: {err}");
    let mut gc = spawn(&["gc"]);
    let mut rm = spawn(&["rm", "first"]);
    assert!(still_running(&mut gc), "gc waits for the shared holder");
    assert!(still_running(&mut rm), "rm waits for the shared holder");
    drop(shared);
    for (name, child) in [("gc", gc), ("rm", rm)] {
        let (ok, err) = finish(child);
        assert!(ok && err.contains("waiting for lock on"), "{name}: {err}");
    }

    let exclusive = vmrootfs::Store::open(&store).unwrap().lock_exclusive().unwrap();
    let mut b = spawn(&["build", &spec, "--tag", "third"]);
    assert!(still_running(&mut b), "a build waits for the exclusive holder");
    drop(exclusive);
    let (ok, err) = finish(b);
    assert!(ok && err.contains("waiting for lock on"), "build: {err}");
}

/// `build --verity` of the real image into `store` (with `extra` arguments); the result.
fn build_real(store: &Path, extra: &[&str]) -> serde_json::Value {
    let spec = format!("oci:{}/oci:test", image().display());
    let (ok, out, err) = run(vmrootfs(store).args(["build", &spec, "--tag", "deb", "--json"]).args(extra));
    assert!(ok, "build {extra:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// `blob ‖ tree` of a lower (the layer `push` uploads), written to `out`.
fn blob_and_tree(lower: &serde_json::Value, out: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(lower["path"].as_str().unwrap()).unwrap();
    bytes.extend(std::fs::read(lower["verity_tree"].as_str().unwrap()).unwrap());
    std::fs::write(out, &bytes).unwrap();
    bytes
}

/// `veritysetup verify --hash-offset` of `blob ‖ tree` with the recorded root digest: the
/// layout and annotations of the EROFS image layer format (§3.5).
fn veritysetup_verify(combined: &Path, verity: &serde_json::Value) -> (bool, String) {
    let root = verity["root_digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
    let offset = format!("--hash-offset={}", verity["hash_offset"]);
    let (ok, _, err) =
        run(Command::new("veritysetup").args(["verify", &offset]).arg(combined).arg(combined).arg(root));
    (ok, err)
}

#[test]
fn verity_trees_are_reproducible_accepted_by_veritysetup_and_checked_by_verify() {
    let dir = scratch("verity");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let ra = build_real(&a, &["--verity"]);
    // Store b: a plain build first; --verity then adds only the trees, beside the same blobs.
    let plain = build_real(&b, &[]);
    assert!(plain["lowers"][0].get("verity").is_none(), "a plain build records no tree");
    let rb = build_real(&b, &["--verity"]);
    assert_eq!(rb["cached"], false, "making the trees is work");
    assert_eq!(build_real(&b, &["--verity"])["cached"], true, "stored trees: no work");
    let la = ra["lowers"].as_array().unwrap();
    let lb = rb["lowers"].as_array().unwrap();
    assert_eq!(la.len(), 4);
    for (i, (x, y)) in la.iter().zip(lb).enumerate() {
        assert_eq!(y["path"], plain["lowers"][i]["path"], "lower {i}: the plain blob is shared");
        assert_eq!(x["blob_sha256"], y["blob_sha256"], "lower {i}: same blob in both stores");
        assert_eq!(x["verity"], y["verity"], "lower {i}: same tree record (root digest) in both stores");
        let v = &x["verity"];
        assert_eq!(v["hash_offset"], x["size"], "lower {i}: the tree follows the blob");
        assert_eq!(v["hash_offset"].as_u64().unwrap() % 4096, 0);
        assert_eq!(
            v["salt"].as_str().unwrap(),
            x["chain_id"].as_str().unwrap().strip_prefix("sha256:").unwrap()
        );
        let (ca, cb) = (dir.path().join(format!("a{i}")), dir.path().join(format!("b{i}")));
        let bytes = blob_and_tree(x, &ca);
        assert!(bytes == blob_and_tree(y, &cb), "lower {i}: blob ‖ tree byte-identical across stores");
        assert_eq!(
            sha256(&bytes),
            format!("sha256:{}", v["sha256"].as_str().unwrap()),
            "lower {i}: recorded sha256 of blob ‖ tree"
        );
        let (ok, err) = veritysetup_verify(&ca, v);
        assert!(ok, "lower {i}: veritysetup verify accepts the recorded offset and root: {err}");
        std::fs::remove_file(&cb).unwrap();
    }
    let (ok, out, err) = run(vmrootfs(&a).args(["inspect", "deb", "--json"]));
    assert!(ok, "{err}");
    let inspected: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspected["lowers"], ra["lowers"], "inspect --json gives the same lowers as build --json");
    // The data part of each verity lower is the filesystem: the stack equals the reference.
    let stack = MountedStack::mount(&lowers_of(&ra));
    let diffs = diff_trees(&image().join("reference/rootfs"), stack.root());
    assert!(diffs.is_empty(), "the verity stack differs from umoci unpack:\n{}", diffs.join("\n"));
    drop(stack);

    let (ok, _, err) = run(vmrootfs(&a).arg("verify"));
    assert!(ok, "a fresh --verity store verifies: {err}");
    // One flipped byte in lower 2's data.
    let victim = PathBuf::from(la[2]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&victim, &bytes).unwrap();
    let (ok, _, err) = run(vmrootfs(&a).arg("verify"));
    assert!(!ok, "verify fails");
    let named = format!("lower 2 (chain {}): dm-verity root digest", la[2]["chain_id"].as_str().unwrap());
    assert!(err.contains(&named), "verify names the lower whose root digest changed: {err}");
    assert!(!err.contains("lower 0 (") && !err.contains("lower 1 (") && !err.contains("lower 3 ("), "{err}");
    let bad = dir.path().join("bad");
    blob_and_tree(&la[2], &bad);
    let (ok, _) = veritysetup_verify(&bad, &la[2]["verity"]);
    assert!(!ok, "veritysetup verify refuses the flipped byte too");
}

#[test]
fn ext4_lowers_get_verity_trees_too() {
    let dir = scratch("verity-ext4");
    let result = build_real(&dir.path().join("s"), &["--verity", "--fs", "ext4"]);
    for (i, l) in result["lowers"].as_array().unwrap().iter().enumerate() {
        let combined = dir.path().join(format!("l{i}"));
        blob_and_tree(l, &combined);
        let (ok, err) = veritysetup_verify(&combined, &l["verity"]);
        assert!(ok, "ext4 lower {i}: veritysetup verify accepts it: {err}");
        std::fs::remove_file(&combined).unwrap();
    }
    let (ok, _, err) = run(vmrootfs(&dir.path().join("s")).arg("verify"));
    assert!(ok, "{err}");
}

/// Builds `layout:t` as `tag` with `extra` arguments: (success, result, stderr).
fn build_with(store: &Path, layout: &Path, tag: &str, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let (ok, out, err) = run(vmrootfs(store)
        .args(["build", &format!("oci:{}:t", layout.display()), "--tag", tag, "--json"])
        .args(extra));
    (ok, serde_json::from_str(&out).unwrap_or_default(), err)
}

/// Makes a store file writable and sets its bytes.
fn overwrite(path: &Path, bytes: &[u8]) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// `path` with `.ext` in place of the blob's extension (its sidecars).
fn beside(path: &Path, ext: &str) -> PathBuf {
    path.with_extension(ext)
}

/// Issue 17 item 3: `verify` checks a blob against every record naming it, not the first.
#[test]
fn verify_checks_every_record_that_names_a_blob() {
    let dir = scratch("verify-every-record");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x")]);
    let store = dir.path().join("store");
    build(&store, &layout, "a");
    build(&store, &layout, "b");
    let record = store.join("images/b.json");
    let mut b: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    b["lowers"][0]["blob_sha256"] = "00".repeat(32).into();
    overwrite(&record, &serde_json::to_vec(&b).unwrap());
    let (ok, out, err) = run(vmrootfs(&store).args(["verify", "--json"]));
    assert!(!ok, "the record of b does not match its blob: {err}");
    let bad: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bad.as_array().unwrap().len(), 1, "{bad}");
    assert_eq!(bad[0]["tags"], serde_json::json!(["b"]), "{bad}");
    assert!(bad[0]["problem"].as_str().unwrap().contains(&"00".repeat(32)), "{bad}");
}

/// Issue 17 item 2 (trees): a `.verity.json` and tree that belong to other bytes are never
/// reused for a blob: `build --verity` makes the blob's own tree.
#[test]
fn a_verity_tree_is_only_reused_beside_its_own_blob() {
    let dir = scratch("verity-beside");
    let (lx, ly) = (dir.path().join("x"), dir.path().join("y"));
    oci_layout(&lx, "t", &[small_layer("x")]);
    oci_layout(&ly, "t", &[small_layer("y")]);
    let reference = dir.path().join("reference");
    let (ok, want, err) = build_with(&reference, &lx, "x", &["--verity"]);
    assert!(ok, "{err}");
    let store = dir.path().join("store");
    let x = build(&store, &lx, "x");
    let (ok, y, err) = build_with(&store, &ly, "y", &["--verity"]);
    assert!(ok, "{err}");
    let (xp, yp) = (&lower_paths(&x)[0], &lower_paths(&y)[0]);
    for ext in ["verity", "verity.json"] {
        std::fs::copy(beside(yp, ext), beside(xp, ext)).unwrap();
    }
    let (ok, xv, err) = build_with(&store, &lx, "xv", &["--verity"]);
    assert!(ok, "{err}");
    assert_eq!(xv["lowers"][0]["verity"], want["lowers"][0]["verity"], "the blob's own tree: {err}");
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{out}{err}");
}

/// Issue 17 item 21: `verify` reports each damaged file a record depends on (a layer's
/// `.json`, `.dirs`, `.verity.json`), naming it and how to repair it.
#[test]
fn verify_reports_damaged_sidecars_and_how_to_repair_them() {
    let dir = scratch("verify-sidecars");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let (ok, built, err) = build_with(&store, &layout, "t", &["--verity"]);
    assert!(ok, "{err}");
    let blob = &lower_paths(&built)[0];
    for ext in ["json", "dirs", "verity.json"] {
        let path = beside(blob, ext);
        let whole = std::fs::read(&path).unwrap();
        overwrite(&path, &whole[..whole.len() / 2]);
        let (ok, out, err) = run(vmrootfs(&store).args(["verify", "--json"]));
        assert!(!ok, "a cut .{ext} is reported: {err}");
        assert!(err.contains(&path.display().to_string()) && err.contains("to repair"), "{ext}: {err}");
        let bad: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(bad[0]["repair"].as_str().unwrap().contains("vmrootfs build"), "{bad}");
        overwrite(&path, &whole);
    }
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{out}{err}");
}

/// A store written before the `.own` sidecar was dropped: a layer record naming the
/// `own_sha256` of an `.own` beside its blob. The layer is reused by a build with the `.own`
/// there, cut or gone (nothing reads it); `verify` passes whatever the `.own` holds; `rm`
/// deletes the `.own` with its blob. A new conversion writes no `.own`.
#[test]
fn an_old_stores_own_sidecar_is_ignored_and_removed_with_its_blob() {
    let dir = scratch("old-own");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let (ok, built, err) = build_with(&store, &layout, "a", &["--fs", "erofs"]);
    assert!(ok, "{err}");
    let blobs = lower_paths(&built);
    for blob in &blobs {
        assert!(beside(blob, "dirs").exists() && !beside(blob, "own").exists(), "{}", blob.display());
    }
    // What an older version left: `.own` files and their sha256 in the records.
    let own_text = b"2 \n0 x\n";
    for blob in &blobs {
        std::fs::write(beside(blob, "own"), own_text).unwrap();
        let json = beside(blob, "json");
        let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        record["own_sha256"] = sha256(own_text)[7..].to_string().into();
        overwrite(&json, &serde_json::to_vec(&record).unwrap());
    }
    let (ok, again, err) = build_with(&store, &layout, "b", &["--fs", "erofs"]);
    assert!(ok, "{err}");
    assert_eq!(again["cached"], true, "the layers with an .own are reused: {err}");
    overwrite(&beside(&blobs[0], "own"), b"cut");
    std::fs::remove_file(beside(&blobs[1], "own")).unwrap();
    let (ok, again, err) = build_with(&store, &layout, "c", &["--fs", "erofs"]);
    assert!(ok, "{err}");
    assert_eq!(again["cached"], true, "a cut or missing .own is not damage: {err}");
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "verify ignores the .own: {out}{err}");
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "a", "b", "c"]));
    assert!(ok, "{err}");
    assert!(!blobs[0].exists() && !beside(&blobs[0], "own").exists(), "the .own goes with its blob");
    assert!(!beside(&blobs[0], "json").exists() && !beside(&blobs[0], "dirs").exists());
}

/// Issue 17 item 21: a build never reuses a blob one byte short or a cut dm-verity tree, and
/// repairs a layer whose sidecars are damaged by converting it again.
#[test]
fn a_build_repairs_damaged_layers_instead_of_reusing_them() {
    let dir = scratch("build-repairs");
    let layout = dir.path().join("l");
    oci_layout(&layout, "t", &[small_layer("x"), small_layer("y")]);
    let store = dir.path().join("store");
    let (ok, built, err) = build_with(&store, &layout, "t", &["--verity"]);
    assert!(ok, "{err}");
    let blobs = lower_paths(&built);
    let damages: [(&str, PathBuf); 4] = [
        ("a cut .dirs", beside(&blobs[0], "dirs")),
        ("a cut .json", beside(&blobs[1], "json")),
        ("a blob one byte short", blobs[0].clone()),
        ("a cut tree", beside(&blobs[1], "verity")),
    ];
    for (n, (what, path)) in damages.iter().enumerate() {
        let whole = std::fs::read(path).unwrap();
        let cut = if path == &blobs[0] { whole.len() - 1 } else { whole.len() / 2 };
        overwrite(path, &whole[..cut]);
        let (ok, again, err) = build_with(&store, &layout, &format!("t{n}"), &["--verity"]);
        assert!(ok, "build after {what}: {err}");
        assert_eq!(again["lowers"], built["lowers"], "{what}: the same blobs and trees");
        assert_eq!(std::fs::read(path).unwrap(), whole, "{what} is repaired: {err}");
        let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
        assert!(ok, "verify after {what}: {out}{err}");
    }
}
/// Mount points under `under` in the mount table `mountinfo` (a /proc/…/mountinfo file),
/// with their filesystem type.
fn mounts_under(mountinfo: &Path, under: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(mountinfo) else { return Vec::new() }; // gone meanwhile
    let under = under.to_string_lossy().into_owned();
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let point = fields.get(4)?.replace("\\040", " ");
            let fstype = fields.iter().skip_while(|f| **f != "-").nth(1)?.to_string();
            point.starts_with(&under).then_some((point, fstype))
        })
        .collect()
}

/// Loop devices whose backing file is under `under`.
fn loops_under(under: &Path) -> Vec<String> {
    let under = under.to_string_lossy().into_owned();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|f| f.starts_with(&under))
        .collect()
}

/// Unmounts (lazily, deepest first) whatever a failing test left mounted under a directory.
struct UnmountUnder(PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let mut left = mounts_under(Path::new("/proc/self/mountinfo"), &self.0);
        left.reverse();
        for (point, _) in left {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
    }
}

/// Item 10 of issue 17: a `build --squash` SIGKILLed while its overlay is mounted leaves no
/// mount (the mounts live in a mount namespace of its own, which dies with it) and no loop
/// device; then `gc` and `rm` succeed.
#[test]
fn a_squash_killed_mid_way_leaves_no_mount_and_gc_and_rm_succeed() {
    let dir = scratch("squash-kill");
    let store = dir.path().join("store");
    let _cleanup = UnmountUnder(dir.path().to_owned());
    let layout = dir.path().join("layout");
    let layers: Vec<Layer> = (0..3).map(|i| big_layer(&format!("big{i}"), 48 << 20, 7 + i)).collect();
    oci_layout(&layout, "t", &layers);
    build(&store, &layout, "t");
    let mut child = vmrootfs(&store)
        .args(["-q", "build", &format!("oci:{}:t", layout.display()), "--tag", "t", "--squash"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = store.join("tmp");
    // Mid-way: the squash's overlay is mounted, in whichever of its threads' mount tables.
    let tasks = PathBuf::from(format!("/proc/{}/task", child.id()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let overlays: Vec<(String, String)> = std::fs::read_dir(&tasks)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|t| mounts_under(&t.path().join("mountinfo"), &tmp))
            .filter(|(_, fstype)| fstype == "overlay")
            .collect();
        if !overlays.is_empty() || child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break overlays;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(child.try_wait().unwrap().is_none(), "the squash ended before its overlay was seen");
    assert!(!seen.is_empty(), "no overlay mount of the squash seen under {}", tmp.display());
    eprintln!("killing the squash with {seen:?} mounted");
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel tears a dead namespace's mounts and their loop devices down on its own
    // schedule: wait for it (bounded), never unmount by hand.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (!mounts_under(Path::new("/proc/self/mountinfo"), &store).is_empty()
        || !loops_under(&store).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = mounts_under(Path::new("/proc/self/mountinfo"), &store);
    assert!(left.is_empty(), "mounts left after the killed squash: {left:?}");
    let loops = loops_under(&store);
    assert!(loops.is_empty(), "loop devices left after the killed squash: {loops:?}");
    let (ok, _, err) = run(vmrootfs(&store).arg("gc"));
    assert!(ok, "gc after the killed squash: {err}");
    assert_eq!(tmp_entries(&store), 0, "gc cleared tmp/");
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "t"]));
    assert!(ok, "rm after the killed squash: {err}");
    assert_eq!(blobs_on_disk(&store), BTreeSet::new(), "rm removed the blobs of t");
}

/// Item 10 of issue 17: with something mounted under `tmp/` (as a killed squash of an older
/// vmrootfs left it), `rm` and `gc` refuse before deleting anything, naming the mount; the
/// tag and its blobs are still there, and once it is unmounted both succeed.
#[test]
fn rm_and_gc_refuse_before_deleting_anything_while_tmp_holds_a_mount() {
    let dir = scratch("tmp-mount");
    let store = dir.path().join("store");
    let _cleanup = UnmountUnder(dir.path().to_owned());
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[small_layer("a"), small_layer("b")]);
    build(&store, &layout, "t");
    let blobs = blobs_on_disk(&store);
    let point = store.join("tmp/squash-mnt-left/l0");
    std::fs::create_dir_all(&point).unwrap();
    let (ok, _, err) = run(Command::new("mount").args(["-t", "tmpfs", "-o", "ro", "left"]).arg(&point));
    assert!(ok, "mount: {err}");
    for args in [&["rm", "t"][..], &["gc"]] {
        let (ok, _, err) = run(vmrootfs(&store).args(args));
        assert!(!ok, "{args:?} succeeded with {} mounted", point.display());
        assert!(
            err.contains(point.to_str().unwrap()) && err.contains("nothing was removed"),
            "{args:?}: {err}"
        );
        let (ok, out, _) = run(vmrootfs(&store).arg("ls"));
        assert!(ok && out.contains('t'), "{args:?} removed the tag: {out}");
        assert_eq!(blobs_on_disk(&store), blobs, "{args:?} deleted blobs");
    }
    let (ok, _, err) = run(Command::new("umount").arg(&point));
    assert!(ok, "umount: {err}");
    let (ok, _, err) = run(vmrootfs(&store).args(["rm", "t"]));
    assert!(ok, "rm once unmounted: {err}");
    assert_eq!(blobs_on_disk(&store), BTreeSet::new());
    assert_eq!(tmp_entries(&store), 0);
}

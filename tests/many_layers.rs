//! Images with many layers (issue 17, item 11): OCI sets no limit, Docker stops at 127. A
//! 128-layer image made here, each layer adding, changing and now and then whiting out or
//! making opaque what the layers below hold, goes through every form vmrootfs makes: the
//! layer stacks (erofs and ext4), `--squash` (both), `--merge`, and `run` (which boots the
//! merged image: the stack needs more drives than microvm has) and `run --merged`. Each
//! form's tree is compared with `umoci unpack` of the same image (the layers applied in order
//! by an independent tool).

mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::treediff::diff_trees;
use fixture::*;

/// More than Docker's 127, and more than microvm's 24 virtio-mmio slots.
const LAYERS: u64 = 128;

fn dir_at(path: &str, mode: u32, k: u64) -> Entry {
    Entry::Dir { path: path.as_bytes().to_vec(), mode, uid: 0, mtime: 1_600_000_000 + k }
}

fn file_at(path: &str, mode: u32, data: &[u8], k: u64) -> Entry {
    Entry::File { path: path.as_bytes().to_vec(), mode, data: data.to_vec(), mtime: 1_600_000_000 + k }
}

/// Layer `k` (base = 0). Each one adds `data/k<k>` and rewrites `etc/counter`; every third
/// whites out the previous layer's file; every tenth makes `opq/` opaque and adds its own
/// file there; every seventh adds a directory and a symlink, every eleventh a hardlink (unless the next whites it out), every
/// thirteenth changes the mode of `modes/`. Every parent is listed, with the layer's mtime.
fn layer(k: u64) -> Layer {
    let mut e = Vec::new();
    if k == 0 {
        let busybox = std::fs::read("/bin/busybox").expect("a static /bin/busybox (busybox-static)");
        e.push(dir_at("bin", 0o755, k));
        e.push(file_at("bin/busybox", 0o755, &busybox, k));
        for d in ["proc", "sys", "dev", "links", "modes"] {
            e.push(dir_at(d, 0o755, k));
        }
        e.push(dir_at("opq", 0o755, k));
        e.push(file_at("opq/base", 0o644, b"base\n", k));
    }
    e.push(dir_at("etc", 0o755, k));
    e.push(file_at("etc/counter", 0o644, format!("{k}\n").as_bytes(), k));
    e.push(dir_at("data", 0o755, k));
    let name = format!("data/k{k}");
    e.push(file_at(&name, 0o600 + (k % 8) as u32 * 0o10, format!("layer {k}\n").as_bytes(), k));
    if k.is_multiple_of(3) && k > 0 {
        e.push(file_at(&format!("data/.wh.k{}", k - 1), 0o644, b"", k));
    }
    if k.is_multiple_of(10) && k > 0 {
        e.push(dir_at("opq", 0o755, k));
        e.push(file_at("opq/.wh..wh..opq", 0o644, b"", k));
        e.push(file_at(&format!("opq/from{k}"), 0o644, b"opaque\n", k));
    }
    if k.is_multiple_of(7) {
        e.push(dir_at("links", 0o755, k));
        e.push(dir_at(&format!("links/d{k}"), 0o750, k));
        e.push(symlink(&format!("links/s{k}"), &format!("../data/k{k}")));
    }
    // Not on a file the next layer whites out: overlayfs would count the lower's second link.
    if k.is_multiple_of(11) && !(k + 1).is_multiple_of(3) {
        e.push(hardlink(&format!("data/h{k}"), &name));
    }
    if k.is_multiple_of(13) {
        e.push(dir_at("modes", if k.is_multiple_of(2) { 0o750 } else { 0o711 }, k));
    }
    Layer::gzip(&e)
}

/// The 128-layer image as `<dir>/layout:t`, and `umoci unpack` of it (its rootfs).
fn image_and_reference(dir: &Path) -> (PathBuf, PathBuf) {
    let layout = dir.join("layout");
    let layers: Vec<Layer> = (0..LAYERS).map(layer).collect();
    oci_layout_with_config(&layout, "t", &layers, serde_json::json!({"Cmd": ["/bin/busybox", "sh"]}));
    let bundle = dir.join("bundle");
    let (ok, _, err) = run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(&bundle));
    assert!(ok, "umoci unpack: {err}");
    (layout, bundle.join("rootfs"))
}

/// `build` of the image into `store` with `fs` and `extra`; returns the result JSON.
fn build(store: &Path, layout: &Path, fs: &str, extra: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store)
        .args(["build", &format!("oci:{}:t", layout.display()), "--tag", "t", "--fs", fs, "--json"])
        .args(extra));
    assert!(ok, "build --fs {fs} {extra:?}: {err}");
    serde_json::from_str(&out).expect("build --json prints JSON")
}

fn assert_same(form: &str, reference: &Path, tree: &Path) {
    let diffs = diff_trees(reference, tree);
    assert!(
        diffs.is_empty(),
        "{form} of the 128-layer image differs from umoci unpack ({} differences):\n{}",
        diffs.len(),
        diffs.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
    eprintln!("{form}: same tree as umoci unpack");
}

/// The stacks (erofs, ext4), the squashed blobs (erofs, ext4) and the merged image.
#[test]
fn a_128_layer_image_builds_squashes_and_merges_faithfully() {
    let dir = scratch("many-layers");
    let (layout, reference) = image_and_reference(dir.path());
    // The check is meaningful: whiteouts and opaque directories left things out.
    assert!(!reference.join("data/k2").exists() && reference.join("data/k3").exists());
    assert!(!reference.join("opq/base").exists() && reference.join("opq/from120").exists());
    for fs in ["erofs", "ext4"] {
        let store = dir.path().join(format!("store-{fs}"));
        let result = build(&store, &layout, fs, &[]);
        let lowers = lowers_of(&result);
        assert_eq!(lowers.len(), LAYERS as usize);
        let stack = MountedStack::mount(&lowers);
        assert_same(&format!("{fs} stack"), &reference, stack.root());
        drop(stack);

        let result = build(&store, &layout, fs, &["--squash"]);
        let blob = PathBuf::from(result["squashed"]["path"].as_str().expect("a squashed blob"));
        let squashed = MountedStack::mount(&[(blob, fs.to_string())]);
        assert_same(&format!("{fs} --squash"), &reference, squashed.root());
    }
    let store = dir.path().join("store-erofs");
    let result = build(&store, &layout, "erofs", &["--merge"]);
    let merged = PathBuf::from(result["merged"]["path"].as_str().expect("a merged blob"));
    let layers: Vec<PathBuf> = lowers_of(&result).into_iter().map(|(p, _)| p).collect();
    let mounted = MountedErofs::mount(&merged, &layers);
    assert_same("erofs --merge", &reference, mounted.root());
}

/// Lists the tree from `/` with busybox alone (the image has nothing else): one line per
/// entry (type, mode, owner, mtime, link count and content hash of files, link targets),
/// leaving out /proc, /sys and /dev (mounted over in the guest); then, in the guest, the
/// drives and the root's filesystem type.
const LISTING: &str = r#"b=/bin/busybox
cd /
$b find . -mindepth 1 \( -path ./proc -o -path ./sys -o -path ./dev \) -prune -o -print | $b sort |
while IFS= read -r p; do
  if [ -L "$p" ]; then echo "E $p link $($b readlink "$p") $($b stat -c '%u %g %Y' "$p")"
  elif [ -f "$p" ]; then echo "E $p file $($b stat -c '%a %u %g %s %Y %h' "$p") $($b md5sum < "$p")"
  elif [ -d "$p" ]; then echo "E $p dir $($b stat -c '%a %u %g %Y' "$p")"
  else echo "E $p other $($b stat -c '%F %a %u %g %Y %t:%T' "$p")"; fi
done
if [ -d /sys/block ]; then
  echo "I disks $($b ls /sys/block | $b grep -c '^vd')"
  echo "I vda $($b readlink -f /sys/block/vda)"
  echo "I root $($b awk '$2 == "/" { print $3 }' /proc/mounts)"
fi
"#;

/// The `E` lines of a listing.
fn entries(listing: &str) -> Vec<&str> {
    listing.lines().filter(|l| l.starts_with("E ")).collect()
}

/// The `I <key>` line of a guest listing.
fn info<'a>(listing: &'a str, key: &str) -> &'a str {
    let prefix = format!("I {key} ");
    listing.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {key} in:\n{listing}"))
}

/// `run` of the image: 128 layers are more drives than microvm's virtio-mmio slots, so
/// without `--merge` (or `--squash`) `run` refuses saying how to make a form it can boot;
/// with it, `run` boots the merged image as one drive and says so; `run --merged` boots it as
/// asked. The guest lists the tree, which equals the listing of `umoci unpack` made by the
/// same busybox.
#[test]
fn a_128_layer_image_boots_as_its_stack_and_merged() {
    let dir = scratch("many-layers-boot");
    let (layout, reference) = image_and_reference(dir.path());
    let (ok, expected, err) =
        run(Command::new("chroot").arg(&reference).args(["/bin/busybox", "sh", "-c", LISTING]));
    assert!(ok, "listing the reference: {err}");
    let expected = entries(&expected);
    assert!(expected.len() > 100, "{expected:?}");
    let store = dir.path().join("store");
    build(&store, &layout, "erofs", &[]);
    let (ok, _, err) =
        run(vmrootfs(&store).args(["run", "t", "--timeout", "600", "--", "/bin/busybox", "true"]));
    assert!(!ok && err.contains("128 layers") && err.contains("--merge"), "run of the bare stack: {err}");
    eprintln!("run without a merged or squashed form: {}", err.trim());
    build(&store, &layout, "erofs", &["--merge"]);
    for merged in [false, true] {
        let mut cmd = vmrootfs(&store);
        cmd.args(["run", "t", "--timeout", "600"]);
        if merged {
            cmd.arg("--merged");
        }
        let (ok, listing, err) = run(cmd.args(["--", "/bin/busybox", "sh", "-c", LISTING]));
        let form = if merged { "run --merged" } else { "run" };
        assert!(ok, "{form}: {err}");
        let got = entries(&listing);
        let missing: Vec<_> = expected.iter().filter(|l| !got.contains(l)).take(20).collect();
        let extra: Vec<_> = got.iter().filter(|l| !expected.contains(l)).take(20).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{form}: the guest's tree differs from umoci unpack\nmissing: {missing:#?}\nextra: {extra:#?}"
        );
        let (disks, vda, root) = (info(&listing, "disks"), info(&listing, "vda"), info(&listing, "root"));
        eprintln!("{form}: {} entries as umoci unpack; {disks} disks, vda at {vda}, root {root}", got.len());
        // The merged image is the one lower of an overlay with a tmpfs upper (bf1b6f5), as in
        // every boot form.
        assert_eq!((disks, root), ("1", "overlay"), "{form}: one drive, the merged image");
        let said = err.lines().find(|l| l.contains("booting the merged image"));
        if merged {
            assert_eq!(said, None, "{form}: {err}");
        } else {
            eprintln!(
                "{form}: {}",
                said.unwrap_or_else(|| panic!("{form} did not say what it booted:\n{err}"))
            );
        }
    }
}

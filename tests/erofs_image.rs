//! The EROFS image layer format (issue 11): `push` to real `docker-registry` servers and to OCI
//! layouts, `build` of the pushed images without mkfs, the producer requirements (spec §8.1)
//! walked over what `push` wrote, the consumer requirements (§8.2) over hand-made manifests,
//! and `--use-converted` through the registry's referrers.

mod fixture;

use std::io::Read;
use std::path::{Path, PathBuf};

use fixture::registry::{Registry, reg_get};
use fixture::treediff::diff_trees;
use fixture::*;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn test_image_oci() -> String {
    format!("oci:{}/oci:test", image().display())
}

fn build_json(store: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let (ok, out, err) = run(vmrootfs(store).arg("build").args(args).arg("--json"));
    (ok, serde_json::from_str(&out).unwrap_or_default(), err)
}

fn push_json(store: &Path, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store).arg("push").args(args).arg("--json"));
    assert!(ok, "push {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn blob_hashes(result: &serde_json::Value) -> Vec<String> {
    lowers_of(result).iter().map(|(p, _)| sha256_file_hex(p).unwrap()).collect()
}

/// `vmrootfs` with mkfs.erofs made unavailable.
fn vmrootfs_without_mkfs(store: &Path) -> std::process::Command {
    let mut cmd = vmrootfs(store);
    cmd.env("VMROOTFS_TOOL_MKFS_EROFS", "/nonexistent/mkfs.erofs");
    cmd
}

/// The real test image built into a fresh store: (store dir guard, store path, build result).
fn built_source(name: &str) -> (tempfile::TempDir, PathBuf, serde_json::Value) {
    let dir = scratch(name);
    let store = dir.path().join("src");
    let (ok, r, err) = build_json(&store, &[&test_image_oci(), "--tag", "src"]);
    assert!(ok, "{err}");
    (dir, store, r)
}

/// Must-show 1 (dm-verity aside): push raw and `--zstd` to an anonymous and an htpasswd
/// registry; a fresh store with mkfs absent builds the pushed references into blobs
/// byte-identical to the source store's, whose stack equals the reference tree; pushing twice
/// gives the same manifest digest; pulling then building the tar image stores nothing twice.
#[test]
fn pushed_erofs_images_pull_without_mkfs_into_identical_blobs() {
    let (dir, src, built) = built_source("erofs-push");
    let want = blob_hashes(&built);
    let open = Registry::start(None);
    let locked = Registry::start(Some(("vm", "s3cret")));
    let cases = [
        (&open, "lab/test:erofs", vec![], vec![]),
        (&open, "lab/test:erofs-zstd", vec!["--zstd"], vec![]),
        (&locked, "lab/test:erofs", vec!["--creds", "vm:s3cret"], vec!["--creds", "vm:s3cret"]),
    ];
    for (i, (reg, repo, push_args, pull_args)) in cases.iter().enumerate() {
        let dest = format!("{}/{repo}", reg.addr);
        let mut args = vec!["src", dest.as_str()];
        args.extend(push_args.iter().copied());
        let first = push_json(&src, &args);
        let again = push_json(&src, &args);
        assert_eq!(first["manifest_digest"], again["manifest_digest"], "push is reproducible: {dest}");
        assert!(
            again["layers"].as_array().unwrap().iter().all(|l| l["existed"] == true),
            "nothing sent twice"
        );

        let store = dir.path().join(format!("pulled{i}"));
        let (ok, out, err) =
            run(vmrootfs_without_mkfs(&store).args(["build", &dest, "--json"]).args(pull_args));
        assert!(ok, "pull {dest} without mkfs: {err}");
        let pulled: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(blob_hashes(&pulled), want, "{dest}: the same blobs as the local conversion");
        assert_eq!(pulled["manifest_digest"], first["manifest_digest"]);
        assert!(err.contains("fetched, no conversion"), "{err}");
        if i == 0 {
            let stack = MountedStack::mount(&lowers_of(&pulled));
            let diffs = diff_trees(&image().join("reference/rootfs"), stack.root());
            assert!(diffs.is_empty(), "pulled stack differs from the reference:\n{}", diffs.join("\n"));
            // The pulled blobs sit under the keys a local conversion uses: building the tar
            // image afterwards adds no blob.
            let (ok, tar, err) = build_json(&store, &[&test_image_oci(), "--tag", "tar"]);
            assert!(ok, "{err}");
            assert_eq!(blob_hashes(&tar), want);
            let blobs =
                std::fs::read_dir(store.join(format!("layers/erofs-v{}", vmrootfs::FsType::Erofs.recipe())))
                    .unwrap()
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
                    .count();
            assert_eq!(blobs, 4, "one blob per layer, not two");
        }
    }
    // Nor does converting the tar image need mkfs: vmrootfs writes EROFS itself, the same
    // bytes as the source store's.
    let (ok, out, err) = run(vmrootfs_without_mkfs(&dir.path().join("tar-without-mkfs")).args([
        "build",
        &test_image_oci(),
        "--json",
    ]));
    assert!(ok, "a tar build without mkfs: {err}");
    assert_eq!(blob_hashes(&serde_json::from_str(&out).unwrap()), want);
    // A second pull of a stored image fetches no layer.
    let pushed = push_json(&src, &["src", &format!("{}/lab/test:erofs", open.addr)]);
    let layer_digests: Vec<String> = pushed["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let gets = || layer_digests.iter().map(|d| open.blob_gets_in("lab/test", d)).sum::<usize>();
    let before = gets();
    let (ok, again, err) =
        build_json(&dir.path().join("pulled0"), &[&format!("{}/lab/test:erofs", open.addr)]);
    assert!(ok, "{err}");
    assert_eq!(again["cached"], true);
    assert_eq!(gets(), before, "the second pull fetched no layer blob");
}

/// `push` of an ext4 image is refused, naming the reason.
#[test]
fn an_ext4_image_is_not_pushed() {
    let dir = scratch("erofs-push-ext4");
    let store = dir.path().join("s");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    let (ok, _, err) = build_json(
        &store,
        &[&format!("oci-archive:{}:busybox", demo.display()), "--tag", "bb", "--fs", "ext4"],
    );
    assert!(ok, "{err}");
    let (ok, _, err) =
        run(vmrootfs(&store).args(["push", "bb", &format!("oci:{}", dir.path().join("out").display())]));
    assert!(!ok);
    assert!(err.contains("ext4 image") && err.contains("EROFS"), "{err}");
    assert!(!dir.path().join("out/index.json").exists(), "nothing written");
}

/// Reads a layout's blob.
fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())).unwrap()
}

/// The manifest and config a layout's only (or `tag`'s) index entry names, and the entry.
fn layout_image(layout: &Path, tag: &str) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .cloned()
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(layout, entry["digest"].as_str().unwrap())).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(layout, manifest["config"]["digest"].as_str().unwrap())).unwrap();
    (entry, manifest, config)
}

/// Must-show 2, producers: spec §8.1 item by item over what `push` wrote (raw and `--zstd`).
#[test]
fn pushed_manifests_meet_the_producer_requirements() {
    let (dir, src, built) = built_source("erofs-producer");
    let layout = dir.path().join("layout");
    push_json(&src, &["src", &format!("oci:{}:raw", layout.display()), "--media-type", "spec"]);
    push_json(&src, &["src", &format!("oci:{}:zstd", layout.display()), "--zstd", "--media-type", "spec"]);
    let source_config: serde_json::Value = {
        let l = image().join("oci");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
        let m: serde_json::Value =
            serde_json::from_slice(&blob(&l, index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
        serde_json::from_slice(&blob(&l, m["config"]["digest"].as_str().unwrap())).unwrap()
    };
    let lowers = built["lowers"].as_array().unwrap();
    for (tag, zstd) in [("raw", false), ("zstd", true)] {
        let (entry, manifest, config) = layout_image(&layout, tag);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), lowers.len());
        assert_eq!(manifest["mediaType"], MANIFEST_TYPE);
        for (i, l) in layers.iter().enumerate() {
            let a = &l["annotations"];
            // 1. EROFS media type; roles as in the spec's multi-layer example (§11.1).
            let want_type = if zstd { "application/vnd.erofs+zstd" } else { "application/vnd.erofs" };
            assert_eq!(l["mediaType"], want_type, "{tag} layer {i}");
            if i + 1 < layers.len() {
                assert_eq!(a["org.erofs.role"], "overlay-lower", "{tag} layer {i}");
            } else {
                // 11. The last layer is a mountable EROFS layer (role-less).
                assert!(a.get("org.erofs.role").is_none(), "{tag}: the top layer is role-less");
            }
            // The descriptor names the blob's bytes.
            let bytes = blob(&layout, l["digest"].as_str().unwrap());
            assert_eq!(sha256(&bytes), l["digest"].as_str().unwrap());
            assert_eq!(bytes.len() as u64, l["size"].as_u64().unwrap());
            // 7. The uncompressed digest, equal to rootfs.diff_ids and to the stored blob.
            let unpacked = if zstd {
                let mut out = Vec::new();
                zstd_decode(&bytes, &mut out);
                assert_eq!(
                    a["org.erofs.uncompressed-digest"].as_str().unwrap(),
                    sha256(&out),
                    "{tag} layer {i}"
                );
                out
            } else {
                bytes.clone()
            };
            assert_eq!(config["rootfs"]["diff_ids"][i].as_str().unwrap(), sha256(&unpacked));
            assert_eq!(format!("sha256:{}", lowers[i]["blob_sha256"].as_str().unwrap()), sha256(&unpacked));
            // 2–5. No chunk index is emitted (the layers are for sequential reads).
            assert!(a.as_object().unwrap().keys().all(|k| !k.starts_with("org.erofs.chunk-index")));
            // 6. No dm-verity annotations without a tree.
            assert!(a.get("org.erofs.dmverity.hash_offset").is_none());
            // What a consumer needs to reuse blobs safely.
            assert_eq!(a["dev.vmrootfs.source.chain-id"], lowers[i]["chain_id"]);
            assert_eq!(a["dev.vmrootfs.source.diff-id"], lowers[i]["diff_id"]);
            assert_eq!(a["dev.vmrootfs.recipe"], lowers[i]["recipe"].to_string());
            assert!(a["dev.vmrootfs.tool"].as_str().unwrap().ends_with(" erofs writer"));
        }
        // 8. erofs in os.features: the config's and the index entry's platform.
        assert_eq!(config["os.features"], serde_json::json!(["erofs"]));
        assert_eq!(entry["platform"]["os.features"], serde_json::json!(["erofs"]));
        assert_eq!(config["rootfs"]["type"], "layers");
        // The source image's runtime config is kept.
        assert_eq!(config["config"], source_config["config"]);
        assert_eq!(config["architecture"], source_config["architecture"]);
        assert_eq!(manifest["annotations"]["dev.vmrootfs.source.manifest"], built["manifest_digest"]);
    }
}

/// Must-show 2, producers, item 9 (and 10): a base layer holding whiteouts and an opaque
/// marker is published without them; no layer holds a `.wh.` name; a whiteout in an upper
/// layer stays a char 0:0 device.
#[test]
fn a_pushed_base_layer_holds_no_whiteouts() {
    let dir = scratch("erofs-whiteouts");
    let layout = dir.path().join("src");
    let base = Layer::gzip(&[
        dir_entry("etc", 0o755),
        file("etc/keep", "k"),
        Entry::File { path: b"etc/.wh.gone".to_vec(), mode: 0o644, data: Vec::new(), mtime: 1 },
        dir_entry("opt", 0o755),
        Entry::File { path: b"opt/.wh..wh..opq".to_vec(), mode: 0o644, data: Vec::new(), mtime: 1 },
    ]);
    let upper = Layer::gzip(&[Entry::File {
        path: b"etc/.wh.keep".to_vec(),
        mode: 0o644,
        data: Vec::new(),
        mtime: 1,
    }]);
    oci_layout(&layout, "t", &[base, upper]);
    let store = dir.path().join("s");
    let (ok, _, err) = build_json(&store, &[&format!("oci:{}:t", layout.display()), "--tag", "t"]);
    assert!(ok, "{err}");
    let out = dir.path().join("out");
    push_json(&store, &["t", &format!("oci:{}", out.display())]);
    let (_, manifest, _) = layout_image(&out, "latest");
    let layers = manifest["layers"].as_array().unwrap();
    let mut seen = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let file = out.join("blobs/sha256").join(&l["digest"].as_str().unwrap()[7..]);
        let stack = MountedStack::mount(&[(file, "erofs".to_string())]);
        let mut whiteouts = Vec::new();
        let mut opaque = Vec::new();
        for e in walk(stack.root()) {
            let m = std::fs::symlink_metadata(&e).unwrap();
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let name = e.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.starts_with(".wh."), "layer {i} holds {name}");
            if m.file_type().is_char_device() && m.rdev() == 0 {
                whiteouts.push(e.strip_prefix(stack.root()).unwrap().to_path_buf());
            }
            if m.is_dir() && xattr(&e, "trusted.overlay.opaque").is_some() {
                opaque.push(e.clone());
            }
        }
        if i == 0 {
            assert!(whiteouts.is_empty() && opaque.is_empty(), "base: {whiteouts:?} {opaque:?}");
        }
        seen.push(whiteouts);
    }
    assert_eq!(seen[1], vec![PathBuf::from("etc/keep")], "the upper layer's whiteout stays");
}

fn dir_entry(path: &str, mode: u32) -> Entry {
    fixture::dir(path, mode)
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

fn zstd_decode(bytes: &[u8], out: &mut Vec<u8>) {
    let mut child = std::process::Command::new("zstd")
        .args(["-dc", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("zstd");
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    child.stdout.take().unwrap().read_to_end(out).unwrap();
    writer.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Rewrites the layout's `latest` image: `edit` changes the manifest and config (and may add
/// blobs); the new config and manifest are written and the index points at them.
fn rewrite(layout: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value, &Path)) {
    let (_, mut manifest, mut config) = layout_image(layout, "latest");
    edit(&mut manifest, &mut config, &layout.join("blobs/sha256"));
    let config_bytes = serde_json::to_vec(&config).unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&sha256(&config_bytes)[7..]), &config_bytes).unwrap();
    manifest["config"]["digest"] = sha256(&config_bytes).into();
    manifest["config"]["size"] = config_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&sha256(&manifest_bytes)[7..]), &manifest_bytes).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST_TYPE, "digest": sha256(&manifest_bytes), "size": manifest_bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Must-show 2, consumers: spec §8.2 over hand-made manifests — refused: an unknown role, a
/// device layer last, a mismatching uncompressed digest, a chunk index naming another layer;
/// accepted: an unknown `org.erofs.*` annotation and a standalone chunk-index layer (skipped).
#[test]
fn the_consumer_refuses_and_accepts_what_the_format_says() {
    let (dir, src, built) = built_source("erofs-consumer");
    let want = blob_hashes(&built);
    let pushed = |name: &str, zstd: bool| {
        let out = dir.path().join(name);
        let mut args =
            vec!["src".to_string(), format!("oci:{}", out.display()), "--media-type".into(), "spec".into()];
        if zstd {
            args.push("--zstd".into());
        }
        push_json(&src, &args.iter().map(String::as_str).collect::<Vec<_>>());
        out
    };
    let build = |layout: &Path| {
        let store = layout.with_extension("store");
        let (ok, out, err) = run(vmrootfs_without_mkfs(&store).args([
            "build",
            &format!("oci:{}", layout.display()),
            "--json",
        ]));
        (ok, serde_json::from_str::<serde_json::Value>(&out).unwrap_or_default(), err, store)
    };
    let refused = |name: &str,
                   zstd: bool,
                   edit: &dyn Fn(&mut serde_json::Value, &mut serde_json::Value, &Path),
                   says: &[&str]| {
        let layout = pushed(name, zstd);
        rewrite(&layout, edit);
        let (ok, _, err, store) = build(&layout);
        assert!(!ok, "{name} was accepted");
        for s in says {
            assert!(err.contains(s), "{name}: {err}");
        }
        let records = std::fs::read_dir(store.join("images")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(records, 0, "{name}: no record");
        let layers = store.join(format!("layers/erofs-v{}", vmrootfs::FsType::Erofs.recipe()));
        let blobs = std::fs::read_dir(&layers)
            .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "erofs")).count())
            .unwrap_or(0);
        if name == "bad-digest" {
            assert!(blobs < 4, "{name}: the mismatching layer is not stored");
        }
    };
    refused(
        "unknown-role",
        false,
        &|m, _, _| m["layers"][1]["annotations"]["org.erofs.role"] = "sidecar".into(),
        &["unknown role", "sidecar"],
    );
    refused(
        "device-last",
        false,
        &|m, _, _| m["layers"][3]["annotations"]["org.erofs.role"] = "device".into(),
        &["layer 3", "last"],
    );
    refused(
        "bad-digest",
        true,
        &|m, _, _| {
            m["layers"][2]["annotations"]["org.erofs.uncompressed-digest"] =
                format!("sha256:{}", "0".repeat(64)).into()
        },
        &["DiffID", "0000000000"],
    );
    refused(
        "bad-target",
        false,
        &|m, c, blobs| insert_chunk_index(m, c, blobs, Some(format!("sha256:{}", "1".repeat(64)))),
        &["chunk-index target"],
    );

    let layout = pushed("future-annotation", false);
    rewrite(&layout, |m, _, _| m["layers"][0]["annotations"]["org.erofs.some-future-field"] = "42".into());
    let (ok, r, err, _) = build(&layout);
    assert!(ok, "an unknown org.erofs.* annotation is informational: {err}");
    assert_eq!(blob_hashes(&r), want);

    let layout = pushed("chunk-index", false);
    rewrite(&layout, |m, c, blobs| insert_chunk_index(m, c, blobs, None));
    let (ok, r, err, _) = build(&layout);
    assert!(ok, "a standalone chunk-index layer is skipped: {err}");
    assert_eq!(blob_hashes(&r), want, "four lowers, the chunk index not among them");
}

/// Inserts a standalone chunk-index layer (an empty v1 index) after layer 0, its DiffID in the
/// config, with `target` as its `org.erofs.chunk-index.target` (default: layer 0's digest).
fn insert_chunk_index(
    m: &mut serde_json::Value,
    c: &mut serde_json::Value,
    blobs: &Path,
    target: Option<String>,
) {
    let mut index = vec![0u8; 32];
    index[..4].copy_from_slice(&[0xCD, 0xE4, 0xEC, 0x67]);
    index[4] = 1;
    let d = sha256(&index);
    std::fs::write(blobs.join(&d[7..]), &index).unwrap();
    let target = target.unwrap_or_else(|| m["layers"][0]["digest"].as_str().unwrap().to_string());
    let layer = serde_json::json!({
        "mediaType": "application/vnd.erofs.chunk-index.v1", "digest": d, "size": index.len(),
        "annotations": {"org.erofs.chunk-index.target": target},
    });
    m["layers"].as_array_mut().unwrap().insert(1, layer);
    c["rootfs"]["diff_ids"].as_array_mut().unwrap().insert(1, d.into());
}

/// Must-show 3: with a converted image pushed beside its source, `build --use-converted` of the
/// source fetches none of its tar layers (the access log says so); without one it converts.
#[test]
fn use_converted_pulls_the_referrer_and_never_fetches_the_tar_layers() {
    let reg = Registry::start(None);
    reg.push(&test_image_oci(), "lab/test:1", None, false);
    reg.push(&test_image_oci(), "lab/plain:1", None, false);
    let dir = scratch("erofs-referrers");
    let source = format!("{}/lab/test:1", reg.addr);
    let (ok, built, err) = build_json(&dir.path().join("a"), &[&source, "--tag", "src"]);
    assert!(ok, "{err}");
    push_json(&dir.path().join("a"), &["src", &format!("{}/lab/test:erofs", reg.addr)]);
    // The pushed manifest names its source as subject, listed under the fallback tag
    // (docker-registry 2.8 has no referrers API).
    let tag = built["manifest_digest"].as_str().unwrap().replace(':', "-");
    let referrers = reg_get(
        &reg.addr,
        &format!("/v2/lab/test/manifests/{tag}"),
        "application/vnd.oci.image.index.v1+json",
    );
    assert!(referrers.contains("dev.vmrootfs.source.manifest"), "{referrers}");
    let tar_layers: Vec<String> = built["lowers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let fetched =
        |reg: &Registry, repo: &str| -> usize { tar_layers.iter().map(|d| reg.blob_gets_in(repo, d)).sum() };
    let before = fetched(&reg, "lab/test");
    let (ok, converted, err) = build_json(&dir.path().join("b"), &[&source, "--use-converted"]);
    assert!(ok, "{err}");
    assert!(err.contains("using the converted image"), "{err}");
    assert_eq!(fetched(&reg, "lab/test"), before, "no tar layer fetched");
    assert_eq!(blob_hashes(&converted), blob_hashes(&built));

    let plain = format!("{}/lab/plain:1", reg.addr);
    let (ok, r, err) = build_json(&dir.path().join("c"), &[&plain, "--use-converted"]);
    assert!(ok, "{err}");
    assert!(!err.contains("using the converted image"), "{err}");
    assert_eq!(fetched(&reg, "lab/plain"), 4, "without a converted image the tar layers are fetched");
    assert_eq!(blob_hashes(&r), blob_hashes(&built));
}

/// Must-show 1, dm-verity: a `--verity` build pushed raw and `--zstd` carries each tree after
/// its blob with `org.erofs.dmverity.*` annotations that `veritysetup verify` accepts; a fresh
/// store with mkfs absent pulls it into the same blobs and trees, each checked on the way in.
#[test]
fn verity_images_push_and_pull_with_their_trees() {
    let dir = scratch("erofs-verity");
    let src = dir.path().join("src");
    let (ok, built, err) = build_json(&src, &[&test_image_oci(), "--tag", "src", "--verity"]);
    assert!(ok, "{err}");
    let lowers = built["lowers"].as_array().unwrap().clone();
    assert!(lowers.iter().all(|l| l["verity"]["root_digest"].is_string()), "{built}");
    let layout = dir.path().join("layout");
    push_json(&src, &["src", &format!("oci:{}", layout.display())]);
    let (_, manifest, _) = layout_image(&layout, "latest");
    for (i, l) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let a = &l["annotations"];
        let offset = a["org.erofs.dmverity.hash_offset"].as_str().unwrap();
        let root = a["org.erofs.dmverity.root_digest"].as_str().unwrap();
        assert_eq!(offset, lowers[i]["verity"]["hash_offset"].to_string(), "layer {i}");
        assert_eq!(root, lowers[i]["verity"]["root_digest"].as_str().unwrap());
        let file = layout.join("blobs/sha256").join(&l["digest"].as_str().unwrap()[7..]);
        let out = std::process::Command::new("veritysetup")
            .args(["verify", &format!("--hash-offset={offset}")])
            .arg(&file)
            .arg(&file)
            .arg(root.strip_prefix("sha256:").unwrap())
            .output()
            .expect("veritysetup (cryptsetup-bin)");
        assert!(
            out.status.success(),
            "veritysetup verify layer {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let reg = Registry::start(None);
    let trees = |r: &serde_json::Value| -> Vec<(String, String)> {
        r["lowers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let tree = sha256_file_hex(Path::new(l["verity_tree"].as_str().unwrap())).unwrap();
                (l["verity"]["root_digest"].as_str().unwrap().to_string(), tree)
            })
            .collect()
    };
    for (name, extra) in [("raw", vec![]), ("zstd", vec!["--zstd"])] {
        let dest = format!("{}/lab/test:verity-{name}", reg.addr);
        let mut args = vec!["src", dest.as_str()];
        args.extend(extra.iter().copied());
        push_json(&src, &args);
        let store = dir.path().join(format!("pulled-{name}"));
        let (ok, out, err) = run(vmrootfs_without_mkfs(&store).args(["build", &dest, "--json"]));
        assert!(ok, "{name}: {err}");
        let pulled: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(blob_hashes(&pulled), blob_hashes(&built), "{name}: the same blobs");
        assert_eq!(trees(&pulled), trees(&built), "{name}: the same trees and root digests");
        let (ok, _, err) = run(vmrootfs(&store).arg("verify"));
        assert!(ok, "{name}: verify of the pulled store: {err}");
    }
}

/// A one-layer image holding directory `name` with one file, built into `store` as tag
/// `name` (with `extra` arguments) from a layout under `base`; the build result.
fn small_image(base: &Path, store: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let layout = base.join(format!("layout-{name}"));
    if !layout.exists() {
        oci_layout(&layout, "t", &[Layer::gzip(&[dir_entry(name, 0o755), file(&format!("{name}/f"), name)])]);
    }
    let mut args = vec![format!("oci:{}:t", layout.display()), "--tag".into(), name.into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, r, err) = build_json(store, &args);
    assert!(ok, "build {name}: {err}");
    r
}

/// `inspect --json` of `tag`.
fn inspect(store: &Path, tag: &str) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store).args(["inspect", tag, "--json"]));
    assert!(ok, "inspect {tag}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Issue 17 item 1: an EROFS image whose layer annotations claim the chain ID of a layer
/// this store built from other bytes is pulled into its own blob: its record names the bytes
/// its descriptor names, the first image's record and blob stay as they were, and `verify`
/// passes both.
#[test]
fn a_pull_never_attaches_bytes_its_manifest_does_not_name() {
    let tmp = scratch("erofs-claimed-key");
    let base = tmp.path();
    let store = base.join("store");
    let a = small_image(base, &store, "a", &[]);
    let a_before = inspect(&store, "a");
    let layout = forged_layout(base, &a["lowers"][0], &[]);
    let (_, manifest, _) = layout_image(&layout, "latest");
    let named = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let reg = Registry::start(None);
    reg.push(&format!("oci:{}:latest", layout.display()), "lab/forged:1", None, false);

    let (ok, pulled, err) = build_json(&store, &[&format!("{}/lab/forged:1", reg.addr), "--tag", "b"]);
    assert!(ok, "pull: {err}");
    let lower = &pulled["lowers"][0];
    let path = Path::new(lower["path"].as_str().unwrap());
    assert_eq!(format!("sha256:{}", lower["blob_sha256"].as_str().unwrap()), named, "{pulled}");
    assert_eq!(format!("sha256:{}", sha256_file_hex(path).unwrap()), named);
    assert_ne!(lower["path"], a["lowers"][0]["path"], "a blob of its own");
    assert_eq!(inspect(&store, "a"), a_before, "the first image's record is unchanged");
    let a_path = Path::new(a["lowers"][0]["path"].as_str().unwrap());
    assert_eq!(
        sha256_file_hex(a_path).unwrap(),
        a["lowers"][0]["blob_sha256"].as_str().unwrap(),
        "the first image's blob is unchanged"
    );
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "verify passes both: {out}{err}");
}

/// Issue 17 item 5: a `--verity` image pulled into a store that has the plain blob of its
/// layer, or whose tree publication was cut short, is stored with its tree.
#[test]
fn a_verity_pull_stores_its_tree_over_a_plain_blob_or_a_half_published_one() {
    let tmp = scratch("erofs-verity-kept");
    let base = tmp.path();
    let producer = base.join("producer");
    let built = small_image(base, &producer, "v", &["--verity"]);
    let root = built["lowers"][0]["verity"]["root_digest"].clone();
    assert!(root.is_string(), "{built}");
    let layout = base.join("pushed");
    push_json(&producer, &["v", &format!("oci:{}", layout.display())]);
    let source = format!("oci:{}", layout.display());

    let store = base.join("store");
    small_image(base, &store, "v", &[]);
    let (ok, pulled, err) = build_json(&store, &[&source, "--tag", "pulled"]);
    assert!(ok, "pull over the plain blob: {err}");
    assert_eq!(pulled["lowers"][0]["verity"]["root_digest"], root, "over a plain blob: {pulled}");
    let tree = Path::new(pulled["lowers"][0]["verity_tree"].as_str().unwrap()).to_owned();
    assert!(tree.exists(), "{}", tree.display());
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{out}{err}");

    // A pull killed after the tree was renamed into place, before its `.verity.json`.
    let fresh = base.join("fresh");
    let (ok, _, err) = build_json(&fresh, &[&source, "--tag", "first"]);
    assert!(ok, "{err}");
    let blob = Path::new(pulled["lowers"][0]["path"].as_str().unwrap());
    let name = blob.file_name().unwrap().to_str().unwrap().replace(".erofs", ".verity.json");
    let verity_json = fresh.join(blob.parent().unwrap().strip_prefix(&store).unwrap()).join(name);
    std::fs::remove_file(&verity_json).unwrap();
    let (ok, again, err) = build_json(&fresh, &[&source, "--tag", "second"]);
    assert!(ok, "pull after a cut publication: {err}");
    assert_eq!(again["lowers"][0]["verity"]["root_digest"], root, "after a cut publication: {again}");
    assert!(verity_json.exists(), "the tree's record is published again");
    let (ok, out, err) = run(vmrootfs(&fresh).arg("verify"));
    assert!(ok, "{out}{err}");
}

/// Issue 17 item 2: a tar build of a layer whose key holds a pulled blob of other bytes never
/// replaces it: the build fails naming the blob and how to proceed, and the pulled image
/// still verifies. (A pulled blob of the same bytes is adopted: see
/// `pushed_erofs_images_pull_without_mkfs_into_identical_blobs`.)
#[test]
fn a_local_conversion_never_replaces_a_pulled_blob() {
    let tmp = scratch("erofs-no-replace");
    let base = tmp.path();
    let reference = small_image(base, &base.join("reference"), "a", &[]);
    let layout = forged_layout(base, &reference["lowers"][0], &[]);
    let store = base.join("store");
    let (ok, pulled, err) = build_json(&store, &[&format!("oci:{}", layout.display()), "--tag", "pulled"]);
    assert!(ok, "{err}");
    let before = inspect(&store, "pulled");

    let (ok, _, err) =
        build_json(&store, &[&format!("oci:{}:t", base.join("layout-a").display()), "--tag", "a"]);
    assert!(!ok, "the conversion of other bytes is not published over the pulled blob");
    assert!(err.contains("never replaced") && err.contains("vmrootfs rm"), "{err}");
    assert_eq!(inspect(&store, "pulled"), before);
    let path = Path::new(pulled["lowers"][0]["path"].as_str().unwrap());
    assert_eq!(sha256_file_hex(path).unwrap(), pulled["lowers"][0]["blob_sha256"].as_str().unwrap());
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{out}{err}");
}

/// Item 7: `push` to a layout checks the bytes it finds: a blob of the right size with wrong
/// bytes is replaced, and every blob in the layout then hashes to its name.
#[test]
fn push_to_a_layout_replaces_a_present_blob_with_wrong_bytes() {
    let dir = scratch("push-layout-bytes");
    let store = dir.path().join("s");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    let (ok, _, err) =
        build_json(&store, &[&format!("oci-archive:{}:busybox", demo.display()), "--tag", "bb"]);
    assert!(ok, "{err}");
    let layout = dir.path().join("layout");
    let dest = format!("oci:{}", layout.display());
    let first = push_json(&store, &["bb", &dest]);
    let layer = first["layers"][0]["digest"].as_str().unwrap().to_string();
    let path = layout.join("blobs/sha256").join(&layer[7..]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let again = push_json(&store, &["bb", &dest]);
    assert_eq!(again["layers"][0]["existed"], false, "the damaged blob counts as absent: {again}");
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(sha256(&std::fs::read(&p).unwrap()), format!("sha256:{name}"), "{}", p.display());
    }
}

/// Item 7: `push` hashes what it writes: a stored blob whose bytes differ from its record
/// fails the push to a layout and to an archive, naming the blob, and leaves no blob under a
/// name its bytes do not have.
#[test]
fn push_to_a_layout_or_archive_refuses_a_stored_blob_that_differs_from_its_record() {
    let dir = scratch("push-layout-hash");
    let store = dir.path().join("s");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    let (ok, built, err) =
        build_json(&store, &[&format!("oci-archive:{}:busybox", demo.display()), "--tag", "bb"]);
    assert!(ok, "{err}");
    let (blob, _) = lowers_of(&built).remove(0);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[5000] ^= 0xff;
    std::fs::set_permissions(&blob, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&blob, &bytes).unwrap();
    let layout = dir.path().join("layout");
    let archive = dir.path().join("bb.tar");
    for dest in [format!("oci:{}", layout.display()), format!("oci-archive:{}", archive.display())] {
        let (ok, _, err) = run(vmrootfs(&store).args(["push", "bb", &dest]));
        assert!(!ok, "push to {dest} of a damaged blob succeeded");
        assert!(err.contains(&blob.display().to_string()) && err.contains("sha256"), "{dest}: {err}");
    }
    assert!(!archive.exists(), "no archive written");
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).into_iter().flatten() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(sha256(&std::fs::read(&p).unwrap()), format!("sha256:{name}"), "{}", p.display());
    }
}

/// Item 25, now that a merge reads layer blobs: `--use-converted --merge` with a converted
/// image in the registry merges its pulled blobs, converting nothing and fetching no tar
/// layer (the stored layers have no `.dirs`: pulled, not converted), into the merged blob a
/// local conversion gives; so does `build --merge` of the pushed EROFS image.
#[test]
fn use_converted_with_merge_merges_the_pulled_blobs() {
    let reg = Registry::start(None);
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    reg.push(&format!("oci-archive:{}:busybox", demo.display()), "lab/bb:1", None, false);
    let dir = scratch("use-converted-merge");
    let source = format!("{}/lab/bb:1", reg.addr);
    let (ok, local, err) = build_json(&dir.path().join("a"), &[&source, "--tag", "src", "--merge"]);
    assert!(ok, "{err}");
    push_json(&dir.path().join("a"), &["src", &format!("{}/lab/bb:erofs", reg.addr)]);
    let tar_gets = |reg: &Registry| -> usize {
        let layers = local["lowers"].as_array().unwrap();
        layers.iter().map(|l| reg.blob_gets_in("lab/bb", l["digest"].as_str().unwrap())).sum()
    };
    let before = tar_gets(&reg);
    let (ok, merged, err) = build_json(&dir.path().join("b"), &[&source, "--use-converted", "--merge"]);
    assert!(ok, "{err}");
    assert!(err.contains("using the converted image"), "{err}");
    assert!(!err.contains("converting"), "nothing converted: {err}");
    assert_eq!(tar_gets(&reg), before, "no tar layer fetched");
    for (blob, _) in lowers_of(&merged) {
        assert!(!blob.with_extension("dirs").exists(), "{} was pulled, not converted", blob.display());
    }
    assert_eq!(blob_hashes(&merged), blob_hashes(&local));
    let path = |r: &serde_json::Value| PathBuf::from(r["merged"]["path"].as_str().unwrap());
    assert_eq!(
        sha256_file_hex(&path(&merged)).unwrap(),
        sha256_file_hex(&path(&local)).unwrap(),
        "the merged blob of the pulled layers is the local one"
    );
    let (ok, out, err) = run(vmrootfs(&dir.path().join("b")).arg("verify"));
    assert!(ok, "{out}{err}");
    // The pushed EROFS image itself, built with --merge: the same merged blob.
    let pushed = format!("{}/lab/bb:erofs", reg.addr);
    let (ok, direct, err) = build_json(&dir.path().join("c"), &[&pushed, "--merge"]);
    assert!(ok, "{err}");
    assert_eq!(sha256_file_hex(&path(&direct)).unwrap(), sha256_file_hex(&path(&local)).unwrap());
}

/// `--use-converted --merge` whose converted image holds another producer's blob with an
/// inlined file tail (mkfs.erofs's default), which a merged image cannot reference: the build
/// says why and converts the tar layers, merging those.
#[test]
fn use_converted_with_merge_converts_when_a_pulled_blob_cannot_be_merged() {
    let reg = Registry::start(None);
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    reg.push(&format!("oci-archive:{}:busybox", demo.display()), "lab/bb:1", None, false);
    let dir = scratch("use-converted-merge-inlined");
    let source = format!("{}/lab/bb:1", reg.addr);
    let (ok, local, err) = build_json(&dir.path().join("a"), &[&source, "--tag", "src", "--merge"]);
    assert!(ok, "{err}");
    // The converted image, its first layer replaced by a foreign blob (no `dev.vmrootfs.*`
    // layer annotations) with a 3-byte file kept inline, listed as the source's referrer.
    let layout = dir.path().join("conv");
    push_json(&dir.path().join("a"), &["src", &format!("oci:{}", layout.display())]);
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("hello"), "hi\n").unwrap();
    let foreign = dir.path().join("foreign.erofs");
    let out =
        std::process::Command::new("mkfs.erofs").arg("--quiet").arg(&foreign).arg(&tree).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let foreign = std::fs::read(&foreign).unwrap();
    let foreign_digest = sha256(&foreign);
    rewrite(&layout, |manifest, config, blobs| {
        std::fs::write(blobs.join(&foreign_digest[7..]), &foreign).unwrap();
        let layer = &mut manifest["layers"][0];
        layer["digest"] = foreign_digest.clone().into();
        layer["size"] = foreign.len().into();
        layer["annotations"].as_object_mut().unwrap().retain(|k, _| !k.starts_with("dev.vmrootfs."));
        config["rootfs"]["diff_ids"][0] = foreign_digest.clone().into();
    });
    let (entry, manifest, _) = layout_image(&layout, "latest");
    let referrers = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": entry["digest"], "size": entry["size"],
                       "annotations": manifest["annotations"]}],
    }))
    .unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&sha256(&referrers)[7..]), &referrers).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(&referrers),
        "size": referrers.len(), "annotations": {"org.opencontainers.image.ref.name": "referrers"},
    }]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let tag = local["manifest_digest"].as_str().unwrap().replace(':', "-");
    reg.push(&format!("oci:{}:referrers", layout.display()), &format!("lab/bb:{tag}"), None, true);

    let store = dir.path().join("b");
    let (ok, merged, err) = build_json(&store, &[&source, "--use-converted", "--merge"]);
    assert!(ok, "{err}");
    assert!(err.contains("using the converted image"), "{err}");
    assert!(
        err.contains("cannot be merged") && err.contains("inlined tail") && err.contains("converting"),
        "says why it converts: {err}"
    );
    for (blob, _) in lowers_of(&merged) {
        assert!(blob.with_extension("dirs").exists(), "{} was converted here", blob.display());
    }
    assert_eq!(blob_hashes(&merged), blob_hashes(&local));
    let path = |r: &serde_json::Value| PathBuf::from(r["merged"]["path"].as_str().unwrap());
    assert_eq!(sha256_file_hex(&path(&merged)).unwrap(), sha256_file_hex(&path(&local)).unwrap());
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{out}{err}");
}

/// An image of other bytes than `claimed`'s layer (tag `b` of a producer store under `base`,
/// built with `extra`), pushed to the layout `base/forged` and made to claim `claimed`'s key
/// (see [`claim_key_of`]); the layout.
fn forged_layout(base: &Path, claimed: &serde_json::Value, extra: &[&str]) -> PathBuf {
    let producer = base.join("producer");
    small_image(base, &producer, "b", extra);
    let layout = base.join("forged");
    push_json(&producer, &["b", &format!("oci:{}", layout.display())]);
    claim_key_of(&layout, claimed);
    layout
}

/// `layout`'s `latest` image made to claim, in its layer annotations, the key of `claimed` (a
/// lower of a build result): its chain ID and diff ID.
fn claim_key_of(layout: &Path, claimed: &serde_json::Value) {
    rewrite(layout, |manifest, _, _| {
        let notes = &mut manifest["layers"][0]["annotations"];
        notes["dev.vmrootfs.source.chain-id"] = claimed["chain_id"].clone();
        notes["dev.vmrootfs.source.diff-id"] = claimed["diff_id"].clone();
    });
}

/// sha256 of the files `parts`, one after another.
fn sha256_of_files(parts: &[&Path]) -> String {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| std::fs::read(p).unwrap()).collect();
    sha256(&bytes)
}

/// Issue 17 item 1, `--verity`: a verity image whose annotations claim the key of a layer this
/// store built (with its own tree) from other bytes is stored under a key of its own with its
/// own tree, checked with the salt that tree carries: its blob and tree are what its
/// descriptor names, the first image's record, blob and tree stay as they were, and `verify`
/// passes both.
#[test]
fn a_verity_pull_whose_claimed_key_holds_other_bytes_gets_a_key_of_its_own() {
    let tmp = scratch("erofs-claimed-key-verity");
    let base = tmp.path();
    let store = base.join("store");
    let a = small_image(base, &store, "a", &["--verity"]);
    let a_before = inspect(&store, "a");
    let layout = forged_layout(base, &a["lowers"][0], &["--verity"]);
    let (_, manifest, _) = layout_image(&layout, "latest");
    let descriptor = &manifest["layers"][0];

    let (ok, pulled, err) = build_json(&store, &[&format!("oci:{}", layout.display()), "--tag", "b"]);
    assert!(ok, "pull: {err}");
    let lower = &pulled["lowers"][0];
    assert_ne!(lower["path"], a["lowers"][0]["path"], "a blob of its own: {pulled}");
    let blob = Path::new(lower["path"].as_str().unwrap());
    let tree = Path::new(lower["verity_tree"].as_str().unwrap());
    assert_eq!(sha256_of_files(&[blob, tree]), descriptor["digest"].as_str().unwrap(), "blob ‖ tree");
    assert_eq!(
        lower["verity"]["root_digest"].as_str(),
        descriptor["annotations"]["org.erofs.dmverity.root_digest"].as_str()
    );
    assert_eq!(inspect(&store, "a"), a_before, "the first image's record is unchanged");
    let a_lower = &a["lowers"][0];
    let a_blob = Path::new(a_lower["path"].as_str().unwrap());
    let a_tree = Path::new(a_lower["verity_tree"].as_str().unwrap());
    assert_eq!(
        sha256_of_files(&[a_blob, a_tree]),
        format!("sha256:{}", a_lower["verity"]["sha256"].as_str().unwrap()),
        "the first image's blob and tree are unchanged"
    );
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "verify passes both: {out}{err}");
}

/// Issue 17 item 21: a pulled blob (other bytes than the tar layer's conversion, under the key
/// it claims) whose `.json` is cut is not replaced by a tar build of that layer: the image
/// records say what it held, so the build fails saying what to do and the blob is kept; the
/// pulled image, built again, repairs it in place.
#[test]
fn a_blob_whose_json_is_cut_is_replaced_only_by_the_bytes_its_records_name() {
    let tmp = scratch("erofs-cut-json");
    let base = tmp.path();
    let reference = small_image(base, &base.join("reference"), "a", &[]);
    let layout = forged_layout(base, &reference["lowers"][0], &[]);
    let store = base.join("store");
    let source = format!("oci:{}", layout.display());
    let (ok, pulled, err) = build_json(&store, &[&source, "--tag", "pulled"]);
    assert!(ok, "{err}");
    let blob = Path::new(pulled["lowers"][0]["path"].as_str().unwrap()).to_owned();
    let claimed = Path::new(reference["lowers"][0]["path"].as_str().unwrap());
    assert_eq!(
        blob.strip_prefix(&store),
        claimed.strip_prefix(base.join("reference")),
        "under the claimed key"
    );
    let json = blob.with_extension("json");
    let text = std::fs::read(&json).unwrap();
    std::fs::write(&json, &text[..text.len() / 2]).unwrap();

    let (ok, _, err) =
        build_json(&store, &[&format!("oci:{}:t", base.join("layout-a").display()), "--tag", "a"]);
    assert!(!ok, "the conversion of other bytes is not published over the damaged pulled blob");
    assert!(err.contains("the records of pulled") && err.contains("it is kept"), "{err}");
    assert_eq!(
        sha256_file_hex(&blob).unwrap(),
        pulled["lowers"][0]["blob_sha256"].as_str().unwrap(),
        "the pulled blob is kept"
    );

    let (ok, again, err) = build_json(&store, &[&source, "--tag", "pulled"]);
    assert!(ok, "pull again: {err}");
    assert_eq!(again["lowers"][0]["path"], pulled["lowers"][0]["path"], "repaired in place: {again}");
    let (ok, out, err) = run(vmrootfs(&store).arg("verify"));
    assert!(ok, "{out}{err}");
}

//! `push --format oci` (issue 20): a stored image published as a standard OCI image with its
//! original tar layers, checked by tools vmrootfs did not write — a real `docker-registry`,
//! `skopeo copy` back out of it, and `umoci unpack`, whose tree must equal `umoci unpack` of
//! the source. The layers come from the store's OCI area when it has them, else from the
//! source: mounted when the destination is the source's own registry, else fetched, every
//! byte checked against the recorded digest, and a wrong byte refused with nothing pushed as
//! complete.

mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::registry::{Registry, reg_get};
use fixture::treediff::diff_trees;
use fixture::*;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn busybox_archive() -> String {
    format!("oci-archive:{}/testdata/busybox.oci.tar:busybox", env!("CARGO_MANIFEST_DIR"))
}

/// `vmrootfs build SOURCE --tag TAG` (plus `extra`) into `store`.
fn build(store: &Path, source: &str, tag: &str, extra: &[&str]) {
    let (ok, _, err) = run(vmrootfs(store).args(["-q", "build", source, "--tag", tag]).args(extra));
    assert!(ok, "build {source}: {err}");
}

/// `vmrootfs push TAG DEST --format oci --json`: the JSON it prints.
fn push_oci(store: &Path, tag: &str, dest: &str) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store).args(["push", tag, dest, "--format", "oci", "--json"]));
    assert!(ok, "push --format oci {tag} {dest}: {err}");
    eprintln!("push --format oci {tag} {dest}:\n{err}");
    serde_json::from_str(&out).expect("push --json prints JSON")
}

/// `vmrootfs push TAG DEST --format oci`, expected to fail: its stderr.
fn push_oci_fails(store: &Path, tag: &str, dest: &str) -> String {
    let (ok, _, err) = run(vmrootfs(store).args(["push", tag, dest, "--format", "oci"]));
    assert!(!ok, "push --format oci {tag} {dest} succeeded");
    err
}

fn assert_same_tree(what: &str, expected: &Path, actual: &Path) {
    let diffs = diff_trees(expected, actual);
    assert!(
        diffs.is_empty(),
        "{what} differs from umoci unpack of the source ({} differences):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    eprintln!("{what}: same tree as umoci unpack of the source");
}

/// The manifest a registry serves for `repo:tag`, or `None` on a 404.
fn served_manifest(reg: &Registry, repo: &str, tag: &str) -> Option<serde_json::Value> {
    let response = reg_get(&reg.addr, &format!("/v2/{repo}/manifests/{tag}"), MANIFEST_TYPE);
    if response.starts_with("HTTP/1.1 404") {
        return None;
    }
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Some(serde_json::from_str(body).unwrap_or_else(|e| panic!("{repo}:{tag}: {e}: {response}")))
}

/// Where `docker-registry` keeps the bytes of blob `digest`.
fn registry_blob_file(reg: &Registry, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    reg.log.parent().unwrap().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
}

/// A registry holding busybox as `src/bb:v1`, built from there into `store` as `tag`, and a
/// second, empty registry.
fn busybox_from_registry(store: &Path, tag: &str) -> (Registry, Registry) {
    let reg = Registry::start(None);
    reg.push(&busybox_archive(), "src/bb:v1", None, false);
    build(store, &format!("{}/src/bb:v1", reg.addr), tag, &[]);
    (reg, Registry::start(None))
}

/// Busybox copied by skopeo into the OCI layout `<dir>/layout` (tag `t`), built from there
/// into `store` as `tag`; the layout's path.
fn busybox_from_layout(dir: &Path, store: &Path, tag: &str) -> PathBuf {
    let layout = dir.join("layout");
    let (ok, _, err) = run(Command::new("skopeo")
        .args(["copy", "-q", &busybox_archive()])
        .arg(format!("oci:{}:t", layout.display())));
    assert!(ok, "skopeo copy to {}: {err}", layout.display());
    build(store, &format!("oci:{}:t", layout.display()), tag, &[]);
    layout
}

fn layer_digests(pushed: &serde_json::Value) -> Vec<String> {
    pushed["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

/// Must-show: the real 4-layer Debian image, built from an OCI layout (erofs) and from a
/// docker archive (ext4), pushed in OCI form to a registry (bytes copied from the local
/// source), pulled back by skopeo and unpacked by umoci: the same tree as `umoci unpack` of
/// the source. The layout's OCI manifest is pushed as it is (the source's digest); the docker
/// archive's layers get an OCI manifest with OCI media types.
#[test]
fn a_built_image_pushed_in_oci_form_unpacks_to_the_sources_tree() {
    let dir = scratch("ociform-debian");
    let store = dir.path().join("store");
    let img = image().display().to_string();
    let reference = image().join("reference/rootfs");
    let reg = Registry::start(None);
    let source_manifest = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(image().join("oci/index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap().to_string()
    };
    let cases = [
        ("oci", format!("oci:{img}/oci:test"), "erofs"),
        ("docker", format!("docker-archive:{img}/image.docker.tar"), "ext4"),
    ];
    for (name, source, fs) in cases {
        build(&store, &source, name, &["--fs", fs]);
        let dest = format!("{}/lab/{name}:oci", reg.addr);
        let pushed = push_oci(&store, name, &dest);
        let layers = pushed["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 4);
        for l in layers {
            assert_eq!(l["existed"], false);
            assert_eq!(l["mounted"], false, "a local source has no registry to mount from");
        }
        let manifest = served_manifest(&reg, &format!("lab/{name}"), "oci").expect("the manifest is pushed");
        // (`mediaType` is optional in an OCI manifest; the testimage's has none.)
        assert!(manifest.get("mediaType").is_none_or(|t| t == MANIFEST_TYPE), "{manifest}");
        assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
        for l in manifest["layers"].as_array().unwrap() {
            let t = l["mediaType"].as_str().unwrap();
            assert!(t.starts_with("application/vnd.oci.image.layer.v1.tar"), "{name}: layer type {t}");
        }
        if name == "oci" {
            assert_eq!(
                pushed["manifest_digest"], source_manifest,
                "a re-push of an OCI source keeps its manifest"
            );
        }
        let rootfs = skopeo_umoci(&format!("docker://{dest}"), &dir.path().join(format!("pulled-{name}")));
        assert_same_tree(
            &format!("{name} ({fs}) pushed in OCI form, pulled back by skopeo"),
            &reference,
            &rootfs,
        );
    }
    // The EROFS options do not go with the OCI form.
    let (ok, _, err) =
        run(vmrootfs(&store).args(["push", "oci", "oci:/nonexistent", "--format", "oci", "--zstd"]));
    assert!(!ok && err.contains("--format oci"), "{err}");
}

/// Must-show: the blob-mount path and the cross-registry copy path. An image built from a
/// registry and pushed in OCI form to another repository of that registry has every layer
/// mounted (the registry log shows `POST …/blobs/uploads/?mount=…&from=…` answered 201, and no
/// layer is read again); pushed to another registry, every layer is fetched from the source
/// (one more GET each), checked and sent, and skopeo + umoci get the source's tree.
#[test]
fn layers_are_mounted_on_the_sources_registry_and_copied_to_another() {
    let dir = scratch("ociform-mount");
    let store = dir.path().join("store");
    let (reg, other) = busybox_from_registry(&store, "bb");
    let expected = skopeo_umoci(&busybox_archive(), &dir.path().join("source"));

    let pushed = push_oci(&store, "bb", &format!("{}/dst/bb:v1", reg.addr));
    let digests = layer_digests(&pushed);
    let gets_before: Vec<usize> = digests.iter().map(|d| reg.blob_gets_in("src/bb", d)).collect();
    let log = reg.log_text();
    for (l, d) in pushed["layers"].as_array().unwrap().iter().zip(&digests) {
        assert_eq!(l["mounted"], true, "layer {d} mounted");
        let hex = d.trim_start_matches("sha256:");
        let request = format!("POST /v2/dst/bb/blobs/uploads/?mount=sha256%3A{hex}&from=src%2Fbb");
        let line =
            log.lines().find(|l| l.contains(&request)).unwrap_or_else(|| panic!("no {request} in\n{log}"));
        assert!(line.contains("\" 201 "), "the mount is answered 201: {line}");
        eprintln!("registry log: {}", &line[line.find("\"POST").unwrap()..]);
    }
    assert!(served_manifest(&reg, "dst/bb", "v1").is_some());
    let rootfs = skopeo_umoci(&format!("docker://{}/dst/bb:v1", reg.addr), &dir.path().join("mounted"));
    assert_same_tree("busybox pushed with blob mounts", &expected, &rootfs);

    let pushed = push_oci(&store, "bb", &format!("{}/lab/bb:v1", other.addr));
    for (i, (l, d)) in pushed["layers"].as_array().unwrap().iter().zip(&digests).enumerate() {
        assert_eq!((l["mounted"].as_bool(), l["existed"].as_bool()), (Some(false), Some(false)), "layer {d}");
        assert_eq!(
            reg.blob_gets_in("src/bb", d),
            gets_before[i] + 1,
            "layer {d} fetched from the source once"
        );
    }
    let rootfs = skopeo_umoci(&format!("docker://{}/lab/bb:v1", other.addr), &dir.path().join("copied"));
    assert_same_tree("busybox copied to another registry", &expected, &rootfs);
    // Again: the destination has every layer, nothing is fetched or sent.
    let pushed = push_oci(&store, "bb", &format!("{}/lab/bb:v2", other.addr));
    for (i, (l, d)) in pushed["layers"].as_array().unwrap().iter().zip(&digests).enumerate() {
        assert_eq!(l["existed"], true, "layer {d}");
        assert_eq!(reg.blob_gets_in("src/bb", d), gets_before[i] + 1, "layer {d} not fetched again");
    }
}

/// Must-show: a source that serves a wrong byte. A registry whose stored layer has one byte
/// flipped, and an OCI layout whose layer file has: the push is refused with the layer's
/// digest named, and the destination (a registry, a layout, an archive) has no manifest.
#[test]
fn a_source_serving_a_wrong_byte_is_refused_naming_the_digest_and_nothing_is_pushed() {
    let dir = scratch("ociform-wrong-byte");
    let store = dir.path().join("store");
    let (reg, other) = busybox_from_registry(&store, "from-registry");
    let layout = busybox_from_layout(dir.path(), &store, "from-layout");
    let inspect: serde_json::Value =
        serde_json::from_str(&run(vmrootfs(&store).args(["inspect", "from-layout", "--json"])).1).unwrap();
    let digest = inspect["lowers"][0]["digest"].as_str().unwrap().to_string();

    let flipped = Flipped::new(&registry_blob_file(&reg, &digest), 1000);
    let err = push_oci_fails(&store, "from-registry", &format!("{}/lab/bb:v1", other.addr));
    eprintln!("registry serving a wrong byte: {err}");
    assert!(err.contains(&digest), "the error names the layer: {err}");
    assert_eq!(served_manifest(&other, "lab/bb", "v1"), None, "no manifest pushed");
    let out = dir.path().join("out-registry-source");
    let err = push_oci_fails(&store, "from-registry", &format!("oci:{}:v1", out.display()));
    assert!(err.contains(&digest), "{err}");
    assert!(!out.join("index.json").exists(), "no index.json in the layout destination");
    drop(flipped);

    let _flipped =
        Flipped::new(&layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:")), 1000);
    let archive = dir.path().join("out.tar");
    let err = push_oci_fails(&store, "from-layout", &format!("oci-archive:{}:v1", archive.display()));
    eprintln!("layout serving a wrong byte: {err}");
    assert!(err.contains(&digest), "the error names the layer: {err}");
    assert!(!archive.exists(), "no archive written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "no half archive left: {leftovers:?}");
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0, "the push's work directory is gone");
}

/// A layer the store's OCI area holds (as `commit` keeps a committed layer) is pushed from
/// there, never from the source: the source may lose it. A stored blob whose bytes changed is
/// refused, naming it; gc drops area blobs with the last record naming them.
#[test]
fn a_layer_in_the_stores_oci_area_is_pushed_from_there_and_checked() {
    let dir = scratch("ociform-area");
    let store_dir = dir.path().join("store");
    let layout = busybox_from_layout(dir.path(), &store_dir, "bb");
    let expected = skopeo_umoci(&busybox_archive(), &dir.path().join("source"));
    let inspect: serde_json::Value =
        serde_json::from_str(&run(vmrootfs(&store_dir).args(["inspect", "bb", "--json"])).1).unwrap();
    let store = vmrootfs::store::Store::open(&store_dir).unwrap();
    let mut area_files = Vec::new();
    for lower in inspect["lowers"].as_array().unwrap() {
        let digest: oci_spec::image::Digest = lower["digest"].as_str().unwrap().parse().unwrap();
        let file = layout.join("blobs/sha256").join(digest.digest());
        let put = store.put_oci_blob(std::fs::File::open(&file).unwrap(), Some(&digest)).unwrap();
        assert_eq!(put.digest, digest);
        // The source loses the layer: only the store's copy can serve it now.
        std::fs::remove_file(&file).unwrap();
        area_files.push(store_dir.join("oci/sha256").join(digest.digest()));
    }
    let out = dir.path().join("out");
    push_oci(&store_dir, "bb", &format!("oci:{}:v1", out.display()));
    let rootfs = skopeo_umoci(&format!("oci:{}:v1", out.display()), &dir.path().join("pulled"));
    assert_same_tree("busybox pushed from the store's OCI area", &expected, &rootfs);

    let digest = inspect["lowers"][0]["digest"].as_str().unwrap();
    let flipped = Flipped::new(&area_files[0], 1000);
    let out2 = dir.path().join("out2");
    let err = push_oci_fails(&store_dir, "bb", &format!("oci:{}:v1", out2.display()));
    eprintln!("a changed blob in the OCI area: {err}");
    assert!(err.contains(digest) && err.contains("oci/sha256"), "names the stored blob: {err}");
    assert!(!out2.join("index.json").exists(), "no index.json");
    let (ok, out, err) = run(vmrootfs(&store_dir).args(["verify", "bb"]));
    assert!(!ok, "verify finds the changed OCI blob: {out}{err}");
    assert!(format!("{out}{err}").contains(&area_files[0].display().to_string()), "{out}{err}");
    drop(flipped);
    let (ok, out, err) = run(vmrootfs(&store_dir).args(["verify", "bb"]));
    assert!(ok, "verify: {out}{err}");

    let (ok, out, err) = run(vmrootfs(&store_dir).args(["rm", "bb", "--json"]));
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["oci_blobs"], area_files.len(), "{report}");
    for f in &area_files {
        assert!(!f.exists(), "{} collected with its record", f.display());
    }
}

/// A record whose manifest only the store has (as `commit` writes one: the base's layers plus
/// a new one, its config and manifest kept in the OCI area, `source` the base's): the layers
/// the source has are found there by digest, though the source never had that manifest, and
/// the stored manifest is what is pushed. Here the record is made by hand from a built one
/// (its manifest with an annotation added), the way a commit would name it.
#[test]
fn a_manifest_only_the_store_has_is_pushed_with_the_sources_layers_found_by_digest() {
    let dir = scratch("ociform-store-manifest");
    let store_dir = dir.path().join("store");
    let (reg, other) = busybox_from_registry(&store_dir, "bb");
    let expected = skopeo_umoci(&busybox_archive(), &dir.path().join("source"));
    let record_path = store_dir.join("images/bb.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let response = reg_get(&reg.addr, "/v2/src/bb/manifests/v1", MANIFEST_TYPE);
    let mut manifest: serde_json::Value =
        serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
    manifest["annotations"] = serde_json::json!({"org.example.committed": "by hand"});
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let store = vmrootfs::store::Store::open(&store_dir).unwrap();
    let kept = store.put_oci_bytes(&manifest, None).unwrap();
    record["tag"] = "bb-new".into();
    record["manifest_digest"] = kept.digest.to_string().into();
    std::fs::write(store_dir.join("images/bb-new.json"), serde_json::to_vec(&record).unwrap()).unwrap();

    for (reg, repo) in [(&reg, "dst/bb-new"), (&other, "lab/bb-new")] {
        let pushed = push_oci(&store_dir, "bb-new", &format!("{}/{repo}:v1", reg.addr));
        assert_eq!(pushed["manifest_digest"], kept.digest.to_string(), "the stored manifest, as it is");
        let rootfs = skopeo_umoci(
            &format!("docker://{}/{repo}:v1", reg.addr),
            &dir.path().join(repo.replace('/', "-")),
        );
        assert_same_tree(&format!("a record with a stored manifest, pushed to {repo}"), &expected, &rootfs);
    }
}

//! EROFS images between vmrootfs and containerd, in every media-type spelling in use (issue 18):
//! a real containerd 2.1 (Debian sid's, `fixture::containerd`) pulls and runs what vmrootfs
//! pushes; images in containerd ≥ 2.3's form and in the draft spec's form are built by
//! vmrootfs with no mkfs.erofs on PATH and booted; and what no consumer may accept is refused.
//!
//! No containerd ≥ 2.3 binary can be had here (Debian has 2.1 at most, and the machine reaches
//! only Debian's archive and the crate registries), so its form is made in the test exactly as
//! its converter (`core/images/converter/erofs`, containerd main) makes it: the same mkfs.erofs
//! command line and UUID, the same media types, the config's `diff_ids` = the EROFS blobs'
//! digests and `os.features: ["erofs"]`, no `org.erofs.*` annotations.

mod fixture;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fixture::containerd::Containerd;
use fixture::registry::{Registry, reg_get};
use fixture::*;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Reads files of both layers and the whiteout in the top one (`/etc/issue`).
const PROBE: &str = "cat /etc/motd; sha256sum /bin/busybox; \
    if test -e /etc/issue; then echo issue-visible; else echo issue-whited-out; fi; ls /bin | wc -l";

fn busybox_archive() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar")
}

/// The bundled busybox image: its manifest, its config and each layer's uncompressed tar.
struct TarImage {
    manifest: serde_json::Value,
    config: serde_json::Value,
    tars: Vec<Vec<u8>>,
}

fn busybox_tars() -> TarImage {
    let mut blobs = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(busybox_archive()).unwrap());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        blobs.insert(name, data);
    }
    let json = |name: &str| -> serde_json::Value { serde_json::from_slice(&blobs[name]).unwrap() };
    let blob_name =
        |d: &serde_json::Value| format!("blobs/sha256/{}", d.as_str().unwrap().trim_start_matches("sha256:"));
    let index = json("index.json");
    let manifest = json(&blob_name(&index["manifests"][0]["digest"]));
    let config = json(&blob_name(&manifest["config"]["digest"]));
    let tars = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&blobs[&blob_name(&l["digest"])][..]).read_to_end(&mut tar).unwrap();
            tar
        })
        .collect();
    TarImage { manifest, config, tars }
}

/// sha256 of `/bin/busybox` in the base layer's tar, as `sha256sum` prints it.
fn busybox_sha256(base: &[u8]) -> String {
    let mut archive = tar::Archive::new(base);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy().trim_start_matches("./") == "bin/busybox" {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            return sha256(&data).trim_start_matches("sha256:").to_string();
        }
    }
    panic!("no bin/busybox in the base layer");
}

/// A command fed `input` on stdin; its stdout, asserting success.
fn pipe(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `uuid.NewSHA1(uuid.NameSpaceURL, name)` (Go's github.com/google/uuid): a version-5 UUID.
fn uuid_v5_url(name: &str) -> String {
    let namespace_url = hex::decode("6ba7b8119dad11d180b400c04fd430c8").unwrap();
    let mut input = namespace_url;
    input.extend_from_slice(name.as_bytes());
    let sum = pipe(&mut Command::new("sha1sum"), &input);
    let mut b = hex::decode(&String::from_utf8_lossy(&sum)[..40]).unwrap();
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(&b[..16]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// One tar layer made into an EROFS blob exactly as containerd's converter makes it
/// (`ConvertLayerToErofs` → `erofsutils.ConvertTarErofs`, with `AddDefaultMkfsOpts`' `-b4096`
/// and the UUID from the layer's diffID).
fn containerd_convert(tar: &[u8], work: &Path, i: usize) -> Vec<u8> {
    let out = work.join(format!("layer{i}.erofs"));
    let uuid = uuid_v5_url(&format!("erofs:blobs/{}", sha256(tar)));
    pipe(
        Command::new("mkfs.erofs")
            .args(["--tar=f", "--aufs", "--quiet", "-Enoinline_data", "-b4096", "-U", &uuid])
            .arg(&out),
        tar,
    );
    std::fs::read(&out).unwrap()
}

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    pipe(Command::new("zstd").args(["-q", "-c"]), data)
}

/// One layer of a hand-made EROFS image: its media type, blob bytes and annotations.
struct FormLayer {
    media_type: &'static str,
    blob: Vec<u8>,
    annotations: serde_json::Value,
}

/// Writes an OCI layout at `dir` holding one image, tagged `tag`: `layers` over `config`,
/// the index entry's platform with `erofs` in its `os.features` (as containerd's
/// `UpdateManifestPlatform` writes it).
fn write_form_layout(dir: &Path, tag: &str, layers: &[FormLayer], config: &serde_json::Value) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = sha256(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    };
    let config_bytes = serde_json::to_vec(config).unwrap();
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let mut d =
                serde_json::json!({"mediaType": l.media_type, "digest": put(&l.blob), "size": l.blob.len()});
            if l.annotations.as_object().is_some_and(|a| !a.is_empty()) {
                d["annotations"] = l.annotations.clone();
            }
            d
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config_bytes), "size": config_bytes.len()},
        "layers": descs,
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": put(&manifest), "size": manifest.len(),
            "platform": {"architecture": config["architecture"], "os": config["os"], "os.features": ["erofs"]},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The busybox image in containerd ≥ 2.3's form: its converter's blobs (raw, or zstd-compressed
/// with `WithBlobCompression("zstd")`), media types `application/vnd.erofs.layer.v1[+zstd]`,
/// the source descriptors' annotations (it copies the descriptor: busybox's have none), the
/// source config with `rootfs.diff_ids` = the uncompressed EROFS blobs' digests and
/// `os.features: ["erofs"]`; no `org.erofs.*` annotation anywhere. Returns the raw EROFS blobs.
fn containerd_form(dir: &Path, zstd: bool) -> Vec<Vec<u8>> {
    let src = busybox_tars();
    let work = scratch("ctd-form");
    let erofs: Vec<Vec<u8>> =
        src.tars.iter().enumerate().map(|(i, t)| containerd_convert(t, work.path(), i)).collect();
    let layers: Vec<FormLayer> = erofs
        .iter()
        .map(|b| FormLayer {
            media_type: if zstd {
                "application/vnd.erofs.layer.v1+zstd"
            } else {
                "application/vnd.erofs.layer.v1"
            },
            blob: if zstd { zstd_compress(b) } else { b.clone() },
            annotations: serde_json::json!({}),
        })
        .collect();
    let mut config = src.config.clone();
    config["rootfs"]["diff_ids"] = erofs.iter().map(|b| sha256(b)).collect();
    config["os.features"] = serde_json::json!(["erofs"]);
    assert!(src.manifest["layers"].as_array().unwrap().iter().all(|l| l.get("annotations").is_none()));
    write_form_layout(dir, "c23", &layers, &config);
    erofs
}

/// The busybox image in the draft spec's form, as another producer may write it: the base
/// layer raw (`application/vnd.erofs`, role `overlay-lower`), the top one `+zstd` with its
/// `org.erofs.uncompressed-digest`, and a config without `rootfs` (the spec allows it: the
/// DiffIDs come from the digests and annotations). Returns the raw EROFS blobs.
fn spec_form(dir: &Path) -> Vec<Vec<u8>> {
    let src = busybox_tars();
    let work = scratch("spec-form");
    let erofs: Vec<Vec<u8>> =
        src.tars.iter().enumerate().map(|(i, t)| containerd_convert(t, work.path(), i)).collect();
    let layers = vec![
        FormLayer {
            media_type: "application/vnd.erofs",
            blob: erofs[0].clone(),
            annotations: serde_json::json!({"org.erofs.role": "overlay-lower"}),
        },
        FormLayer {
            media_type: "application/vnd.erofs+zstd",
            blob: zstd_compress(&erofs[1]),
            annotations: serde_json::json!({"org.erofs.uncompressed-digest": sha256(&erofs[1])}),
        },
    ];
    let mut config = src.config.clone();
    config.as_object_mut().unwrap().remove("rootfs");
    config["os.features"] = serde_json::json!(["erofs"]);
    write_form_layout(dir, "spec", &layers, &config);
    erofs
}

/// A directory holding no mkfs.erofs (nor anything else): the PATH of a build that must not
/// convert.
fn path_without_mkfs(dir: &Path) -> PathBuf {
    let empty = dir.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    empty
}

/// `vmrootfs build SOURCE --tag TAG --json` with no mkfs.erofs on PATH; the build result.
fn build_without_mkfs(dir: &Path, store: &Path, source: &str, tag: &str) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store)
        .env("PATH", path_without_mkfs(dir))
        .env_remove("VMROOTFS_TOOL_MKFS_EROFS")
        .args(["build", source, "--tag", tag, "--json"]));
    assert!(ok, "build {source} without mkfs.erofs: {err}");
    eprintln!("vmrootfs build {source} (no mkfs.erofs on PATH):\n{err}");
    serde_json::from_str(&out).unwrap()
}

/// Each lower was stored as its blob came (tool `pulled from …`, no conversion), byte for byte.
fn assert_stored_as_pulled(result: &serde_json::Value, erofs: &[Vec<u8>]) {
    let lowers = lowers_of(result);
    assert_eq!(lowers.len(), erofs.len());
    for (i, (path, _)) in lowers.iter().enumerate() {
        assert_eq!(
            sha256(&std::fs::read(path).unwrap()),
            sha256(&erofs[i]),
            "lower {i} is the producer's blob, unchanged"
        );
        assert_eq!(result["lowers"][i]["recipe"], 0, "lower {i}: stored as another producer's blob");
    }
}

/// `ctr image pull --plain-http ARGS REFERENCE`, asserting success.
fn ctr_pull(containerd: &Containerd, args: &[&str], reference: &str) {
    let pull = containerd.ctr(&[&["image", "pull", "--plain-http"], args, &[reference]].concat());
    let pull_out = String::from_utf8_lossy(&pull.stdout);
    assert!(
        pull.status.success(),
        "ctr image pull {reference}: {pull_out}{}\n{}",
        String::from_utf8_lossy(&pull.stderr),
        containerd.log_text()
    );
    eprintln!(
        "ctr image pull {} {reference}: {}",
        args.join(" "),
        pull_out.lines().last().unwrap_or_default()
    );
}

/// `ctr run --rm --snapshotter SNAPSHOTTER REFERENCE NAME sh -c PROBE`: its stdout, asserting
/// success.
fn ctr_run_probe(containerd: &Containerd, snapshotter: &str, reference: &str, name: &str) -> String {
    let ran =
        containerd.ctr(&["run", "--rm", "--snapshotter", snapshotter, reference, name, "sh", "-c", PROBE]);
    let got = String::from_utf8_lossy(&ran.stdout).into_owned();
    assert!(ran.status.success(), "ctr run {reference}: {got}{}", String::from_utf8_lossy(&ran.stderr));
    eprintln!("ctr run --snapshotter {snapshotter} {reference} sh -c PROBE:\n{got}");
    got
}

/// `vmrootfs run TAG -- sh -c PROBE`: its stdout, asserting success.
fn vmrootfs_run_probe(store: &Path, tag: &str) -> String {
    let out =
        vmrootfs(store).args(["run", tag, "--timeout", "240", "--", "sh", "-c", PROBE]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "vmrootfs run {tag}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// What PROBE prints in the busybox image, from its tars.
fn expected_probe_output() -> String {
    let src = busybox_tars();
    let bin_entries = {
        let mut archive = tar::Archive::new(&src.tars[0][..]);
        archive
            .entries()
            .unwrap()
            .filter(|e| {
                let p = e
                    .as_ref()
                    .unwrap()
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_string();
                p.starts_with("bin/") && p.len() > 4 && !p[4..].trim_end_matches('/').contains('/')
            })
            .count()
    };
    format!(
        "Hello from layer 2 of the vmrootfs demo image.\n{}  /bin/busybox\nissue-whited-out\n{bin_entries}\n",
        busybox_sha256(&src.tars[0])
    )
}

/// Must-show 1, vmrootfs → containerd: a vmrootfs push in containerd 2.1's spelling (plain
/// and `--verity`) is pulled by containerd 2.1 with `--snapshotter erofs`, which stores the
/// pushed blobs as they are (0 conversions), and `ctr run` prints what `vmrootfs run` prints;
/// then containerd publishes the image it holds (`ctr image push`) and vmrootfs builds that
/// without mkfs into its own blobs (0 conversions either way). The other two spellings do not
/// run under containerd 2.1.
#[test]
fn containerd_2_1_pulls_and_runs_what_vmrootfs_pushes() {
    let dir = scratch("ctd-push");
    let store = dir.path().join("store");
    let archive = format!("oci-archive:{}:busybox", busybox_archive().display());
    for (tag, extra) in [("bb", &[][..]), ("bbv", &["--verity"][..])] {
        let (ok, _, err) = run(vmrootfs(&store).args(["-q", "build", &archive, "--tag", tag]).args(extra));
        assert!(ok, "{err}");
    }
    let reg = Registry::start(None);
    let mut pushed = Vec::new();
    for (tag, spelling) in [("bb", None), ("bbv", Some("containerd-2.1"))] {
        let reference = format!("{}/lab/{tag}:c21", reg.addr);
        let mut cmd = vmrootfs(&store);
        cmd.args(["push", tag, &reference, "--json"]);
        // The default spelling for raw layers is containerd 2.1's; the second push names it.
        if let Some(s) = spelling {
            cmd.args(["--media-type", s]);
        }
        let (ok, out, err) = run(&mut cmd);
        assert!(ok, "push {tag}: {err}");
        let p: serde_json::Value = serde_json::from_str(&out).unwrap();
        let response = reg_get(&reg.addr, &format!("/v2/lab/{tag}/manifests/c21"), MANIFEST_TYPE);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let manifest: serde_json::Value = serde_json::from_str(body).unwrap();
        for l in manifest["layers"].as_array().unwrap() {
            assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.erofs");
            assert!(
                l["annotations"].get("org.erofs.role").is_none(),
                "containerd's spellings carry no roles"
            );
        }
        pushed.push((tag, reference, p));
    }
    let want = vmrootfs_run_probe(&store, "bb");
    assert_eq!(want, expected_probe_output());
    eprintln!("vmrootfs run bb -- sh -c PROBE:\n{want}");

    let mut containerd = Containerd::start();
    eprintln!("{}", containerd.versions());
    let runc = Command::new("runc").arg("--version").output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&runc.stdout));
    // First the other spellings, which containerd 2.1 does not read: it pulls them but unpacks
    // nothing, and `ctr run` fails (why `push` defaults to 2.1's spelling for raw layers).
    for spelling in ["spec", "containerd"] {
        let reference = format!("{}/lab/bb:{spelling}", reg.addr);
        let (ok, _, err) = run(vmrootfs(&store).args(["push", "bb", &reference, "--media-type", spelling]));
        assert!(ok, "push --media-type {spelling}: {err}");
        let pull = containerd.ctr(&["image", "pull", "--plain-http", "--snapshotter", "erofs", &reference]);
        eprintln!(
            "containerd 2.1, ctr image pull of --media-type {spelling}: {}",
            if pull.status.success() { "completes" } else { "fails" }
        );
        let ran = containerd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "erofs",
            &reference,
            &format!("{spelling}-probe"),
            "true",
        ]);
        let err = String::from_utf8_lossy(&ran.stderr);
        eprintln!("containerd 2.1, ctr run of --media-type {spelling}: {}", err.trim());
        assert!(!ran.status.success(), "containerd 2.1 ran the {spelling} spelling");
    }
    for (tag, reference, p) in &pushed {
        ctr_pull(&containerd, &["--snapshotter", "erofs"], reference);
        // The erofs differ stored each pushed layer as it is: no conversion on containerd's side.
        let held: Vec<String> =
            containerd.snapshot_blobs().iter().map(|b| sha256(&std::fs::read(b).unwrap())).collect();
        for l in p["layers"].as_array().unwrap() {
            let d = l["digest"].as_str().unwrap();
            assert!(held.iter().any(|h| h == d), "{tag}: layer {d} is not a snapshot blob ({held:?})");
        }
        let got = ctr_run_probe(&containerd, "erofs", reference, &format!("{tag}-probe"));
        assert_eq!(got, want, "ctr run prints what vmrootfs run prints ({tag})");
        // containerd 2.1 has no EROFS converter (that came in 2.3): what it can publish is
        // the EROFS image it holds, which `ctr image push` sends on as it is.
        let republished = format!("{}/lab/{tag}:from-containerd", reg.addr);
        let push = containerd.ctr(&["image", "push", "--plain-http", &republished, reference]);
        assert!(
            push.status.success(),
            "ctr image push {republished}: {}",
            String::from_utf8_lossy(&push.stderr)
        );
        eprintln!("ctr image push {republished} {reference}: ok");
    }
    let left = containerd.stop();
    assert!(left.is_empty(), "containerd left behind: {left:?}");

    // The reverse direction: vmrootfs builds what containerd 2.1 published, without mkfs.
    for (tag, _, _) in &pushed {
        let republished = format!("{}/lab/{tag}:from-containerd", reg.addr);
        let fresh = dir.path().join(format!("fresh-{tag}"));
        let r = build_without_mkfs(dir.path(), &fresh, &republished, tag);
        let original: serde_json::Value =
            serde_json::from_str(&run(vmrootfs(&store).args(["inspect", tag, "--json"])).1).unwrap();
        for (i, l) in r["lowers"].as_array().unwrap().iter().enumerate() {
            assert_eq!(l["blob_sha256"], original["lowers"][i]["blob_sha256"], "{tag} lower {i}");
            assert_eq!(l["chain_id"], original["lowers"][i]["chain_id"], "{tag} lower {i}: the local key");
            assert_eq!(l["verity"].is_object(), *tag == "bbv");
        }
    }
}

/// Must-show 1, containerd → vmrootfs: an image in containerd ≥ 2.3's form (raw layers) is
/// built by vmrootfs with no mkfs.erofs on PATH, its blobs stored as they came, and booted
/// (`vmrootfs run`, one boot); so is the `+zstd` form (built, not booted).
#[test]
fn containerd_2_3_form_builds_without_mkfs_and_runs() {
    let dir = scratch("ctd-2-3");
    let layout = dir.path().join("c23");
    let erofs = containerd_form(&layout, false);
    let store = dir.path().join("store");
    let r = build_without_mkfs(dir.path(), &store, &format!("oci:{}:c23", layout.display()), "c23");
    assert_stored_as_pulled(&r, &erofs);
    // The converter's mkfs.erofs runs without `-T`: its blobs carry their build time.
    let zstd_layout = dir.path().join("c23-zstd");
    let zstd_erofs = containerd_form(&zstd_layout, true);
    let zstd_store = dir.path().join("zstd-store");
    let z =
        build_without_mkfs(dir.path(), &zstd_store, &format!("oci:{}:c23", zstd_layout.display()), "c23z");
    assert_stored_as_pulled(&z, &zstd_erofs);
    let got = vmrootfs_run_probe(&store, "c23");
    eprintln!("vmrootfs run c23 -- sh -c PROBE:\n{got}");
    assert_eq!(got, expected_probe_output());
}

/// Must-show 1, the draft spec's form (a raw `overlay-lower` base, a `+zstd` top layer, a
/// config without `rootfs`): built by vmrootfs with no mkfs.erofs on PATH and booted.
#[test]
fn spec_form_without_rootfs_builds_without_mkfs_and_runs() {
    let dir = scratch("spec-form");
    let layout = dir.path().join("spec");
    let erofs = spec_form(&layout);
    let store = dir.path().join("store");
    let r = build_without_mkfs(dir.path(), &store, &format!("oci:{}:spec", layout.display()), "spec");
    assert_stored_as_pulled(&r, &erofs);
    assert_eq!(r["lowers"][1]["diff_id"], sha256(&erofs[1]), "the top layer's DiffID is its annotation");
    let got = vmrootfs_run_probe(&store, "spec");
    eprintln!("vmrootfs run spec -- sh -c PROBE:\n{got}");
    assert_eq!(got, expected_probe_output());
}

/// A change made to a manifest.
type ManifestEdit = dyn Fn(&mut serde_json::Value);

/// Rewrites the manifest of the one image in `layout` (and the index entry naming it).
fn edit_manifest(layout: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let blob = |d: &serde_json::Value| {
        layout.join("blobs/sha256").join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&index["manifests"][0]["digest"])).unwrap()).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let d = sha256(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:")), &bytes).unwrap();
    index["manifests"][0]["digest"] = d.into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Must-show 2, refusals: an unknown EROFS subtype, `+zstd` in containerd 2.1's spelling (on
/// build, and on push), a dm-verity block size the kernel cannot take (and one it takes but
/// vmrootfs does not check) — each refused before any blob is stored, naming the layer.
#[test]
fn unknown_subtypes_compressed_2_1_layers_and_bad_verity_block_sizes_are_refused() {
    let dir = scratch("ctd-refuse");
    let base = dir.path().join("base");
    containerd_form(&base, false);
    let cases: [(&str, &ManifestEdit, &[&str]); 5] = [
        (
            "unknown-subtype",
            &|m| m["layers"][1]["mediaType"] = "application/vnd.erofs.layer.v2".into(),
            &["layer 1", "application/vnd.erofs.layer.v2", "not an EROFS layer type vmrootfs reads"],
        ),
        (
            "zstd-2-1",
            &|m| {
                for l in m["layers"].as_array_mut().unwrap() {
                    l["mediaType"] = "application/vnd.oci.image.layer.v1.erofs+zstd".into();
                }
            },
            &["layer 0", "containerd 2.1's spelling has no compressed form"],
        ),
        (
            "verity-8192",
            &|m| m["layers"][0]["annotations"] = serde_json::json!({"org.erofs.dmverity.block_size": "8192"}),
            &["layer 0", "block size 8192", "the kernel's dm-verity cannot take"],
        ),
        (
            "verity-3000",
            &|m| m["layers"][1]["annotations"] = serde_json::json!({"org.erofs.dmverity.block_size": "3000"}),
            &["layer 1", "block size 3000", "the kernel's dm-verity cannot take"],
        ),
        (
            "verity-1024",
            &|m| m["layers"][0]["annotations"] = serde_json::json!({"org.erofs.dmverity.block_size": "1024"}),
            &["layer 0", "block size 1024", "4096-byte blocks only"],
        ),
    ];
    for (name, edit, says) in cases {
        let layout = dir.path().join(name);
        let copied = Command::new("cp").arg("-a").arg(&base).arg(&layout).status().unwrap();
        assert!(copied.success());
        edit_manifest(&layout, edit);
        let store = dir.path().join(format!("{name}.store"));
        let (ok, _, err) = run(vmrootfs(&store)
            .env("PATH", path_without_mkfs(dir.path()))
            .args(["build", &format!("oci:{}:c23", layout.display())]));
        assert!(!ok, "{name} was accepted");
        eprintln!("{name}: {}", err.trim());
        for s in says {
            assert!(err.contains(s), "{name}: {err}");
        }
        let stored = std::fs::read_dir(store.join("layers")).map(|d| d.count()).unwrap_or(0);
        let records = std::fs::read_dir(store.join("images")).map(|d| d.count()).unwrap_or(0);
        assert_eq!((stored, records), (0, 0), "{name}: nothing stored");
    }
    // push refuses to write what containerd 2.1 cannot read.
    let store = dir.path().join("push.store");
    let (ok, _, err) = run(vmrootfs(&store).args([
        "-q",
        "build",
        &format!("oci-archive:{}:busybox", busybox_archive().display()),
        "--tag",
        "bb",
    ]));
    assert!(ok, "{err}");
    let out = dir.path().join("out");
    let (ok, _, err) = run(vmrootfs(&store).args([
        "push",
        "bb",
        &format!("oci:{}", out.display()),
        "--zstd",
        "--media-type",
        "containerd-2.1",
    ]));
    assert!(!ok, "push --zstd --media-type containerd-2.1 was accepted");
    eprintln!("push --zstd --media-type containerd-2.1: {}", err.trim());
    assert!(err.contains("containerd 2.1's spelling has no compressed form"), "{err}");
    assert!(!out.join("index.json").exists(), "nothing written");
}

/// Each spelling `push` writes (raw and `+zstd`, where it has one) pulls back into the same
/// blobs with no mkfs.erofs on PATH; roles only in the draft's spelling.
#[test]
fn every_spelling_push_writes_pulls_back_without_mkfs() {
    let dir = scratch("ctd-spellings");
    let store = dir.path().join("store");
    let archive = format!("oci-archive:{}:busybox", busybox_archive().display());
    let (ok, _, err) = run(vmrootfs(&store).args(["-q", "build", &archive, "--tag", "bb"]));
    assert!(ok, "{err}");
    let original: serde_json::Value =
        serde_json::from_str(&run(vmrootfs(&store).args(["inspect", "bb", "--json"])).1).unwrap();
    let cases = [
        (Some("spec"), false, "application/vnd.erofs"),
        (Some("spec"), true, "application/vnd.erofs+zstd"),
        (Some("containerd"), false, "application/vnd.erofs.layer.v1"),
        (Some("containerd"), true, "application/vnd.erofs.layer.v1+zstd"),
        (Some("containerd-2.1"), false, "application/vnd.oci.image.layer.v1.erofs"),
        (None, false, "application/vnd.oci.image.layer.v1.erofs"),
        (None, true, "application/vnd.erofs.layer.v1+zstd"),
    ];
    for (i, (spelling, zstd, media_type)) in cases.into_iter().enumerate() {
        let layout = dir.path().join(format!("out{i}"));
        let mut cmd = vmrootfs(&store);
        cmd.args(["push", "bb", &format!("oci:{}:bb", layout.display()), "--json"]);
        if let Some(s) = spelling {
            cmd.args(["--media-type", s]);
        }
        if zstd {
            cmd.arg("--zstd");
        }
        let (ok, out, err) = run(&mut cmd);
        assert!(ok, "push {spelling:?} zstd={zstd}: {err}");
        let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
        let manifest: serde_json::Value = {
            let d = pushed["manifest_digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(d)).unwrap()).unwrap()
        };
        let layers = manifest["layers"].as_array().unwrap();
        for (k, l) in layers.iter().enumerate() {
            assert_eq!(l["mediaType"], media_type, "{spelling:?} zstd={zstd}");
            let role = l["annotations"].get("org.erofs.role");
            let want_role = spelling == Some("spec") && k + 1 < layers.len();
            assert_eq!(
                role.is_some(),
                want_role,
                "{spelling:?} layer {k}: roles only in the draft's spelling"
            );
        }
        let fresh = dir.path().join(format!("fresh{i}"));
        let r = build_without_mkfs(dir.path(), &fresh, &format!("oci:{}:bb", layout.display()), "bb");
        for (k, l) in r["lowers"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                l["blob_sha256"], original["lowers"][k]["blob_sha256"],
                "{spelling:?} zstd={zstd} lower {k}"
            );
            assert_eq!(l["chain_id"], original["lowers"][k]["chain_id"]);
        }
    }
}

/// `blob ‖ tree` as `veritysetup format --hash-offset` makes it with `salt` (hex); the root
/// digest it printed.
fn veritysetup_append(blob: &[u8], salt: &str, work: &Path) -> (Vec<u8>, String) {
    let file = work.join("verity-layer");
    std::fs::write(&file, blob).unwrap();
    let out = Command::new("veritysetup")
        .arg("format")
        .arg(&file)
        .arg(&file)
        .arg(format!("--hash-offset={}", blob.len()))
        .arg(format!("--data-blocks={}", blob.len() / 4096))
        .arg(format!("--salt={salt}"))
        .output()
        .expect("veritysetup (cryptsetup-bin)");
    assert!(out.status.success(), "veritysetup format: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let root = printed.lines().find_map(|l| l.strip_prefix("Root hash:")).unwrap().trim().to_string();
    (std::fs::read(&file).unwrap(), root)
}

/// dm-verity from another producer: layers in the draft spec's form with trees appended by
/// `veritysetup` under a 16-byte salt of its own (vmrootfs salts with 32 bytes of the chain
/// ID) are stored as a `--verity` image whose trees are read with the salt their superblocks
/// hold, verified, and booted through dm-verity; a tree that does not give the annotated root
/// is refused. (Before, vmrootfs ignored the annotations of layers it had not made and
/// stored `blob ‖ tree` as a plain blob.)
#[test]
fn another_producers_verity_trees_are_read_with_the_salt_they_hold() {
    let dir = scratch("ctd-verity");
    let src = busybox_tars();
    let salt = "00112233445566778899aabbccddeeff";
    let erofs: Vec<Vec<u8>> =
        src.tars.iter().enumerate().map(|(i, t)| containerd_convert(t, dir.path(), i)).collect();
    let layout_with = |name: &str, corrupt: bool| -> (PathBuf, Vec<String>) {
        let mut roots = Vec::new();
        let layers: Vec<FormLayer> = erofs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (mut with_tree, root) = veritysetup_append(b, salt, dir.path());
                if corrupt && i == 0 {
                    // A hash block of the tree (after its superblock block), not the data.
                    let at = b.len() + 4096 + 7;
                    with_tree[at] ^= 0x40;
                }
                let mut annotations = serde_json::json!({
                    "org.erofs.dmverity.hash_offset": b.len().to_string(),
                    "org.erofs.dmverity.root_digest": format!("sha256:{root}"),
                    "org.erofs.dmverity.block_size": "4096",
                });
                if i + 1 < erofs.len() {
                    annotations["org.erofs.role"] = "overlay-lower".into();
                }
                roots.push(root);
                FormLayer { media_type: "application/vnd.erofs", blob: with_tree, annotations }
            })
            .collect();
        let mut config = src.config.clone();
        config.as_object_mut().unwrap().remove("rootfs");
        config["os.features"] = serde_json::json!(["erofs"]);
        let layout = dir.path().join(name);
        write_form_layout(&layout, "v", &layers, &config);
        (layout, roots)
    };
    let (layout, roots) = layout_with("good", false);
    let store = dir.path().join("store");
    let r = build_without_mkfs(dir.path(), &store, &format!("oci:{}:v", layout.display()), "v");
    assert_stored_as_pulled(&r, &erofs);
    for (i, l) in r["lowers"].as_array().unwrap().iter().enumerate() {
        let v = &l["verity"];
        assert_eq!(v["salt"], salt, "lower {i}: the salt of its tree's superblock");
        assert_eq!(v["root_digest"], format!("sha256:{}", roots[i]), "lower {i}");
        assert_eq!(v["hash_offset"], erofs[i].len(), "lower {i}");
    }
    let (ok, out, err) = run(vmrootfs(&store).args(["verify", "v"]));
    assert!(ok, "verify: {out}{err}");
    let got = vmrootfs_run_probe(&store, "v");
    eprintln!("vmrootfs run v (dm-verity, veritysetup's trees) -- sh -c PROBE:\n{got}");
    assert_eq!(got, expected_probe_output());

    let (bad, _) = layout_with("corrupt", true);
    let bad_store = dir.path().join("bad-store");
    let (ok, _, err) = run(vmrootfs(&bad_store)
        .env("PATH", path_without_mkfs(dir.path()))
        .args(["build", &format!("oci:{}:v", bad.display())]));
    assert!(!ok, "a tree that does not give its annotated root was accepted");
    eprintln!("corrupt tree: {}", err.trim());
    assert!(err.contains("1 blocks of its dm-verity tree are not the tree of its blob"), "{err}");
}

/// Must-show (issue 20): `push --format oci` publishes the image as a standard OCI image with
/// its original tar layers, which containerd 2.1 pulls and unpacks with its default overlayfs
/// snapshotter (the walking differ applying the tars, no EROFS involved), and `ctr run`
/// prints what `vmrootfs run` prints.
#[test]
fn containerd_2_1_runs_the_oci_form_push_with_the_overlayfs_snapshotter() {
    let dir = scratch("ctd-oci-form");
    let store = dir.path().join("store");
    let archive = format!("oci-archive:{}:busybox", busybox_archive().display());
    let (ok, _, err) = run(vmrootfs(&store).args(["-q", "build", &archive, "--tag", "bb"]));
    assert!(ok, "{err}");
    let reg = Registry::start(None);
    let reference = format!("{}/lab/bb:oci", reg.addr);
    let (ok, _, err) = run(vmrootfs(&store).args(["push", "bb", &reference, "--format", "oci"]));
    assert!(ok, "push --format oci: {err}");
    let want = vmrootfs_run_probe(&store, "bb");
    assert_eq!(want, expected_probe_output());
    eprintln!("vmrootfs run bb -- sh -c PROBE:\n{want}");

    let mut containerd = Containerd::start();
    eprintln!("{}", containerd.versions());
    // The transfer service unpacks only for the fixture's unpack configuration (erofs):
    // `--local` pulls client-side, unpacking for the snapshotter asked.
    ctr_pull(&containerd, &["--local", "--snapshotter", "overlayfs"], &reference);
    let got = ctr_run_probe(&containerd, "overlayfs", &reference, "oci-form-probe");
    assert_eq!(got, want, "ctr run prints what vmrootfs run prints");
    assert!(
        containerd.snapshot_blobs().is_empty(),
        "no EROFS blob: the tar layers were applied by overlayfs"
    );
    let left = containerd.stop();
    assert!(left.is_empty(), "containerd left behind: {left:?}");
}

/// What the commit guest changes in the busybox image: `/etc/motd` replaced, one command of
/// `/bin` deleted (a whiteout), a new directory with a setuid file, a symlink and a hardlink.
const COMMIT_CHANGES: &str = "echo committed motd > /etc/motd && rm /bin/$(ls /bin | grep -vx busybox | head -n1) \
    && mkdir -p /srv/app && echo data > /srv/app/f && chmod 4755 /srv/app/f \
    && ln -s f /srv/app/link && ln /srv/app/f /srv/app/hard";

/// Must-show (issue 20, 2): an image made by `run --upper` + `commit` and pushed with
/// `push --format oci` to a registry is a standard OCI image: skopeo copies it back and
/// `umoci unpack` gives the tree of vmrootfs's own blob stack of the committed image, and
/// containerd 2.1 (overlayfs snapshotter, the tar layers applied by its differ) runs it,
/// printing what `vmrootfs run` of the committed image prints.
#[test]
fn a_committed_image_pushed_in_oci_form_unpacks_and_runs_in_containerd_2_1() {
    let (dir, store) = busybox_store("ctd-commit");
    let upper = dir.path().join("up.ext4");
    let (ok, _, err) = run(vmrootfs(&store)
        .args(["-q", "run", "bb", "--timeout", "240", "--upper"])
        .arg(&upper)
        .args(["--", "sh", "-c", COMMIT_CHANGES]));
    assert!(ok, "run --upper: {err}");
    let (ok, out, err) =
        run(vmrootfs(&store).args(["-q", "commit", "--upper"]).arg(&upper).args(["--tag", "bb-1", "--json"]));
    assert!(ok, "commit: {err}");
    let lowers = lowers_of(&serde_json::from_str(&out).expect("commit --json prints JSON"));
    assert_eq!(lowers.len(), 3, "busybox's two layers and the committed one");

    let base = vmrootfs_run_probe(&store, "bb");
    let want = vmrootfs_run_probe(&store, "bb-1");
    eprintln!("vmrootfs run bb-1 -- sh -c PROBE:\n{want}");
    assert!(want.starts_with("committed motd\n"), "{want}");
    let count = |probe: &str| probe.lines().last().unwrap().trim().parse::<u32>().unwrap();
    assert_eq!(count(&want) + 1, count(&base), "one command of /bin whited out");

    let reg = Registry::start(None);
    let reference = format!("{}/lab/bb:committed", reg.addr);
    let (ok, _, err) = run(vmrootfs(&store).args(["push", "bb-1", &reference, "--format", "oci"]));
    assert!(ok, "push --format oci: {err}");

    // skopeo + umoci (tar layers applied in order) against vmrootfs's blob stack.
    let rootfs = skopeo_umoci(&format!("docker://{reference}"), &dir.path().join("pulled"));
    let stack = MountedStack::mount(&lowers);
    let diffs = treediff::diff_trees(stack.root(), &rootfs);
    assert!(diffs.is_empty(), "umoci unpack of the pushed OCI form differs:\n{}", diffs.join("\n"));
    let app = rootfs.join("srv/app");
    assert_eq!(fs_err::read_to_string(app.join("f")).unwrap(), "data\n");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&fs_err::metadata(app.join("f")).unwrap().permissions())
            & 0o7777,
        0o4755
    );
    assert_eq!(fs_err::read_link(app.join("link")).unwrap(), Path::new("f"));
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs_err::metadata(p).unwrap());
    assert_eq!(ino(&app.join("f")), ino(&app.join("hard")), "the hardlink kept");

    let mut containerd = Containerd::start();
    ctr_pull(&containerd, &["--local", "--snapshotter", "overlayfs"], &reference);
    let got = ctr_run_probe(&containerd, "overlayfs", &reference, "committed-probe");
    assert_eq!(got, want, "ctr run prints what vmrootfs run prints");
    let left = containerd.stop();
    assert!(left.is_empty(), "containerd left behind: {left:?}");
}

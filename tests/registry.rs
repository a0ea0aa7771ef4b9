//! Registry sources against real `docker-registry` (distribution v2) servers on loopback —
//! one anonymous, one with htpasswd basic auth — fed by skopeo, plus a fault-injecting proxy.

mod fixture;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fixture::registry::{Registry, base64_encode, reg_get};
use fixture::*;

impl Registry {
    /// A registry that trusts `tokens`' tokens (distribution's token auth).
    fn start_token(tokens: &TokenServer) -> Registry {
        let auth = format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            tokens.addr,
            tokens.dir.path().join("cert.pem").display()
        );
        Registry::launch(scratch("registry"), auth)
    }
}

fn test_image_oci() -> String {
    format!("oci:{}/oci:test", image().display())
}

fn layer_digests() -> Vec<String> {
    let layout = image().join("oci");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&m[7..])).unwrap()).unwrap();
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

fn build_json(store: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let (ok, out, err) = run(vmrootfs(store).arg("build").args(args).arg("--json"));
    (ok, serde_json::from_str(&out).unwrap_or_default(), err)
}

fn blob_hashes(result: &serde_json::Value) -> Vec<String> {
    lowers_of(result).iter().map(|(p, _)| sha256_file_hex(p).unwrap()).collect()
}

/// A pull gives the same blobs as building the OCI layout; a second build fetches no layer.
#[test]
fn pull_equals_layout_build_and_fetches_nothing_twice() {
    let reg = Registry::start(None);
    reg.push(&test_image_oci(), "lab/test:1", None, false);
    let dir = scratch("reg-pull");
    let (ok, pulled, err) =
        build_json(&dir.path().join("a"), &[&format!("docker://{}/lab/test:1", reg.addr)]);
    assert!(ok, "{err}");
    assert!(err.contains("converting"), "progress per layer: {err}");
    let (ok, local, err) = build_json(&dir.path().join("b"), &[&test_image_oci()]);
    assert!(ok, "{err}");
    assert_eq!(pulled["manifest_digest"], local["manifest_digest"]);
    assert_eq!(blob_hashes(&pulled), blob_hashes(&local), "same blobs from the registry and the layout");

    // Docker schema 2 too: skopeo pushes a docker-archive as a v2s2 manifest (recompressing
    // its layers: other digests, same diff_ids, so the same chain IDs and the same blobs).
    reg.push(&format!("docker-archive:{}/image.docker.tar", image().display()), "lab/docker:1", None, false);
    let (ok, docker, err) = build_json(&dir.path().join("c"), &[&format!("{}/lab/docker:1", reg.addr)]);
    assert!(ok, "{err}");
    assert_eq!(blob_hashes(&docker), blob_hashes(&local), "same blobs from a Docker schema-2 manifest");
    let manifest = reg_get(
        &reg.addr,
        "/v2/lab/docker/manifests/1",
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    assert!(manifest.contains("application/vnd.docker.distribution.manifest.v2+json"), "{manifest}");

    let layers = layer_digests();
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();
    assert!(before.iter().all(|&n| n == 1), "each layer fetched exactly once: {before:?}");
    let (ok, again, err) =
        build_json(&dir.path().join("a"), &[&format!("{}/lab/test:1", reg.addr), "--tag", "again"]);
    assert!(ok, "{err}");
    assert_eq!(again["cached"], true);
    assert!(err.matches("stored, skipped").count() == 4, "skipped layers are reported: {err}");
    let after: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();
    assert_eq!(before, after, "the second build downloaded no layer blob");
}

/// Two platforms in one index: --platform picks one; a missing one lists what there is.
#[test]
fn multi_platform_index_resolves_to_the_platform() {
    let dir = scratch("reg-multi");
    let layout = dir.path().join("layout");
    let amd = Layer::gzip(&[file("arch", "amd64")]);
    let arm = Layer::gzip(&[file("arch", "arm64")]);
    write_index_layout(&layout, &[("amd64", amd), ("arm64", arm)]);
    let reg = Registry::start(None);
    reg.push(&format!("oci:{}:multi", layout.display()), "lab/multi:1", None, true);
    let reference = format!("{}/lab/multi:1", reg.addr);
    for arch in ["amd64", "arm64"] {
        let (ok, r, err) =
            build_json(&dir.path().join(arch), &[&reference, "--platform", &format!("linux/{arch}")]);
        assert!(ok, "{err}");
        assert_eq!(r["platform"], format!("linux/{arch}"));
        let lowers = lowers_of(&r);
        let stack = MountedStack::mount(&lowers);
        assert_eq!(std::fs::read_to_string(stack.root().join("arch")).unwrap(), arch);
    }
    let (ok, _, err) = build_json(&dir.path().join("none"), &[&reference, "--platform", "linux/s390x"]);
    assert!(!ok);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
}

/// `REPO@sha256:<index digest>` (how most pinned references look): the pin is checked against
/// the index, the platform manifest against the index's descriptor.
#[test]
fn pinning_by_index_digest_resolves_the_platform() {
    let dir = scratch("reg-pin-index");
    let layout = dir.path().join("layout");
    let amd = Layer::gzip(&[file("arch", "amd64")]);
    let arm = Layer::gzip(&[file("arch", "arm64")]);
    write_index_layout(&layout, &[("amd64", amd), ("arm64", arm)]);
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let index_digest = top["manifests"][0]["digest"].as_str().unwrap().to_string();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&index_digest[7..])).unwrap())
            .unwrap();
    let reg = Registry::start(None);
    reg.push(&format!("oci:{}:multi", layout.display()), "lab/pinned:1", None, true);
    let reference = format!("{}/lab/pinned@{index_digest}", reg.addr);
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let (ok, r, err) =
            build_json(&dir.path().join(arch), &[&reference, "--platform", &format!("linux/{arch}")]);
        assert!(ok, "{reference}: {err}");
        assert_eq!(r["platform"], format!("linux/{arch}"));
        assert_eq!(r["manifest_digest"], index["manifests"][i]["digest"], "the platform manifest");
        let stack = MountedStack::mount(&lowers_of(&r));
        assert_eq!(std::fs::read_to_string(stack.root().join("arch")).unwrap(), arch);
    }
}

/// A credential helper that fails is an error naming it, not anonymous access; one that
/// answers docker's "credentials not found" means there are none.
#[test]
fn a_failing_credential_helper_is_an_error_naming_it() {
    let dir = scratch("reg-helper");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[Layer::gzip(&[file("f", "x")])]);
    let reg = Registry::start(None);
    reg.push(&format!("oci:{}:t", layout.display()), "lab/helped:1", None, false);
    let reference = format!("{}/lab/helped:1", reg.addr);
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let docker = dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(docker.join("config.json"), format!(r#"{{"credHelpers": {{"{}": "vmtest"}}}}"#, reg.addr))
        .unwrap();
    let helper = |script: &str| {
        let file = bin.join("docker-credential-vmtest");
        std::fs::write(&file, script).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    let build = |store: &str| {
        run(vmrootfs(&dir.path().join(store))
            .args(["build", &reference])
            .env("DOCKER_CONFIG", &docker)
            .env("PATH", &path))
    };

    // A helper reads the server name on stdin, answers on stdout (errors on stderr).
    helper("#!/bin/sh\nread -r server\necho \"keyring locked for $server\" >&2\nexit 1\n");
    let (ok, _, err) = build("s1");
    assert!(!ok, "a failing helper is no reason to go anonymous");
    assert!(
        err.contains("docker-credential-vmtest")
            && err.contains(&reg.addr)
            && err.contains(&format!("keyring locked for {}", reg.addr)),
        "{err}"
    );

    helper("#!/bin/sh\nread -r server\necho 'credentials not found in native keychain'\nexit 1\n");
    let (ok, _, err) = build("s2");
    assert!(ok, "no credentials stored: anonymous: {err}");
}

/// An OCI layout whose tag `multi` names an index of one image per architecture.
fn write_index_layout(dir: &Path, images: &[(&str, Layer)]) {
    let mut manifests = Vec::new();
    for (arch, layer) in images {
        let sub = dir.join(format!("tmp-{arch}"));
        oci_layout(&sub, "t", std::slice::from_ref(layer));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sub.join("index.json")).unwrap()).unwrap();
        let mut desc = index["manifests"][0].clone();
        let mdigest = desc["digest"].as_str().unwrap().to_string();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sub.join("blobs/sha256").join(&mdigest[7..])).unwrap())
                .unwrap();
        // Rewrite the config's architecture, which changes the config and manifest digests.
        let cdigest = manifest["config"]["digest"].as_str().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sub.join("blobs/sha256").join(&cdigest[7..])).unwrap())
                .unwrap();
        config["architecture"] = serde_json::json!(arch);
        let config = serde_json::to_vec(&config).unwrap();
        let mut manifest = manifest.clone();
        manifest["config"]["digest"] = serde_json::json!(sha256(&config));
        manifest["config"]["size"] = serde_json::json!(config.len());
        let manifest = serde_json::to_vec(&manifest).unwrap();
        for blob in [&config, &manifest] {
            let p = dir.join("blobs/sha256").join(&sha256(blob)[7..]);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, blob).unwrap();
        }
        let layer_path = format!("blobs/sha256/{}", &layer.digest[7..]);
        std::fs::copy(sub.join(&layer_path), dir.join(&layer_path)).unwrap();
        desc["digest"] = serde_json::json!(sha256(&manifest));
        desc["size"] = serde_json::json!(manifest.len());
        desc["annotations"] = serde_json::Value::Null;
        desc["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        manifests.push(desc);
        std::fs::remove_dir_all(&sub).unwrap();
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    let index = serde_json::to_vec(&index).unwrap();
    let p = dir.join("blobs/sha256").join(&sha256(&index)[7..]);
    std::fs::write(p, &index).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(&index), "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Basic auth: through docker's config.json, through --creds, and a clear error without.
#[test]
fn basic_auth_through_config_json_and_creds() {
    let reg = Registry::start(Some(("vm", "s3cret")));
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    reg.push(&format!("oci-archive:{}:busybox", demo.display()), "lab/bb:1", Some("vm:s3cret"), false);
    let reference = format!("{}/lab/bb:1", reg.addr);
    let dir = scratch("reg-auth");

    let (ok, _, err) =
        run(vmrootfs(&dir.path().join("s0")).args(["build", &reference]).env("DOCKER_CONFIG", dir.path()));
    assert!(!ok);
    assert!(
        err.contains(&format!("registry {} refused access", reg.addr)) && err.contains("--creds"),
        "{err}"
    );

    let docker = dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = base64_encode(b"vm:s3cret");
    std::fs::write(
        docker.join("config.json"),
        format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let (ok, _, err) =
        run(vmrootfs(&dir.path().join("s1")).args(["build", &reference]).env("DOCKER_CONFIG", &docker));
    assert!(ok, "config.json credentials: {err}");

    let (ok, _, err) = run(vmrootfs(&dir.path().join("s2"))
        .args(["build", &reference, "--creds", "vm:s3cret"])
        .env("DOCKER_CONFIG", dir.path()));
    assert!(ok, "--creds: {err}");
}

#[test]
fn missing_image_names_the_reference() {
    let reg = Registry::start(None);
    let reference = format!("{}/lab/nothing:here", reg.addr);
    let (ok, _, err) = run(vmrootfs(&scratch("reg-404").path().join("s")).args(["build", &reference]));
    assert!(!ok);
    assert!(err.contains(&reference) && err.contains("not found"), "{err}");
}

/// What the proxy does to GETs of one blob.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Nothing: the proxy only records.
    None,
    /// Close the connection halfway through the body, the first time.
    CutOnce,
    /// Send half the body, stall this long, then close the connection, the first time.
    StallOnce(Duration),
    /// Answer 500 the first time.
    ServerErrorOnce,
    /// Flip a byte of the gzip header's MTIME field in the body, every time: the stream still
    /// decompresses, only the digest can tell.
    Corrupt,
}

/// A one-request-per-connection HTTP proxy in front of a registry that injects `fault` into
/// responses for `blob`. It records each request as `REQUEST-LINE [Range: …] auth=[…] -> STATUS`.
struct FaultProxy {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
    /// The registry behind it, stopped with the proxy.
    upstream: Option<Registry>,
}

impl FaultProxy {
    fn start(upstream: String, blob: String, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let hits = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (upstream, blob, seen, hits) =
                    (upstream.clone(), blob.clone(), seen.clone(), hits.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(conn, &upstream, &blob, fault, &seen, &hits);
                });
            }
        });
        FaultProxy { addr, requests, upstream: None }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            break;
        }
        head.push(b[0]);
    }
    Ok(head)
}

/// The value of header `name` in a request head's lines.
fn header<'a>(lines: &[&'a str], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn proxy_one(
    mut client: TcpStream,
    upstream: &str,
    blob: &str,
    fault: Fault,
    seen: &Mutex<Vec<String>>,
    hits: &AtomicUsize,
) -> std::io::Result<()> {
    let head = String::from_utf8_lossy(&read_head(&mut client)?).into_owned();
    let mut lines: Vec<&str> = head.split("\r\n").filter(|l| !l.is_empty()).collect();
    let request_line = lines.first().copied().unwrap_or_default().to_string();
    let range = header(&lines, "range").map(|r| format!("Range: {r} ")).unwrap_or_default();
    let auth = header(&lines, "authorization").unwrap_or_default().to_string();
    lines.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
    let forwarded = format!("{}\r\nConnection: close\r\n\r\n", lines.join("\r\n"));
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(forwarded.as_bytes())?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let status =
        String::from_utf8_lossy(&response[..response.len().min(12)]).chars().skip(9).collect::<String>();
    seen.lock().unwrap().push(format!("{request_line} {range}auth=[{auth}] -> {status}"));
    let is_blob = request_line.starts_with("GET ") && request_line.contains(&format!("/blobs/{blob}"));
    if is_blob && status.starts_with('2') {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        let body_at =
            response.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).unwrap_or(response.len());
        let half = body_at + (response.len() - body_at) / 2;
        match fault {
            Fault::CutOnce if n == 0 => {
                client.write_all(&response[..half])?;
                return Ok(()); // dropped: the connection closes mid-body
            }
            Fault::StallOnce(pause) if n == 0 => {
                client.write_all(&response[..half])?;
                std::thread::sleep(pause);
                return Ok(());
            }
            Fault::ServerErrorOnce if n == 0 => {
                client.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )?;
                return Ok(());
            }
            Fault::Corrupt if response.len() > body_at + 100 => {
                response[body_at + 4] ^= 0x40;
            }
            _ => {}
        }
    }
    client.write_all(&response)
}

/// The demo image's busybox layer digest (the big blob of `testdata/busybox.oci.tar`).
fn demo_layer_digest() -> String {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    let dir = scratch("reg-fault-probe");
    let (ok, r, err) =
        build_json(&dir.path().join("s"), &[&format!("oci-archive:{}:busybox", demo.display())]);
    assert!(ok, "{err}");
    r["lowers"][0]["digest"].as_str().unwrap().to_string()
}

/// Builds `lab/bb:1` (the demo image, already pushed to `reg`) through a proxy injecting `fault`,
/// with `args` and `env` added to the build; the proxy stays up until dropped.
fn build_through_proxy(
    reg: &Registry,
    fault: Fault,
    args: &[&str],
    env: &[(&str, &Path)],
) -> (bool, String, FaultProxy, PathBuf, String, tempfile::TempDir) {
    let blob = demo_layer_digest();
    let proxy = FaultProxy::start(reg.addr.clone(), blob.clone(), fault);
    let dir = scratch("reg-fault");
    let store = dir.path().join("store");
    let mut cmd = vmrootfs(&store);
    cmd.args(["build", &format!("{}/lab/bb:1", proxy.addr)]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (ok, _, err) = run(&mut cmd);
    (ok, err, proxy, store, blob, dir)
}

fn faulty_build(fault: Fault) -> (bool, String, FaultProxy, PathBuf, String, tempfile::TempDir) {
    let reg = Registry::start(None);
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    reg.push(&format!("oci-archive:{}:busybox", demo.display()), "lab/bb:1", None, false);
    let mut built = build_through_proxy(&reg, fault, &[], &[]);
    built.2.upstream = Some(reg); // serves until the test drops the proxy, then is killed
    built
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let (ok, err, proxy, _, blob, _dir) = faulty_build(Fault::CutOnce);
    assert!(ok, "{err}");
    assert!(err.contains("resuming"), "{err}");
    let requests = proxy.requests();
    // Every blob is asked as a range; the first from byte 0, a resumption from where the cut
    // left it.
    let of_blob: Vec<String> = requests
        .iter()
        .filter(|r| r.contains(&format!("/blobs/{blob}")))
        .map(|r| r.to_ascii_lowercase())
        .collect();
    assert_eq!(of_blob.len(), 2, "the cut request and one more: {requests:?}");
    assert!(of_blob[0].contains("range: bytes=0-"), "{requests:?}");
    assert!(
        of_blob[1].contains("range: bytes=") && !of_blob[1].contains("range: bytes=0-"),
        "the second resumes after the bytes received: {requests:?}"
    );
}

#[test]
fn a_server_error_is_retried() {
    let (ok, err, proxy, _, blob, _dir) = faulty_build(Fault::ServerErrorOnce);
    assert!(ok, "{err}");
    let gets = proxy.requests().iter().filter(|r| r.contains(&format!("/blobs/{blob}"))).count();
    assert_eq!(gets, 2, "the 500 and the retry");
}

#[test]
fn wrong_bytes_are_rejected_and_nothing_is_published() {
    let (ok, err, _, store, blob, _dir) = faulty_build(Fault::Corrupt);
    assert!(!ok);
    assert!(
        err.contains(&format!("layer blob digest mismatch: expected {blob}")),
        "names the digests: {err}"
    );
    let images: Vec<_> = std::fs::read_dir(store.join("images")).unwrap().collect();
    assert!(images.is_empty(), "no record");
    let blobs: Vec<_> = std::fs::read_dir(store.join("layers"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "erofs"))
        .collect();
    assert!(blobs.is_empty(), "no blob published: {blobs:?}");
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
}

const TOKEN_SERVICE: &str = "vmrootfs-test";
const TOKEN_ISSUER: &str = "vmrootfs-test-issuer";
/// distribution accepts a token until 60 s after its `exp` (its clock-skew leeway).
const REGISTRY_LEEWAY_SECS: i64 = 60;

/// Who may have a token, and for how long.
#[derive(Clone)]
struct TokenPolicy {
    user: &'static str,
    password: &'static str,
    /// The refresh token (docker's `identitytoken`) the OAuth2 grant accepts.
    refresh_token: &'static str,
    /// How long the registry accepts a token.
    lifetime_secs: i64,
    /// What the answer's `expires_in` claims (a server may claim more than the truth).
    claimed_expires_in: i64,
}

const POLICY: TokenPolicy = TokenPolicy {
    user: "vm",
    password: "s3cret",
    refresh_token: "vmrootfs-refresh-7f3a9c",
    lifetime_secs: 300,
    claimed_expires_in: 300,
};

/// A token server of distribution's token auth (the flow Docker Hub, GHCR and Quay use) for
/// registries started with [`Registry::start_token`]. It signs RS256 JWTs with a throwaway key
/// (`openssl`), gives pull,push tokens for Basic credentials (GET) and for the refresh token
/// (POST, OAuth2 `refresh_token` grant), empty ones to anonymous clients, and answers a wrong
/// password as Docker Hub does. It records each request as `METHOD TARGET auth=[…] body=[…]`.
struct TokenServer {
    addr: String,
    dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<String>>>,
    issued: Arc<AtomicUsize>,
}

impl TokenServer {
    fn start(policy: TokenPolicy) -> TokenServer {
        let dir = scratch("token-server");
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=vmrootfs-test-token",
            ])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(dir.path().join("cert.pem"))
            .output()
            .unwrap();
        assert!(der.status.success());
        let x5c = base64_encode(&der.stdout);
        let key = dir.path().join("key.pem");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let issued = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (requests.clone(), issued.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = serve_token(conn, &policy, &key, &x5c, &seen, &count);
            }
        });
        TokenServer { addr, dir, requests, issued }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn base64url(data: &[u8]) -> String {
    base64_encode(data).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value&…` pairs, decoded.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn serve_token(
    mut conn: TcpStream,
    policy: &TokenPolicy,
    key: &Path,
    x5c: &str,
    seen: &Mutex<Vec<String>>,
    issued: &AtomicUsize,
) -> std::io::Result<()> {
    let head = String::from_utf8_lossy(&read_head(&mut conn)?).into_owned();
    let lines: Vec<&str> = head.split("\r\n").filter(|l| !l.is_empty()).collect();
    let mut parts = lines.first().copied().unwrap_or_default().split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let auth = header(&lines, "authorization").unwrap_or_default().to_string();
    let length: usize = header(&lines, "content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    seen.lock().unwrap().push(format!("{method} {target} auth=[{auth}] body=[{body}]"));
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let params = form_pairs(if method == "POST" { &body } else { query });
    let param = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let basic = format!("Basic {}", base64_encode(format!("{}:{}", policy.user, policy.password).as_bytes()));
    // Who is asking, and under which JSON field the token goes back (OAuth2 says access_token).
    let grant = match (method, auth.as_str()) {
        ("POST", _)
            if param("grant_type") == "refresh_token" && param("refresh_token") == policy.refresh_token =>
        {
            Ok(("access_token", true))
        }
        ("POST", _) => {
            Err(r#"{"error":"invalid_grant","error_description":"the refresh token is not valid"}"#)
        }
        ("GET", "") => Ok(("token", false)),
        ("GET", a) if a == basic => Ok(("token", true)),
        _ => Err(r#"{"details":"incorrect username or password"}"#), // Docker Hub's words
    };
    let (status, json) = match grant {
        Err(refusal) => (401, refusal.to_string()),
        Ok((field, authenticated)) => {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let scope = param("scope");
            let mut access = Vec::new();
            if authenticated
                && let Some((name, actions)) =
                    scope.strip_prefix("repository:").and_then(|r| r.rsplit_once(':'))
            {
                let actions: Vec<&str> = actions.split(',').collect();
                access.push(serde_json::json!({"type": "repository", "name": name, "actions": actions}));
            }
            let n = issued.fetch_add(1, Ordering::SeqCst);
            let claims = serde_json::json!({
                "iss": TOKEN_ISSUER, "sub": policy.user, "aud": TOKEN_SERVICE,
                "exp": now + policy.lifetime_secs - REGISTRY_LEEWAY_SECS,
                "nbf": now - 1, "iat": now, "jti": format!("token-{n}"), "access": access,
            });
            let jwt = sign_jwt(key, x5c, &claims)?;
            (200, serde_json::json!({field: jwt, "expires_in": policy.claimed_expires_in}).to_string())
        }
    };
    let reason = if status == 200 { "OK" } else { "Unauthorized" };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    )
}

/// An RS256 JWT of `claims`, signed with `key` (PEM), its certificate in the `x5c` header.
fn sign_jwt(key: &Path, x5c: &str, claims: &serde_json::Value) -> std::io::Result<String> {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let signing =
        format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(claims.to_string().as_bytes()));
    let mut sign = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    sign.stdin.take().unwrap().write_all(signing.as_bytes())?;
    let signature = sign.wait_with_output()?.stdout;
    Ok(format!("{signing}.{}", base64url(&signature)))
}

/// A token registry holding the demo image as `lab/bb:1`, and its token server.
fn token_registry(policy: TokenPolicy) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(policy.clone());
    let reg = Registry::start_token(&tokens);
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    let creds = format!("{}:{}", policy.user, policy.password);
    reg.push(&format!("oci-archive:{}:busybox", demo.display()), "lab/bb:1", Some(&creds), false);
    (tokens, reg)
}

/// Item 20: a wrong password is reported in the token server's words; the right one works,
/// reaches only the token server, and the registry sees only bearer tokens; anonymous access to
/// a private repository still says how to log in.
#[test]
fn bearer_auth_reports_the_token_servers_refusal_and_sends_credentials_only_there() {
    let (tokens, reg) = token_registry(POLICY);
    let no_config = scratch("no-docker-config");
    let env = [("DOCKER_CONFIG", no_config.path())];

    let (ok, err, ..) = build_through_proxy(&reg, Fault::None, &["--creds", "vm:wrong"], &env);
    assert!(!ok);
    assert!(
        err.contains("incorrect username or password")
            && err.contains(&format!("http://{}/token", tokens.addr)),
        "the token server's refusal, naming it: {err}"
    );

    let (ok, err, proxy, ..) = build_through_proxy(&reg, Fault::None, &["--creds", "vm:s3cret"], &env);
    assert!(ok, "{err}");
    let basic = base64_encode(b"vm:s3cret");
    let to_registry = proxy.requests();
    assert!(!to_registry.is_empty());
    assert!(
        to_registry.iter().all(|r| !r.contains(&basic) && !r.contains("auth=[Basic")),
        "the password never reached the registry: {to_registry:#?}"
    );
    assert!(
        to_registry
            .iter()
            .filter(|r| r.contains("/blobs/"))
            // Blobs are asked as ranges from byte 0 (206), see `source::registry::download`.
            .all(|r| r.contains("auth=[Bearer ") && (r.ends_with("-> 200") || r.ends_with("-> 206"))),
        "blobs were fetched with a bearer token: {to_registry:#?}"
    );
    let to_tokens = tokens.requests();
    let pulls: Vec<&String> = to_tokens
        .iter()
        .filter(|r| r.contains(&basic) && r.contains("scope=repository%3Alab%2Fbb%3Apull&"))
        .collect();
    assert_eq!(pulls.len(), 1, "one pull-scoped token for the build: {to_tokens:#?}");

    let (ok, err, ..) = build_through_proxy(&reg, Fault::None, &[], &env);
    assert!(!ok);
    assert!(err.contains("refused access") && err.contains("--creds"), "anonymous: {err}");
}

/// Item 20: an `identitytoken` from config.json is exchanged at the token server (OAuth2
/// `refresh_token` grant) and never sent to the registry; a refused one is reported as such.
#[test]
fn an_identity_token_is_exchanged_at_the_token_server_never_sent_to_the_registry() {
    let (tokens, reg) = token_registry(POLICY);
    let docker = scratch("docker-config");
    let config = |token: &str, addr: &str| {
        std::fs::write(
            docker.path().join("config.json"),
            format!(r#"{{"auths": {{"{addr}": {{"auth": "", "identitytoken": "{token}"}}}}}}"#),
        )
        .unwrap()
    };
    let blob = demo_layer_digest();
    let proxy = FaultProxy::start(reg.addr.clone(), blob, Fault::None);
    config(POLICY.refresh_token, &proxy.addr);
    let dir = scratch("reg-identity");
    let (ok, _, err) = run(vmrootfs(&dir.path().join("s"))
        .args(["build", &format!("{}/lab/bb:1", proxy.addr)])
        .env("DOCKER_CONFIG", docker.path()));
    assert!(ok, "{err}");
    let to_registry = proxy.requests();
    assert!(
        to_registry.iter().all(|r| !r.contains(POLICY.refresh_token)),
        "the identity token never reached the registry: {to_registry:#?}"
    );
    let grants: Vec<String> = tokens
        .requests()
        .into_iter()
        .filter(|r| {
            r.starts_with("POST /token")
                && r.contains("grant_type=refresh_token")
                && r.contains(&format!("refresh_token={}", POLICY.refresh_token))
        })
        .collect();
    assert_eq!(grants.len(), 1, "one refresh_token grant: {:#?}", tokens.requests());

    config("a-revoked-token", &proxy.addr);
    let (ok, _, err) = run(vmrootfs(&dir.path().join("s2"))
        .args(["build", &format!("{}/lab/bb:1", proxy.addr)])
        .env("DOCKER_CONFIG", docker.path()));
    assert!(!ok);
    assert!(
        err.contains("refused the identity token") && err.contains("the refresh token is not valid"),
        "{err}"
    );
}

/// Item 20: a token that runs out while a download stalls is renewed when the download resumes:
/// by its `expires_in` when the server tells the truth (no request is refused), and after the
/// registry's 401 when it claims more than the registry grants.
#[test]
fn a_token_that_expires_during_a_stalled_download_is_renewed_on_resume() {
    for claimed in [3, 300] {
        let policy = TokenPolicy { lifetime_secs: 3, claimed_expires_in: claimed, ..POLICY };
        let (tokens, reg) = token_registry(policy);
        let before = tokens.issued.load(Ordering::SeqCst);
        let (ok, err, proxy, _, blob, _dir) = build_through_proxy(
            &reg,
            Fault::StallOnce(Duration::from_secs(5)),
            &["--creds", "vm:s3cret"],
            &[],
        );
        assert!(ok, "expires_in {claimed}: {err}");
        assert!(err.contains("resuming"), "{err}");
        let requests = proxy.requests();
        let ranged: Vec<&String> = requests
            .iter()
            .filter(|r| r.contains(&format!("/blobs/{blob}")) && r.contains("Range: bytes="))
            .collect();
        let refused = ranged.iter().filter(|r| r.ends_with("-> 401")).count();
        assert!(
            ranged.last().is_some_and(|r| r.ends_with("-> 206")),
            "the resumed request succeeded: {requests:#?}"
        );
        let issued = tokens.issued.load(Ordering::SeqCst) - before;
        assert!(issued >= 2, "a new token after the stall (expires_in {claimed}): {issued} issued");
        if claimed == 3 {
            assert_eq!(refused, 0, "renewed before the registry had to refuse: {requests:#?}");
        } else {
            assert_eq!(refused, 1, "one 401, then a renewed token: {requests:#?}");
        }
    }
}

// Hostile registries (issue 17, items 6, 16, 17, 18): a scripted HTTP server per test, one
// fault at a time.

/// One request a hostile server received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

type RawWriter = Box<dyn FnOnce(&mut TcpStream) -> std::io::Result<()> + Send>;

/// What a hostile server answers.
enum Reply {
    /// A complete response: status, headers, body.
    Full(u16, Vec<(String, String)>, Vec<u8>),
    /// Whatever the writer sends; the connection is closed after it.
    Raw(RawWriter),
}

fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
    Reply::Full(status, headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), body.into())
}

/// A scripted HTTP/1.1 server on loopback: `answer` decides each response.
struct Hostile {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Hostile {
    fn start(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, answer) = (seen.clone(), Arc::new(answer));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (log, answer) = (log.clone(), answer.clone());
                std::thread::spawn(move || {
                    let _ = Hostile::serve(conn, &*answer, &log);
                });
            }
        });
        Hostile { addr, seen }
    }

    fn serve(
        mut conn: TcpStream,
        answer: &dyn Fn(&Seen) -> Reply,
        log: &Mutex<Vec<Seen>>,
    ) -> std::io::Result<()> {
        loop {
            let head = read_head(&mut conn)?;
            if head.is_empty() {
                return Ok(());
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let lines: Vec<&str> = head.split("\r\n").filter(|l| !l.is_empty()).collect();
            let mut parts = lines.first().copied().unwrap_or_default().split(' ');
            let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let headers: Vec<(String, String)> = lines[1..]
                .iter()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            let seen = Seen { method: method.into(), target: target.into(), headers };
            if seen.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
                read_chunked(&mut conn)?;
            } else {
                let length: u64 = seen.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                std::io::copy(&mut (&mut conn).take(length), &mut std::io::sink())?;
            }
            log.lock().unwrap().push(seen.clone());
            match answer(&seen) {
                Reply::Full(status, headers, body) => {
                    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    conn.write_all(out.as_bytes())?;
                    if method != "HEAD" {
                        conn.write_all(&body)?;
                    }
                }
                Reply::Raw(write) => return write(&mut conn),
            }
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests whose target contains `needle`.
    fn hits(&self, needle: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.target.contains(needle)).collect()
    }
}

fn read_chunked(conn: &mut TcpStream) -> std::io::Result<()> {
    loop {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if conn.read(&mut b)? == 0 {
                return Ok(());
            }
            line.push(b[0]);
        }
        let text = String::from_utf8_lossy(&line);
        let size = u64::from_str_radix(text.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        std::io::copy(&mut (&mut *conn).take(size + 2), &mut std::io::sink())?;
        if size == 0 {
            return Ok(());
        }
    }
}

/// Streams `prefix`, then `filler` again and again, at most `limit` bytes in all, counting
/// what it sent in `sent`; stops when the client hangs up.
fn endless(head: String, prefix: &'static [u8], filler: u8, limit: usize, sent: Arc<AtomicUsize>) -> Reply {
    Reply::Raw(Box::new(move |conn| {
        conn.write_all(head.as_bytes())?;
        conn.write_all(prefix)?;
        let chunk = vec![filler; 64 << 10];
        while sent.load(Ordering::SeqCst) < limit {
            conn.write_all(&chunk)?;
            sent.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        Ok(())
    }))
}

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// An image as a registry serves it: manifest, config and layers by digest.
struct Served {
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

impl Served {
    /// An image of `layers` (base first); `extra` more layer descriptors repeat the first.
    fn new(layers: &[Layer], extra: usize) -> Served {
        let all: Vec<&Layer> = layers.iter().chain(std::iter::repeat_n(&layers[0], extra)).collect();
        let diff_ids: Vec<&str> = all.iter().map(|l| l.diff_id.as_str()).collect();
        let mut config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if layers[0].media_type.starts_with("application/vnd.erofs") {
            config["os.features"] = serde_json::json!(["erofs"]);
        }
        let config = serde_json::to_vec(&config).unwrap();
        let descs: Vec<_> = all
            .iter()
            .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.blob.len()}))
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        let mut blobs = vec![(sha256(&config), config)];
        blobs.extend(layers.iter().map(|l| (l.digest.clone(), l.blob.clone())));
        Served { manifest, blobs }
    }

    /// The ordinary answer of an open registry holding this image as `lab/x` (any tag).
    fn answer(&self, s: &Seen) -> Reply {
        if s.target == "/v2/" {
            return reply(200, &[], "{}");
        }
        if s.target.starts_with("/v2/lab/x/manifests/") {
            return reply(200, &[("Content-Type", MANIFEST_TYPE)], self.manifest.clone());
        }
        for (d, bytes) in &self.blobs {
            if s.target == format!("/v2/lab/x/blobs/{d}") {
                return reply(200, &[], bytes.clone());
            }
        }
        reply(404, &[], r#"{"errors":[{"code":"NOT_FOUND","message":"not here"}]}"#)
    }
}

fn small_layer() -> Layer {
    Layer::gzip(&[dir("etc", 0o755), file("etc/hello", "hello from a hostile registry\n")])
}

/// Runs `cmd`, killing it after `limit`: (exit status, or `None` if it had to be killed;
/// stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> (Option<bool>, String) {
    let mut child =
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.success());
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap())
}

/// `vmrootfs build ADDR/lab/x:1` into a fresh store, with `args`, killed after a minute.
fn build_from(addr: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<bool>, String, tempfile::TempDir) {
    let dir = scratch("hostile");
    let no_config = dir.path().join("no-docker-config");
    let mut cmd = vmrootfs(&dir.path().join("store"));
    cmd.args(["build", &format!("{addr}/lab/x:1")]).args(args).env("DOCKER_CONFIG", &no_config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (status, err) = run_bounded(&mut cmd, Duration::from_secs(60));
    eprintln!("vmrootfs said: {err}");
    (status, err, dir)
}

/// A store holding a small EROFS image tagged `lab/t:1`, ready to push.
fn store_to_push() -> (tempfile::TempDir, PathBuf) {
    let dir = scratch("hostile-push");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[small_layer()]);
    let store = dir.path().join("store");
    let (ok, _, err) =
        run(vmrootfs(&store).args(["build", &format!("oci:{}:t", layout.display()), "--tag", "lab/t:1"]));
    assert!(ok, "{err}");
    (dir, store)
}

/// A registry that takes pushes to `lab/t`: unless `open`, every request without credentials
/// is answered with a Basic challenge; uploads go to `location(addr)`.
fn push_registry(open: bool, location: impl Fn(&str) -> String + Send + Sync + 'static) -> Hostile {
    let me = Arc::new(Mutex::new(String::new()));
    let addr = me.clone();
    let reg = Hostile::start(move |s| {
        let authed = s.header("authorization").is_some();
        match (s.method.as_str(), s.target.as_str()) {
            (_, _) if !authed && !open => reply(401, &[("WWW-Authenticate", r#"Basic realm="hostile""#)], ""),
            ("GET", "/v2/") => reply(200, &[], "{}"),
            ("HEAD", _) => reply(404, &[], ""),
            ("POST", "/v2/lab/t/blobs/uploads/") => {
                let to = location(&addr.lock().unwrap());
                reply(202, &[("Location", to.as_str())], "")
            }
            ("PUT", t) if t.contains("digest=") => reply(201, &[], ""),
            ("PUT", t) if t.starts_with("/v2/lab/t/manifests/") => reply(201, &[], ""),
            _ => reply(404, &[], ""),
        }
    });
    *me.lock().unwrap() = reg.addr.clone();
    reg
}

/// Item 6: an upload `Location` on another host gets the blob but not the credentials; the
/// registry that asked for them gets them.
#[test]
fn push_sends_credentials_only_to_the_registry_that_asked_for_them() {
    let (_dir, store) = store_to_push();
    let elsewhere = Hostile::start(|s| match s.method.as_str() {
        "PUT" => reply(201, &[], ""),
        _ => reply(404, &[], ""),
    });
    let other = elsewhere.addr.clone();
    let reg = push_registry(false, move |_| format!("http://{other}/upload/u0"));
    let (ok, _, err) = run(vmrootfs(&store)
        .args(["push", "lab/t:1", &format!("{}/lab/t:1", reg.addr)])
        .args(["--creds", "vm:s3cret"]));
    assert!(ok, "{err}");
    let puts = elsewhere.seen();
    assert!(!puts.is_empty(), "the blobs went to the upload host");
    let leaked: Vec<&Seen> = puts.iter().filter(|s| s.header("authorization").is_some()).collect();
    assert!(leaked.is_empty(), "no credentials to {}: {leaked:#?}", elsewhere.addr);
    let basic = format!("Basic {}", base64_encode(b"vm:s3cret"));
    assert!(
        reg.hits("/blobs/uploads/").iter().any(|s| s.header("authorization") == Some(basic.as_str())),
        "the registry that asked got them: {:#?}",
        reg.seen()
    );
}

/// Item 6: a registry whose `/v2/` asks for no credentials gets none, even when some are
/// given: neither when pulling nor when pushing.
#[test]
fn no_credentials_to_a_registry_whose_challenge_asked_for_none() {
    let image = Served::new(&[small_layer()], 0);
    let reg = Hostile::start(move |s| image.answer(s));
    let (status, err, _dir) = build_from(&reg.addr, &["--creds", "vm:s3cret"], &[]);
    assert_eq!(status, Some(true), "{err}");
    let sent: Vec<Seen> = reg.seen().into_iter().filter(|s| s.header("authorization").is_some()).collect();
    assert!(sent.is_empty(), "credentials sent unasked when pulling: {sent:#?}");

    let (_dir, store) = store_to_push();
    let reg = push_registry(true, |_| "/v2/lab/t/blobs/uploads/u0".to_string());
    let (ok, _, err) = run(vmrootfs(&store)
        .args(["push", "lab/t:1", &format!("{}/lab/t:1", reg.addr)])
        .args(["--creds", "vm:s3cret"]));
    assert!(ok, "{err}");
    let sent: Vec<Seen> = reg.seen().into_iter().filter(|s| s.header("authorization").is_some()).collect();
    assert!(sent.is_empty(), "credentials sent unasked when pushing: {sent:#?}");
}

/// Item 16: a manifest of valid JSON followed by whitespace forever fails at the manifest cap,
/// reading a bounded amount.
#[test]
fn an_endless_manifest_fails_at_the_cap_naming_it() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let reg = Hostile::start(move |s| {
        if s.target.contains("/manifests/") {
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Type: {MANIFEST_TYPE}\r\nConnection: close\r\n\r\n");
            endless(head, br#"{"schemaVersion":2}"#, b' ', 256 << 20, counter.clone())
        } else {
            reply(200, &[], "{}")
        }
    });
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains("manifest") && err.contains("larger than"), "{err}");
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent < 64 << 20, "the client hung up at the cap, not after {sent} bytes");
}

/// Item 16: an endless token response fails at the token cap, naming the token server.
#[test]
fn an_endless_token_response_fails_at_the_cap_naming_the_token_server() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let me = Arc::new(Mutex::new(String::new()));
    let addr = me.clone();
    let reg = Hostile::start(move |s| {
        if s.target.starts_with("/token") {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n".to_string();
            endless(head, br#"{"token":""#, b'a', 256 << 20, counter.clone())
        } else {
            let challenge =
                format!(r#"Bearer realm="http://{}/token",service="hostile""#, addr.lock().unwrap());
            reply(401, &[("WWW-Authenticate", challenge.as_str())], "")
        }
    });
    *me.lock().unwrap() = reg.addr.clone();
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains(&format!("http://{}/token", reg.addr)) && err.contains("larger than"), "{err}");
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent < 64 << 20, "the client hung up at the cap, not after {sent} bytes");
}

/// Item 16: an endless error body is cut, and the status still reported.
#[test]
fn an_endless_error_body_is_cut_and_the_status_reported() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let reg = Hostile::start(move |s| {
        if s.target.contains("/manifests/") {
            let head = "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n".to_string();
            endless(head, b"you asked wrong: ", b'x', 256 << 20, counter.clone())
        } else {
            reply(200, &[], "{}")
        }
    });
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains("400") && err.contains("you asked wrong"), "{err}");
    assert!(err.len() < 4096, "the body is not printed whole: {} bytes", err.len());
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent < 64 << 20, "the client hung up at the cap, not after {sent} bytes");
}

/// Item 16: an image with more layers than the limit is refused before any layer is fetched.
#[test]
fn too_many_layers_are_refused_before_any_layer_is_fetched() {
    let layer = small_layer();
    let layer_digest = layer.digest.clone();
    let image = Served::new(&[layer], 1000);
    let reg = Hostile::start(move |s| image.answer(s));
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains("1001 layers") && err.contains("1000"), "{err}");
    assert!(reg.hits(&layer_digest).is_empty(), "no layer fetched: {:#?}", reg.hits("/blobs/"));
}

/// Item 17: a blob that trickles is a stall: retried with a resume from the bytes received,
/// then a failure naming the blob and the registry.
#[test]
fn a_trickling_blob_is_resumed_then_fails_naming_blob_and_registry() {
    let layer = small_layer();
    let digest = layer.digest.clone();
    let blob = layer.blob.clone();
    let image = Served::new(&[layer], 0);
    let reg = Hostile::start(move |s| {
        if !s.target.ends_with(&digest) {
            return image.answer(s);
        }
        let blob = blob.clone();
        Reply::Raw(Box::new(move |conn| {
            write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len())?;
            // One byte every half second, for at most 20 s.
            for b in blob.iter().take(40) {
                conn.write_all(&[*b])?;
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(())
        }))
    });
    let digest = small_layer().digest;
    let (status, err, _dir) = build_from(&reg.addr, &[], &[("VMROOTFS_STALL_TIMEOUT", "2s")]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains(&digest) && err.contains(&reg.addr) && err.contains("stalled"), "{err}");
    let gets = reg.hits(&digest);
    assert!(gets.len() >= 2, "retried: {gets:#?}");
    let resumed = gets[1].header("range").unwrap_or_default();
    assert!(resumed.starts_with("bytes=") && resumed != "bytes=0-", "resumed after what arrived: {gets:#?}");
}

/// Item 17: a registry that accepts the connection and never answers is a stall too.
#[test]
fn a_registry_that_never_answers_fails_naming_it() {
    let reg = Hostile::start(|_| {
        Reply::Raw(Box::new(|_| {
            std::thread::sleep(Duration::from_secs(50));
            Ok(())
        }))
    });
    let (status, err, _dir) = build_from(&reg.addr, &[], &[("VMROOTFS_STALL_TIMEOUT", "1s")]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains(&reg.addr) && err.contains("timed out"), "{err}");
}

/// Item 18: a relative upload `Location` is resolved against the request URL.
#[test]
fn a_relative_upload_location_is_resolved_against_the_request() {
    let (_dir, store) = store_to_push();
    let reg = push_registry(false, |_| "uploads/u0".to_string());
    let (ok, _, err) = run(vmrootfs(&store)
        .args(["push", "lab/t:1", &format!("{}/lab/t:1", reg.addr)])
        .args(["--creds", "vm:s3cret"]));
    assert!(ok, "{err}");
    let puts = reg.hits("/v2/lab/t/blobs/uploads/uploads/u0?digest=sha256");
    assert!(!puts.is_empty(), "{:#?}", reg.seen());
}

/// A registry serving the small image whose layer blob is answered by `layer`.
fn registry_with_layer(
    layer_reply: impl Fn(&str, &Seen) -> Reply + Send + Sync + 'static,
) -> (Hostile, String) {
    let layer = small_layer();
    let digest = layer.digest.clone();
    let image = Served::new(&[layer], 0);
    let me = Arc::new(Mutex::new(String::new()));
    let addr = me.clone();
    let d = digest.clone();
    let reg = Hostile::start(move |s| {
        if s.target.contains(&d) { layer_reply(&addr.lock().unwrap(), s) } else { image.answer(s) }
    });
    *me.lock().unwrap() = reg.addr.clone();
    (reg, digest)
}

/// Item 18: a network error while reading a layer says what it was (a refused connection
/// and its port), not "corrupt or truncated".
#[test]
fn a_refused_connection_for_a_layer_names_the_cause() {
    let closed = fixture::registry::free_port();
    let (reg, digest) = registry_with_layer(move |_, _| {
        reply(307, &[("Location", &format!("http://127.0.0.1:{closed}/blob"))], "")
    });
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains(&digest) && err.to_lowercase().contains("connection refused"), "{err}");
    assert!(err.contains(&closed.to_string()), "names the port: {err}");
    assert!(!err.contains("corrupt or truncated"), "{err}");
}

/// Item 18: a redirect loop is reported as one, once.
#[test]
fn a_redirect_loop_for_a_layer_is_named_and_not_retried() {
    // Each answer sends the client one step further down an endless chain of redirects.
    let (reg, _) = registry_with_layer(|addr, s| {
        let next = format!("http://{addr}{}{}", s.target, if s.target.contains('?') { "a" } else { "?a" });
        reply(302, &[("Location", next.as_str())], "")
    });
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains("too many redirects"), "{err}");
    let gets = reg.hits("/blobs/").len();
    assert!(gets <= 12, "not retried: {gets} blob requests");
}

/// Item 18: a scheme that can never work is not retried.
#[test]
fn an_ftp_location_for_a_layer_is_refused_at_once() {
    let (reg, digest) = registry_with_layer(|_, _| reply(302, &[("Location", "ftp://127.0.0.1/blob")], ""));
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains(&digest) && err.contains("ftp"), "{err}");
    assert_eq!(reg.hits(&digest).len(), 1, "asked once");
}

/// Item 18: a token server failing (500) is a failure of the token server, not a refusal.
#[test]
fn a_token_servers_500_is_not_called_a_refusal() {
    let me = Arc::new(Mutex::new(String::new()));
    let addr = me.clone();
    let reg = Hostile::start(move |s| {
        if s.target.starts_with("/token") {
            reply(500, &[], "database on fire")
        } else {
            let challenge = format!(r#"Bearer realm="http://{}/token""#, addr.lock().unwrap());
            reply(401, &[("WWW-Authenticate", challenge.as_str())], "")
        }
    });
    *me.lock().unwrap() = reg.addr.clone();
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(!err.contains("refused"), "{err}");
    assert!(err.contains("500") && err.contains("database on fire") && err.contains("/token"), "{err}");
}

/// Item 18: bytes a registry sends in place of an error message reach the terminal escaped.
#[test]
fn garbage_from_a_registry_is_not_printed_raw() {
    let (reg, _) =
        registry_with_layer(|_, _| reply(403, &[], b"\x1b[2J\x1b]0;pwned\x07\x00\xff garbage".to_vec()));
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\x07') && !err.contains('\0'), "{err:?}");
    assert!(err.contains("garbage"), "{err}");
}

/// Item 18: an index nested deeper than vmrootfs follows says so.
#[test]
fn an_index_nested_too_deeply_says_so() {
    let image = Served::new(&[small_layer()], 0);
    let mut docs: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut inner, mut inner_type) = (image.manifest.clone(), MANIFEST_TYPE);
    for _ in 0..4 {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": INDEX_TYPE,
            "manifests": [{"mediaType": inner_type, "digest": sha256(&inner), "size": inner.len(),
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        docs.push((sha256(&inner), inner));
        (inner, inner_type) = (index, INDEX_TYPE);
    }
    let top = inner;
    let reg = Hostile::start(move |s| {
        if s.target == "/v2/lab/x/manifests/1" {
            return reply(200, &[("Content-Type", INDEX_TYPE)], top.clone());
        }
        for (d, doc) in &docs {
            if s.target == format!("/v2/lab/x/manifests/{d}") {
                let ty = if doc.windows(9).any(|w| w == b"manifests") { INDEX_TYPE } else { MANIFEST_TYPE };
                return reply(200, &[("Content-Type", ty)], doc.clone());
            }
        }
        image.answer(s)
    });
    let (status, err, _dir) = build_from(&reg.addr, &["--platform", "linux/amd64"], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains("nested") && !err.contains("unsupported manifest media type"), "{err}");
}

/// Item 16: the referrers index (`build --use-converted`) is capped like any index.
#[test]
fn an_endless_referrers_index_fails_at_the_cap() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let image = Served::new(&[small_layer()], 0);
    let reg = Hostile::start(move |s| {
        if s.target.contains("/referrers/") {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {INDEX_TYPE}\r\nConnection: close\r\n\r\n");
            endless(head, br#"{"schemaVersion":2,"manifests":[]}"#, b' ', 256 << 20, counter.clone())
        } else {
            image.answer(s)
        }
    });
    let (status, err, _dir) = build_from(&reg.addr, &["--use-converted"], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains("referrers index") && err.contains("larger than"), "{err}");
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent < 64 << 20, "the client hung up at the cap, not after {sent} bytes");
}

/// Item 18: a download failing while an EROFS layer is pulled (stored as it is, no conversion)
/// is reported as reading the blob, with its cause, not as writing into the store.
#[test]
fn a_refused_connection_for_an_erofs_layer_is_a_read_error_naming_the_cause() {
    let blob = noise(8192, 7);
    let layer = Layer {
        digest: sha256(&blob),
        diff_id: sha256(&blob),
        blob,
        media_type: "application/vnd.erofs".into(),
    };
    let digest = layer.digest.clone();
    let image = Served::new(&[layer], 0);
    let closed = fixture::registry::free_port();
    let reg = Hostile::start(move |s| {
        if s.target.contains(&digest) {
            reply(307, &[("Location", &format!("http://127.0.0.1:{closed}/blob"))], "")
        } else {
            image.answer(s)
        }
    });
    let (status, err, _dir) = build_from(&reg.addr, &[], &[]);
    assert_eq!(status, Some(false), "{err}");
    assert!(err.to_lowercase().contains("connection refused") && err.contains(&closed.to_string()), "{err}");
    assert!(err.contains("reading the blob") && !err.contains("streaming the blob into"), "{err}");
}

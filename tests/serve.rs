//! `vmrootfs serve`: a stored image's lowers as plain files on a FUSE mount, for runtimes that
//! take only paths. Checked here with real loop devices over the served files (mounted and
//! compared with the stored blobs' mounts), two readers at once, and the runtime kit whose
//! drives are the served files booted in QEMU with its own qemu.sh. Firecracker and Cloud
//! Hypervisor cannot run on this host (no binaries; `/dev/kvm` is a PVM device): their
//! configurations are checked to name the served files. A failed read (EIO) and a stalled one
//! are unit tests of the FUSE server (`lazy::fuse::tests`), with sources that fail and stall.

mod fixture;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use fixture::registry;
use fixture::*;

/// A running `vmrootfs serve … --json`; stopped (SIGTERM) and checked to leave no mount when
/// dropped.
struct Serving {
    child: Child,
    dir: PathBuf,
    /// What it printed once mounted.
    report: serde_json::Value,
    /// Its stderr, line by line.
    stderr: mpsc::Receiver<String>,
}

impl Serving {
    fn start(store: &Path, tag: &str, dir: &Path, args: &[&str]) -> Serving {
        let mut child = vmrootfs(store)
            .args(["serve", tag])
            .arg(dir)
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let line = line.unwrap();
                eprintln!("serve: {line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let report = serde_json::Deserializer::from_reader(stdout).into_iter::<serde_json::Value>().next();
        let Some(Ok(report)) = report else {
            let status = child.wait().unwrap();
            panic!("serve printed no JSON ({status}): {:?}", stderr.try_iter().collect::<Vec<_>>());
        };
        Serving { child, dir: dir.to_owned(), report, stderr }
    }

    /// The served lowers' paths, base first.
    fn paths(&self) -> Vec<PathBuf> {
        let lowers = self.report["lowers"].as_array().unwrap();
        lowers.iter().map(|l| PathBuf::from(l["path"].as_str().unwrap())).collect()
    }

    fn terminate(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Waits for a stderr line holding `text`; panics if serve ends first.
    fn wait_for(&self, text: &str) -> String {
        for line in self.stderr.iter() {
            if line.contains(text) {
                return line;
            }
        }
        panic!("serve ended without saying {text:?}");
    }

    /// SIGTERM, then its exit status and the rest of its stderr.
    fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.terminate();
        let status = self.child.wait().unwrap();
        let rest = self.stderr.iter().collect();
        (status, rest)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            self.terminate();
            self.child.wait().unwrap();
        }
        if mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            panic!("{} still mounted after serve ended", self.dir.display());
        }
    }
}

/// Whether `dir` is a mount point.
fn mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// A read-only loop device over `file`; detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let (ok, out, err) = run(Command::new("losetup").args(["-r", "-f", "--show"]).arg(file));
        assert!(ok, "losetup -r {}: {err}", file.display());
        Loop(out.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let (ok, _, err) = run(Command::new("losetup").arg("-d").arg(&self.0));
        assert!(ok, "losetup -d {}: {err}", self.0);
    }
}

/// `device` mounted read-only as `fs` on a scratch directory; unmounted when dropped.
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(device: &Path, fs: &str) -> Mounted {
        let dir = scratch("serve-mnt");
        let (ok, _, err) =
            run(Command::new("mount").args(["-t", fs, "-o", "ro"]).arg(device).arg(dir.path()));
        assert!(ok, "mount {}: {err}", device.display());
        Mounted(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let (ok, _, err) = run(Command::new("umount").arg(self.0.path()));
        assert!(ok, "umount {}: {err}", self.0.path().display());
    }
}

/// The real test image (4 layers of debootstrap) served: each served file has its blob's size
/// and bytes (two readers at once), a loop device over it mounts as the same tree as the
/// stored blob; SIGTERM while a loop device still holds a file detaches the mount at once and
/// serves the device until it is detached, then serve ends, leaving no mount.
#[test]
fn the_real_images_served_lowers_mount_through_loop_devices_as_the_stored_blobs() {
    let dir = scratch("serve-real");
    let store = dir.path().join("store");
    let spec = format!("oci:{}/oci:test", image().display());
    let (ok, out, err) = run(vmrootfs(&store).args(["build", &spec, "--tag", "deb", "--json"]));
    assert!(ok, "build: {err}");
    let built: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mnt = dir.path().join("served");
    let serving = Serving::start(&store, "deb", &mnt, &["--threads", "4"]);
    let served = serving.paths();
    let lowers = built["lowers"].as_array().unwrap();
    assert_eq!(served.len(), 4);
    assert_eq!(served, (0..4).map(|i| mnt.join(format!("lower{i}"))).collect::<Vec<_>>());

    // Sizes and bytes, every file hashed by two readers at once.
    let hashers: Vec<_> = served
        .iter()
        .chain(served.iter().rev())
        .map(|p| {
            let p = p.clone();
            std::thread::spawn(move || sha256_file_hex(&p).unwrap())
        })
        .collect();
    let hashes: Vec<String> = hashers.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, lower) in lowers.iter().enumerate() {
        assert_eq!(
            std::fs::metadata(&served[i]).unwrap().len(),
            lower["size"].as_u64().unwrap(),
            "lower{i}'s size"
        );
        let want = lower["blob_sha256"].as_str().unwrap();
        assert_eq!((hashes[i].as_str(), hashes[7 - i].as_str()), (want, want), "lower{i}'s bytes");
    }

    // A loop device over each served file mounts as the stored blob does.
    for (i, lower) in lowers.iter().enumerate() {
        assert_same_tree_through_loop_devices(&served[i], Path::new(lower["path"].as_str().unwrap()));
    }

    // Stopped while a loop device holds lower3: the directory is free at once, the device
    // still reads the blob's bytes, and serve ends once the device lets go.
    let device = Loop::attach(&served[3]);
    serving.terminate();
    serving.wait_for("detached");
    assert!(!mounted(&mnt), "{} still mounted after SIGTERM", mnt.display());
    let via_device = sha256_file_hex(Path::new(&device.0)).unwrap();
    assert_eq!(via_device, lowers[3]["blob_sha256"].as_str().unwrap());
    drop(device);
    serving.wait_for("the last served file was closed");
    let (status, _) = serving.stop();
    assert!(status.success(), "serve: {status}");
}

/// SIGTERM with nothing open: serve unmounts and exits 0.
#[test]
fn serve_stopped_by_sigterm_leaves_no_mount() {
    let dir = scratch("serve-stop");
    let store = busybox_store(dir.path());
    let mnt = dir.path().join("served");
    let serving = Serving::start(&store, "bb", &mnt, &[]);
    assert!(mounted(&mnt));
    let names: Vec<&str> =
        serving.report["lowers"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lower0", "lower1"]);
    let (status, rest) = serving.stop();
    assert!(status.success(), "serve: {status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("unmounted")), "{rest:?}");
    assert!(!mounted(&mnt));
}

fn busybox_archive() -> String {
    format!("oci-archive:{}/testdata/busybox.oci.tar:busybox", env!("CARGO_MANIFEST_DIR"))
}

/// A store under `dir` with the bundled busybox image built as `bb`.
fn busybox_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    let (ok, _, err) = run(vmrootfs(&store).args(["-q", "build", &busybox_archive(), "--tag", "bb"]));
    assert!(ok, "build: {err}");
    store
}

/// A loop device over the served file `served`, mounted, has the tree of the stored `blob`
/// mounted the same way.
fn assert_same_tree_through_loop_devices(served: &Path, blob: &Path) {
    let device = Loop::attach(served);
    let via_serve = Mounted::new(Path::new(&device.0), "erofs");
    let stored_device = Loop::attach(blob);
    let stored = Mounted::new(Path::new(&stored_device.0), "erofs");
    let diffs = treediff::diff_trees(stored.0.path(), via_serve.0.path());
    assert!(
        diffs.is_empty(),
        "{} through serve differs from {}:\n{}",
        served.display(),
        blob.display(),
        diffs.join("\n")
    );
}

/// `serve --kit`: the kit's drives are the served files (qemu.sh, firecracker.json and
/// cloud-hypervisor.sh name them), and the kit's qemu.sh, run exactly as written, boots the
/// image from them while serve serves.
#[test]
fn a_kit_whose_drives_are_served_files_boots_with_its_qemu_sh() {
    let dir = scratch("serve-kit");
    let store = busybox_store(dir.path());
    let mnt = dir.path().join("served");
    let kit_dir = dir.path().join("kit");
    let probe =
        "cat /etc/motd; if test -e /etc/issue; then echo issue-visible; else echo issue-whited-out; fi";
    let kit_arg = kit_dir.to_str().unwrap();
    let serving = Serving::start(&store, "bb", &mnt, &["--kit", kit_arg, "--", "sh", "-c", probe]);
    let served = serving.paths();
    let kit = &serving.report["kit"];
    let drives: Vec<PathBuf> = kit["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .collect();
    assert_eq!(drives, served);
    let fc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kit["firecracker"].as_str().unwrap()).unwrap())
            .unwrap();
    let fc_drives: Vec<PathBuf> = fc["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path_on_host"].as_str().unwrap()))
        .collect();
    assert_eq!(fc_drives, served, "firecracker.json's drives");
    let ch = std::fs::read_to_string(kit["cloud_hypervisor"].as_str().unwrap()).unwrap();
    let qemu = std::fs::read_to_string(kit["qemu"].as_str().unwrap()).unwrap();
    for (i, p) in served.iter().enumerate() {
        assert!(ch.contains(&format!("path={},readonly=on,serial=lower{i}", p.display())), "{ch}");
        assert!(qemu.contains(&format!("file={},format=raw", p.display())), "{qemu}");
    }

    let console = boot_kit(kit);
    assert_lines(
        &console,
        &[
            "vmrootfs-init: drives in attach order: lower0=/dev/vda lower1=/dev/vdb",
            "Hello from layer 2 of the vmrootfs demo image.",
            "issue-whited-out",
            "vmrootfs-init: status 0",
        ],
    );
    let (status, rest) = serving.stop();
    assert!(status.success(), "serve: {status}: {rest:?}");
}

/// The bundled busybox image built with `--verity` in a store of its own and pushed
/// (uncompressed, trees appended) to a loopback registry as `lab/bb:v1`; its `inspect --json`.
fn pushed_with_verity(dir: &Path, registry: &registry::Registry) -> serde_json::Value {
    let store = dir.join("source");
    let (ok, _, err) =
        run(vmrootfs(&store).args(["-q", "build", &busybox_archive(), "--tag", "bb", "--verity"]));
    assert!(ok, "build: {err}");
    let (ok, _, err) =
        run(vmrootfs(&store).args(["-q", "push", "bb", &format!("{}/lab/bb:v1", registry.addr)]));
    assert!(ok, "push: {err}");
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "bb", "--json"]));
    assert!(ok, "inspect: {err}");
    serde_json::from_str(&out).unwrap()
}

/// `serve --lazy REF`: the lowers of a `push --verity` image in a loopback registry, served
/// as they are fetched. The served files hold the pushed blobs' bytes; a loop device over one
/// mounts as the stored blob does; the kit (each lower through dm-verity in the guest too)
/// boots from them; when serving stops, the rest is fetched and the image is stored, blobs
/// equal to the pushed ones. Only range requests reach the registry while serving.
#[test]
fn serve_lazy_serves_a_registry_image_as_it_arrives_then_stores_it() {
    let dir = scratch("serve-lazy");
    let registry = registry::Registry::start(None);
    let source = pushed_with_verity(dir.path(), &registry);
    let store = dir.path().join("store");
    let mnt = dir.path().join("served");
    let kit_dir = dir.path().join("kit");
    let reference = format!("{}/lab/bb:v1", registry.addr);
    let probe =
        "cat /etc/motd; if test -e /etc/issue; then echo issue-visible; else echo issue-whited-out; fi";
    let serving = Serving::start(
        &store,
        &reference,
        &mnt,
        &["--lazy", "--background-rate", "1K", "--kit", kit_dir.to_str().unwrap(), "--", "sh", "-c", probe],
    );
    let served = serving.paths();
    let lowers = source["lowers"].as_array().unwrap();
    assert_eq!(served.len(), lowers.len());
    for (i, lower) in lowers.iter().enumerate() {
        let layer = serving.report["lowers"][i]["layer"].as_str().unwrap();
        assert_eq!(
            layer,
            format!("sha256:{}", lower["verity"]["sha256"].as_str().unwrap()),
            "lower{i}'s layer"
        );
    }

    // The base layer through a loop device, mounted, equals the stored blob's tree.
    assert_same_tree_through_loop_devices(&served[0], Path::new(lowers[0]["path"].as_str().unwrap()));
    let console = boot_kit(&serving.report["kit"]);
    assert_lines(
        &console,
        &[
            "vmrootfs-init: drives in attach order: lower0=/dev/vda lower1=/dev/vdb hashes=/dev/vdc",
            "Hello from layer 2 of the vmrootfs demo image.",
            "issue-whited-out",
            "vmrootfs-init: status 0",
        ],
    );
    for (i, lower) in lowers.iter().enumerate() {
        assert_eq!(
            sha256_file_hex(&served[i]).unwrap(),
            lower["blob_sha256"].as_str().unwrap(),
            "lower{i}'s bytes"
        );
    }
    let log = std::fs::read_to_string(&registry.log).unwrap();
    let blob_gets = log.lines().filter(|l| l.contains("\"GET /v2/lab/bb/blobs/")).count();
    assert!(blob_gets > 0, "no blob was fetched through the registry:\n{log}");

    let (status, rest) = serving.stop();
    assert!(status.success(), "serve: {status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("stored (2 layers)")), "{rest:?}");
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", &reference, "--json"]));
    assert!(ok, "inspect: {err}");
    let stored: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (i, lower) in lowers.iter().enumerate() {
        assert_eq!(stored["lowers"][i]["blob_sha256"], lower["blob_sha256"], "lower{i} stored");
    }
    let (ok, _, err) = run(vmrootfs(&store).args(["verify"]));
    assert!(ok, "verify: {err}");
}

/// A registry that serves a flipped byte: the served file's read of that chunk fails with EIO
/// and serve names the layer; the rest of the file is served; nothing is stored at the stop.
#[test]
fn serve_lazy_answers_eio_for_a_block_the_registry_flipped() {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 512 << 10;
    let dir = scratch("serve-lazy-flip");
    let registry = registry::Registry::start(None);
    let source = pushed_with_verity(dir.path(), &registry);
    let hex = source["lowers"][0]["verity"]["sha256"].as_str().unwrap();
    let data = registry
        .log
        .parent()
        .unwrap()
        .join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let _flipped = Flipped::new(&data, CHUNK + 3 * 4096 + 100);
    let store = dir.path().join("store");
    let mnt = dir.path().join("served");
    let serving = Serving::start(&store, &format!("{}/lab/bb:v1", registry.addr), &mnt, &["--lazy"]);
    let file = std::fs::File::open(mnt.join("lower0")).unwrap();
    let blob = std::fs::read(source["lowers"][0]["path"].as_str().unwrap()).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, blob[..4096], "chunk 0 is served unchanged");
    let e = file.read_exact_at(&mut buf, CHUNK + 3 * 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()), "{e}");
    let named = serving.wait_for("does not match its dm-verity hash");
    assert!(named.contains(hex), "{named}");
    file.read_exact_at(&mut buf, 2 * CHUNK).unwrap();
    assert_eq!(buf, blob[2 * CHUNK as usize..2 * CHUNK as usize + 4096], "chunk 2 is served unchanged");
    drop(file);
    let (status, rest) = serving.stop();
    assert!(!status.success(), "serve stored an image with a flipped byte: {rest:?}");
    let (ok, out, _) = run(vmrootfs(&store).args(["ls", "--json"]));
    assert!(ok && out.trim() == "[]", "nothing recorded: {out}");
}

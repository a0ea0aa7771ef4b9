//! The proof that blobs boot: the real multi-layer image, built as erofs, as ext4, squashed
//! and merged, booted with `vmrootfs run` in a QEMU microVM (the Debian kernel, TCG here), runs
//! programs that check the stack from inside.

mod fixture;

use std::path::{Path, PathBuf};

use fixture::*;

/// What `run` boots.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Form {
    /// The layer stack, one drive per layer, overlayfs in the guest.
    Stack,
    /// `build --squash`, `run --squashed`.
    Squashed,
    /// `build --merge`, `run --merged`: one drive, EROFS mounted directly.
    Merged,
}

fn boot_check(fs: &str, form: Form) {
    boot_check_in(fs, form, false);
}

/// Builds the real image (as `form` asks, with `--verity` if asked) into a new store, boots it
/// and checks the tree from inside; returns the store's directory (the store is `store` in it).
fn boot_check_in(fs: &str, form: Form, verity: bool) -> tempfile::TempDir {
    let spec = format!("oci:{}/oci:test", image().display());
    let dir = scratch(&format!("boot-{fs}-{form:?}-{verity}"));
    let store = dir.path().join("store");
    let mut build = vmrootfs(&store);
    build.args(["-q", "build", &spec, "--tag", "deb", "--fs", fs]);
    match form {
        Form::Stack => {}
        Form::Squashed => {
            build.arg("--squash");
        }
        Form::Merged => {
            build.arg("--merge");
        }
    }
    if verity {
        build.arg("--verity");
    }
    let (ok, _, err) = run(&mut build);
    assert!(ok, "build: {err}");
    let mut cmd = vmrootfs(&store);
    cmd.args(["run", "deb", "--timeout", "240"]);
    match form {
        Form::Stack => {}
        Form::Squashed => {
            cmd.arg("--squashed");
        }
        // -v: the console says how /init mounted the disk.
        Form::Merged => {
            cmd.args(["--merged", "-v"]);
        }
    }
    let out = cmd.args(["--", "sh", "-c", PROBE]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "run exits with the command's status\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Layer 4 lists neither usr/ nor usr/local/share/: they keep what the layers below say.
    let reference = image().join("reference/rootfs/usr/local/share");
    let m = std::fs::metadata(&reference).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let parents = format!("parents: {:o} {}", m.permissions().mode() & 0o7777, m.gid());
    assert!(stdout.lines().any(|l| l.trim() == parents), "missing {parents:?} in guest output:\n{stdout}");
    for want in [
        "python 42",                     // python3, installed by layer 2, runs
        "suid 4755 root",                // setuid bit kept
        "/edge/cap-true cap_net_raw=ep", // file capability kept
        "motd whited out",               // layer 4's whiteout applied
        "opaque: only-this",             // layer 4's opaque dir hides the lower files
    ] {
        assert!(
            stdout.lines().any(|l| l.trim() == want),
            "missing {want:?} in guest output:\n{stdout}\n{stderr}"
        );
    }
    // The drives the guest sees and what its root is.
    let (disks, root) = match form {
        // --verity adds the drive of the trees.
        Form::Stack if verity => ("disks: 5", "root: overlay"),
        Form::Stack => ("disks: 4", "root: overlay"),
        Form::Squashed => ("disks: 1", "root: overlay"),
        // The merged EROFS is the one lower under a tmpfs upper.
        Form::Merged => ("disks: 1", "root: overlay"),
    };
    for want in [disks, root] {
        assert!(
            stdout.lines().any(|l| l.trim() == want),
            "missing {want:?} in guest output:\n{stdout}\n{stderr}"
        );
    }
    if form == Form::Merged {
        // Alone (kernel >= 6.4) or with a loop device per layer over the one disk (older).
        let how = stderr.lines().find(|l| l.contains("vmrootfs-init: merged image mounted from /dev/vda"));
        assert!(how.is_some(), "/init did not say how it mounted the merged disk:\n{stderr}");
        eprintln!("{}", how.unwrap_or_default());
    }
    dir
}

#[test]
fn boot_verity_stack_and_a_flipped_byte_names_the_lower() {
    let dir = boot_check_in("erofs", Form::Stack, true);
    let store = dir.path().join("store");
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "deb", "--json"]));
    assert!(ok, "inspect: {err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    for l in record["lowers"].as_array().unwrap() {
        assert!(l["verity"]["root_digest"].is_string(), "a --verity lower has a root digest: {l}");
    }
    // A block in the middle of python3.11, which only lower 1 (layer 2) holds.
    let lowers = lowers_of(&record);
    let (blob, chain) = (&lowers[1].0, record["lowers"][1]["chain_id"].as_str().unwrap());
    let stack = MountedStack::mount(&lowers[1..2]);
    let file = std::fs::read(stack.lower(0).join("usr/bin/python3.11")).unwrap();
    drop(stack);
    let block = &file[1 << 20..(1 << 20) + 4096];
    let bytes = std::fs::read(blob).unwrap();
    let at = bytes.chunks(4096).position(|c| c == block).expect("python3.11's block in the blob") * 4096;
    drop(bytes);
    let flipped = Flipped::new(blob, at as u64 + 100);
    let reads = "cat /usr/bin/python3.11 > /dev/null; echo cat $?";
    let out =
        vmrootfs(&store).args(["run", "deb", "--timeout", "240", "--", "sh", "-c", reads]).output().unwrap();
    drop(flipped);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run of a corrupt lower fails\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("cat 1"), "the guest's read fails: {stdout}\n{stderr}");
    let named = format!("lower 1 (chain {chain}");
    assert!(stderr.contains("dm-verity") && stderr.contains(&named), "run names the lower: {stderr}");
    for other in [0, 2, 3] {
        assert!(!stderr.contains(&format!("lower {other} (")), "only lower 1 is named: {stderr}");
    }
}

#[test]
fn boot_erofs_stack() {
    boot_check("erofs", Form::Stack);
}

#[test]
fn boot_ext4_stack() {
    boot_check("ext4", Form::Stack);
}

#[test]
fn boot_squashed() {
    boot_check("erofs", Form::Squashed);
}

/// `run --merged`: the same checks through exactly one virtio-blk drive, the merged image
/// mounted as the one lower of the root's overlayfs.
#[test]
fn boot_merged() {
    boot_check("erofs", Form::Merged);
}

/// A layer with the host's static busybox as `/bin/busybox` and `applets` linked to it.
fn busybox_entries(applets: &[&str]) -> Vec<Entry> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut entries = vec![
        dir_entry("bin"),
        Entry::File { path: b"bin/busybox".to_vec(), mode: 0o755, data: busybox, mtime: 1 },
    ];
    for applet in applets {
        entries.push(symlink(&format!("bin/{applet}"), "busybox"));
    }
    entries
}

/// With no command, `run` starts the image's entrypoint + cmd with its env, working directory
/// and user, and returns its status.
#[test]
fn run_uses_the_image_config() {
    let dir = scratch("boot-config");
    let mut entries = busybox_entries(&["sh", "id", "pwd", "echo"]);
    entries.extend([
        dir_entry("work"),
        file("etc/passwd", "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
    ]);
    let layout = dir.path().join("layout");
    oci_layout_with_config(
        &layout,
        "t",
        &[Layer::gzip(&entries)],
        serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"FOO=$FOO\"; pwd; echo \"uid $(id -u) gid $(id -g)\"; exit 5"],
            "Env": ["PATH=/bin", "FOO=bar"],
            "WorkingDir": "/work",
            "User": "nobody",
        }),
    );
    let store = dir.path().join("store");
    let (ok, _, err) =
        run(vmrootfs(&store).args(["-q", "build", &format!("oci:{}:t", layout.display()), "--tag", "cfg"]));
    assert!(ok, "{err}");
    let out = vmrootfs(&store).args(["run", "cfg", "--timeout", "240"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["FOO=bar", "/work", "uid 65534 gid 65534"]);
}

fn dir_entry(path: &str) -> Entry {
    dir(path, 0o755)
}

/// `run`'s exit code for its own failures (docker's and podman's): never a command's status
/// of 1, so a script can tell "the guest's command failed" from "vmrootfs could not run it".
const RUN_FAILED: i32 = 125;

/// What fails before a guest starts exits with [`RUN_FAILED`], not 1.
#[test]
fn run_failures_before_the_boot_exit_125() {
    let (_dir, store) = busybox_store("run-codes");
    for args in [&["run", "missing", "--", "true"][..], &["run", "bb", "--merged", "--", "true"]] {
        let out = vmrootfs(&store).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(RUN_FAILED), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}

/// An `/init` that cannot start the command (here: a user the image does not have) is run's
/// own failure, reported as such, not a status the command might have returned.
#[test]
fn run_guest_setup_failure_exits_125() {
    let dir = scratch("boot-setup-failure");
    let layout = dir.path().join("layout");
    oci_layout_with_config(
        &layout,
        "t",
        &[Layer::gzip(&busybox_entries(&["sh", "true"]))],
        serde_json::json!({ "Cmd": ["/bin/true"], "User": "nosuchuser" }),
    );
    let store = dir.path().join("store");
    let (ok, _, err) =
        run(vmrootfs(&store).args(["-q", "build", &format!("oci:{}:t", layout.display()), "--tag", "u"]));
    assert!(ok, "{err}");
    let out = vmrootfs(&store).args(["run", "u", "--timeout", "240"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(RUN_FAILED), "{err}");
    assert!(err.contains("unknown user nosuchuser"), "/init says why: {err}");
    assert!(err.contains("error: the guest could not start the command"), "{err}");
}

/// A hung guest is ended at the timeout, with an error that says so.
#[test]
fn run_ends_a_hung_guest_at_the_timeout() {
    let (_dir, store) = busybox_store("boot-timeout");
    let started = std::time::Instant::now();
    let out = vmrootfs(&store).args(["run", "bb", "--timeout", "20", "--", "sleep", "600"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(RUN_FAILED), "a timeout is run's own failure: {err}");
    assert!(err.contains("did not finish within 20s"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "ended near the timeout");
}

/// A child process killed and reaped when dropped, so a failing test leaves none behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut std::process::Command) -> Reaped {
    use std::process::Stdio;
    Reaped(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
}

/// Reads a child's stdout or stderr to the end on a thread.
fn collect(r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut r = r;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut r, &mut s).unwrap();
        s
    })
}

/// The layer files left in a store (blobs and their sidecars).
fn layer_files(store: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for dir in std::fs::read_dir(store.join("layers")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            found.push(f.unwrap().path());
        }
    }
    found
}

/// `run` holds the store lock for the guest's whole life: `gc` and `rm` started beside it
/// wait, and end only after the guest, whose drives and staging they would delete.
#[test]
fn gc_and_rm_wait_for_a_running_guest() {
    use std::io::BufRead;
    let (_dir, store) = busybox_store("boot-lock");
    assert!(!layer_files(&store).is_empty());
    let mut guest = spawn(vmrootfs(&store).args([
        "run",
        "bb",
        "--timeout",
        "240",
        "--",
        "sh",
        "-c",
        "echo started; sleep 5; echo finished",
    ]));
    let guest_err = collect(guest.0.stderr.take().unwrap());
    let mut guest_out = std::io::BufReader::new(guest.0.stdout.take().unwrap());
    let mut line = String::new();
    guest_out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n", "the guest's first line");
    // The guest is running its command: the drives are attached and the staging is in use.
    let mut gc = spawn(vmrootfs(&store).arg("gc"));
    let mut rm = spawn(vmrootfs(&store).args(["rm", "bb"]));
    let gc_err = collect(gc.0.stderr.take().unwrap());
    let rm_err = collect(rm.0.stderr.take().unwrap());
    line.clear();
    guest_out.read_line(&mut line).unwrap();
    assert_eq!(line, "finished\n", "the guest's second line");
    // The guest has not ended yet (it still has to report its status and power off).
    assert!(gc.0.try_wait().unwrap().is_none(), "gc finished while the guest ran");
    assert!(rm.0.try_wait().unwrap().is_none(), "rm finished while the guest ran");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut guest_out, &mut rest).unwrap();
    let status = guest.0.wait().unwrap();
    let guest_err = guest_err.join().unwrap();
    assert!(status.success(), "run: {status}\n{guest_err}");
    assert_eq!(rest, "", "nothing after the command's output");
    let (gc_status, rm_status) = (gc.0.wait().unwrap(), rm.0.wait().unwrap());
    let (gc_err, rm_err) = (gc_err.join().unwrap(), rm_err.join().unwrap());
    assert!(gc_status.success(), "gc: {gc_err}");
    assert!(rm_status.success(), "rm: {rm_err}");
    // Both blocked on the store lock (gc and rm also exclude each other: one may have
    // waited for the other too).
    for (what, err) in [("gc", &gc_err), ("rm", &rm_err)] {
        assert!(err.contains("waiting for lock on"), "{what} did not wait for the lock: {err}");
    }
    // Once the guest ended, rm removed the tag and its blobs, and gc the staging.
    assert_eq!(layer_files(&store), Vec::<std::path::PathBuf>::new());
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
    let (ok, out, err) = run(vmrootfs(&store).arg("ls"));
    assert!(ok, "{err}");
    assert!(!out.contains("bb"), "{out}");
}

/// The exit status travels out of band: a command that prints the old status marker
/// still exits with its own status. Its stdout and stderr reach `run`'s stdout and stderr.
#[test]
fn run_status_and_streams_are_out_of_band() {
    let (_dir, store) = busybox_store("boot-status");
    let out = vmrootfs(&store)
        .args(["run", "bb", "--timeout", "240", "--"])
        .args(["sh", "-c", "echo VMROOTFS-EXIT 0; echo err-only >&2; printf 'a\\r\\nno newline'; exit 7"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "the command's status\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout, "VMROOTFS-EXIT 0\na\r\nno newline", "stdout, byte for byte\nstderr:\n{stderr}");
    assert!(stderr.lines().any(|l| l == "err-only"), "stderr: {stderr}");
}

#[test]
fn boot_verity_ext4_stack() {
    boot_check_in("ext4", Form::Stack, true);
}

/// The file `/data/secret` holds, in [`secret_image`].
const SECRET: &str = "verity-protected-content-0123456789";

/// A two-layer image (busybox `sh` and `cat`, then `/data/secret`) built under `dir` as tag `v`
/// with `--verity` and `form` (`--squash` or `--merge`): its store and build result.
fn secret_image(dir: &tempfile::TempDir, form: &str) -> (PathBuf, serde_json::Value) {
    let data = [dir_entry("data"), file("data/secret", SECRET)];
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[Layer::gzip(&busybox_entries(&["sh", "cat"])), Layer::gzip(&data)]);
    let store = dir.path().join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, out, err) =
        run(vmrootfs(&store).args(["-q", "build", &spec, "--tag", "v", "--verity", form, "--json"]));
    assert!(ok, "build: {err}");
    (store, serde_json::from_str(&out).unwrap())
}

/// `run --squashed` of a `--verity` image: the squashed blob has no tree, so `run` refuses
/// it, saying why, rather than let the guest read a flipped byte as data. (The layer stack and
/// the merged form of the same image are checked in the guest:
/// `boot_verity_stack_and_a_flipped_byte_names_the_lower`, `run_merged_of_a_verity_image_is_verified`.)
#[test]
fn run_squashed_of_a_verity_image_refuses_to_boot_unverified() {
    let dir = scratch("boot-verity-squashed");
    let (store, result) = secret_image(&dir, "--squash");
    let blob = Path::new(result["squashed"]["path"].as_str().expect("a blob path"));
    let bytes = std::fs::read(blob).unwrap();
    let at = bytes.windows(SECRET.len()).position(|w| w == SECRET.as_bytes()).expect("the file's data");
    drop(bytes);
    let _flipped = Flipped::new(blob, at as u64);
    let (ok, stdout, stderr) = run(vmrootfs(&store).args([
        "run",
        "v",
        "--squashed",
        "--timeout",
        "240",
        "--",
        "cat",
        "/data/secret",
    ]));
    assert!(
        !ok,
        "run --squashed of a verity image with a flipped byte fails\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("dm-verity") && stderr.contains("--squashed") && stderr.contains("v "),
        "run --squashed says it cannot verify the image: {stderr}"
    );
    assert_eq!(stdout, "", "the guest read nothing");
}

/// `run --merged` of a `--verity` image (built `--merge --verity`: the merged blob has a tree
/// too): the guest opens the merged blob and each layer blob through dm-verity, so a byte
/// flipped in a layer's file data or in the merged blob's metadata fails the guest's read, and
/// `run` fails naming that blob; untouched, the image boots and reads its file.
#[test]
fn run_merged_of_a_verity_image_is_verified() {
    let dir = scratch("boot-verity-merged");
    let (store, result) = secret_image(&dir, "--merge");
    assert!(result["merged"]["verity"]["root_digest"].is_string(), "the merged blob has a tree: {result}");
    let boot = || {
        run(vmrootfs(&store).args([
            "run",
            "v",
            "--merged",
            "-v",
            "--timeout",
            "240",
            "--",
            "cat",
            "/data/secret",
        ]))
    };
    let (ok, stdout, stderr) = boot();
    assert!(ok, "untouched, it boots: {stderr}");
    assert_eq!(stdout, SECRET);
    assert!(stderr.contains("merged image mounted from /dev/dm-"), "through dm-verity: {stderr}");

    // (blob, what to flip in it, how run names it)
    let top = Path::new(result["lowers"][1]["path"].as_str().expect("a blob path"));
    let merged = Path::new(result["merged"]["path"].as_str().expect("a blob path"));
    for (blob, needle, named) in
        [(top, SECRET, "lower 1 (chain"), (merged, "secret", "the merged blob (chain")]
    {
        let bytes = std::fs::read(blob).unwrap();
        let at = bytes.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("the bytes to flip");
        drop(bytes);
        let flipped = Flipped::new(blob, at as u64);
        let (ok, stdout, stderr) = boot();
        drop(flipped);
        assert!(
            !ok,
            "a flipped byte in {} fails the run\nstdout:\n{stdout}\nstderr:\n{stderr}",
            blob.display()
        );
        assert!(stderr.contains("dm-verity in the guest found blocks"), "{stderr}");
        assert!(stderr.contains(named), "run names {named}: {stderr}");
        assert!(!stdout.contains("erity-protected"), "the guest read no flipped data: {stdout}");
    }

    // A merged blob without a tree (as built before `--merge --verity` made one) is refused.
    let record_path = store.join("images/v.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["merged"].as_object_mut().expect("a merged blob").remove("verity").expect("its tree");
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let (ok, stdout, stderr) = boot();
    assert!(!ok && stdout.is_empty(), "{stdout}{stderr}");
    assert!(stderr.contains("has no dm-verity tree (build it with --merge --verity)"), "{stderr}");
}

/// `run --merged` of an image with no `/dev`, `/proc` or `/sys` directory: the merged root is
/// read-only EROFS, so `/init` stacks a tmpfs upper over it (as over the layer stack) and
/// mounts them there; the command sees the image's files and the kernel's filesystems.
#[test]
fn run_merged_of_an_image_without_dev_proc_sys() {
    let dir = scratch("boot-merged-bare");
    let layout = dir.path().join("layout");
    let data = [dir_entry("data"), file("data/hello", "from-the-top-layer\n")];
    oci_layout(&layout, "t", &[Layer::gzip(&busybox_entries(&["sh", "cat", "ls"])), Layer::gzip(&data)]);
    let store = dir.path().join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, _, err) = run(vmrootfs(&store).args(["-q", "build", &spec, "--tag", "bare", "--merge"]));
    assert!(ok, "build: {err}");
    let script = "cat /data/hello; ls -d /proc/self /sys/block /dev/null";
    let out = vmrootfs(&store)
        .args(["run", "bare", "--merged", "-v", "--timeout", "240", "--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["from-the-top-layer", "/dev/null", "/proc/self", "/sys/block"],
        "{stderr}"
    );
    assert!(stderr.contains("vmrootfs-init: merged image mounted from /dev/vda"), "{stderr}");
}

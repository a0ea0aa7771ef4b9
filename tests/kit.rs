//! The runtime kit (`vmrootfs kit`): each form boots in a QEMU microVM (the Debian kernel, TCG
//! here) with exactly the `qemu.sh` the kit wrote, the image's entrypoint running with its env,
//! working directory and user, its output and status on the serial console; the Firecracker
//! configuration is checked against Firecracker's own configuration types (Firecracker cannot
//! boot a stock kernel on these machines: `/dev/kvm` is a PVM device).

mod fixture;

use std::path::{Path, PathBuf};

use fixture::*;

/// What the image's entrypoint prints: its env, working directory, user, a file of the top
/// layer, and the drives it sees; then it exits 5.
const ENTRYPOINT: &str = "echo \"FOO=$FOO\"; pwd; echo \"uid $(id -u) gid $(id -g)\"; cat /etc/motd; cat /data/blob > /dev/null; echo \"cat $?\"; echo \"disks $(ls /sys/block | grep -c '^vd')\"; exit 5";

/// Bytes of `/data/blob` in layer 2: whole blocks, stored in place.
const BLOB_BYTES: usize = 64 << 10;

/// A two-layer image (busybox, a user and `/etc/motd`, then another `/etc/motd` and
/// `/data/blob`) with a config
/// that sets entrypoint, env, working directory and user, built under `dir` as tag `k` with
/// `build_args`; returns the store.
fn image(dir: &tempfile::TempDir, build_args: &[&str]) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut base = vec![
        dir_entry("bin"),
        Entry::File { path: b"bin/busybox".to_vec(), mode: 0o755, data: busybox, mtime: 1 },
        dir_entry("work"),
        dir_entry("etc"),
        file("etc/passwd", "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
        // Layer 2's motd covers this one only when the layers are stacked in order.
        file("etc/motd", "motd of layer 1\n"),
    ];
    for applet in ["sh", "echo", "pwd", "id", "cat", "ls", "grep"] {
        base.push(symlink(&format!("bin/{applet}"), "busybox"));
    }
    let top = vec![
        dir_entry("etc"),
        file("etc/motd", "motd of layer 2\n"),
        dir_entry("data"),
        Entry::File { path: b"data/blob".to_vec(), mode: 0o644, data: noise(BLOB_BYTES, 7), mtime: 1 },
    ];
    let layout = dir.path().join("layout");
    oci_layout_with_config(
        &layout,
        "t",
        &[Layer::gzip(&base), Layer::gzip(&top)],
        serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": [ENTRYPOINT],
            "Env": ["PATH=/bin", "FOO=bar"],
            "WorkingDir": "/work",
            "User": "nobody",
        }),
    );
    let store = dir.path().join("store");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, _, err) = run(vmrootfs(&store).args(["-q", "build", &spec, "--tag", "k"]).args(build_args));
    assert!(ok, "build {build_args:?}: {err}");
    store
}

fn dir_entry(path: &str) -> Entry {
    dir(path, 0o755)
}

/// `vmrootfs kit k DIR ARGS --json`: the kit's description.
fn kit(store: &Path, dir: &Path, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(vmrootfs(store).arg("kit").arg("k").arg(dir).args(args).arg("--json"));
    assert!(ok, "kit {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// What every form's entrypoint prints, before the drives it sees.
const CONFIG_LINES: [&str; 4] = ["FOO=bar", "/work", "uid 65534 gid 65534", "motd of layer 2"];

/// The layer stack: one drive per layer, found by position (the serials agree), stacked with
/// overlayfs; the entrypoint runs with the image's config and its status is on the console.
#[test]
fn kit_stack_boots_with_its_qemu_sh() {
    let dir = scratch("kit-stack");
    let store = image(&dir, &[]);
    let kit = kit(&store, &dir.path().join("kit"), &[]);
    let names: Vec<&str> =
        kit["drives"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lower0", "lower1"]);
    let console = boot_kit(&kit);
    assert_lines(&console, &CONFIG_LINES);
    assert_lines(
        &console,
        &[
            "cat 0",
            "disks 2",
            "vmrootfs-init: drives in attach order: lower0=/dev/vda lower1=/dev/vdb",
            "vmrootfs-init: status 5",
        ],
    );
    assert!(!console.contains("using the serial"), "position and serial agree:\n{console}");
}

/// Runs `script` (a variant of a kit's qemu.sh) and returns the console.
fn boot_script(script: &Path) -> String {
    boot_kit(&serde_json::json!({ "qemu": script }))
}

/// How `/init` finds the drives, on QEMU standing in for the other runtimes, with variants of
/// the written qemu.sh: without serials (Firecracker's case) the drives are taken by position
/// alone; with the drives attached in the wrong order but named by their serials (a runtime
/// whose order differs), the serials win and the console says so. Either way the stack is in
/// order (layer 2's motd on top).
#[test]
fn kit_drives_by_position_alone_and_by_serial() {
    let dir = scratch("kit-drives");
    let store = image(&dir, &[]);
    let kit = kit(&store, &dir.path().join("kit"), &[]);
    let written = std::fs::read_to_string(kit["qemu"].as_str().unwrap()).unwrap();

    let no_serials = dir.path().join("no-serials.sh");
    let text = written.replace(",serial=lower0", "").replace(",serial=lower1", "");
    assert!(!text.contains("serial="), "{text}");
    std::fs::write(&no_serials, text).unwrap();
    let console = boot_script(&no_serials);
    assert_lines(&console, &CONFIG_LINES);
    assert_lines(&console, &["vmrootfs-init: drives in attach order: lower0=/dev/vda lower1=/dev/vdb"]);
    assert_lines(&console, &["vmrootfs-init: status 5"]);
    assert!(!console.contains("using the serial"), "{console}");

    let swapped = dir.path().join("swapped.sh");
    let drives: Vec<&str> = written.lines().filter(|l| l.trim_start().starts_with("-drive")).collect();
    assert_eq!(drives.len(), 2, "{written}");
    let text = written
        .replacen(drives[0], "@FIRST@", 1)
        .replacen(drives[1], drives[0], 1)
        .replacen("@FIRST@", drives[1], 1);
    std::fs::write(&swapped, text).unwrap();
    let console = boot_script(&swapped);
    assert_lines(&console, &CONFIG_LINES);
    for want in [
        "vmrootfs-init: drive lower1 is /dev/vda by its serial, /dev/vdb by position: using the serial",
        "vmrootfs-init: drive lower0 is /dev/vdb by its serial, /dev/vda by position: using the serial",
        "vmrootfs-init: drives in attach order: lower0=/dev/vdb lower1=/dev/vda",
        "vmrootfs-init: status 5",
    ] {
        assert_lines(&console, &[want]);
    }
}

/// The merged image as one raw disk (a copy of the merged blob and the layers, in that order),
/// mounted with a loop device per layer on this 6.1 kernel.
#[test]
fn kit_merged_boots_with_its_qemu_sh() {
    let dir = scratch("kit-merged");
    let store = image(&dir, &["--merge"]);
    let kit = kit(&store, &dir.path().join("kit"), &["--merged"]);
    let drives = kit["drives"].as_array().unwrap();
    assert_eq!(drives.len(), 1, "{kit}");
    assert_eq!(drives[0]["name"], "merged");
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "k", "--json"]));
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut expected = std::fs::read(record["merged"]["path"].as_str().unwrap()).unwrap();
    for l in record["lowers"].as_array().unwrap() {
        expected.extend(std::fs::read(l["path"].as_str().unwrap()).unwrap());
    }
    let disk = std::fs::read(drives[0]["path"].as_str().unwrap()).unwrap();
    assert!(
        disk == expected,
        "disk.raw is the merged blob then the layers ({} bytes vs {})",
        disk.len(),
        expected.len()
    );
    let console = boot_kit(&kit);
    assert_lines(&console, &CONFIG_LINES);
    assert_lines(&console, &["cat 0", "disks 1", "vmrootfs-init: drives in attach order: merged=/dev/vda"]);
    assert!(
        console.contains("vmrootfs-init: merged image mounted from /dev/vda"),
        "/init says how it mounted the disk:\n{console}"
    );
    assert_lines(&console, &["vmrootfs-init: status 5"]);
}

/// A `--verity` image: each lower opened through dm-verity on the `hashes` drive (the trees,
/// superblock blocks skipped); a flipped byte in lower 1 fails the guest's read and the
/// console names the lower.
#[test]
fn kit_verity_boots_with_its_qemu_sh() {
    let dir = scratch("kit-verity");
    let store = image(&dir, &["--verity"]);
    let kit = kit(&store, &dir.path().join("kit"), &[]);
    let names: Vec<&str> =
        kit["drives"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lower0", "lower1", "hashes"]);
    let console = boot_kit(&kit);
    assert_lines(&console, &CONFIG_LINES);
    assert_lines(
        &console,
        &[
            "cat 0",
            "disks 3",
            "vmrootfs-init: drives in attach order: lower0=/dev/vda lower1=/dev/vdb hashes=/dev/vdc",
            "vmrootfs-init: status 5",
        ],
    );
    assert!(!console.contains("corrupt"), "{console}");

    let blob = PathBuf::from(kit["drives"][1]["path"].as_str().unwrap());
    let bytes = std::fs::read(&blob).unwrap();
    let first = &noise(BLOB_BYTES, 7)[..4096];
    let at = bytes.chunks(4096).position(|c| c == first).expect("/data/blob's first block in lower 1") * 4096;
    drop(bytes);
    let flipped = Flipped::new(&blob, at as u64 + 100);
    let console = boot_kit(&kit);
    drop(flipped);
    assert_lines(&console, &["cat 1", "vmrootfs-init: status corrupt 1", "vmrootfs-init: status 5"]);
}

/// Firecracker's `--config-file` types as in firecracker-microvm/firecracker at 81b38b9d
/// (2026-08-21; the same fields in v1.9): `src/vmm/src/resources.rs` `VmmConfig` (kebab-case
/// keys; absent optional sections are none), `vmm_config/boot_source.rs` `BootSourceConfig`,
/// `vmm_config/drive.rs` `BlockDeviceConfig` and `vmm_config/machine_config.rs`
/// `MachineConfig`, each `deny_unknown_fields` there as here. The kit's JSON must deserialize
/// into them as Firecracker's own `serde_json::from_str::<VmmConfig>` would. (Fields the test
/// does not read are here so that `deny_unknown_fields` knows them.)
#[allow(dead_code)]
mod firecracker {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct VmmConfig {
        pub balloon: Option<serde_json::Value>,
        pub drives: Vec<BlockDeviceConfig>,
        pub boot_source: BootSourceConfig,
        pub cpu_config: Option<serde_json::Value>,
        pub logger: Option<serde_json::Value>,
        pub machine_config: Option<MachineConfig>,
        pub metrics: Option<serde_json::Value>,
        pub mmds_config: Option<serde_json::Value>,
        #[serde(default)]
        pub network_interfaces: Vec<serde_json::Value>,
        pub vsock: Option<serde_json::Value>,
        pub entropy: Option<serde_json::Value>,
        #[serde(default, rename = "pmem")]
        pub pmem_devices: Vec<serde_json::Value>,
        pub memory_hotplug: Option<serde_json::Value>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct BootSourceConfig {
        pub kernel_image_path: String,
        pub initrd_path: Option<String>,
        pub boot_args: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct BlockDeviceConfig {
        pub drive_id: String,
        pub partuuid: Option<String>,
        pub is_root_device: bool,
        #[serde(default)]
        pub cache_type: Option<String>,
        pub is_read_only: Option<bool>,
        pub path_on_host: Option<String>,
        pub rate_limiter: Option<serde_json::Value>,
        #[serde(rename = "io_engine")]
        pub file_engine_type: Option<String>,
        pub socket: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MachineConfig {
        pub vcpu_count: u8,
        pub mem_size_mib: usize,
        #[serde(default)]
        pub smt: bool,
        pub cpu_template: Option<String>,
        #[serde(default)]
        pub track_dirty_pages: bool,
        pub huge_pages: Option<String>,
    }
}

/// The Firecracker configuration of a `--verity` kit, checked without booting: Firecracker's
/// types read it; the kernel is an ELF vmlinux and the initramfs a newc cpio; the drives are
/// the kit's, read-only, none the root device, in the kit's order (the order Firecracker
/// attaches them, which `/init` relies on); the boot arguments keep the serial console and
/// module loading on. Cloud Hypervisor's command line attaches the same drives in the same
/// order, with serials.
#[test]
fn firecracker_config_is_what_firecracker_reads() {
    let dir = scratch("kit-firecracker");
    let store = image(&dir, &["--verity"]);
    let kit = kit(&store, &dir.path().join("kit"), &[]);
    let text = std::fs::read_to_string(kit["firecracker"].as_str().unwrap()).unwrap();
    let config: firecracker::VmmConfig =
        serde_json::from_str(&text).expect("Firecracker's VmmConfig reads it");
    // The check can fail: a field Firecracker does not have is refused.
    let misspelt = text.replace("\"is_read_only\"", "\"read_only\"");
    assert!(serde_json::from_str::<firecracker::VmmConfig>(&misspelt).is_err());

    let elf = std::fs::read(&config.boot_source.kernel_image_path).unwrap();
    assert!(elf.starts_with(b"\x7fELF\x02"), "a 64-bit ELF vmlinux");
    let initrd = std::fs::read(config.boot_source.initrd_path.as_deref().unwrap()).unwrap();
    assert!(initrd.starts_with(b"070701"), "a newc cpio");
    let args: Vec<&str> = config.boot_source.boot_args.as_deref().unwrap().split_whitespace().collect();
    assert!(args.contains(&"console=ttyS0") && args.contains(&"rdinit=/init"), "{args:?}");
    assert!(args.contains(&"reboot=k"), "the guest's reboot ends Firecracker: {args:?}");
    for off in ["8250.nr_uarts=0", "nomodule"] {
        assert!(!args.contains(&off), "{off} would turn off the console or the modules: {args:?}");
    }
    let machine = config.machine_config.expect("machine-config");
    assert_eq!((machine.vcpu_count, machine.mem_size_mib), (1, 512));

    let kit_drives = kit["drives"].as_array().unwrap();
    assert_eq!(config.drives.len(), kit_drives.len());
    for (d, k) in config.drives.iter().zip(kit_drives) {
        assert_eq!(d.drive_id, k["name"].as_str().unwrap());
        assert_eq!(d.path_on_host.as_deref(), k["path"].as_str());
        assert!(Path::new(d.path_on_host.as_deref().unwrap()).is_file());
        assert_eq!((d.is_read_only, d.is_root_device), (Some(true), false), "{d:?}");
    }
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "k", "--json"]));
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lowers: Vec<&str> =
        record["lowers"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap()).collect();
    let paths: Vec<&str> = config.drives.iter().map(|d| d.path_on_host.as_deref().unwrap()).collect();
    assert_eq!(paths[..2], lowers[..], "the lowers base first, then the trees");
    assert_eq!(config.drives[2].drive_id, "hashes");

    let ch = std::fs::read_to_string(kit["cloud_hypervisor"].as_str().unwrap()).unwrap();
    let disks: Vec<&str> = ch.lines().filter(|l| l.trim_start().starts_with("'path=")).collect();
    assert_eq!(disks.len(), 3, "{ch}");
    for (line, d) in disks.iter().zip(&config.drives) {
        let want = format!("'path={},readonly=on,serial={}'", d.path_on_host.as_deref().unwrap(), d.drive_id);
        assert!(line.trim().trim_end_matches(" \\") == want, "{line} vs {want}");
    }
}

/// `inspect --json` and `export --json` give what a runtime that sets up the drives itself
/// needs: each blob's size and place on the single disk, and the dm-verity `hash_start_block`
/// of a tree appended to its blob (the block after veritysetup's superblock, where the top
/// hash level begins: its sha256 with the salt is the root digest). The merged blob of this
/// image is one block: its tree is the superblock alone.
#[test]
fn json_gives_the_offsets_and_hash_starts_a_runtime_needs() {
    let dir = scratch("kit-json");
    let store = image(&dir, &["--merge", "--verity"]);
    let (ok, out, err) = run(vmrootfs(&store).args(["inspect", "k", "--json"]));
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    let merged = &record["merged"];
    let mut blobs = vec![merged];
    blobs.extend(record["lowers"].as_array().unwrap());
    let mut at = 0;
    for b in &blobs {
        assert_eq!(b["disk_offset"].as_u64(), Some(at), "{b}");
        let path = b["path"].as_str().unwrap();
        assert_eq!(b["size"].as_u64(), Some(std::fs::metadata(path).unwrap().len()));
        at += b["size"].as_u64().unwrap();

        let v = &b["verity"];
        let start = b["verity_hash_start_block"].as_u64().expect("a --verity blob's hash start") as usize;
        let mut appended = std::fs::read(path).unwrap();
        appended.extend(std::fs::read(b["verity_tree"].as_str().unwrap()).unwrap());
        assert_eq!(&appended[(start - 1) * 4096..][..8], b"verity\0\0", "the superblock's block comes first");
        // One data block has no hash level: the root digest is that block's hash.
        let top = if appended.len() > start * 4096 { start * 4096 } else { 0 };
        let mut salted = hex_decode(v["salt"].as_str().unwrap());
        salted.extend(&appended[top..][..4096]);
        assert_eq!(sha256(&salted), v["root_digest"].as_str().unwrap(), "top level at {start}");
        // veritysetup, told where the hash blocks start as the kernel's table is, agrees.
        let file = dir.path().join("appended.img");
        std::fs::write(&file, &appended).unwrap();
        let out = std::process::Command::new("veritysetup")
            .arg("verify")
            .arg("--no-superblock")
            .arg(format!("--hash-offset={}", start * 4096))
            .arg(format!("--data-blocks={}", v["hash_offset"].as_u64().unwrap() / 4096))
            .arg(format!("--salt={}", v["salt"].as_str().unwrap()))
            .args([&file, &file])
            .arg(v["root_digest"].as_str().unwrap().trim_start_matches("sha256:"))
            .output()
            .expect("veritysetup (cryptsetup-bin)");
        assert!(
            out.status.success(),
            "veritysetup at block {start}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let disk = dir.path().join("disk.raw");
    let (ok, out, err) =
        run(vmrootfs(&store).args(["export", "k", "--raw", "--json", "--single-disk"]).arg(&disk));
    assert!(ok, "{err}");
    let exported: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bytes = std::fs::read(&disk).unwrap();
    let parts = exported["parts"].as_array().unwrap();
    assert_eq!(parts.len(), blobs.len());
    for (p, b) in parts.iter().zip(&blobs) {
        assert_eq!((&p["path"], &p["offset"], &p["bytes"]), (&b["path"], &b["disk_offset"], &b["size"]));
        let (offset, len) = (p["offset"].as_u64().unwrap() as usize, p["bytes"].as_u64().unwrap() as usize);
        assert!(bytes[offset..offset + len] == std::fs::read(p["path"].as_str().unwrap()).unwrap()[..]);
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

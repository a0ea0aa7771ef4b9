//! Builds an image into a throw-away store with the vmrootfs library and prints what a microVM
//! runtime attaches to boot it: one read-only drive per layer blob (base first) with the
//! dm-verity table that checks it, the overlayfs mount that stacks them (top first), the merged
//! blob for a runtime short of drives, and the process to start; then writes the image's
//! runtime kit (`vmrootfs kit`: kernel, initramfs, QEMU, Firecracker and Cloud Hypervisor
//! configurations) and prints its drives in the order every configuration attaches them.
//! Checks what a runtime would find out: every blob and tree it names is there with its recorded
//! size, and the kit attaches the lowers base first; exits non-zero otherwise.
//!
//! usage: cargo run --example build_and_attach [-- SOURCE]
//!        (default SOURCE: the bundled oci-archive:testdata/busybox.oci.tar:busybox; the kit
//!        needs a kernel in /boot with its modules, and busybox-static, as `vmrootfs kit` does)

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;

use vmrootfs::progress::{self, Reporter};
use vmrootfs::vm::kit::{self, KitForm, KitOptions, MergedDisk};
use vmrootfs::{BuildOptions, Builder, LocatedRecord, Store};

const BUNDLED: &str = "oci-archive:testdata/busybox.oci.tar:busybox";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                msg += &format!(": {c}");
                cause = c.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let source = std::env::args().nth(1).unwrap_or_else(|| BUNDLED.to_string());
    let dir = tempfile::tempdir()?;
    progress::set_verbosity(0);

    let store = Store::open(dir.path().join("store"))?;
    // EROFS layer blobs with dm-verity trees, and the merged blob over them (one mount).
    let opts = BuildOptions { merge: true, verity: true, ..BuildOptions::default() };
    let built = Builder::new(store.clone(), opts)?.build(&source, Some("example"), &Reporter::new())?;
    let record = &built.record;
    println!("built {source} as {:?} into {}", record.tag, store.root().display());
    println!("manifest {}, platform {}", record.manifest_digest, record.platform);

    print_layer_stack(record)?;
    if let Some(merged) = &record.merged {
        check_blob(&merged.path, merged.size)?;
        println!(
            "\nor, short of drives, one mount of the merged blob over the layer blobs (its devices 1..n):"
        );
        println!("  merged {} ({} bytes)", merged.path.display(), merged.size);
        if let Some(offset) = merged.disk_offset {
            let lowers: Vec<String> =
                record.lowers.iter().filter_map(|l| l.disk_offset).map(|o| o.to_string()).collect();
            println!(
                "  as one disk (export --single-disk): merged blob at byte {offset}, lowers at {}",
                lowers.join(", ")
            );
        }
        println!("  or on the host:");
        let devices: Vec<String> =
            record.lowers.iter().map(|l| format!("device={}", l.path.display())).collect();
        println!("  mount -t erofs -o ro,{} {} /lower", devices.join(","), merged.path.display());
    }

    let c = &record.config;
    println!("\nthen start, as user {:?} in {:?}:", or(&c.user, "root"), or(&c.working_dir, "/"));
    println!("  {:?}", c.entrypoint.iter().chain(&c.cmd).collect::<Vec<_>>());
    println!("  env {:?}", c.env);

    // The same image as the store lists it: a runtime that did not build it asks the store.
    let stored = store.locate(store.get("example")?)?;
    if stored.lowers != record.lowers {
        return Err("the store's record of the image differs from what build returned".into());
    }

    print_kit(&store, record, &dir.path().join("kit"))
}

/// The image's runtime kit, layer stack form: what `vmrootfs kit` writes and `run` boots.
fn print_kit(store: &Store, record: &LocatedRecord, dir: &Path) -> Result<(), Box<dyn Error>> {
    let opts = KitOptions {
        kernel: None,
        memory_mb: 256,
        form: KitForm::Stack,
        merged_disk: MergedDisk::Raw,
        command: Vec::new(),
        served_lowers: None,
        upper: None,
    };
    let kit = kit::write(store, &record.tag, dir, &opts)?;
    println!(
        "
the runtime kit (kernel {}) in {}:",
        kit.kernel_version,
        dir.display()
    );
    let files = [Some(&kit.vmlinux), Some(&kit.initramfs), Some(&kit.qemu)]
        .into_iter()
        .chain([kit.firecracker.as_ref(), kit.cloud_hypervisor.as_ref()]);
    for file in files.flatten() {
        println!("  {}", file.display());
    }
    println!("its drives, in the order every configuration attaches them:");
    for (i, drive) in kit.drives.iter().enumerate() {
        println!("  {i}: {} {} ({})", drive.name, drive.path.display(), drive.format.qemu_name());
    }
    // The guest finds the lowers by position: drive i must be lower i, base first.
    for (i, lower) in record.lowers.iter().enumerate() {
        match kit.drives.get(i) {
            Some(d) if d.name == format!("lower{i}") && d.path == lower.path => {}
            other => {
                return Err(
                    format!("kit drive {i} is {other:?}, not lower {i} ({})", lower.path.display()).into()
                );
            }
        }
    }
    Ok(())
}

/// One read-only drive per lower, base first; overlayfs takes `lowerdir` top first.
fn print_layer_stack(record: &LocatedRecord) -> Result<(), Box<dyn Error>> {
    println!("\nattach read-only, in this order (drive i = lower i, base first):");
    for (i, lower) in record.lowers.iter().enumerate() {
        check_blob(&lower.path, lower.size)?;
        println!(
            "  drive {i}: {} ({} bytes, {}, chain {})",
            lower.path.display(),
            lower.size,
            lower.fs,
            lower.chain_id
        );
        if let (Some(v), Some(tree)) = (&lower.verity, &lower.verity_tree) {
            check_blob(tree, v.tree_size)?;
            // The tree's first block is veritysetup's superblock: the hashes start at block 1.
            println!(
                "           dm-verity over hash tree {}:\n             0 {} verity 1 DRIVE{i} TREE{i} {bs} {bs} {} 1 {} {} {}",
                tree.display(),
                v.hash_offset / 512,
                v.data_blocks(),
                v.algorithm,
                v.root_hex(),
                v.salt,
                bs = v.block_size,
            );
        }
    }
    let top_first: Vec<String> = (0..record.lowers.len()).rev().map(|i| format!("/lower/{i}")).collect();
    println!("\nmount each drive i at /lower/i ({}, read-only), then stack them:", fs_of(record));
    println!(
        "  mount -t overlay overlay -o lowerdir={},upperdir=/rw/upper,workdir=/rw/work /root",
        top_first.join(":")
    );
    Ok(())
}

fn fs_of(record: &LocatedRecord) -> String {
    record.lowers.first().map(|l| l.fs.to_string()).unwrap_or_default()
}

fn or<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

/// What a runtime finds when it opens the blob: it is there, with the size the record gives.
fn check_blob(path: &Path, size: u64) -> Result<(), Box<dyn Error>> {
    let found = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    if found != size {
        return Err(format!("{} is {found} bytes, its record says {size}", path.display()).into());
    }
    Ok(())
}

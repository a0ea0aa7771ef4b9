//! The runtime configurations of a kit ([`super::kit`]): a QEMU command line, a Firecracker
//! `--config-file` and a Cloud Hypervisor command line, each attaching the kit's drives
//! read-only in the kit's order, with a kernel command line that keeps the serial console on.

use serde_json::json;

use super::kit::{Kit, sq};

/// Kernel arguments every runtime gets: `/init` from the initramfs, the kernel's own messages
/// kept short.
const GUEST_ARGS: &str = "rdinit=/init quiet loglevel=1";

/// Firecracker's kernel command line: its default (`src/vmm/src/vmm_config/boot_source.rs`
/// `DEFAULT_KERNEL_CMDLINE`) has `8250.nr_uarts=0`, which turns the serial console off, and
/// `nomodule`, which stops the modules `/init` loads; this keeps the rest. `reboot=k`: the
/// guest's reboot at the end ends Firecracker.
pub const FIRECRACKER_ARGS: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Virtio-mmio devices Firecracker gives an x86_64 guest: one legacy IRQ each, 5 to 23.
pub const FIRECRACKER_X86_DEVICES: usize = 19;

/// QEMU's: `panic=-1` reboots at once, which `-no-reboot` turns into QEMU's exit.
const QEMU_ARGS: &str = "console=ttyS0 panic=-1";

/// Cloud Hypervisor's: it restarts a guest that reboots, so `/init` powers off instead.
const CLOUD_HYPERVISOR_ARGS: &str = "console=ttyS0 vmrootfs.poweroff";

/// `qemu.sh`: boots the kit in a QEMU microVM, console on stdio; KVM when the CPU shows
/// hardware virtualization and /dev/kvm is there, else TCG (with `tsc_early_khz`: the TCG
/// timer calibration hangs otherwise). Extra QEMU arguments are passed on (`"$@"`), extra
/// kernel arguments come from `$VMROOTFS_APPEND` (`run` adds its virtio-serial ports so).
pub fn qemu_script(kit: &Kit) -> String {
    let mut s = format!(
        "#!/bin/sh\n\
         # Boots the {form} of {tag} in a QEMU microVM; written by `vmrootfs kit`. The lowers are the\n\
         # store's blobs, by absolute path: valid while the image is in the store.\n\
         append={args}\n\
         if [ -w /dev/kvm ] && grep -qw -e vmx -e svm /proc/cpuinfo; then\n\
         \x20 accel='-accel kvm -cpu host'\n\
         else\n\
         \x20 accel='-accel tcg -cpu max'\n\
         \x20 khz=$(awk -F: '/^cpu MHz/ {{ printf \"%d\", $2 * 1000; exit }}' /proc/cpuinfo)\n\
         \x20 [ -n \"$khz\" ] && append=\"$append tsc_early_khz=$khz\"\n\
         fi\n\
         exec qemu-system-x86_64 $accel -M microvm,acpi=on -m {mem} -smp 1 -nodefaults -no-user-config \\\n\
         \x20 -nographic -no-reboot -serial stdio \\\n",
        tag = kit.tag,
        form = kit.form,
        args = sq(&format!("{QEMU_ARGS} {GUEST_ARGS}")),
        mem = kit.memory_mb,
    );
    let qboot = std::path::Path::new("/usr/share/qemu/qboot.rom");
    if qboot.exists() {
        s += &format!("  -bios {} \\\n", sq(&qboot.display().to_string()));
    }
    s += &format!(
        "  -kernel {} -initrd {} \\\n  -append \"$append${{VMROOTFS_APPEND:+ $VMROOTFS_APPEND}}\" \\\n",
        sq(&kit.vmlinux.display().to_string()),
        sq(&kit.initramfs.display().to_string()),
    );
    for (i, d) in kit.drives.iter().enumerate() {
        let file = d.path.display().to_string().replace(',', ",,");
        s += &format!(
            "  -drive {} -device {} \\\n",
            sq(&format!(
                "id=d{i},file={file},format={},if=none{}",
                d.format.qemu_name(),
                if d.writable { "" } else { ",readonly=on" }
            )),
            sq(&format!("virtio-blk-device,drive=d{i},serial={}", d.name)),
        );
    }
    s += "  \"$@\"\n";
    s
}

/// `firecracker.json`, for `firecracker --no-api --config-file firecracker.json`: the kernel,
/// the initramfs, the drives read-only in the kit's order (none of them the root device: the
/// initramfs is the root) and the serial console on.
pub fn firecracker_config(kit: &Kit) -> String {
    let drives: Vec<_> = kit
        .drives
        .iter()
        .map(|d| {
            json!({
                "drive_id": d.name,
                "path_on_host": d.path,
                "is_root_device": false,
                "is_read_only": !d.writable,
            })
        })
        .collect();
    let config = json!({
        "boot-source": {
            "kernel_image_path": kit.vmlinux,
            "initrd_path": kit.initramfs,
            "boot_args": format!("{FIRECRACKER_ARGS} {GUEST_ARGS}"),
        },
        "drives": drives,
        "machine-config": {"vcpu_count": 1, "mem_size_mib": kit.memory_mb},
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serializes") + "\n"
}

/// `cloud-hypervisor.sh`: the kit under Cloud Hypervisor, console on the serial port (stdio),
/// each drive read-only with its name as serial. Extra arguments are passed on (`"$@"`).
pub fn cloud_hypervisor_script(kit: &Kit) -> String {
    let mut s = format!(
        "#!/bin/sh\n\
         # Boots the {form} of {tag} in Cloud Hypervisor; written by `vmrootfs kit`.\n\
         exec cloud-hypervisor --kernel {vmlinux} --initramfs {initramfs} \\\n\
         \x20 --cmdline {args} \\\n\
         \x20 --cpus boot=1 --memory size={mem}M --serial tty --console off \\\n\
         \x20 --disk",
        tag = kit.tag,
        form = kit.form,
        vmlinux = sq(&kit.vmlinux.display().to_string()),
        initramfs = sq(&kit.initramfs.display().to_string()),
        args = sq(&format!("{CLOUD_HYPERVISOR_ARGS} {GUEST_ARGS}")),
        mem = kit.memory_mb,
    );
    for d in &kit.drives {
        let path = d.path.display();
        let readonly = if d.writable { "" } else { ",readonly=on" };
        s += &format!(" \\\n    {}", sq(&format!("path={path}{readonly},serial={}", d.name)));
    }
    s += " \\\n  \"$@\"\n";
    s
}

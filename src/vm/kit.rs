//! The runtime kit (`vmrootfs kit TAG DIR`): what a microVM runtime needs to boot a stored
//! image, written into one directory, and what `vmrootfs run` boots.
//!
//! ```text
//! DIR/vmlinux              the kernel, uncompressed ELF (PVH entry), from a bzImage
//! DIR/initramfs.cpio       busybox, the modules (+ soft dependencies), /init, the settings
//! DIR/qemu.sh              QEMU microvm command line (extra QEMU arguments: "$@")
//! DIR/firecracker.json     Firecracker --config-file          } when every drive is a raw
//! DIR/cloud-hypervisor.sh  Cloud Hypervisor command line      } file
//! DIR/hashes.img           the dm-verity trees, one after another (--verity images)
//! DIR/disk.raw             the merged image as one raw disk (--merged)
//! ```
//!
//! The lowers themselves stay in the store: the configurations name the stored blobs by
//! absolute path, so a kit is valid while its image is in the store and the store stays put.
//!
//! # Finding the drives in the guest
//!
//! `/init` (in the initramfs) takes the kit's drives in the order the configurations
//! attach them (`lower0` … `lower<n-1>`, or `merged` [then the lowers], then `hashes`), by
//! position among the guest's virtio block devices, numbered by the virtio bus (`virtio0`,
//! `virtio1`, …) in the order the runtime declares its devices, without udev. Per runtime:
//!
//! - **Firecracker** keeps `drives` in config order (a root device would go first; a kit has
//!   none), attaches them in that order, each at the next MMIO address (`FirstMatch`), and
//!   declares them to the guest in that order on the kernel command line
//!   (`virtio_mmio.device=`) and in the ACPI DSDT (`src/vmm/src/vmm_config/drive.rs`
//!   `BlockBuilder`, `src/vmm/src/device_manager/mmio.rs`). It has no drive serials.
//! - **QEMU** `-M microvm,acpi=on` declares the `-device`s in command-line order (checked:
//!   the first is `virtio0`); each drive also has its name as serial.
//!
//! Another block device attached before the kit's drives would shift them; after them it is
//! harmless.
//! - **Cloud Hypervisor** (virtio-pci) gives each drive its name as serial.
//!
//! A drive whose serial is one of the kit's names is taken by its serial; `/init` says on the
//! console when that differs from its position.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::initramfs::{self, GuestFiles, GuestProgram};
use super::kernel::Kernel;
use super::{UnverifiableForm, VmError};
use crate::backend::tool::Tool;
use crate::lazy::BlockSource;
use crate::record::{ImageRecord, Located, Lower, RuntimeConfig};
use crate::store::Store;

/// Which of an image's forms a kit boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KitForm {
    /// One drive per layer, stacked with overlayfs (dm-verity for `--verity` lowers).
    Stack,
    /// The merged image (`build --merge`) as one disk; for a `--merge --verity` image, the
    /// merged blob and one drive per layer, each through dm-verity.
    Merged,
    /// The squashed blob (`build --squash`) as one drive.
    Squashed,
    /// Not the image but an upper made over it (`vmrootfs commit`): the upper's changes
    /// streamed out as a layer tar.
    Commit,
}

impl std::fmt::Display for KitForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KitForm::Stack => "layer stack",
            KitForm::Merged => "merged image",
            KitForm::Squashed => "squashed blob",
            KitForm::Commit => "upper (commit)",
        })
    }
}

/// The format of a drive's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveFormat {
    /// The blob (or the single disk) itself.
    Raw,
    /// A VMDK descriptor (QEMU only).
    Vmdk,
    /// An export of `run --lazy`'s NBD server (QEMU only): the path is its
    /// `nbd+unix:///NAME?socket=PATH` URL.
    Nbd,
}

impl DriveFormat {
    /// QEMU's name of the format (`-drive format=`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            DriveFormat::Raw | DriveFormat::Nbd => "raw",
            DriveFormat::Vmdk => "vmdk",
        }
    }
}

/// How a kit hands a merged image's single disk to the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergedDisk {
    /// `disk.raw`, the blobs copied into one file: every runtime reads it.
    Raw,
    /// A VMDK descriptor with `RW` extents over the stored blobs, attached `readonly=on`: QEMU
    /// only, for a kit in a private directory (`run`), nothing copied.
    QemuVmdk,
}

/// Options of a kit.
#[derive(Debug, Clone)]
pub struct KitOptions {
    /// bzImage (or ELF vmlinux) to boot [default: the newest /boot/vmlinuz-*].
    pub kernel: Option<PathBuf>,
    /// Guest memory in MiB, written into the configurations.
    pub memory_mb: u32,
    /// Which of the image's forms to boot.
    pub form: KitForm,
    /// How the merged form's single disk is made.
    pub merged_disk: MergedDisk,
    /// The command; empty means the image's entrypoint + cmd.
    pub command: Vec<String>,
    /// Attach lower `i` as `DIR/lower<i>` (a [`crate::serve`] mount of this image: its
    /// lowers as plain files) instead of the stored blob, wherever a lower is a drive of its
    /// own (the layer stack, a `--verity` image's merged form).
    pub served_lowers: Option<PathBuf>,
    /// An ext4 file attached read-write as the drive `upper`, the overlay's writable layer
    /// (`run --upper`, see [`crate::upper`]); none: a tmpfs.
    pub upper: Option<PathBuf>,
}

/// The name of lower `i` (base = 0) as a drive of a kit, and as a file of [`crate::serve`].
pub fn lower_name(i: usize) -> String {
    format!("lower{i}")
}

/// A drive of a kit, in attach order.
#[derive(Debug, Clone, Serialize)]
pub struct KitDrive {
    /// `lower<i>`, `merged` or `hashes`: the serial where the runtime has serials.
    pub name: String,
    /// The file attached: a stored blob (by absolute path) or a file of the kit.
    pub path: PathBuf,
    /// Its format.
    pub format: DriveFormat,
    /// Attached read-write (only the `upper` of `run --upper`); every other drive is read-only.
    pub writable: bool,
}

/// What [`write()`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Kit {
    /// The image's tag.
    pub tag: String,
    /// The form it boots.
    pub form: KitForm,
    /// `uname -r` of the kernel.
    pub kernel_version: String,
    /// `DIR/vmlinux`: the uncompressed kernel.
    pub vmlinux: PathBuf,
    /// `DIR/initramfs.cpio`: busybox, the modules and `/init`.
    pub initramfs: PathBuf,
    /// `DIR/qemu.sh`: the QEMU microvm command line.
    pub qemu: PathBuf,
    /// `DIR/firecracker.json`, when every drive is a raw file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firecracker: Option<PathBuf>,
    /// `DIR/cloud-hypervisor.sh`, when every drive is a raw file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_hypervisor: Option<PathBuf>,
    /// The drives, in the order every configuration attaches them.
    pub drives: Vec<KitDrive>,
    /// Guest memory in MiB.
    pub memory_mb: u32,
}

const BUSYBOX: &str = "/bin/busybox";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Shell single-quoting.
pub(super) fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn is_static(path: &Path) -> Result<bool, VmError> {
    let bytes = fs_err::read(path).map_err(|source| VmError::Io { path: path.to_owned(), source })?;
    let head = &bytes[..bytes.len().min(8192)];
    Ok(bytes.starts_with(b"\x7fELF") && !head.windows(8).any(|w| w == b"ld-linux"))
}

/// The drives of a kit.
enum Drives {
    /// One raw drive per lower (or the squashed blob alone), `lower<i>`, with its fs and
    /// dm-verity table (the trees then go on one more drive, `hashes`).
    Lowers(Vec<Drive>),
    /// One drive, `merged`: the merged blob then the layer blobs, which start at these byte
    /// offsets of the disk.
    Merged { disk: PathBuf, format: DriveFormat, layer_offsets: Vec<u64> },
    /// A `--verity` image's merged blob (`merged`) over one drive per lower (`lower<i>`), each
    /// opened through dm-verity and the lowers given as the merged blob's devices.
    VerifiedMerged { lowers: Vec<Drive>, merged: Drive },
}

impl Drives {
    /// The drives opened through dm-verity in the guest, lowers first.
    fn verity_drives(&mut self) -> Vec<&mut Drive> {
        match self {
            Drives::Lowers(lowers) => lowers.iter_mut().filter(|d| d.verity.is_some()).collect(),
            Drives::Merged { .. } => Vec::new(),
            Drives::VerifiedMerged { lowers, merged } => lowers.iter_mut().chain([merged]).collect(),
        }
    }

    /// Every drive, in attach order (without `hashes`).
    fn attach_order(&self) -> Vec<KitDrive> {
        let lower = |i: usize, d: &Drive| KitDrive {
            name: lower_name(i),
            path: d.path.clone(),
            format: d.format,
            writable: false,
        };
        match self {
            Drives::Lowers(lowers) => lowers.iter().enumerate().map(|(i, d)| lower(i, d)).collect(),
            Drives::Merged { disk, format, .. } => {
                vec![KitDrive { name: "merged".into(), path: disk.clone(), format: *format, writable: false }]
            }
            Drives::VerifiedMerged { lowers, merged } => std::iter::once(KitDrive {
                name: "merged".into(),
                path: merged.path.clone(),
                format: merged.format,
                writable: false,
            })
            .chain(lowers.iter().enumerate().map(|(i, d)| lower(i, d)))
            .collect(),
        }
    }
}

/// One lower's drive, as the guest gets it.
struct Drive {
    path: PathBuf,
    format: DriveFormat,
    fs: String,
    verity: Option<VerityTable>,
}

/// What the guest's dm-verity table of a drive needs.
struct VerityTable {
    tree: PathBuf,
    data_blocks: u64,
    /// Block of the `hashes` drive where the lower's hash blocks begin (after its superblock).
    hash_start: u64,
    root: String,
    salt: String,
}

impl VerityTable {
    /// The table of a blob with the dm-verity record `v` and tree file `tree`.
    fn new(v: &crate::verity::VerityInfo, tree: &Path) -> VerityTable {
        VerityTable {
            tree: tree.to_owned(),
            data_blocks: v.data_blocks(),
            hash_start: 0,
            root: v.root_hex().to_string(),
            salt: v.salt.clone(),
        }
    }
}

/// Writes the trees of the dm-verity lowers one after another into `out` (the `hashes`
/// drive), filling in where each one's hash blocks begin: after the tree's first block, which
/// holds veritysetup's superblock (the kernel's table has no superblock).
fn write_hashes(drives: Vec<&mut Drive>, out: &Path) -> Result<(), VmError> {
    use std::io::Write;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmError::Io { path, source }
    };
    let mut file = fs_err::File::create(out).map_err(io(out))?;
    const BS: u64 = crate::verity::BLOCK_SIZE;
    let mut written = 0; // bytes, always whole blocks
    for v in drives.into_iter().filter_map(|d| d.verity.as_mut()) {
        let mut tree = fs_err::File::open(&v.tree).map_err(io(&v.tree))?;
        v.hash_start = written / BS + 1; // the superblock's block comes first
        let n = std::io::copy(&mut tree, &mut file).map_err(io(out))?;
        // A tree is whole blocks; should one not be, the next still starts on a block.
        let pad = n.div_ceil(BS) * BS - n;
        file.write_all(&vec![0; pad as usize]).map_err(io(out))?;
        written += n + pad;
    }
    file.sync_all().map_err(io(out))
}

/// The guest's settings: `/vmrootfs/run` (what to mount) and `/vmrootfs/exec.sh` (how to
/// start the command inside the image).
fn guest_files(
    config: &RuntimeConfig,
    drives: &Drives,
    any_verity: bool,
    upper: bool,
    command: &[String],
) -> GuestFiles {
    let mut run = String::new();
    let mut names: Vec<String> = drives.attach_order().into_iter().map(|d| d.name).collect();
    if any_verity {
        names.push("hashes".into());
    }
    if upper {
        names.push("upper".into());
        run += "UPPER=1\n";
    }
    run += &format!("DRIVES={}\n", sq(&names.join(" ")));
    let table = |v: &VerityTable| sq(&format!("{} {} {} {}", v.data_blocks, v.hash_start, v.root, v.salt));
    let lower_vars = |run: &mut String, lowers: &[Drive]| {
        *run += &format!("LOWERS={}\n", lowers.len());
        for (i, d) in lowers.iter().enumerate() {
            *run += &format!("FS{i}={}\n", d.fs);
            if let Some(v) = &d.verity {
                *run += &format!("VERITY{i}={}\n", table(v));
            }
        }
    };
    match drives {
        Drives::Lowers(lowers) => lower_vars(&mut run, lowers),
        Drives::VerifiedMerged { lowers, merged } => {
            lower_vars(&mut run, lowers);
            let v = merged.verity.as_ref().expect("a verified merged blob has a tree");
            run += &format!("MERGED_VERITY={}\n", table(v));
        }
        Drives::Merged { layer_offsets, .. } => {
            let offsets: Vec<String> = layer_offsets.iter().map(u64::to_string).collect();
            run += &format!("LOWERS=0\nMERGED=1\nMERGED_OFFSETS='{}'\n", offsets.join(" "));
        }
    }
    let c = config;
    run += &format!("USERSPEC={}\n", sq(&c.user));
    let mut env = c.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push("HOME=/root".into());
    }
    let path = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let workdir = if c.working_dir.is_empty() { "/" } else { c.working_dir.as_str() };
    let quoted = |v: &[String]| v.iter().map(|a| sq(a)).collect::<Vec<_>>().join(" ");
    // The program is looked up in the image's PATH here and run by absolute path: busybox
    // would run its own applet for a bare name like `sh` or `ls`.
    let exec = format!(
        r#"cd {wd} || {{ echo "vmrootfs: cannot enter working directory "{wd} >&2; exit 126; }}
cmd={cmd}
case $cmd in
  */*) ;;
  *) found=""; search={path}; IFS=:
     for d in $search; do [ -f "$d/$cmd" ] && [ -x "$d/$cmd" ] && {{ found="$d/$cmd"; break; }}; done
     unset IFS
     [ -n "$found" ] || {{ echo "vmrootfs: $cmd: not found in PATH" >&2; exit 127; }}
     cmd=$found;;
esac
setpriv=$(cat /dev/.vmrootfs/setpriv)
if [ -n "$setpriv" ]; then
  exec /dev/.vmrootfs/busybox env -i {env} $setpriv "$cmd" -- {args}
fi
exec /dev/.vmrootfs/busybox env -i {env} "$cmd" {args}
"#,
        wd = sq(workdir),
        cmd = sq(&command[0]),
        path = sq(path),
        env = quoted(&env),
        args = quoted(&command[1..]),
    );
    GuestFiles { run, exec }
}

/// Refuses a form the image does not have, and a form of a `--verity` image whose blocks the
/// guest could not all check.
fn check_form(tag: &str, record: &ImageRecord, form: KitForm) -> Result<(), VmError> {
    if form == KitForm::Squashed && record.squashed.is_none() {
        return Err(VmError::NoSquashed { tag: tag.to_string() });
    }
    if form == KitForm::Merged && record.merged.is_none() {
        return Err(crate::merge::MergeError::NotMerged { tag: tag.to_string() }.into());
    }
    let verity = record.lowers.iter().any(|l| l.verity.is_some());
    if verity && form == KitForm::Squashed {
        return Err(VmError::Unverifiable { tag: tag.to_string(), form: UnverifiableForm::Squashed });
    }
    let merged_has_tree = record.merged.as_ref().is_some_and(|m| m.verity.is_some());
    if verity
        && form == KitForm::Merged
        && !(merged_has_tree && record.lowers.iter().all(|l| l.verity.is_some()))
    {
        return Err(VmError::Unverifiable { tag: tag.to_string(), form: UnverifiableForm::Merged });
    }
    Ok(())
}

/// Writes the kit of the image tagged `tag` into `dir` (created if missing), holding the
/// shared store lock while it reads the store.
pub fn write(store: &Store, tag: &str, dir: &Path, opts: &KitOptions) -> Result<Kit, VmError> {
    let _store_lock = store.lock_shared()?;
    let record = store.get(tag)?;
    let kit = write_record(store, tag, &record, dir, opts)?;
    if kit.drives.len() > super::runtimes::FIRECRACKER_X86_DEVICES {
        crate::progress::info(&format!(
            "{tag}: the kit has {} drives, more than Firecracker on x86_64 takes ({} virtio-mmio devices, one IRQ each, net and vsock included; a QEMU microvm has 24 slots): write it with --merged (build --merge) or --squashed",
            kit.drives.len(),
            super::runtimes::FIRECRACKER_X86_DEVICES
        ));
    }
    Ok(kit)
}

/// [`write`] for a record read under the store lock the caller holds.
pub(super) fn write_record(
    store: &Store,
    tag: &str,
    record: &ImageRecord,
    dir: &Path,
    opts: &KitOptions,
) -> Result<Kit, VmError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmError::Io { path, source }
    };
    check_form(tag, record, opts.form)?;
    fs_err::create_dir_all(dir).map_err(io(dir))?;
    let dir = std::path::absolute(dir).map_err(io(dir))?;
    let located = store.locate(record.clone())?;
    let lower_drive = |(i, l): (usize, &Located<Lower>)| Drive {
        path: opts.served_lowers.as_ref().map_or_else(|| l.path.clone(), |dir| dir.join(lower_name(i))),
        format: DriveFormat::Raw,
        fs: l.fs.to_string(),
        verity: l.verity.as_ref().zip(l.verity_tree.as_ref()).map(|(v, tree)| VerityTable::new(v, tree)),
    };
    let verity = record.lowers.iter().any(|l| l.verity.is_some());
    let drives = match (opts.form, &located.merged, &located.squashed) {
        (KitForm::Merged, Some(m), _) if verity => Drives::VerifiedMerged {
            lowers: located.lowers.iter().enumerate().map(lower_drive).collect(),
            merged: Drive {
                path: m.path.clone(),
                format: DriveFormat::Raw,
                fs: m.fs.to_string(),
                verity: m
                    .verity
                    .as_ref()
                    .zip(m.verity_tree.as_ref())
                    .map(|(v, tree)| VerityTable::new(v, tree)),
            },
        },
        (KitForm::Merged, _, _) => {
            let extents = crate::merge::disk::extents(&located)?;
            let layer_offsets = crate::merge::disk::offsets(&extents)[1..].to_vec();
            let (disk, format) = match opts.merged_disk {
                MergedDisk::Raw => {
                    let disk = dir.join("disk.raw");
                    crate::merge::disk::write_raw(&extents, &disk)?;
                    (disk, DriveFormat::Raw)
                }
                MergedDisk::QemuVmdk => {
                    let disk = dir.join("merged.vmdk");
                    // QEMU reads only `RW` extents; qemu.sh attaches the drive `readonly=on`.
                    let access = crate::merge::disk::ExtentAccess::QemuReadOnlyDrive;
                    let text = crate::merge::disk::vmdk_descriptor(&extents, 0, access)?;
                    fs_err::write(&disk, text).map_err(io(&disk))?;
                    (disk, DriveFormat::Vmdk)
                }
            };
            Drives::Merged { disk, format, layer_offsets }
        }
        (KitForm::Squashed, _, Some(s)) => Drives::Lowers(vec![Drive {
            path: s.path.clone(),
            format: DriveFormat::Raw,
            fs: s.fs.to_string(),
            verity: None,
        }]),
        _ => Drives::Lowers(located.lowers.iter().enumerate().map(lower_drive).collect()),
    };
    write_drives(store, tag, &record.config, drives, &dir, opts)
}

/// The kit of `run --lazy`: one lower per export of its NBD server on `socket`, each opened
/// through dm-verity in the guest with the tree the lazy blob proved (the host checked every
/// block already; the guest checks again, as for a stored `--verity` image).
pub(super) fn write_lazy(
    store: &Store,
    reference: &str,
    image: &crate::lazy::LazyImage,
    socket: &Path,
    dir: &Path,
    opts: &KitOptions,
) -> Result<Kit, VmError> {
    let nbd = |i: usize| {
        (
            PathBuf::from(format!("nbd+unix:///{}?socket={}", lower_name(i), socket.display())),
            DriveFormat::Nbd,
        )
    };
    write_lazy_drives(store, reference, image, nbd, dir, opts)
}

/// The kit of `vmrootfs serve --lazy`: lower `i` is the file `served/lower<i>` of the
/// serve mount, opened through dm-verity in the guest as in [`write_lazy`].
pub(crate) fn write_lazy_served(
    store: &Store,
    reference: &str,
    image: &crate::lazy::LazyImage,
    served: &Path,
    dir: &Path,
    opts: &KitOptions,
) -> Result<Kit, VmError> {
    let file = |i: usize| (served.join(lower_name(i)), DriveFormat::Raw);
    write_lazy_drives(store, reference, image, file, dir, opts)
}

/// The kit of a lazy image whose lower `i` is attached as `drive(i)`, in `dir` (made if
/// missing); the process from the image's config.
fn write_lazy_drives(
    store: &Store,
    reference: &str,
    image: &crate::lazy::LazyImage,
    drive: impl Fn(usize) -> (PathBuf, DriveFormat),
    dir: &Path,
    opts: &KitOptions,
) -> Result<Kit, VmError> {
    let lowers = image
        .lowers()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (path, format) = drive(i);
            Drive {
                path,
                format,
                fs: crate::backend::FsType::Erofs.to_string(),
                verity: Some(VerityTable {
                    tree: b.tree_path(),
                    data_blocks: b.len() / crate::verity::BLOCK_SIZE,
                    hash_start: 0,
                    root: b.root_digest().digest().to_string(),
                    salt: b.salt_hex(),
                }),
            }
        })
        .collect();
    fs_err::create_dir_all(dir).map_err(|source| VmError::Io { path: dir.to_owned(), source })?;
    let dir = std::path::absolute(dir).map_err(|source| VmError::Io { path: dir.to_owned(), source })?;
    let config = RuntimeConfig::from(&image.image().config);
    write_drives(store, reference, &config, Drives::Lowers(lowers), &dir, opts)
}

/// Writes the kit of `drives` into `dir` (absolute, existing).
fn write_drives(
    store: &Store,
    tag: &str,
    config: &RuntimeConfig,
    mut drives: Drives,
    dir: &Path,
    opts: &KitOptions,
) -> Result<Kit, VmError> {
    let command = if opts.command.is_empty() {
        [config.entrypoint.clone(), config.cmd.clone()].concat()
    } else {
        opts.command.clone()
    };
    if command.is_empty() {
        return Err(VmError::NoCommand);
    }
    let Base { dir, kernel, vmlinux, busybox } = Base::prepare(store, dir, opts)?;
    let verity_drives = drives.verity_drives();
    let any_verity = !verity_drives.is_empty();
    let hashes = dir.join("hashes.img");
    let dmsetup = if any_verity {
        write_hashes(verity_drives, &hashes)?;
        Some(Tool::find("dmsetup", "dmsetup", &["--version"], "1.02")?.path)
    } else {
        None
    };
    let guest = guest_files(config, &drives, any_verity, opts.upper.is_some(), &command);
    crate::progress::debug(&format!("guest settings: {}", guest.run.replace('\n', "; ")));
    let initramfs = dir.join("initramfs.cpio");
    let programs: Vec<GuestProgram<'_>> =
        dmsetup.iter().map(|path| GuestProgram { name: "dmsetup", path }).collect();
    initramfs::build(&kernel, &busybox, &programs, &guest, &initramfs)?;

    let mut attached = drives.attach_order();
    if any_verity {
        attached.push(KitDrive {
            name: "hashes".into(),
            path: hashes,
            format: DriveFormat::Raw,
            writable: false,
        });
    }
    if let Some(upper) = &opts.upper {
        // Last: a drive after the kit's others shifts none of them.
        attached.push(upper_drive(upper, true));
    }
    let kit = Kit {
        tag: tag.to_string(),
        form: opts.form,
        kernel_version: kernel.version.clone(),
        vmlinux,
        initramfs,
        qemu: dir.join("qemu.sh"),
        firecracker: None,
        cloud_hypervisor: None,
        drives: attached,
        memory_mb: opts.memory_mb,
    };
    write_configs(kit, &dir)
}

/// What every kit starts with: its directory (absolute), the kernel unpacked into it, and a
/// static busybox.
struct Base {
    dir: PathBuf,
    kernel: Kernel,
    vmlinux: PathBuf,
    busybox: PathBuf,
}

impl Base {
    fn prepare(store: &Store, dir: &Path, opts: &KitOptions) -> Result<Base, VmError> {
        let io = |source| VmError::Io { path: dir.to_owned(), source };
        fs_err::create_dir_all(dir).map_err(io)?;
        let dir = std::path::absolute(dir).map_err(io)?;
        let kernel = Kernel::find(opts.kernel.as_deref())?;
        let busybox = PathBuf::from(BUSYBOX);
        if !is_static(&busybox)? {
            return Err(VmError::NoStaticBusybox(busybox));
        }
        let vmlinux = dir.join("vmlinux");
        link_or_copy(&kernel.vmlinux(store)?, &vmlinux)?;
        Ok(Base { dir, kernel, vmlinux, busybox })
    }
}

/// Writes the kit of `vmrootfs commit` into `dir`: the upper file `upper` as its one drive,
/// read-only, and an initramfs whose `/init` mounts it and streams its `upper/` as a layer tar
/// on the stdout port with `vmrootfs guest-tar`, run from `guest_binary` (the host's vmrootfs,
/// copied without its symbols: the guest unpacks every byte of the initramfs; a `#!` script is
/// copied as it is). `tag` names the image the upper was made over.
pub(crate) fn write_commit(
    store: &Store,
    tag: &str,
    upper: &Path,
    guest_binary: &Path,
    dir: &Path,
    opts: &KitOptions,
) -> Result<Kit, VmError> {
    let Base { dir, kernel, vmlinux, busybox } = Base::prepare(store, dir, opts)?;
    let program = dir.join("vmrootfs");
    if initramfs::is_script(guest_binary)? {
        fs_err::copy(guest_binary, &program)
            .map_err(|source| VmError::Io { path: program.clone(), source })?;
    } else {
        crate::backend::tool::run(
            "strip",
            std::process::Command::new("strip").arg("--strip-all").arg("-o").arg(&program).arg(guest_binary),
        )?;
    }
    let guest = GuestFiles { run: "DRIVES=upper\nLOWERS=0\nCOMMIT=1\n".into(), exec: String::new() };
    let initramfs = dir.join("initramfs.cpio");
    let programs = [GuestProgram { name: "vmrootfs", path: &program }];
    initramfs::build(&kernel, &busybox, &programs, &guest, &initramfs)?;
    let kit = Kit {
        tag: tag.to_string(),
        form: KitForm::Commit,
        kernel_version: kernel.version.clone(),
        vmlinux,
        initramfs,
        qemu: dir.join("qemu.sh"),
        firecracker: None,
        cloud_hypervisor: None,
        drives: vec![upper_drive(upper, false)],
        memory_mb: opts.memory_mb,
    };
    write_configs(kit, &dir)
}

/// The drive `upper`: an ext4 file the guest writes (`run --upper`) or only reads (`commit`).
fn upper_drive(path: &Path, writable: bool) -> KitDrive {
    KitDrive { name: "upper".into(), path: path.to_owned(), format: DriveFormat::Raw, writable }
}

/// Writes `kit`'s runtime configurations into `dir`: `qemu.sh`, and when every drive is a
/// raw file `firecracker.json` and `cloud-hypervisor.sh`.
fn write_configs(mut kit: Kit, dir: &Path) -> Result<Kit, VmError> {
    write_file(&kit.qemu, &super::runtimes::qemu_script(&kit), 0o755)?;
    if kit.drives.iter().all(|d| d.format == DriveFormat::Raw) {
        let fc = dir.join("firecracker.json");
        write_file(&fc, &super::runtimes::firecracker_config(&kit), 0o644)?;
        kit.firecracker = Some(fc);
        let ch = dir.join("cloud-hypervisor.sh");
        write_file(&ch, &super::runtimes::cloud_hypervisor_script(&kit), 0o755)?;
        kit.cloud_hypervisor = Some(ch);
    }
    Ok(kit)
}

/// Writes `text` to `path` with `mode`.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| VmError::Io { path: path.to_owned(), source };
    fs_err::write(path, text).map_err(io)?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// `to` as a hard link of `from` (the store's cached vmlinux), or a copy across filesystems.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), VmError> {
    let io = |source| VmError::Io { path: to.to_owned(), source };
    match fs_err::remove_file(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    // A link fails across filesystems (EXDEV); the copy then reports its own error.
    if fs_err::hard_link(from, to).is_err() {
        fs_err::copy(from, to).map_err(io)?;
    }
    Ok(())
}

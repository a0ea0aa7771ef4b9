//! `vmrootfs run`: boots a stored image in a throw-away QEMU microVM and runs a command in it.
//!
//! `run` writes the image's runtime kit ([`kit`]) into a staging directory of the store and
//! boots it with the kit's own `qemu.sh`, adding only its output ports: what a runtime gets
//! from `vmrootfs kit` is what every `run` boots. Each lower is a read-only virtio-blk drive
//! (`lower<i>`, base = 0); the initramfs loads the modules, finds the drives by
//! position, stacks the lowers with overlayfs under a tmpfs upper and runs the command with
//! the image's env, working directory and user. With `--merged` there is one drive, `merged`:
//! a VMDK descriptor (in the run's staging directory) over the merged blob and the layer
//! blobs ([`crate::export`]), mounted as one read-only EROFS filesystem: the one lower of
//! the same overlayfs with a tmpfs upper (an image without `/dev`, `/proc` or `/sys` needs
//! somewhere to mount them). A stack with more layers than microvm has drive slots
//! ([`MICROVM_DRIVES`]) boots its merged image, else its squashed blob, and says so.
//!
//! The command's output and status never pass through the serial console, which carries only
//! the kernel's and `/init`'s diagnostics: three virtio-serial ports, found by name in the
//! guest, carry the command's stdout (`vmrootfs.stdout`), its stderr (`vmrootfs.stderr`) and the
//! status `/init` writes after it (`vmrootfs.status`). `/init` opens them (`vmrootfs.ports` on the
//! kernel command line says they are there) and removes their
//! device nodes before starting the command, which inherits only stdout and stderr. On the
//! host, QEMU writes stdout and stderr into FIFOs in the run's staging directory, which `run`
//! copies to its stdout and stderr as they come, and the status into a file read once QEMU has
//! exited.
//!
//! The shared store lock is held from reading the record until QEMU has exited, so `rm` and
//! `gc` wait for the guest instead of deleting its drives and staging directory.
//!
//! # dm-verity
//!
//! A lower built with `--verity` is opened in the guest as a dm-verity device before it is
//! mounted: its blob is the data device, and its tree (superblock skipped) sits on one more
//! read-only drive, `hashes`, holding the trees of all such lowers one after another
//! (copied into the kit: one drive, not one per lower). Every block the
//! guest reads is checked against the recorded root digest; a mismatch fails the read (EIO).
//! `/init` then reports the lower on the status port, and `run` fails with
//! [`VmError::Corrupt`] naming it, whatever the command's status.
//!
//! `run --merged` of a `--verity` image whose merged blob has a tree (`build --merge
//! --verity`) attaches no VMDK: the merged blob (serial `merged`) and each layer blob get a
//! drive, all opened through dm-verity, and the merged blob is mounted with the layers' dm
//! devices as `-o device=`. The squashed blob has no tree:
//! `run --squashed` of a `--verity` image is refused ([`VmError::Unverifiable`]), never booted
//! unchecked, and so is `run --merged` when the merged blob (or a lower) has none.
//!
//! # Failures
//!
//! `run` returns the command's status, or an error for a failure of its own (the CLI exits 125
//! for those): a boot that fails, a guest that hangs past the timeout, a corrupt block, and
//! an `/init` that cannot start the command (it writes `failed` instead of a status).

mod cpio;
mod initramfs;
mod kernel;
pub mod kit;
mod runtimes;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::backend::tool::{Tool, ToolError};
use crate::record::ImageRecord;
use crate::store::Store;
use kit::{KitForm, KitOptions, MergedDisk};

/// Why [`run`] failed (not the command: its status is what `run` returns).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// A tool (QEMU, busybox, dmsetup) is missing or failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// No kernel was given and none is installed.
    #[error("no /boot/vmlinuz-* kernel: install one (apt-get install linux-image-amd64) or pass --kernel")]
    NoKernel,
    /// The kernel has no modules installed.
    #[error("kernel {kernel} has no modules in {modules}: install its modules or pass another --kernel")]
    NoModules {
        /// The kernel.
        kernel: PathBuf,
        /// Where its modules should be.
        modules: PathBuf,
    },
    /// The kernel image holds no ELF kernel that could be unpacked.
    #[error("could not unpack an ELF vmlinux from {0}")]
    NoVmlinux(PathBuf),
    /// The busybox found is not statically linked.
    #[error("{0} is not a static busybox: install busybox-static")]
    NoStaticBusybox(PathBuf),
    /// No command given and the image has no entrypoint or cmd.
    #[error("the image has no entrypoint or cmd: give a command after --")]
    NoCommand,
    /// The guest ran past the timeout (with the last console lines).
    #[error("the guest did not finish within {0:?} (last console lines: {1})")]
    Timeout(Duration, String),
    /// The guest stopped without the command's status (with the last console lines).
    #[error("the guest stopped without reporting the command's status (last console lines: {0})")]
    NoStatus(String),
    /// The status the guest wrote is not a number.
    #[error("the guest reported a malformed status {found:?} in {path}")]
    BadStatus {
        /// The status file.
        path: PathBuf,
        /// What it holds.
        found: String,
    },
    /// More layers than a microvm has drive slots, and no merged or squashed blob.
    #[error(
        "{tag} has {layers} layers, more drives than a microvm has slots for ({max}): build it with --merge (EROFS) or --squash, and `run` boots that as one drive"
    )]
    TooManyLayers {
        /// The image's tag.
        tag: String,
        /// Its layers.
        layers: usize,
        /// The drives a microvm takes ([`MICROVM_DRIVES`]).
        max: usize,
    },
    /// `squashed` asked for an image built without `--squash`.
    #[error("{tag} has no squashed blob: build it with --squash")]
    NoSquashed {
        /// The image's tag.
        tag: String,
    },
    /// The upper (`--upper`) cannot be used.
    #[error(transparent)]
    Upper(#[from] Box<crate::upper::UpperError>),
    /// The single disk of `merged` could not be made.
    #[error(transparent)]
    Merge(#[from] crate::merge::MergeError),
    /// A `--verity` image asked for in a form whose blocks the guest cannot check.
    #[error(
        "{tag} is a --verity image, but {form}: it would boot with no dm-verity. Run its layer stack (without {}), whose lowers the guest opens through dm-verity",
        form.flag()
    )]
    Unverifiable {
        /// The image's tag.
        tag: String,
        /// The form that was asked for.
        form: UnverifiableForm,
    },
    /// The guest could not start the command.
    #[error("the guest could not start the command (its /init said why, above)")]
    GuestSetup,
    /// `run --lazy` asked for a form other than the layer stack.
    #[error("--lazy boots the layer stack: --merged and --squashed need the image built into the store")]
    LazyForm,
    /// dm-verity in the guest found blocks that do not match their hashes.
    #[error(
        "dm-verity in the guest found blocks that do not match their hashes in {}: the blob is corrupt (`vmrootfs verify {tag}` rechecks it)",
        .blobs.iter().map(|(d, c, p)| format!("{d} (chain {c}, {})", p.display())).collect::<Vec<_>>().join(", ")
    )]
    Corrupt {
        /// The image's tag.
        tag: String,
        /// Each corrupt drive, with its blob's chain ID and path.
        blobs: Vec<(CorruptDrive, oci_spec::image::Digest, PathBuf)>,
    },
}

/// Why `run --lazy` failed before or after its guest (see [`run_lazy`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyRunError {
    /// The image could not be opened lazily, or its completion failed.
    #[error(transparent)]
    Lazy(#[from] crate::lazy::LazyError),
    /// The registry served blocks that do not match the layer's dm-verity tree: they were
    /// never given to the guest, whose reads of them failed.
    #[error(
        "the registry served blocks that do not match their dm-verity hashes in {}: the guest's reads of them failed (EIO) and nothing unverified was kept",
        .layers.iter().map(|(i, d)| format!("lower {i} (layer {d})")).collect::<Vec<_>>().join(", ")
    )]
    Corrupt {
        /// The image.
        reference: String,
        /// Each such lower: its index (base = 0) and layer digest.
        layers: Vec<(usize, oci_spec::image::Digest)>,
    },
    /// The run failed as a stored one can.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A drive whose dm-verity device in the guest read a block that does not match its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptDrive {
    /// Lower `i` (base = 0).
    Lower(usize),
    /// The merged metadata blob (`run --merged`).
    Merged,
}

impl std::fmt::Display for CorruptDrive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorruptDrive::Lower(i) => write!(f, "lower {i}"),
            CorruptDrive::Merged => f.write_str("the merged blob"),
        }
    }
}

/// A boot form that cannot check a `--verity` image's blocks in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnverifiableForm {
    /// `run --squashed`: the squashed blob has no dm-verity tree.
    Squashed,
    /// `run --merged`: the merged metadata blob has no tree (built without `--verity`).
    Merged,
}

impl UnverifiableForm {
    fn flag(self) -> &'static str {
        match self {
            UnverifiableForm::Squashed => "--squashed",
            UnverifiableForm::Merged => "--merged",
        }
    }
}

impl std::fmt::Display for UnverifiableForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnverifiableForm::Squashed => "its squashed blob (run --squashed) has no dm-verity tree",
            UnverifiableForm::Merged => {
                "its merged blob (run --merged) has no dm-verity tree (build it with --merge --verity)"
            }
        })
    }
}

/// Names of the guest's virtio-serial ports (`/sys/class/virtio-ports/*/name`).
pub(crate) const PORT_STDOUT: &str = "vmrootfs.stdout";
pub(crate) const PORT_STDERR: &str = "vmrootfs.stderr";
pub(crate) const PORT_STATUS: &str = "vmrootfs.status";

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// bzImage to boot [default: the newest /boot/vmlinuz-*].
    pub kernel: Option<PathBuf>,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Longest the guest may run before it is killed.
    pub timeout: Duration,
    /// The command; empty means the image's entrypoint + cmd.
    pub command: Vec<String>,
    /// Boot the squashed blob instead of the layer stack.
    pub squashed: bool,
    /// Boot the merged image through one drive (a VMDK over the stored blobs), its one lower.
    pub merged: bool,
    /// The guest's writable layer: an ext4 file kept between runs ([`crate::upper`]), made
    /// with `upper_size` bytes nominal when missing; none: a tmpfs.
    pub upper: Option<PathBuf>,
    /// Nominal size of an upper made now.
    pub upper_size: u64,
}

/// Drives a microvm can take: its 24 virtio-mmio transports, less the virtio-serial device
/// and the `hashes` drive of dm-verity lowers.
pub const MICROVM_DRIVES: usize = 22;

/// What `run` boots.
struct BootForm {
    merged: bool,
    squashed: bool,
    /// The layer stack was asked for, but has more layers than drive slots.
    switched: bool,
}

impl BootForm {
    /// The form `opts` asks for; a layer stack deeper than [`MICROVM_DRIVES`] boots its merged
    /// image, else its squashed blob, else is refused saying how to make one.
    fn choose(tag: &str, record: &ImageRecord, opts: &RunOptions) -> Result<BootForm, VmError> {
        let asked = BootForm { merged: opts.merged, squashed: opts.squashed, switched: false };
        if opts.merged || opts.squashed || record.lowers.len() <= MICROVM_DRIVES {
            return Ok(asked);
        }
        match (&record.merged, &record.squashed) {
            (Some(_), _) => Ok(BootForm { merged: true, squashed: false, switched: true }),
            (None, Some(_)) => Ok(BootForm { merged: false, squashed: true, switched: true }),
            (None, None) => Err(VmError::TooManyLayers {
                tag: tag.to_string(),
                layers: record.lowers.len(),
                max: MICROVM_DRIVES,
            }),
        }
    }
}

/// Boots the image tagged `tag` and runs the command; its stdout goes to `out`, its stderr to
/// `err`. Returns its exit status. Holds the shared store lock until the guest has ended.
pub fn run(
    store: &Store,
    tag: &str,
    opts: &RunOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, VmError> {
    // Before reading the record: `rm` must not remove the tag between here and the boot.
    let _store_lock = store.lock_shared()?;
    let record = store.get(tag)?;
    let form = BootForm::choose(tag, &record, opts)?;
    // Held (locked) until the guest has ended.
    let upper = match &opts.upper {
        Some(path) => {
            Some(crate::upper::Upper::for_run(path, opts.upper_size, tag, &record).map_err(Box::new)?)
        }
        None => None,
    };
    if form.switched {
        crate::progress::info(&format!(
            "{tag}: {} layers need more drives than microvm's {} virtio-mmio slots: booting the {} image as one drive instead",
            record.lowers.len(),
            MICROVM_DRIVES,
            if form.merged { "merged" } else { "squashed" }
        ));
    }
    // The kit's qemu.sh runs the QEMU of PATH: the one checked here.
    Tool::find("qemu-system-x86_64", "qemu-system-x86", &["--version"], "7.2")?;
    // The kit is made afresh for each run, from the files it holds: naming a cached copy by
    // the content of its inputs would mean reading all of them, which is most of the work.
    let staging = store.staging("vm-")?;
    let kit_opts = KitOptions {
        kernel: opts.kernel.clone(),
        memory_mb: opts.memory_mb,
        form: if form.merged {
            KitForm::Merged
        } else if form.squashed {
            KitForm::Squashed
        } else {
            KitForm::Stack
        },
        merged_disk: MergedDisk::QemuVmdk,
        command: opts.command.clone(),
        served_lowers: None,
        upper: upper.as_ref().map(|u| u.path().to_owned()),
    };
    let kit = kit::write_record(store, tag, &record, staging.path(), &kit_opts)?;
    let status = boot(&kit, staging.path(), opts.timeout, out, err);
    if let Some(upper) = &upper {
        upper.sync().map_err(Box::new)?;
    }
    let (status, status_file) = status?;
    if !status.corrupt.is_empty() {
        let located = store.locate(record)?;
        let blob = |d: CorruptDrive| match d {
            CorruptDrive::Lower(i) => located.lowers.get(i).map(|l| (d, l.chain_id.clone(), l.path.clone())),
            CorruptDrive::Merged => located.merged.as_ref().map(|m| (d, m.chain_id.clone(), m.path.clone())),
        };
        // A drive this run did not attach: the guest's report is not to be believed.
        let blobs = status.corrupt.iter().map(|&d| blob(d)).collect::<Option<Vec<_>>>().ok_or_else(|| {
            VmError::BadStatus { path: status_file.clone(), found: format!("corrupt {:?}", status.corrupt) }
        })?;
        return Err(VmError::Corrupt { tag: tag.to_string(), blobs });
    }
    status.code.ok_or(VmError::GuestSetup)
}

/// Boots `kit` (written into `staging`) with its output ports: the guest's stdout goes to
/// `out`, its stderr to `err`, as they come. Returns the status `/init` reported, and the file
/// it is in.
pub(crate) fn boot(
    kit: &kit::Kit,
    staging: &Path,
    timeout: Duration,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(GuestStatus, PathBuf), VmError> {
    // The kit's own QEMU command line, and the ports that carry the command's output and
    // status out of band.
    let mut cmd = std::process::Command::new("sh");
    cmd.arg(&kit.qemu).env("VMROOTFS_APPEND", "vmrootfs.ports");
    let stdout_fifo = Fifo::create(&staging.join("stdout"))?;
    let stderr_fifo = Fifo::create(&staging.join("stderr"))?;
    let status_file = staging.join("status");
    cmd.args(["-device", "virtio-serial-device"]);
    for (id, path, name) in [
        ("out", &stdout_fifo.path, PORT_STDOUT),
        ("err", &stderr_fifo.path, PORT_STDERR),
        ("status", &status_file, PORT_STATUS),
    ] {
        cmd.arg("-chardev")
            .arg(format!("file,id={id},path={}", qemu_opt(path)))
            .arg("-device")
            .arg(format!("virtserialport,chardev={id},name={name}"));
    }
    crate::progress::debug(&format!("running {cmd:?}"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ToolError::Spawn { tool: kit.qemu.display().to_string(), source })?;
    let tail = follow(child, timeout, [stdout_fifo, stderr_fifo], &status_file, out, err)?;
    let status = read_status(&status_file, tail)?;
    Ok((status, status_file))
}

/// How `run --lazy` completes the image once the command has exited.
#[derive(Debug, Clone, Default)]
pub enum Completion {
    /// In this process, before [`run_lazy`] returns (`run --lazy --wait`).
    #[default]
    Wait,
    /// In a detached `PROGRAM lazy-complete REF`, the CLI's own binary, which takes over the
    /// caches while [`run_lazy`] returns (see [`crate::lazy::completer`]).
    Detached(PathBuf),
}

/// Options of `run --lazy` besides [`RunOptions`].
#[derive(Debug, Clone, Default)]
pub struct LazyOptions {
    /// How to reach the registry.
    pub registry: crate::RegistryOptions,
    /// Bytes per second background completion may take while the guest runs (0: no limit).
    pub background_rate: u64,
    /// Where to write what was fetched when (JSON; the bytes-fetched curve), if anywhere.
    pub fetch_log: Option<PathBuf>,
    /// Who completes the image after the command.
    pub completion: Completion,
    /// The tag to record the image under [default: the reference] (a lazy record's, whose
    /// reference is the pinned source).
    pub tag: Option<String>,
}

/// What `--fetch-log` writes.
#[derive(serde::Serialize)]
struct FetchLog {
    reference: String,
    /// Data bytes of all lowers.
    data_bytes: u64,
    /// Data bytes fetched when the command's status came.
    fetched_before_exit: u64,
    /// Seconds from opening the image to the command's status.
    exited_at: f64,
    fetches: Vec<crate::lazy::Fetch>,
}

/// Boots the EROFS image `reference` straight from its registry (pushed uncompressed with
/// `--verity`), its lowers served by vmrootfs over NBD as the guest reads them
/// ([`crate::lazy`]); runs the command like [`run`]. The rest of the layers arrives in the
/// background within `lazy.background_rate`, at full speed once the command has exited (here,
/// or in a detached completer that takes over: `lazy.completion`); then the blobs are
/// published and the image recorded as `reference`, as `build` would; a reference recorded
/// already boots from the store, as [`run`] does, and one being completed by another run's
/// completer waits for it. A block
/// the registry serves that fails verification fails the guest's read and the run, naming
/// the lower. Holds the shared store lock throughout.
pub fn run_lazy(
    store: &Store,
    reference: &str,
    opts: &RunOptions,
    lazy: &LazyOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, LazyRunError> {
    if opts.squashed || opts.merged {
        return Err(VmError::LazyForm.into());
    }
    let tag = lazy.tag.as_deref().unwrap_or(reference);
    // An image a lazy run (or a build) has stored already boots from the store: recorded only
    // once all its blobs were published.
    match store.get(tag) {
        Ok(_) => return Ok(run(store, tag, opts, out, err)?),
        Err(crate::store::StoreError::NoSuchTag(_) | crate::store::StoreError::Lazy(_)) => {}
        Err(e) => return Err(VmError::from(e).into()),
    }
    let _store_lock = store.lock_shared().map_err(VmError::from)?;
    Tool::find("qemu-system-x86_64", "qemu-system-x86", &["--version"], "7.2").map_err(VmError::from)?;
    let mut image = crate::lazy::open(store, reference, &lazy.registry, &crate::Platform::host())?;
    // Opening waited for the caches held by another run's completion, which may have recorded it.
    if store.get(tag).is_ok() {
        image.discard()?;
        return Ok(run(store, tag, opts, out, err)?);
    }
    if image.lowers().len() > MICROVM_DRIVES {
        let e = VmError::TooManyLayers {
            tag: reference.to_string(),
            layers: image.lowers().len(),
            max: MICROVM_DRIVES,
        };
        return Err(e.into());
    }
    let staging = store.staging("vm-").map_err(VmError::from)?;
    let socket = staging.path().join("nbd.sock");
    let exports = image
        .lowers()
        .iter()
        .enumerate()
        .map(|(i, b)| crate::lazy::nbd::Export { name: format!("lower{i}"), source: b.clone() })
        .collect();
    let mut server = crate::lazy::nbd::NbdServer::start(&socket, exports)
        .map_err(|source| VmError::Io { path: socket.clone(), source })?;
    image.start_background(crate::lazy::Share::new(lazy.background_rate));
    let kit_opts = KitOptions {
        kernel: opts.kernel.clone(),
        memory_mb: opts.memory_mb,
        form: KitForm::Stack,
        merged_disk: MergedDisk::QemuVmdk,
        command: opts.command.clone(),
        served_lowers: None,
        // An upper is bound to a stored image: `--upper` with `--lazy` is refused by the CLI.
        upper: None,
    };
    let kit = kit::write_lazy(store, reference, &image, &socket, staging.path(), &kit_opts)?;
    let booted = boot(&kit, staging.path(), opts.timeout, out, err);
    server.stop();
    let fetched = image.fetched_bytes();
    let exited_at = image.elapsed();
    crate::progress::info(&format!(
        "lazy: {} of {} bytes ({:.1}%) fetched before the command exited",
        fetched,
        image.data_bytes(),
        100.0 * fetched as f64 / image.data_bytes().max(1) as f64
    ));
    if let Some(path) = &lazy.fetch_log {
        let log = FetchLog {
            reference: reference.to_string(),
            data_bytes: image.data_bytes(),
            fetched_before_exit: fetched,
            exited_at,
            fetches: image.fetch_log(),
        };
        let text = serde_json::to_vec_pretty(&log).expect("a fetch log serializes");
        fs_err::write(path, text).map_err(|source| VmError::Io { path: path.clone(), source })?;
    }
    let corrupt = image.corrupt_layers();
    if !corrupt.is_empty() {
        return Err(LazyRunError::Corrupt { reference: reference.to_string(), layers: corrupt });
    }
    let (status, _) = booted?;
    // The guest's dm-verity checks bytes the host proved already: a report from it means a
    // drive other than the ones served, not to be believed.
    if !status.corrupt.is_empty() {
        let found = format!("corrupt {:?}", status.corrupt);
        return Err(VmError::BadStatus { path: staging.path().join("status"), found }.into());
    }
    let code = status.code.ok_or(VmError::GuestSetup)?;
    match &lazy.completion {
        Completion::Wait => {
            image.complete(store, Some(tag), &crate::progress::Reporter::new())?;
        }
        Completion::Detached(program) => {
            let handed = crate::lazy::completer::hand_over(store, tag, &lazy.registry, program, image)?;
            if let Some(pid) = handed {
                crate::progress::info(&format!(
                    "lazy: the rest of {tag} is completing in the background (pid {pid}, log {})",
                    crate::lazy::completer::log_path(store, tag).display()
                ));
            }
        }
    }
    Ok(code)
}

/// A path as a QEMU option value (a `,` is written `,,`).
fn qemu_opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// A FIFO QEMU writes a guest stream into (a `-chardev file`), open for reading on the host.
struct Fifo {
    path: PathBuf,
    reader: fs_err::File,
    /// Our own write end: the reader sees no end of file before QEMU has opened the FIFO,
    /// only once QEMU has exited and this is dropped.
    writer: fs_err::File,
}

impl Fifo {
    fn create(path: &Path) -> Result<Fifo, VmError> {
        use fs_err::os::unix::fs::OpenOptionsExt;
        let io = |source| VmError::Io { path: path.to_owned(), source };
        let mode = rustix::fs::Mode::from_raw_mode(0o600);
        rustix::fs::mknodat(rustix::fs::CWD, path, rustix::fs::FileType::Fifo, mode, 0)
            .map_err(|e| io(e.into()))?;
        // Opening for reading blocks until there is a writer, and for writing until there is
        // a reader: open the read end non-blocking first, then make it blocking again.
        let reader =
            fs_err::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?;
        let writer = fs_err::OpenOptions::new().write(true).open(path).map_err(io)?;
        rustix::io::ioctl_fionbio(&reader, false).map_err(|e| io(e.into()))?;
        Ok(Fifo { path: path.to_owned(), reader, writer })
    }
}

/// What the threads that read QEMU's outputs report.
enum Event {
    /// A line of the serial console (QEMU's stdout) or of QEMU's own stderr.
    Console(String),
    /// QEMU closed its stdout: it has exited.
    ConsoleClosed,
    /// Bytes the command wrote to its stdout (0) or stderr (1).
    Stream(usize, Vec<u8>),
    /// One of the streams ended.
    StreamClosed,
}

/// How long a guest that has reported the command's final status gets to power off by itself
/// before QEMU is ended: the status is all `run` waits for, and a guest kernel slow or stuck
/// in its shutdown must not turn a finished command into a timeout.
const POWER_OFF_GRACE: Duration = Duration::from_secs(2);
/// How often the status file is looked at while the guest runs.
const STATUS_POLL: Duration = Duration::from_millis(200);

/// Passes the command's output on until QEMU exits, the guest has reported its final status
/// and had [`POWER_OFF_GRACE`] to power off, or `timeout` passes; then ends QEMU and copies
/// what is left of the output. Returns the last console lines.
fn follow(
    mut child: Child,
    timeout: Duration,
    streams: [Fifo; 2],
    status_file: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<String, VmError> {
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<Event>();
    let tx_console = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(mut line) = line else { break };
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if tx_console.send(Event::Console(String::from_utf8_lossy(&line).into_owned())).is_err() {
                break;
            }
        }
        let _ = tx_console.send(Event::ConsoleClosed);
    });
    let tx_qemu = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_qemu.send(Event::Console(format!("qemu: {line}")));
        }
    });
    let mut writers = Vec::new();
    for (i, fifo) in streams.into_iter().enumerate() {
        let Fifo { mut reader, writer, .. } = fifo;
        writers.push(writer);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0; 64 * 1024];
            // A read error ends the stream like its end does; the status still comes.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx.send(Event::Stream(i, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            let _ = tx.send(Event::StreamClosed);
        });
    }
    drop(tx);
    let mut sinks: [&mut dyn Write; 2] = [out, err];
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    let mut tail: Vec<String> = Vec::new();
    let mut open_streams = 2;
    let mut status_seen: Option<Instant> = None;
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(VmError::Timeout(timeout, tail.join(" | ")));
        }
        if status_seen.is_none() && has_final_status(status_file) {
            status_seen = Some(Instant::now());
        }
        if status_seen.is_some_and(|seen| seen.elapsed() >= POWER_OFF_GRACE) {
            crate::progress::debug(&format!(
                "the guest reported its status but did not power off within {POWER_OFF_GRACE:?}: ending QEMU"
            ));
            break Ok(tail.join(" | "));
        }
        match rx.recv_timeout(left.min(STATUS_POLL)) {
            Ok(Event::Console(line)) => {
                if line == "VMROOTFS-BEGIN" {
                    crate::progress::debug(&format!(
                        "guest ready after {:.2}s",
                        started.elapsed().as_secs_f64()
                    ));
                }
                crate::progress::debug(&format!("console: {line}"));
                tail.push(line);
                if tail.len() > 8 {
                    tail.remove(0);
                }
            }
            Ok(Event::ConsoleClosed) => break Ok(tail.join(" | ")),
            Ok(event) => on_stream(&mut sinks, event, &mut open_streams),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(tail.join(" | ")),
        }
    };
    // Killing an exited QEMU fails harmlessly; waiting reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
    // QEMU's write ends are closed now; with ours gone the readers reach the end.
    drop(writers);
    while open_streams > 0 {
        match rx.recv() {
            Ok(event) => on_stream(&mut sinks, event, &mut open_streams),
            Err(_) => break,
        }
    }
    result
}

/// Copies a chunk of the command's output to our stdout or stderr; counts ended streams.
fn on_stream(sinks: &mut [&mut dyn Write; 2], event: Event, open: &mut usize) {
    match event {
        // A closed stdout or stderr of ours must not stop the guest: its status still counts.
        Event::Stream(i, bytes) => {
            let _ = sinks[i].write_all(&bytes);
            let _ = sinks[i].flush();
        }
        Event::StreamClosed => *open -= 1,
        Event::Console(_) | Event::ConsoleClosed => {}
    }
}

/// What `/init` wrote to its status port (see [`initramfs`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct GuestStatus {
    /// The command's exit status; none when `/init` failed before it started the command.
    pub(crate) code: Option<i32>,
    /// Drives whose dm-verity device found a corrupt block.
    pub(crate) corrupt: Vec<CorruptDrive>,
}

/// Whether `/init` has written its last status line (the exit status or `failed`, after any
/// `corrupt` lines) to the status file: nothing more comes from the guest after it.
fn has_final_status(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.ends_with('\n') && parse_status(&text).is_some())
}

/// The status `/init` wrote to its port; none means the guest stopped before the command ended.
fn read_status(path: &Path, console_tail: String) -> Result<GuestStatus, VmError> {
    let text =
        fs_err::read_to_string(path).map_err(|source| VmError::Io { path: path.to_owned(), source })?;
    if text.trim().is_empty() {
        return Err(VmError::NoStatus(console_tail));
    }
    parse_status(&text)
        .ok_or_else(|| VmError::BadStatus { path: path.to_owned(), found: text.trim().to_string() })
}

/// `corrupt <i>` / `corrupt merged` lines, then the exit status or `failed`; anything else
/// is malformed.
fn parse_status(text: &str) -> Option<GuestStatus> {
    let mut lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let code = match lines.pop()? {
        "failed" => None,
        code => Some(code.parse().ok()?),
    };
    let corrupt = lines
        .iter()
        .map(|l| match l.strip_prefix("corrupt ")? {
            "merged" => Some(CorruptDrive::Merged),
            i => i.parse().ok().map(CorruptDrive::Lower),
        })
        .collect::<Option<Vec<_>>>()?;
    Some(GuestStatus { code, corrupt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_last_status_line_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        for (text, fin) in
            [("", false), ("corrupt 1\n", false), ("3", false), ("3\n", true), ("corrupt 0\nfailed\n", true)]
        {
            std::fs::write(&path, text).unwrap();
            assert_eq!(has_final_status(&path), fin, "{text:?}");
        }
        assert!(!has_final_status(&dir.path().join("missing")));
    }

    #[test]
    fn status_port_lines() {
        assert_eq!(parse_status("3\n"), Some(GuestStatus { code: Some(3), corrupt: vec![] }));
        assert_eq!(
            parse_status("corrupt 2\ncorrupt 0\n1\n"),
            Some(GuestStatus {
                code: Some(1),
                corrupt: vec![CorruptDrive::Lower(2), CorruptDrive::Lower(0)]
            })
        );
        assert_eq!(
            parse_status("corrupt 1\ncorrupt merged\nfailed\n"),
            Some(GuestStatus { code: None, corrupt: vec![CorruptDrive::Lower(1), CorruptDrive::Merged] })
        );
        assert_eq!(parse_status("corrupt x\n1\n"), None);
        assert_eq!(parse_status("hello\n"), None);
        assert_eq!(parse_status("1\ncorrupt 2\n"), None);
    }
}

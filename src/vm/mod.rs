//! `vmrootfs run`: boots a stored image in a throw-away QEMU microVM and runs a command in it.
//!
//! Each lower is a read-only virtio-blk drive whose serial is `lower<i>` (base = 0); the
//! initramfs ([`initramfs`]) loads the modules, mounts the lowers by serial, stacks them with
//! overlayfs under a tmpfs upper and runs the command with the image's env, working
//! directory and user. The guest prints `VMROOTFS-BEGIN` before the command and
//! `VMROOTFS-EXIT <status>` after it on the serial console; what is in between is the
//! command's output (stdout and stderr, merged by the console).

mod cpio;
pub mod initramfs;
pub mod kernel;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::backend::tool::{Tool, ToolError};
use crate::record::ImageRecord;
use crate::store::Store;
use kernel::Kernel;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no /boot/vmlinuz-* kernel: install one (apt-get install linux-image-amd64) or pass --kernel")]
    NoKernel,
    #[error("kernel {kernel} has no modules in {modules}: install its modules or pass another --kernel")]
    NoModules { kernel: PathBuf, modules: PathBuf },
    #[error("could not unpack an ELF vmlinux from {0}")]
    NoVmlinux(PathBuf),
    #[error("{0} is not a static busybox: install busybox-static")]
    NoStaticBusybox(PathBuf),
    #[error("the image has no entrypoint or cmd: give a command after --")]
    NoCommand,
    #[error("the guest did not finish within {0:?} (last console lines: {1})")]
    Timeout(Duration, String),
    #[error("the guest stopped without reporting the command's status (last console lines: {0})")]
    NoStatus(String),
}

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// bzImage to boot [default: the newest /boot/vmlinuz-*].
    pub kernel: Option<PathBuf>,
    pub memory_mb: u32,
    pub timeout: Duration,
    /// The command; empty means the image's entrypoint + cmd.
    pub command: Vec<String>,
    /// Boot the squashed blob instead of the layer stack.
    pub squashed: bool,
}

const BUSYBOX: &str = "/bin/busybox";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Shell single-quoting.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `/proc/cpuinfo`'s MHz as kHz, for `tsc_early_khz` (TCG timer calibration hangs otherwise).
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

/// KVM only when /dev/kvm is usable and the CPU shows hardware virtualization: on these
/// machines /dev/kvm is a PVM device on which a stock kernel never boots.
fn kvm_usable() -> bool {
    let rw = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    rw && flags.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
}

fn is_static(path: &Path) -> Result<bool, VmError> {
    let bytes = fs_err::read(path).map_err(|source| VmError::Io { path: path.to_owned(), source })?;
    let head = &bytes[..bytes.len().min(8192)];
    Ok(bytes.starts_with(b"\x7fELF") && !head.windows(8).any(|w| w == b"ld-linux"))
}

/// The per-run part of the initramfs: `/vmrootfs/run` (what to mount) and
/// `/vmrootfs/exec.sh` (how to start the command inside the image).
fn run_files(record: &ImageRecord, lowers: &[(PathBuf, String)], command: &[String]) -> (String, String) {
    let mut run = format!("LOWERS={}\n", lowers.len());
    for (i, (_, fs)) in lowers.iter().enumerate() {
        run += &format!("FS{i}={fs}\n");
    }
    let c = &record.config;
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
    (run, exec)
}

/// Boots `record` and runs the command; its output goes to `out`. Returns its exit status.
pub fn run(
    store: &Store,
    record: &ImageRecord,
    opts: &RunOptions,
    out: &mut dyn Write,
) -> Result<i32, VmError> {
    let qemu = Tool::find("qemu-system-x86_64", "qemu-system-x86", &["--version"], "7.2")?;
    let kernel = Kernel::find(opts.kernel.as_deref())?;
    let vmlinux = kernel.vmlinux(store)?;
    let busybox = Path::new(BUSYBOX);
    if !is_static(busybox)? {
        return Err(VmError::NoStaticBusybox(busybox.to_owned()));
    }
    // The initramfs is made afresh for each run, from the files it holds: naming a cached copy
    // by the content of its inputs would mean reading all of them, which is most of the work.
    let staging = store.staging("vm-")?;
    let base = staging.path().join("base.cpio");
    initramfs::build(&kernel, busybox, &base)?;
    let located = store.locate(record.clone())?;
    let lowers: Vec<(PathBuf, String)> = match (&located.squashed, opts.squashed) {
        (Some(s), true) => vec![(s.path.clone(), s.fs.to_string())],
        _ => located.lowers.iter().map(|l| (l.path.clone(), l.fs.to_string())).collect(),
    };
    let command = if opts.command.is_empty() {
        [record.config.entrypoint.clone(), record.config.cmd.clone()].concat()
    } else {
        opts.command.clone()
    };
    if command.is_empty() {
        return Err(VmError::NoCommand);
    }
    // initramfs = the base archive + a small one with this run's settings.
    let initrd = staging.path().join("initrd.cpio");
    let mut bytes = fs_err::read(&base).map_err(|source| VmError::Io { path: base.clone(), source })?;
    let mut extra = cpio::CpioWriter::new(Vec::new());
    let (run_vars, exec) = run_files(record, &lowers, &command);
    let io = |source| VmError::Io { path: initrd.clone(), source };
    extra.file("vmrootfs/run", 0o644, run_vars.as_bytes()).map_err(io)?;
    extra.file("vmrootfs/exec.sh", 0o644, exec.as_bytes()).map_err(io)?;
    bytes.extend(extra.finish().map_err(|source| VmError::Io { path: initrd.clone(), source })?);
    fs_err::write(&initrd, &bytes).map_err(|source| VmError::Io { path: initrd.clone(), source })?;

    let mut append = String::from("console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init");
    let mut cmd = qemu.command();
    if kvm_usable() {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "max"]);
        if let Some(khz) = host_tsc_khz() {
            append += &format!(" tsc_early_khz={khz}");
        }
    }
    cmd.args(["-M", "microvm,acpi=on", "-m"]).arg(opts.memory_mb.to_string()).args([
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ]);
    let qboot = Path::new("/usr/share/qemu/qboot.rom");
    if qboot.exists() {
        cmd.arg("-bios").arg(qboot);
    }
    cmd.arg("-kernel").arg(&vmlinux).arg("-initrd").arg(&initrd).arg("-append").arg(&append);
    for (i, (path, _)) in lowers.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!("id=l{i},file={},format=raw,if=none,readonly=on", path.display()))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive=l{i},serial=lower{i}"));
    }
    crate::progress::debug(&format!("running {cmd:?}"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ToolError::Spawn { tool: "qemu-system-x86_64".into(), source })?;
    let status = follow_console(child, opts.timeout, out)?;
    drop(staging);
    Ok(status)
}

/// Reads the serial console until `VMROOTFS-EXIT`, passing the command's output on.
fn follow_console(mut child: Child, timeout: Duration, out: &mut dyn Write) -> Result<i32, VmError> {
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(mut line) = line else { break };
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if tx.send(Some(String::from_utf8_lossy(&line).into_owned())).is_err() {
                break;
            }
        }
        let _ = tx.send(None);
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send(Some(format!("qemu: {line}")));
        }
    });
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    let mut in_command = false;
    let mut tail: Vec<String> = Vec::new();
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(line)) => {
                if let Some(code) = line.strip_prefix("VMROOTFS-EXIT ") {
                    break Ok(code.trim().parse().unwrap_or(125));
                }
                if line == "VMROOTFS-BEGIN" {
                    crate::progress::debug(&format!(
                        "guest ready after {:.2}s",
                        started.elapsed().as_secs_f64()
                    ));
                    in_command = true;
                    continue;
                }
                if in_command && !line.starts_with("qemu: ") {
                    let _ = writeln!(out, "{line}");
                } else {
                    crate::progress::debug(&format!("console: {line}"));
                    tail.push(line);
                    if tail.len() > 8 {
                        tail.remove(0);
                    }
                }
            }
            Ok(None) => break Err(VmError::NoStatus(tail.join(" | "))),
            Err(_) => break Err(VmError::Timeout(timeout, tail.join(" | "))),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = out.flush();
    result
}

//! The guest's initramfs: the host's static busybox, the kernel modules the stack needs (with
//! their dependencies, in load order) and an `/init` that mounts the lowers by virtio serial,
//! stacks them under a tmpfs upper and runs the command, its stdout, stderr and status each on
//! its own virtio-serial port (see [`super`]).

use std::collections::BTreeSet;
use std::path::Path;

use super::VmError;
use super::cpio::CpioWriter;
use super::kernel::Kernel;

/// Modules the guest loads, in this order; each after its dependencies.
/// (`loop`: for a merged image on a kernel before 6.4, see `/init`.)
const MODULES: &[&str] =
    &["virtio_mmio", "virtio_blk", "virtio_console", "crc32c_generic", "ext4", "erofs", "overlay", "loop"];

/// The `/init` script. A second cpio the host writes per run holds `/vmrootfs/run` (sets
/// `LOWERS` and `FS<i>`, or `MERGED` and `MERGED_OFFSETS`; and `USERSPEC`) and
/// `/vmrootfs/exec.sh` (runs the command in the image).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" 2>/dev/null; done
. /vmrootfs/run
# Until the ports are open a failure shows only on the console: the host then reports that the
# guest stopped without a status, with the last console lines.
fail() { echo "vmrootfs-init: $*" >&2; reboot -f; }
# The /dev node of the virtio-serial port named $1.
port() {
  for t in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && [ -c "/dev/${p##*/}" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    sleep 0.1
  done
  return 1
}
out=$(port vmrootfs.stdout) || fail "no virtio port vmrootfs.stdout"
err=$(port vmrootfs.stderr) || fail "no virtio port vmrootfs.stderr"
st=$(port vmrootfs.status) || fail "no virtio port vmrootfs.status"
# Only /init holds the ports: the command inherits stdout (3) and stderr (4), never the status (5).
exec 3>"$out" 4>"$err" 5>"$st"
rm -f "$out" "$err" "$st"
fail() { echo "vmrootfs-init: $*" >&4; echo 125 >&5; reboot -f; }
# Disks by virtio serial (lower0 = base), never by order.
disk() {
  for t in 1 2 3 4 5 6 7 8 9 10; do
    for b in /sys/block/vd*; do
      [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${b##*/}"; return 0; }
    done
    sleep 0.1
  done
  return 1
}
mkdir -p /newroot
if [ -n "$MERGED" ]; then
  # One disk: the merged metadata, then the layer images. A kernel >= 6.4 maps the layers by
  # the device table alone; an older one needs a device per layer: a read-only loop device
  # over the layer's part of the disk. The root stays read-only (no overlayfs).
  dev=$(disk merged) || fail "no disk with serial merged"
  if mount -t erofs -o ro "$dev" /newroot 2>/dev/null; then
    echo "vmrootfs-init: merged image mounted from $dev alone"
  else
    opts=ro
    for off in $MERGED_OFFSETS; do
      l=$(losetup -f) && losetup -r -o "$off" "$l" "$dev" || fail "losetup $dev at $off"
      opts="$opts,device=$l"
    done
    mount -t erofs -o "$opts" "$dev" /newroot || fail "mount $dev ($opts)"
    echo "vmrootfs-init: merged image mounted from $dev with loop devices at its layers"
  fi
else
  lowerdir=""
  i=0
  while [ "$i" -lt "$LOWERS" ]; do
    dev=$(disk "lower$i") || fail "no disk with serial lower$i"
    mkdir -p "/lower/$i"
    eval fs=\$FS$i
    mount -t "$fs" -o ro "$dev" "/lower/$i" || fail "mount $dev ($fs)"
    lowerdir="/lower/$i${lowerdir:+:$lowerdir}"
    i=$((i + 1))
  done
  mount -t tmpfs -o mode=0755 rw /rw
  mkdir -p /rw/upper /rw/work
  mount -t overlay overlay -o "lowerdir=$lowerdir,upperdir=/rw/upper,workdir=/rw/work" /newroot || fail "overlay"
fi
# The image may have no shell: the command starts through busybox kept in the guest's /dev.
mkdir -p /dev/.vmrootfs && cp /bin/busybox /dev/.vmrootfs/busybox
for d in proc sys dev; do mkdir -p "/newroot/$d" && mount --bind "/$d" "/newroot/$d"; done
# OCI user: uid, uid:gid, name or name:group, resolved in the image's /etc/passwd and /etc/group.
setpriv=""
if [ -n "$USERSPEC" ]; then
  u=${USERSPEC%%:*}; g=""; case $USERSPEC in *:*) g=${USERSPEC#*:};; esac
  pw=$(grep -E "^([^:]*:){2}$u:|^$u:" /newroot/etc/passwd 2>/dev/null | head -n1)
  case $u in *[!0-9]*) uid=$(echo "$pw" | cut -d: -f3);; *) uid=$u;; esac
  case $g in
    "") gid=$(echo "$pw" | cut -d: -f4);;
    *[!0-9]*) gid=$(grep "^$g:" /newroot/etc/group 2>/dev/null | cut -d: -f3);;
    *) gid=$g;;
  esac
  case "$uid:${gid:-0}" in *[!0-9:]*|:*) fail "unknown user $USERSPEC";; esac
  # Debian's busybox setpriv cannot change ids; start-stop-daemon -c can (and execs in place).
  setpriv="/dev/.vmrootfs/busybox start-stop-daemon -S -c $uid:${gid:-0} -x"
fi
echo "$setpriv" > /dev/.vmrootfs/setpriv
cp /vmrootfs/exec.sh /dev/.vmrootfs/exec.sh
echo VMROOTFS-BEGIN
chroot /newroot /dev/.vmrootfs/busybox sh /dev/.vmrootfs/exec.sh >&3 2>&4 3>&- 4>&- 5>&-
status=$?
exec 3>&- 4>&-
echo "$status" >&5
exec 5>&-
sync
reboot -f
"#;

/// Writes the initramfs for `kernel` to `out`.
pub fn build(kernel: &Kernel, busybox: &Path, out: &Path) -> Result<(), VmError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmError::Io { path, source }
    };
    let mut cpio = CpioWriter::new(Vec::new());
    let w = |r: std::io::Result<()>| r.map_err(io(out));
    for d in ["bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules", "vmrootfs"] {
        w(cpio.dir(d))?;
    }
    let bb = fs_err::read(busybox).map_err(io(busybox))?;
    w(cpio.file("bin/busybox", 0o755, &bb))?;
    w(cpio.symlink("bin/sh", "busybox"))?;
    w(cpio.file("init", 0o755, INIT.as_bytes()))?;
    let order = module_order(&kernel.modules)?;
    let mut names = Vec::new();
    for rel in &order {
        let path = kernel.modules.join(rel);
        let data = fs_err::read(&path).map_err(io(&path))?;
        let name = rel.rsplit('/').next().unwrap_or(rel).to_string();
        w(cpio.file(&format!("modules/{name}"), 0o644, &data))?;
        names.push(name);
    }
    w(cpio.file("modules.order", 0o644, (names.join("\n") + "\n").as_bytes()))?;
    let bytes = cpio.finish().map_err(io(out))?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    fs_err::write(&tmp, bytes).map_err(io(&tmp))?;
    fs_err::rename(&tmp, out).map_err(io(out))
}

/// The module files for [`MODULES`] and their dependencies, dependencies first.
fn module_order(modules: &Path) -> Result<Vec<String>, VmError> {
    let dep_path = modules.join("modules.dep");
    let text =
        fs_err::read_to_string(&dep_path).map_err(|source| VmError::Io { path: dep_path.clone(), source })?;
    let deps: Vec<(String, Vec<String>)> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.to_string(), d.split_whitespace().map(str::to_string).collect()))
        .collect();
    let find = |name: &str| {
        deps.iter().find(|(m, _)| {
            let base = m.rsplit('/').next().unwrap_or(m);
            let stem = base.split(".ko").next().unwrap_or(base);
            stem == name || stem.replace('-', "_") == name
        })
    };
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(m: &str, deps: &[(String, Vec<String>)], seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(m.to_string()) {
            return;
        }
        if let Some((_, ds)) = deps.iter().find(|(x, _)| x == m) {
            for d in ds.iter().rev() {
                visit(d, deps, seen, order);
            }
        }
        order.push(m.to_string());
    }
    for name in MODULES {
        // Built into the kernel when modules.dep does not list it.
        if let Some((m, _)) = find(name) {
            visit(m, &deps, &mut seen, &mut order);
        }
    }
    Ok(order)
}

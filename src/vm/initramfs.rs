//! The guest's initramfs: the host's static busybox, the kernel modules the stack needs (with
//! their dependencies, in load order) and an `/init` that mounts the lowers by virtio serial,
//! stacks them under a tmpfs upper and runs the command, its stdout, stderr and status each on
//! its own virtio-serial port (see [`super`]).
//!
//! For an image with dm-verity lowers it also holds the dm-mod and dm-verity modules and the
//! host's `dmsetup` with the shared libraries `ldd` names for it: `/init` opens each such
//! lower as a dm-verity device (data on the lower's drive, hashes on the `hashes` drive) and
//! mounts that. The kernel's `dm-mod.create=` would need device-mapper built in (Debian
//! builds it as a module), and busybox has no way to issue the DM ioctls.

use std::collections::BTreeSet;
use std::path::Path;

use super::VmError;
use super::cpio::CpioWriter;
use super::kernel::Kernel;

/// Modules the guest loads, in this order; each after its dependencies.
/// (`loop`: for a merged image on a kernel before 6.4, see `/init`.)
const MODULES: &[&str] =
    &["virtio_mmio", "virtio_blk", "virtio_console", "crc32c_generic", "ext4", "erofs", "overlay", "loop"];

/// Modules added for dm-verity lowers.
const DM_MODULES: &[&str] = &["dm_mod", "dm_verity"];

/// The `/init` script. A second cpio the host writes per run holds `/vmrootfs/run` (sets
/// `LOWERS`, `FS<i>` and for a dm-verity lower `VERITY<i>` = "data blocks, hash start block on
/// the `hashes` drive, root digest hex, salt hex", and `MERGED_VERITY` (the same for the drive
/// `merged`) when the lowers are the devices of a verified merged blob; or `MERGED` and
/// `MERGED_OFFSETS`; and `USERSPEC`) and `/vmrootfs/exec.sh` (runs the command in the image).
///
/// Status port protocol: zero or more `corrupt <i>` / `corrupt merged` lines (lower `i`'s or
/// the merged blob's dm-verity device saw a block that does not match its hash), then the exit status, or `failed` when `/init` could
/// not start the command (why goes to the stderr port).
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
# dm-verity marks a device that read a block not matching its hash: "verity C" in its status.
corrupt() {
  j=0
  while [ "$j" -lt "$LOWERS" ]; do
    eval v=\$VERITY$j
    if [ -n "$v" ] && dmsetup status "lower$j" 2>/dev/null | grep -q " verity C"; then
      echo "corrupt $j" >&5
    fi
    j=$((j + 1))
  done
  if [ -n "$MERGED_VERITY" ] && dmsetup status merged 2>/dev/null | grep -q " verity C"; then
    echo "corrupt merged" >&5
  fi
}
fail() { echo "vmrootfs-init: $*" >&4; corrupt; echo failed >&5; reboot -f; }
# The /dev node of the disk whose virtio serial is $1 (lower0 = base), never by order.
disk() {
  for t in 1 2 3 4 5 6 7 8 9 10; do
    for b in /sys/block/vd*; do
      [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${b##*/}"; return 0; }
    done
    sleep 0.1
  done
  return 1
}
# Opens the disk $2 as the dm-verity device named $1 with the table fields $3 ("data blocks,
# hash start block on the hashes disk, root hex, salt hex"); prints the device's /dev node.
verity() {
  hashes=$(disk hashes) || fail "no disk with serial hashes"
  name=$1 data=$2
  set -- $3
  dmsetup create "$name" --readonly --noudevsync \
    --table "0 $(($1 * 8)) verity 1 $data $hashes 4096 4096 $1 $2 sha256 $3 $4" \
    || fail "dm-verity on $name ($data)"
  for d in /sys/block/dm-*; do
    [ "$(cat "$d/dm/name")" = "$name" ] && [ -b "/dev/${d##*/}" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  fail "no dm device for $name"
}
mkdir -p /newroot
lowerdir=""
devices=""
if [ -n "$MERGED" ]; then
  # One disk: the merged metadata, then the layer images. A kernel >= 6.4 maps the layers by
  # the device table alone; an older one needs a device per layer: a read-only loop device
  # over the layer's part of the disk. The merged tree is then the one lower of the overlay
  # below: a read-only root has no mount points for an image without /dev, /proc or /sys.
  dev=$(disk merged) || fail "no disk with serial merged"
  mkdir -p /lower/merged
  if mount -t erofs -o ro "$dev" /lower/merged 2>/dev/null; then
    echo "vmrootfs-init: merged image mounted from $dev alone"
  else
    opts=ro
    for off in $MERGED_OFFSETS; do
      l=$(losetup -f) && losetup -r -o "$off" "$l" "$dev" || fail "losetup $dev at $off"
      opts="$opts,device=$l"
    done
    mount -t erofs -o "$opts" "$dev" /lower/merged || fail "mount $dev ($opts)"
    echo "vmrootfs-init: merged image mounted from $dev with loop devices at its layers"
  fi
  lowerdir=/lower/merged
else
  i=0
  while [ "$i" -lt "$LOWERS" ]; do
    dev=$(disk "lower$i") || fail "no disk with serial lower$i"
    mkdir -p "/lower/$i"
    eval fs=\$FS$i
    eval verity=\$VERITY$i
    if [ -n "$verity" ]; then
      dev=$(verity "lower$i" "$dev" "$verity") || fail "dm-verity on lower$i"
    fi
    if [ -n "$MERGED_VERITY" ]; then
      # A layer of the verified merged image: a device of the merged blob, not a lower.
      devices="$devices,device=$dev"
    else
      mount -t "$fs" -o ro "$dev" "/lower/$i" || fail "mount $dev ($fs)"
      lowerdir="/lower/$i${lowerdir:+:$lowerdir}"
    fi
    i=$((i + 1))
  done
  if [ -n "$MERGED_VERITY" ]; then
    # The merged blob and each layer through dm-verity, the layers named by -o device= (on
    # every kernel: the one-disk mapping would bypass the layers' dm-verity devices).
    dev=$(disk merged) || fail "no disk with serial merged"
    dev=$(verity merged "$dev" "$MERGED_VERITY") || fail "dm-verity on the merged blob"
    mkdir -p /lower/merged
    mount -t erofs -o "ro$devices" "$dev" /lower/merged || fail "mount $dev (ro$devices)"
    echo "vmrootfs-init: merged image mounted from $dev with a dm-verity device per layer"
    lowerdir=/lower/merged
  fi
fi
# Writes go to a tmpfs upper: the lowers stay read-only, and the image's processes get a
# writable root, whatever the form.
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o "lowerdir=$lowerdir,upperdir=/rw/upper,workdir=/rw/work" /newroot || fail "overlay"
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
corrupt
echo "$status" >&5
exec 5>&-
sync
reboot -f
"#;

/// Writes the initramfs for `kernel` to `out`; with `dmsetup`, what dm-verity lowers need.
pub fn build(kernel: &Kernel, busybox: &Path, dmsetup: Option<&Path>, out: &Path) -> Result<(), VmError> {
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
    let mut wanted = MODULES.to_vec();
    if let Some(dmsetup) = dmsetup {
        wanted.extend_from_slice(DM_MODULES);
        let mut dirs = BTreeSet::new();
        for lib in shared_libraries(dmsetup)? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib);
            for dir in
                rel.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).collect::<Vec<_>>().iter().rev()
            {
                if dirs.insert(dir.to_path_buf()) {
                    w(cpio.dir(&dir.to_string_lossy()))?;
                }
            }
            let data = fs_err::read(&lib).map_err(io(&lib))?;
            w(cpio.file(&rel.to_string_lossy(), 0o755, &data))?;
        }
        let data = fs_err::read(dmsetup).map_err(io(dmsetup))?;
        w(cpio.file("bin/dmsetup", 0o755, &data))?;
    }
    let order = module_order(&kernel.modules, &wanted)?;
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

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`.
fn shared_libraries(binary: &Path) -> Result<Vec<std::path::PathBuf>, VmError> {
    let out = crate::backend::tool::run("ldd", std::process::Command::new("ldd").arg(binary))?;
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The paths in `ldd` output: `name => /path (addr)` and `/path (addr)`; the vDSO has none.
fn parse_ldd(text: &str) -> Vec<std::path::PathBuf> {
    text.lines()
        .filter_map(|l| {
            let target = l.split_once("=>").map_or(l, |(_, t)| t);
            target.split_whitespace().next().filter(|p| p.starts_with('/')).map(Into::into)
        })
        .collect()
}

/// The module files for `wanted` and their dependencies, dependencies first.
fn module_order(modules: &Path, wanted: &[&str]) -> Result<Vec<String>, VmError> {
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
    for name in wanted {
        // Built into the kernel when modules.dep does not list it.
        if let Some((m, _)) = find(name) {
            visit(m, &deps, &mut seen, &mut order);
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibdevmapper.so.1.02.1 => /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                std::path::PathBuf::from("/lib/x86_64-linux-gnu/libdevmapper.so.1.02.1"),
                std::path::PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}

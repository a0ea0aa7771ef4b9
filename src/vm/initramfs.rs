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
/// (Their soft dependencies come with them, see [`module_order`].)
const MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_console", "ext4", "erofs", "overlay", "loop"];

/// Modules added for dm-verity lowers.
const DM_MODULES: &[&str] = &["dm_mod", "dm_verity"];

/// The `/init` script. `/vmrootfs/run` (written per kit, see [`super::kit`]) sets `DRIVES`
/// (the kit's drive names in attach order: `lower<i>`, `merged`, `hashes`), `LOWERS`, `FS<i>`
/// and for a dm-verity lower `VERITY<i>` = "data blocks, hash start block on the `hashes`
/// drive, root digest hex, salt hex", and `MERGED_VERITY` (the same for the drive `merged`)
/// when the lowers are the devices of a verified merged blob; or `MERGED` and
/// `MERGED_OFFSETS`; and `USERSPEC`; `UPPER` when the drive `upper` is the overlay's
/// writable layer (`run --upper`), `COMMIT` when the guest only streams that drive's `upper/`
/// as a tar (`vmrootfs commit`, see [`crate::commit`]). `/vmrootfs/exec.sh` runs the command in the image.
///
/// Drives are found by position, without udev: the guest's virtio bus numbers its devices
/// (`virtio0`, `virtio1`, …) in the order the runtime declares them, which is the order of
/// the drives in the kit's configurations (see [`super::kit`] for each runtime's guarantee).
/// A drive whose serial is one of the kit's names (QEMU, Cloud Hypervisor) is taken by its
/// serial instead, and the console says so if that differs from its position.
///
/// With `vmrootfs.ports` on the kernel command line (`vmrootfs run`), the command's stdout,
/// stderr and status go to three virtio-serial ports. Status port protocol: zero or more
/// `corrupt <i>` / `corrupt merged` lines (lower `i`'s or the merged blob's dm-verity device
/// saw a block that does not match its hash), then the exit status, or `failed` when `/init`
/// could not start the command (why goes to the stderr port). Without it (a kit booted by a
/// runtime) everything goes to the console, the status lines as `vmrootfs-init: status …`.
/// The guest then reboots (QEMU's `-no-reboot` and Firecracker's `reboot=k` end the VM), or
/// powers off with `vmrootfs.poweroff`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" 2>/dev/null; done
. /vmrootfs/run
ports="" end=reboot
for a in $(cat /proc/cmdline); do
  case $a in vmrootfs.ports) ports=1;; vmrootfs.poweroff) end=poweroff;; esac
done
halt() { sync; $end -f; }
# Until the ports are open a failure shows only on the console: the host then reports that the
# guest stopped without a status, with the last console lines.
fail() { echo "vmrootfs-init: $*" >&2; halt; }
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
if [ -n "$ports" ]; then
  out=$(port vmrootfs.stdout) || fail "no virtio port vmrootfs.stdout"
  err=$(port vmrootfs.stderr) || fail "no virtio port vmrootfs.stderr"
  st=$(port vmrootfs.status) || fail "no virtio port vmrootfs.status"
  # Only /init holds the ports: the command inherits stdout (3) and stderr (4), never the status (5).
  exec 3>"$out" 4>"$err" 5>"$st"
  rm -f "$out" "$err" "$st"
  status() { echo "$*" >&5; }
else
  exec 3>/dev/console 4>/dev/console
  status() { echo "vmrootfs-init: status $*" >/dev/console; }
fi
# dm-verity marks a device that read a block not matching its hash: "verity C" in its status.
corrupt() {
  j=0
  while [ "$j" -lt "$LOWERS" ]; do
    eval v=\$VERITY$j
    if [ -n "$v" ] && dmsetup status "lower$j" 2>/dev/null | grep -q " verity C"; then
      status "corrupt $j"
    fi
    j=$((j + 1))
  done
  if [ -n "$MERGED_VERITY" ] && dmsetup status merged 2>/dev/null | grep -q " verity C"; then
    status "corrupt merged"
  fi
}
fail() { echo "vmrootfs-init: $*" >&4; corrupt; status failed; halt; }
# Each drive of DRIVES by position: the n-th virtio block device in virtio bus order.
set -- $DRIVES
t=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt $# ] && [ $t -lt 50 ]; do sleep 0.1; t=$((t + 1)); done
k=0
for b in $(for b in /sys/block/vd*; do [ -e "$b" ] && l=$(readlink "$b/device") && echo "${l##*virtio} ${b##*/}"; done | sort -n | cut -d' ' -f2); do
  k=$((k + 1))
  [ $k -le $# ] || break
  eval "name=\${$k}"
  eval "DRIVE_$name=/dev/$b"
done
# A drive with one of the names as its serial is that drive, wherever it sits.
for b in /sys/block/vd*; do
  s=$(cat "$b/serial" 2>/dev/null) || continue
  case " $DRIVES " in *" $s "*) ;; *) continue;; esac
  eval "at=\$DRIVE_$s"
  if [ "$at" != "/dev/${b##*/}" ]; then
    echo "vmrootfs-init: drive $s is /dev/${b##*/} by its serial, ${at:-none} by position: using the serial" >/dev/console
    eval "DRIVE_$s=/dev/${b##*/}"
  fi
done
found=""
for name in $DRIVES; do eval "found=\"\$found $name=\$DRIVE_$name\""; done
echo "vmrootfs-init: drives in attach order:$found" >/dev/console
# The /dev node of the drive named $1.
disk() { eval "d=\$DRIVE_$1"; [ -b "$d" ] && echo "$d"; }
if [ -n "$COMMIT" ]; then
  # `vmrootfs commit`: the upper alone, read-only; its upper/ goes out as a layer tar on the
  # stdout port, written by the host's own vmrootfs (`guest-tar`), nothing else run; file
  # data as extents of the drive, which the host reads from the upper file.
  dev=$(disk upper) || fail "no drive upper"
  mkdir -p /upper
  mount -t ext4 -o ro "$dev" /upper || fail "mount the upper ($dev) read-only: was its last guest ended cleanly?"
  echo VMROOTFS-BEGIN
  /bin/vmrootfs guest-tar --extents /upper/upper >&3 2>&4 3>&- 4>&- 5>&-
  code=$?
  exec 3>&- 4>&-
  umount /upper
  status "$code"
  exec 5>&-
  halt
fi
# Opens the disk $2 as the dm-verity device named $1 with the table fields $3 ("data blocks,
# hash start block on the hashes disk, root hex, salt hex"); prints the device's /dev node.
verity() {
  hashes=$(disk hashes) || fail "no drive hashes"
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
  dev=$(disk merged) || fail "no drive merged"
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
    dev=$(disk "lower$i") || fail "no drive lower$i"
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
    dev=$(disk merged) || fail "no drive merged"
    dev=$(verity merged "$dev" "$MERGED_VERITY") || fail "dm-verity on the merged blob"
    mkdir -p /lower/merged
    mount -t erofs -o "ro$devices" "$dev" /lower/merged || fail "mount $dev (ro$devices)"
    echo "vmrootfs-init: merged image mounted from $dev with a dm-verity device per layer"
    lowerdir=/lower/merged
  fi
fi
# Writes go to a tmpfs upper, or to the upper drive (`run --upper`, an ext4 filesystem that
# outlives the guest): the lowers stay read-only, and the image's processes get a writable
# root, whatever the form. No redirects, metacopy or index: what the upper holds is then
# plain files, whiteouts and opaque markers, which `commit` turns into a layer.
if [ -n "$UPPER" ]; then
  dev=$(disk upper) || fail "no drive upper"
  mount -t ext4 -o rw,noinit_itable "$dev" /rw || fail "mount the upper ($dev)"
else
  mount -t tmpfs -o mode=0755 rw /rw
fi
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o "lowerdir=$lowerdir,upperdir=/rw/upper,workdir=/rw/work,redirect_dir=off,index=off,metacopy=off" /newroot || fail "overlay"
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
code=$?
exec 3>&- 4>&-
if [ -n "$UPPER" ]; then
  # Nothing written may be lost: end what the command left running, then unmount the upper
  # (a clean ext4 for the next guest) before the status tells the host it may end QEMU.
  kill -9 -1 2>/dev/null
  sleep 0.1
  for d in proc sys dev; do umount "/newroot/$d"; done
  umount /newroot && umount /rw || { sync; echo "vmrootfs-init: the upper stayed mounted: synced only" >/dev/console; }
fi
corrupt
status "$code"
exec 5>&-
halt
"#;

/// The per-kit part of the initramfs: `/vmrootfs/run` (what to mount) and
/// `/vmrootfs/exec.sh` (how to start the command inside the image).
pub struct GuestFiles {
    pub run: String,
    pub exec: String,
}

/// A dynamically linked program the guest runs from `/bin`, with the libraries `ldd` names.
pub struct GuestProgram<'a> {
    /// Its name in the guest's `/bin`.
    pub name: &'a str,
    /// The host's file.
    pub path: &'a Path,
}

/// Writes the initramfs for `kernel` with `guest`'s settings to `out`, with `programs` (the
/// host's `dmsetup` for dm-verity lowers, with the modules they need; `vmrootfs` for commit).
pub fn build(
    kernel: &Kernel,
    busybox: &Path,
    programs: &[GuestProgram<'_>],
    guest: &GuestFiles,
    out: &Path,
) -> Result<(), VmError> {
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
    w(cpio.file("vmrootfs/run", 0o644, guest.run.as_bytes()))?;
    w(cpio.file("vmrootfs/exec.sh", 0o644, guest.exec.as_bytes()))?;
    let mut wanted = MODULES.to_vec();
    let mut dirs = BTreeSet::new();
    let mut libs = BTreeSet::new();
    for program in programs {
        if program.name == "dmsetup" {
            wanted.extend_from_slice(DM_MODULES);
        }
        let libraries = if is_script(program.path)? { Vec::new() } else { shared_libraries(program.path)? };
        for lib in libraries {
            if !libs.insert(lib.clone()) {
                continue;
            }
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
        let data = fs_err::read(program.path).map_err(io(program.path))?;
        w(cpio.file(&format!("bin/{}", program.name), 0o755, &data))?;
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

/// Whether `program` is a `#!` script (run by the initramfs's busybox; no libraries).
pub(super) fn is_script(program: &Path) -> Result<bool, VmError> {
    use std::io::Read;
    let io = |source| VmError::Io { path: program.to_owned(), source };
    let mut head = [0u8; 2];
    let n = fs_err::File::open(program).and_then(|mut f| f.read(&mut head)).map_err(io)?;
    Ok(head[..n] == *b"#!")
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

/// A module's name as modprobe compares it: the file's stem, `-` as `_`.
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

/// Reads a file of the kernel's module directory.
fn read_modules_file(modules: &Path, name: &str) -> Result<String, VmError> {
    let path = modules.join(name);
    fs_err::read_to_string(&path).map_err(|source| VmError::Io { path, source })
}

/// What modprobe would load for `wanted`, from the kernel's `modules.dep`, `modules.softdep`
/// and `modules.alias`: module files, each after its dependencies and its `pre:` soft
/// dependencies and before its `post:` ones. Soft dependencies are what `modinfo -F softdep`
/// shows and `modules.dep` does not: Debian's ext4 wants `crypto-crc32c` (an alias of
/// crc32c_generic and crc32c_intel) and fails to load without it. A name that is neither a
/// module nor an alias is built into the kernel.
fn module_order(modules: &Path, wanted: &[&str]) -> Result<Vec<String>, VmError> {
    use std::collections::BTreeMap;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for (file, ds) in read_modules_file(modules, "modules.dep")?.lines().filter_map(|l| l.split_once(':')) {
        deps.insert(
            module_name(file),
            (file.to_string(), ds.split_whitespace().map(str::to_string).collect()),
        );
    }
    // Absent on kernels whose depmod wrote no soft dependencies or aliases: none then.
    let optional = |name| match read_modules_file(modules, name) {
        Err(VmError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other,
    };
    let mut soft: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for line in optional("modules.softdep")?.lines() {
        let mut words = line.split_whitespace();
        let (Some("softdep"), Some(module)) = (words.next(), words.next()) else { continue };
        let entry = soft.entry(module_name(module)).or_default();
        let mut post = false;
        for w in words {
            match w {
                "pre:" => post = false,
                "post:" => post = true,
                name if post => entry.1.push(name.to_string()),
                name => entry.0.push(name.to_string()),
            }
        }
    }
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in optional("modules.alias")?.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(alias), Some(module)) = (words.next(), words.next(), words.next()) {
            aliases.entry(alias.to_string()).or_default().push(module_name(module));
        }
    }
    // A name as modprobe resolves it: a module, else every module with that alias.
    let resolve = |name: &str| -> Vec<String> {
        let name = name.replace('-', "_");
        if deps.contains_key(&name) {
            return vec![name];
        }
        let by_alias = aliases.get(&name).or_else(|| aliases.get(&name.replace('_', "-")));
        by_alias.into_iter().flatten().filter(|m| deps.contains_key(*m)).cloned().collect()
    };
    struct Walk<'a> {
        deps: &'a BTreeMap<String, (String, Vec<String>)>,
        soft: &'a BTreeMap<String, (Vec<String>, Vec<String>)>,
        resolve: &'a dyn Fn(&str) -> Vec<String>,
        seen: BTreeSet<String>,
        order: Vec<String>,
    }
    impl Walk<'_> {
        fn visit(&mut self, name: &str) {
            if !self.seen.insert(name.to_string()) {
                return;
            }
            let (pre, post) = self.soft.get(name).cloned().unwrap_or_default();
            for m in pre.iter().flat_map(|p| (self.resolve)(p)) {
                self.visit(&m);
            }
            let Some((file, hard)) = self.deps.get(name) else { return };
            for d in hard.iter().rev() {
                self.visit(&module_name(d));
            }
            self.order.push(file.clone());
            for m in post.iter().flat_map(|p| (self.resolve)(p)) {
                self.visit(&m);
            }
        }
    }
    let mut walk =
        Walk { deps: &deps, soft: &soft, resolve: &resolve, seen: BTreeSet::new(), order: Vec::new() };
    for name in wanted {
        for m in resolve(name) {
            walk.visit(&m);
        }
    }
    Ok(walk.order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel's module files as depmod writes them: ext4 depends on jbd2 and wants the
    /// `crypto-crc32c` alias first (a soft dependency `modules.dep` does not show).
    #[test]
    fn soft_dependencies_load_before_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        fs_err::write(
            m.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko\n\
             kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\n\
             kernel/crypto/crc32c_generic.ko:\nkernel/arch/x86/crypto/crc32c-intel.ko:\n\
             kernel/fs/overlayfs/overlay.ko:\nkernel/drivers/block/loop.ko:\n",
        )
        .unwrap();
        fs_err::write(
            m.join("modules.softdep"),
            "softdep ext4 pre: crypto-crc32c\nsoftdep overlay post: loop\n",
        )
        .unwrap();
        fs_err::write(
            m.join("modules.alias"),
            "alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\nalias fs-ext4 ext4\n",
        )
        .unwrap();
        assert_eq!(
            module_order(m, &["ext4", "overlay", "erofs"]).unwrap(),
            [
                "kernel/arch/x86/crypto/crc32c-intel.ko",
                "kernel/crypto/crc32c_generic.ko",
                "kernel/fs/mbcache.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/ext4/ext4.ko",
                "kernel/fs/overlayfs/overlay.ko",
                "kernel/drivers/block/loop.ko",
            ],
            "erofs is built in (not in modules.dep): nothing to load"
        );
    }

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

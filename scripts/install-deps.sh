#!/usr/bin/env bash
# Installs the Debian packages vmrootfs needs, when missing (called by `make`).
# usage: install-deps.sh run|all   (run: what `build` needs; all: also boot, tests, bench)
#   run:  erofs-utils (Debian 12's 1.5: fsck.erofs, for `verify` of EROFS blobs), e2fsprogs
#         (e2fsck, for `verify` of ext4 blobs); vmrootfs writes both filesystems itself
#   boot: qemu-system-x86, qboot (qemu-system-data), linux-image-amd64, busybox-static,
#         dmsetup (for `run` of --verity images)
#   test: umoci, skopeo, debootstrap, attr, libcap2-bin, python3, docker-registry,
#         apache2-utils (htpasswd), cryptsetup-bin (veritysetup), openssl (token server),
#         runc (for containerd 2.1, which scripts/containerd.sh puts under target/containerd);
#         bench: time, bc
# all: erofs-utils 1.8 is built from Debian trixie's source (scripts/build-erofs-utils.sh) and
# its mkfs.erofs installed as /usr/local/bin/mkfs.erofs, ahead of Debian 12's 1.5 on PATH (1.5
# has no tar input): the reference EROFS writer (VMROOTFS_EROFS_WRITER=mkfs), the tests'
# differential check; its fsck.erofs stays in
# target/erofs-utils-1.8 as the tests' second checker beside Debian 12's own.
# vmrootfs writes ext4 itself: Debian 12's e2fsprogs 1.47.0 is enough. qemu-system-x86 comes from
# bookworm-backports when this machine's qemu-utils does (Debian 12 images often ship
# backports' qemu-utils, which the bookworm qemu-system-x86 conflicts with). The backports
# source is added for that package only.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive

installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed'; }

want=(erofs-utils e2fsprogs)
[ "${1:-all}" = all ] && want+=(umoci skopeo debootstrap busybox-static attr libcap2-bin python3 time bc docker-registry apache2-utils
                                zstd xz-utils ca-certificates linux-image-amd64 dmsetup cryptsetup-bin openssl runc)
missing=()
for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
need_qemu=0; [ "${1:-all}" = all ] && ! installed qemu-system-x86 && need_qemu=1
if [ ${#missing[@]} -gt 0 ] || [ $need_qemu -eq 1 ]; then
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
backports() {
  local list=/etc/apt/sources.list.d/vmrootfs-bookworm-backports.list
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' | $SUDO tee "$list" >/dev/null
    $SUDO apt-get update -qq
  fi
}
if [ $need_qemu -eq 1 ]; then
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    backports
    echo "installing: qemu-system-x86 (bookworm-backports, to match qemu-utils)"
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
  else
    echo "installing: qemu-system-x86"
    $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86
  fi
fi

[ "${1:-all}" = all ] || exit 0
if ! /usr/local/bin/mkfs.erofs --version 2>/dev/null | grep -q 'erofs-utils) 1\.[89]' \
   || [ ! -x "$(dirname "$0")/../target/erofs-utils-1.8/fsck.erofs" ]; then
  $SUDO "$(dirname "$0")/build-erofs-utils.sh"
  $SUDO install -m 0755 "$(dirname "$0")/../target/erofs-utils-1.8/mkfs.erofs" /usr/local/bin/mkfs.erofs
  echo "installed /usr/local/bin/mkfs.erofs (erofs-utils 1.8)"
fi

# containerd 2.1 for tests/containerd.rs: Debian sid's .deb, unpacked under target/containerd
# (downloaded once, with an apt state of its own; nothing installed).
if [ "${1:-all}" = all ]; then
  "$(dirname "$0")/containerd.sh" >/dev/null
fi

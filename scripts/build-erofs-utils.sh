#!/usr/bin/env bash
# Builds erofs-utils 1.8 from Debian trixie's source package into target/erofs-utils-1.8
# (scripts/install-deps.sh installs its mkfs.erofs and fsck.erofs into /usr/local/bin: the
# reference writer and an independent checker of vmrootfs's own EROFS blobs; `make bench` also
# compares against its `--tar=f --aufs` mode, the approach of containerd's EROFS differ and
# matchlock). Adds a trixie deb-src line (sources only).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/erofs-utils-1.8
[ -x "$OUT/mkfs.erofs" ] && [ -x "$OUT/fsck.erofs" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs 'deb-src .*trixie' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb-src http://deb.debian.org/debian trixie main' > /etc/apt/sources.list.d/vmrootfs-trixie-src.list
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends dpkg-dev autoconf automake libtool pkg-config make gcc \
  liblz4-dev liblzma-dev uuid-dev zlib1g-dev >/dev/null
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
(cd "$W" && apt-get source -qq --download-only erofs-utils/trixie >/dev/null 2>&1)
tar -C "$W" -xzf "$W"/erofs-utils_*.orig.tar.gz
cd "$W"/erofs-utils-*/
./autogen.sh >/dev/null 2>&1
./configure --disable-fuse --without-selinux --disable-multithreading >/dev/null
make -j"$(nproc)" >/dev/null
mkdir -p "$OUT" && cp mkfs/mkfs.erofs fsck/fsck.erofs "$OUT/"
"$OUT/mkfs.erofs" --version | head -1

#!/usr/bin/env bash
# Builds a real four-layer Debian image with tools independent of vmrootfs, in every form the
# tests read, plus the reference tree that applying its layers gives (`umoci unpack`).
#
#   layer 1  debootstrap --variant=minbase bookworm           (umoci repack)
#   layer 2  apt-get install python3 libcap2-bin               (umoci repack)
#   layer 3  deletions and metadata edge cases                 (umoci repack)
#   layer 4  hand-written PAX tar: opaque dir, whiteout,       (umoci raw add-layer)
#            entries whose parents the tar does not list
#
# OUT/oci (gzip layers, tag "test"), OUT/oci-zstd, OUT/image.oci.tar, OUT/image.docker.tar,
# OUT/reference/rootfs. Cached: a finished OUT is reused; the debootstrap tree is cached
# beside OUT so a rerun after a failure is quick. Needs root and deb.debian.org.
set -euo pipefail

OUT=$(realpath -m "${1:?usage: make-test-image.sh OUT_DIR}")
[ -e "$OUT/.done" ] && exit 0
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="$(dirname "$OUT")/debootstrap-bookworm-minbase.tar"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
W="$OUT.work"
rm -rf "$W" "$OUT"
mkdir -p "$W"
R="$W/bundle/rootfs"

say() { printf '[test-image] %s\n' "$*" >&2; }
mounted=()
cleanup() { for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT

if [ ! -f "$CACHE" ]; then
  say "debootstrap minbase bookworm (cached as $CACHE)"
  debootstrap --variant=minbase bookworm "$W/deb" "$MIRROR" >&2
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$W/deb" -cf "$CACHE.part" .
  mv "$CACHE.part" "$CACHE"
  rm -rf "$W/deb"
fi

repack() { umoci repack --refresh-bundle --image "$W/oci:test" "$W/bundle"; }

say "layer 1: base system"
umoci init --layout "$W/oci"
umoci new --image "$W/oci:test"
umoci config --image "$W/oci:test" --config.cmd /bin/bash --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci unpack --image "$W/oci:test" "$W/bundle" >/dev/null
tar --numeric-owner --xattrs --xattrs-include='*' -C "$R" -xpf "$CACHE"
repack

say "layer 2: apt-get install python3 libcap2-bin"
for m in proc sys dev; do mount --bind "/$m" "$R/$m"; mounted+=("$R/$m"); done
cp /etc/resolv.conf "$R/etc/resolv.conf"
chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 libcap2-bin >/dev/null && apt-get clean'
rm -rf "$R"/var/lib/apt/lists/*
cleanup; mounted=()
: > "$R/etc/resolv.conf"
repack

say "layer 3: deletions and metadata edge cases"
rm -rf "$R/usr/share/doc/apt" "$R/usr/share/man" "$R/etc/cron.daily"
rm -f "$R/etc/issue.net" "$R/usr/bin/dpkg-split"
E="$R/edge"
mkdir -p "$E/sub" "$E/sticky" "$E/private" "$E/odd"
chmod 1777 "$E/sticky"; chmod 0700 "$E/private"; chmod 0511 "$E/odd"
echo "linked data" > "$E/hl-a"; ln "$E/hl-a" "$E/hl-b"; ln "$E/hl-a" "$E/sub/hl-c"
cp /bin/busybox "$E/suid-busybox"; chmod 4755 "$E/suid-busybox"
echo sg > "$E/setgid-file"; chmod 2750 "$E/setgid-file"; chown 0:50 "$E/setgid-file"
cp "$R/usr/bin/true" "$E/cap-true"; setcap cap_net_raw+ep "$E/cap-true"
echo u > "$E/owned-1000"; chown 1000:1000 "$E/owned-1000"
echo u > "$E/owned-nobody"; chown 65534:65534 "$E/owned-nobody"
echo u > "$E/owned-big"; chown 200000:200001 "$E/owned-big"
echo x > "$E/xattrs"; setfattr -n user.binary -v 0x00ff01fe "$E/xattrs"
setfattr -n user.text -v "hello world" "$E/xattrs"; setfattr -n trusted.vmrootfs -v test "$E/xattrs"
setfattr -n user.dir -v d "$E/sub"
mkfifo "$E/fifo"
mknod "$E/null" c 1 3; mknod "$E/loop0" b 7 0; mknod "$E/bigminor" c 240 300
truncate -s 64M "$E/sparse"; printf 'middle' | dd of="$E/sparse" bs=1 seek=$((32 << 20)) conv=notrunc status=none
: > "$E/empty"
long=$(printf 'n%.0s' $(seq 1 200)); echo long > "$E/$long"
deep="$E"; for i in 1 2 3 4; do deep="$deep/$(printf "d${i}%.0s" $(seq 1 40))"; done
mkdir -p "$deep"; echo deep > "$deep/file-at-the-bottom"
ln -s "/$(printf 't%.0s' $(seq 1 300))" "$E/long-target-link"
echo bytes > "$E/"$'\xff\xfe-not-utf8'; mkdir "$E/"$'caf\xe9'
ln -s /etc/os-release "$E/abs-link"; ln -s ../etc/hostname "$E/rel-link"; ln -s nowhere "$E/dangling"
echo ns > "$E/ns-mtime"; touch -d '@1234567890.123456789' "$E/ns-mtime"
echo old > "$E/pre-1970"; touch -d '@-86400' "$E/pre-1970"
echo future > "$E/post-2038"; touch -d '@4102444800' "$E/post-2038"
touch -h -d '@1000000000' "$E/abs-link"
chmod 0750 "$R/usr/share"; touch -d '@1500000000' "$R/usr/share"
repack

say "layer 4: hand-written PAX layer"
python3 "$HERE/make-layer4.py" "$W/layer4.tar"
umoci raw add-layer --image "$W/oci:test" "$W/layer4.tar"

say "other forms (skopeo) and the reference tree (umoci unpack)"
skopeo copy -q "oci:$W/oci:test" "oci-archive:$W/image.oci.tar:test"
skopeo copy -q "oci:$W/oci:test" "docker-archive:$W/image.docker.tar:test:latest"
skopeo copy -q --dest-compress-format zstd --dest-compress "oci:$W/oci:test" "oci:$W/oci-zstd:test"
rm -rf "$W/bundle"
umoci unpack --image "$W/oci:test" "$W/reference" >/dev/null
umoci stat --image "$W/oci:test" >&2
mv "$W" "$OUT"
touch "$OUT/.done"
say "done: $OUT"

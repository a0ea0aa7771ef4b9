#!/usr/bin/env bash
# Regenerates testdata/busybox.oci.tar, the small image `make demo` converts: two layers made
# with umoci from Debian's busybox-static, saved as an oci-archive (tag "busybox") by skopeo.
#
#   layer 1  /bin/busybox, applet symlinks, /etc/passwd, /etc/group, /etc/issue, /tmp (1777)
#   layer 2  adds /etc/motd, deletes /etc/issue (a whiteout)
#
# usage: make-busybox-image.sh [OUT.tar]   (default: testdata/busybox.oci.tar; needs root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-$HERE/busybox.oci.tar}")
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && "$BUSYBOX" --help 2>&1 | grep -q static || BUSYBOX=$(dpkg -L busybox-static | grep -m1 '/busybox$')
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R="$W/bundle/rootfs"

umoci init --layout "$W/oci"
umoci new --image "$W/oci:busybox"
umoci config --image "$W/oci:busybox" --config.cmd /bin/sh \
  --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.workingdir /
umoci unpack --image "$W/oci:busybox" "$W/bundle" >/dev/null

mkdir -p "$R"/{bin,etc,proc,sys,dev,root,tmp,var}
chmod 1777 "$R/tmp"; chmod 0700 "$R/root"
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
for applet in sh ash ls cat echo mkdir rm cp mv ln ps mount umount uname id env sleep \
              grep sed head tail wc stat df du find vi; do
  ln -s busybox "$R/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
echo 'vmrootfs demo (layer 1)' > "$R/etc/issue"
umoci repack --refresh-bundle --image "$W/oci:busybox" "$W/bundle"

echo 'Hello from layer 2 of the vmrootfs demo image.' > "$R/etc/motd"
rm "$R/etc/issue"
umoci repack --refresh-bundle --image "$W/oci:busybox" "$W/bundle"

rm -f "$OUT"
skopeo copy -q "oci:$W/oci:busybox" "oci-archive:$OUT:busybox"
echo "wrote $OUT ($(du -h "$OUT" | cut -f1))"

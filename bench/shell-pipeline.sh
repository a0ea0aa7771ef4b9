#!/usr/bin/env bash
# The baseline vmrootfs is measured against: what a careful shell script does per layer, one
# layer after another — GNU tar into a staging dir, OCI whiteouts turned into overlayfs ones
# with find/mknod/setfattr, then mkfs. (It does not inherit metadata for parents a layer's tar
# omits; vmrootfs does.)
#
# usage: shell-pipeline.sh erofs|ext4 OCI_LAYOUT_DIR TAG OUT_DIR STAGING_PARENT
set -euo pipefail
FS=$1 LAYOUT=$2 TAG=$3 OUT=$4 STAGE_PARENT=$5
mkdir -p "$OUT"
layers=$(python3 - "$LAYOUT" "$TAG" <<'PY'
import json, sys
layout, tag = sys.argv[1], sys.argv[2]
index = json.load(open(f"{layout}/index.json"))
m = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
manifest = json.load(open(f"{layout}/blobs/sha256/{m['digest'][7:]}"))
print(" ".join(l["digest"][7:] for l in manifest["layers"]))
PY
)
n=0
for digest in $layers; do
  n=$((n + 1))
  stage=$(mktemp -d "$STAGE_PARENT/shell-stage-XXXXXX")
  tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf "$LAYOUT/blobs/sha256/$digest" -C "$stage"
  # .wh..wh..opq → opaque directory; .wh.NAME → whiteout char device 0:0.
  find "$stage" -name '.wh..wh..opq' -print0 | while IFS= read -r -d '' marker; do
    setfattr -n trusted.overlay.opaque -v y "$(dirname "$marker")"; rm -f "$marker"
  done
  find "$stage" -name '.wh.*' -print0 | while IFS= read -r -d '' wh; do
    name=$(basename "$wh"); rm -f "$wh"; mknod "$(dirname "$wh")/${name#.wh.}" c 0 0
  done
  case $FS in
    erofs) mkfs.erofs --quiet "$OUT/layer$n.erofs" "$stage" ;;
    ext4)
      kib=$(du -sk "$stage" | cut -f1); inodes=$(find "$stage" | wc -l)
      mkfs.ext4 -q -F -O ^has_journal -N $((inodes + 64)) -d "$stage" "$OUT/layer$n.ext4" $((kib * 12 / 10 + 8192))K ;;
  esac
  rm -rf "$stage"
done

#!/usr/bin/env bash
# usage: make-sparse-layer.sh OUT — an OCI layout OUT whose image `sparse` has one layer: a
# 60 GB sparse file (`huge`, data only at its start and end) in a GNU tar (`--sparse`,
# PAX format), gzip -1. The layer is a few KB; converting it must not write 60 GB.
set -euo pipefail
out=$1
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
truncate -s 60G "$work/src/huge"
printf head | dd of="$work/src/huge" conv=notrunc status=none
printf tail | dd of="$work/src/huge" bs=1 seek=$((60 * 1024 * 1024 * 1024 - 4)) conv=notrunc status=none
tar --sparse --format=posix --owner=0 --group=0 --mtime=@1700000000 -C "$work/src" -cf "$work/layer.tar" huge
python3 "$(dirname "$0")/oci_layout.py" "$out" sparse "$work/layer.tar"

#!/usr/bin/env bash
# Issue 20's figure: `vmrootfs commit` of an upper holding 100 MB of changes in 1,000 files
# (random bytes: nothing for gzip to gain), over the bundled busybox image, QEMU (TCG here).
# Per run: the whole command's wall time, the guest's boot (QEMU started to the guest's /init
# ready, the `guest ready after` line of -v), and the rest: what commit costs beyond the boot.
# Also the phases -v reports (the guest's listing, the layer's tar written from it).
# RUNS (5) runs, each on a fresh copy of the store (else the layer is stored after the first
# and not converted again); medians. Target: beyond the boot <= 3 s. FILES and FILE_BYTES
# change the upper's content.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
FILES=${FILES:-1000}
FILE_BYTES=${FILE_BYTES:-100000}
BIN=${BIN:-$PWD/target/release/vmrootfs}
[ -x "$BIN" ] || cargo build --release --locked
W=$(mktemp -d /var/tmp/vmrootfs-bench-commit.XXXXXX)
trap 'rm -rf "$W"' EXIT

"$BIN" -q --store "$W/base" build oci-archive:testdata/busybox.oci.tar:busybox --tag bb > /dev/null
# The changes: FILES files of FILE_BYTES random bytes under /data, written by a guest.
"$BIN" -q --store "$W/base" run bb --upper "$W/upper.ext4" -- sh -c \
  "mkdir /data && i=0 && while [ \$i -lt $FILES ]; do head -c $FILE_BYTES /dev/urandom > /data/f\$i; i=\$((i+1)); done"
echo "upper: $FILES files of $FILE_BYTES bytes; $(du -k "$W/upper.ext4" | cut -f1) KiB on disk"

now() { date +%s.%N; }
printf '%-4s %8s %8s %13s   %s\n' run total_s boot_s beyond_boot_s phases
totals=() beyonds=()
for i in $(seq "$RUNS"); do
  rm -rf "$W/store" && cp -a "$W/base" "$W/store"
  t0=$(now)
  "$BIN" -v --store "$W/store" commit --upper "$W/upper.ext4" --tag bb-1 > /dev/null 2> "$W/log"
  t1=$(now)
  boot=$(grep -o 'guest ready after [0-9.]*' "$W/log" | grep -o '[0-9.]*$')
  total=$(echo "$t1 - $t0" | bc -l)
  beyond=$(echo "$total - $boot" | bc -l)
  phases=$(grep -oE '(listed the upper|written|converted) in [0-9.]+s' "$W/log" | tr '\n' ';')
  printf '%-4s %8.2f %8.2f %13.2f   %s\n' "$i" "$total" "$boot" "$beyond" "$phases"
  totals+=("$total") beyonds+=("$beyond")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf 'median: total %.2f s, beyond the boot %.2f s (target <= 3 s)\n' "$(median "${totals[@]}")" "$(median "${beyonds[@]}")"

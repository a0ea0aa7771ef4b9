#!/usr/bin/env bash
# `make bench`: cold and warm vmrootfs builds of the real test image, side by side with the
# decompression floor and the shell pipeline (bench/shell-pipeline.sh), in one run.
# Each row: median wall time of 3 runs, the largest peak RSS of the runs (GNU time %M; for
# pipelines, the largest single process), and the ratio to the floor. vmrootfs-erofs uses the
# mkfs.erofs on PATH (erofs-utils 1.8 after `make deps`), *-1.5 rows Debian 12's own through
# VMROOTFS_TOOL_MKFS_EROFS. BIG=1 adds one ~2 GiB layer (big-* rows, one run each, ratio to
# that layer's own floor).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
IMG=target/testimage
BIN=target/release/vmrootfs
SCRATCH=$PWD/target/bench-scratch
SHM_STAGE=/dev/shm/vmrootfs-bench
OUT=target/bench
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
bash testdata/make-test-image.sh "$IMG"
[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"

layers=$(python3 - "$IMG/oci" <<'PY'
import json, sys
layout = sys.argv[1]
index = json.load(open(f"{layout}/index.json"))
manifest = json.load(open(f"{layout}/blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
print(" ".join(f"{layout}/blobs/sha256/{l['digest'][7:]}" for l in manifest["layers"]))
PY
)
compressed=$(du -cb $layers | tail -1 | cut -f1)
uncompressed=$(for l in $layers; do zcat "$l" | wc -c; done | paste -sd+ | bc)
cat $layers > /dev/null   # every row starts with the layer blobs in the page cache

declare -A MEDIAN RSS
# measure NAME SETUP CMD: runs SETUP (untimed) then CMD, RUNS times.
measure() {
  local name=$1 setup=$2 cmd=$3 times=() rss=0
  for _ in $(seq "$RUNS"); do
    eval "$setup"
    local line
    /usr/bin/time -o "$OUT/time.txt" -f '%e %M' bash -c "$cmd" >/dev/null 2>"$OUT/stderr.txt" ||
      { cat "$OUT/stderr.txt" >&2; echo "bench: $name failed" >&2; exit 1; }
    line=$(tail -1 "$OUT/time.txt")
    times+=("${line% *}")
    [ "${line#* }" -gt "$rss" ] && rss=${line#* }
  done
  MEDIAN[$name]=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
  RSS[$name]=$rss
  printf '  %-22s %s\n' "$name" "${times[*]}" >&2
}

fresh() { rm -rf "$SCRATCH" "$SHM_STAGE"; mkdir -p "$SCRATCH" "$SHM_STAGE"; sync; }

echo "measuring (times of each run):" >&2
measure floor "true" "for l in $layers; do zcat \$l > /dev/null; done"
measure floor-parallel "true" "printf '%s\n' $layers | xargs -P$(nproc) -I{} sh -c 'zcat {} > /dev/null'"
for fs in erofs ext4; do
  measure "shell-$fs" fresh "bench/shell-pipeline.sh $fs $IMG/oci test $SCRATCH/out $SCRATCH"
  measure "shell-$fs-tmpfs" fresh "bench/shell-pipeline.sh $fs $IMG/oci test $SCRATCH/out $SHM_STAGE"
  measure "vmrootfs-$fs" fresh "$BIN -q --store $SCRATCH/store build oci:$IMG/oci:test --fs $fs"
  measure "vmrootfs-$fs-disk" fresh "$BIN -q --store $SCRATCH/store build oci:$IMG/oci:test --fs $fs --staging disk"
done
# erofs-utils ≥ 1.8 straight from the tar stream (containerd's EROFS differ, matchlock):
# one layer after another, and all at once.
MKFS18=""
if bash scripts/build-erofs-utils.sh >&2; then MKFS18=$PWD/target/erofs-utils-1.8/mkfs.erofs; fi
if [ -n "$MKFS18" ]; then
  measure erofs-tar-1.8 fresh "n=0; for l in $layers; do n=\$((n+1)); zcat \$l | $MKFS18 --quiet --tar=f --aufs $SCRATCH/l\$n.erofs; done"
  measure erofs-tar-1.8-parallel fresh "printf '%s\n' $layers | xargs -P$(nproc) -I{} sh -c 'zcat {} | $MKFS18 --quiet --tar=f --aufs $SCRATCH/\$(basename {}).erofs'"
fi

# Debian 12's own erofs-utils 1.5 (make deps puts 1.8 first on PATH).
measure vmrootfs-erofs-1.5 fresh "VMROOTFS_TOOL_MKFS_EROFS=/usr/bin/mkfs.erofs $BIN -q --store $SCRATCH/store build oci:$IMG/oci:test"

# BIG=1: one ~2 GiB layer (bench/make-big-layer.py), one run each, for peak RSS.
if [ "${BIG:-0}" = 1 ]; then
  BIGIMG=$PWD/target/bench-big
  [ -f "$BIGIMG/index.json" ] || python3 bench/make-big-layer.py "$BIGIMG" >&2
  bigblob=$(ls -S "$BIGIMG"/blobs/sha256/* | head -1)
  cat "$bigblob" > /dev/null
  RUNS=1 measure big-floor "true" "zcat $bigblob > /dev/null"
  RUNS=1 measure big-vmrootfs-erofs fresh "$BIN -q --store $SCRATCH/store build oci:$BIGIMG:big"
  RUNS=1 measure big-vmrootfs-erofs-1.5 fresh \
    "VMROOTFS_TOOL_MKFS_EROFS=/usr/bin/mkfs.erofs $BIN -q --store $SCRATCH/store build oci:$BIGIMG:big"
  RUNS=1 measure big-vmrootfs-ext4 fresh "$BIN -q --store $SCRATCH/store build oci:$BIGIMG:big --fs ext4"
fi

warm="$BIN -q --store $SCRATCH/store build oci:$IMG/oci:test --fs erofs"
fresh; eval "$warm" >/dev/null
# A warm build must report cached (no layer work) before it is timed.
$warm --json | grep -q '"cached": true'
measure vmrootfs-warm-erofs "true" "$warm"
fresh

floor=${MEDIAN[floor]}
{
  echo "vmrootfs bench — $(date -u +%FT%TZ), $(nproc) cores, $(uname -r)"
  echo "image: target/testimage (4 layers), $((compressed / 1048576)) MiB compressed, $((uncompressed / 1048576)) MiB uncompressed"
  echo "tools: $(command -v mkfs.erofs): $(mkfs.erofs --version 2>/dev/null | head -1 || echo 1.5); Debian's /usr/bin/mkfs.erofs: 1.5 (*-1.5 rows); $(mke2fs -V 2>&1 | head -1); $(tar --version | head -1)"
  echo "staging: shell-* on disk, shell-*-tmpfs on /dev/shm; vmrootfs-* auto (tmpfs), vmrootfs-*-disk --staging disk"
  echo "outputs and stores on disk; the layer blobs are in the page cache before every row"
  echo
  printf '%-22s %10s %14s %9s\n' pipeline median_s peak_rss_MB x_floor
  bigfloor=${MEDIAN[big-floor]:-1}
  for name in floor floor-parallel shell-erofs shell-erofs-tmpfs erofs-tar-1.8 erofs-tar-1.8-parallel \
              vmrootfs-erofs vmrootfs-erofs-1.5 vmrootfs-erofs-disk shell-ext4 shell-ext4-tmpfs vmrootfs-ext4 \
              vmrootfs-ext4-disk vmrootfs-warm-erofs big-floor big-vmrootfs-erofs big-vmrootfs-erofs-1.5 \
              big-vmrootfs-ext4; do
    case $name in big-*) [ "${BIG:-0}" = 1 ] || continue;; esac
    [ -n "${MEDIAN[$name]:-}" ] || { printf '%-22s %10s\n' "$name" "n/a"; continue; }
    f=$floor; case $name in big-*) f=$bigfloor;; esac
    printf '%-22s %10.2f %14.1f %9.2f\n' "$name" "${MEDIAN[$name]}" "$(echo "${RSS[$name]} / 1024" | bc -l)" \
      "$(echo "${MEDIAN[$name]} / $f" | bc -l)"
  done
} | tee "$OUT/results.txt"
python3 - "$OUT/results.txt" "$OUT/results.json" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) == 4 and parts[0] != "pipeline":
        try:
            rows[parts[0]] = {"median_s": float(parts[1]), "peak_rss_mb": float(parts[2]), "x_floor": float(parts[3])}
        except ValueError:
            pass
json.dump(rows, open(sys.argv[2], "w"), indent=2)
PY

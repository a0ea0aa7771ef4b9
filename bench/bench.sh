#!/usr/bin/env bash
# `make bench`: cold and warm vmrootfs builds of the real test image, side by side with the
# decompression floor, the peers' pipeline (zcat | mkfs.erofs --tar=f --aufs per layer, as
# containerd's EROFS differ and matchlock do) and the shell pipeline (bench/shell-pipeline.sh),
# in one run. vmrootfs rows run in four environments: as root on this host; with /dev/shm a
# 64 MiB tmpfs (as in a container CI job; *-shm64); as uid 65534 without capabilities (*-nobody);
# with the store on a tmpfs (*-ramstore: the same work, every byte still written, synced and
# hashed, but no disk under it, so the row shows how much of a build is the store's disk).
# Each row: median wall time of RUNS (3) runs, the peak memory of one more run — the sum of
# the RSS of every process of the command plus the tmpfs bytes it uses (bench/measure.py) —
# and the ratio to the floor. BIG=1 adds one ~2 GiB layer of 20,000 files (big-* rows, one run
# each, ratio to that layer's own floor). The files1m-* and dirs300k-* rows (one run each, ratio
# to their layer's own floor) build one layer of 1,000,000 small files and one of 300,000
# directories (bench/make-many-entries.py): the memory a converter takes per entry. ONLY=many
# runs just those rows (the test image's print n/a).
# floor-zlib-rs is the physical floor of a conversion: each layer hashed compressed, inflated
# with zlib-rs as vmrootfs inflates it (src/layer/gunzip.rs: no CRC-32, which the diff ID makes
# redundant) and hashed uncompressed, 2 threads, nothing written (examples/inflate_floor.rs);
# the summary gives each vmrootfs build as a multiple of it. floor-zlib-rs-write adds what any
# converter that stores a blob and records its digest must do at least: the uncompressed bytes
# written to a file, hashed a third time as they are written, made durable (fdatasync); the
# summary gives each build as a multiple of it too. The sparse-* rows (one run each)
# build one layer holding a 60 GB sparse file (bench/make-sparse-layer.sh) and give its blob size.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
IMG=target/testimage
BIN=$PWD/target/release/vmrootfs
SCRATCH=$PWD/target/bench-scratch
SHM_STAGE=/dev/shm/vmrootfs-bench
OUT=target/bench
NOBODY="setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all"
bash testdata/make-test-image.sh "$IMG"
[ -x "$BIN" ] || cargo build --release --locked
FLOOR=$PWD/target/release/examples/inflate_floor
[ -x "$FLOOR" ] || cargo build --release --locked --example inflate_floor
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
# A world-readable copy of the layout, for the *-nobody rows (umoci writes files 0600).
LAYOUT=$PWD/target/bench-oci
if [ ! -f "$LAYOUT/index.json" ]; then
  rm -rf "$LAYOUT.part" && cp -r "$IMG/oci" "$LAYOUT.part" && chmod -R a+rX "$LAYOUT.part" && mv "$LAYOUT.part" "$LAYOUT"
fi
layers=$(for l in $layers; do printf "%s " "$LAYOUT/blobs/sha256/$(basename "$l")"; done)
cat $layers > /dev/null   # every row starts with the layer blobs in the page cache

declare -A MEDIAN MEM
# measure NAME SETUP CMD: runs SETUP (untimed) then CMD, RUNS times timed, then once more
# under bench/measure.py for the peak memory. Timed runs are not sampled: the sampler reads
# /proc every 10 ms, which on 2 cores takes CPU from the command and slowed parallel rows
# more than sequential ones.
measure() {
  local name=$1 setup=$2 cmd=$3 times=() t0 mib
  for _ in $(seq "$RUNS"); do
    eval "$setup"
    t0=$EPOCHREALTIME
    bash -c "$cmd" >/dev/null 2>"$OUT/stderr.txt" ||
      { cat "$OUT/stderr.txt" >&2; echo "bench: $name failed" >&2; exit 1; }
    times+=("$(echo "$EPOCHREALTIME - $t0" | bc -l | xargs printf '%.3f')")
  done
  eval "$setup"
  python3 bench/measure.py "$OUT/time.txt" -- bash -c "$cmd" >/dev/null 2>"$OUT/stderr.txt" ||
    { cat "$OUT/stderr.txt" >&2; echo "bench: $name failed" >&2; exit 1; }
  read -r _ mib < "$OUT/time.txt"
  MEDIAN[$name]=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
  MEM[$name]=$mib
  printf '  %-24s %s\n' "$name" "${times[*]}" >&2
}

# A fresh scratch directory; the store is created owned by uid 65534 so the *-nobody rows
# can write it (root rows can too).
fresh() {
  rm -rf "$SCRATCH" "$SHM_STAGE"; mkdir -p "$SCRATCH/store" "$SHM_STAGE"
  chown 65534:65534 "$SCRATCH/store"; sync
}
# vmrootfs CMD in each environment.
plain() { echo "$BIN -q --store $SCRATCH/store $*"; }
shm64() { echo "unshare -m sh -c 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec $BIN -q --store $SCRATCH/store $*'"; }
nobody() { echo "$NOBODY $BIN -q --store $SCRATCH/store $*"; }
ramstore() { echo "unshare -m sh -c 'mount -t tmpfs -o size=4g tmpfs $SCRATCH/store && exec $BIN -q --store $SCRATCH/store $*'"; }

echo "measuring (times of each run):" >&2
# The peers' way: erofs-utils 1.8 straight from each layer's tar stream.
MKFS18=$(command -v mkfs.erofs)
if [ "${ONLY:-}" != many ]; then
measure floor "true" "for l in $layers; do zcat \$l > /dev/null; done"
measure floor-parallel "true" "printf '%s\n' $layers | xargs -P$(nproc) -I{} sh -c 'zcat {} > /dev/null'"
measure floor-zlib-rs "true" "THREADS=2 $FLOOR $layers"
measure floor-zlib-rs-write fresh "THREADS=2 WRITE_TO=$SCRATCH $FLOOR $layers"
measure peer-erofs-tar fresh "n=0; for l in $layers; do n=\$((n+1)); zcat \$l | $MKFS18 --quiet --tar=f --aufs $SCRATCH/l\$n.erofs; done"
measure peer-erofs-tar-parallel fresh "printf '%s\n' $layers | xargs -P$(nproc) -I{} sh -c 'zcat {} | $MKFS18 --quiet --tar=f --aufs $SCRATCH/\$(basename {}).erofs'"
for fs in erofs ext4; do
  measure "shell-$fs-tmpfs" fresh "bench/shell-pipeline.sh $fs $LAYOUT test $SCRATCH/out $SHM_STAGE"
  for env in plain shm64 nobody ramstore; do
    name="vmrootfs-$fs"; [ $env = plain ] || name="$name-$env"
    measure "$name" fresh "$($env build oci:$LAYOUT:test --fs $fs)"
  done
done
fi

# BIG=1: one ~2 GiB layer (bench/make-big-layer.py), one run each.
if [ "${BIG:-0}" = 1 ]; then
  BIGIMG=$PWD/target/bench-big
  [ -f "$BIGIMG/index.json" ] || python3 bench/make-big-layer.py "$BIGIMG" >&2
  chmod -R a+rX "$BIGIMG"
  bigblob=$(ls -S "$BIGIMG"/blobs/sha256/* | head -1)
  cat "$bigblob" > /dev/null
  RUNS=1 measure big-floor "true" "zcat $bigblob > /dev/null"
  RUNS=1 measure big-peer-erofs-tar fresh "zcat $bigblob | $MKFS18 --quiet --tar=f --aufs $SCRATCH/big.erofs"
  for fs in erofs ext4; do
    for env in plain nobody; do
      name="big-vmrootfs-$fs"; [ $env = plain ] || name="$name-$env"
      RUNS=1 measure "$name" fresh "$($env build oci:$BIGIMG:big --fs $fs)"
    done
  done
fi

# Many entries: one layer each, one run each.
for kind in files1m dirs300k; do
  MANY=$PWD/target/bench-$kind
  [ -f "$MANY/index.json" ] || python3 bench/make-many-entries.py "$MANY" "${kind%%[0-9]*}" >&2
  chmod -R a+rX "$MANY"
  blob=$(ls -S "$MANY"/blobs/sha256/* | head -1)
  cat "$blob" > /dev/null
  RUNS=1 measure "$kind-floor" "true" "zcat $blob > /dev/null"
  RUNS=1 measure "$kind-peer-erofs-tar" fresh "zcat $blob | $MKFS18 --quiet --tar=f --aufs $SCRATCH/many.erofs"
  for fs in erofs ext4; do
    RUNS=1 measure "$kind-vmrootfs-$fs" fresh "$(plain build oci:$MANY:${kind%%[0-9]*} --fs $fs)"
  done
done

# A 60 GB sparse file: holes kept (vmrootfs's writers), so a blob of a few MB.
SPARSE=$PWD/target/bench-sparse
[ -f "$SPARSE/index.json" ] || bash bench/make-sparse-layer.sh "$SPARSE" >&2
chmod -R a+rX "$SPARSE"
# The layer is the one gzip blob (smaller than the manifest and config).
sparseblob=$(for b in "$SPARSE"/blobs/sha256/*; do if gzip -t "$b" 2>/dev/null; then echo "$b"; fi; done | head -1)
RUNS=1 measure sparse-floor "true" "zcat $sparseblob > /dev/null"
declare -A BLOB
for fs in erofs ext4; do
  RUNS=1 measure "sparse-vmrootfs-$fs" fresh "$(plain build oci:$SPARSE:sparse --fs $fs)"
  BLOB[$fs]=$(du -cb "$SCRATCH"/store/layers/$fs-v*/*.$fs | tail -1 | cut -f1)
done

if [ "${ONLY:-}" != many ]; then
  warm="$(plain build oci:$LAYOUT:test --fs erofs)"
  fresh; eval "$warm" >/dev/null
  # A warm build must report cached (no layer work) before it is timed.
  eval "$warm --json" | grep -q '"cached": true'
  measure vmrootfs-warm-erofs "true" "$warm"
fi
rm -rf "$SCRATCH" "$SHM_STAGE"   # nothing left behind: no scratch store, no stage on /dev/shm

floor=${MEDIAN[floor]:-1}
{
  echo "vmrootfs bench — $(date -u +%FT%TZ), $(nproc) cores, $(uname -r)"
  echo "image: target/testimage (4 layers), $((compressed / 1048576)) MiB compressed, $((uncompressed / 1048576)) MiB uncompressed"
  echo "tools: $(command -v mkfs.erofs): $(mkfs.erofs --version 2>/dev/null | head -1); $(mke2fs -V 2>&1 | head -1); $(tar --version | head -1)"
  echo "shell-*-tmpfs stage on /dev/shm; vmrootfs stages nothing; outputs and stores on disk (*-ramstore: on a tmpfs);"
  echo "the layer blobs are in the page cache before every row; peak_mem: RSS of all processes + tmpfs bytes"
  echo
  printf '%-24s %10s %12s %9s\n' pipeline median_s peak_mem_MB x_floor
  bigfloor=${MEDIAN[big-floor]:-1}
  for name in floor floor-parallel peer-erofs-tar peer-erofs-tar-parallel \
              shell-erofs-tmpfs vmrootfs-erofs vmrootfs-erofs-shm64 vmrootfs-erofs-nobody vmrootfs-erofs-ramstore \
              shell-ext4-tmpfs vmrootfs-ext4 vmrootfs-ext4-shm64 vmrootfs-ext4-nobody vmrootfs-ext4-ramstore \
              vmrootfs-warm-erofs \
              big-floor big-peer-erofs-tar big-vmrootfs-erofs big-vmrootfs-erofs-nobody \
              big-vmrootfs-ext4 big-vmrootfs-ext4-nobody \
              files1m-floor files1m-peer-erofs-tar files1m-vmrootfs-erofs files1m-vmrootfs-ext4 \
              dirs300k-floor dirs300k-peer-erofs-tar dirs300k-vmrootfs-erofs dirs300k-vmrootfs-ext4 \
              floor-zlib-rs floor-zlib-rs-write sparse-floor sparse-vmrootfs-erofs sparse-vmrootfs-ext4; do
    case $name in big-*) [ "${BIG:-0}" = 1 ] || continue;; esac
    [ -n "${MEDIAN[$name]:-}" ] || { printf '%-22s %10s\n' "$name" "n/a"; continue; }
    f=$floor
    case $name in big-*) f=$bigfloor;; files1m-*) f=${MEDIAN[files1m-floor]};; dirs300k-*) f=${MEDIAN[dirs300k-floor]};;
                  sparse-*) f=${MEDIAN[sparse-floor]};; esac
    printf '%-24s %10.2f %12.1f %9.2f\n' "$name" "${MEDIAN[$name]}" "${MEM[$name]}" \
      "$(echo "${MEDIAN[$name]} / $f" | bc -l)"
  done
  echo
  for name in vmrootfs-erofs vmrootfs-ext4 vmrootfs-erofs-ramstore vmrootfs-ext4-ramstore; do
    [ -n "${MEDIAN[$name]:-}" ] && [ -n "${MEDIAN[floor-zlib-rs]:-}" ] || continue
    printf '%s: %.2f x floor-zlib-rs, %.2f x floor-zlib-rs-write\n' "$name" \
      "$(echo "${MEDIAN[$name]} / ${MEDIAN[floor-zlib-rs]}" | bc -l)" \
      "$(echo "${MEDIAN[$name]} / ${MEDIAN[floor-zlib-rs-write]}" | bc -l)"
  done
  echo "sparse layer (60 GB file): erofs blob ${BLOB[erofs]} bytes, ext4 blob ${BLOB[ext4]} bytes"
} | tee "$OUT/results.txt"
python3 - "$OUT/results.txt" "$OUT/results.json" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) == 4 and parts[0] != "pipeline":
        try:
            rows[parts[0]] = {"median_s": float(parts[1]), "peak_mem_mb": float(parts[2]), "x_floor": float(parts[3])}
        except ValueError:
            pass
json.dump(rows, open(sys.argv[2], "w"), indent=2)
PY

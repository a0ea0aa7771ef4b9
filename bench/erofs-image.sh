#!/usr/bin/env bash
# Issue 11's figures, on the real test image and a docker-registry on loopback, medians of
# RUNS (3) runs, each into an empty store (pulls) or an empty registry (pushes):
#   cold-tar-build   vmrootfs build REG/lab/test:1 (the tar image: download + convert)
#   erofs-pull       vmrootfs build REG/lab/test:erofs (the pushed EROFS image: download only)
#   vmrootfs-push    vmrootfs push of the converted image (raw layers)
#   skopeo-push      skopeo copy of the same manifest and blobs (from `push oci:DIR`)
#   local-build      vmrootfs build oci:… of the test image (cold), and the same with --verity
# and the ratios the issue sets targets for (pull ≤ 0.5× cold build; push ≤ 1.2× skopeo;
# dm-verity ≤ 10% of a cold build).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
BIN=${BIN:-$PWD/target/release/vmrootfs}
IMG=target/testimage
W=$PWD/target/bench-erofs-image
bash testdata/make-test-image.sh "$IMG"
[ -x "$BIN" ] || cargo build --release --locked
rm -rf "$W" && mkdir -p "$W"

. bench/registry.sh
trap stop_registry EXIT

seconds() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }

start_registry
skopeo copy -q --dest-tls-verify=false --preserve-digests "oci:$IMG/oci:test" "docker://$ADDR/lab/test:1"
"$BIN" -q --store "$W/src" build "$ADDR/lab/test:1" --tag src
"$BIN" -q --store "$W/src" push src "$ADDR/lab/test:erofs"
"$BIN" -q --store "$W/src" push src "oci:$W/layout:erofs"

cold=() pull=()
for i in $(seq "$RUNS"); do
  rm -rf "$W/s"; sync; cold+=("$(seconds "$BIN" -q --store "$W/s" build "$ADDR/lab/test:1")")
  rm -rf "$W/s"; sync; pull+=("$(seconds "$BIN" -q --store "$W/s" build "$ADDR/lab/test:erofs")")
done
ours=() theirs=()
for i in $(seq "$RUNS"); do
  start_registry; ours+=("$(seconds "$BIN" -q --store "$W/src" push src "$ADDR/lab/push:erofs")")
  start_registry; theirs+=("$(seconds skopeo copy -q --dest-tls-verify=false --preserve-digests "oci:$W/layout:erofs" "docker://$ADDR/lab/push:erofs")")
done
plain=() verity=()
for i in $(seq "$RUNS"); do
  rm -rf "$W/s"; sync; plain+=("$(seconds "$BIN" -q --store "$W/s" build "oci:$IMG/oci:test")")
  rm -rf "$W/s"; sync; verity+=("$(seconds "$BIN" -q --store "$W/s" build "oci:$IMG/oci:test" --verity)")
done
c=$(median "${cold[@]}") p=$(median "${pull[@]}") o=$(median "${ours[@]}") t=$(median "${theirs[@]}")
printf '%-16s %8s\n' row seconds
lp=$(median "${plain[@]}") lv=$(median "${verity[@]}")
printf '%-16s %8.2f\n' cold-tar-build "$c" erofs-pull "$p" vmrootfs-push "$o" skopeo-push "$t" \
  local-build "$lp" local-build-verity "$lv"
printf 'pull / cold build = %.2f (target <= 0.5)\n' "$(echo "$p / $c" | bc -l)"
printf 'push / skopeo     = %.2f (target <= 1.2)\n' "$(echo "$o / $t" | bc -l)"
printf 'verity cost       = %+.1f%% (target <= 10%%)\n' "$(echo "($lv - $lp) * 100 / $lp" | bc -l)"

#!/usr/bin/env bash
# Issue 19's figures: lazy start from a docker-registry on loopback, QEMU (TCG here) booting
# `-- true`, medians of RUNS (3) runs, for the real test image (deb-*) and a 1 GiB image
# whose command reads little (big-*, bench/make-lazy-image.py):
#   *-stored-run    vmrootfs run REF -- true, the image already in the store
#   *-lazy-exit     vmrootfs run --lazy REF -- true on an empty store, to its exit: it exits
#                   when the command does, a detached completer fetching and storing the rest
#   *-lazy-total    vmrootfs run --lazy --wait REF -- true: the rest fetched, published and
#                   recorded before it exits
#   *-lazy-again    vmrootfs run --lazy REF -- true again, once the first one's completion has
#                   stored the image (it boots the stored image: as fast as *-stored-run)
#   *-build-run     vmrootfs build REF then run REF -- true, on an empty store
# and per image the bytes fetched before the command exited (share of the layers' data) and
# the bytes-fetched curve of one run (--fetch-log: what was fetched when, read or background).
# Targets (issue 19): lazy-exit <= 1.3x stored-run; big bytes before exit <= 10%.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
BIN=${BIN:-$PWD/target/release/vmrootfs}
IMG=target/testimage
W=$PWD/target/bench-lazy
BIGIMG=$PWD/target/bench-lazy-big
bash testdata/make-test-image.sh "$IMG"
[ -x "$BIN" ] || cargo build --release --locked
[ -f "$BIGIMG/index.json" ] || python3 bench/make-lazy-image.py "$BIGIMG" >&2
rm -rf "$W" && mkdir -p "$W"

. bench/registry.sh
trap stop_registry EXIT
start_registry

# The images, built with --verity and pushed uncompressed: what --lazy reads.
"$BIN" -q --store "$W/src" build "oci:$IMG/oci:test" --tag deb --verity > /dev/null
"$BIN" -q --store "$W/src" build "oci:$BIGIMG:big" --tag big --verity > /dev/null
"$BIN" -q --store "$W/src" push deb "$ADDR/lab/deb:v1"
"$BIN" -q --store "$W/src" push big "$ADDR/lab/big:v1"

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
declare -A ROW BEFORE DATA
for img in deb big; do
  ref=$ADDR/lab/$img:v1
  stored=() exit=() again=() total=() buildrun=()
  rm -rf "$W/stored"; "$BIN" -q --store "$W/stored" build "$ref" > /dev/null; sync
  for i in $(seq "$RUNS"); do
    t0=$(now); "$BIN" -q --store "$W/stored" run "$ref" -- true; t1=$(now)
    stored+=("$(echo "$t1 - $t0" | bc)")
    rm -rf "$W/s"; sync
    t0=$(now); "$BIN" -q --store "$W/s" run --lazy "$ref" --fetch-log "$W/$img-fetch.json" -- true; t1=$(now)
    exit+=("$(echo "$t1 - $t0" | bc)")
    # The detached completer records the image, then ends.
    until "$BIN" -q --store "$W/s" inspect "$ref" > /dev/null 2>&1; do sleep 0.1; done
    while pgrep -f "lazy-complete $ref" > /dev/null; do sleep 0.1; done
    t0=$(now); "$BIN" -q --store "$W/s" run --lazy "$ref" -- true; t1=$(now)
    again+=("$(echo "$t1 - $t0" | bc)")
    rm -rf "$W/s"; sync
    t0=$(now); "$BIN" -q --store "$W/s" run --lazy --wait "$ref" -- true; t1=$(now)
    total+=("$(echo "$t1 - $t0" | bc)")
    rm -rf "$W/s"; sync
    t0=$(now); "$BIN" -q --store "$W/s" build "$ref" > /dev/null; "$BIN" -q --store "$W/s" run "$ref" -- true; t1=$(now)
    buildrun+=("$(echo "$t1 - $t0" | bc)")
  done
  ROW[$img-stored-run]=$(median "${stored[@]}")
  ROW[$img-lazy-exit]=$(median "${exit[@]}")
  ROW[$img-lazy-again]=$(median "${again[@]}")
  ROW[$img-lazy-total]=$(median "${total[@]}")
  ROW[$img-build-run]=$(median "${buildrun[@]}")
  read -r BEFORE[$img] DATA[$img] < <(python3 -c 'import json,sys; l=json.load(open(sys.argv[1])); print(l["fetched_before_exit"], l["data_bytes"])' "$W/$img-fetch.json")
done

{
  echo "vmrootfs lazy-start bench — $(date -u +%FT%TZ), $(nproc) cores, $(uname -r), QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), $( [ -w /dev/kvm ] && grep -qw -e vmx -e svm /proc/cpuinfo && echo kvm || echo tcg)"
  printf '%-20s %10s\n' row median_s
  for img in deb big; do
    for r in stored-run lazy-exit lazy-again lazy-total build-run; do printf '%-20s %10.2f\n' "$img-$r" "${ROW[$img-$r]}"; done
  done
  echo
  for img in deb big; do
    printf '%s: lazy-exit / stored-run = %.2f (target <= 1.3); lazy-exit / build-run = %.2f; lazy-total / build-run = %.2f\n' "$img" \
      "$(echo "${ROW[$img-lazy-exit]} / ${ROW[$img-stored-run]}" | bc -l)" \
      "$(echo "${ROW[$img-lazy-exit]} / ${ROW[$img-build-run]}" | bc -l)" \
      "$(echo "${ROW[$img-lazy-total]} / ${ROW[$img-build-run]}" | bc -l)"
    printf '%s: fetched before the exit %d of %d data bytes = %.1f%% (target for big <= 10%%)\n' "$img" \
      "${BEFORE[$img]}" "${DATA[$img]}" "$(echo "${BEFORE[$img]} * 100 / ${DATA[$img]}" | bc -l)"
  done
  echo
  echo "bytes-fetched curve of one deb run (seconds since open: cumulative MiB, read / background):"
  python3 - "$W/deb-fetch.json" <<'PY'
import json, sys
log = json.load(open(sys.argv[1]))
total = {"read": 0, "background": 0}
step, nxt = 0.5, 0.0
for f in log["fetches"]:
    total[f["cause"]] += f["bytes"]
    if f["at"] >= nxt:
        print(f"  {f['at']:6.2f}s  read {total['read'] / 2**20:7.1f} MiB  background {total['background'] / 2**20:7.1f} MiB")
        nxt = f["at"] + step
print(f"  command exited at {log['exited_at']:.2f}s with {log['fetched_before_exit'] / 2**20:.1f} MiB of {log['data_bytes'] / 2**20:.1f} MiB fetched")
PY
} | tee "$W/results.txt"

#!/usr/bin/env bash
# Merged images against squashed ones, on the real test image (target/testimage), one run:
# size and wall time of `build --squash`, `build --merge` (both on top of stored layers, so
# the time is the flattening or merging alone), `export --single-disk` as VMDK and as raw, and
# the store size of two images that share a base (the test image, and the same image plus one
# layer, made here with Python's tarfile), merged vs squashed. RUNS (3) runs, median time.
# OLD=path/to/vmrootfs (a build of recipe 2) adds the layer blobs' size and build time with
# inlined tails, to show what recipe 3's -E noinline_data costs.
# Needs root (--squash mounts). BIN defaults to the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
BIN=${BIN:-$PWD/target/release/vmrootfs}
OLD=${OLD:-}
IMG=$PWD/target/testimage
WORK=$PWD/target/bench-merge
rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
SPEC="oci:$IMG/oci:test"

# The second image: the test image plus one layer (its first four layers shared). Not with
# `umoci insert`: umoci 0.4.7 writes that layer's tar truncated (no padding, no end blocks).
cp -r "$IMG/oci" "$WORK/oci2"
python3 - "$WORK/oci2" <<'PY'
import gzip, hashlib, io, json, sys, tarfile
d = sys.argv[1]
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{d}/blobs/sha256/{h}", "wb").write(data)
    return f"sha256:{h}"
def get(digest):
    return open(f"{d}/blobs/sha256/{digest[7:]}", "rb").read()
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    data = b"a file of the second image\n"
    info = tarfile.TarInfo("srv/extra"); info.size = len(data); info.mtime = 1_700_000_000
    t.addfile(info, io.BytesIO(data))
tar = buf.getvalue()
layer = gzip.compress(tar, mtime=0)
index = json.load(open(f"{d}/index.json"))
manifest = json.loads(get(index["manifests"][0]["digest"]))
config = json.loads(get(manifest["config"]["digest"]))
config["rootfs"]["diff_ids"].append(f"sha256:{hashlib.sha256(tar).hexdigest()}")
config_bytes = json.dumps(config).encode()
manifest["config"] = {**manifest["config"], "digest": put(config_bytes), "size": len(config_bytes)}
manifest["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": put(layer), "size": len(layer)})
manifest_bytes = json.dumps(manifest).encode()
index["manifests"] = [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": put(manifest_bytes), "size": len(manifest_bytes),
                       "annotations": {"org.opencontainers.image.ref.name": "test2"}}]
json.dump(index, open(f"{d}/index.json", "w"))
PY
SPEC2="oci:$WORK/oci2:test2"

now() { date +%s.%N; }
# Runs the command and prints its wall time in seconds.
timed() {
  local t0 t1
  t0=$(now)
  "$@" >/dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc
}
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
blob_bytes() { stat -c %s "$@" | paste -sd+ | bc; }
mib() { printf "%.1f" "$(echo "scale=3; $1 / 1048576" | bc)"; }

declare -A T
for r in $(seq "$RUNS"); do
  s="$WORK/s$r"
  sync
  if [ -n "$OLD" ]; then
    T[old]+="$(timed "$OLD" -q --store "$WORK/old$r" build "$SPEC" --tag a) "
    sync
  fi
  T[layers]+="$(timed "$BIN" -q --store "$s" build "$SPEC" --tag a) "
  T[squash]+="$(timed "$BIN" -q --store "$s" build "$SPEC" --tag a --squash) "
  squash_bytes=$("$BIN" --store "$s" inspect a --json | jq '.squashed.size')
  T[merge]+="$(timed "$BIN" -q --store "$s" build "$SPEC" --tag a --merge) "
  T[vmdk]+="$(timed "$BIN" -q --store "$s" export a --single-disk "$WORK/a.vmdk") "
  T[raw]+="$(timed "$BIN" -q --store "$s" export a --single-disk "$WORK/a.img" --raw) "
  [ "$r" = "$RUNS" ] || rm -rf "$s" "$WORK/old$r"
done
t() { tr ' ' '\n' <<<"${T[$1]}" | grep . | median | xargs printf '%.2f'; }

s="$WORK/s$RUNS"
rec=$("$BIN" --store "$s" inspect a --json)
layer_bytes=$(jq '[.lowers[].size] | add' <<<"$rec")
merge_bytes=$(jq '.merged.size' <<<"$rec")
vmdk_bytes=$(blob_bytes "$WORK/a.vmdk")
raw_bytes=$(blob_bytes "$WORK/a.img")

# Two images sharing a base, in a store each way.
for how in squash merge; do
  st="$WORK/two-$how"
  "$BIN" -q --store "$st" build "$SPEC" --tag a --"$how" >/dev/null
  "$BIN" -q --store "$st" build "$SPEC2" --tag b --"$how" >/dev/null
done
st="$WORK/two-layers"
"$BIN" -q --store "$st" build "$SPEC" --tag a >/dev/null
"$BIN" -q --store "$st" build "$SPEC2" --tag b >/dev/null
store_bytes() { find "$1/layers" -type f -name '*.erofs' -printf '%s\n' | paste -sd+ | bc; }

{
  echo "$("$BIN" --version), $(mkfs.erofs --version | head -1), $RUNS run(s), median wall time"
  printf '%-44s %12s %9s\n' "what" "bytes" "time_s"
  printf '%-44s %12s %9s   %s MiB\n' "layer blobs (4, recipe 3), cold build" "$layer_bytes" "$(t layers)" "$(mib "$layer_bytes")"
  if [ -n "$OLD" ]; then
    old_bytes=$(jq '[.lowers[].size] | add' <<<"$("$OLD" --store "$WORK/old$RUNS" inspect a --json)")
    printf '%-44s %12s %9s   %s MiB\n' "layer blobs (4, recipe 2: inlined tails)" "$old_bytes" "$(t old)" "$(mib "$old_bytes")"
  fi
  printf '%-44s %12s %9s   %s MiB\n' "--squash: one flattened blob" "$squash_bytes" "$(t squash)" "$(mib "$squash_bytes")"
  printf '%-44s %12s %9s   %s MiB\n' "--merge: metadata blob only" "$merge_bytes" "$(t merge)" "$(mib "$merge_bytes")"
  printf '%-44s %12s %9s   (a disk of %s MiB, nothing copied)\n' "export --single-disk: VMDK descriptor" "$vmdk_bytes" "$(t vmdk)" "$(mib "$raw_bytes")"
  printf '%-44s %12s %9s   %s MiB\n' "export --single-disk --raw" "$raw_bytes" "$(t raw)" "$(mib "$raw_bytes")"
  echo
  echo "store (blob bytes) with two images sharing 4 layers (the second adds one):"
  printf '%-44s %12s   %s MiB\n' "layers only" "$(store_bytes "$WORK/two-layers")" "$(mib "$(store_bytes "$WORK/two-layers")")"
  printf '%-44s %12s   %s MiB\n' "layers + squashed blob of each" "$(store_bytes "$WORK/two-squash")" "$(mib "$(store_bytes "$WORK/two-squash")")"
  printf '%-44s %12s   %s MiB\n' "layers + merged blob of each" "$(store_bytes "$WORK/two-merge")" "$(mib "$(store_bytes "$WORK/two-merge")")"
} | tee "$PWD/target/bench-merge.txt"

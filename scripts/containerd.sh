#!/usr/bin/env bash
# Gets containerd 2.1 for the tests (tests/containerd.rs) into target/containerd/ — once;
# later runs find it there and download nothing.
#
# Debian 12 has no containerd 2.x; sid has 2.1. Its .deb is downloaded with an apt state of
# its own under target/containerd/apt (sources, lists, cache): the machine's own apt sources
# and lists stay as they are, and nothing from sid is installed. `dpkg-deb -x` unpacks it into
# target/containerd/root (Debian 12's glibc runs its binaries). runc is Debian 12's own
# (`scripts/install-deps.sh all` installs it). The tests print the versions they ran with:
# sid's package is whatever sid has today (2.1.9+ds1-5 when this was written).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/containerd
BIN=$OUT/root/usr/bin
if [ -x "$BIN/containerd" ] && [ -x "$BIN/ctr" ]; then
  "$BIN/containerd" --version
  exit 0
fi
APT=$OUT/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sources.list.d" "$OUT/debs"
echo 'deb http://deb.debian.org/debian sid main' > "$APT/sources.list"
opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
      -o "APT::Architecture=$(dpkg --print-architecture)" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" update -qq
(cd "$OUT/debs" && apt-get "${opts[@]}" download containerd)
deb=$(ls "$OUT"/debs/containerd_*.deb)
rm -rf "$OUT/root.new"
dpkg-deb -x "$deb" "$OUT/root.new"
rm -rf "$OUT/root" && mv "$OUT/root.new" "$OUT/root"
rm -rf "$APT/lists" "$APT/cache" "$OUT/debs"
"$BIN/containerd" --version

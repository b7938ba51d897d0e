#!/usr/bin/env bash
# A real distribution run beyond the installed system: download the .debs of the N most
# popular packages (by the embedded popcon snapshot; default N=500) with `apt-get download`
# and run `hbt coverage --debs` on them for every CPU model.
# Usage: benches/coverage-popular-debs.sh [N] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}; DIR=${2:-$PWD/target/popular-debs}
cargo build --release --quiet
HBT=$PWD/target/release/hbt
mkdir -p "$DIR"
# Names in the snapshot that this distribution still has (version-drifted names are skipped).
apt-cache pkgnames > "$DIR/.available" 2>/dev/null || { echo "run 'apt-get update' first" >&2; exit 1; }
awk -F'\t' '!/^#/ && $1 != "rank" {print $2}' coverage/data/popcon-2018-ubuntu+debian.tsv \
  | grep -Fxf "$DIR/.available" > "$DIR/.candidates" || true
head -n "$N" "$DIR/.candidates" > "$DIR/.wanted"
# Footprints need the libraries those packages load (libc6, libstdc++6, … are not in the 2018
# snapshot): add the library packages of their Depends closure. They weigh what popcon says
# (often nothing) but complete the DT_NEEDED closure.
apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
  $(cat "$DIR/.wanted") 2>/dev/null | grep -v '^[ <]' | grep '^lib' | sort -u | comm -23 - <(sort "$DIR/.wanted") > "$DIR/.libs" || true
echo "downloading $(wc -l < "$DIR/.wanted") packages and $(wc -l < "$DIR/.libs") libraries they depend on into $DIR"
(cd "$DIR" && cat .wanted .libs | xargs -n 100 apt-get download -q=2 2>&1 | grep -v '^W:' || true)
echo "$(ls "$DIR"/*.deb | wc -l) .deb files"
for model in x86-64-v1 x86-64-v2 x86-64-v3 x86-64-v4 all; do
  "$HBT" coverage --debs "$DIR" -q --cpu-model "$model" --format json -o "$DIR/report-$model.json"
done
"$HBT" coverage --debs "$DIR" -q --cpu-model x86-64-v3 -o "$DIR/report.html"
"$HBT" coverage --debs "$DIR" -q --cpu-model x86-64-v3 | tee "$DIR/report-x86-64-v3.txt"

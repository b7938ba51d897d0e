#!/usr/bin/env bash
# Times `hbt run` on the two guests that bracket the VMM's costs, in one run:
# - cpl3-compute: 1e8 xorshift steps at CPL3 (native speed under KVM): guest steps per second;
# - io-heavy: 20,052 port-I/O exits from CPL0 through hbt's device table: exits per second and
#   µs per exit, against the floor measured on the same guest in the same run by a bare
#   KVM_RUN loop that only counts exits (`hbt run --raw-exit-loop`): hbt's own per-exit cost.
# Runs alternate between the two loops; medians of RUNS each. Target: hbt adds ≤ 10%.
# Usage: benches/vmm-exits.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-7}
cargo build --release -q
HBT=$PWD/target/release/hbt
[ -e /dev/kvm ] || { echo "needs /dev/kvm" >&2; exit 1; }
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
compute=() hbt=() raw=()
for _ in $(seq "$RUNS"); do
  compute+=("$("$HBT" run --stats test-images/cpl3-compute.img 2>&1 >/dev/null | awk '/time:/{print $5}')")
  hbt+=("$("$HBT" run --stats test-images/io-heavy.img 2>&1 >/dev/null | awk '/time:/{print $(NF-3)}')")
  raw+=("$("$HBT" run --raw-exit-loop test-images/io-heavy.img 2>&1 | awk '{print $(NF-3)}')")
done
c=$(printf '%s\n' "${compute[@]}" | median)
h=$(printf '%s\n' "${hbt[@]}" | median)
r=$(printf '%s\n' "${raw[@]}" | median)
printf 'cpl3-compute: %.3f s in KVM_RUN for 1e8 steps: %.0f M guest steps/s\n' "$c" "$(echo "100 / $c" | bc -l)"
printf 'io-heavy:     hbt %.3f µs per exit (%.0f exits/s); bare KVM_RUN loop %.3f µs (%.0f exits/s); hbt adds %.1f%%\n' \
  "$h" "$(echo "1000000 / $h" | bc -l)" "$r" "$(echo "1000000 / $r" | bc -l)" "$(echo "100 * ($h - $r) / $r" | bc -l)"
echo "(medians of $RUNS alternating runs)"

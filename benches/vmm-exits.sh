#!/usr/bin/env bash
# Times `hbt run` on the two guests that bracket the VMM's costs, in one run: cpl3-compute
# (1e8 xorshift steps at CPL3, native speed under KVM) and io-heavy (20000 port writes from CPL0,
# each a VM exit through hbt's device table). Prints guest steps/s, exits/s, µs per exit and how
# much of each run was spent in KVM_RUN vs in hbt (from --stats). Medians of RUNS runs.
# Usage: benches/vmm-exits.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
cargo build --release -q
HBT=$PWD/target/release/hbt
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
stat_of() { # image field -> medians of total/kvm/hbt seconds
  for _ in $(seq "$RUNS"); do
    "$HBT" run --stats "$1" 2>&1 >/dev/null | awk '/time:/{print $2, $5, $9}'
  done
}
for img in cpl3-compute io-heavy; do
  stat_of "test-images/$img.img" > "/tmp/hbt-vmm-$img.txt"
done
read -r c_total c_kvm c_hbt < <(paste <(cut -d' ' -f1 /tmp/hbt-vmm-cpl3-compute.txt | median) <(cut -d' ' -f2 /tmp/hbt-vmm-cpl3-compute.txt | median) <(cut -d' ' -f3 /tmp/hbt-vmm-cpl3-compute.txt | median))
read -r i_total i_kvm i_hbt < <(paste <(cut -d' ' -f1 /tmp/hbt-vmm-io-heavy.txt | median) <(cut -d' ' -f2 /tmp/hbt-vmm-io-heavy.txt | median) <(cut -d' ' -f3 /tmp/hbt-vmm-io-heavy.txt | median))
exits=20052
printf 'cpl3-compute: %.3f s total (%.3f s in KVM_RUN): %.0f M guest steps/s\n' "$c_total" "$c_kvm" "$(echo "100 / $c_kvm" | bc -l)"
printf 'io-heavy:     %.3f s total, %.3f s in KVM_RUN, %.4f s in hbt: %.0f exits/s, %.2f µs per exit round trip, hbt adds %.1f%%\n' \
  "$i_total" "$i_kvm" "$i_hbt" "$(echo "$exits / $i_total" | bc -l)" "$(echo "$i_total * 1000000 / $exits" | bc -l)" "$(echo "100 * $i_hbt / $i_kvm" | bc -l)"
echo "(medians of $RUNS runs; 'in hbt' is the run loop and device dispatch outside KVM_RUN, incl. setup)"

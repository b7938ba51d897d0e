#!/usr/bin/env bash
# Times busybox workloads natively, under `hbt exec`, under qemu-x86_64 and under
# valgrind --tool=none, in one run on the same inputs; prints medians, slowdown vs native and
# hbt/qemu. Needs busybox-static, qemu-user, valgrind (Debian packages).
# Usage: benches/exec-vs-peers.sh [RUNS]   (default 3 runs per cell, median reported)
#        HBT_CPU_MODEL=x86-64-v3 benches/exec-vs-peers.sh 3   (the CPU model hbt shows its guest;
#        default: hbt's own, `host`, which shows AVX-512 where the host has it)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
BB=/bin/busybox
cargo build --release -q
HBT=$PWD/target/release/hbt
for tool in "$BB" qemu-x86_64 valgrind; do command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c $((48 << 20)) /dev/urandom | base64 -w 76 > "$work/64M"   # ≈ 64 MiB of text
seq 1 1000000 | "$BB" awk '{print ($1 * 7919) % 1000003}' > "$work/lines"

workloads=(
  "sha256sum-64M|sha256sum $work/64M"
  "gzip-64M|gzip -c $work/64M"
  "sort-1e6|sort -n $work/lines"
  "awk-loop|awk BEGIN{s=0;for(i=0;i<3000000;i++)s+=i%7;print(s)}"
  "sh-loop-1e5|sh -c i=0;while[SPACE][[SPACE]\$i[SPACE]-lt[SPACE]100000[SPACE]];do[SPACE]i=\$((i+1));done;echo[SPACE]\$i"
)

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
timeit() { # runner... -> seconds
  local s e
  s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N)
  echo "$e - $s" | bc -l
}

echo "hbt exec --cpu-model ${HBT_CPU_MODEL:-host (default)}; host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
printf '%-15s %9s %9s %9s %9s %8s %8s %8s %9s\n' workload native hbt qemu valgrind hbt× qemu× vg× hbt/qemu
geo_h=0; geo_q=0; geo_v=0; n=0
for w in "${workloads[@]}"; do
  name=${w%%|*}
  read -r -a args <<< "${w#*|}"
  args=("${args[@]//\[SPACE\]/ }")
  declare -A t=()
  for runner in native hbt qemu valgrind; do
    case $runner in
      native) cmd=("$BB" "${args[@]}") ;;
      hbt) cmd=("$HBT" exec ${HBT_CPU_MODEL:+--cpu-model "$HBT_CPU_MODEL"} "$BB" "${args[@]}") ;;
      qemu) cmd=(qemu-x86_64 "$BB" "${args[@]}") ;;
      valgrind) cmd=(valgrind --tool=none -q "$BB" "${args[@]}") ;;
    esac
    t[$runner]=$(for _ in $(seq "$RUNS"); do timeit "${cmd[@]}"; done | median)
  done
  rh=$(echo "${t[hbt]} / ${t[native]}" | bc -l); rq=$(echo "${t[qemu]} / ${t[native]}" | bc -l)
  rv=$(echo "${t[valgrind]} / ${t[native]}" | bc -l); hq=$(echo "${t[hbt]} / ${t[qemu]}" | bc -l)
  printf '%-15s %9.3f %9.3f %9.3f %9.3f %8.2f %8.2f %8.2f %9.2f\n' "$name" "${t[native]}" "${t[hbt]}" "${t[qemu]}" "${t[valgrind]}" "$rh" "$rq" "$rv" "$hq"
  geo_h=$(echo "$geo_h + l($rh)" | bc -l); geo_q=$(echo "$geo_q + l($rq)" | bc -l); geo_v=$(echo "$geo_v + l($rv)" | bc -l); n=$((n + 1))
done
printf '%-15s %9s %9s %9s %9s %8.2f %8.2f %8.2f\n' geomean "" "" "" "" "$(echo "e($geo_h / $n)" | bc -l)" "$(echo "e($geo_q / $n)" | bc -l)" "$(echo "e($geo_v / $n)" | bc -l)"
echo "(seconds are medians of $RUNS runs; × = slowdown vs native)"

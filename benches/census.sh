#!/usr/bin/env bash
# Is a benchmark suite representative of what a distribution uses? Runs workloads with
# `--census` (the instruction forms hbt's translator translated: every process of a workload,
# its forks and exec'd programs included) and compares each census with this installed system
# through `hbt coverage --compare`: the weighted completeness the workload's executed set alone
# would give, and which of the distribution's 100 most important instructions (mnemonics, CPU
# model `all`) it never executes. Workloads: the busybox workloads of benches/exec-vs-peers.sh
# (smaller inputs: the forms, not the time, matter here), `gcc -O2 -c` on a real C file,
# `python3` on a short script, and a Linux boot under `hbt run --accel bt` (kernel and user
# code translated); then all of them together.
#
#   benches/census.sh [DIR]     (census files are kept in DIR, default a temporary directory)
#
# Needs busybox-static, gcc, python3, cpio and linux-image-cloud-amd64 (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
HBT=$PWD/target/release/hbt
BB=/bin/busybox
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=${1:-$work/census}
mkdir -p "$out"
rm -f "$out"/*.census
head -c $((3 << 20)) /dev/urandom | base64 -w 76 > "$work/4M"
seq 1 100000 | "$BB" awk '{print ($1 * 7919) % 1000003}' > "$work/lines"

census() { # name command... : runs the command under `hbt exec --census`
  local name=$1; shift
  "$HBT" exec --census "$out/$name.census" "$@" > /dev/null
}
census sha256sum "$BB" sha256sum "$work/4M"
census gzip "$BB" gzip -c "$work/4M"
census sort "$BB" sort -n "$work/lines"
census awk "$BB" awk 'BEGIN{s=0;for(i=0;i<300000;i++)s+=i%7;print(s)}'
census sh-loop "$BB" sh -c 'i=0; while [ $i -lt 10000 ]; do i=$((i+1)); done; echo $i'
census gcc /usr/bin/gcc -O2 -c guests/linux/coherence.c -o "$work/coherence.o"
census python3 /usr/bin/python3 -c '
import json, re, collections
words = re.findall(r"\w+", open("README.md").read())
common = collections.Counter(w.lower() for w in words).most_common(5)
print(json.dumps({"words": len(words), "common": common, "mean": sum(map(len, words)) / len(words)}))'
scripts/boot-linux.sh --accel bt --census "$out/linux-boot.census" > /dev/null 2>&1
# All of them together: a census file is an instruction list, so they concatenate.
{ echo "# hbt census of every workload above"; grep -hv '^#' "$out"/*.census; } > "$work/all.census"
mv "$work/all.census" "$out/all.census"

printf '%-12s %6s %8s %8s %8s %8s  %s\n' workload forms WC-v1 WC-v3 WC-all missed "top-100 mnemonics never executed (rank:name)"
for f in sha256sum gzip sort awk sh-loop gcc python3 linux-boot all; do
  "$HBT" coverage -q --compare "$out/$f.census" --format json -o "$work/$f.json"
  python3 - "$f" "$work/$f.json" "$out/$f.census" <<'PY'
import json, sys
name, report, census = sys.argv[1:]
r = json.load(open(report))
forms = len({l.split("#")[0].strip() for l in open(census) if l.strip() and not l.startswith("#")})
missing = r["comparison"]["never_executed"]
wc = {m["cpu_model"]: m["supported_weighted_completeness"] * 100 for m in r["cpu_models"]}
print(f"{name:<12} {forms:>6} {wc['x86-64-v1']:>7.2f}% {wc['x86-64-v3']:>7.2f}% {wc['all']:>7.2f}% {len(missing):>4}/100  "
      + " ".join(f"{m['rank']}:{m['instruction']}" for m in missing))
PY
done
echo "(WC-<model>: popularity-weighted share of this system's packages whose every instruction form"
echo " under that CPU model the workload executed; the never-executed list is for CPU model 'all';"
echo " census files in $out)"

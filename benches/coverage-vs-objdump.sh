#!/usr/bin/env bash
# Times, in one run, hbt's sweep and `objdump -d` on the same set of real binaries, one core
# each, and prints code throughput (MB/s of executable sections) and the ratio.
# Usage: benches/coverage-vs-objdump.sh [FILES...]   (default: a fixed set from /usr)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
HBT=$PWD/target/release/hbt
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  for f in /usr/bin/{bash,ls,cp,grep,sed,tar,find,sort,dpkg,perl,git,ssh,python3.11,as,ld.bfd,gdb} \
           /usr/lib/x86_64-linux-gnu/{libc.so.6,libm.so.6,libstdc++.so.6,libcrypto.so.3,libz.so.1,libgmp.so.10}; do
    [ -f "$f" ] && files+=("$(readlink -f "$f")")
  done
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/usr/bin"
for f in "${files[@]}"; do cp "$f" "$work/root/usr/bin/$(basename "$f")"; done
python3 - "$HBT" "$work/root" "${files[@]}" <<'PY'
import json, os, subprocess, sys, time, statistics
hbt, root, files = sys.argv[1], sys.argv[2], sys.argv[3:]
env = dict(os.environ, RAYON_NUM_THREADS="1")
def run_hbt():
    t = time.perf_counter()
    out = subprocess.run([hbt, "coverage", "--root", root, "--no-cache", "-q", "--format", "json"], env=env, check=True, capture_output=True).stdout
    return time.perf_counter() - t, json.loads(out)
def run_objdump():
    t = time.perf_counter()
    for f in files:
        subprocess.run(["objdump", "-d", "-z", "-M", "intel", f], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t
for f in files: open(f, "rb").read()  # warm the page cache for both
hbt_times, objdump_times = [], []
for _ in range(3):
    t, report = run_hbt(); hbt_times.append(t)
    objdump_times.append(run_objdump())
code = report["bytes_decoded"] / 1e6
h, o = statistics.median(hbt_times), statistics.median(objdump_times)
print(f"{len(files)} binaries, {code:.1f} MB of code; median of 3 runs, one core each")
print(f"  hbt coverage (whole command)  {h:7.2f} s  {code/h:8.1f} MB/s")
print(f"  objdump -d -z -M intel        {o:7.2f} s  {code/o:8.1f} MB/s")
print(f"  ratio hbt/objdump throughput  {o/h:7.1f}x  (target >= 25x)")
PY

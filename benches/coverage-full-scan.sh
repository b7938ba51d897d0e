#!/usr/bin/env bash
# Full scan of this installed system, cold (empty scan cache; page cache dropped when this
# user may) and warm (scan cache filled), printing wall time and peak RSS of each.
# Usage: benches/coverage-full-scan.sh [extra hbt coverage args...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
HBT=$PWD/target/release/hbt
cache=$(mktemp -d); trap 'rm -rf "$cache"' EXIT
python3 - "$HBT" "$cache/coverage.cache" "$@" <<'PY'
import json, resource, subprocess, sys, time, os
hbt, cache, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
def run(label):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    p = subprocess.run([hbt, "coverage", "--cache", cache, "-q", "--format", "json", *extra], capture_output=True, check=True)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
    r = json.loads(p.stdout)
    print(f"{label:5} wall {wall:6.2f} s  peak RSS {rss/1024:7.0f} MiB  elf {r['elf_files']}  x86-64 {r['binaries']}  code {r['bytes_decoded']/1e9:.2f} GB  cached {r['timing']['cached_files']}")
dropped = False
try:
    subprocess.run(["sync"]); open("/proc/sys/vm/drop_caches", "w").write("3\n"); dropped = True
except OSError:
    pass
run("cold" + ("" if dropped else "*"))
run("warm")
if not dropped: print("* page cache could not be dropped: 'cold' means empty scan cache only")
print("targets: cold <= 60 s, warm <= 5 s, peak RSS <= 2048 MiB")
PY

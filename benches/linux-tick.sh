#!/usr/bin/env bash
# What the guest's timer tick and the host's interruptions cost a CPU-bound program, per
# engine, in one run: `guests/linux/hiccup.c` (spins on rdtsc and adds up every gap > 2 µs)
# runs natively and as the /init of the installed Debian kernel (linux-image-cloud-amd64,
# busybox initramfs) under `hbt run --accel hybrid` and `--accel bt`. Prints, per engine, the
# median over ROUNDS runs of the share of time lost to gaps, the gaps per second and their
# average length, the loop's speed between gaps relative to native (1.00: the gaps are the whole
# cost), and the gap-length histogram of the median run. Workload (a) of
# benches/linux-guest.sh (hybrid within 5% of native) is this cost plus cache refills. Under bt
# `rdtsc` is performed by the engine, so bt's loop speed (and what counts as a gap there) only
# says how fast that is.
#
#   benches/linux-tick.sh              (ROUNDS=3 runs of RUN_SECONDS=2 each; BOUND=120 s per boot)
#
# Needs gcc, busybox-static, cpio and linux-image-cloud-amd64 (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${RUN_SECONDS:-2}
BOUND=${BOUND:-120}
HBT=$PWD/target/release/hbt
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort | tail -1)
[ -n "$kernel" ] || { echo "no /boot/vmlinuz-*: install linux-image-cloud-amd64" >&2; exit 1; }
cargo build --release -q
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O2 -static -o "$work/hiccup" guests/linux/hiccup.c
cat > "$work/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
i=0; while [ \$i -lt $ROUNDS ]; do /hiccup $SECONDS_PER_RUN; i=\$((i+1)); done
reboot -f
INIT
scripts/busybox-initramfs.sh "$work/initramfs.cpio" "$work/init" "$work/hiccup"

echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); $ROUNDS runs of $SECONDS_PER_RUN s per engine" >&2
native=$(for _ in $(seq 1 "$ROUNDS"); do "$work/hiccup" "$SECONDS_PER_RUN"; done)
guest() { # engine -> the hiccup lines of one boot
  timeout "$BOUND" "$HBT" run --mem 512 --initrd "$work/initramfs.cpio" \
    --append "console=ttyS0 quiet panic=-1" --accel "$1" "$kernel" 2>/dev/null | tr -d '\r' | grep '^hiccup' || true
}
hybrid=$(guest hybrid)
bt=$(guest bt)

python3 - "$ROUNDS" "$SECONDS_PER_RUN" <<PY
import re, statistics, sys
rounds, secs = int(sys.argv[1]), float(sys.argv[2])
outputs = {"native": """$native""", "hybrid": """$hybrid""", "bt": """$bt"""}
def runs(text):
    out, cur = [], None
    for line in text.splitlines():
        if m := re.match(r"hiccup: \S+ s, (\d+) gaps >2us, lost ([\d.]+)% \(([\d.]+) us/gap", line):
            cur = {"gaps": int(m[1]), "lost": float(m[2]), "avg": float(m[3])}
        elif cur is not None and (m := re.match(r"hiccup rate: ([\d.]+)", line)):
            cur["rate"] = float(m[1])
        elif cur is not None and line.startswith("hiccup gaps (us): "):
            cur["hist"] = line.split(": ", 1)[1]
            out.append(cur); cur = None
    return out
parsed = {k: runs(v) for k, v in outputs.items()}
if not parsed["native"]:
    sys.exit("the native run printed nothing")
base = statistics.median(r["rate"] for r in parsed["native"])
print(f"{'engine':8} {'runs':>4} {'lost %':>7} {'gaps/s':>7} {'us/gap':>7} {'speed':>6}  gap histogram (us) of the median run")
for name, rs in parsed.items():
    if not rs:
        print(f"{name:8} {0:>4}  (no output: the boot failed or took over the bound)")
        continue
    med = sorted(rs, key=lambda r: r["lost"])[len(rs) // 2]
    print(f"{name:8} {len(rs):>4} {med['lost']:>7.2f} {med['gaps'] / secs:>7.0f} {med['avg']:>7.1f} "
          f"{statistics.median(r['rate'] for r in rs) / base:>6.2f}  {med['hist']}")
PY

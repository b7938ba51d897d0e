#!/usr/bin/env bash
# Guest workloads under each engine, in one run: boots the installed Debian kernel
# (linux-image-cloud-amd64) with a busybox initramfs once per engine — `hbt run --accel hybrid`
# (the adaptive policy), `--accel hybrid --hybrid-policy always-kvm`, `--accel bt`, and QEMU TCG
# (`qemu-system-x86_64 -M microvm -accel tcg`) — and times, inside the guest:
#   a  spin-hash: a CPU-bound static program with no system call in its loop (~1 s natively)
#   b  sha256sum of a 64 MiB tmpfs file (a read every few KiB)
#   c  gzip -c of it
#   d  a 100,000-iteration sh loop
#   e  300 fork+exec of /bin/true
# plus a–c natively on the host (same binaries, the file in /dev/shm). Each workload is timed on
# the host from the guest's serial output (BEGIN/END markers), so every engine is measured by
# the same clock. Prints seconds per workload and engine, and the ratios the hybrid engine is
# held to: (a) hybrid vs native (target ≤ 1.05), every workload hybrid vs the better of bt and
# always-KVM (target ≤ 1.10) and hybrid vs QEMU TCG (target ≤ 0.5).
#
#   benches/linux-guest.sh            (every run is bounded: BOUND seconds, default 240; QEMU TCG
#                                      hangs now and then, so a hung QEMU run is retried, 3 tries)
#   ROUNDS=3 benches/linux-guest.sh   (every engine and the native runs ROUNDS times, interleaved
#                                      round by round; each cell is the median of its rounds —
#                                      the hosts' speed drifts by ±10–30% within minutes;
#                                      a second table gives each cell's fastest and slowest round)
#
# Needs gcc, busybox-static, cpio, linux-image-cloud-amd64 and qemu-system-x86 (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
BOUND=${BOUND:-240}
ROUNDS=${ROUNDS:-1}
MEM=512
APPEND="console=ttyS0 panic=-1"
kernel=$(ls /boot/vmlinuz-* | sort | tail -1)
cargo build --release -q
HBT=$PWD/target/release/hbt
work=$(mktemp -d)
trap 'rm -rf "$work" /dev/shm/hbt-linux-guest.bin' EXIT
gcc -O2 -static -o "$work/spin-hash" guests/linux/spin_hash.c
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
dd if=/dev/urandom of=/tmp/f bs=1M count=64 2>/dev/null
echo "READY"
echo "BEGIN a"; /spin-hash 1000; echo "END a"
echo "file: $(wc -c < /tmp/f) bytes"
echo "BEGIN b"; sha256sum /tmp/f; echo "END b"
echo "BEGIN c"; gzip -c /tmp/f | wc -c; echo "END c"
echo "BEGIN d"; i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo "END d"
echo "BEGIN e"; i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done; echo "END e"
echo "DONE"
reboot -f
INIT
scripts/busybox-initramfs.sh "$work/initramfs.cpio" "$work/init" "$work/spin-hash"

# Runs a guest command line; prints "a=<s> b=<s> ..." from the BEGIN/END markers, or "hang"
# (then the run's console and stderr are kept in /tmp/hbt-linux-guest-<engine>.log, named on
# stderr: the first argument is the engine's name).
timed() {
  python3 - "$BOUND" "$@" <<'PY'
import subprocess, sys, threading, time
bound = float(sys.argv[1]); name = sys.argv[2]; cmd = sys.argv[3:]
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
timer = threading.Timer(bound, p.kill); timer.start()
begin, took, log = {}, {}, []
for line in p.stdout:
    now = time.monotonic()
    log.append(line)
    words = line.decode(errors="replace").split()
    if len(words) == 2 and words[0] == "BEGIN": begin[words[1]] = now
    if len(words) == 2 and words[0] == "END" and words[1] in begin: took[words[1]] = now - begin[words[1]]
status = p.wait(); killed = not timer.is_alive(); timer.cancel()
if len(took) == 5:
    print(" ".join(f"{k}={v:.3f}" for k, v in sorted(took.items())))
else:
    path = f"/tmp/hbt-linux-guest-{name}.log"
    open(path, "wb").write(b"".join(log))
    why = f"killed after {bound:.0f} s" if killed else f"exit status {status}"
    print(f"{name}: {len(took)} of 5 workloads finished ({why}); output in {path}", file=sys.stderr)
    print("hang")
PY
}

# Native a–c with the same binaries.
native() {
  python3 - "$work/spin-hash" <<'PY'
import subprocess, sys, time
spin = sys.argv[1]; f = "/dev/shm/hbt-linux-guest.bin"
subprocess.run(["dd", "if=/dev/urandom", f"of={f}", "bs=1M", "count=64"], check=True, capture_output=True)
out = {}
for k, cmd in [("a", [spin, "1000"]), ("b", ["busybox", "sha256sum", f]), ("c", ["sh", "-c", f"busybox gzip -c {f} | wc -c"])]:
    t = time.monotonic(); subprocess.run(cmd, check=True, capture_output=True); out[k] = time.monotonic() - t
print(" ".join(f"{k}={v:.3f}" for k, v in sorted(out.items())))
PY
}

# Each engine's entry is its rounds' results, separated by ";".
declare -A result
hbt_cmd=("$HBT" run --mem $MEM --initrd "$work/initramfs.cpio" --append "$APPEND")
# QEMU TCG: the guest kernel is told the TSC rate (the host's, from /proc/cpuinfo): its
# calibration against the PIT fails under TCG on a slow host and the boot then hangs for good
# ("tsc: Unable to calibrate against PIT" — every try on an Intel SPR host in a slow phase).
# Only boot calibration changes; the workloads are timed on the host clock.
tsc_khz=$(awk '/^cpu MHz/ {printf "%d", $4 * 1000; exit}' /proc/cpuinfo)
command -v qemu-system-x86_64 >/dev/null || echo "qemu-system-x86_64 not installed: no TCG column" >&2
for round in $(seq 1 "$ROUNDS"); do
  [ "$ROUNDS" = 1 ] || echo "round $round of $ROUNDS" >&2
  result[native]+="$(native);"
  result[hybrid]+="$(timed hybrid "${hbt_cmd[@]}" --accel hybrid "$kernel");"
  result[always-kvm]+="$(timed always-kvm "${hbt_cmd[@]}" --accel hybrid --hybrid-policy always-kvm "$kernel");"
  result[bt]+="$(timed bt "${hbt_cmd[@]}" --accel bt "$kernel");"
  tcg=hang
  if command -v qemu-system-x86_64 >/dev/null; then
    for try in 1 2 3; do
      tcg=$(timed qemu-tcg qemu-system-x86_64 -M microvm -accel tcg -cpu max -m $MEM -nodefaults -no-user-config \
        -nographic -no-reboot -serial stdio -kernel "$kernel" -initrd "$work/initramfs.cpio" \
        -append "$APPEND${tsc_khz:+ tsc_early_khz=$tsc_khz}")
      [ "$tcg" = hang ] || break
      echo "qemu-system-x86_64 (TCG) hung past ${BOUND}s (try $try of 3)" >&2
    done
  fi
  result[qemu-tcg]+="$tcg;"
done

python3 - "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" \
  "${result[native]}" "${result[hybrid]}" "${result[always-kvm]}" "${result[bt]}" "${result[qemu-tcg]}" <<'PY'
import statistics, sys
host, *cols = sys.argv[1:]
names = ["native", "hybrid", "always-kvm", "bt", "qemu-tcg"]
def samples(rounds):
    """Each workload's times over the rounds that finished it."""
    seen = {}
    for s in filter(None, rounds.split(";")):
        if s != "hang":
            for k, v in (w.split("=") for w in s.split()):
                seen.setdefault(k, []).append(float(v))
    return seen
rounds = max(c.count(";") for c in cols)
every = dict(zip(names, map(samples, cols)))
r = {n: {k: statistics.median(v) for k, v in every[n].items()} for n in names}
work = {"a": "spin-hash (CPU, no syscalls)", "b": "sha256sum 64 MiB", "c": "gzip -c 64 MiB",
        "d": "sh loop 100k", "e": "300 fork+exec"}
each = "one boot per engine" if rounds == 1 else f"medians of {rounds} rounds, one boot per engine per round"
print(f"host: {host}; guest: 512 MiB, Debian kernel, busybox; seconds (host clock, {each})")
print(f"{'workload':30}" + "".join(f"{n:>11}" for n in names) + f"{'hyb/best':>10}{'hyb/tcg':>9}")
for k, label in work.items():
    row = f"{k} {label:28}" + "".join(f"{r[n][k]:>11.3f}" if k in r[n] else f"{'-':>11}" for n in names)
    h = r["hybrid"].get(k)
    best = min([r[n][k] for n in ("bt", "always-kvm") if k in r[n]], default=None)
    tcg = r["qemu-tcg"].get(k)
    row += f"{h / best:>10.2f}" if h and best else f"{'-':>10}"
    row += f"{h / tcg:>9.2f}" if h and tcg else f"{'-':>9}"
    print(row)
if rounds > 1:
    print("spread (fastest-slowest round):")
    for k in work:
        print(f"{k} {'':28}" + "".join(
            f"{min(every[n][k]):>5.2f}-{max(every[n][k]):<5.2f}" if k in every[n] else f"{'-':>11}" for n in names))
if "a" in r["hybrid"] and "a" in r["native"]:
    print(f"(a) hybrid / native: {r['hybrid']['a'] / r['native']['a']:.2f} (target <= 1.05)")
for n in names[1:]:
    if not r[n]: print(f"{n}: did not finish (hung past the bound)")
print("targets: hyb/best <= 1.10 (hybrid vs the better of bt and always-KVM), hyb/tcg <= 0.5")
PY

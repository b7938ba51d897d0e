#!/usr/bin/env bash
# Boots the installed Debian kernel (linux-image-cloud-amd64) with the same busybox initramfs,
# memory size and command line under `hbt run --accel bt` (no KVM) and under QEMU TCG
# (`qemu-system-x86_64 -M microvm -accel tcg`), alternating, RUNS times each (default 5), every
# run bounded (QEMU TCG sometimes hangs). Reports medians of the wall time to the /init marker
# and to the end of the run (/init reboots: hbt ends on the i8042 reset, QEMU on -no-reboot),
# and the ratio hbt/QEMU. Target: ≤ 1.0. hbt runs twice per round: as by default (hbt
# decompresses the LZ4 kernel natively and places it) and with `--decompress guest` (the
# bzImage's decompressor runs in the translator, as QEMU runs it in TCG: like for like). Then
# shows where hbt's time goes (`--stats`).
#
#   benches/linux-boot.sh [RUNS]
#
# Needs qemu-system-x86, busybox-static, cpio and linux-image-cloud-amd64 (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
BOUND=${BOUND:-120}
MEM=512
APPEND="console=ttyS0 panic=-1"
kernel=$(ls /boot/vmlinuz-* | sort | tail -1)
command -v qemu-system-x86_64 >/dev/null || { echo "needs qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }
cargo build --release -q
HBT=$PWD/target/release/hbt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo "HBT-BENCH-INIT"
uname -r
reboot -f
INIT
scripts/busybox-initramfs.sh "$work/initramfs.cpio" "$work/init"

# Runs a command, prints "<seconds to the marker> <seconds to its end>" (or "hang hang").
timed() {
  python3 - "$BOUND" "$@" <<'PY'
import subprocess, sys, threading, time
bound = float(sys.argv[1]); cmd = sys.argv[2:]
start = time.monotonic(); marker = None
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
# A guest that hangs silently never sends a line: a timer kills it at the bound.
killed = threading.Event()
def kill():
    killed.set(); p.kill()
timer = threading.Timer(bound, kill); timer.start()
for line in p.stdout:
    if marker is None and b"HBT-BENCH-INIT" in line:
        marker = time.monotonic() - start
p.wait(); timer.cancel()
end = time.monotonic() - start
print(f"{marker:.3f} {end:.3f}" if marker is not None and not killed.is_set() else "hang hang")
PY
}

hbt_cmd=("$HBT" run --accel bt --timeout "$BOUND" --mem "$MEM" --initrd "$work/initramfs.cpio" --append "$APPEND" "$kernel")
qemu_cmd=(qemu-system-x86_64 -M microvm -accel tcg -cpu max -m "$MEM" -nodefaults -no-user-config -nographic
  -no-reboot -serial stdio -kernel "$kernel" -initrd "$work/initramfs.cpio" -append "$APPEND")
hi=() he=() gi=() ge=() qi=() qe=() hangs_h=0 hangs_g=0 hangs_q=0
for i in $(seq "$RUNS"); do
  read -r a b < <(timed "${hbt_cmd[@]}")
  if [ "$a" = hang ]; then hangs_h=$((hangs_h + 1)); else hi+=("$a"); he+=("$b"); fi
  read -r e f < <(timed "${hbt_cmd[@]}" --decompress guest)
  if [ "$e" = hang ]; then hangs_g=$((hangs_g + 1)); else gi+=("$e"); ge+=("$f"); fi
  read -r c d < <(timed "${qemu_cmd[@]}")
  if [ "$c" = hang ]; then hangs_q=$((hangs_q + 1)); else qi+=("$c"); qe+=("$d"); fi
  echo "run $i: hbt init $a s, end $b s; hbt (guest decompresses) init $e s, end $f s; qemu-tcg init $c s, end $d s" >&2
done
median() { sort -n | awk '{a[NR]=$1} END{ if (NR) print a[int((NR+1)/2)]; else print "nan" }'; }
m() { printf '%s\n' "$@" | median; }
mhi=$(m "${hi[@]}"); mhe=$(m "${he[@]}"); mgi=$(m "${gi[@]}"); mge=$(m "${ge[@]}"); mqi=$(m "${qi[@]}"); mqe=$(m "${qe[@]}")
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); kernel $(basename "$kernel"); $MEM MiB; \"$APPEND\""
printf '%-22s %10s %10s\n' "medians of $RUNS" "to /init" "to end"
printf '%-34s %9ss %9ss   (%d hung past %ss)\n' "hbt --accel bt" "$mhi" "$mhe" "$hangs_h" "$BOUND"
printf '%-34s %9ss %9ss   (%d hung past %ss)\n' "hbt --accel bt --decompress guest" "$mgi" "$mge" "$hangs_g" "$BOUND"
printf '%-34s %9ss %9ss   (%d hung past %ss)\n' "qemu -accel tcg" "$mqi" "$mqe" "$hangs_q" "$BOUND"
if [ "$mqi" != nan ] && [ "$mhi" != nan ] && [ "$mgi" != nan ]; then
  printf 'hbt/qemu: %.2f to /init, %.2f to the end (target ≤ 1.0)\n' "$(echo "$mhi / $mqi" | bc -l)" "$(echo "$mhe / $mqe" | bc -l)"
  printf 'hbt (guest decompresses)/qemu: %.2f to /init, %.2f to the end\n' "$(echo "$mgi / $mqi" | bc -l)" "$(echo "$mge / $mqe" | bc -l)"
fi
echo "--- where hbt's time goes (one more run, --stats) ---"
"${hbt_cmd[@]}" --stats 2>&1 >/dev/null | grep -E '^  (time|soft-MMU|translator|emulated|exceptions|interrupts|unimplemented|port)'

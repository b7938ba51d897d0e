#!/usr/bin/env bash
# hbt's main job on a built-in default: boots this machine's Debian kernel
# (linux-image-cloud-amd64) with a busybox initramfs under `hbt run`'s default engine (hybrid
# where /dev/kvm works: kernel code translated, user code under KVM; bt otherwise), runs a few
# commands in the guest and powers it off. Prints the guest's console and how long the boot and
# the whole run took. Installs the Debian packages it needs if they are missing (apt-get, with
# sudo when not root) and builds hbt.
#
#   scripts/boot-linux.sh [hbt run options...]     e.g. --accel bt, --stats
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in linux-image-cloud-amd64 busybox-static cpio; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing ${need[*]} (Debian packages)" >&2
  $sudo apt-get update -q=2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q=2 --no-install-recommends "${need[@]}" >/dev/null
fi
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort | tail -1)
[ -n "$kernel" ] || { echo "no /boot/vmlinuz-*: install linux-image-cloud-amd64" >&2; exit 1; }
echo "building hbt (cargo build --release)" >&2
cargo build --release -q
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo "--- guest: up $(cut -d' ' -f1 /proc/uptime) s after the kernel started"
uname -a
grep -m1 "model name" /proc/cpuinfo
echo "6 * 7 = $((6 * 7)); ls /: $(ls / | tr '\n' ' ')"
echo hello | sha256sum
echo "--- guest: powering off"
poweroff -f
INIT
scripts/busybox-initramfs.sh "$work/initramfs.cpio" "$work/init"
echo "booting $kernel" >&2
start=$(date +%s.%N)
status=0
target/release/hbt run --mem 512 --initrd "$work/initramfs.cpio" --append "console=ttyS0 quiet panic=-1" "$@" "$kernel" || status=$?
end=$(date +%s.%N)
echo "hbt run: guest powered off after $(awk "BEGIN { printf \"%.2f\", $end - $start }") s wall (exit status $status)" >&2
exit $status

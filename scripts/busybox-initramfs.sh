#!/usr/bin/env bash
# Builds a busybox initramfs (newc cpio, uncompressed: every kernel can unpack it) for booting a
# Linux guest under `hbt run`: busybox-static as /bin/busybox, INIT as /init, the mount points
# it needs, and any FILE arguments copied to its root. The kernel's own built-in initramfs
# supplies /dev/console. A dynamically linked FILE brings its loader and libraries (as `ldd`
# lists them), at the same paths.
#
#   scripts/busybox-initramfs.sh OUT.cpio INIT [FILE...]
#
# Needs busybox-static and cpio (Debian packages of those names).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT.cpio INIT [FILE...]" >&2; exit 2; }
out=$1 init=$2
shift 2
# busybox-static's binary (a dynamic busybox would need its libraries in the initramfs).
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "$0: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
command -v cpio >/dev/null || { echo "$0: cpio not found (apt-get install cpio)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp "$busybox" "$root/bin/busybox"
cp "$init" "$root/init"
chmod 755 "$root/init" "$root/bin/busybox"
for f in "$@"; do
  cp "$f" "$root/"
  if ldd "$f" >/dev/null 2>&1; then
    for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  fi
done
out_abs=$(realpath -m "$out")
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0 > "$out_abs")

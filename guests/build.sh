#!/usr/bin/env bash
# Builds every test guest in guests/ into test-images/NAME.img (a static x86-64 ELF that hbt
# enters in long mode). Reproducible: the checked-in images must equal what this produces
# (`guests/build.sh --check` compares instead of writing; .ci/run runs it).
set -euo pipefail
cd "$(dirname "$0")"
out=../test-images
check=${1:-}
CFLAGS=(-O2 -ffreestanding -fno-pic -fno-stack-protector -fno-asynchronous-unwind-tables -mno-red-zone
        -mno-sse -mno-mmx -mno-80387 -mgeneral-regs-only -nostdlib -static -Wall -Werror)
LDFLAGS=(-no-pie -Wl,-T,runtime/link.ld -Wl,--build-id=none -Wl,-n -Wl,--no-warn-rwx-segments -Wl,--strip-all)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The rest of the runtime (runtime/*.c but rt.c) is an archive: a guest links only the parts it
# calls, so helpers added there leave every other image unchanged.
for rt in runtime/*.c; do
  [ "$rt" = runtime/rt.c ] || gcc -c "${CFLAGS[@]}" -o "$tmp/$(basename "${rt%.c}").o" "$rt"
done
ar rcD "$tmp/librt.a" "$tmp"/*.o
status=0
for src in *.c; do
  name=${src%.c}; name=${name//_/-}
  gcc "${CFLAGS[@]}" "${LDFLAGS[@]}" -o "$tmp/$name.img" runtime/start.S runtime/rt.c "$src" "$tmp/librt.a"
  if [ "$check" = --check ]; then
    if ! cmp -s "$tmp/$name.img" "$out/$name.img"; then
      echo "test-images/$name.img differs from what guests/build.sh builds (rebuild and commit)" >&2
      status=1
    fi
  else
    mkdir -p "$out"; cp "$tmp/$name.img" "$out/$name.img"
  fi
done
exit $status

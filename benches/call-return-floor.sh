#!/usr/bin/env bash
# How fast can a translated call/return loop be? The calls kernel of benches/translate.rs
# (`L: call f; dec rcx; jnz L` / `f: add rax,rcx; ret`) written out by hand in the shapes the
# translator could emit, as static programs timed in one run (medians of RUNS, 1e9 iterations):
# - native:     the kernel itself (call/ret, predicted by the return stack buffer);
# - translated: what hbt emits under identity for a call it does not inline (push of the literal
#               return address, jump; R11/RCX spilled, `pop r11`, flag-free inline-cache
#               compare, RCX and R11 reloaded). The kernel's own call is to a leaf in the same
#               page, which the block builder inlines (block.rs): that runs at ~1.0x native;
#               this script is about every other call (callee in another page, not a leaf);
# - no-spill:   the floor for any translation that keeps guest return addresses on the guest
#               stack: no spills, and a `cmp`/`jne` that simply clobbers the guest's flags.
# If no-spill is already ~2x native, no dispatch design brings a dispatched return much below 2x.
# Needs `as` and `ld` (binutils). Usage: benches/call-return-floor.sh [RUNS]
set -euo pipefail
RUNS=${1:-5}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

prologue='.intel_syntax noprefix
.globl _start
.text
_start:
lea rbx, [rip+spill]
xor eax, eax
mov rcx, 1000000000'
epilogue='mov eax, 60
xor edi, edi
syscall
miss: ud2
.data
.p2align 6
spill: .quad 0, 0'

# $1 = name, $2 = body of the callee block after `add rax, rcx`
translated_shape() {
  cat >"$dir/$1.s" <<EOF
$prologue
.p2align 6
A: push qword ptr [rip+litA]
jmp B
litA: .quad C
.p2align 6
B: add rax, rcx
$2
.p2align 6
Cp: mov r11, [rbx]
C: dec rcx
jnz A
$epilogue
EOF
}

cat >"$dir/native.s" <<EOF
$prologue
.p2align 6
A: call B
dec rcx
jnz A
$epilogue
.text
.p2align 6
B: add rax, rcx
ret
EOF
translated_shape translated 'mov [rbx], r11
mov [rbx+8], rcx
pop r11
movabs rcx, -C
lea rcx, [rcx+r11]
jrcxz hit
jmp miss
hit: mov rcx, [rbx+8]
jmp Cp'
translated_shape no-spill 'pop r11
cmp r11, [rip+litB]
jne miss
jmp C
litB: .quad C'

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
declare -A t
for shape in native translated no-spill; do
  as -o "$dir/$shape.o" "$dir/$shape.s"
  ld -o "$dir/$shape" "$dir/$shape.o"
done
for shape in native translated no-spill; do
  t[$shape]=$(for _ in $(seq "$RUNS"); do
    s=$(date +%s.%N); "$dir/$shape"; e=$(date +%s.%N); echo "$e - $s" | bc -l
  done | median)
done
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
for shape in native translated no-spill; do
  printf '%-11s %6.3f s  %5.2fx native\n' "$shape" "${t[$shape]}" "$(echo "${t[$shape]} / ${t[native]}" | bc -l)"
done
echo "(medians of $RUNS runs, 1e9 iterations each)"

/* compat-mode: 32-bit code at CPL3 (IA-32e compatibility mode: a code segment with L clear and
 * D set), as a 64-bit kernel runs 32-bit programs. IRETQ enters a 32-bit routine that works
 * through what such code is made of — 4-byte push/pop/call/ret (and `ret imm16`), `inc`/`dec`
 * r32 (0x40-0x4f, REX prefixes in 64-bit mode), a jump table, an indirect call through memory,
 * `loop`/`jecxz`, string instructions on ESI/EDI/ECX, `pushfd`/`popfd`, absolute [disp32]
 * operands, `leave`, `cdq`/`idiv`, `bswap` — leaving its results in memory, then faults out
 * with `cli` (#GP(0) at CPL3). Exceptions from 32-bit code (#UD, #DE) arrive with the 32-bit CS
 * in the frame. One code address is run as 32-bit code, then as 64-bit code, then as 32-bit
 * code again: its bytes mean different instructions in the two modes (`48 ff c0` is
 * `dec eax; inc eax` or `inc rax`), so a translation of one must never serve the other. A far
 * jump (ptr16:32) from 32-bit code into 64-bit code at CPL3 and a far jump through memory
 * (m16:32) back switch modes without the kernel, as a program's own "gate" would. The
 * transcript is the same under every engine: under `--accel kvm` the CPU itself runs it. */
#include "runtime/rt.h"

#define USER32_CS (0x38 | 3)

static u64 gdt32[8];
struct table { u16 limit; u64 base; } __attribute__((packed));
static u8 user_stack[8192] __attribute__((aligned(16)));
/* The 32-bit routine's results (it finds this array in EBX). */
static volatile u32 res[24];

u64 to_user(u64 rip, u64 rsp, u64 rflags, u64 cs, u64 ss, u64 rax);
volatile u64 kernel_rsp;
extern char back_to_kernel[], c32_main[], c32_ud2[], c32_div0[], dual[], c32_gate[];
__asm__(".globl to_user\n"
        "to_user:\n"
        "    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
        "    mov %rsp, kernel_rsp(%rip)\n"
        "    push %r8\n push %rsi\n push %rdx\n push %rcx\n push %rdi\n"
        "    mov %r9, %rax\n"
        "    lea res(%rip), %rbx\n"
        "    iretq\n"
        ".globl back_to_kernel\n"
        "back_to_kernel:\n"
        "    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
        "    ret\n"
        ".code32\n"
        ".globl c32_main\n"
        "c32_main:\n"
        /* 1. The stack: 4-byte slots, a call and `ret $4`. */
        "    mov %esp, %ebp\n"
        "    push $0x11223344\n"
        "    pushl (%ebx)\n"
        "    pop %eax\n"
        "    pop %ecx\n"
        "    mov %eax, 4(%ebx)\n"
        "    mov %ecx, 8(%ebx)\n"
        "    push $7\n"
        "    call c32_add3\n"
        "    mov %eax, 12(%ebx)\n"
        "    mov %ebp, %edx\n"
        "    sub %esp, %edx\n"
        "    mov %edx, 16(%ebx)\n"
        /* 2. inc/dec r32: one-byte forms. */
        "    mov $5, %esi\n"
        "    inc %esi\n inc %esi\n dec %esi\n inc %esi\n"
        "    mov %esi, 20(%ebx)\n"
        /* 3. A jump table, and an indirect call through memory. */
        "    mov $2, %eax\n"
        "    jmp *c32_table(,%eax,4)\n"
        "c32_case0: mov $100, %edi; jmp c32_cases_done\n"
        "c32_case1: mov $200, %edi; jmp c32_cases_done\n"
        "c32_case2: mov $300, %edi\n"
        "c32_cases_done:\n"
        "    mov %edi, 24(%ebx)\n"
        "    push $40\n"
        "    call *c32_fnptr\n"
        "    mov %eax, 28(%ebx)\n"
        /* 4. loop and jecxz. */
        "    mov $10, %ecx\n"
        "    xor %eax, %eax\n"
        "1:  add %ecx, %eax\n"
        "    loop 1b\n"
        "    jecxz 2f\n"
        "    mov $-1, %eax\n"
        "2:  mov %eax, 32(%ebx)\n"
        /* 5. String instructions. */
        "    cld\n"
        "    lea c32_text, %esi\n"
        "    lea c32_copy, %edi\n"
        "    mov $12, %ecx\n"
        "    rep movsb\n"
        "    mov %esi, %eax\n"
        "    sub $c32_text, %eax\n"
        "    mov %eax, 36(%ebx)\n"
        "    lea c32_copy, %edi\n"
        "    xor %eax, %eax\n"
        "    mov $-1, %ecx\n"
        "    repne scasb\n"
        "    not %ecx\n"
        "    dec %ecx\n"
        "    mov %ecx, 40(%ebx)\n"
        "    lea c32_text, %esi\n"
        "    lea c32_copy, %edi\n"
        "    mov $12, %ecx\n"
        "    repe cmpsb\n"
        "    setz %al\n"
        "    movzbl %al, %eax\n"
        "    mov %eax, 44(%ebx)\n"
        "    lea c32_words, %edi\n"
        "    mov $0x41424344, %eax\n"
        "    mov $4, %ecx\n"
        "    rep stosl\n"
        "    lea c32_words, %esi\n"
        "    lodsl\n"
        "    lodsb\n"
        "    mov %eax, 48(%ebx)\n"
        /* 6. pushfd/popfd: status flags and CF through the stack. */
        "    push $0x8c5\n"
        "    popfl\n"
        "    pushfl\n"
        "    pop %eax\n"
        "    and $0x8d5, %eax\n"
        "    mov %eax, 52(%ebx)\n"
        /* 7. Absolute [disp32] operands (moffs and ModRM forms). */
        "    mov c32_abs, %eax\n"
        "    movl $0x5a5a, c32_abs2\n"
        "    add c32_abs2, %eax\n"
        "    mov %eax, 56(%ebx)\n"
        /* 8. leave, cdq/idiv, bswap. */
        "    push %ebp\n"
        "    mov %esp, %ebp\n"
        "    sub $20, %esp\n"
        "    leave\n"
        "    mov %ebp, %edx\n"
        "    sub %esp, %edx\n"
        "    mov %edx, 60(%ebx)\n"
        "    mov $-7, %eax\n"
        "    cdq\n"
        "    mov $2, %ecx\n"
        "    idiv %ecx\n"
        "    mov %eax, 64(%ebx)\n"
        "    mov %edx, 68(%ebx)\n"
        "    mov $0x12345678, %eax\n"
        "    bswap %eax\n"
        "    mov %eax, 72(%ebx)\n"
        "    cli\n"
        "3:  jmp 3b\n"
        "c32_add3:\n"
        "    mov 4(%esp), %eax\n"
        "    add $3, %eax\n"
        "    ret $4\n"
        ".globl c32_ud2\n"
        "c32_ud2: ud2\n"
        ".globl c32_div0\n"
        "c32_div0: xor %ecx, %ecx; div %ecx\n"
        /* Run in both modes: `dec eax; inc eax` (32-bit) or `inc rax` (64-bit), then cli. */
        ".globl dual\n"
        "dual: .byte 0x48, 0xff, 0xc0\n"
        "    cli\n"
        /* To 64-bit code and back by far jumps: RAX's upper half can only be set there. */
        ".globl c32_gate\n"
        "c32_gate: ljmp $0x23, $c64_part\n"
        "c32_back: mov %esp, %ebx\n"
        "    cli\n"
        ".code64\n"
        "c64_part: movabs $0x123456789, %rax\n"
        "    ljmp *c32_back_ptr(%rip)\n"
        ".data\n"
        ".balign 4\n"
        "c32_table: .long c32_case0, c32_case1, c32_case2\n"
        "c32_fnptr: .long c32_add3\n"
        "c32_abs: .long 0x1000\n"
        "c32_abs2: .long 0\n"
        "c32_text: .asciz \"thirty-two!\"\n"
        "c32_copy: .fill 16, 1, 0x55\n"
        "c32_words: .fill 20, 1, 0\n"
        "c32_back_ptr: .long c32_back\n .word 0x3b\n"
        ".text\n");

static volatile struct frame seen;
/* #GP, #UD, #DE from CPL3: keep the frame, then back to the kernel continuation. */
static int from_user(struct frame *f) {
    if (!(f->cs & 3))
        return 0;
    seen = *f;
    f->rip = (u64)back_to_kernel;
    f->cs = KERNEL_CS;
    f->ss = KERNEL_DS;
    f->rsp = kernel_rsp;
    f->rflags = 0x2;
    return 1;
}

#define check rt_check_that
static void show(const char *what, u64 v) {
    rt_puts(what);
    rt_put_hex(v);
    rt_puts("\n");
}

int main(void) {
    rt_set_trap(13, from_user);
    rt_set_trap(6, from_user);
    rt_set_trap(0, from_user);
    struct table g;
    __asm__ volatile("sgdt %0" : "=m"(g));
    for (int i = 0; i < 7; i++)
        gdt32[i] = ((u64 *)g.base)[i];
    gdt32[7] = 0x00cffa000000ffffUL; /* 32-bit user code, DPL3, flat */
    struct table n = {sizeof gdt32 - 1, (u64)gdt32};
    __asm__ volatile("lgdt %0" ::"m"(n));
    u64 top = (u64)user_stack + sizeof user_stack;

    res[0] = 0xa5a5a5a5;
    to_user((u64)c32_main, top, 0x2, USER32_CS, USER_DS, 0);
    show("32-bit routine left through vector ", seen.vector);
    show("  frame cs ", seen.cs);
    check("  #GP(0) at its cli, with the 32-bit CS", seen.vector == 13 && seen.error == 0 && seen.cs == USER32_CS);
    check("  its stack pointer back at the top", seen.rsp == top);
    show("  push/pop ", res[1]);
    show("  push/pop ", res[2]);
    check("  4-byte push and pop", res[1] == 0xa5a5a5a5 && res[2] == 0x11223344);
    check("  call and ret $4", res[3] == 10 && res[4] == 0);
    check("  inc/dec r32", res[5] == 7);
    check("  jump table and call through memory", res[6] == 300 && res[7] == 43);
    check("  loop and jecxz", res[8] == 55);
    check("  rep movsb, repne scasb, repe cmpsb", res[9] == 12 && res[10] == 11 && res[11] == 1);
    show("  lodsl; lodsb ", res[12]);
    check("  rep stosl and lods", res[12] == 0x41424344);
    show("  popfd then pushfd ", res[13]);
    check("  pushfd/popfd", res[13] == 0x8c5);
    check("  absolute operands", res[14] == 0x1000 + 0x5a5a);
    check("  leave", res[15] == 0);
    check("  cdq/idiv and bswap", res[16] == (u32)-3 && res[17] == (u32)-1 && res[18] == 0x78563412);

    to_user((u64)c32_ud2, top, 0x2, USER32_CS, USER_DS, 0);
    check("ud2 in 32-bit code: #UD at it", seen.vector == 6 && seen.rip == (u64)c32_ud2 && seen.cs == USER32_CS);
    to_user((u64)c32_div0, top, 0x2, USER32_CS, USER_DS, 0);
    check("div by zero in 32-bit code: #DE at the div", seen.vector == 0 && seen.rip == (u64)c32_div0 + 2);

    u64 as32[2], as64;
    to_user((u64)dual, top, 0x2, USER32_CS, USER_DS, 5);
    as32[0] = seen.rax;
    to_user((u64)dual, top, 0x2, USER_CS, USER_DS, 5);
    as64 = seen.rax;
    to_user((u64)dual, top, 0x2, USER32_CS, USER_DS, 5);
    as32[1] = seen.rax;
    show("one address as 32-bit code: rax ", as32[0]);
    show("as 64-bit code: rax ", as64);
    show("as 32-bit code again: rax ", as32[1]);
    check("each mode runs its own instructions", as32[0] == 5 && as64 == 6 && as32[1] == 5 && seen.cs == USER32_CS);

    to_user((u64)c32_gate, top, 0x2, USER32_CS, USER_DS, 0);
    show("far jumps to 64-bit code and back: rax ", seen.rax);
    show("  frame cs ", seen.cs);
    check("  the 64-bit part ran and the 32-bit part after it", seen.rax == 0x123456789 && seen.cs == USER32_CS && seen.rbx == top);

    rt_puts(rt_failures ? "compat-mode: FAILED\n" : "compat-mode: ok\n");
    return rt_failures ? 1 : 0;
}

/* serialize: SERIALIZE as a guest uses it. The CPU model of the translator's engines offers it
 * on any host (vmm/cpuid.rs, CLAIMED), and Linux's sync_core then runs it after every text
 * patch instead of an IRETQ to itself. Prints whether CPUID offers it; where it does:
 * - CPL0, as sync_core: an instruction rewritten, SERIALIZE, the instruction run (the new
 *   immediate must be seen), three times;
 * - CPL3, with every general register, RSP and the status flags set to known values around it
 *   (they must come back unchanged): under hybrid, user code runs under KVM, where a host
 *   without SERIALIZE raises #UD, and hbt re-runs the instruction in the translator — the
 *   guest's own #UD handler must never run. */
#include "runtime/rt.h"

static u8 code[16] __attribute__((aligned(16)));
static volatile u64 ud_count;
u64 before[16], after[16]; /* global: the asm below names them */

static int on_ud(struct frame *f) {
    (void)f;
    ud_count++;
    return 0;
}

static inline void serialize(void) { __asm__ volatile(".byte 0x0f, 0x01, 0xe8" ::: "memory"); }

/* Runs SERIALIZE with RAX..R15 (but RSP) loaded from `before` and RFLAGS from `before[4]`
 * (RSP's slot), and stores them, RFLAGS in slot 4, into `after`. */
void serialize_with_registers(void);
__asm__(".globl serialize_with_registers\n"
        "serialize_with_registers:\n"
        "    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
        "    lea before(%rip), %rax\n"
        "    mov 8(%rax), %rcx; mov 16(%rax), %rdx; mov 24(%rax), %rbx\n"
        "    mov 40(%rax), %rbp; mov 48(%rax), %rsi; mov 56(%rax), %rdi\n"
        "    mov 64(%rax), %r8; mov 72(%rax), %r9; mov 80(%rax), %r10; mov 88(%rax), %r11\n"
        "    mov 96(%rax), %r12; mov 104(%rax), %r13; mov 112(%rax), %r14; mov 120(%rax), %r15\n"
        "    push 32(%rax); popfq\n" /* the status flags to run with, from RSP's slot */
        "    mov 0(%rax), %rax\n"
        "    .byte 0x0f, 0x01, 0xe8\n"
        "    pushfq\n"
        "    push %rax\n"
        "    lea after(%rip), %rax\n"
        "    pop 0(%rax)\n"
        "    pop 32(%rax)\n"
        "    mov %rcx, 8(%rax); mov %rdx, 16(%rax); mov %rbx, 24(%rax)\n"
        "    mov %rbp, 40(%rax); mov %rsi, 48(%rax); mov %rdi, 56(%rax)\n"
        "    mov %r8, 64(%rax); mov %r9, 72(%rax); mov %r10, 80(%rax); mov %r11, 88(%rax)\n"
        "    mov %r12, 96(%rax); mov %r13, 104(%rax); mov %r14, 112(%rax); mov %r15, 120(%rax)\n"
        "    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
        "    ret\n");

#define STATUS_FLAGS 0x8d5UL /* CF PF AF ZF SF OF */

static void user_part(void) {
    for (int i = 0; i < 16; i++) before[i] = 0x0123456789abcdefUL * (i + 1) ^ (u64)i << 56;
    before[4] = 0x2 | 0x200 | 0x8d5; /* RFLAGS with every status flag set (and IF) */
    serialize_with_registers();
    int same = 1;
    for (int i = 0; i < 16; i++)
        same &= i == 4 ? (after[4] & STATUS_FLAGS) == (before[4] & STATUS_FLAGS) : after[i] == before[i];
    rt_user_return(same);
}

static u32 run(void) { return ((u32(*)(void))code)(); }

int main(void) {
    u32 a = 0, b, c, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d));
    a = 7; c = 0;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    int offered = (d >> 14) & 1;
    rt_puts(offered ? "CPUID offers serialize\n" : "CPUID does not offer serialize\n");
    if (!offered) {
        rt_puts("serialize: ok\n");
        return 0;
    }
    rt_set_trap(6, on_ud);
    const u8 mov_eax_ret[] = {0xb8, 0, 0, 0, 0, 0xc3}; /* mov eax, imm32; ret */
    for (int i = 0; i < 6; i++) code[i] = mov_eax_ret[i];
    int patched = 1;
    for (u32 v = 1; v <= 3; v++) {
        *(volatile u32 *)(code + 1) = 0x1111111 * v;
        serialize();
        patched &= run() == 0x1111111 * v;
    }
    rt_puts(patched ? "CPL0: each rewrite seen after serialize\n" : "CPL0: a rewrite was NOT seen\n");
    u64 kept = rt_enter_user(user_part);
    rt_puts(kept ? "CPL3: registers and status flags kept\n" : "CPL3: registers or flags CHANGED\n");
    rt_puts(ud_count ? "#UD reached the guest\n" : "no #UD reached the guest\n");
    int ok = patched && kept && !ud_count;
    rt_puts(ok ? "serialize: ok\n" : "serialize: FAILED\n");
    return ok ? 0 : 1;
}

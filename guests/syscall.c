/* syscall: SYSCALL/SYSRETQ round trips between CPL3 and a kernel entry that does what an OS
 * entry does: SWAPGS to its per-CPU area, its own stack, a value read through gs:, SWAPGS back,
 * SYSRETQ. Checked: RCX (the address after `syscall`) and R11 (RFLAGS before it, here with DF
 * and AC set) in the kernel and back at CPL3; SFMASK (IF, TF, DF, AC) cleared at the entry;
 * RFLAGS restored at CPL3; the user GS base intact at CPL3 and the kernel's back in
 * KERNEL_GS_BASE; the count of round trips, kept in the per-CPU area.
 *
 * kvm_pvm: a CPL3 `syscall` sets RCX, R11 and RFLAGS and jumps to LSTAR, but leaves CS at the
 * user selector, so the entry's first instruction (`swapgs`) runs at CPL3 and raises #GP
 * (measured: the #GP frame has CS 0x23 and RIP = LSTAR). The #GP handler below completes what
 * `syscall` left undone: it returns to LSTAR with the kernel's CS and SS, and the entry runs
 * at CPL0 as on a CPU (where that #GP never happens; hbt's translator never raises it either).
 * The transcript is the same under both engines; under KVM each round trip takes that detour. */
#include "runtime/rt.h"

#define ROUND_TRIPS 200
#define PERCPU_VALUE 0x7e57000000UL
#define SFMASK_FLAGS 0x40700UL /* AC, DF, IF, TF */
#define DF_AC 0x40400UL

/* The per-CPU area (KERNEL_GS_BASE) and the user's (GS_BASE); each starts with its address.
 * The entry below knows the offsets. */
struct percpu {
    u64 self, value, count, user_rsp, kernel_rsp, rcx, r11, rflags, gs0;
};
static struct percpu percpu;
static struct { u64 self; } user_area;
static u8 kernel_stack[4096] __attribute__((aligned(16)));

/* The LSTAR entry. RAX = 1: return RDI + the per-CPU value. RAX = 0: rt_user_return's request
 * to go back to the CPL0 caller of rt_enter_user (through the runtime's own entry). */
extern char syscall_entry[];
__asm__(".globl syscall_entry\n"
        "syscall_entry:\n"
        "    swapgs\n"
        "    mov %rsp, %gs:24\n"       /* user RSP */
        "    mov %gs:32, %rsp\n"       /* kernel stack */
        "    test %eax, %eax\n"
        "    jz 1f\n"
        "    pushfq\n"
        "    popq %gs:56\n"            /* RFLAGS at the entry (the status flags of `test`) */
        "    mov %rcx, %gs:40\n"
        "    mov %r11, %gs:48\n"
        "    incq %gs:16\n"            /* round trips */
        "    mov %gs:0, %rax\n"
        "    mov %rax, %gs:64\n"       /* GS base as the kernel sees it */
        "    mov %gs:8, %rax\n"
        "    add %rdi, %rax\n"
        "    mov %gs:24, %rsp\n"
        "    swapgs\n"
        "    sysretq\n"
        "1:  swapgs\n"
        "    jmp rt_syscall_entry\n");

/* At CPL3: `syscall` with RAX = 1, RDI = arg and DF, AC set; what it saw, in `out`. */
struct result { u64 before, after, rcx, r11, label, gs0; };
u64 user_syscall(u64 arg, struct result *out);
__asm__(".globl user_syscall\n"
        "user_syscall:\n"
        "    push %rbx\n"
        "    pushfq\n"
        "    pop %rbx\n"
        "    mov %rbx, %rax\n"
        "    or $0x40400, %rax\n"      /* DF | AC */
        "    push %rax\n"
        "    popfq\n"
        "    pushfq\n"
        "    pop %r8\n"
        "    mov $1, %eax\n"
        "    syscall\n"
        "1:  pushfq\n"
        "    pop %r9\n"
        "    push %rbx\n"
        "    popfq\n"                  /* DF, AC clear again before any memory access */
        "    mov %r8, 0(%rsi)\n"
        "    mov %r9, 8(%rsi)\n"
        "    mov %rcx, 16(%rsi)\n"
        "    mov %r11, 24(%rsi)\n"
        "    lea 1b(%rip), %rdx\n"
        "    mov %rdx, 32(%rsi)\n"
        "    mov %gs:0, %rdx\n"
        "    mov %rdx, 40(%rsi)\n"
        "    pop %rbx\n"
        "    ret\n");

/* kvm_pvm's half-done syscall (see the top): finish the switch to CPL0. */
static int lstar_at_cpl3(struct frame *f) {
    if (f->rip != (u64)syscall_entry || (f->cs & 3) != 3) return 0;
    f->cs = KERNEL_CS;
    f->ss = KERNEL_DS;
    return 1;
}

enum { BAD_VALUE = 1, BAD_FLAGS_AFTER = 2, BAD_RCX = 4, BAD_R11 = 8, BAD_USER_GS = 16,
       BAD_KERNEL_RCX = 32, BAD_KERNEL_R11 = 64, BAD_SFMASK = 128, BAD_KERNEL_GS = 256 };
static struct result last;

static void user_main(void) {
    u64 bad = 0;
    for (u64 i = 0; i < ROUND_TRIPS; i++) {
        struct result r;
        u64 v = user_syscall(i, &r);
        if (v != PERCPU_VALUE + i) bad |= BAD_VALUE;
        if (r.after != r.before || (r.before & DF_AC) != DF_AC) bad |= BAD_FLAGS_AFTER;
        if (r.rcx != r.label) bad |= BAD_RCX;
        if (r.r11 != r.before) bad |= BAD_R11;
        if (r.gs0 != (u64)&user_area) bad |= BAD_USER_GS;
        if (percpu.rcx != r.label) bad |= BAD_KERNEL_RCX;
        if (percpu.r11 != r.before) bad |= BAD_KERNEL_R11;
        if (percpu.rflags & SFMASK_FLAGS) bad |= BAD_SFMASK;
        if (percpu.gs0 != (u64)&percpu) bad |= BAD_KERNEL_GS;
        last = r;
    }
    rt_user_return(bad);
}

static int failures;
static void check(const char *what, int ok) {
    rt_puts(what);
    rt_puts(ok ? " ok\n" : " WRONG\n");
    failures += !ok;
}

int main(void) {
    rt_set_trap(13, lstar_at_cpl3);
    percpu = (struct percpu){.self = (u64)&percpu, .value = PERCPU_VALUE,
                             .kernel_rsp = (u64)kernel_stack + sizeof kernel_stack};
    user_area.self = (u64)&user_area;
    wrmsr(MSR_GS_BASE, (u64)&user_area);
    wrmsr(MSR_KERNEL_GS_BASE, (u64)&percpu);
    wrmsr(MSR_LSTAR, (u64)syscall_entry);
    wrmsr(MSR_SFMASK, SFMASK_FLAGS);
    u64 bad = rt_enter_user(user_main);

    rt_puts("round trips counted in the per-CPU area: "); rt_put_dec(percpu.count); rt_puts("\n");
    check("  all of them", percpu.count == ROUND_TRIPS);
    rt_puts("last: RFLAGS before syscall "); rt_put_hex(last.before);
    rt_puts(", R11 in the kernel "); rt_put_hex(percpu.r11); rt_puts("\n");
    rt_puts("last: RFLAGS at the entry "); rt_put_hex(percpu.rflags);
    rt_puts(", after sysretq "); rt_put_hex(last.after); rt_puts("\n");
    rt_puts("last: RCX in the kernel "); rt_put_hex(percpu.rcx);
    rt_puts(", after sysretq "); rt_put_hex(last.rcx);
    rt_puts(" (the instruction after syscall: "); rt_put_hex(last.label); rt_puts(")\n");
    rt_puts("gs:0 in the kernel "); rt_put_hex(percpu.gs0);
    rt_puts(" (per-CPU area "); rt_put_hex((u64)&percpu);
    rt_puts("), at CPL3 "); rt_put_hex(last.gs0);
    rt_puts(" (user area "); rt_put_hex((u64)&user_area); rt_puts(")\n");
    check("the value read through gs: in every round trip", !(bad & BAD_VALUE));
    check("RFLAGS back at CPL3 as before syscall", !(bad & BAD_FLAGS_AFTER));
    check("RCX at CPL3 and in the kernel: the return address", !(bad & (BAD_RCX | BAD_KERNEL_RCX)));
    check("R11 at CPL3 and in the kernel: RFLAGS before syscall", !(bad & (BAD_R11 | BAD_KERNEL_R11)));
    check("SFMASK flags clear at the entry", !(bad & BAD_SFMASK));
    check("GS base: the per-CPU area in the kernel, the user's at CPL3", !(bad & (BAD_USER_GS | BAD_KERNEL_GS)));
    check("GS_BASE MSR at CPL0 afterwards: the user's", rdmsr(MSR_GS_BASE) == (u64)&user_area);
    check("KERNEL_GS_BASE MSR afterwards: the per-CPU area", rdmsr(MSR_KERNEL_GS_BASE) == (u64)&percpu);
    rt_puts(failures ? "syscall: FAILED\n" : "syscall: ok\n");
    return failures ? 1 : 0;
}

/* iretq: IRETQ from CPL0 to CPL3 with a frame built by hand, and back to CPL0 through int3 (a
 * DPL3 gate), several round trips with different RFLAGS and RSP. The int3 frame shows what
 * CPL3 ran with: CS and SS with RPL 3, RFLAGS exactly as given (IF set or clear, status
 * flags), RSP as given (odd ones included), RBX carried across. IOPL 0 at CPL3 makes `cli`
 * fault (#GP(0)). IRETQ frames with mismatched privilege fault at the IRETQ: SS with RPL 0
 * for a CPL3 CS (#GP(SS)), and CS = the kernel's code selector with RPL 3 (#GP(CS)).
 * The way back to CPL0 is the int3 handler's own IRETQ to a kernel continuation.
 * kvm_pvm cannot run CPL3 with IOPL 3 (the RFLAGS it enters CPL3 with have IOPL 0 whatever the
 * frame says, so `cli` still faults), so IOPL 3 is not tried here; hbt's translator honours it. */
#include "runtime/rt.h"

#define MAGIC 0x1badb002c0ffeeUL
#define CF 0x1UL
#define PF 0x4UL
#define ZF 0x40UL
#define SF 0x80UL
#define IF 0x200UL
#define OF 0x800UL

static u8 user_stack[8192] __attribute__((aligned(16)));

/* u64 to_user(u64 rip, u64 rsp, u64 rflags, u64 cs, u64 ss): IRETQ to cs:rip with ss:rsp and
 * rflags, RBX = MAGIC; returns (to the caller, at CPL0) when the int3 handler sends CPL3 back
 * through `back_to_kernel`. */
u64 to_user(u64 rip, u64 rsp, u64 rflags, u64 cs, u64 ss);
volatile u64 kernel_rsp;
extern char back_to_kernel[], user_int3[], user_cli[], the_iretq[];
__asm__(".globl to_user\n"
        "to_user:\n"
        "    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
        "    mov %rsp, kernel_rsp(%rip)\n"
        "    push %r8\n"        /* SS */
        "    push %rsi\n"       /* RSP */
        "    push %rdx\n"       /* RFLAGS */
        "    push %rcx\n"       /* CS */
        "    push %rdi\n"       /* RIP */
        "    movabs $0x1badb002c0ffee, %rbx\n"
        ".globl the_iretq\n"
        "the_iretq:\n"
        "    iretq\n"
        ".globl back_to_kernel\n"
        "back_to_kernel:\n"
        "    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
        "    ret\n"
        ".globl user_int3\n"
        "user_int3:\n"
        "    int3\n"
        "1:  jmp 1b\n"
        ".globl user_cli\n"
        "user_cli:\n"
        "    cli\n"
        "    int3\n"
        "2:  jmp 2b\n");

static volatile struct frame seen;
static volatile u64 gp_error, gp_rip, gp_cs, gp_count;

/* int3 from CPL3: keep the frame, then IRETQ to back_to_kernel at CPL0 on the kernel stack. */
static int breakpoint(struct frame *f) {
    seen = *f;
    f->rip = (u64)back_to_kernel;
    f->cs = KERNEL_CS;
    f->ss = KERNEL_DS;
    f->rsp = kernel_rsp;
    f->rflags = 0x2;
    return 1;
}
/* #GP: from CPL3 (the `cli`), skip the instruction; from the IRETQ at CPL0, return to the
 * caller of to_user. */
static int general_protection(struct frame *f) {
    gp_count++; gp_error = f->error; gp_rip = f->rip; gp_cs = f->cs;
    if (f->cs & 3) { f->rip += 1; return 1; }
    if (f->rip != (u64)the_iretq) return 0;
    f->rip = (u64)back_to_kernel;
    f->rsp = kernel_rsp;
    return 1;
}

static int failures;
static void check(const char *what, int ok) {
    rt_puts(what);
    rt_puts(ok ? " ok\n" : " WRONG\n");
    failures += !ok;
}

int main(void) {
    rt_set_trap(3, breakpoint);
    rt_set_trap(13, general_protection);
    const struct { u64 rflags, rsp; } trips[] = {
        {0x2 | IF, 0},
        {0x2 | CF | PF | ZF | SF | OF, 0x18},
        {0x2 | IF | CF | ZF, 0x101},
        {0x2, 0x1007},
        {0x2 | IF | SF | OF, 0x1ff8},
    };
    u64 top = (u64)user_stack + sizeof user_stack;
    for (u32 i = 0; i < sizeof trips / sizeof trips[0]; i++) {
        u64 rsp = top - trips[i].rsp;
        to_user((u64)user_int3, rsp, trips[i].rflags, USER_CS, USER_DS);
        rt_puts("round trip "); rt_put_dec(i + 1);
        rt_puts(": int3 frame rip "); rt_put_hex(seen.rip);
        rt_puts(" cs "); rt_put_hex(seen.cs);
        rt_puts(" ss "); rt_put_hex(seen.ss);
        rt_puts(" rflags "); rt_put_hex(seen.rflags);
        rt_puts(" rsp top-"); rt_put_hex(top - seen.rsp); rt_puts("\n");
        /* RIP after the int3; RPL 3; RFLAGS and RSP as IRETQ loaded them; RBX carried. */
        check("  as loaded", seen.rip == (u64)user_int3 + 1 && seen.cs == USER_CS && seen.ss == USER_DS &&
                             seen.rflags == trips[i].rflags && seen.rsp == rsp && seen.rbx == MAGIC);
    }

    to_user((u64)user_cli, top, 0x2 | IF, USER_CS, USER_DS);
    rt_puts("cli at CPL3 with IOPL 0: vector 13 error "); rt_put_hex(gp_error);
    rt_puts(" at "); rt_put_hex(gp_rip); rt_puts(" cs "); rt_put_hex(gp_cs); rt_puts("\n");
    check("  #GP(0) at the cli, then int3 after it", gp_count == 1 && gp_error == 0 &&
          gp_rip == (u64)user_cli && seen.rip == (u64)user_cli + 2 && (seen.rflags & IF));

    to_user((u64)user_int3, top, 0x2 | IF, USER_CS, KERNEL_DS);
    rt_puts("IRETQ to CS 0x23 with SS 0x10: vector 13 error "); rt_put_hex(gp_error);
    rt_puts(" at the iretq "); rt_puts(gp_rip == (u64)the_iretq && gp_cs == KERNEL_CS ? "yes\n" : "no\n");
    check("  #GP(0x10) at CPL0", gp_count == 2 && gp_error == KERNEL_DS && gp_rip == (u64)the_iretq);
    to_user((u64)user_int3, top, 0x2 | IF, KERNEL_CS | 3, USER_DS);
    rt_puts("IRETQ to CS 0xb (DPL 0, RPL 3): vector 13 error "); rt_put_hex(gp_error);
    rt_puts(" at the iretq "); rt_puts(gp_rip == (u64)the_iretq && gp_cs == KERNEL_CS ? "yes\n" : "no\n");
    check("  #GP(0x8) at CPL0", gp_count == 3 && gp_error == KERNEL_CS && gp_rip == (u64)the_iretq);

    rt_puts(failures ? "iretq: FAILED\n" : "iretq: ok\n");
    return failures ? 1 : 0;
}

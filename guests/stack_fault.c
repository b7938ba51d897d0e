/* stack-fault: a `ret` and a `call` whose stack access faults, each after a load in the same
 * block (the translator lends the registers the load's lookup borrowed to the branch's own
 * stack access: translator/src/emit/branch.rs). At CPL3, so the CPU switches to RSP0 to deliver
 * the #PF: every GPR but RSP holds a marker, RAX what the load read; the fault's frame must
 * show them all, RSP and RIP at the branch, and CR2 the stack slot. The transcript must be the
 * CPU's (kvm). */
#include "runtime/rt.h"

#define DATA 0x8000010000UL    /* user: the word the blocks load */
#define NOSTACK 0x8000020800UL /* RSP for the branches: its page is not mapped */
#define STACK 0x8000030000UL   /* user: the stack the fault handler resumes on */

/* Every GPR but RSP and RAX gets 0x1100 + its number, RAX the word at DATA, RSP NOSTACK. */
#define MARK_AND_LOAD                                                                          \
    " mov $0x1101, %rcx\n mov $0x1102, %rdx\n mov $0x1103, %rbx\n mov $0x1105, %rbp\n"         \
    " mov $0x1106, %rsi\n mov $0x1107, %rdi\n mov $0x1108, %r8\n mov $0x1109, %r9\n"            \
    " mov $0x110a, %r10\n mov $0x110b, %r11\n mov $0x110c, %r12\n mov $0x110d, %r13\n"          \
    " mov $0x110e, %r14\n mov $0x110f, %r15\n movabs $0x8000010000, %rax\n mov (%rax), %rax\n" \
    " movabs $0x8000020800, %rsp\n"

void ret_fault(void), ret_fault_at(void), call_fault(void), call_fault_at(void), resume_user(void);
__asm__(".pushsection .text\n"
        ".globl ret_fault, ret_fault_at, call_fault, call_fault_at, resume_user\n"
        "ret_fault:\n" MARK_AND_LOAD "ret_fault_at:\n ret\n"
        "call_fault:\n" MARK_AND_LOAD "call_fault_at:\n call resume_user\n"
        "resume_user:\n xor %edi, %edi\n jmp rt_user_return\n"
        ".popsection\n");

static struct frame seen;
static u64 seen_cr2;
static int on_pf(struct frame *f) {
    if (!(f->cs & 3)) return 0; /* a CPL0 fault: the runtime reports it */
    seen = *f;
    seen_cr2 = read_cr2();
    f->rip = (u64)resume_user;
    f->rsp = STACK + 0xff0;
    return 1;
}

/* How many of the frame's GPRs (but RSP) differ from what the block left in them. */
static u64 wrong_registers(const struct frame *f) {
    const u64 got[15] = {f->rax, f->rcx, f->rdx, f->rbx, 0, f->rbp, f->rsi, f->rdi,
                         f->r8,  f->r9,  f->r10, f->r11, f->r12, f->r13, f->r14};
    u64 wrong = f->r15 != 0x110f;
    for (int n = 0; n < 15; n++)
        if (n != 4) wrong += got[n] != (n == 0 ? *(volatile u64 *)DATA : 0x1100 + (u64)n);
    return wrong;
}

static void check(const char *what, void (*fn)(void), void (*at)(void), u64 error, u64 cr2) {
    seen.vector = 0;
    rt_enter_user(fn);
    rt_puts(what);
    rt_puts(":\n");
    rt_check("  vector", seen.vector, 14);
    rt_check("  error code", seen.error, error);
    rt_check("  CR2", seen_cr2, cr2);
    rt_check("  RIP at the branch", seen.rip == (u64)at, 1);
    rt_check("  RSP", seen.rsp, NOSTACK);
    rt_check("  registers wrong", wrong_registers(&seen), 0);
}

int main(void) {
    rt_set_trap(14, on_pf);
    u64 cr3 = read_cr3();
    u64 *data = rt_page_alloc();
    data[0] = 0x5eed5eed;
    rt_map(cr3, DATA, (u64)data, PTE_P | PTE_W | PTE_U);
    rt_map(cr3, STACK, (u64)rt_page_alloc(), PTE_P | PTE_W | PTE_U);
    for (int i = 0; i < 3; i++) { /* translated again and chained after the first */
        check("ret with its stack unmapped", ret_fault, ret_fault_at, 4, NOSTACK);
        check("call with its stack unmapped", call_fault, call_fault_at, 6, NOSTACK - 8);
    }
    rt_puts(rt_failures ? "stack-fault: FAILED\n" : "stack-fault: ok\n");
    return rt_failures ? 1 : 0;
}

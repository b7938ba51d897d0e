/* double-fault: the interrupt stack table and the double-fault rules. #PF is delivered on IST2
 * and #DF on IST1 (each handler checks its frame lies in its own stack). Then:
 * - a #PF whose IST stack is not mapped: the pushes fault, a #PF while delivering a #PF is a
 *   #DF, taken on IST1 with error code 0 and the frame of the faulting instruction;
 * - a #DE whose IDT gate is not present: #NP while delivering #DE (two contributory faults)
 *   is a #DF too;
 * - a #PF from CPL3 with its IST stack unmapped: #DF, taken from CPL3 on IST1; the run ends
 *   from the #DF handler.
 * The SDM leaves the RIP saved by #DF undefined; KVM (the exception's instruction) and hbt
 * agree, so it is checked. CR2 after a #PF while delivering a #PF: KVM keeps the first fault's
 * address (QEMU writes the stack address of the second); either is accepted.
 * Not tested here, because kvm_pvm differs from the CPU: it turns any fault while delivering
 * an event into #DF, even where the SDM's table says to deliver the second fault (a #PF while
 * delivering #DE or int3 gives #DF under kvm_pvm, the #PF under hbt and on hardware). */
#include "runtime/rt.h"

#define UNMAPPED (RT_MAP_BASE + 0x40)        /* reads of these fault */
#define UNMAPPED_CPL0 (RT_MAP_BASE + 0x80)
#define UNMAPPED_CPL3 (RT_MAP_BASE + 0xc0)
#define NO_STACK (RT_MAP_BASE + 0x10000)     /* an IST stack top with nothing mapped below */
#define RF (1UL << 16)

static u8 df_stack[4096] __attribute__((aligned(16)));
static u8 pf_stack[4096] __attribute__((aligned(16)));
static int failures;

static void check(const char *what, int ok) {
    rt_puts(what);
    rt_puts(ok ? " ok\n" : " WRONG\n");
    failures += !ok;
}
static int on(const u8 *stack, struct frame *f) {
    return (u64)f >= (u64)stack && (u64)f < (u64)stack + sizeof df_stack;
}
static volatile int pf_count, df_count;

static int pf(struct frame *f) {
    pf_count++;
    rt_puts("#PF error "); rt_put_hex(f->error); rt_puts(" cr2 "); rt_put_hex(read_cr2());
    rt_puts(f->cs & 3 ? " from CPL3\n" : " from CPL0\n");
    check("  handler on IST2", on(pf_stack, f));
    check("  frame RSP is the faulting instruction's", f->rsp == f->rdx);
    check("  RF set in the pushed RFLAGS (a fault)", (f->rflags & RF) != 0);
    return rt_resume_at(f);
}

volatile u64 df_expected_rip; /* set by FAULT_WITH_RSP */
static volatile u64 df_after_pf; /* the #DF comes from a #PF at this address (CR2 is set) */
static int df(struct frame *f) {
    df_count++;
    rt_puts("#DF error "); rt_put_hex(f->error);
    rt_puts(f->cs & 3 ? " from CPL3" : " from CPL0");
    rt_puts(" cs "); rt_put_hex(f->cs); rt_puts(" ss "); rt_put_hex(f->ss); rt_puts("\n");
    check("  handler on IST1", on(df_stack, f));
    check("  error code 0", f->error == 0);
    check("  frame RSP is the faulting instruction's", f->rsp == f->rdx);
    check("  frame RIP is the faulting instruction", f->rip == df_expected_rip);
    if (df_after_pf) {
        u64 cr2 = read_cr2();
        rt_puts("  cr2 "); rt_put_hex(cr2); rt_puts("\n");
        check("  CR2 is the address of the #PF or of its frame", cr2 == df_after_pf || (cr2 & ~0xfffUL) == NO_STACK - RT_PAGE);
    }
    if (f->cs & 3) {
        rt_puts(failures ? "double-fault: FAILED\n" : "double-fault: ok\n");
        rt_exit(failures ? 1 : 0); /* the end of the run, from the #DF handler */
    }
    return rt_resume_at(f);
}

/* RT_FAULTING of `insn` after `setup`, with the RSP of `insn` in RDX and its address in
 * df_expected_rip. */
#define FAULT_WITH_RSP(setup, insn, arg) \
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip); lea 2f(%%rip), %%r11; " \
                     "mov %%r11, df_expected_rip(%%rip); " setup "; mov %%rsp, %%rdx\n2: " insn "\n1:" \
                     ::"a"(arg) : "rcx", "rdx", "r11", "memory")

static void user_part(void) {
    FAULT_WITH_RSP("", "mov (%%rax), %%rcx", UNMAPPED_CPL3);
    rt_user_return(1); /* not reached: the #DF handler ends the run */
}

int main(void) {
    rt_set_trap(14, pf);
    rt_set_trap(8, df);
    rt_set_ist(14, 2, pf_stack + sizeof pf_stack);
    rt_set_ist(8, 1, df_stack + sizeof df_stack);

    FAULT_WITH_RSP("", "mov (%%rax), %%rcx", UNMAPPED);
    check("one #PF, no #DF", pf_count == 1 && df_count == 0);

    rt_set_ist(14, 2, (void *)NO_STACK);
    df_after_pf = UNMAPPED_CPL0;
    FAULT_WITH_RSP("", "mov (%%rax), %%rcx", UNMAPPED_CPL0);
    df_after_pf = 0;
    check("#PF while delivering #PF: one #DF, no #PF handler", pf_count == 1 && df_count == 1);

    /* #DE through a gate that is not present. */
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    volatile u8 *de_gate_type = (volatile u8 *)idtr.base + 5;
    u8 type = *de_gate_type;
    *de_gate_type = type & 0x7f;
    FAULT_WITH_RSP("xor %%ecx, %%ecx", "div %%rcx", 1);
    *de_gate_type = type;
    check("#NP while delivering #DE: a #DF", pf_count == 1 && df_count == 2);

    df_after_pf = UNMAPPED_CPL3;
    rt_enter_user(user_part);
    rt_puts("double-fault: the CPL3 #DF never came\n");
    return 1;
}

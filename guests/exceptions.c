/* exceptions: #PF, #GP and #DE taken through the guest's IDT from CPL0, and those plus int3
 * and a privileged instruction from CPL3. (int3 at CPL0: see cpl0_int3.c.) */
#include "runtime/rt.h"
static volatile u64 seen_vector, seen_error, seen_cr2, seen_cs;
static int record(struct frame *f) {
    seen_vector = f->vector; seen_error = f->error; seen_cs = f->cs;
    seen_cr2 = f->vector == 14 ? read_cr2() : 0;
    if (f->vector == 3) return 1; /* a trap: RIP is already after int3 */
    return rt_resume_at(f);
}
#define UNMAPPED 0x8000000000UL /* PML4 slot 1: never mapped */
static void faults(void) {
    RT_FAULTING("mov (%%rax), %%rcx", UNMAPPED);
    u64 pf = seen_vector, pf_err = seen_error, cr2 = seen_cr2;
    RT_FAULTING("mov (%%rax), %%rcx", 0x800000000000UL); /* non-canonical */
    u64 gp = seen_vector;
    RT_FAULTING("xor %%edx, %%edx; xor %%ecx, %%ecx; div %%rcx", 1);
    u64 de = seen_vector;
    rt_puts(" #PF vector "); rt_put_dec(pf);
    rt_puts(" error "); rt_put_hex(pf_err);
    rt_puts(" cr2 "); rt_put_hex(cr2);
    rt_puts(", #GP vector "); rt_put_dec(gp);
    rt_puts(", #DE vector "); rt_put_dec(de);
    rt_puts(", from CS "); rt_put_hex(seen_cs & 3 ? USER_CS : KERNEL_CS);
    rt_puts("\n");
}
static void user_faults(void) {
    /* At CPL3, output must wait: record the same four, then go back to CPL0. */
    RT_FAULTING("mov (%%rax), %%rcx", UNMAPPED);
    u64 r = seen_vector == 14 && seen_error == 4 && seen_cr2 == UNMAPPED; /* user read, not present */
    RT_FAULTING("mov (%%rax), %%rcx", 0x800000000000UL);
    r |= (u64)(seen_vector == 13) << 1;
    RT_FAULTING("xor %%edx, %%edx; xor %%ecx, %%ecx; div %%rcx", 1);
    r |= (u64)(seen_vector == 0) << 2;
    __asm__ volatile("int3");
    r |= (u64)(seen_vector == 3 && (seen_cs & 3) == 3) << 3;
    RT_FAULTING("cli", 0);
    r |= (u64)(seen_vector == 13) << 4; /* cli at CPL3 with IOPL 0 */
    rt_user_return(r);
}
int main(void) {
    int vectors[] = {0, 3, 13, 14};
    for (int i = 0; i < 4; i++) rt_set_trap(vectors[i], record);
    rt_puts("CPL0:");
    faults();
    u64 r = rt_enter_user(user_faults);
    rt_puts("CPL3: #PF ");  rt_puts(r & 1 ? "ok" : "WRONG");
    rt_puts(", #GP ");      rt_puts(r & 2 ? "ok" : "WRONG");
    rt_puts(", #DE ");      rt_puts(r & 4 ? "ok" : "WRONG");
    rt_puts(", #BP ");      rt_puts(r & 8 ? "ok" : "WRONG");
    rt_puts(", cli #GP ");  rt_puts(r & 16 ? "ok" : "WRONG");
    rt_puts("\n");
    return r == 31 ? 0 : 1;
}

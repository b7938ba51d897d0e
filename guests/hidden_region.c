/* hidden-region: nothing of hbt's own machinery shows through to the guest. The guest-physical
 * range the e820 map reserves for hbt (0xd0000000, where the hybrid engine keeps the tables and
 * stubs KVM runs user code with) reads as unclaimed device memory from CPL0 and CPL3 and keeps
 * no writes; the address hbt maps it at while user code runs (0xffff800000000000) is not
 * mapped for the guest at either level; SGDT/SIDT/SLDT/STR at CPL3 store the guest's own
 * GDTR, IDTR and selectors, also after it loads new ones; a selector past the end of its GDT
 * raises #GP with that selector, as the CPU does. (At CPL3 a selector load would be checked
 * against the host's GDT under kvm_pvm, so that one is done at CPL0.) */
#include "runtime/rt.h"

#define REGION 0xd0000000UL
#define HBT_VA 0xffff800000000000UL

static volatile u64 seen_vector = 256, seen_error, seen_cr2;
static int record(struct frame *f) {
    seen_vector = f->vector; seen_error = f->error; seen_cr2 = read_cr2();
    return rt_resume_at(f);
}
static int failures;
static void check(const char *what, u64 got, u64 want) {
    rt_puts(what); rt_puts(": "); rt_put_hex(got);
    if (got != want) { rt_puts(" WRONG, want "); rt_put_hex(want); failures++; }
    rt_puts("\n");
}
static u64 fault_vector(void) { u64 v = seen_vector; seen_vector = 256; rt_resume = 0; return v; }

struct __attribute__((packed)) dtr { u16 limit; u64 base; };
static volatile u64 user_region, user_vector, user_error, user_cr2;
static struct dtr user_gdt, user_idt;
static volatile u16 user_tr, user_ldt;

static void user_part(void) {
    user_region = *(volatile u64 *)REGION;
    *(volatile u64 *)REGION = 0x1234;
    user_region &= *(volatile u64 *)REGION;
    RT_FAULTING("mov (%%rax), %%rcx", HBT_VA);
    user_vector = seen_vector; user_error = seen_error; user_cr2 = seen_cr2;
    fault_vector();
    __asm__ volatile("sgdt %0; sidt %1" : "=m"(user_gdt), "=m"(user_idt));
    u16 tr, ldt;
    __asm__ volatile("str %0; sldt %1" : "=r"(tr), "=r"(ldt));
    user_tr = tr; user_ldt = ldt;
    rt_user_return(0);
}

int main(void) {
    rt_set_trap(14, record);
    rt_set_trap(13, record);
    check("CPL0 read of hbt's reserved range", *(volatile u64 *)REGION, ~0UL);
    *(volatile u64 *)REGION = 0x1234;
    check("after a CPL0 write", *(volatile u64 *)REGION, ~0UL);
    RT_FAULTING("mov (%%rax), %%rcx", HBT_VA);
    check("CPL0 read of hbt's user-mode address: vector", fault_vector(), 14);
    check("  error code", seen_error, 0);

    struct dtr gdt, idt;
    __asm__ volatile("sgdt %0; sidt %1" : "=m"(gdt), "=m"(idt));
    rt_enter_user(user_part);
    check("CPL3 read of the reserved range (and after a write)", user_region, ~0UL);
    check("CPL3 read of hbt's user-mode address: vector", user_vector, 14);
    /* A CPU reports 4 (user read, not present); kvm_pvm reports 0xd (present, reserved bit):
     * PVM keeps this range for itself. tests/run_guests.rs expects 4 from hbt's engines. */
    rt_puts("  error code: "); rt_put_hex(user_error); rt_puts("\n");
    if ((user_error & ~0x9UL) != 4) { rt_puts("  WRONG\n"); failures++; }
    check("  cr2 is the address", user_cr2 == HBT_VA, 1);
    check("CPL3 sgdt: the guest's GDT base", user_gdt.base == gdt.base, 1);
    check("CPL3 sgdt: limit", user_gdt.limit, gdt.limit);
    check("CPL3 sidt: the guest's IDT base", user_idt.base == idt.base, 1);
    check("CPL3 sidt: limit", user_idt.limit, idt.limit);
    check("CPL3 str", user_tr, TSS_SEL);
    check("CPL3 sldt", user_ldt, 0);

    /* New GDTR/IDTR limits (same tables, shorter): CPL3 sees those, and a selector past the
     * new GDT limit faults at CPL0. */
    struct dtr short_gdt = {0x2f, gdt.base}, short_idt = {0xeff, idt.base};
    __asm__ volatile("lgdt %0; lidt %1" ::"m"(short_gdt), "m"(short_idt));
    rt_enter_user(user_part);
    check("CPL3 sgdt after lgdt: limit", user_gdt.limit, 0x2f);
    check("CPL3 sidt after lidt: limit", user_idt.limit, 0xeff);
    RT_FAULTING("mov $0x30, %%eax; mov %%eax, %%ds", 0);
    check("selector 0x30 past the GDT: vector", fault_vector(), 13);
    check("  error code (the selector)", seen_error, 0x30);
    __asm__ volatile("mov %0, %%ds" ::"r"(KERNEL_DS));
    __asm__ volatile("lgdt %0; lidt %1" ::"m"(gdt), "m"(idt));

    rt_puts(failures ? "hidden-region: FAILED\n" : "hidden-region: ok\n");
    return failures ? 1 : 0;
}

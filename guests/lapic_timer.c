/* lapic-timer: the local APIC (xAPIC registers at 0xfee00000) as an OS uses it: its timer in
 * periodic, one-shot and TSC-deadline mode, a self-IPI through the ICR, the task priority
 * holding an interrupt back in the IRR, and EOI. Only counts and register values that do not
 * depend on timing are printed, so KVM's in-kernel APIC and hbt's (devices/lapic.rs) must print
 * the same. Not checked here: the ISR bit while a handler runs, which kvm_pvm does not show
 * (measured: ISR reads 0 in the handler); devices/lapic.rs's unit tests cover it. */
#include "runtime/rt.h"

#define LAPIC 0xfee00000UL
#define ID 0x20
#define VERSION 0x30
#define TPR 0x80
#define EOI 0xb0
#define SVR 0xf0
#define IRR 0x200
#define ICR_LOW 0x300
#define LVT_TIMER 0x320
#define TIMER_INITIAL 0x380
#define TIMER_CURRENT 0x390
#define TIMER_DIVIDE 0x3e0
#define MASKED (1u << 16)
#define PERIODIC (1u << 17)
#define TSC_DEADLINE (2u << 17)
#define IA32_TSC_DEADLINE 0x6e0

/* Vectors below 48 (the runtime's IDT); the 8259 is never initialized here, so 40-47 are free. */
#define V_PERIODIC 0x28
#define V_ONESHOT 0x2a
#define V_DEADLINE 0x2c
#define V_IPI 0x2e

static inline u32 rd(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void wr(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static int requested(u8 v) { return (rd(IRR + 0x10 * (v / 32)) >> (v % 32)) & 1; }

static volatile u32 count[48];
static volatile u64 tsc_at_deadline;

static int on_interrupt(struct frame *f) {
    if (f->vector == V_DEADLINE) tsc_at_deadline = rdtsc();
    count[f->vector]++;
    wr(EOI, 0);
    return 1;
}

static void wait_for(u8 v, u32 n) {
    __asm__ volatile("sti");
    while (count[v] < n) __asm__ volatile("hlt");
    __asm__ volatile("cli");
}

int main(void) {
    int fail = 0;
    u32 ecx, edx, eax = 1, ebx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx));
    rt_puts("lapic: cpuid apic "); rt_put_dec((edx >> 9) & 1);
    rt_puts(", tsc-deadline "); rt_put_dec((ecx >> 24) & 1);
    rt_puts(", id "); rt_put_hex(rd(ID) >> 24);
    rt_puts(", version "); rt_put_hex(rd(VERSION));
    rt_puts(", base msr "); rt_put_hex(rdmsr(0x1b));
    rt_puts("\n");
    for (int v = V_PERIODIC; v <= V_IPI; v += 2) rt_set_trap(v, on_interrupt);
    wr(SVR, 0x100 | 0xff); /* software enable, spurious vector 0xff */
    wr(TIMER_DIVIDE, 0xb);  /* divide by 1 */

    /* Periodic: ten interrupts, then masked. */
    wr(LVT_TIMER, PERIODIC | V_PERIODIC);
    wr(TIMER_INITIAL, 1000000);
    wait_for(V_PERIODIC, 10);
    wr(LVT_TIMER, MASKED | PERIODIC | V_PERIODIC);
    wr(TIMER_INITIAL, 0);
    rt_puts("periodic: "); rt_put_dec(count[V_PERIODIC]); rt_puts(" interrupts\n");

    /* One-shot: exactly one interrupt, and the count has run out. */
    wr(LVT_TIMER, V_ONESHOT);
    wr(TIMER_INITIAL, 2000000);
    u32 early = rd(TIMER_CURRENT);
    wait_for(V_ONESHOT, 1);
    for (volatile int i = 0; i < 20000; i++) __asm__ volatile("pause");
    rt_puts("one-shot: "); rt_put_dec(count[V_ONESHOT]);
    rt_puts(" interrupt, counting when armed "); rt_put_dec(early > 0 && early <= 2000000);
    rt_puts(", current count after "); rt_put_dec(rd(TIMER_CURRENT));
    rt_puts("\n");
    fail |= count[V_ONESHOT] != 1;

    /* TSC deadline: the interrupt comes at or after the deadline; the MSR then reads 0. */
    if ((ecx >> 24) & 1) {
        wr(LVT_TIMER, TSC_DEADLINE | V_DEADLINE);
        u64 deadline = rdtsc() + 3000000;
        wrmsr(IA32_TSC_DEADLINE, deadline);
        u64 armed = rdmsr(IA32_TSC_DEADLINE);
        wait_for(V_DEADLINE, 1);
        rt_puts("tsc-deadline: armed "); rt_put_dec(armed == deadline);
        rt_puts(", fired at or after it "); rt_put_dec(tsc_at_deadline >= deadline);
        rt_puts(", msr after "); rt_put_hex(rdmsr(IA32_TSC_DEADLINE));
        rt_puts("\n");
        fail |= armed != deadline || tsc_at_deadline < deadline;
        wr(LVT_TIMER, MASKED);
    }

    /* Self-IPI, then held back by the task priority until it is lowered. The interrupt is
     * awaited with `sti; hlt`: kvm_pvm's emulated CPL0 takes a pending interrupt only at an
     * exit (measured: a self-IPI waited in the IRR through 100 loop iterations with IF=1). */
    wr(ICR_LOW, (1u << 18) | V_IPI); /* destination shorthand: self, fixed */
    u32 sent = requested(V_IPI);
    __asm__ volatile("sti; hlt; cli");
    u32 first = count[V_IPI];
    wr(TPR, 0x20);
    wr(ICR_LOW, (1u << 18) | V_IPI);
    __asm__ volatile("sti; nop; nop; cli");
    u32 held = count[V_IPI] == first && requested(V_IPI);
    wr(TPR, 0);
    __asm__ volatile("sti; hlt; cli");
    rt_puts("self-ipi: in IRR "); rt_put_dec(sent);
    rt_puts(", taken "); rt_put_dec(first);
    rt_puts(", held in IRR by TPR 0x20 "); rt_put_dec(held);
    rt_puts(", taken after "); rt_put_dec(count[V_IPI] == first + 1);
    rt_puts("\n");
    fail |= !sent || first != 1 || !held || count[V_IPI] != first + 1;

    return fail;
}

/* cpl0-int3: int3 at CPL0. kvm_pvm emulates guest CPL0 in KVM's instruction emulator, which
 * cannot perform `int n` outside real mode, so under --accel kvm hbt must stop with a KVM
 * internal-error report naming RIP and the bytes there (cc); the translator engines will run it. */
#include "runtime/rt.h"
static volatile u64 hits;
static int count(struct frame *f) { (void)f; hits++; return 1; }
int main(void) {
    rt_set_trap(3, count);
    rt_puts("int3 at CPL0\n");
    __asm__ volatile("int3");
    rt_puts("int3 handled, hits "); rt_put_dec(hits); rt_puts("\n");
    return hits == 1 ? 0 : 1;
}

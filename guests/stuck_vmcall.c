/* stuck-vmcall: executes vmcall at CPL0 in a loop, which keeps kvm_pvm inside KVM_RUN without
 * an exit to hbt. --timeout, Ctrl-C and SIGTERM must still end the run and report the guest. */
#include "runtime/rt.h"
int main(void) {
    rt_puts("stuck-vmcall: entering the vmcall loop\n");
    for (;;) __asm__ volatile("vmcall");
}

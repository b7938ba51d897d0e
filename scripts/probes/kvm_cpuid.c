/* What KVM_SET_CPUID2 changes in the table it is given: the system harness gives KVM the bt
 * engine's CPU model and leaves out of the comparison the bits KVM changed
 * (src/vmm/isa_system.rs, cpuid_adjustments). Sets KVM's own supported table with leaf 1
 * EDX.MTRR (bit 12) cleared and reads it back.
 * On kvm_pvm (Intel Xeon host) it prints leaf 1 EDX with MTRR set again. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR);
    if (kvm < 0) { perror("/dev/kvm"); return 1; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct kvm_cpuid2 *set = calloc(1, sizeof *set + 256 * sizeof(struct kvm_cpuid_entry2));
    struct kvm_cpuid2 *get = calloc(1, sizeof *get + 256 * sizeof(struct kvm_cpuid_entry2));
    set->nent = get->nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, set) < 0) { perror("KVM_GET_SUPPORTED_CPUID"); return 1; }
    for (unsigned i = 0; i < set->nent; i++)
        if (set->entries[i].function == 1) {
            set->entries[i].edx &= ~(1u << 12);
            printf("set:  leaf 1 ecx %#x edx %#x\n", set->entries[i].ecx, set->entries[i].edx);
        }
    if (ioctl(vcpu, KVM_SET_CPUID2, set) < 0) { perror("KVM_SET_CPUID2"); return 1; }
    if (ioctl(vcpu, KVM_GET_CPUID2, get) < 0) { perror("KVM_GET_CPUID2"); return 1; }
    for (unsigned i = 0; i < get->nent; i++)
        if (get->entries[i].function == 1)
            printf("read: leaf 1 ecx %#x edx %#x (MTRR %s)\n", get->entries[i].ecx, get->entries[i].edx,
                   get->entries[i].edx & (1u << 12) ? "set" : "clear");
    return 0;
}

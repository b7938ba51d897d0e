/* lar/lsl/verr/verw at CPL3 on Linux's GDT, which the system harness's guest copies. Backs
 * system/query.rs (lar keeps the limit's bits 19:16) and the kvm_pvm `unfit` rows for these
 * instructions: under KVM at CPL3, lar 0x21 clears ZF although the guest's GDT has entry 4.
 * An Intel Xeon (family 6 model 0xa7) prints: 0x21 lar ok 0xcffb00, 0x2b lar ok 0xcff300,
 * 0x7b lar ok 0x40f500 (Linux's read-only expand-down CPU/node segment) with lsl = the CPU. */
#include <stdio.h>

int main(void) {
    unsigned short sels[] = {0x10, 0x18, 0x21, 0x23, 0x2b, 0x33, 0x38, 0x40, 0x7b, 0x7505};
    for (unsigned i = 0; i < sizeof sels / sizeof *sels; i++) {
        unsigned sel = sels[i], ar = 0, limit = 0; /* left as they are when ZF is cleared */
        unsigned short s16 = sels[i];
        unsigned char lar_ok, lsl_ok, verr, verw;
        asm("lar %2, %0; setz %1" : "+r"(ar), "=q"(lar_ok) : "r"(sel));
        asm("lsl %2, %0; setz %1" : "+r"(limit), "=q"(lsl_ok) : "r"(sel));
        asm("verr %1; setz %0" : "=q"(verr) : "r"(s16));
        asm("verw %1; setz %0" : "=q"(verw) : "r"(s16));
        printf("selector %#6x: lar %s %#8x  lsl %s %#10x  verr %d  verw %d\n", sel, lar_ok ? "ok" : "--", ar,
               lsl_ok ? "ok" : "--", limit, verr, verw);
    }
    return 0;
}

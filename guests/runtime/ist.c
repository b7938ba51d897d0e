/* Interrupt stack table entries (see rt.h). The TSS and the IDT are found through the CPU's own
 * registers (STR, SGDT, SIDT), as code that did not build them would. */
#include "rt.h"

struct table_ptr { u16 limit; u64 base; } __attribute__((packed));

void rt_set_ist(int vector, int ist, void *stack_top) {
    struct table_ptr gdt, idt;
    u16 tr;
    __asm__ volatile("sgdt %0; sidt %1; str %2" : "=m"(gdt), "=m"(idt), "=r"(tr));
    volatile u8 *d = (volatile u8 *)gdt.base + (tr & ~7); /* the 16-byte TSS descriptor */
    u64 tss = d[2] | (u64)d[3] << 8 | (u64)d[4] << 16 | (u64)d[7] << 24 | (u64)*(volatile u32 *)(d + 8) << 32;
    *(volatile u64 *)(tss + 0x24 + 8 * (ist - 1)) = (u64)stack_top; /* IST1 is at offset 0x24 */
    ((volatile u8 *)idt.base)[16 * vector + 4] = (u8)ist;          /* the gate's IST field */
}

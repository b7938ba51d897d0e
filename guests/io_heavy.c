/* io-heavy: many port writes from CPL0 (each one a VM exit to hbt). */
#include "runtime/rt.h"
#define WRITES 20000
int main(void) {
    for (u32 i = 0; i < WRITES; i++) outb(PORT_SERIAL_SCRATCH, (u8)i);
    u8 last = inb(PORT_SERIAL_SCRATCH);
    rt_puts("io-heavy: ");
    rt_put_dec(WRITES);
    rt_puts(" port writes, scratch reads back ");
    rt_put_dec(last);
    rt_puts("\n");
    return last == (u8)(WRITES - 1) ? 0 : 1;
}

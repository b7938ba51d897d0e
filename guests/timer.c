/* timer: the PIT (channel 0, 1 kHz) through the 8259 PIC on vector 32; counts interrupts. */
#include "runtime/rt.h"
#define WANT 20
static volatile u32 ticks;
static int tick(struct frame *f) {
    (void)f;
    if (++ticks == WANT) rt_pic_mask(0xff); /* enough: mask IRQ 0, so the count is exact */
    rt_pic_eoi();
    return 1;
}
int main(void) {
    rt_set_trap(RT_IRQ_VECTOR(0), tick);
    rt_pic_init(1 << 0);
    /* PIT channel 0, mode 2, divisor 1193 (≈1 kHz). */
    outb(0x43, 0x34); outb(0x40, 1193 & 0xff); outb(0x40, 1193 >> 8);
    __asm__ volatile("sti");
    while (ticks < WANT) __asm__ volatile("hlt");
    __asm__ volatile("cli");
    rt_puts("timer: ");
    rt_put_dec(ticks);
    rt_puts(" PIT interrupts on vector 32\n");
    return 0;
}

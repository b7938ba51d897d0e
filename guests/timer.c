/* timer: the PIT (channel 0, 1 kHz) through the 8259 PIC on vector 32; counts interrupts. */
#include "runtime/rt.h"
#define WANT 20
static volatile u32 ticks;
static int tick(struct frame *f) {
    (void)f;
    if (++ticks == WANT) outb(0x21, 0xff); /* enough: mask IRQ 0, so the count is exact */
    outb(0x20, 0x20); /* EOI */
    return 1;
}
int main(void) {
    rt_set_trap(32, tick);
    /* 8259: ICW1-4, vectors 0x20/0x28, then mask everything but IRQ0. */
    outb(0x20, 0x11); outb(0xa0, 0x11);
    outb(0x21, 0x20); outb(0xa1, 0x28);
    outb(0x21, 0x04); outb(0xa1, 0x02);
    outb(0x21, 0x01); outb(0xa1, 0x01);
    outb(0x21, 0xfe); outb(0xa1, 0xff);
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

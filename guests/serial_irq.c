/* serial-irq: interrupt-driven serial output. COM1's "THR empty" interrupt (IRQ 4 through the
 * 8259, vector 36) sends each next byte of a message from the interrupt handler. */
#include "runtime/rt.h"
static const char message[] = "sent by the THR-empty interrupt\n";
static volatile u32 next, interrupts, finished;
static int com1(struct frame *f) {
    (void)f;
    interrupts++;
    u8 iir = inb(PORT_SERIAL + 2);
    if ((iir & 0x0f) == 0x02) { /* THR empty */
        if (message[next]) outb(PORT_SERIAL, (u8)message[next++]);
        else { outb(PORT_SERIAL + 1, 0); finished = 1; } /* THR empty after the last byte: IER off */
    }
    rt_pic_eoi();
    return 1;
}
int main(void) {
    rt_set_trap(RT_IRQ_VECTOR(4), com1);
    rt_pic_init(1 << 4);
    __asm__ volatile("sti");
    outb(PORT_SERIAL + 1, 0x02); /* IER: THR-empty interrupts (fires at once: THR is empty) */
    while (!finished) __asm__ volatile("hlt");
    __asm__ volatile("cli");
    rt_puts("serial-irq: ");
    rt_put_dec(next);
    rt_puts(" bytes in ");
    rt_put_dec(interrupts);
    rt_puts(" interrupts\n");
    return next == sizeof message - 1 ? 0 : 1;
}

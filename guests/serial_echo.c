/* serial-echo: interrupt-driven serial input. Bytes from hbt's stdin raise COM1's "received
 * data" interrupt (IRQ 4, vector 36); the handler collects one line, which main echoes in
 * upper case. */
#include "runtime/rt.h"
static char line[80];
static volatile u32 len, done;
static int com1(struct frame *f) {
    (void)f;
    while (inb(PORT_SERIAL + 5) & 1) { /* LSR: data ready */
        char c = (char)inb(PORT_SERIAL);
        if (c == '\n' || len == sizeof line - 1) done = 1;
        else line[len++] = c;
    }
    rt_pic_eoi();
    return 1;
}
int main(void) {
    rt_set_trap(RT_IRQ_VECTOR(4), com1);
    rt_pic_init(1 << 4);
    __asm__ volatile("sti");
    outb(PORT_SERIAL + 1, 0x01); /* IER: received-data interrupts */
    while (!done) __asm__ volatile("hlt");
    __asm__ volatile("cli");
    rt_puts("echo: ");
    for (u32 i = 0; i < len; i++) rt_putc(line[i] >= 'a' && line[i] <= 'z' ? line[i] - 32 : line[i]);
    rt_puts("\n");
    return 0;
}

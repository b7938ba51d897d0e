/* Test-guest runtime: GDT with a TSS, IDT for vectors 0-47, MSRs for `syscall`, serial output
 * and the exit port. Everything a guest needs to run at CPL0 and CPL3 and take traps. */
#include "rt.h"

struct gdt_ptr { u16 limit; u64 base; } __attribute__((packed));
struct idt_gate { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; } __attribute__((packed));
struct tss { u32 r0; u64 rsp0, rsp1, rsp2, r1, ist[7], r2; u16 r3, iomap; } __attribute__((packed));

static u64 gdt[7];
static struct idt_gate idt[48];
static struct tss tss;
static trap_fn traps[48];
volatile u64 rt_resume;
extern char rt_trap_stub_base[], trap_stack_top[];
extern void rt_syscall_entry(void);


void rt_init(void) {
    gdt[1] = 0x00af9a000000ffffUL; /* kernel code, 64-bit */
    gdt[2] = 0x00cf92000000ffffUL; /* kernel data */
    gdt[3] = 0x00cff2000000ffffUL; /* user data (DPL3) */
    gdt[4] = 0x00affa000000ffffUL; /* user code, 64-bit (DPL3) */
    u64 t = (u64)&tss;
    gdt[5] = (sizeof tss - 1) | ((t & 0xffffff) << 16) | (0x89UL << 40) | (((t >> 24) & 0xff) << 56);
    gdt[6] = t >> 32;
    tss.rsp0 = (u64)trap_stack_top;
    tss.iomap = sizeof tss;
    struct gdt_ptr g = {sizeof gdt - 1, (u64)gdt};
    __asm__ volatile("lgdt %0\n"
                     "mov %1, %%ds; mov %1, %%es; mov %1, %%ss\n"
                     "pushq $0x08; lea 1f(%%rip), %%rax; push %%rax; lretq\n1:\n"
                     "ltr %w2" ::"m"(g), "r"(KERNEL_DS), "r"(TSS_SEL) : "rax", "memory");
    for (int v = 0; v < 48; v++) {
        u64 h = (u64)rt_trap_stub_base + 16 * v;
        /* int3 (3) may be raised from CPL3: DPL3 gate. */
        idt[v] = (struct idt_gate){(u16)h, KERNEL_CS, 0, (u8)(v == 3 ? 0xee : 0x8e), (u16)(h >> 16), (u32)(h >> 32), 0};
    }
    struct gdt_ptr i = {sizeof idt - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(i));
    wrmsr(0xc0000080, rdmsr(0xc0000080) | 1);          /* EFER.SCE */
    wrmsr(0xc0000081, (0x10UL << 48) | (0x08UL << 32)); /* STAR: sysret CS 0x23, SS 0x1b */
    wrmsr(0xc0000082, (u64)rt_syscall_entry);           /* LSTAR */
    wrmsr(0xc0000084, 0x700);                           /* SFMASK: IF, TF, DF */
}

void rt_putc(char c) { outb(PORT_SERIAL, (u8)c); }
void rt_puts(const char *s) { while (*s) rt_putc(*s++); }
void rt_put_dec(u64 v) {
    char b[21]; int n = 0;
    do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) rt_putc(b[--n]);
}
void rt_put_hex(u64 v) {
    rt_puts("0x");
    int started = 0;
    for (int s = 60; s >= 0; s -= 4) {
        int d = (v >> s) & 15;
        if (d || started || s == 0) { rt_putc("0123456789abcdef"[d]); started = 1; }
    }
}
void rt_progress(u8 step) { outb(PORT_PROGRESS, step); }
void rt_exit(u32 status) {
    __asm__ volatile("outl %0, %1" ::"a"(status), "Nd"(PORT_DEBUG_EXIT));
    for (;;) __asm__ volatile("cli; hlt");
}

void rt_pic_init(u8 unmasked) {
    outb(0x20, 0x11); outb(0xa0, 0x11);                               /* ICW1: init, ICW4 follows */
    outb(0x21, RT_IRQ_VECTOR(0)); outb(0xa1, RT_IRQ_VECTOR(8));       /* ICW2: vector bases */
    outb(0x21, 0x04); outb(0xa1, 0x02);                               /* ICW3: cascade on IRQ 2 */
    outb(0x21, 0x01); outb(0xa1, 0x01);                               /* ICW4: 8086 mode */
    rt_pic_mask((u8)~unmasked); outb(0xa1, 0xff);
}
void rt_pic_mask(u8 masked) { outb(0x21, masked); }
void rt_pic_eoi(void) { outb(0x20, 0x20); }

void rt_set_trap(int vector, trap_fn fn) { traps[vector] = fn; }

int rt_resume_at(struct frame *f) {
    if (!rt_resume) return 0;
    f->rip = rt_resume;
    rt_resume = 0;
    return 1;
}

extern __attribute__((noreturn)) void rt_kernel_resume(u64 value);

void rt_trap(struct frame *f) {
    if (f->vector == 6 && f->rip == (u64)rt_syscall_entry)
        rt_kernel_resume(f->rdi); /* rt_user_return's syscall: back to rt_enter_user's caller */
    if (f->vector < 48 && traps[f->vector] && traps[f->vector](f)) return;
    rt_puts("unexpected trap "); rt_put_dec(f->vector);
    rt_puts(" error "); rt_put_hex(f->error);
    rt_puts(" at "); rt_put_hex(f->rip);
    rt_puts(" cs "); rt_put_hex(f->cs);
    rt_puts(" cr2 "); rt_put_hex(read_cr2());
    rt_puts("\n");
    rt_exit(100 + (u32)f->vector);
}

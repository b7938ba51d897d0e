/* irq-loop: a timer interrupt (PIT channel 0 through the 8259, vector 32) must reach a CPU
 * that runs a tight loop with no exits of its own, at CPL0 and at CPL3: `jmp` to itself
 * (one translated block chained to itself), which only the interrupt handler can leave (it
 * changes the RIP it returns to), and a counting loop split over two pages (two blocks chained
 * in a cycle) that ends when the handler sets a flag. Also `sti` directly before such a loop
 * with the interrupt already pending: it is taken after the one instruction `sti` holds it
 * off for, with RIP at the loop. Each handler checks the interrupted RIP is in the loop. */
#include "runtime/rt.h"

/* The loops. count_until_stopped's `inc` ends at a page boundary and the rest of the loop is
 * on the next page. */
u64 count_until_stopped(void);
extern char spin[], spin_out[], sti_spin[], sti_spin_loop[], user_spin[], user_spin_out[];
extern char count_loop[], count_loop_end[];
volatile u64 stop;
__asm__(".pushsection .text.loops, \"ax\"\n"
        ".globl spin, spin_out, sti_spin, sti_spin_loop, user_spin, user_spin_out\n"
        "spin:\n"
        "    jmp spin\n"
        "spin_out:\n"
        "    ret\n"
        "sti_spin:\n"
        "    sti\n"
        "sti_spin_loop:\n"
        "    jmp sti_spin_loop\n"
        "    ret\n"
        "user_spin:\n"
        "    jmp user_spin\n"
        "user_spin_out:\n"
        "    mov $1, %edi\n"
        "    jmp rt_user_return\n"
        "    .balign 4096, 0xcc\n"
        "    .skip 4096 - 5, 0xcc\n"
        ".globl count_until_stopped, count_loop, count_loop_end\n"
        "count_until_stopped:\n"
        "    xor %ecx, %ecx\n"
        "count_loop:\n"
        "    inc %rcx\n"                 /* ends at the page boundary */
        "    cmpb $0, stop(%rip)\n"
        "    je count_loop\n"
        "count_loop_end:\n"
        "    mov %rcx, %rax\n"
        "    ret\n"
        ".popsection\n");

/* What the handler does when the interrupted RIP is in [from, to): go on at `resume` (or, if
 * 0, set `stop`), then disarm. */
static volatile u64 armed, from, to, resume, seen_rip, seen_cs;
static int tick(struct frame *f) {
    if (armed && f->rip >= from && f->rip < to) {
        seen_rip = f->rip;
        seen_cs = f->cs;
        if (resume) f->rip = resume;
        else stop = 1;
        armed = 0;
    }
    rt_pic_eoi();
    return 1;
}
static void arm(const char *lo, const char *hi, const char *go_on) {
    stop = 0;
    seen_rip = seen_cs = 0;
    from = (u64)lo; to = (u64)hi; resume = (u64)go_on;
    armed = 1;
}

static int failures;
static void report(const char *what, int ok) {
    rt_puts(what);
    rt_puts(": interrupted at ");
    rt_puts(seen_cs == KERNEL_CS ? "CPL0, " : seen_cs == USER_CS ? "CPL3, " : "CS ?, ");
    rt_puts(ok ? "ok\n" : "WRONG\n");
    failures += !ok;
}

static void user_count(void) { rt_user_return(count_until_stopped()); }

int main(void) {
    rt_set_trap(RT_IRQ_VECTOR(0), tick);
    rt_pic_init(1 << 0);
    outb(0x43, 0x34); outb(0x40, 1193 & 0xff); outb(0x40, 1193 >> 8); /* mode 2, ≈1 kHz */
    __asm__ volatile("sti");

    arm(spin, spin + 2, spin_out);
    ((void (*)(void))spin)();
    report("CPL0 jmp to itself", seen_rip == (u64)spin && seen_cs == KERNEL_CS);

    arm(count_loop, count_loop_end, 0);
    u64 n = count_until_stopped();
    report("CPL0 counting loop over two pages", n > 0 && stop && seen_cs == KERNEL_CS);

    /* `sti; jmp to itself` with IRQ 0 already pending (the 8259's IRR, read with OCW3). */
    __asm__ volatile("cli");
    arm(sti_spin, sti_spin_loop + 2, sti_spin_loop + 2);
    outb(0x20, 0x0a);
    while (!(inb(0x20) & 1)) {}
    ((void (*)(void))sti_spin)();
    report("CPL0 sti then jmp to itself, interrupt pending", seen_rip == (u64)sti_spin_loop && seen_cs == KERNEL_CS);

    arm(user_spin, user_spin + 2, user_spin_out);
    u64 r = rt_enter_user((void (*)(void))user_spin);
    report("CPL3 jmp to itself", r == 1 && seen_rip == (u64)user_spin && seen_cs == USER_CS);

    arm(count_loop, count_loop_end, 0);
    n = rt_enter_user(user_count);
    report("CPL3 counting loop over two pages", n > 0 && stop && seen_cs == USER_CS);

    __asm__ volatile("cli");
    rt_pic_mask(0xff);
    rt_puts(failures ? "irq-loop: FAILED\n" : "irq-loop: ok\n");
    return failures ? 1 : 0;
}

/* user-fault: page protection as the CPU enforces it, with the #PF error code and CR2 each
 * fault reports. CPL3 reads a supervisor-only page (error 5) that CPL0 has just read, writes a
 * read-only user page (7), jumps into a no-execute user page (0x15; hbt sets EFER.NXE); CPL0
 * jumps into a no-execute page (0x11), writes a read-only page with CR0.WP set (3) and, with
 * WP clear, writes it successfully; CPL3 still cannot write the read-only user page then. */
#include "runtime/rt.h"

#define SUPER (RT_MAP_BASE + 0x1000)   /* supervisor-only, writable */
#define RO_USER (RT_MAP_BASE + 0x2000) /* user, read-only */
#define NX_USER (RT_MAP_BASE + 0x3000) /* user, writable, no-execute */
#define RO (RT_MAP_BASE + 0x4000)      /* supervisor, read-only */

struct fault { u64 vector, error, cr2, cs; };
#define NO_FAULT 256
static volatile struct fault seen = {NO_FAULT, 0, 0, 0};
static int record(struct frame *f) {
    seen.vector = f->vector; seen.error = f->error; seen.cr2 = read_cr2(); seen.cs = f->cs;
    return rt_resume_at(f);
}

static int failures;
static void report(const char *what, struct fault got, u64 error, u64 cr2) {
    rt_puts(what); rt_puts(": vector "); rt_put_dec(got.vector);
    rt_puts(" error "); rt_put_hex(got.error);
    rt_puts(" cr2 "); rt_put_hex(got.cr2);
    rt_puts(got.cs & 3 ? " from CPL3" : " from CPL0");
    if (got.vector != 14 || got.error != error || got.cr2 != cr2) { rt_puts(" WRONG"); failures++; }
    rt_puts("\n");
}
static void value(const char *what, u64 got, u64 want) {
    rt_puts(what); rt_puts(": "); rt_put_hex(got);
    if (got != want) { rt_puts(" WRONG"); failures++; }
    rt_puts("\n");
}

/* Faults taken at CPL3, kept for printing at CPL0. */
static struct fault user_read_super, user_write_ro, user_fetch_nx, user_write_ro_nowp;
static volatile u64 user_read_ro;
static struct fault take(void) {
    struct fault f = seen;
    seen = (struct fault){NO_FAULT, 0, 0, 0};
    rt_resume = 0; /* in case nothing faulted */
    return f;
}

static void user_part(void) {
    RT_FAULTING("mov (%%rax), %%rcx", SUPER);
    user_read_super = take();
    RT_FAULTING("movq $1, (%%rax)", RO_USER);
    user_write_ro = take();
    RT_FAULTING("jmp *%%rax", NX_USER);
    user_fetch_nx = take();
    user_read_ro = *(volatile u64 *)RO_USER;
    rt_user_return(0);
}
static void user_write_only(void) {
    RT_FAULTING("movq $1, (%%rax)", RO_USER);
    user_write_ro_nowp = take();
    rt_user_return(0);
}

int main(void) {
    rt_set_trap(14, record);
    u64 cr3 = read_cr3();
    u64 *f1 = rt_page_alloc(), *f2 = rt_page_alloc(), *f3 = rt_page_alloc(), *f4 = rt_page_alloc();
    *f1 = 0x5005; *f2 = 0x7007; *(u8 *)f3 = 0xc3; *f4 = 0x3003;
    rt_map(cr3, SUPER, (u64)f1, PTE_P | PTE_W);
    rt_map(cr3, RO_USER, (u64)f2, PTE_P | PTE_U);
    rt_map(cr3, NX_USER, (u64)f3, PTE_P | PTE_W | PTE_U | PTE_NX);
    rt_map(cr3, RO, (u64)f4, PTE_P);

    value("CPL0 read of the supervisor page", *(volatile u64 *)SUPER, 0x5005);
    rt_enter_user(user_part);
    report("CPL3 read of the supervisor page", user_read_super, 5, SUPER);
    report("CPL3 write to the read-only user page", user_write_ro, 7, RO_USER);
    report("CPL3 jump into the no-execute page", user_fetch_nx, 0x15, NX_USER);
    value("CPL3 read of the read-only user page", user_read_ro, 0x7007);

    RT_FAULTING("jmp *%%rax", NX_USER);
    report("CPL0 jump into the no-execute page", take(), 0x11, NX_USER);
    RT_FAULTING("movq $0x3333, (%%rax)", RO);
    report("CPL0 write to the read-only page, CR0.WP=1", take(), 3, RO);
    value("read-only page after the faulting write", *(volatile u64 *)RO, 0x3003);
    write_cr0(read_cr0() & ~CR0_WP);
    RT_FAULTING("movq $0x3333, (%%rax)", RO);
    if (take().vector == NO_FAULT) rt_puts("CPL0 write to the read-only page, CR0.WP=0: no fault\n");
    else { rt_puts("CPL0 write to the read-only page, CR0.WP=0: faulted WRONG\n"); failures++; }
    value("read-only page after that write", *(volatile u64 *)RO, 0x3333);
    rt_enter_user(user_write_only);
    report("CPL3 write to the read-only user page, CR0.WP=0", user_write_ro_nowp, 7, RO_USER);
    write_cr0(read_cr0() | CR0_WP);

    rt_puts(failures ? "user-fault: FAILED\n" : "user-fault: ok\n");
    return failures ? 1 : 0;
}

/* user-mappings: a present PTE changed at CPL0, then touched from CPL3 — what the hybrid
 * engine's copy of the guest's page tables (src/vmm/engine/hybrid/user_tables.rs) must follow,
 * since KVM does not see hbt's writes to guest page tables. CPL3 reads and writes a user page;
 * CPL0 then re-points its PTE to another frame and invalidates it (INVLPG), makes it read-only,
 * removes it, maps it again without an invalidation (a not-present entry is never cached),
 * re-points it and reloads CR3, switches to a second tree mapping it elsewhere and back, and
 * re-points, write-protects and removes it while the second tree is loaded.
 * Each CPL3 touch reports what it read or the #PF it took. Only what the architecture
 * guarantees is checked (every narrowing change is followed by its invalidation). */
#include "runtime/rt.h"

#define VA (RT_MAP_BASE + 0x5000)

struct fault { u64 vector, error, cr2; };
#define NO_FAULT 256
static volatile struct fault seen = {NO_FAULT, 0, 0};
static int record(struct frame *f) {
    seen.vector = f->vector; seen.error = f->error; seen.cr2 = read_cr2();
    return rt_resume_at(f);
}

static int failures;
static volatile u64 user_value;
static struct fault user_fault;

static struct fault take(void) {
    struct fault f = seen;
    seen = (struct fault){NO_FAULT, 0, 0};
    rt_resume = 0;
    return f;
}
static void user_read(void) {
    user_value = 0;
    RT_FAULTING("mov (%%rax), %%rcx; mov %%rcx, user_value(%%rip)", VA);
    user_fault = take();
    rt_user_return(0);
}
static void user_write(void) {
    RT_FAULTING("movq $0x7777, (%%rax)", VA);
    user_fault = take();
    rt_user_return(0);
}

/* Runs `fn` at CPL3 and reports what it saw. */
static void touch(const char *what, void (*fn)(void), u64 want_value, u64 want_error) {
    rt_enter_user(fn);
    rt_puts(what); rt_puts(": ");
    int ok;
    if (user_fault.vector == NO_FAULT) {
        rt_puts("read "); rt_put_hex(user_value);
        ok = want_error == NO_FAULT && (fn != user_read || user_value == want_value);
        if (fn == user_write) { rt_puts(" (wrote)"); }
    } else {
        rt_puts("#PF error "); rt_put_hex(user_fault.error);
        rt_puts(user_fault.cr2 == VA ? " at the page" : " ELSEWHERE");
        ok = user_fault.vector == 14 && user_fault.error == want_error && user_fault.cr2 == VA;
    }
    if (!ok) { rt_puts(" WRONG"); failures++; }
    rt_puts("\n");
}

int main(void) {
    rt_set_trap(14, record);
    u64 cr3 = read_cr3();
    u64 *a = rt_page_alloc(), *b = rt_page_alloc(), *c = rt_page_alloc();
    *a = 0xaaaa; *b = 0xbbbb; *c = 0xcccc;
    volatile u64 *pte = rt_pte(cr3, VA);
    const u64 user_rw = PTE_P | PTE_W | PTE_U;

    *pte = (u64)a | user_rw; invlpg(VA);
    touch("mapped to A", user_read, 0xaaaa, NO_FAULT);
    touch("write to A", user_write, 0, NO_FAULT);
    touch("read back", user_read, 0x7777, NO_FAULT);
    *a = 0xaaaa;

    *pte = (u64)b | user_rw; invlpg(VA);
    touch("re-pointed to B + invlpg", user_read, 0xbbbb, NO_FAULT);
    *pte = (u64)b | PTE_P | PTE_U; invlpg(VA);
    touch("made read-only + invlpg, write", user_write, 0, 7);
    touch("read-only, read", user_read, 0xbbbb, NO_FAULT);
    *pte = 0; invlpg(VA);
    touch("removed + invlpg", user_read, 0, 4);
    *pte = (u64)a | user_rw;  /* not present before: nothing to invalidate */
    touch("mapped again to A, no invlpg", user_read, 0xaaaa, NO_FAULT);
    *pte = (u64)c | user_rw; write_cr3(cr3);
    touch("re-pointed to C + CR3 reload", user_read, 0xcccc, NO_FAULT);
    *pte = (u64)c | PTE_P | PTE_W; invlpg(VA);
    touch("made supervisor-only + invlpg", user_read, 0, 5);

    u64 other = rt_pt_new();
    rt_map(other, VA, (u64)b, user_rw);
    write_cr3(other);
    touch("second tree, B", user_read, 0xbbbb, NO_FAULT);
    *pte = (u64)a | user_rw;  /* the first tree, while it is not in use */
    write_cr3(cr3);
    touch("first tree again, A", user_read, 0xaaaa, NO_FAULT);
    /* Narrowed while the tree is not in use: only the CR3 load that comes back to it
     * invalidates (the hybrid engine keeps a copy per tree and must check it). */
    write_cr3(other);
    *pte = (u64)c | user_rw;
    write_cr3(cr3);
    touch("re-pointed to C while away, back", user_read, 0xcccc, NO_FAULT);
    write_cr3(other);
    *pte = (u64)c | PTE_P | PTE_U;
    write_cr3(cr3);
    touch("made read-only while away, back, write", user_write, 0, 7);
    write_cr3(other);
    *pte = 0;
    write_cr3(cr3);
    touch("removed while away, back", user_read, 0, 4);

    rt_puts(failures ? "user-mappings: FAILED\n" : "user-mappings: ok\n");
    return failures ? 1 : 0;
}

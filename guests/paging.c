/* paging: what an OS relies on when it changes mappings, at CPL0. A CR3 switch between two
 * trees that map one virtual page to different frames; a PTE re-pointed and INVLPG; a PTE
 * re-pointed and CR3 reloaded (the non-global translation must be walked again); a global page
 * (CR4.PGE) re-pointed and INVLPG, and re-pointed with CR4.PGE toggled. Each for data and for
 * code (a function on the page, which a translator caches). Only what the architecture
 * guarantees is checked: a stale translation may survive a PTE change until INVLPG or a CR3
 * write (global ones until INVLPG or a PGE toggle), and may also be dropped early, so nothing
 * is read between a change and its flush. Last, a code page removed: a jump into it faults
 * (#PF, fetch), and once mapped again it runs what its frame holds then. */
#include "runtime/rt.h"

#define DATA (RT_MAP_BASE + 0x1000)   /* non-global data page */
#define GDATA (RT_MAP_BASE + 0x2000)  /* global data page */
#define CODE (RT_MAP_BASE + 0x3000)   /* non-global code page */
#define GCODE (RT_MAP_BASE + 0x4000)  /* global code page */

static int failures;

static void check(const char *what, u64 got, u64 want) {
    rt_puts(what); rt_puts(": "); rt_put_hex(got);
    if (got != want) { rt_puts(" WRONG, want "); rt_put_hex(want); failures++; }
    rt_puts("\n");
}

static volatile u64 fault_error = 256, fault_cr2;
static int record(struct frame *f) {
    fault_error = f->error; fault_cr2 = read_cr2();
    return rt_resume_at(f);
}

static u64 read_at(u64 va) { return *(volatile u64 *)va; }
static u64 call_at(u64 va) { return ((u64(*)(void))va)(); }

/* A frame holding `value` as data at offset 0, as code at offset 8 (mov $value, %eax; ret),
 * and at offset 16 a jump to CODE + 8 for when it is mapped at GCODE. */
static u64 frame_with(u32 value) {
    u8 *f = rt_page_alloc();
    *(u64 *)f = value;
    const u8 code[] = {0xb8, (u8)value, (u8)(value >> 8), (u8)(value >> 16), (u8)(value >> 24), 0xc3};
    for (int i = 0; i < 6; i++) f[8 + i] = code[i];
    u32 rel = (u32)((CODE + 8) - (GCODE + 16 + 5));
    const u8 jmp[] = {0xe9, (u8)rel, (u8)(rel >> 8), (u8)(rel >> 16), (u8)(rel >> 24)};
    for (int i = 0; i < 5; i++) f[16 + i] = jmp[i];
    return (u64)f;
}

int main(void) {
    u64 a = frame_with(0xaaaa), b = frame_with(0xbbbb);
    u64 t1 = rt_pt_new(), t2 = rt_pt_new();
    const u64 rw = PTE_P | PTE_W;
    for (u64 va = DATA; va <= GCODE; va += RT_PAGE) {
        u64 g = va == GDATA || va == GCODE ? PTE_G : 0;
        rt_map(t1, va, a, rw | g);
        rt_map(t2, va, g ? a : b, rw | g); /* global pages map alike in every tree, as in an OS */
    }
    write_cr4(read_cr4() | CR4_PGE);

    write_cr3(t1);
    check("tree 1 data", read_at(DATA), 0xaaaa);
    check("tree 1 code", call_at(CODE + 8), 0xaaaa);
    write_cr3(t2);
    check("tree 2 data", read_at(DATA), 0xbbbb);
    check("tree 2 code", call_at(CODE + 8), 0xbbbb);
    write_cr3(t1);
    check("tree 1 again data", read_at(DATA), 0xaaaa);
    check("tree 1 again code", call_at(CODE + 8), 0xaaaa);

    /* Non-global: re-pointed, then INVLPG. */
    *rt_pte(t1, DATA) = b | rw;
    *rt_pte(t1, CODE) = b | rw;
    invlpg(DATA);
    invlpg(CODE);
    check("re-pointed + invlpg data", read_at(DATA), 0xbbbb);
    check("re-pointed + invlpg code", call_at(CODE + 8), 0xbbbb);
    /* Non-global: re-pointed, then the same CR3 written again. */
    *rt_pte(t1, DATA) = a | rw;
    *rt_pte(t1, CODE) = a | rw;
    write_cr3(t1);
    check("re-pointed + cr3 reload data", read_at(DATA), 0xaaaa);
    check("re-pointed + cr3 reload code", call_at(CODE + 8), 0xaaaa);

    /* Global: each tree has its own page tables, so the global pages are re-pointed in both,
     * as an OS changing a kernel mapping would. */
    check("global data", read_at(GDATA), 0xaaaa);
    check("global code", call_at(GCODE + 8), 0xaaaa);
    u64 grw = rw | PTE_G;
    *rt_pte(t1, GDATA) = b | grw; *rt_pte(t2, GDATA) = b | grw;
    *rt_pte(t1, GCODE) = b | grw; *rt_pte(t2, GCODE) = b | grw;
    invlpg(GDATA);
    invlpg(GCODE);
    check("global re-pointed + invlpg data", read_at(GDATA), 0xbbbb);
    check("global re-pointed + invlpg code", call_at(GCODE + 8), 0xbbbb);
    /* A CR3 write may keep global translations (or drop them): re-point, switch trees, and
     * look only at the non-global page, which must be walked again. */
    *rt_pte(t1, GDATA) = a | grw; *rt_pte(t2, GDATA) = a | grw;
    *rt_pte(t1, GCODE) = a | grw; *rt_pte(t2, GCODE) = a | grw;
    *rt_pte(t2, DATA) = a | rw;
    *rt_pte(t2, CODE) = a | rw;
    write_cr3(t2);
    check("after cr3 switch, non-global data", read_at(DATA), 0xaaaa);
    check("after cr3 switch, non-global code", call_at(CODE + 8), 0xaaaa);
    /* Toggling CR4.PGE drops every translation, global ones included. */
    u64 cr4 = read_cr4();
    write_cr4(cr4 & ~CR4_PGE);
    write_cr4(cr4);
    check("global after PGE toggle data", read_at(GDATA), 0xaaaa);
    check("global after PGE toggle code", call_at(GCODE + 8), 0xaaaa);

    /* Global code jumping into non-global code that differs per tree: the jump must follow
     * the tree (a translator must not keep a link from the global block to the old target). */
    *rt_pte(t1, CODE) = a | rw;
    *rt_pte(t2, CODE) = b | rw;
    write_cr3(t1);
    u64 first = call_at(GCODE + 16), second = call_at(GCODE + 16);
    check("global jump to tree 1 code", first == second ? first : 0, 0xaaaa);
    write_cr3(t2);
    check("global jump to tree 2 code", call_at(GCODE + 16), 0xbbbb);
    write_cr3(t1);
    check("global jump to tree 1 code again", call_at(GCODE + 16), 0xaaaa);

    /* With CR4.PGE clear the G bit means nothing: a CR3 write drops that translation too. */
    write_cr4(cr4 & ~CR4_PGE);
    check("G bit without PGE data", read_at(GDATA), 0xaaaa);
    check("G bit without PGE code", call_at(GCODE + 8), 0xaaaa);
    *rt_pte(t1, GDATA) = b | grw;
    *rt_pte(t1, GCODE) = b | grw;
    write_cr3(t1);
    check("G bit without PGE, re-pointed + cr3 reload data", read_at(GDATA), 0xbbbb);
    check("G bit without PGE, re-pointed + cr3 reload code", call_at(GCODE + 8), 0xbbbb);

    /* Code removed (a translator still has its translation), jumped into, mapped again to the
     * same frame (not present before: nothing to invalidate), then re-pointed. */
    rt_set_trap(14, record);
    write_cr4(cr4);
    check("code before removal", call_at(CODE + 8), 0xaaaa);
    *rt_pte(t1, CODE) = 0;
    invlpg(CODE);
    RT_FAULTING("jmp *%%rax", CODE + 8);
    check("removed code page, jump: #PF error", fault_error, 0x10);
    check("removed code page, jump: cr2", fault_cr2, CODE + 8);
    *rt_pte(t1, CODE) = a | rw;
    check("mapped again, same frame: code", call_at(CODE + 8), 0xaaaa);
    *rt_pte(t1, CODE) = b | rw;
    invlpg(CODE);
    check("then re-pointed + invlpg: code", call_at(CODE + 8), 0xbbbb);

    rt_puts(failures ? "paging: FAILED\n" : "paging: ok\n");
    return failures ? 1 : 0;
}

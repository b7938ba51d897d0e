/* smc-alias: one physical page of code mapped at two virtual addresses, X (executable, not
 * writable) and W (writable, no-execute), as a JIT or a kernel patching its own text does.
 * Code runs from X and is rewritten through W; the new instruction must run:
 * - f (`mov $imm, %eax; ret`) called, its immediate rewritten through W (and once through the
 *   identity map, a third alias), called again;
 * - g rewrites its own next instruction through W and jumps to it (the SDM's way to modify
 *   code: store, jump, execute), in one straight run of code;
 * - h loops 256 times over `add $1, %eax` and at iteration k rewrites that `add` through W to
 *   `add $2`: the loop is translated and chained by then, and from iteration k+1 on the new
 *   instruction must run (result k + 2·(256 − k)).
 * At CPL0 and again at CPL3 (X and W are user pages). */
#include "runtime/rt.h"

#define X (RT_MAP_BASE + 0x10000)
#define W (RT_MAP_BASE + 0x20000)

/* The code copied into the page (position-independent; offsets from smc_code). */
extern char smc_code[], smc_code_end[], smc_f[], smc_g[], smc_g_mov[], smc_h[], smc_h_add[];
__asm__(".pushsection .rodata\n"
        ".globl smc_code, smc_code_end, smc_f, smc_g, smc_g_mov, smc_h, smc_h_add\n"
        "smc_code:\n"
        "smc_f:\n"                      /* u32 f(void) */
        "    mov $0x1111, %eax\n"
        "    ret\n"
        "    .balign 16, 0xcc\n"
        "smc_g:\n"                      /* u32 g(u32 v, u32 *imm_through_w) */
        "    mov %edi, (%rsi)\n"
        "    jmp 1f\n"
        "1:\n"
        "smc_g_mov:\n"
        "    mov $0x1111, %eax\n"
        "    ret\n"
        "    .balign 16, 0xcc\n"
        "smc_h:\n"                      /* u32 h(u32 k, u8 *imm_through_w) */
        "    xor %eax, %eax\n"
        "    xor %ecx, %ecx\n"
        "2:\n"
        "smc_h_add:\n"
        "    add $1, %eax\n"
        "    inc %ecx\n"
        "    cmp %edi, %ecx\n"
        "    jne 3f\n"
        "    movb $2, (%rsi)\n"
        "3:  cmp $256, %ecx\n"
        "    jne 2b\n"
        "    ret\n"
        "smc_code_end:\n"
        ".popsection\n");

#define AT(va, label) ((va) + (u64)((label) - smc_code))
typedef u32 (*f_fn)(void);
typedef u32 (*g_fn)(u32, volatile u32 *);
typedef u32 (*h_fn)(u32, volatile u8 *);

static u8 *frame; /* the page, through the identity map */

/* One pass of the three checks (at the CPL it is called at); results in r[]. */
struct results { u32 f1, f2, f3, g1, g2, h1, h2; };
static void run_checks(struct results *r) {
    f_fn f = (f_fn)AT(X, smc_f);
    g_fn g = (g_fn)AT(X, smc_g);
    h_fn h = (h_fn)AT(X, smc_h);
    *(volatile u32 *)AT(W, smc_f + 1) = 0x1111;
    r->f1 = f();
    *(volatile u32 *)AT(W, smc_f + 1) = 0x2222;
    r->f2 = f();
    *(volatile u32 *)AT((u64)frame, smc_f + 1) = 0x3333; /* the identity map: a third alias */
    r->f3 = f();
    r->g1 = g(0x4444, (volatile u32 *)AT(W, smc_g_mov + 1));
    r->g2 = g(0x5555, (volatile u32 *)AT(W, smc_g_mov + 1));
    *(volatile u8 *)AT(W, smc_h_add + 2) = 1;
    r->h1 = h(100, (volatile u8 *)AT(W, smc_h_add + 2));
    *(volatile u8 *)AT(W, smc_h_add + 2) = 1;
    r->h2 = h(200, (volatile u8 *)AT(W, smc_h_add + 2));
}

static struct results user_results;
static void user_part(void) {
    run_checks(&user_results);
    rt_user_return(0);
}

static int failures;
static void verdict(int ok) {
    rt_puts(ok ? " ok\n" : " WRONG\n");
    failures += !ok;
}
static void report(const char *cpl, const struct results *r) {
    rt_puts(cpl); rt_puts(": f "); rt_put_hex(r->f1);
    rt_puts(", rewritten through W "); rt_put_hex(r->f2);
    rt_puts(", through the identity map "); rt_put_hex(r->f3);
    verdict(r->f1 == 0x1111 && r->f2 == 0x2222 && r->f3 == 0x3333);
    rt_puts(cpl); rt_puts(": g rewriting itself "); rt_put_hex(r->g1); rt_puts(", "); rt_put_hex(r->g2);
    verdict(r->g1 == 0x4444 && r->g2 == 0x5555);
    rt_puts(cpl); rt_puts(": h rewritten in its loop at 100: "); rt_put_dec(r->h1);
    rt_puts(", at 200: "); rt_put_dec(r->h2);
    verdict(r->h1 == 100 + 2 * 156 && r->h2 == 200 + 2 * 56);
}

int main(void) {
    frame = rt_page_alloc();
    for (u64 i = 0; i < (u64)(smc_code_end - smc_code); i++) frame[i] = smc_code[i];
    u64 cr3 = read_cr3();
    rt_map(cr3, X, (u64)frame, PTE_P | PTE_U);
    rt_map(cr3, W, (u64)frame, PTE_P | PTE_W | PTE_U | PTE_NX);

    struct results kernel_results;
    run_checks(&kernel_results);
    report("CPL0", &kernel_results);
    rt_enter_user(user_part);
    report("CPL3", &user_results);
    rt_puts(failures ? "smc-alias: FAILED\n" : "smc-alias: ok\n");
    return failures ? 1 : 0;
}

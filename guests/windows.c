/* windows: runs of accesses through one base register, which the translator checks with one
 * soft-MMU lookup per run (translator/src/emit/window.rs). Each run here is one asm block (one
 * translated block): the base moves by constants between accesses; a run straddles two pages
 * mapped to frames in the opposite order; the second access of a run faults (CR2, the first
 * access done, the second not); a run writes a read-only page (nothing written); a read run
 * leaves the dirty bit clear and a write run sets it; a read-modify-write run (a load, then a
 * store through the same base) stopped by a fault between the two leaves the dirty bit clear,
 * and completes once it runs through; a run across conditional branches leaves by them with
 * every register as the guest left it; a base that jumps a page starts over; and at CPL3 a run
 * and a faulting run again. The transcript must be the CPU's (kvm). */
#include "runtime/rt.h"

#define WIN (RT_MAP_BASE + 0x10000)
#define STRADDLE (WIN + 0x2000) /* two pages, frames swapped */
#define EDGE (WIN + 0x4000)     /* mapped; the page after it is not */
#define RO (WIN + 0x6000)       /* supervisor, read-only */
#define CLEAN (WIN + 0x7000)    /* writable, A and D clear */
#define CLEAN2 (WIN + 0x8000)
#define JUMP (WIN + 0x9000) /* two pages */
#define USER (WIN + 0xb000) /* user, writable; the page after it is not mapped */
#define USER_STACK (WIN + 0xe000) /* user, writable; the page below it is not mapped */
#define RMW (WIN + 0x10000)       /* writable, A and D clear */



/* mov (b),a; add 8(b),a; add $16,b; add -8(b),a; lea 24(b),b; add -16(b),a; dec b;
 * add 1(b),a; sub $8,b; add 0x31(b),a: qwords 0, 1, 1, 3, 5 and 10 of the first base. */
static u64 moving_run(u64 base) {
    u64 sum;
    __asm__ volatile("mov (%1), %0\n add 8(%1), %0\n add $16, %1\n add -8(%1), %0\n"
                     "lea 24(%1), %1\n add -16(%1), %0\n dec %1\n add 1(%1), %0\n"
                     "sub $8, %1\n add 0x31(%1), %0"
                     : "=&r"(sum), "+r"(base)::"memory");
    return sum;
}
static u64 moving_sum(const u64 *q) { return q[0] + q[1] + q[1] + q[3] + q[5] + q[10]; }

/* Two loads 16 bytes apart; the second's destination starts as a marker. */
struct pair { u64 first, second; };
static struct pair two_loads(u64 base) {
    struct pair p = {0, 0x5e5e5e5e};
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip)\n"
                     "mov (%2), %0\n mov 16(%2), %1\n1:"
                     : "+r"(p.first), "+r"(p.second)
                     : "r"(base)
                     : "r11", "memory");
    return p;
}
static void two_stores(u64 base) {
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip)\n"
                     "movq $0x1111, (%0)\n movq $0x2222, 8(%0)\n1:" ::"r"(base)
                     : "r11", "memory");
}

/* Loads (base), adds 5, loads through `other`, stores the sum at 8(base): a settled write
 * window (translator/src/emit/window.rs). With `other` unmapped the run stops at that fault
 * and the store never runs. */
static u64 read_modify_write(u64 base, u64 other) {
    u64 v = 0;
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip)\n"
                     "mov (%1), %0\n add $5, %0\n mov (%2), %%r11\n mov %0, 8(%1)\n1:"
                     : "+&r"(v)
                     : "r"(base), "r"(other)
                     : "r11", "memory");
    return v;
}

/* One window across two conditional branches: loads (b), leaves by the first branch unless
 * it is `first`, adds 8(b), leaves by the second if the sum is zero, adds 16(b). Every
 * register the run does not name holds a marker throughout (so the window's own register is
 * one of them), stored to `markers` where the branches meet: a branch taken out of the window
 * must give every borrowed register back. */
#define MARKED 11 /* rbx rbp rsi r8-r15 */
static u64 markers[MARKED];
static u64 branchy_run(u64 base, u64 first) {
    u64 sum;
    __asm__ volatile("push %%rbp\n mov $0x1100, %%rbx\n mov $0x1101, %%rbp\n mov $0x1102, %%rsi\n"
                     "mov $0x1103, %%r8\n mov $0x1104, %%r9\n mov $0x1105, %%r10\n mov $0x1106, %%r11\n"
                     "mov $0x1107, %%r12\n mov $0x1108, %%r13\n mov $0x1109, %%r14\n mov $0x110a, %%r15\n"
                     "mov (%1), %0\n cmp %2, %0\n jne 1f\n add 8(%1), %0\n test %0, %0\n jz 1f\n"
                     "add 16(%1), %0\n"
                     "1: mov %%rbx, (%3)\n mov %%rbp, 8(%3)\n mov %%rsi, 16(%3)\n mov %%r8, 24(%3)\n"
                     "mov %%r9, 32(%3)\n mov %%r10, 40(%3)\n mov %%r11, 48(%3)\n mov %%r12, 56(%3)\n"
                     "mov %%r13, 64(%3)\n mov %%r14, 72(%3)\n mov %%r15, 80(%3)\n pop %%rbp"
                     : "=&a"(sum)
                     : "d"(base), "D"(first), "c"(markers)
                     : "rbx", "rsi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "memory");
    return sum;
}
/* The markers as branchy_run left them: how many are wrong. */
static u64 wrong_markers(void) {
    u64 wrong = 0;
    for (int i = 0; i < MARKED; i++) wrong += markers[i] != 0x1100 + (u64)i;
    return wrong;
}

static volatile u64 user_sum;
static struct rt_fault user_fault, push_fault;
static struct pair user_pair;
static u64 rsp_after;
/* Two pushes from USER_STACK + 8: the first fills the page's first qword, the second faults
 * on the unmapped page below (RSP as after the first). */
static void two_pushes(void) {
    __asm__ volatile("mov %%rsp, %%r12\n mov %1, %%rsp\n"
                     "lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip)\n"
                     "push %%r12\n push %%r12\n"
                     "1: mov %%rsp, %0\n mov %%r12, %%rsp"
                     : "=r"(rsp_after)
                     : "r"(USER_STACK + 8)
                     : "r11", "r12", "memory");
}
static void user_part(void) {
    user_sum = moving_run(USER);
    user_pair = two_loads(USER + RT_PAGE - 8);
    user_fault = rt_take_fault();
    two_pushes();
    push_fault = rt_take_fault();
    rt_user_return(0);
}

static u64 *filled_page(u64 seed) {
    u64 *p = rt_page_alloc();
    for (int i = 0; i < 512; i++) p[i] = seed + i * 0x101;
    return p;
}

int main(void) {
    rt_record_faults(14);
    u64 cr3 = read_cr3();

    u64 *w = filled_page(0x1000);
    rt_map(cr3, WIN, (u64)w, PTE_P | PTE_W);
    rt_check("moving base", moving_run(WIN), moving_sum(w));
    rt_check("moving base, from the middle", moving_run(WIN + 0x800), moving_sum(w + 0x100));

    u64 wrong_branchy = 0;
    for (int i = 0; i < 20; i++) { /* taken out at the first branch, then run through */
        wrong_branchy += branchy_run(WIN + 0x100, 0) != w[0x20] || wrong_markers();
        wrong_branchy += branchy_run(WIN + 0x100, w[0x20]) != w[0x20] + w[0x21] + w[0x22] || wrong_markers();
    }
    rt_check("a window across branches, 40 times: wrong", wrong_branchy, 0);

    /* The run [base-8, base+16) straddles STRADDLE+0x1000; its frames are swapped. */
    u64 *hi = filled_page(0x2000), *lo = filled_page(0x3000); /* the pool's frames ascend */
    rt_map(cr3, STRADDLE, (u64)lo, PTE_P | PTE_W);
    rt_map(cr3, STRADDLE + RT_PAGE, (u64)hi, PTE_P | PTE_W);
    u64 wrong = 0;
    for (int i = 0; i < 20; i++) { /* past the translator's retries */
        struct pair p = two_loads(STRADDLE + RT_PAGE - 8);
        wrong += p.first != lo[511] || p.second != hi[1];
    }
    rt_check("straddling two swapped frames, 20 times: wrong", wrong, 0);

    u64 *edge = filled_page(0x4000);
    rt_map(cr3, EDGE, (u64)edge, PTE_P | PTE_W);
    struct pair p = two_loads(EDGE + RT_PAGE - 8);
    rt_check_pf("second load on the unmapped page", rt_take_fault(), 0, EDGE + RT_PAGE + 8);
    rt_check("  first load done", p.first, edge[511]);
    rt_check("  second load not", p.second, 0x5e5e5e5e);
    p = two_loads(EDGE + RT_PAGE + 0x10);
    rt_check_pf("first load on the unmapped page", rt_take_fault(), 0, EDGE + RT_PAGE + 0x10);
    rt_check("  nothing loaded", p.second, 0x5e5e5e5e);

    u64 *ro = filled_page(0x6000);
    rt_map(cr3, RO, (u64)ro, PTE_P);
    two_stores(RO + 0x100);
    rt_check_pf("stores to the read-only page", rt_take_fault(), 3, RO + 0x100);
    rt_check("  first store not done", ro[0x20], 0x6000 + 0x20 * 0x101);

    u64 *clean = filled_page(0x7000), *clean2 = filled_page(0x8000);
    rt_map(cr3, CLEAN, (u64)clean, PTE_P | PTE_W);
    rt_map(cr3, CLEAN2, (u64)clean2, PTE_P | PTE_W);
    rt_check("reads of a clean page", two_loads(CLEAN).second, clean[2]);
    rt_check("  its PTE's A and D", *rt_pte(cr3, CLEAN) & (PTE_A | PTE_D), PTE_A);
    two_stores(CLEAN2 + 0x40);
    rt_check("stores to a clean page", clean2[8] + clean2[9], 0x3333);
    rt_check("  its PTE's A and D", *rt_pte(cr3, CLEAN2) & (PTE_A | PTE_D), PTE_A | PTE_D);

    u64 *rmw = filled_page(0xc000);
    rt_map(cr3, RMW, (u64)rmw, PTE_P | PTE_W);
    u64 v = read_modify_write(RMW + 0x80, EDGE + RT_PAGE);
    rt_check_pf("read-modify-write stopped between", rt_take_fault(), 0, EDGE + RT_PAGE);
    rt_check("  loaded and added", v, rmw[0x10] + 5);
    rt_check("  its PTE's A and D", *rt_pte(cr3, RMW) & (PTE_A | PTE_D), PTE_A);
    rt_check("  store not done", rmw[0x11], 0xc000 + 0x11 * 0x101);
    u64 wrong_rmw = 0;
    for (int i = 0; i < 20; i++) { /* the page now dirty: the window takes the run */
        v = read_modify_write(RMW + 0x100 + 16 * i, WIN);
        wrong_rmw += v != rmw[0x20 + 2 * i] + 5 || rmw[0x21 + 2 * i] != v;
    }
    rt_check("read-modify-write run through, 20 times: wrong", wrong_rmw, 0);
    rt_check("  its PTE's A and D", *rt_pte(cr3, RMW) & (PTE_A | PTE_D), PTE_A | PTE_D);

    u64 *j0 = filled_page(0x9000), *j1 = filled_page(0xa000);
    rt_map(cr3, JUMP, (u64)j0, PTE_P | PTE_W);
    rt_map(cr3, JUMP + RT_PAGE, (u64)j1, PTE_P | PTE_W);
    u64 sum, base = JUMP + 0x10;
    __asm__ volatile("mov (%1), %0\n add $4096, %1\n add (%1), %0\n add $-4088, %1\n add (%1), %0"
                     : "=&r"(sum), "+r"(base)::"memory");
    rt_check("a base that jumps a page", sum, j0[2] + j1[2] + j0[3]);

    u64 *u = filled_page(0xb000);
    rt_map(cr3, USER, (u64)u, PTE_P | PTE_W | PTE_U);
    u64 *ust = rt_page_alloc();
    rt_map(cr3, USER_STACK, (u64)ust, PTE_P | PTE_W | PTE_U);
    rt_enter_user(user_part);
    rt_check("CPL3 moving base", user_sum, moving_sum(u));
    rt_check_pf("CPL3 second load on the unmapped page", user_fault, 4, USER + RT_PAGE + 8);
    rt_check("  first load done", user_pair.first, u[511]);
    rt_check("  second load not", user_pair.second, 0x5e5e5e5e);

    rt_check_pf("CPL3 second push on the unmapped page", push_fault, 6, USER_STACK - 8);
    rt_check("  RSP after the first", rsp_after, USER_STACK);
    rt_check("  first push done", *(volatile u64 *)ust != 0, 1);

    rt_puts(rt_failures ? "windows: FAILED\n" : "windows: ok\n");
    return rt_failures ? 1 : 0;
}

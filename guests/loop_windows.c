/* loop-windows: counted loops over arrays, which the translator checks with one soft-MMU lookup
 * per entry into the loop (translator/src/emit/loop_window.rs). Each loop is an asm block whose
 * head is a block of its own: a sum through an index register and through a moving base, a
 * store loop over a clean page (the dirty bit set by the first store, as the CPU does), sums
 * over an array straddling two pages mapped to frames in the opposite order (past the
 * translator's retries, whole or one element into the second page, and entered past the loop's
 * bound) and over two pages on frames in order, a compare of two arrays whose pages share a
 * TLB slot (and string compares and loads across that slot), a sum that faults on an unmapped page mid-loop
 * (CR2, the counter and the sum at the fault), a loop entered with nothing left to do whose
 * next element lies on a page never accessed (its accessed bit stays clear), and at CPL3 a sum
 * and a fault again. The transcript must be the CPU's (kvm). */
#include "runtime/rt.h"

#define ARR (RT_MAP_BASE + 0x20000)
#define CLEAN (ARR + 0x1000)    /* writable, A and D clear */
#define STRADDLE (ARR + 0x2000) /* two pages, frames swapped */
#define EDGE (ARR + 0x4000)     /* mapped; the page after it is not */
#define UNTOUCHED (ARR + 0x6000) /* the page after ARR2: A clear, never accessed */
#define ARR2 (ARR + 0x5000)
#define USER (ARR + 0x8000)     /* user; the page after it is not mapped */
#define CONTIG (ARR + 0xc000)   /* two pages, frames in order */
/* Two pages whose page numbers share their low 16 bits: the same slot of the translator's
 * direct-mapped TLB, so filling either evicts the other. */
#define TWIN_A (ARR + 0x10000)
#define TWIN_B (TWIN_A + 0x10000000)


/* The sum of qwords [i, n) of base (i < n), counting i up by one: `add (b,i,8),s; inc i;
 * cmp n,i; jne`. Leaves the counter where it stopped (n, or where a fault stopped it). */
struct run { u64 sum, i; };
static struct run indexed_sum(u64 base, u64 i, u64 n) {
    struct run r = {0, i};
    __asm__ volatile("lea 2f(%%rip), %%r11; mov %%r11, rt_resume(%%rip)\n"
                     "1: add (%2,%1,8), %0\n inc %1\n cmp %3, %1\n jne 1b\n2:"
                     : "+r"(r.sum), "+r"(r.i)
                     : "r"(base), "r"(n)
                     : "r11", "memory", "cc");
    return r;
}
/* The same through a moving base, with the bound an immediate distance: `mov -8(p),t; add
 * 8(p),t; add t,s; add $8,p; cmp e,p; jne` over [p, e). */
static u64 moving_sum(u64 p, u64 e) {
    u64 sum = 0, t;
    __asm__ volatile("1: mov (%1), %2\n add 8(%1), %2\n add %2, %0\n add $16, %1\n cmp %3, %1\n jne 1b"
                     : "+r"(sum), "+r"(p), "=&r"(t)
                     : "r"(e)
                     : "memory", "cc");
    return sum;
}
/* Stores i·3 to qwords [0, 64) of base: `lea (i,i,2),t; mov t,(b,i,8); inc i; cmp $64,i; jne`. */
static void store_loop(u64 base) {
    u64 i = 0, t;
    __asm__ volatile("1: lea (%0,%0,2), %1\n mov %1, (%2,%0,8)\n inc %0\n cmp $64, %0\n jne 1b"
                     : "+r"(i), "=&r"(t)
                     : "r"(base)
                     : "memory", "cc");
}
/* A loop tested at its head: `cmp $n,i; je out; add (b,i,8),s; inc i; jmp head`, from i. */
static u64 head_tested_sum(u64 base, u64 i) {
    u64 sum = 0;
    __asm__ volatile("1: cmp $512, %1\n je 2f\n add (%2,%1,8), %0\n inc %1\n jmp 1b\n2:"
                     : "+r"(sum), "+r"(i)
                     : "r"(base)
                     : "memory", "cc");
    return sum;
}

/* A loop with two ways out: the counter reaching 480 (`cmp $480,i; je`) or j running down
 * (`dec j; jne`). Entered past 480 only j ends it, and the array it reads goes on into the
 * next page: `1: cmp $480,i; je 2f; add (b,i,8),s; inc i; dec j; jne 1b; 2:`. */
static u64 past_bound_sum(u64 base, u64 i, u64 j) {
    u64 sum = 0;
    __asm__ volatile("1: cmp $480, %1\n je 2f\n add (%3,%1,8), %0\n inc %1\n dec %2\n jne 1b\n2:"
                     : "+r"(sum), "+r"(i), "+r"(j)
                     : "r"(base)
                     : "memory", "cc");
    return sum;
}

/* How many of the bytes [0, n) of a and b are equal before the first that differs (n > 0): a
 * loop with two streams, as `memcmp`'s: `1: movzbl (a,i),t; cmp t8,(b,i); jne 2f; inc i;
 * cmp n,i; jne 1b; 2:`. */
static u64 equal_prefix(u64 a, u64 b, u64 n) {
    u64 i = 0, t;
    __asm__ volatile("1: movzbl (%2,%0), %k1\n cmp %b1, (%3,%0)\n jne 2f\n inc %0\n cmp %4, %0\n jne 1b\n2:"
                     : "+r"(i), "=&r"(t)
                     : "r"(a), "r"(b), "r"(n)
                     : "memory", "cc");
    return i;
}

static u64 *filled_page(u64 seed) {
    u64 *p = rt_page_alloc();
    for (int i = 0; i < 512; i++) p[i] = seed + i * 0x101;
    return p;
}
static u64 sum_of(const u64 *q, int from, int to) {
    u64 s = 0;
    for (int i = from; i < to; i++) s += q[i];
    return s;
}

static struct run user_run, user_edge;
static struct rt_fault user_fault;
static void user_part(void) {
    user_run = indexed_sum(USER, 3, 500);
    user_edge = indexed_sum(USER + 0xf00, 0, 64);
    user_fault = rt_take_fault();
    rt_user_return(0);
}

int main(void) {
    rt_record_faults(14);
    u64 cr3 = read_cr3();

    u64 *a = filled_page(0x1000);
    rt_map(cr3, ARR, (u64)a, PTE_P | PTE_W);
    rt_check("indexed sum [0, 64)", indexed_sum(ARR, 0, 64).sum, sum_of(a, 0, 64));
    rt_check("indexed sum [100, 512)", indexed_sum(ARR, 100, 512).sum, sum_of(a, 100, 512));
    rt_check("moving-base sum [8, 264)", moving_sum(ARR + 64, ARR + 64 + 2048), sum_of(a, 8, 264));

    u64 *clean = rt_page_alloc();
    rt_map(cr3, CLEAN, (u64)clean, PTE_P | PTE_W);
    store_loop(CLEAN);
    rt_check("stores to a clean page", clean[0] + clean[63], 63 * 3);
    rt_check("  its PTE's A and D", *rt_pte(cr3, CLEAN) & (PTE_A | PTE_D), PTE_A | PTE_D);

    /* [STRADDLE + 0xf00, STRADDLE + 0x1100): the last 32 qwords of one page, the first 32 of the
     * next; their frames are swapped (the pool hands out ascending frames: `lo` is below `hi`). */
    u64 *hi = filled_page(0x2000), *lo = filled_page(0x3000);
    rt_map(cr3, STRADDLE, (u64)lo, PTE_P | PTE_W);
    rt_map(cr3, STRADDLE + RT_PAGE, (u64)hi, PTE_P | PTE_W);
    u64 wrong = 0;
    for (int i = 0; i < 20; i++) /* past the translator's retries */
        wrong += indexed_sum(STRADDLE + 0xf00, 0, 64).sum != sum_of(lo, 480, 512) + sum_of(hi, 0, 32);
    rt_check("straddling two swapped frames, 20 times: wrong", wrong, 0);
    /* Only the last element on the next page. */
    wrong = 0;
    for (int i = 0; i < 20; i++)
        wrong += indexed_sum(STRADDLE + 0xf00, 0, 33).sum != sum_of(lo, 480, 512) + hi[0];
    rt_check("one element into the next frame, 20 times: wrong", wrong, 0);
    /* Two pages on frames that follow each other: one check covers both. */
    u64 *c0 = filled_page(0x9000), *c1 = filled_page(0xa000);
    rt_map(cr3, CONTIG, (u64)c0, PTE_P | PTE_W);
    rt_map(cr3, CONTIG + RT_PAGE, (u64)c1, PTE_P | PTE_W);
    wrong = 0;
    for (int i = 0; i < 20; i++)
        wrong += indexed_sum(CONTIG + 0xf00, 0, 64).sum != sum_of(c0, 480, 512) + sum_of(c1, 0, 32);
    rt_check("straddling two frames in order, 20 times: wrong", wrong, 0);
    /* Entered at 489, past the bound: 489–511 on the first page, 512–518 on the next (the
     * other frame). The entry check must refuse a count that does not fit: the low end of the
     * range is then above the high end, both on the first page. */
    wrong = 0;
    for (int i = 0; i < 20; i++)
        wrong += past_bound_sum(STRADDLE, 489, 30) != sum_of(lo, 489, 512) + sum_of(hi, 0, 7);
    rt_check("entered past its bound, 20 times: wrong", wrong, 0);

    /* Both streams' pages in one TLB slot: the entry check can never find both mapped at once,
     * and must give the window up rather than refill the two pages in turn for ever. */
    u64 *twin_a = filled_page(0xb000), *twin_b = filled_page(0xb000);
    ((u8 *)twin_b)[100] ^= 1;
    rt_map(cr3, TWIN_A, (u64)twin_a, PTE_P | PTE_W);
    rt_map(cr3, TWIN_B, (u64)twin_b, PTE_P | PTE_W);
    wrong = 0;
    for (int i = 0; i < 20; i++) wrong += equal_prefix(TWIN_A + 0x40, TWIN_B + 0x40, 128) != 36;
    rt_check("two streams in one TLB slot, 20 times: wrong", wrong, 0);
    {
        u64 si = TWIN_A + 0x40, di = TWIN_B + 0x40, n = 128;
        __asm__ volatile("repe cmpsb" : "+S"(si), "+D"(di), "+c"(n)::"memory", "cc");
        rt_check("repe cmpsb across the slot: left", n, 91);
        u64 q[2] = {0, 0};
        si = TWIN_A + 0x40; di = TWIN_B + 0x48;
        __asm__ volatile("mov (%0), %%rax\n add (%1), %%rax\n mov %%rax, (%2)" :: "r"(si), "r"(di), "r"(q) : "rax", "memory", "cc");
        rt_check("two loads across the slot", q[0], twin_a[8] + twin_b[9]);
        u64 eq;
        si = TWIN_A + 0x40; di = TWIN_B + 0x40;
        __asm__ volatile("cmpsq\n sete %b2\n movzbl %b2, %k2" : "+S"(si), "+D"(di), "=&r"(eq)::"memory", "cc");
        rt_check("cmpsq across the slot: equal", eq, 1);
    }

    u64 *edge = filled_page(0x4000);
    rt_map(cr3, EDGE, (u64)edge, PTE_P | PTE_W);
    struct run r = indexed_sum(EDGE + 0xe00, 0, 128);
    rt_check_pf("sum into the unmapped page", rt_take_fault(), 0, EDGE + RT_PAGE);
    rt_check("  counter at the fault", r.i, 64);
    rt_check("  sum at the fault", r.sum, sum_of(edge, 448, 512));

    /* Entered at i = 511: one element, then the loop head sees 512 and leaves; element 512
     * (on UNTOUCHED) is never read. */
    u64 *a2 = filled_page(0x5000), *untouched = filled_page(0x6000);
    rt_map(cr3, ARR2, (u64)a2, PTE_P | PTE_W);
    rt_map(cr3, UNTOUCHED, (u64)untouched, PTE_P | PTE_W);
    rt_check("head-tested sum from 500", head_tested_sum(ARR2, 500), sum_of(a2, 500, 512));
    rt_check("head-tested sum from 511", head_tested_sum(ARR2, 511), a2[511]);
    rt_check("  the next page's A", *rt_pte(cr3, UNTOUCHED) & PTE_A, 0);

    u64 *u = filled_page(0x8000);
    rt_map(cr3, USER, (u64)u, PTE_P | PTE_W | PTE_U);
    rt_enter_user(user_part);
    rt_check("CPL3 indexed sum [3, 500)", user_run.sum, sum_of(u, 3, 500));
    rt_check_pf("CPL3 sum into the unmapped page", user_fault, 4, USER + RT_PAGE);
    rt_check("  counter at the fault", user_edge.i, 32);
    rt_check("  sum at the fault", user_edge.sum, sum_of(u, 480, 512));

    rt_puts(rt_failures ? "loop-windows: FAILED\n" : "loop-windows: ok\n");
    return rt_failures ? 1 : 0;
}

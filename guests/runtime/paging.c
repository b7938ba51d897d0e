/* Page tables for guests that map their own 4 KiB pages (see rt.h). Linked only into guests
 * that call these (build.sh archives every runtime source but rt.c). */
#include "rt.h"

#define POOL_PAGES 32
static u8 pool[POOL_PAGES][RT_PAGE] __attribute__((aligned(4096)));
static u32 pool_used;

void *rt_page_alloc(void) {
    if (pool_used == POOL_PAGES) {
        rt_puts("rt_page_alloc: the page pool is exhausted\n");
        rt_exit(99);
    }
    return pool[pool_used++]; /* .bss: zero */
}

u64 rt_pt_new(void) {
    u64 *pml4 = rt_page_alloc();
    pml4[0] = ((u64 *)(read_cr3() & PTE_FRAME))[0]; /* slot 0: the identity map */
    return (u64)pml4;
}

/* The table entry `index` of `table` points to, allocated if not present. */
static u64 *next_table(u64 *table, u64 index) {
    if (!(table[index] & PTE_P)) table[index] = (u64)rt_page_alloc() | PTE_P | PTE_W | PTE_U;
    return (u64 *)(table[index] & PTE_FRAME);
}

volatile u64 *rt_pte(u64 cr3, u64 va) {
    if (va >> 39 == 0) { /* slot 0 is hbt's identity map, in 2 MiB pages */
        rt_puts("rt_pte: the address is in the identity map\n");
        rt_exit(99);
    }
    u64 *table = (u64 *)(cr3 & PTE_FRAME);
    for (int shift = 39; shift > 12; shift -= 9) table = next_table(table, (va >> shift) & 511);
    return &table[(va >> 12) & 511];
}

void rt_map(u64 cr3, u64 va, u64 pa, u64 flags) { *rt_pte(cr3, va) = (pa & PTE_FRAME) | flags; }

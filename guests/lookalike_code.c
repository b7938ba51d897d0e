/* lookalike-code: two page-table trees map one virtual code page to two frames whose code is
 * the same up to a jump, a call, a taken jcc or a return, and differs after it — two programs built from
 * the same library, loaded at the same address. Each tree must run its own frame's code
 * whatever ran before in the other. A translator that keeps a block because its bytes came back
 * unchanged must not keep the chained jumps and return caches that block had into the rest of
 * the page: they lead to the other frame's translations (a Linux guest's static binaries ran
 * the previous program's code at exit this way). At CPL0, each case three times per tree. */
#include "runtime/rt.h"

#define CODE (RT_MAP_BASE + 0x5000)

/* A frame of the code page, its differing code returning `value`. */
static u64 frame_for(u32 value) {
    u8 *f = rt_page_alloc();
    const u8 mov_ret[] = {0xb8, (u8)value, (u8)(value >> 8), 0, 0, 0xc3}; /* mov $value, %eax; ret */
    /* 0x00: xor %eax,%eax; jmp 0x40  (alike) */
    const u8 jmp[] = {0x31, 0xc0, 0xe9, 0x39, 0, 0, 0};
    /* 0x80: call 0xc0, then 0x85: mov $value, %eax; ret  (alike up to the call) */
    const u8 call[] = {0xe8, 0x3b, 0, 0, 0};
    /* 0x100: xor %eax,%eax; je 0x140; 0x108: mov $0xdead, %eax; ret  (alike) */
    const u8 jcc[] = {0x31, 0xc0, 0x0f, 0x84, 0x38, 0, 0, 0, 0xb8, 0xad, 0xde, 0, 0, 0xc3};
    for (int i = 0; i < (int)sizeof jmp; i++) f[0x00 + i] = jmp[i];
    for (int i = 0; i < 6; i++) f[0x40 + i] = mov_ret[i];
    for (int i = 0; i < (int)sizeof call; i++) f[0x80 + i] = call[i];
    for (int i = 0; i < 6; i++) f[0x85 + i] = mov_ret[i];
    f[0xc0] = 0xc3; /* ret (alike) */
    /* 0x180: call 0x1c0, then 0x185: mov $value, %eax; ret; 0x1c0: xor %eax,%eax; je 0x1e0;
     * 0x1c8: ret; 0x1e0: ret  (alike up to the return, whose cache knows 0x185) */
    const u8 ret[] = {0x31, 0xc0, 0x0f, 0x84, 0x18, 0, 0, 0, 0xc3};
    f[0x180] = 0xe8; f[0x181] = 0x3b; f[0x182] = f[0x183] = f[0x184] = 0;
    for (int i = 0; i < 6; i++) f[0x185 + i] = mov_ret[i];
    for (int i = 0; i < (int)sizeof ret; i++) f[0x1c0 + i] = ret[i];
    f[0x1e0] = 0xc3;
    for (int i = 0; i < (int)sizeof jcc; i++) f[0x100 + i] = jcc[i];
    for (int i = 0; i < 6; i++) f[0x140 + i] = mov_ret[i];
    return (u64)f;
}

static u64 call_at(u64 va) { return ((u64(*)(void))va)(); }

static void run(const char *tree, u64 want) {
    static const struct { const char *what; u64 offset; } cases[] = {
        {"jmp", 0x00}, {"call", 0x80}, {"jcc", 0x100}, {"ret after a jcc", 0x180},
    };
    for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
        u64 got = 0;
        int same = 1;
        for (int i = 0; i < 3; i++) {
            u64 v = call_at(CODE + cases[c].offset);
            if (i == 0) got = v;
            same &= v == got;
        }
        rt_puts(tree); rt_puts(" "); rt_puts(cases[c].what);
        rt_check(same ? "" : " (changed between runs)", got, want);
    }
}

int main(void) {
    u64 t1 = rt_pt_new(), t2 = rt_pt_new();
    rt_map(t1, CODE, frame_for(0x1111), PTE_P | PTE_W);
    rt_map(t2, CODE, frame_for(0x2222), PTE_P | PTE_W);
    write_cr3(t1);
    run("tree 1", 0x1111);
    write_cr3(t2);
    run("tree 2", 0x2222);
    write_cr3(t1);
    run("tree 1 again", 0x1111);
    write_cr3(t2);
    run("tree 2 again", 0x2222);
    rt_puts(rt_failures ? "lookalike-code: FAILED\n" : "lookalike-code: ok\n");
    return rt_failures ? 1 : 0;
}

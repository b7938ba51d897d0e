/* smc: writes an instruction, runs it, rewrites its immediate and runs it again. Then writes a
 * byte next to it on the same page (not the instruction: the translation comes back as it was,
 * `Translator::revive`), rewrites the immediate once more (the new one must run, not a revived
 * block) and writes the byte again. */
#include "runtime/rt.h"
static u8 code[16] __attribute__((aligned(16)));
static u32 run(void) { return ((u32(*)(void))code)(); }
int main(void) {
    const u8 mov_eax_ret[] = {0xb8, 0x11, 0x11, 0x11, 0x11, 0xc3}; /* mov eax, imm32; ret */
    for (int i = 0; i < 6; i++) code[i] = mov_eax_ret[i];
    u32 first = run();
    *(volatile u32 *)(code + 1) = 0x22222222;
    u32 second = run();
    *(volatile u8 *)(code + 12) = 0x90;
    u32 third = run();
    *(volatile u32 *)(code + 1) = 0x33333333;
    u32 fourth = run();
    *(volatile u8 *)(code + 12) = 0xcc;
    u32 fifth = run();
    rt_puts("smc: first "); rt_put_hex(first);
    rt_puts(", after rewrite "); rt_put_hex(second);
    rt_puts("\nsmc: after a write beside it "); rt_put_hex(third);
    rt_puts(", after another rewrite "); rt_put_hex(fourth);
    rt_puts(", after a write beside it "); rt_put_hex(fifth);
    rt_puts("\n");
    return first == 0x11111111 && second == 0x22222222 && third == 0x22222222 && fourth == 0x33333333 &&
                   fifth == 0x33333333
               ? 0
               : 1;
}

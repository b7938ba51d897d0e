/* smc: writes an instruction, runs it, rewrites its immediate and runs it again. */
#include "runtime/rt.h"
static u8 code[16] __attribute__((aligned(16)));
static u32 run(void) { return ((u32(*)(void))code)(); }
int main(void) {
    const u8 mov_eax_ret[] = {0xb8, 0x11, 0x11, 0x11, 0x11, 0xc3}; /* mov eax, imm32; ret */
    for (int i = 0; i < 6; i++) code[i] = mov_eax_ret[i];
    u32 first = run();
    *(volatile u32 *)(code + 1) = 0x22222222;
    u32 second = run();
    rt_puts("smc: first "); rt_put_hex(first);
    rt_puts(", after rewrite "); rt_put_hex(second);
    rt_puts("\n");
    return first == 0x11111111 && second == 0x22222222 ? 0 : 1;
}

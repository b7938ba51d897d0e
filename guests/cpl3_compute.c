/* cpl3-compute: a compute loop at CPL3 (native speed under KVM), back to CPL0 by `syscall`. */
#include "runtime/rt.h"
#define ITERATIONS 100000000UL
static void user_main(void) {
    u64 x = 0x9e3779b97f4a7c15UL, sum = 0;
    for (u64 i = 0; i < ITERATIONS; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        sum += x;
    }
    rt_user_return(sum);
}
int main(void) {
    rt_puts("cpl3-compute: ");
    rt_put_dec(ITERATIONS);
    rt_puts(" xorshift steps at CPL3\n");
    u64 sum = rt_enter_user(user_main);
    rt_puts("checksum ");
    rt_put_hex(sum);
    rt_puts("\n");
    return 0;
}

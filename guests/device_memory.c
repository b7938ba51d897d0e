/* device-memory: loads, stores and a read-modify-write at guest-physical addresses that are not
 * RAM, as every engine must treat them (a PC bus with nothing there): reads return all ones,
 * writes vanish, nothing ends the run. Two places: a free page of the MMIO hole (not the local
 * APIC's 0xfee00000: KVM keeps its own APIC there) and the identity map past the end of RAM
 * (1 GiB; hbt gives 256 MiB). */
#include "runtime/rt.h"
#define HOLE 0xd0000000UL
#define PAST_RAM 0x40000000UL
static int report(const char *what, u64 got, u64 want) {
    rt_puts(what); rt_puts(" "); rt_put_hex(got);
    rt_puts(got == want ? " ok\n" : " WRONG\n");
    return got == want;
}
int main(void) {
    volatile u32 *hole = (volatile u32 *)(HOLE + 0x80);
    volatile u64 *past = (volatile u64 *)PAST_RAM;
    volatile u8 *past_byte = (volatile u8 *)(PAST_RAM + 0xfff);
    volatile u16 *past_word = (volatile u16 *)(PAST_RAM + 0x10);
    int ok = 1;
    *hole = 0x12345678;
    ok &= report("hole dword after a store:", *hole, 0xffffffffUL);
    *past = 0x1122334455667788UL;
    ok &= report("past-RAM qword after a store:", *past, ~0UL);
    ok &= report("past-RAM last byte of a page:", *past_byte, 0xff);
    __asm__ volatile("addw $1, %0" : "+m"(*past_word));
    ok &= report("past-RAM word after add:", *past_word, 0xffff);
    return ok ? 0 : 1;
}

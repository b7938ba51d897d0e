/* cpuid-model: the processor a guest sees is the same at CPL0 and CPL3. Under the hybrid
 * engine user code runs under KVM, whose own CPUID answers are not hbt's CPU model on kvm_pvm
 * (leaf 7 shows the host's AVX-512): a program that saw AVX-512 there would later run it in
 * the translator, which has no rules for it. KVM makes CPL3 CPUID fault out (CPUID faulting)
 * and the translator answers. Compares leaves 0, 1, 7 and 0xd (subleaves 0 and 1) and prints
 * whether both levels agree. */
#include "runtime/rt.h"

struct leaf { u32 a, b, c, d; };
static const u32 leaves[][2] = {{0, 0}, {1, 0}, {7, 0}, {0xd, 0}, {0xd, 1}};
#define N (sizeof leaves / sizeof leaves[0])
static struct leaf user[N];

static struct leaf cpuid(u32 leaf, u32 sub) {
    struct leaf r = {leaf, 0, sub, 0};
    __asm__ volatile("cpuid" : "+a"(r.a), "=b"(r.b), "+c"(r.c), "=d"(r.d));
    return r;
}
static void user_part(void) {
    for (unsigned i = 0; i < N; i++) user[i] = cpuid(leaves[i][0], leaves[i][1]);
    rt_user_return(0);
}

int main(void) {
    rt_enter_user(user_part);
    int failures = 0;
    for (unsigned i = 0; i < N; i++) {
        struct leaf k = cpuid(leaves[i][0], leaves[i][1]);
        /* Leaf 1 EBX[31:24] is the APIC ID, the same at both levels on one CPU. */
        int same = k.a == user[i].a && k.b == user[i].b && k.c == user[i].c && k.d == user[i].d;
        rt_puts("leaf "); rt_put_hex(leaves[i][0]); rt_puts(" subleaf "); rt_put_hex(leaves[i][1]);
        rt_puts(same ? ": CPL0 and CPL3 agree\n" : ": CPL0 and CPL3 DIFFER\n");
        failures += !same;
    }
    rt_puts(failures ? "cpuid-model: FAILED\n" : "cpuid-model: ok\n");
    return failures ? 1 : 0;
}

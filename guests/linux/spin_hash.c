/* spin-hash: a CPU-bound guest workload with no system call in its loop (benches/linux-guest.sh,
 * workload a): FNV-1a over a 1 MiB pseudo-random buffer, PASSES times (default 1000, about a
 * second natively), then one line with the hash. Built static. */
#include <stdio.h>
#include <stdlib.h>

static unsigned char buf[1 << 20];

int main(int argc, char **argv) {
    long passes = argc > 1 ? atol(argv[1]) : 1000;
    unsigned long x = 0x9e3779b97f4a7c15UL;
    for (unsigned long i = 0; i < sizeof buf; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (unsigned char)x;
    }
    unsigned long h = 0xcbf29ce484222325UL;
    for (long p = 0; p < passes; p++)
        for (unsigned long i = 0; i < sizeof buf; i++)
            h = (h ^ buf[i]) * 0x100000001b3UL;
    printf("spin-hash %ld passes: %016lx\n", passes, h);
    return 0;
}

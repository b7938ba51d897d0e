/* hiccup: how much of a CPU-bound program's time goes to interruptions it cannot see
 * (benches/linux-tick.sh). Spins on rdtsc for SECONDS (default 2) and counts every gap between
 * two reads longer than 2 µs — a timer tick, a host interrupt, a switch out of the guest — then
 * prints the share of time lost, how many gaps and how long, a histogram of their lengths, and
 * the loop's speed between gaps (iterations per ns: equal natively and in a guest when the gaps
 * are the only cost). The TSC rate is calibrated against CLOCK_MONOTONIC for 50 ms. Static. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 2.0;
    double t0 = now();
    unsigned long c0 = __rdtsc();
    while (now() - t0 < 0.05)
        ;
    double hz = (__rdtsc() - c0) / (now() - t0);
    unsigned long threshold = (unsigned long)(hz * 2e-6), end = __rdtsc() + (unsigned long)(hz * secs);
    unsigned long last = __rdtsc(), lost = 0, gaps = 0, longest = 0, iterations = 0;
    static const double bounds[] = {5, 10, 20, 50, 100, 200, 500};
    unsigned long histogram[8] = {0};
    for (;;) {
        iterations++;
        unsigned long c = __rdtsc(), gap = c - last;
        last = c;
        if (gap > threshold) {
            lost += gap;
            gaps++;
            if (gap > longest)
                longest = gap;
            double us = gap / hz * 1e6;
            int b = 0;
            while (b < 7 && us >= bounds[b])
                b++;
            histogram[b]++;
        }
        if (c > end)
            break;
    }
    printf("hiccup: %.2f s, %lu gaps >2us, lost %.3f%% (%.1f us/gap avg, max %.1f us)\n", secs, gaps,
           100.0 * lost / (hz * secs), gaps ? lost / hz * 1e6 / gaps : 0.0, longest / hz * 1e6);
    printf("hiccup rate: %.5f iterations per ns between gaps\n", iterations / ((hz * secs - lost) / hz * 1e9));
    printf("hiccup gaps (us): <5:%lu <10:%lu <20:%lu <50:%lu <100:%lu <200:%lu <500:%lu >=500:%lu\n", histogram[0],
           histogram[1], histogram[2], histogram[3], histogram[4], histogram[5], histogram[6], histogram[7]);
    return 0;
}

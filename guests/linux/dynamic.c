/* A dynamically linked program (built without -static by tests/boot_linux.rs; the initramfs
 * carries its loader and libraries): lazy binding through the PLT (the loader's
 * `_dl_runtime_resolve_xsavec` saves the extended state on its stack, sized from CPUID),
 * libc and libm calls, a callback from libc, TLS. Prints one checksum, which must be the one
 * the same binary prints on the host. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static __thread unsigned long calls;

static int by_value(const void *a, const void *b) {
    calls++;
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void) {
    enum { N = 4096 };
    double *v = malloc(N * sizeof *v);
    unsigned long h = 1469598103934665603ul;
    for (int i = 0; i < N; i++)
        v[i] = sin(i * 0.37) * sqrt(i + 1.0);
    qsort(v, N, sizeof *v, by_value);
    char text[64];
    for (int i = 0; i < N; i += 97) {
        snprintf(text, sizeof text, "%.9f", v[i]);
        for (size_t k = 0; k < strlen(text); k++)
            h = (h ^ (unsigned char)text[k]) * 1099511628211ul;
    }
    printf("dynamic: %016lx %s\n", h, calls > 0 ? "sorted" : "not sorted");
    free(v);
    return 0;
}

/* What a test guest checks and prints: a value against the one it must be, and a recorded #PF
 * against the vector, error code and CR2 the CPU gives; each wrong one is marked WRONG and
 * counted in rt_failures (the guest ends with status 1 if any). */
#include "rt.h"

int rt_failures;

void rt_check(const char *what, u64 got, u64 want) {
    rt_puts(what); rt_puts(": "); rt_put_hex(got);
    if (got != want) { rt_puts(" WRONG, want "); rt_put_hex(want); rt_failures++; }
    rt_puts("\n");
}

void rt_check_pf(const char *what, struct rt_fault got, u64 error, u64 cr2) {
    rt_puts(what); rt_puts(": vector "); rt_put_dec(got.vector);
    rt_puts(" error "); rt_put_hex(got.error); rt_puts(" cr2 "); rt_put_hex(got.cr2);
    if (got.vector != 14 || got.error != error || got.cr2 != cr2) { rt_puts(" WRONG"); rt_failures++; }
    rt_puts("\n");
}

void rt_check_that(const char *what, int ok) {
    rt_puts(what);
    rt_puts(ok ? " ok\n" : " WRONG\n");
    rt_failures += !ok;
}

/* exit-code: exits with a non-zero status through the debug-exit port. */
#include "runtime/rt.h"
int main(void) {
    rt_puts("exiting with status 42\n");
    return 42;
}

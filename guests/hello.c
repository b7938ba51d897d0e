/* hello: prints over serial and exits with status 0. */
#include "runtime/rt.h"
int main(void) {
    rt_progress(1);
    rt_puts("Hello from an hbt test guest!\n");
    rt_progress(2);
    return 0;
}

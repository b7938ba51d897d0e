/* serial-flood: writes numbered lines to the serial port forever. `hbt run … | head` must end
 * when its stdout closes (EPIPE), not run on. */
#include "runtime/rt.h"
int main(void) {
    for (u64 n = 0;; n++) {
        rt_puts("serial-flood line ");
        rt_put_dec(n);
        rt_putc('\n');
    }
}

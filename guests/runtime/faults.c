/* Faults a test provokes on purpose: the handler records the vector, error code and CR2 and
 * resumes after the faulting instruction (RT_FAULTING / rt_resume); rt_take_fault() hands the
 * record over and clears it. */
#include "rt.h"

static volatile struct rt_fault seen = {RT_NO_FAULT, 0, 0};

static int record(struct frame *f) {
    seen.vector = f->vector;
    seen.error = f->error;
    seen.cr2 = read_cr2();
    return rt_resume_at(f);
}

void rt_record_faults(int vector) { rt_set_trap(vector, record); }

struct rt_fault rt_take_fault(void) {
    struct rt_fault f = {seen.vector, seen.error, seen.cr2};
    seen.vector = RT_NO_FAULT;
    seen.error = 0;
    seen.cr2 = 0;
    rt_resume = 0; /* in case nothing faulted */
    return f;
}

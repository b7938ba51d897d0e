/* Hardware breakpoints set by a debugger inside the guest, as gdb's `watch` and `hbreak` do:
 * the parent writes DR0-DR2 and DR7 of a traced child with ptrace(PTRACE_POKEUSER), and must
 * get a SIGTRAP stop right after each instruction that writes the watched variable (DR0,
 * writes) or reads or writes the other one (DR1, reads and writes) — a plain store, a
 * read-modify-write `add`, an `xchg`, reads — with DR6 naming the breakpoint and the variable
 * already holding the value written, and a stop before each call of a function (DR2, an
 * instruction breakpoint: the child resumes past it, RF). Nothing stops for accesses to the
 * bytes next to them. Under hybrid the child stays in the translator while DR7 is set
 * (kvm_pvm runs user code without the guest's debug registers). */
#define PROGRAM "watchpoints"
#define _GNU_SOURCE
#include "checks.h"
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/user.h>

static volatile uint32_t neighbours[4] __attribute__((aligned(64)));
static volatile uint32_t watched __attribute__((aligned(64)));
static volatile uint64_t read_watched __attribute__((aligned(64)));
static volatile int calls;

__attribute__((noinline)) static void target(void) {
    calls++;
}

/* The child's accesses, in order: 3 writes of `watched` (store, add, xchg), neighbours'
 * stores, 2 reads and 1 write of `read_watched`. */
static int child_work(void) {
    neighbours[0] = 1;
    watched = 10;
    neighbours[3] = 2;
    __asm__ volatile("addl $5, %0" : "+m"(watched));
    uint32_t old = 20;
    __asm__ volatile("xchgl %0, %1" : "+r"(old), "+m"(watched));
    uint64_t sum = read_watched;
    sum += read_watched;
    read_watched = sum + 1;
    target();
    target();
    return 0;
}

static long dr_offset(int n) {
    return offsetof(struct user, u_debugreg) + n * sizeof(long);
}

int main(void) {
    setvbuf(stdout, 0, _IOLBF, 0);
    read_watched = 7;
    pid_t child = traced_child(child_work);
    int status;
    /* DR0: 4 bytes, writes (R/W 01, LEN 11); DR1: 8 bytes, reads and writes (R/W 11, LEN 10);
     * DR2: an instruction (R/W 00, LEN 00). */
    unsigned long dr7 = 1 | 1 << 2 | 1 << 4 | (0x1 | 0x3 << 2) << 16 | (0x3 | 0x2 << 2) << 20;
    int set = ptrace(PTRACE_POKEUSER, child, (void *)dr_offset(0), (void *)&watched) == 0 &&
              ptrace(PTRACE_POKEUSER, child, (void *)dr_offset(1), (void *)&read_watched) == 0 &&
              ptrace(PTRACE_POKEUSER, child, (void *)dr_offset(2), (void *)target) == 0 &&
              ptrace(PTRACE_POKEUSER, child, (void *)dr_offset(7), (void *)dr7) == 0;
    check("DR0-DR2 and DR7 set through PTRACE_POKEUSER", set);
    /* Each stop: which breakpoint (DR6), and what the child's variable holds then. */
    char seen[256] = "";
    int stops = 0;
    for (;;) {
        ptrace(PTRACE_CONT, child, 0, 0);
        waitpid(child, &status, 0);
        if (!WIFSTOPPED(status))
            break;
        if (WSTOPSIG(status) != SIGTRAP || ++stops > 10) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            break;
        }
        long dr6 = ptrace(PTRACE_PEEKUSER, child, (void *)dr_offset(6), 0);
        int n = dr6 & 1 ? 0 : dr6 & 2 ? 1 : dr6 & 4 ? 2 : -1;
        char one[40];
        if (n == 2) {
            /* Before the call's target runs: RIP at it, the count not yet raised. */
            struct user_regs_struct r;
            ptrace(PTRACE_GETREGS, child, 0, &r);
            long count = ptrace(PTRACE_PEEKDATA, child, (void *)&calls, 0) & 0xffffffff;
            snprintf(one, sizeof one, " DR2%s,calls=%ld", r.rip == (uintptr_t)target ? "@target" : "@elsewhere", count);
        } else {
            long value = ptrace(PTRACE_PEEKDATA, child, n == 0 ? (void *)&watched : (void *)&read_watched, 0);
            if (n == 0)
                value &= 0xffffffff;
            snprintf(one, sizeof one, " DR%d=%ld", n, value);
        }
        strncat(seen, one, sizeof seen - strlen(seen) - 1);
    }
    char what[300];
    snprintf(what, sizeof what, "stops:%s", seen);
    check(what, strcmp(seen, " DR0=10 DR0=15 DR0=20 DR1=7 DR1=7 DR1=15 DR2@target,calls=0 DR2@target,calls=1") == 0);
    check("the watched child ran to its end", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return all_checked();
}

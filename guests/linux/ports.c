/* Port I/O from a Linux process: `ioperm` and `iopl` grant ports through the TSS I/O permission
 * bitmap (since Linux 5.5 `iopl(3)` too: the kernel emulates it with an all-ones grant and
 * keeps the real IOPL at 0), so `in`/`out` at CPL3 must consult the guest's TSS — under the
 * translator, and under hybrid, where KVM (kvm_pvm) raises #GP for every port access from CPL3
 * and hbt re-runs the instruction in the translator. `cli` still raises #GP at IOPL 0, which
 * the kernel of a process with emulated `iopl(3)` skips (no signal, interrupts stay enabled).
 * The ports: the UART's scratch register at 0x3ff (a byte that reads back what was written:
 * the 8250 driver only uses it while probing) and its modem status register at 0x3fe (read
 * only, for a port outside the grant). Also the time-stamp counter a process can be denied
 * (`prctl(PR_SET_TSC, PR_TSC_SIGSEGV)`: CR4.TSD while it runs, so `rdtsc`/`rdtscp` at CPL3
 * fault — kvm_pvm ran them anyway, so hybrid keeps such a process in the translator), and
 * `cpuid` it can be denied on an Intel CPU (`arch_prctl(ARCH_SET_CPUID, 0)`: CPUID faulting,
 * which the model offers on Intel hosts only, as Linux supports it).
 * Built static by tests/boot_linux.rs; prints one line per check and exits 0 when all pass. */
#define PROGRAM "ports"
#include "checks.h"
#include <asm/prctl.h>
#include <cpuid.h>
#include <stdio.h>
#include <sys/io.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>


/* 1 if `rdtsc` (or with `p`, `rdtscp`) faults. */
static int tsc_faults(int p) {
    int before = faults;
    unsigned lo, hi;
    if (sigsetjmp(env, 1) == 0) {
        if (p)
            __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi)::"rcx");
        else
            __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    }
    return faults != before;
}

/* 1 if `cpuid` faults. */
static int cpuid_faults(void) {
    int before = faults;
    unsigned a = 0, b, c, d;
    if (sigsetjmp(env, 1) == 0)
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d));
    return faults != before;
}

/* 1 if `inb(port)` faults; the byte read in *v otherwise. */
static int in_faults(unsigned short port, volatile unsigned char *v) {
    int before = faults;
    if (sigsetjmp(env, 1) == 0)
        *v = inb(port);
    return faults != before;
}

static int out_faults(unsigned short port, unsigned char v) {
    int before = faults;
    if (sigsetjmp(env, 1) == 0)
        outb(v, port);
    return faults != before;
}

/* `cli` then RFLAGS.IF, or -1 if it faulted. */
static int cli_then_if(void) {
    int before = faults;
    unsigned long flags = 0;
    if (sigsetjmp(env, 1) == 0)
        __asm__ volatile("cli; pushf; pop %0" : "=r"(flags));
    return faults != before ? -1 : (int)(flags >> 9 & 1);
}

int main(void) {
    signal(SIGSEGV, on_segv);
    volatile unsigned char v = 0;
    check("no grant: inb faults", in_faults(0x3ff, &v));
    check("no grant: outb faults", out_faults(0x3ff, 0x11));

    check("ioperm(0x3ff, 1, 1)", ioperm(0x3ff, 1, 1) == 0);
    check("granted: outb 0xa5 to the scratch register", !out_faults(0x3ff, 0xa5));
    check("granted: inb reads 0xa5 back", !in_faults(0x3ff, &v) && v == 0xa5);
    check("outside the grant: inb 0x3fe faults", in_faults(0x3fe, &v));
    check("word access half outside the grant faults", ({
              int before = faults;
              if (sigsetjmp(env, 1) == 0)
                  (void)inw(0x3fe);
              faults != before;
          }));
    unsigned char buf[4] = {0x5a, 0, 0, 0};
    check("granted: outsb then insb", ({
              int before = faults;
              if (sigsetjmp(env, 1) == 0) {
                  outsb(0x3ff, buf, 1);
                  insb(0x3ff, buf + 1, 1);
              }
              faults == before && buf[1] == 0x5a;
          }));
    check("ioperm(0x3ff, 1, 0)", ioperm(0x3ff, 1, 0) == 0);
    check("revoked: inb faults", in_faults(0x3ff, &v));

    check("iopl(3)", iopl(3) == 0);
    check("iopl 3: outb 0x3c", !out_faults(0x3ff, 0x3c));
    check("iopl 3: inb 0x3ff reads 0x3c", !in_faults(0x3ff, &v) && v == 0x3c);
    check("iopl 3: cli skipped by the kernel, IF still set", cli_then_if() == 1);
    check("iopl(0)", iopl(0) == 0);
    check("iopl 0: inb faults", in_faults(0x3ff, &v));

    /* fork copies the grant (the kernel switches the TSS bitmap with the task). */
    check("ioperm again", ioperm(0x3ff, 1, 1) == 0);
    pid_t child = fork();
    if (child == 0)
        _exit(!out_faults(0x3ff, 0x77) ? 0 : 1);
    int status = 0;
    waitpid(child, &status, 0);
    check("a forked child keeps the grant", WIFEXITED(status) && WEXITSTATUS(status) == 0);

    check("rdtsc runs", !tsc_faults(0));
    check("prctl(PR_SET_TSC, PR_TSC_SIGSEGV)", prctl(PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0) == 0);
    check("denied: rdtsc faults", tsc_faults(0));
    check("denied: rdtscp faults", tsc_faults(1));
    /* A busy stretch with no system call: under hybrid the kind KVM would otherwise get. */
    volatile unsigned long spin = 0;
    for (unsigned long i = 0; i < 50000000; i++)
        spin += i;
    check("denied after a long stretch: rdtsc faults", tsc_faults(0));
    check("prctl(PR_SET_TSC, PR_TSC_ENABLE)", prctl(PR_SET_TSC, PR_TSC_ENABLE, 0, 0, 0) == 0);
    check("allowed again: rdtsc runs", !tsc_faults(0));

    unsigned a, b, c, d;
    __cpuid(0, a, b, c, d);
    int denied = syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) == 0;
    if (b == 0x756e6547) { /* "Genu"ineIntel */
        check("arch_prctl(ARCH_SET_CPUID, 0) on Intel", denied);
        check("denied: cpuid faults", cpuid_faults());
        check("arch_prctl(ARCH_SET_CPUID, 1)", syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1) == 0);
        check("allowed again: cpuid runs", !cpuid_faults());
    } else {
        check("arch_prctl(ARCH_SET_CPUID, 0) refused: no CPUID faulting on this vendor", !denied);
    }

    return all_checked();
}

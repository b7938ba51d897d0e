/* Single-stepping user code (RFLAGS.TF: a #DB trap after each instruction, SIGTRAP in Linux),
 * the way debuggers and some programs use it:
 * - ptrace(PTRACE_SINGLESTEP) through a counted loop: a stop after every instruction, each at
 *   the next instruction's address;
 * - stepping over `syscall`: one stop, after it (the CPU does not trap after a `syscall` —
 *   IA32_FMASK clears TF — Linux reports the step itself on the way out);
 * - a program setting TF itself with `popf`: no trap after that `popf`, one after each of the
 *   following instructions, until its SIGTRAP handler clears TF (the count is printed: under
 *   KVM, kvm_pvm loses the first of those traps — measured on an Intel Xeon, `--hybrid-policy
 *   always-kvm`: the first SIGTRAP came after the second instruction);
 * - an int3 breakpoint planted with PTRACE_POKETEXT.
 * Under hybrid the stepped stretches stay in the translator (kvm_pvm does not single-step CPL3
 * code: the first ptrace loop saw its child run to the end). */
#define PROGRAM "single-step"
#define _GNU_SOURCE
#include "checks.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/user.h>
#include <ucontext.h>

/* 100 trips of a three-instruction loop, then a `syscall` (getpid): every instruction known. */
extern char counted[], counted_loop_end[], counted_syscall[], counted_end[];
__asm__(".text\n"
        "counted:\n"
        "  mov $100, %ecx\n"
        "1: add %rcx, %rdx\n"
        "  dec %ecx\n"
        "  jnz 1b\n"
        "counted_loop_end:\n"
        "  mov $39, %eax\n"
        "counted_syscall:\n"
        "  syscall\n"
        "  ret\n"
        "counted_end:\n");

static void run_counted(void) {
    __asm__ volatile("call counted" ::: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc");
}

static int counted_then_7(void) {
    run_counted();
    return 7;
}

/* Steps a child through run_counted: the stops inside the loop part, inside the syscall part,
 * and whether each stop was at an address an instruction starts at. */
static void ptrace_steps(void) {
    pid_t child = traced_child(counted_then_7);
    int status = 0;
    uintptr_t start = (uintptr_t)counted, loop_end = (uintptr_t)counted_loop_end;
    uintptr_t end = (uintptr_t)counted_end, after_syscall = (uintptr_t)counted_syscall + 2;
    long in_loop = 0, at_syscall_exit = 0, other_inside = 0, stops = 0;
    for (;;) {
        if (ptrace(PTRACE_SINGLESTEP, child, 0, 0) < 0)
            break;
        waitpid(child, &status, 0);
        if (!WIFSTOPPED(status) || WSTOPSIG(status) != SIGTRAP)
            break;
        struct user_regs_struct r;
        ptrace(PTRACE_GETREGS, child, 0, &r);
        stops++;
        if (r.rip >= start && r.rip < loop_end)
            in_loop++;
        else if (r.rip == after_syscall)
            at_syscall_exit++;
        else if (r.rip >= loop_end && r.rip < end)
            other_inside++;
        if (stops > 1000000)
            break;
    }
    if (WIFSTOPPED(status)) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
    }
    /* In the loop: the stops after the call and the first mov, and 3 per trip but the last
     * `jnz`'s, which falls through to the second mov (stopped at, as at the `syscall`). */
    char what[160];
    snprintf(what, sizeof what,
             "ptrace steps: %ld in the loop (301), %ld at the mov and the syscall (2), %ld after the syscall (1)",
             in_loop, other_inside, at_syscall_exit);
    check(what, in_loop == 301 && other_inside == 2 && at_syscall_exit == 1);
    check("the stepped child ran to its end", WIFEXITED(status) && WEXITSTATUS(status) == 7 && stops > 300);
}

static volatile long traps;
static void on_trap(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    ucontext_t *uc = context;
    traps++;
    extern char tf_off[];
    if (uc->uc_mcontext.gregs[REG_RIP] == (greg_t)(uintptr_t)tf_off)
        uc->uc_mcontext.gregs[REG_EFL] &= ~0x100L;
}

/* TF set by the program's own `popf`: traps after the three `nop`s, none after the `popf`. */
static void self_traced(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &sa, 0);
    traps = 0;
    __asm__ volatile("pushf\n\t"
                     "orq $0x100, (%%rsp)\n\t"
                     "popf\n\t"
                     "nop\n\t"
                     "nop\n\t"
                     "nop\n"
                     ".globl tf_off\n"
                     "tf_off:\n\t"
                     "nop" ::: "memory", "cc");
    /* Not a check of its own: tests/boot_linux.rs reads the count (3 on a CPU; under KVM on
     * these hosts kvm_pvm loses the first trap when user code sets TF while KVM runs it). */
    printf(PROGRAM ": popf sets TF: %ld traps\n", traps);
}

__attribute__((noinline)) static long work(long n) {
    long s = 0;
    for (long i = 0; i < n; i++)
        s += i * 3 ^ (s >> 2);
    return s;
}

static int work_checked(void) {
    return work(10) == 86 ? 0 : 1;
}

/* An int3 planted over work()'s first byte: the stop, then the original byte back and on. */
static void breakpoint(void) {
    pid_t child = traced_child(work_checked);
    int status;
    void *at = (void *)(uintptr_t)work;
    long original = ptrace(PTRACE_PEEKTEXT, child, at, 0);
    ptrace(PTRACE_POKETEXT, child, at, (void *)((original & ~0xffL) | 0xcc));
    ptrace(PTRACE_CONT, child, 0, 0);
    waitpid(child, &status, 0);
    struct user_regs_struct r;
    ptrace(PTRACE_GETREGS, child, 0, &r);
    check("int3 breakpoint stops after the int3",
          WIFSTOPPED(status) && WSTOPSIG(status) == SIGTRAP && r.rip == (uintptr_t)at + 1);
    ptrace(PTRACE_POKETEXT, child, at, (void *)original);
    r.rip = (uintptr_t)at;
    ptrace(PTRACE_SETREGS, child, 0, &r);
    ptrace(PTRACE_CONT, child, 0, 0);
    waitpid(child, &status, 0);
    check("resumed over the breakpoint", WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(void) {
    setvbuf(stdout, 0, _IOLBF, 0);
    ptrace_steps();
    self_traced();
    breakpoint();
    return all_checked();
}

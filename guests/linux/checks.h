/* What the Linux guest test programs share (each built static on its own by
 * tests/boot_linux.rs): a SIGSEGV handler that counts the fault and jumps back to the last
 * `sigsetjmp(env, 1)`, one line per check ("PROGRAM: what ok|FAILED") and the last line
 * ("PROGRAM: all ok|FAILED", the exit status), and a traced child for the debugger checks.
 * Define PROGRAM before including it. */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static sigjmp_buf env;
static volatile int faults;
static int failed;

static void on_segv(int sig) {
    (void)sig;
    faults++;
    siglongjmp(env, 1);
}

static void check(const char *what, int ok) {
    printf(PROGRAM ": %s %s\n", what, ok ? "ok" : "FAILED");
    failed |= !ok;
}

static int all_checked(void) {
    printf(PROGRAM ": %s\n", failed ? "FAILED" : "all ok");
    return failed;
}

/* A child for a debugger check: it asks to be traced and stops itself; once resumed it runs
 * `work` and exits with what that returns. Returns its pid when it has stopped. */
static inline pid_t traced_child(int (*work)(void)) {
    pid_t child = fork();
    if (child == 0) {
        ptrace(PTRACE_TRACEME, 0, 0, 0);
        raise(SIGSTOP);
        _exit(work());
    }
    int status;
    waitpid(child, &status, 0);
    return child;
}

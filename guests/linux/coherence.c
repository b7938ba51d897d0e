/* Page-table coherence inside a Linux guest: what a process must see after the kernel changed
 * its mappings. Under `hbt run --accel hybrid` the user code runs under KVM on page tables hbt
 * copies from the guest's while the kernel changing them runs in the translator (see
 * src/vmm/engine/hybrid/user_tables.rs): a stale copy shows up here as a read of unmapped
 * memory, a write to a read-only page, or one process seeing another's pages.
 * Built static by tests/boot_linux.rs; prints one line per check and exits 0 when all pass. */
#define PROGRAM "coherence"
#include "checks.h"
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define PAGES 64

/* 1 if reading (or writing) *p faults. */
static int faults_on(volatile char *p, int write) {
    int before = faults;
    if (sigsetjmp(env, 1) == 0) {
        if (write)
            *p = 1;
        else
            (void)*p;
    }
    return faults != before;
}

static char *map(int prot) {
    char *p = mmap(0, PAGES * PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? 0 : p;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);

    /* munmap, then any access faults. */
    char *p = map(PROT_READ | PROT_WRITE);
    memset(p, 0x11, PAGES * PAGE);
    munmap(p, PAGES * PAGE);
    check("munmap then read faults", faults_on(p, 0) && faults_on(p + 5 * PAGE, 0));

    /* mprotect(PROT_READ), then a write faults and the data stays. */
    p = map(PROT_READ | PROT_WRITE);
    memset(p, 0x22, PAGES * PAGE);
    mprotect(p, PAGES * PAGE, PROT_READ);
    check("mprotect read-only then write faults", faults_on(p + 3 * PAGE, 1) && p[3 * PAGE] == 0x22);
    mprotect(p, PAGES * PAGE, PROT_READ | PROT_WRITE);
    check("mprotect writable again then write works", !faults_on(p + 3 * PAGE, 1) && p[3 * PAGE] == 1);

    /* MAP_FIXED over a page with data: the new (zero) page, not the old one. */
    mmap(p, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    check("MAP_FIXED replacement reads zero", p[0] == 0 && p[PAGE] == 0x22);

    /* fork + copy-on-write: parent and child each see only their own writes. */
    memset(p, 0x33, PAGES * PAGE);
    int to_child[2], to_parent[2];
    pipe(to_child);
    pipe(to_parent);
    pid_t pid = fork();
    if (pid == 0) {
        char c;
        memset(p, 0x44, PAGES * PAGE);          /* the child's copy */
        write(to_parent[1], "w", 1);
        read(to_child[0], &c, 1);               /* the parent wrote its copy meanwhile */
        int ok = 1;
        for (int i = 0; i < PAGES * PAGE; i += 512)
            ok &= p[i] == 0x44;
        _exit(ok ? 0 : 1);
    }
    char c;
    read(to_parent[0], &c, 1);
    int parent_ok = 1;
    for (int i = 0; i < PAGES * PAGE; i += 512)
        parent_ok &= p[i] == 0x33;
    memset(p, 0x55, PAGES * PAGE);
    write(to_child[1], "p", 1);
    int status;
    waitpid(pid, &status, 0);
    check("fork: the parent keeps its copy", parent_ok && p[100] == 0x55);
    check("fork: the child keeps its copy", WIFEXITED(status) && WEXITSTATUS(status) == 0);

    /* Freed pages go to another process zeroed; the old owner's address faults. */
    char *secret = map(PROT_READ | PROT_WRITE);
    memset(secret, 0x5a, PAGES * PAGE);
    munmap(secret, PAGES * PAGE);
    pid = fork();
    if (pid == 0) {
        int leaked = 0;
        for (int round = 0; round < 8; round++) {
            char *q = map(PROT_READ | PROT_WRITE);
            for (int i = 0; i < PAGES * PAGE; i += 64)
                leaked |= q[i] != 0;
            memset(q, 0xc3, PAGES * PAGE);
        }
        _exit(leaked ? 1 : 0);
    }
    waitpid(pid, &status, 0);
    check("freed pages reach another process zeroed", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    check("the old owner's address still faults", faults_on(secret, 0));

    return all_checked();
}

/* iret at CPL3 in 64-bit mode: which fault for which frame, and which frame slot the CPU reads
 * first (backs system/transfer.rs `iret` and the kvm_pvm quirk "a #GP goes to KVM's emulator").
 * Linux's GDT has the layout of the system harness's guest.
 *
 * An Intel Xeon (family 6 model 0xa7) prints, among others:
 *   ss 0x18 / 0x7505 / 0x3b: #GP(0x18) / #GP(0x7504) / #GP(0x38)   (KVM: #GP(0), #GP(0), #SS(0x38))
 *   cs 0x18 with a null SS: #GP(0x18); a bad SS with a non-canonical RIP: #GP(SS)
 *   NT set: #GP(0)
 *   frame across a boundary: the first slot read is RFLAGS (rsp + 2*size), then CS, then RIP;
 *   once CS passed, SS before RSP. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

static sigjmp_buf jb;
static volatile long trapno, err, addr;

static void handler(int s, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
    (void)s;
    trapno = uc->uc_mcontext.gregs[REG_TRAPNO];
    err = uc->uc_mcontext.gregs[REG_ERR];
    addr = (long)si->si_addr;
    siglongjmp(jb, 1);
}

/* Runs iret of `size` bytes per slot from a frame at `rsp` (the caller fills it). */
static int run(char *rsp, int size) {
    if (sigsetjmp(jb, 1))
        return 1;
    if (size == 8) asm volatile("mov %0, %%rsp; iretq" ::"r"(rsp) : "memory");
    if (size == 4) asm volatile("mov %0, %%rsp; iretl" ::"r"(rsp) : "memory");
    if (size == 2) asm volatile("mov %0, %%rsp; iretw" ::"r"(rsp) : "memory");
    return 0;
}

static void frame(char *at, int size, uint64_t rip, uint64_t cs, uint64_t fl, uint64_t rsp, uint64_t ss) {
    uint64_t v[5] = {rip, cs, fl, rsp, ss};
    for (int i = 0; i < 5; i++) memcpy(at + i * size, &v[i], size);
}

int main(void) {
    static char alt[65536];
    stack_t st = {.ss_sp = alt, .ss_size = sizeof alt};
    sigaltstack(&st, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGBUS, &sa, 0);
    setvbuf(stdout, 0, _IONBF, 0);

    static char buf[64] __attribute__((aligned(16)));
    struct { const char *what; uint64_t rip, cs, fl, rsp, ss; int size; } cases[] = {
        {"iretw ss 0x18 (kernel data)", 0x1833, 0x33, 0xed6, 0x798, 0x18, 2},
        {"iretd ss 0x7505 (past the GDT)", 0x2000183b, 0x33, 0x297, 0x20010b60, 0x7505, 4},
        {"iretq ss 0x3b (empty entry 7)", 0x2000181d, 0x33, 0x203, 0x200104f0, 0x3b, 8},
        {"iretq cs 0x18, ss 0", 0x1000, 0x18, 0x202, 0x1000, 0, 8},
        {"iretq cs 0x33, ss 0", 0x1000, 0x33, 0x202, 0x1000, 0, 8},
        {"iretq non-canonical rip, ss 0x38", 0x8000000000000000ull, 0x33, 0x202, 0x1000, 0x38, 8},
        {"iretq cs 0x18, non-canonical rip", 0x8000000000000000ull, 0x18, 0x202, 0x1000, 0x2b, 8},
        {"iretq good frame (then #PF at 0x1000)", 0x1000, 0x33, 0x202, 0x1000, 0x2b, 8},
    };
    for (unsigned i = 0; i < sizeof cases / sizeof *cases; i++) {
        frame(buf, cases[i].size, cases[i].rip, cases[i].cs, cases[i].fl, cases[i].rsp, cases[i].ss);
        run(buf, cases[i].size);
        printf("%-42s trap %ld error %#lx address %#lx\n", cases[i].what, trapno, err, addr);
    }

    /* Frame slots across a page boundary: each side mapped (with a good frame) or not. */
    char *m = mmap(0, 3 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *b = m + 4096;
    for (int mode = 0; mode < 3; mode++) {
        mprotect(m, 3 * 4096, PROT_NONE);
        if (mode == 1) mprotect(m, 4096, PROT_READ | PROT_WRITE);
        if (mode == 2) mprotect(b, 4096, PROT_READ | PROT_WRITE);
        printf("%s:\n", mode == 0 ? "both pages unmapped" : mode == 1 ? "below mapped" : "above mapped");
        for (int size = 2; size <= 8; size *= 2) {
            printf("  size %d:", size);
            for (int off = 5 * size; off >= 0; off -= size) {
                uint64_t v[5] = {0x1000, 0x33, 0x202, 0x7000, 0x2b};
                for (int i = 0; i < 5; i++) {
                    char *slot = b - off + i * size;
                    if ((mode == 1 && slot < b) || (mode == 2 && slot >= b)) memcpy(slot, &v[i], size);
                }
                run(b - off, size);
                if (trapno == 14 && addr >= (long)m && addr < (long)(m + 3 * 4096))
                    printf("  rsp=b-%d: slot %ld", off, (addr - (long)(b - off)) / size);
                else
                    printf("  rsp=b-%d: trap %ld", off, trapno);
            }
            printf("\n");
        }
    }
    /* Last: once an iret has loaded NT, every later one in this process raises #GP(0). */
    frame(buf, 8, 0x1000, 0x33, 0x4202, 0x1000, 0x2b);
    run(buf, 8);
    printf("%-42s trap %ld error %#lx address %#lx\n", "iretq popping NT (then #PF at 0x1000)", trapno, err, addr);
    frame(buf, 8, 0x1000, 0x33, 0x202, 0x1000, 0x2b);
    run(buf, 8);
    printf("%-42s trap %ld error %#lx address %#lx\n", "iretq with NT set", trapno, err, addr);
    return 0;
}

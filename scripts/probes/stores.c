/* Memory accesses whose order or pieces the CPU chooses:
 *  - cmps reads ES:[RDI] first (emulate/string.rs); movs reads its source first;
 *  - a vcvtps2ph whose store faults has set MXCSR's flags, and an unmasked one gives #XM
 *    first (emulate/f16c.rs);
 *  - masked moves: a masked-off element never faults, a faulting store stores nothing
 *    (emulate/implicit.rs);
 *  - fstp m80/fbstp store their low 8 bytes before the top 2 (emulate/x87.rs).
 * An Intel Xeon (family 6 model 0xa7) prints: cmps faults at rdi, movs at rsi; MXCSR 0x1fa0
 * with #PF and #GP, #XM (19) with PE unmasked; masked moves as described; fstp at 8 or 9 bytes
 * before an unmapped page leaves its significand (or fbstp its BCD digits) in memory. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

static sigjmp_buf jb;
static volatile long trapno, addr;
static volatile unsigned mxcsr;

static void handler(int s, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
    (void)s;
    trapno = uc->uc_mcontext.gregs[REG_TRAPNO];
    addr = (long)si->si_addr;
    mxcsr = uc->uc_mcontext.fpregs->mxcsr;
    siglongjmp(jb, 1);
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGFPE, &sa, 0);
    setvbuf(stdout, 0, _IONBF, 0);
    /* page a: unmapped, page b: unmapped, page r: mapped */
    char *m = mmap(0, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *a = m, *b = m + 4096, *r = m + 8192;
    mprotect(a, 8192, PROT_NONE);

    if (sigsetjmp(jb, 1)) printf("cmpsb, both unmapped: faults at %s\n", addr == (long)(b + 0x20) ? "rdi" : "rsi");
    else asm volatile("cmpsb" ::"S"(a + 0x10), "D"(b + 0x20) : "memory");
    if (sigsetjmp(jb, 1)) printf("movsb, both unmapped: faults at %s\n", addr == (long)(b + 0x20) ? "rdi" : "rsi");
    else asm volatile("movsb" ::"S"(a + 0x10), "D"(b + 0x20) : "memory");

    float v[4] = {1.0001f, 1.0f, 1.0f, 1.0f}; /* 1.0001 is inexact in half precision */
    const struct { const char *what; char *to; unsigned csr; } cvt[] = {
        {"unmapped", a, 0x1f80},
        {"non-canonical", (char *)0x8000000000000000ull, 0x1f80},
        {"unmapped, PE unmasked", a, 0x0f80},
    };
    for (int i = 0; i < 3; i++) {
        _mm_setcsr(cvt[i].csr);
        if (sigsetjmp(jb, 1)) printf("vcvtps2ph to %s (mxcsr %#x): trap %ld, mxcsr %#x\n", cvt[i].what, cvt[i].csr, trapno, mxcsr);
        else asm volatile("vmovups (%1), %%xmm1; vcvtps2ph $4, %%xmm1, (%0)" ::"r"(cvt[i].to), "r"(v) : "memory", "xmm1");
        _mm_setcsr(0x1f80);
    }

    int none[8] = {0}, e0[8] = {-1}, e0e3[8] = {-1, 0, 0, -1};
    if (sigsetjmp(jb, 1)) printf("vmaskmovps load, mask 0, non-canonical: trap %ld\n", trapno);
    else { asm volatile("vmovdqu (%1), %%xmm1; vmaskmovps (%0), %%xmm1, %%xmm0" ::"r"(0x8000000000000000ull), "r"(none) : "memory", "xmm0", "xmm1"); printf("vmaskmovps load, mask 0, non-canonical: completed\n"); }
    if (sigsetjmp(jb, 1)) printf("vmaskmovps load, mask 0, unmapped: trap %ld\n", trapno);
    else { asm volatile("vmovdqu (%1), %%xmm1; vmaskmovps (%0), %%xmm1, %%xmm0" ::"r"(a), "r"(none) : "memory", "xmm0", "xmm1"); printf("vmaskmovps load, mask 0, unmapped: completed\n"); }
    if (sigsetjmp(jb, 1)) printf("vmaskmovps load, element 0, non-canonical: trap %ld\n", trapno);
    else asm volatile("vmovdqu (%1), %%xmm1; vmaskmovps (%0), %%xmm1, %%xmm0" ::"r"(0x8000000000000000ull), "r"(e0) : "memory", "xmm0", "xmm1");
    char *p = r - 12; /* element 0 in the page below r (unmapped b), element 3 in r */
    mprotect(r - 4096, 4096, PROT_READ | PROT_WRITE);
    mprotect(r, 4096, PROT_NONE);
    memset(p, 0x55, 12);
    if (sigsetjmp(jb, 1)) printf("vmaskmovps store, elements 0 (mapped) and 3 (unmapped): trap %ld, element 0 %s\n", trapno, (unsigned char)p[0] == 0x55 ? "not stored" : "stored");
    else asm volatile("vmovdqu (%1), %%xmm1; vmaskmovps %%xmm0, %%xmm1, (%0)" ::"r"(p), "r"(e0e3) : "memory", "xmm1");

    for (int off = 7; off <= 9; off++) {
        p = r - off;
        memset(p, 0x55, off);
        if (sigsetjmp(jb, 1)) {
            printf("fstp m80 %d bytes before an unmapped page: trap %ld, low bytes", off, trapno);
            for (int i = 0; i < 8 && i < off; i++) printf(" %02x", (unsigned char)p[i]);
            printf("\n");
        } else
            asm volatile("fninit; fldpi; fstpt (%0)" ::"r"(p) : "memory");
    }
    p = r - 8;
    if (sigsetjmp(jb, 1)) {
        printf("fbstp (3.14 -> 3) 8 bytes before an unmapped page: trap %ld, low bytes", trapno);
        for (int i = 0; i < 8; i++) printf(" %02x", (unsigned char)p[i]);
        printf("\n");
    } else
        asm volatile("fninit; fldpi; fbstp (%0)" ::"r"(p) : "memory");
    return 0;
}

/* Operands the CPU requires to be aligned: does a misaligned one raise #GP(0) before the page
 * walk (so even when its page is not mapped), and does alignment checking (RFLAGS.AC) change
 * that? Backs translator/src/emit/alignment.rs and the FXSAVE/XSAVE rule in engine/softmmu.rs.
 *
 * An Intel Xeon (family 6 model 0xa7) prints #GP (13) for misaligned movaps, addps, cmpxchg16b,
 * movnt*, vmovaps and fxsave/fxrstor, also in an unmapped page; #PF (14) for vaddps, pcmpistri,
 * lddqu, movups there; with AC set, #GP for movaps/addps/cmpxchg16b but #AC (17) for fxsave at
 * an odd address, and movups completes. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

static sigjmp_buf jb;
static volatile long trapno;

static void handler(int s, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
    (void)s, (void)si;
    asm volatile("pushf; andl $~0x40000, (%%rsp); popf" ::: "memory"); /* AC off in here */
    trapno = uc->uc_mcontext.gregs[REG_TRAPNO];
    siglongjmp(jb, 1);
}

#define TRY(what, insn, p)                                                           \
    do {                                                                             \
        if (sigsetjmp(jb, 1))                                                        \
            printf("%-40s trap %ld\n", what, trapno);                                \
        else {                                                                       \
            asm volatile(insn ::"r"(p) : "memory");                                  \
            printf("%-40s completed\n", what);                                       \
        }                                                                            \
    } while (0)

#define AC_ON "pushf; orl $0x40000, (%%rsp); popf;"
#define AC_OFF "; pushf; andl $~0x40000, (%%rsp); popf"

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGBUS, &sa, 0);
    setvbuf(stdout, 0, _IONBF, 0);
    static char buf[8192] __attribute__((aligned(64)));
    char *none = mmap(0, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    printf("8 bytes past a 16-byte boundary in an unmapped page:\n");
    TRY("movaps load", "movaps (%0), %%xmm0", none + 8);
    TRY("addps", "addps (%0), %%xmm0", none + 8);
    TRY("cmpxchg16b", "cmpxchg16b (%0)", none + 8);
    TRY("movntdq", "movntdq %%xmm0, (%0)", none + 8);
    TRY("vmovaps xmm", "vmovaps (%0), %%xmm0", none + 8);
    TRY("vmovaps ymm (16 past 32)", "vmovaps (%0), %%ymm0", none + 16);
    TRY("fxsave64 (0x3f)", "fxsave64 (%0)", none + 0x3f);
    TRY("fxrstor64 (0x3f)", "fxrstor64 (%0)", none + 0x3f);
    TRY("vaddps xmm", "vaddps (%0), %%xmm0, %%xmm0", none + 8);
    TRY("pcmpistri", "pcmpistri $0, (%0), %%xmm0", none + 8);
    TRY("lddqu", "lddqu (%0), %%xmm0", none + 8);
    TRY("movups", "movups (%0), %%xmm0", none + 8);

    printf("with RFLAGS.AC set (Linux sets CR0.AM), in mapped memory:\n");
    TRY("movaps +1", AC_ON "movaps (%0), %%xmm0" AC_OFF, buf + 1);
    TRY("addps +4", AC_ON "addps (%0), %%xmm0" AC_OFF, buf + 4);
    TRY("cmpxchg16b +8", AC_ON "cmpxchg16b (%0)" AC_OFF, buf + 8);
    TRY("fxsave +1", AC_ON "fxsave (%0)" AC_OFF, buf + 1);
    TRY("fxsave +8", AC_ON "fxsave (%0)" AC_OFF, buf + 8);
    TRY("movups +1", AC_ON "movups (%0), %%xmm0" AC_OFF, buf + 1);
    return 0;
}

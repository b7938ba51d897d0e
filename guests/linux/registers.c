/* Register state across kernel entries inside a Linux guest: what a process must find in its
 * vector, x87 and MXCSR registers after system calls, page faults, timer interrupts, context
 * switches to another process using the same registers, signal handlers that clobber them,
 * and a misaligned `movaps` whose #GP the kernel turns into a SIGSEGV (under hybrid: the
 * instruction re-run in the translator, which needs the image KVM holds). Under `hbt run --accel hybrid` the user code runs under KVM while the kernel runs in
 * the translator, and the XSAVE image stays in KVM until translated code touches it
 * (src/vmm/engine/hybrid/user_vcpu.rs, Translator::set_extended_state_stale): a kernel path
 * that reads or writes the registers without fetching them shows up here as a wrong value.
 * Built static by tests/boot_linux.rs; prints one line per process and exits 0 when all pass. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#define ROUNDS 60
#define PAGE 4096

#define R16(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) \
    op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
#define LOAD_Y(n) "vmovdqu " #n "*32(%[in]), %%ymm" #n "\n\t"
#define STORE_Y(n) "vmovdqu %%ymm" #n ", " #n "*32(%[out])\n\t"
#define LOAD_X(n) "movdqu " #n "*32(%[in]), %%xmm" #n "\n\t"
#define STORE_X(n) "movdqu %%xmm" #n ", " #n "*32(%[out])\n\t"
#define ONES_Y(n) "vpcmpeqd %%ymm" #n ", %%ymm" #n ", %%ymm" #n "\n\t"
#define ONES_X(n) "pcmpeqd %%xmm" #n ", %%xmm" #n "\n\t"
/* AVX-512 (where the model offers it): zmm0-31, then k1-k7 after them. */
#define R32(op) R16(op) op(16) op(17) op(18) op(19) op(20) op(21) op(22) op(23) \
    op(24) op(25) op(26) op(27) op(28) op(29) op(30) op(31)
#define R7(op) op(1) op(2) op(3) op(4) op(5) op(6) op(7)
#define LOAD_Z(n) "vmovdqu64 " #n "*64(%[in]), %%zmm" #n "\n\t"
#define STORE_Z(n) "vmovdqu64 %%zmm" #n ", " #n "*64(%[out])\n\t"
#define LOAD_K(n) "kmovw 2048+" #n "*2(%[in]), %%k" #n "\n\t"
#define STORE_K(n) "kmovw %%k" #n ", 2048+" #n "*2(%[out])\n\t"
#define ONES_Z(n) "vpternlogd $0xff, %%zmm" #n ", %%zmm" #n ", %%zmm" #n "\n\t"
#define ONES_K(n) "kxnorw %%k" #n ", %%k" #n ", %%k" #n "\n\t"
#define ZMM_CLOBBERS XMM_CLOBBERS, "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
    "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "k1", "k2", \
    "k3", "k4", "k5", "k6", "k7"
#define REGS_BYTES (32 * 64 + 8 * 2)
#define XMM_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
    "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

/* Each round: a fresh page touched (a page fault), a misaligned movaps (#GP: SIGSEGV, whose
 * handler steps over its 3 bytes), sched_yield (a switch to the other process when it is
 * runnable), getppid, and a spin long enough for timer interrupts and the signal timer to land
 * in user code. */
#define BODY                                                                                     \
    "ldmxcsr %[mx]\n\t"                                                                          \
    "fldpi\n\t"                                                                                  \
    "fld1\n\t"                                                                                   \
    "1:\n\t"                                                                                     \
    "movb $1, (%[pg])\n\t"                                                                       \
    "lea 1(%[pg]), %%rax\n\t"                                                                    \
    "movaps (%%rax), %%xmm0\n\t"                                                                 \
    "add $4096, %[pg]\n\t"                                                                       \
    "mov $24, %%eax\n\t"                                                                         \
    "syscall\n\t"                                                                                \
    "mov $110, %%eax\n\t"                                                                        \
    "syscall\n\t"                                                                                \
    "mov $3000000, %%ecx\n\t"                                                                    \
    "2: dec %%ecx\n\t"                                                                           \
    "jnz 2b\n\t"                                                                                 \
    "dec %[n]\n\t"                                                                               \
    "jnz 1b\n\t"

struct result {
    unsigned char regs[REGS_BYTES];
    unsigned mxcsr;
    double x87[2];
};

static volatile int signals, misaligned;
static int avx, avx512;

__attribute__((target("avx512f"))) static void ones_avx512(unsigned mx) {
    __asm__ volatile(R32(ONES_Z) R7(ONES_K) "ldmxcsr %0\n\t" ::"m"(mx) : ZMM_CLOBBERS);
}

/* The misaligned movaps (0f 28 00): it did nothing; go on after it. */
static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    ucontext_t *uc = context;
    uc->uc_mcontext.gregs[REG_RIP] += 3;
    misaligned++;
}

static void on_alarm(int sig) {
    (void)sig;
    signals++;
    /* Whatever the handler leaves must not reach the interrupted code (sigreturn restores). */
    unsigned mx = 0x7f80; /* round toward zero, all masked */
    if (avx512)
        ones_avx512(mx);
    else if (avx)
        __asm__ volatile(R16(ONES_Y) "ldmxcsr %0\n\t" ::"m"(mx) : XMM_CLOBBERS);
    else
        __asm__ volatile(R16(ONES_X) "ldmxcsr %0\n\t" ::"m"(mx) : XMM_CLOBBERS);
}

/* Loads the registers from `in`, runs BODY, stores them to `out` (LOAD/STORE: ymm or xmm). */
#define RUN(LOADS, STORES, CLOBBERS)                                                             \
    __asm__ volatile(LOADS BODY STORES "stmxcsr %[mxo]\n\t"                                      \
                     "fstpl %[x0]\n\t"                                                           \
                     "fstpl %[x1]\n\t"                                                           \
                     : [pg] "+r"(pages), [n] "+r"(n), [mxo] "=m"(out->mxcsr), [x0] "=m"(out->x87[0]), \
                       [x1] "=m"(out->x87[1])                                                    \
                     : [in] "r"(in), [out] "r"(out->regs), [mx] "m"(mx)                          \
                     : "rax", "rcx", "r11", "memory", "cc", CLOBBERS)

__attribute__((target("avx512f"))) static void run_avx512(const unsigned char *in, struct result *out,
                                                          volatile char *pages, unsigned mx) {
    long n = ROUNDS;
    RUN(R32(LOAD_Z) R7(LOAD_K), R32(STORE_Z) R7(STORE_K), ZMM_CLOBBERS);
}

static void run(const unsigned char *in, struct result *out, volatile char *pages, unsigned mx) {
    long n = ROUNDS;
    if (avx512)
        run_avx512(in, out, pages, mx);
    else if (avx)
        RUN(R16(LOAD_Y), R16(STORE_Y), XMM_CLOBBERS);
    else
        RUN(R16(LOAD_X), R16(STORE_X), XMM_CLOBBERS);
}

/* One process's check; 0 when every register came back as loaded. */
static int check(const char *who, unsigned seed) {
    static unsigned char in[REGS_BYTES];
    static struct result out;
    unsigned x = seed * 2654435761u;
    for (int i = 0; i < (int)sizeof in; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        in[i] = (unsigned char)x;
    }
    volatile char *pages = mmap(0, (ROUNDS + 1) * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == MAP_FAILED)
        return 1;
    /* Rounding mode and masks differ per process (MXCSR is in the XSAVE image too). */
    unsigned mx = seed & 1 ? 0x3f80 : 0x5f80;
    struct itimerval t = {{0, 700}, {0, 700}};
    setitimer(ITIMER_REAL, &t, 0);
    run(in, &out, pages, mx);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    int bad = 0;
    if (avx512)
        /* zmm0-31, and k1-k7 (k0 is not loaded) */
        bad += memcmp(out.regs, in, 32 * 64) != 0 || memcmp(out.regs + 2050, in + 2050, 14) != 0;
    else
        for (int r = 0; r < 16; r++)
            bad += memcmp(out.regs + 32 * r, in + 32 * r, avx ? 32 : 16) != 0;
    bad += out.mxcsr != mx;
    bad += out.x87[0] != 1.0;
    bad += out.x87[1] < 3.14159 || out.x87[1] > 3.1416;
    bad += misaligned != ROUNDS;
    printf("registers: %s (%s, %d timer signals, %d #GP) %s\n", who, avx512 ? "zmm" : avx ? "ymm" : "xmm", signals, misaligned,
           bad ? "FAILED" : "ok");
    return bad != 0;
}

/* The XSAVE contract glibc's dynamic loader relies on: its lazy-binding trampoline runs
 * `xsavec` with the components it may need (x87 excepted: SSE, AVX, MPX, AVX-512) into a
 * buffer on its stack sized from CPUID's sub-leaves, so the state the CPU saves for that mask
 * must be what CPUID describes. Under hybrid kvm_pvm runs user code with the host's XCR0, so
 * the model must offer what the host has: without AVX-512 in the model the area outgrew the
 * buffer and the loader died. A guard page after the buffer turns an overrun (or the probe of a
 * larger area) into SIGSEGV. 0 when it holds. */
#define LOADER_STATE_MASK 0xeeUL

static sigjmp_buf guard_env;
static void on_guard(int sig) {
    (void)sig;
    siglongjmp(guard_env, 1);
}

static int check_xsave_contract(void) {
    unsigned eax, ebx, ecx, edx;
    __cpuid(1, eax, ebx, ecx, edx);
    if (!(ecx & bit_OSXSAVE))
        return 0;
    __cpuid_count(0xd, 0, eax, ebx, ecx, edx);
    unsigned long offered = eax | (unsigned long)edx << 32;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    unsigned long saved = (lo | (unsigned long)hi << 32) & LOADER_STATE_MASK;
    int bad = (saved & ~offered) != 0;
    /* The compacted size glibc computes (sub-leaves of components not offered report 0). */
    unsigned size = 576;
    for (int i = 2; i < 8; i++) {
        if (!(LOADER_STATE_MASK >> i & 1))
            continue;
        unsigned a, b, c, d;
        __cpuid_count(0xd, i, a, b, c, d);
        if (c & 2)
            size = (size + 63) & ~63u;
        size += a;
    }
    size = (size + 63) & ~63u;
    char *area = mmap(0, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(area + PAGE, PAGE, PROT_NONE);
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_guard;
    sigaction(SIGSEGV, &sa, &old);
    /* The loader restores what it saved with `xrstor` (compacted image, same mask). Then the
     * standard format: `xsave` and `xrstor` of x87 and SSE alone touch only the legacy region
     * and the header, 576 bytes (on Intel the standard image of an AVX-512 XCR0 is 2,688). */
    int faulted = 0, faulted_standard = 0;
    if (sigsetjmp(guard_env, 1) == 0)
        __asm__ volatile("xsavec (%0)\n\txrstor (%0)" ::"r"(area + PAGE - size), "a"((unsigned)LOADER_STATE_MASK), "d"(0)
                         : "memory");
    else
        faulted = 1;
    if (sigsetjmp(guard_env, 1) == 0)
        __asm__ volatile("xsave (%0)\n\txrstor (%0)" ::"r"(area + PAGE - 576), "a"(3), "d"(0) : "memory");
    else
        faulted_standard = 1;
    sigaction(SIGSEGV, &old, 0);
    printf("registers: loader state %#lx within CPUID's %#lx, xsavec+xrstor of %u bytes before a guard page%s %s\n",
           saved, offered, size, faulted ? " faulted" : "", bad || faulted ? "FAILED" : "ok");
    printf("registers: xsave+xrstor of x87 and SSE, 576 bytes before a guard page%s %s\n",
           faulted_standard ? " faulted" : "", faulted_standard ? "FAILED" : "ok");
    return bad || faulted || faulted_standard;
}

int main(void) {
    int contract = check_xsave_contract();
    avx = __builtin_cpu_supports("avx");
    avx512 = __builtin_cpu_supports("avx512f");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    sa.sa_handler = 0;
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGSEGV, &sa, 0);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0)
        return check("child", 2);
    int failed = check("parent", 1);
    int status;
    waitpid(child, &status, 0);
    failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0 || contract;
    printf("registers: all %s\n", failed ? "FAILED" : "ok");
    return failed;
}

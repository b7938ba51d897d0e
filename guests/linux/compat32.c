/* A 32-bit program (built `gcc -m32 -static` by tests/boot_linux.rs): the guest kernel runs it
 * in compatibility mode, where code decodes as IA-32 and addresses, the stack and near
 * branches are 32-bit. It exercises what such code is made of — push/pop/call/ret with 4-byte
 * slots, `inc`/`dec` r32, jump tables, indirect calls, string instructions with ESI/EDI/ECX,
 * x87 and SSE2 arithmetic, 64-bit division through libgcc, TLS through GS (`set_thread_area`),
 * threads, the kernel's entries (`int $0x80`, the vDSO's `__kernel_vsyscall`: `syscall` on AMD,
 * `sysenter` on Intel), signals with 32-bit frames and `sigreturn`, fork and pipes — and prints
 * one line per check plus a checksum of what it computed. The test compares everything it
 * prints with what the same binary prints on the host. */
#define PROGRAM "compat32"
#include "checks.h"

#include <emmintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static uint32_t hash = 2166136261u;
static void mix(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        hash = (hash ^ b[i]) * 16777619u;
}

static int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

/* A switch gcc turns into a jump table (`jmp *table(,%eax,4)`). */
static __attribute__((noinline)) int dispatch(int op, int a, int b) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return b ? a / b : -1;
    case 4: return a << (b & 31);
    case 5: return a ^ b;
    case 6: return a | b;
    case 7: return a & ~b;
    default: return 0;
    }
}

static int twice(int x) { return 2 * x; }
static int square(int x) { return x * x; }
static int (*const table[])(int) = {twice, square, abs};

static int by_value(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* strlen by `repne scasb` and a compare by `repe cmpsb`, written out. */
static size_t scas_length(const char *s) {
    size_t ecx = (size_t)-1;
    const char *edi = s;
    __asm__ volatile("cld; repne scasb" : "+c"(ecx), "+D"(edi) : "a"(0) : "memory", "cc");
    return ~ecx - 1;
}
static int cmps_equal(const void *a, const void *b, size_t n) {
    unsigned char equal;
    __asm__ volatile("cld; repe cmpsb; sete %0" : "=q"(equal), "+S"(a), "+D"(b), "+c"(n) : : "memory", "cc");
    return equal;
}

static __attribute__((target("sse2"))) uint32_t sse2_sum(const uint32_t *v, int n) {
    __m128i acc = _mm_setzero_si128();
    for (int i = 0; i + 4 <= n; i += 4)
        acc = _mm_add_epi32(acc, _mm_mullo_epi16(_mm_loadu_si128((const __m128i *)(v + i)), _mm_set1_epi16(3)));
    uint32_t out[4];
    _mm_storeu_si128((__m128i *)out, acc);
    return out[0] ^ out[1] ^ out[2] ^ out[3];
}

static __thread int per_thread = 7;
static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    per_thread += id;
    uint64_t sum = 0;
    for (int i = 0; i < 100000; i++)
        sum += (uint64_t)i * (id + 1) % 1000003;
    return (void *)(intptr_t)(sum % 1000 + per_thread * 1000);
}

int main(void) {
    signal(SIGSEGV, on_segv);
    check("the code segment is 32-bit", sizeof(void *) == 4);

    int f = fib(24);
    printf(PROGRAM ": fib(24) = %d\n", f);
    check("recursion", f == 46368);

    int ops = 0;
    for (int op = 0; op < 9; op++)
        ops = ops * 31 + dispatch(op, 1000 + op, 7);
    int calls = 0;
    for (int i = 0; i < 30; i++)
        calls += table[i % 3](i - 15);
    printf(PROGRAM ": jump table %d, indirect calls %d\n", ops, calls);
    mix(&ops, sizeof ops);
    mix(&calls, sizeof calls);

    uint64_t big = 0x123456789abcdefull;
    uint64_t q = big / 12345, r = big % 12345;
    int64_t sq = -(int64_t)big / 777;
    printf(PROGRAM ": 64-bit %llu %llu %lld\n", (unsigned long long)q, (unsigned long long)r, (long long)sq);
    check("64-bit division", q * 12345 + r == big);

    double d = 0;
    for (int i = 1; i < 200; i++)
        d += sin(i * 0.1) * sqrt(i) / (1.0 + exp(-i * 0.01));
    long double ld = 1;
    for (int i = 1; i < 30; i++)
        ld = ld * 1.1L + 1.0L / i;
    printf(PROGRAM ": x87 %.9f %.9Lf\n", d, ld);
    mix(&d, sizeof d);

    static uint32_t v[1024];
    for (int i = 0; i < 1024; i++)
        v[i] = i * 2654435761u;
    uint32_t s2 = sse2_sum(v, 1024);
    printf(PROGRAM ": sse2 %08x\n", s2);
    mix(&s2, sizeof s2);

    /* String functions at every alignment, and the string instructions themselves. */
    static char a[8192], b[8192];
    for (int i = 0; i < 8192; i++)
        a[i] = (char)(i * 7 + 3);
    int strings_ok = 1;
    for (int off = 0; off < 16; off++) {
        size_t n = 3000 + off * 37;
        memset(b, 0, sizeof b);
        memcpy(b + off, a + 15 - off, n);
        strings_ok &= memcmp(b + off, a + 15 - off, n) == 0 && b[off + n] == 0;
        memmove(b + off + 5, b + off, n);
        strings_ok &= memcmp(b + off + 5, a + 15 - off, n) == 0;
        mix(b, sizeof b);
    }
    char text[64];
    strcpy(text, "compatibility mode, thirty-two bits");
    strings_ok &= scas_length(text) == strlen(text) && strlen(text) == 35;
    strings_ok &= cmps_equal(text, "compatibility mode", 18) && !cmps_equal(text, "compatibility node", 18);
    check("string instructions", strings_ok);

    int sorted[500];
    for (int i = 0; i < 500; i++)
        sorted[i] = (i * 7919) % 1009 - 500;
    qsort(sorted, 500, sizeof sorted[0], by_value);
    int in_order = 1;
    for (int i = 1; i < 500; i++)
        in_order &= sorted[i - 1] <= sorted[i];
    check("qsort with a callback", in_order);
    mix(sorted, sizeof sorted);

    /* The kernel's entries: int $0x80 directly, and the vDSO (time, gettimeofday). */
    int pid;
    __asm__ volatile("int $0x80" : "=a"(pid) : "a"(20 /* __NR_getpid, i386 */) : "memory");
    check("int $0x80 getpid", pid == getpid());
    struct timeval tv;
    check("gettimeofday", gettimeofday(&tv, NULL) == 0 && tv.tv_sec > 0 && time(NULL) >= tv.tv_sec);

    /* TLS and threads (each thread's GS selects its own TLS descriptor). */
    pthread_t t[4];
    long results = 0;
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
    for (int i = 0; i < 4; i++) {
        void *ret;
        pthread_join(t[i], &ret);
        results = results * 7 + (long)(intptr_t)ret;
    }
    printf(PROGRAM ": threads %ld, main's TLS %d\n", results, per_thread);
    check("threads and TLS", per_thread == 7);
    mix(&results, sizeof results);

    /* A fault in 32-bit code: the 32-bit signal frame, then siglongjmp out of the handler. */
    char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    page[0] = 1;
    mprotect(page, 4096, PROT_READ);
    if (sigsetjmp(env, 1) == 0)
        page[1] = 2;
    check("write to a read-only page: SIGSEGV", faults == 1 && page[1] == 0);
    munmap(page, 4096);
    if (sigsetjmp(env, 1) == 0)
        (void)*(volatile char *)page;
    check("read after munmap: SIGSEGV", faults == 2);

    /* fork, a pipe, and the child's exit status. */
    int fds[2];
    pipe(fds);
    pid_t child = fork();
    if (child == 0) {
        close(fds[0]);
        char msg[32];
        int len = snprintf(msg, sizeof msg, "child fib %d", fib(20));
        write(fds[1], msg, len);
        _exit(42);
    }
    close(fds[1]);
    char got[32] = {0};
    read(fds[0], got, sizeof got - 1);
    int status = 0;
    waitpid(child, &status, 0);
    printf(PROGRAM ": %s, exit %d\n", got, WEXITSTATUS(status));
    check("fork, pipe, wait", strcmp(got, "child fib 6765") == 0 && WEXITSTATUS(status) == 42);

    printf(PROGRAM ": checksum %08x\n", hash);
    return all_checked();
}

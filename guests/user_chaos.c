/* user-chaos: pseudo-random bytes run at CPL3, for the engines' user-mode paths (under the
 * hybrid engine: KVM's side, hbt's stubs and page tables, the hand-back to the translator).
 * Each of 1000 rounds fills a user page at RT_MAP_BASE (PML4 slot 1, far from the runtime)
 * with xorshift bytes, points every GPR into that region, and enters it at CPL3. A round ends
 * at the first exception (the handler sends CPL3 to a stub that returns to CPL0), a `syscall`
 * (the runtime's way back), or the second timer tick (PIT, IRQ 0) spent at CPL3. Which
 * exceptions happen depends on the engine where kvm_pvm differs from a CPU, so only the end
 * is checked (tests/run_guests.rs): the final line and status 0 under every engine, never an
 * hbt crash or a KVM error. */
#include "runtime/rt.h"

#define CODE (RT_MAP_BASE + 0x10000)
#define STACK (RT_MAP_BASE + 0x20000)
#define ROUNDS 1000

extern char chaos_abort[];
__asm__(".pushsection .text\n"
        ".globl chaos_abort\n"
        "chaos_abort:\n"
        "    mov $0xab, %edi\n"
        "    jmp rt_user_return\n"
        ".popsection\n");

static volatile u64 ticks_at_cpl3, faults, timeouts;
/* The round was already sent to the stub (a fault or tick in the stub itself counts no more). */
static volatile int ended;
static int to_stub(struct frame *f) {
    if (!(f->cs & 3)) return 0; /* a CPL0 fault: the runtime reports it */
    f->rip = (u64)chaos_abort;
    f->rsp = STACK + 0xff0;
    f->rflags = 0x202;
    if (!ended) faults++;
    ended = 1;
    return 1;
}
static int tick(struct frame *f) {
    if ((f->cs & 3) && ++ticks_at_cpl3 >= 2) {
        f->rip = (u64)chaos_abort;
        f->rsp = STACK + 0xff0;
        f->rflags = 0x202;
        if (!ended) timeouts++;
        ended = 1;
    }
    rt_pic_eoi();
    return 1;
}

static u64 x = 0x9e3779b97f4a7c15UL;
static u64 next(void) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x; }

void user_entry(void);
__asm__(".pushsection .text\n"
        ".globl user_entry\n"
        "user_entry:\n"
        "    mov $" "0x8000010000" ", %rax\n"   /* CODE: every GPR near it */
        "    lea 0x100(%rax), %rbx\n lea 0x200(%rax), %rcx\n lea 0x300(%rax), %rdx\n"
        "    lea 0x400(%rax), %rsi\n lea 0x500(%rax), %rdi\n lea 0x600(%rax), %rbp\n"
        "    mov %rax, %r8\n mov %rax, %r9\n mov %rax, %r10\n mov %rax, %r11\n"
        "    mov %rax, %r12\n mov %rax, %r13\n mov %rax, %r14\n mov %rax, %r15\n"
        "    mov $0x8000020ff0, %rsp\n"
        "    jmp *%rax\n"
        ".popsection\n");

int main(void) {
    for (int v = 0; v < 32; v++)
        if (v != 2) rt_set_trap(v, to_stub);
    rt_set_trap(RT_IRQ_VECTOR(0), tick);
    u64 cr3 = read_cr3();
    u8 *code = rt_page_alloc();
    rt_map(cr3, CODE, (u64)code, PTE_P | PTE_W | PTE_U);
    rt_map(cr3, STACK, (u64)rt_page_alloc(), PTE_P | PTE_W | PTE_U | PTE_NX);
    rt_pic_init(1 << 0);
    outb(0x43, 0x34); outb(0x40, 1193 & 0xff); outb(0x40, 1193 >> 8); /* ≈1 kHz */
    __asm__ volatile("sti");
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < 4096; i += 8) *(u64 *)(code + i) = next();
        invlpg(CODE);
        ticks_at_cpl3 = 0;
        ended = 0;
        rt_enter_user(user_entry);
    }
    __asm__ volatile("cli");
    rt_pic_mask(0xff);
    rt_puts("user-chaos: "); rt_put_dec(ROUNDS);
    rt_puts(faults + timeouts <= ROUNDS ? " rounds at CPL3, done\n" : " rounds, COUNTS WRONG\n");
    return 0;
}

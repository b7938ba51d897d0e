/* The test-guest runtime: serial output, exit, descriptor tables, traps, CPL3 entry and the
 * syscall path back to CPL0. Guests are entered by hbt in 64-bit long mode with identity
 * paging (user-accessible) and call rt_init() from _start before main(). */
#pragma once
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

/* Ports hbt's device table provides. */
#define PORT_SERIAL 0x3f8
#define PORT_SERIAL_SCRATCH 0x3ff
#define PORT_DEBUG_EXIT 0xf4
#define PORT_PROGRESS 0x80

/* Selectors of the runtime's GDT (user data before user code, as sysret needs). */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SEL 0x28

/* What the trap stubs push, lowest address first. */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory"); }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
static inline void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo; }

#define CR0_WP (1UL << 16)
#define CR4_PGE (1UL << 7)
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_SFMASK 0xc0000084
#define MSR_GS_BASE 0xc0000101
#define MSR_KERNEL_GS_BASE 0xc0000102

void rt_init(void);
void rt_putc(char c);
void rt_puts(const char *s);
void rt_put_dec(u64 v);
void rt_put_hex(u64 v);
void rt_progress(u8 step);
__attribute__((noreturn)) void rt_exit(u32 status);

/* The 8259 pair: IRQ 0-15 on vectors 32-47, only the IRQs in `unmasked` (bit n = IRQ n on the
 * primary PIC) enabled. rt_pic_mask() sets the primary's mask; rt_pic_eoi() ends an IRQ. */
#define RT_IRQ_VECTOR(irq) (32 + (irq))
void rt_pic_init(u8 unmasked);
void rt_pic_mask(u8 masked);
void rt_pic_eoi(void);

/* A trap handler; returns nonzero when it handled the trap (execution resumes at frame->rip). */
typedef int (*trap_fn)(struct frame *f);
void rt_set_trap(int vector, trap_fn fn);
/* Where a faulting test instruction resumes (set by RT_FAULTING, cleared by rt_resume_at). */
extern volatile u64 rt_resume;
int rt_resume_at(struct frame *f);
/* Runs `insn` (which may use RAX = arg) and resumes after it if it traps. */
#define RT_FAULTING(insn, arg) \
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip); " insn "\n1:" \
                     ::"a"(arg) : "rcx", "rdx", "r11", "memory")

/* Faults provoked on purpose (runtime/faults.c): after rt_record_faults(vector), each fault of
 * that vector is recorded and resumed after (as RT_FAULTING sets up); rt_take_fault() returns
 * the record (vector RT_NO_FAULT if none) and clears it. */
struct rt_fault { u64 vector, error, cr2; };
#define RT_NO_FAULT 256
void rt_record_faults(int vector);
struct rt_fault rt_take_fault(void);

/* Checks (runtime/check.c): prints "what: got", marked WRONG (and counted in rt_failures)
 * unless it is `want`; rt_check_pf the same for a recorded #PF's error code and CR2. */
extern int rt_failures;
void rt_check(const char *what, u64 got, u64 want);
void rt_check_pf(const char *what, struct rt_fault got, u64 error, u64 cr2);
/* Prints "what ok", or "what WRONG" (counted in rt_failures) when `ok` is false. */
void rt_check_that(const char *what, int ok);

/* Runs fn at CPL3 on its own stack; returns the argument of its rt_user_return(). */
u64 rt_enter_user(void (*fn)(void));
/* From CPL3: `syscall` back to the CPL0 code that called rt_enter_user (see start.S for how
 * the LSTAR entry completes the switch on kvm_pvm). */
__attribute__((noreturn)) void rt_user_return(u64 value);

/* Paging (runtime/paging.c). hbt enters guests with an identity map of the first 4 GiB in 2 MiB
 * pages; these helpers add 4 KiB pages in PML4 slot 1 (RT_MAP_BASE and up, never mapped by hbt)
 * and build further page-table trees that share the identity map. Tables and frames come from a
 * pool of zeroed pages in .bss, where guest virtual = guest physical. */
#define RT_PAGE 4096UL
#define RT_MAP_BASE 0x8000000000UL
#define PTE_P (1UL << 0)
#define PTE_W (1UL << 1)
#define PTE_U (1UL << 2)
#define PTE_A (1UL << 5)
#define PTE_D (1UL << 6)
#define PTE_G (1UL << 8)
#define PTE_NX (1UL << 63)
#define PTE_FRAME 0x000ffffffffff000UL
/* A zeroed page from the pool (its address is also its guest-physical address). */
void *rt_page_alloc(void);
/* A new tree (returns its CR3): the identity map of the current tree, nothing else. */
u64 rt_pt_new(void);
/* The 4 KiB PTE of `va` in the tree `cr3`, building missing tables (P|W|U: the leaf decides). */
volatile u64 *rt_pte(u64 cr3, u64 va);
/* Maps the 4 KiB page at `va` in tree `cr3` to frame `pa` with PTE bits `flags`. */
void rt_map(u64 cr3, u64 va, u64 pa, u64 flags);

/* Interrupt stack table (runtime/ist.c): vector `vector` is delivered on the stack whose top is
 * `stack_top`, through TSS.IST[ist] (1-7). */
void rt_set_ist(int vector, int ist, void *stack_top);

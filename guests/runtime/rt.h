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

/* Runs fn at CPL3 on its own stack; returns the argument of its rt_user_return(). */
u64 rt_enter_user(void (*fn)(void));
/* From CPL3: `syscall` back to the CPL0 code that called rt_enter_user (see start.S for how
 * the LSTAR entry completes the switch on kvm_pvm). */
__attribute__((noreturn)) void rt_user_return(u64 value);

/* io-bitmap: port I/O at CPL3 through the TSS I/O permission bitmap. Above IOPL, `in`/`out`/
 * `ins`/`outs` are allowed only where the bitmap has a clear bit for every port the access
 * spans; the CPU reads two bitmap bytes from the one holding the first port's bit, both
 * within the TSS limit (so a bitmap cut short by the limit denies a port whose own byte is
 * there, and port 0xffff needs the byte after the bitmap); a bitmap offset past the limit
 * grants nothing; IOPL 3 allows every port and `cli`, which the bitmap never allows.
 * The guest moves TR to a TSS of its own with a bitmap granting the UART scratch register
 * 0x3ff, port 0x400 (the next bitmap byte) and 0xffff, changes its limit and bitmap offset
 * between rounds (`ltr` again each time), and raises IOPL for the last round through an int3
 * whose handler sets it in the frame. kvm_pvm raises #GP for any port access at CPL3, even at
 * IOPL 3 (so --accel kvm differs); the hybrid engine re-runs those in the translator. */
#include "runtime/rt.h"

#define SCRATCH 0x3ff
#define TSS_HEAD 104 /* the 64-bit TSS up to and including its I/O map offset field */
#define MAP_BYTES 8192

static struct {
    u8 head[TSS_HEAD];
    u8 map[MAP_BYTES + 1]; /* + the all-ones byte the CPU may read past the last port's */
} __attribute__((packed, aligned(16))) tss;

struct table_ptr { u16 limit; u64 base; } __attribute__((packed));
static volatile u8 *tss_descriptor(void) {
    struct table_ptr gdt;
    __asm__ volatile("sgdt %0" : "=m"(gdt));
    return (volatile u8 *)gdt.base + TSS_SEL;
}
static u64 descriptor_base(volatile u8 *d) {
    return d[2] | (u64)d[3] << 8 | (u64)d[4] << 16 | (u64)d[7] << 24 | (u64) * (volatile u32 *)(d + 8) << 32;
}

/* Points TR at a TSS at `base` with `limit` (an available 64-bit TSS, loaded again). */
static void load_tss(u64 base, u32 limit) {
    volatile u8 *d = tss_descriptor();
    d[0] = (u8)limit; d[1] = (u8)(limit >> 8);
    d[2] = (u8)base; d[3] = (u8)(base >> 8); d[4] = (u8)(base >> 16);
    d[5] = 0x89; /* present, available 64-bit TSS (ltr marks it busy) */
    d[6] = (u8)((limit >> 16) & 0xf);
    d[7] = (u8)(base >> 24);
    *(volatile u32 *)(d + 8) = (u32)(base >> 32);
    __asm__ volatile("ltr %w0" ::"r"(TSS_SEL) : "memory");
}
static void set_map_offset(u16 offset) { *(volatile u16 *)(tss.head + 0x66) = offset; }
static void grant(u16 port) { tss.map[port / 8] &= (u8)~(1 << (port % 8)); }

/* What CPL3 saw, printed at CPL0. */
#define MAX_RESULTS 16
static struct { const char *what; u64 vector, error, value; } results[MAX_RESULTS];
static int n_results;
static void note(const char *what, u64 value) {
    struct rt_fault f = rt_take_fault();
    results[n_results++] = (typeof(results[0])){what, f.vector, f.error, value};
}
/* `insn` with DX = port and RAX = value, resuming after it if it faults. */
#define PORT_OP(insn, port, value) ({ \
    u64 _a = (value); \
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip); " insn "\n1:" \
                     : "+a"(_a) : "d"((u16)(port)) : "r11", "memory"); \
    _a; })
static u8 bytes[2] = {0x3c, 0};

static void round_full_map(void) {
    PORT_OP("outb %%al, %%dx", SCRATCH, 0xa5);
    note("outb 0x3ff (granted)", 0);
    note("inb 0x3ff (granted) reads back", PORT_OP("inb %%dx, %%al", SCRATCH, 0) & 0xff);
    PORT_OP("inb %%dx, %%al", SCRATCH - 1, 0);
    note("inb 0x3fe (not granted)", 0);
    PORT_OP("inw %%dx, %%ax", SCRATCH - 1, 0);
    note("inw 0x3fe (its second port granted)", 0);
    PORT_OP("inw %%dx, %%ax", SCRATCH, 0);
    note("inw 0x3ff (both ports granted, bits in two bitmap bytes)", 0);
    u8 *src = bytes, *dst = bytes + 1;
    __asm__ volatile("lea 1f(%%rip), %%r11; mov %%r11, rt_resume(%%rip); outsb; insb\n1:"
                     : "+S"(src), "+D"(dst) : "d"((u16)SCRATCH) : "r11", "memory");
    note("outsb then insb at 0x3ff (granted) copies", bytes[1]);
    PORT_OP("inb %%dx, %%al", 0xffff, 0);
    note("inb 0xffff (granted, the all-ones byte after the bitmap)", 0);
    PORT_OP("cli", 0, 0);
    note("cli at IOPL 0 (no bitmap grants it)", 0);
    rt_user_return(0);
}
static void round_inb_scratch(void) {
    PORT_OP("inb %%dx, %%al", SCRATCH, 0);
    note("inb 0x3ff", 0);
    rt_user_return(0);
}
static void round_inb_last(void) {
    PORT_OP("inb %%dx, %%al", 0xffff, 0);
    note("inb 0xffff", 0);
    rt_user_return(0);
}
static int iopl_handler(struct frame *f) {
    f->rflags ^= 3 << 12; /* int3 from CPL3 toggles IOPL 0 <-> 3 */
    return 1;
}
static void round_iopl3(void) {
    __asm__ volatile("int3");
    PORT_OP("inb %%dx, %%al", SCRATCH - 1, 0);
    note("IOPL 3, inb 0x3fe (no bitmap)", 0);
    PORT_OP("cli; sti", 0, 0);
    note("IOPL 3, cli; sti", 0);
    __asm__ volatile("int3");
    PORT_OP("inb %%dx, %%al", SCRATCH - 1, 0);
    note("IOPL 0 again, inb 0x3fe", 0);
    rt_user_return(0);
}

static void print(const char *round) {
    rt_puts(round); rt_puts(":\n");
    for (int i = 0; i < n_results; i++) {
        rt_puts("  "); rt_puts(results[i].what);
        if (results[i].vector == RT_NO_FAULT) {
            rt_puts(": no fault");
            if (results[i].value) { rt_puts(", "); rt_put_hex(results[i].value); }
        } else {
            rt_puts(": vector "); rt_put_dec(results[i].vector);
            rt_puts(" error "); rt_put_hex(results[i].error);
        }
        rt_puts("\n");
    }
    n_results = 0;
}

int main(void) {
    rt_record_faults(13);
    rt_set_trap(3, iopl_handler);
    volatile u8 *d = tss_descriptor();
    u64 runtime_tss = descriptor_base(d);
    u32 runtime_limit = d[0] | d[1] << 8 | (d[6] & 0xf) << 16;
    for (int i = 0; i < TSS_HEAD; i++) tss.head[i] = ((volatile u8 *)runtime_tss)[i];
    for (int i = 0; i <= MAP_BYTES; i++) tss.map[i] = 0xff;
    grant(SCRATCH); grant(0x400); grant(0xffff);
    set_map_offset(TSS_HEAD);

    load_tss((u64)&tss, sizeof tss - 1);
    rt_enter_user(round_full_map);
    print("bitmap of 8192 bytes and the all-ones byte");

    load_tss((u64)&tss, TSS_HEAD + SCRATCH / 8);
    rt_enter_user(round_inb_scratch);
    print("limit at the byte holding 0x3ff's bit");
    load_tss((u64)&tss, TSS_HEAD + SCRATCH / 8 + 1);
    rt_enter_user(round_inb_scratch);
    print("limit one byte further");
    load_tss((u64)&tss, TSS_HEAD + MAP_BYTES - 1);
    rt_enter_user(round_inb_last);
    print("limit at the bitmap's last byte (no all-ones byte)");

    set_map_offset(sizeof tss);
    load_tss((u64)&tss, sizeof tss - 1);
    rt_enter_user(round_inb_scratch);
    print("bitmap offset past the limit");
    rt_enter_user(round_iopl3);
    print("IOPL raised by an int3 handler");

    load_tss(runtime_tss, runtime_limit);
    rt_puts("io-bitmap: ok\n");
    return 0;
}

//! Translated vs native execution of small compute kernels (issue 3's speed proof).
//!
//! Four kernels written in assembly in this file — an arithmetic loop, memory traffic over an
//! array, a call-heavy loop and a jump-table dispatch loop — run natively (called as C
//! functions) and through the translator under the identity strategy (same code bytes, guest
//! addresses = host addresses) and under the soft-MMU (the same bytes mapped by guest page tables
//! at the same guest virtual addresses, backed by other host memory). Criterion measures each;
//! a summary at the end prints the slowdown per kernel (median of repeated runs in this same
//! process) and the geometric mean.

use criterion::Criterion;
use hbt_translator::exit::vector;
use hbt_translator::{Config, Exit, GuestRam, HostPlatform, MemoryStrategy, Translator};
use std::time::{Duration, Instant};

std::arch::global_asm!(
    ".text",
    ".p2align 12",
    ".globl hbt_bench_code_start",
    "hbt_bench_code_start:",
    // u64 arith(u64 n)
    ".globl hbt_bench_arith",
    "hbt_bench_arith:",
    "xor eax, eax",
    "mov ecx, 1",
    "2: lea rax, [rax + rax*2]",
    "add rax, rcx",
    "mov rdx, rax",
    "shr rdx, 7",
    "xor rax, rdx",
    "inc rcx",
    "dec rdi",
    "jnz 2b",
    "ret",
    // u64 memory(u64 n, u64 *array1024)
    ".globl hbt_bench_memory",
    "hbt_bench_memory:",
    "xor eax, eax",
    "xor ecx, ecx",
    "2: mov edx, ecx",
    "and edx, 1023",
    "add [rsi + rdx*8], rcx",
    "add rax, [rsi + rdx*8]",
    "inc rcx",
    "cmp rcx, rdi",
    "jb 2b",
    "ret",
    // u64 calls(u64 n)
    ".globl hbt_bench_calls",
    "hbt_bench_calls:",
    "xor eax, eax",
    "mov rcx, rdi",
    "2: call 3f",
    "dec rcx",
    "jnz 2b",
    "ret",
    "3: add rax, rcx",
    "ret",
    // u64 indirect(u64 n, const void *table[4])
    ".globl hbt_bench_indirect",
    "hbt_bench_indirect:",
    "xor eax, eax",
    "mov rcx, rdi",
    "2: mov edx, ecx",
    "and edx, 3",
    "jmp [rsi + rdx*8]",
    ".globl hbt_bench_t0",
    "hbt_bench_t0: add rax, 1",
    "jmp 4f",
    ".globl hbt_bench_t1",
    "hbt_bench_t1: add rax, 3",
    "jmp 4f",
    ".globl hbt_bench_t2",
    "hbt_bench_t2: xor rax, rcx",
    "jmp 4f",
    ".globl hbt_bench_t3",
    "hbt_bench_t3: sub rax, 7",
    "4: dec rcx",
    "jnz 2b",
    "ret",
    // u64 exits(u64 n): an engine-emulated instruction per iteration, so every iteration is a
    // round trip through the exit glue, the dispatcher and the entry glue.
    ".globl hbt_bench_exits",
    "hbt_bench_exits:",
    "2: rdtsc",
    "dec rdi",
    "jnz 2b",
    "ret",
    // Where translated runs return to: user-mode hlt ends the run.
    ".globl hbt_bench_sentinel",
    "hbt_bench_sentinel: hlt",
    ".globl hbt_bench_code_end",
    "hbt_bench_code_end:",
);

extern "C" {
    fn hbt_bench_code_start();
    fn hbt_bench_code_end();
    fn hbt_bench_arith(n: u64) -> u64;
    fn hbt_bench_memory(n: u64, array: *mut u64) -> u64;
    fn hbt_bench_calls(n: u64) -> u64;
    fn hbt_bench_indirect(n: u64, table: *const u64) -> u64;
    fn hbt_bench_t0();
    fn hbt_bench_t1();
    fn hbt_bench_t2();
    fn hbt_bench_t3();
    fn hbt_bench_sentinel();
    fn hbt_bench_exits();
}

const N: u64 = 200_000;

#[derive(Clone, Copy)]
enum Kernel {
    Arith,
    Memory,
    Calls,
    Indirect,
}

const KERNELS: [(Kernel, &str); 4] = [
    (Kernel::Arith, "arith"),
    (Kernel::Memory, "memory"),
    (Kernel::Calls, "calls"),
    (Kernel::Indirect, "indirect"),
];

fn entry(k: Kernel) -> u64 {
    match k {
        Kernel::Arith => hbt_bench_arith as *const () as u64,
        Kernel::Memory => hbt_bench_memory as *const () as u64,
        Kernel::Calls => hbt_bench_calls as *const () as u64,
        Kernel::Indirect => hbt_bench_indirect as *const () as u64,
    }
}

/// Guest data the kernels use, at fixed addresses that are the same for the native run, the
/// identity run and (through the guest page tables) the soft-MMU run.
struct Data {
    array: Vec<u64>,
    table: [u64; 4],
    stack: Vec<u64>,
}

impl Data {
    fn new() -> Self {
        Data {
            array: vec![0; 1024],
            table: [
                hbt_bench_t0 as *const () as u64,
                hbt_bench_t1 as *const () as u64,
                hbt_bench_t2 as *const () as u64,
                hbt_bench_t3 as *const () as u64,
            ],
            stack: {
                // The return address translated runs "return" to, below the top.
                let mut stack = vec![0; 4096];
                stack[4094] = hbt_bench_sentinel as *const () as u64;
                stack
            },
        }
    }

    /// RSP for a call: pointing at the sentinel return address.
    fn rsp(&self) -> u64 {
        self.stack.as_ptr() as u64 + 8 * 4094
    }
}

fn native(k: Kernel, d: &mut Data) -> u64 {
    // SAFETY: the kernels follow the C ABI and only touch their arguments' memory.
    unsafe {
        match k {
            Kernel::Arith => hbt_bench_arith(N),
            Kernel::Memory => hbt_bench_memory(N, d.array.as_mut_ptr()),
            Kernel::Calls => hbt_bench_calls(N),
            Kernel::Indirect => hbt_bench_indirect(N, d.table.as_ptr()),
        }
    }
}

/// Runs kernel `k` through `t` with the C calling convention; returns RAX.
fn translated(t: &mut Translator, k: Kernel, d: &mut Data) -> u64 {
    let rsp = d.rsp();
    let s = t.state_mut();
    s.rip = entry(k);
    s.gpr[7] = N;
    s.gpr[6] = match k {
        Kernel::Memory => d.array.as_mut_ptr() as u64,
        Kernel::Indirect => d.table.as_ptr() as u64,
        _ => 0,
    };
    s.gpr[4] = rsp;
    let exit = t.run(&mut HostPlatform, u64::MAX).expect("translation works");
    assert!(matches!(exit, Exit::Exception(e) if e.vector == vector::GP), "{exit:?}");
    assert_eq!(t.state().rip, hbt_bench_sentinel as *const () as u64);
    t.state().gpr[0]
}

/// Guest physical memory for the soft-MMU run: page tables mapping the kernels' code page(s),
/// the data vectors and the stack at their host virtual addresses, onto copies in guest RAM.
/// Writes go to the copies, so the soft-MMU run really uses other host memory.
struct SoftGuest {
    ram: memmap2::MmapMut,
    next_frame: u64,
}

impl SoftGuest {
    fn new() -> Self {
        let ram = memmap2::MmapMut::map_anon(16 << 20).expect("guest RAM");
        SoftGuest {
            ram,
            next_frame: 0x1000,
        }
    }

    fn alloc(&mut self) -> u64 {
        let f = self.next_frame;
        self.next_frame += 0x1000;
        f
    }

    fn entry(&mut self, table: u64, index: u64) -> u64 {
        let at = (table + index * 8) as usize;
        let e = u64::from_le_bytes(self.ram[at..at + 8].try_into().unwrap());
        if e & 1 != 0 {
            return e & 0x000f_ffff_ffff_f000;
        }
        let frame = self.alloc();
        self.ram[at..at + 8].copy_from_slice(&(frame | 0b111).to_le_bytes());
        frame
    }

    /// Maps the host pages covering [start, end) at the same guest virtual addresses, copying
    /// their contents.
    fn map_copy(&mut self, start: u64, end: u64) {
        let mut va = start & !0xfff;
        while va < end {
            let pdpt = self.entry(0, (va >> 39) & 511);
            let pd = self.entry(pdpt, (va >> 30) & 511);
            let pt = self.entry(pd, (va >> 21) & 511);
            let at = (pt + ((va >> 12) & 511) * 8) as usize;
            if u64::from_le_bytes(self.ram[at..at + 8].try_into().unwrap()) & 1 == 0 {
                let frame = self.alloc();
                self.ram[at..at + 8].copy_from_slice(&(frame | 0b111).to_le_bytes());
                // SAFETY: `va` is a mapped host page (code, a Vec's buffer or the stack vector).
                let src = unsafe { std::slice::from_raw_parts(va as *const u8, 4096) };
                self.ram[frame as usize..frame as usize + 4096].copy_from_slice(src);
            }
            va += 0x1000;
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> Duration {
    let runs: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    median(runs)
}

fn main() {
    let mut d = Data::new();
    let mut identity = Translator::new(Config {
        strategy: MemoryStrategy::Identity,
        code_cache_bytes: 1 << 20,
        verified_only: true,
        system: false,
    })
    .unwrap();

    let mut guest = SoftGuest::new();
    guest.map_copy(
        hbt_bench_code_start as *const () as u64,
        hbt_bench_code_end as *const () as u64,
    );
    guest.map_copy(d.array.as_ptr() as u64, d.array.as_ptr() as u64 + 8 * 1024);
    guest.map_copy(d.table.as_ptr() as u64, d.table.as_ptr() as u64 + 32);
    guest.map_copy(d.stack.as_ptr() as u64, d.stack.as_ptr() as u64 + 8 * 4096);
    // SAFETY: the RAM mapping lives in `guest` until the end of main, after the translator.
    let ram = unsafe { GuestRam::new(guest.ram.as_mut_ptr(), guest.ram.len() as u64) };
    let mut soft = Translator::new(Config {
        strategy: MemoryStrategy::SoftMmu(ram),
        code_cache_bytes: 1 << 20,
        verified_only: true,
        system: false,
    })
    .unwrap();
    soft.state_mut().cr3 = 0;

    // Same results everywhere (the memory kernel accumulates, so compare fresh runs).
    for (k, name) in KERNELS {
        let mut fresh = Data::new();
        let a = native(k, &mut fresh);
        let mut fresh = Data::new();
        let b = translated(&mut identity, k, &mut fresh);
        assert_eq!(a, b, "{name}: translated result differs from native");
    }

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("translate");
    group.sample_size(20);
    for (k, name) in KERNELS {
        group.bench_function(format!("{name}/native"), |b| b.iter(|| native(k, &mut d)));
        group.bench_function(format!("{name}/identity"), |b| {
            b.iter(|| translated(&mut identity, k, &mut d))
        });
        group.bench_function(format!("{name}/soft-mmu"), |b| {
            b.iter(|| translated(&mut soft, k, &mut d))
        });
    }
    group.finish();
    c.final_summary();

    println!("\nslowdown vs native (median of 15 runs, {N} iterations each)");
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "kernel", "native", "identity", "soft-mmu", "identity×", "soft×"
    );
    let (mut gi, mut gs) = (1.0f64, 1.0f64);
    for (k, name) in KERNELS {
        let n = time(|| {
            std::hint::black_box(native(k, &mut d));
        });
        let i = time(|| {
            std::hint::black_box(translated(&mut identity, k, &mut d));
        });
        let s = time(|| {
            std::hint::black_box(translated(&mut soft, k, &mut d));
        });
        let (ri, rs) = (i.as_secs_f64() / n.as_secs_f64(), s.as_secs_f64() / n.as_secs_f64());
        gi *= ri;
        gs *= rs;
        println!("{name:<10} {n:>12.2?} {i:>12.2?} {s:>12.2?} {ri:>10.2} {rs:>10.2}");
    }
    println!("identity translator: {:?}", identity.stats());
    // The cost of one dispatcher round trip (exit glue, engine, entry glue) by the guest's
    // XCR0: what the glue saves and restores is the guest's components only.
    let layout = hbt_translator::cpu::xsave::XsaveLayout::host();
    for xcr0 in [0x7 & layout.managed(), layout.managed()] {
        let mut t = Translator::new(Config {
            strategy: MemoryStrategy::Identity,
            code_cache_bytes: 1 << 20,
            verified_only: true,
            system: false,
        })
        .unwrap();
        const EXITS: u64 = 20_000;
        let d = Data::new();
        let per_exit = time(|| {
            let s = t.state_mut();
            s.xcr0 = xcr0;
            s.rip = hbt_bench_exits as *const () as u64;
            s.gpr[7] = EXITS;
            s.gpr[4] = d.rsp();
            std::hint::black_box(t.run(&mut HostPlatform, u64::MAX).expect("translation works"));
        })
        .as_secs_f64()
            / EXITS as f64;
        println!(
            "dispatcher round trip with guest XCR0 {xcr0:#x} ({} bytes of XSAVE state): {:.0} ns",
            layout.size(xcr0),
            per_exit * 1e9
        );
    }
    let count = KERNELS.len() as f64;
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>10.2} {:>10.2}",
        "geomean",
        "",
        "",
        "",
        gi.powf(1.0 / count),
        gs.powf(1.0 / count)
    );
}

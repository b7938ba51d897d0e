//! Engine behaviour beyond single instructions: chaining, indirect branches, self-modifying
//! code, precise faults under both memory strategies, and refusal of unsupported instructions.

use hbt_translator::exit::vector;
use hbt_translator::{Config, Exit, GuestRam, HostPlatform, MemoryStrategy, TranslateError, Translator};

const BUDGET: u64 = 10_000;

/// One RWX page holding `code` (identity strategy: guest addresses are host addresses).
struct CodePage(*mut u8);

impl CodePage {
    fn new(code: &[u8]) -> Self {
        // SAFETY: fresh anonymous mapping, checked; the test writes only inside it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: the page is 4096 bytes; tests use far less.
        unsafe {
            std::ptr::write_bytes(p, 0xf4, 4096);
            std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len());
        }
        CodePage(p)
    }
    fn addr(&self) -> u64 {
        self.0 as u64
    }
}

impl Drop for CodePage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `new`.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, 4096) };
    }
}

fn identity() -> Translator {
    Translator::new(Config {
        strategy: MemoryStrategy::Identity,
        code_cache_bytes: 1 << 20,
        verified_only: true,
        system: false,
    })
    .unwrap()
}

fn gp_at(exit: Exit) -> bool {
    matches!(exit, Exit::Exception(e) if e.vector == vector::GP)
}

#[test]
fn loops_run_chained_and_compute_the_right_result() {
    // mov ecx,1000; xor eax,eax; L: add eax,ecx; dec ecx; jnz L; hlt
    let page = CodePage::new(&[
        0xb9, 0xe8, 0x03, 0, 0, 0x31, 0xc0, 0x01, 0xc8, 0xff, 0xc9, 0x75, 0xfa, 0xf4,
    ]);
    let mut t = identity();
    t.state_mut().rip = page.addr();
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit), "user-mode hlt ends the run with #GP, got {exit:?}");
    assert_eq!(t.state().rip, page.addr() + 13);
    assert_eq!(t.state().gpr[0], 500_500);
    let stats = t.stats();
    assert!(stats.chained >= 1, "the loop's back edge is chained: {stats:?}");
    assert!(
        stats.block_exits < 10,
        "1000 iterations must not exit to the dispatcher each time: {stats:?}"
    );
}

#[test]
fn calls_returns_and_indirect_calls_use_the_guest_stack() {
    // lea rax,[rip+8]; call rax; call +1; hlt; f: inc rbx; ret
    let code = [
        0x48, 0x8d, 0x05, 8, 0, 0, 0, 0xff, 0xd0, 0xe8, 1, 0, 0, 0, 0xf4, 0x48, 0xff, 0xc3, 0xc3,
    ];
    let page = CodePage::new(&code);
    let mut stack = vec![0u64; 512];
    let top = stack.as_mut_ptr() as u64 + 8 * 500;
    let mut t = identity();
    t.state_mut().rip = page.addr();
    t.state_mut().gpr[4] = top;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit));
    assert_eq!(t.state().rip, page.addr() + 14);
    assert_eq!(t.state().gpr[3], 2, "f ran twice");
    assert_eq!(t.state().gpr[4], top, "stack balanced");
    // The guest's return addresses were pushed on the guest stack.
    assert_eq!(stack[499], page.addr() + 14);
}

#[test]
fn division_by_zero_is_a_precise_guest_exception() {
    // xor edx,edx; div rcx; hlt   with rcx = 0
    let page = CodePage::new(&[0x31, 0xd2, 0x48, 0xf7, 0xf1, 0xf4]);
    let mut t = identity();
    t.state_mut().rip = page.addr();
    t.state_mut().gpr[0] = 77;
    t.state_mut().gpr[1] = 0;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(matches!(exit, Exit::Exception(e) if e.vector == vector::DE), "{exit:?}");
    assert_eq!(t.state().rip, page.addr() + 2, "RIP at the faulting div");
    assert_eq!(t.state().gpr[0], 77);
}

#[test]
fn unsupported_instructions_are_refused_with_mnemonic_bytes_and_rip() {
    // vaddps zmm0,zmm1,zmm2 (AVX-512: no rule)
    let page = CodePage::new(&[0x62, 0xf1, 0x74, 0x48, 0x58, 0xc2]);
    let mut t = identity();
    t.state_mut().rip = page.addr();
    let err = t.run(&mut HostPlatform, BUDGET).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TranslateError::Unsupported { .. }), "{text}");
    assert!(text.contains("vaddps"), "{text}");
    assert!(text.contains("62 f1 74 48 58 c2"), "{text}");
    assert!(text.contains(&format!("{:#x}", page.addr())), "{text}");
}

#[test]
fn identity_self_modifying_code_is_seen_by_the_next_block() {
    // mov byte [rip+3],0x42; jmp +0; mov al,0x11; hlt  -- rewrites the 0x11 before it runs
    let page = CodePage::new(&[0xc6, 0x05, 0x03, 0, 0, 0, 0x42, 0xeb, 0x00, 0xb0, 0x11, 0xf4]);
    let mut t = identity();
    t.state_mut().rip = page.addr() + 9;
    assert!(gp_at(t.run(&mut HostPlatform, BUDGET).unwrap()));
    assert_eq!(t.state().gpr[0] & 0xff, 0x11);
    t.state_mut().rip = page.addr();
    assert!(gp_at(t.run(&mut HostPlatform, BUDGET).unwrap()));
    assert_eq!(t.state().gpr[0] & 0xff, 0x42, "the rewritten immediate ran");
    assert!(t.stats().invalidated_blocks >= 1, "{:?}", t.stats());
    // The page is writable again for the host once the translator is gone.
    drop(t);
    // SAFETY: the page is ours and writable.
    unsafe { *page.0.add(100) = 1 };
}

/// Guest physical memory with 4-level page tables: code page at 0x400000 (RWX) and a data page at
/// 0x401000; 0x402000 is not mapped.
struct SoftGuest {
    ram: *mut u8,
}

const RAM: usize = 0x10000;
const CODE_VA: u64 = 0x40_0000;

impl SoftGuest {
    fn new(code: &[u8]) -> Self {
        // SAFETY: fresh anonymous mapping, checked.
        let ram = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        assert_ne!(ram as *mut libc::c_void, libc::MAP_FAILED);
        let g = SoftGuest { ram };
        let entry = |table: u64, index: u64, value: u64| g.write_u64(table + index * 8, value | 0b111);
        entry(0x0000, 0, 0x1000); // PML4[0] -> PDPT
        entry(0x1000, 0, 0x2000); // PDPT[0] -> PD
        entry(0x2000, 2, 0x3000); // PD[2] (0x400000) -> PT
        entry(0x3000, 0, 0x5000); // code
        entry(0x3000, 1, 0x6000); // data
        entry(0x3000, 4, 0x7000); // 0x404000 and 0x405000: adjacent virtually, not physically
        entry(0x3000, 5, 0x9000);
        for (i, b) in code.iter().enumerate() {
            g.write_u8(0x5000 + i as u64, *b);
        }
        g
    }
    fn write_u64(&self, pa: u64, v: u64) {
        // SAFETY: pa + 8 <= RAM in every call above.
        unsafe { std::ptr::write_unaligned(self.ram.add(pa as usize) as *mut u64, v) };
    }
    fn write_u8(&self, pa: u64, v: u8) {
        // SAFETY: pa < RAM.
        unsafe { *self.ram.add(pa as usize) = v };
    }
    fn translator(&self) -> Translator {
        // SAFETY: the RAM mapping outlives the translator (the test keeps `self` alive).
        let ram = unsafe { GuestRam::new(self.ram, RAM as u64) };
        let mut t = Translator::new(Config {
            strategy: MemoryStrategy::SoftMmu(ram),
            code_cache_bytes: 1 << 20,
            verified_only: true,
            system: false,
        })
        .unwrap();
        t.state_mut().cr3 = 0;
        t.state_mut().rip = CODE_VA;
        t
    }
}

impl Drop for SoftGuest {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ram as *mut libc::c_void, RAM) };
    }
}

#[test]
fn soft_mmu_page_fault_is_precise() {
    // stc; mov rbx,[0x402000]; hlt
    let g = SoftGuest::new(&[0xf9, 0x48, 0x8b, 0x1c, 0x25, 0x00, 0x20, 0x40, 0x00, 0xf4]);
    let mut t = g.translator();
    t.state_mut().gpr[3] = 0x1234;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    let Exit::Exception(e) = exit else { panic!("{exit:?}") };
    assert_eq!(e.vector, vector::PF);
    assert_eq!(e.address, Some(0x40_2000));
    assert_eq!(e.error_code, Some(4), "user-mode read of a non-present page");
    assert_eq!(t.state().rip, CODE_VA + 1, "RIP at the faulting mov");
    assert_eq!(t.state().gpr[3], 0x1234, "destination untouched");
    assert_eq!(t.state().rflags & 1, 1, "CF from stc survives the fault");
}

#[test]
fn soft_mmu_sets_accessed_and_dirty_bits() {
    // mov qword [0x401000], rax; hlt
    let g = SoftGuest::new(&[0x48, 0x89, 0x04, 0x25, 0x00, 0x10, 0x40, 0x00, 0xf4]);
    let mut t = g.translator();
    t.state_mut().gpr[0] = 0xfeed;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit), "{exit:?} at {:#x}", t.state().rip);
    // SAFETY: reading inside the RAM mapping.
    let (pte, data) = unsafe {
        (
            std::ptr::read_unaligned(g.ram.add(0x3008) as *const u64),
            std::ptr::read_unaligned(g.ram.add(0x6000) as *const u64),
        )
    };
    assert_eq!(data, 0xfeed);
    assert_eq!(pte & 0x60, 0x60, "accessed and dirty set in the data PTE: {pte:#x}");
}

#[test]
fn soft_mmu_access_across_non_contiguous_pages() {
    // mov [0x404ffc],rax; mov rbx,[0x404ffc]; hlt
    let g = SoftGuest::new(&[
        0x48, 0x89, 0x04, 0x25, 0xfc, 0x4f, 0x40, 0x00, 0x48, 0x8b, 0x1c, 0x25, 0xfc, 0x4f, 0x40, 0x00, 0xf4,
    ]);
    let mut t = g.translator();
    t.state_mut().gpr[0] = 0x1122_3344_5566_7788;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!(t.state().gpr[3], 0x1122_3344_5566_7788);
    // SAFETY: reading inside the RAM mapping.
    let (lo, hi) = unsafe {
        (
            std::ptr::read_unaligned(g.ram.add(0x7ffc) as *const u32),
            std::ptr::read_unaligned(g.ram.add(0x9000) as *const u32),
        )
    };
    assert_eq!(
        (lo, hi),
        (0x5566_7788, 0x1122_3344),
        "each half landed in its own frame"
    );
}

#[test]
fn self_modifying_code_is_seen_by_the_next_block() {
    // mov byte [rip+3],0x42; jmp +0; mov al,0x11; hlt  -- rewrites the 0x11 before it runs
    let g = SoftGuest::new(&[0xc6, 0x05, 0x03, 0, 0, 0, 0x42, 0xeb, 0x00, 0xb0, 0x11, 0xf4]);
    let mut t = g.translator();
    // Translate the target block first so there is something stale to invalidate.
    t.state_mut().rip = CODE_VA + 9;
    assert!(gp_at(t.run(&mut HostPlatform, BUDGET).unwrap()));
    assert_eq!(t.state().gpr[0] & 0xff, 0x11);
    t.state_mut().rip = CODE_VA;
    assert!(gp_at(t.run(&mut HostPlatform, BUDGET).unwrap()));
    assert_eq!(t.state().gpr[0] & 0xff, 0x42, "the rewritten immediate ran");
    assert!(t.stats().invalidated_blocks >= 1, "{:?}", t.stats());
}

#[test]
fn an_asynchronous_signal_stops_a_chained_loop_at_a_block_boundary() {
    use hbt_translator::host::signals::{catch_async, take_pending};
    // L: inc rax; jmp L   (chained to itself: never leaves translated code on its own)
    let page = CodePage::new(&[0x48, 0xff, 0xc0, 0xeb, 0xfb]);
    catch_async(libc::SIGUSR2, false, 0).unwrap();
    let mut t = identity();
    t.state_mut().rip = page.addr();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as u64;
    for round in 1..=2u64 {
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: signalling the test thread, which has a handler for SIGUSR2.
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR2) };
        });
        let before = t.state().gpr[0];
        let exit = t.run(&mut HostPlatform, u64::MAX).unwrap();
        kicker.join().unwrap();
        assert!(matches!(exit, Exit::Interrupted), "round {round}: {exit:?}");
        assert_eq!(t.state().rip, page.addr(), "stopped between blocks, at the loop head");
        assert!(
            t.state().gpr[0] > before + 1000,
            "round {round}: the loop ran translated"
        );
        let (sig, info) = take_pending(1 << (libc::SIGUSR2 - 1)).expect("SIGUSR2 recorded");
        assert_eq!(sig, libc::SIGUSR2);
        assert_eq!(i32::from_le_bytes(info[0..4].try_into().unwrap()), libc::SIGUSR2);
    }
}

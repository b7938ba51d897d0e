//! Engine behaviour beyond single instructions: chaining, indirect branches, self-modifying
//! code, precise faults under both memory strategies, and refusal of unsupported instructions.

use hbt_translator::exit::{vector, GuestException};
use hbt_translator::{Config, Exit, GuestRam, HostPlatform, MemoryStrategy, TranslateError, Translator};

const BUDGET: u64 = 10_000;

/// A fresh anonymous 4 KiB mapping with protection `prot` (the caller unmaps it).
fn anonymous_page(prot: libc::c_int) -> *mut libc::c_void {
    // SAFETY: a fresh anonymous mapping, checked; it aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p
}

/// One RWX page holding `code` (identity strategy: guest addresses are host addresses).
struct CodePage(*mut u8);

impl CodePage {
    fn new(code: &[u8]) -> Self {
        let p = anonymous_page(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as *mut u8;
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

/// A page with no access rights: the guest's stack runs into it.
struct GuardPage(*mut libc::c_void);

impl GuardPage {
    fn new() -> Self {
        GuardPage(anonymous_page(libc::PROT_NONE))
    }
    fn end(&self) -> u64 {
        self.0 as u64 + 4096
    }
}

impl Drop for GuardPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `new`.
        unsafe { libc::munmap(self.0, 4096) };
    }
}

#[test]
fn call_and_ret_on_an_unmapped_stack_fault_precisely() {
    // call +0 (its 64-bit return address is pushed from a literal), then a `ret`: with RSP at
    // the end of (and then inside) a no-access page, each raises #PF at itself, RSP unchanged.
    let page = CodePage::new(&[0xe8, 0, 0, 0, 0, 0xc3]);
    assert!(page.addr() > u32::MAX as u64, "the return address needs 64 bits");
    let guard = GuardPage::new();
    for (rip, rsp, fault_addr) in [
        (page.addr(), guard.end(), guard.end() - 8),
        (page.addr() + 5, guard.end() - 64, guard.end() - 64),
    ] {
        let mut t = identity();
        t.state_mut().rip = rip;
        t.state_mut().gpr[4] = rsp;
        t.state_mut().gpr[11] = 0x1111;
        t.state_mut().gpr[1] = 0x2222;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        let Exit::Exception(e) = exit else {
            panic!("expected #PF, got {exit:?}");
        };
        assert_eq!(e.vector, vector::PF, "{e:?}");
        assert_eq!(e.address, Some(fault_addr), "{e:?}");
        assert_eq!(t.state().rip, rip, "the fault is at the call/ret");
        assert_eq!(t.state().gpr[4], rsp, "RSP unchanged");
        assert_eq!(
            (t.state().gpr[11], t.state().gpr[1]),
            (0x1111, 0x2222),
            "R11/RCX restored"
        );
    }
}

/// Runs the code in `page` (identity) from its start with RSP at `top`, 500 slots into a fresh
/// stack; returns the translator, the exit, the stack (for what the guest left there) and `top`.
fn run_with_stack(page: &CodePage, setup: impl FnOnce(&mut Translator)) -> (Translator, Exit, Vec<u64>, u64) {
    let mut stack = vec![0u64; 512];
    let top = stack.as_mut_ptr() as u64 + 8 * 500;
    let mut t = identity();
    t.state_mut().rip = page.addr();
    t.state_mut().gpr[4] = top;
    setup(&mut t);
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    (t, exit, stack, top)
}

#[test]
fn a_call_to_a_leaf_in_the_same_page_is_inlined_exactly() {
    // call f; hlt; f: add rax,rcx; ret  -- one block: the call pushes, the ret only pops
    let page = CodePage::new(&[0xe8, 1, 0, 0, 0, 0xf4, 0x48, 0x01, 0xc8, 0xc3]);
    let (t, exit, stack, top) = run_with_stack(&page, |t| {
        t.state_mut().gpr[0] = 40;
        t.state_mut().gpr[1] = 2;
    });
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!(t.state().rip, page.addr() + 5, "back at the hlt after the call");
    assert_eq!(t.state().gpr[0], 42);
    assert_eq!(t.state().gpr[4], top, "stack balanced");
    assert_eq!(stack[499], page.addr() + 5, "the return address is on the guest stack");
    assert_eq!(
        t.stats().blocks_translated,
        1,
        "call, callee and return in one block: {:?}",
        t.stats()
    );
}

#[test]
fn a_fault_inside_an_inlined_callee_is_precise() {
    // call f; hlt; f: mov rax,[rsi]; ret   with RSI in a no-access page
    let page = CodePage::new(&[0xe8, 1, 0, 0, 0, 0xf4, 0x48, 0x8b, 0x06, 0xc3]);
    let guard = GuardPage::new();
    let (t, exit, stack, top) = run_with_stack(&page, |t| {
        t.state_mut().gpr[0] = 7;
        t.state_mut().gpr[6] = guard.end() - 4096;
    });
    let Exit::Exception(e) = exit else {
        panic!("expected #PF, got {exit:?}")
    };
    assert_eq!(e.vector, vector::PF, "{e:?}");
    assert_eq!(t.state().rip, page.addr() + 6, "RIP at the faulting load in the callee");
    assert_eq!(t.state().gpr[4], top - 8, "the call's push happened");
    assert_eq!(stack[499], page.addr() + 5);
    assert_eq!(t.state().gpr[0], 7, "destination untouched");
}

#[test]
fn callees_that_write_memory_or_move_rsp_are_not_inlined_and_return_where_the_guest_says() {
    // call f; hlt; g: inc rbx; hlt; f: lea rax,[rip-9] (= g); mov [rsp],rax; ret
    let page = CodePage::new(&[
        0xe8, 5, 0, 0, 0, 0xf4, 0x48, 0xff, 0xc3, 0xf4, 0x48, 0x8d, 0x05, 0xf5, 0xff, 0xff, 0xff, 0x48, 0x89, 0x04,
        0x24, 0xc3,
    ]);
    let (t, exit, _, top) = run_with_stack(&page, |_| {});
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!(t.state().rip, page.addr() + 9, "the rewritten return address was taken");
    assert_eq!(t.state().gpr[3], 1);
    assert_eq!(t.state().gpr[4], top);
    // call f; hlt; g: inc rbx; hlt; f: pop rax; add rax,1 (= g); push rax; ret  -- RSP moves
    let page = CodePage::new(&[
        0xe8, 5, 0, 0, 0, 0xf4, 0x48, 0xff, 0xc3, 0xf4, 0x58, 0x48, 0x83, 0xc0, 0x01, 0x50, 0xc3,
    ]);
    let (t, exit, _, top) = run_with_stack(&page, |_| {});
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!(
        (t.state().rip, t.state().gpr[3], t.state().gpr[4]),
        (page.addr() + 9, 1, top)
    );
}

#[test]
fn an_inlined_callee_branch_leaves_the_block_and_still_returns() {
    // call f; hlt; f: test rcx,rcx; jz +3; inc rax; ret
    let page = CodePage::new(&[
        0xe8, 1, 0, 0, 0, 0xf4, 0x48, 0x85, 0xc9, 0x74, 0x03, 0x48, 0xff, 0xc0, 0xc3,
    ]);
    for (rcx, rax) in [(0, 0), (1, 1)] {
        let (t, exit, _, top) = run_with_stack(&page, |t| t.state_mut().gpr[1] = rcx);
        assert!(gp_at(exit), "{exit:?}");
        assert_eq!(
            (t.state().rip, t.state().gpr[0], t.state().gpr[4]),
            (page.addr() + 5, rax, top),
            "rcx={rcx}"
        );
    }
}

#[test]
fn direct_jumps_within_the_page_are_followed() {
    // jmp L; ud2; L: inc rax; hlt
    let page = CodePage::new(&[0xeb, 0x02, 0x0f, 0x0b, 0x48, 0xff, 0xc0, 0xf4]);
    let mut t = identity();
    t.state_mut().rip = page.addr();
    assert!(gp_at(t.run(&mut HostPlatform, BUDGET).unwrap()));
    assert_eq!((t.state().rip, t.state().gpr[0]), (page.addr() + 7, 1));
    assert_eq!(t.stats().blocks_translated, 1, "{:?}", t.stats());
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
    // rdpkru (protection keys are the host's: no rule)
    let page = CodePage::new(&[0x0f, 0x01, 0xee]);
    let mut t = identity();
    t.state_mut().rip = page.addr();
    let err = t.run(&mut HostPlatform, BUDGET).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TranslateError::Unsupported { .. }), "{text}");
    assert!(text.contains("rdpkru"), "{text}");
    assert!(text.contains("0f 01 ee"), "{text}");
    assert!(text.contains(&format!("{:#x}", page.addr())), "{text}");
}

#[test]
fn avx512_instructions_are_undefined_without_avx512_state_in_xcr0() {
    // vaddps zmm0,zmm1,zmm2; kmovw eax,k1 — a guest whose XCR0 lacks the AVX-512 components
    // (the default state offers x87/SSE/AVX only) gets #UD, as from a CPU with that XCR0, and
    // never reaches the host's ZMM or opmask registers.
    for bytes in [&[0x62, 0xf1, 0x74, 0x48, 0x58, 0xc2][..], &[0xc5, 0xf8, 0x93, 0xc1]] {
        let page = CodePage::new(bytes);
        let mut t = identity();
        assert_eq!(t.state().xcr0 & 0xe0, 0);
        t.state_mut().rip = page.addr();
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        assert!(matches!(exit, Exit::Exception(e) if e.vector == vector::UD), "{exit:?}");
        assert_eq!(t.state().rip, page.addr());
    }
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
    fn read_u64(&self, pa: u64) -> u64 {
        // SAFETY: pa + 8 <= RAM in every call.
        unsafe { std::ptr::read_unaligned(self.ram.add(pa as usize) as *const u64) }
    }
    fn write_u8(&self, pa: u64, v: u8) {
        // SAFETY: pa < RAM.
        unsafe { *self.ram.add(pa as usize) = v };
    }
    fn translator(&self) -> Translator {
        self.translator_with(false)
    }
    /// With `system`, a system-mode translator entered at CPL0.
    fn translator_with(&self, system: bool) -> Translator {
        // SAFETY: the RAM mapping outlives the translator (the test keeps `self` alive).
        let ram = unsafe { GuestRam::new(self.ram, RAM as u64) };
        let mut t = Translator::new(Config {
            strategy: MemoryStrategy::SoftMmu(ram),
            code_cache_bytes: 1 << 20,
            verified_only: true,
            system,
        })
        .unwrap();
        t.state_mut().cr3 = 0;
        t.state_mut().rip = CODE_VA;
        if system {
            t.state_mut().cpl = hbt_translator::state::Cpl::Kernel;
            t.state_mut().seg = [0x18, 0x10, 0x18, 0x18, 0x18, 0x18];
        }
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
fn soft_mmu_inlined_call_pushes_through_the_mmu_and_faults_precisely() {
    // call f; hlt; f: add rax,rcx; mov rdx,[rsi]; ret   stack in the data page
    let g = SoftGuest::new(&[0xe8, 1, 0, 0, 0, 0xf4, 0x48, 0x01, 0xc8, 0x48, 0x8b, 0x16, 0xc3]);
    for (rsi, faults) in [(0x40_1000u64, false), (0x40_2000, true)] {
        let mut t = g.translator();
        // The first run fills the TLB (its misses restart inside the callee, in other blocks);
        // the second runs the inlined block from end to end.
        for pass in 0..2 {
            let translated = t.stats().blocks_translated;
            t.state_mut().rip = CODE_VA;
            t.state_mut().gpr[0] = 40;
            t.state_mut().gpr[1] = 2;
            t.state_mut().gpr[4] = 0x40_1800;
            t.state_mut().gpr[6] = rsi;
            g.write_u64(0x67f8, 0);
            let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
            let mut ret = [0u8; 8];
            // SAFETY: 0x67f8 (the data page's frame 0x6000 + 0x7f8) is inside RAM.
            unsafe { std::ptr::copy_nonoverlapping(g.ram.add(0x67f8), ret.as_mut_ptr(), 8) };
            assert_eq!(
                u64::from_le_bytes(ret),
                CODE_VA + 5,
                "return address pushed through the soft-MMU"
            );
            if faults {
                assert!(matches!(exit, Exit::Exception(e) if e.vector == vector::PF), "{exit:?}");
                assert_eq!((t.state().rip, t.state().gpr[4]), (CODE_VA + 9, 0x40_17f8));
            } else {
                assert!(gp_at(exit), "{exit:?}");
                assert_eq!(
                    (t.state().rip, t.state().gpr[0], t.state().gpr[4]),
                    (CODE_VA + 5, 42, 0x40_1800)
                );
            }
            if pass == 1 {
                assert_eq!(t.stats().blocks_translated, translated, "{:?}", t.stats());
            }
        }
    }
}

#[test]
fn enter_checks_its_final_stack_top_for_writing() {
    // enter 0x2000,1; hlt with RSP in the data page: the two pushes fit, the final stack top
    // (0x3ff000) is not mapped. The CPU's check there is a write's (#PF error code 6 at CPL3).
    let g = SoftGuest::new(&[0xc8, 0x00, 0x20, 0x01, 0xf4]);
    let mut t = g.translator();
    t.state_mut().gpr[4] = 0x40_1010;
    t.state_mut().gpr[5] = 0x40_1234;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert_eq!(exit, Exit::Exception(GuestException::page_fault(0x3f_f000, 6)));
    assert_eq!(
        (t.state().rip, t.state().gpr[4], t.state().gpr[5]),
        (CODE_VA, 0x40_1010, 0x40_1234),
        "RIP, RSP and RBP as before the enter"
    );
}

#[test]
fn a_misaligned_sse_operand_raises_gp_before_the_page_walk() {
    // movaps xmm0,[rbx]; hlt and cmpxchg16b [rbx]; hlt, with RBX 8 bytes past a 16-byte
    // boundary: in the unmapped page (the CPU raises #GP(0), not #PF) and in the data page
    // (#GP(0) without marking the page accessed).
    for code in [&[0x0f, 0x28, 0x03, 0xf4][..], &[0x48, 0x0f, 0xc7, 0x0b, 0xf4]] {
        for rbx in [0x40_2008u64, 0x40_1008] {
            let g = SoftGuest::new(code);
            let mut t = g.translator();
            t.state_mut().gpr[3] = rbx;
            let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
            assert_eq!(exit, Exit::Exception(GuestException::gp(0)), "{code:x?} at {rbx:#x}");
            assert_eq!(t.state().rip, CODE_VA);
            // SAFETY: reading the data page's PTE inside the RAM mapping.
            let pte = unsafe { std::ptr::read_unaligned(g.ram.add(0x3008) as *const u64) };
            assert_eq!(pte & 0x60, 0, "{code:x?} at {rbx:#x}: the data page was not accessed");
        }
    }
    // movups xmm1,[rbx]; movaps xmm0,[rbx]; hlt: the movaps reuses the movups's host address
    // (no lookup of its own); the host's movaps still raises #GP(0), at the movaps.
    let g = SoftGuest::new(&[0x0f, 0x10, 0x0b, 0x0f, 0x28, 0x03, 0xf4]);
    let mut t = g.translator();
    t.state_mut().gpr[3] = 0x40_1008;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert_eq!(exit, Exit::Exception(GuestException::gp(0)));
    assert_eq!(t.state().rip, CODE_VA + 3);
}

#[test]
fn a_faulting_vcvtps2ph_store_leaves_mxcsr_as_the_vendor_does() {
    if !hbt_translator::host::features::host_has(iced_x86::CpuidFeature::F16C) {
        return;
    }
    // vcvtps2ph [0x402000],xmm1,4; hlt: 1.0001 is inexact in half precision, the page is not
    // mapped. An Intel CPU converts before it stores: #PF with MXCSR.PE set; an AMD one leaves
    // MXCSR alone (`cpu::vendor`, F16cStoreFaultKeepsConversion).
    let g = SoftGuest::new(&[0xc4, 0xe3, 0x79, 0x1d, 0x0c, 0x25, 0x00, 0x20, 0x40, 0x00, 0x04, 0xf4]);
    let mut t = g.translator();
    let s = t.state_mut();
    s.xsave.xmm_mut(1)[..4].copy_from_slice(&1.0001f32.to_le_bytes());
    s.xsave.set_mxcsr(0x1f80);
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert_eq!(exit, Exit::Exception(GuestException::page_fault(0x40_2000, 6)));
    use hbt_translator::cpu::vendor::{host_has, Quirk};
    let mxcsr = if host_has(Quirk::F16cStoreFaultKeepsConversion) {
        0x1fa0
    } else {
        0x1f80
    };
    assert_eq!(t.state().xsave.mxcsr(), mxcsr);
}

#[test]
fn masked_moves_touch_only_the_elements_their_mask_selects() {
    // RBX = 0x401ff8: elements 0 and 1 in the data page, 2 and 3 in the unmapped page.
    let run = |code: &[u8], mask: [u32; 4]| {
        let g = SoftGuest::new(code);
        let mut t = g.translator();
        let s = t.state_mut();
        s.gpr[3] = 0x40_1ff8;
        for (i, m) in mask.iter().enumerate() {
            s.xsave.xmm_mut(1)[4 * i..4 * i + 4].copy_from_slice(&m.to_le_bytes());
        }
        s.xsave.xmm_mut(0).copy_from_slice(&[0xab; 16]);
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        // SAFETY: reading the data page's PTE and its last 8 bytes inside the RAM mapping.
        let (pte, tail) = unsafe {
            (
                std::ptr::read_unaligned(g.ram.add(0x3008) as *const u64),
                std::ptr::read_unaligned(g.ram.add(0x6ff8) as *const u64),
            )
        };
        (exit, t.state().xsave.xmm(0).to_vec(), pte, tail)
    };
    let load = [0xc4, 0xe2, 0x71, 0x2c, 0x03, 0xf4]; // vmaskmovps xmm0,xmm1,[rbx]; hlt
    let store = [0xc4, 0xe2, 0x71, 0x2e, 0x03, 0xf4]; // vmaskmovps [rbx],xmm1,xmm0; hlt
    let on = 0x8000_0000;
    // Nothing selected: no fault, no access; a load zeroes the destination.
    let (exit, xmm0, pte, _) = run(&load, [0; 4]);
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!((xmm0, pte & 0x60), (vec![0; 16], 0));
    // Only the mapped elements: completes.
    let (exit, xmm0, pte, _) = run(&load, [on, 0, 0, 0]);
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!(&xmm0[4..], &[0; 12]);
    assert_eq!(pte & 0x60, 0x20, "accessed");
    // A selected element in the unmapped page faults at it, and a store then stores nothing.
    let (exit, _, _, tail) = run(&store, [on, 0, on, 0]);
    assert_eq!(exit, Exit::Exception(GuestException::page_fault(0x40_2000, 6)));
    assert_eq!(tail, 0, "nothing stored");
    let (exit, _, pte, tail) = run(&store, [on, on, 0, 0]);
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!((pte & 0x60, tail), (0x60, u64::MAX / 0xff * 0xab));
}

#[test]
fn an_m80_store_whose_top_two_bytes_fault_has_stored_its_low_eight() {
    // fldpi; fstp tbyte [rbx]; hlt. At 0x401ff8 the significand fills the data page and the
    // sign and exponent fall into the unmapped page: the CPU's first store (the low 8 bytes)
    // is done at the #PF. At 0x401ff9 the low 8 bytes cross too: nothing is stored.
    for (rbx, stored) in [(0x40_1ff8u64, 0xc90f_daa2_2168_c235u64), (0x40_1ff9, 0)] {
        let g = SoftGuest::new(&[0xd9, 0xeb, 0xdb, 0x3b, 0xf4]);
        let mut t = g.translator();
        t.state_mut().gpr[3] = rbx;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        assert_eq!(exit, Exit::Exception(GuestException::page_fault(0x40_2000, 6)));
        let at = 0x6000 + (rbx & 0xfff) as usize;
        // SAFETY: reading inside the RAM mapping (the data page's frame is 0x6000).
        let low = unsafe { std::ptr::read_unaligned(g.ram.add(at.min(0x6ff8)) as *const u64) };
        assert_eq!(low, stored, "at {rbx:#x}");
    }
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
fn code_after_a_split_access_never_runs_with_the_bounce_buffer_mapped() {
    // A split access over scattered frames runs against a copy of both pages (the bounce
    // buffer, mapped in the TLB for the first page and one access kind): the code after it must
    // run only once the dispatcher has written the copy back and unmapped it, however it is
    // reached — a chained jump, or the indirect-branch table when the split operand is a jump's
    // pointer. Otherwise it reads the copy after writing the page, or its stores to the second
    // page are overwritten by the copy. Each loop runs 10 times, so its blocks are chained and
    // its indirect target is in the table from the second iteration on.
    let mut code = vec![];
    let jnz_back = |code: &mut Vec<u8>, to: usize| {
        let rel = to as i64 - (code.len() as i64 + 2);
        code.extend([0x75, rel as i8 as u8]);
    };
    // mov ecx,10; L: mov rbx,[0x404ffc]; mov [0x404010],rcx; mov edx,[0x404010]; add r8,rdx;
    // dec rcx; jnz L
    code.extend([0xb9, 10, 0, 0, 0]);
    let l = code.len();
    code.extend([0x48, 0x8b, 0x1c, 0x25, 0xfc, 0x4f, 0x40, 0x00]);
    code.extend([0x48, 0x89, 0x0c, 0x25, 0x10, 0x40, 0x40, 0x00]);
    code.extend([0x8b, 0x14, 0x25, 0x10, 0x40, 0x40, 0x00, 0x49, 0x01, 0xd0]);
    code.extend([0x48, 0xff, 0xc9]);
    jnz_back(&mut code, l);
    // mov ecx,10; M: jmp [0x404ffc]; T: mov [0x404020],rcx; mov edx,[0x404020]; add r9,rdx;
    // dec rcx; jnz M
    code.extend([0xb9, 10, 0, 0, 0]);
    let m = code.len();
    code.extend([0xff, 0x24, 0x25, 0xfc, 0x4f, 0x40, 0x00]);
    let target = CODE_VA + code.len() as u64;
    code.extend([0x48, 0x89, 0x0c, 0x25, 0x20, 0x40, 0x40, 0x00]);
    code.extend([0x8b, 0x14, 0x25, 0x20, 0x40, 0x40, 0x00, 0x49, 0x01, 0xd1]);
    code.extend([0x48, 0xff, 0xc9]);
    jnz_back(&mut code, m);
    // mov ecx,10; N: mov [0x404ffc],rcx; mov [0x405100],rcx; dec rcx; jnz N; hlt
    code.extend([0xb9, 10, 0, 0, 0]);
    let n = code.len();
    code.extend([0x48, 0x89, 0x0c, 0x25, 0xfc, 0x4f, 0x40, 0x00]);
    code.extend([0x48, 0x89, 0x0c, 0x25, 0x00, 0x51, 0x40, 0x00]);
    code.extend([0x48, 0xff, 0xc9]);
    jnz_back(&mut code, n);
    code.push(0xf4);
    let g = SoftGuest::new(&code);
    // The pointer at 0x404ffc, split over the frames of 0x404000 (0x7000) and 0x405000 (0x9000).
    g.write_u64(0x7ff8, (target & 0xffff_ffff) << 32);
    g.write_u64(0x9000, target >> 32);
    let mut t = g.translator();
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit), "{exit:?}");
    assert_eq!(t.state().gpr[3], target, "the split read");
    let sum: u64 = (1..=10).sum();
    assert_eq!(
        t.state().gpr[8],
        sum,
        "after a chained jump: each read saw the store before it"
    );
    assert_eq!(
        t.state().gpr[9],
        sum,
        "after the table's jump: each read saw the store before it"
    );
    assert_eq!(
        g.read_u64(0x9100),
        1,
        "the second page's last store survived the split store"
    );
    assert_eq!(g.read_u64(0x7ffc) & 0xffff_ffff, 1, "the split store's low half");
}

#[test]
fn split_accesses_run_in_place_on_consecutive_pages_and_reuse_their_translation() {
    // mov ecx,10; L: mov [0x406ffc],rax; mov rbx,[0x406ffc]; mov [0x404ffc],rax;
    // mov rdx,[0x404ffc]; inc rax; dec rcx; jnz L; hlt
    let mut code = vec![0xb9, 10, 0, 0, 0];
    code.extend([0x48, 0x89, 0x04, 0x25, 0xfc, 0x6f, 0x40, 0x00]);
    code.extend([0x48, 0x8b, 0x1c, 0x25, 0xfc, 0x6f, 0x40, 0x00]);
    code.extend([0x48, 0x89, 0x04, 0x25, 0xfc, 0x4f, 0x40, 0x00]);
    code.extend([0x48, 0x8b, 0x14, 0x25, 0xfc, 0x4f, 0x40, 0x00]);
    code.extend([0x48, 0xff, 0xc0, 0x48, 0xff, 0xc9, 0x75, 0xd8, 0xf4]);
    let g = SoftGuest::new(&code);
    // 0x406000 and 0x407000: consecutive virtually and physically (0xa000, 0xb000).
    g.write_u64(0x3000 + 6 * 8, 0xa000 | 0b111);
    g.write_u64(0x3000 + 7 * 8, 0xb000 | 0b111);
    let mut t = g.translator();
    t.state_mut().gpr[0] = 0x1111_2222_3333_0000;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit), "{exit:?}");
    let last = 0x1111_2222_3333_0009u64;
    assert_eq!(t.state().gpr[0], last + 1);
    assert_eq!(
        (t.state().gpr[3], t.state().gpr[2]),
        (last, last),
        "both reads saw the last write"
    );
    // SAFETY: reading inside the RAM mapping.
    let (consecutive, lo, hi) = unsafe {
        (
            std::ptr::read_unaligned(g.ram.add(0xaffc) as *const u64),
            std::ptr::read_unaligned(g.ram.add(0x7ffc) as *const u32),
            std::ptr::read_unaligned(g.ram.add(0x9000) as *const u32),
        )
    };
    assert_eq!(consecutive, last, "written in place across 0xa000/0xb000");
    assert_eq!(
        (lo, hi),
        (last as u32, (last >> 32) as u32),
        "scattered halves in their frames"
    );
    // The loop's blocks (each split access restarts the block after it) plus one page-crossing
    // variant per access site: 10 whatever the iterations (46 when each split access had a
    // translation of its own).
    let translated = t.stats().blocks_translated;
    assert!(
        translated <= 10,
        "{translated} blocks for 40 split accesses: {:?}",
        t.stats()
    );
}

#[test]
fn a_host_address_serves_the_next_instruction_with_the_same_operand_only() {
    // mov rsi,0x401000; mov qword [rsi],5; add [rsi],rcx; add rax,[rsi] (reuses the lookup);
    // add r11,[rsi] (R11 would hold the host address: looked up again); mov rdx,[rsi];
    // add rsi,[rsi] (writes its own base); mov rbx,[rsi] (a new address); hlt
    let g = SoftGuest::new(&[
        0x48, 0xc7, 0xc6, 0x00, 0x10, 0x40, 0x00, 0x48, 0xc7, 0x06, 0x05, 0, 0, 0, 0x48, 0x01, 0x0e, 0x48, 0x03, 0x06,
        0x4c, 0x03, 0x1e, 0x48, 0x8b, 0x16, 0x48, 0x03, 0x36, 0x48, 0x8b, 0x1e, 0xf4,
    ]);
    g.write_u64(0x6008, 0x77);
    let mut t = g.translator();
    let s = t.state_mut();
    s.gpr[1] = 3;
    s.gpr[11] = 100;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(gp_at(exit), "{exit:?}");
    let s = t.state();
    assert_eq!((s.gpr[0], s.gpr[11], s.gpr[2]), (8, 108, 8), "rax, r11, rdx");
    assert_eq!((s.gpr[6], s.gpr[3], s.gpr[1]), (0x40_1008, 0x77, 3), "rsi, rbx, rcx");
}

#[test]
fn a_fault_at_an_instruction_reusing_a_host_address_is_precise() {
    // mov rsi,0x401000; mov qword [rsi],0; mov rax,[rsi]; div qword [rsi] (#DE); hlt
    let g = SoftGuest::new(&[
        0x48, 0xc7, 0xc6, 0x00, 0x10, 0x40, 0x00, 0x48, 0xc7, 0x06, 0, 0, 0, 0, 0x48, 0x8b, 0x06, 0x48, 0xf7, 0x36,
        0xf4,
    ]);
    let mut t = g.translator();
    for r in [3usize, 8, 9, 10, 11] {
        t.state_mut().gpr[r] = 0x1000 + r as u64;
    }
    t.state_mut().gpr[2] = 1;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(matches!(exit, Exit::Exception(e) if e.vector == vector::DE), "{exit:?}");
    let s = t.state();
    assert_eq!(s.rip, CODE_VA + 17, "at the div");
    for r in [3usize, 8, 9, 10, 11] {
        assert_eq!(s.gpr[r], 0x1000 + r as u64, "r{r} given back");
    }
    assert_eq!((s.gpr[0], s.gpr[2]), (0, 1), "rax loaded, rdx untouched");
}

#[test]
fn kernel_rep_stos_and_movs_run_in_place_within_a_page() {
    // mov rdi,0x401010; mov ecx,4; mov rax,0x1122334455667788; rep stosq;
    // mov rsi,0x401010; mov rdi,0x401100; mov ecx,32; rep movsb; hlt
    let mut code = vec![0x48, 0xc7, 0xc7, 0x10, 0x10, 0x40, 0x00, 0xb9, 4, 0, 0, 0];
    code.extend([0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    code.extend([0xf3, 0x48, 0xab]);
    code.extend([
        0x48, 0xc7, 0xc6, 0x10, 0x10, 0x40, 0x00, 0x48, 0xc7, 0xc7, 0x00, 0x11, 0x40, 0x00,
    ]);
    code.extend([0xb9, 32, 0, 0, 0, 0xf3, 0xa4, 0xf4]);
    let g = SoftGuest::new(&code);
    let mut t = g.translator_with(true);
    // Twice: the first run's TLB misses restart each string instruction in the engine; the
    // second finds both pages in the TLB and runs them in place.
    for round in 0..2 {
        t.state_mut().rip = CODE_VA;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        assert_eq!(exit, Exit::Halt, "round {round}");
        let s = t.state();
        assert_eq!(
            (s.gpr[1], s.gpr[6], s.gpr[7]),
            (0, 0x40_1030, 0x40_1120),
            "round {round}: rcx rsi rdi"
        );
        for i in 0..4u64 {
            let pa = 0x6010 + 8 * i;
            // SAFETY: reading inside the RAM mapping.
            let (stored, copied) = unsafe {
                (
                    std::ptr::read_unaligned(g.ram.add(pa as usize) as *const u64),
                    std::ptr::read_unaligned(g.ram.add(pa as usize + 0xf0) as *const u64),
                )
            };
            assert_eq!(
                (stored, copied),
                (0x1122334455667788, 0x1122334455667788),
                "round {round}"
            );
        }
    }
    assert!(
        t.stats()
            .emulated_by_mnemonic
            .get(&iced_x86::Mnemonic::Stosq)
            .copied()
            .unwrap_or(0)
            <= 1,
        "{:?}",
        t.stats()
    );
}

#[test]
fn rep_movs_in_place_faults_on_its_source_first() {
    // mov rsi,0x402010; mov rdi,0x403010; mov ecx,32; rep movs; hlt — neither page is mapped.
    // The CPU reads [RSI] before it writes [RDI], so the read's #PF is the one reported (the
    // in-place path once looked the destination up first and reported the write's).
    for (movs, name) in [(&[0xf3, 0xa4][..], "rep movsb"), (&[0xf3, 0x48, 0xa5][..], "rep movsq")] {
        let mut code = vec![
            0x48, 0xc7, 0xc6, 0x10, 0x20, 0x40, 0x00, 0x48, 0xc7, 0xc7, 0x10, 0x30, 0x40, 0x00,
        ];
        code.extend([0xb9, 32, 0, 0, 0]);
        code.extend(movs);
        code.push(0xf4);
        let g = SoftGuest::new(&code);
        let mut t = g.translator();
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        let Exit::Exception(e) = exit else {
            panic!("{name}: {exit:?}")
        };
        assert_eq!(e.vector, vector::PF, "{name}");
        assert_eq!(e.address, Some(0x40_2010), "{name}: the source's fault");
        assert_eq!(e.error_code, Some(4), "{name}: a user-mode read of a non-present page");
        let s = t.state();
        assert_eq!(
            (s.rip, s.gpr[1]),
            (CODE_VA + 19, 32),
            "{name}: at the instruction, nothing copied"
        );
    }
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

#[test]
fn a_kicked_loop_that_keeps_scratch_registers_borrowed_gives_them_back() {
    use hbt_translator::host::signals::catch_kick;
    // L: add rax,[rsi]; inc rbx; jmp L — under the soft-MMU the lookup borrows scratch
    // registers the loop never names, and the back edge keeps them borrowed into the loop head
    // (`emit::emit_block`). A kick unlinks the back edge: its exit stub must give every one of
    // them its guest value back, and running again must link it to the head again.
    let code = [0x48, 0x03, 0x06, 0x48, 0xff, 0xc3, 0xeb, 0xf8];
    let kick = libc::SIGRTMIN() + 6;
    catch_kick(kick).unwrap();
    let g = SoftGuest::new(&code);
    g.write_u64(0x6000, 3);
    let mut t = g.translator();
    let sentinel = |n: usize| 0x5a5a_0000_0000_0000 | (n as u64) << 8;
    let s = t.state_mut();
    for n in [1, 2, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        s.gpr[n] = sentinel(n);
    }
    s.gpr[6] = 0x40_1000; // rsi
                          // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as u64;
    for round in 1..=2u64 {
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: signalling the test thread, which has a handler for `kick`.
            unsafe { libc::pthread_kill(me as libc::pthread_t, kick) };
        });
        let before = t.state().gpr[3];
        let exit = t.run(&mut HostPlatform, u64::MAX).unwrap();
        kicker.join().unwrap();
        assert!(matches!(exit, Exit::Interrupted), "round {round}: {exit:?}");
        let s = t.state();
        assert_eq!(s.rip, CODE_VA, "round {round}: stopped at the loop head");
        assert!(s.gpr[3] > before + 1000, "round {round}: the loop ran linked to itself");
        assert_eq!(s.gpr[0], 3 * s.gpr[3], "round {round}: every iteration added once");
        assert_eq!(s.gpr[6], 0x40_1000, "round {round}");
        for n in [1, 2, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            assert_eq!(s.gpr[n], sentinel(n), "round {round}: register {n} got its value back");
        }
    }
}

#[test]
fn flags_stay_live_across_soft_mmu_accesses_in_a_copy_loop() {
    // The shape of Linux's memmove loop: the flags of `sub` decide the `jae` after four
    // memory accesses (each a TLB lookup that must not disturb them), first with TLB misses.
    // L: sub rdx,0x20; mov r11,[rsi]; mov r10,[rsi+8]; lea rsi,[rsi+0x20]; mov [rdi],r11;
    //    mov [rdi+8],r10; lea rdi,[rdi+0x20]; lea rcx,[rcx+1]; jae L; hlt
    let code = [
        0x48, 0x83, 0xea, 0x20, 0x4c, 0x8b, 0x1e, 0x4c, 0x8b, 0x56, 0x08, 0x48, 0x8d, 0x76, 0x20, 0x4c, 0x89, 0x1f,
        0x4c, 0x89, 0x57, 0x08, 0x48, 0x8d, 0x7f, 0x20, 0x48, 0x8d, 0x49, 0x01, 0x73, 0xe0, 0xf4,
    ];
    for system in [false, true] {
        let g = SoftGuest::new(&code);
        for i in 0..64u64 {
            g.write_u64(0x6000 + 8 * i, 0x1000 + i);
        }
        let mut t = g.translator_with(system);
        let s = t.state_mut();
        s.gpr[2] = 0x100; // rdx: 8 full iterations, the 9th borrows
        s.gpr[6] = 0x40_1000; // rsi
        s.gpr[7] = 0x40_1400; // rdi
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        if system {
            assert_eq!(exit, Exit::Halt, "system mode");
        } else {
            assert!(gp_at(exit), "{exit:?}");
        }
        assert_eq!(t.state().gpr[1], 9, "iterations (system mode: {system})");
        // SAFETY: reading inside the RAM mapping.
        let copied = unsafe { std::ptr::read_unaligned(g.ram.add(0x6400 + 8 * 16) as *const u64) };
        assert_eq!(copied, 0x1000 + 16, "system mode: {system}");
    }
}

#[test]
fn flags_survive_split_accesses_in_a_copy_loop() {
    // Linux's memmove inner loop, with an unaligned source that crosses into a page that is
    // not physically adjacent (split accesses through the bounce buffer) while CF from `sub`
    // is live: L: sub rdx,0x20; mov r11,[rsi]; mov r10,[rsi+8]; mov r9,[rsi+16];
    // mov r8,[rsi+24]; lea rsi,[rsi+32]; mov [rdi],r11; mov [rdi+8],r10; mov [rdi+16],r9;
    // mov [rdi+24],r8; lea rdi,[rdi+32]; lea rcx,[rcx+1]; jae L; hlt
    let code = [
        0x48, 0x83, 0xea, 0x20, 0x4c, 0x8b, 0x1e, 0x4c, 0x8b, 0x56, 0x08, 0x4c, 0x8b, 0x4e, 0x10, 0x4c, 0x8b, 0x46,
        0x18, 0x48, 0x8d, 0x76, 0x20, 0x4c, 0x89, 0x1f, 0x4c, 0x89, 0x57, 0x08, 0x4c, 0x89, 0x4f, 0x10, 0x4c, 0x89,
        0x47, 0x18, 0x48, 0x8d, 0x7f, 0x20, 0x48, 0x8d, 0x49, 0x01, 0x73, 0xd0, 0xf4,
    ];
    // rsi: the 4th iteration's loads cross 0x405000, or the last one's (CF set then).
    for (system, rsi) in [
        (false, 0x40_4f92),
        (true, 0x40_4f92),
        (false, 0x40_4ef6),
        (true, 0x40_4ef6),
    ] {
        let g = SoftGuest::new(&code);
        let mut t = g.translator_with(system);
        let s = t.state_mut();
        s.gpr[2] = 0x100; // rdx: 8 full iterations, the 9th borrows
        s.gpr[6] = rsi;
        s.gpr[7] = 0x40_1000; // rdi
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        if system {
            assert_eq!(exit, Exit::Halt, "system mode");
        } else {
            assert!(gp_at(exit), "{exit:?}");
        }
        assert_eq!(t.state().gpr[1], 9, "iterations (system mode: {system}, rsi {rsi:#x})");
        assert!(t.stats().tlb_misses > 2, "{:?}", t.stats());
    }
}

/// A platform whose interrupt line rises at every `period`-th block boundary (vector 32).
struct TickingPlatform {
    period: u64,
    boundaries: u64,
    delivered: u64,
}

impl hbt_translator::Platform for TickingPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        HostPlatform.cpuid(leaf, subleaf)
    }
    fn rdtsc(&mut self) -> u64 {
        0
    }
    fn tsc_aux(&mut self) -> u32 {
        0
    }
    fn interrupt_pending(&mut self) -> bool {
        self.boundaries += 1;
        self.boundaries.is_multiple_of(self.period)
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.delivered += 1;
        Some(32)
    }
}

/// An interrupt line that stays up until the CPU takes it once (`LINE`, which translated code
/// may read: `Translator::set_interrupt_line`).
struct OneInterrupt {
    taken: bool,
}

static LINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl hbt_translator::Platform for OneInterrupt {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        HostPlatform.cpuid(leaf, subleaf)
    }
    fn rdtsc(&mut self) -> u64 {
        0
    }
    fn tsc_aux(&mut self) -> u32 {
        0
    }
    fn interrupt_pending(&mut self) -> bool {
        LINE.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.taken = true;
        LINE.store(false, std::sync::atomic::Ordering::SeqCst);
        Some(32)
    }
}

#[test]
fn an_inlined_sti_takes_a_waiting_interrupt_after_its_shadow() {
    // cli; nop; sti; mov ebx,1; mov ecx,2; hlt — with an interrupt waiting all along. The
    // handler (+0x100: mov rdx,rbx; mov r8,rcx; hlt) must run after `mov ebx,1` (sti's shadow)
    // and before `mov ecx,2`.
    let mut code = vec![0xfa, 0x90, 0xfb, 0xbb, 1, 0, 0, 0, 0xb9, 2, 0, 0, 0, 0xf4];
    code.resize(0x100, 0xcc);
    code.extend([0x48, 0x89, 0xda, 0x49, 0x89, 0xc8, 0xf4]);
    let g = SoftGuest::new(&code);
    let mut t = system_with_idt(&g, &[32], 0x100);
    t.state_mut().rflags &= !hbt_translator::state::flags::IF;
    LINE.store(true, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: a static.
    unsafe { t.set_interrupt_line(&LINE) };
    let mut platform = OneInterrupt { taken: false };
    let exit = t.run(&mut platform, BUDGET).unwrap();
    assert_eq!(exit, Exit::Halt);
    let s = t.state();
    assert!(platform.taken);
    assert_eq!((s.gpr[2], s.gpr[8]), (1, 0), "rbx and rcx as the handler saw them");
    assert_eq!(s.rip, CODE_VA + 0x107, "halted in the handler");
    assert!(
        !t.stats().emulated_by_mnemonic.contains_key(&iced_x86::Mnemonic::Sti),
        "sti was inlined: {:?}",
        t.stats()
    );
}

#[test]
fn interrupts_between_blocks_of_a_loop_keep_its_flags() {
    // The copy loop of `flags_survive_split_accesses_in_a_copy_loop` (its TLB misses split the
    // body into several blocks), interrupted at block boundaries by a handler that clobbers
    // the flags (`xor eax,eax` clears CF) before `iretq`: CF from `sub` must come back.
    let mut code = vec![
        0x48, 0x83, 0xea, 0x20, 0x4c, 0x8b, 0x1e, 0x4c, 0x8b, 0x56, 0x08, 0x4c, 0x8b, 0x4e, 0x10, 0x4c, 0x8b, 0x46,
        0x18, 0x48, 0x8d, 0x76, 0x20, 0x4c, 0x89, 0x1f, 0x4c, 0x89, 0x57, 0x08, 0x4c, 0x89, 0x4f, 0x10, 0x4c, 0x89,
        0x47, 0x18, 0x48, 0x8d, 0x7f, 0x20, 0x48, 0x8d, 0x49, 0x01, 0x73, 0xd0, 0xfa, 0xf4,
    ];
    code.resize(0x100, 0xcc);
    code.extend([0x31, 0xc0, 0x48, 0xcf]); // handler at +0x100: xor eax,eax; iretq
    for period in [2u64, 3, 5, 7] {
        let g = SoftGuest::new(&code);
        let mut t = system_with_idt(&g, &[32], 0x100);
        let s = t.state_mut();
        s.gpr[2] = 0x100;
        s.gpr[6] = 0x40_4f92;
        s.gpr[7] = 0x40_1000;
        let mut platform = TickingPlatform {
            period,
            boundaries: 0,
            delivered: 0,
        };
        let exit = t.run(&mut platform, BUDGET).unwrap();
        assert_eq!(exit, Exit::Halt, "period {period}");
        assert!(platform.delivered > 0, "period {period}: no interrupt delivered");
        assert_eq!(
            t.state().gpr[1],
            9,
            "iterations with an interrupt every {period} boundaries"
        );
    }
}

#[test]
fn a_copy_loop_entered_past_its_head_keeps_the_borrow() {
    // Linux's memmove enters its loop through a first `sub` (L0) and loops back to the second
    // (L): with rdx = 0x39 the second `sub` borrows and `jae` must fall through at once.
    // L0: sub rdx,0x20; L: sub rdx,0x20; mov r11,[rsi]; mov r10,[rsi+8]; mov r9,[rsi+16];
    // mov r8,[rsi+24]; lea rsi,[rsi+32]; mov [rdi],r11; mov [rdi+8],r10; mov [rdi+16],r9;
    // mov [rdi+24],r8; lea rdi,[rdi+32]; lea rcx,[rcx+1]; jae L; hlt
    let code = [
        0x48, 0x83, 0xea, 0x20, 0x48, 0x83, 0xea, 0x20, 0x4c, 0x8b, 0x1e, 0x4c, 0x8b, 0x56, 0x08, 0x4c, 0x8b, 0x4e,
        0x10, 0x4c, 0x8b, 0x46, 0x18, 0x48, 0x8d, 0x76, 0x20, 0x4c, 0x89, 0x1f, 0x4c, 0x89, 0x57, 0x08, 0x4c, 0x89,
        0x4f, 0x10, 0x4c, 0x89, 0x47, 0x18, 0x48, 0x8d, 0x7f, 0x20, 0x48, 0x8d, 0x49, 0x01, 0x73, 0xd0, 0xf4,
    ];
    for system in [false, true] {
        let g = SoftGuest::new(&code);
        let mut t = g.translator_with(system);
        let s = t.state_mut();
        s.gpr[2] = 0x39;
        s.gpr[6] = 0x40_1002;
        s.gpr[7] = 0x40_1000;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        if system {
            assert_eq!(exit, Exit::Halt, "system mode");
        } else {
            assert!(gp_at(exit), "{exit:?}");
        }
        assert_eq!(t.state().gpr[2], (-7i64) as u64, "rdx (system mode: {system})");
        assert_eq!(t.state().gpr[1], 1, "one pass (system mode: {system})");
    }
}

#[test]
fn linux_memmove_head_keeps_the_borrow_of_its_loop() {
    // The first 0x64 bytes of Linux 6.1's memmove (Debian 6.1.0-57 cloud kernel), up to the
    // loop's `jae`, then `hlt`: the entry block runs through several taken and untaken
    // conditional branches into the copy loop. With 0x39 bytes the loop's `sub` borrows on
    // the first pass.
    let mut code = vec![
        0x48, 0x89, 0xf8, 0x48, 0x39, 0xfe, 0x7d, 0x0f, 0x49, 0x89, 0xf0, 0x49, 0x01, 0xd0, 0x49, 0x39, 0xf8, 0x0f,
        0x8f, 0xa9, 0x00, 0x00, 0x00, 0x48, 0x83, 0xfa, 0x20, 0x0f, 0x82, 0xf5, 0x00, 0x00, 0x00, 0x90, 0x90, 0x90,
        0x90, 0x90, 0x48, 0x81, 0xfa, 0xa8, 0x02, 0x00, 0x00, 0x72, 0x05, 0x40, 0x38, 0xfe, 0x74, 0x3c, 0x48, 0x83,
        0xea, 0x20, 0x48, 0x83, 0xea, 0x20, 0x4c, 0x8b, 0x1e, 0x4c, 0x8b, 0x56, 0x08, 0x4c, 0x8b, 0x4e, 0x10, 0x4c,
        0x8b, 0x46, 0x18, 0x48, 0x8d, 0x76, 0x20, 0x4c, 0x89, 0x1f, 0x4c, 0x89, 0x57, 0x08, 0x4c, 0x89, 0x4f, 0x10,
        0x4c, 0x89, 0x47, 0x18, 0x48, 0x8d, 0x7f, 0x20, 0x73, 0xd4,
    ];
    code.push(0xf4);
    code.resize(0x200, 0xcc);
    for system in [false, true] {
        let g = SoftGuest::new(&code);
        let mut t = g.translator_with(system);
        let s = t.state_mut();
        s.gpr[2] = 0x39;
        s.gpr[6] = 0x40_1002;
        s.gpr[7] = 0x40_1000;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        if system {
            assert_eq!(exit, Exit::Halt, "system mode");
        } else {
            assert!(gp_at(exit), "{exit:?}");
        }
        // User mode: #GP at `hlt`; system mode: halted after it.
        assert_eq!(t.state().rip, CODE_VA + 0x64 + system as u64, "system mode: {system}");
        assert_eq!(t.state().gpr[2], (-7i64) as u64, "rdx (system mode: {system})");
    }
}

#[test]
fn linux_memmove_head_takes_the_short_copy_branch() {
    // As above with 0x19 bytes: `cmp rdx,0x20; jb rel32` must branch to the short-copy tail
    // (offset 0x116, a `hlt` here).
    let mut code = vec![
        0x48, 0x89, 0xf8, 0x48, 0x39, 0xfe, 0x7d, 0x0f, 0x49, 0x89, 0xf0, 0x49, 0x01, 0xd0, 0x49, 0x39, 0xf8, 0x0f,
        0x8f, 0xa9, 0x00, 0x00, 0x00, 0x48, 0x83, 0xfa, 0x20, 0x0f, 0x82, 0xf5, 0x00, 0x00, 0x00, 0x90, 0x90, 0x90,
        0x90, 0x90, 0x48, 0x81, 0xfa, 0xa8, 0x02, 0x00, 0x00, 0x72, 0x05, 0x40, 0x38, 0xfe, 0x74, 0x3c, 0x48, 0x83,
        0xea, 0x20,
    ];
    code.resize(0x200, 0xcc);
    code[0x116] = 0xf4;
    for system in [false, true] {
        let g = SoftGuest::new(&code);
        let mut t = g.translator_with(system);
        let s = t.state_mut();
        s.gpr[2] = 0x19;
        s.gpr[6] = 0x40_1002;
        s.gpr[7] = 0x40_1000;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        assert_eq!(
            t.state().rip,
            CODE_VA + 0x116 + system as u64,
            "{exit:?} system mode: {system}"
        );
    }
}

#[test]
fn xsetbv_retranslates_the_xsave_family_for_the_new_xcr0() {
    // CPL0: xor ecx,ecx; xor edx,edx; mov eax,7; xsetbv; mov edi,0x401000; xrstor64 [rdi]; hlt
    // with a compacted x87|SSE|AVX image (XCOMP_BV = bit 63 | 7, XSTATE_BV = 0). Code
    // translated for the XCR0 before the xsetbv (x87|SSE) would refuse the AVX bit with #GP.
    if hbt_translator::cpu::xsave::XsaveLayout::host().managed() & 0x4 == 0 {
        panic!("this test needs a host with AVX (XCR0 bit 2)");
    }
    let g = SoftGuest::new(&[
        0x31, 0xc9, 0x31, 0xd2, 0xb8, 7, 0, 0, 0, 0x0f, 0x01, 0xd1, 0xbf, 0x00, 0x10, 0x40, 0x00, 0x48, 0x0f, 0xae,
        0x2f, 0xf4,
    ]);
    g.write_u64(0x6000 + 520, (1 << 63) | 7);
    let mut t = g.translator_with(true);
    t.state_mut().xcr0 = 0x3;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert_eq!(exit, Exit::Halt, "{exit:?} at {:#x}", t.state().rip);
    assert_eq!(t.state().xcr0, 0x7);
}

#[test]
fn a_cr3_write_keeps_global_translations_and_a_pge_toggle_drops_them() {
    // 0x00: mov rax,[0x401000]; hlt
    // 0x10: mov rbx,cr3; mov cr3,rbx; mov rcx,[0x401000]; hlt
    // 0x20: mov rax,cr4; and rax,~0x80; mov cr4,rax; or rax,0x80; mov cr4,rax;
    //       mov rcx,[0x401000]; hlt
    let mut code = vec![0u8; 0x40];
    code[..9].copy_from_slice(&[0x48, 0x8b, 0x04, 0x25, 0x00, 0x10, 0x40, 0x00, 0xf4]);
    code[0x10..0x1f].copy_from_slice(&[
        0x0f, 0x20, 0xdb, 0x0f, 0x22, 0xdb, 0x48, 0x8b, 0x0c, 0x25, 0x00, 0x10, 0x40, 0x00, 0xf4,
    ]);
    code[0x20..0x3f].copy_from_slice(&[
        0x0f, 0x20, 0xe0, 0x48, 0x25, 0x7f, 0xff, 0xff, 0xff, 0x0f, 0x22, 0xe0, 0x48, 0x0d, 0x80, 0x00, 0x00, 0x00,
        0x0f, 0x22, 0xe0, 0x48, 0x8b, 0x0c, 0x25, 0x00, 0x10, 0x40, 0x00, 0xf4, 0x90,
    ]);
    const G: u64 = 1 << 8;
    for global in [false, true] {
        let g = SoftGuest::new(&code);
        let pte = 0x3000 + 8; // PT[1]: the data page 0x401000
        g.write_u64(pte, 0x6000 | 0b111 | if global { G } else { 0 });
        g.write_u64(0x6000, 0x1111);
        g.write_u64(0x8000, 0x2222);
        let mut t = g.translator_with(true);
        assert_ne!(t.state().cr4 & (1 << 7), 0, "PGE");
        let run = |t: &mut Translator, rip: u64| {
            t.state_mut().rip = CODE_VA + rip;
            let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
            assert_eq!(exit, Exit::Halt, "{exit:?} at {:#x}", t.state().rip);
        };
        run(&mut t, 0);
        assert_eq!(t.state().gpr[0], 0x1111);
        // The guest's page table now points the page elsewhere, without an INVLPG.
        g.write_u64(pte, 0x8000 | 0b111 | if global { G } else { 0 });
        run(&mut t, 0x10);
        let after_cr3 = if global { 0x1111 } else { 0x2222 };
        assert_eq!(t.state().gpr[1], after_cr3, "global={global}: after the CR3 write");
        run(&mut t, 0x20);
        assert_eq!(t.state().gpr[1], 0x2222, "global={global}: after toggling CR4.PGE");
    }
}

#[test]
fn a_chained_jump_into_another_page_does_not_outlive_a_cr3_write_that_remaps_that_page() {
    // A (0x400000): mov rbx,cr3; mov cr3,rbx; jmp 0x404000 (a block of its own, chained to B)
    //   0x10: mov rbx,cr3; mov cr3,rbx; hlt
    // B (0x404000): frame 0x7000 holds mov eax,1; hlt — frame 0xb000 mov eax,2; hlt.
    let mut code = vec![0x90u8; 0x20];
    code[..11].copy_from_slice(&[0x0f, 0x20, 0xdb, 0x0f, 0x22, 0xdb, 0xe9, 0xf5, 0x3f, 0x00, 0x00]);
    code[0x10..0x17].copy_from_slice(&[0x0f, 0x20, 0xdb, 0x0f, 0x22, 0xdb, 0xf4]);
    let g = SoftGuest::new(&code);
    for (frame, eax) in [(0x7000, 1u8), (0xb000, 2)] {
        for (i, b) in [0xb8, eax, 0, 0, 0, 0xf4].into_iter().enumerate() {
            g.write_u8(frame + i as u64, b);
        }
    }
    let pte_b = 0x3000 + 4 * 8;
    let mut t = g.translator_with(true);
    let run = |t: &mut Translator, rip: u64| {
        t.state_mut().rip = CODE_VA + rip;
        let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
        assert_eq!(exit, Exit::Halt, "{exit:?} at {:#x}", t.state().rip);
        t.state().gpr[0]
    };
    assert_eq!(run(&mut t, 0), 1);
    assert_eq!(run(&mut t, 0), 1);
    assert!(t.stats().chained > 0, "{:?}", t.stats());
    // B's page maps another frame (no INVLPG): the CR3 write must take the link away.
    g.write_u64(pte_b, 0xb000 | 0b111);
    assert_eq!(run(&mut t, 0), 2, "a chained jump reached code the page no longer maps");
    // Not present at a CR3 write, then the first frame again.
    g.write_u64(pte_b, 0);
    run(&mut t, 0x10);
    g.write_u64(pte_b, 0x7000 | 0b111);
    assert_eq!(run(&mut t, 0), 1);
    assert_eq!(run(&mut t, 0), 1);
}

#[test]
fn rf_restored_by_iretq_lasts_until_the_next_instruction_starts() {
    use hbt_translator::state::flags;
    // mov rax,rsp; push 0x18; push rax; push 0x10202 (RF|IF); push 0x10; lea rcx,[rip+3];
    // push rcx; iretq; then nop; nop; hlt. The interrupt handler at +0x100 takes the pushed
    // RFLAGS: mov rbx,[rsp+16]; hlt.
    let mut code = vec![
        0x48, 0x89, 0xe0, 0x6a, 0x18, 0x50, 0x68, 0x02, 0x02, 0x01, 0x00, 0x6a, 0x10, 0x48, 0x8d, 0x0d, 0x03, 0x00,
        0x00, 0x00, 0x51, 0x48, 0xcf, 0x90, 0x90, 0xf4,
    ];
    code.resize(0x100, 0xcc);
    code.extend([0x48, 0x8b, 0x5c, 0x24, 0x10, 0xf4]);
    // period 1: the interrupt comes right after iretq, before any instruction started (RF is
    // still set); period 2: after the two nops (RF was cleared as the first one started).
    for (period, rf) in [(1u64, flags::RF), (2, 0)] {
        let g = SoftGuest::new(&code);
        let mut t = system_with_idt(&g, &[32], 0x100);
        t.state_mut().rflags &= !flags::IF; // the iretq's frame sets it
        let mut platform = TickingPlatform {
            period,
            boundaries: 0,
            delivered: 0,
        };
        let exit = t.run(&mut platform, BUDGET).unwrap();
        assert_eq!(exit, Exit::Halt, "period {period}");
        assert_eq!(platform.delivered, 1, "period {period}");
        assert_eq!(
            t.state().gpr[3] & (flags::RF | flags::IF),
            rf | flags::IF,
            "period {period}: pushed RFLAGS"
        );
        assert_eq!(
            t.state().rflags & flags::RF,
            0,
            "period {period}: the handler runs with RF clear"
        );
    }
}

/// For `a_kick_stops_a_self_chained_loop_only_when_the_guest_can_take_an_interrupt`: the
/// interrupt line (raised by the kicking thread) and the embedder's stop request.
static KICK_IRQ: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static KICK_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct KickedPlatform;

impl hbt_translator::Platform for KickedPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        HostPlatform.cpuid(leaf, subleaf)
    }
    fn rdtsc(&mut self) -> u64 {
        0
    }
    fn tsc_aux(&mut self) -> u32 {
        0
    }
    fn interrupt_pending(&mut self) -> bool {
        KICK_IRQ.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        KICK_IRQ.store(false, std::sync::atomic::Ordering::SeqCst);
        Some(32)
    }
}

#[test]
fn a_kick_stops_a_self_chained_loop_only_when_the_guest_can_take_an_interrupt() {
    use hbt_translator::host::signals::catch_kick;
    use hbt_translator::state::{flags, DescriptorTable};
    use std::sync::atomic::Ordering;
    // L: inc rax; jmp L (chained to itself), with IF set and then clear. A device raises the
    // interrupt line and kicks the vCPU thread: with IF set the kick must unlink the loop so
    // the dispatcher delivers the interrupt (the handler at +0x100 is `hlt`); with IF clear
    // the chains stay (nothing could be delivered) and only the embedder's stop request,
    // checked by the kick handler, ends the run.
    let mut code = vec![0x48, 0xff, 0xc0, 0xeb, 0xfb];
    code.resize(0x100, 0xcc);
    code.push(0xf4);
    let kick = libc::SIGRTMIN() + 5;
    catch_kick(kick).unwrap();
    for interrupts_on in [true, false] {
        let g = SoftGuest::new(&code);
        g.write_u64(0x6800 + 0x10, 0x00af_9b00_0000_ffff);
        g.write_u64(0x6800 + 0x18, 0x00cf_9300_0000_ffff);
        let handler = CODE_VA + 0x100;
        let gate = 0x6a00 + 32 * 16;
        g.write_u64(
            gate,
            (handler & 0xffff) | (0x10 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48,
        );
        let mut t = g.translator_with(true);
        t.set_stop_check(|| KICK_STOP.load(Ordering::SeqCst));
        let s = t.state_mut();
        s.sys.gdtr = DescriptorTable {
            base: 0x40_1800,
            limit: 0x1f,
        };
        s.sys.idtr = DescriptorTable {
            base: 0x40_1a00,
            limit: 0x3ff,
        };
        s.gpr[4] = 0x40_1f00;
        if interrupts_on {
            s.rflags |= flags::IF;
        }
        KICK_IRQ.store(false, Ordering::SeqCst);
        KICK_STOP.store(false, Ordering::SeqCst);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        let kicker = std::thread::spawn(move || {
            let kick_me = || {
                // SAFETY: signalling the test thread, which has a handler for `kick`.
                unsafe { libc::pthread_kill(me as libc::pthread_t, kick) };
            };
            std::thread::sleep(std::time::Duration::from_millis(50));
            KICK_IRQ.store(true, Ordering::SeqCst);
            for _ in 0..20 {
                kick_me();
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Still looping: the embedder wants the run to end.
            KICK_STOP.store(true, Ordering::SeqCst);
            kick_me();
        });
        let mut exit = t.run(&mut KickedPlatform, u64::MAX).unwrap();
        while exit == Exit::Interrupted && !KICK_STOP.load(Ordering::SeqCst) {
            exit = t.run(&mut KickedPlatform, u64::MAX).unwrap();
        }
        kicker.join().unwrap();
        if interrupts_on {
            assert_eq!(exit, Exit::Halt, "the interrupt reached its handler");
            assert_eq!(t.state().rip, handler + 1);
        } else {
            assert_eq!(exit, Exit::Interrupted, "stopped only by the stop request");
            assert!(
                KICK_IRQ.load(Ordering::SeqCst),
                "the interrupt was not taken with IF clear"
            );
        }
        assert!(t.state().gpr[0] > 1000, "the loop ran translated");
    }
}

// Debugger support (`engine/debug.rs`): breakpoints and single-step.

/// A system-mode translator over `g` at CPL0 with a flat GDT (0x10 code, 0x18 data), an IDT
/// whose `vectors` all go to `CODE_VA + handler`, IF set and RSP at 0x401f00.
fn system_with_idt(g: &SoftGuest, vectors: &[u8], handler: u64) -> Translator {
    use hbt_translator::state::{flags, DescriptorTable};
    g.write_u64(0x6800 + 0x10, 0x00af_9b00_0000_ffff);
    g.write_u64(0x6800 + 0x18, 0x00cf_9300_0000_ffff);
    let handler = CODE_VA + handler;
    for &v in vectors {
        let gate = 0x6a00 + v as u64 * 16;
        g.write_u64(
            gate,
            (handler & 0xffff) | (0x10 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48,
        );
        g.write_u64(gate + 8, handler >> 32);
    }
    let mut t = g.translator_with(true);
    let s = t.state_mut();
    s.sys.gdtr = DescriptorTable {
        base: 0x40_1800,
        limit: 0x1f,
    };
    s.sys.idtr = DescriptorTable {
        base: 0x40_1a00,
        limit: 0x3ff,
    };
    s.rflags |= flags::IF;
    s.gpr[4] = 0x40_1f00;
    t
}

#[test]
fn a_breakpoint_splits_blocks_and_stops_every_iteration_of_a_chained_loop() {
    // 0x00: mov ecx,5; xor eax,eax; 0x07: L: inc rax; 0x0a: dec ecx; jnz L; hlt
    let g = SoftGuest::new(&[
        0xb9, 5, 0, 0, 0, 0x31, 0xc0, 0x48, 0xff, 0xc0, 0xff, 0xc9, 0x75, 0xf9, 0xf4,
    ]);
    let mut t = g.translator_with(true);
    // Translated and chained without a breakpoint first.
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    assert_eq!(t.state().gpr[0], 5);
    assert!(t.stats().chained > 0, "{:?}", t.stats());
    let invalidated = t.stats().invalidated_blocks;
    assert!(t.add_breakpoint(CODE_VA + 0x0a));
    assert!(!t.add_breakpoint(CODE_VA + 0x0a), "already set");
    assert!(
        t.stats().invalidated_blocks > invalidated,
        "blocks covering the breakpoint are dropped"
    );
    t.state_mut().rip = CODE_VA;
    let translated = t.stats().guest_instructions_translated;
    let mut stops = Vec::new();
    loop {
        match t.run(&mut HostPlatform, BUDGET).unwrap() {
            Exit::Breakpoint => {
                assert_eq!(t.state().rip, CODE_VA + 0x0a);
                if stops.is_empty() {
                    assert_eq!(
                        t.stats().guest_instructions_translated - translated,
                        3,
                        "the block from the entry ends before the breakpoint"
                    );
                }
                stops.push(t.state().gpr[0]);
                t.skip_breakpoint_at_rip();
            }
            Exit::Halt => break,
            other => panic!("{other:?} at {:#x}", t.state().rip),
        }
    }
    assert_eq!(stops, [1, 2, 3, 4, 5], "RAX at each stop: one per iteration");
    // Removed, the loop runs through.
    assert!(t.remove_breakpoint(CODE_VA + 0x0a));
    assert_eq!(t.breakpoints().count(), 0);
    t.state_mut().rip = CODE_VA;
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    assert_eq!(t.state().gpr[0], 5);
}

#[test]
fn single_step_stops_after_every_instruction_and_holds_interrupts() {
    // 0x00: mov ecx,3; 0x05: mov rdx,[0x401000]; 0x0d: L: add eax,ecx; 0x0f: dec ecx;
    // 0x11: jnz L; 0x13: hlt  — the load's TLB miss restarts it, which is not a step.
    let g = SoftGuest::new(&[
        0xb9, 3, 0, 0, 0, 0x48, 0x8b, 0x14, 0x25, 0x00, 0x10, 0x40, 0x00, 0x01, 0xc8, 0xff, 0xc9, 0x75, 0xfa, 0xf4,
    ]);
    g.write_u64(0x6000, 0x77);
    let mut t = g.translator_with(true);
    t.state_mut().rflags |= hbt_translator::state::flags::IF;
    t.set_single_step(true);
    // An interrupt is pending at every boundary; stepping must not take it.
    let mut platform = TickingPlatform {
        period: 1,
        boundaries: 0,
        delivered: 0,
    };
    let mut rips = Vec::new();
    let exit = loop {
        match t.run(&mut platform, BUDGET).unwrap() {
            Exit::Stepped => rips.push(t.state().rip - CODE_VA),
            other => break other,
        }
        assert!(rips.len() <= 20, "runaway: {rips:x?}");
    };
    assert_eq!(
        rips,
        [0x05, 0x0d, 0x0f, 0x11, 0x0d, 0x0f, 0x11, 0x0d, 0x0f, 0x11, 0x13],
        "one stop per instruction executed"
    );
    assert_eq!((exit, t.state().rip), (Exit::Halt, CODE_VA + 0x14), "a step over hlt");
    assert_eq!((t.state().gpr[0], t.state().gpr[2]), (6, 0x77));
    assert_eq!(platform.delivered, 0, "no interrupt taken while stepping");
    assert_eq!(t.stats().chained, 0, "nothing is chained while stepping");
}

#[test]
fn a_step_into_a_faulting_instruction_stops_at_the_handler() {
    // 0x00: mov rax,[0x402000] (not mapped: #PF); 0x10: ud2 (#UD)
    // 0x100: handler: mov ebx,7; hlt
    let mut code = vec![0x90; 0x105];
    code[..8].copy_from_slice(&[0x48, 0x8b, 0x04, 0x25, 0x00, 0x20, 0x40, 0x00]);
    code[0x10..0x12].copy_from_slice(&[0x0f, 0x0b]);
    code[0x100..0x105].copy_from_slice(&[0xbb, 7, 0, 0, 0]);
    code.push(0xf4);
    for (start, frame, cr2) in [(0x00u64, 48u64, Some(0x40_2000u64)), (0x10, 40, None)] {
        let g = SoftGuest::new(&code);
        let mut t = system_with_idt(&g, &[6, 14], 0x100);
        t.state_mut().rip = CODE_VA + start;
        t.set_single_step(true);
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Stepped);
        assert_eq!(t.state().rip, CODE_VA + 0x100, "at the handler's first instruction");
        assert_eq!(t.state().gpr[3], 0, "the handler has not run");
        assert_eq!(t.state().gpr[4], 0x40_1f00 - frame, "the exception frame is pushed");
        if let Some(cr2) = cr2 {
            assert_eq!(t.state().cr2, cr2);
        }
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Stepped);
        assert_eq!((t.state().rip, t.state().gpr[3]), (CODE_VA + 0x105, 7));
        // Not stepping, a breakpoint at the handler stops there after the delivery.
        let mut t = system_with_idt(&g, &[6, 14], 0x100);
        t.state_mut().rip = CODE_VA + start;
        t.add_breakpoint(CODE_VA + 0x100);
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Breakpoint);
        assert_eq!((t.state().rip, t.state().gpr[3]), (CODE_VA + 0x100, 0));
    }
}

#[test]
fn resuming_from_a_breakpoint_runs_its_instruction_once_even_when_it_restarts() {
    // 0x00: mov rdx,[0x401000]; 0x08: inc rax; 0x0b: jmp 0x0b
    let g = SoftGuest::new(&[
        0x48, 0x8b, 0x14, 0x25, 0x00, 0x10, 0x40, 0x00, 0x48, 0xff, 0xc0, 0xeb, 0xfe,
    ]);
    g.write_u64(0x6000, 0x55);
    let mut t = g.translator_with(true);
    t.add_breakpoint(CODE_VA);
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Breakpoint);
    assert_eq!((t.state().rip, t.state().gpr[2]), (CODE_VA, 0), "nothing ran");
    // The load misses the (empty) TLB and restarts: still one execution, no second stop.
    t.skip_breakpoint_at_rip();
    t.add_breakpoint(CODE_VA + 0x0b);
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Breakpoint);
    assert!(t.stats().tlb_misses > 0, "{:?}", t.stats());
    assert_eq!(t.state().rip, CODE_VA + 0x0b, "went on to the next breakpoint");
    assert_eq!((t.state().gpr[2], t.state().gpr[0]), (0x55, 1));
    // A loop onto itself stops again after one round.
    for _ in 0..3 {
        t.skip_breakpoint_at_rip();
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Breakpoint);
        assert_eq!(t.state().rip, CODE_VA + 0x0b);
    }
}

// CPL0 forms KVM cannot serve as reference for on kvm_pvm (`hbt isa-test --system --cpl0`
// lists them: KVM's instruction emulator fails, or does something else than the CPU). Those a
// Linux boot uses are checked here instead, against the SDM.

/// The guest-physical address of a data-page virtual address (0x401000 -> 0x6000).
fn data_pa(va: u64) -> u64 {
    assert_eq!(va >> 12, 0x401, "{va:#x} is not in the data page");
    0x6000 + (va & 0xfff)
}

/// `system_with_idt` plus user code and data segments (0x33, 0x2b) and a TSS whose RSP0 is
/// 0x401f80, so CPL3 code can fault back to CPL0.
fn system_with_user_segments(g: &SoftGuest, vectors: &[u8], handler: u64) -> Translator {
    use hbt_translator::state::Segment;
    g.write_u64(0x6800 + 0x28, 0x00cf_f300_0000_ffff);
    g.write_u64(0x6800 + 0x30, 0x00af_fb00_0000_ffff);
    g.write_u64(0x6c00 + 4, 0x40_1f80);
    let mut t = system_with_idt(g, vectors, handler);
    let s = t.state_mut();
    s.sys.gdtr.limit = 0x4f;
    s.sys.tr = Segment {
        selector: 0x40,
        base: 0x40_1c00,
        limit: 0x67,
        attr: 0x8b,
    };
    t
}

/// `system_with_user_segments` about to run a `sysret` at CODE_VA into CPL3 code at `target`
/// (RCX) with RFLAGS `rflags` (R11): EFER.SCE set, STAR's user selectors 0x23/0x2b/0x33.
fn system_returning_to_user(g: &SoftGuest, vectors: &[u8], target: u64, rflags: u64) -> Translator {
    let mut t = system_with_user_segments(g, vectors, 0x100);
    let s = t.state_mut();
    s.efer |= 1; // SCE
    s.sys.msr.star = 0x0023_0010u64 << 32;
    s.gpr[1] = target;
    s.gpr[11] = rflags;
    t
}

#[test]
fn lretq_at_cpl0_reloads_cs_and_returns_to_cpl3_on_the_frame_s_stack() {
    // lea rax,[rip+5]; push 0x10; push rax; lretq        (Linux's head_64.S reloads CS so)
    // mov ebx,0x1111; push 0x2b; push 0x401e00; push 0x33; lea rax,[rip+3]; push rax; lretq
    // hlt (at CPL3: #GP(0) to the handler at +0x100)
    let mut code = vec![
        0x48, 0x8d, 0x05, 0x05, 0x00, 0x00, 0x00, 0x6a, 0x10, 0x50, 0x48, 0xcb, 0xbb, 0x11, 0x11, 0x00, 0x00, 0x6a,
        0x2b, 0x68, 0x00, 0x1e, 0x40, 0x00, 0x6a, 0x33, 0x48, 0x8d, 0x05, 0x03, 0x00, 0x00, 0x00, 0x50, 0x48, 0xcb,
        0xf4,
    ];
    code.resize(0x100, 0xcc);
    code.push(0xf4);
    let g = SoftGuest::new(&code);
    let mut t = system_with_user_segments(&g, &[13], 0x100);
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    assert_eq!(t.state().gpr[3], 0x1111, "the same-level return went on");
    assert_eq!(t.state().rip, CODE_VA + 0x101, "in the #GP handler");
    // #GP(0) from the hlt at CPL3, on RSP0: error code, RIP, CS, RFLAGS, RSP, SS.
    let frame = t.state().gpr[4];
    assert_eq!(frame, 0x40_1f80 - 48);
    let word = |i: u64| g.read_u64(data_pa(frame + 8 * i));
    assert_eq!(
        [word(0), word(1), word(2), word(4), word(5)],
        [0, CODE_VA + 0x24, 0x33, 0x40_1e00, 0x2b]
    );
}

#[test]
fn int3_int1_and_int_n_at_cpl0_deliver_through_the_idt_after_the_instruction() {
    // +0x00: int3; hlt   +0x10: int1; hlt   +0x20: int 0x20; hlt   handler at +0x100: hlt
    let mut code = vec![0u8; 0x100];
    code[..2].copy_from_slice(&[0xcc, 0xf4]);
    code[0x10..0x12].copy_from_slice(&[0xf1, 0xf4]);
    code[0x20..0x23].copy_from_slice(&[0xcd, 0x20, 0xf4]);
    code.push(0xf4);
    for (start, len) in [(0u64, 1u64), (0x10, 1), (0x20, 2)] {
        let g = SoftGuest::new(&code);
        let mut t = system_with_idt(&g, &[1, 3, 0x20], 0x100);
        t.state_mut().rip = CODE_VA + start;
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt, "at +{start:#x}");
        assert_eq!(t.state().rip, CODE_VA + 0x101, "at +{start:#x}: in the handler");
        // Same privilege: RIP (after the instruction), CS, RFLAGS, RSP, SS on the stack.
        let frame = t.state().gpr[4];
        assert_eq!(frame, 0x40_1f00 - 40, "at +{start:#x}");
        let word = |i: u64| g.read_u64(data_pa(frame + 8 * i));
        assert_eq!(
            [word(0), word(1), word(3), word(4)],
            [CODE_VA + start + len, 0x10, 0x40_1f00, 0x18]
        );
        assert_ne!(word(2) & (1 << 9), 0, "at +{start:#x}: the pushed RFLAGS has IF");
    }
}

#[test]
fn rdpid_and_rdtscp_at_cpl0_read_the_tsc_aux_wrmsr_wrote() {
    // mov ecx,0xc0000103; mov eax,0x1234; xor edx,edx; wrmsr; rdpid rax; mov rbx,rax; rdtscp; hlt
    // +0x20: mov ecx,0xc0000103; mov edx,1; wrmsr; hlt   (bits 63:32 of TSC_AUX: #GP(0))
    let mut code = vec![
        0xb9, 0x03, 0x01, 0x00, 0xc0, 0xb8, 0x34, 0x12, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0xf3, 0x0f, 0xc7, 0xf8,
        0x48, 0x89, 0xc3, 0x0f, 0x01, 0xf9, 0xf4,
    ];
    code.resize(0x20, 0);
    code.extend([
        0xb9, 0x03, 0x01, 0x00, 0xc0, 0xba, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x30, 0xf4,
    ]);
    code.resize(0x100, 0xcc);
    code.push(0xf4);
    let g = SoftGuest::new(&code);
    let mut t = system_with_idt(&g, &[13], 0x100);
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    assert_eq!(t.state().rip, CODE_VA + 0x19);
    assert_eq!((t.state().gpr[3], t.state().gpr[1]), (0x1234, 0x1234), "rdpid, rdtscp");
    t.state_mut().rip = CODE_VA + 0x20;
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    assert_eq!(t.state().rip, CODE_VA + 0x101, "#GP(0)");
    assert_eq!(t.state().sys.msr.tsc_aux, 0x1234, "unchanged");
}

#[test]
fn xgetbv_and_xsetbv_at_cpl0_need_cr4_osxsave() {
    // +0x00: xor ecx,ecx; xgetbv; hlt   +0x10: xor ecx,ecx; xor edx,edx; mov eax,3; xsetbv; hlt
    let mut code = vec![0x31, 0xc9, 0x0f, 0x01, 0xd0, 0xf4];
    code.resize(0x10, 0);
    code.extend([
        0x31, 0xc9, 0x31, 0xd2, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x0f, 0x01, 0xd1, 0xf4,
    ]);
    code.resize(0x100, 0xcc);
    code.push(0xf4);
    const OSXSAVE: u64 = 1 << 18;
    for osxsave in [true, false] {
        for start in [0u64, 0x10] {
            let g = SoftGuest::new(&code);
            let mut t = system_with_idt(&g, &[6], 0x100);
            let xcr0 = t.state().xcr0;
            t.state_mut().rip = CODE_VA + start;
            if !osxsave {
                t.state_mut().cr4 &= !OSXSAVE;
            }
            assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
            if osxsave {
                assert_eq!(
                    t.state().rip,
                    CODE_VA + start + 6 + 7 * (start / 0x10),
                    "+{start:#x} ran"
                );
                if start == 0 {
                    assert_eq!(t.state().gpr[0], xcr0 & 0xffff_ffff, "xgetbv reads XCR0");
                } else {
                    assert_eq!(t.state().xcr0, 3, "xsetbv wrote XCR0");
                }
            } else {
                assert_eq!(t.state().rip, CODE_VA + 0x101, "+{start:#x}: #UD without CR4.OSXSAVE");
                assert_eq!(t.state().xcr0, xcr0);
            }
        }
    }
}

#[test]
fn lar_lsl_verr_verw_at_cpl0_read_the_guest_gdt() {
    // mov eax,0x18; lar rbx,rax; lsl rcx,rax; mov eax,0x40; lar rdx,rax; lsl rsi,rax;
    // mov eax,0x38; verr ax; sete r8b; mov eax,0x28; verw ax; sete r9b; mov eax,0x50;
    // lar r10,rax; sete r11b; hlt
    let g = SoftGuest::new(&[
        0xb8, 0x18, 0x00, 0x00, 0x00, 0x48, 0x0f, 0x02, 0xd8, 0x48, 0x0f, 0x03, 0xc8, 0xb8, 0x40, 0x00, 0x00, 0x00,
        0x48, 0x0f, 0x02, 0xd0, 0x48, 0x0f, 0x03, 0xf0, 0xb8, 0x38, 0x00, 0x00, 0x00, 0x0f, 0x00, 0xe0, 0x41, 0x0f,
        0x94, 0xc0, 0xb8, 0x28, 0x00, 0x00, 0x00, 0x0f, 0x00, 0xe8, 0x41, 0x0f, 0x94, 0xc1, 0xb8, 0x50, 0x00, 0x00,
        0x00, 0x4c, 0x0f, 0x02, 0xd0, 0x41, 0x0f, 0x94, 0xc3, 0xf4,
    ]);
    // 0x38: execute-only 64-bit code; 0x40: a busy 64-bit TSS (16 bytes). The limit is 0x4f.
    g.write_u64(0x6800 + 0x38, 0x00af_9900_0000_ffff);
    g.write_u64(0x6800 + 0x40, 0x0000_8b00_4010_0067);
    let mut t = system_with_user_segments(&g, &[], 0x100);
    t.state_mut().gpr[10] = 0x5555;
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    let r = t.state().gpr;
    // lar keeps the limit's bits 19:16 (0xf here), as the CPU does.
    assert_eq!(
        (r[3], r[1]),
        (0x00cf_9300, 0xffff_ffff),
        "lar/lsl of the kernel data segment"
    );
    assert_eq!((r[2], r[6]), (0x0000_8b00, 0x67), "lar/lsl of the busy TSS");
    assert_eq!(r[8] & 0xff, 0, "verr: execute-only code is not readable");
    assert_eq!(r[9] & 0xff, 1, "verw: DPL 3 data is writable from CPL0");
    assert_eq!(
        (r[10], r[11] & 0xff),
        (0x5555, 0),
        "lar past the GDT limit: ZF clear, nothing loaded"
    );
}

#[test]
fn rex_w_far_pointers_at_cpl0_follow_the_host_vendor() {
    use hbt_translator::cpu::vendor::{host_has, Quirk};
    // mov eax,0x401100; lss rbx,[rax]; lfs rcx,[rax]; lgs rdx,[rax]; hlt
    let g = SoftGuest::new(&[
        0xb8, 0x00, 0x11, 0x40, 0x00, 0x48, 0x0f, 0xb2, 0x18, 0x48, 0x0f, 0xb4, 0x08, 0x48, 0x0f, 0xb5, 0x10, 0xf4,
    ]);
    // m16:32 is offset 0x44332211, selector 0x18 at +4; m16:64 is offset 0x18_4433_2211,
    // selector 0x18 at +8. KVM's emulator reads m16:64 whatever the CPU, so `isa-test --system
    // --cpl0` cannot compare these on AMD (src/vmm/isa_system.rs).
    g.write_u64(data_pa(0x40_1100), 0x0000_0018_4433_2211);
    g.write_u64(data_pa(0x40_1108), 0x18);
    let mut t = system_with_idt(&g, &[13], 0x100);
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    let s = t.state();
    let offset = if host_has(Quirk::FarPointerIgnoresRexW) {
        0x4433_2211
    } else {
        0x18_4433_2211
    };
    assert_eq!(
        (s.gpr[3], s.gpr[1], s.gpr[2]),
        (offset, offset, offset),
        "lss/lfs/lgs offsets"
    );
    assert_eq!((s.seg[2], s.seg[4], s.seg[5]), (0x18, 0x18, 0x18), "SS, FS, GS");
}

#[test]
fn ud0_ud1_xsaves_and_xrstors_raise_ud_at_cpl0() {
    // +0x00: ud1 eax,[rax]  +0x08: ud0 eax,[rax]  +0x10: xsaves [rax] (the model has no XSAVES)
    // +0x20: xrstors [rax]
    let mut code = vec![0u8; 0x100];
    code[..4].copy_from_slice(&[0x0f, 0xb9, 0x00, 0xf4]);
    code[8..12].copy_from_slice(&[0x0f, 0xff, 0x00, 0xf4]);
    code[0x10..0x14].copy_from_slice(&[0x0f, 0xc7, 0x28, 0xf4]);
    code[0x20..0x24].copy_from_slice(&[0x0f, 0xc7, 0x18, 0xf4]);
    code.push(0xf4);
    for start in [0u64, 8, 0x10, 0x20] {
        let g = SoftGuest::new(&code);
        let mut t = system_with_idt(&g, &[6], 0x100);
        t.state_mut().rip = CODE_VA + start;
        t.state_mut().gpr[0] = 0x40_1000;
        t.state_mut().gpr[1] = 0x7fff_0000_1000;
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
        assert_eq!(t.state().rip, CODE_VA + 0x101, "+{start:#x}: #UD");
        let frame = t.state().gpr[4];
        assert_eq!(
            g.read_u64(data_pa(frame)),
            CODE_VA + start,
            "+{start:#x}: a fault, at the instruction"
        );
    }
}

#[test]
fn sysretl_enters_32_bit_code_which_decodes_as_ia32() {
    // sysretl (no REX.W) at +0: CS = STAR[63:48] | 3, EIP = ECX (its upper half dropped),
    // RFLAGS from R11. At +0x40: `inc eax; hlt` as 32-bit code (0x40 is `inc eax` there, a
    // REX prefix in 64-bit mode): the hlt is #GP(0) at CPL3, delivered through the TSS's RSP0
    // to the handler's hlt at +0x100, with the 32-bit CS and EIP in the frame.
    let mut code = vec![0u8; 0x100];
    code[..3].copy_from_slice(&[0x0f, 0x07, 0xf4]);
    code[0x40..0x42].copy_from_slice(&[0x40, 0xf4]);
    code.push(0xf4);
    let g = SoftGuest::new(&code);
    let mut t = system_returning_to_user(&g, &[13], 0xffff_ffff_0000_0000 | (CODE_VA + 0x40), 0x202);
    t.state_mut().gpr[0] = 41;
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    assert_eq!(t.state().rip, CODE_VA + 0x101, "at the #GP handler");
    assert_eq!(t.state().gpr[0], 42, "0x40 ran as `inc eax`");
    assert!(!t.state().code32, "the handler's code segment is 64-bit");
    let frame = t.state().gpr[4];
    let slot = |i: u64| g.read_u64(data_pa(frame + 8 * i));
    assert_eq!(slot(0), 0, "#GP(0)");
    assert_eq!(slot(1), CODE_VA + 0x41, "the frame's RIP: the hlt");
    assert_eq!(slot(2), 0x23, "the frame's CS: STAR[63:48] with RPL 3");
}

#[test]
fn the_trap_flag_raises_a_single_step_trap_after_each_user_instruction() {
    // sysretq (R11 = IF | TF) into `nop; nop; hlt` at CPL3 (+0x40): #DB after the first nop
    // (TF is set as the nop starts, not as sysretq does), to the handler's hlt at +0x100, with
    // the nop's successor in the frame, TF in the frame's RFLAGS and DR6.BS set. A `syscall`
    // (+0x50) under TF enters LSTAR (+0x80: hlt at CPL0) with no trap: IA32_FMASK clears TF.
    let mut code = vec![0u8; 0x100];
    code[..3].copy_from_slice(&[0x48, 0x0f, 0x07]);
    code[0x40..0x43].copy_from_slice(&[0x90, 0x90, 0xf4]);
    code[0x50..0x52].copy_from_slice(&[0x0f, 0x05]);
    code[0x80] = 0xf4;
    code.push(0xf4);
    for (at, syscall) in [(0x40u64, false), (0x50, true)] {
        let g = SoftGuest::new(&code);
        let mut t = system_returning_to_user(&g, &[1, 13], CODE_VA + at, 0x302);
        let s = t.state_mut();
        s.sys.msr.lstar = CODE_VA + 0x80;
        s.sys.msr.sfmask = 0x4_7700;
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
        let st = t.state();
        if syscall {
            assert_eq!(st.rip, CODE_VA + 0x81, "at LSTAR's hlt");
            assert_eq!(st.sys.dr[6] & (1 << 14), 0, "no single-step trap");
            continue;
        }
        assert_eq!(st.rip, CODE_VA + 0x101, "in the #DB handler");
        assert_ne!(st.sys.dr[6] & (1 << 14), 0, "DR6.BS");
        let frame = st.gpr[4];
        let slot = |i: u64| g.read_u64(data_pa(frame + 8 * i));
        assert_eq!(slot(0), CODE_VA + 0x41, "the frame's RIP: after the first nop");
        assert_eq!(slot(1), 0x33);
        assert_ne!(slot(2) & 0x100, 0, "TF in the frame's RFLAGS");
    }
}

#[test]
fn a_data_breakpoint_traps_after_the_store_that_hits_it() {
    // DR0 = 0x401800, 4 bytes, writes (DR7: L0, R/W 01, LEN 11). sysretq into CPL3 at +0x40:
    // a store to 0x401810 (a neighbour on the same page: no hit, and the page must not enter
    // the TLB for the next store), a store of EBX to 0x401800 (the hit), a nop and a hlt. #DB goes to the handler's hlt at +0x100 with the store's successor in the
    // frame and DR6.B0 set; the store is done.
    let mut code = vec![0u8; 0x100];
    code[..3].copy_from_slice(&[0x48, 0x0f, 0x07]);
    let user = [
        0x89, 0x0c, 0x25, 0x10, 0x18, 0x40, 0x00, // mov [0x401810], ecx
        0x89, 0x1c, 0x25, 0x00, 0x18, 0x40, 0x00, // mov [0x401800], ebx
        0x90, 0xf4,
    ];
    code[0x40..0x40 + user.len()].copy_from_slice(&user);
    code.push(0xf4);
    let g = SoftGuest::new(&code);
    let mut t = system_returning_to_user(&g, &[1, 13, 14], CODE_VA + 0x40, 0x202);
    let s = t.state_mut();
    s.sys.dr[0] = 0x40_1800;
    s.sys.dr[7] = 0x400 | 1 | (0b01 | 0b11 << 2) << 16;
    s.gpr[3] = 0x1234_5678;
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    let st = t.state();
    assert_eq!(st.rip, CODE_VA + 0x101, "in the #DB handler");
    assert_eq!(st.sys.dr[6] & 0xf, 1, "DR6.B0");
    let frame = st.gpr[4];
    let slot = |i: u64| g.read_u64(data_pa(frame + 8 * i));
    assert_eq!(slot(0), CODE_VA + 0x4e, "the frame's RIP: after the store");
    assert_eq!(g.read_u64(data_pa(0x40_1800)) as u32, 0x1234_5678, "the store was done");
}

#[test]
fn cpuid_faulting_makes_a_user_cpuid_raise_gp() {
    // sysretq into `cpuid; hlt` at CPL3 (+0x40). With MSR_MISC_FEATURES_ENABLES bit 0 set the
    // cpuid raises #GP(0) (the frame's RIP: the cpuid); without, it runs and the hlt raises it.
    let mut code = vec![0u8; 0x100];
    code[..3].copy_from_slice(&[0x48, 0x0f, 0x07]);
    code[0x40..0x43].copy_from_slice(&[0x0f, 0xa2, 0xf4]);
    code.push(0xf4);
    for (faulting, at) in [(1u64, 0x40u64), (0, 0x42)] {
        let g = SoftGuest::new(&code);
        let mut t = system_returning_to_user(&g, &[13], CODE_VA + 0x40, 0x202);
        t.state_mut().sys.msr.misc_features_enables = faulting;
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
        let st = t.state();
        assert_eq!(st.rip, CODE_VA + 0x101, "in the #GP handler");
        let frame = st.gpr[4];
        let slot = |i: u64| g.read_u64(data_pa(frame + 8 * i));
        assert_eq!((slot(0), slot(1)), (0, CODE_VA + at), "faulting {faulting}");
    }
}

#[test]
fn system_calls_from_32_bit_code_follow_the_host_vendor() {
    // sysretl into 32-bit code at +0x40 (`syscall`) or +0x50 (`sysenter`). On AMD, `syscall`
    // from 32-bit code enters CSTAR (+0x80: hlt at CPL0) with RCX the next EIP, and `sysenter`
    // raises #UD in long mode; on Intel, `syscall` raises #UD there and `sysenter` enters
    // SYSENTER_EIP (+0x90) with RSP = SYSENTER_ESP. #UD goes to the handler's hlt at +0x100.
    use hbt_translator::cpu::vendor::Vendor;
    let intel = Vendor::host() == Vendor::Intel;
    let mut code = vec![0u8; 0x100];
    code[..3].copy_from_slice(&[0x0f, 0x07, 0xf4]);
    code[0x40..0x42].copy_from_slice(&[0x0f, 0x05]);
    code[0x50..0x52].copy_from_slice(&[0x0f, 0x34]);
    code[0x80] = 0xf4;
    code[0x90] = 0xf4;
    code.push(0xf4);
    for (at, sysenter) in [(0x40u64, false), (0x50, true)] {
        let g = SoftGuest::new(&code);
        let mut t = system_returning_to_user(&g, &[6], CODE_VA + at, 0x202);
        let s = t.state_mut();
        s.sys.msr.cstar = CODE_VA + 0x80;
        s.sys.msr.lstar = CODE_VA + 0xa0;
        s.sys.msr.sysenter_cs = 0x10;
        s.sys.msr.sysenter_eip = CODE_VA + 0x90;
        s.sys.msr.sysenter_esp = 0x40_1e00;
        assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
        let st = t.state();
        assert!(!st.code32, "+{at:#x}: CPL0 code is 64-bit");
        let entered = if sysenter { intel } else { !intel };
        if !entered {
            assert_eq!(st.rip, CODE_VA + 0x101, "+{at:#x}: #UD");
            assert_eq!(
                g.read_u64(data_pa(st.gpr[4])),
                CODE_VA + at,
                "+{at:#x}: at the instruction"
            );
        } else if sysenter {
            assert_eq!((st.rip, st.gpr[4], st.seg[1]), (CODE_VA + 0x91, 0x40_1e00, 0x10));
        } else {
            assert_eq!((st.rip, st.gpr[1], st.seg[1]), (CODE_VA + 0x81, CODE_VA + 0x42, 0x10));
        }
    }
}

#[test]
fn iretd_at_cpl0_pops_a_frame_of_32_bit_slots() {
    // mov rsp,0x401f00; sub rsp,20; then the frame: EIP 0x400040, CS 0x10, EFLAGS 0x203,
    // ESP 0x401e00, SS 0x18 (dwords); iretd; hlt at +0x40
    let mut code = vec![
        0x48, 0xc7, 0xc4, 0x00, 0x1f, 0x40, 0x00, 0x48, 0x83, 0xec, 0x14, 0xc7, 0x04, 0x24, 0x40, 0x00, 0x40, 0x00,
        0xc7, 0x44, 0x24, 0x04, 0x10, 0x00, 0x00, 0x00, 0xc7, 0x44, 0x24, 0x08, 0x03, 0x02, 0x00, 0x00, 0xc7, 0x44,
        0x24, 0x0c, 0x00, 0x1e, 0x40, 0x00, 0xc7, 0x44, 0x24, 0x10, 0x18, 0x00, 0x00, 0x00, 0xcf,
    ];
    code.resize(0x40, 0xcc);
    code.push(0xf4);
    let g = SoftGuest::new(&code);
    let mut t = system_with_idt(&g, &[], 0x100);
    assert_eq!(t.run(&mut HostPlatform, BUDGET).unwrap(), Exit::Halt);
    let s = t.state();
    assert_eq!((s.rip, s.gpr[4], s.rflags & 0xfff), (CODE_VA + 0x41, 0x40_1e00, 0x203));
    assert_eq!((s.seg[1], s.seg[2]), (0x10, 0x18));
}

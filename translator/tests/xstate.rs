//! The guest's XCR0 is modelled: with a guest offered less XSAVE state than the host has
//! (x87+SSE on an AVX or AVX-512 host), `xgetbv` returns the guest's XCR0, copied
//! `xsave`/`xsavec` write only the guest's components whatever EDX:EAX asks, `xrstor` refuses
//! images naming other components (#GP(0), as a CPU with that XCR0 does), faults inside stay
//! precise, and a state the host could not `xrstor` is refused instead of crashing the glue.
//! These hold on any host: where the host's XCR0 is the guest's, the same results are native.

use hbt_translator::cpu::xsave::{XsaveLayout, XCOMP_BV, XSTATE_BV};
use hbt_translator::exit::vector;
use hbt_translator::{Config, Exit, GuestRam, HostPlatform, MemoryStrategy, Translator};

const BUDGET: u64 = 1000;
const FILL: u8 = 0xaa;
/// x87 and SSE: the narrowest guest XCR0.
const GUEST_XCR0: u64 = 0x3;

/// Code page (RWX, HLT-filled) followed by two data pages, the second one unmapped.
struct Region(*mut u8);

impl Region {
    fn new(code: &[u8]) -> Self {
        // SAFETY: fresh anonymous mapping, checked; the test writes only inside it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * 4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::write_bytes(p, 0xf4, 4096);
            std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len());
            std::ptr::write_bytes(p.add(4096), FILL, 4096);
            libc::munmap(p.add(8192) as *mut libc::c_void, 4096);
        }
        Region(p)
    }
    fn code(&self) -> u64 {
        self.0 as u64
    }
    fn data(&self) -> u64 {
        self.0 as u64 + 4096
    }
    fn unmapped(&self) -> u64 {
        self.0 as u64 + 8192
    }
    #[allow(clippy::mut_from_ref)] // the test owns the mapping and runs one thing at a time
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the data page is mapped and owned by this region.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(4096), 4096) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped (the third page is already gone).
        unsafe { libc::munmap(self.0 as *mut libc::c_void, 8192) };
    }
}

fn translator(xcr0: u64) -> Translator {
    let mut t = Translator::new(Config {
        strategy: MemoryStrategy::Identity,
        code_cache_bytes: 1 << 20,
        verified_only: true,
        system: false,
    })
    .unwrap();
    t.state_mut().xcr0 = xcr0;
    t
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Runs `code` with RDI = the data page, EDX:EAX = all ones and XMM0 = a pattern.
fn run(r: &Region, t: &mut Translator) -> Exit {
    let s = t.state_mut();
    s.rip = r.code();
    s.gpr[7] = r.data();
    s.gpr[0] = 0xffff_ffff;
    s.gpr[2] = 0xffff_ffff;
    s.xsave.xmm_mut(0).copy_from_slice(&[0x5a; 16]);
    s.xsave.mark_in_use(0b10);
    t.run(&mut HostPlatform, BUDGET).unwrap()
}

fn completed(exit: Exit) -> bool {
    // User-mode hlt after the instruction ends the run with #GP.
    matches!(exit, Exit::Exception(e) if e.vector == vector::GP)
}

#[test]
fn xgetbv_returns_the_guests_xcr0() {
    // xor ecx,ecx; xgetbv; hlt
    let r = Region::new(&[0x31, 0xc9, 0x0f, 0x01, 0xd0, 0xf4]);
    for xcr0 in [GUEST_XCR0, XsaveLayout::host().managed()] {
        let mut t = translator(xcr0);
        let exit = run(&r, &mut t);
        assert!(completed(exit), "{exit:?}");
        let got = (t.state().gpr[2] << 32) | t.state().gpr[0];
        assert_eq!(got, xcr0);
    }
}

#[test]
fn xsave_writes_only_the_guests_components() {
    // xsave [rdi]; hlt
    let r = Region::new(&[0x0f, 0xae, 0x27, 0xf4]);
    let mut t = translator(GUEST_XCR0);
    let exit = run(&r, &mut t);
    assert!(completed(exit), "{exit:?}");
    let b = r.bytes();
    assert_eq!(&b[160..176], &[0x5a; 16], "XMM0 saved");
    assert!(
        b[576..].iter().all(|&x| x == FILL),
        "nothing beyond the legacy region and header"
    );
    let fill = u64::from_le_bytes([FILL; 8]);
    assert_eq!(
        u64_at(b, XSTATE_BV) & !GUEST_XCR0,
        fill & !GUEST_XCR0,
        "XSTATE_BV bits outside the guest's XCR0 are not written"
    );
    assert_eq!(t.state().gpr[0], 0xffff_ffff, "RAX keeps the guest's value");
    assert_eq!(t.state().gpr[2], 0xffff_ffff, "RDX keeps the guest's value");
}

#[test]
fn xsavec_compacts_only_the_guests_components() {
    // xsavec [rdi]; hlt
    let r = Region::new(&[0x0f, 0xc7, 0x27, 0xf4]);
    if !std::arch::is_x86_feature_detected!("xsavec") {
        panic!("the host has no XSAVEC; this project's hosts all do");
    }
    let mut t = translator(GUEST_XCR0);
    let exit = run(&r, &mut t);
    assert!(completed(exit), "{exit:?}");
    let b = r.bytes();
    assert_eq!(
        u64_at(b, XCOMP_BV),
        (1 << 63) | GUEST_XCR0,
        "compacted format of the guest's components"
    );
    assert!(b[576..].iter().all(|&x| x == FILL));
}

#[test]
fn xrstor_refuses_components_the_guest_lacks() {
    // stc; xrstor [rdi]; hlt
    let r = Region::new(&[0xf9, 0x0f, 0xae, 0x2f, 0xf4]);
    let b = r.bytes();
    b[..576].fill(0);
    b[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
    b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&0b110u64.to_le_bytes()); // SSE + AVX
    let mut t = translator(GUEST_XCR0);
    let exit = run(&r, &mut t);
    let Exit::Exception(e) = exit else { panic!("{exit:?}") };
    assert_eq!((e.vector, e.error_code), (vector::GP, Some(0)));
    assert_eq!(t.state().rip, r.code() + 1, "RIP at the xrstor");
    assert_eq!(t.state().rflags & 1, 1, "CF survives");
    assert_eq!((t.state().gpr[0], t.state().gpr[2]), (0xffff_ffff, 0xffff_ffff));

    // The same image naming SSE only is loaded.
    b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&0b10u64.to_le_bytes());
    b[160..176].copy_from_slice(&[0x33; 16]);
    let exit = run(&r, &mut t);
    assert!(completed(exit), "{exit:?}");
    assert_eq!(t.state().xsave.xmm(0), &[0x33; 16]);
}

#[test]
fn a_fault_inside_a_narrowed_xsave_is_precise() {
    // stc; xsave [rdi]; hlt — with RDI on the unmapped page.
    let r = Region::new(&[0xf9, 0x0f, 0xae, 0x27, 0xf4]);
    let mut t = translator(GUEST_XCR0);
    t.state_mut().rip = r.code();
    t.state_mut().gpr[7] = r.unmapped();
    t.state_mut().gpr[0] = 0xffff_ffff;
    t.state_mut().gpr[2] = 0x1234_5678;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    let Exit::Exception(e) = exit else { panic!("{exit:?}") };
    assert_eq!(e.vector, vector::PF);
    assert_eq!(t.state().rip, r.code() + 1);
    assert_eq!((t.state().gpr[0], t.state().gpr[2]), (0xffff_ffff, 0x1234_5678));
    assert_eq!(t.state().rflags & 1, 1);
}

#[test]
fn states_the_host_cannot_load_are_refused_not_run() {
    let r = Region::new(&[0xf4]);
    let mut bad_xcr0 = translator(0x1);
    bad_xcr0.state_mut().rip = r.code();
    let err = bad_xcr0.run(&mut HostPlatform, BUDGET).unwrap_err().to_string();
    assert!(err.contains("XCR0"), "{err}");

    let mut bad_mxcsr = translator(GUEST_XCR0);
    bad_mxcsr.state_mut().rip = r.code();
    bad_mxcsr.state_mut().xsave.set_mxcsr(0xffff_0000);
    let err = bad_mxcsr.run(&mut HostPlatform, BUDGET).unwrap_err().to_string();
    assert!(err.contains("MXCSR"), "{err}");
}

#[test]
fn soft_mmu_xsave_is_narrowed_too() {
    // Guest RAM: page tables, code at 0x400000, data at 0x401000.
    const RAM: usize = 0x10000;
    let mut ram = vec![0u8; RAM + 4096];
    let base = (ram.as_mut_ptr() as usize).next_multiple_of(4096);
    let mem = |pa: usize| base + pa;
    let put = |pa: usize, v: u64| {
        // SAFETY: pa + 8 <= RAM, inside `ram`.
        unsafe { std::ptr::write_unaligned(mem(pa) as *mut u64, v) }
    };
    put(0x0000, 0x1000 | 7);
    put(0x1000, 0x2000 | 7);
    put(0x2000 + 2 * 8, 0x3000 | 7);
    put(0x3000, 0x5000 | 7);
    put(0x3008, 0x6000 | 7);
    // xsave [rdi]; hlt
    for (i, b) in [0x0f, 0xae, 0x27, 0xf4].iter().enumerate() {
        // SAFETY: inside `ram`.
        unsafe { *(mem(0x5000 + i) as *mut u8) = *b };
    }
    // SAFETY: inside `ram`.
    unsafe { std::ptr::write_bytes(mem(0x6000) as *mut u8, FILL, 4096) };
    // SAFETY: `ram` outlives the translator.
    let guest_ram = unsafe { GuestRam::new(base as *mut u8, RAM as u64) };
    let mut t = Translator::new(Config {
        strategy: MemoryStrategy::SoftMmu(guest_ram),
        code_cache_bytes: 1 << 20,
        verified_only: true,
        system: false,
    })
    .unwrap();
    let s = t.state_mut();
    s.xcr0 = GUEST_XCR0;
    s.cr3 = 0;
    s.rip = 0x40_0000;
    s.gpr[7] = 0x40_1000;
    s.gpr[0] = 0xffff_ffff;
    s.gpr[2] = 0xffff_ffff;
    let exit = t.run(&mut HostPlatform, BUDGET).unwrap();
    assert!(completed(exit), "{exit:?}");
    // SAFETY: inside `ram`.
    let data = unsafe { std::slice::from_raw_parts(mem(0x6000) as *const u8, 4096) };
    assert!(data[576..].iter().all(|&x| x == FILL));
    assert_eq!((t.state().gpr[0], t.state().gpr[2]), (0xffff_ffff, 0xffff_ffff));
    drop(t);
    drop(ram);
}

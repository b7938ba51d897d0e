//! The test machine: fixed low-address regions for code and data, a native trampoline that
//! loads a complete machine state and jumps to the instruction under test, and a soft-MMU guest
//! whose page tables map the same guest virtual addresses onto different host memory.
//!
//! ```text
//!   (elsewhere)    trampoline page (RWX), far from the regions so no test access reaches it
//!   base + 0x1000  code region, 2 pages, filled with HLT (0xF4); test instruction at CODE_AT
//!   base + 0x10000 data region, 2 pages
//! ```
//!
//! Every run ends in a signal: the instruction under test either faults or falls through / jumps
//! into the HLT sea, where HLT faults in user mode. The signal handler records the full state.

use crate::host::map_anonymous;
use crate::host::signals::{self, Captured, ForkCapture, NativeCapture, NativeGuard};
use crate::mmu::GuestRam;
use crate::state::{GuestState, XSaveArea};
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

pub const CODE_OFFSET: u64 = 0x1000;
pub const CODE_SIZE: u64 = 0x2000;
/// Test instructions start here (room for backward and forward branch targets).
pub const CODE_AT_OFFSET: u64 = 0x1800;
pub const DATA_OFFSET: u64 = 0x10000;
pub const DATA_SIZE: u64 = 0x2000;
const REGION_SIZE: u64 = 0x20000;
pub const HLT: u8 = 0xf4;
/// Offset in the trampoline page of the (aligned) jump target.
const TARGET_SLOT: u64 = 0x800;

/// Guest-physical layout of the soft-MMU view.
const PT_PML4: u64 = 0x0000;
const PT_PDPT: u64 = 0x1000;
const PT_PD: u64 = 0x2000;
const PT_PT: u64 = 0x3000;
const PHYS_CODE: u64 = 0x5000;
/// Data pages are deliberately not adjacent to each other in guest physical memory.
const PHYS_DATA: [u64; 2] = [0x9000, 0x7000];
const RAM_SIZE: u64 = 0x10000;

pub struct Machine {
    pub base: u64,
    trampoline: u64,
    /// Guest physical memory of the soft-MMU view (page-aligned, see `GuestRam::new`).
    ram: &'static mut [u8],
    capture: Box<NativeCapture>,
    xsave_in: Box<XSaveArea>,
    host_fp: Box<[u32; 2]>,
}

impl Machine {
    /// Maps the regions at the first free slot at or above `hint` (below 4 GiB, so 32-bit
    /// addressing and `push imm32` return addresses are testable).
    pub fn new(hint: u64) -> Result<Self, String> {
        signals::ensure_installed();
        let mut base = hint;
        loop {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the result is
            // checked against the requested address.
            let p = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    REGION_SIZE as usize,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p as u64 == base {
                break;
            }
            if p != libc::MAP_FAILED {
                // SAFETY: unmapping the mapping we just got at the wrong address.
                unsafe { libc::munmap(p, REGION_SIZE as usize) };
            }
            base += 0x20_0000;
            if base >= 0xf000_0000 {
                return Err("no free low address range for the test machine".into());
            }
        }
        // Only the code and data pages are accessible, as in the soft-MMU view.
        // SAFETY: changing protection of ranges inside the mapping we just created.
        unsafe {
            let gap = |from: u64, to: u64| {
                libc::mprotect(
                    (base + from) as *mut libc::c_void,
                    (to - from) as usize,
                    libc::PROT_NONE,
                )
            };
            gap(0, CODE_OFFSET);
            gap(CODE_OFFSET + CODE_SIZE, DATA_OFFSET);
            gap(DATA_OFFSET + DATA_SIZE, REGION_SIZE);
        }
        // Data is not executable (a wild jump into it must fault, natively and translated).
        // SAFETY: changing protection of a range inside the mapping we just created.
        unsafe {
            libc::mprotect(
                (base + DATA_OFFSET) as *mut libc::c_void,
                DATA_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let trampoline = map_anonymous(4096, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC)
            .ok_or("cannot map the native trampoline")?;
        let mut m = Machine {
            base,
            trampoline: trampoline as u64,
            ram: map_ram()?,
            // SAFETY: NativeCapture/Captured are plain data; all-zero is a valid value.
            capture: Box::new(unsafe { std::mem::zeroed::<NativeCapture>() }),
            xsave_in: Box::new(XSaveArea::default()),
            host_fp: Box::new([0; 2]),
        };
        m.build_page_tables();
        Ok(m)
    }

    pub fn code_at(&self) -> u64 {
        self.base + CODE_AT_OFFSET
    }

    pub fn code_range(&self) -> (u64, u64) {
        (self.base + CODE_OFFSET, self.base + CODE_OFFSET + CODE_SIZE)
    }

    pub fn data(&self) -> u64 {
        self.base + DATA_OFFSET
    }

    #[allow(clippy::mut_from_ref)] // the mapping is ours; callers never hold two views at once
    fn region(&self, offset: u64, len: u64) -> &mut [u8] {
        // SAFETY: offset+len lies inside our REGION_SIZE mapping, which lives as long as self;
        // the harness is single-threaded per machine.
        unsafe { std::slice::from_raw_parts_mut((self.base + offset) as *mut u8, len as usize) }
    }

    /// Fills the code region with HLT and places `bytes` at the test address, optionally after a
    /// `nop` (in both the native region and the soft-MMU's copy).
    pub fn load_code(&mut self, bytes: &[u8], lead_in: bool) {
        let code = self.region(CODE_OFFSET, CODE_SIZE);
        code.fill(HLT);
        let at = (CODE_AT_OFFSET - CODE_OFFSET) as usize;
        code[at..at + bytes.len()].copy_from_slice(bytes);
        if lead_in {
            code[at - 1] = 0x90; // nop
        }
        let copy = code.to_vec();
        self.ram[PHYS_CODE as usize..(PHYS_CODE + CODE_SIZE) as usize].copy_from_slice(&copy);
    }

    /// Byte at a code address (for telling the HLT sea from the instruction).
    pub fn code_byte(&self, addr: u64) -> Option<u8> {
        let (lo, hi) = self.code_range();
        (addr >= lo && addr < hi).then(|| self.region(addr - self.base, 1)[0])
    }

    pub fn set_native_data(&mut self, data: &[u8]) {
        self.region(DATA_OFFSET, DATA_SIZE).copy_from_slice(data);
    }

    pub fn native_data(&self) -> Vec<u8> {
        self.region(DATA_OFFSET, DATA_SIZE).to_vec()
    }

    pub fn set_soft_data(&mut self, data: &[u8]) {
        for (i, &pa) in PHYS_DATA.iter().enumerate() {
            self.ram[pa as usize..pa as usize + 4096].copy_from_slice(&data[i * 4096..(i + 1) * 4096]);
        }
    }

    pub fn soft_data(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DATA_SIZE as usize);
        for &pa in &PHYS_DATA {
            out.extend_from_slice(&self.ram[pa as usize..pa as usize + 4096]);
        }
        out
    }

    /// The soft-MMU view of guest physical memory.
    pub fn guest_ram(&mut self) -> GuestRam {
        // SAFETY: `ram` is a boxed slice owned by the machine, which outlives every translator
        // the harness creates from it (they are dropped first, see harness::Worker).
        unsafe { GuestRam::new(self.ram.as_mut_ptr(), RAM_SIZE) }
    }

    /// CR3 for the soft-MMU view.
    pub fn cr3(&self) -> u64 {
        PT_PML4
    }

    fn build_page_tables(&mut self) {
        const USER_RW_P: u64 = 0b111;
        let va = self.base;
        const NX: u64 = 1 << 63;
        let ram: &mut [u8] = self.ram;
        let mut put = |pa: u64, v: u64| ram[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
        put(PT_PML4 + ((va >> 39) & 511) * 8, PT_PDPT | USER_RW_P);
        put(PT_PDPT + ((va >> 30) & 511) * 8, PT_PD | USER_RW_P);
        put(PT_PD + ((va >> 21) & 511) * 8, PT_PT | USER_RW_P);
        let pte = |v: u64| PT_PT + ((v >> 12) & 511) * 8;
        put(pte(va + CODE_OFFSET), PHYS_CODE | USER_RW_P);
        put(pte(va + CODE_OFFSET + 0x1000), (PHYS_CODE + 0x1000) | USER_RW_P);
        put(pte(va + DATA_OFFSET), PHYS_DATA[0] | NX | USER_RW_P);
        put(pte(va + DATA_OFFSET + 0x1000), PHYS_DATA[1] | NX | USER_RW_P);
    }

    /// Runs the code region natively from `state.rip` with `state` loaded; returns what the
    /// signal handler captured when the run ended.
    pub fn run_native(&mut self, state: &GuestState) -> Captured {
        *self.xsave_in = state.xsave.clone();
        self.write_trampoline(state);
        self.capture.valid = false;
        let guard = NativeGuard::arm(&mut self.capture);
        // SAFETY: the trampoline saves callee-saved registers and the host stack pointer, runs
        // the test code (inside the code region, surrounded by HLT), and every way out of that
        // code is a signal whose handler resumes at the trampoline's epilogue with the saved
        // host stack; the epilogue restores FPU control state and returns normally.
        let run: extern "C" fn() = unsafe { std::mem::transmute(self.trampoline as usize) };
        run();
        drop(guard);
        assert!(self.capture.valid, "the native run ended with a captured signal");
        self.capture.captured.clone()
    }

    /// Like [`Machine::run_native`], but in a forked child process: for instructions that change
    /// the FS/GS selectors or bases, which this process (TLS, the translator's GS base) would
    /// not survive. Returns None when the child died without reporting.
    pub fn run_native_forked(&mut self, state: &GuestState) -> Option<(Captured, Vec<u8>)> {
        *self.xsave_in = state.xsave.clone();
        self.write_trampoline(state);
        let size = std::mem::size_of::<ForkCapture>();
        // SAFETY: anonymous shared mapping, checked below, unmapped at the end.
        let shared = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if shared == libc::MAP_FAILED {
            return None;
        }
        let shared = shared as *mut ForkCapture;
        // SAFETY: the mapping is fresh and large enough.
        unsafe { (*shared).data_addr = self.base + DATA_OFFSET };
        let trampoline = self.trampoline;
        // SAFETY: the child only arms the capture pointer and jumps into prepared code; every way
        // out of that code is a signal whose handler writes the shared page and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            signals::arm_fork_capture(shared);
            // SAFETY: as above; the trampoline was written before the fork.
            let run: extern "C" fn() = unsafe { std::mem::transmute(trampoline as usize) };
            run();
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(1) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        // SAFETY: the child has exited; the shared page holds what it wrote (or zeros).
        let result = unsafe { ((*shared).valid == 1).then(|| ((*shared).captured.clone(), (*shared).data.to_vec())) };
        // SAFETY: unmapping the region mapped above.
        unsafe { libc::munmap(shared as *mut libc::c_void, size) };
        result
    }

    fn write_trampoline(&mut self, s: &GuestState) {
        let mut code = Vec::with_capacity(400);
        let mut enc = Encoder::new(64);
        let base = self.trampoline;
        let mut emit = |i: Result<Instruction, iced_x86::IcedError>, code: &mut Vec<u8>| {
            let at = base + code.len() as u64;
            enc.encode(&i.expect("trampoline instruction"), at)
                .expect("trampoline encodes");
            code.extend_from_slice(&enc.take_buffer());
        };
        use Code as C;
        use Register as R;
        let callee = [R::RBX, R::RBP, R::R12, R::R13, R::R14, R::R15];
        for r in callee {
            emit(Instruction::with1(C::Push_r64, r), &mut code);
        }
        emit(
            Instruction::with2(
                C::Mov_r64_imm64,
                R::RAX,
                std::ptr::addr_of!(self.capture.resume_rsp) as u64,
            ),
            &mut code,
        );
        emit(
            Instruction::with2(C::Mov_rm64_r64, MemoryOperand::with_base(R::RAX), R::RSP),
            &mut code,
        );
        emit(
            Instruction::with2(C::Mov_r64_imm64, R::RAX, self.host_fp.as_ptr() as u64),
            &mut code,
        );
        emit(
            Instruction::with1(C::Stmxcsr_m32, MemoryOperand::with_base(R::RAX)),
            &mut code,
        );
        emit(
            Instruction::with1(C::Fnstcw_m2byte, MemoryOperand::with_base_displ(R::RAX, 4)),
            &mut code,
        );
        emit(
            Instruction::with2(C::Mov_r64_imm64, R::RCX, std::ptr::addr_of!(*self.xsave_in) as u64),
            &mut code,
        );
        emit(Instruction::with2(C::Mov_r32_imm32, R::EAX, s.xcr0 as u32), &mut code);
        emit(
            Instruction::with2(C::Mov_r32_imm32, R::EDX, (s.xcr0 >> 32) as u32),
            &mut code,
        );
        emit(
            Instruction::with1(C::Xrstor64_mem, MemoryOperand::with_base(R::RCX)),
            &mut code,
        );
        emit(Instruction::with2(C::Mov_r64_imm64, R::RAX, s.rflags), &mut code);
        emit(Instruction::with1(C::Push_r64, R::RAX), &mut code);
        emit(Ok(Instruction::with(C::Popfq)), &mut code);
        for n in 1..16 {
            if n != 4 {
                emit(
                    Instruction::with2(C::Mov_r64_imm64, crate::emit::asm::gpr64(n), s.gpr[n]),
                    &mut code,
                );
            }
        }
        emit(Instruction::with2(C::Mov_r64_imm64, R::RSP, s.gpr[4]), &mut code);
        emit(Instruction::with2(C::Mov_r64_imm64, R::RAX, s.gpr[0]), &mut code);
        // jmp [target slot]: the test code is far away. The slot is 8-byte aligned because
        // guest flags (possibly with AC set) are already loaded.
        emit(
            Instruction::with1(
                C::Jmp_rm64,
                MemoryOperand::with_base_displ(R::RIP, (base + TARGET_SLOT) as i64),
            ),
            &mut code,
        );
        // Epilogue: the signal handler resumes here with the host stack.
        self.capture.resume_rip = base + code.len() as u64;
        emit(
            Instruction::with2(C::Mov_r64_imm64, R::RAX, self.host_fp.as_ptr() as u64),
            &mut code,
        );
        emit(Ok(Instruction::with(C::Fninit)), &mut code);
        emit(
            Instruction::with1(C::Ldmxcsr_m32, MemoryOperand::with_base(R::RAX)),
            &mut code,
        );
        emit(
            Instruction::with1(C::Fldcw_m2byte, MemoryOperand::with_base_displ(R::RAX, 4)),
            &mut code,
        );
        if std::arch::is_x86_feature_detected!("avx") {
            emit(Ok(Instruction::with(C::VEX_Vzeroupper)), &mut code);
        }
        for r in callee.iter().rev() {
            emit(Instruction::with1(C::Pop_r64, *r), &mut code);
        }
        emit(Ok(Instruction::with(C::Retnq)), &mut code);
        assert!((code.len() as u64) < TARGET_SLOT);
        // SAFETY: the trampoline mapping is one page; code and slot fit in it.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.trampoline as *mut u8, code.len());
            std::ptr::write((self.trampoline + TARGET_SLOT) as *mut u64, s.rip);
        }
    }
}

/// Page-aligned zeroed memory for the soft-MMU view; unmapped when the machine drops.
fn map_ram() -> Result<&'static mut [u8], String> {
    let p = map_anonymous(RAM_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE)
        .ok_or("cannot map the soft-MMU guest memory")?;
    // SAFETY: the mapping is RAM_SIZE bytes, readable and writable, and owned by the machine.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, RAM_SIZE as usize) })
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: the mappings created in `new`.
        unsafe {
            libc::munmap(self.ram.as_mut_ptr() as *mut libc::c_void, RAM_SIZE as usize);
            libc::munmap(self.base as *mut libc::c_void, REGION_SIZE as usize);
            libc::munmap(self.trampoline as *mut libc::c_void, 4096);
        }
    }
}

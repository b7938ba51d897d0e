//! Shared glue emitted once at the start of the code buffer: entering translated code from
//! Rust, the common exit back to the dispatcher, the indirect-branch miss paths, and the load of
//! the guest's extended state.
//!
//! Entry loads the guest's flags and GPRs (RSP last) from the context and jumps to a block.
//! Exit is reached with every guest register live and the guest RIP already stored; it switches
//! to the host stack with plain `mov`s (guest flags intact), saves flags and registers and
//! returns to the dispatcher.
//!
//! The extended state (x87, SSE, AVX, …) moves one of two ways, chosen per translator:
//! - **Eagerly** ([`Glue::entry_loaded`]: user-mode translation, `hbt exec` and the harness):
//!   entry XRSTORs the guest's image, exit saves it. Such code touches the state within a few
//!   blocks of almost every entry (string functions, `memcpy`), and a check at the start of
//!   every block that touches it cost `sort -n` of 10⁶ lines ≈10% (AMD EPYC).
//! - **Lazily** ([`Glue::entry`]: system mode): entry leaves the state in the context's image
//!   (`Context::extended_state_in_image` set) and the host's in the registers; a block that
//!   touches it checks that byte first and, the first time, jumps to
//!   [`Glue::load_extended_state`], which saves the host's MXCSR and x87 control word and
//!   XRSTORs the image. Kernel code never touches it (a fork+exec-heavy Linux guest leaves
//!   translated code ≈1,400 times per process, and the eager XRSTOR + XSAVEOPT pair was ≈7% of
//!   its time on an AMD EPYC).
//!
//! Either way the exit saves the state only when it was loaded, with XSAVEOPT where the host
//! has it (the load's XRSTOR used the same address, so the CPU writes only the components the
//! guest changed since). The mask is the guest's XCR0 (`GuestState::xcr0`, read from the
//! context at every load and save): exactly the components the guest was offered move, so an
//! AVX2 guest on an AVX-512 host moves 832 bytes, not 2,688, and XFD-armed components (AMX)
//! are never touched. Every entry starts from the image, so whatever the engine wrote into it
//! in between is what the guest sees.

use super::asm::{ctx, spill_slot, Asm};
use crate::context::{off, ExitReason, IBL_EMPTY_TARGET};
use iced_x86::{Code, Instruction, MemoryOperand, Register as R};

/// Addresses of the shared glue.
#[derive(Clone, Copy, Debug, Default)]
pub struct Glue {
    /// `extern "C" fn()`: enters at `Context::entry_target` with the guest's GPRs and flags
    /// loaded and its extended state left in the image (the lazy way).
    pub entry: u64,
    /// The same with the extended state loaded as well (the eager way).
    pub entry_loaded: u64,
    /// Common exit (guest RIP and exit reason already stored).
    pub exit: u64,
    /// Inline indirect lookups jump here on a miss: R11 = guest target, R11/RCX spilled.
    pub ibl_miss: u64,
    /// Soft-MMU miss stubs jump here with `Context::miss_va` and `Context::miss_site` stored
    /// and the guest state as the lookup left it (`miss_site.rs`): a TLB-miss exit.
    pub tlb_miss: u64,
    /// Host address of empty indirect-branch slots (see `context::IBL_EMPTY_TAG`).
    pub ibl_empty: u64,
    /// Loads the guest's extended state from the image into the registers, then jumps to
    /// `Context::extended_state_return` with every guest register and flag as they were. The
    /// last piece of glue: everything from here to the glue's end belongs to it.
    pub load_extended_state: u64,
}

const CALLEE_SAVED: [R; 6] = [R::RBX, R::RBP, R::R12, R::R13, R::R14, R::R15];
const GPRS: [R; 16] = [
    R::RAX,
    R::RCX,
    R::RDX,
    R::RBX,
    R::RSP,
    R::RBP,
    R::RSI,
    R::RDI,
    R::R8,
    R::R9,
    R::R10,
    R::R11,
    R::R12,
    R::R13,
    R::R14,
    R::R15,
];

/// Emits the glue at `base` for a host with (or without) AVX and XSAVEOPT; returns the bytes and
/// the entry points.
pub fn emit(base: u64, has_avx: bool, has_xsaveopt: bool) -> (Vec<u8>, Glue) {
    let mut a = Asm::new(base);
    // --- entry, eager ---
    let mut glue = Glue {
        entry_loaded: a.here(),
        ..Glue::default()
    };
    enter(&mut a, true);
    // --- entry, lazy ---
    glue.entry = a.here();
    enter(&mut a, false);

    // --- common exit ---
    glue.exit = a.here();
    a.mov_to_ctx(off::GPR + 8 * 4, R::RSP);
    a.mov_from_ctx(R::RSP, off::HOST_RSP);
    a.op0(Code::Pushfq);
    a.glue(Instruction::with1(Code::Pop_rm64, ctx(off::RFLAGS)));
    for (n, r) in GPRS.iter().enumerate() {
        if *r != R::RSP {
            a.mov_to_ctx(off::GPR + 8 * n, *r);
        }
    }
    // Flags and registers are saved: the test is free.
    a.glue(Instruction::with2(
        Code::Cmp_rm64_imm8,
        ctx(off::EXTENDED_STATE_IN_IMAGE),
        0,
    ));
    let in_image = a.branch32_forward(Code::Jne_rel32_64);
    a.mov_from_ctx(R::RAX, off::XCR0);
    a.glue(Instruction::with2(Code::Mov_r32_rm32, R::EDX, ctx(off::XCR0 + 4)));
    let save = if has_xsaveopt {
        Code::Xsaveopt64_mem
    } else {
        Code::Xsave64_mem
    };
    a.glue(Instruction::with1(save, ctx(off::XSAVE)));
    a.op0(Code::Fninit);
    a.glue(Instruction::with1(Code::Fldcw_m2byte, ctx(off::HOST_FCW)));
    a.glue(Instruction::with1(Code::Ldmxcsr_m32, ctx(off::HOST_MXCSR)));
    if has_avx {
        a.op0(Code::VEX_Vzeroupper);
    }
    a.store_ctx_u32(off::EXTENDED_STATE_IN_IMAGE, 1);
    let here = a.here();
    a.bind(in_image, here);
    // Clean flags for Rust (DF and AC clear, TF clear).
    a.glue(Instruction::with1(Code::Pushq_imm8, 2));
    a.op0(Code::Popfq);
    a.glue(Instruction::with2(Code::Add_rm64_imm8, R::RSP, 8));
    for r in CALLEE_SAVED.iter().rev() {
        a.glue(Instruction::with1(Code::Pop_r64, *r));
    }
    a.op0(Code::Retnq);

    // --- indirect-branch miss: R11 = guest target, R11/RCX spilled ---
    glue.ibl_miss = a.here();
    a.mov_to_ctx(off::RIP, R::R11);
    for r in [R::R11, R::RCX] {
        a.glue(Instruction::with2(Code::Mov_r64_rm64, r, spill_slot(r)));
    }
    a.store_ctx_u32(off::EXIT_REASON, ExitReason::IndirectMiss as u32);
    a.glue(Instruction::with_branch(Code::Jmp_rel32_64, glue.exit));

    // --- TLB miss: the engine rebuilds the guest state from the stub's site ---
    glue.tlb_miss = a.here();
    a.store_ctx_u32(off::EXIT_REASON, ExitReason::TlbMiss as u32);
    a.glue(Instruction::with_branch(Code::Jmp_rel32_64, glue.exit));

    // --- empty indirect slot: reached only when the target is the one (canonical) value whose
    // negation is the empty tag, entered like a block's prologue (R11 = this address, RCX
    // restored): an ordinary miss ---
    glue.ibl_empty = a.here();
    a.glue(Instruction::with2(Code::Mov_r64_rm64, R::R11, spill_slot(R::R11)));
    a.store_ctx_u64(off::RIP, IBL_EMPTY_TARGET);
    a.store_ctx_u32(off::EXIT_REASON, ExitReason::IndirectMiss as u32);
    a.glue(Instruction::with_branch(Code::Jmp_rel32_64, glue.exit));

    // --- load the extended state: reached by a jump from a block's start (`xstate.rs`) with
    // the return address in the context; flags untouched (XRSTOR and `mov` leave them) ---
    glue.load_extended_state = a.here();
    a.mov_to_ctx(off::EXTENDED_STATE_RAX, R::RAX);
    a.mov_to_ctx(off::EXTENDED_STATE_RDX, R::RDX);
    // Counted (for `--stats`) with a flag-free `lea`.
    a.mov_from_ctx(R::RAX, off::EXTENDED_STATE_LOADS);
    a.glue(Instruction::with2(
        Code::Lea_r64_m,
        R::RAX,
        MemoryOperand::with_base_displ(R::RAX, 1),
    ));
    a.mov_to_ctx(off::EXTENDED_STATE_LOADS, R::RAX);
    a.glue(Instruction::with1(Code::Stmxcsr_m32, ctx(off::HOST_MXCSR)));
    a.glue(Instruction::with1(Code::Fnstcw_m2byte, ctx(off::HOST_FCW)));
    a.mov_from_ctx(R::RAX, off::XCR0);
    a.glue(Instruction::with2(Code::Mov_r32_rm32, R::EDX, ctx(off::XCR0 + 4)));
    a.glue(Instruction::with1(Code::Xrstor64_mem, ctx(off::XSAVE)));
    a.store_ctx_u32(off::EXTENDED_STATE_IN_IMAGE, 0);
    a.mov_from_ctx(R::RAX, off::EXTENDED_STATE_RAX);
    a.mov_from_ctx(R::RDX, off::EXTENDED_STATE_RDX);
    a.glue(Instruction::with1(Code::Jmp_rm64, ctx(off::EXTENDED_STATE_RETURN)));

    (a.buf, glue)
}

/// An entry: host callee-saved registers and stack saved, the extended state loaded when
/// `loaded` (host MXCSR and x87 control word kept for the exit), the guest's flags and GPRs
/// loaded, then a jump to `Context::entry_target`.
fn enter(a: &mut Asm, loaded: bool) {
    for r in CALLEE_SAVED {
        a.glue(Instruction::with1(Code::Push_r64, r));
    }
    a.glue(Instruction::with2(Code::Sub_rm64_imm8, R::RSP, 8));
    a.mov_to_ctx(off::HOST_RSP, R::RSP);
    if loaded {
        a.glue(Instruction::with1(Code::Stmxcsr_m32, ctx(off::HOST_MXCSR)));
        a.glue(Instruction::with1(Code::Fnstcw_m2byte, ctx(off::HOST_FCW)));
        a.mov_from_ctx(R::RAX, off::XCR0);
        a.glue(Instruction::with2(Code::Mov_r32_rm32, R::EDX, ctx(off::XCR0 + 4)));
        a.glue(Instruction::with1(Code::Xrstor64_mem, ctx(off::XSAVE)));
    }
    a.store_ctx_u32(off::EXTENDED_STATE_IN_IMAGE, (!loaded) as u32);
    a.glue(Instruction::with1(Code::Push_rm64, ctx(off::RFLAGS)));
    a.op0(Code::Popfq);
    for (n, r) in GPRS.iter().enumerate() {
        if *r != R::RSP {
            a.mov_from_ctx(*r, off::GPR + 8 * n);
        }
    }
    a.mov_from_ctx(R::RSP, off::GPR + 8 * 4);
    a.glue(Instruction::with1(Code::Jmp_rm64, ctx(off::ENTRY_TARGET)));
}

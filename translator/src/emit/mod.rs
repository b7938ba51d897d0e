//! Turns a decoded guest block into host code.
//!
//! Guest registers stay in host registers; glue borrows a register only after storing its guest
//! value in the context's spill slot and gives it back right after. The emitter tracks which
//! registers are borrowed (`spilled`) and whether guest flags are parked on the flag stack, and
//! records that for every host instruction that can fault, so the signal handler and the engine
//! (from a TLB-miss stub's site, `miss_site.rs`) can always rebuild the exact guest state at the
//! start of the guest instruction.
//!
//! Guest flags live in host flags. Glue under the identity strategy never touches them (the
//! indirect-branch lookup uses only `mov`/`movzx`/`lea`/`jrcxz`), so no flag liveness is needed
//! there; under the soft-MMU the TLB lookup saves and restores them around every access, because
//! any access may fault and a precise fault must show the guest its flags unchanged — liveness
//! cannot remove that save.
//!
//! One file per concern: `memop.rs` (explicit memory operands through the strategy), `stack.rs`
//! (push/pop/pushf/popf/leave under the soft-MMU), `branch.rs` (control transfers, chaining and
//! the inline indirect-branch lookup), `glue.rs` (entry/exit), `xstate.rs` (guest
//! `xsave`/`xrstor` narrowed to the guest's XCR0), `alignment.rs` (operands that must be
//! aligned before any page walk), `miss_site.rs` (what a TLB miss's cold path leaves to the
//! engine), `asm.rs` (encoder wrapper).

mod alignment;
pub mod asm;
mod branch;
pub use branch::IBL_PROLOGUE_LEN;
pub mod glue;
mod loop_window;
mod memop;
pub mod miss_site;
mod stack;
mod string;
mod system;
mod window;
mod xstate;

use crate::block::{DecodedBlock, Flow};
use crate::context::{off, ExitReason};
use crate::cpu::xsave::touches_extended_state;
use crate::error::TranslateError;
use crate::host::signals::FaultSite;
use crate::rules::Rule;
use asm::{spill_slot, Asm};
use glue::Glue;
use iced_x86::{Code, Instruction, InstructionInfoFactory, Register};

/// A host code range that can fault, and how to recover the guest state there.
#[derive(Clone, Copy, Debug)]
pub struct HostSite {
    pub start: u32,
    pub end: u32,
    pub site: FaultSite,
}

/// A block exit that can be chained: the rel32 field at `field` (offset in the block) jumps to a
/// stub that exits to `target`; chaining rewrites it to jump to the target's block instead.
#[derive(Clone, Copy, Debug)]
pub struct ExitPatch {
    pub field: u32,
    pub target: u64,
    /// Offset of its exit stub (where an unchained field points).
    pub stub: u32,
    /// A loop's back edge to the block's own start that keeps scratch registers borrowed
    /// (see [`emit_block`]): linked, it goes to this offset (the loop head, past the block's
    /// own borrowing stores), and it is linked to no other block.
    pub link_at: Option<u32>,
}

/// Output of [`emit_block`].
pub struct EmittedBlock {
    pub code: Vec<u8>,
    pub sites: Vec<HostSite>,
    pub exits: Vec<ExitPatch>,
    pub inline_caches: Vec<InlineCache>,
    /// Windows of accesses opened (`window.rs`), and the accesses they took.
    pub windows: u32,
    pub window_accesses: u32,
    /// Loop windows' streams opened (`loop_window.rs`), and the accesses they took.
    pub loop_windows: u32,
    pub loop_window_accesses: u32,
}

/// A `ret` site's one-entry inline cache: `mov rax, imm64` holds −(cached guest target) and a
/// `jmp rel32` goes to its host block. Offsets are within the block.
#[derive(Clone, Copy, Debug)]
pub struct InlineCache {
    pub imm_field: u32,
    pub rel_field: u32,
    /// Where the `jmp rel32` goes while the cache is empty (the lookup path).
    pub miss: u32,
    /// A `jmp rel32` at the head of the lookup path that goes to `fill_stub` (leave for the
    /// dispatcher) while the cache is empty, so the first miss fills the cache even when the
    /// table already knows the target; filling points it at the next instruction (the table
    /// lookup), so a polymorphic site pays the table, not the dispatcher.
    pub fill_field: u32,
    pub fill_stub: u32,
}

/// Value in an empty return cache: −target is zero only for the non-canonical target
/// 0x8000_0000_0000_0000, and its jump goes to the lookup path anyway.
pub const INLINE_CACHE_EMPTY: u64 = 0x8000_0000_0000_0000;

/// Code emitted out of line after the block body.
enum Cold {
    /// Exit to `target`; `field` is the rel32 in the body that jumps here. `restore`: the
    /// registers (bit per hardware number) a direct `jcc`/`jmp` left borrowed; `keep`: those
    /// a loop's back edge keeps borrowed into the loop head (see [`emit_block`]). Unless the
    /// two are equal, a trampoline gives back `restore` minus `keep`, borrows `keep` minus
    /// `restore`, and ends in the chainable `jmp rel32` (the exit's field then); the stub
    /// gives back `keep`.
    Exit {
        field: usize,
        target: u64,
        restore: u16,
        keep: u16,
    },
    /// First miss of `inline_caches[cache]`, whose imm64 is at block offset `imm_field`:
    /// record the site and take the indirect-miss exit, so the engine fills the cache.
    CacheFill {
        field: usize,
        imm_field: usize,
        cache: usize,
        guest_rip: u64,
        rsp_delta: i64,
    },
    /// The indirect-branch table missed at a site: record the branch, go to the shared miss path.
    TableMiss {
        field: usize,
        guest_rip: u64,
        rsp_delta: i64,
    },
    /// Raise guest exception `vector` (with `error_code`) at `guest_rip`: restore the guest
    /// state and take the fault exit.
    Raise {
        field: usize,
        vector: u8,
        error_code: u32,
        guest_rip: u64,
        spilled: u16,
        flags_saved: bool,
    },
    /// The engine performs the instruction at `guest_rip` after all (`string.rs`): restore the
    /// guest state and exit; every rel32 in `fields` jumps here.
    ToEngine {
        fields: Vec<usize>,
        guest_rip: u64,
        spilled: u16,
        flags_saved: bool,
    },
    /// A flag-free check borrowed only RCX and found the engine needed: RCX back, exit with
    /// `reason` at `rip` (an inlined `sti` that found an interrupt waiting, in its shadow; a
    /// block entered while the extended state is held elsewhere, at its start).
    RcxExit { field: usize, reason: ExitReason, rip: u64 },
    /// The extended-state check found it still in the image: RCX is borrowed and free; go to
    /// `Glue::load_extended_state`, which comes back to `back`.
    LoadExtendedState { field: usize, back: u64 },
    /// TLB miss: restore the guest state at `guest_rip` and exit.
    TlbMiss {
        field: usize,
        va_reg: Register,
        info: u64,
        guest_rip: u64,
        spilled: u16,
        flags_saved: bool,
        /// The register holding the guest's RCX meanwhile (the flag-free lookup parks it
        /// there rather than in its spill slot; see `tlb_lookup_flag_free`).
        parked_rcx: Option<Register>,
    },
}

pub(crate) struct BlockEmitter<'a> {
    asm: Asm,
    glue: &'a Glue,
    miss_sites: &'a mut miss_site::MissSites,
    soft_mmu: bool,
    /// Which rules the engine performs, and how pushf sees the virtual flags.
    mode: crate::rules::Mode,
    split_access: bool,
    dispatcher_only: bool,
    spilled: u16,
    flags_in_slot: bool,
    sites: Vec<HostSite>,
    exits: Vec<ExitPatch>,
    inline_caches: Vec<InlineCache>,
    cold: Vec<Cold>,
    /// 64-bit constants placed after the cold code: (offset of the rip-relative disp32 that
    /// reads it, value).
    literals: Vec<(usize, u64)>,
    guest_rip: u64,
    guest_len: u8,
    /// Base register of the memory operand being rewritten (for the TLB-miss segment bit).
    mem_base: Register,
    /// How alignment checking treats the current instruction's access (`alignment.rs`).
    alignment_check: alignment::AlignmentCheck,
    /// The guest's XCR0 (copied `xsave`/`xrstor` are narrowed to it when the host's is wider).
    guest_xcr0: u64,
    /// The current instruction stores an MMX register (see `context::MISS_MMX_STORE`).
    mmx_store: bool,
    /// The current instruction may touch only part of its memory operand (see
    /// `context::MISS_PARTIAL`).
    partial_access: bool,
    /// The lookup being emitted is a window's (`window.rs`, `context::MISS_WINDOW`): Some(settled).
    window_lookup: Option<bool>,
    /// The block's windows (`window.rs`).
    windows: window::WindowPlan,
    /// The block's loop windows (`loop_window.rs`).
    loops: loop_window::LoopPlan,
    /// Index in the block of the instruction being emitted.
    index: usize,
    /// The current instruction is `vcvtps2ph` to memory (see `context::MISS_F16C_STORE`).
    f16c_store: bool,
    /// The alignment the current access requires (`alignment.rs`, `context::MISS_ALIGN_SHIFT`).
    required_alignment: alignment::Requirement,
    /// The host address of the previous copied instruction's memory operand, still in the
    /// register that was borrowed for it (`memop.rs`).
    held: Option<memop::HeldAddress>,
    /// Borrowed registers (a subset of `spilled`) given back lazily: the TLB lookups' scratch
    /// registers stay borrowed, their guest values in the spill slots, until an instruction
    /// that names them, anything but a copied instruction, or the block's end
    /// (`take_scratch`). A store and a load per register and access were most of a
    /// memory-heavy block's glue (three registers per access).
    lazy: u16,
    /// The GPRs the instruction being emitted names, explicitly or not: a scratch register
    /// among them (RCX, which the flag-free lookup always borrows) goes back at once. All of
    /// them for anything but a copied instruction (its glue may leave the block within the
    /// instruction; only a copied one is followed by an instruction start that gives back
    /// what is needed) and at the block's end: nothing is given back lazily then.
    names: u16,
    /// Lazily borrowed registers the instruction being emitted overwrites whole: still
    /// borrowed (the spill slot has the value a fault must show) until it is emitted.
    overwrite_pending: u16,
    /// The block's guest instructions use RCX (see `tlb_lookup_flag_free`).
    block_uses_rcx: bool,
    /// The GPRs the block's guest instructions name, explicitly or not (bit per hardware
    /// number; see `pick`).
    block_names: u16,
    /// The block's guest start (its own loop's back edges go there).
    block_start: u64,
    /// Registers borrowed at the block's entry and kept borrowed at its back edges, and the
    /// loop head's offset after those stores (see [`emit_block`]).
    loop_keep: u16,
    loop_head: Option<u32>,
    count_tlb_hits: bool,
    interrupt_line: Option<u64>,
    info: InstructionInfoFactory,
    /// Each instruction of the block with what it uses ([`BlockEmitter::uses`]).
    uses: Vec<(Instruction, memop::Uses)>,
}

/// The buffers a block's emission works in, kept from one block to the next by the
/// translator: allocating them anew for each block (the code, the encoder's buffer, the cold
/// paths, the literals, what each instruction uses, iced's instruction-info tables) cost ≈8%
/// of a Linux boot's translation time (0.354–0.366 s against 0.323–0.336 s, AMD EPYC). The code goes out in [`EmittedBlock::code`] and comes back
/// through [`EmitScratch::recycle`] once it is copied into the code cache.
#[derive(Default)]
pub struct EmitScratch {
    code: Vec<u8>,
    /// Grown here, copied out at their exact length: a block's sites and exits stay with it,
    /// and a fresh `Vec` grown for each block reallocated a few times per block (translation
    /// 7.24–8.66 against 7.57–10.16 µs per block, 6 interleaved bt boots, AMD EPYC; and no
    /// spare capacity kept with each block).
    sites: Vec<HostSite>,
    exits: Vec<ExitPatch>,
    encoder: Option<iced_x86::Encoder>,
    info: Option<InstructionInfoFactory>,
    cold: Vec<Cold>,
    literals: Vec<(usize, u64)>,
    uses: Vec<(Instruction, memop::Uses)>,
}

impl EmitScratch {
    /// Takes back an emitted block's code buffer (its bytes are no longer needed).
    pub fn recycle(&mut self, code: Vec<u8>) {
        self.code = code;
    }
}

/// How a block is emitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmitOptions {
    pub soft_mmu: bool,
    /// Soft-MMU only: the block's single access crosses a page boundary and the engine has
    /// mapped both pages contiguously (a bounce buffer), so the crossing check is left out
    /// (such a block is also `dispatcher_only`).
    pub split_access: bool,
    /// A one-off step's block (`engine/cache.rs`, `Block::dispatcher_only`): its indirect
    /// branches go straight back to the dispatcher, which ends the step.
    pub dispatcher_only: bool,
    /// The guest's XCR0 (`GuestState::xcr0`); the engine retranslates when it changes.
    pub guest_xcr0: u64,
    /// System mode (`Config::system`).
    pub system: bool,
    /// System mode: the block runs at CPL0 (`rules::Mode::kernel`).
    pub kernel: bool,
    /// Address of the interrupt controller's INTR line (one byte, 0 or 1), if translated code
    /// may read it (`Translator::set_interrupt_line`).
    pub interrupt_line: Option<u64>,
    /// See `rules::Mode::host_tsc`.
    pub host_tsc: bool,
    /// 32-bit code (`rules::Mode::compat`).
    pub compat: bool,
    /// Count soft-MMU TLB hits in `Context::tlb_hits` (`--stats`; three instructions a hit).
    pub count_tlb_hits: bool,
    /// A block that touches the extended state first checks that it is not held elsewhere
    /// (`Context::extended_state_stale`, `Translator::set_extended_state_handover`).
    pub extended_state_check: bool,
    /// The glue moves the extended state lazily (system mode, `glue.rs`): a block that touches
    /// it loads it first if this entry has not.
    pub lazy_extended_state: bool,
}

impl EmitOptions {
    fn mode(&self) -> crate::rules::Mode {
        crate::rules::Mode {
            soft_mmu: self.soft_mmu,
            system: self.system,
            kernel: self.kernel,
            interrupt_line: self.interrupt_line.is_some(),
            host_tsc: self.host_tsc,
            compat: self.compat,
        }
    }
}

/// The order glue picks scratch registers in (hardware numbers; never RSP).
const SCRATCH_ORDER: [usize; 15] = [11, 10, 9, 8, 3, 5, 6, 7, 12, 13, 14, 15, 2, 1, 0];

/// Emits `block` for host address `base`.
///
/// A block that loops to its own start (a `jcc`/`jmp` back to it, or a fall-through end at
/// it: see `block.rs`) and accesses memory through the soft-MMU borrows, at its entry, the
/// scratch registers its TLB lookups will take ([`BlockEmitter::loop_scratch`]); the loop
/// head comes after those stores and the back edges keep them borrowed — each iteration of
/// SHA-256's message-schedule loop gave back and borrowed again three registers (six memory
/// accesses for 22 guest instructions). (Emitting such a block twice, to learn what its back
/// edges hold, cost a Linux boot ≈20% more translation time.) A counted loop's entry first
/// checks its loop windows (`loop_window.rs`), whose registers the back edges keep too.
pub fn emit_block(
    block: &DecodedBlock,
    base: u64,
    glue: &Glue,
    options: EmitOptions,
    windowless: &std::collections::HashSet<u64>,
    scratch: &mut EmitScratch,
    miss_sites: &mut miss_site::MissSites,
) -> Result<EmittedBlock, TranslateError> {
    let soft_mmu = options.soft_mmu;
    let mut e = BlockEmitter {
        asm: Asm::reusing(base, std::mem::take(&mut scratch.code), scratch.encoder.take()),
        glue,
        miss_sites,
        soft_mmu,
        mode: options.mode(),
        split_access: options.split_access,
        dispatcher_only: options.dispatcher_only,
        spilled: 0,
        flags_in_slot: false,
        sites: std::mem::take(&mut scratch.sites),
        exits: std::mem::take(&mut scratch.exits),
        inline_caches: Vec::new(),
        cold: std::mem::take(&mut scratch.cold),
        literals: std::mem::take(&mut scratch.literals),
        guest_rip: 0,
        guest_len: 0,
        mem_base: Register::None,
        alignment_check: alignment::AlignmentCheck::BySize,
        guest_xcr0: options.guest_xcr0,
        mmx_store: false,
        partial_access: false,
        window_lookup: None,
        windows: Default::default(),
        loops: Default::default(),
        index: 0,
        f16c_store: false,
        required_alignment: alignment::Requirement::default(),
        held: None,
        lazy: 0,
        names: u16::MAX,
        overwrite_pending: 0,
        block_uses_rcx: block.instrs.iter().any(|d| names_rcx(&d.instr)),
        block_start: block.start,
        block_names: 0,
        loop_keep: 0,
        loop_head: None,
        count_tlb_hits: options.count_tlb_hits,
        interrupt_line: options.interrupt_line,
        info: scratch.info.take().unwrap_or_else(InstructionInfoFactory::new),
        uses: std::mem::take(&mut scratch.uses),
    };
    // (The cold paths and literals of the last block were all emitted, so taken off.)
    debug_assert!(e.cold.is_empty() && e.literals.is_empty());
    e.uses.clear();
    for d in &block.instrs {
        let uses = memop::Uses::of(e.info.info(&d.instr));
        e.uses.push((d.instr, uses));
    }
    // Indirect branches enter through the prologue (see `branch.rs`).
    e.asm.glue(Instruction::with2(
        Code::Mov_r64_rm64,
        Register::R11,
        spill_slot(Register::R11),
    ));
    debug_assert_eq!(e.asm.buf.len() as u64, IBL_PROLOGUE_LEN);
    if (options.extended_state_check || options.lazy_extended_state)
        && block.instrs.iter().any(|d| touches_extended_state(&d.instr))
    {
        e.extended_state_check(options.extended_state_check, options.lazy_extended_state);
    }
    e.block_names = e.uses.iter().fold(0, |m, (_, u)| m | u.named);
    e.loops = e.plan_loop_windows(block, options.dispatcher_only, windowless);
    e.open_loop_windows(block.start);
    let keep = e.loop_scratch(block, options, e.loops.registers());
    if let Some(keep) = keep {
        e.borrow_all(keep);
        e.lazy = keep;
        e.loop_keep = keep;
    }
    if keep.is_some() || e.loops.held != 0 {
        e.loop_head = Some(e.asm.buf.len() as u32);
    }
    e.plan_windows(block, windowless);
    for (index, d) in block.instrs.iter().enumerate() {
        e.index = index;
        // A host address kept from the last instruction serves only a copied instruction with
        // the same memory operand (`memop.rs`, `HeldAddress`).
        let copied_memory =
            d.flow == Flow::Normal && d.rule == Rule::Copy && d.instr.op_kinds().any(|k| k == iced_x86::OpKind::Memory);
        if !copied_memory {
            e.release_held();
        }
        // Lazily given-back registers: a copied instruction needs back only those it names;
        // anything else (glue that exits, branches, stack operations) all of them.
        let copied = d.flow == Flow::Normal
            && matches!(d.rule, Rule::Copy | Rule::UserCopy | Rule::Implicit(_))
            && !d.rule.runs_in_engine(&d.instr, e.mode);
        // A register the instruction only overwrites (32 or 64 bits) needs no reload: it
        // stays borrowed while the instruction is emitted (a fault in it must show the old
        // value, from the spill slot) and is the instruction's own afterwards.
        // A direct `jcc`/`jmp` gives them back only on its taken side (`Cold::Exit`): the
        // fall-through side goes on with them borrowed, so an extended block's next access
        // needs no store again.
        // A followed `jmp` emits nothing: nothing needs them back.
        let direct = d.flow == Flow::Followed
            || d.flow == Flow::Normal
                && matches!(
                    d.rule,
                    Rule::Branch(crate::rules::BranchKind::Jcc | crate::rules::BranchKind::Jmp)
                );
        // A `ret` or a direct `call` takes them for its own stack access and gives back the rest
        // after it (`branch.rs`); an inlined call's push goes on with them: given back here,
        // the access's lookup borrowed them again, a store each.
        let stack_branch = d.flow == Flow::InlinedCall
            || d.flow == Flow::Normal
                && matches!(
                    d.rule,
                    Rule::Branch(crate::rules::BranchKind::Ret | crate::rules::BranchKind::Call)
                );
        let (needed, overwritten) = if copied {
            let uses = e.uses[index].1;
            (uses.read, uses.overwritten)
        } else if direct || stack_branch {
            (0, 0)
        } else {
            (u16::MAX, 0)
        };
        e.flush_lazy(needed);
        e.names = needed | overwritten;
        e.overwrite_pending = e.lazy & overwritten;
        e.lazy &= !e.overwrite_pending;
        e.guest_rip = d.instr.ip();
        e.guest_len = d.instr.len() as u8;
        // Linux's UMIP emulator performs these stores itself, without alignment checking.
        e.alignment_check = alignment::AlignmentCheck::for_instruction(&d.instr, d.rule == Rule::UserCopy);
        e.mmx_store = is_mmx_store(&d.instr);
        e.partial_access = crate::mmu::masked::is_masked_access(&d.instr) || xstate::is_xstate(&d.instr);
        e.f16c_store = d.instr.mnemonic() == iced_x86::Mnemonic::Vcvtps2ph
            && d.instr.op0_kind() == iced_x86::OpKind::Memory
            && crate::cpu::vendor::host_has(crate::cpu::vendor::Quirk::F16cStoreFaultKeepsConversion);
        e.required_alignment = alignment::requirement(&d.instr);
        match d.flow {
            Flow::Normal => {}
            Flow::Followed => continue,
            Flow::InlinedCall => {
                e.push_return(d.instr.next_ip())?;
                continue;
            }
            Flow::InlinedRet => {
                e.inlined_ret();
                continue;
            }
        }
        if d.rule.runs_in_engine(&d.instr, e.mode) {
            if e.string_in_place(&d.instr) {
                e.string(&d.instr)?;
            } else {
                e.exit_to_engine(ExitReason::Emulate, d.instr.ip());
            }
            continue;
        }
        match d.rule {
            Rule::Copy | Rule::UserCopy | Rule::Implicit(_) => {
                if !e.loop_access(index, &d.instr)? && !e.window_access(index, &d.instr)? {
                    e.copy(&d.instr, d.bytes())?
                }
            }
            // With an FS/GS override the operand is rewritten, and `pop [rsp+x]` must then see RSP
            // after the pop: the decomposition handles that.
            Rule::Stack(_) if !soft_mmu && !has_fs_gs(&d.instr) => e.copy(&d.instr, d.bytes())?,
            Rule::Stack(op) => e.stack(&d.instr, op)?,
            Rule::Branch(kind) => e.branch(&d.instr, kind)?,
            // CPL0 (`Rule::runs_in_engine`): inlined system instructions (`system.rs`).
            Rule::Emulate(_) | Rule::System(_) => e.inline_system(&d.instr, d.rule, d.bytes()),
        }
        e.spilled &= !std::mem::take(&mut e.overwrite_pending);
        e.close_loop_windows(index);
        debug_assert_eq!(
            e.spilled & !(e.held_mask() | e.lazy),
            0,
            "glue left a register borrowed"
        );
    }
    e.names = u16::MAX;
    e.release_held();
    if !block.ends_in_transfer() {
        e.direct_exit(Code::Jmp_rel32_64, block.end);
    }
    e.emit_cold();
    let (code, encoder) = e.asm.into_parts();
    scratch.encoder = Some(encoder);
    scratch.info = Some(e.info);
    scratch.cold = e.cold;
    scratch.literals = e.literals;
    scratch.uses = e.uses;
    let (sites, exits) = (e.sites.to_vec(), e.exits.to_vec());
    scratch.sites = e.sites;
    scratch.sites.clear();
    scratch.exits = e.exits;
    scratch.exits.clear();
    Ok(EmittedBlock {
        code,
        sites,
        exits,
        inline_caches: e.inline_caches,
        windows: e.windows.opened,
        window_accesses: e.windows.accesses,
        loop_windows: e.loops.opened,
        loop_window_accesses: e.loops.accesses,
    })
}

/// Whether `instr` names RCX (or a part of it) as an operand or in its address, or uses it as
/// a REP count: a cheap test, used only to choose between two correct code shapes.
fn names_rcx(instr: &Instruction) -> bool {
    let rcx = |r: Register| r.is_gpr() && r.full_register() == Register::RCX;
    (0..instr.op_count()).any(|i| instr.op_kind(i) == iced_x86::OpKind::Register && rcx(instr.op_register(i)))
        || rcx(instr.memory_base())
        || rcx(instr.memory_index())
        || instr.has_rep_prefix()
        || instr.has_repne_prefix()
}

/// `movd/movq m, mm`, `movntq m64, mm`: a store from an MMX register.
fn is_mmx_store(instr: &Instruction) -> bool {
    instr.op_count() == 2
        && instr.op0_kind() == iced_x86::OpKind::Memory
        && instr.op1_kind() == iced_x86::OpKind::Register
        && instr.op1_register().is_mm()
}

fn has_fs_gs(instr: &Instruction) -> bool {
    matches!(instr.segment_prefix(), Register::FS | Register::GS)
}

impl BlockEmitter<'_> {
    fn site_here(&mut self, start: usize) {
        let end = self.asm.buf.len();
        self.sites.push(HostSite {
            start: start as u32,
            end: end as u32,
            site: FaultSite {
                guest_rip: self.guest_rip,
                guest_len: self.guest_len,
                spilled: self.spilled,
                flags_in_slot: self.flags_in_slot,
            },
        });
    }

    /// Copies raw guest bytes (no memory operand, no RIP dependence).
    fn raw(&mut self, bytes: &[u8]) {
        let start = self.asm.buf.len();
        self.asm.buf.extend_from_slice(bytes);
        self.site_here(start);
    }

    fn copy(&mut self, instr: &Instruction, bytes: &[u8]) -> Result<(), TranslateError> {
        if instr.op_kinds().any(|k| k == iced_x86::OpKind::Memory) {
            self.mem_instr(instr, Some(bytes), 0)
        } else if self.mode.compat {
            // 32-bit code's bytes mean something else in 64-bit mode (0x40-0x4f are REX):
            // re-encoded from the decoded form.
            let start = self.asm.buf.len();
            self.asm.emit(instr)?;
            self.site_here(start);
            Ok(())
        } else {
            self.raw(bytes);
            Ok(())
        }
    }

    /// Borrows a register: stores its guest value in its spill slot.
    fn borrow(&mut self, reg: Register) {
        let n = asm::reg_num(reg);
        debug_assert_eq!(self.spilled & (1 << n), 0);
        self.asm.mov_to_ctx(asm::spill_offset(reg), reg);
        self.spilled |= 1 << n;
    }

    /// Borrows every register in `mask` (bit per hardware number), none borrowed yet.
    fn borrow_all(&mut self, mask: u16) {
        debug_assert_eq!(self.spilled & mask, 0);
        self.store_spills(mask);
        self.spilled |= mask;
    }

    /// Stores the guest values of the registers in `mask` in their spill slots (the inverse
    /// of [`BlockEmitter::restore_guest`], for code whose borrowing is not tracked: cold paths).
    fn store_spills(&mut self, mask: u16) {
        for n in (0..16).filter(|n| mask & (1 << n) != 0) {
            let r = asm::gpr64(n);
            self.asm.mov_to_ctx(asm::spill_offset(r), r);
        }
    }

    /// Gives a borrowed register back its guest value.
    fn give_back(&mut self, reg: Register) {
        self.asm.mov_from_ctx(reg, asm::spill_offset(reg));
        self.spilled &= !(1 << asm::reg_num(reg));
    }

    /// A scratch register not in `avoid`: one borrowed lazily already (no store), else a
    /// fresh borrow. Give it back with [`BlockEmitter::release_scratch`].
    fn take_scratch(&mut self, avoid: u16) -> Register {
        if let Some(&n) = SCRATCH_ORDER.iter().find(|&&n| self.lazy & !avoid & (1 << n) != 0) {
            self.lazy &= !(1 << n);
            return asm::gpr64(n);
        }
        let r = self.pick(avoid);
        self.borrow(r);
        r
    }

    /// Gives a scratch register back lazily: its guest value stays in the spill slot until
    /// [`BlockEmitter::flush_lazy`] (fault sites and exits restore it from there meanwhile).
    fn release_scratch(&mut self, reg: Register) {
        if self.names & (1 << asm::reg_num(reg)) == 0 {
            self.lazy |= 1 << asm::reg_num(reg);
        } else {
            self.give_back(reg);
        }
    }

    /// Borrows `reg` for glue: one given back lazily is taken as it is (its guest value is in
    /// its slot), one not borrowed is stored first, one borrowed already stays so.
    fn claim(&mut self, reg: Register) {
        let bit = 1 << asm::reg_num(reg);
        if self.lazy & bit != 0 {
            self.lazy &= !bit;
        } else if self.spilled & bit == 0 {
            self.borrow(reg);
        }
    }

    /// Whether `reg` is borrowed but idle — given back lazily, or about to be overwritten by
    /// the instruction — so glue may use it without storing it again.
    fn borrowed_idle(&self, reg: Register) -> bool {
        (self.lazy | self.overwrite_pending) & (1 << asm::reg_num(reg)) != 0
    }

    /// Gives back the lazily borrowed registers in `mask`.
    fn flush_lazy(&mut self, mask: u16) {
        for n in 0..16 {
            if self.lazy & mask & (1 << n) != 0 {
                self.lazy &= !(1 << n);
                self.give_back(asm::gpr64(n));
            }
        }
    }

    /// The scratch registers a block that loops to its own start keeps borrowed round the loop,
    /// if it is one and accesses memory through the soft-MMU: those its first flag-free TLB
    /// lookup takes (`memop.rs`) — RCX, or in a block that names RCX a register to park it in,
    /// and two more — which [`BlockEmitter::pick`] and the lazy borrowing make the ones every
    /// later lookup takes too, among the registers the block never names. A wrong guess costs
    /// a store or a load per iteration, as before; the fault sites record what is borrowed.
    fn loop_scratch(&self, block: &DecodedBlock, options: EmitOptions, taken: u16) -> Option<u16> {
        use crate::rules::BranchKind;
        if !self.soft_mmu || options.dispatcher_only {
            return None;
        }
        let back_edge = |d: &crate::block::DecodedInstr| {
            d.flow == Flow::Normal
                && matches!(d.rule, Rule::Branch(BranchKind::Jcc | BranchKind::Jmp))
                && d.instr.near_branch64() == block.start
        };
        let loops = block.instrs.iter().any(back_edge) || !block.ends_in_transfer() && block.end == block.start;
        let accesses = block
            .instrs
            .iter()
            .any(|d| matches!(d.rule, Rule::Stack(_)) || d.instr.op_kinds().any(|k| k == iced_x86::OpKind::Memory));
        if !loops || !accesses {
            return None;
        }
        // (`block_names` holds every use of RCX, `block_uses_rcx` only the explicit ones.)
        let rcx_free = self.block_names & (1 << 1) == 0;
        let mut keep = if rcx_free { 1 << 1 } else { 0 };
        let unnamed = SCRATCH_ORDER
            .iter()
            .filter(|&&n| n != 1 && (self.block_names | taken) & (1 << n) == 0);
        for &n in unnamed.take(if rcx_free { 2 } else { 3 }) {
            keep |= 1 << n;
        }
        (keep != 0).then_some(keep)
    }

    /// Picks a register not in `avoid` (bit per hardware number), not RSP and not borrowed:
    /// one the block's guest code never names if there is one, so that, borrowed lazily, it
    /// stays borrowed to the block's end (and round its loop) instead of going back and
    /// being borrowed again around each guest instruction that names it. (Compilers give
    /// leaf code R8–R11 first, the registers glue preferred alone: SHA-256's round loop gave
    /// back and borrowed three of them every iteration.)
    fn pick(&self, avoid: u16) -> Register {
        let taken = avoid | self.spilled | (1 << 4);
        let n = SCRATCH_ORDER
            .iter()
            .copied()
            .find(|&n| (taken | self.block_names) & (1 << n) == 0)
            .or_else(|| SCRATCH_ORDER.iter().copied().find(|&n| taken & (1 << n) == 0))
            .expect("a free scratch register");
        asm::gpr64(n)
    }

    /// What `instr` uses: from the table made at the block's start when it is the instruction
    /// being emitted (the planners index that table themselves); any other (glue re-encodes
    /// some guest instructions in another form) worked out afresh.
    fn uses(&mut self, instr: &Instruction) -> memop::Uses {
        match self.uses.get(self.index) {
            Some((i, u)) if i == instr && i.ip() == instr.ip() => *u,
            _ => memop::Uses::of(self.info.info(instr)),
        }
    }

    /// Registers (bit per hardware number) an instruction reads or writes, explicitly or not.
    fn used_gprs(&mut self, instr: &Instruction) -> u16 {
        self.uses(instr).named
    }

    /// Saves guest flags on the host flag stack (only `mov`s touch RSP; flags are intact).
    fn save_flags(&mut self) {
        self.asm.mov_to_ctx(off::RSP_SAVE, Register::RSP);
        self.asm.mov_from_ctx(Register::RSP, off::FLAG_STACK_TOP);
        self.asm.op0(Code::Pushfq);
        self.asm.mov_from_ctx(Register::RSP, off::RSP_SAVE);
        self.flags_in_slot = true;
    }

    fn restore_flags(&mut self) {
        self.asm.mov_to_ctx(off::RSP_SAVE, Register::RSP);
        self.asm.mov_from_ctx(Register::RSP, off::FLAG_SLOT);
        self.asm.op0(Code::Popfq);
        self.asm.mov_from_ctx(Register::RSP, off::RSP_SAVE);
        self.flags_in_slot = false;
    }

    /// Points the forward branch whose rel32 is at `field` here.
    fn bind_here(&mut self, field: usize) {
        let here = self.asm.here();
        self.asm.bind(field, here);
    }

    /// Out-of-line paths: puts the guest flags (if parked) and the borrowed registers back.
    fn restore_guest(&mut self, spilled: u16, flags_saved: bool) {
        if flags_saved {
            self.restore_flags();
        }
        for n in 0..16 {
            if spilled & (1 << n) != 0 {
                let r = asm::gpr64(n);
                self.asm.glue(Instruction::with2(Code::Mov_r64_rm64, r, spill_slot(r)));
            }
        }
    }

    /// With RCX borrowed: when the byte at `flag` is nonzero, exits with `reason` at `rip` (RCX
    /// given back in the cold part first); otherwise goes on. Flag-free (`movzx`, `jrcxz`).
    /// Gives RCX back.
    fn exit_if_flag(&mut self, flag: iced_x86::MemoryOperand, reason: ExitReason, rip: u64) {
        let field = self.jump_if_flag(flag);
        self.cold.push(Cold::RcxExit { field, reason, rip });
        self.give_back(Register::RCX);
    }

    /// With RCX borrowed: `movzx ecx, byte flag; jrcxz +5; jmp rel32` — returns the rel32 field
    /// of the jump taken when the byte is nonzero. Flag-free.
    fn jump_if_flag(&mut self, flag: iced_x86::MemoryOperand) -> usize {
        self.asm
            .glue(Instruction::with2(Code::Movzx_r32_rm8, Register::ECX, flag));
        let clear = self.asm.here() + 2 + 5;
        self.asm.glue(Instruction::with_branch(Code::Jrcxz_rel8_64, clear));
        self.asm.branch32_forward(Code::Jmp_rel32_64)
    }

    /// Ends the block: the engine handles the instruction at `rip`.
    fn exit_to_engine(&mut self, reason: ExitReason, rip: u64) {
        self.asm.store_ctx_u64(off::RIP, rip);
        self.asm.store_ctx_u32(off::EXIT_REASON, reason as u32);
        let exit = self.glue.exit;
        self.asm.branch32(Code::Jmp_rel32_64, exit);
    }

    /// The exit of a direct `jcc`/`jmp` (or a block's fall-through end) to guest `target`,
    /// with only lazily borrowed registers borrowed: they stay so past a `jcc`, and the taken
    /// side gives them back (`Cold::Exit`) — but those a back edge to the block's own start
    /// keeps borrowed into the loop head (see [`emit_block`]).
    fn direct_exit(&mut self, code: Code, target: u64) {
        debug_assert_eq!(
            self.spilled & !(self.loops.held | self.window_mask()),
            self.lazy,
            "only lazily borrowed registers (and windows') at a direct exit"
        );
        let keep = if target == self.block_start {
            self.loop_keep | self.loops.held
        } else {
            0
        };
        if code == Code::Jmp_rel32_64 {
            // Unconditional: the registers change hands in line, no trampoline.
            self.flush_lazy(!keep);
            self.borrow_all(keep & !self.spilled);
        }
        let field = self.asm.branch32_forward(code);
        self.cold.push(Cold::Exit {
            field,
            target,
            restore: self.spilled,
            keep,
        });
        if code == Code::Jmp_rel32_64 {
            // Nothing runs after it: nothing is borrowed there.
            self.spilled = 0;
            self.lazy = 0;
        }
    }

    /// A chainable jump (`code` is `jmp rel32` or a `jcc rel32`) to guest `target`.
    fn exit_jump(&mut self, code: Code, target: u64) {
        let field = self.asm.branch32_forward(code);
        self.cold.push(Cold::Exit {
            field,
            target,
            restore: 0,
            keep: 0,
        });
    }

    fn emit_cold(&mut self) {
        let mut cold_paths = std::mem::take(&mut self.cold);
        for cold in cold_paths.drain(..) {
            match cold {
                Cold::Exit {
                    field,
                    target,
                    restore,
                    keep,
                } => {
                    let field = if restore != keep {
                        self.bind_here(field);
                        self.restore_guest(restore & !keep, false);
                        self.store_spills(keep & !restore);
                        self.asm.branch32_forward(Code::Jmp_rel32_64)
                    } else {
                        field
                    };
                    let here = self.asm.here();
                    self.asm.bind(field, here);
                    let stub = (here - self.asm.base()) as u32;
                    self.restore_guest(keep, false);
                    let link = self.asm.base() + field as u64;
                    self.asm.store_ctx_u64(off::RIP, target);
                    self.asm.store_ctx_u64(off::EXIT_LINK, link);
                    self.asm.store_ctx_u32(off::EXIT_REASON, ExitReason::Branch as u32);
                    let exit = self.glue.exit;
                    self.asm.branch32(Code::Jmp_rel32_64, exit);
                    self.exits.push(ExitPatch {
                        field: field as u32,
                        target,
                        stub,
                        link_at: self.loop_head.filter(|_| keep != 0),
                    });
                }
                Cold::CacheFill {
                    field,
                    imm_field,
                    cache,
                    guest_rip,
                    rsp_delta,
                } => {
                    let here = self.asm.here();
                    self.asm.bind(field, here);
                    let site = self.asm.base() + imm_field as u64;
                    self.asm.store_ctx_u64(off::EXIT_LINK, site);
                    self.guest_rip = guest_rip;
                    self.record_branch(rsp_delta);
                    let miss = self.glue.ibl_miss;
                    self.asm.branch32(Code::Jmp_rel32_64, miss);
                    self.inline_caches[cache].fill_stub = (here - self.asm.base()) as u32;
                }
                Cold::TableMiss {
                    field,
                    guest_rip,
                    rsp_delta,
                } => {
                    self.bind_here(field);
                    self.guest_rip = guest_rip;
                    self.record_branch(rsp_delta);
                    let miss = self.glue.ibl_miss;
                    self.asm.branch32(Code::Jmp_rel32_64, miss);
                }
                Cold::Raise {
                    field,
                    vector,
                    error_code,
                    guest_rip,
                    spilled,
                    flags_saved,
                } => {
                    self.bind_here(field);
                    self.restore_guest(spilled, flags_saved);
                    self.asm.store_ctx_u32(off::FAULT_VECTOR, vector as u32);
                    self.asm.store_ctx_u32(off::FAULT_ERROR_CODE, error_code);
                    self.exit_to_engine(ExitReason::Fault, guest_rip);
                }
                Cold::RcxExit { field, reason, rip } => {
                    self.bind_here(field);
                    self.asm.mov_from_ctx(Register::RCX, asm::spill_offset(Register::RCX));
                    self.exit_to_engine(reason, rip);
                }
                Cold::LoadExtendedState { field, back } => {
                    self.bind_here(field);
                    self.asm.glue(Instruction::with2(
                        Code::Lea_r64_m,
                        Register::RCX,
                        iced_x86::MemoryOperand::with_base_displ(Register::RIP, back as i64),
                    ));
                    self.asm.mov_to_ctx(off::EXTENDED_STATE_RETURN, Register::RCX);
                    let load = self.glue.load_extended_state;
                    self.asm.branch32(Code::Jmp_rel32_64, load);
                }
                Cold::ToEngine {
                    fields,
                    guest_rip,
                    spilled,
                    flags_saved,
                } => {
                    for field in fields {
                        self.bind_here(field);
                    }
                    self.restore_guest(spilled, flags_saved);
                    self.exit_to_engine(ExitReason::Emulate, guest_rip);
                }
                Cold::TlbMiss {
                    field,
                    va_reg,
                    info,
                    guest_rip,
                    spilled,
                    flags_saved,
                    parked_rcx,
                } => {
                    self.bind_here(field);
                    self.asm.mov_to_ctx(off::MISS_VA, va_reg);
                    let site = self.miss_sites.push(miss_site::MissSite {
                        info,
                        guest_rip,
                        spilled,
                        flags_saved,
                        parked_rcx: parked_rcx.map(|p| asm::reg_num(p) as u8),
                    });
                    self.asm.store_ctx_u32(off::MISS_SITE, site);
                    let glue = self.glue.tlb_miss;
                    self.asm.branch32(Code::Jmp_rel32_64, glue);
                }
            }
        }
        // (Emitting cold paths adds none; the emptied list is kept for the next block.)
        debug_assert!(self.cold.is_empty());
        self.cold = cold_paths;
        // Literals last, 8-byte aligned (the padding is never executed).
        if !self.literals.is_empty() {
            while !self.asm.here().is_multiple_of(8) {
                self.asm.buf.push(0xcc);
            }
            for i in 0..self.literals.len() {
                let (field, value) = self.literals[i];
                let here = self.asm.here();
                self.asm.bind(field, here);
                self.asm.buf.extend_from_slice(&value.to_le_bytes());
            }
            self.literals.clear();
        }
    }
}

//! Soft-MMU windows: one TLB lookup for a run of accesses through one base register.
//!
//! Compiled code walks arrays and structures through a register: `mov esi,[rdx+38h]; mov
//! edi,[rdx+4]; add rdx,4; mov esi,[rdx-4]; add esi,[rdx+20h]` (SHA-256's message schedule).
//! Each access had its own inline TLB lookup (≈18 host instructions). Within a straight run
//! of copied instructions — conditional branches included: their taken side leaves the block
//! and gives every borrowed register back — the base register's value is known relative to its
//! value at the run's first access (constant `add`/`sub`/`lea`/`inc`/`dec` move it; any other
//! write ends the run), so every access of the run lies in a known range around it: the
//! *window*. One lookup of the whole window — it must lie in one page, present in the TLB (the
//! write TLB if the first access writes) — leaves the host address of its start in a borrowed
//! register H, and each access of the run becomes `[H + constant]`.
//!
//! The lookup of a window is not an access of the guest's: its miss never faults. The engine
//! (`engine/softmmu.rs`) fills the TLB when the window's page translates for the first
//! access's kind (which runs next and would set the same accessed/dirty bits), and otherwise
//! runs that first access alone, through its own lookup, which faults or crosses pages
//! exactly as the CPU would; a window that fails that way again and again (a structure
//! straddling two pages) is not opened again (`Translator::windowless`).
//!
//! `push r64`/`pop r64` are accesses through RSP that move it by 8: a prologue's pushes make
//! one window.
//!
//! Rules for a run: a run with a store is a write window (its lookup is of the write TLB); one
//! whose first access reads — a read-modify-write through one register, `mov r13,[rdi]; sub
//! r13,rax; mov [rdi],r13` in the kernel's multi-precision arithmetic — is *settled*: its miss
//! fills the TLB only from a walk that sets no accessed or dirty bit (the page already dirty),
//! since setting a dirty bit at the lookup, before any store ran, would be the translator's
//! invention; otherwise the first access runs alone, and sets what it sets. At most
//! [`MAX_WINDOW`] bytes; only plain accesses (no index register, no FS/GS,
//! not RIP-relative, no opmask, nothing the miss path treats specially); at most two windows
//! open at once (each holds a register); H is a register no instruction of the run names.

use super::{BlockEmitter, Rule};
use crate::block::{DecodedBlock, Flow};
use crate::mmu::Access;
use iced_x86::{Code, Instruction, OpKind, Register};
use std::collections::HashSet;

/// The widest window (bytes): wider ones straddle pages more often.
const MAX_WINDOW: i64 = 512;
/// Windows open at once.
const MAX_OPEN: usize = 2;

/// One window: accesses through `base`, within `[lo, hi)` of the base's value at the first.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    base: Register,
    lo: i64,
    hi: i64,
    access: Access,
    /// A write window whose first access reads: filled only from a settled walk.
    settled: bool,
    /// Index (in the block) of its last access: H is given back after it.
    last: usize,
    /// Registers the instructions from its first access to its last name (H must be none).
    avoid: u16,
}

/// An instruction's place in a window.
#[derive(Clone, Copy, Debug)]
pub(super) struct Member {
    window: usize,
    /// Its operand's address minus the window's start.
    offset: i64,
    first: bool,
}

/// The windows of one block.
#[derive(Default)]
pub(super) struct WindowPlan {
    windows: Vec<Window>,
    at: Vec<Option<Member>>,
    /// H of each window while it is open (None before, after, or when no register was free).
    held: Vec<Option<Register>>,
    /// Windows opened and the accesses they took (`--stats`).
    pub opened: u32,
    pub accesses: u32,
}

/// A run being collected.
struct Open {
    base: Register,
    /// The base register's value now minus its value at the first access.
    delta: i64,
    lo: i64,
    hi: i64,
    access: Access,
    settled: bool,
    members: Vec<(usize, i64)>,
    /// Registers named from the first access on, and as of the last access so far (H must be
    /// none of the latter: what the instructions after the last name does not matter).
    avoid: u16,
    avoid_to_last: u16,
}

impl BlockEmitter<'_> {
    /// Finds the windows of `block` (none unless soft-MMU, flag-free lookups and a whole block).
    pub(super) fn plan_windows(&mut self, block: &DecodedBlock, windowless: &HashSet<u64>) {
        let mut plan = WindowPlan {
            at: vec![None; block.instrs.len()],
            ..WindowPlan::default()
        };
        let usable =
            self.soft_mmu && !self.split_access && crate::host::features::host_has(iced_x86::CpuidFeature::BMI2);
        if usable {
            let mut open: Vec<Open> = Vec::new();
            for (i, d) in block.instrs.iter().enumerate() {
                let copied =
                    d.flow == Flow::Normal && d.rule == Rule::Copy && !d.rule.runs_in_engine(&d.instr, self.mode);
                // A conditional branch leaves the run open: its taken side gives every borrowed
                // register back (`Cold::Exit`), H with the rest, and the fall-through goes on
                // with H. A followed `jmp` emits nothing. (`memcmp`-like loops and deflate's
                // `longest_match` test a byte and branch between accesses through one base.)
                let passes = d.flow == Flow::Followed
                    || d.flow == Flow::Normal && d.rule == Rule::Branch(crate::rules::BranchKind::Jcc);
                if passes {
                    continue;
                }
                if !copied && !is_stack_move(d.flow, d.rule, &d.instr) {
                    for o in open.drain(..) {
                        close(&mut plan, o);
                    }
                    continue;
                }
                // One look at what the instruction uses: the registers it names and writes, and
                // how it accesses memory.
                let super::memop::Uses {
                    named, written, memory, ..
                } = self.uses[i].1;
                let high8 = if super::memop::uses_high8(&d.instr) { 0xff00 } else { 0 };
                for o in &mut open {
                    o.avoid |= named;
                }
                let access = if self.in_loop_window(i) {
                    None
                } else {
                    plain_access(&d.instr, memory)
                };
                if let Some((base, disp, size, access)) = access {
                    if let Some(o) = open.iter_mut().find(|o| o.base == base) {
                        let at = o.delta.wrapping_add(disp);
                        let (lo, hi) = (o.lo.min(at), o.hi.max(at.saturating_add(size)));
                        let fits = hi - lo <= MAX_WINDOW && i32::try_from(lo).is_ok();
                        if fits {
                            if access == Access::Write && o.access == Access::Read {
                                o.access = Access::Write;
                                o.settled = true;
                            }
                            (o.lo, o.hi) = (lo, hi);
                            o.avoid |= high8;
                            o.avoid_to_last = o.avoid;
                            o.members.push((i, at));
                        }
                    } else if open.len() < MAX_OPEN && !windowless.contains(&d.instr.ip()) {
                        open.push(Open {
                            base,
                            delta: 0,
                            lo: disp,
                            hi: disp.saturating_add(size),
                            access,
                            settled: false,
                            members: vec![(i, disp)],
                            avoid: named | high8,
                            avoid_to_last: named | high8,
                        });
                    }
                }
                // The base registers it moves (by a constant: the window follows) or replaces.
                let mut k = 0;
                while k < open.len() {
                    let o = &mut open[k];
                    if written & (1 << super::asm::reg_num(o.base)) != 0 {
                        match constant_move(&d.instr, o.base) {
                            Some(by) if by.abs() <= MAX_WINDOW => o.delta += by,
                            _ => {
                                close(&mut plan, open.remove(k));
                                continue;
                            }
                        }
                    }
                    k += 1;
                }
            }
            for o in open {
                close(&mut plan, o);
            }
        }
        plan.held = vec![None; plan.windows.len()];
        self.windows = plan;
    }

    /// Emits instruction `index` if a window takes its access (opening the window first, and
    /// giving H back after its last access); Ok(false) if it is not in one.
    pub(super) fn window_access(&mut self, index: usize, instr: &Instruction) -> Result<bool, super::TranslateError> {
        let Some(m) = self.windows.at.get(index).copied().flatten() else {
            return Ok(false);
        };
        let w = self.windows.windows[m.window];
        // A host address kept for the next instruction (`memop.rs`) is not this operand; its
        // register goes back before the window's lookup borrows any.
        self.release_held();
        if m.first {
            let named = self.used_gprs(instr);
            self.open_window(m.window, w, named);
        }
        let Some(h) = self.windows.held[m.window] else {
            return Ok(false);
        };
        self.emit_at_offset(instr, h, m.offset)?;
        self.windows.accesses += 1;
        if index == w.last {
            self.windows.held[m.window] = None;
            self.release_scratch(h);
        }
        Ok(true)
    }

    /// The window's lookup at its first access (whose registers are `named`): H = host
    /// address of `base + lo`. No window when registers are short (its accesses then have
    /// their own lookups).
    fn open_window(&mut self, n: usize, w: Window, named: u16) {
        // H: none the run names, not RSP, not RCX (the flag-free lookup's); a register already
        // borrowed only if idle. The lookup's own scratch registers avoid the first access's.
        let avoid = w.avoid | (1 << 4) | (1 << 1) | (1 << super::asm::reg_num(w.base));
        let available = |e: &Self, taken: u16| ((e.lazy & !taken) | !(taken | e.spilled)).count_ones();
        if available(self, avoid) == 0 {
            return;
        }
        let h = self.take_scratch(avoid);
        let lookup_avoid = named | (1 << 4) | (1 << 1) | (1 << super::asm::reg_num(h));
        if available(self, lookup_avoid) < 2 {
            self.release_scratch(h);
            return;
        }
        self.asm.glue(Instruction::with2(
            Code::Lea_r64_m,
            h,
            iced_x86::MemoryOperand::with_base_displ(w.base, w.lo),
        ));
        self.mem_base = w.base;
        self.window_lookup = Some(w.settled);
        self.tlb_lookup_flag_free(h, w.access, (w.hi - w.lo) as u64, lookup_avoid);
        self.window_lookup = None;
        self.windows.held[n] = Some(h);
        self.windows.opened += 1;
    }

    /// Registers held by open windows (bit per hardware number).
    pub(super) fn window_mask(&self) -> u16 {
        self.windows
            .held
            .iter()
            .flatten()
            .fold(0, |m, &r| m | 1 << super::asm::reg_num(r))
    }
}

/// (base, displacement, size, read or write) of an access a window can take (`access`: how the
/// instruction accesses memory, `memop::memory_access`).
fn plain_access(instr: &Instruction, access: Option<Access>) -> Option<(Register, i64, i64, Access)> {
    match instr.code() {
        Code::Push_r64 => return Some((Register::RSP, -8, 8, Access::Write)),
        Code::Pop_r64 => return Some((Register::RSP, 0, 8, Access::Read)),
        _ => {}
    }
    let base = instr.memory_base();
    if !base.is_gpr64() || instr.memory_index() != Register::None {
        return None;
    }
    let size = plain_operand_size(instr)?;
    Some((base, instr.memory_displacement64() as i64, size, access?))
}

/// The size of `instr`'s memory operand if a window (or a loop window, `loop_window.rs`) may
/// take it: 1–64 bytes, no FS/GS, not RIP-relative, nothing the miss path treats specially.
pub(super) fn plain_operand_size(instr: &Instruction) -> Option<i64> {
    let plain = instr.op_kinds().any(|k| k == OpKind::Memory)
        && !instr.is_ip_rel_memory_operand()
        && !matches!(instr.segment_prefix(), Register::FS | Register::GS)
        && !super::memop::is_bit_string_op(instr)
        && !crate::mmu::masked::is_masked_access(instr)
        && !super::is_mmx_store(instr)
        && instr.mnemonic() != iced_x86::Mnemonic::Vcvtps2ph
        && !super::alignment::requirement(instr).image;
    let size = instr.memory_size().size() as i64;
    (plain && (1..=64).contains(&size)).then_some(size)
}

/// Ends a run: a window if two accesses or more share it.
fn close(plan: &mut WindowPlan, o: Open) {
    if o.members.len() < 2 {
        return;
    }
    let n = plan.windows.len();
    let last = o.members.last().map_or(0, |&(i, _)| i);
    plan.windows.push(Window {
        base: o.base,
        lo: o.lo,
        hi: o.hi,
        access: o.access,
        settled: o.settled,
        last,
        avoid: o.avoid_to_last,
    });
    for (k, &(i, at)) in o.members.iter().enumerate() {
        plan.at[i] = Some(Member {
            window: n,
            offset: at - o.lo,
            first: k == 0,
        });
    }
}

/// How far `instr` moves `reg` by a constant (`add`/`sub` of an immediate, `lea reg,[reg+d]`,
/// `inc`, `dec`, all 64-bit), or None if it writes `reg` otherwise.
pub(super) fn constant_move(instr: &Instruction, reg: Register) -> Option<i64> {
    if reg == Register::RSP {
        // (`is_stack_move`: the register is never RSP itself.)
        match instr.code() {
            Code::Push_r64 => return Some(-8),
            Code::Pop_r64 => return Some(8),
            _ => {}
        }
    }
    let on_reg = instr.op0_kind() == OpKind::Register && instr.op0_register() == reg;
    if !on_reg {
        return None;
    }
    let imm = || instr.immediate(1) as i64;
    match instr.code() {
        Code::Add_rm64_imm8 | Code::Add_rm64_imm32 | Code::Add_RAX_imm32 => Some(imm()),
        Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 | Code::Sub_RAX_imm32 => imm().checked_neg(),
        Code::Inc_rm64 => Some(1),
        Code::Dec_rm64 => Some(-1),
        Code::Lea_r64_m
            if instr.memory_base() == reg
                && instr.memory_index() == Register::None
                && !matches!(instr.segment_prefix(), Register::FS | Register::GS) =>
        {
            Some(instr.memory_displacement64() as i64)
        }
        _ => None,
    }
}

/// `push r64` / `pop r64` (not RSP itself): a store below RSP or a load at it, then RSP moved
/// by 8 — a window over the stack takes them like any access (a function's prologue and
/// epilogue save and restore several registers in a row).
fn is_stack_move(flow: Flow, rule: Rule, instr: &Instruction) -> bool {
    flow == Flow::Normal
        && matches!(
            rule,
            Rule::Stack(crate::rules::StackOp::Push | crate::rules::StackOp::Pop)
        )
        && matches!(instr.code(), Code::Push_r64 | Code::Pop_r64)
        && instr.op0_register() != Register::RSP
}

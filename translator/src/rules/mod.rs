//! The rule table: how each iced `Code` is translated. Data, built once from iced's opcode
//! tables plus a short list of instructions that need dedicated handling.
//!
//! - [`Rule::Copy`] — re-emitted as is; an explicit memory operand goes through the memory
//!   strategy (`emit/memop.rs`). Covers the great majority of forms (ALU, SSE, AVX, x87, BMI,
//!   and AVX-512: EVEX forms and the opmask instructions, whose masked memory operands get
//!   per-element fault suppression under the soft-MMU, `engine/softmmu.rs`).
//! - [`Rule::Stack`] — implicit stack access (push/pop/pushf/popf/leave): native under the
//!   identity strategy, decomposed into explicit accesses under the soft-MMU (`emit/stack.rs`).
//! - [`Rule::Branch`] — control transfers: chained direct jumps, inline indirect-branch lookup
//!   (`emit/branch.rs`).
//! - [`Rule::Implicit`] — implicit or per-element memory (string instructions, xlat, enter,
//!   gathers, masked stores): native under identity, performed by the engine under the soft-MMU
//!   (`emulate/string.rs`, `emulate/implicit.rs`).
//! - [`Rule::UserCopy`] — instructions whose result is the host kernel's view (descriptor-table
//!   stores emulated by Linux's UMIP handler, `lar`/`lsl`): for a user-mode guest of a Linux host
//!   that view *is* the guest's, so they are copied; in system mode the engine performs them
//!   against the guest's own tables (`system/query.rs`).
//! - [`Rule::Emulate`] — sensitive instructions the engine performs itself (`emulate/mod.rs`,
//!   and `system/` in system mode): they end the block.
//! - [`Rule::System`] — privileged and system instructions ([`crate::system::SYSTEM_OPS`]):
//!   #GP(0) at CPL3, performed by `system/` at CPL0.
//!
//! 32-bit code (compatibility mode) has a table of its own, [`rule_compat`] (`compat.rs`): the
//! shared forms' rules, and those of the forms only 32-bit code has.
//!
//! Classification is order-independent: a form is decided by exactly one of (1) the mnemonic
//! tables [`DEDICATED`] and [`crate::system::SYSTEM_OPS`], which are disjoint (a test checks);
//! (2) its operands (control/debug/segment registers, string memory); (3) its being privileged
//! ([`SystemOp::Unimplemented`]); (4) the generic copy rule. A `Code` with no rule is refused with
//! [`crate::TranslateError::Unsupported`]. Having a rule is necessary, not sufficient, for support:
//! see `supported.rs`.

mod compat;

use crate::system::{SystemOp, SYSTEM_OPS};
pub use compat::{decode, lower_compat, lowered, rule_compat};
use iced_x86::{Code, EncodingKind, FlowControl, Instruction, Mnemonic, OpCodeOperandKind as K, Register};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Copy,
    UserCopy,
    Stack(StackOp),
    Branch(BranchKind),
    Implicit(ImplicitOp),
    Emulate(EmulateOp),
    System(SystemOp),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImplicitOp {
    /// movs/stos/lods/cmps/scas (with REP prefixes)
    String,
    Xlat,
    Enter,
    /// AVX2 and AVX-512 gathers (vector-indexed operands)
    Gather,
    /// AVX-512 scatters (vector-indexed stores under an opmask)
    Scatter,
    /// maskmovdqu (implicit `[rdi]`)
    MaskMove,
    /// vmaskmovps/pd, vpmaskmovd/q: only the elements whose mask is set are loaded or stored,
    /// so only they may fault or mark pages accessed
    MaskedMove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackOp {
    /// push r/imm/mem
    Push,
    /// pop r/mem
    Pop,
    Pushf,
    Popf,
    Leave,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchKind {
    /// `jmp rel`
    Jmp,
    /// `jcc rel`
    Jcc,
    /// `jrcxz`/`jecxz`/`loop`/`loope`/`loopne` (rel8 only, counter in RCX)
    CounterJump,
    /// `call rel32`
    Call,
    /// `call r/m64`
    CallIndirect,
    /// `jmp r/m64`
    JmpIndirect,
    /// `ret` / `ret imm16`
    Ret,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulateOp {
    Cpuid,
    Rdtsc,
    Rdtscp,
    Syscall,
    /// `int3`: `#BP` trap.
    Int3,
    /// `int imm8`.
    IntN,
    /// `ud0`/`ud1`/`ud2`: `#UD`.
    Ud,
    /// `int1`/`icebp`: `#DB`.
    Int1,
    /// Segment-register loads and reads, far jumps/calls/returns, `iret` (`emulate/segment.rs`).
    Segment,
    /// `xgetbv`: the guest's XCR0 (and XINUSE), not the host's.
    Xgetbv,
    /// `rdrand`/`rdseed`: a random value from the host's generator (nondeterministic, so never
    /// copied: the differential harness compares only the flags, `harness/mod.rs`).
    Random,
    /// `rdpid`: IA32_TSC_AUX, the guest's (system mode) or the platform's.
    Rdpid,
    /// `xbegin`/`xend`/`xabort`/`xtest`: a CPU whose transactions always abort (`emulate/rtm.rs`).
    Transaction,
    /// `sysenter`: a 32-bit program's system call on Intel (compatibility mode only,
    /// [`rule_compat`]; `system/transfer.rs`).
    Sysenter,
    /// `pusha`/`popa`: all eight general registers to or from the stack (32-bit code only,
    /// [`rule_compat`]; `system/mod.rs`).
    PushPopAll,
    /// `serialize`: never copied (the host may lack it, and a whole-machine guest is offered it
    /// regardless, `vmm/cpuid.rs`); translated code performs it as a host `mfence`
    /// (`emit/system.rs`) without ending the block — in user mode only where the host has it
    /// (the guest's CPUID is the host's there), else the engine raises #UD.
    Serialize,
}

/// Mnemonics with a dedicated rule, independent of operand form.
const DEDICATED: &[(Mnemonic, Rule)] = &[
    (Mnemonic::Cpuid, Rule::Emulate(EmulateOp::Cpuid)),
    (Mnemonic::Rdtsc, Rule::Emulate(EmulateOp::Rdtsc)),
    (Mnemonic::Rdtscp, Rule::Emulate(EmulateOp::Rdtscp)),
    (Mnemonic::Syscall, Rule::Emulate(EmulateOp::Syscall)),
    (Mnemonic::Int3, Rule::Emulate(EmulateOp::Int3)),
    (Mnemonic::Int, Rule::Emulate(EmulateOp::IntN)),
    (Mnemonic::Ud0, Rule::Emulate(EmulateOp::Ud)),
    (Mnemonic::Ud1, Rule::Emulate(EmulateOp::Ud)),
    (Mnemonic::Ud2, Rule::Emulate(EmulateOp::Ud)),
    (Mnemonic::Rdpmc, Rule::System(SystemOp::Rdpmc)),
    (Mnemonic::Int1, Rule::Emulate(EmulateOp::Int1)),
    (Mnemonic::Xgetbv, Rule::Emulate(EmulateOp::Xgetbv)),
    (Mnemonic::Rdrand, Rule::Emulate(EmulateOp::Random)),
    (Mnemonic::Rdseed, Rule::Emulate(EmulateOp::Random)),
    (Mnemonic::Rdpid, Rule::Emulate(EmulateOp::Rdpid)),
    (Mnemonic::Xbegin, Rule::Emulate(EmulateOp::Transaction)),
    (Mnemonic::Xend, Rule::Emulate(EmulateOp::Transaction)),
    (Mnemonic::Xabort, Rule::Emulate(EmulateOp::Transaction)),
    (Mnemonic::Xtest, Rule::Emulate(EmulateOp::Transaction)),
    (Mnemonic::Serialize, Rule::Emulate(EmulateOp::Serialize)),
    (Mnemonic::Lfs, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Lgs, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Lss, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Retf, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Iret, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Iretd, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Iretq, Rule::Emulate(EmulateOp::Segment)),
    (Mnemonic::Sgdt, Rule::UserCopy),
    (Mnemonic::Sidt, Rule::UserCopy),
    (Mnemonic::Sldt, Rule::UserCopy),
    (Mnemonic::Str, Rule::UserCopy),
    (Mnemonic::Smsw, Rule::UserCopy),
    (Mnemonic::Lar, Rule::UserCopy),
    (Mnemonic::Lsl, Rule::UserCopy),
    (Mnemonic::Verr, Rule::UserCopy),
    (Mnemonic::Verw, Rule::UserCopy),
    (Mnemonic::Xlatb, Rule::Implicit(ImplicitOp::Xlat)),
    (Mnemonic::Enter, Rule::Implicit(ImplicitOp::Enter)),
    (Mnemonic::Vpgatherdd, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vpgatherdq, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vpgatherqd, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vpgatherqq, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vgatherdps, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vgatherdpd, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vgatherqps, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vgatherqpd, Rule::Implicit(ImplicitOp::Gather)),
    (Mnemonic::Vpscatterdd, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vpscatterdq, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vpscatterqd, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vpscatterqq, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vscatterdps, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vscatterdpd, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vscatterqps, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Vscatterqpd, Rule::Implicit(ImplicitOp::Scatter)),
    (Mnemonic::Maskmovdqu, Rule::Implicit(ImplicitOp::MaskMove)),
    (Mnemonic::Vmaskmovdqu, Rule::Implicit(ImplicitOp::MaskMove)),
    (Mnemonic::Vmaskmovps, Rule::Implicit(ImplicitOp::MaskedMove)),
    (Mnemonic::Vmaskmovpd, Rule::Implicit(ImplicitOp::MaskedMove)),
    (Mnemonic::Vpmaskmovd, Rule::Implicit(ImplicitOp::MaskedMove)),
    (Mnemonic::Vpmaskmovq, Rule::Implicit(ImplicitOp::MaskedMove)),
    (Mnemonic::Push, Rule::Stack(StackOp::Push)),
    (Mnemonic::Pop, Rule::Stack(StackOp::Pop)),
    (Mnemonic::Pushf, Rule::Stack(StackOp::Pushf)),
    (Mnemonic::Pushfq, Rule::Stack(StackOp::Pushf)),
    (Mnemonic::Popf, Rule::Stack(StackOp::Popf)),
    (Mnemonic::Popfq, Rule::Stack(StackOp::Popf)),
    (Mnemonic::Leave, Rule::Stack(StackOp::Leave)),
    (Mnemonic::Jmp, Rule::Branch(BranchKind::Jmp)),
    (Mnemonic::Call, Rule::Branch(BranchKind::Call)),
    (Mnemonic::Ret, Rule::Branch(BranchKind::Ret)),
    (Mnemonic::Jrcxz, Rule::Branch(BranchKind::CounterJump)),
    (Mnemonic::Jecxz, Rule::Branch(BranchKind::CounterJump)),
    (Mnemonic::Loop, Rule::Branch(BranchKind::CounterJump)),
    (Mnemonic::Loope, Rule::Branch(BranchKind::CounterJump)),
    (Mnemonic::Loopne, Rule::Branch(BranchKind::CounterJump)),
];

/// Mnemonics that must never be copied: they change or read host state the guest must not see
/// (segment and base registers, protection keys, shadow stacks, AMX tiles), depend on the host's
/// descriptor tables, are nondeterministic, or touch memory implicitly.
const NEVER_COPY: &[Mnemonic] = &[
    Mnemonic::Rdpkru,
    Mnemonic::Wrpkru,
    Mnemonic::Rdfsbase,
    Mnemonic::Rdgsbase,
    Mnemonic::Wrfsbase,
    Mnemonic::Wrgsbase,
    Mnemonic::Monitor,
    Mnemonic::Mwait,
    Mnemonic::Umonitor,
    Mnemonic::Umwait,
    Mnemonic::Tpause,
    Mnemonic::Clzero,
    // MMX `maskmovq` stores through RDI like `maskmovdqu`; the engine has no model of it (its
    // fault and alignment rules are unmeasured, and neither the installed system nor the
    // popular-.deb corpus contains it).
    Mnemonic::Maskmovq,
    Mnemonic::Rdsspd,
    Mnemonic::Rdsspq,
    Mnemonic::Incsspd,
    Mnemonic::Incsspq,
    Mnemonic::Sysenter,
    Mnemonic::Sysexit,
    // Memory through a register that is not a memory operand: copied, they would use a guest
    // address as a host address (`movdir64b`/`enqcmd` store 64 bytes to [reg]; the VIA PadLock
    // and Zhaoxin engines read and write buffers at RSI/RDI/RBX/RDX).
    Mnemonic::Movdir64b,
    Mnemonic::Enqcmd,
    Mnemonic::Enqcmds,
    Mnemonic::Montmul,
    Mnemonic::Xsha1,
    Mnemonic::Xsha256,
    Mnemonic::Xsha512,
    Mnemonic::Xsha512_alt,
    Mnemonic::Xstore,
    Mnemonic::Xstore_alt,
    Mnemonic::Xcryptecb,
    Mnemonic::Xcryptcbc,
    Mnemonic::Xcryptctr,
    Mnemonic::Xcryptcfb,
    Mnemonic::Xcryptofb,
    Mnemonic::Ccs_hash,
    Mnemonic::Ccs_encrypt,
    // AMX tile configuration: the tile state is never a guest's (XFD-armed on the host:
    // `cpu::xsave`), so these raise #UD as on a CPU whose XCR0 lacks it — copied, a guest's
    // `ldtilecfg` completed and changed the host thread's tile configuration.
    Mnemonic::Ldtilecfg,
    Mnemonic::Sttilecfg,
    Mnemonic::Tilerelease,
    // The host thread's user-interrupt flag and UITT, its shadow stack, its SGX enclaves, the
    // VM functions of the hypervisor hbt itself may run under, AMD's user-mode MONITORX/MWAITX.
    Mnemonic::Testui,
    Mnemonic::Clui,
    Mnemonic::Stui,
    Mnemonic::Senduipi,
    Mnemonic::Rstorssp,
    Mnemonic::Saveprevssp,
    Mnemonic::Wrssd,
    Mnemonic::Wrssq,
    Mnemonic::Enclu,
    Mnemonic::Vmfunc,
    Mnemonic::Monitorx,
    Mnemonic::Mwaitx,
];

/// Operand kinds a copied instruction may have: registers, explicit memory, immediates.
fn copyable_operand(kind: K) -> bool {
    matches!(
        kind,
        K::mem
            | K::mem_offs
            | K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::mm_or_mem
            | K::xmm_or_mem
            | K::ymm_or_mem
            | K::zmm_or_mem
            | K::k_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_reg_mem
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_reg_mem
            | K::r32_rm
            | K::r32_opcode
            | K::r32_vvvv
            | K::r64_reg
            | K::r64_reg_mem
            | K::r64_rm
            | K::r64_opcode
            | K::r64_vvvv
            | K::mm_reg
            | K::mm_rm
            | K::xmm_reg
            | K::xmm_rm
            | K::xmm_vvvv
            | K::xmm_is4
            | K::ymm_reg
            | K::ymm_rm
            | K::ymm_vvvv
            | K::ymm_is4
            | K::zmm_reg
            | K::zmm_rm
            | K::zmm_vvvv
            | K::k_reg
            | K::k_rm
            | K::k_vvvv
            | K::al
            | K::cl
            | K::ax
            | K::dx
            | K::eax
            | K::rax
            | K::st0
            | K::sti_opcode
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm16
            | K::imm32
            | K::imm32sex64
            | K::imm64
    )
}

fn classify(code: Code) -> Option<Rule> {
    let op = code.op_code();
    if !op.is_instruction() || !op.mode64() {
        return None;
    }
    if !matches!(
        op.encoding(),
        EncodingKind::Legacy | EncodingKind::VEX | EncodingKind::EVEX
    ) {
        return None;
    }
    let mnemonic = code.mnemonic();
    // EVEX forms are copied, gathered/scattered, or refused: the other dedicated rules are for
    // legacy and VEX forms.
    let vsib = |r: &Rule| matches!(r, Rule::Implicit(ImplicitOp::Gather | ImplicitOp::Scatter));
    if op.encoding() == EncodingKind::EVEX && DEDICATED.iter().any(|(m, r)| *m == mnemonic && !vsib(r)) {
        return None;
    }
    let mut sample = Instruction::default();
    sample.set_code(code);
    let kinds = op.op_kinds();
    let has = |k: K| kinds.contains(&k);
    // (1) The mnemonic tables.
    if let Some(&(_, rule)) = DEDICATED.iter().find(|(m, _)| *m == mnemonic) {
        return dedicated_form(code, rule, &has);
    }
    if let Some(&(_, op)) = SYSTEM_OPS.iter().find(|(m, _)| *m == mnemonic) {
        return Some(Rule::System(op));
    }
    // (2) Operands that make the form special.
    if has(K::cr_reg) {
        return Some(Rule::System(SystemOp::MovCr));
    }
    if has(K::dr_reg) {
        return Some(Rule::System(SystemOp::MovDr));
    }
    let segment_reg = has(K::seg_reg) || has(K::fs) || has(K::gs);
    if segment_reg && matches!(mnemonic, Mnemonic::Mov | Mnemonic::Push | Mnemonic::Pop) {
        // Selectors are guest state; loads are checked against the descriptor tables.
        return if has(K::es) || has(K::cs) || has(K::ss) || has(K::ds) {
            None
        } else {
            Some(Rule::Emulate(EmulateOp::Segment))
        };
    }
    if segment_reg || has(K::es) || has(K::cs) || has(K::ss) || has(K::ds) || has(K::farbr2_2) || has(K::farbr4_2) {
        return None;
    }
    if matches!(
        code,
        Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Jmp_m1664 | Code::Call_m1616 | Code::Call_m1632 | Code::Call_m1664
    ) {
        return Some(Rule::Emulate(EmulateOp::Segment));
    }
    // (3) Privileged forms nothing above models.
    if sample.is_privileged() {
        return Some(Rule::System(SystemOp::Unimplemented));
    }
    // (4) Everything else.
    if NEVER_COPY.contains(&mnemonic) {
        return None;
    }
    if has(K::seg_rSI) || has(K::es_rDI) || has(K::seg_rDI) {
        // ins/outs are port I/O (privileged in user mode, a platform matter in kernel mode).
        return if has(K::dx) {
            None
        } else {
            Some(Rule::Implicit(ImplicitOp::String))
        };
    }
    match code.flow_control() {
        FlowControl::ConditionalBranch if has(K::br64_1) || has(K::br64_4) => Some(Rule::Branch(BranchKind::Jcc)),
        FlowControl::Next if !sample.is_stack_instruction() && kinds.iter().all(|&k| copyable_operand(k)) => {
            Some(Rule::Copy)
        }
        _ => None,
    }
}

/// Which forms of a [`DEDICATED`] mnemonic its rule covers.
fn dedicated_form(code: Code, rule: Rule, has: &dyn Fn(K) -> bool) -> Option<Rule> {
    match rule {
        // push/pop of a segment register: the selector is guest state.
        Rule::Stack(StackOp::Push | StackOp::Pop) if has(K::fs) || has(K::gs) => {
            Some(Rule::Emulate(EmulateOp::Segment))
        }
        Rule::Stack(StackOp::Push | StackOp::Pop) if has(K::es) || has(K::cs) || has(K::ss) || has(K::ds) => None,
        Rule::Branch(BranchKind::Jmp) if code == Code::Jmp_rm64 => Some(Rule::Branch(BranchKind::JmpIndirect)),
        Rule::Branch(BranchKind::Call) if code == Code::Call_rm64 => Some(Rule::Branch(BranchKind::CallIndirect)),
        Rule::Branch(BranchKind::Jmp | BranchKind::Call)
            if matches!(
                code,
                Code::Jmp_m1616
                    | Code::Jmp_m1632
                    | Code::Jmp_m1664
                    | Code::Call_m1616
                    | Code::Call_m1632
                    | Code::Call_m1664
            ) =>
        {
            Some(Rule::Emulate(EmulateOp::Segment))
        }
        Rule::Branch(BranchKind::Jmp | BranchKind::Call)
            if !(has(K::br64_1) || has(K::br64_4)) || code == Code::Jmp_rel32_32 =>
        {
            None
        }
        Rule::Branch(BranchKind::Ret) if !matches!(code, Code::Retnq | Code::Retnq_imm16) => None,
        _ => Some(rule),
    }
}

/// The rule for `code`, if the translator has one.
pub fn rule(code: Code) -> Option<Rule> {
    static TABLE: OnceLock<Vec<Option<Rule>>> = OnceLock::new();
    TABLE.get_or_init(|| Code::values().map(classify).collect())[code as usize]
}

/// Every `Code` that has a rule.
pub fn codes_with_rules() -> impl Iterator<Item = Code> {
    Code::values().filter(|&c| rule(c).is_some())
}

/// Where a block is translated: what decides which rules the engine performs itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    /// The soft-MMU memory strategy (guest RSP is not a host address).
    pub soft_mmu: bool,
    /// System mode (`Config::system`): a whole guest machine.
    pub system: bool,
    /// System mode, a block translated for CPL0 (blocks are keyed by CPL).
    pub kernel: bool,
    /// System mode: translated code can read the interrupt controller's INTR line
    /// (`Translator::set_interrupt_line`), so `sti` can be inlined.
    pub interrupt_line: bool,
    /// System mode: the platform's time-stamp counter is the host's
    /// (`Translator::set_host_tsc`), so `rdtsc` at CPL0 runs natively.
    pub host_tsc: bool,
    /// A block of 32-bit code (compatibility mode, [`rule_compat`]): addresses, the stack and
    /// near branches are 32-bit, and instructions are re-encoded rather than copied as bytes.
    pub compat: bool,
}

impl Rule {
    /// Rules the engine performs in Rust (they end a block): the sensitive and system ones —
    /// but at CPL0 of a whole machine these are inlined (`emit/system.rs`): `cli` and `swapgs`
    /// (a store to the virtual IF, an exchange of the two GS bases in the guest state), `sti`
    /// where translated code can read the INTR line, control-register and selector reads into
    /// a register (loads from the guest state: a page fault reads CR2, a context switch CR3),
    /// and `rdtsc`/`rdtscp` where the guest's TSC is the host's; implicit memory under the
    /// soft-MMU or an FS/GS override; and in system mode also `popf` (it may set IF, IOPL, TF),
    /// `pushf` at CPL3 (where AC may live in the host flags, by CR0.AM), and the
    /// descriptor-table stores, whose values are the guest's, not the host kernel's.
    pub fn runs_in_engine(self, instr: &Instruction, mode: Mode) -> bool {
        let fs_gs_override = matches!(instr.segment_prefix(), Register::FS | Register::GS);
        let cpl0 = mode.system && mode.kernel;
        match self {
            Rule::System(SystemOp::Cli | SystemOp::Swapgs) if cpl0 => false,
            Rule::System(SystemOp::Sti) if cpl0 && mode.interrupt_line => false,
            Rule::System(SystemOp::MovCr)
                if cpl0
                    && reads_into_register(instr)
                    && matches!(
                        instr.op1_register(),
                        Register::CR0 | Register::CR2 | Register::CR3 | Register::CR4 | Register::CR8
                    ) =>
            {
                false
            }
            Rule::Emulate(EmulateOp::Segment)
                if cpl0 && reads_into_register(instr) && instr.mnemonic() == Mnemonic::Mov =>
            {
                false
            }
            Rule::Emulate(EmulateOp::Rdtsc | EmulateOp::Rdtscp) if cpl0 && mode.host_tsc => false,
            Rule::Emulate(EmulateOp::Serialize) => {
                !mode.system && !crate::host::features::host_has(iced_x86::CpuidFeature::SERIALIZE)
            }
            Rule::Emulate(_) | Rule::System(_) => true,
            Rule::Implicit(_) => mode.soft_mmu || fs_gs_override,
            Rule::Stack(StackOp::Pushf) => mode.system && !mode.kernel,
            Rule::Stack(StackOp::Popf) | Rule::UserCopy => mode.system,
            _ => false,
        }
    }
}

/// `mov r64, crN` / `mov r, sreg`: a general-purpose register receives a control register or
/// a selector.
fn reads_into_register(instr: &Instruction) -> bool {
    instr.op0_kind() == iced_x86::OpKind::Register && instr.op0_register().is_gpr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialize_is_translated_where_the_guest_has_it() {
        let instr = iced_x86::Decoder::new(64, &[0x0f, 0x01, 0xe8], 0).decode();
        assert_eq!(instr.code(), Code::Serialize);
        let rule = Rule::Emulate(EmulateOp::Serialize);
        // A whole machine is offered it on any host: inline at both privilege levels.
        for kernel in [false, true] {
            let system = Mode {
                system: true,
                kernel,
                soft_mmu: true,
                ..Mode::default()
            };
            assert!(!rule.runs_in_engine(&instr, system), "system mode, kernel {kernel}");
        }
        // A user-mode guest sees the host's CPUID: the engine raises #UD where the host lacks it.
        let host = crate::host::features::host_has(iced_x86::CpuidFeature::SERIALIZE);
        assert_eq!(rule.runs_in_engine(&instr, Mode::default()), !host);
    }

    #[test]
    fn no_copied_form_reaches_host_state_outside_the_guest() {
        use iced_x86::CpuidFeature as F;
        let host_only = [F::AMX_TILE, F::UINTR, F::CET_SS, F::SGX1, F::VMX, F::MONITORX];
        for code in codes_with_rules().filter(|&c| rule(c) == Some(Rule::Copy)) {
            let reaches = code.cpuid_features().iter().find(|f| host_only.contains(f));
            assert!(reaches.is_none(), "{code:?} ({reaches:?}) is copied");
        }
    }

    #[test]
    fn families_get_the_expected_rules() {
        assert_eq!(rule(Code::Add_rm64_r64), Some(Rule::Copy));
        assert_eq!(rule(Code::VEX_Vpaddd_ymm_ymm_ymmm256), Some(Rule::Copy));
        assert_eq!(rule(Code::Push_r64), Some(Rule::Stack(StackOp::Push)));
        assert_eq!(rule(Code::Retnq), Some(Rule::Branch(BranchKind::Ret)));
        assert_eq!(rule(Code::Call_rm64), Some(Rule::Branch(BranchKind::CallIndirect)));
        assert_eq!(rule(Code::Jne_rel8_64), Some(Rule::Branch(BranchKind::Jcc)));
        assert_eq!(rule(Code::Cpuid), Some(Rule::Emulate(EmulateOp::Cpuid)));
        assert_eq!(rule(Code::Serialize), Some(Rule::Emulate(EmulateOp::Serialize)));
        assert_eq!(rule(Code::Movsb_m8_m8), Some(Rule::Implicit(ImplicitOp::String)));
        assert_eq!(rule(Code::Mov_Sreg_r32m16), Some(Rule::Emulate(EmulateOp::Segment)));
        assert_eq!(rule(Code::Lar_r32_r32m16), Some(Rule::UserCopy));
        assert_eq!(rule(Code::Wrmsr), Some(Rule::System(SystemOp::Wrmsr)));
        assert_eq!(
            rule(Code::Hlt),
            Some(Rule::System(SystemOp::Hlt)),
            "hlt is not shadowed by `privileged`"
        );
        assert_eq!(rule(Code::Mov_cr_r64), Some(Rule::System(SystemOp::MovCr)));
        assert_eq!(rule(Code::Swapgs), Some(Rule::System(SystemOp::Swapgs)));
        assert_eq!(rule(Code::Sysretq), Some(Rule::System(SystemOp::Sysret)));
        assert_eq!(rule(Code::Invlpgaq), Some(Rule::System(SystemOp::Unimplemented)));
        assert_eq!(rule(Code::Rdpmc), Some(Rule::System(SystemOp::Rdpmc)));
        assert_eq!(rule(Code::Insw_m16_DX), Some(Rule::System(SystemOp::PortString)));
        assert_eq!(rule(Code::Outsb_DX_m8), Some(Rule::System(SystemOp::PortString)));
        assert_eq!(rule(Code::Wrfsbase_r64), None);
        assert_eq!(rule(Code::EVEX_Vpaddd_zmm_k1z_zmm_zmmm512b32), Some(Rule::Copy));
        assert_eq!(rule(Code::VEX_Kortestq_kr_kr), Some(Rule::Copy));
        assert_eq!(
            rule(Code::EVEX_Vpgatherdd_xmm_k1_vm32x),
            Some(Rule::Implicit(ImplicitOp::Gather))
        );
        assert_eq!(
            rule(Code::EVEX_Vpscatterdd_vm32x_k1_xmm),
            Some(Rule::Implicit(ImplicitOp::Scatter))
        );
        assert_eq!(rule(Code::EVEX_Vgatherpf0dps_vm32z_k1), None, "AVX512PF prefetches");
        assert_eq!(rule(Code::Xbegin_rel32), Some(Rule::Emulate(EmulateOp::Transaction)));
    }

    /// A copied form touches memory only through its explicit memory operand (which the memory
    /// strategy rewrites): one that reached memory through a plain register would run with a
    /// guest address as a host address (`movdir64b [rdi]`) — a guest kernel writing host
    /// memory outside its RAM under the soft-MMU.
    #[test]
    fn copied_forms_touch_memory_only_through_their_memory_operand() {
        let mut factory = iced_x86::InstructionInfoFactory::new();
        let mut rng = crate::harness::rng::Rng::new(7);
        let mut implicit = Vec::new();
        let mut unsynthesizable = Vec::new();
        for code in codes_with_rules().filter(|&c| rule(c) == Some(Rule::Copy)) {
            let Some(inst) =
                (0..16).find_map(|_| crate::harness::synth::instance(code, &mut rng, 0x2000_1800, 0x2001_0000, 64))
            else {
                unsynthesizable.push(code);
                continue;
            };
            let i = &inst.instr;
            let explicit = (0..i.op_count())
                .filter(|&n| i.op_kind(n) == iced_x86::OpKind::Memory)
                .count();
            let accesses = factory.info(i).used_memory().len();
            if accesses > explicit {
                implicit.push(format!(
                    "{code:?} ({accesses} accesses, {explicit} through its operand)"
                ));
            }
        }
        assert!(implicit.is_empty(), "copied forms with implicit memory: {implicit:?}");
        // Forms the synthesizer cannot encode are not checked here; none of them may be one the
        // translator claims (the harness fails a supported form it cannot test).
        assert!(
            unsynthesizable.iter().all(|&c| !crate::supported::is_supported(c)),
            "{unsynthesizable:?}"
        );
        eprintln!(
            "{} copied forms not synthesizable (none supported): {unsynthesizable:?}",
            unsynthesizable.len()
        );
    }

    #[test]
    fn mnemonic_tables_are_disjoint() {
        for (m, _) in DEDICATED {
            assert!(!SYSTEM_OPS.iter().any(|(n, _)| n == m), "{m:?} is in both tables");
            assert!(!NEVER_COPY.contains(m), "{m:?} is dedicated and never-copy");
        }
        for (m, _) in SYSTEM_OPS {
            assert!(!NEVER_COPY.contains(m), "{m:?} is a system op and never-copy");
        }
    }
}

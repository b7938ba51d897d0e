//! The harness's system mode (`hbt isa-test --system`): each synthesized instance runs inside a
//! small guest machine (`guest.rs`: page tables with random U/S, R/W, NX, A/D bits and unmapped
//! pages around the data, a GDT, a TSS and an IDT whose handlers stop the machine), once on a
//! *reference* engine that delivers exceptions as the CPU does and once through the translator
//! in system mode (soft-MMU, delivery through the guest's IDT), and the two outcomes are
//! compared (`outcome.rs`). The translator crate knows nothing about the reference: `hbt`
//! supplies KVM, whose CPL3 execution is the host CPU's, with real page walks and real
//! exception delivery.
//!
//! Instances run at CPL3 ([`Ring::User`]), or at CPL0 ([`Ring::Kernel`]) for privileged
//! instructions, where KVM's reference is its in-kernel instruction emulator.

pub mod device;
pub mod guest;
pub mod outcome;
pub mod privileged;

use super::compare::Ignore;
use super::rng::Rng;
use super::synth::{self, Instance};
use super::{Cases, Failure, Ran};
use crate::engine::{Config, Translator};
use crate::exit::{vector, Exit};
use crate::mmu::{GuestRam, MemoryStrategy};
use crate::platform::Platform;
use crate::rules::Rule;
use crate::state::GuestState;
pub use guest::Ring;
use outcome::{Masks, Stop};

/// The forms CPL0 mode tests by default: those whose rule is a privileged or system one (the
/// engine performs them against the guest's system state), where running at CPL0 rather than
/// CPL3 changes what they do. Any other form behaves the same at both levels and is covered by
/// the CPL3 mode (`--code` still runs it at CPL0).
pub fn cpl0_form(code: iced_x86::Code) -> bool {
    use crate::rules::{EmulateOp, StackOp};
    matches!(
        crate::rules::rule(code),
        Some(Rule::System(_) | Rule::UserCopy | Rule::Emulate(_) | Rule::Stack(StackOp::Pushf | StackOp::Popf))
    ) && !matches!(crate::rules::rule(code), Some(Rule::Emulate(EmulateOp::Random)))
}

/// A store crossing from one data page into the next where the reference raised the #PF of
/// the second page and the translator (as the CPU) that of the first
/// ([`KernelQuirks::split_store_faults_second_page`]).
fn second_page_first(
    inst: &Instance,
    state: &GuestState,
    reference: &outcome::SystemOutcome,
    translated: &outcome::SystemOutcome,
) -> Option<&'static str> {
    let (start, end) = store_operand(inst, state)?;
    let page = (start | 0xfff) + 1;
    let (a, b) = (reference.last.as_ref()?, translated.last.as_ref()?);
    let second = guest::data() + page;
    (end > page && reference.raised(14) && translated.raised(14) && a.cr2 == second && b.cr2 < second)
        .then_some("the reference raised the #PF of a store's second page where its first page faults too")
}

/// The memory an instance writes, as offsets into the data region: its explicit memory operand,
/// or `ins`'s element at RDI.
fn store_operand(inst: &Instance, state: &GuestState) -> Option<(u64, u64)> {
    let size = inst.instr.memory_size().size().max(1) as u64;
    let start = match inst.mem_target {
        Some(t) => t,
        None if matches!(
            inst.instr.mnemonic(),
            iced_x86::Mnemonic::Insb | iced_x86::Mnemonic::Insw | iced_x86::Mnemonic::Insd
        ) =>
        {
            state.gpr[7].checked_sub(guest::data())?
        }
        None => return None,
    };
    Some((start, start + size))
}

/// Dispatcher rounds one translated case may take (a case needs a handful).
const RUN_BUDGET: u64 = 256;
/// FS and GS bases of every case (any values do: the synthesizer aims FS/GS-relative operands
/// at the data region through them).
const SEGMENT_BASES: (u64, u64) = (0x0000_0010_0000_0000, 0x0000_0020_0000_0000);

/// Why the reference did not produce an outcome.
#[derive(Debug)]
pub enum ReferenceError {
    /// The reference cannot run this instruction (KVM's emulator gave up): the form is not
    /// covered here, and the reason is reported.
    Cannot(String),
    /// Anything else: the case fails with this message.
    Failed(String),
}

/// The engine the translator is compared with. It owns a guest RAM of [`guest::RAM_SIZE`]
/// bytes, which the harness fills before each run.
pub trait Reference {
    fn ram(&mut self) -> &mut [u8];
    /// Runs the machine from `state` until a `hlt` at CPL0 or a triple fault. Each case's
    /// page tables are fresh frames at `state.cr3`; frames of an earlier case are reused only
    /// after the pool wraps (the reference must not use translations cached from them).
    fn run(&mut self, state: &GuestState) -> Result<Stop, ReferenceError>;
    /// Forms the reference is known not to run as the CPU would at `ring` (e.g. KVM on a host
    /// without VT-x/AMD-V raises #UD for `int n` at CPL3): the reason, and they are not tested.
    fn unfit(&self, instr: &iced_x86::Instruction, ring: Ring) -> Option<String>;
    /// The machine's XCR0 (what its CPUID offers).
    fn xcr0(&self) -> u64;
    /// Bits (EAX, EBX, ECX, EDX) of CPUID leaf `leaf`, subleaf `subleaf` that the reference
    /// answers differently from the CPU model both engines are given (KVM adjusts some when
    /// the table is set): not compared.
    fn cpuid_adjusted(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let _ = (leaf, subleaf);
        [0; 4]
    }
    /// Where the reference is known to differ from the CPU for every form.
    fn quirks(&self) -> Quirks;
    /// The `out`s of the last run, in order (the device is [`device`]'s: `in` must read
    /// [`device::port_in`]).
    fn take_port_writes(&mut self) -> Vec<device::PortWrite> {
        Vec::new()
    }
    /// Where the reference is known to differ from the CPU on this one case (`case` holds the
    /// instance, its input state and data), beyond [`Reference::unfit`]'s whole forms.
    fn unfit_case(&self, case: &Case, ring: Ring) -> Option<Unfit> {
        let _ = (case, ring);
        None
    }
    /// Differences from the CPU at CPL0 that hold for every form.
    fn kernel_quirks(&self) -> KernelQuirks {
        KernelQuirks::default()
    }
    /// 32-bit code at CPL3 runs in the same instruction emulator as CPL0 code (kvm_pvm's does):
    /// [`Reference::kernel_quirks`] apply to it too.
    fn runs_32_bit_code_emulated(&self) -> bool {
        false
    }
}

/// One case as the reference will run it: what [`Reference::unfit_case`] looks at.
pub struct Case<'a> {
    pub instance: &'a Instance,
    pub state: &'a GuestState,
    /// The data region's contents, in virtual order.
    pub data: &'a [u8],
}

impl Case<'_> {
    /// `size` bytes (up to 8) at `offset` bytes into the explicit memory operand, when the
    /// instance has one and they lie in the data region.
    pub fn operand(&self, offset: u64, size: usize) -> Option<u64> {
        let at = (self.instance.mem_target? + offset) as usize;
        let bytes = self.data.get(at..at + size)?;
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(bytes);
        Some(u64::from_le_bytes(v))
    }

    /// `size` bytes at `offset` bytes above RSP (a stack operand), when in the data region.
    pub fn stack(&self, offset: u64, size: usize) -> Option<u64> {
        let at = self.state.gpr[4].wrapping_add(offset).checked_sub(guest::data())? as usize;
        let bytes = self.data.get(at..at + size)?;
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(bytes);
        Some(u64::from_le_bytes(v))
    }

    /// The value of operand `n` when it is a general register (all 64 bits).
    pub fn register(&self, n: u32) -> Option<u64> {
        let instr = &self.instance.instr;
        (instr.op_kind(n) == iced_x86::OpKind::Register && instr.op_register(n).is_gpr())
            .then(|| self.state.gpr[instr.op_register(n).full_register().number() & 15])
    }
}

/// How the reference differs from the CPU on one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unfit {
    /// The case is not compared (the reason).
    Case(String),
    /// The case is compared, but not the error code of the exception it raises (the
    /// reference reports another one).
    ErrorCode(String),
    /// The case is compared, but not the address of a #PF it raises (CR2): the reference
    /// touches the pieces of the access in another order than the CPU.
    FaultAddress(String),
}

/// Differences between a reference engine and the CPU at CPL0 that hold for every form: what
/// the comparison then leaves out.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelQuirks {
    /// A store that crosses into a page it may not write leaves its part in the first page
    /// written (an emulator writing page by page): after such a #PF the bytes of the store's
    /// first page are not compared.
    pub split_store_writes_first_page: bool,
    /// DR6 bits the reference does not keep as the CPU does: not compared.
    pub dr6_ignored: u64,
    /// A store crossing two pages that both fault raises the #PF of the second page (the CPU
    /// reports the first): such a case is not compared.
    pub split_store_faults_second_page: bool,
}

/// Differences between a reference engine and the CPU that hold for every instruction: what
/// the harness then does not set up, or does not compare.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quirks {
    /// Alignment checking at CPL3 does not follow the guest's CR0.AM: cases run with CR0.AM
    /// and RFLAGS.AC clear.
    pub no_alignment_checks: bool,
    /// ES, DS, FS and GS selectors are not the reference's to set at CPL3: what a case loads
    /// reads back 0 after the return to CPL0, and what CPL3 code reads (`push fs`,
    /// `mov r/m, gs`) is the selector the CPU still holds from an earlier case, not the
    /// case's. Those four selectors, and the values instructions read from them, are not
    /// compared.
    pub loses_data_selectors: bool,
    /// A non-canonical RSP at CPL3 makes the reference raise #UD for instructions that do not
    /// use the stack: cases start with RSP made canonical.
    pub needs_canonical_rsp: bool,
    /// The reference raises #UD where it had to emulate an instruction it does not know (KVM
    /// emulates a CPL3 instruction whose access faults in some ways): a case where only the
    /// reference raised #UD is not compared.
    pub spurious_ud: bool,
    /// The reference hands an instruction that raised #GP at CPL3 to an instruction emulator
    /// of its own, whose outcome replaces the CPU's #GP. Where that emulator is known to
    /// differ from the CPU (`emulation_differs_after_gp`), a case in which the translator
    /// raised #GP is not compared.
    pub gp_goes_to_emulator: bool,
    /// `sgdt`/`sidt`/`smsw` at CPL3 are carried out by the reference's instruction emulator
    /// (the host's CR4.UMIP makes the CPU raise #GP), which writes a page-split operand page
    /// by page: after a #PF the operand's bytes are not compared.
    pub descriptor_table_stores_split: bool,
    /// A page-split 80-bit x87 store (`fstp m80fp`, `fbstp m80bcd`) at CPL3 whose second page
    /// faults leaves its first page written under the reference (an emulator writing page by
    /// page), where the CPU writes nothing: after the #PF the operand's bytes are not compared.
    pub x87_wide_stores_split: bool,
}

/// Instructions whose #GP the reference's emulator (see [`Quirks::gp_goes_to_emulator`]) turns
/// into something else than the CPU's #GP: `iret` (its selector faults come back as #GP(0)
/// or #SS), FXSAVE/FXRSTOR (no alignment check: a misaligned image is saved or restored, or
/// faults on its page; an FS/GS-relative image is looked for without the segment base).
fn emulation_differs_after_gp(instr: &iced_x86::Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        instr.mnemonic(),
        M::Iret | M::Iretd | M::Iretq | M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64
    )
}

/// One test thread of the system mode: the reference, the translator in system mode over its
/// own copy of the machine's RAM, and the platform it sees (the reference's CPUID).
/// The translator is declared first so it drops before the RAM it points into.
pub struct SystemWorker {
    translator: Translator,
    ram: Ram,
    reference: Box<dyn Reference>,
    platform: device::HarnessPlatform,
    ring: Ring,
    /// 64, or 32: instances are 32-bit code run at CPL3 in compatibility mode (CS
    /// [`guest::USER32_CS`]).
    bitness: u32,
    /// Cases run (picks each case's page-table set from the pool).
    case: u64,
}

/// Page-aligned guest RAM for the translator's copy of the machine.
struct Ram(&'static mut [u8]);

impl Ram {
    fn new() -> Result<Self, String> {
        let p = crate::host::map_anonymous(guest::RAM_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE)
            .ok_or("cannot map the system harness's guest RAM")?;
        // SAFETY: the mapping is RAM_SIZE bytes, readable and writable, owned by this value.
        Ok(Ram(unsafe {
            std::slice::from_raw_parts_mut(p, guest::RAM_SIZE as usize)
        }))
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`.
        unsafe { libc::munmap(self.0.as_mut_ptr() as *mut libc::c_void, self.0.len()) };
    }
}

impl SystemWorker {
    /// `bitness` 32 runs 32-bit code at CPL3 (compatibility mode; `ring` must be
    /// [`Ring::User`]).
    pub fn new(
        mut reference: Box<dyn Reference>,
        platform: Box<dyn Platform>,
        ring: Ring,
        bitness: u32,
    ) -> Result<Self, String> {
        if bitness == 32 && ring != Ring::User {
            return Err("32-bit code runs at CPL3 only".into());
        }
        let ram = Ram::new()?;
        guest::write_fixed(ram.0, ring);
        guest::write_fixed(reference.ram(), ring);
        // SAFETY: the RAM is page-aligned and owned by the worker, which drops the translator
        // first (field order).
        let view = unsafe { GuestRam::new(ram.0.as_mut_ptr(), guest::RAM_SIZE) };
        let translator = Translator::new(Config {
            strategy: MemoryStrategy::SoftMmu(view),
            code_cache_bytes: 4 << 20,
            verified_only: false,
            system: true,
        })
        .map_err(|e| e.to_string())?;
        Ok(SystemWorker {
            translator,
            ram,
            reference,
            platform: device::HarnessPlatform {
                inner: platform,
                writes: Vec::new(),
            },
            ring,
            bitness,
            case: 0,
        })
    }

    /// Tests one `Code`.
    pub fn test_code(&mut self, code: iced_x86::Code, opts: &super::Options) -> super::CodeResult {
        super::test_cases(self, code, opts)
    }

    /// One case from `rng`'s next inputs (see `Cases::run`).
    fn run_once(&mut self, inst: &Instance, rng: &mut Rng, rule: Rule) -> Result<Ran, Failure> {
        if let Some(why) = self.reference.unfit(&inst.instr, self.ring) {
            return Err(Failure::Unreferenced(why));
        }
        let (mut state, mem) = synth::state(inst, rng, guest::code_range(), guest::data(), SEGMENT_BASES);
        (state.fs_base, state.gs_base) = SEGMENT_BASES;
        state.xcr0 = self.reference.xcr0();
        state.xsave.restrict_to(state.xcr0);
        let tables = guest::write_tables(self.ram.0, self.case, rng, self.ring);
        self.case += 1;
        guest::machine_state(&mut state, &tables, self.ring);
        if self.bitness == 32 {
            // What Linux gives its 32-bit programs: segmentation applies in compatibility
            // mode, where a null DS or ES faults on every access through it.
            state.seg[1] = guest::USER32_CS;
            state.seg[0] = guest::USER_DS;
            state.seg[3] = guest::USER_DS;
            state.code32 = true;
        }
        let mut mem = mem;
        if self.ring == Ring::Kernel {
            privileged::kernel_state(inst, rng, &mut state, &mut mem, &tables);
        }
        let quirks = self.reference.quirks();
        if quirks.no_alignment_checks {
            state.cr0 &= !guest::CR0_AM;
            state.rflags &= !crate::state::flags::AC;
        }
        if quirks.needs_canonical_rsp {
            state.gpr[4] = ((state.gpr[4] << 16) as i64 >> 16) as u64;
        }
        // Both machines start from the same bytes: the fixed pages (a CPL0 case may have
        // changed them), this case's tables, the data.
        guest::write_fixed(self.ram.0, self.ring);
        guest::write_data(self.ram.0, &mem);
        self.ram.0[(guest::KERNEL_STACK_TOP - 0x1000) as usize..guest::KERNEL_STACK_TOP as usize].fill(0);
        let case = Case {
            instance: inst,
            state: &state,
            data: &mem,
        };
        let (mut error_code_unfit, mut fault_address) = (false, false);
        match self.reference.unfit_case(&case, self.ring) {
            Some(Unfit::Case(why)) => return Ok(Ran::NotCompared(why)),
            Some(Unfit::ErrorCode(_)) => error_code_unfit = true,
            Some(Unfit::FaultAddress(_)) => fault_address = true,
            None => {}
        }
        if self.ring == Ring::Kernel {
            if let Some(why) = privileged::translator_limitation(&case) {
                return Ok(Ran::NotCompared(format!("translator limitation: {why}")));
            }
        }
        let reference_ram = self.reference.ram();
        let (lo, hi) = tables.range();
        reference_ram[lo as usize..hi as usize].copy_from_slice(&self.ram.0[lo as usize..hi as usize]);
        reference_ram[..0x10000].copy_from_slice(&self.ram.0[..0x10000]);

        let reference = match self.reference.run(&state) {
            Ok(stop) => stop,
            Err(ReferenceError::Cannot(why)) => return Ok(Ran::NotCompared(why)),
            Err(ReferenceError::Failed(why)) => return Err(Failure::Plain(format!("reference: {why}"))),
        };
        let reference_writes = self.reference.take_port_writes();
        let translated = self.translated(&state);
        let mut reference = outcome::read(self.reference.ram(), reference, inst, &tables);
        reference.port_writes = reference_writes;
        let diffs = match translated {
            Ok(stop) => {
                let mut translated = outcome::read(self.ram.0, stop, inst, &tables);
                translated.port_writes = std::mem::take(&mut self.platform.writes);
                // (A CPL3 quirk: at CPL0 everything runs in the reference's emulator, and a #UD
                // there is compared like any other outcome.)
                if quirks.spurious_ud
                    && self.ring == Ring::User
                    && reference.raised(vector::UD)
                    && !translated.raised(vector::UD)
                {
                    return Ok(Ran::NotCompared(
                        "the reference raised #UD where it had to emulate the instruction".into(),
                    ));
                }
                let kernel = self.reference.kernel_quirks();
                let emulated =
                    self.ring == Ring::Kernel || (self.bitness == 32 && self.reference.runs_32_bit_code_emulated());
                if emulated && kernel.split_store_faults_second_page {
                    if let Some(why) = second_page_first(inst, &state, &reference, &translated) {
                        return Ok(Ran::NotCompared(why.into()));
                    }
                }
                if quirks.gp_goes_to_emulator
                    && translated.raised(vector::GP)
                    && emulation_differs_after_gp(&inst.instr)
                {
                    return Ok(Ran::NotCompared(
                        "the translator raised #GP, which kvm_pvm sends to its emulator, whose result differs for this form"
                            .into(),
                    ));
                }
                let mut ignore = Ignore::nondeterministic(rule, &inst.instr, true);
                let cpuid_adjusted = self.reference.cpuid_adjusted(state.gpr[0] as u32, state.gpr[1] as u32);
                ignore.gpr |= mask_quirks(
                    &quirks,
                    cpuid_adjusted,
                    &inst.instr,
                    &state,
                    &reference,
                    &mut translated,
                );
                let masks = Masks {
                    cpl0: self.ring == Ring::Kernel,
                    // (32-bit code at CPL3 may run in the reference's instruction emulator too:
                    // `Reference::runs_32_bit_code_emulated`.)
                    kernel: if emulated {
                        self.reference.kernel_quirks()
                    } else {
                        KernelQuirks::default()
                    },
                    error_code: !error_code_unfit,
                    fault_address,
                    operand: store_operand(inst, &state),
                    data_selectors: quirks.loses_data_selectors,
                    ignore,
                    masked_off_pages: masked_off_pages(&inst.instr, &state),
                };
                outcome::differences(&inst.instr, &reference, &translated, &tables, masks)
            }
            Err(e) => vec![format!("translator error: {e}")],
        };
        if diffs.is_empty() {
            Ok(Ran::Compared)
        } else {
            let mut diffs = diffs;
            diffs.push(format!(
                "page tables at {:#x}: data PTEs {:#x} {:#x}, neighbours {:#x} {:#x}",
                tables.root,
                tables.data_ptes[0],
                tables.data_ptes[1],
                tables.neighbour_ptes[0],
                tables.neighbour_ptes[1]
            ));
            Err(Failure::Case {
                under: format!(
                    "system mode at {}",
                    if self.ring == Ring::User { "CPL3" } else { "CPL0" }
                ),
                state: Box::new(state),
                diffs,
            })
        }
    }

    /// Runs the translator on the machine from `state`.
    fn translated(&mut self, state: &GuestState) -> Result<Stop, String> {
        self.platform.writes.clear();
        let t = &mut self.translator;
        *t.state_mut() = state.clone();
        // Every case has new page tables: like a CPU after a CR3 write, nothing translated
        // through the old ones may be used (and the code pages' accessed bits get set again).
        t.flush();
        match t.run(&mut self.platform, RUN_BUDGET).map_err(|e| e.to_string())? {
            Exit::Halt => Ok(Stop::Halted(Box::new(t.state().clone()))),
            Exit::TripleFault(_) => Ok(Stop::Shutdown),
            other => Err(format!("the translated run ended with {other:?}")),
        }
    }
}

impl Cases for SystemWorker {
    fn place(&self) -> (u64, u64) {
        (guest::code_at(), guest::data())
    }

    fn bitness(&self) -> u32 {
        self.bitness
    }

    fn load(&mut self, inst: &Instance) {
        guest::write_code(self.ram.0, &inst.bytes, inst.lead_in);
        guest::write_code(self.reference.ram(), &inst.bytes, inst.lead_in);
    }

    /// Runs one case. At CPL3 a case whose outcomes differ runs once more from the same inputs
    /// before it counts as a failure: kvm_pvm's CPL3 runs are not always the CPU's (once, in a
    /// CI run under load on an Intel Xeon SPR host, `popfq` popping NT=1 came back with NT clear
    /// in the #GP frame of the case's closing `hlt`; the same case passed in 20,000 reruns and
    /// in 10 further full runs). The translator is deterministic: a difference it causes
    /// repeats and is reported.
    fn run(&mut self, inst: &Instance, rng: &mut Rng, rule: Rule) -> Result<Ran, Failure> {
        let (inputs, case) = (rng.clone(), self.case);
        match self.run_once(inst, rng, rule) {
            Err(Failure::Case { .. }) if self.ring == Ring::User => {
                *rng = inputs;
                self.case = case;
                match self.run_once(inst, rng, rule)? {
                    Ran::Compared => Ok(Ran::ComparedOnRerun),
                    other => Ok(other),
                }
            }
            other => other,
        }
    }
}

/// Which of the two data pages a masked move (`vmaskmov*`, `vpmaskmov*`) covers without any
/// selected element in it. The SDM (VMASKMOV): "In cases where mask bits indicate data should
/// not be loaded or stored paging A and D bits will be set in an implementation dependent
/// way"; an Intel Xeon leaves them alone, as the translator does, but another CPU need not.
fn masked_off_pages(instr: &iced_x86::Instruction, state: &GuestState) -> [bool; 2] {
    use crate::emulate::regs::{linear_address, read_ymm};
    use iced_x86::Mnemonic as M;
    let es = match instr.mnemonic() {
        M::Vmaskmovps | M::Vpmaskmovd => 4,
        M::Vmaskmovpd | M::Vpmaskmovq => 8,
        _ => return [false; 2],
    };
    let store = instr.op0_kind() == iced_x86::OpKind::Memory;
    let (memory_operand, data) = if store {
        (0, instr.op2_register())
    } else {
        (2, instr.op0_register())
    };
    let bytes = if data.is_ymm() { 32 } else { 16 };
    let base = linear_address(state, instr, memory_operand, 0).unwrap_or(0);
    let mask = read_ymm(state, instr.op1_register().number() & 15);
    let page_of =
        |va: u64| (0..2u64).find(|&p| (guest::data() + 0x1000 * p..guest::data() + 0x1000 * (p + 1)).contains(&va));
    let mut covered = [false; 2];
    let mut selected = [false; 2];
    for i in 0..bytes / es {
        for byte in [i * es, i * es + es - 1] {
            if let Some(p) = page_of(base.wrapping_add(byte as u64)) {
                covered[p as usize] = true;
                if mask[i * es + es - 1] & 0x80 != 0 {
                    selected[p as usize] = true;
                }
            }
        }
    }
    [covered[0] && !selected[0], covered[1] && !selected[1]]
}

/// Makes the translated outcome agree with the reference's in the fields `quirks` says the
/// reference cannot get right for `instr` from input state `input`. Returns the GPRs not to
/// compare.
fn mask_quirks(
    quirks: &Quirks,
    cpuid_adjusted: [u32; 4],
    instr: &iced_x86::Instruction,
    input: &GuestState,
    reference: &outcome::SystemOutcome,
    translated: &mut outcome::SystemOutcome,
) -> u16 {
    use crate::emulate::regs::linear_address;
    use iced_x86::{Mnemonic as M, OpKind, Register};
    let both_page_faulted = reference.raised(vector::PF) && translated.raised(vector::PF);
    let (Some(a), Some(b)) = (&reference.outcome, &mut translated.outcome) else {
        return 0;
    };
    // Copies the reference's data bytes at virtual `va..va+len` (those in the data region).
    let mut copy_data = |va: u64, len: u64| {
        for v in va..va.wrapping_add(len) {
            let at = v.wrapping_sub(guest::data()) as usize;
            if at < a.data.len() {
                b.data[at] = a.data[at];
            }
        }
    };
    let mut gprs = 0u16;
    let data_selector = |r: Register| matches!(r, Register::ES | Register::DS | Register::FS | Register::GS);
    if quirks.loses_data_selectors {
        match instr.mnemonic() {
            M::Push if data_selector(instr.op0_register()) => {
                let size = instr.stack_pointer_increment().unsigned_abs() as u64;
                copy_data(input.gpr[4].wrapping_sub(size), size);
            }
            M::Mov if instr.op1_kind() == OpKind::Register && data_selector(instr.op1_register()) => {
                if instr.op0_kind() == OpKind::Memory {
                    copy_data(linear_address(input, instr, 0, 0).unwrap_or(0), 2);
                } else {
                    gprs |= 1 << (instr.op0_register().full_register().number() & 15);
                }
            }
            _ => {}
        }
    }
    if quirks.descriptor_table_stores_split
        && matches!(instr.mnemonic(), M::Sgdt | M::Sidt | M::Smsw)
        && instr.op0_kind() == OpKind::Memory
        && both_page_faulted
    {
        let len = if instr.mnemonic() == M::Smsw { 2 } else { 10 };
        copy_data(linear_address(input, instr, 0, 0).unwrap_or(0), len);
    }
    if quirks.x87_wide_stores_split
        && matches!(instr.code(), iced_x86::Code::Fstp_m80fp | iced_x86::Code::Fbstp_m80bcd)
        && both_page_faulted
    {
        copy_data(linear_address(input, instr, 0, 0).unwrap_or(0), 10);
    }
    if instr.mnemonic() == M::Cpuid {
        let adjusted = cpuid_adjusted;
        // EAX, EBX, ECX, EDX are GPRs 0, 3, 1, 2.
        for (reg, bits) in [0, 3, 1, 2].into_iter().zip(adjusted) {
            let bits = bits as u64;
            b.gpr[reg] = (b.gpr[reg] & !bits) | (a.gpr[reg] & bits);
        }
    }
    gprs
}

//! What a system-mode case produced, read back from the machine after it stopped (the same way
//! for either engine: the state at the `hlt` and guest RAM), and how two such outcomes are
//! compared: the interrupted code's registers, flags, vector state and data through the
//! user-mode harness's comparison (`compare.rs`), plus what only a whole machine shows — the
//! vector that was delivered, its full error code, the frame on the kernel stack (RFLAGS
//! whole: IF, IOPL, RF…), CR2, the page-table entries' accessed and dirty bits, and at CPL0 the
//! system registers.

use super::super::compare::{self, Event, Ignore, Outcome};
use super::super::synth::Instance;
use super::guest::{self, Tables, HANDLERS, KERNEL_STACK_TOP, LSTAR_STUB};
use crate::exit::GuestException;
use crate::state::GuestState;
use iced_x86::Instruction;

/// How a run of the machine ended, as an engine reports it.
pub enum Stop {
    /// `hlt` at CPL0 ran: the state after it.
    Halted(Box<GuestState>),
    /// A triple fault (KVM's shutdown exit).
    Shutdown,
}

/// Where the machine stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// In vector `vector`'s handler, with the frame the delivery pushed (error code first when
    /// the vector has one).
    Handler {
        vector: u8,
        frame: Vec<u64>,
    },
    /// At CPL0, in the code region's `hlt` sea.
    Sea,
    /// At the `syscall` entry (LSTAR).
    Syscall,
    /// Somewhere else (the `hlt` at this address).
    Elsewhere(u64),
    Shutdown,
}

pub struct SystemOutcome {
    pub ending: Ending,
    /// The interrupted code's state (None after a shutdown).
    pub outcome: Option<Outcome>,
    /// The state at the stop (system registers, CR2).
    pub last: Option<Box<GuestState>>,
    /// The case's page-table frames.
    pub tables: Vec<u8>,
    /// The `out`s the run made (CPL0), in order.
    pub port_writes: Vec<super::device::PortWrite>,
    /// The page holding the GDT and the CPL0 machine's LDT (`ltr` marks a TSS busy there).
    pub descriptors: Vec<u8>,
}

impl SystemOutcome {
    /// The run ended in the handler of `vector`.
    pub fn raised(&self, vector: u8) -> bool {
        matches!(self.ending, Ending::Handler { vector: v, .. } if v == vector)
    }
}

/// Exceptions whose delivery pushes an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21)
}

/// Reads what the case produced from the stop state and the machine's RAM.
pub fn read(ram: &[u8], stop: Stop, inst: &Instance, tables: &Tables) -> SystemOutcome {
    let (lo, hi) = tables.range();
    let table_bytes = ram[lo as usize..hi as usize].to_vec();
    let last = match stop {
        Stop::Shutdown => {
            return SystemOutcome {
                ending: Ending::Shutdown,
                outcome: None,
                last: None,
                tables: table_bytes,
                port_writes: Vec::new(),
                descriptors: guest::descriptor_page(ram).to_vec(),
            }
        }
        Stop::Halted(s) => s,
    };
    let at = last.rip.wrapping_sub(1);
    let data = guest::read_data(ram);
    let mut s = (*last).clone();
    s.rip = at;
    let (ending, event) = if (HANDLERS..HANDLERS + 256).contains(&at) {
        let vector = (at - HANDLERS) as u8;
        let words = 5 + has_error_code(vector) as u64;
        let rsp = last.gpr[4];
        let frame: Vec<u64> = if rsp >= KERNEL_STACK_TOP - 0x1000 && rsp + 8 * words <= KERNEL_STACK_TOP {
            (0..words).map(|i| guest::get(ram, rsp + 8 * i)).collect()
        } else {
            Vec::new()
        };
        let error_code = has_error_code(vector).then(|| frame.first().copied().unwrap_or(0) as u32);
        if let [rip, cs, rflags, rsp, ss] = frame[frame.len().saturating_sub(5)..] {
            s.rip = rip;
            s.seg[1] = cs as u16;
            s.rflags = rflags;
            s.gpr[4] = rsp;
            s.seg[2] = ss as u16;
        }
        let inside = (inst.instr.ip()..inst.instr.next_ip()).contains(&s.rip);
        let in_sea = !inside && guest::code_byte(ram, s.rip) == Some(super::super::machine::HLT);
        let event = if vector == 13 && error_code == Some(0) && in_sea && s.seg[1] & 3 == 3 {
            Event::Completed
        } else {
            Event::Exception(GuestException {
                vector,
                error_code,
                address: (vector == 14).then_some(last.cr2),
            })
        };
        (Ending::Handler { vector, frame }, event)
    } else if at == LSTAR_STUB {
        (Ending::Syscall, Event::Completed)
    } else if guest::code_byte(ram, at) == Some(super::super::machine::HLT) {
        (Ending::Sea, Event::Completed)
    } else {
        (Ending::Elsewhere(at), Event::Completed)
    };
    SystemOutcome {
        ending,
        outcome: Some(Outcome::from_state(&s, event, data)),
        last: Some(last),
        tables: table_bytes,
        port_writes: Vec::new(),
        descriptors: guest::descriptor_page(ram).to_vec(),
    }
}

/// What the comparison leaves out, and why (see the README's `--system` section).
#[derive(Clone, Copy, Default)]
pub struct Masks {
    pub ignore: Ignore,
    /// Leave the ES, DS, FS and GS selectors out.
    pub data_selectors: bool,
    /// A CPL0 case: compare what only CPL0 code can change too (debug registers, CR8, the
    /// other MSRs, TR/LDTR bases and limits, the GDT/LDT page).
    pub cpl0: bool,
    /// What the reference does differently at CPL0 for every form.
    pub kernel: super::KernelQuirks,
    /// Compare the exception's error code (false: the reference is known to report another).
    pub error_code: bool,
    /// The explicit memory operand, as offsets into the data region (start, end).
    pub operand: Option<(u64, u64)>,
    /// Leave a #PF's address (CR2) out when both raised #PF (the reference accesses the
    /// pieces of the operand in another order than the CPU).
    pub fault_address: bool,
    /// Leave out the accessed and dirty bits of these data pages (0, 1): pages a masked move's
    /// operand covers where no selected element lies (the SDM leaves them to the
    /// implementation).
    pub masked_off_pages: [bool; 2],
}

/// Every difference between the reference's outcome and the translator's; empty means equal.
pub fn differences(
    instr: &Instruction,
    reference: &SystemOutcome,
    translated: &SystemOutcome,
    tables: &Tables,
    masks: Masks,
) -> Vec<String> {
    let mut out = Vec::new();
    // An ignored RSP (the destination of `rdrand rsp`, say) or RFLAGS bit is ignored in the
    // pushed frame too.
    let rsp_ignored = masks.ignore.gpr & (1 << 4) != 0;
    let ending = |e: &Ending| match e {
        Ending::Handler { vector, frame } if frame.len() >= 5 => {
            let mut frame = frame.clone();
            let at = frame.len() - 2;
            if rsp_ignored {
                frame[at] = 0;
            }
            frame[at - 1] &= !masks.ignore.rflags;
            Ending::Handler { vector: *vector, frame }
        }
        other => other.clone(),
    };
    // Equalize what is not compared before comparing the rest.
    let mut translated_ending = translated.ending.clone();
    if !masks.error_code {
        if let (Ending::Handler { vector: v, frame: f }, Ending::Handler { vector: w, frame: g }) =
            (&reference.ending, &mut translated_ending)
        {
            if v == w && has_error_code(*v) && !f.is_empty() && !g.is_empty() {
                g[0] = f[0];
            }
        }
    }
    let translated = &SystemOutcome {
        ending: translated_ending,
        outcome: translated.outcome.clone().map(|mut b| {
            if let (Some(a), false) = (&reference.outcome, masks.error_code) {
                if let (Event::Exception(x), Event::Exception(y)) = (a.event, &mut b.event) {
                    if x.vector == y.vector {
                        y.error_code = x.error_code;
                    }
                }
            }
            if let (Some(a), Some(split)) = (&reference.outcome, split_store(reference, translated, masks)) {
                b.data[split.clone()].copy_from_slice(&a.data[split]);
            }
            b
        }),
        last: translated.last.clone(),
        tables: translated.tables.clone(),
        port_writes: translated.port_writes.clone(),
        descriptors: translated.descriptors.clone(),
    };
    if ending(&reference.ending) != ending(&translated.ending) {
        out.push(format!(
            "stopped: reference {}, translated {}",
            describe_ending(&reference.ending),
            describe_ending(&translated.ending)
        ));
    }
    if let (Some(a), Some(b)) = (&reference.outcome, &translated.outcome) {
        let mut b = b.clone();
        if masks.data_selectors {
            for i in [0, 3, 4, 5] {
                b.seg[i] = a.seg[i];
            }
        }
        if a.event != Event::Completed || b.event != Event::Completed {
            if let Some(unused) = gather_unused_bytes(instr) {
                unused.copy(&a.xsave, &mut b.xsave);
            }
            for r in vex_gather_registers(instr) {
                if let (Some(from), Some(to)) = (a.xsave.zmm_upper(r), b.xsave.zmm_upper_mut(r)) {
                    to.copy_from_slice(from);
                }
            }
        }
        out.extend(
            compare::differences(instr, a, &b, masks.ignore)
                .into_iter()
                .map(|d| d.replace("native", "reference")),
        );
        if let (Event::Exception(x), Event::Exception(y)) = (a.event, b.event) {
            if x.error_code != y.error_code {
                out.push(format!(
                    "error code: reference {:x?}, translated {:x?}",
                    x.error_code, y.error_code
                ));
            }
        }
    }
    if masks.cpl0 {
        for (i, (x, y)) in reference
            .descriptors
            .chunks(8)
            .zip(translated.descriptors.chunks(8))
            .enumerate()
        {
            if x != y {
                out.push(format!(
                    "descriptor at {:#x}: reference {:02x?}, translated {:02x?}",
                    guest::GDT + 8 * i as u64,
                    x,
                    y
                ));
            }
        }
    }
    if reference.port_writes != translated.port_writes {
        out.push(format!(
            "port writes: reference {:x?}, translated {:x?}",
            reference.port_writes, translated.port_writes
        ));
    }
    let coarse = pieces_in_cpu_order(instr);
    let same_page = |x: u64, y: u64| x >> 12 == y >> 12;
    let any_address = masks.fault_address && reference.raised(14) && translated.raised(14);
    if let (Some(a), Some(b)) = (&reference.last, &translated.last) {
        if a.cr2 != b.cr2 && !(coarse && same_page(a.cr2, b.cr2)) && !any_address {
            out.push(format!("cr2: reference {:#x}, translated {:#x}", a.cr2, b.cr2));
        }
        out.extend(system_registers(a, b, masks));
    }
    if reference.tables != translated.tables {
        // After a #PF, the accessed and dirty bits of the pages an instruction walked before
        // the one that faulted depend on the order the CPU touches its operands' pages.
        let mut x = reference.tables.clone();
        let mut y = translated.tables.clone();
        let after_fault = reference.raised(14) || translated.raised(14);
        for (page, pte) in data_pte_offsets(tables).into_iter().enumerate() {
            if after_fault || masks.masked_off_pages[page] {
                for t in [&mut x, &mut y] {
                    t[pte] &= !0x60;
                }
            }
        }
        out.extend(table_differences(&x, &y, tables));
    }
    // A #PF's address is compared at page granularity for such instructions (it is in CR2,
    // already checked, and in the event).
    if coarse {
        out.retain(|d| !(d.starts_with("event:") && same_page_fault_event(reference, translated)));
    }
    if any_address {
        out.retain(|d| !(d.starts_with("event:") && same_fault_but_address(reference, translated)));
    }
    out
}

/// Both ended in #PF with the same error code (wherever).
fn same_fault_but_address(a: &SystemOutcome, b: &SystemOutcome) -> bool {
    match (&a.outcome, &b.outcome) {
        (Some(x), Some(y)) => matches!(
            (x.event, y.event),
            (Event::Exception(e), Event::Exception(f)) if e.vector == 14 && f.vector == 14 && e.error_code == f.error_code
        ),
        _ => false,
    }
}

/// The data bytes a reference that writes a page-crossing store page by page
/// ([`super::KernelQuirks::split_store_writes_first_page`]) left written when the store's second
/// page faulted (both engines raised the same #PF at that page's start): the range, as offsets
/// into the data region.
fn split_store(reference: &SystemOutcome, translated: &SystemOutcome, masks: Masks) -> Option<std::ops::Range<usize>> {
    if !masks.kernel.split_store_writes_first_page || !reference.raised(14) || !translated.raised(14) {
        return None;
    }
    let (start, end) = masks.operand?;
    let (a, b) = (reference.last.as_ref()?, translated.last.as_ref()?);
    let page = a.cr2.checked_sub(guest::data())?;
    (a.cr2 == b.cr2 && page.is_multiple_of(4096) && start < page && page < end).then_some(start as usize..page as usize)
}

/// Instructions whose memory access is made of many pieces the CPU touches in an order of its
/// own (the FXSAVE/XSAVE images, the x87 environment, masked moves, gathers): when one
/// faults, CR2 may name any byte of the faulting page that the CPU reached first, so it is
/// compared at page granularity. (The `iret` frame's order is modelled: `system/transfer.rs`.)
fn pieces_in_cpu_order(instr: &Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        instr.mnemonic(),
        M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fnsave
            | M::Fsave
            | M::Frstor
            | M::Vmaskmovps
            | M::Vmaskmovpd
            | M::Vpmaskmovd
            | M::Vpmaskmovq
            | M::Maskmovq
            | M::Maskmovdqu
            | M::Vmaskmovdqu
    ) || instr.is_vsib()
}

/// The bytes of a gather's destination and mask registers that correspond to no element (a
/// gather of dwords by qword indices fills half its vector length): the SDM (VPGATHERQD,
/// VGATHERQPS) lets the CPU update them "even if the instruction triggers an exception", so
/// after a fault they are the implementation's. (An Intel Xeon normalizes the mask's unused
/// elements as it does the others and leaves the destination's; the translator does the
/// same, but another CPU need not.)
struct UnusedBytes {
    regs: [usize; 2],
    from: usize,
}

impl UnusedBytes {
    fn copy(&self, from: &crate::state::XSaveArea, to: &mut crate::state::XSaveArea) {
        for r in self.regs {
            let mut v = [0u8; 32];
            v[..16].copy_from_slice(from.xmm(r));
            v[16..].copy_from_slice(from.ymm_hi(r));
            let mut w = [0u8; 32];
            w[..16].copy_from_slice(to.xmm(r));
            w[16..].copy_from_slice(to.ymm_hi(r));
            w[self.from..].copy_from_slice(&v[self.from..]);
            to.xmm_mut(r).copy_from_slice(&w[..16]);
            to.ymm_hi_mut(r).copy_from_slice(&w[16..]);
        }
    }
}

fn gather_unused_bytes(instr: &Instruction) -> Option<UnusedBytes> {
    use iced_x86::Mnemonic as M;
    if !matches!(instr.mnemonic(), M::Vpgatherqd | M::Vgatherqps) {
        return None;
    }
    let elements = if instr.memory_index().is_ymm() { 4 } else { 2 };
    Some(UnusedBytes {
        regs: [instr.op0_register().number() & 15, instr.op2_register().number() & 15],
        from: 4 * elements,
    })
}

/// The destination and mask of a VEX gather: after a fault, bits 511:256 of both are the
/// implementation's as well (the SDM's "may update" above; an AMD EPYC under kvm_pvm leaves
/// them as they were, the translator zeroes them as a completed VEX instruction does). They
/// are compared where the model offers AVX-512 state.
fn vex_gather_registers(instr: &Instruction) -> Vec<usize> {
    if !instr.is_vsib() || instr.encoding() != iced_x86::EncodingKind::VEX {
        return Vec::new();
    }
    vec![instr.op0_register().number(), instr.op2_register().number()]
}

/// Both ended in #PF with the same error code and CR2 in the same page.
fn same_page_fault_event(a: &SystemOutcome, b: &SystemOutcome) -> bool {
    match (&a.outcome, &b.outcome) {
        (Some(x), Some(y)) => match (x.event, y.event) {
            (Event::Exception(e), Event::Exception(f)) => {
                e.vector == 14
                    && f.vector == 14
                    && e.error_code == f.error_code
                    && e.address.map(|v| v >> 12) == f.address.map(|v| v >> 12)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Byte offsets, in the table set, of the low byte of each data page's leaf entry.
fn data_pte_offsets(tables: &Tables) -> [usize; 2] {
    let _ = tables;
    let slot = |va: u64| 4 * 4096 + (((va >> 12) & 511) * 8) as usize;
    [slot(guest::data()), slot(guest::data() + 4096)]
}

fn describe_ending(e: &Ending) -> String {
    match e {
        Ending::Handler { vector, frame } => format!(
            "in the handler of vector {vector} with frame [{}]",
            frame.iter().map(|w| format!("{w:#x}")).collect::<Vec<_>>().join(", ")
        ),
        Ending::Sea => "at CPL0 in the code region's hlt sea".into(),
        Ending::Syscall => "at the syscall entry".into(),
        Ending::Elsewhere(at) => format!("at a hlt at {at:#x}"),
        Ending::Shutdown => "by a triple fault (shutdown)".into(),
    }
}

/// The registers only CPL0 code changes.
fn system_registers(a: &GuestState, b: &GuestState, masks: Masks) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |name: &str, x: u64, y: u64| {
        if x != y {
            out.push(format!("{name}: reference {x:#x}, translated {y:#x}"));
        }
    };
    check("cr0", a.cr0, b.cr0);
    check("cr3", a.cr3, b.cr3);
    check("cr4", a.cr4, b.cr4);
    check("efer", a.efer, b.efer);
    check("xcr0", a.xcr0, b.xcr0);
    check("gdtr.base", a.sys.gdtr.base, b.sys.gdtr.base);
    check("gdtr.limit", a.sys.gdtr.limit as u64, b.sys.gdtr.limit as u64);
    check("idtr.base", a.sys.idtr.base, b.sys.idtr.base);
    check("idtr.limit", a.sys.idtr.limit as u64, b.sys.idtr.limit as u64);
    check("tr", a.sys.tr.selector as u64, b.sys.tr.selector as u64);
    check("ldtr", a.sys.ldtr.selector as u64, b.sys.ldtr.selector as u64);
    check("kernel_gs_base", a.kernel_gs_base, b.kernel_gs_base);
    check("star", a.sys.msr.star, b.sys.msr.star);
    check("lstar", a.sys.msr.lstar, b.sys.msr.lstar);
    check("cstar", a.sys.msr.cstar, b.sys.msr.cstar);
    check("sfmask", a.sys.msr.sfmask, b.sys.msr.sfmask);
    if masks.cpl0 {
        // What only a CPL0 case sets up (a CPL3 one cannot change or read these).
        check("cr8", a.sys.cr8, b.sys.cr8);
        check("tsc_aux", a.sys.msr.tsc_aux, b.sys.msr.tsc_aux);
        check("pat", a.sys.msr.pat, b.sys.msr.pat);
        check("sysenter_cs", a.sys.msr.sysenter_cs, b.sys.msr.sysenter_cs);
        check("sysenter_esp", a.sys.msr.sysenter_esp, b.sys.msr.sysenter_esp);
        check("sysenter_eip", a.sys.msr.sysenter_eip, b.sys.msr.sysenter_eip);
        for (i, name) in [(0, "dr0"), (1, "dr1"), (2, "dr2"), (3, "dr3"), (6, "dr6"), (7, "dr7")] {
            let ignored = if i == 6 { masks.kernel.dr6_ignored } else { 0 };
            check(name, a.sys.dr[i] & !ignored, b.sys.dr[i] & !ignored);
        }
        check("ldtr.base", a.sys.ldtr.base, b.sys.ldtr.base);
        check("ldtr.limit", a.sys.ldtr.limit as u64, b.sys.ldtr.limit as u64);
        check("tr.base", a.sys.tr.base, b.sys.tr.base);
        check("tr.limit", a.sys.tr.limit as u64, b.sys.tr.limit as u64);
    }
    out
}

/// Names each page-table entry that differs (its level, index and bits).
fn table_differences(a: &[u8], b: &[u8], tables: &Tables) -> Vec<String> {
    const NAMES: [&str; 10] = [
        "PML4",
        "PDPT",
        "PD",
        "low PT",
        "test PT",
        "alternate PML4",
        "alternate PDPT",
        "alternate PD",
        "alternate low PT",
        "alternate test PT",
    ];
    let mut out = Vec::new();
    for (i, (x, y)) in a.chunks(8).zip(b.chunks(8)).enumerate() {
        if x != y {
            let (x, y) = (
                u64::from_le_bytes(x.try_into().expect("8 bytes")),
                u64::from_le_bytes(y.try_into().expect("8 bytes")),
            );
            let frame = i / 512;
            out.push(format!(
                "{} entry {} (at {:#x}): reference {x:#x}, translated {y:#x} (differing bits {:#x}{})",
                NAMES[frame],
                i % 512,
                tables.root + 8 * i as u64,
                x ^ y,
                ad_note(x ^ y)
            ));
        }
    }
    out
}

fn ad_note(bits: u64) -> &'static str {
    match bits {
        0x20 => ": accessed",
        0x40 => ": dirty",
        0x60 => ": accessed and dirty",
        _ => "",
    }
}

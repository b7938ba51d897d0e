//! What a run produced, and how two runs are compared: GPRs, RIP, RFLAGS (minus what iced marks
//! undefined), x87/MMX/SSE/AVX/AVX-512 state (minus the x87 last-instruction pointers, which record host
//! addresses), the data region, and the event that ended the run.

use crate::exit::GuestException;
use crate::state::{GuestState, XSaveArea};
use iced_x86::{Instruction, RflagsBits};
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The instruction finished and control reached `rip` in the HLT sea.
    Completed,
    Exception(GuestException),
}

#[derive(Clone)]
pub struct Outcome {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub event: Event,
    /// ES, CS, SS, DS, FS, GS selectors and the FS/GS bases.
    pub seg: [u16; 6],
    pub fs_base: u64,
    pub gs_base: u64,
    pub xsave: XSaveArea,
    pub data: Vec<u8>,
}

impl Outcome {
    pub fn from_state(state: &GuestState, event: Event, data: Vec<u8>) -> Self {
        let mut xsave = state.xsave.clone();
        xsave.normalize();
        Outcome {
            gpr: state.gpr,
            rip: state.rip,
            rflags: state.rflags,
            event,
            seg: state.seg,
            fs_base: state.fs_base,
            gs_base: state.gs_base,
            xsave,
            data,
        }
    }
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
];

/// RFLAGS bits compared for `instr`: the status flags, DF and AC, minus undefined ones.
fn rflags_mask(instr: &Instruction) -> u64 {
    let undefined = instr.rflags_undefined();
    let mut mask = 0x8d5u64 | (1 << 10) | (1 << 18);
    for (bit, iced) in [
        (0, RflagsBits::CF),
        (2, RflagsBits::PF),
        (4, RflagsBits::AF),
        (6, RflagsBits::ZF),
        (7, RflagsBits::SF),
        (11, RflagsBits::OF),
    ] {
        if undefined & iced != 0 {
            mask &= !(1u64 << bit);
        }
    }
    mask
}

/// FSW bits compared: all but condition codes iced marks undefined.
fn fsw_mask(instr: &Instruction) -> u16 {
    let undefined = instr.rflags_undefined();
    let mut mask = 0xffffu16;
    for (bit, iced) in [
        (8, RflagsBits::C0),
        (9, RflagsBits::C1),
        (10, RflagsBits::C2),
        (14, RflagsBits::C3),
    ] {
        if undefined & iced != 0 {
            mask &= !(1 << bit);
        }
    }
    mask
}

/// Fields to leave out of the comparison (nondeterministic results).
#[derive(Default, Clone, Copy)]
pub struct Ignore {
    pub gpr: u16,
    /// RFLAGS bits.
    pub rflags: u64,
}

impl Ignore {
    /// What of `instr`'s result (rule `rule`) cannot be reproduced, so is not compared: the
    /// time-stamp counter in RDX:RAX of `rdtsc`/`rdtscp`, the value of `rdrand`/`rdseed` and
    /// their CF (whether the entropy source had a number: `rdseed` runs dry now and then —
    /// measured on an Intel Xeon (Sapphire Rapids) in CI, native CF=0, translated CF=1; their
    /// other flags are compared), and — against KVM (`against_kvm`) — the TSC_AUX `rdpid` and
    /// `rdtscp` read, which kvm_pvm lets CPL3 code read from the host (the host CPU's number:
    /// the comparison passed or failed with the CPU the test thread ran on).
    pub fn nondeterministic(rule: crate::rules::Rule, instr: &Instruction, against_kvm: bool) -> Self {
        use crate::rules::{EmulateOp, Rule};
        let dest = || 1u16 << (instr.op0_register().full_register().number() & 15);
        match rule {
            Rule::Emulate(EmulateOp::Rdtscp) if against_kvm => Ignore { gpr: 0b111, rflags: 0 },
            Rule::Emulate(EmulateOp::Rdtsc | EmulateOp::Rdtscp) => Ignore { gpr: 0b101, rflags: 0 },
            Rule::Emulate(EmulateOp::Random) => Ignore {
                gpr: dest(),
                rflags: crate::state::flags::CF,
            },
            Rule::Emulate(EmulateOp::Rdpid) if against_kvm => Ignore { gpr: dest(), rflags: 0 },
            _ => Ignore::default(),
        }
    }
}

/// Lists every difference between `native` and `translated`; empty means equal.
pub fn differences(instr: &Instruction, native: &Outcome, translated: &Outcome, ignore: Ignore) -> Vec<String> {
    let mut out = Vec::new();
    if !events_match(&native.event, &translated.event, fault_page_only(instr)) {
        out.push(format!(
            "event: native {:?}, translated {:?}",
            native.event, translated.event
        ));
    }
    if native.rip != translated.rip {
        out.push(format!(
            "rip: native {:#x}, translated {:#x}",
            native.rip, translated.rip
        ));
    }
    for (n, name) in GPR_NAMES.iter().enumerate() {
        if ignore.gpr & (1 << n) == 0 && native.gpr[n] != translated.gpr[n] {
            out.push(format!(
                "{name}: native {:#x}, translated {:#x}",
                native.gpr[n], translated.gpr[n]
            ));
        }
    }
    if native.seg != translated.seg {
        out.push(format!(
            "segments (es cs ss ds fs gs): native {:x?}, translated {:x?}",
            native.seg, translated.seg
        ));
    }
    if (native.fs_base, native.gs_base) != (translated.fs_base, translated.gs_base) {
        out.push(format!(
            "fs/gs base: native {:#x}/{:#x}, translated {:#x}/{:#x}",
            native.fs_base, native.gs_base, translated.fs_base, translated.gs_base
        ));
    }
    let mask = rflags_mask(instr) & !ignore.rflags;
    if native.rflags & mask != translated.rflags & mask {
        out.push(format!(
            "rflags (compared bits {mask:#x}): native {:#x}, translated {:#x}",
            native.rflags & mask,
            translated.rflags & mask
        ));
    }
    let (a, b) = (&native.xsave, &translated.xsave);
    if a.fcw() != b.fcw() {
        out.push(format!("fcw: native {:#x}, translated {:#x}", a.fcw(), b.fcw()));
    }
    let fm = fsw_mask(instr);
    if a.fsw() & fm != b.fsw() & fm {
        out.push(format!(
            "fsw: native {:#x}, translated {:#x}",
            a.fsw() & fm,
            b.fsw() & fm
        ));
    }
    if a.ftw() != b.ftw() {
        out.push(format!("ftw: native {:#x}, translated {:#x}", a.ftw(), b.ftw()));
    }
    if a.mxcsr() != b.mxcsr() {
        out.push(format!("mxcsr: native {:#x}, translated {:#x}", a.mxcsr(), b.mxcsr()));
    }
    for i in 0..8 {
        if a.st(i) != b.st(i) {
            out.push(format!(
                "st{i}/mm{i}: native {}, translated {}",
                hex(a.st(i)),
                hex(b.st(i))
            ));
        }
    }
    for i in 0..16 {
        if a.xmm(i) != b.xmm(i) || a.ymm_hi(i) != b.ymm_hi(i) {
            out.push(format!(
                "ymm{i}: native {}{}, translated {}{}",
                hex(a.ymm_hi(i)),
                hex(a.xmm(i)),
                hex(b.ymm_hi(i)),
                hex(b.xmm(i))
            ));
        }
    }
    // AVX-512: opmask registers, the upper halves of ZMM0-15 and ZMM16-31 (where managed).
    for k in 0..8 {
        if a.opmask(k) != b.opmask(k) {
            out.push(format!(
                "k{k}: native {:#x}, translated {:#x}",
                a.opmask(k).unwrap_or(0),
                b.opmask(k).unwrap_or(0)
            ));
        }
    }
    for i in 0..32 {
        if let (Some(x), Some(y)) = (a.zmm_upper(i), b.zmm_upper(i)) {
            if x != y {
                let part = if i < 16 { "[511:256]" } else { "" };
                out.push(format!("zmm{i}{part}: native {}, translated {}", hex(x), hex(y)));
            }
        }
    }
    if native.data != translated.data {
        let first = native
            .data
            .iter()
            .zip(&translated.data)
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        let end = (first + 16).min(native.data.len());
        out.push(format!(
            "data+{first:#x}: native {}, translated {}",
            hex(&native.data[first..end]),
            hex(&translated.data[first..end])
        ));
    }
    out
}

/// Whether a masked AVX-512 access's #PF address is compared by page only. Which byte of the
/// faulting page CR2 names is not architectural. Measured on an Intel Xeon (Sapphire Rapids):
/// a load names its first active byte in the page; a store too, except that when the first
/// page holds an active element it names the last byte of the last active element
/// (`vmovdqu32 [p-4]{k1},ymm1` with k1 = 0xff faults at p+27, with 0xfe at p, with 0x7f at
/// p+23; an unmasked store at p) — the translator does the same
/// (`cpu::vendor::Quirk::MaskedStoreFaultAtLastByte`), so both are compared exactly there.
/// On other vendors (the system harness compares CR2 exactly on AMD EPYC, where it is the
/// first active byte) this harness compares them by page, and so `maskmovdqu`'s fault (the
/// Xeon checks its high 8 bytes first, `host::quirks`).
fn fault_page_only(instr: &Instruction) -> bool {
    use crate::cpu::vendor::Vendor;
    use iced_x86::Mnemonic::{Maskmovdqu, Vmaskmovdqu};
    let other_vendor = Vendor::host() != Vendor::Intel;
    (crate::mmu::masked::is_masked_access(instr) || matches!(instr.mnemonic(), Maskmovdqu | Vmaskmovdqu))
        && other_vendor
}

fn events_match(a: &Event, b: &Event, pf_page_only: bool) -> bool {
    let same_fault_address = |x: Option<u64>, y: Option<u64>| {
        if pf_page_only {
            x.map(|a| a >> 12) == y.map(|a| a >> 12)
        } else {
            x == y
        }
    };
    match (a, b) {
        (Event::Completed, Event::Completed) => true,
        (Event::Exception(x), Event::Exception(y)) => {
            x.vector == y.vector
                && (x.vector != 14 || same_fault_address(x.address, y.address))
                && (x.vector != 13 || x.error_code.unwrap_or(0) == y.error_code.unwrap_or(0))
        }
        _ => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().rev().map(|b| format!("{b:02x}")).collect()
}

/// The input state, for failure reports.
pub fn describe_state(s: &GuestState) -> String {
    let mut out = String::new();
    for (name, value) in GPR_NAMES.iter().zip(s.gpr) {
        let _ = write!(out, "{name}={value:#x} ");
    }
    let _ = write!(
        out,
        "rflags={:#x} mxcsr={:#x} fcw={:#x} fsw={:#x}",
        s.rflags,
        s.xsave.mxcsr(),
        s.xsave.fcw(),
        s.xsave.fsw()
    );
    out
}

//! What gdb is told about the guest CPU: an x86-64 target description with gdb's standard
//! features (core, SSE, segment bases, AVX upper halves) plus hbt's system registers, and the
//! conversion between gdb's register file and the translator's [`GuestState`].
//!
//! `gdbstub_arch::x86::X86_64_SSE` describes only the core and SSE registers; a kernel debugger
//! also wants FS/GS bases, CR0–CR4, CR8 and EFER (QEMU's stub shows them too), so this is an
//! `Arch` of its own that reuses gdbstub_arch's core register file for the first part.
//!
//! Writes: GPRs, RIP, RFLAGS (including the virtual IF/IOPL the translator keeps), x87, SSE
//! and AVX state, the FS/GS/kernel-GS bases, CR2 and CR8 are writable. Segment selectors,
//! CR0, CR3, CR4 and EFER are read-only (a selector write without a descriptor load, or a
//! paging change behind the translator's back, would leave the CPU inconsistent): a write that
//! changes one is refused, and gdb says so.

use gdbstub::arch::{Arch, RegId as _, Registers as _};
use gdbstub_arch::x86::reg::{id::X86_64CoreRegId, X86_64CoreRegs};
use hbt_translator::state::{flags, GuestState};
use std::num::NonZeroUsize;

/// x86-64 as hbt shows it to gdb.
pub enum HbtX86_64 {}

impl Arch for HbtX86_64 {
    type Usize = u64;
    type Registers = Registers;
    type RegId = RegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// The register file gdb's `g` packet carries.
pub fn serialize(r: &Registers) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FILE_BYTES);
    r.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
    bytes
}

/// Bytes of gdbstub_arch's core + SSE register file (registers 0..=56).
const CORE_BYTES: usize = 0x218;
/// Registers after the core ones, in target-description order (each 8 bytes but the
/// AVX halves, 16).
const SEGMENT_BASES: usize = 57;
const YMM_HI: usize = 59;
const SYSTEM: usize = 75;
/// `k_gs_base cr0 cr2 cr3 cr4 cr8 efer`.
const SYSTEM_REGS: usize = 7;
const LAST: usize = SYSTEM + SYSTEM_REGS - 1;
/// Bytes of the whole register file.
const FILE_BYTES: usize = CORE_BYTES + 16 + 16 * 16 + 8 * SYSTEM_REGS;

/// gdb's register file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registers {
    pub core: X86_64CoreRegs,
    pub fs_base: u64,
    pub gs_base: u64,
    /// Upper halves of YMM0..YMM15.
    pub ymm_hi: [u128; 16],
    /// IA32_KERNEL_GS_BASE, CR0, CR2, CR3, CR4, CR8, EFER.
    pub system: [u64; SYSTEM_REGS],
}

impl gdbstub::arch::Registers for Registers {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        let mut bytes = |b: &[u8]| b.iter().for_each(|&b| write_byte(Some(b)));
        bytes(&self.fs_base.to_le_bytes());
        bytes(&self.gs_base.to_le_bytes());
        for y in &self.ymm_hi {
            bytes(&y.to_le_bytes());
        }
        for r in &self.system {
            bytes(&r.to_le_bytes());
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != FILE_BYTES {
            return Err(());
        }
        self.core.gdb_deserialize(&bytes[..CORE_BYTES])?;
        let mut rest = &bytes[CORE_BYTES..];
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
        self.fs_base = u64_of(take(8));
        self.gs_base = u64_of(take(8));
        for y in &mut self.ymm_hi {
            *y = u128::from_le_bytes(take(16).try_into().unwrap_or_default());
        }
        for r in &mut self.system {
            *r = u64_of(take(8));
        }
        Ok(())
    }
}

/// A register by gdb's number (its place in the target description) and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegId {
    pub number: usize,
    pub size: usize,
}

impl RegId {
    /// Where the register lies in the `g` packet's register file.
    pub fn offset(&self) -> usize {
        (0..self.number)
            .filter_map(|n| RegId::from_raw_id(n).map(|(r, _)| r.size))
            .sum()
    }
}

impl gdbstub::arch::RegId for RegId {
    fn from_raw_id(id: usize) -> Option<(Self, Option<NonZeroUsize>)> {
        let size = match id {
            0..SEGMENT_BASES => X86_64CoreRegId::from_raw_id(id)?.1?.get(),
            YMM_HI..SYSTEM => 16,
            SEGMENT_BASES..=LAST => 8,
            _ => return None,
        };
        Some((RegId { number: id, size }, NonZeroUsize::new(size)))
    }

    fn to_raw_id(&self) -> Option<usize> {
        Some(self.number)
    }
}

/// A register write gdb asked for that hbt refuses.
#[derive(Debug, thiserror::Error)]
#[error("{0} is read-only under hbt's gdb stub")]
pub struct ReadOnly(pub &'static str);

/// Hardware order of `GuestState::gpr` for gdb's RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8..R15.
const GDB_GPR: [usize; 16] = [0, 3, 1, 2, 6, 7, 5, 4, 8, 9, 10, 11, 12, 13, 14, 15];
/// XSTATE_BV bits.
const X87: u64 = 1;
const SSE: u64 = 2;
const AVX: u64 = 4;
/// RFLAGS bits a debugger may set (VM cannot be set in long mode; bit 1 always reads 1).
const RFLAGS_WRITABLE: u64 = flags::STATUS
    | flags::TF
    | flags::IF
    | flags::DF
    | flags::IOPL
    | flags::NT
    | flags::RF
    | flags::AC
    | flags::VIF
    | flags::VIP
    | flags::ID;

/// FXSAVE-layout offsets in the XSAVE image.
const FOP: usize = 6;
const FIP: usize = 8;
const FDP: usize = 16;

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

/// The full x87 tag of one register from its 80-bit value (valid, zero or special).
fn x87_tag(st: &[u8]) -> u32 {
    let mantissa = u64_at(st, 0);
    let exponent = u16::from_le_bytes([st[8], st[9]]) & 0x7fff;
    match exponent {
        0x7fff => 2,
        0 if mantissa == 0 => 1,
        0 => 2,
        _ if mantissa >> 63 == 0 => 2,
        _ => 0,
    }
}

/// gdb's registers from the guest state. Components the XSAVE image holds in their initial
/// configuration (XSTATE_BV clear) read as that configuration.
pub fn from_state(s: &GuestState) -> Registers {
    let mut r = Registers::default();
    let c = &mut r.core;
    for (i, &hw) in GDB_GPR.iter().enumerate() {
        c.regs[i] = s.gpr[hw];
    }
    c.rip = s.rip;
    c.eflags = s.rflags as u32;
    let [es, cs, ss, ds, fs, gs] = s.seg.map(u32::from);
    c.segments = gdbstub_arch::x86::reg::X86SegmentRegs { cs, ss, ds, es, fs, gs };
    let x = &s.xsave;
    let bv = x.xstate_bv();
    if bv & X87 != 0 {
        let top = (x.fsw() >> 11) & 7;
        let mut ftag = 0u32;
        for phys in 0..8 {
            let tag = if x.ftw() & (1 << phys) == 0 {
                3
            } else {
                x87_tag(x.st((phys + 8 - top as usize) % 8))
            };
            ftag |= tag << (2 * phys);
        }
        for (i, st) in c.st.iter_mut().enumerate() {
            st.copy_from_slice(x.st(i));
        }
        let (fip, fdp) = (u64_at(&x.0, FIP), u64_at(&x.0, FDP));
        c.fpu = gdbstub_arch::x86::reg::X87FpuInternalRegs {
            fctrl: x.fcw().into(),
            fstat: x.fsw().into(),
            ftag,
            fiseg: (fip >> 32) as u32,
            fioff: fip as u32,
            foseg: (fdp >> 32) as u32,
            fooff: fdp as u32,
            fop: u16::from_le_bytes([x.0[FOP], x.0[FOP + 1]]).into(),
        };
    } else {
        c.fpu.fctrl = 0x37f;
        c.fpu.ftag = 0xffff;
    }
    if bv & SSE != 0 {
        for (i, xmm) in c.xmm.iter_mut().enumerate() {
            *xmm = u128::from_le_bytes(x.xmm(i).try_into().unwrap_or_default());
        }
    }
    c.mxcsr = x.mxcsr();
    if bv & AVX != 0 {
        for (i, y) in r.ymm_hi.iter_mut().enumerate() {
            *y = u128::from_le_bytes(x.ymm_hi(i).try_into().unwrap_or_default());
        }
    }
    r.fs_base = s.fs_base;
    r.gs_base = s.gs_base;
    r.system = [s.kernel_gs_base, s.cr0, s.cr2, s.cr3, s.cr4, s.sys.cr8, s.efer];
    r
}

/// Applies what gdb wrote to the guest state (see the module comment for what may change).
/// Nothing is changed when a write is refused.
pub fn apply(r: &Registers, s: &mut GuestState) -> Result<(), ReadOnly> {
    let now = from_state(s);
    if r.core.segments != now.core.segments {
        return Err(ReadOnly("a segment selector"));
    }
    let names = ["k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"];
    for (i, name) in names.iter().enumerate() {
        let writable = matches!(*name, "k_gs_base" | "cr2" | "cr8");
        if !writable && r.system[i] != now.system[i] {
            return Err(ReadOnly(name));
        }
    }
    let canonical = hbt_translator::mmu::is_canonical;
    if !canonical(r.fs_base) || !canonical(r.gs_base) || !canonical(r.system[0]) {
        return Err(ReadOnly("a non-canonical segment base"));
    }
    let mxcsr_mask = hbt_translator::cpu::xsave::host_mxcsr_mask();
    if r.core.mxcsr & !mxcsr_mask != 0 {
        return Err(ReadOnly("MXCSR with reserved bits"));
    }
    let avx_enabled = s.xcr0 & AVX != 0;
    if !avx_enabled && r.ymm_hi != now.ymm_hi {
        return Err(ReadOnly("YMM (the guest has not enabled AVX)"));
    }
    let c = &r.core;
    for (i, &hw) in GDB_GPR.iter().enumerate() {
        s.gpr[hw] = c.regs[i];
    }
    s.rip = c.rip;
    s.rflags = (c.eflags as u64 & RFLAGS_WRITABLE) | flags::FIXED;
    s.fs_base = r.fs_base;
    s.gs_base = r.gs_base;
    s.kernel_gs_base = r.system[0];
    s.cr2 = r.system[2];
    s.sys.cr8 = r.system[5] & 0xf;
    // Extended state: only components whose values gdb changed are rewritten (and marked in
    // use), so an untouched component stays in its initial configuration.
    let x = &mut s.xsave;
    if c.st != now.core.st || c.fpu != now.core.fpu {
        for (i, st) in c.st.iter().enumerate() {
            x.st_mut(i).copy_from_slice(st);
        }
        x.set_fcw(c.fpu.fctrl as u16);
        x.set_fsw(c.fpu.fstat as u16);
        let mut abridged = 0u8;
        for phys in 0..8 {
            if (c.fpu.ftag >> (2 * phys)) & 3 != 3 {
                abridged |= 1 << phys;
            }
        }
        x.set_ftw(abridged);
        x.0[FOP..FOP + 2].copy_from_slice(&(c.fpu.fop as u16 & 0x7ff).to_le_bytes());
        let fip = (c.fpu.fiseg as u64) << 32 | c.fpu.fioff as u64;
        let fdp = (c.fpu.foseg as u64) << 32 | c.fpu.fooff as u64;
        x.0[FIP..FIP + 8].copy_from_slice(&fip.to_le_bytes());
        x.0[FDP..FDP + 8].copy_from_slice(&fdp.to_le_bytes());
        x.mark_in_use(X87);
    }
    if c.xmm != now.core.xmm || c.mxcsr != now.core.mxcsr {
        for (i, xmm) in c.xmm.iter().enumerate() {
            x.xmm_mut(i).copy_from_slice(&xmm.to_le_bytes());
        }
        x.set_mxcsr(c.mxcsr);
        x.mark_in_use(SSE);
    }
    if avx_enabled && r.ymm_hi != now.ymm_hi {
        for (i, y) in r.ymm_hi.iter().enumerate() {
            x.ymm_hi_mut(i).copy_from_slice(&y.to_le_bytes());
        }
        x.mark_in_use(AVX);
    }
    Ok(())
}

/// The target description: gdb's i386 features by name (gdb checks the register names of
/// `org.gnu.gdb.i386.*` and numbers them in this order, which is the `g` packet's) and one of
/// hbt's for the system registers.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
  <architecture>i386:x86-64</architecture>
  <feature name="org.gnu.gdb.i386.core">
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/>
      <field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/>
      <field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/>
      <field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/>
      <field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/>
      <field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/>
      <field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/>
      <field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/>
      <field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>
    <reg name="rax" bitsize="64" type="int64"/>
    <reg name="rbx" bitsize="64" type="int64"/>
    <reg name="rcx" bitsize="64" type="int64"/>
    <reg name="rdx" bitsize="64" type="int64"/>
    <reg name="rsi" bitsize="64" type="int64"/>
    <reg name="rdi" bitsize="64" type="int64"/>
    <reg name="rbp" bitsize="64" type="data_ptr"/>
    <reg name="rsp" bitsize="64" type="data_ptr"/>
    <reg name="r8" bitsize="64" type="int64"/>
    <reg name="r9" bitsize="64" type="int64"/>
    <reg name="r10" bitsize="64" type="int64"/>
    <reg name="r11" bitsize="64" type="int64"/>
    <reg name="r12" bitsize="64" type="int64"/>
    <reg name="r13" bitsize="64" type="int64"/>
    <reg name="r14" bitsize="64" type="int64"/>
    <reg name="r15" bitsize="64" type="int64"/>
    <reg name="rip" bitsize="64" type="code_ptr"/>
    <reg name="eflags" bitsize="32" type="i386_eflags"/>
    <reg name="cs" bitsize="32" type="int32"/>
    <reg name="ss" bitsize="32" type="int32"/>
    <reg name="ds" bitsize="32" type="int32"/>
    <reg name="es" bitsize="32" type="int32"/>
    <reg name="fs" bitsize="32" type="int32"/>
    <reg name="gs" bitsize="32" type="int32"/>
    <reg name="st0" bitsize="80" type="i387_ext"/>
    <reg name="st1" bitsize="80" type="i387_ext"/>
    <reg name="st2" bitsize="80" type="i387_ext"/>
    <reg name="st3" bitsize="80" type="i387_ext"/>
    <reg name="st4" bitsize="80" type="i387_ext"/>
    <reg name="st5" bitsize="80" type="i387_ext"/>
    <reg name="st6" bitsize="80" type="i387_ext"/>
    <reg name="st7" bitsize="80" type="i387_ext"/>
    <reg name="fctrl" bitsize="32" type="int" group="float"/>
    <reg name="fstat" bitsize="32" type="int" group="float"/>
    <reg name="ftag" bitsize="32" type="int" group="float"/>
    <reg name="fiseg" bitsize="32" type="int" group="float"/>
    <reg name="fioff" bitsize="32" type="int" group="float"/>
    <reg name="foseg" bitsize="32" type="int" group="float"/>
    <reg name="fooff" bitsize="32" type="int" group="float"/>
    <reg name="fop" bitsize="32" type="int" group="float"/>
  </feature>
  <feature name="org.gnu.gdb.i386.sse">
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
      <field name="IE" start="0" end="0"/>
      <field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/>
      <field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/>
      <field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/>
      <field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/>
      <field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/>
      <field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/>
      <field name="FZ" start="15" end="15"/>
    </flags>
    <reg name="xmm0" bitsize="128" type="vec128"/>
    <reg name="xmm1" bitsize="128" type="vec128"/>
    <reg name="xmm2" bitsize="128" type="vec128"/>
    <reg name="xmm3" bitsize="128" type="vec128"/>
    <reg name="xmm4" bitsize="128" type="vec128"/>
    <reg name="xmm5" bitsize="128" type="vec128"/>
    <reg name="xmm6" bitsize="128" type="vec128"/>
    <reg name="xmm7" bitsize="128" type="vec128"/>
    <reg name="xmm8" bitsize="128" type="vec128"/>
    <reg name="xmm9" bitsize="128" type="vec128"/>
    <reg name="xmm10" bitsize="128" type="vec128"/>
    <reg name="xmm11" bitsize="128" type="vec128"/>
    <reg name="xmm12" bitsize="128" type="vec128"/>
    <reg name="xmm13" bitsize="128" type="vec128"/>
    <reg name="xmm14" bitsize="128" type="vec128"/>
    <reg name="xmm15" bitsize="128" type="vec128"/>
    <reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
  </feature>
  <feature name="org.gnu.gdb.i386.segments">
    <reg name="fs_base" bitsize="64" type="int"/>
    <reg name="gs_base" bitsize="64" type="int"/>
  </feature>
  <feature name="org.gnu.gdb.i386.avx">
    <reg name="ymm0h" bitsize="128" type="uint128"/>
    <reg name="ymm1h" bitsize="128" type="uint128"/>
    <reg name="ymm2h" bitsize="128" type="uint128"/>
    <reg name="ymm3h" bitsize="128" type="uint128"/>
    <reg name="ymm4h" bitsize="128" type="uint128"/>
    <reg name="ymm5h" bitsize="128" type="uint128"/>
    <reg name="ymm6h" bitsize="128" type="uint128"/>
    <reg name="ymm7h" bitsize="128" type="uint128"/>
    <reg name="ymm8h" bitsize="128" type="uint128"/>
    <reg name="ymm9h" bitsize="128" type="uint128"/>
    <reg name="ymm10h" bitsize="128" type="uint128"/>
    <reg name="ymm11h" bitsize="128" type="uint128"/>
    <reg name="ymm12h" bitsize="128" type="uint128"/>
    <reg name="ymm13h" bitsize="128" type="uint128"/>
    <reg name="ymm14h" bitsize="128" type="uint128"/>
    <reg name="ymm15h" bitsize="128" type="uint128"/>
  </feature>
  <feature name="org.hbt.gdb.x86_64.system">
    <reg name="k_gs_base" bitsize="64" type="data_ptr" group="system"/>
    <reg name="cr0" bitsize="64" type="int" group="system"/>
    <reg name="cr2" bitsize="64" type="data_ptr" group="system"/>
    <reg name="cr3" bitsize="64" type="int" group="system"/>
    <reg name="cr4" bitsize="64" type="int" group="system"/>
    <reg name="cr8" bitsize="64" type="int" group="system"/>
    <reg name="efer" bitsize="64" type="int" group="system"/>
  </feature>
</target>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_file_round_trips_and_matches_the_description() {
        let mut s = GuestState {
            gpr: std::array::from_fn(|i| 0x1000 + i as u64),
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246 | flags::IF,
            fs_base: 0x7000,
            cr3: 0x1234_5000,
            ..Default::default()
        };
        s.xsave.xmm_mut(3).copy_from_slice(&[7; 16]);
        let r = from_state(&s);
        assert_eq!(r.core.regs[1], 0x1003, "gdb's second register is RBX");
        assert_eq!(r.core.regs[7], 0x1004, "gdb's eighth register is RSP");
        assert_eq!(r.core.xmm[3], u128::from_le_bytes([7; 16]));
        assert_eq!(r.system[3], 0x1234_5000);
        let bytes = serialize(&r);
        // Every register the description names, at its size, in its order.
        let described: usize = (0..)
            .map_while(|id| RegId::from_raw_id(id).map(|(_, n)| n.map_or(0, |n| n.get())))
            .sum();
        assert_eq!(bytes.len(), described);
        let rip = RegId::from_raw_id(16).unwrap().0;
        assert_eq!(&bytes[rip.offset()..rip.offset() + 8], &s.rip.to_le_bytes());
        let cr3 = RegId::from_raw_id(SYSTEM + 3).unwrap().0;
        assert_eq!(&bytes[cr3.offset()..cr3.offset() + 8], &s.cr3.to_le_bytes());
        assert_eq!(TARGET_XML.matches("<reg ").count(), LAST + 1);
        let mut back = Registers::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, r);
        assert!(
            back.gdb_deserialize(&bytes[1..]).is_err(),
            "a short G packet is refused"
        );
    }

    #[test]
    fn x87_registers_and_the_full_tag_word_come_from_the_xsave_image() {
        let mut s = GuestState::default();
        let x = &mut s.xsave;
        // One value pushed: TOP = 7, ST(0) = 1.0 in physical register 7.
        x.set_fsw(7 << 11);
        x.set_ftw(0x80);
        let one = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f];
        x.st_mut(0).copy_from_slice(&one);
        x.mark_in_use(X87);
        let r = from_state(&s);
        assert_eq!(r.core.st[0], one);
        assert_eq!(r.core.fpu.fstat, 0x3800);
        assert_eq!(r.core.fpu.ftag, 0x3fff, "physical 7 valid, the rest empty");
        // Written back unchanged, the image stays as it was; a new tag word is abridged.
        let mut w = r.clone();
        apply(&w, &mut s).unwrap();
        assert_eq!(s.xsave.ftw(), 0x80);
        w.core.fpu.ftag = 0x0fff; // physical 6 and 7 valid
        apply(&w, &mut s).unwrap();
        assert_eq!(s.xsave.ftw(), 0xc0);
    }

    #[test]
    fn writes_change_what_gdb_may_change_and_refuse_the_rest() {
        let mut s = GuestState::default();
        let mut r = from_state(&s);
        r.core.regs[0] = 42;
        r.core.eflags = 0x3202; // IF and IOPL 3: virtual flags
        r.core.xmm[15] = 5;
        apply(&r, &mut s).unwrap();
        assert_eq!((s.gpr[0], s.rflags), (42, 0x3202));
        assert_eq!(s.xsave.xmm(15)[0], 5);
        for refused in [
            |r: &mut Registers| r.core.segments.cs = 0x08,
            |r: &mut Registers| r.system[3] ^= 0x1000,
            |r: &mut Registers| r.core.mxcsr |= 1 << 31,
            |r: &mut Registers| r.fs_base = 1 << 60,
        ] {
            let before = s.clone();
            let mut w = from_state(&s);
            refused(&mut w);
            assert!(apply(&w, &mut s).is_err());
            assert_eq!(from_state(&s), from_state(&before), "nothing written");
        }
    }
}

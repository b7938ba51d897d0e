//! Guest register and operand access for instructions the engine emulates in Rust.

use crate::state::GuestState;
use iced_x86::{Instruction, Register};

/// Value of a general-purpose register of any width (AH..BH included).
pub fn read_gpr(state: &GuestState, reg: Register) -> u64 {
    let full = state.gpr[reg.full_register().number() & 15];
    match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        _ if matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH) => (full >> 8) & 0xff,
        _ => full & 0xff,
    }
}

/// Writes a general-purpose register as the CPU does: 32-bit writes zero-extend, 8/16-bit writes
/// merge.
pub fn write_gpr(state: &mut GuestState, reg: Register, value: u64) {
    let slot = &mut state.gpr[reg.full_register().number() & 15];
    *slot = match reg.size() {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ if matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH) => {
            (*slot & !0xff00) | ((value & 0xff) << 8)
        }
        _ => (*slot & !0xff) | (value & 0xff),
    };
}

/// Index of a segment register in [`GuestState::seg`] (hardware order ES, CS, SS, DS, FS, GS).
pub fn sreg_index(reg: Register) -> usize {
    match reg {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        _ => 5,
    }
}

/// The 32 bytes of YMMn (XMMn in the low half).
pub fn read_ymm(state: &GuestState, n: usize) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..16].copy_from_slice(state.xsave.xmm(n));
    v[16..].copy_from_slice(state.xsave.ymm_hi(n));
    v
}

/// Writes YMMn as a VEX-encoded instruction does: bits 511:256 of ZMMn are zeroed (where the
/// AVX-512 state exists).
pub fn write_ymm(state: &mut GuestState, n: usize, v: &[u8; 32]) {
    state.xsave.xmm_mut(n).copy_from_slice(&v[..16]);
    state.xsave.ymm_hi_mut(n).copy_from_slice(&v[16..]);
    if let Some(upper) = state.xsave.zmm_upper_mut(n) {
        upper.fill(0);
    }
    // Mark SSE and AVX state in use, or xrstor would load their initial (zero) values instead.
    state.xsave.mark_in_use(0b110);
}

/// The 64 bytes of ZMMn, n < 32 (XMMn, YMMn's upper half and ZMM_Hi256 for n < 16,
/// Hi16_ZMM above); what the guest state does not hold (no AVX-512) reads as zeros.
pub fn read_zmm(state: &GuestState, n: usize) -> [u8; 64] {
    let mut v = [0u8; 64];
    if n < 16 {
        v[..32].copy_from_slice(&read_ymm(state, n));
    }
    if let Some(upper) = state.xsave.zmm_upper(n) {
        v[64 - upper.len()..].copy_from_slice(upper);
    }
    v
}

/// Writes ZMMn (n < 32) whole, as an EVEX instruction does.
pub fn write_zmm(state: &mut GuestState, n: usize, v: &[u8; 64]) {
    if n < 16 {
        state.xsave.xmm_mut(n).copy_from_slice(&v[..16]);
        state.xsave.ymm_hi_mut(n).copy_from_slice(&v[16..32]);
    }
    if let Some(upper) = state.xsave.zmm_upper_mut(n) {
        let len = upper.len();
        upper.copy_from_slice(&v[64 - len..]);
    }
    use crate::cpu::xsave::component::{AVX, HI16_ZMM, SSE, ZMM_HI256};
    state
        .xsave
        .mark_in_use(SSE | AVX | if n < 16 { ZMM_HI256 } else { HI16_ZMM });
}

/// The opmask register `instr`'s `{k}` names, as an index 1-7; None without one (k0 as a mask
/// means none).
pub fn opmask_index(instr: &Instruction) -> Option<usize> {
    match instr.op_mask() {
        Register::None | Register::K0 => None,
        k => Some(k as usize - Register::K0 as usize),
    }
}

/// Opmask register k`n` (zero where the state has no AVX-512).
pub fn read_opmask(state: &GuestState, n: usize) -> u64 {
    state.xsave.opmask(n).unwrap_or(0)
}

pub fn write_opmask(state: &mut GuestState, n: usize, value: u64) {
    state.xsave.set_opmask(n, value);
    state.xsave.mark_in_use(crate::cpu::xsave::component::OPMASK);
}

/// Linear address of memory operand `operand` (element `element` for VSIB), with the guest's
/// FS/GS base for those overrides.
pub fn linear_address(state: &GuestState, instr: &Instruction, operand: u32, element: usize) -> Option<u64> {
    let va = instr.virtual_address(operand, element, |reg, elem, elem_size| match reg {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS => Some(state.fs_base),
        Register::GS => Some(state.gs_base),
        r if r.is_xmm() || r.is_ymm() || r.is_zmm() => {
            let v = read_zmm(state, r.number());
            let at = elem * elem_size;
            let mut b = [0u8; 8];
            b[..elem_size].copy_from_slice(&v[at..at + elem_size]);
            let raw = u64::from_le_bytes(b);
            // VSIB indices are signed.
            Some(if elem_size == 4 {
                raw as u32 as i32 as i64 as u64
            } else {
                raw
            })
        }
        r => Some(read_gpr(state, r)),
    })?;
    Some(state.wrap_address(va))
}

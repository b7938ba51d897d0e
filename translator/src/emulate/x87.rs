//! 80-bit x87 stores (`fstp m80fp`, `fbstp m80bcd`) split across pages. The CPU stores such
//! an operand as two pieces, the low 8 bytes first, then the top 2: when only the top 2 fault
//! (a page boundary right after the low 8), the low 8 are already in memory at the #PF, the
//! x87 state is unchanged (measured on an Intel Xeon in a Linux process: operand 8 or 9
//! bytes before an unmapped page; 7 bytes before it, nothing is written). The soft-MMU meets
//! the fault on a TLB miss, before the host instruction ran, so the engine stores those 8
//! bytes itself.

use crate::state::GuestState;
use iced_x86::Mnemonic;

/// The low 8 bytes `fstp m80fp` (`bcd`: `fbstp m80bcd`) stores from the guest's x87 state, or
/// None when it would store nothing (an unmasked exception, or one already pending, comes
/// first).
pub fn low_qword_of_m80_store(state: &GuestState, mnemonic: Mnemonic) -> Option<[u8; 8]> {
    const FSW_ES: u16 = 1 << 7;
    if state.xsave.fsw() & FSW_ES != 0 {
        return None;
    }
    let mut guest = Fx([0; 512]);
    guest.0.copy_from_slice(&state.xsave.0[..512]);
    if state.xsave.xstate_bv() & 1 == 0 {
        // x87 in its initial configuration: the image's x87 bytes mean nothing.
        guest.0[..32].fill(0);
        guest.0[32..160].fill(0);
        guest.0[..2].copy_from_slice(&0x037fu16.to_le_bytes());
    }
    // Only the x87 part matters; an MXCSR the host would refuse cannot be in a guest image,
    // but keep the host's anyway.
    guest.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    let mut host = Fx([0; 512]);
    let mut out = [0u8; 16];
    let fsw: u16;
    // SAFETY: fxsave64/fxrstor64 on 16-byte-aligned 512-byte buffers; the host's x87/SSE
    // state is saved first and restored last, so the block leaves it as it found it. The
    // store writes the 10 bytes of `out`.
    unsafe {
        if mnemonic == Mnemonic::Fbstp {
            std::arch::asm!(
                "fxsave64 [{host}]",
                "fxrstor64 [{guest}]",
                "fbstp tbyte ptr [{out}]",
                "fnstsw ax",
                "fxrstor64 [{host}]",
                host = in(reg) host.0.as_mut_ptr(),
                guest = in(reg) guest.0.as_ptr(),
                out = in(reg) out.as_mut_ptr(),
                out("ax") fsw,
                options(nostack),
            );
        } else {
            std::arch::asm!(
                "fxsave64 [{host}]",
                "fxrstor64 [{guest}]",
                "fstp tbyte ptr [{out}]",
                "fnstsw ax",
                "fxrstor64 [{host}]",
                host = in(reg) host.0.as_mut_ptr(),
                guest = in(reg) guest.0.as_ptr(),
                out = in(reg) out.as_mut_ptr(),
                out("ax") fsw,
                options(nostack),
            );
        }
    }
    // An unmasked exception: the CPU stores nothing.
    if fsw & FSW_ES != 0 {
        return None;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&out[..8]);
    Some(low)
}

#[repr(C, align(16))]
struct Fx([u8; 512]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_low_qword_is_the_significand_or_the_bcd_digits() {
        let mut s = GuestState::default();
        // fninit state (default): an empty stack stores the indefinite QNaN (IM masked).
        assert_eq!(
            low_qword_of_m80_store(&s, Mnemonic::Fstp),
            Some(0xc000_0000_0000_0000u64.to_le_bytes())
        );
        // ST0 = 3.0 (exponent 0x4000, significand 0xc000...): TOP = 7, tag valid.
        s.xsave.set_x87_top(7);
        let st0 = s.xsave.st_mut(0);
        st0[..8].copy_from_slice(&0xc000_0000_0000_0000u64.to_le_bytes());
        st0[8..10].copy_from_slice(&0x4000u16.to_le_bytes());
        s.xsave.set_ftw(0x80);
        assert_eq!(
            low_qword_of_m80_store(&s, Mnemonic::Fstp),
            Some(0xc000_0000_0000_0000u64.to_le_bytes())
        );
        assert_eq!(low_qword_of_m80_store(&s, Mnemonic::Fbstp), Some(3u64.to_le_bytes()));
        // An empty stack with invalid-operation unmasked: nothing is stored.
        let mut s = GuestState::default();
        s.xsave.set_fcw(0x37e);
        assert_eq!(low_qword_of_m80_store(&s, Mnemonic::Fstp), None);
    }
}

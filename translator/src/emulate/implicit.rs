//! Instructions with implicit or per-element memory accesses that the soft-MMU cannot express
//! as one rewritten operand: `xlat`, `enter`, AVX2 gathers and `maskmovdqu`. Under the identity
//! strategy they run natively; under the soft-MMU the engine performs them here.

use super::regs::{linear_address, read_ymm, write_ymm};
use super::{stack_address, GuestMemory, Outcome};
use crate::exit::{Exit, GuestException};
use crate::state::{gpr, GuestState};
use iced_x86::{Instruction, Mnemonic, Register};

/// Performs one instruction; the caller advances nothing (RIP is set here on success).
pub fn execute(
    state: &mut GuestState,
    instr: &Instruction,
    mem: &mut dyn GuestMemory,
) -> Result<Outcome, super::NotEmulated> {
    let mut next = state.clone();
    let result = match instr.mnemonic() {
        Mnemonic::Xlatb => xlat(&mut next, instr, mem),
        Mnemonic::Enter => enter(&mut next, instr, mem),
        Mnemonic::Maskmovdqu | Mnemonic::Vmaskmovdqu => maskmov(&next, instr, mem),
        m if is_gather(m) => gather(&mut next, instr, mem),
        _ => return Err(super::NotEmulated),
    };
    match result {
        Ok(()) => {
            next.rip = instr.next_ip();
            *state = next;
            Ok(Outcome::Continue)
        }
        Err((exc, partial)) => {
            // Gathers keep the elements they completed; everything else is all-or-nothing.
            if let Some(partial) = partial {
                *state = *partial;
            }
            Ok(Outcome::Exit(Exit::Exception(exc)))
        }
    }
}

/// A guest exception, with the partial state a gather leaves behind.
type Fault = (GuestException, Option<Box<GuestState>>);

fn xlat(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let seg = match instr.segment_prefix() {
        Register::FS => s.fs_base,
        Register::GS => s.gs_base,
        _ => 0,
    };
    let va = seg.wrapping_add(s.gpr[gpr::RBX]).wrapping_add(s.gpr[gpr::RAX] & 0xff);
    let v = mem.read_le(va, 1).map_err(|e| (e, None))?;
    s.gpr[gpr::RAX] = (s.gpr[gpr::RAX] & !0xff) | v;
    Ok(())
}

fn enter(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let size: u64 = if instr.code() == iced_x86::Code::Enterw_imm16_imm8 {
        2
    } else {
        8
    };
    let alloc = instr.immediate16() as u64;
    let level = (instr.immediate8_2nd() & 31) as u64;
    let mut rsp = s.gpr[gpr::RSP];
    let push = |rsp: &mut u64, value: u64, mem: &mut dyn GuestMemory| -> Result<(), Fault> {
        *rsp = rsp.wrapping_sub(size);
        let at = stack_address(*rsp).map_err(|e| (e, None))?;
        mem.write(at, &value.to_le_bytes()[..size as usize])
            .map_err(|e| (e, None))
    };
    push(&mut rsp, s.gpr[gpr::RBP], mem)?;
    let frame = rsp;
    if level > 0 {
        let mut rbp = s.gpr[gpr::RBP];
        for _ in 1..level {
            rbp = rbp.wrapping_sub(size);
            let v = mem.read_le(rbp, size as usize).map_err(|e| (e, None))?;
            push(&mut rsp, v, mem)?;
        }
        push(&mut rsp, frame, mem)?;
    }
    // After the pushes the CPU checks that the final stack top is writable (observed on this
    // host: #PF there with RSP and RBP unchanged, the pushed frame already in memory).
    let final_rsp = rsp.wrapping_sub(alloc);
    let probe = stack_address(final_rsp).map_err(|e| (e, None))?;
    let mut word = [0u8; 8];
    mem.read(probe, &mut word[..size as usize]).map_err(|e| (e, None))?;
    mem.write(probe, &word[..size as usize]).map_err(|e| (e, None))?;
    if size == 2 {
        s.gpr[gpr::RBP] = (s.gpr[gpr::RBP] & !0xffff) | (frame & 0xffff);
    } else {
        s.gpr[gpr::RBP] = frame;
    }
    s.gpr[gpr::RSP] = rsp.wrapping_sub(alloc);
    Ok(())
}

fn maskmov(s: &GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let data = read_ymm(s, instr.op1_register().number() & 15);
    let mask = read_ymm(s, instr.op2_register().number() & 15);
    let base = linear_address(s, instr, 0, 0).unwrap_or(s.gpr[gpr::RDI]);
    // Alignment checking treats the store as one 16-byte access, when any byte is stored
    // (observed on this host).
    let any = mask[..16].iter().any(|b| b & 0x80 != 0);
    let ac = any && s.alignment_checking();
    if ac && !base.is_multiple_of(16) {
        return Err((
            GuestException {
                vector: crate::exit::vector::AC,
                error_code: Some(0),
                address: None,
            },
            None,
        ));
    }
    for i in 0..16 {
        if mask[i] & 0x80 != 0 {
            mem.write(base.wrapping_add(i as u64), &data[i..i + 1])
                .map_err(|e| (e, None))?;
        }
    }
    Ok(())
}

fn is_gather(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Vpgatherdd
            | Mnemonic::Vpgatherdq
            | Mnemonic::Vpgatherqd
            | Mnemonic::Vpgatherqq
            | Mnemonic::Vgatherdps
            | Mnemonic::Vgatherdpd
            | Mnemonic::Vgatherqps
            | Mnemonic::Vgatherqpd
    )
}

/// AVX2 gather: loads the elements whose mask sign bit is set, clearing each mask element as
/// it completes (so a fault leaves the completed part visible, as on the CPU).
fn gather(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let dst_reg = instr.op0_register();
    let mask_reg = instr.op2_register();
    let index = instr.memory_index();
    let es = match instr.mnemonic() {
        Mnemonic::Vpgatherdd | Mnemonic::Vpgatherqd | Mnemonic::Vgatherdps | Mnemonic::Vgatherqps => 4,
        _ => 8,
    };
    let is = if matches!(
        instr.mnemonic(),
        Mnemonic::Vpgatherdd | Mnemonic::Vpgatherdq | Mnemonic::Vgatherdps | Mnemonic::Vgatherdpd
    ) {
        4
    } else {
        8
    };
    let dst_bytes = if dst_reg.is_ymm() { 32 } else { 16 };
    let idx_bytes = if index.is_ymm() { 32 } else { 16 };
    let n = (dst_bytes / es).min(idx_bytes / is);
    let (dn, mn) = (dst_reg.number() & 15, mask_reg.number() & 15);
    let mut dst = read_ymm(s, dn);
    let mut mask = read_ymm(s, mn);
    for i in 0..n {
        let at = i * es;
        if mask[at + es - 1] & 0x80 == 0 {
            continue;
        }
        let va = linear_address(s, instr, 1, i).unwrap_or(0);
        match mem.read_le(va, es) {
            Ok(v) => {
                dst[at..at + es].copy_from_slice(&v.to_le_bytes()[..es]);
                mask[at..at + es].fill(0);
            }
            Err(e) => {
                let mut partial = s.clone();
                write_ymm(&mut partial, dn, &dst);
                write_ymm(&mut partial, mn, &mask);
                return Err((e, Some(Box::new(partial))));
            }
        }
    }
    // Elements past n and the upper half of 128-bit forms are zeroed; the mask ends all zero.
    dst[n * es..].fill(0);
    if dst_bytes == 16 {
        dst[16..].fill(0);
    }
    mask.fill(0);
    write_ymm(s, dn, &dst);
    write_ymm(s, mn, &mask);
    Ok(())
}

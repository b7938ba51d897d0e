//! Instructions with implicit or per-element memory accesses that the soft-MMU cannot express
//! as one rewritten operand: `xlat`, `enter`, AVX2 and AVX-512 gathers, AVX-512 scatters,
//! `maskmovdqu` and the AVX masked moves. Under the identity strategy they run natively; under
//! the soft-MMU the engine performs them here.

use super::regs::{linear_address, read_opmask, read_ymm, read_zmm, write_opmask, write_ymm, write_zmm};
use super::{stack_address, GuestMemory, Outcome};
use crate::exit::{Exit, GuestException};
use crate::state::{gpr, GuestState};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

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
        Mnemonic::Vmaskmovps | Mnemonic::Vmaskmovpd | Mnemonic::Vpmaskmovd | Mnemonic::Vpmaskmovq => {
            masked_move(&mut next, instr, mem)
        }
        m if is_gather(m) && instr.code().op_code().encoding() == iced_x86::EncodingKind::EVEX => {
            evex_gather(&mut next, instr, mem)
        }
        m if is_gather(m) => gather(&mut next, instr, mem),
        m if is_scatter(m) => scatter(&mut next, instr, mem),
        _ => return Err(super::NotEmulated),
    };
    match result {
        Ok(()) => {
            next.rip = instr.next_ip();
            *state = next;
            Ok(Outcome::Continue)
        }
        Err((exc, partial)) => {
            // Gathers and scatters keep the elements they completed; everything else is
            // all-or-nothing.
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
    let size: u64 = match instr.code() {
        iced_x86::Code::Enterw_imm16_imm8 => 2,
        // 32-bit code (compatibility mode): 4-byte slots, addresses wrap at 4 GiB.
        iced_x86::Code::Enterd_imm16_imm8 => 4,
        _ => 8,
    };
    let alloc = instr.immediate16() as u64;
    let level = (instr.immediate8_2nd() & 31) as u64;
    let mut rsp = s.gpr[gpr::RSP];
    let wrap = |va: u64| s.wrap_address(va);
    let push = |rsp: &mut u64, value: u64, mem: &mut dyn GuestMemory| -> Result<(), Fault> {
        *rsp = wrap(rsp.wrapping_sub(size));
        let at = stack_address(*rsp).map_err(|e| (e, None))?;
        mem.write(at, &value.to_le_bytes()[..size as usize])
            .map_err(|e| (e, None))
    };
    push(&mut rsp, s.gpr[gpr::RBP], mem)?;
    let frame = rsp;
    if level > 0 {
        let mut rbp = s.gpr[gpr::RBP];
        for _ in 1..level {
            rbp = wrap(rbp.wrapping_sub(size));
            let v = mem.read_le(rbp, size as usize).map_err(|e| (e, None))?;
            push(&mut rsp, v, mem)?;
        }
        push(&mut rsp, frame, mem)?;
    }
    // After the pushes the CPU checks that the final stack top is writable (observed on this
    // host: #PF there with RSP and RBP unchanged, the pushed frame already in memory). The
    // check is a write's: an unmapped top faults with a write's error code (6 at CPL3, as KVM
    // shows on an Intel Xeon), not a read's.
    let final_rsp = wrap(rsp.wrapping_sub(alloc));
    let probe = stack_address(final_rsp).map_err(|e| (e, None))?;
    mem.probe_write(probe, size as usize).map_err(|e| (e, None))?;
    if size == 2 {
        s.gpr[gpr::RBP] = (s.gpr[gpr::RBP] & !0xffff) | (frame & 0xffff);
    } else {
        s.gpr[gpr::RBP] = frame;
    }
    s.gpr[gpr::RSP] = final_rsp;
    Ok(())
}

/// `maskmovdqu`/`vmaskmovdqu`: the bytes of the data register whose mask byte has its sign bit
/// set are stored at [RDI]. All or nothing: the destination is checked before any byte is
/// stored — the high 8 bytes before the low 8 or the other way round, and the bytes the mask
/// leaves out too where the host checks them (`host::quirks` probes both, and the alignment
/// rule).
fn maskmov(s: &GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let data = read_ymm(s, instr.op1_register().number() & 15);
    let mask = read_ymm(s, instr.op2_register().number() & 15);
    let base = linear_address(s, instr, 0, 0).unwrap_or(s.gpr[gpr::RDI]);
    let rule = crate::host::quirks::mask_move_rule();
    let selected = |i: &usize| mask[*i] & 0x80 != 0;
    let any = (0..16).any(|i| selected(&i));
    if s.alignment_checking() && rule.alignment_fault(base, any) {
        return Err((
            GuestException {
                vector: crate::exit::vector::AC,
                error_code: Some(0),
                address: None,
            },
            None,
        ));
    }
    // Byte by byte, so that the check itself is never alignment-checked.
    let halves = if rule.high_half_first {
        [8..16, 0..8]
    } else {
        [0..8, 8..16]
    };
    for i in halves.into_iter().flatten() {
        if rule.unselected_bytes_fault || selected(&i) {
            mem.probe_write(base.wrapping_add(i as u64), 1).map_err(|e| (e, None))?;
        }
    }
    for i in (0..16).filter(selected) {
        mem.write(base.wrapping_add(i as u64), &data[i..i + 1])
            .map_err(|e| (e, None))?;
    }
    Ok(())
}

/// `vmaskmovps/pd`, `vpmaskmovd/q`, loads and stores: only the elements whose mask sign bit is
/// set are accessed, in order, so only they fault (even a non-canonical address faults only
/// through them) and only their pages are marked accessed (the SDM leaves the accessed and
/// dirty bits of masked-off elements' pages to the implementation; an Intel Xeon leaves them
/// alone, like this). A load zeroes the other elements (and the upper half of a 128-bit
/// form). A store checks every element before it writes any: a fault stores nothing (measured
/// on an Intel Xeon). Never #AC (SDM exception class 6).
fn masked_move(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let es = match instr.mnemonic() {
        Mnemonic::Vmaskmovps | Mnemonic::Vpmaskmovd => 4,
        _ => 8,
    };
    let store = instr.op0_kind() == OpKind::Memory;
    let (memory_operand, data_reg) = if store {
        (0, instr.op2_register())
    } else {
        (2, instr.op0_register())
    };
    let mask = read_ymm(s, instr.op1_register().number() & 15);
    let bytes = if data_reg.is_ymm() { 32 } else { 16 };
    let base = linear_address(s, instr, memory_operand, 0).unwrap_or(0);
    let active: Vec<usize> = (0..bytes / es).filter(|i| mask[i * es + es - 1] & 0x80 != 0).collect();
    let at = |i: usize| base.wrapping_add((i * es) as u64);
    // A non-canonical address through RSP or RBP is a stack fault, #SS(0).
    let stack = matches!(instr.memory_base(), Register::RSP | Register::RBP);
    let fault = |e: GuestException| {
        let e = if stack && e == GuestException::gp(0) {
            GuestException {
                vector: 12,
                error_code: Some(0),
                address: None,
            }
        } else {
            e
        };
        (e, None)
    };
    let data_n = data_reg.number() & 15;
    if store {
        let data = read_ymm(s, data_n);
        for &i in &active {
            mem.probe_write(at(i), es).map_err(fault)?;
        }
        for &i in &active {
            mem.write(at(i), &data[i * es..(i + 1) * es]).map_err(fault)?;
        }
    } else {
        let mut loaded = [0u8; 32];
        for &i in &active {
            mem.read(at(i), &mut loaded[i * es..(i + 1) * es]).map_err(fault)?;
        }
        write_ymm(s, data_n, &loaded);
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

/// AVX2 gather, as the SDM's pseudo-code (VPGATHERDD and friends, VEX forms) has it: the mask
/// register is first normalized — every element becomes all ones where its sign bit is set and
/// zero elsewhere, the bits above a 128-bit instruction's mask cleared — then the
/// elements whose mask is set are loaded in order, each clearing its mask element as it
/// completes. A fault leaves the completed elements in the destination and the normalized mask
/// without them (the CPU does exactly this: `hbt isa-test --system` against KVM on an Intel
/// Xeon, where CPL3 gathers run on the CPU). An AMD EPYC normalizes nothing before it faults:
/// the elements before the faulting one are cleared and the rest of the register keeps its
/// bits (`cpu::vendor`, `GatherFaultKeepsRawMask`). The upper destination half of a 128-bit
/// form and the elements past the last are zeroed only when the gather completes.
fn gather(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let dst_reg = instr.op0_register();
    let mask_reg = instr.op2_register();
    let index = instr.memory_index();
    let (es, is) = element_and_index_sizes(instr.mnemonic());
    let dst_bytes = if dst_reg.is_ymm() { 32 } else { 16 };
    let idx_bytes = if index.is_ymm() { 32 } else { 16 };
    let n = (dst_bytes / es).min(idx_bytes / is);
    let (dn, mn) = (dst_reg.number() & 15, mask_reg.number() & 15);
    let mut dst = read_ymm(s, dn);
    let mut mask = read_ymm(s, mn);
    let raw_mask = mask;
    // The mask has the destination's element size and the encoding's vector length (VEX.L):
    // `vpgatherqd xmm, [vm64y], xmm` is a 256-bit instruction whose mask elements past the
    // fourth are normalized too, as this host does (the SDM leaves those unused elements to
    // the implementation).
    let vl = if dst_reg.is_ymm() || index.is_ymm() { 32 } else { 16 };
    for element in mask[..vl].chunks_exact_mut(es) {
        let fill = if element[es - 1] & 0x80 != 0 { 0xff } else { 0 };
        element.fill(fill);
    }
    mask[vl..].fill(0);
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
                if crate::cpu::vendor::host_has(crate::cpu::vendor::Quirk::GatherFaultKeepsRawMask) {
                    mask = raw_mask;
                    mask[..at].fill(0);
                }
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

/// AVX-512 scatters (EVEX only).
fn is_scatter(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Vpscatterdd
            | Mnemonic::Vpscatterdq
            | Mnemonic::Vpscatterqd
            | Mnemonic::Vpscatterqq
            | Mnemonic::Vscatterdps
            | Mnemonic::Vscatterdpd
            | Mnemonic::Vscatterqps
            | Mnemonic::Vscatterqpd
    )
}

/// Element and index sizes of a gather or scatter: `d`/`q` in the mnemonic's first letter after
/// the stem names the index, the data type the element (`vpgatherqd`: qword indices, dwords).
fn element_and_index_sizes(m: Mnemonic) -> (usize, usize) {
    use Mnemonic as M;
    match m {
        M::Vpgatherdd | M::Vgatherdps | M::Vpscatterdd | M::Vscatterdps => (4, 4),
        M::Vpgatherdq | M::Vgatherdpd | M::Vpscatterdq | M::Vscatterdpd => (8, 4),
        M::Vpgatherqd | M::Vgatherqps | M::Vpscatterqd | M::Vscatterqps => (4, 8),
        _ => (8, 8),
    }
}

/// Elements a gather or scatter moves: as many as both the data register and the index
/// register hold.
fn vsib_elements(instr: &Instruction, data: Register) -> (usize, usize) {
    let (es, is) = element_and_index_sizes(instr.mnemonic());
    let n = (data.size() / es).min(instr.memory_index().size() / is);
    (es, n)
}

/// The opmask register a gather or scatter names (k1-k7; k0 is not encodable for them, and the
/// decoder reports such bytes as invalid — #UD here too, should one arrive).
fn opmask_of(instr: &Instruction) -> Result<usize, Fault> {
    super::regs::opmask_index(instr).ok_or((GuestException::new(crate::exit::vector::UD), None))
}

/// AVX-512 gather (`vpgatherdd zmm1{k1}, [base + zmm2*scale + disp]` and friends): the elements
/// whose opmask bit is set are loaded in order, each clearing its bit as it completes; a fault
/// leaves the completed elements and the remaining bits. When it completes the opmask is zero
/// and the destination past its last element is zeroed.
fn evex_gather(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let dst = instr.op0_register();
    let k = opmask_of(instr)?;
    let (es, n) = vsib_elements(instr, dst);
    let mut data = read_zmm(s, dst.number());
    let mut mask = read_opmask(s, k);
    for i in 0..n {
        if mask & (1 << i) == 0 {
            continue;
        }
        let va = linear_address(s, instr, 1, i).unwrap_or(0);
        match mem.read_le(va, es) {
            Ok(v) => {
                data[i * es..(i + 1) * es].copy_from_slice(&v.to_le_bytes()[..es]);
                mask &= !(1 << i);
            }
            Err(e) => {
                let mut partial = s.clone();
                write_zmm(&mut partial, dst.number(), &data);
                write_opmask(&mut partial, k, mask);
                return Err((e, Some(Box::new(partial))));
            }
        }
    }
    // Elements past the last (`vpgatherqd xmm, [vm64x]` loads two dwords) and the bits above
    // the vector length are zeroed.
    data[n * es..].fill(0);
    write_zmm(s, dst.number(), &data);
    write_opmask(s, k, 0);
    Ok(())
}

/// AVX-512 scatter (`vpscatterdd [base + zmm2*scale + disp]{k1}, zmm1` and friends): the
/// elements whose opmask bit is set are stored in order (so of two to one address the later
/// wins), each clearing its bit as it completes; a fault leaves the stores done and the
/// remaining bits. When it completes the opmask is zero.
fn scatter(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
    let src = instr.op1_register();
    let k = opmask_of(instr)?;
    let (es, n) = vsib_elements(instr, src);
    let data = read_zmm(s, src.number());
    let mut mask = read_opmask(s, k);
    for i in 0..n {
        if mask & (1 << i) == 0 {
            continue;
        }
        let va = linear_address(s, instr, 0, i).unwrap_or(0);
        if let Err(e) = mem.write(va, &data[i * es..(i + 1) * es]) {
            let mut partial = s.clone();
            write_opmask(&mut partial, k, mask);
            return Err((e, Some(Box::new(partial))));
        }
        mask &= !(1 << i);
    }
    write_opmask(s, k, 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, MemoryOperand};

    /// Memory whose bytes are the low byte of their address, and where every address from
    /// `fault_from` on is not present.
    struct Memory {
        fault_from: u64,
    }

    impl GuestMemory for Memory {
        fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
            if va.wrapping_add(buf.len() as u64) > self.fault_from {
                return Err(GuestException::page_fault(va.max(self.fault_from), 4));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = va.wrapping_add(i as u64) as u8;
            }
            Ok(())
        }
        fn write(&mut self, va: u64, _: &[u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 6))
        }
    }

    /// Memory that records writes and faults from `fault_from` on.
    struct Recording {
        fault_from: u64,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl GuestMemory for Recording {
        fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), GuestException> {
            unreachable!("scatters only write")
        }
        fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
            if va >= self.fault_from {
                return Err(GuestException::page_fault(va, 6));
            }
            self.writes.push((va, data.to_vec()));
            Ok(())
        }
    }

    /// A state whose XSAVE image holds AVX-512 registers, where the host has them (elsewhere
    /// the EVEX forms are not executable and the harness lists them so).
    fn avx512_state() -> Option<GuestState> {
        use crate::cpu::xsave::{component::AVX512, XsaveLayout};
        if XsaveLayout::host().managed() & AVX512 != AVX512 {
            crate::harness::ci_summary(
                "emulate::implicit EVEX gather/scatter tests: not executable here (no AVX-512 state on this host)",
            );
            return None;
        }
        Some(GuestState {
            xcr0: XsaveLayout::host().managed(),
            ..GuestState::default()
        })
    }

    fn zmm_dwords(v: impl Fn(usize) -> u32) -> [u8; 64] {
        let mut b = [0u8; 64];
        for i in 0..16 {
            b[4 * i..4 * i + 4].copy_from_slice(&v(i).to_le_bytes());
        }
        b
    }

    #[test]
    fn an_evex_gather_faulting_mid_way_keeps_completed_elements_and_the_remaining_mask() {
        let Some(mut s) = avx512_state() else { return };
        // vpgatherdd zmm16{k1}, [rax+zmm17*4]: element i at 0x1000 + 4 * i; k1 = 0b1011, so
        // element 2 is masked off and element 3 (at 0x100c) faults.
        let mut instr = Instruction::with2(
            Code::EVEX_Vpgatherdd_zmm_k1_vm32z,
            Register::ZMM16,
            MemoryOperand::new(Register::RAX, Register::ZMM17, 4, 0, 0, false, Register::None),
        )
        .unwrap();
        instr.set_op_mask(Register::K1);
        s.gpr[gpr::RAX] = 0x1000;
        write_zmm(&mut s, 16, &zmm_dwords(|_| 0xdddd_dddd));
        write_zmm(&mut s, 17, &zmm_dwords(|i| i as u32));
        write_opmask(&mut s, 1, 0b1011);
        let before = s.clone();
        let outcome = execute(&mut s, &instr, &mut Memory { fault_from: 0x100c }).ok();
        assert!(
            matches!(outcome, Some(Outcome::Exit(Exit::Exception(e))) if e == GuestException::page_fault(0x100c, 4))
        );
        assert_eq!(s.rip, before.rip, "the gather did not complete");
        let loaded = |i: usize| u32::from_le_bytes([0, 1, 2, 3].map(|b| (4 * i + b) as u8));
        let partial = zmm_dwords(|i| if i < 2 { loaded(i) } else { 0xdddd_dddd });
        assert_eq!(read_zmm(&s, 16), partial);
        assert_eq!(read_opmask(&s, 1), 0b1000, "element 3 still pending");

        let mut s = before;
        let outcome = execute(&mut s, &instr, &mut Memory { fault_from: u64::MAX }).ok();
        assert!(matches!(outcome, Some(Outcome::Continue)));
        let done = zmm_dwords(|i| match i {
            0 | 1 | 3 => loaded(i),
            _ => 0xdddd_dddd,
        });
        assert_eq!(read_zmm(&s, 16), done);
        assert_eq!(read_opmask(&s, 1), 0);
    }

    #[test]
    fn an_evex_scatter_stores_in_order_and_stops_at_a_fault() {
        let Some(mut s) = avx512_state() else { return };
        // vpscatterdd [rax+zmm17*4]{k2}, zmm16: elements 0 and 1 both go to index 5 (the later
        // store wins), element 2 to index 7, element 3 to index 0x100 (faults).
        let mut instr = Instruction::with2(
            Code::EVEX_Vpscatterdd_vm32z_k1_zmm,
            MemoryOperand::new(Register::RAX, Register::ZMM17, 4, 0, 0, false, Register::None),
            Register::ZMM16,
        )
        .unwrap();
        instr.set_op_mask(Register::K2);
        s.gpr[gpr::RAX] = 0x1000;
        write_zmm(&mut s, 16, &zmm_dwords(|i| 0xa0 + i as u32));
        write_zmm(&mut s, 17, &zmm_dwords(|i| [5, 5, 7, 0x100][i.min(3)]));
        write_opmask(&mut s, 2, 0b1111);
        let mut mem = Recording {
            fault_from: 0x1400,
            writes: Vec::new(),
        };
        let outcome = execute(&mut s, &instr, &mut mem).ok();
        assert!(
            matches!(outcome, Some(Outcome::Exit(Exit::Exception(e))) if e == GuestException::page_fault(0x1400, 6))
        );
        let stored: Vec<(u64, u32)> = mem
            .writes
            .iter()
            .map(|(va, d)| (*va, u32::from_le_bytes(d[..4].try_into().unwrap())))
            .collect();
        assert_eq!(stored, [(0x1014, 0xa0), (0x1014, 0xa1), (0x101c, 0xa2)]);
        assert_eq!(read_opmask(&s, 2), 0b1000, "the faulting element's bit stays");
    }

    fn dwords(v: [u32; 8]) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, d) in v.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_gather_faulting_mid_way_keeps_completed_elements_and_its_normalized_mask() {
        // vpgatherdd xmm0, [rax+xmm1*4], xmm2: elements 0..3 at 0x1000 + 4 * i; element 1 is
        // masked off, element 2 faults.
        let instr = Instruction::with3(
            Code::VEX_Vpgatherdd_xmm_vm32x_xmm,
            Register::XMM0,
            MemoryOperand::new(Register::RAX, Register::XMM1, 4, 0, 0, false, Register::None),
            Register::XMM2,
        )
        .unwrap();
        let mut s = GuestState::default();
        s.gpr[gpr::RAX] = 0x1000;
        write_ymm(&mut s, 0, &dwords([0xdddd_dddd; 8]));
        write_ymm(&mut s, 1, &dwords([0, 1, 2, 3, 0, 0, 0, 0]));
        let garbage = 0x1234_5678;
        write_ymm(
            &mut s,
            2,
            &dwords([
                0x8000_0000,
                0x7fff_ffff,
                0x8000_0001,
                0xf000_0000,
                garbage,
                garbage,
                0,
                1,
            ]),
        );
        let before = s.clone();
        let outcome = execute(&mut s, &instr, &mut Memory { fault_from: 0x1008 }).ok();
        assert!(
            matches!(outcome, Some(Outcome::Exit(Exit::Exception(e))) if e == GuestException::page_fault(0x1008, 4))
        );
        assert_eq!(s.rip, before.rip, "the gather did not complete");
        // Element 0 was gathered; the destination's other elements (and its upper half) wait.
        assert_eq!(
            read_ymm(&s, 0),
            dwords([
                0x0302_0100,
                0xdddd_dddd,
                0xdddd_dddd,
                0xdddd_dddd,
                0xdddd_dddd,
                0xdddd_dddd,
                0xdddd_dddd,
                0xdddd_dddd
            ])
        );
        // The mask: element 0 done, element 1 masked off (now 0), elements 2 and 3 pending —
        // on Intel normalized (all ones) with bits 255:128 cleared, on AMD as they were, the
        // bits above too.
        let mask = if crate::cpu::vendor::host_has(crate::cpu::vendor::Quirk::GatherFaultKeepsRawMask) {
            dwords([0, 0, 0x8000_0001, 0xf000_0000, garbage, garbage, 0, 1])
        } else {
            dwords([0, 0, u32::MAX, u32::MAX, 0, 0, 0, 0])
        };
        assert_eq!(read_ymm(&s, 2), mask);

        // Completed: the mask ends all zero, the destination's upper half is zeroed.
        let mut s = before;
        let outcome = execute(&mut s, &instr, &mut Memory { fault_from: u64::MAX }).ok();
        assert!(matches!(outcome, Some(Outcome::Continue)));
        assert_eq!(
            read_ymm(&s, 0),
            dwords([0x0302_0100, 0xdddd_dddd, 0x0b0a_0908, 0x0f0e_0d0c, 0, 0, 0, 0])
        );
        assert_eq!(read_ymm(&s, 2), [0; 32]);
    }

    #[test]
    fn a_256_bit_gather_of_dwords_by_qword_indices_treats_its_whole_mask_alike_on_a_fault() {
        // vpgatherqd xmm0, [rax+ymm1], xmm2 is a VEX.256 instruction: on a fault the mask's
        // elements 4..7 (which gather nothing) are normalized too on an Intel Xeon, and kept
        // like the others on an AMD EPYC (which normalizes nothing).
        let instr = Instruction::with3(
            Code::VEX_Vpgatherqd_xmm_vm64y_xmm,
            Register::XMM0,
            MemoryOperand::new(Register::RAX, Register::YMM1, 1, 0, 0, false, Register::None),
            Register::XMM2,
        )
        .unwrap();
        let mut s = GuestState::default();
        s.gpr[gpr::RAX] = 0x1000;
        write_ymm(
            &mut s,
            2,
            &dwords([0x8000_0000, 0, 0, 0, 0x8000_0000, 0x4000_0000, 0x9000_0000, 1]),
        );
        let outcome = execute(&mut s, &instr, &mut Memory { fault_from: 0 }).ok();
        assert!(matches!(outcome, Some(Outcome::Exit(Exit::Exception(_)))));
        let mask = if crate::cpu::vendor::host_has(crate::cpu::vendor::Quirk::GatherFaultKeepsRawMask) {
            dwords([0x8000_0000, 0, 0, 0, 0x8000_0000, 0x4000_0000, 0x9000_0000, 1])
        } else {
            dwords([u32::MAX, 0, 0, 0, u32::MAX, 0, u32::MAX, 0])
        };
        assert_eq!(read_ymm(&s, 2), mask);
    }
}

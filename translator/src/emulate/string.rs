//! String instructions (movs/stos/lods/cmps/scas with REP prefixes) under the soft-MMU, where
//! their implicit RSI/RDI accesses must go through the page walk. Iterations that completed
//! before a fault stay done, as on the CPU.

use super::{GuestMemory, Outcome};
use crate::exit::{vector, Exit, GuestException};
use crate::state::{flags, gpr, GuestState};
use iced_x86::{Instruction, Mnemonic, Register};

/// Flags of `a - b` at `bits` width (what `cmp` computes).
pub fn sub_flags(a: u64, b: u64, bits: u32) -> u64 {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let (a, b) = (a & mask, b & mask);
    let r = a.wrapping_sub(b) & mask;
    let sign = 1u64 << (bits - 1);
    let mut f = 0;
    if a < b {
        f |= flags::CF;
    }
    if r == 0 {
        f |= flags::ZF;
    }
    if r & sign != 0 {
        f |= flags::SF;
    }
    if (a ^ b) & (a ^ r) & sign != 0 {
        f |= flags::OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= flags::AF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= flags::PF;
    }
    f
}

/// Bytes a `rep movs`/`rep stos` moves per call before yielding to the dispatcher.
const BULK_BYTES_PER_CALL: usize = 256 << 10;
const PAGE: u64 = 4096;

/// `rep movs`/`rep stos` a page-bounded chunk at a time, in either direction (RFLAGS.DF):
/// each chunk is one read and one write through the page walk instead of one per element. A
/// chunk never crosses a page of either operand and never reads bytes an earlier element of it
/// would have written (forward, a destination above its source by less than the chunk; going
/// down, a source above its destination), so one memmove has the effect of its elements in
/// order, and a chunk that faults does so at its first element with nothing of it done. Stops
/// before an element that straddles a page (or overlaps its source), when RCX reaches 0, or
/// when `budget` bytes are done.
fn bulk_chunks(
    state: &mut GuestState,
    mnemonic: Mnemonic,
    n: usize,
    src_base: u64,
    mem: &mut dyn GuestMemory,
    budget: &mut usize,
) -> Result<(), GuestException> {
    let movs = matches!(
        mnemonic,
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
    );
    let down = state.rflags & flags::DF != 0;
    let size = n as u64;
    // Elements from the one at `va` onwards (in the direction of travel) inside its page.
    let room = |va: u64| {
        let offset = va & (PAGE - 1);
        match down {
            false => (PAGE - offset) / size,
            true if offset + size > PAGE => 0,
            true => offset / size + 1,
        }
    };
    while state.gpr[gpr::RCX] > 0 && *budget >= n {
        let rdi = state.gpr[gpr::RDI];
        let mut k = state.gpr[gpr::RCX].min(room(rdi)).min((*budget / n) as u64);
        let src = state.wrap_address(src_base.wrapping_add(state.gpr[gpr::RSI]));
        if movs {
            k = k.min(room(src));
            // How far ahead of the source the destination runs: within the chunk, a later
            // element would read what an earlier one wrote.
            let lead = if down {
                src.wrapping_sub(rdi)
            } else {
                rdi.wrapping_sub(src)
            };
            if lead != 0 && lead < k * size {
                k = lead / size;
            }
        }
        if k == 0 {
            return Ok(());
        }
        let len = k * size;
        // The chunk's lowest addresses (going down, its last element's).
        let low = |va: u64| if down { va.wrapping_sub(len - size) } else { va };
        let done = if movs {
            mem.copy(low(rdi), low(src), len as usize)
        } else {
            mem.fill(low(rdi), len as usize, &state.gpr[gpr::RAX].to_le_bytes()[..n])
        };
        if let Err(mut exc) = done {
            // A page fault names the address the first element touched (the chunk's page is
            // that element's), not the chunk's low end.
            for va in [src, rdi].into_iter().skip(usize::from(!movs)) {
                if exc.address.is_some() && exc.address == Some(low(va)) {
                    exc.address = Some(va);
                    break;
                }
            }
            return Err(exc);
        }
        let step = if down { len.wrapping_neg() } else { len };
        state.gpr[gpr::RDI] = state.wrap_address(rdi.wrapping_add(step));
        if movs {
            state.gpr[gpr::RSI] = state.wrap_address(state.gpr[gpr::RSI].wrapping_add(step));
        }
        state.gpr[gpr::RCX] -= k;
        *budget -= len as usize;
    }
    Ok(())
}

/// Emulates a string instruction (with its REP prefix) at `state.rip`. Iterations that
/// completed before a fault stay done, as on the CPU.
pub fn execute(
    state: &mut GuestState,
    instr: &Instruction,
    mem: &mut dyn GuestMemory,
) -> Result<Outcome, super::NotEmulated> {
    if instr.code().op_code().address_size() == 32 || instr.memory_size().size() == 0 {
        return Err(super::NotEmulated);
    }
    if state.code32 {
        // 32-bit code: ESI, EDI and ECX (the upper halves are not the program's), and every
        // address wraps at 4 GiB (`GuestState::wrap_address`).
        for r in [gpr::RSI, gpr::RDI, gpr::RCX] {
            state.gpr[r] &= 0xffff_ffff;
        }
    }
    let n = instr.memory_size().size();
    let bits = (n * 8) as u32;
    let step = if state.rflags & flags::DF != 0 {
        (n as u64).wrapping_neg()
    } else {
        n as u64
    };
    let src_base = match instr.segment_prefix() {
        Register::FS => state.fs_base,
        Register::GS => state.gs_base,
        _ => 0,
    };
    let mnemonic = instr.mnemonic();
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let mask = if n == 8 { u64::MAX } else { (1u64 << bits) - 1 };
    // Alignment checking (CPL3, CR0.AM, RFLAGS.AC) applies to each element access.
    let check_alignment = state.alignment_checking() && n > 1;
    let misaligned = |va: u64| check_alignment && !va.is_multiple_of(n as u64);
    let bulk = rep
        && !check_alignment
        && matches!(
            mnemonic,
            Mnemonic::Movsb
                | Mnemonic::Movsw
                | Mnemonic::Movsd
                | Mnemonic::Movsq
                | Mnemonic::Stosb
                | Mnemonic::Stosw
                | Mnemonic::Stosd
                | Mnemonic::Stosq
        );
    let mut budget = BULK_BYTES_PER_CALL;
    loop {
        if rep && state.gpr[gpr::RCX] == 0 {
            break;
        }
        if bulk {
            if let Err(exc) = bulk_chunks(state, mnemonic, n, src_base, mem, &mut budget) {
                return Ok(Outcome::Exit(Exit::Exception(exc)));
            }
            if state.gpr[gpr::RCX] == 0 {
                break;
            }
            if budget < n {
                // RIP stays at the instruction, RCX counts what is left: it resumes after any
                // interrupt the dispatcher delivers, as the CPU's iterations do.
                return Ok(Outcome::Continue);
            }
            // What is left starts with an element that straddles a page or overlaps the
            // bytes just copied: one element below, then chunks again.
        }
        let rsi = state.gpr[gpr::RSI];
        let rdi = state.gpr[gpr::RDI];
        let src = state.wrap_address(src_base.wrapping_add(rsi));
        let wrap_mask = state.wrap_address(u64::MAX);
        let result: Result<(), GuestException> = (|| {
            let uses_rsi = matches!(
                mnemonic,
                Mnemonic::Movsb
                    | Mnemonic::Movsw
                    | Mnemonic::Movsd
                    | Mnemonic::Movsq
                    | Mnemonic::Lodsb
                    | Mnemonic::Lodsw
                    | Mnemonic::Lodsd
                    | Mnemonic::Lodsq
                    | Mnemonic::Cmpsb
                    | Mnemonic::Cmpsw
                    | Mnemonic::Cmpsd
                    | Mnemonic::Cmpsq
            );
            let uses_rdi = !matches!(
                mnemonic,
                Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq
            );
            if (uses_rsi && misaligned(src)) || (uses_rdi && misaligned(rdi)) {
                return Err(GuestException {
                    vector: vector::AC,
                    error_code: Some(0),
                    address: None,
                });
            }
            match mnemonic {
                Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                    let v = mem.read_le(src, n)?;
                    mem.write(rdi, &v.to_le_bytes()[..n])?;
                    state.gpr[gpr::RSI] = rsi.wrapping_add(step) & wrap_mask;
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step) & wrap_mask;
                }
                Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                    let v = state.gpr[gpr::RAX];
                    mem.write(rdi, &v.to_le_bytes()[..n])?;
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step) & wrap_mask;
                }
                Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
                    let v = mem.read_le(src, n)?;
                    let rax = &mut state.gpr[gpr::RAX];
                    *rax = match n {
                        4 => v,
                        8 => v,
                        _ => (*rax & !mask) | v,
                    };
                    state.gpr[gpr::RSI] = rsi.wrapping_add(step) & wrap_mask;
                }
                Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => {
                    // ES:[RDI] is read first: when both operands would fault, an Intel Xeon
                    // reports RDI's address (measured natively and under KVM at CPL3), and a
                    // fault there leaves RSI's page unaccessed — except `repe cmpsb` where the
                    // host reads RSI first (`host::quirks`). (The SDM leaves the order open;
                    // `movs` reads its source first.)
                    let source_first = instr.mnemonic() == Mnemonic::Cmpsb
                        && instr.has_repe_prefix()
                        && crate::host::quirks::repe_cmpsb_reads_source_first();
                    let (a, b) = if source_first {
                        let a = mem.read_le(src, n)?;
                        (a, mem.read_le(rdi, n)?)
                    } else {
                        let b = mem.read_le(rdi, n)?;
                        (mem.read_le(src, n)?, b)
                    };
                    state.rflags = (state.rflags & !flags::STATUS) | sub_flags(a, b, bits);
                    state.gpr[gpr::RSI] = rsi.wrapping_add(step) & wrap_mask;
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step) & wrap_mask;
                }
                Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => {
                    let b = mem.read_le(rdi, n)?;
                    state.rflags = (state.rflags & !flags::STATUS) | sub_flags(state.gpr[gpr::RAX], b, bits);
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step) & wrap_mask;
                }
                _ => return Err(GuestException::new(vector::UD)),
            }
            Ok(())
        })();
        if let Err(exc) = result {
            return Ok(Outcome::Exit(Exit::Exception(exc)));
        }
        if !rep {
            break;
        }
        state.gpr[gpr::RCX] -= 1;
        let compares = matches!(
            mnemonic,
            Mnemonic::Cmpsb
                | Mnemonic::Cmpsw
                | Mnemonic::Cmpsd
                | Mnemonic::Cmpsq
                | Mnemonic::Scasb
                | Mnemonic::Scasw
                | Mnemonic::Scasd
                | Mnemonic::Scasq
        );
        if compares {
            let zf = state.rflags & flags::ZF != 0;
            if (instr.has_repe_prefix() && !zf) || (instr.has_repne_prefix() && zf) {
                break;
            }
        }
    }
    state.rip = instr.next_ip();
    Ok(Outcome::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory where every read faults at its address.
    struct Unmapped;

    impl GuestMemory for Unmapped {
        fn read(&mut self, va: u64, _: &mut [u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 4))
        }
        fn write(&mut self, va: u64, _: &[u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 6))
        }
    }

    /// Four pages of memory at `BASE`, one of which may be absent (its accesses fault at
    /// their first byte in it).
    struct Pages {
        bytes: Vec<u8>,
        absent: Option<u64>,
    }

    const BASE: u64 = 0x10000;

    impl Pages {
        fn offsets(&self, va: u64, len: usize, error: u32) -> Result<std::ops::Range<usize>, GuestException> {
            for at in va..va + len as u64 {
                let page = at & !(PAGE - 1);
                if !(BASE..BASE + 4 * PAGE).contains(&at) || Some(page) == self.absent {
                    return Err(GuestException::page_fault(at, error));
                }
            }
            Ok((va - BASE) as usize..(va - BASE) as usize + len)
        }
    }

    impl GuestMemory for Pages {
        fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
            let at = self.offsets(va, buf.len(), 4)?;
            buf.copy_from_slice(&self.bytes[at]);
            Ok(())
        }
        fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
            let at = self.offsets(va, data.len(), 6)?;
            self.bytes[at].copy_from_slice(data);
            Ok(())
        }
    }

    /// The same instruction one element at a time, as the SDM describes it.
    fn element_by_element(s: &mut GuestState, instr: &Instruction, mem: &mut Pages) -> Option<GuestException> {
        let n = instr.memory_size().size();
        let movs = matches!(
            instr.mnemonic(),
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
        );
        let step = if s.rflags & flags::DF != 0 {
            (n as u64).wrapping_neg()
        } else {
            n as u64
        };
        while s.gpr[gpr::RCX] > 0 {
            let value = if movs {
                match mem.read_le(s.gpr[gpr::RSI], n) {
                    Ok(v) => v,
                    Err(e) => return Some(e),
                }
            } else {
                s.gpr[gpr::RAX]
            };
            if let Err(e) = mem.write(s.gpr[gpr::RDI], &value.to_le_bytes()[..n]) {
                return Some(e);
            }
            s.gpr[gpr::RDI] = s.gpr[gpr::RDI].wrapping_add(step);
            if movs {
                s.gpr[gpr::RSI] = s.gpr[gpr::RSI].wrapping_add(step);
            }
            s.gpr[gpr::RCX] -= 1;
        }
        None
    }

    /// `rep movs`/`rep stos` in page-bounded chunks, up and down, overlapping or not, with
    /// elements straddling pages and pages that fault, against the same instruction run one
    /// element at a time.
    #[test]
    fn chunked_rep_movs_and_stos_equal_element_by_element() {
        use iced_x86::RepPrefixKind::Repe as Rep;
        let instrs = [
            Instruction::with_movsb(64, Register::None, Rep),
            Instruction::with_movsw(64, Register::None, Rep),
            Instruction::with_movsd(64, Register::None, Rep),
            Instruction::with_movsq(64, Register::None, Rep),
            Instruction::with_stosb(64, Rep),
            Instruction::with_stosq(64, Rep),
        ]
        .map(Result::unwrap);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let (mut faults, mut down_overlaps) = (0, 0);
        for case in 0..20_000 {
            let mut instr = instrs[case % instrs.len()];
            instr.set_len(2);
            instr.set_ip(0x1000);
            let n = instr.memory_size().size() as u64;
            let mut s = GuestState {
                rip: 0x1000,
                rflags: flags::FIXED | if next(2) == 1 { flags::DF } else { 0 },
                ..Default::default()
            };
            s.gpr[gpr::RSI] = BASE + next(4 * PAGE);
            // Near the source half of the time (the overlaps that decide a chunk's length).
            s.gpr[gpr::RDI] = match next(2) {
                0 => BASE + next(4 * PAGE),
                _ => (s.gpr[gpr::RSI] + next(64)).wrapping_sub(32),
            };
            s.gpr[gpr::RCX] = next(2 * PAGE / n);
            s.gpr[gpr::RAX] = next(u64::MAX);
            let bytes = (0..4 * PAGE).map(|_| next(256) as u8).collect();
            let absent = (next(3) == 0).then(|| BASE + next(4) * PAGE);
            let mut chunked = Pages { bytes, absent };
            let mut reference = Pages {
                bytes: chunked.bytes.clone(),
                absent,
            };
            let mut expected = s.clone();
            let expected_fault = element_by_element(&mut expected, &instr, &mut reference);
            let fault = loop {
                match execute(&mut s, &instr, &mut chunked) {
                    Ok(Outcome::Exit(Exit::Exception(e))) => break Some(e),
                    Ok(Outcome::Continue) if s.rip == 0x1000 => continue,
                    Ok(Outcome::Continue) => break None,
                    _ => panic!("case {case}: {instr} did not complete"),
                }
            };
            let what = format!(
                "case {case}: {instr} DF={} rsi={:#x} rdi={:#x} absent={absent:x?}",
                expected.rflags & flags::DF != 0,
                expected.gpr[gpr::RSI],
                expected.gpr[gpr::RDI]
            );
            assert_eq!(fault, expected_fault, "{what}");
            assert_eq!(s.gpr, expected.gpr, "{what}");
            assert!(chunked.bytes == reference.bytes, "{what}: memory differs");
            faults += usize::from(fault.is_some());
            let lead = s.gpr[gpr::RSI].abs_diff(s.gpr[gpr::RDI]);
            down_overlaps += usize::from(s.rflags & flags::DF != 0 && lead < 64 && lead > 0);
        }
        // The cases that matter were there.
        assert!(
            faults > 1000 && down_overlaps > 1000,
            "{faults} faults, {down_overlaps} overlaps"
        );
    }

    #[test]
    fn cmps_reads_es_rdi_first_and_movs_its_source() {
        use iced_x86::RepPrefixKind::{None as NoRep, Repe};
        let repe_cmpsb_first = if crate::host::quirks::repe_cmpsb_reads_source_first() {
            0x1000
        } else {
            0x2000
        };
        for (instr, first) in [
            (Instruction::with_cmpsb(64, Register::None, NoRep), 0x2000),
            (Instruction::with_cmpsq(64, Register::None, NoRep), 0x2000),
            (Instruction::with_cmpsq(64, Register::None, Repe), 0x2000),
            (Instruction::with_cmpsb(64, Register::None, Repe), repe_cmpsb_first),
            (Instruction::with_movsq(64, Register::None, NoRep), 0x1000),
        ] {
            let instr = instr.unwrap();
            let code = instr.code();
            let mut s = GuestState::default();
            s.gpr[gpr::RSI] = 0x1000;
            s.gpr[gpr::RDI] = 0x2000;
            s.gpr[gpr::RCX] = 1;
            let outcome = execute(&mut s, &instr, &mut Unmapped).ok();
            assert!(
                matches!(outcome, Some(Outcome::Exit(Exit::Exception(e))) if e.address == Some(first)),
                "{code:?}"
            );
        }
    }
}

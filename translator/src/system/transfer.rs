//! Control transfers that change CS or the privilege level in system mode: `iretq`, far
//! returns, far jumps and calls (to code segments, not gates), `syscall`/`sysret` and
//! `sysenter`. Each sets [`GuestState::code32`] from the code segment it lands in: 64-bit code,
//! or 32-bit code at CPL3 (compatibility mode, where a 64-bit kernel runs 32-bit programs);
//! all-or-nothing (the caller works on a copy of the state).

use super::descriptors::{self, Failure};
use crate::emulate::GuestMemory;
use crate::exit::{vector, GuestException};
use crate::state::{flags, gpr, Cpl, GuestState};

const VIF: u64 = 1 << 19;
const VIP: u64 = 1 << 20;

fn cpl_of(rpl: u16) -> Result<Cpl, Failure> {
    match rpl {
        0 => Ok(Cpl::Kernel),
        3 => Ok(Cpl::User),
        n => Err(Failure::Unsupported(format!("a transfer to ring {n}"))),
    }
}

fn stack_read(mem: &mut dyn GuestMemory, at: u64, size: usize) -> Result<u64, GuestException> {
    mem.read_le(crate::emulate::stack_address(at)?, size)
}

/// RFLAGS bits an `iret`/`popf` at `cpl` may change (64-bit mode: VM, VIF, VIP stay clear).
pub fn writable_flags(cpl: Cpl, iopl: u64) -> u64 {
    let mut w = flags::STATUS | flags::TF | flags::DF | flags::NT | flags::RF | flags::AC | flags::ID;
    if cpl == Cpl::Kernel {
        w |= flags::IF | flags::IOPL;
    } else if iopl == 3 {
        w |= flags::IF;
    }
    w
}

/// `iretq` (and the 16/32-bit `iret` forms, which pop smaller slots). In 64-bit mode every
/// form pops SS:RSP. The frame is read and checked in the order an Intel Xeon does it
/// (measured at CPL3 in a Linux process, with frames placed across an unmapped page boundary,
/// and with frames that fail two checks at once): NT set is #GP(0) before anything is read
/// (no task return in IA-32e mode); then the RFLAGS slot, the CS slot and the RIP slot are
/// read; the CS selector and descriptor are checked (#GP(CS), #NP); then the SS slot and the
/// RSP slot are read and SS is checked (#GP(0) for a null SS to CPL3, #GP(SS), #SS(SS)); only
/// then a non-canonical RIP raises #GP(0).
pub fn iret(s: &mut GuestState, mem: &mut dyn GuestMemory, size: usize) -> Result<(), Failure> {
    if s.rflags & flags::NT != 0 {
        return Err(GuestException::gp(0).into());
    }
    let rsp = s.gpr[gpr::RSP];
    let at = |i: u64| rsp.wrapping_add(i * size as u64);
    let fl = stack_read(mem, at(2), size)?;
    let cs = stack_read(mem, at(1), size)? as u16;
    let ip = stack_read(mem, at(0), size)?;
    let code = descriptors::check_code(s, mem, cs, true)?;
    let target = cpl_of(cs & 3)?;
    let ss = stack_read(mem, at(4), size)? as u16;
    let new_rsp = stack_read(mem, at(3), size)?;
    let iopl = (s.rflags & flags::IOPL) >> 12;
    let mut writable = writable_flags(s.cpl, iopl);
    if s.cpl == Cpl::Kernel {
        // At CPL0 a 32- or 64-bit `iret` also loads VIF and VIP (the SDM's IRET pseudocode;
        // `popf` never does, which is why `writable_flags` leaves them out).
        writable |= VIF | VIP;
    }
    let writable = writable & if size == 2 { 0xffff } else { u64::MAX };
    let old_cpl = s.cpl;
    descriptors::load_ss(s, mem, ss, cs & 3)?;
    check_target(code, ip)?;
    s.rflags = (s.rflags & !writable) | (fl & writable) | flags::FIXED;
    s.code32 = code.compat_code();
    s.seg[1] = cs;
    s.cpl = target;
    s.gpr[gpr::RSP] = new_rsp;
    s.rip = ip;
    if target as u8 > old_cpl as u8 {
        null_inaccessible_data_segments(s, mem);
    }
    Ok(())
}

/// The instruction pointer a transfer into `code` may load: canonical for 64-bit code, within
/// the segment limit for 32-bit code (#GP(0) otherwise).
fn check_target(code: descriptors::Descriptor, ip: u64) -> Result<(), GuestException> {
    let fits = if code.compat_code() {
        ip <= code.limit() as u64
    } else {
        crate::mmu::is_canonical(ip)
    };
    if fits {
        Ok(())
    } else {
        Err(GuestException::gp(0))
    }
}

/// Returning to an outer ring, DS/ES/FS/GS holding segments the new CPL may not use become
/// null (as the CPU does).
fn null_inaccessible_data_segments(s: &mut GuestState, mem: &mut dyn GuestMemory) {
    for sreg in [0usize, 3, 4, 5] {
        let sel = s.seg[sreg];
        if sel & !3 == 0 {
            continue;
        }
        let keep = descriptors::read(s, mem, sel).is_ok_and(|d| d.conforming() || d.dpl() >= s.cpl as u16);
        if !keep {
            s.seg[sreg] = 0;
        }
    }
}

/// `retf` / `retf imm16` of operand size `size`.
pub fn far_return(s: &mut GuestState, mem: &mut dyn GuestMemory, size: usize, pop: u64) -> Result<(), Failure> {
    let rsp = s.gpr[gpr::RSP];
    // The CPU reads the CS slot before the offset: when the frame cannot be read, the #PF
    // reports the selector's address (measured on Intel by `hbt isa-test --system`).
    let cs = stack_read(mem, rsp.wrapping_add(size as u64), size)? as u16;
    let ip = stack_read(mem, rsp, size)?;
    let after = rsp.wrapping_add(2 * size as u64).wrapping_add(pop);
    let user = s.cpl == crate::state::Cpl::User;
    if user && cs & 3 != 3 && crate::cpu::vendor::host_has(crate::cpu::vendor::Quirk::RetfReadsOuterStackFirst) {
        // At CPL3 an RPL other than 3 announces a return to another privilege level, for
        // which AMD CPUs pop SS:RSP (SS slot first) before they validate CS (`cpu::vendor`, as
        // in user mode). At CPL0 only KVM's emulator could be compared (it checks CS first):
        // the CPU's order there is not measured, and CS is checked first.
        stack_read(mem, after.wrapping_add(size as u64), size)?;
        stack_read(mem, after, size)?;
    }
    let code = descriptors::check_code(s, mem, cs, true)?;
    check_target(code, ip)?;
    let target = cpl_of(cs & 3)?;
    if target as u8 > s.cpl as u8 {
        // To an outer ring: SS:RSP follow on the stack.
        let new_rsp = stack_read(mem, after, size)?;
        let ss = stack_read(mem, after.wrapping_add(size as u64), size)? as u16;
        descriptors::load_ss(s, mem, ss, cs & 3)?;
        s.gpr[gpr::RSP] = new_rsp.wrapping_add(pop);
        s.cpl = target;
        null_inaccessible_data_segments(s, mem);
    } else {
        s.gpr[gpr::RSP] = after;
    }
    s.seg[1] = cs;
    s.code32 = code.compat_code();
    s.rip = ip;
    Ok(())
}

/// `jmp far` / `call far` to a code segment at the current privilege (call gates and task
/// switches are not modelled). `ret` is the return RIP a call pushes.
pub fn far_jump(
    s: &mut GuestState,
    mem: &mut dyn GuestMemory,
    cs: u16,
    ip: u64,
    call: Option<(u64, usize)>,
) -> Result<(), Failure> {
    // A null selector is #GP(0) before any descriptor is read (the null descriptor is no
    // system descriptor to go through).
    if cs & !3 == 0 {
        return Err(GuestException::gp(0).into());
    }
    let d = descriptors::read(s, mem, cs)?;
    if !d.code_or_data() {
        // In IA-32e mode the only system descriptor a far jmp/call may name is a 64-bit call
        // gate; a TSS, a task gate, an LDT or an empty entry is #GP(selector) (SDM JMP/CALL).
        const CALL_GATE_64: u8 = 0xc;
        if d.kind() == CALL_GATE_64 {
            return Err(Failure::Unsupported(format!(
                "far transfer through call gate {cs:#x} (call gates are not modelled)"
            )));
        }
        return Err(descriptors::selector_fault(vector::GP, cs).into());
    }
    let code = descriptors::check_code(s, mem, cs, false)?;
    check_target(code, ip)?;
    if let Some((ret, size)) = call {
        let rsp = s.gpr[gpr::RSP];
        let a = crate::emulate::stack_address(s.wrap_address(rsp.wrapping_sub(size as u64)))?;
        let b = crate::emulate::stack_address(s.wrap_address(rsp.wrapping_sub(2 * size as u64)))?;
        mem.write(a, &(s.seg[1] as u64).to_le_bytes()[..size])?;
        mem.write(b, &ret.to_le_bytes()[..size])?;
        s.gpr[gpr::RSP] = if s.code32 { b & 0xffff_ffff } else { b };
    }
    s.seg[1] = (cs & !3) | s.cpl as u16;
    s.code32 = code.compat_code();
    s.rip = ip;
    Ok(())
}

/// `syscall` from CPL3 (or CPL0) in system mode: CS/SS from STAR, RIP from LSTAR (CSTAR from
/// compatibility mode), RFLAGS masked by SFMASK; RCX and R11 get RIP and RFLAGS. #UD when
/// EFER.SCE is clear, and from compatibility mode on Intel (which has `syscall` in 64-bit mode
/// only; its 32-bit programs enter the kernel with `sysenter`).
pub fn syscall(s: &mut GuestState, next: u64) -> Result<(), GuestException> {
    if s.efer & 1 == 0 || (s.code32 && crate::cpu::vendor::Vendor::host() == crate::cpu::vendor::Vendor::Intel) {
        return Err(GuestException::new(vector::UD));
    }
    let target = if s.code32 { s.sys.msr.cstar } else { s.sys.msr.lstar };
    s.gpr[gpr::RCX] = next;
    s.gpr[gpr::R11] = s.rflags & !flags::RF;
    s.rflags &= !(s.sys.msr.sfmask | flags::RF);
    s.rflags |= flags::FIXED;
    let base = ((s.sys.msr.star >> 32) & 0xffff) as u16;
    s.seg[1] = base & !3;
    s.seg[2] = (base + 8) & !3;
    s.cpl = Cpl::Kernel;
    s.code32 = false;
    s.rip = target;
    Ok(())
}

/// `sysenter` (IA-32e mode, Intel: AMD raises #UD in long mode): to CPL0 at SYSENTER_EIP with
/// RSP = SYSENTER_ESP, CS from SYSENTER_CS (64-bit) and SS the selector after it; IF, VM and
/// RF cleared. Nothing is saved: the kernel knows where its 32-bit programs' `sysenter`
/// returns. #GP(0) with a null SYSENTER_CS.
pub fn sysenter(s: &mut GuestState) -> Result<(), GuestException> {
    if crate::cpu::vendor::Vendor::host() != crate::cpu::vendor::Vendor::Intel {
        return Err(GuestException::new(vector::UD));
    }
    let cs = (s.sys.msr.sysenter_cs & 0xfffc) as u16;
    if cs == 0 {
        return Err(GuestException::gp(0));
    }
    s.seg[1] = cs;
    s.seg[2] = cs + 8;
    s.rflags &= !(flags::IF | flags::VM | flags::RF);
    s.cpl = Cpl::Kernel;
    s.code32 = false;
    s.gpr[gpr::RSP] = s.sys.msr.sysenter_esp;
    s.rip = s.sys.msr.sysenter_eip;
    Ok(())
}

/// `sysretq` from CPL0: back to CPL3 at RCX with RFLAGS from R11. #UD without EFER.SCE,
/// #GP(0) above CPL0 or with a non-canonical RCX (the check Intel makes before leaving ring 0).
/// `sysretl` (no REX.W) returns to 32-bit code: CS = STAR[63:48], EIP = ECX; the CPU loads
/// fixed attributes rather than the descriptor.
pub fn sysret(s: &mut GuestState, rex_w: bool) -> Result<(), Failure> {
    if s.efer & 1 == 0 {
        return Err(GuestException::new(vector::UD).into());
    }
    if s.cpl != Cpl::Kernel {
        return Err(GuestException::gp(0).into());
    }
    let base = ((s.sys.msr.star >> 48) & 0xffff) as u16;
    if !rex_w {
        s.seg[1] = base | 3;
        s.seg[2] = (base + 8) | 3;
        s.rflags = (s.gpr[gpr::R11] & 0x3c_7fd7) | flags::FIXED;
        s.cpl = Cpl::User;
        s.code32 = true;
        s.rip = s.gpr[gpr::RCX] & 0xffff_ffff;
        return Ok(());
    }
    let rip = s.gpr[gpr::RCX];
    if !crate::mmu::is_canonical(rip) {
        return Err(GuestException::gp(0).into());
    }
    s.seg[1] = (base + 16) | 3;
    s.seg[2] = (base + 8) | 3;
    s.rflags = (s.gpr[gpr::R11] & 0x3c_7fd7) | flags::FIXED;
    s.cpl = Cpl::User;
    s.code32 = false;
    s.rip = rip;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::test_memory::FlatMemory;

    /// Memory where every access faults at its address.
    struct Nothing;

    impl GuestMemory for Nothing {
        fn read(&mut self, va: u64, _: &mut [u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 5))
        }
        fn write(&mut self, va: u64, _: &[u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 7))
        }
    }

    /// 64 KiB of memory at virtual 0 (above: #PF from CPL3) holding Linux's GDT layout at
    /// 0x1000 (limit 0x7f): 0x10 kernel code, 0x18 kernel data, 0x2b user data, 0x33 user
    /// code, a 64-bit TSS at 0x40; entry 7 (0x38) is empty.
    fn linux_gdt() -> FlatMemory {
        let mut m = FlatMemory::new(0x10000, true);
        for (i, d) in [
            (2, 0x00af_9b00_0000_ffffu64),
            (3, 0x00cf_9300_0000_ffff),
            (5, 0x00cf_f300_0000_ffff),
            (6, 0x00af_fb00_0000_ffff),
            (8, 0x0000_8900_3000_0067),
        ] {
            m.put_u64(0x1000 + 8 * i, d);
        }
        m
    }

    /// A CPL3 state over [`linux_gdt`], RSP at 0x8000.
    fn user_state() -> GuestState {
        let mut s = GuestState {
            cpl: Cpl::User,
            ..GuestState::default()
        };
        s.seg = [0x2b, 0x33, 0x2b, 0x2b, 0x2b, 0x2b];
        s.sys.gdtr = crate::state::DescriptorTable {
            base: 0x1000,
            limit: 0x7f,
        };
        s.gpr[gpr::RSP] = 0x8000;
        s
    }

    fn guest_fault(r: Result<(), Failure>) -> GuestException {
        match r {
            Err(Failure::Guest(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_far_jump_or_call_to_a_null_or_system_selector_is_a_general_protection_fault() {
        for call in [None, Some((0x1234, 8))] {
            // Null, whatever the RPL: #GP(0).
            for cs in [0, 3] {
                let mut s = user_state();
                let e = guest_fault(far_jump(&mut s, &mut linux_gdt(), cs, 0x1000, call));
                assert_eq!(e, GuestException::gp(0), "cs {cs:#x}");
            }
            // A TSS, the TSS's upper half, an empty entry: #GP(selector).
            for cs in [0x43, 0x48, 0x38] {
                let mut s = user_state();
                let e = guest_fault(far_jump(&mut s, &mut linux_gdt(), cs, 0x1000, call));
                assert_eq!(e, GuestException::gp((cs & !3) as u32), "cs {cs:#x}");
                assert_eq!(s.gpr[gpr::RSP], 0x8000, "nothing pushed");
            }
        }
    }

    /// Runs `iret` of operand size `size` at CPL3 from a frame of (RIP, CS, RFLAGS, RSP, SS).
    fn iret_from(frame: [u64; 5], size: usize, rflags: u64) -> Result<GuestState, Failure> {
        let mut mem = linux_gdt();
        for (i, v) in frame.iter().enumerate() {
            mem.write(0x8000 + (i * size) as u64, &v.to_le_bytes()[..size]).unwrap();
        }
        let mut s = user_state();
        s.rflags = rflags;
        iret(&mut s, &mut mem, size).map(|()| s)
    }

    #[test]
    fn iret_checks_cs_then_ss_then_rip_as_the_cpu_does() {
        // Each frame fails two checks; the fault is the one an Intel Xeon reports for it at
        // CPL3 (a native `iret` in a Linux process, whose GDT has this layout).
        let non_canonical = 0x8000_0000_0000_0000;
        let cases: [([u64; 5], GuestException); 5] = [
            ([0x1000, 0x18, 0x202, 0x9000, 0], GuestException::gp(0x18)),
            ([0x1000, 0x33, 0x202, 0x9000, 0], GuestException::gp(0)),
            ([non_canonical, 0x33, 0x202, 0x9000, 0x3b], GuestException::gp(0x38)),
            ([non_canonical, 0x18, 0x202, 0x9000, 0x2b], GuestException::gp(0x18)),
            ([0x1000, 0x33, 0x202, 0x9000, 0x7505], GuestException::gp(0x7504)),
        ];
        for size in [2, 4, 8] {
            for (frame, fault) in cases {
                let frame = frame.map(|v| if size == 8 { v } else { v & ((1 << (8 * size)) - 1) });
                if frame[0] >> 47 != 0 && size != 8 {
                    continue; // a 16/32-bit RIP is always canonical
                }
                match iret_from(frame, size, 0x202).err() {
                    Some(Failure::Guest(e)) => assert_eq!(e, fault, "size {size}, frame {frame:x?}"),
                    other => panic!("size {size}, frame {frame:x?}: {other:?}"),
                }
            }
        }
        // NT set: #GP(0) before the frame is read (no task return in IA-32e mode).
        let mut s = user_state();
        s.rflags = 0x4202;
        let e = guest_fault(iret(&mut s, &mut FlatMemory::new(0, true), 8));
        assert_eq!(e, GuestException::gp(0));
        // A good frame: RSP from the frame, zero-extended from the operand size.
        let Ok(s) = iret_from([0x2000, 0x33, 0x246, 0x1234_5678, 0x2b], 4, 0x202) else {
            panic!("a good frame faulted")
        };
        assert_eq!(
            (s.rip, s.gpr[gpr::RSP], s.seg[1], s.seg[2]),
            (0x2000, 0x1234_5678, 0x33, 0x2b)
        );
    }

    #[test]
    fn iret_reads_rflags_cs_rip_then_ss_rsp() {
        // The frame ends at the top of the 64 KiB (above: #PF at the address read). Measured
        // on an Intel Xeon with frames across an unmapped page boundary: the RFLAGS slot is
        // read first, and SS before RSP once CS passed.
        for size in [2u64, 4, 8] {
            for (inside, first_fault) in [(0, 2), (1, 2), (2, 2), (3, 4), (4, 4)] {
                let mut mem = linux_gdt();
                let rsp = 0x10000 - inside * size;
                let frame = [0x1000u64, 0x33, 0x202, 0x9000, 0x2b];
                for (i, v) in frame.iter().enumerate().take(inside as usize) {
                    mem.write(rsp + i as u64 * size, &v.to_le_bytes()[..size as usize])
                        .unwrap();
                }
                let mut s = user_state();
                s.gpr[gpr::RSP] = rsp;
                let e = guest_fault(iret(&mut s, &mut mem, size as usize));
                assert_eq!(
                    e.address,
                    Some(rsp + first_fault * size),
                    "size {size}, {inside} slots readable"
                );
            }
        }
    }

    #[test]
    fn a_far_return_from_an_unreadable_stack_faults_at_the_selector_slot() {
        for size in [2, 4, 8] {
            let mut s = GuestState::default();
            s.gpr[gpr::RSP] = 0x7000;
            match far_return(&mut s, &mut Nothing, size, 0) {
                Err(Failure::Guest(e)) => assert_eq!(e, GuestException::page_fault(0x7000 + size as u64, 5)),
                other => panic!("size {size}: {other:?}"),
            }
        }
    }

    /// Memory holding one iretq frame at 0x7000 (RIP, CS, RFLAGS, RSP, SS) and a flat GDT at
    /// 0x1000 (0x10 kernel code, 0x18 kernel data, 0x2b user data, 0x33 user code).
    struct Frame(std::collections::HashMap<u64, u8>);

    impl Frame {
        fn new(words: [u64; 5]) -> Self {
            let mut m = std::collections::HashMap::new();
            let mut put = |at: u64, v: u64| {
                for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                    m.insert(at + i as u64, b);
                }
            };
            for (i, w) in words.into_iter().enumerate() {
                put(0x7000 + 8 * i as u64, w);
            }
            put(0x1010, 0x00af_9b00_0000_ffff);
            put(0x1018, 0x00cf_9300_0000_ffff);
            put(0x1028, 0x00cf_f300_0000_ffff);
            put(0x1030, 0x00af_fb00_0000_ffff);
            Frame(m)
        }
    }

    impl GuestMemory for Frame {
        fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *self.0.get(&(va + i as u64)).ok_or(GuestException::page_fault(va, 0))?;
            }
            Ok(())
        }
        fn write(&mut self, va: u64, _: &[u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 2))
        }
    }

    #[test]
    fn iretq_at_cpl0_loads_vif_and_vip_and_popf_flags_do_not_include_them() {
        for (cs, ss) in [(0x10, 0x18), (0x33, 0x2b)] {
            let mut s = GuestState {
                cpl: Cpl::Kernel,
                ..GuestState::default()
            };
            s.sys.gdtr = crate::state::DescriptorTable {
                base: 0x1000,
                limit: 0x3f,
            };
            s.gpr[gpr::RSP] = 0x7000;
            let image = flags::FIXED | VIF | VIP | flags::CF;
            iret(&mut s, &mut Frame::new([0x40_0000, cs, image, 0x8000, ss]), 8).unwrap();
            assert_eq!(s.rflags, image, "to CS {cs:#x}");
        }
        assert_eq!(
            writable_flags(Cpl::Kernel, 0) & (VIF | VIP),
            0,
            "popf keeps VIF and VIP"
        );
    }
}

//! How an exception or interrupt reaches the guest's IDT in 64-bit mode (SDM vol. 3 §6.14,
//! the same steps as QEMU's `do_interrupt64`):
//!
//! 1. the 16-byte gate at IDTR.base + 16·vector (#GP(vector·8+2) past the limit), an interrupt
//!    or trap gate (#GP otherwise), present (#NP); a software `int n` also needs DPL ≥ CPL;
//! 2. its code segment from the GDT: 64-bit, present, DPL ≤ CPL; the new CPL is its DPL;
//! 3. the stack: IST n if the gate names one, else RSPn from the TSS when the privilege changes,
//!    else the current RSP; aligned down to 16;
//! 4. pushed: SS, RSP, RFLAGS, CS, RIP and the error code, if the vector has one; the RFLAGS
//!    image has RF set for a fault-class exception and clear for `int n` (§17.3.1.1);
//! 5. TF, NT, RF and VM cleared, and IF for an interrupt gate.
//!
//! CR2 gets the address of a #PF when the #PF is raised, before its delivery starts: a fault
//! while delivering it leaves CR2 at that address (and the #DF handler sees it).
//!
//! A fault while delivering combines with the one being delivered as the CPU's table says:
//! two contributory faults, or a page fault and then a page or contributory fault, become #DF;
//! a fault while delivering #DF is a triple fault, which ends the run like the KVM engine's
//! shutdown.

use super::descriptors::{self, Failure};
use crate::emulate::GuestMemory;
use crate::exit::{vector, GuestException};
use crate::state::{flags, Cpl, GuestState};

/// What is being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A CPU exception (RIP already where the CPU reports it: the instruction for faults,
    /// after it for traps).
    Exception(GuestException),
    /// `int n`, `int3`: RIP is after the instruction; the gate's DPL is checked. `at` is the
    /// instruction's own address, where a fault while delivering it is reported (the
    /// instruction did not complete).
    Software { vector: u8, at: u64 },
    /// An external interrupt from the interrupt controller.
    External(u8),
}

impl Event {
    fn vector(self) -> u8 {
        match self {
            Event::Exception(e) => e.vector,
            Event::Software { vector, .. } => vector,
            Event::External(v) => v,
        }
    }

    /// EXT (bit 0 of selector error codes): the event came from outside the program.
    fn ext(self) -> u32 {
        matches!(self, Event::External(_) | Event::Exception(_)) as u32
    }
}

/// The end of a delivery that did not reach a handler.
#[derive(Debug)]
pub enum Undeliverable {
    /// A fault while delivering a double fault.
    TripleFault(GuestException),
    /// Something the translator does not model (a 32-bit handler segment).
    Unsupported(String),
}

/// Contributory exceptions (#DE, #TS, #NP, #SS, #GP).
fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

/// Delivers `event`, combining faults met on the way into #DF or a triple fault.
pub fn deliver(s: &mut GuestState, mem: &mut dyn GuestMemory, event: Event) -> Result<(), Undeliverable> {
    let first = match deliver_once(s, mem, event) {
        Ok(()) => return Ok(()),
        Err(Failure::Unsupported(why)) => return Err(Undeliverable::Unsupported(why)),
        Err(Failure::Guest(e)) => e,
    };
    if let Event::Software { at, .. } = event {
        s.rip = at;
    }
    let delivering = event.vector();
    let double = (contributory(delivering) && contributory(first.vector))
        || (delivering == vector::PF && (first.vector == vector::PF || contributory(first.vector)));
    if let Event::Exception(e) = event {
        if e.vector == DF {
            return Err(Undeliverable::TripleFault(first));
        }
    }
    let next = if double {
        GuestException {
            vector: DF,
            error_code: Some(0),
            address: None,
        }
    } else {
        first
    };
    match deliver_once(s, mem, Event::Exception(next)) {
        Ok(()) => Ok(()),
        Err(Failure::Unsupported(why)) => Err(Undeliverable::Unsupported(why)),
        // A fault delivering the fault that delivery itself raised.
        Err(Failure::Guest(e)) if next.vector == DF => Err(Undeliverable::TripleFault(e)),
        Err(Failure::Guest(e)) => match deliver_once(
            s,
            mem,
            Event::Exception(GuestException {
                vector: DF,
                error_code: Some(0),
                address: None,
            }),
        ) {
            Ok(()) => Ok(()),
            Err(Failure::Unsupported(why)) => Err(Undeliverable::Unsupported(why)),
            Err(Failure::Guest(_)) => Err(Undeliverable::TripleFault(e)),
        },
    }
}

const DF: u8 = 8;

/// Fault-class exceptions (SDM vol. 3 §6.5): the RFLAGS image pushed for them has RF set, so
/// that the handler's `iret` does not hit an instruction breakpoint again (§17.3.1.1). #DB is
/// a fault for an instruction breakpoint, whose handler sets RF itself (Linux does), so its
/// image keeps RF as it was.
fn fault_class(v: u8) -> bool {
    matches!(v, 0 | 5 | 6 | 7 | 10 | 11 | 12 | 13 | 14 | 16 | 17 | 19 | 20 | 21)
}

/// The RFLAGS image delivering `event` pushes (§17.3.1.1): RF set for faults, clear for
/// software interrupts (it is cleared as `int n` starts), as it is for the rest.
fn pushed_flags(s: &GuestState, event: Event) -> u64 {
    let rflags = s.rflags | flags::FIXED;
    match event {
        Event::Exception(e) if fault_class(e.vector) => rflags | flags::RF,
        Event::Software { .. } => rflags & !flags::RF,
        _ => rflags,
    }
}

/// Exceptions whose delivery pushes an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

fn deliver_once(s: &mut GuestState, mem: &mut dyn GuestMemory, event: Event) -> Result<(), Failure> {
    let v = event.vector();
    if let Event::Exception(e) = event {
        if e.vector == vector::PF {
            s.cr2 = e.address.unwrap_or(0);
        }
    }
    let ext = event.ext();
    let idt_fault = |vec: u8| GuestException {
        vector: vec,
        error_code: Some(((v as u32) << 3) | 2 | ext),
        address: None,
    };
    if (v as u64) * 16 + 15 > s.sys.idtr.limit as u64 {
        return Err(idt_fault(vector::GP).into());
    }
    let mut g = [0u8; 16];
    mem.read_system(s.sys.idtr.base.wrapping_add(v as u64 * 16), &mut g)?;
    let gate_type = g[5] & 0x1f;
    let gate_dpl = ((g[5] >> 5) & 3) as u16;
    let cpl = s.cpl as u16;
    if gate_type != 0x0e && gate_type != 0x0f {
        return Err(idt_fault(vector::GP).into());
    }
    if matches!(event, Event::Software { .. }) && gate_dpl < cpl {
        return Err(idt_fault(vector::GP).into());
    }
    if g[5] & 0x80 == 0 {
        return Err(idt_fault(11).into());
    }
    let selector = u16::from_le_bytes([g[2], g[3]]);
    let ist = g[4] & 7;
    let offset = u16::from_le_bytes([g[0], g[1]]) as u64
        | (u16::from_le_bytes([g[6], g[7]]) as u64) << 16
        | (u32::from_le_bytes([g[8], g[9], g[10], g[11]]) as u64) << 32;
    if selector & !3 == 0 {
        return Err(GuestException::gp(ext).into());
    }
    let code = descriptors::read(s, mem, selector)?;
    if !code.code() || (!code.conforming() && code.dpl() > cpl) {
        return Err(descriptors::selector_fault(vector::GP, selector).into());
    }
    if !code.present() {
        return Err(descriptors::selector_fault(11, selector).into());
    }
    if !code.long() {
        return Err(Failure::Unsupported(format!(
            "IDT vector {v} enters code segment {selector:#x}, which is not 64-bit"
        )));
    }
    let new_cpl = if code.conforming() { cpl } else { code.dpl() };
    let target = if new_cpl == 0 { Cpl::Kernel } else { Cpl::User };
    if new_cpl != 0 && new_cpl != 3 {
        return Err(Failure::Unsupported(format!("IDT vector {v} enters ring {new_cpl}")));
    }
    let changes = new_cpl < cpl;
    let old_rsp = s.gpr[4];
    let rsp = if ist != 0 || changes {
        descriptors::tss_stack(s, mem, target, ist)?
    } else {
        old_rsp
    } & !0xf;
    if !crate::mmu::is_canonical(rsp) {
        return Err(GuestException {
            vector: 12,
            error_code: Some(ext),
            address: None,
        }
        .into());
    }
    let mut frame: Vec<u64> = vec![s.seg[2] as u64, old_rsp, pushed_flags(s, event), s.seg[1] as u64, s.rip];
    if let Event::Exception(e) = event {
        if has_error_code(e.vector) {
            frame.push(e.error_code.unwrap_or(0) as u64);
        }
    }
    // The pushes are supervisor writes to the new stack; all of them or none.
    let bytes: Vec<u8> = frame.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
    let new_rsp = rsp.wrapping_sub(bytes.len() as u64);
    mem.write_system(new_rsp, &bytes)?;
    s.gpr[4] = new_rsp;
    s.rip = offset;
    s.seg[1] = (selector & !3) | new_cpl;
    // The gate's code segment is 64-bit (checked above): an event in 32-bit code leaves it.
    s.code32 = false;
    if changes {
        s.seg[2] = new_cpl; // a null SS with RPL = the new CPL
    }
    s.cpl = target;
    s.rflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
    if gate_type == 0x0e {
        s.rflags &= !flags::IF;
    }
    s.sys.interrupt_shadow = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DescriptorTable, Segment};
    use crate::system::test_memory::FlatMemory;

    /// 64 KiB of flat memory at virtual 0 (anything above is not mapped: #PF). A GDT at
    /// 0x1000 (0x08 kernel code, 0x10 kernel data, 0x1b user data, 0x23 user code), an IDT at
    /// 0x2000 whose gates all enter 0x08:0x5000+16·vector through an interrupt gate of DPL 0,
    /// and a TSS at 0x3000 with RSP0 = 0x8000 and IST1 = 0x9000.
    fn machine() -> FlatMemory {
        let mut m = FlatMemory::new(0x10000, false);
        let gdt = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
        ];
        for (i, d) in gdt.iter().enumerate() {
            m.put_u64(0x1000 + 8 * i as u64, *d);
        }
        for v in 0..=32u64 {
            gate(&mut m, v as u8, 0, 0);
        }
        m.put_u64(0x3000 + 4, 0x8000);
        m.put_u64(0x3000 + 0x24, 0x9000);
        m
    }

    const UNMAPPED: u64 = 0x10_0000;

    /// Points IDT entry `vector` at 0x08:0x5000+16·vector, an interrupt gate of `dpl` on `ist`.
    fn gate(m: &mut FlatMemory, vector: u8, dpl: u64, ist: u64) {
        let handler = 0x5000 + 16 * vector as u64;
        let low = (handler & 0xffff) | (0x08 << 16) | (ist << 32) | ((0x8e | dpl << 5) << 40) | (handler >> 16) << 48;
        m.put_u64(0x2000 + 16 * vector as u64, low);
    }

    /// At CPL3 in user code, RSP 0x7000, IF and RF set.
    fn user_state() -> GuestState {
        let mut s = GuestState {
            rip: 0x4000,
            rflags: flags::FIXED | flags::IF | flags::RF,
            cpl: Cpl::User,
            seg: [0x1b, 0x23, 0x1b, 0x1b, 0x1b, 0x1b],
            ..GuestState::default()
        };
        s.gpr[4] = 0x7000;
        s.sys.gdtr = DescriptorTable {
            base: 0x1000,
            limit: 0x27,
        };
        s.sys.idtr = DescriptorTable {
            base: 0x2000,
            limit: 0x20f,
        };
        s.sys.tr = Segment {
            selector: 0x28,
            base: 0x3000,
            limit: 0x67,
            attr: 0x8b,
        };
        s
    }

    /// The frame delivery pushed: RIP, CS, RFLAGS, RSP, SS (after the error code, if any).
    fn frame(s: &GuestState, m: &mut FlatMemory, error_code: bool) -> [u64; 5] {
        let at = s.gpr[4] + if error_code { 8 } else { 0 };
        std::array::from_fn(|i| m.get_u64(at + 8 * i as u64))
    }

    #[test]
    fn faults_push_rf_set_and_software_interrupts_rf_clear() {
        let mut m = machine();
        gate(&mut m, 3, 3, 0);
        let mut s = user_state();
        s.rflags &= !flags::RF;
        deliver(&mut s, &mut m, Event::Exception(GuestException::gp(0))).unwrap();
        assert_eq!(frame(&s, &mut m, true)[2] & flags::RF, flags::RF, "#GP is a fault");
        let mut s = user_state();
        deliver(&mut s, &mut m, Event::Software { vector: 3, at: 0x3fff }).unwrap();
        assert_eq!(frame(&s, &mut m, false)[2] & flags::RF, 0, "int3 clears RF");
        assert_eq!(frame(&s, &mut m, false)[0], 0x4000, "int3 pushes the next RIP");
        let mut s = user_state();
        deliver(&mut s, &mut m, Event::External(32)).unwrap();
        assert_eq!(
            frame(&s, &mut m, false)[2] & flags::RF,
            flags::RF,
            "an interrupt pushes RF as it is"
        );
        assert_eq!(
            s.rflags & (flags::RF | flags::IF),
            0,
            "the handler runs with RF and IF clear"
        );
    }

    #[test]
    fn a_fault_delivering_int3_is_reported_at_the_int3() {
        let mut m = machine(); // the int3 gate has DPL 0: #GP(3·8+2) from CPL3
        let mut s = user_state();
        deliver(&mut s, &mut m, Event::Software { vector: 3, at: 0x3fff }).unwrap();
        assert_eq!(s.rip, 0x5000 + 16 * 13, "the #GP handler runs");
        assert_eq!(m.get_u64(s.gpr[4]), 3 * 8 + 2, "error code: IDT vector 3");
        assert_eq!(
            frame(&s, &mut m, true)[0],
            0x3fff,
            "RIP of the int3, which did not complete"
        );
    }

    #[test]
    fn a_page_fault_delivering_a_page_fault_is_a_double_fault_and_cr2_has_the_first_address() {
        let mut m = machine();
        m.put_u64(0x3000 + 0x2c, UNMAPPED + 0x1000); // IST2: no memory below it
        gate(&mut m, 14, 0, 2);
        gate(&mut m, 8, 0, 1);
        let mut s = user_state();
        s.cr2 = 0x1234;
        deliver(
            &mut s,
            &mut m,
            Event::Exception(GuestException::page_fault(0xdead_0000, 4)),
        )
        .unwrap();
        assert_eq!(s.rip, 0x5000 + 16 * 8, "the #DF handler runs");
        assert_eq!(s.gpr[4], 0x9000 - 6 * 8, "on IST1, with an error code");
        assert_eq!(m.get_u64(s.gpr[4]), 0, "#DF's error code is 0");
        assert_eq!(
            frame(&s, &mut m, true),
            [0x4000, 0x23, flags::FIXED | flags::IF | flags::RF, 0x7000, 0x1b]
        );
        assert_eq!(s.cr2, 0xdead_0000, "CR2 was loaded when the #PF was raised");
    }
}

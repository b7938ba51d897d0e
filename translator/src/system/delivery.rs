//! How an exception or interrupt reaches the guest's IDT in 64-bit mode (SDM vol. 3 §6.14,
//! the same steps as QEMU's `do_interrupt64`):
//!
//! 1. the 16-byte gate at IDTR.base + 16·vector (#GP(vector·8+2) past the limit), an interrupt
//!    or trap gate (#GP otherwise), present (#NP); a software `int n` also needs DPL ≥ CPL;
//! 2. its code segment from the GDT: 64-bit, present, DPL ≤ CPL; the new CPL is its DPL;
//! 3. the stack: IST n if the gate names one, else RSPn from the TSS when the privilege changes,
//!    else the current RSP; aligned down to 16;
//! 4. pushed: SS, RSP, RFLAGS (with RF set for a fault), CS, RIP and the error code, if the
//!    vector has one;
//! 5. TF, NT, RF and VM cleared, and IF for an interrupt gate; CR2 set for #PF.
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
    /// `int n`, `int3`, `into`: RIP is after the instruction; the gate's DPL is checked.
    Software(u8),
    /// An external interrupt from the interrupt controller.
    External(u8),
}

impl Event {
    fn vector(self) -> u8 {
        match self {
            Event::Exception(e) => e.vector,
            Event::Software(v) | Event::External(v) => v,
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

/// Fault-class exceptions: the CPU reports them at the faulting instruction and sets RF in the
/// RFLAGS image it pushes, so that an `iretq` back to the instruction does not take an
/// instruction breakpoint on it again (SDM vol. 3 §18.3.1.1). Traps (#BP, #OF, #DB from
/// `int1`), software interrupts and external interrupts push RFLAGS as it is.
fn fault_class(v: u8) -> bool {
    matches!(v, 0 | 5 | 6 | 7 | 10..=14 | 16 | 17 | 19 | 20 | 21)
}

/// Exceptions whose delivery pushes an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

fn deliver_once(s: &mut GuestState, mem: &mut dyn GuestMemory, event: Event) -> Result<(), Failure> {
    let v = event.vector();
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
    if matches!(event, Event::Software(_)) && gate_dpl < cpl {
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
    let rf = match event {
        Event::Exception(e) if fault_class(e.vector) => flags::RF,
        _ => 0,
    };
    let mut frame: Vec<u64> = vec![
        s.seg[2] as u64,
        old_rsp,
        s.rflags | flags::FIXED | rf,
        s.seg[1] as u64,
        s.rip,
    ];
    if let Event::Exception(e) = event {
        if has_error_code(e.vector) {
            frame.push(e.error_code.unwrap_or(0) as u64);
        }
    }
    // The pushes are supervisor writes to the new stack; all of them or none.
    let bytes: Vec<u8> = frame.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
    let new_rsp = rsp.wrapping_sub(bytes.len() as u64);
    mem.write_system(new_rsp, &bytes)?;
    if let Event::Exception(e) = event {
        if e.vector == vector::PF {
            s.cr2 = e.address.unwrap_or(0);
        }
    }
    s.gpr[4] = new_rsp;
    s.rip = offset;
    s.seg[1] = (selector & !3) | new_cpl;
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
    use crate::state::DescriptorTable;

    /// Flat memory: linear address = index; reads past the end fault.
    struct Flat(Vec<u8>);

    impl GuestMemory for Flat {
        fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
            let at = va as usize;
            let src = self
                .0
                .get(at..at + buf.len())
                .ok_or(GuestException::page_fault(va, 0))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
            let at = va as usize;
            let dst = self
                .0
                .get_mut(at..at + data.len())
                .ok_or(GuestException::page_fault(va, 2))?;
            dst.copy_from_slice(data);
            Ok(())
        }
    }

    /// A CPL0 machine: GDT at 0 (kernel code 0x10), IDT at 0x100 with gates for #BP and #GP to
    /// 0x1234, stack top 0x800.
    fn machine() -> (GuestState, Flat) {
        let mut m = Flat(vec![0; 0x1000]);
        m.0[0x10..0x18].copy_from_slice(&0x00af_9b00_0000_ffffu64.to_le_bytes());
        for v in [3u64, 13] {
            let gate: u64 = 0x1234 | (0x10 << 16) | (0xee << 40);
            let at = 0x100 + 16 * v as usize;
            m.0[at..at + 8].copy_from_slice(&gate.to_le_bytes());
        }
        let mut s = GuestState {
            cpl: Cpl::Kernel,
            rip: 0x500,
            rflags: flags::FIXED | flags::IF,
            ..GuestState::default()
        };
        s.seg[1] = 0x10;
        s.gpr[4] = 0x800;
        s.sys.gdtr = DescriptorTable { base: 0, limit: 0x1f };
        s.sys.idtr = DescriptorTable {
            base: 0x100,
            limit: 0xfff,
        };
        (s, m)
    }

    fn pushed_rflags(m: &Flat, s: &GuestState, error_code: bool) -> u64 {
        let at = s.gpr[4] as usize + 16 + 8 * error_code as usize;
        u64::from_le_bytes(m.0[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn a_fault_pushes_rflags_with_rf_set_and_a_trap_does_not() {
        let (mut s, mut m) = machine();
        deliver(&mut s, &mut m, Event::Exception(GuestException::gp(0))).unwrap();
        assert_eq!(s.rip, 0x1234);
        assert_eq!(pushed_rflags(&m, &s, true), flags::FIXED | flags::IF | flags::RF);
        assert_eq!(s.rflags & flags::RF, 0, "the handler runs with RF clear");
        let (mut s, mut m) = machine();
        deliver(&mut s, &mut m, Event::Software(3)).unwrap();
        assert_eq!(pushed_rflags(&m, &s, false), flags::FIXED | flags::IF);
    }
}

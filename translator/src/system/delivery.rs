//! How an exception or interrupt reaches the guest's IDT in 64-bit mode (SDM vol. 3 §6.14,
//! the same steps as QEMU's `do_interrupt64`):
//!
//! 1. the 16-byte gate at IDTR.base + 16·vector (#GP(vector·8+2) past the limit), an interrupt
//!    or trap gate (#GP otherwise), present (#NP); a software `int n` also needs DPL ≥ CPL;
//! 2. its code segment from the GDT: 64-bit, present, DPL ≤ CPL; the new CPL is its DPL;
//! 3. the stack: IST n if the gate names one, else RSPn from the TSS when the privilege changes,
//!    else the current RSP; aligned down to 16;
//! 4. pushed: SS, RSP, RFLAGS, CS, RIP and the error code, if the vector has one;
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
    let mut frame: Vec<u64> = vec![
        s.seg[2] as u64,
        old_rsp,
        s.rflags | flags::FIXED,
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

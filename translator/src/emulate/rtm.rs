//! Restricted Transactional Memory (`xbegin`, `xend`, `xabort`, `xtest`) as a CPU whose every
//! transaction aborts at once: the architecture lets a transaction abort at any time for any
//! reason (SDM Vol. 1 §16.3.5), so software must always have its non-transactional fallback,
//! and glibc's lock elision and every other RTM user take it. Translated code never runs inside
//! a host transaction (an abort would roll back the engine's own state too).
//!
//! - `xbegin rel`: the transaction aborts before its first instruction: EAX gets the abort
//!   status 0 (no retry hint, no explicit abort) and execution continues at the fallback.
//! - `xend` outside a transaction: #GP(0). `xabort imm8` outside one: no operation.
//! - `xtest`: not transactional: ZF = 1, CF/OF/SF/PF/AF = 0.
//!
//! Where the guest's CPU model lacks RTM (CPUID.(7,0):EBX bit 11; `xtest` also accepts HLE,
//! bit 4) they raise #UD, as such a CPU does.

use super::{raise, Outcome};
use crate::exit::{vector, GuestException};
use crate::platform::Platform;
use crate::state::{flags, gpr, GuestState};
use iced_x86::{Instruction, Mnemonic};

const CPUID7_EBX_HLE: u32 = 1 << 4;
const CPUID7_EBX_RTM: u32 = 1 << 11;

/// Performs the RTM instruction `instr` at `state.rip` on a CPU whose CPUID is `platform`'s.
pub fn execute(state: &mut GuestState, instr: &Instruction, platform: &mut dyn Platform) -> Outcome {
    let here = instr.ip();
    let ebx = platform.cpuid(7, 0)[1];
    let present = if instr.mnemonic() == Mnemonic::Xtest {
        ebx & (CPUID7_EBX_HLE | CPUID7_EBX_RTM) != 0
    } else {
        ebx & CPUID7_EBX_RTM != 0
    };
    if !present {
        return raise(state, here, GuestException::new(vector::UD));
    }
    match instr.mnemonic() {
        Mnemonic::Xbegin => {
            // The abort status replaces EAX; RAX's upper half is cleared like any 32-bit write.
            state.gpr[gpr::RAX] = 0;
            state.rip = instr.near_branch_target();
            return Outcome::Continue;
        }
        Mnemonic::Xend => return raise(state, here, GuestException::gp(0)),
        Mnemonic::Xtest => state.rflags = (state.rflags & !flags::STATUS) | flags::ZF,
        _ => {} // xabort outside a transaction
    }
    state.rip = instr.next_ip();
    Outcome::Continue
}

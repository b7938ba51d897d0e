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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Exit;
    use iced_x86::Code;

    /// A CPU model with or without RTM.
    struct Model(bool);

    impl Platform for Model {
        fn cpuid(&mut self, leaf: u32, _: u32) -> [u32; 4] {
            let ebx = if leaf == 7 && self.0 { CPUID7_EBX_RTM } else { 0 };
            [0, ebx, 0, 0]
        }
        fn rdtsc(&mut self) -> u64 {
            0
        }
        fn tsc_aux(&mut self) -> u32 {
            0
        }
    }

    fn at(code: Code, rip: u64) -> Instruction {
        let mut i = Instruction::default();
        i.set_code(code);
        if matches!(code, Code::Xbegin_rel32) {
            i.set_op0_kind(iced_x86::OpKind::NearBranch64);
            i.set_near_branch64(rip + 0x40);
        }
        i.set_ip(rip);
        i.set_len(if code == Code::Xbegin_rel32 { 6 } else { 3 });
        i.set_next_ip(rip + i.len() as u64);
        i
    }

    #[test]
    fn transactions_abort_at_once_and_a_model_without_rtm_raises_ud() {
        let mut s = GuestState::default();
        s.gpr[gpr::RAX] = u64::MAX;
        s.rip = 0x1000;
        let begin = at(Code::Xbegin_rel32, 0x1000);
        assert!(matches!(execute(&mut s, &begin, &mut Model(true)), Outcome::Continue));
        assert_eq!((s.rip, s.gpr[gpr::RAX]), (0x1040, 0), "fallback with abort status 0");
        s.rflags |= flags::CF;
        assert!(matches!(
            execute(&mut s, &at(Code::Xtest, 0x1040), &mut Model(true)),
            Outcome::Continue
        ));
        assert_eq!(s.rflags & flags::STATUS, flags::ZF, "not in a transaction");
        let end = execute(&mut s, &at(Code::Xend, 0x1043), &mut Model(true));
        assert!(matches!(end, Outcome::Exit(Exit::Exception(e)) if e == GuestException::gp(0)));
        for code in [Code::Xbegin_rel32, Code::Xend, Code::Xabort_imm8, Code::Xtest] {
            let mut s = GuestState::default();
            let out = execute(&mut s, &at(code, 0x2000), &mut Model(false));
            assert!(
                matches!(out, Outcome::Exit(Exit::Exception(e)) if e.vector == vector::UD),
                "{code:?} on a model without RTM"
            );
            assert_eq!(s.rip, 0x2000);
        }
    }
}

//! The rules of 32-bit code (IA-32e compatibility mode: a 64-bit kernel's 32-bit programs).
//!
//! 32-bit code is decoded as IA-32 and emitted as 64-bit host code, like 64-bit guest code: the
//! forms both modes share keep their rule ([`super::rule`]), and what differs is the emitter's
//! business (`Mode::compat`: 32-bit addresses, 4-byte stack slots on ESP, instructions
//! re-encoded rather than copied as bytes, `emit/`). Here are only the forms 32-bit code alone
//! has: [`lower_compat`] rewrites those with a 64-bit twin of the same effect (`inc r32`, whose
//! opcodes are REX prefixes in 64-bit mode; 32-bit `jcc`/`jmp`/`loop`/`jecxz`) into it, and
//! [`rule_compat`] gives the 32-bit stack and branch forms the rules of their 64-bit ones.

use super::{rule, BranchKind, EmulateOp, Rule, StackOp};
use iced_x86::{Code, Instruction, OpCodeOperandKind as K};
use std::sync::OnceLock;

/// The rule for `code` decoded as 32-bit code (compatibility mode, CPL3 of a whole machine),
/// after [`lower_compat`]: the forms 32-bit and 64-bit code share keep their rule (the emitter
/// narrows addresses, the stack and near branches to 32 bits, `Mode::compat`); the 32-bit
/// stack and branch forms get the 64-bit forms' rules; `sysenter` and far jumps and calls to a
/// ptr16:32, `pusha`/`popa`, `push`/`pop` of a segment register and the 32-bit `enter` are
/// performed by the engine. The rest of the IA-32-only forms (BCD arithmetic, `bound`,
/// `lds`/`les`, `into`, ptr16:16) have none yet: the translator refuses them by name.
pub fn rule_compat(code: Code) -> Option<Rule> {
    static TABLE: OnceLock<Vec<Option<Rule>>> = OnceLock::new();
    TABLE.get_or_init(|| Code::values().map(classify_compat).collect())[code as usize]
}

fn classify_compat(code: Code) -> Option<Rule> {
    let op = code.op_code();
    if let Some(to) = lowered(code) {
        return rule(to);
    }
    if !op.mode32() {
        // The 64-bit near branches `lower_compat` rewrites 32-bit ones into.
        let near = op.op_kinds().iter().any(|k| matches!(k, K::br64_1 | K::br64_4));
        return if near { rule(code) } else { None };
    }
    let rule = match code {
        Code::Push_r32 | Code::Push_rm32 | Code::Pushd_imm8 | Code::Pushd_imm32 => Rule::Stack(StackOp::Push),
        Code::Pop_r32 | Code::Pop_rm32 => Rule::Stack(StackOp::Pop),
        Code::Pushfd => Rule::Stack(StackOp::Pushf),
        Code::Popfd => Rule::Stack(StackOp::Popf),
        Code::Leaved => Rule::Stack(StackOp::Leave),
        Code::Call_rel32_32 => Rule::Branch(BranchKind::Call),
        Code::Call_rm32 => Rule::Branch(BranchKind::CallIndirect),
        Code::Jmp_rm32 => Rule::Branch(BranchKind::JmpIndirect),
        Code::Retnd | Code::Retnd_imm16 => Rule::Branch(BranchKind::Ret),
        Code::Sysenter => Rule::Emulate(EmulateOp::Sysenter),
        // Far jumps and calls to an immediate selector:offset (a program switching between
        // 32-bit and 64-bit code by itself).
        Code::Jmp_ptr1632 | Code::Call_ptr1632 => Rule::Emulate(EmulateOp::Segment),
        Code::Pushad | Code::Pushaw | Code::Popad | Code::Popaw => Rule::Emulate(EmulateOp::PushPopAll),
        // Segment registers IA-32 code may push and pop (loads checked like `mov sreg`).
        Code::Pushd_ES
        | Code::Pushd_CS
        | Code::Pushd_SS
        | Code::Pushd_DS
        | Code::Pushd_FS
        | Code::Pushd_GS
        | Code::Popd_ES
        | Code::Popd_SS
        | Code::Popd_DS
        | Code::Popd_FS
        | Code::Popd_GS
        | Code::Pushw_ES
        | Code::Pushw_CS
        | Code::Pushw_SS
        | Code::Pushw_DS
        | Code::Popw_ES
        | Code::Popw_SS
        | Code::Popw_DS => Rule::Emulate(EmulateOp::Segment),
        Code::Enterd_imm16_imm8 => Rule::Implicit(super::ImplicitOp::Enter),
        // Near branches and `inc`/`dec` r32 are lowered to their 64-bit forms.
        _ if op.mode64() => return rule(code),
        _ => return None,
    };
    Some(rule)
}

/// Rewrites a 32-bit instruction whose form does not exist in 64-bit mode into the 64-bit form
/// with the same effect, so the block builder and emitter see one form: `inc`/`dec` r16/r32
/// (0x40-0x4f are REX prefixes in 64-bit mode) become their ModRM forms, relative jumps, `jcc`,
/// `jecxz` and `loop*` their 64-bit forms (same target; `jecxz` and `loop*` count in ECX either
/// way). Other instructions are left as they are.
pub fn lower_compat(instr: &mut Instruction) {
    let Some(to) = lowered(instr.code()) else { return };
    let target = instr.near_branch64();
    instr.set_code(to);
    if matches!(instr.op0_kind(), iced_x86::OpKind::NearBranch32) {
        instr.set_op0_kind(iced_x86::OpKind::NearBranch64);
        instr.set_near_branch64(target);
    }
}

/// The next instruction from `decoder` in the form the rules know: lowered ([`lower_compat`])
/// when the decoder decodes 32-bit code.
pub fn decode(decoder: &mut iced_x86::Decoder) -> Instruction {
    let mut instr = decoder.decode();
    if decoder.bitness() == 32 {
        lower_compat(&mut instr);
    }
    instr
}

/// The 64-bit form [`lower_compat`] rewrites a 32-bit-only `code` into, if it does.
pub fn lowered(code: Code) -> Option<Code> {
    Some(match code {
        Code::Inc_r32 => Code::Inc_rm32,
        Code::Dec_r32 => Code::Dec_rm32,
        Code::Inc_r16 => Code::Inc_rm16,
        Code::Dec_r16 => Code::Dec_rm16,
        Code::Jmp_rel8_32 => Code::Jmp_rel8_64,
        Code::Jmp_rel32_32 => Code::Jmp_rel32_64,
        Code::Jecxz_rel8_32 => Code::Jecxz_rel8_64,
        Code::Loop_rel8_32_ECX => Code::Loop_rel8_64_ECX,
        Code::Loope_rel8_32_ECX => Code::Loope_rel8_64_ECX,
        Code::Loopne_rel8_32_ECX => Code::Loopne_rel8_64_ECX,
        c if c.is_jcc_short_or_near() && !c.op_code().mode64() => jcc64(c)?,
        _ => return None,
    })
}

/// The 64-bit form of a 32-bit `jcc` (same condition, same displacement size).
fn jcc64(code: Code) -> Option<Code> {
    static TABLE: OnceLock<std::collections::HashMap<Code, Code>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let short =
            |c: Code| c.op_code().op_kinds().contains(&K::br32_1) || c.op_code().op_kinds().contains(&K::br64_1);
        let jcc = |c: &Code| c.is_jcc_short_or_near();
        let wide: Vec<Code> = Code::values()
            .filter(|c| jcc(c) && c.op_code().mode64() && !c.op_code().mode32())
            .collect();
        Code::values()
            .filter(|c| {
                jcc(c)
                    && c.op_code()
                        .op_kinds()
                        .iter()
                        .any(|k| matches!(k, K::br32_1 | K::br32_4))
            })
            .filter_map(|c| {
                let to = wide
                    .iter()
                    .find(|w| w.mnemonic() == c.mnemonic() && short(**w) == short(c))?;
                Some((c, *to))
            })
            .collect()
    });
    table.get(&code).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_two_bit_forms_get_the_rules_of_their_64_bit_twins() {
        // Lowered: same rule as the 64-bit form, and the code it becomes.
        assert_eq!(lowered(Code::Jne_rel8_32), Some(Code::Jne_rel8_64));
        assert_eq!(lowered(Code::Jne_rel32_32), Some(Code::Jne_rel32_64));
        assert_eq!(lowered(Code::Inc_r32), Some(Code::Inc_rm32));
        assert_eq!(rule_compat(Code::Jne_rel8_32), rule(Code::Jne_rel8_64));
        assert_eq!(rule_compat(Code::Dec_r32), Some(Rule::Copy));
        // The 16-bit counter and 16-bit targets are not the 64-bit forms': no rule.
        assert_eq!(lowered(Code::Loop_rel8_32_CX), None);
        assert_eq!(rule_compat(Code::Loop_rel8_32_CX), None);
        assert_eq!(rule_compat(Code::Jne_rel8_16), None);
        // 4-byte stack and branch forms.
        assert_eq!(rule_compat(Code::Push_r32), Some(Rule::Stack(StackOp::Push)));
        assert_eq!(rule_compat(Code::Retnd_imm16), Some(Rule::Branch(BranchKind::Ret)));
        assert_eq!(
            rule_compat(Code::Call_rm32),
            Some(Rule::Branch(BranchKind::CallIndirect))
        );
        // Shared forms keep their rule; IA-32-only ones without a twin have none yet.
        assert_eq!(rule_compat(Code::Add_rm32_r32), rule(Code::Add_rm32_r32));
        assert_eq!(rule_compat(Code::Pushad), Some(Rule::Emulate(EmulateOp::PushPopAll)));
        assert_eq!(rule_compat(Code::Daa), None);
        // `lower_compat` keeps the target of a branch it rewrites.
        let mut jcc = iced_x86::Decoder::with_ip(32, &[0x75, 0x10], 0x8048000, iced_x86::DecoderOptions::NONE).decode();
        lower_compat(&mut jcc);
        assert_eq!((jcc.code(), jcc.near_branch64()), (Code::Jne_rel8_64, 0x8048012));
    }
}

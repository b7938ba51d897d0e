//! A small assembler over iced's encoder: every instruction (re-emitted guest instruction or
//! glue) is encoded at its final address, so RIP-relative operands and branches come out right
//! the first time. Forward jumps inside a block are emitted as rel32 and patched.

use crate::context::off;
use crate::error::TranslateError;
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

pub struct Asm {
    pub buf: Vec<u8>,
    base: u64,
    encoder: Encoder,
}

/// `gs:[offset]`: a context field.
pub fn ctx(offset: usize) -> MemoryOperand {
    MemoryOperand::new(Register::None, Register::None, 1, offset as i64, 4, false, Register::GS)
}

/// `gs:[index*scale + offset]`: an element of a context array.
pub fn ctx_indexed(index: Register, scale: u32, offset: usize) -> MemoryOperand {
    MemoryOperand::new(Register::None, index, scale, offset as i64, 4, false, Register::GS)
}

/// `nop dword [rax+rax*1+0]`: the 5-byte NOP that replaces a `jmp rel32` (same length).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Opcode of `jmp rel32`.
pub const JMP_REL32: u8 = 0xe9;

/// The spill slot of a 64-bit register.
pub fn spill_slot(reg: Register) -> MemoryOperand {
    ctx(off::SPILL + 8 * crate::context::spill_index(reg_num(reg)))
}

/// Hardware number (0..16) of a 64-bit GPR.
pub fn reg_num(reg: Register) -> usize {
    reg.full_register().number() & 15
}

/// 64-bit GPR with hardware number `n`.
pub fn gpr64(n: usize) -> Register {
    const R: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    R[n]
}

impl Asm {
    pub fn new(base: u64) -> Self {
        Asm {
            buf: Vec::with_capacity(512),
            base,
            encoder: Encoder::new(64),
        }
    }

    /// Address of the next byte.
    pub fn here(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    pub fn emit(&mut self, instr: &Instruction) -> Result<(), TranslateError> {
        let at = self.here();
        let result = self.encoder.encode(instr, at);
        // The encoder keeps partial output of a failed encoding; always drain it.
        let bytes = self.encoder.take_buffer();
        result.map_err(|e| TranslateError::Encode {
            rip: instr.ip(),
            text: instr.to_string(),
            reason: e.to_string(),
        })?;
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    /// Emits glue built by iced's constructors (which cannot fail for the fixed forms we use).
    pub fn glue(&mut self, instr: Result<Instruction, iced_x86::IcedError>) {
        let instr = instr.expect("glue instruction is well-formed");
        self.emit(&instr).expect("glue instruction encodes");
    }

    /// Emits an instruction without operands.
    pub fn op0(&mut self, code: Code) {
        self.glue(Ok(Instruction::with(code)));
    }

    pub fn mov_to_ctx(&mut self, offset: usize, reg: Register) {
        self.glue(Instruction::with2(Code::Mov_rm64_r64, ctx(offset), reg));
    }

    pub fn mov_from_ctx(&mut self, reg: Register, offset: usize) {
        self.glue(Instruction::with2(Code::Mov_r64_rm64, reg, ctx(offset)));
    }

    /// Stores a 64-bit constant into a context field without touching any register or flag.
    pub fn store_ctx_u64(&mut self, offset: usize, value: u64) {
        self.glue(Instruction::with2(Code::Mov_rm32_imm32, ctx(offset), value as u32));
        self.glue(Instruction::with2(
            Code::Mov_rm32_imm32,
            ctx(offset + 4),
            (value >> 32) as u32,
        ));
    }

    pub fn store_ctx_u32(&mut self, offset: usize, value: u32) {
        self.glue(Instruction::with2(Code::Mov_rm32_imm32, ctx(offset), value));
    }

    pub fn mov_imm64(&mut self, reg: Register, value: u64) {
        self.glue(Instruction::with2(Code::Mov_r64_imm64, reg, value));
    }

    /// Emits `jmp rel32` (or `jcc rel32`) to `target`, returning the offset of the rel32 field.
    pub fn branch32(&mut self, code: Code, target: u64) -> usize {
        self.glue(Instruction::with_branch(code, target));
        self.buf.len() - 4
    }

    /// Emits a rel32 branch to be patched with [`Asm::bind`]; returns the field offset.
    pub fn branch32_forward(&mut self, code: Code) -> usize {
        let here = self.here();
        self.branch32(code, here + 16)
    }

    /// Points the rel32 field at `field` to `target`.
    pub fn bind(&mut self, field: usize, target: u64) {
        let end = self.base + field as u64 + 4;
        let rel = target.wrapping_sub(end) as i64 as i32;
        self.buf[field..field + 4].copy_from_slice(&rel.to_le_bytes());
    }

    pub fn base(&self) -> u64 {
        self.base
    }
}

/// Low byte registers by hardware number (SPL..DIL and R8L.. need REX).
pub const GPR8: [Register; 16] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::SPL,
    Register::BPL,
    Register::SIL,
    Register::DIL,
    Register::R8L,
    Register::R9L,
    Register::R10L,
    Register::R11L,
    Register::R12L,
    Register::R13L,
    Register::R14L,
    Register::R15L,
];

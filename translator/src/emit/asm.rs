//! A small assembler over iced's encoder: every instruction (re-emitted guest instruction or
//! glue) is encoded at its final address, so RIP-relative operands and branches come out right
//! the first time. Forward jumps inside a block are emitted as rel32 and patched.
//!
//! The glue forms that make up most of a block — context loads and stores (`mov r64,gs:[d]`,
//! `mov gs:[d],r64`, `mov dword gs:[d],imm32`) and rel32 jumps — are encoded here directly
//! ([`encode_glue_fast`]): iced's general encoder was the largest single cost of translating
//! (≈8% of a Linux boot under `--accel bt`, Intel Sapphire Rapids host). A unit test checks
//! every fast form against iced byte for byte.

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
    MemoryOperand::new(Register::None, Register::None, 1, offset as i64, 8, false, Register::GS)
}

/// `gs:[index*scale + offset]`: an element of a context array.
pub fn ctx_indexed(index: Register, scale: u32, offset: usize) -> MemoryOperand {
    MemoryOperand::new(Register::None, index, scale, offset as i64, 8, false, Register::GS)
}

/// `nop dword [rax+rax*1+0]`: the 5-byte NOP that replaces a `jmp rel32` (same length).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Opcode of `jmp rel32`.
pub const JMP_REL32: u8 = 0xe9;

/// The spill slot of a 64-bit register.
pub fn spill_slot(reg: Register) -> MemoryOperand {
    ctx(spill_offset(reg))
}

/// The context offset of a 64-bit register's spill slot.
pub fn spill_offset(reg: Register) -> usize {
    off::SPILL + 8 * crate::context::spill_index(reg_num(reg))
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
        Asm::reusing(base, Vec::new(), None)
    }

    /// An assembler at `base` writing into `buf` (emptied first) with `encoder`, kept from an
    /// earlier block ([`super::EmitScratch`]).
    pub fn reusing(base: u64, mut buf: Vec<u8>, encoder: Option<Encoder>) -> Self {
        buf.clear();
        // A system-mode block averages ≈700 bytes with its cold code (Linux boot).
        buf.reserve(2048);
        Asm {
            buf,
            base,
            encoder: encoder.unwrap_or_else(|| Encoder::new(64)),
        }
    }

    /// The code and the encoder, for the next block.
    pub fn into_parts(self) -> (Vec<u8>, Encoder) {
        (self.buf, self.encoder)
    }

    /// Address of the next byte.
    pub fn here(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    pub fn emit(&mut self, instr: &Instruction) -> Result<(), TranslateError> {
        let at = self.here();
        let result = self.encoder.encode(instr, at);
        // The encoder keeps partial output of a failed encoding; always drain it, and hand the
        // (cleared) buffer back so the next encoding does not allocate.
        let mut bytes = self.encoder.take_buffer();
        if result.is_ok() {
            self.buf.extend_from_slice(&bytes);
        }
        bytes.clear();
        self.encoder.set_buffer(bytes);
        result.map(|_| ()).map_err(|e| TranslateError::Encode {
            rip: instr.ip(),
            text: instr.to_string(),
            reason: e.to_string(),
        })
    }

    /// Emits glue built by iced's constructors (which cannot fail for the fixed forms we use).
    pub fn glue(&mut self, instr: Result<Instruction, iced_x86::IcedError>) {
        let instr = instr.expect("glue instruction is well-formed");
        let at = self.here();
        if !encode_glue_fast(&instr, at, &mut self.buf) {
            self.emit(&instr).expect("glue instruction encodes");
        }
    }

    /// Emits an instruction without operands.
    pub fn op0(&mut self, code: Code) {
        self.glue(Ok(Instruction::with(code)));
    }

    // Context moves are appended as bytes, without building an iced `Instruction` (the same
    // encodings as `encode_glue_fast`, which the unit test checks against iced).

    /// `mov dst, src` (64-bit registers): `REX.W 89 /r`.
    pub fn mov_rr(&mut self, dst: Register, src: Register) {
        let (d, s) = (reg_num(dst), reg_num(src));
        self.buf
            .extend_from_slice(&[rex(true, s, 0, d), 0x89, 0xc0 | ((s & 7) as u8) << 3 | (d & 7) as u8]);
    }

    /// `mov gs:[offset], reg` (64-bit).
    pub fn mov_to_ctx(&mut self, offset: usize, reg: Register) {
        self.ctx_mov(0x89, reg, offset);
    }

    /// `mov reg, gs:[offset]` (64-bit).
    pub fn mov_from_ctx(&mut self, reg: Register, offset: usize) {
        self.ctx_mov(0x8b, reg, offset);
    }

    /// `65 REX.W(+R) op ModRM(00 reg 100) SIB(00 100 101) disp32`.
    fn ctx_mov(&mut self, opcode: u8, reg: Register, offset: usize) {
        let n = reg_num(reg) as u8;
        self.buf
            .extend_from_slice(&[0x65, 0x48 | ((n >> 3) << 2), opcode, ((n & 7) << 3) | 4, 0x25]);
        self.buf.extend_from_slice(&(offset as u32).to_le_bytes());
    }

    /// Stores a 64-bit constant into a context field without touching any register or flag.
    /// `mov qword gs:[offset], value`: one store of a sign-extended imm32 where the value is one
    /// (`65 48 C7 04 25 disp32 imm32`: a kernel's RIPs, a user program's below 2 GiB, IF), else
    /// a store of each half.
    pub fn store_ctx_u64(&mut self, offset: usize, value: u64) {
        if value as i64 == value as i32 as i64 {
            self.buf.extend_from_slice(&[0x65, 0x48, 0xc7, 0x04, 0x25]);
            self.buf.extend_from_slice(&(offset as u32).to_le_bytes());
            self.buf.extend_from_slice(&(value as u32).to_le_bytes());
        } else {
            self.store_ctx_u32(offset, value as u32);
            self.store_ctx_u32(offset + 4, (value >> 32) as u32);
        }
    }

    /// `mov dword gs:[offset], imm32`: `65 C7 04 25 disp32 imm32`.
    pub fn store_ctx_u32(&mut self, offset: usize, value: u32) {
        self.buf.extend_from_slice(&[0x65, 0xc7, 0x04, 0x25]);
        self.buf.extend_from_slice(&(offset as u32).to_le_bytes());
        self.buf.extend_from_slice(&value.to_le_bytes());
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

/// The 64-bit-mode `jcc rel32` forms by condition-code number (0F 80+cc).
const JCC_REL32: [Code; 16] = [
    Code::Jo_rel32_64,
    Code::Jno_rel32_64,
    Code::Jb_rel32_64,
    Code::Jae_rel32_64,
    Code::Je_rel32_64,
    Code::Jne_rel32_64,
    Code::Jbe_rel32_64,
    Code::Ja_rel32_64,
    Code::Js_rel32_64,
    Code::Jns_rel32_64,
    Code::Jp_rel32_64,
    Code::Jnp_rel32_64,
    Code::Jl_rel32_64,
    Code::Jge_rel32_64,
    Code::Jle_rel32_64,
    Code::Jg_rel32_64,
];

/// `disp32` of a `gs:[disp32]` operand (no base, no index), if `instr`'s memory operand is one.
fn ctx_displacement(instr: &Instruction) -> Option<u32> {
    let d = instr.memory_displacement64();
    (instr.memory_segment() == Register::GS
        && instr.memory_base() == Register::None
        && instr.memory_index() == Register::None
        && d <= i32::MAX as u64)
        .then_some(d as u32)
}

/// Appends the encoding of `instr` at address `at` to `out` if it is one of the glue forms
/// encoded by hand (see the module comment); returns false, appending nothing, otherwise.
pub fn encode_glue_fast(instr: &Instruction, at: u64, out: &mut Vec<u8>) -> bool {
    use iced_x86::OpKind;
    let rel32 = |len: u64| {
        let rel = instr.near_branch64().wrapping_sub(at + len) as i64;
        (rel == rel as i32 as i64).then_some(rel as i32)
    };
    match instr.code() {
        // 65 REX.W(+R) 8B/89 ModRM(00 reg 100) SIB(00 100 101) disp32
        Code::Mov_r64_rm64 | Code::Mov_rm64_r64 => {
            let (reg_op, mem_op, opcode) = if instr.code() == Code::Mov_r64_rm64 {
                (0, 1, 0x8b)
            } else {
                (1, 0, 0x89)
            };
            if instr.op_kind(mem_op) != OpKind::Memory {
                return false;
            }
            let Some(d) = ctx_displacement(instr) else { return false };
            let n = reg_num(instr.op_register(reg_op)) as u8;
            out.extend_from_slice(&[0x65, 0x48 | ((n >> 3) << 2), opcode, ((n & 7) << 3) | 4, 0x25]);
            out.extend_from_slice(&d.to_le_bytes());
            true
        }
        // 65 C7 /0 ModRM(00 000 100) SIB disp32 imm32
        Code::Mov_rm32_imm32 if instr.op0_kind() == OpKind::Memory => {
            let Some(d) = ctx_displacement(instr) else { return false };
            out.extend_from_slice(&[0x65, 0xc7, 0x04, 0x25]);
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&instr.immediate32().to_le_bytes());
            true
        }
        Code::Jmp_rel32_64 => {
            let Some(rel) = rel32(5) else { return false };
            out.push(JMP_REL32);
            out.extend_from_slice(&rel.to_le_bytes());
            true
        }
        // 0F 80+cc rel32
        code => {
            let Some(cc) = JCC_REL32.iter().position(|&c| c == code) else {
                return false;
            };
            let Some(rel) = rel32(6) else { return false };
            out.extend_from_slice(&[0x0f, 0x80 + cc as u8]);
            out.extend_from_slice(&rel.to_le_bytes());
            true
        }
    }
}

/// REX prefix with W and the R/X/B extension bits of hardware register numbers.
fn rex(w: bool, r: usize, x: usize, b: usize) -> u8 {
    0x40 | (w as u8) << 3 | ((r >> 3) as u8) << 2 | ((x >> 3) as u8) << 1 | (b >> 3) as u8
}

/// The soft-MMU's flag-free TLB lookup (`emit/memop.rs`, `tlb_lookup_flag_free`), encoded by
/// hand: it is most of a system-mode block's glue, and building it from iced `Instruction`s
/// and encoding them was ≈9% of a Linux boot under `--accel bt` (Intel Sapphire Rapids). A
/// unit test checks both halves against iced byte for byte, for every register triple.
impl Asm {
    /// `mov ecx,12; lea t,[s+last]; shrx t,t,rcx; shrx u,s,rcx; movzx u,u16; lea u,[u+u];
    /// mov rcx,gs:[u*8+table]; lea rcx,[rcx+t]; jrcxz hit; jmp miss` (the tag is the negated
    /// page number: `context::TlbEntry`; U keeps the entry's index for the hit path) — returns
    /// the offset of the miss jump's rel32 field (bound later). For a one-byte access (`last`
    /// 0) both pages are the same: `shrx t,s,rcx; movzx u,t16`, two instructions fewer.
    pub fn tlb_probe(&mut self, s: Register, t: Register, u: Register, table: usize, last: i32) -> usize {
        let (s, t, u) = (reg_num(s), reg_num(t), reg_num(u));
        let b = &mut self.buf;
        b.extend_from_slice(&[0xb9, 12, 0, 0, 0]);
        if last != 0 {
            // lea t,[s+last]
            b.extend_from_slice(&[rex(true, t, 0, s), 0x8d]);
            let modrm_mod = if last as i8 as i32 == last { 1 } else { 2 };
            b.push(modrm_mod << 6 | ((t & 7) as u8) << 3 | (s & 7) as u8);
            if s & 7 == 4 {
                b.push(0x24);
            }
            match modrm_mod {
                1 => b.push(last as i8 as u8),
                2 => b.extend_from_slice(&last.to_le_bytes()),
                _ => {}
            }
        }
        // shrx dst,src,rcx: VEX.LZ.F2.0F38.W1 F7 /r, count in vvvv (RCX: 1, inverted 1110).
        let shrx = |b: &mut Vec<u8>, dst: usize, src: usize| {
            let r = ((dst >> 3) ^ 1) as u8;
            let bb = ((src >> 3) ^ 1) as u8;
            b.extend_from_slice(&[
                0xc4,
                r << 7 | 1 << 6 | bb << 5 | 0b00010,
                0x80 | 0b1110 << 3 | 0b11,
                0xf7,
                0xc0 | ((dst & 7) as u8) << 3 | (src & 7) as u8,
            ]);
        };
        let ul = (u & 7) as u8;
        // movzx u32,v16, V holding the first byte's page number
        let v = if last != 0 {
            shrx(b, t, t);
            shrx(b, u, s);
            u
        } else {
            shrx(b, t, s);
            t
        };
        if u >= 8 || v >= 8 {
            b.push(rex(false, u, 0, v));
        }
        b.extend_from_slice(&[0x0f, 0xb7, 0xc0 | ul << 3 | (v & 7) as u8]);
        // lea u32,[u+u] (RBP/R13 as base need a zero disp8)
        if u >= 8 {
            b.push(rex(false, u, u, u));
        }
        if ul == 5 {
            b.extend_from_slice(&[0x8d, 0x44 | ul << 3, ul << 3 | ul, 0]);
        } else {
            b.extend_from_slice(&[0x8d, 0x04 | ul << 3, ul << 3 | ul]);
        }
        // mov rcx,gs:[u*8+table]
        b.extend_from_slice(&[0x65, rex(true, 1, u, 0), 0x8b, 0x0c, 0xc5 | ul << 3]);
        b.extend_from_slice(&(table as u32).to_le_bytes());
        // lea rcx,[rcx+t]; jrcxz +5
        b.extend_from_slice(&[rex(true, 1, t, 1), 0x8d, 0x0c, ((t & 7) as u8) << 3 | 1]);
        b.extend_from_slice(&[0xe3, 5]);
        self.branch32_forward(Code::Jmp_rel32_64)
    }

    /// The hit path after [`Asm::tlb_probe`]: `mov t,gs:[u*8+table+8]; lea s,[s+t]` — S
    /// becomes the host address.
    pub fn tlb_hit(&mut self, s: Register, t: Register, u: Register, table: usize) {
        let (s, t, u) = (reg_num(s), reg_num(t), reg_num(u));
        let b = &mut self.buf;
        b.extend_from_slice(&[
            0x65,
            rex(true, t, u, 0),
            0x8b,
            ((t & 7) as u8) << 3 | 4,
            0xc5 | ((u & 7) as u8) << 3,
        ]);
        b.extend_from_slice(&((table + 8) as u32).to_le_bytes());
        // lea s,[s+t] (RBP/R13 as base need a zero disp8)
        b.extend_from_slice(&[rex(true, s, t, s), 0x8d]);
        if s & 7 == 5 {
            b.extend_from_slice(&[0x44 | ((s & 7) as u8) << 3, ((t & 7) as u8) << 3 | (s & 7) as u8, 0]);
        } else {
            b.extend_from_slice(&[0x04 | ((s & 7) as u8) << 3, ((t & 7) as u8) << 3 | (s & 7) as u8]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn iced(instr: &Instruction, at: u64) -> Vec<u8> {
        let mut e = Encoder::new(64);
        e.encode(instr, at).expect("iced encodes it");
        e.take_buffer()
    }

    fn check(instr: Instruction, at: u64) {
        let mut fast = Vec::new();
        assert!(encode_glue_fast(&instr, at, &mut fast), "{instr} has a fast encoding");
        assert_eq!(fast, iced(&instr, at), "{instr} at {at:#x}");
    }

    #[test]
    fn a_context_qword_store_is_one_sign_extended_store_where_it_can_be() {
        for value in [
            0u64,
            0x200,
            0x7fff_ffff,
            0xffff_ffff_8100_0000,
            u64::MAX,
            0x8000_0000,
            0x7f00_1234_5678,
        ] {
            let mut a = Asm::new(0x1000);
            a.store_ctx_u64(0x80, value);
            let one = value as i64 == value as i32 as i64;
            let want = if one {
                iced(
                    &Instruction::with2(Code::Mov_rm64_imm32, ctx(0x80), value as i32).unwrap(),
                    0x1000,
                )
            } else {
                let mut both = iced(
                    &Instruction::with2(Code::Mov_rm32_imm32, ctx(0x80), value as u32).unwrap(),
                    0,
                );
                both.extend(iced(
                    &Instruction::with2(Code::Mov_rm32_imm32, ctx(0x84), (value >> 32) as u32).unwrap(),
                    0,
                ));
                both
            };
            assert_eq!(a.buf, want, "{value:#x}");
        }
    }

    #[test]
    fn hand_encoded_glue_matches_iced_byte_for_byte() {
        for n in 0..16 {
            let r = gpr64(n);
            for offset in [0, 8, 0x1208, 0x7fff_fff8] {
                check(Instruction::with2(Code::Mov_r64_rm64, r, ctx(offset)).unwrap(), 0);
                check(Instruction::with2(Code::Mov_rm64_r64, ctx(offset), r).unwrap(), 0);
            }
        }
        for (offset, imm) in [
            (0x80, 0u32),
            (0x1298, 3),
            (0x12a4, 0x7fc7_efcb),
            (0x7fff_fff0, u32::MAX),
        ] {
            check(Instruction::with2(Code::Mov_rm32_imm32, ctx(offset), imm).unwrap(), 0);
        }
        let at = 0x7f00_0000_1000u64;
        for target in [at + 5, at, at - 0x1000, at + 0x7fff_0000, at - 0x7fff_0000] {
            check(Instruction::with_branch(Code::Jmp_rel32_64, target).unwrap(), at);
            for code in JCC_REL32 {
                check(Instruction::with_branch(code, target).unwrap(), at);
            }
        }
    }

    /// The TLB lookup as iced builds and encodes it: the reference for the hand encoding.
    fn tlb_lookup_by_iced(s: Register, t: Register, u: Register, table: usize, last: i64) -> (Vec<u8>, Vec<u8>) {
        let entry = |disp: usize| MemoryOperand::new(Register::None, u, 8, disp as i64, 8, false, Register::GS);
        let u32_ = u.full_register32();
        let mut a = Asm::new(0x1000);
        a.emit_all(&[Instruction::with2(Code::Mov_r32_imm32, Register::ECX, 12u32)]);
        if last != 0 {
            a.emit_all(&[
                Instruction::with2(Code::Lea_r64_m, t, MemoryOperand::with_base_displ(s, last)),
                Instruction::with3(Code::VEX_Shrx_r64_rm64_r64, t, t, Register::RCX),
                Instruction::with3(Code::VEX_Shrx_r64_rm64_r64, u, s, Register::RCX),
                Instruction::with2(Code::Movzx_r32_rm16, u32_, crate::emit::stack::sized16(u)),
            ]);
        } else {
            a.emit_all(&[
                Instruction::with3(Code::VEX_Shrx_r64_rm64_r64, t, s, Register::RCX),
                Instruction::with2(Code::Movzx_r32_rm16, u32_, crate::emit::stack::sized16(t)),
            ]);
        }
        a.emit_all(&[
            Instruction::with2(Code::Lea_r32_m, u32_, MemoryOperand::with_base_index(u, u)),
            Instruction::with2(Code::Mov_r64_rm64, Register::RCX, entry(table)),
            Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::with_base_index(Register::RCX, t),
            ),
        ]);
        let hit = a.here() + 2 + 5;
        a.glue(Instruction::with_branch(Code::Jrcxz_rel8_64, hit));
        a.branch32_forward(Code::Jmp_rel32_64);
        let probe = std::mem::take(&mut a.buf);
        a.emit_all(&[
            Instruction::with2(Code::Mov_r64_rm64, t, entry(table + 8)),
            Instruction::with2(Code::Lea_r64_m, s, MemoryOperand::with_base_index(s, t)),
        ]);
        (probe, a.buf)
    }

    impl Asm {
        fn emit_all(&mut self, instrs: &[Result<Instruction, iced_x86::IcedError>]) {
            for i in instrs {
                let i = i.clone().unwrap();
                self.emit(&i).unwrap();
            }
        }
    }

    #[test]
    fn hand_encoded_tlb_lookup_matches_iced_byte_for_byte() {
        let usable = |n: usize| n != 4 && n != 1;
        for s in (0..16).filter(|&n| usable(n)) {
            for t in (0..16).filter(|&n| usable(n) && n != s) {
                for u in (0..16).filter(|&n| usable(n) && n != s && n != t) {
                    let (s, t, u) = (gpr64(s), gpr64(t), gpr64(u));
                    for (table, last) in [(0x3378, 0), (0x10_3378, 1), (0x3378, 7), (0x3378, 127), (0x3378, 255)] {
                        let (probe, hit) = tlb_lookup_by_iced(s, t, u, table, last);
                        let mut a = Asm::new(0x1000);
                        a.tlb_probe(s, t, u, table, last as i32);
                        assert_eq!(a.buf, probe, "probe s={s:?} t={t:?} u={u:?} last={last}");
                        a.buf.clear();
                        a.tlb_hit(s, t, u, table);
                        assert_eq!(a.buf, hit, "hit s={s:?} t={t:?} u={u:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn context_moves_match_iced() {
        for n in 0..16 {
            let r = gpr64(n);
            for offset in [0, 8, 0x1208, 0x7fff_fff8] {
                let mut a = Asm::new(0);
                a.mov_from_ctx(r, offset);
                assert_eq!(
                    a.buf,
                    iced(&Instruction::with2(Code::Mov_r64_rm64, r, ctx(offset)).unwrap(), 0)
                );
                let mut a = Asm::new(0);
                a.mov_to_ctx(offset, r);
                assert_eq!(
                    a.buf,
                    iced(&Instruction::with2(Code::Mov_rm64_r64, ctx(offset), r).unwrap(), 0)
                );
                let mut a = Asm::new(0);
                a.store_ctx_u32(offset, 0x8765_4321);
                let want = Instruction::with2(Code::Mov_rm32_imm32, ctx(offset), 0x8765_4321u32).unwrap();
                assert_eq!(a.buf, iced(&want, 0));
            }
        }
    }

    #[test]
    fn register_moves_match_iced() {
        for d in 0..16 {
            for s in 0..16 {
                let mut a = Asm::new(0);
                a.mov_rr(gpr64(d), gpr64(s));
                let want = Instruction::with2(Code::Mov_rm64_r64, gpr64(d), gpr64(s)).unwrap();
                assert_eq!(a.buf, iced(&want, 0), "mov {d} {s}");
            }
        }
    }

    #[test]
    fn other_forms_are_left_to_iced() {
        let mut out = Vec::new();
        let rip_relative = MemoryOperand::with_base_displ(Register::RIP, 0x1000);
        let based = MemoryOperand::with_base_displ(Register::RSP, -8);
        for instr in [
            Instruction::with2(Code::Mov_r64_rm64, Register::RAX, Register::RCX).unwrap(),
            Instruction::with2(Code::Mov_r64_rm64, Register::RAX, rip_relative).unwrap(),
            Instruction::with2(Code::Mov_rm64_r64, based, Register::RAX).unwrap(),
            Instruction::with2(Code::Mov_r64_rm64, Register::RAX, ctx_indexed(Register::RCX, 8, 0x3378)).unwrap(),
            // Out of rel32 range.
            Instruction::with_branch(Code::Jmp_rel32_64, 0x7f00_0000_0000).unwrap(),
            Instruction::with_branch(Code::Jrcxz_rel8_64, 2).unwrap(),
        ] {
            assert!(!encode_glue_fast(&instr, 0, &mut out), "{instr}");
        }
        assert!(out.is_empty());
    }
}

//! Synthesizing test instances of an iced `Code` from its operand kinds (`OpCodeInfo`), and the
//! machine states to run them on.
//!
//! An *instance* is one encoding: concrete registers (including AH..BH and the REX-only byte
//! registers), memory operands with varied base/index/scale/displacement (RIP-relative and
//! 32-bit addressing included), immediates across their width, branch targets, LOCK/REP
//! prefixes. A *state* is a full machine state — GPRs, flags, x87/MMX, XMM/YMM, MXCSR, data
//! memory — random with a bias to edge values, then constrained so every memory access of the
//! instance lands in the data region and every branch lands in the code region.

use super::machine::DATA_SIZE;
use super::rng::Rng;
use crate::cpu::xsave::{XsaveLayout, XCOMP_BV, XSTATE_BV};
use crate::rules::{rule, BranchKind, EmulateOp, ImplicitOp, Rule, StackOp};
use crate::state::{flags, GuestState, XSaveArea};
use iced_x86::{
    Code, Decoder, DecoderOptions, Encoder, EncodingKind, Instruction, OpCodeOperandKind as K, OpKind, Register,
    RoundingControl,
};

/// The legacy high-byte registers (usable only without a REX prefix).
const HIGH8: [Register; 4] = [Register::AH, Register::CH, Register::DH, Register::BH];

/// The byte registers 32-bit code can name.
const LEGACY8: [Register; 8] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::AH,
    Register::CH,
    Register::DH,
    Register::BH,
];

/// A general register of `size` bytes that code of `bitness` can name (32-bit code: the eight
/// legacy ones).
fn gpr_of_size(rng: &mut Rng, size: usize, bitness: u32) -> Register {
    let n = rng.below(if bitness == 32 { 8 } else { 16 }) as usize;
    let r64 = crate::emit::asm::gpr64(n);
    match size {
        1 if bitness == 32 => rng.pick(&LEGACY8),
        1 if rng.chance(20) => rng.pick(&HIGH8),
        1 => rng.pick(&crate::emit::asm::GPR8),
        2 => Register::values()
            .find(|r| r.is_gpr16() && r.full_register() == r64)
            .unwrap(),
        4 => Register::values()
            .find(|r| r.is_gpr32() && r.full_register() == r64)
            .unwrap(),
        _ => r64,
    }
}

fn vec_reg(first: Register, rng: &mut Rng, count: u64) -> Register {
    Register::values()
        .nth(first as usize + rng.below(count) as usize)
        .unwrap()
}

/// One encoded instance of a `Code`, plus what the states must respect.
#[derive(Clone)]
pub struct Instance {
    pub instr: Instruction,
    pub bytes: Vec<u8>,
    /// Run starts at a `nop` just before the instruction, so it is not the first of its block
    /// (exercises fault mapping and flag liveness inside blocks).
    pub lead_in: bool,
    /// Target address of the explicit memory operand, as an offset into the data region.
    pub mem_target: Option<u64>,
    /// 64, or 32 for 32-bit code (compatibility mode: decoded as IA-32, `rules::rule_compat`).
    pub bitness: u32,
}

fn imm_value(rng: &mut Rng, bits: u32) -> u64 {
    let v = rng.interesting();
    if bits == 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

/// A near branch's target from an instruction at `at`: forward into the HLT sea or backward,
/// never onto the instruction itself.
fn branch_target(rng: &mut Rng, at: u64) -> u64 {
    let delta = if rng.chance(60) {
        16 + rng.below(100) as i64
    } else {
        -(16 + rng.below(100) as i64)
    };
    (at as i64 + delta) as u64
}

/// Builds a random instance of `code` at address `at` for code of `bitness` (64, or 32 for
/// compatibility mode: eight registers of each kind, 32-bit addressing, no RIP-relative or
/// FS/GS-relative operands yet); None if this attempt is unencodable.
pub fn instance(code: Code, rng: &mut Rng, at: u64, data: u64, bitness: u32) -> Option<Instance> {
    let op = code.op_code();
    let mut i = Instruction::default();
    i.set_code(code);
    let mut mem_target = None;
    let evex = op.encoding() == EncodingKind::EVEX;
    let narrow = bitness == 32;
    // EVEX names 32 vector registers; VEX and legacy 16; 32-bit code 8 either way.
    let vregs = if narrow {
        8
    } else if evex {
        32
    } else {
        16
    };
    let zregs = if narrow { 8 } else { 32 };
    // Embedded broadcast (EVEX.b with a memory operand): one element read and repeated.
    let broadcast = op.can_broadcast() && rng.chance(30);
    let mut has_memory = false;
    // Forms iced gives no size (XSAVE family) get the soft-MMU's assumption: the standard image
    // of the guest's (the harness's: every managed) component set.
    let size_of = if broadcast {
        op.broadcast_memory_size()
    } else {
        op.memory_size()
    };
    let mem_size = match size_of.size() as u64 {
        0 => {
            let layout = XsaveLayout::host();
            layout.size(layout.managed()) as u64
        }
        n => n,
    };
    for (n, &kind) in op.op_kinds().iter().enumerate() {
        let n = n as u32;
        let reg_or_mem = |rng: &mut Rng| rng.chance(50);
        let set_reg = |i: &mut Instruction, r: Register| {
            i.set_op_kind(n, OpKind::Register);
            i.set_op_register(n, r);
        };
        match kind {
            K::r8_reg | K::r8_opcode => set_reg(&mut i, gpr_of_size(rng, 1, bitness)),
            K::r16_reg | K::r16_rm | K::r16_opcode | K::r16_reg_mem => set_reg(&mut i, gpr_of_size(rng, 2, bitness)),
            K::r32_reg | K::r32_rm | K::r32_opcode | K::r32_vvvv | K::r32_reg_mem => {
                set_reg(&mut i, gpr_of_size(rng, 4, bitness))
            }
            K::r64_reg | K::r64_rm | K::r64_opcode | K::r64_vvvv | K::r64_reg_mem => {
                set_reg(&mut i, gpr_of_size(rng, 8, bitness))
            }
            K::mm_reg | K::mm_rm => set_reg(&mut i, vec_reg(Register::MM0, rng, 8)),
            K::xmm_reg | K::xmm_rm | K::xmm_vvvv => set_reg(&mut i, vec_reg(Register::XMM0, rng, vregs)),
            K::ymm_reg | K::ymm_rm | K::ymm_vvvv => set_reg(&mut i, vec_reg(Register::YMM0, rng, vregs)),
            K::zmm_reg | K::zmm_rm | K::zmm_vvvv => set_reg(&mut i, vec_reg(Register::ZMM0, rng, zregs)),
            K::xmm_is4 => set_reg(&mut i, vec_reg(Register::XMM0, rng, vregs.min(16))),
            K::ymm_is4 => set_reg(&mut i, vec_reg(Register::YMM0, rng, vregs.min(16))),
            K::k_reg | K::k_rm | K::k_vvvv => set_reg(&mut i, vec_reg(Register::K0, rng, 8)),
            K::al => set_reg(&mut i, Register::AL),
            K::cl => set_reg(&mut i, Register::CL),
            K::ax => set_reg(&mut i, Register::AX),
            K::dx => set_reg(&mut i, Register::DX),
            K::eax => set_reg(&mut i, Register::EAX),
            K::rax => set_reg(&mut i, Register::RAX),
            K::st0 => set_reg(&mut i, Register::ST0),
            K::cr_reg => set_reg(
                &mut i,
                rng.pick(&[
                    Register::CR0,
                    Register::CR2,
                    Register::CR3,
                    Register::CR4,
                    Register::CR8,
                ]),
            ),
            K::dr_reg => set_reg(&mut i, vec_reg(Register::DR0, rng, 8)),
            K::seg_reg => set_reg(
                &mut i,
                rng.pick(&[Register::ES, Register::SS, Register::DS, Register::FS, Register::GS]),
            ),
            K::fs => set_reg(&mut i, Register::FS),
            K::es => set_reg(&mut i, Register::ES),
            K::cs => set_reg(&mut i, Register::CS),
            K::ss => set_reg(&mut i, Register::SS),
            K::ds => set_reg(&mut i, Register::DS),
            K::gs => set_reg(&mut i, Register::GS),
            K::sti_opcode => set_reg(&mut i, vec_reg(Register::ST0, rng, 8)),
            K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::mm_or_mem
            | K::xmm_or_mem
            | K::ymm_or_mem
            | K::zmm_or_mem
            | K::k_or_mem
                if reg_or_mem(rng) =>
            {
                let r = match kind {
                    K::r8_or_mem => gpr_of_size(rng, 1, bitness),
                    K::r16_or_mem => gpr_of_size(rng, 2, bitness),
                    K::r32_or_mem => gpr_of_size(rng, 4, bitness),
                    K::r64_or_mem => gpr_of_size(rng, 8, bitness),
                    K::mm_or_mem => vec_reg(Register::MM0, rng, 8),
                    K::xmm_or_mem => vec_reg(Register::XMM0, rng, vregs),
                    K::ymm_or_mem => vec_reg(Register::YMM0, rng, vregs),
                    K::zmm_or_mem => vec_reg(Register::ZMM0, rng, zregs),
                    _ => vec_reg(Register::K0, rng, 8),
                };
                set_reg(&mut i, r);
            }
            K::mem
            | K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::mm_or_mem
            | K::xmm_or_mem
            | K::ymm_or_mem
            | K::zmm_or_mem
            | K::k_or_mem
            | K::mem_vsib32x
            | K::mem_vsib64x
            | K::mem_vsib32y
            | K::mem_vsib64y
            | K::mem_vsib32z
            | K::mem_vsib64z => {
                i.set_op_kind(n, OpKind::Memory);
                has_memory = true;
                let vsib = matches!(
                    kind,
                    K::mem_vsib32x | K::mem_vsib64x | K::mem_vsib32y | K::mem_vsib64y | K::mem_vsib32z | K::mem_vsib64z
                );
                // Where the access lands: inside one data page, naturally aligned or not.
                let span = if vsib { 512 } else { mem_size.min(4095) };
                let page = rng.below(2) * 4096;
                let mut offset = page + rng.below(4096 - span);
                if rng.chance(60) {
                    offset &= !(mem_size.next_power_of_two().min(64) - 1);
                }
                // Sometimes straddle the two data pages (not adjacent in the soft-MMU's
                // guest-physical layout).
                if !vsib && (2..=64).contains(&mem_size) && rng.chance(10) {
                    offset = 4096 - 1 - rng.below(mem_size - 1);
                }
                // A masked access that runs off the end of the data region into the unmapped
                // page after it: masked-off elements must not fault (`state` clears most of the
                // crossing elements' mask bits, sets them sometimes).
                if evex && !vsib && op.can_use_op_mask_register() && mem_size >= 2 && rng.chance(15) {
                    offset = DATA_SIZE - 1 - rng.below(mem_size - 1);
                }
                mem_target = Some(offset);
                let addr32 = narrow || (!vsib && rng.chance(10));
                // An XSAVE-family RFBM (EDX:EAX) must avoid components the host has but the
                // guest lacks (xstate_operands); where there are such, RAX/RDX cannot address.
                let rfbm_regs = is_xstate(&i) && XsaveLayout::host().host_xcr0() != XsaveLayout::host().managed();
                let free = |r: Register| !(rfbm_regs && matches!(r, Register::RAX | Register::RDX));
                let base = loop {
                    let b = gpr_of_size(rng, 8, bitness);
                    if (!vsib || b != Register::RSP) && free(b) {
                        break b;
                    }
                };
                let rip_rel = !narrow && !vsib && rng.chance(15);
                if rip_rel {
                    i.set_memory_base(Register::RIP);
                    i.set_memory_displacement64(data + offset);
                    i.set_memory_displ_size(8);
                } else {
                    let (base, index) = if vsib {
                        let idx = match kind {
                            K::mem_vsib32z | K::mem_vsib64z => vec_reg(Register::ZMM0, rng, zregs),
                            K::mem_vsib32y | K::mem_vsib64y => vec_reg(Register::YMM0, rng, vregs),
                            _ => vec_reg(Register::XMM0, rng, vregs),
                        };
                        (base, idx)
                    } else if rng.chance(50) {
                        let idx = loop {
                            let x = gpr_of_size(rng, 8, bitness);
                            if x != Register::RSP && x != base && free(x) {
                                break x;
                            }
                        };
                        (base, idx)
                    } else {
                        (base, Register::None)
                    };
                    let to32 = |r: Register| {
                        if addr32 && r.is_gpr() {
                            Register::values()
                                .find(|x| x.is_gpr32() && x.full_register() == r)
                                .unwrap()
                        } else {
                            r
                        }
                    };
                    i.set_memory_base(to32(base));
                    i.set_memory_index(to32(index));
                    i.set_memory_index_scale(rng.pick(&[1, 2, 4, 8]));
                    let disp = match rng.below(if evex { 4 } else { 3 }) {
                        0 => 0i64,
                        1 => rng.below(256) as i64 - 128,
                        2 => rng.below(0x2000_0000) as i64 - 0x1000_0000,
                        // EVEX compresses a displacement that is a multiple of the access size
                        // into disp8 (disp8×N).
                        _ => (rng.below(256) as i64 - 128) * mem_size as i64,
                    };
                    i.set_memory_displacement64(disp as u64);
                    let wide = if addr32 { 4 } else { 8 };
                    // Sometimes through FS or GS (the guest's bases are the host thread's here,
                    // so the native run reaches the same memory).
                    if !vsib && !addr32 && rng.chance(15) {
                        i.set_segment_prefix(if rng.chance(50) { Register::FS } else { Register::GS });
                    }
                    i.set_memory_displ_size(if disp == 0 {
                        0
                    } else if (-128..128).contains(&disp) {
                        1
                    } else {
                        wide
                    });
                }
            }
            K::seg_rSI if narrow => i.set_op_kind(n, OpKind::MemorySegESI),
            K::es_rDI if narrow => i.set_op_kind(n, OpKind::MemoryESEDI),
            K::seg_rDI if narrow => i.set_op_kind(n, OpKind::MemorySegEDI),
            K::seg_rSI => i.set_op_kind(n, OpKind::MemorySegRSI),
            K::es_rDI => i.set_op_kind(n, OpKind::MemoryESRDI),
            K::seg_rDI => i.set_op_kind(n, OpKind::MemorySegRDI),
            K::mem_offs => {
                // moffs: an absolute address of the code's width.
                i.set_op_kind(n, OpKind::Memory);
                let offset = rng.below(2) * 4096 + rng.below(4096 - mem_size.min(4095));
                mem_target = Some(offset);
                i.set_memory_displacement64(data + offset);
                i.set_memory_displ_size(if narrow { 4 } else { 8 });
            }
            K::imm8 if n > 0 && matches!(code.mnemonic(), iced_x86::Mnemonic::Enter) => {
                i.set_op_kind(n, OpKind::Immediate8_2nd);
                // Nesting level: mostly 0..3 (deep levels read many frames).
                i.set_immediate8_2nd(if rng.chance(70) {
                    rng.below(4) as u8
                } else {
                    rng.next_u64() as u8
                });
            }
            // A second 8-bit immediate (SSE4A `extrq`/`insertq`: field length, then index).
            K::imm8 if n > 0 && op.op_kinds()[n as usize - 1] == K::imm8 => {
                i.set_op_kind(n, OpKind::Immediate8_2nd);
                i.set_immediate8_2nd(imm_value(rng, 8) as u8);
            }
            K::seg_rBX_al => {
                i.set_op_kind(n, OpKind::Memory);
                i.set_memory_base(if narrow { Register::EBX } else { Register::RBX });
                i.set_memory_index(Register::AL);
                i.set_memory_index_scale(1);
            }
            K::imm8 => {
                i.set_op_kind(n, OpKind::Immediate8);
                let mut v = imm_value(rng, 8) as u8;
                if code == Code::Int_imm8 && v == 0x80 {
                    v = 0x81; // int 0x80 is a real system call.
                }
                i.set_immediate8(v);
            }
            K::imm8_const_1 => {
                i.set_op_kind(n, OpKind::Immediate8);
                i.set_immediate8(1);
            }
            K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
                i.set_op_kind(
                    n,
                    match kind {
                        K::imm8sex16 => OpKind::Immediate8to16,
                        K::imm8sex32 => OpKind::Immediate8to32,
                        _ => OpKind::Immediate8to64,
                    },
                );
                i.set_immediate8(imm_value(rng, 8) as u8);
            }
            K::imm16 => {
                i.set_op_kind(n, OpKind::Immediate16);
                i.set_immediate16(imm_value(rng, 16) as u16);
            }
            K::imm32 => {
                i.set_op_kind(n, OpKind::Immediate32);
                i.set_immediate32(imm_value(rng, 32) as u32);
            }
            K::imm32sex64 => {
                i.set_op_kind(n, OpKind::Immediate32to64);
                i.set_immediate32(imm_value(rng, 32) as u32);
            }
            K::imm64 => {
                i.set_op_kind(n, OpKind::Immediate64);
                i.set_immediate64(imm_value(rng, 64));
            }
            K::br32_1 | K::br32_4 if narrow => {
                i.set_op_kind(n, OpKind::NearBranch32);
                i.set_near_branch32(branch_target(rng, at) as u32);
            }
            K::br64_1 | K::br64_4 | K::xbegin_2 | K::xbegin_4 => {
                i.set_op_kind(n, OpKind::NearBranch64);
                i.set_near_branch64(branch_target(rng, at));
            }
            _ => return None,
        }
    }
    if evex {
        evex_decorations(&mut i, rng, broadcast && has_memory, has_memory);
    }
    let lock_ok = code.op_code().can_use_lock_prefix() && i.op0_kind() == OpKind::Memory;
    if lock_ok && rng.chance(30) {
        i.set_has_lock_prefix(true);
    }
    let string_io = rule(code) == Some(Rule::System(crate::system::SystemOp::PortString));
    if rule(code) == Some(Rule::Implicit(ImplicitOp::String)) || string_io {
        match rng.below(3) {
            0 => {}
            1 => i.set_has_repe_prefix(true),
            _ => i.set_has_repne_prefix(true),
        }
    }
    // bt* m,r with the bit-offset register also in the address cannot be kept in the data region.
    let bit_string = matches!(
        code.mnemonic(),
        iced_x86::Mnemonic::Bt | iced_x86::Mnemonic::Bts | iced_x86::Mnemonic::Btr | iced_x86::Mnemonic::Btc
    );
    if bit_string && i.op0_kind() == OpKind::Memory && i.op1_kind() == OpKind::Register {
        let r = i.op1_register().full_register();
        if i.memory_base().full_register() == r || i.memory_index().full_register() == r {
            return None;
        }
    }
    // `call/jmp rsp` would point the stack into the code region (self-modifying code under the
    // identity strategy is not tracked yet).
    if matches!(
        code,
        Code::Call_rm64 | Code::Jmp_rm64 | Code::Call_rm32 | Code::Jmp_rm32
    ) && i.op0_kind() == OpKind::Register
        && i.op0_register().full_register() == Register::RSP
    {
        return None;
    }
    let mut enc = Encoder::new(bitness);
    let len = enc.encode(&i, at).ok()?;
    let bytes = enc.take_buffer();
    debug_assert_eq!(len, bytes.len());
    let mut decoder = Decoder::with_ip(bitness, &bytes, at, DecoderOptions::NONE);
    let decoded = decoder.decode();
    if decoded.code() != code || decoded.len() != bytes.len() {
        return None;
    }
    Some(Instance {
        instr: decoded,
        bytes,
        mem_target,
        lead_in: rng.chance(50),
        bitness,
    })
}

/// EVEX decorations: an opmask (required by some forms, e.g. compares into k and scatters)
/// with merge or zero masking, embedded broadcast of a memory operand, and — register forms
/// only — static rounding or suppress-all-exceptions.
fn evex_decorations(i: &mut Instruction, rng: &mut Rng, broadcast: bool, has_memory: bool) {
    let op = i.code().op_code();
    let masked = op.require_op_mask_register() || (op.can_use_op_mask_register() && rng.chance(70));
    if masked {
        i.set_op_mask(vec_reg(Register::K1, rng, 7));
        if op.can_use_zeroing_masking() && rng.chance(50) {
            i.set_zeroing_masking(true);
        }
    }
    if broadcast {
        i.set_is_broadcast(true);
    }
    if !has_memory {
        if op.can_use_rounding_control() && rng.chance(25) {
            i.set_rounding_control(rng.pick(&[
                RoundingControl::RoundToNearest,
                RoundingControl::RoundDown,
                RoundingControl::RoundUp,
                RoundingControl::RoundTowardZero,
            ]));
        } else if op.can_suppress_all_exceptions() && rng.chance(25) {
            i.set_suppress_all_exceptions(true);
        }
    }
}

/// A random machine state for `inst`, constrained so its accesses and branches stay inside the
/// machine's regions. Returns the state and the initial data-region contents.
pub fn state(
    inst: &Instance,
    rng: &mut Rng,
    code: (u64, u64),
    data: u64,
    seg_bases: (u64, u64),
) -> (GuestState, Vec<u8>) {
    let instr = &inst.instr;
    // The harness's guest has every component the translator manages on this host.
    let mut s = GuestState {
        xcr0: XsaveLayout::host().managed(),
        ..GuestState::default()
    };
    for r in s.gpr.iter_mut() {
        *r = rng.interesting();
    }
    s.rip = instr.ip() - inst.lead_in as u64;
    s.rflags = flags::FIXED | flags::IF | (rng.next_u64() & (flags::STATUS | flags::DF));
    if rng.chance(5) {
        s.rflags |= flags::AC;
    }
    random_vector_state(&mut s.xsave, rng);
    let mut mem = vec![0u8; DATA_SIZE as usize];
    for chunk in mem.chunks_mut(8) {
        chunk.copy_from_slice(&rng.interesting().to_le_bytes());
    }
    let landing = |rng: &mut Rng| {
        // An address in the HLT sea away from the instruction.
        let after = instr.next_ip() + 1 + rng.below(64);
        after.min(code.1 - 1)
    };
    let code_rule = if inst.bitness == 32 {
        crate::rules::rule_compat(instr.code())
    } else {
        rule(instr.code())
    };

    // Implicit memory: stack, string, leave.
    let stack_user = instr.is_stack_instruction() || matches!(code_rule, Some(Rule::Branch(BranchKind::Ret)));
    if stack_user {
        s.gpr[4] = data + 0x800 + rng.below(0x100) * 8;
    }
    if code_rule == Some(Rule::Stack(StackOp::Leave)) {
        s.gpr[5] = data + 0x900 + rng.below(0x100) * 8;
    }
    if code_rule == Some(Rule::Implicit(ImplicitOp::Xlat)) {
        s.gpr[3] = data + 0x100 + rng.below(0x600);
    }
    if code_rule == Some(Rule::Implicit(ImplicitOp::Enter)) {
        s.gpr[5] = data + 0x900 + rng.below(0x100) * 8;
        // Neither the pushes nor the frame allocation may touch the code region (the native run
        // would write into the code under test).
        let size = if instr.code() == Code::Enterw_imm16_imm8 { 2 } else { 8 };
        let level = (instr.immediate8_2nd() & 31) as u64;
        let pushes = size * (level + 1);
        let below = pushes + instr.immediate16() as u64;
        let touches_code = |rsp: u64| {
            let hits = |a: u64, b: u64| a < code.1 && b > code.0;
            let final_rsp = rsp.wrapping_sub(below);
            hits(rsp.wrapping_sub(pushes), rsp) || hits(final_rsp, final_rsp + size)
        };
        let candidates = [
            s.gpr[4],
            data + 0x1ff0,
            data + 0x800,
            code.1 + 0x100 + below,
            code.0.wrapping_sub(0x100) + below,
        ];
        s.gpr[4] = candidates
            .into_iter()
            .find(|&r| !touches_code(r))
            .unwrap_or(data + 0x1ff0)
            & !7;
    }
    if code_rule == Some(Rule::Implicit(ImplicitOp::MaskMove)) {
        let mask = instr.op2_register().number() & 15;
        s.gpr[7] = data + 0x100 + rng.below(0xe00);
        if rng.chance(15) {
            // Run off the data region into the unmapped page after it, the bytes that cross
            // (mostly) unselected.
            let start = DATA_SIZE - 1 - rng.below(15);
            s.gpr[7] = data + start;
            for i in (DATA_SIZE - start) as usize..16 {
                if rng.chance(85) {
                    s.xsave.xmm_mut(mask)[i] &= 0x7f;
                }
            }
        }
        // A mask that selects no byte: CPUs differ on whether a misaligned RDI still raises #AC
        // (`host::quirks`), which random masks would almost never ask.
        if rng.chance(8) {
            s.xsave.xmm_mut(mask).fill(0);
        }
    }
    if code_rule == Some(Rule::Implicit(ImplicitOp::String)) {
        s.gpr[6] = data + 0x200 + rng.below(0x600);
        s.gpr[7] = data + 0x1200 + rng.below(0x600);
        s.gpr[1] = rng.below(20);
    }
    match code_rule {
        Some(Rule::Emulate(EmulateOp::Syscall)) => s.gpr[0] = rng.pick(&[39, 102, 1000]),
        Some(Rule::Emulate(EmulateOp::Cpuid)) => {
            s.gpr[0] = rng.pick(&[0, 1, 7, 0xd, 0x8000_0000, 0x8000_0001]);
            s.gpr[1] = rng.below(2);
        }
        Some(Rule::Emulate(EmulateOp::Xgetbv)) => {
            let other = rng.next_u64();
            let index = rng.pick(&[0, 1, 0, 1, 2, other]);
            s.gpr[1] = (s.gpr[1] & !0xffff_ffff) | (index & 0xffff_ffff);
        }
        _ => {}
    }

    // The explicit memory operand.
    if let Some(offset) = inst.mem_target {
        let target = data + offset;
        let base = instr.memory_base();
        let index = instr.memory_index();
        let disp = instr.memory_displacement64();
        let scale = instr.memory_index_scale() as u64;
        if base != Register::RIP && base != Register::None {
            let index_value = if index == Register::None {
                0
            } else if index.is_xmm() || index.is_ymm() || index.is_zmm() {
                // Small non-negative lane indices (dwords and qwords both read them correctly).
                let lanes_q = instr
                    .code()
                    .op_code()
                    .op_kinds()
                    .iter()
                    .any(|k| matches!(k, K::mem_vsib64x | K::mem_vsib64y | K::mem_vsib64z));
                let mut lanes = crate::emulate::regs::read_zmm(&s, index.number());
                let width = if lanes_q { 8 } else { 4 };
                for lane in lanes[..index.size()].chunks_exact_mut(width) {
                    let v = rng.below(24);
                    lane.copy_from_slice(&v.to_le_bytes()[..width]);
                }
                crate::emulate::regs::write_zmm(&mut s, index.number(), &lanes);
                0
            } else {
                let full = index.full_register().number() & 15;
                let v = rng.below(64);
                s.gpr[full] = v;
                v
            };
            let full = base.full_register().number() & 15;
            let seg_base = match instr.segment_prefix() {
                Register::FS => seg_bases.0,
                Register::GS => seg_bases.1,
                _ => 0,
            };
            let want = target
                .wrapping_sub(seg_base)
                .wrapping_sub(index_value.wrapping_mul(scale))
                .wrapping_sub(disp);
            if base.is_gpr32() {
                s.gpr[full] = (rng.next_u64() << 32) | (want & 0xffff_ffff);
                if index.is_gpr32() {
                    let ifull = index.full_register().number() & 15;
                    s.gpr[ifull] = (rng.next_u64() << 32) | index_value;
                }
            } else {
                s.gpr[full] = want;
            }
        }
        // Indirect jumps/calls through memory go into the HLT sea.
        if matches!(
            code_rule,
            Some(Rule::Branch(BranchKind::JmpIndirect | BranchKind::CallIndirect))
        ) {
            let l = landing(rng);
            mem[offset as usize..offset as usize + 8].copy_from_slice(&l.to_le_bytes());
        }
    }
    // A masked access running past the data region: clear (mostly) the mask bits of the
    // elements that reach the unmapped page after it.
    let opmask = crate::emulate::regs::opmask_index(instr);
    if let (Some(offset), Some(k)) = (inst.mem_target, opmask) {
        let size = instr.memory_size();
        let end = offset + size.size() as u64;
        if end > DATA_SIZE && !instr.is_broadcast() {
            let element = size.element_size().max(1) as u64;
            let mut mask = s.xsave.opmask(k).unwrap_or(0);
            for lane in 0..(size.size() as u64 / element).min(64) {
                if offset + (lane + 1) * element > DATA_SIZE && rng.chance(85) {
                    mask &= !(1 << lane);
                }
            }
            s.xsave.set_opmask(k, mask);
        }
    }
    // bt/bts/btr/btc m,r: keep the bit offset inside the operand's neighbourhood.
    let bit_string = matches!(
        instr.mnemonic(),
        iced_x86::Mnemonic::Bt | iced_x86::Mnemonic::Bts | iced_x86::Mnemonic::Btr | iced_x86::Mnemonic::Btc
    );
    if bit_string && instr.op0_kind() == OpKind::Memory && instr.op1_kind() == OpKind::Register {
        let r = instr.op1_register();
        let full = r.full_register().number() & 15;
        let v = rng.below(64);
        s.gpr[full] = if r.size() == 8 {
            v
        } else {
            (s.gpr[full] & !((1u64 << (r.size() * 8)) - 1)) | v
        };
    }
    if is_xstate(instr) {
        xstate_operands(instr, rng, &mut s, &mut mem, inst.mem_target);
    }
    if code_rule == Some(Rule::Emulate(EmulateOp::Segment)) {
        let target = landing(rng);
        segment_state(instr, rng, &mut s, &mut mem, data, inst.mem_target, target);
    }
    match code_rule {
        Some(Rule::Branch(BranchKind::JmpIndirect | BranchKind::CallIndirect))
            if instr.op0_kind() == OpKind::Register =>
        {
            s.gpr[instr.op0_register().number() & 15] = landing(rng);
        }
        Some(Rule::Branch(BranchKind::Ret)) => {
            let at = (s.gpr[4] - data) as usize;
            mem[at..at + 8].copy_from_slice(&landing(rng).to_le_bytes());
        }
        Some(Rule::Stack(StackOp::Popf)) => {
            // Never single-step the host: clear TF in the value popf loads.
            let at = (s.gpr[4] - data) as usize;
            mem[at + 1] &= !((flags::TF >> 8) as u8);
        }
        _ => {}
    }
    if inst.bitness == 32 {
        // 32-bit code names the low halves only; the high ones are what the last 64-bit code
        // left, which a CPU keeps or not (the SDM leaves them undefined): zero, as a 64-bit
        // kernel's return to its 32-bit programs leaves them.
        for r in s.gpr.iter_mut() {
            *r &= 0xffff_ffff;
        }
    }
    (s, mem)
}

fn is_xstate(instr: &Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        instr.mnemonic(),
        M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 | M::Xsavec | M::Xsavec64 | M::Xrstor | M::Xrstor64
    )
}

/// XSAVE family: the requested-feature bitmap (EDX:EAX) and, for `xrstor`, the image header.
/// RFBM and the header never name a component the host enabled but the guest was not given
/// (XFD-armed AMX): there a CPU with the guest's XCR0 and this host differ by design, and the
/// native run cannot model the guest's. Well-formed images (valid header and MXCSR, sometimes
/// compacted) make `xrstor` succeed often enough to compare the state it loads.
fn xstate_operands(instr: &Instruction, rng: &mut Rng, s: &mut GuestState, mem: &mut [u8], target: Option<u64>) {
    let hidden = XsaveLayout::host().host_xcr0() & !s.xcr0;
    let rfbm = if rng.chance(50) { u64::MAX } else { rng.next_u64() } & !hidden;
    // EAX/EDX may also address the image (`xsave [rax]`): then their values stay (instance()
    // keeps them out of addresses on hosts where `hidden` is not empty).
    let addressing = |n: usize| {
        [instr.memory_base(), instr.memory_index()]
            .iter()
            .any(|r| r.is_gpr() && r.full_register().number() == n)
    };
    if !addressing(0) {
        s.gpr[0] = (s.gpr[0] & !0xffff_ffff) | (rfbm & 0xffff_ffff);
    }
    if !addressing(2) {
        s.gpr[2] = (s.gpr[2] & !0xffff_ffff) | (rfbm >> 32);
    }
    let Some(at) = target.map(|t| t as usize).filter(|&t| t + 576 <= mem.len()) else {
        return;
    };
    let restore = matches!(
        instr.mnemonic(),
        iced_x86::Mnemonic::Xrstor | iced_x86::Mnemonic::Xrstor64
    );
    let word = |mem: &mut [u8], off: usize, f: &dyn Fn(u64) -> u64| {
        let v = u64::from_le_bytes(mem[at + off..at + off + 8].try_into().expect("8 bytes"));
        mem[at + off..at + off + 8].copy_from_slice(&f(v).to_le_bytes());
    };
    if restore && rng.chance(60) {
        let bv = rng.next_u64() & s.xcr0;
        let comp = if rng.chance(30) {
            (bv | (rng.next_u64() & s.xcr0)) | (1 << 63)
        } else {
            0
        };
        word(mem, XSTATE_BV, &|_| bv);
        word(mem, XCOMP_BV, &|_| comp);
        mem[at + 528..at + 576].fill(0);
        let mxcsr = (rng.next_u64() as u32) & crate::cpu::xsave::host_mxcsr_mask();
        mem[at + 24..at + 28].copy_from_slice(&mxcsr.to_le_bytes());
    }
    word(mem, XSTATE_BV, &|v| v & !hidden);
    word(mem, XCOMP_BV, &|v| v & !hidden);
}

/// Selectors worth loading: null (with each RPL), Linux's user code/data/per-CPU entries, kernel
/// entries, TSS/LDT (system descriptors), empty TLS slots, and out-of-range indices.
const SELECTORS: [u16; 16] = [
    0, 1, 3, 0x2b, 0x33, 0x7b, 0x10, 0x18, 0x3b, 0x43, 0x4b, 0x63, 0x2a, 0x2f, 0x34, 0xfffb,
];

fn selector(rng: &mut Rng, for_code: bool) -> u16 {
    let s = if rng.chance(75) {
        rng.pick(&SELECTORS)
    } else {
        rng.next_u64() as u16
    };
    // Far transfers into 32-bit code (compatibility mode) are refused by design; keep GDT
    // index 4 (Linux's 32-bit user code) out of far-transfer targets.
    if for_code && ((s >> 3) == 4 || rng.chance(60)) {
        0x33
    } else {
        s
    }
}

fn put(mem: &mut [u8], at: u64, value: u64, size: usize) {
    let at = at as usize;
    if at + size <= mem.len() {
        mem[at..at + size].copy_from_slice(&value.to_le_bytes()[..size]);
    }
}

/// Operands of segment loads and far transfers: selectors, far pointers and return frames.
fn segment_state(
    instr: &Instruction,
    rng: &mut Rng,
    s: &mut GuestState,
    mem: &mut [u8],
    data: u64,
    mem_target: Option<u64>,
    landing: u64,
) {
    use iced_x86::Mnemonic as M;
    let m = instr.mnemonic();
    let stack = s.gpr[4].wrapping_sub(data);
    match m {
        M::Mov if instr.op0_kind() == OpKind::Register && instr.op0_register().is_segment_register() => {
            let sel = selector(rng, false) as u64;
            match (instr.op1_kind(), mem_target) {
                (OpKind::Register, _) => {
                    let r = instr.op1_register().full_register().number() & 15;
                    s.gpr[r] = (s.gpr[r] & !0xffff) | sel;
                }
                (_, Some(off)) => put(mem, off, sel, 2),
                _ => {}
            }
        }
        M::Pop => put(mem, stack, selector(rng, false) as u64, 8),
        M::Lfs | M::Lgs | M::Lss => {
            if let Some(off) = mem_target {
                let size = instr.op0_register().size();
                put(mem, off, rng.interesting(), size);
                put(mem, off + size as u64, selector(rng, false) as u64, 2);
            }
        }
        M::Retf | M::Iret | M::Iretd | M::Iretq => {
            let size = match instr.code() {
                Code::Retfw | Code::Retfw_imm16 | Code::Iretw => 2,
                Code::Retfd | Code::Retfd_imm16 | Code::Iretd => 4,
                _ => 8,
            };
            put(mem, stack, landing, size);
            put(mem, stack + size as u64, selector(rng, true) as u64, size);
            if m != M::Retf {
                let fl = flags::FIXED | flags::IF | (rng.next_u64() & (flags::STATUS | flags::DF));
                put(mem, stack + 2 * size as u64, fl, size);
                put(mem, stack + 3 * size as u64, data + 0x400 + rng.below(0x100) * 8, size);
                let ss = if rng.chance(70) { 0x2b } else { selector(rng, false) };
                put(mem, stack + 4 * size as u64, ss as u64, size);
            }
        }
        M::Jmp | M::Call => {
            if let Some(off) = mem_target {
                let size = instr.memory_size().size() - 2;
                put(mem, off, landing, size);
                put(mem, off + size as u64, selector(rng, true) as u64, 2);
            }
        }
        _ => {}
    }
}

/// Random XMM/YMM, x87 stack (some registers valid), FCW and MXCSR with exceptions masked.
fn random_vector_state(x: &mut XSaveArea, rng: &mut Rng) {
    const F64: [u64; 10] = [
        0,
        0x8000_0000_0000_0000,
        0x3ff0_0000_0000_0000,
        0xbff8_0000_0000_0000,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0x7ff8_0000_0000_0000,
        0x7ff4_0000_0000_0000,
        0x0000_0000_0000_0001,
        0x7fef_ffff_ffff_ffff,
    ];
    const F32: [u32; 10] = [
        0,
        0x8000_0000,
        0x3f80_0000,
        0xbfc0_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7fa0_0000,
        1,
        0x7f7f_ffff,
    ];
    let fill16 = |rng: &mut Rng| -> [u8; 16] {
        let mut b = [0u8; 16];
        match rng.below(3) {
            0 => {
                for l in 0..2 {
                    let v = if rng.chance(50) {
                        rng.pick(&F64)
                    } else {
                        (rng.next_u64() >> 12) | 0x4000_0000_0000_0000
                    };
                    b[l * 8..l * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            1 => {
                for l in 0..4 {
                    let v = if rng.chance(50) {
                        rng.pick(&F32)
                    } else {
                        (rng.next_u64() as u32 >> 9) | 0x4000_0000
                    };
                    b[l * 4..l * 4 + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                b[..8].copy_from_slice(&rng.interesting().to_le_bytes());
                b[8..].copy_from_slice(&rng.interesting().to_le_bytes());
            }
        }
        b
    };
    for n in 0..16 {
        let lo = fill16(rng);
        let hi = fill16(rng);
        x.xmm_mut(n).copy_from_slice(&lo);
        x.ymm_hi_mut(n).copy_from_slice(&hi);
    }
    // AVX-512, where the translator manages it: ZMM0-15's upper halves, ZMM16-31, k0-k7.
    for n in 0..32 {
        if let Some(upper) = x.zmm_upper_mut(n) {
            for chunk in upper.chunks_mut(16) {
                chunk.copy_from_slice(&fill16(rng));
            }
        }
    }
    for k in 0..8 {
        let v = match rng.below(4) {
            0 => u64::MAX,
            1 => rng.next_u64(),
            _ => rng.interesting() ^ rng.next_u64() & rng.next_u64(),
        };
        x.set_opmask(k, v);
    }
    x.mark_in_use(crate::cpu::xsave::XsaveLayout::host().managed() & crate::cpu::xsave::component::AVX512);
    // x87: k valid registers ST(0..k).
    let k = rng.below(9) as usize;
    let top = (8 - k) % 8;
    let mut tags = 0u8;
    for st in 0..8 {
        let slot = x.st_mut(st);
        let mantissa = rng.next_u64() | (1 << 63);
        slot[..8].copy_from_slice(&mantissa.to_le_bytes());
        let exp: u16 = match rng.below(6) {
            0 => 0,
            1 => 0x7fff,
            _ => 0x3fff - 40 + rng.below(80) as u16,
        };
        let sign = (rng.below(2) as u16) << 15;
        slot[8..10].copy_from_slice(&(exp | sign).to_le_bytes());
        if st < k {
            tags |= 1 << ((top + st) % 8);
        }
    }
    x.set_ftw(tags);
    x.set_fsw((top as u16) << 11);
    let rc = (rng.below(4) as u16) << 10;
    let pc = if rng.chance(70) {
        3 << 8
    } else {
        (rng.below(4) as u16) << 8
    };
    x.set_fcw(0x3f | 0x40 | pc | rc);
    let mut mxcsr = 0x1f80u32;
    if rng.chance(30) {
        mxcsr |= (rng.below(4) as u32) << 13;
    }
    if rng.chance(15) {
        mxcsr |= 0x8040; // FTZ + DAZ
    }
    x.set_mxcsr(mxcsr);
}

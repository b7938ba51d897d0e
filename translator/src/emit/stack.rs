//! Implicit stack accesses under the soft-MMU. Under the identity strategy push/pop/pushf/popf/
//! leave run natively (guest RSP is a valid host address); under the soft-MMU guest RSP is a
//! guest virtual address, so each is decomposed into explicit accesses that go through
//! `memop.rs`. Memory is accessed before RSP changes, so a fault leaves RSP as the CPU would.

use super::asm::{ctx, reg_num};
use super::BlockEmitter;
use crate::context::off;
use crate::error::TranslateError;
use crate::rules::StackOp;
use iced_x86::{Code, Instruction, MemoryOperand, OpKind, Register};

/// The 16-bit view of a 64-bit register.
pub(super) fn sized16(reg: Register) -> Register {
    const R16: [Register; 16] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
        Register::R8W,
        Register::R9W,
        Register::R10W,
        Register::R11W,
        Register::R12W,
        Register::R13W,
        Register::R14W,
        Register::R15W,
    ];
    R16[reg_num(reg)]
}

/// The 16-, 32- or 64-bit view of a 64-bit register.
fn sized(reg: Register, bytes: u64) -> Register {
    match bytes {
        2 => sized16(reg),
        4 => super::memop::reg32(reg),
        _ => reg,
    }
}

fn mov_store(bytes: u64) -> Code {
    match bytes {
        2 => Code::Mov_rm16_r16,
        4 => Code::Mov_rm32_r32,
        _ => Code::Mov_rm64_r64,
    }
}

fn mov_load(bytes: u64) -> Code {
    match bytes {
        2 => Code::Mov_r16_rm16,
        4 => Code::Mov_r32_rm32,
        _ => Code::Mov_r64_rm64,
    }
}

impl BlockEmitter<'_> {
    fn guest_glue(&self, instr: Result<Instruction, iced_x86::IcedError>) -> Instruction {
        let mut i = instr.expect("stack glue is well-formed");
        i.set_ip(self.guest_rip);
        i
    }

    /// The stack word: 4 bytes in 32-bit code, else 8.
    pub(super) fn word(&self) -> u64 {
        if self.mode.compat {
            4
        } else {
            8
        }
    }

    /// `[rsp+disp]`, or `[esp+disp]` in 32-bit code (the stack is 32-bit there: SS.B is set in
    /// every compatibility-mode stack segment Linux uses).
    pub(super) fn stack_slot(&self, disp: i64) -> MemoryOperand {
        let base = if self.mode.compat { Register::ESP } else { Register::RSP };
        MemoryOperand::with_base_displ(base, disp)
    }

    /// RSP += delta (ESP, wrapping at 4 GiB, in 32-bit code), flags untouched.
    pub(super) fn adjust_rsp(&mut self, delta: i64) {
        let (lea, rsp) = if self.mode.compat {
            (Code::Lea_r32_m, Register::ESP)
        } else {
            (Code::Lea_r64_m, Register::RSP)
        };
        self.asm.glue(Instruction::with2(lea, rsp, self.stack_slot(delta)));
    }

    pub(super) fn stack(&mut self, instr: &Instruction, op: StackOp) -> Result<(), TranslateError> {
        let n = match op {
            // leave sets RSP from RBP; its size is the operand size.
            StackOp::Leave if instr.code() == Code::Leavew => 2,
            StackOp::Leave => self.word(),
            _ => instr.stack_pointer_increment().unsigned_abs() as u64,
        };
        let used = self.used_gprs(instr);
        match op {
            StackOp::Push => {
                match instr.op0_kind() {
                    OpKind::Register => {
                        let store = self.guest_glue(Instruction::with2(
                            mov_store(n),
                            self.stack_slot(-(n as i64)),
                            instr.op0_register(),
                        ));
                        if !self.window_access(self.index, &store)? {
                            self.mem_instr(&store, None, 0)?;
                        }
                    }
                    OpKind::Memory => {
                        let d = self.pick(used);
                        self.borrow(d);
                        let mut load = *instr;
                        load.set_code(mov_load(n));
                        load.set_op1_kind(OpKind::Memory);
                        load.set_op0_kind(OpKind::Register);
                        load.set_op0_register(sized(d, n));
                        self.mem_instr(&load, None, 0)?;
                        let store = self.guest_glue(Instruction::with2(
                            mov_store(n),
                            self.stack_slot(-(n as i64)),
                            sized(d, n),
                        ));
                        self.mem_instr(&store, None, 0)?;
                        self.give_back(d);
                    }
                    _ => {
                        let value = instr.immediate(0);
                        let store = match n {
                            2 => Instruction::with2(Code::Mov_rm16_imm16, self.stack_slot(-2), value as u16 as u32),
                            4 => Instruction::with2(Code::Mov_rm32_imm32, self.stack_slot(-4), value as u32),
                            _ => Instruction::with2(Code::Mov_rm64_imm32, self.stack_slot(-8), value as i64 as i32),
                        };
                        let store = self.guest_glue(store);
                        self.mem_instr(&store, None, 0)?;
                    }
                }
                self.adjust_rsp(-(n as i64));
            }
            StackOp::Pop => match instr.op0_kind() {
                OpKind::Register if instr.op0_register().full_register() != Register::RSP => {
                    let dst = instr.op0_register();
                    let load = self.guest_glue(Instruction::with2(mov_load(n), dst, self.stack_slot(0)));
                    if !self.window_access(self.index, &load)? {
                        self.mem_instr(&load, None, 0)?;
                    }
                    self.adjust_rsp(n as i64);
                }
                OpKind::Register if n == self.word() => {
                    // pop rsp: RSP = [RSP] (pop esp in 32-bit code).
                    let rsp = sized(Register::RSP, n);
                    let load = self.guest_glue(Instruction::with2(mov_load(n), rsp, self.stack_slot(0)));
                    self.mem_instr(&load, None, 0)?;
                }
                OpKind::Register => {
                    let d = self.pick(used);
                    self.borrow(d);
                    let load = self.guest_glue(Instruction::with2(mov_load(n), sized(d, n), self.stack_slot(0)));
                    self.mem_instr(&load, None, 0)?;
                    self.adjust_rsp(n as i64);
                    self.asm
                        .glue(Instruction::with2(Code::Mov_r16_rm16, Register::SP, sized(d, n)));
                    self.give_back(d);
                }
                _ => {
                    let d = self.pick(used);
                    self.borrow(d);
                    let load = self.guest_glue(Instruction::with2(mov_load(n), sized(d, n), self.stack_slot(0)));
                    self.mem_instr(&load, None, 0)?;
                    // The destination address uses RSP after the pop.
                    let mut store = *instr;
                    store.set_code(mov_store(n));
                    store.set_op1_kind(OpKind::Register);
                    store.set_op1_register(sized(d, n));
                    if store.memory_base().full_register() == Register::RSP {
                        store.set_memory_displacement64(store.memory_displacement64().wrapping_add(n));
                        store.set_memory_displ_size(if self.mode.compat { 4 } else { 8 });
                    }
                    self.mem_instr(&store, None, 1 << reg_num(d))?;
                    self.give_back(d);
                    self.adjust_rsp(n as i64);
                }
            },
            StackOp::Pushf => {
                let d = self.pick(used);
                self.borrow(d);
                self.asm.mov_to_ctx(off::RSP_SAVE, Register::RSP);
                self.asm.mov_from_ctx(Register::RSP, off::FLAG_STACK_TOP);
                self.asm.op0(Code::Pushfq);
                if self.mode.system {
                    // CPL0 (`Rule::runs_in_engine`): the host holds only the status flags and
                    // DF; the rest is in the context. The pushed copy restores the guest's flags.
                    use crate::state::flags;
                    let host = (flags::STATUS | flags::DF | flags::FIXED) as u32;
                    let a = &mut self.asm;
                    a.glue(Instruction::with2(
                        Code::Mov_r64_rm64,
                        d,
                        MemoryOperand::with_base(Register::RSP),
                    ));
                    a.glue(Instruction::with2(Code::And_rm64_imm32, d, host));
                    a.glue(Instruction::with2(Code::Or_r64_rm64, d, ctx(off::VIRTUAL_FLAGS)));
                    a.glue(Instruction::with2(Code::Or_r64_rm64, d, ctx(off::VIRTUAL_IF)));
                    a.op0(Code::Popfq);
                } else {
                    self.asm.glue(Instruction::with1(Code::Pop_r64, d));
                }
                self.asm.mov_from_ctx(Register::RSP, off::RSP_SAVE);
                let store = self.guest_glue(Instruction::with2(
                    mov_store(n),
                    self.stack_slot(-(n as i64)),
                    sized(d, n),
                ));
                self.mem_instr(&store, None, 0)?;
                self.give_back(d);
                self.adjust_rsp(-(n as i64));
            }
            StackOp::Popf => {
                let d = self.pick(used);
                self.borrow(d);
                let load = self.guest_glue(Instruction::with2(mov_load(n), sized(d, n), self.stack_slot(0)));
                self.mem_instr(&load, None, 0)?;
                self.asm.mov_to_ctx(off::RSP_SAVE, Register::RSP);
                self.asm.mov_from_ctx(Register::RSP, off::FLAG_STACK_TOP);
                self.asm.glue(Instruction::with1(Code::Push_r64, d));
                self.asm.op0(if n == 2 { Code::Popfw } else { Code::Popfq });
                self.asm.mov_from_ctx(Register::RSP, off::RSP_SAVE);
                self.give_back(d);
                self.adjust_rsp(n as i64);
            }
            StackOp::Leave => {
                let d = self.pick(used);
                self.borrow(d);
                let (lea, rsp, rbp) = if self.mode.compat {
                    (Code::Lea_r32_m, Register::ESP, Register::EBP)
                } else {
                    (Code::Lea_r64_m, Register::RSP, Register::RBP)
                };
                let load = self.guest_glue(Instruction::with2(
                    mov_load(n),
                    sized(d, n),
                    MemoryOperand::with_base(rbp),
                ));
                self.mem_instr(&load, None, 0)?;
                self.asm.glue(Instruction::with2(
                    lea,
                    rsp,
                    MemoryOperand::with_base_displ(rbp, n as i64),
                ));
                self.asm
                    .glue(Instruction::with2(mov_load(n), sized(Register::RBP, n), sized(d, n)));
                self.give_back(d);
            }
        }
        Ok(())
    }
}

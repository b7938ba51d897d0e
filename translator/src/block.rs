//! The block builder: decodes guest code at a RIP with iced-x86 until an unconditional control
//! transfer, an instruction the engine must emulate, a page boundary or the size cap.
//!
//! Blocks are *extended*: a conditional branch does not end one. Its taken side leaves the block
//! (a chained exit) and decoding goes on along the fall-through side, which saves the
//! `jmp` a block-ending `jcc` would need for its fall-through on every execution (measured
//! on busybox `sh`, whose hot loops are chains of short `cmp`/`jcc` runs).

use crate::exit::{vector, GuestException};
use crate::rules::{rule, BranchKind, Rule};
use iced_x86::{Decoder, DecoderOptions, Instruction};

/// Most instructions in one block.
pub const MAX_BLOCK_INSTRUCTIONS: usize = 64;
const PAGE: u64 = 4096;

pub struct DecodedInstr {
    pub instr: Instruction,
    pub rule: Rule,
    pub bytes: Vec<u8>,
}

pub struct DecodedBlock {
    pub start: u64,
    /// Guest address after the last instruction.
    pub end: u64,
    pub instrs: Vec<DecodedInstr>,
    /// The last instruction leaves the block itself (unconditional branch or engine exit); a
    /// block ending in a `jcc` still needs its fall-through exit.
    pub terminated: bool,
}

impl DecodedBlock {
    pub fn ends_in_transfer(&self) -> bool {
        self.terminated
    }
}

/// Why no block could be built at a RIP.
pub enum BuildError {
    /// The guest would take this exception fetching or decoding the first instruction.
    Fault(GuestException),
    /// The first instruction has no rule.
    Unsupported(Instruction, Vec<u8>),
}

/// Fetches guest code: fills as much of `buf` from guest address `addr` as is readable and
/// returns the count, or the fetch fault if nothing at `addr` is readable.
pub trait CodeFetch {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GuestException>;
}

use crate::supported::is_supported;

/// Decodes one block at `rip`. `soft_mmu` and `system` (system mode) decide which rules end a
/// block.
pub fn build(
    fetch: &mut dyn CodeFetch,
    rip: u64,
    soft_mmu: bool,
    system: bool,
    verified_only: bool,
    max_instructions: usize,
) -> Result<DecodedBlock, BuildError> {
    let page_end = (rip & !(PAGE - 1)) + PAGE;
    let mut buf = vec![0u8; (page_end - rip) as usize + 15];
    let first = fetch
        .fetch(rip, &mut buf[..(page_end - rip) as usize])
        .map_err(BuildError::Fault)?;
    let mut avail = first;
    let mut second_fault = None;
    if first == (page_end - rip) as usize {
        match fetch.fetch(page_end, &mut buf[first..first + 15]) {
            Ok(n) => avail += n,
            Err(e) => second_fault = Some(e),
        }
    }
    let mut decoder = Decoder::with_ip(64, &buf[..avail], rip, DecoderOptions::NONE);
    let mut instrs = Vec::new();
    let mut terminated = false;
    let mut end = rip;
    while decoder.can_decode() && end < page_end && instrs.len() < max_instructions.min(MAX_BLOCK_INSTRUCTIONS) {
        let pos = decoder.position();
        let instr = decoder.decode();
        if instr.is_invalid() {
            if instrs.is_empty() {
                let truncated = avail - pos < 15 && decoder.last_error() == iced_x86::DecoderError::NoMoreBytes;
                return Err(BuildError::Fault(match (truncated, second_fault) {
                    (true, Some(f)) => f,
                    _ => GuestException::new(vector::UD),
                }));
            }
            break;
        }
        let bytes = buf[pos..pos + instr.len()].to_vec();
        let verified = !verified_only || is_supported(instr.code());
        let Some(r) = rule(instr.code()).filter(|_| verified) else {
            if instrs.is_empty() {
                return Err(BuildError::Unsupported(instr, bytes));
            }
            break;
        };
        let fs_gs = matches!(instr.segment_prefix(), iced_x86::Register::FS | iced_x86::Register::GS);
        let ends = match r {
            Rule::Branch(BranchKind::Jcc) => false,
            Rule::Branch(_) => true,
            _ => r.runs_in_engine(soft_mmu, fs_gs, system),
        };
        end = instr.next_ip();
        instrs.push(DecodedInstr { instr, rule: r, bytes });
        if ends {
            terminated = true;
            break;
        }
    }
    if instrs.is_empty() {
        // Only possible when nothing was decodable before the page end.
        return Err(BuildError::Fault(
            second_fault.unwrap_or(GuestException::new(vector::UD)),
        ));
    }
    Ok(DecodedBlock {
        start: rip,
        end,
        instrs,
        terminated,
    })
}

//! Linear sweep of one ELF image: count instruction forms in every executable section.
//!
//! goblin reads the headers (sections, program headers, dynamic info); iced-x86 decodes the
//! bytes of every `SHF_EXECINSTR` section from its start to its end, the way `objdump -d` does.
//! Bytes that do not decode are skipped one at a time and counted as invalid. A file without
//! section headers (e.g. `sstrip`ped) is swept through its executable `PT_LOAD` segments instead.
//!
//! Nothing here panics on hostile input: every offset is bounds-checked and problems come back
//! as [`SweepError`] naming the section and offset.

use goblin::elf::{header, program_header, section_header, Elf};
use iced_x86::{Decoder, DecoderOptions, Instruction};
use serde::{Deserialize, Serialize};

/// What kind of loadable object an ELF file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElfKind {
    /// A program: `ET_EXEC`, or `ET_DYN` with a `PT_INTERP` (PIE).
    Executable,
    /// A shared object without an interpreter (a library or a plugin).
    SharedObject,
}

/// Result of sweeping one x86-64 ELF file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BinaryScan {
    /// `(Code index, occurrences)` sorted by code.
    pub counts: Vec<(u16, u32)>,
    /// Bytes in executable sections (decoded, valid or not).
    pub code_bytes: u64,
    /// Bytes that did not decode.
    pub invalid_bytes: u64,
    pub kind: Option<ElfKind>,
    pub soname: Option<String>,
    pub needed: Vec<String>,
    /// `DT_RUNPATH` (or `DT_RPATH`) directories, unexpanded.
    pub runpath: Vec<String>,
    pub interp: Option<String>,
}

impl BinaryScan {
    pub fn instructions(&self) -> u64 {
        self.counts.iter().map(|&(_, n)| n as u64).sum()
    }
}

/// How a file's content was classified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepOutcome {
    X86_64(BinaryScan),
    /// A valid ELF for another machine or class (32-bit x86, BPF, firmware, …).
    OtherArch {
        machine: u16,
        class64: bool,
    },
    /// Relocatable objects and core dumps: not loaded as programs, not part of footprints.
    NotLoadable {
        e_type: u16,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SweepError {
    #[error("malformed ELF: {0}")]
    Malformed(String),
    #[error("section {section} at file offset {offset:#x} with size {size:#x} runs past the end of the file ({file_len:#x} bytes): truncated?")]
    Truncated {
        section: String,
        offset: u64,
        size: u64,
        file_len: u64,
    },
}

pub const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// The largest ELF file (or `.deb` member) swept: real binaries are at most a few hundred MiB;
/// a sparse or decompression-bomb "ELF" beyond this is reported instead of costing minutes and
/// gigabytes.
pub const MAX_ELF_BYTES: u64 = 2 << 30;

pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(ELF_MAGIC)
}

/// Reusable per-thread state: a dense counter over all `Code`s.
pub struct Sweeper {
    dense: Vec<u32>,
    instr: Instruction,
}

impl Default for Sweeper {
    fn default() -> Self {
        Sweeper {
            dense: vec![0; crate::keys::code_count()],
            instr: Instruction::default(),
        }
    }
}

impl Sweeper {
    /// Classify and sweep one whole ELF image.
    pub fn sweep_elf(&mut self, bytes: &[u8]) -> Result<SweepOutcome, SweepError> {
        let hdr = Elf::parse_header(bytes).map_err(|e| SweepError::Malformed(e.to_string()))?;
        let class64 = hdr.e_ident[header::EI_CLASS] == header::ELFCLASS64;
        if hdr.e_machine != header::EM_X86_64 || !class64 {
            return Ok(SweepOutcome::OtherArch {
                machine: hdr.e_machine,
                class64,
            });
        }
        if hdr.e_type != header::ET_EXEC && hdr.e_type != header::ET_DYN {
            return Ok(SweepOutcome::NotLoadable { e_type: hdr.e_type });
        }
        let elf = Elf::parse(bytes)
            .map_err(|e| SweepError::Malformed(format!("{e} (file is {} bytes: truncated or corrupt)", bytes.len())))?;
        let kind = if elf.header.e_type == header::ET_EXEC || elf.interpreter.is_some() {
            ElfKind::Executable
        } else {
            ElfKind::SharedObject
        };
        let mut scan = BinaryScan {
            kind: Some(kind),
            soname: elf.soname.map(str::to_owned),
            needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
            runpath: elf
                .runpaths
                .iter()
                .chain(&elf.rpaths)
                .flat_map(|p| p.split(':'))
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            interp: elf.interpreter.map(str::to_owned),
            ..BinaryScan::default()
        };

        let mut regions = Vec::new();
        for sh in &elf.section_headers {
            if sh.sh_flags & u64::from(section_header::SHF_EXECINSTR) == 0
                || sh.sh_type == section_header::SHT_NOBITS
                || sh.sh_size == 0
            {
                continue;
            }
            let name = elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("?").to_string();
            regions.push((name, sh.sh_offset, sh.sh_size, sh.sh_addr));
        }
        if elf.section_headers.is_empty() {
            for (i, ph) in elf.program_headers.iter().enumerate() {
                if ph.p_type == program_header::PT_LOAD && ph.p_flags & program_header::PF_X != 0 && ph.p_filesz > 0 {
                    regions.push((format!("PT_LOAD[{i}]"), ph.p_offset, ph.p_filesz, ph.p_vaddr));
                }
            }
        }
        for (section, offset, size, addr) in regions {
            let end = offset.checked_add(size).filter(|&e| e <= bytes.len() as u64);
            let Some(end) = end else {
                return Err(SweepError::Truncated {
                    section,
                    offset,
                    size,
                    file_len: bytes.len() as u64,
                });
            };
            self.sweep_code(&bytes[offset as usize..end as usize], addr, &mut scan);
        }
        scan.counts = self.drain_counts();
        Ok(SweepOutcome::X86_64(scan))
    }

    /// Decode `code` linearly as 64-bit code at `ip`, adding to the dense counters.
    pub fn sweep_code(&mut self, code: &[u8], ip: u64, scan: &mut BinaryScan) {
        let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
        let instr = &mut self.instr;
        while decoder.can_decode() {
            let start = decoder.position();
            decoder.decode_out(instr);
            if instr.is_invalid() {
                scan.invalid_bytes += 1;
                // Resynchronise one byte later, as objdump does after "(bad)".
                let _ = decoder.set_position(start + 1);
                decoder.set_ip(ip.wrapping_add(start as u64 + 1));
            } else {
                self.dense[instr.code() as usize] += 1;
            }
        }
        scan.code_bytes += code.len() as u64;
    }

    /// Move the dense counters into a sorted sparse list and reset them.
    pub fn drain_counts(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        for (code, n) in self.dense.iter_mut().enumerate() {
            if *n != 0 {
                out.push((code as u16, *n));
                *n = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Code;

    #[test]
    fn sweeps_raw_code_and_counts_invalid_bytes() {
        let mut s = Sweeper::default();
        let mut scan = BinaryScan::default();
        // add eax, ebx ; <0x06: invalid in 64-bit> ; ret
        s.sweep_code(&[0x01, 0xd8, 0x06, 0xc3], 0x1000, &mut scan);
        let counts = s.drain_counts();
        assert_eq!(counts, vec![(Code::Add_rm32_r32 as u16, 1), (Code::Retnq as u16, 1)]);
        assert_eq!(scan.invalid_bytes, 1);
        assert_eq!(scan.code_bytes, 4);
    }

    #[test]
    fn truncated_instruction_at_end_counts_as_invalid() {
        let mut s = Sweeper::default();
        let mut scan = BinaryScan::default();
        // mov eax, imm32 cut after two bytes
        s.sweep_code(&[0xb8, 0x01], 0, &mut scan);
        assert!(s.drain_counts().is_empty());
        assert_eq!(scan.invalid_bytes, 2);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut s = Sweeper::default();
        assert!(s.sweep_elf(b"\x7fELF").is_err());
        assert!(s.sweep_elf(b"not an elf at all").is_err());
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(ELF_MAGIC);
        hdr[4] = 2; // 64-bit
        hdr[5] = 1; // little endian
        hdr[6] = 1;
        hdr[16] = 3; // ET_DYN
        hdr[18] = 62; // EM_X86_64
        hdr[40] = 0xff; // e_shoff far past the end
        hdr[58] = 64; // e_shentsize
        hdr[60] = 5; // e_shnum
        let _ = s.sweep_elf(&hdr); // must not panic, whatever it decides
    }
}

//! Bare-metal x86-64 ELF (the test guests): PT_LOAD segments at their physical addresses,
//! entered in long mode at e_entry.

use super::Entry;
use crate::vmm::memory::GuestMemory;
use anyhow::{bail, Result};
use goblin::elf::{header, program_header::PT_LOAD, Elf};

pub fn load(bytes: &[u8], mem: &mut GuestMemory) -> Result<Entry> {
    let elf = Elf::parse(bytes).map_err(|e| anyhow::anyhow!("malformed ELF: {e}"))?;
    if elf.header.e_machine != header::EM_X86_64 || !elf.is_64 {
        bail!("not an x86-64 ELF (machine {})", elf.header.e_machine);
    }
    let mut loaded = 0;
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let start = ph.p_offset as usize;
        let end = start.checked_add(ph.p_filesz as usize).filter(|&e| e <= bytes.len());
        let Some(end) = end else {
            bail!(
                "PT_LOAD at file offset {:#x} runs past the end of the file",
                ph.p_offset
            );
        };
        if ph.p_memsz < ph.p_filesz {
            bail!("PT_LOAD at {:#x} has memsz < filesz", ph.p_paddr);
        }
        let mut image = bytes[start..end].to_vec();
        image.resize(ph.p_memsz as usize, 0);
        mem.write(ph.p_paddr, &image)
            .map_err(|e| e.context(format!("PT_LOAD at {:#x} ({} bytes)", ph.p_paddr, ph.p_memsz)))?;
        loaded += 1;
    }
    if loaded == 0 {
        bail!("ELF has no PT_LOAD segment");
    }
    Ok(Entry {
        rip: elf.entry,
        rsp: crate::vmm::boot::BOOT_STACK,
        rsi: 0,
        kind: "ELF",
    })
}

//! Loading a static x86-64 Linux ELF into this process (identity strategy: guest addresses are
//! host addresses) and building the initial stack the kernel would: argc, argv, envp, auxv.

use anyhow::{bail, Context, Result};
use goblin::elf::{program_header::PT_LOAD, Elf};
use std::path::Path;

const PAGE: u64 = 4096;
/// Where a static-PIE is placed.
const PIE_BASE: u64 = 0x5555_0000_0000;
const STACK_SIZE: u64 = 8 << 20;

/// A loaded program.
pub struct Image {
    pub entry: u64,
    pub phdr: u64,
    pub phnum: u64,
    pub phent: u64,
    /// First byte after the highest segment: where the heap (brk) starts.
    pub brk: u64,
}

fn map_fixed(addr: u64, len: u64, prot: i32) -> Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping (it fails instead).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 != addr {
        bail!("cannot map {len:#x} bytes at {addr:#x} (taken by hbt itself or out of range)");
    }
    Ok(())
}

/// Maps the program's PT_LOAD segments.
pub fn load(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let elf = Elf::parse(&bytes).with_context(|| format!("{}: not a valid ELF file", path.display()))?;
    if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
        bail!("{}: not an x86-64 ELF", path.display());
    }
    if elf.interpreter.is_some() {
        bail!(
            "{}: dynamically linked (PT_INTERP {:?}); hbt exec runs static programs",
            path.display(),
            elf.interpreter
        );
    }
    let pie = elf.header.e_type == goblin::elf::header::ET_DYN;
    let base = if pie { PIE_BASE } else { 0 };
    let loads: Vec<_> = elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD).collect();
    if loads.is_empty() {
        bail!("{}: no loadable segments", path.display());
    }
    let mut brk = 0;
    for ph in &loads {
        let start = (base + ph.p_vaddr) & !(PAGE - 1);
        let end = (base + ph.p_vaddr + ph.p_memsz + PAGE - 1) & !(PAGE - 1);
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .filter(|&e| e <= bytes.len() as u64);
        let Some(file_end) = file_end else {
            bail!(
                "{}: segment at {:#x} extends past the end of the file",
                path.display(),
                ph.p_vaddr
            );
        };
        map_fixed(start, end - start, libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the destination was just mapped writable and spans the segment.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes[ph.p_offset as usize..file_end as usize].as_ptr(),
                (base + ph.p_vaddr) as *mut u8,
                ph.p_filesz as usize,
            );
        }
        let mut prot = 0;
        if ph.is_read() {
            prot |= libc::PROT_READ;
        }
        if ph.is_write() {
            prot |= libc::PROT_WRITE;
        }
        if ph.is_executable() {
            // Translated, never executed natively; readable so the translator can fetch it.
            prot |= libc::PROT_READ;
        }
        // SAFETY: changing the protection of the range mapped above.
        unsafe { libc::mprotect(start as *mut libc::c_void, (end - start) as usize, prot) };
        brk = brk.max(end);
    }
    let phdr = elf
        .program_headers
        .iter()
        .find(|p| p.p_type == goblin::elf::program_header::PT_PHDR)
        .map(|p| base + p.p_vaddr)
        .unwrap_or_else(|| base + loads[0].p_vaddr - loads[0].p_offset + elf.header.e_phoff);
    Ok(Image {
        entry: base + elf.entry,
        phdr,
        phnum: elf.header.e_phnum as u64,
        phent: elf.header.e_phentsize as u64,
        brk,
    })
}

/// Maps the stack and writes argc/argv/envp/auxv; returns the initial RSP.
pub fn build_stack(image: &Image, args: &[String], env: &[String], hwcap: u64, execfn: &str) -> Result<u64> {
    // SAFETY: anonymous mapping at a kernel-chosen address, checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        bail!("cannot map the guest stack");
    }
    let top = base as u64 + STACK_SIZE;
    let mut sp = top;
    let push_bytes = |sp: &mut u64, data: &[u8]| -> u64 {
        *sp -= data.len() as u64;
        // SAFETY: inside the stack mapping (strings are far smaller than 8 MiB).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), *sp as *mut u8, data.len()) };
        *sp
    };
    let cstr = |sp: &mut u64, s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        push_bytes(sp, &v)
    };
    let execfn_at = cstr(&mut sp, execfn);
    let platform_at = cstr(&mut sp, "x86_64");
    let env_at: Vec<u64> = env.iter().map(|e| cstr(&mut sp, e)).collect();
    let arg_at: Vec<u64> = args.iter().map(|a| cstr(&mut sp, a)).collect();
    let mut random = [0u8; 16];
    // SAFETY: getrandom writes 16 bytes into the buffer.
    unsafe { libc::getrandom(random.as_mut_ptr() as *mut libc::c_void, 16, 0) };
    let random_at = push_bytes(&mut sp, &random);
    sp &= !15;
    let auxv: [(u64, u64); 17] = [
        (3, image.phdr),  // AT_PHDR
        (4, image.phent), // AT_PHENT
        (5, image.phnum), // AT_PHNUM
        (6, PAGE),        // AT_PAGESZ
        (7, 0),           // AT_BASE
        (8, 0),           // AT_FLAGS
        (9, image.entry), // AT_ENTRY
        // SAFETY-free getters: ids of this process.
        (11, unsafe { libc::getuid() } as u64),  // AT_UID
        (12, unsafe { libc::geteuid() } as u64), // AT_EUID
        (13, unsafe { libc::getgid() } as u64),  // AT_GID
        (14, unsafe { libc::getegid() } as u64), // AT_EGID
        (15, platform_at),                       // AT_PLATFORM
        (16, hwcap),                             // AT_HWCAP
        (17, 100),                               // AT_CLKTCK
        (23, 0),                                 // AT_SECURE
        (25, random_at),                         // AT_RANDOM
        (31, execfn_at),                         // AT_EXECFN
    ];
    let words = 1 + arg_at.len() + 1 + env_at.len() + 1 + 2 * (auxv.len() + 2);
    sp -= 8 * words as u64;
    sp &= !15;
    let mut w = sp;
    let mut put = |v: u64| {
        // SAFETY: inside the stack mapping, 8-byte aligned.
        unsafe { *(w as *mut u64) = v };
        w += 8;
    };
    put(arg_at.len() as u64);
    arg_at.iter().for_each(|&a| put(a));
    put(0);
    env_at.iter().for_each(|&e| put(e));
    put(0);
    for (k, v) in auxv {
        put(k);
        put(v);
    }
    put(26); // AT_HWCAP2
    put(0);
    put(0); // AT_NULL
    put(0);
    Ok(sp)
}

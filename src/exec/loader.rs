//! Loading an x86-64 Linux ELF into this process (identity strategy: guest addresses are host
//! addresses) and building the initial stack the kernel would: argc, argv, envp, auxv.
//!
//! Static programs (non-PIE and static-PIE) start at their entry point. A dynamically linked
//! program gets its PT_INTERP (ld.so) loaded too, at an address the kernel picks, and starts in
//! the interpreter, with AT_BASE/AT_ENTRY/AT_PHDR telling it where everything is, as execve(2)
//! would arrange; ld.so then maps the libraries itself through (passed-through) mmap.

use anyhow::{bail, Context, Result};
use goblin::elf::{program_header::PT_LOAD, Elf};
use std::path::Path;

const PAGE: u64 = 4096;
/// Where a static-PIE is placed.
const PIE_BASE: u64 = 0x5555_0000_0000;
const STACK_SIZE: u64 = 8 << 20;

/// A loaded program.
pub struct Image {
    /// Where execution starts (the interpreter's entry for a dynamic program).
    pub entry: u64,
    /// The program's own entry (AT_ENTRY).
    pub program_entry: u64,
    /// Where the interpreter is loaded (AT_BASE), 0 for static programs.
    pub interp_base: u64,
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

/// A mapped ELF: its load bias and what the auxiliary vector needs.
struct Mapped {
    base: u64,
    entry: u64,
    phdr: u64,
    phnum: u64,
    phent: u64,
    end: u64,
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<Elf<'a>> {
    let elf = Elf::parse(bytes).with_context(|| format!("{}: not a valid ELF file", path.display()))?;
    if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
        bail!("{}: not an x86-64 ELF", path.display());
    }
    Ok(elf)
}

/// Maps `elf`'s PT_LOAD segments at `base` + their addresses, or, with `base == None`, at a
/// base the kernel picks (a reservation of the whole span, then segments inside it).
fn map_elf(path: &Path, bytes: &[u8], elf: &Elf, base: Option<u64>) -> Result<Mapped> {
    let loads: Vec<_> = elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD).collect();
    if loads.is_empty() {
        bail!("{}: no loadable segments", path.display());
    }
    let lo = loads.iter().map(|p| p.p_vaddr & !(PAGE - 1)).min().unwrap_or(0);
    let hi = loads
        .iter()
        .map(|p| p.p_vaddr.saturating_add(p.p_memsz))
        .max()
        .unwrap_or(0);
    let span = (hi.saturating_sub(lo) + PAGE - 1) & !(PAGE - 1);
    if span == 0 || span > 1 << 40 {
        bail!("{}: implausible PT_LOAD span {span:#x}", path.display());
    }
    let base = match base {
        Some(b) => b,
        None => {
            // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address, checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    span as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                bail!("{}: cannot reserve {span:#x} bytes for it", path.display());
            }
            // SAFETY: give the reservation back; the segments are mapped into exactly this range
            // right after (single-threaded, so nothing else can take it in between).
            unsafe { libc::munmap(p, span as usize) };
            p as u64 - lo
        }
    };
    let mut end = 0;
    for ph in &loads {
        let start = (base + ph.p_vaddr) & !(PAGE - 1);
        let seg_end = (base + ph.p_vaddr + ph.p_memsz + PAGE - 1) & !(PAGE - 1);
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .filter(|&e| e <= bytes.len() as u64 && ph.p_filesz <= ph.p_memsz);
        let Some(file_end) = file_end else {
            bail!(
                "{}: segment at {:#x} extends past the end of the file",
                path.display(),
                ph.p_vaddr
            );
        };
        map_fixed(start, seg_end - start, libc::PROT_READ | libc::PROT_WRITE)?;
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
        unsafe { libc::mprotect(start as *mut libc::c_void, (seg_end - start) as usize, prot) };
        end = end.max(seg_end);
    }
    let phdr = elf
        .program_headers
        .iter()
        .find(|p| p.p_type == goblin::elf::program_header::PT_PHDR)
        .map(|p| base + p.p_vaddr)
        .unwrap_or_else(|| base + loads[0].p_vaddr - loads[0].p_offset + elf.header.e_phoff);
    Ok(Mapped {
        base,
        entry: base + elf.entry,
        phdr,
        phnum: elf.header.e_phnum as u64,
        phent: elf.header.e_phentsize as u64,
        end,
    })
}

/// What execve(2) would run for `path` with `argv`: the file itself if it is an ELF, or the
/// interpreter of a `#!` script with the script spliced into the arguments (one level, as
/// binfmt_script). Errors are the errno execve would return.
pub fn resolve_exec(path: &str, argv: Vec<String>) -> Result<(String, Vec<String>), i32> {
    let c = std::ffi::CString::new(path).map_err(|_| libc::ENOENT)?;
    // SAFETY: access(2) on a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOENT));
    }
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EACCES))?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        return Ok((path.to_string(), argv));
    }
    if !head.starts_with(b"#!") {
        return Err(libc::ENOEXEC);
    }
    let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let line = line.trim();
    let (interp, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i.to_string(), Some(a.trim().to_string())),
        None => (line.to_string(), None),
    };
    if interp.is_empty() {
        return Err(libc::ENOEXEC);
    }
    let mut new_argv = vec![interp.clone()];
    new_argv.extend(arg);
    new_argv.push(path.to_string());
    new_argv.extend(argv.into_iter().skip(1));
    Ok((interp, new_argv))
}

/// Maps the program (and its interpreter, if it has one).
pub fn load(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let elf = parse(path, &bytes)?;
    let pie = elf.header.e_type == goblin::elf::header::ET_DYN;
    let program = map_elf(path, &bytes, &elf, Some(if pie { PIE_BASE } else { 0 }))?;
    let (entry, interp_base) = match elf.interpreter {
        None => (program.entry, 0),
        Some(interp) => {
            let ipath = Path::new(interp);
            let ibytes = std::fs::read(ipath)
                .with_context(|| format!("{}: cannot read its interpreter {interp}", path.display()))?;
            let ielf = parse(ipath, &ibytes)?;
            if ielf.header.e_type != goblin::elf::header::ET_DYN || ielf.interpreter.is_some() {
                bail!("{}: interpreter {interp} is not a shared object", path.display());
            }
            let m = map_elf(ipath, &ibytes, &ielf, None)?;
            (m.entry, m.base)
        }
    };
    Ok(Image {
        entry,
        program_entry: program.entry,
        interp_base,
        phdr: program.phdr,
        phnum: program.phnum,
        phent: program.phent,
        brk: program.end,
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
        (3, image.phdr),          // AT_PHDR
        (4, image.phent),         // AT_PHENT
        (5, image.phnum),         // AT_PHNUM
        (6, PAGE),                // AT_PAGESZ
        (7, image.interp_base),   // AT_BASE
        (8, 0),                   // AT_FLAGS
        (9, image.program_entry), // AT_ENTRY
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

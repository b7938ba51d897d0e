//! Loading an x86-64 Linux ELF into this process (identity strategy: guest addresses are host
//! addresses) and building the initial stack the kernel would: argc, argv, envp, auxv.
//!
//! Static programs (non-PIE and static-PIE) start at their entry point. A dynamically linked
//! program gets its PT_INTERP (ld.so) loaded too, at an address the kernel picks, and starts in
//! the interpreter, with AT_BASE/AT_ENTRY/AT_PHDR telling it where everything is, as execve(2)
//! would arrange; ld.so then maps the libraries itself through (passed-through) mmap.

use super::elf::{self, Executable, Refusal};
use anyhow::{bail, Result};
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
    /// PT_GNU_STACK asks for an executable stack.
    pub exec_stack: bool,
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

/// Why a program cannot run: execve(2)'s errno (the kernel would refuse it) or, for a problem
/// the kernel meets after the point of no return, the signal that would kill it.
#[derive(Debug)]
pub enum LoadError {
    Refused(Refusal),
    Killed { signal: i32, why: String },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Refused(r) => write!(f, "{r}"),
            LoadError::Killed { why, .. } => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for LoadError {}

impl From<Refusal> for LoadError {
    fn from(r: Refusal) -> Self {
        LoadError::Refused(r)
    }
}

fn killed(why: String) -> LoadError {
    LoadError::Killed {
        signal: libc::SIGSEGV,
        why,
    }
}

fn page_down(v: u64) -> u64 {
    v & !(PAGE - 1)
}

fn page_up(v: u64) -> Option<u64> {
    v.checked_add(PAGE - 1).map(page_down)
}

/// `mmap` with a checked result.
fn mmap(addr: u64, len: u64, prot: i32, flags: i32, fd: i32, offset: u64) -> Result<u64, std::io::Error> {
    // SAFETY: every caller maps inside a reservation it made (MAP_FIXED) or asks for a
    // kernel-chosen/NOREPLACE address; the result is checked.
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len as usize, prot, flags, fd, offset as i64) };
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(p as u64)
    }
}

fn prot_of(flags: u32) -> i32 {
    let mut prot = 0;
    if flags & elf::PF_R != 0 {
        prot |= libc::PROT_READ;
    }
    if flags & elf::PF_W != 0 {
        prot |= libc::PROT_WRITE;
    }
    if flags & elf::PF_X != 0 {
        // The guest's code is translated, never run natively; PROT_EXEC is kept because the
        // translator honours no-execute from the host's protections, and it must be readable.
        prot |= libc::PROT_EXEC | libc::PROT_READ;
    }
    prot
}

/// Maps `exe`'s PT_LOAD segments from its file at `base` + their addresses, or, with
/// `base == None`, at a base the kernel picks: a reservation of the whole span first, then
/// each segment inside it, file-backed as the kernel maps them (a segment past the end of the
/// file faults when touched), with the bss zeroed and mapped anonymously.
fn map_elf(path: &Path, exe: &Executable, base: Option<u64>) -> Result<Mapped, LoadError> {
    let loads: Vec<_> = exe.headers.phdrs.iter().filter(|p| p.p_type == elf::PT_LOAD).collect();
    if loads.is_empty() {
        return Err(killed(format!("{}: no loadable segments", path.display())));
    }
    for p in &loads {
        if p.filesz > p.memsz {
            return Err(killed(format!(
                "{}: segment at {:#x} has p_filesz > p_memsz",
                path.display(),
                p.vaddr
            )));
        }
        if p.offset % PAGE != p.vaddr % PAGE {
            return Err(killed(format!(
                "{}: segment at {:#x} is not congruent with its file offset {:#x} modulo the page size",
                path.display(),
                p.vaddr,
                p.offset
            )));
        }
    }
    let lo = loads.iter().map(|p| page_down(p.vaddr)).min().unwrap_or(0);
    let hi = loads
        .iter()
        .map(|p| p.vaddr.checked_add(p.memsz))
        .try_fold(0u64, |m, e| e.map(|e| m.max(e)));
    let span = hi.and_then(page_up).map(|hi| hi.saturating_sub(lo)).unwrap_or(0);
    if span == 0 || span > 1 << 40 {
        return Err(killed(format!(
            "{}: implausible PT_LOAD span {span:#x}",
            path.display()
        )));
    }
    let reserve = |at: u64, flags: i32| {
        mmap(
            at,
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    let base = match base {
        Some(b) => {
            let at = b.wrapping_add(lo);
            match reserve(at, libc::MAP_FIXED_NOREPLACE) {
                Ok(p) if p == at => b,
                _ => {
                    return Err(killed(format!(
                        "{}: cannot map {span:#x} bytes at {at:#x} (taken by hbt itself or out of range)",
                        path.display()
                    )))
                }
            }
        }
        None => match reserve(0, 0) {
            Ok(p) => p - lo,
            Err(e) => {
                return Err(killed(format!(
                    "{}: cannot reserve {span:#x} bytes: {e}",
                    path.display()
                )))
            }
        },
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&exe.file);
    let mut end = 0;
    for p in &loads {
        let va = base + p.vaddr;
        let start = page_down(va);
        let file_end = va + p.filesz;
        let mem_end = page_up(va + p.memsz).unwrap_or(u64::MAX);
        let prot = prot_of(p.flags);
        let fixed = libc::MAP_PRIVATE | libc::MAP_FIXED;
        if p.filesz > 0 {
            let len = page_up(file_end).unwrap_or(u64::MAX) - start;
            // Writable while the bss tail is zeroed; the final protection is set below.
            mmap(
                start,
                len,
                prot | libc::PROT_WRITE | libc::PROT_READ,
                fixed,
                fd,
                page_down(p.offset),
            )
            .map_err(|e| killed(format!("{}: cannot map the segment at {va:#x}: {e}", path.display())))?;
            let tail = page_up(file_end).unwrap_or(file_end) - file_end;
            if p.memsz > p.filesz
                && tail > 0
                && !hbt_translator::mmu::write_host_checked(file_end, &vec![0u8; tail as usize])
            {
                return Err(killed(format!(
                    "{}: cannot clear the bss of the segment at {va:#x} (the file ends before it)",
                    path.display()
                )));
            }
        }
        let anon_start = if p.filesz > 0 {
            page_up(file_end).unwrap_or(u64::MAX)
        } else {
            start
        };
        if mem_end > anon_start {
            mmap(
                anon_start,
                mem_end - anon_start,
                libc::PROT_READ | libc::PROT_WRITE,
                fixed | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
            .map_err(|e| {
                killed(format!(
                    "{}: cannot map the bss at {anon_start:#x}: {e}",
                    path.display()
                ))
            })?;
        }
        // SAFETY: changing the protection of the range mapped above.
        unsafe { libc::mprotect(start as *mut libc::c_void, (mem_end - start) as usize, prot) };
        end = end.max(mem_end);
    }
    // The kernel maps segments one by one: the gaps between them are unmapped (an mprotect
    // across one fails), so give back the parts of the reservation no segment covers.
    let mut covered: Vec<(u64, u64)> = loads
        .iter()
        .map(|p| {
            let va = base.wrapping_add(p.vaddr);
            (page_down(va), page_up(va + p.memsz).unwrap_or(u64::MAX))
        })
        .collect();
    covered.sort_unstable();
    let mut at = base.wrapping_add(lo);
    let stop = at + span;
    for (s, e) in covered.into_iter().chain(std::iter::once((stop, stop))) {
        if s > at {
            // SAFETY: unmapping part of our own PROT_NONE reservation that no segment uses.
            unsafe { libc::munmap(at as *mut libc::c_void, (s - at) as usize) };
        }
        at = at.max(e);
    }
    let phdr = exe
        .headers
        .phdrs
        .iter()
        .find(|p| p.p_type == elf::PT_PHDR)
        .map(|p| base.wrapping_add(p.vaddr))
        // What the kernel reports: the first segment's load address plus e_phoff (header
        // values a hostile file chooses, so wrapping arithmetic).
        .unwrap_or_else(|| {
            base.wrapping_add(loads[0].vaddr)
                .wrapping_sub(loads[0].offset)
                .wrapping_add(exe.headers.phoff)
        });
    Ok(Mapped {
        base,
        entry: base.wrapping_add(exe.headers.entry),
        phdr,
        phnum: exe.headers.phnum as u64,
        phent: 56,
        end,
    })
}

/// What execve(2) would run for `path` with `argv`: the file itself if it is an ELF the kernel
/// accepts, or the interpreter of a `#!` script with the script spliced into the arguments (one
/// level, as binfmt_script). Errors are the errno execve would return.
pub fn resolve_exec(path: &str, argv: Vec<String>) -> Result<(String, Vec<String>), i32> {
    let file = elf::open_executable(Path::new(path)).map_err(|r| r.errno)?;
    let head = elf::head(&file).map_err(|r| r.errno)?;
    if head.starts_with(b"\x7fELF") {
        // The checks execve makes before the point of no return, so its errno is the kernel's.
        let exe = elf::inspect(file, false).map_err(|r| r.errno)?;
        if let Some(interp) = &exe.headers.interpreter {
            let ifile = elf::open_executable(Path::new(interp)).map_err(|r| r.errno)?;
            elf::inspect(ifile, true).map_err(|r| r.errno)?;
        }
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
pub fn load(path: &Path) -> Result<Image, LoadError> {
    let exe = elf::inspect(elf::open_executable(path)?, false)?;
    let pie = exe.headers.e_type == elf::ET_DYN;
    let interp = match &exe.headers.interpreter {
        None => None,
        Some(name) => {
            let ipath = Path::new(name);
            let iexe = elf::inspect(elf::open_executable(ipath)?, true).map_err(|r| Refusal {
                errno: r.errno,
                why: format!("interpreter {name}: {}", r.why),
            })?;
            Some((ipath.to_path_buf(), iexe))
        }
    };
    let program = map_elf(path, &exe, Some(if pie { PIE_BASE } else { 0 }))?;
    let (entry, interp_base) = match &interp {
        None => (program.entry, 0),
        Some((ipath, iexe)) => {
            let m = map_elf(
                ipath,
                iexe,
                if iexe.headers.e_type == elf::ET_EXEC {
                    Some(0)
                } else {
                    None
                },
            )?;
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
        brk: randomized_brk(program.end),
        exec_stack: exe.headers.exec_stack,
    })
}

/// Where the heap starts: after the program's last segment, moved up by a random number of
/// pages below 32 MiB when the system randomizes address spaces (the kernel's
/// `arch_randomize_brk`), so what lies right after the program is unmapped as natively.
fn randomized_brk(end: u64) -> u64 {
    let aslr = std::fs::read_to_string("/proc/sys/kernel/randomize_va_space").is_ok_and(|v| v.trim() == "2");
    if !aslr {
        return end;
    }
    end + (hbt_translator::host::random_u64() % ((32 << 20) / PAGE)) * PAGE
}

/// Maps the stack and writes argc/argv/envp/auxv; returns the initial RSP.
pub fn build_stack(image: &Image, args: &[String], env: &[String], hwcap: u64, execfn: &str) -> Result<u64> {
    // SAFETY: anonymous mapping at a kernel-chosen address, checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE | if image.exec_stack { libc::PROT_EXEC } else { 0 },
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

//! The ELF checks `hbt exec` makes, mirroring the kernel's `load_elf_binary` (fs/binfmt_elf.c,
//! Linux 6.1), so a program hbt refuses is one execve(2) refuses, with the same errno, and a
//! program the kernel runs, hbt runs:
//!
//! - only the ELF header, the program headers and the PT_INTERP string are read (with
//!   `pread`); section headers are never looked at, whatever state they are in;
//! - header: ELF magic, `ET_EXEC` or `ET_DYN`, `EM_X86_64`, else ENOEXEC (EI_CLASS/EI_DATA
//!   are ignored, as the kernel ignores them);
//!   `e_phentsize` must be 56 and the program headers 1..=4096 bytes, all inside the file
//!   (ENOEXEC);
//! - PT_INTERP: 2..=4096 bytes, NUL-terminated (ENOEXEC), read fully (EIO); the interpreter is
//!   opened like an executable (its errno), and a bad interpreter header is ELIBBAD;
//! - segments are mapped from the file, so one that extends past the end of the file faults
//!   (SIGBUS) when touched, as natively, instead of failing the load.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const EM_386: u16 = 3;
pub const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
pub const PT_PHDR: u32 = 6;
const PT_GNU_STACK: u32 = 0x6474_e551;
pub const PF_X: u32 = 1;
pub const PF_W: u32 = 2;
pub const PF_R: u32 = 4;
const PHENT_SIZE: usize = 56;
/// The kernel's limit on the program-header table (ELF_MIN_ALIGN, one page).
const MAX_PHDRS_BYTES: usize = 4096;
const PATH_MAX: u64 = 4096;

/// Why execve(2) would refuse a file: the errno and what was wrong.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub errno: i32,
    pub why: String,
}

impl Refusal {
    fn new(errno: i32, why: impl Into<String>) -> Self {
        Refusal { errno, why: why.into() }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = hbt_translator::host::files::os_message(&std::io::Error::from_raw_os_error(self.errno));
        if self.why.is_empty() {
            write!(f, "{text}")
        } else {
            write!(f, "{} ({text})", self.why)
        }
    }
}

/// One program header (the fields the loader uses).
#[derive(Clone, Copy, Debug)]
pub struct Phdr {
    pub p_type: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// An executable as execve(2) would accept it, with its file still open (segments are mapped
/// from it).
#[derive(Debug)]
pub struct Executable {
    pub file: File,
    pub headers: Headers,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Positioned reads: a file, or (for the fuzz test) bytes in memory.
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; a short read is EIO, as in the kernel's
/// `elf_read`.
fn read_at(file: &(impl ReadAt + ?Sized), buf: &mut [u8], offset: u64, what: &str) -> Result<(), Refusal> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(Refusal::new(libc::EIO, format!("{what} lies past the end of the file"))),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Refusal::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot read {what}"),
                ))
            }
        }
    }
    Ok(())
}

/// Opens `path` as execve(2) opens an executable: a regular file (EACCES otherwise, never
/// blocking on a FIFO) with execute permission (EACCES).
pub fn open_executable(path: &Path) -> Result<File, Refusal> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Refusal::new(libc::ENOENT, "path has a NUL byte"))?;
    // SAFETY: access(2) on a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EACCES);
        return Err(Refusal::new(errno, ""));
    }
    // execve refuses anything but a regular file with EACCES.
    let (file, _) =
        hbt_translator::host::files::open_regular(path).map_err(|e| Refusal::new(libc::EACCES, e.to_string()))?;
    Ok(file)
}

/// The first bytes of a file (the kernel's BINPRM_BUF_SIZE: what binfmt handlers look at).
pub fn head(file: &File) -> Result<Vec<u8>, Refusal> {
    let mut buf = vec![0u8; 256];
    let mut n = 0;
    while n < buf.len() {
        match FileExt::read_at(file, &mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Refusal::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    "cannot read the file",
                ))
            }
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// The ELF header checks; `bad` is the errno for a header that is not an x86-64 executable
/// (ENOEXEC for the program, ELIBBAD for its interpreter).
fn check_header(h: &[u8], bad: i32) -> Result<(), Refusal> {
    if h.len() < 64 || &h[..4] != b"\x7fELF" {
        return Err(Refusal::new(bad, "not an ELF file"));
    }
    // EI_CLASS and EI_DATA are not checked: the kernel's 64-bit loader reads the header as
    // Elf64 little-endian whatever they say (only e_machine decides).
    let e_type = u16_at(h, 16);
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(Refusal::new(
            bad,
            format!("ELF type {e_type} is neither an executable nor a shared object"),
        ));
    }
    let machine = u16_at(h, 18);
    if machine == EM_386 {
        return Err(Refusal::new(
            bad,
            "a 32-bit (i386) program: hbt exec runs x86-64 programs only",
        ));
    }
    if machine != EM_X86_64 {
        return Err(Refusal::new(bad, format!("not an x86-64 ELF (e_machine {machine})")));
    }
    Ok(())
}

fn read_phdrs(file: &(impl ReadAt + ?Sized), h: &[u8], bad: i32) -> Result<Vec<Phdr>, Refusal> {
    let phentsize = u16_at(h, 54) as usize;
    let phnum = u16_at(h, 56) as usize;
    if phentsize != PHENT_SIZE {
        return Err(Refusal::new(
            bad,
            format!("e_phentsize is {phentsize}, not {PHENT_SIZE}"),
        ));
    }
    let size = phnum * PHENT_SIZE;
    if size == 0 || size > MAX_PHDRS_BYTES {
        return Err(Refusal::new(
            bad,
            format!(
                "{phnum} program headers (the kernel takes 1 to {})",
                MAX_PHDRS_BYTES / PHENT_SIZE
            ),
        ));
    }
    let mut table = vec![0u8; size];
    // The kernel drops load_elf_phdrs' own error: a short read is the format error.
    read_at(file, &mut table, u64_at(h, 32), "the program-header table").map_err(|r| Refusal::new(bad, r.why))?;
    Ok(table
        .chunks_exact(PHENT_SIZE)
        .map(|p| Phdr {
            p_type: u32_at(p, 0),
            flags: u32_at(p, 4),
            offset: u64_at(p, 8),
            vaddr: u64_at(p, 16),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
        })
        .collect())
}

/// Checks `file` as the kernel checks a program; `interp` says it is being loaded as an
/// interpreter (header problems are then ELIBBAD).
pub fn inspect(file: File, interp: bool) -> Result<Executable, Refusal> {
    let headers = headers(&file, interp)?;
    Ok(Executable { file, headers })
}

/// What [`inspect`] reads from an executable.
#[derive(Debug)]
pub struct Headers {
    pub e_type: u16,
    pub entry: u64,
    pub phoff: u64,
    pub phnum: u16,
    pub phdrs: Vec<Phdr>,
    pub interpreter: Option<String>,
    pub exec_stack: bool,
}

/// The kernel's checks on an executable's headers (see the file comment).
pub fn headers(file: &(impl ReadAt + ?Sized), interp: bool) -> Result<Headers, Refusal> {
    let bad = if interp { libc::ELIBBAD } else { libc::ENOEXEC };
    let mut h = [0u8; 64];
    if let Err(e) = read_at(file, &mut h, 0, "the ELF header") {
        // A file shorter than an ELF header is not an executable format (the kernel's binfmt
        // search ends in ENOEXEC); an interpreter that short is EIO.
        return Err(if interp {
            e
        } else {
            Refusal::new(libc::ENOEXEC, "not an ELF file")
        });
    }
    check_header(&h, bad)?;
    let phdrs = read_phdrs(file, &h, bad)?;
    let mut interpreter = None;
    if !interp {
        if let Some(p) = phdrs.iter().find(|p| p.p_type == PT_INTERP) {
            if p.filesz > PATH_MAX || p.filesz < 2 {
                return Err(Refusal::new(libc::ENOEXEC, format!("PT_INTERP is {} bytes", p.filesz)));
            }
            let mut name = vec![0u8; p.filesz as usize];
            read_at(file, &mut name, p.offset, "the PT_INTERP string")?;
            if name.pop() != Some(0) {
                return Err(Refusal::new(libc::ENOEXEC, "PT_INTERP is not NUL-terminated"));
            }
            interpreter = Some(String::from_utf8_lossy(&name).into_owned());
        }
    }
    let exec_stack = phdrs
        .iter()
        .find(|p| p.p_type == PT_GNU_STACK)
        .is_some_and(|p| p.flags & PF_X != 0);
    Ok(Headers {
        e_type: u16_at(&h, 16),
        entry: u64_at(&h, 24),
        phoff: u64_at(&h, 32),
        phnum: u16_at(&h, 56),
        phdrs,
        interpreter,
        exec_stack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect_bytes(bytes: &[u8]) -> Result<Headers, Refusal> {
        headers(bytes, false)
    }

    /// Fuzz target: 20,000 mutants of busybox-static's headers through the kernel's checks.
    #[test]
    fn fuzz_exec_elf_checks() {
        let good = std::fs::read("/bin/busybox").expect("busybox-static");
        let head = good[..64 << 10].to_vec();
        let mut m = hbt_translator::harness::mutate::Mutator::new(0xe1fe, 0..0x200);
        const RUNS: usize = 20_000;
        let mut accepted = 0;
        for i in 0..RUNS {
            let input = m.mutate(&head);
            let r = std::panic::catch_unwind(|| headers(input.as_slice(), i % 2 == 1).is_ok());
            assert!(r.is_ok(), "exec ELF checks panicked on mutant {i} (seed 0xe1fe)");
            accepted += r.unwrap() as usize;
        }
        hbt_translator::harness::ci_summary(&format!(
            "fuzz: exec ELF checks, {RUNS} mutants: {accepted} accepted, {} refused, no panic",
            RUNS - accepted
        ));
    }

    #[test]
    fn kernel_rules() {
        let good = std::fs::read("/bin/busybox").expect("busybox-static");
        let e = inspect_bytes(&good).unwrap();
        assert!(e.interpreter.is_none());
        assert!(e.phdrs.iter().any(|p| p.p_type == PT_LOAD));
        // Section headers are never read: a garbage section-header table is fine.
        let mut b = good.clone();
        b[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes()); // e_shoff
        b[0x3c..0x3e].copy_from_slice(&0xffffu16.to_le_bytes()); // e_shnum
        assert!(inspect_bytes(&b).is_ok());
        let mut b = good.clone();
        b[0x36] = 55; // e_phentsize
        assert_eq!(inspect_bytes(&b).unwrap_err().errno, libc::ENOEXEC);
        let mut b = good.clone();
        b[0x38..0x3a].copy_from_slice(&100u16.to_le_bytes()); // e_phnum: 5,600 bytes > one page
        assert_eq!(inspect_bytes(&b).unwrap_err().errno, libc::ENOEXEC);
        let mut b = good.clone();
        b[0x20..0x28].copy_from_slice(&(1u64 << 40).to_le_bytes()); // e_phoff past the end
        assert_eq!(inspect_bytes(&b).unwrap_err().errno, libc::ENOEXEC);
        assert_eq!(inspect_bytes(b"\x7fELF").unwrap_err().errno, libc::ENOEXEC);
        let mut b = good.clone();
        b[4] = 1; // EI_CLASS says 32-bit: ignored, as by the kernel
        assert!(inspect_bytes(&b).is_ok());
        let mut b = good.clone();
        b[18] = 3; // EM_386
        assert_eq!(inspect_bytes(&b).unwrap_err().errno, libc::ENOEXEC);
    }
}

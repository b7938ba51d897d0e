//! System calls of a translated Linux program. Most go to the host kernel unchanged (guest
//! addresses are host addresses); these are emulated because passing them through would break
//! the translation or hbt itself:
//!
//! - `arch_prctl` (the guest's FS/GS bases are guest state; the host's FS is hbt's TLS),
//! - `brk` (the guest heap lives after the program image),
//! - `exit`/`exit_group`,
//! - `fork`/`vfork`/`clone` without `CLONE_VM` (the child keeps running translated; `vfork`
//!   becomes `fork`; `CLONE_SETTLS` sets the guest's FS base); `clone` with `CLONE_VM` starts a
//!   guest thread (`threads.rs`),
//! - `execve` (re-executes under `hbt exec`),
//! - `rt_sigaction`/`rt_sigreturn`/`sigaltstack` (guest handlers run translated, see
//!   `signals.rs`), `rt_sigprocmask` (hbt's fault signals stay unblocked), `rseq` (ENOSYS: the
//!   kernel would redirect host execution),
//! - `munmap`/`mremap`/`mmap(MAP_FIXED)`/`mprotect` also drop translations of that range.

use super::signals::{die, GuestSignals, HOST_FAULT_SIGNALS};
use anyhow::Result;
use hbt_translator::Translator;
use std::path::PathBuf;

const SYS_MMAP: u64 = 9;
const SYS_MPROTECT: u64 = 10;
const SYS_MUNMAP: u64 = 11;
const SYS_BRK: u64 = 12;
const SYS_RT_SIGACTION: u64 = 13;
const SYS_RT_SIGPROCMASK: u64 = 14;
const SYS_RT_SIGRETURN: u64 = 15;
const SYS_MREMAP: u64 = 25;
const SYS_CLONE: u64 = 56;
const SYS_FORK: u64 = 57;
const SYS_VFORK: u64 = 58;
const SYS_EXECVE: u64 = 59;
const SYS_EXIT: u64 = 60;
const SYS_RT_SIGSUSPEND: u64 = 130;
const SYS_PSELECT6: u64 = 270;
const SYS_PPOLL: u64 = 271;
const SYS_EPOLL_PWAIT: u64 = 281;
const SYS_EPOLL_PWAIT2: u64 = 441;
const SYS_SIGALTSTACK: u64 = 131;
const SYS_ARCH_PRCTL: u64 = 158;
const SYS_EXIT_GROUP: u64 = 231;
const SYS_CLONE3: u64 = 435;
const SYS_RSEQ: u64 = 334;
const SYS_READLINK: u64 = 89;
const SYS_READLINKAT: u64 = 267;

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_SETTLS: u64 = 0x80000;

/// The guest heap: `brk` and how far it is mapped (shared by the guest's threads).
struct Heap {
    brk: u64,
    mapped: u64,
}

pub struct Syscalls {
    heap: std::sync::Arc<std::sync::Mutex<Heap>>,
    program: PathBuf,
    pub count: u64,
    pub signals: GuestSignals,
    pub cpu_model: hbt_coverage::cpu_model::CpuModel,
    /// This translator runs a thread other than the first (its `exit` ends only itself).
    is_thread: bool,
}

/// How a system call ended the guest (or one of its threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Process(i32),
    Thread,
}

/// `int $0x80` on the host: the kernel's 32-bit system call table, with EBX, ECX, EDX, ESI, EDI
/// and EBP as the arguments and the (sign-extended) result in RAX, every other register kept.
fn raw_int80(nr: u32, a: [u32; 6]) -> u64 {
    let ret: u64;
    // SAFETY: as in `raw`: a guest system call the handler let through. RBX and RBP, which
    // Rust's inline assembly may not name, are saved on the stack around it and loaded from `a`.
    // The pointer sits in R8, named: a `reg` operand may be given RBX, which the first load
    // overwrites. Older kernels zero R8–R11 on `int $0x80` from 64-bit code, so they are
    // clobbered.
    unsafe {
        std::arch::asm!(
            "push rbx",
            "push rbp",
            "mov ebx, [r8]",
            "mov ebp, [r8 + 20]",
            "int 0x80",
            "pop rbp",
            "pop rbx",
            inout("r8") a.as_ptr() => _,
            inlateout("rax") nr as u64 => ret,
            in("ecx") a[1], in("edx") a[2], in("esi") a[3], in("edi") a[4],
            out("r9") _, out("r10") _, out("r11") _,
        );
    }
    ret
}

/// i386 system calls a 64-bit program can make with `int $0x80` that hbt must not pass through
/// as they are: they change the process in ways hbt emulates (threads, exec, signals, TLS) or
/// take 32-bit structures it does not convert. They fail with ENOSYS, said once on stderr.
const INT80_UNSUPPORTED: &[(u32, &str)] = &[
    (2, "fork"),
    (11, "execve"),
    (48, "signal"),
    (67, "sigaction"),
    (72, "sigsuspend"),
    (119, "sigreturn"),
    (120, "clone"),
    (126, "sigprocmask"),
    (173, "rt_sigreturn"),
    (174, "rt_sigaction"),
    (175, "rt_sigprocmask"),
    (179, "rt_sigsuspend"),
    (186, "sigaltstack"),
    (190, "vfork"),
    (243, "set_thread_area"),
    (258, "set_tid_address"),
    (358, "execveat"),
    (435, "clone3"),
];

fn raw(nr: u64, a: [u64; 6]) -> u64 {
    let ret: u64;
    // SAFETY: a system call on behalf of the guest, whose memory is this process's memory; the
    // calls that could break hbt are intercepted before reaching here.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

/// A system call's return value for error `e` (-errno, as the kernel returns it).
pub(super) fn errno(e: i32) -> u64 {
    (-(e as i64)) as u64
}

/// Reads a NUL-terminated string from guest memory.
fn read_cstr(addr: u64) -> Option<String> {
    let mut out = Vec::new();
    let mut p = addr;
    loop {
        let mut b = [0u8; 1];
        hbt_translator::mmu::read_host_checked(p, &mut b)?;
        if b[0] == 0 {
            return String::from_utf8(out).ok();
        }
        out.push(b[0]);
        p += 1;
        if out.len() > 1 << 20 {
            return None;
        }
    }
}

fn read_u64(addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    hbt_translator::mmu::read_host_checked(addr, &mut b)?;
    Some(u64::from_le_bytes(b))
}

fn read_strv(addr: u64) -> Option<Vec<String>> {
    let mut v = Vec::new();
    if addr == 0 {
        return Some(v);
    }
    for i in 0.. {
        let p = read_u64(addr + 8 * i)?;
        if p == 0 {
            break;
        }
        v.push(read_cstr(p)?);
    }
    Some(v)
}

impl Syscalls {
    pub fn new(brk: u64, program: PathBuf, cpu_model: hbt_coverage::cpu_model::CpuModel) -> Self {
        Syscalls {
            heap: std::sync::Arc::new(std::sync::Mutex::new(Heap { brk, mapped: brk })),
            program,
            count: 0,
            signals: GuestSignals::new(),
            cpu_model,
            is_thread: false,
        }
    }

    /// The system-call state of a new guest thread: shared heap and signal actions.
    pub fn for_thread(&self) -> Self {
        Syscalls {
            heap: std::sync::Arc::clone(&self.heap),
            program: self.program.clone(),
            count: 0,
            signals: self.signals.clone(),
            cpu_model: self.cpu_model,
            is_thread: true,
        }
    }

    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// `int $0x80` from the 64-bit program (the guest's RIP is already after it): the 32-bit
    /// system call, as the kernel runs it for a 64-bit process. exit, exit_group and brk are
    /// hbt's; munmap/mprotect/mremap pass through and drop translations like their 64-bit
    /// forms; [`INT80_UNSUPPORTED`] fail with ENOSYS; the rest pass through.
    pub fn int80(&mut self, t: &mut Translator) -> Result<Option<End>> {
        self.count += 1;
        let s = t.state();
        let nr = s.gpr[0] as u32;
        let lo = |r: usize| s.gpr[r] as u32;
        let a = [lo(3), lo(1), lo(2), lo(6), lo(7), lo(5)];
        let ret = match nr {
            1 if self.is_thread => return Ok(Some(End::Thread)),
            1 | 252 => return Ok(Some(End::Process(a[0] as i32 & 0xff))),
            45 => self.brk(a[0] as u64),
            91 | 125 | 163 => {
                let r = raw_int80(nr, a);
                t.invalidate_range(a[0] as u64, a[1] as u64);
                super::threads::publish(a[0] as u64, a[1] as u64);
                r
            }
            _ => match INT80_UNSUPPORTED.iter().find(|&&(n, _)| n == nr) {
                Some(&(_, name)) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        diag!(
                            "hbt: {}: int $0x80 {name} (i386 #{nr}) is not supported; it fails with ENOSYS",
                            self.program.display()
                        )
                    });
                    errno(libc::ENOSYS)
                }
                None => raw_int80(nr, a),
            },
        };
        t.state_mut().gpr[0] = ret;
        Ok(None)
    }

    /// Handles the system call in the guest state; Some(end) when the program or this thread
    /// ends.
    pub fn handle(&mut self, t: &mut Translator) -> Result<Option<End>> {
        self.count += 1;
        let s = t.state();
        let nr = s.gpr[0];
        let a = [s.gpr[7], s.gpr[6], s.gpr[2], s.gpr[10], s.gpr[8], s.gpr[9]];
        let ret = match nr {
            SYS_EXIT if self.is_thread => return Ok(Some(End::Thread)),
            SYS_EXIT | SYS_EXIT_GROUP => return Ok(Some(End::Process(a[0] as i32 & 0xff))),
            SYS_ARCH_PRCTL => match a[0] {
                0x1001 => {
                    t.state_mut().gs_base = a[1];
                    0
                }
                0x1002 => {
                    t.state_mut().fs_base = a[1];
                    0
                }
                0x1003 | 0x1004 => {
                    let v = if a[0] == 0x1003 {
                        t.state().fs_base
                    } else {
                        t.state().gs_base
                    };
                    if hbt_translator::mmu::write_host_checked(a[1], &v.to_le_bytes()) {
                        0
                    } else {
                        errno(libc::EFAULT)
                    }
                }
                // ARCH_GET_XCOMP_SUPP / ARCH_GET_XCOMP_PERM: the guest's XSAVE components, not
                // the host's (which may include AMX).
                0x1021 | 0x1022 => {
                    let xcr0 = t.state().xcr0;
                    if hbt_translator::mmu::write_host_checked(a[1], &xcr0.to_le_bytes()) {
                        0
                    } else {
                        errno(libc::EFAULT)
                    }
                }
                // ARCH_REQ_XCOMP_PERM: components the guest has are granted already; others
                // (AMX) are not offered, as on a kernel without them.
                0x1023 if a[1] < 64 && t.state().xcr0 & (1 << a[1]) != 0 => 0,
                _ => errno(libc::EINVAL),
            },
            SYS_BRK => self.brk(a[0]),
            SYS_RSEQ | SYS_CLONE3 => errno(libc::ENOSYS),
            SYS_RT_SIGACTION => self.signals.sigaction(a[0], a[1], a[2], a[3]),
            SYS_RT_SIGRETURN => {
                // Restores every register, RAX included: no return value to store.
                if let Err(fatal) = self.signals.sigreturn(t) {
                    die(&self.program, &fatal);
                }
                return Ok(None);
            }
            SYS_SIGALTSTACK => self.signals.sigaltstack(a[0], a[1], s.gpr[4]),
            SYS_RT_SIGSUSPEND => self.signals.sigsuspend(a[0], a[1]),
            // Calls with a temporary signal mask: performed by the host, then what the mask let
            // through is delivered as after rt_sigsuspend.
            SYS_PPOLL | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2 | SYS_PSELECT6 => {
                let r = raw(nr, a);
                let mask = match nr {
                    SYS_PPOLL => a[3],
                    SYS_PSELECT6 if a[5] != 0 => read_u64(a[5]).unwrap_or(0),
                    SYS_PSELECT6 => 0,
                    _ => a[4],
                };
                self.signals.temporary_mask_used(mask);
                r
            }
            SYS_RT_SIGPROCMASK => {
                // Never let the guest block the signals hbt's fault handling needs.
                if a[1] != 0 {
                    if let Some(set) = read_u64(a[1]) {
                        let masked = set & !HOST_FAULT_SIGNALS;
                        let mut args = a;
                        args[1] = &masked as *const u64 as u64;
                        raw(nr, args)
                    } else {
                        errno(libc::EFAULT)
                    }
                } else {
                    raw(nr, a)
                }
            }
            SYS_FORK | SYS_VFORK => self.fork(t, libc::SIGCHLD as u64, 0, 0, 0, 0),
            SYS_CLONE => {
                let flags = a[0];
                if flags & CLONE_VM != 0 && flags & CLONE_VFORK == 0 {
                    super::threads::spawn(t, self, flags, a[1], a[2], a[3], a[4])
                } else {
                    self.fork(t, flags, a[1], a[2], a[3], a[4])
                }
            }
            SYS_EXECVE => self.execve(a)?,
            // /proc/self/exe is hbt; the guest must see its own program.
            SYS_READLINK if read_cstr(a[0]).as_deref() == Some("/proc/self/exe") => self.readlink_self(a[1], a[2]),
            SYS_READLINKAT if read_cstr(a[1]).as_deref() == Some("/proc/self/exe") => self.readlink_self(a[2], a[3]),
            SYS_MUNMAP | SYS_MREMAP | SYS_MPROTECT => {
                let r = raw(nr, a);
                t.invalidate_range(a[0], a[1]);
                super::threads::publish(a[0], a[1]);
                r
            }
            SYS_MMAP => {
                let r = raw(nr, a);
                if a[3] & libc::MAP_FIXED as u64 != 0 {
                    t.invalidate_range(a[0], a[1]);
                    super::threads::publish(a[0], a[1]);
                }
                if a[3] & libc::MAP_SHARED as u64 != 0 && (r as i64) >= 0 {
                    // Possibly a second view of memory that holds translated code.
                    t.shared_mapping_added();
                }
                r
            }
            _ => raw(nr, a),
        };
        t.state_mut().gpr[0] = ret;
        Ok(None)
    }

    fn brk(&mut self, want: u64) -> u64 {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        if want <= heap.mapped {
            if want >= heap.brk {
                heap.brk = want;
            }
            return heap.brk;
        }
        let end = (want + 4095) & !4095;
        // SAFETY: MAP_FIXED_NOREPLACE maps fresh memory right after the heap or fails.
        let p = unsafe {
            libc::mmap(
                heap.mapped as *mut libc::c_void,
                (end - heap.mapped) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as u64 == heap.mapped {
            heap.mapped = end;
            heap.brk = want;
        }
        heap.brk
    }

    /// fork-like clone: the child is a copy of this process and keeps running translated code.
    fn fork(&mut self, t: &mut Translator, flags: u64, stack: u64, ptid: u64, ctid: u64, tls: u64) -> u64 {
        let host_flags = flags & !(CLONE_VM | CLONE_VFORK | CLONE_SETTLS);
        let ret = raw(SYS_CLONE, [host_flags, 0, ptid, ctid, 0, 0]);
        if ret == 0 {
            super::census::forked();
            // Child: its guest stack and TLS as requested.
            if stack != 0 {
                t.state_mut().gpr[4] = stack;
            }
            if flags & CLONE_SETTLS != 0 {
                t.state_mut().fs_base = tls;
            }
        }
        ret
    }

    fn program_path(&self) -> String {
        std::fs::canonicalize(&self.program)
            .unwrap_or_else(|_| self.program.clone())
            .display()
            .to_string()
    }

    fn readlink_self(&self, buf: u64, len: u64) -> u64 {
        let path = self.program_path();
        let n = path.len().min(len as usize);
        if hbt_translator::mmu::write_host_checked(buf, &path.as_bytes()[..n]) {
            n as u64
        } else {
            errno(libc::EFAULT)
        }
    }

    /// Re-executes the new program under `hbt exec`.
    fn execve(&mut self, a: [u64; 6]) -> Result<u64> {
        let (Some(path), Some(argv), Some(envp)) = (read_cstr(a[0]), read_strv(a[1]), read_strv(a[2])) else {
            return Ok(errno(libc::EFAULT));
        };
        let me = std::ffi::CString::new("/proc/self/exe").unwrap();
        let path = if path == "/proc/self/exe" {
            self.program_path()
        } else {
            path
        };
        // Fail as execve would (ENOENT lets a PATH search go on) before leaving this process.
        let (path, argv) = match super::loader::resolve_exec(&path, argv) {
            Ok(r) => r,
            Err(e) => return Ok(errno(e)),
        };
        let mut args = vec!["hbt".to_string(), "exec".to_string()];
        args.extend(["--cpu-model".to_string(), self.cpu_model.to_string()]);
        if let Some(census) = super::census::path() {
            args.extend(["--census".to_string(), census.display().to_string()]);
        }
        if let Some(argv0) = argv.first() {
            args.extend(["--argv0".to_string(), argv0.clone()]);
        }
        args.extend(["--".to_string(), path]);
        args.extend(argv.into_iter().skip(1));
        let cargs: Vec<std::ffi::CString> = args
            .into_iter()
            .filter_map(|s| std::ffi::CString::new(s).ok())
            .collect();
        let cenv: Vec<std::ffi::CString> = envp
            .into_iter()
            .filter_map(|s| std::ffi::CString::new(s).ok())
            .collect();
        let mut pa: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
        pa.push(std::ptr::null());
        let mut pe: Vec<*const libc::c_char> = cenv.iter().map(|c| c.as_ptr()).collect();
        pe.push(std::ptr::null());
        // What this process translated goes to the census now: the new program adds its own.
        super::census::flush();
        // SAFETY: NUL-terminated argument and environment vectors that outlive the call.
        unsafe { libc::execve(me.as_ptr(), pa.as_ptr(), pe.as_ptr()) };
        Ok(errno(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOEXEC),
        ))
    }
}

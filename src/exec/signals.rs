//! Guest signals for `hbt exec`: the guest's signal actions, delivery to guest handlers with a
//! Linux x86-64 `rt_sigframe`, `rt_sigreturn`, and `sigaltstack`.
//!
//! - Default and ignore actions are given to the host kernel as they are, so a program killed
//!   by SIGPIPE or SIGINT dies the same way natively and under hbt.
//! - A guest *handler* for an asynchronous signal becomes a host handler in the translator
//!   (`host::signals::catch_async`) that records the signal and stops translated code at a
//!   block boundary; [`GuestSignals::deliver_pending`] then builds the frame on the guest stack.
//! - Guest exceptions (#PF, #GP, #DE, #UD, #BP, #AC) map to SIGSEGV/SIGFPE/SIGILL/SIGTRAP/SIGBUS
//!   with the siginfo the kernel would give; with a guest handler they are delivered the same
//!   way, otherwise hbt dies by that signal, as the program would.
//!
//! The frame (what glibc's and musl's `sa_restorer` and handlers expect):
//!
//! ```text
//!   [rsp]            pretcode = sa_restorer (handler's `ret` goes there; it calls rt_sigreturn)
//!   [rsp+8]          ucontext: flags, link, uc_stack, sigcontext (256 B), sigmask
//!   [rsp+8+304]      siginfo (128 B)
//!   64-aligned above fpstate: the guest's XSAVE image (sigcontext.fpstate points at it)
//! ```

use hbt_translator::cpu::xsave::{component, XsaveLayout, XSTATE_BV};
use hbt_translator::exit::{vector, GuestException};
use hbt_translator::host::signals::{catch_async, has_pending, take_pending};
use hbt_translator::mmu::{read_host_checked, write_host_checked};
use hbt_translator::state::XSaveArea;
use hbt_translator::Translator;

use super::syscalls::errno;

const SA_RESTORER: u64 = 0x0400_0000;
const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTART: u64 = 0x1000_0000;
const SA_NODEFER: u64 = 0x4000_0000;
const SA_RESETHAND: u64 = 0x8000_0000;
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;
const SS_ONSTACK: u32 = 1;
const SS_DISABLE: u32 = 2;

const UCONTEXT_SIZE: u64 = 304;
const SIGINFO_SIZE: u64 = 128;
/// Offset of `uc_mcontext` (the sigcontext) in the ucontext, and of `uc_sigmask`.
const MCONTEXT: u64 = 40;
const SIGMASK: u64 = MCONTEXT + 256;
/// Guest GPR (hardware number) stored in each sigcontext slot r8..rsp.
const SIGCONTEXT_GPRS: [usize; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 7, 6, 5, 3, 2, 0, 1, 4];
/// Flags a handler may change through the frame (the kernel's FIX_EFLAGS): AC OF DF TF SF ZF AF
/// PF CF and RF.
const FIX_EFLAGS: u64 = 0x4_0dd5 | (1 << 16);
/// Signals hbt itself uses (its fault handling, and the kick that makes guest threads apply
/// each other's invalidations); never blocked on the host.
pub const HOST_FAULT_SIGNALS: u64 = (1 << (libc::SIGSEGV - 1))
    | (1 << (libc::SIGBUS - 1))
    | (1 << (libc::SIGILL - 1))
    | (1 << (libc::SIGFPE - 1))
    | (1 << (libc::SIGTRAP - 1))
    | (1 << (super::threads::KICK_SIGNAL - 1));

/// The kernel's `struct sigaction` for rt_sigaction on x86-64.
#[derive(Clone, Copy, Default)]
struct Action {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

impl Action {
    fn from_bytes(b: &[u8; 32]) -> Self {
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Action {
            handler: word(0),
            flags: word(1),
            restorer: word(2),
            mask: word(3),
        }
    }
    fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, w) in [self.handler, self.flags, self.restorer, self.mask]
            .into_iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }
    fn is_handler(&self) -> bool {
        self.handler != SIG_DFL && self.handler != SIG_IGN
    }
}

/// Why a signal could not be delivered: the program must die the way the kernel would kill it.
#[derive(Debug)]
pub struct Fatal {
    pub signal: i32,
    pub why: String,
}

#[derive(Clone)]
pub struct GuestSignals {
    /// Signal actions: one table for all the guest's threads (clones share it).
    actions: std::sync::Arc<std::sync::Mutex<[Action; 64]>>,
    /// The guest's alternate signal stack (ss_sp, ss_size); None when disabled.
    altstack: Option<(u64, u64)>,
    /// After `rt_sigsuspend`: the signals its temporary mask let through, deliverable once
    /// even though the restored mask blocks them again (as the kernel delivers them before
    /// restoring it).
    suspend_unblocked: Option<u64>,
}

fn host_blocked() -> u64 {
    let mut old: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: querying the mask only (set is null).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old) };
    (1..=64)
        .filter(|&n| is_member(&old, n))
        .fold(0u64, |m, n| m | (1 << (n - 1)))
}

fn is_member(set: &libc::sigset_t, n: i32) -> bool {
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigismember(set, n) == 1 }
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is the empty set.
    unsafe { std::mem::zeroed() }
}

/// Sets the host mask to the guest's `mask`, never blocking hbt's fault signals.
pub fn set_host_blocked(mask: u64) {
    let mut set = unsafe_zeroed_sigset();
    for n in 1..=64 {
        if mask & !HOST_FAULT_SIGNALS & (1 << (n - 1)) != 0 {
            // SAFETY: `set` is a valid sigset_t; n is a signal number.
            unsafe { libc::sigaddset(&mut set, n) };
        }
    }
    // SAFETY: a valid set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
}

impl GuestSignals {
    fn action(&self, sig: i32) -> Action {
        self.actions.lock().unwrap_or_else(|e| e.into_inner())[sig as usize - 1]
    }

    /// The actions a program starts with: the default for each signal, but those hbt was
    /// started with ignored stay ignored, as across `execve` (a shell's background job, `nohup`:
    /// a non-interactive shell ignores SIGINT for what it runs in the background). SIGPIPE
    /// starts at the default whatever hbt inherited: Rust's runtime ignores it before `main`,
    /// so what hbt was given is not known.
    pub fn new() -> Self {
        let mut actions = [Action::default(); 64];
        for sig in (1..=64).filter(|&s| s != libc::SIGPIPE) {
            // SAFETY: querying only (act is null); `old` is a valid sigaction to fill.
            let ignored = unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
            };
            if ignored {
                actions[sig as usize - 1].handler = SIG_IGN;
            }
        }
        GuestSignals {
            actions: std::sync::Arc::new(std::sync::Mutex::new(actions)),
            altstack: None,
            suspend_unblocked: None,
        }
    }

    /// `rt_sigaction(sig, act, oldact, sigsetsize)`.
    pub fn sigaction(&mut self, sig: u64, act: u64, oldact: u64, sigsetsize: u64) -> u64 {
        if !(1..=64).contains(&sig) || sigsetsize != 8 {
            return errno(libc::EINVAL);
        }
        let sig = sig as i32;
        let mut new = None;
        if act != 0 {
            let mut b = [0u8; 32];
            if read_host_checked(act, &mut b).is_none() {
                return errno(libc::EFAULT);
            }
            // hbt keeps the last real-time signal for itself (threads::KICK_SIGNAL).
            if sig == libc::SIGKILL || sig == libc::SIGSTOP || sig == super::threads::KICK_SIGNAL {
                return errno(libc::EINVAL);
            }
            new = Some(Action::from_bytes(&b));
        }
        if oldact != 0 && !write_host_checked(oldact, &self.action(sig).to_bytes()) {
            return errno(libc::EFAULT);
        }
        if let Some(action) = new {
            if let Err(e) = self.install(sig, action) {
                return errno(e.raw_os_error().unwrap_or(libc::EINVAL));
            }
        }
        0
    }

    fn install(&mut self, sig: i32, action: Action) -> std::io::Result<()> {
        self.actions.lock().unwrap_or_else(|e| e.into_inner())[sig as usize - 1] = action;
        if HOST_FAULT_SIGNALS & (1 << (sig - 1)) != 0 {
            // hbt keeps its own handler; guest exceptions are delivered synchronously.
            return Ok(());
        }
        if action.is_handler() {
            return catch_async(sig, action.flags & SA_RESTART != 0, action.mask);
        }
        // SAFETY: a zeroed sigaction with SIG_DFL/SIG_IGN is valid.
        unsafe {
            let mut host: libc::sigaction = std::mem::zeroed();
            host.sa_sigaction = action.handler as usize;
            libc::sigemptyset(&mut host.sa_mask);
            if libc::sigaction(sig, &host, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// `rt_sigsuspend(mask)`: performed by the host; signals it let through are delivered
    /// next, under the mask it restored.
    pub fn sigsuspend(&mut self, mask: u64, sigsetsize: u64) -> u64 {
        let mut b = [0u8; 8];
        if sigsetsize != 8 || read_host_checked(mask, &mut b).is_none() {
            return errno(if sigsetsize != 8 { libc::EINVAL } else { libc::EFAULT });
        }
        let want = u64::from_le_bytes(b) & !HOST_FAULT_SIGNALS;
        // SAFETY: rt_sigsuspend with a valid 8-byte mask on our stack.
        let r = unsafe { libc::syscall(libc::SYS_rt_sigsuspend, &want as *const u64, 8) };
        self.suspend_unblocked = Some(!want);
        if r < 0 {
            errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINTR))
        } else {
            r as u64
        }
    }

    /// After ppoll/pselect6/epoll_pwait ran with the temporary signal mask at `mask_ptr`: the
    /// signals it let through are deliverable once, as after `rt_sigsuspend`.
    pub fn temporary_mask_used(&mut self, mask_ptr: u64) {
        let mut b = [0u8; 8];
        if mask_ptr != 0 && read_host_checked(mask_ptr, &mut b).is_some() {
            self.suspend_unblocked = Some(!u64::from_le_bytes(b));
        }
    }

    /// `sigaltstack(ss, old_ss)`.
    pub fn sigaltstack(&mut self, ss: u64, old: u64, rsp: u64) -> u64 {
        if old != 0 {
            let (sp, size) = self.altstack.unwrap_or((0, 0));
            let flags = match self.altstack {
                None => SS_DISABLE,
                Some((sp, size)) if rsp > sp && rsp <= sp + size => SS_ONSTACK,
                Some(_) => 0,
            };
            let mut b = [0u8; 24];
            b[0..8].copy_from_slice(&sp.to_le_bytes());
            b[8..12].copy_from_slice(&flags.to_le_bytes());
            b[16..24].copy_from_slice(&size.to_le_bytes());
            if !write_host_checked(old, &b) {
                return errno(libc::EFAULT);
            }
        }
        if ss != 0 {
            let mut b = [0u8; 24];
            if read_host_checked(ss, &mut b).is_none() {
                return errno(libc::EFAULT);
            }
            let sp = u64::from_le_bytes(b[0..8].try_into().expect("8"));
            let flags = u32::from_le_bytes(b[8..12].try_into().expect("4"));
            let size = u64::from_le_bytes(b[16..24].try_into().expect("8"));
            if matches!(self.altstack, Some((s, n)) if rsp > s && rsp <= s + n) {
                return errno(libc::EPERM);
            }
            self.altstack = if flags & SS_DISABLE != 0 {
                None
            } else if size < libc::MINSIGSTKSZ as u64 {
                return errno(libc::ENOMEM);
            } else {
                Some((sp, size))
            };
        }
        0
    }

    /// Delivers every pending, unblocked asynchronous signal to its guest handler. Cheap when
    /// nothing is pending (one atomic load), so it runs after every translator exit.
    pub fn deliver_pending(&mut self, t: &mut Translator) -> Result<(), Fatal> {
        let extra = self.suspend_unblocked.take().unwrap_or(0);
        if !has_pending(u64::MAX) {
            return Ok(());
        }
        while let Some((sig, info)) = take_pending(!host_blocked() | extra) {
            let action = self.action(sig);
            if action.is_handler() {
                self.deliver(t, sig, &info, None)?;
            } else if action.handler == SIG_DFL {
                // Only hbt's fault signals reach here with the default action (the host
                // kernel applies every other default itself): e.g. `kill -SEGV`.
                return Err(Fatal {
                    signal: sig,
                    why: "sent by another process".into(),
                });
            }
        }
        Ok(())
    }

    /// A guest exception: delivered to the guest's handler for its signal, or fatal.
    pub fn exception(&mut self, t: &mut Translator, e: &GuestException) -> Result<(), Fatal> {
        let rip = t.state().rip;
        let (signal, code, addr): (i32, i32, u64) = match e.vector {
            vector::DE => (libc::SIGFPE, 1, rip),                // FPE_INTDIV
            vector::UD => (libc::SIGILL, 2, rip),                // ILL_ILLOPN
            vector::BP | vector::DB => (libc::SIGTRAP, 0x80, 0), // SI_KERNEL, as for int3
            vector::AC => (libc::SIGBUS, 1, rip),                // BUS_ADRALN
            // x87 #MF and SIMD #XM: SIGFPE with the kernel's code for the unmasked exception.
            16 | 19 => (libc::SIGFPE, fpe_code(t.state(), e.vector), rip),
            vector::PF => {
                let (err, addr) = (e.error_code.unwrap_or(0), e.address.unwrap_or(0));
                if is_bus_error(addr, err) {
                    (libc::SIGBUS, 2, addr) // BUS_ADRERR
                } else {
                    let present = err & 1 != 0;
                    (libc::SIGSEGV, if present { 2 } else { 1 }, addr) // SEGV_ACCERR/MAPERR
                }
            }
            _ => (libc::SIGSEGV, 0x80, 0), // #GP and the rest: SI_KERNEL
        };
        // (As the kernel does for a fault, a blocked or ignored signal is fatal here too; hbt
        // does not track the guest blocking its fault signals, which the host never blocks.)
        if !self.action(signal).is_handler() {
            return Err(Fatal {
                signal,
                why: format!("{e} at guest RIP {rip:#x}"),
            });
        }
        let mut info = [0u8; 128];
        info[0..4].copy_from_slice(&signal.to_le_bytes());
        info[8..12].copy_from_slice(&code.to_le_bytes());
        info[16..24].copy_from_slice(&addr.to_le_bytes());
        let trap = (
            e.vector as u64,
            e.error_code.unwrap_or(0) as u64,
            e.address.unwrap_or(0),
        );
        self.deliver(t, signal, &info, Some(trap))
    }

    fn deliver(
        &mut self,
        t: &mut Translator,
        sig: i32,
        info: &[u8; 128],
        trap: Option<(u64, u64, u64)>,
    ) -> Result<(), Fatal> {
        let action = self.action(sig);
        let fatal = |why: &str| Fatal {
            signal: sig,
            why: why.to_string(),
        };
        if action.flags & SA_RESTORER == 0 {
            return Err(fatal("guest handler has no SA_RESTORER (x86-64 requires one)"));
        }
        let old_mask = host_blocked();
        let s = t.state().clone();
        let rsp = s.gpr[4];
        let on_alt = matches!(self.altstack, Some((sp, size)) if rsp > sp && rsp <= sp + size);
        let top = match self.altstack {
            Some((sp, size)) if action.flags & SA_ONSTACK != 0 && !on_alt => sp + size,
            _ => rsp - 128, // the red zone
        };
        let fp_size = XsaveLayout::host().size(s.xcr0) as u64;
        let fpstate = (top - fp_size - 4) & !63;
        let frame = ((fpstate - 8 - UCONTEXT_SIZE - SIGINFO_SIZE) & !15) - 8;
        let uc = frame + 8;
        let info_at = uc + UCONTEXT_SIZE;

        let mut ucb = vec![0u8; UCONTEXT_SIZE as usize];
        let put =
            |buf: &mut Vec<u8>, off: u64, v: u64| buf[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        let (ss_sp, ss_size) = self.altstack.unwrap_or((0, 0));
        put(&mut ucb, 16, ss_sp);
        let ss_flags = if self.altstack.is_none() {
            SS_DISABLE
        } else if on_alt {
            SS_ONSTACK
        } else {
            0
        } as u64;
        put(&mut ucb, 24, ss_flags);
        put(&mut ucb, 32, ss_size);
        for (slot, &reg) in SIGCONTEXT_GPRS.iter().enumerate() {
            put(&mut ucb, MCONTEXT + 8 * slot as u64, s.gpr[reg]);
        }
        put(&mut ucb, MCONTEXT + 16 * 8, s.rip);
        put(&mut ucb, MCONTEXT + 17 * 8, s.rflags);
        put(&mut ucb, MCONTEXT + 18 * 8, 0x33 | (0x2b << 48)); // cs, gs, fs, ss
        let (trapno, err, cr2) = trap.unwrap_or((0, 0, 0));
        put(&mut ucb, MCONTEXT + 19 * 8, err);
        put(&mut ucb, MCONTEXT + 20 * 8, trapno);
        put(&mut ucb, MCONTEXT + 21 * 8, old_mask);
        put(&mut ucb, MCONTEXT + 22 * 8, cr2);
        put(&mut ucb, MCONTEXT + 23 * 8, fpstate);
        put(&mut ucb, SIGMASK, old_mask);

        let mut fp = s.xsave.0[..fp_size as usize].to_vec();
        write_sw_bytes(&mut fp, s.xcr0);
        let ok = write_host_checked(fpstate, &fp)
            && write_host_checked(fpstate + fp_size, &FP_XSTATE_MAGIC2.to_le_bytes())
            && write_host_checked(info_at, info)
            && write_host_checked(uc, &ucb)
            && write_host_checked(frame, &action.restorer.to_le_bytes());
        if !ok {
            // The kernel kills with SIGSEGV when it cannot write the frame.
            return Err(Fatal {
                signal: libc::SIGSEGV,
                why: format!("cannot write the signal {sig} frame at {frame:#x} (guest stack overflow?)"),
            });
        }
        let st = t.state_mut();
        st.gpr[4] = frame;
        st.gpr[7] = sig as u64;
        st.gpr[6] = info_at;
        st.gpr[2] = uc;
        st.gpr[0] = 0;
        st.rip = action.handler;
        st.rflags &= !((1 << 10) | (1 << 8) | (1 << 18)); // DF, TF, AC
        let mut mask = old_mask | action.mask;
        if action.flags & SA_NODEFER == 0 {
            mask |= 1 << (sig - 1);
        }
        set_host_blocked(mask);
        if action.flags & SA_RESETHAND != 0 {
            let _ = self.install(sig, Action::default());
        }
        Ok(())
    }

    /// `rt_sigreturn`: RSP points at the ucontext (the restorer's `ret` consumed pretcode).
    pub fn sigreturn(&mut self, t: &mut Translator) -> Result<(), Fatal> {
        let uc = t.state().gpr[4];
        let mut ucb = vec![0u8; UCONTEXT_SIZE as usize];
        if read_host_checked(uc, &mut ucb).is_none() {
            return Err(Fatal {
                signal: libc::SIGSEGV,
                why: format!("rt_sigreturn with an unreadable frame at {uc:#x}"),
            });
        }
        let get = |off: u64| u64::from_le_bytes(ucb[off as usize..off as usize + 8].try_into().expect("8"));
        let fpstate = get(MCONTEXT + 23 * 8);
        let xcr0 = t.state().xcr0;
        let image = if fpstate != 0 {
            Some(read_fpstate(fpstate, xcr0).map_err(|why| Fatal {
                signal: libc::SIGSEGV,
                why: format!("rt_sigreturn: {why}"),
            })?)
        } else {
            None
        };
        let st = t.state_mut();
        for (slot, &reg) in SIGCONTEXT_GPRS.iter().enumerate() {
            st.gpr[reg] = get(MCONTEXT + 8 * slot as u64);
        }
        st.rip = get(MCONTEXT + 16 * 8);
        st.rflags = (st.rflags & !FIX_EFLAGS) | (get(MCONTEXT + 17 * 8) & FIX_EFLAGS);
        if let Some(image) = image {
            st.xsave = image;
        }
        set_host_blocked(get(SIGMASK));
        Ok(())
    }
}

/// The kernel's `_fpx_sw_bytes` (in the FXSAVE image's software-reserved bytes 464..512) and the
/// word after the XSAVE image: they tell a handler, and `rt_sigreturn`, that an XSAVE image of
/// `xstate_size` bytes with components `xfeatures` follows.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
const SW_BYTES: usize = 464;

fn write_sw_bytes(fp: &mut [u8], xcr0: u64) {
    let size = fp.len() as u32;
    let sw = &mut fp[SW_BYTES..512];
    sw.fill(0);
    sw[0..4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    sw[4..8].copy_from_slice(&(size + 4).to_le_bytes()); // extended_size: image + MAGIC2
    sw[8..16].copy_from_slice(&xcr0.to_le_bytes()); // xfeatures
    sw[16..20].copy_from_slice(&size.to_le_bytes()); // xstate_size
}

/// Reads the guest's XSAVE image back from a signal frame the way the kernel does: a full image
/// when the software bytes and MAGIC2 describe one of the guest's size, otherwise only the
/// FXSAVE region (the other components return to their initial state). A malformed image
/// (header or MXCSR the CPU would refuse) is an error: the kernel kills with SIGSEGV.
fn read_fpstate(fpstate: u64, xcr0: u64) -> Result<XSaveArea, String> {
    let size = XsaveLayout::host().size(xcr0);
    let mut legacy = [0u8; 512];
    read_host_checked(fpstate, &mut legacy).ok_or(format!("unreadable fpstate at {fpstate:#x}"))?;
    let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let mut image = XSaveArea::default();
    let mut magic2 = [0u8; 4];
    let full = word(&legacy, SW_BYTES) == FP_XSTATE_MAGIC1
        && word(&legacy, SW_BYTES + 16) as usize == size
        && read_host_checked(fpstate + size as u64, &mut magic2).is_some()
        && u32::from_le_bytes(magic2) == FP_XSTATE_MAGIC2;
    if full {
        read_host_checked(fpstate, &mut image.0[..size]).ok_or(format!("unreadable XSAVE image at {fpstate:#x}"))?;
        let bv = image.xstate_bv() & xcr0;
        image.0[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    } else {
        image.0[..512].copy_from_slice(&legacy);
        image.0[XSTATE_BV..XSTATE_BV + 64].fill(0);
        image.mark_in_use(component::X87 | component::SSE);
    }
    image
        .check(xcr0)
        .map_err(|why| format!("malformed XSAVE image at {fpstate:#x}: {why}"))?;
    Ok(image)
}

/// A page fault at an address the host has mapped with the permission the access needs can
/// only be a mapping past the end of its file (or a truncated file): natively that is SIGBUS.
fn is_bus_error(addr: u64, error_code: u32) -> bool {
    let need = if error_code & 0x10 != 0 {
        libc::PROT_EXEC
    } else if error_code & 2 != 0 {
        libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let mut maps = hbt_translator::host::pages::HostMaps::default();
    maps.protection(addr).is_some_and(|p| p & need != 0)
}

/// The si_code of a floating-point exception, as the kernel's `fpu__exception_code` derives it:
/// the raised and unmasked flags of FSW/FCW (#MF) or MXCSR (#XM), first of invalid (FPE_FLTINV),
/// zero-divide (FPE_FLTDIV), overflow (FPE_FLTOVF), underflow or denormal (FPE_FLTUND),
/// precision (FPE_FLTRES).
fn fpe_code(s: &hbt_translator::GuestState, vector: u8) -> i32 {
    let err = if vector == 16 {
        s.xsave.fsw() & !s.xsave.fcw()
    } else {
        let mxcsr = s.xsave.mxcsr() as u16;
        !(mxcsr >> 7) & mxcsr
    };
    if err & 0x001 != 0 {
        7
    } else if err & 0x004 != 0 {
        3
    } else if err & 0x008 != 0 {
        4
    } else if err & 0x012 != 0 {
        5
    } else if err & 0x020 != 0 {
        6
    } else {
        0
    }
}

/// Ends hbt the way the kernel would end the program: by `fatal.signal`, after saying why.
pub fn die(program: &std::path::Path, fatal: &Fatal) -> ! {
    // SAFETY: strsignal returns a static string for valid signal numbers.
    let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(fatal.signal)) }
        .to_string_lossy()
        .into_owned();
    diag!("hbt: {}: {name} ({})", program.display(), fatal.why);
    super::census::flush();
    set_host_blocked(0);
    // SAFETY: restoring the default action and raising the signal in this process.
    unsafe {
        libc::signal(fatal.signal, libc::SIG_DFL);
        let mut set = unsafe_zeroed_sigset();
        libc::sigaddset(&mut set, fatal.signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(fatal.signal);
    }
    std::process::exit(128 + fatal.signal);
}

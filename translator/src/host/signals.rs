//! The host signal handler. Two users, one handler, chosen per thread:
//!
//! - **Translated code** (`TranslatedFaults`): a hardware fault inside a translated block
//!   (`#DE` from a re-emitted `div`, `#GP`, `#UD`, a host page fault in the identity strategy)
//!   is mapped back to the guest instruction that caused it. The handler puts borrowed scratch
//!   registers and saved flags back from the context, records the guest exception, and resumes
//!   at the shared fault-exit glue, so the guest state the engine sees is exactly the one the CPU
//!   would have left at that instruction.
//! - **The harness's native runs** (`NativeCapture`): every run ends in a signal (the test
//!   instruction is surrounded by `hlt`, which faults in user mode); the handler records the
//!   complete register and XSAVE state from the signal frame and resumes the harness.
//!
//! A third, asynchronous user: signals the *guest* handles (`hbt exec`). [`catch_async`]
//! installs [`async_handler`] for one, which records the signal and its siginfo in
//! [`PENDING`]/`SIGINFO` and interrupts translated code; the embedder delivers it to the guest
//! between blocks ([`take_pending`]).
//!
//! Handlers run on a per-thread alternate stack: guest RSP is never assumed to be a host stack.

use crate::context::{Context, ExitReason};
use crate::state::{XSAVE_AVX_OFFSET, XSAVE_CAPACITY};
use std::cell::Cell;
use std::sync::Once;

/// What the fault-mapping side needs to know about one host instruction range.
#[derive(Clone, Copy, Debug)]
pub struct FaultSite {
    pub guest_rip: u64,
    pub guest_len: u8,
    /// Registers (by hardware number) whose guest value sits in `Context::spill`.
    pub spilled: u16,
    /// Guest flags were pushed to `Context::flag_slot`.
    pub flags_in_slot: bool,
}

/// Registered by the engine while translated code runs on this thread.
pub struct TranslatedFaults {
    pub ctx: *mut Context,
    pub lookup: fn(data: *const (), host_pc: u64) -> Option<FaultSite>,
    pub data: *const (),
    pub fault_exit: u64,
    /// A write fault at `addr` by translated code at host `pc`: whether it hit a page the
    /// translator write-protected (self-modifying code, the page is writable again) and
    /// whether the writing block itself lies on that page.
    pub code_write: fn(data: *const (), addr: u64, pc: u64) -> CodeWrite,
    /// An asynchronous signal arrived: make `run` return [`crate::Exit::Interrupted`] soon.
    /// `in_code` says the host PC was inside the code buffer (translated code is running, so
    /// the engine's tables are quiescent and its links may be undone).
    pub interrupt: fn(data: *const (), pc_in_code: Option<u64>),
    /// Host address range of the code buffer (glue and blocks).
    pub code_range: (u64, u64),
}

/// What a write fault inside translated code was, for self-modifying-code detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeWrite {
    /// Not a page holding translated code: an ordinary guest fault.
    NotCode,
    /// A code page, now writable; the block doing the write is elsewhere, so the write simply
    /// runs again.
    Resume,
    /// A code page the writing block itself was translated from: later instructions of this
    /// very block may be stale, so translated code stops *before* the write (guest state as at
    /// a fault) and the engine performs it from a fresh translation.
    Stop,
}

/// Machine state captured from a signal frame. Plain data: the handler writes it, possibly into
/// memory shared with a parent process (see [`ForkCapture`]).
#[derive(Clone)]
#[repr(C)]
pub struct Captured {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub signo: i32,
    pub trapno: u64,
    pub error_code: u64,
    pub cr2: u64,
    /// ES, CS, SS, DS, FS, GS selectors.
    pub seg: [u16; 6],
    pub fs_base: u64,
    pub gs_base: u64,
    pub xsave: [u8; XSAVE_CAPACITY],
}

/// Registered by the harness around one native run.
pub struct NativeCapture {
    pub resume_rip: u64,
    pub resume_rsp: u64,
    pub valid: bool,
    pub captured: Captured,
}

/// A native run in a forked child (for instructions that change the host's FS/GS, which this
/// process cannot survive): the handler writes the capture into shared memory and exits the child.
/// Found through a process-global pointer because thread-local storage may be gone by then.
#[repr(C)]
pub struct ForkCapture {
    pub valid: u32,
    pub captured: Captured,
    /// Where the child's data region is (copied into `data` by the handler: the parent cannot
    /// see the child's memory).
    pub data_addr: u64,
    pub data: [u8; FORK_DATA_SIZE],
}

/// Bytes of guest data a forked native run reports back.
pub const FORK_DATA_SIZE: usize = 0x2000;

static FORK_CAPTURE: std::sync::atomic::AtomicPtr<ForkCapture> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// In a forked child: route the next fault's capture to `shared` and exit.
pub fn arm_fork_capture(shared: *mut ForkCapture) {
    FORK_CAPTURE.store(shared, std::sync::atomic::Ordering::SeqCst);
}

thread_local! {
    static TRANSLATED: Cell<*const TranslatedFaults> = const { Cell::new(std::ptr::null()) };
    static NATIVE: Cell<*mut NativeCapture> = const { Cell::new(std::ptr::null_mut()) };
    static ALTSTACK: Cell<bool> = const { Cell::new(false) };
}

const SIGNALS: [libc::c_int; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL, libc::SIGTRAP];
const ALTSTACK_SIZE: usize = 256 * 1024;

/// Installs the handler (once per process) and an alternate signal stack (once per thread).
pub fn ensure_installed() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        for &sig in &SIGNALS {
            // SAFETY: a zeroed sigaction is valid; we fill handler, flags and an empty mask, and
            // the handler only touches thread-local state and the signal frame.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = handler as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
    });
    ALTSTACK.with(|done| {
        if !done.get() {
            let stack = Box::leak(vec![0u8; ALTSTACK_SIZE].into_boxed_slice());
            let ss = libc::stack_t {
                ss_sp: stack.as_mut_ptr() as *mut libc::c_void,
                ss_flags: 0,
                ss_size: ALTSTACK_SIZE,
            };
            // SAFETY: the stack memory is leaked, so it outlives the thread.
            unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
            done.set(true);
        }
    });
}

/// Routes faults in translated code to `faults` until the guard drops.
pub struct TranslatedGuard(*const TranslatedFaults);

impl TranslatedGuard {
    pub fn arm(faults: &TranslatedFaults) -> Self {
        ensure_installed();
        let previous = TRANSLATED.with(|c| c.replace(faults));
        TranslatedGuard(previous)
    }
}

impl Drop for TranslatedGuard {
    fn drop(&mut self) {
        TRANSLATED.with(|c| c.set(self.0));
    }
}

/// Captures the next fault on this thread into `capture` until the guard drops.
pub struct NativeGuard;

impl NativeGuard {
    pub fn arm(capture: &mut NativeCapture) -> Self {
        ensure_installed();
        NATIVE.with(|c| c.set(capture));
        NativeGuard
    }
}

impl Drop for NativeGuard {
    fn drop(&mut self) {
        NATIVE.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Hardware register number → index into `mcontext_t::gregs`.
const GREG_OF: [usize; 16] = [
    libc::REG_RAX as usize,
    libc::REG_RCX as usize,
    libc::REG_RDX as usize,
    libc::REG_RBX as usize,
    libc::REG_RSP as usize,
    libc::REG_RBP as usize,
    libc::REG_RSI as usize,
    libc::REG_RDI as usize,
    libc::REG_R8 as usize,
    libc::REG_R9 as usize,
    libc::REG_R10 as usize,
    libc::REG_R11 as usize,
    libc::REG_R12 as usize,
    libc::REG_R13 as usize,
    libc::REG_R14 as usize,
    libc::REG_R15 as usize,
];

/// Magic the kernel writes into the FXSAVE software-reserved bytes when an XSAVE frame follows.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;

/// Copies the interrupted state out of the signal frame (async-signal-safe: no allocation).
fn capture_into(out: &mut Captured, sig: libc::c_int, uc: &libc::ucontext_t) {
    let gregs = &uc.uc_mcontext.gregs;
    for (r, &g) in GREG_OF.iter().enumerate() {
        out.gpr[r] = gregs[g] as u64;
    }
    out.rip = gregs[libc::REG_RIP as usize] as u64;
    out.rflags = gregs[libc::REG_EFL as usize] as u64;
    out.signo = sig;
    out.trapno = gregs[libc::REG_TRAPNO as usize] as u64;
    out.error_code = gregs[libc::REG_ERR as usize] as u64;
    out.cr2 = gregs[libc::REG_CR2 as usize] as u64;
    // CSGSFS packs cs, gs, fs and (since Linux 4.8) ss, 16 bits each.
    let csgsfs = gregs[libc::REG_CSGSFS as usize] as u64;
    // Linux leaves the frame's fs/gs fields zero for 64-bit processes, and signal delivery does
    // not touch the data segment registers: read them directly.
    let (ds, es, fs, gs): (u16, u16, u16, u16);
    // SAFETY: reading segment selectors has no side effects.
    unsafe {
        std::arch::asm!(
            "mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
            out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs,
            options(nomem, nostack)
        );
    }
    out.seg = [es, csgsfs as u16, (csgsfs >> 48) as u16, ds, fs, gs];
    let mut base = 0u64;
    // SAFETY: arch_prctl(ARCH_GET_FS/GS) writes one u64 through a valid pointer; async-signal-safe.
    unsafe {
        libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut base as *mut u64);
        out.fs_base = base;
        libc::syscall(libc::SYS_arch_prctl, 0x1004, &mut base as *mut u64);
        out.gs_base = base;
    }
    out.xsave.fill(0);
    let fp = uc.uc_mcontext.fpregs as *const u8;
    if !fp.is_null() {
        // SAFETY: fpregs points at the FXSAVE image (512 bytes) in the signal frame; when the
        // magic says so, an XSAVE header and extended state follow it.
        unsafe {
            std::ptr::copy_nonoverlapping(fp, out.xsave.as_mut_ptr(), 512);
            let magic = std::ptr::read_unaligned(fp.add(464) as *const u32);
            if magic == FP_XSTATE_MAGIC1 {
                // The header and every extended component the frame holds (AVX, AVX-512, …),
                // as far as the capture has room: `xstate_size` of the software-reserved bytes
                // (struct _fpx_sw_bytes at 464) is the size of the frame's XSAVE image.
                let xstate_size = std::ptr::read_unaligned(fp.add(480) as *const u32) as usize;
                let end = xstate_size.clamp(XSAVE_AVX_OFFSET, XSAVE_CAPACITY);
                std::ptr::copy_nonoverlapping(fp.add(512), out.xsave.as_mut_ptr().add(512), end - 512);
            }
        }
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // The kernel does not clear AC on signal delivery; guest code may have set it, and this
    // handler must not take alignment-check faults itself.
    // SAFETY: pushfq/popfq on our own (alternate) stack, changing only AC.
    unsafe { std::arch::asm!("pushfq", "and qword ptr [rsp], {m}", "popfq", m = const !(1i64 << 18)) };
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    let forked = FORK_CAPTURE.load(std::sync::atomic::Ordering::SeqCst);
    if !forked.is_null() {
        // SAFETY: set by arm_fork_capture in this (single-threaded, forked) process to a
        // MAP_SHARED region that stays mapped; the child exits right after.
        unsafe {
            capture_into(&mut (*forked).captured, sig, uc);
            let data = (*forked).data_addr as *const u8;
            std::ptr::copy_nonoverlapping(data, (*forked).data.as_mut_ptr(), FORK_DATA_SIZE);
            (*forked).valid = 1;
            libc::_exit(0);
        }
    }
    let native = NATIVE.with(|c| c.get());
    if !native.is_null() {
        // SAFETY: the pointer was registered by NativeGuard::arm and is live until it drops.
        let capture = unsafe { &mut *native };
        capture_into(&mut capture.captured, sig, uc);
        capture.valid = true;
        let gregs = &mut uc.uc_mcontext.gregs;
        gregs[libc::REG_RIP as usize] = capture.resume_rip as i64;
        gregs[libc::REG_RSP as usize] = capture.resume_rsp as i64;
        gregs[libc::REG_EFL as usize] = 0x202;
        return;
    }
    // SAFETY: info is valid for SA_SIGINFO handlers.
    if unsafe { (*info).si_code } <= 0 {
        // Sent by a process (kill, tgkill, sigqueue), not raised by an instruction: an
        // asynchronous signal like any other, for the embedder to deliver or die by.
        async_handler(sig, info, uc as *mut libc::ucontext_t as *mut libc::c_void);
        return;
    }
    let gregs = &mut uc.uc_mcontext.gregs;
    let translated = TRANSLATED.with(|c| c.get());
    if !translated.is_null() {
        // SAFETY: registered by TranslatedGuard::arm and live until it drops.
        let t = unsafe { &*translated };
        let pc = gregs[libc::REG_RIP as usize] as u64;
        let trapno = gregs[libc::REG_TRAPNO as usize] as u64;
        let write_fault = trapno == 14 && gregs[libc::REG_ERR as usize] & 2 != 0;
        let mut reason = ExitReason::Fault;
        if write_fault {
            match (t.code_write)(t.data, gregs[libc::REG_CR2 as usize] as u64, pc) {
                // Self-modifying code: the page is writable again; run the write again.
                CodeWrite::Resume => return,
                CodeWrite::Stop => reason = ExitReason::SelfModify,
                CodeWrite::NotCode => {}
            }
        }
        // Traps (#DB, #BP, #OF) report the address after the instruction.
        let probe = if matches!(trapno, 1 | 3 | 4) {
            pc.wrapping_sub(1)
        } else {
            pc
        };
        if let Some(site) = (t.lookup)(t.data, probe) {
            // SAFETY: ctx is the engine's live context; translated code is stopped in this
            // handler, so nothing else touches it.
            let ctx = unsafe { &mut *t.ctx };
            for r in 0..16 {
                if site.spilled & (1 << r) != 0 {
                    gregs[GREG_OF[r]] = ctx.spill[crate::context::spill_index(r)] as i64;
                }
            }
            if site.flags_in_slot {
                // SAFETY: flag_slot points into ctx.flag_stack.
                gregs[libc::REG_EFL as usize] = unsafe { *(ctx.flag_slot as *const u64) } as i64;
            }
            let is_trap = matches!(trapno, 1 | 3 | 4);
            ctx.state.rip = if is_trap {
                site.guest_rip + site.guest_len as u64
            } else {
                site.guest_rip
            };
            ctx.fault_vector = trapno as u32;
            ctx.fault_error_code = gregs[libc::REG_ERR as usize] as u32;
            ctx.fault_address = if trapno == 14 {
                gregs[libc::REG_CR2 as usize] as u64
            } else {
                // SAFETY: info is valid for SA_SIGINFO handlers.
                unsafe { (*info).si_addr() as u64 }
            };
            ctx.exit_reason = reason as u32;
            gregs[libc::REG_RIP as usize] = t.fault_exit as i64;
            return;
        }
    }
    // Not ours: say where, restore the default action and let the fault happen again.
    let pc = gregs[libc::REG_RIP as usize] as u64;
    let trapno = gregs[libc::REG_TRAPNO as usize];
    let cr2 = gregs[libc::REG_CR2 as usize];
    let msg =
        format!("hbt: host signal {sig} (trap {trapno}, address {cr2:#x}) at {pc:#x} outside translated guest code\n");
    // SAFETY: write(2) is async-signal-safe; the buffer is valid for its length.
    unsafe { libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
    // SAFETY: resetting a signal to SIG_DFL is always valid.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Signals recorded by [`async_handler`] and not yet taken (bit `sig - 1`).
static PENDING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The kernel's siginfo for each pending signal (128 bytes each).
struct SigInfoSlots(std::cell::UnsafeCell<[[u8; 128]; 64]>);
// SAFETY: written only by the async handler of signal `n` into slot `n - 1` (the handler runs
// with that signal blocked), read by `take_pending` after clearing the pending bit.
unsafe impl Sync for SigInfoSlots {}
static SIGINFO: SigInfoSlots = SigInfoSlots(std::cell::UnsafeCell::new([[0; 128]; 64]));

/// Routes host signal `sig` to [`async_handler`] (the guest has a handler for it). `restart`
/// is the guest's SA_RESTART; `mask` the guest's sa_mask, applied while the host handler runs.
pub fn catch_async(sig: i32, restart: bool, mask: u64) -> std::io::Result<()> {
    ensure_installed();
    // SAFETY: a zeroed sigaction is valid; handler, flags and mask are filled in, and the
    // handler is async-signal-safe (atomics and a fixed static slot).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = async_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | if restart { libc::SA_RESTART } else { 0 };
        libc::sigemptyset(&mut action.sa_mask);
        for n in 1..=64 {
            if mask & (1 << (n - 1)) != 0 && !SIGNALS.contains(&n) {
                libc::sigaddset(&mut action.sa_mask, n);
            }
        }
        if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Routes host signal `sig` to a handler that only stops translated code at its next block
/// boundary (`run` returns [`crate::Exit::Interrupted`]), for the embedder's own use: `hbt exec`
/// kicks guest threads with it so they apply another thread's invalidations at once. The
/// signal is never recorded as pending for the guest. System calls restart.
pub fn catch_kick(sig: i32) -> std::io::Result<()> {
    ensure_installed();
    // SAFETY: as in `catch_async`; the handler only calls the registered interrupt callback.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = kick_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A byte the kick handler sets to 1 (see [`set_kick_flag`]).
static KICK_FLAG: std::sync::atomic::AtomicPtr<u8> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Makes the kick handler set `*flag = 1` whenever it runs (null: no flag). An embedder that
/// also runs the vCPU thread in KVM points it at the vCPU's `kvm_run.immediate_exit`: a kick
/// that lands after the embedder last looked for work but before it entered KVM_RUN then makes
/// KVM_RUN return at once, instead of being lost until the guest's next exit.
///
/// # Safety
/// `flag` must stay writable until it is replaced; the handler runs on the thread the kick is
/// sent to (the vCPU thread).
pub unsafe fn set_kick_flag(flag: *mut u8) {
    KICK_FLAG.store(flag, std::sync::atomic::Ordering::SeqCst);
}

extern "C" fn kick_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: as in `handler`: only AC changes, on our own stack.
    unsafe { std::arch::asm!("pushfq", "and qword ptr [rsp], {m}", "popfq", m = const !(1i64 << 18)) };
    let flag = KICK_FLAG.load(std::sync::atomic::Ordering::SeqCst);
    if !flag.is_null() {
        // SAFETY: `set_kick_flag`'s caller keeps it writable while it is installed.
        unsafe { flag.write_volatile(1) };
    }
    let translated = TRANSLATED.with(|c| c.get());
    if !translated.is_null() {
        // SAFETY: registered by TranslatedGuard::arm and live until it drops; the ucontext is
        // the kernel's.
        let t = unsafe { &*translated };
        let pc = unsafe { (*(uc as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
        (t.interrupt)(t.data, (pc >= t.code_range.0 && pc < t.code_range.1).then_some(pc));
    }
}

/// Takes the lowest pending signal in `deliverable` (bit `sig - 1`) with its siginfo.
pub fn take_pending(deliverable: u64) -> Option<(i32, [u8; 128])> {
    use std::sync::atomic::Ordering;
    let ready = PENDING.load(Ordering::SeqCst) & deliverable;
    if ready == 0 {
        return None;
    }
    let sig = ready.trailing_zeros() as i32 + 1;
    PENDING.fetch_and(!(1 << (sig - 1)), Ordering::SeqCst);
    // SAFETY: see `SigInfoSlots`; the bit was set after the slot was written.
    let info = unsafe { (*SIGINFO.0.get())[sig as usize - 1] };
    Some((sig, info))
}

/// Whether any signal in `deliverable` is pending.
pub fn has_pending(deliverable: u64) -> bool {
    PENDING.load(std::sync::atomic::Ordering::SeqCst) & deliverable != 0
}

extern "C" fn async_handler(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: as in `handler`: only AC changes, on our own stack.
    unsafe { std::arch::asm!("pushfq", "and qword ptr [rsp], {m}", "popfq", m = const !(1i64 << 18)) };
    if !(1..=64).contains(&sig) {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo (128 bytes) and ucontext for SA_SIGINFO
    // handlers; slot `sig - 1` is written only here, with `sig` blocked.
    unsafe {
        std::ptr::copy_nonoverlapping(
            info as *const u8,
            (*SIGINFO.0.get())[sig as usize - 1].as_mut_ptr(),
            128,
        );
    }
    PENDING.fetch_or(1 << (sig - 1), std::sync::atomic::Ordering::SeqCst);
    let translated = TRANSLATED.with(|c| c.get());
    if !translated.is_null() {
        // SAFETY: registered by TranslatedGuard::arm and live until it drops.
        let t = unsafe { &*translated };
        // SAFETY: see above.
        let pc = unsafe { (*(uc as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
        (t.interrupt)(t.data, (pc >= t.code_range.0 && pc < t.code_range.1).then_some(pc));
    }
}

//! Ending a run from outside the guest: `--timeout`, SIGINT/SIGTERM/SIGHUP, a debugger asking
//! for the guest (`--gdb`), and the kick that makes the vCPU thread notice (SIGUSR1: KVM_RUN
//! returns EINTR; under `--accel bt` the translator's kick handler stops translated code at its
//! next block end).
//!
//! A watchdog thread sets the timeout and, once a stop is requested, keeps kicking the vCPU
//! until the run loop notices: a kick that lands just before KVM_RUN is lost, and a guest that
//! never exits (vmcall at CPL0, a spin) would otherwise run on.

use super::engine::End;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bit 0: `--timeout`; bits 8..: the terminating signal that arrived (SIGINT/SIGTERM/SIGHUP).
static STOP: AtomicU64 = AtomicU64::new(0);
const STOP_TIMEOUT: u64 = 1;
static VCPU_THREAD: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The signal that kicks the vCPU thread.
pub const KICK_SIGNAL: i32 = libc::SIGUSR1;
/// A debugger wants the guest stopped (gdb sent Ctrl-C or another packet while it ran): the
/// engine's run loop returns to the debugger instead of ending the run (`--gdb`).
static ATTENTION: AtomicBool = AtomicBool::new(false);

extern "C" fn on_kick(_: libc::c_int) {}
/// SIGINT/SIGTERM/SIGHUP: end the run cleanly (terminal restored, status 128 + signal).
extern "C" fn on_terminate(sig: libc::c_int) {
    // The first terminating signal wins.
    let _ = STOP.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        (v >> 8 == 0).then_some(v | (sig as u64) << 8)
    });
    kick_vcpu();
}

/// Makes the vCPU thread leave guest code by signalling it.
pub fn kick_vcpu() {
    let t = VCPU_THREAD.load(Ordering::SeqCst);
    if t != 0 {
        // SAFETY: pthread_kill on the vCPU thread, which lives for the whole run.
        unsafe { libc::pthread_kill(t as libc::pthread_t, KICK_SIGNAL) };
    }
}

/// Whether the caller is the vCPU thread (which need not kick itself).
pub fn on_vcpu_thread() -> bool {
    // SAFETY: pthread_self has no preconditions.
    VCPU_THREAD.load(Ordering::SeqCst) == unsafe { libc::pthread_self() } as u64
}

/// The stop requested so far, if any.
pub fn requested() -> Option<End> {
    let stop = STOP.load(Ordering::SeqCst);
    if stop >> 8 != 0 {
        Some(End::Interrupted((stop >> 8) as i32 & 0xff))
    } else if stop & STOP_TIMEOUT != 0 {
        Some(End::Timeout)
    } else {
        None
    }
}

/// The hybrid engine's policy wants translated user code stopped at its next block boundary
/// (it has run long enough to belong under KVM: `engine/hybrid/policy.rs`).
static POLICY_CHECK: AtomicBool = AtomicBool::new(false);

/// Asks the vCPU thread for a policy check (from the hybrid engine's timer thread).
pub fn request_policy_check() {
    POLICY_CHECK.store(true, Ordering::SeqCst);
    kick_vcpu();
}

/// Whether a policy check is waiting (async-signal-safe: the translator's stop check).
pub fn policy_check_pending() -> bool {
    POLICY_CHECK.load(Ordering::SeqCst)
}

/// Takes the policy check, if one is waiting.
pub fn take_policy_check() -> bool {
    POLICY_CHECK.swap(false, Ordering::SeqCst)
}

/// Asks the vCPU thread to stop the guest for the debugger (from any thread).
pub fn request_attention() {
    ATTENTION.store(true, Ordering::SeqCst);
    kick_vcpu();
}

/// Whether the debugger asked for the guest (async-signal-safe: the translator's stop check
/// calls it from the kick handler).
pub fn attention() -> bool {
    ATTENTION.load(Ordering::SeqCst)
}

/// Takes the debugger's request, if there is one.
pub fn take_attention() -> bool {
    ATTENTION.swap(false, Ordering::SeqCst)
}

/// Makes the calling thread the vCPU thread, installs the handlers (the kick handler is a
/// no-op that only interrupts KVM_RUN; `--accel bt` replaces it) and starts the watchdog.
pub fn arm(timeout: Option<f64>) {
    // SAFETY: pthread_self has no preconditions.
    VCPU_THREAD.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
    STOP.store(0, Ordering::SeqCst);
    if !INSTALLED.swap(true, Ordering::SeqCst) {
        // SAFETY: plain handlers without SA_RESTART, so KVM_RUN returns EINTR; they only touch
        // atomics. SA_ONSTACK: on a thread with an alternate stack (the translator's vCPU
        // thread, whose RSP holds a guest address while translated code runs) they use it.
        unsafe {
            for (sig, handler) in [
                (KICK_SIGNAL, on_kick as *const () as usize),
                (libc::SIGINT, on_terminate as *const () as usize),
                (libc::SIGTERM, on_terminate as *const () as usize),
                (libc::SIGHUP, on_terminate as *const () as usize),
            ] {
                let mut a: libc::sigaction = std::mem::zeroed();
                a.sa_sigaction = handler;
                a.sa_flags = libc::SA_ONSTACK;
                libc::sigemptyset(&mut a.sa_mask);
                libc::sigaction(sig, &a, std::ptr::null_mut());
            }
        }
    }
    let deadline = timeout.map(|secs| Instant::now() + Duration::from_secs_f64(secs.max(0.0)));
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(20));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            STOP.fetch_or(STOP_TIMEOUT, Ordering::SeqCst);
        }
        if STOP.load(Ordering::SeqCst) != 0 {
            kick_vcpu();
        }
    });
}

/// Blocks SIGINT/SIGTERM/SIGHUP on the calling thread, so the kernel delivers them to another
/// (the watchdog's): under `--accel bt` the vCPU thread should be interrupted only by the kick.
pub fn block_terminating_signals() {
    // SAFETY: a sigset built with sigemptyset/sigaddset and applied to this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

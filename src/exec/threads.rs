//! Guest threads (`clone` with `CLONE_VM`): each gets a host thread with its own translator
//! (own context, code cache and tables) over the shared address space.
//!
//! What the threads share is kept explicit:
//! - memory: it is one address space (identity strategy);
//! - `brk`: one heap, behind a mutex (`Syscalls`);
//! - invalidations: a munmap/mprotect/mmap(MAP_FIXED) in one thread is recorded here, and every
//!   other guest thread is kicked with [`KICK_SIGNAL`], which stops its translated code at the
//!   next block boundary so it applies them at once ([`catch_up`]): a thread spinning in code
//!   that was just rewritten or unmapped sees it as it would natively;
//! - self-modifying code: write-protection of code pages is per translator, so once a guest has
//!   threads it is switched off in all of them; code changes must come with an
//!   munmap/mprotect/mmap, as on CPUs that require cross-modifying code to be synchronized.
//! - signal actions: one table (`GuestSignals` clones share it); the alternate signal stack
//!   and a pending sigsuspend mask are per thread, as in the kernel.

use super::syscalls::{errno, End, Syscalls};
use super::ExecPlatform;
use hbt_translator::{Config, MemoryStrategy, Translator};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

const CLONE_SETTLS: u64 = 0x80000;
const CLONE_PARENT_SETTID: u64 = 0x100000;
const CLONE_CHILD_CLEARTID: u64 = 0x200000;
const CLONE_CHILD_SETTID: u64 = 0x1000000;
/// Pending ranges beyond which a lagging thread flushes everything instead.
const MAX_PENDING: usize = 256;

/// The signal hbt sends guest threads to make them apply invalidations (the last real-time
/// signal; the guest cannot install a handler for it).
pub const KICK_SIGNAL: i32 = 64;

/// Set once the guest has created a thread.
static THREADED: AtomicBool = AtomicBool::new(false);
/// Kernel thread ids of the live guest threads.
static TIDS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn register_thread() {
    TIDS.lock().unwrap_or_else(|e| e.into_inner()).push(gettid());
}

fn unregister_thread() {
    let me = gettid();
    TIDS.lock().unwrap_or_else(|e| e.into_inner()).retain(|&t| t != me);
}

/// Kicks every other guest thread (see [`KICK_SIGNAL`]).
fn kick_others() {
    let me = gettid();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for &tid in TIDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|&&t| t != me)
    {
        // SAFETY: tgkill to a thread of this process.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, KICK_SIGNAL) };
    }
}
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// (epoch, start, len) of the latest invalidations (at most 2 × MAX_PENDING kept).
static RANGES: Mutex<Vec<(u64, u64, u64)>> = Mutex::new(Vec::new());

pub fn threaded() -> bool {
    THREADED.load(Ordering::SeqCst)
}

/// Records an invalidation made by the current thread for the others (no-op before threads).
pub fn publish(start: u64, len: u64) {
    if !threaded() {
        return;
    }
    let mut ranges = RANGES.lock().unwrap_or_else(|e| e.into_inner());
    let epoch = EPOCH.fetch_add(1, Ordering::SeqCst) + 1;
    ranges.push((epoch, start, len));
    if ranges.len() > 2 * MAX_PENDING {
        // A thread further behind than what is kept flushes everything (see `catch_up`).
        let excess = ranges.len() - MAX_PENDING;
        ranges.drain(..excess);
    }
    drop(ranges);
    kick_others();
}

/// Applies to `t` the invalidations other threads published after `seen`.
pub fn catch_up(t: &mut Translator, seen: &mut u64) {
    let now = EPOCH.load(Ordering::SeqCst);
    if now == *seen {
        return;
    }
    let ranges = RANGES.lock().unwrap_or_else(|e| e.into_inner());
    let pending: Vec<_> = ranges.iter().filter(|r| r.0 > *seen).collect();
    let dropped = ranges.first().is_some_and(|r| r.0 > *seen + 1);
    if dropped || pending.len() > MAX_PENDING {
        t.flush();
    } else {
        for &&(_, start, len) in &pending {
            t.invalidate_range(start, len);
        }
    }
    *seen = now;
}

fn gettid() -> u64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

/// `clone(flags, stack, ptid, ctid, tls)` with CLONE_VM: starts the guest thread on a new host
/// thread and returns its thread id (or -errno).
pub fn spawn(t: &mut Translator, sys: &Syscalls, flags: u64, stack: u64, ptid: u64, ctid: u64, tls: u64) -> u64 {
    if !THREADED.swap(true, Ordering::SeqCst) {
        t.set_write_protect_code(false);
        if let Err(e) = hbt_translator::host::signals::catch_kick(KICK_SIGNAL) {
            diag!("hbt: cannot install the thread kick signal: {e}");
        }
        register_thread();
    }
    let mut state = t.state().clone();
    state.gpr[0] = 0;
    if stack != 0 {
        state.gpr[4] = stack;
    }
    if flags & CLONE_SETTLS != 0 {
        state.fs_base = tls;
    }
    let mut child_sys = sys.for_thread();
    let model = sys.cpu_model;
    let program = sys.program().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let seen = EPOCH.load(Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("hbt-guest".into())
        .stack_size(8 << 20)
        .spawn(move || {
            let tid = gettid();
            register_thread();
            if flags & CLONE_CHILD_SETTID != 0 {
                hbt_translator::mmu::write_host_checked(ctid, &(tid as u32).to_le_bytes());
            }
            let _ = tx.send(tid);
            let mut child = match Translator::new(Config {
                strategy: MemoryStrategy::Identity,
                code_cache_bytes: 64 << 20,
                verified_only: true,
                system: false,
            }) {
                Ok(c) => c,
                Err(e) => {
                    diag!(
                        "hbt: {}: cannot create a translator for a new thread: {e}",
                        program.display()
                    );
                    std::process::exit(1);
                }
            };
            child.set_write_protect_code(false);
            if let Some(counts) = super::census::counts() {
                child.record_census(counts);
            }
            *child.state_mut() = state;
            let mut platform = ExecPlatform::new(model);
            let mut seen = seen;
            match super::drive(&mut child, &mut child_sys, &mut platform, &program, &mut seen) {
                Ok(End::Thread) => {}
                Ok(End::Process(status)) => {
                    super::census::flush();
                    std::process::exit(status)
                }
                Err(e) => {
                    diag!("error: {e:#}");
                    std::process::exit(1);
                }
            }
            unregister_thread();
            if flags & CLONE_CHILD_CLEARTID != 0 {
                // What the kernel does at thread exit: clear the tid and wake a joiner.
                hbt_translator::mmu::write_host_checked(ctid, &0u32.to_le_bytes());
                // SAFETY: FUTEX_WAKE on a guest address (an int in the shared address space).
                unsafe { libc::syscall(libc::SYS_futex, ctid, libc::FUTEX_WAKE, 1, 0, 0, 0) };
            }
        });
    if spawned.is_err() {
        return errno(libc::EAGAIN);
    }
    let Ok(tid) = rx.recv() else {
        return errno(libc::EAGAIN);
    };
    if flags & CLONE_PARENT_SETTID != 0 {
        hbt_translator::mmu::write_host_checked(ptid, &(tid as u32).to_le_bytes());
    }
    tid
}

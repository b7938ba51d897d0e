//! What the host signal handler calls back into while translated code runs (allocation-free):
//! an asynchronous signal unlinking every chain so the code stops at the next block end, and
//! the host-PC → guest-instruction map for precise faults.

use super::*;

/// Asynchronous-signal callback: flag the interrupt and, when translated code is running,
/// undo every chained jump, return cache and table entry so it leaves at its next block end
/// (the dispatcher re-links lazily). Allocation-free.
///
/// A system-mode guest running with IF=0 cannot take an interrupt before it sets IF again,
/// and every instruction that does (`sti`, `popf`, `iretq`) runs in the dispatcher, which
/// checks for pending interrupts: its chains stay, which spares a kernel's `cli` sections the
/// cost of re-linking after every timer tick (≈35% of a Linux boot's wall time). A stop the
/// embedder asked for (`Translator::set_stop_check`) always unlinks: a guest spinning with
/// IF=0 must still end on `--timeout` or Ctrl-C.
pub(super) fn interrupt(data: *const (), in_code: bool) {
    // SAFETY: `data` is the Translator registered by `run`. With `in_code`, translated code is
    // stopped in the signal handler and the engine is not mutating its tables.
    let t = unsafe { &*(data as *const Translator) };
    t.interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
    if !in_code {
        return;
    }
    // The virtual IF as `enter` left it: only the dispatcher (emulated instructions) changes IF,
    // and while translated code runs it is not in the state's RFLAGS image.
    let if_clear = t.system && !t.guest_if.load(std::sync::atomic::Ordering::Relaxed);
    if if_clear && !(t.stop_check)() {
        return;
    }
    for block in t.blocks.iter().filter(|b| b.valid) {
        for link in &block.incoming {
            // SAFETY: fields recorded when the links were made, inside the code buffer.
            unsafe { link.undo(true) };
        }
    }
    let ctx = t.ctx.as_ptr();
    // Tags only: a lookup stopped between its tag check and its host load must still find the
    // (valid) host it matched.
    // SAFETY: ctx is the live context; translated code is stopped.
    unsafe { (*ctx).ibl_tags.fill(IBL_EMPTY_TAG) };
}

/// Signal-handler callback: maps a host PC inside translated code to its fault site.
pub(super) fn lookup_site(data: *const (), pc: u64) -> Option<FaultSite> {
    // SAFETY: `data` is the Translator registered by `run`, alive and not being mutated while
    // translated code runs.
    let t = unsafe { &*(data as *const Translator) };
    let i = t.block_at_host(pc)?;
    let b = &t.blocks[i];
    let off = (pc - b.host) as u32;
    b.sites.iter().find(|s| s.start <= off && off < s.end).map(|s| s.site)
}

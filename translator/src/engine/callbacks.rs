//! What the host signal handler calls back into while translated code runs (allocation-free):
//! an asynchronous signal unlinking every chain so the code stops at the next block end, and
//! the host-PC → guest-instruction map for precise faults.

use super::*;

/// Asynchronous-signal callback: flag the interrupt and, when translated code is running,
/// make it leave at its next block end: every way out of the block it is in (chained jumps,
/// inline caches) goes back to the dispatcher, where the interrupt is taken. Only
/// that block is unlinked — undoing every chain at each timer tick made the dispatcher relink
/// them all again (a Linux boot re-chained ≈160k links) — unless the signal stopped the glue
/// rather than a block (then every chain goes, as the glue may be about to enter any block).
/// Allocation-free.
///
/// A system-mode guest running with IF=0 cannot take an interrupt before it sets IF again, and
/// every instruction that does (`popf`, `iretq`) runs in the dispatcher, which checks for
/// pending interrupts, or is an inlined `sti`, which reads the interrupt controller's INTR line
/// itself (`Translator::set_interrupt_line`): its chains stay. A stop the
/// embedder asked for (`Translator::set_stop_check`) always unlinks: a guest spinning with
/// IF=0 must still end on `--timeout` or Ctrl-C.
pub(super) fn interrupt(data: *const (), pc_in_code: Option<u64>) {
    // SAFETY: `data` is the Translator registered by `run`. With a PC in code, translated code
    // is stopped in the signal handler and the engine is not mutating its tables.
    let t = unsafe { &*(data as *const Translator) };
    t.interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
    let Some(pc) = pc_in_code else {
        return;
    };
    // SAFETY: translated code is stopped on this thread; while it runs the virtual IF is in the
    // context (`Translator::enter`), changed only by the dispatcher and by inlined `cli`.
    let if_clear = t.system && unsafe { (*t.ctx.as_ptr()).virtual_if } == 0;
    if if_clear && !(t.stop_check)() {
        return;
    }
    // Its inline caches undone, the block's indirect branches miss them and leave for the
    // dispatcher (the restored fill jump), never reaching the indirect-branch table.
    if let Some(i) = t.block_at_host(pc) {
        t.unlink_exits(i, true);
        return;
    }
    // In the glue: its exit and miss paths are on their way to the dispatcher already; its
    // entry path is about to jump to one block and the extended-state load to return into
    // one, whose exits are unlinked as if it were running.
    // (Unlinking every chain whenever a tick caught the glue — a few percent of ticks — made
    // the dispatcher relink them all: ≈10% of a fork/exec-heavy guest's engine time.)
    let (base, _) = t.code.range();
    if (base..base + t.glue_len as u64).contains(&pc) {
        // The extended-state load goes back into the block that called it; the entry path
        // jumps to one block.
        // SAFETY: translated code is stopped; the block stored its return address before
        // jumping to the load, and `entry_target` was set before the entry ran.
        let block = if pc >= t.glue.load_extended_state {
            t.block_at_host(unsafe { (*t.ctx.as_ptr()).extended_state_return })
        } else if pc >= t.glue.exit {
            return;
        } else {
            t.block_at_entry(unsafe { (*t.ctx.as_ptr()).entry_target })
        };
        if let Some(i) = block {
            t.unlink_exits(i, true);
            return;
        }
    }
    // Anywhere else (or an entry target that is no block): every chain goes, and the
    // indirect-branch table's tags.
    for block in t.blocks.iter().filter(|b| b.valid) {
        for link in block.incoming.iter().chain(&block.incoming_same_pages) {
            // SAFETY: fields recorded when the links were made, inside the code buffer.
            unsafe { link.undo(true) };
        }
    }
    let ctx = t.ctx.as_ptr();
    // Tags only: a lookup stopped between its tag check and its host load must still find the
    // (valid) host it matched.
    // SAFETY: ctx is the live context; translated code is stopped.
    unsafe {
        for t in &mut (*ctx).ibls {
            t.tags.fill(IBL_EMPTY_TAG);
        }
    }
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

//! Self-modifying code under the identity strategy: pages holding translated code are
//! write-protected (`host/pages.rs`); a write fault unlinks their blocks from the signal handler
//! ([`code_write`]) and the engine invalidates them before the next block runs. The guest's own
//! munmap/mprotect/mmap drop translations of the range.

use super::*;

impl Translator {
    /// Forgets translations of code in `[start, start+len)` (identity strategy: the guest
    /// unmapped, remapped or reprotected that memory).
    pub fn invalidate_range(&mut self, start: u64, len: u64) {
        self.maps.invalidate();
        let end = start.saturating_add(len);
        let pages: Vec<u64> = self
            .code_pages
            .keys()
            .copied()
            .filter(|&p| p + PAGE > start && p < end)
            .collect();
        for page in pages {
            self.invalidate_phys_page(page);
            self.protected.forget(page);
        }
    }

    /// A shared mapping appeared (identity strategy): code pages in shared file mappings may
    /// have new aliases, which must be write-protected too.
    pub fn shared_mapping_added(&mut self) {
        self.maps.invalidate();
        if !self.write_protect_code {
            return;
        }
        let pages: Vec<u64> = self.code_pages.keys().copied().collect();
        for page in pages {
            // Cheap for pages that are not in a shared file mapping (a binary search).
            self.protected.protect_aliases(page, &mut self.maps);
        }
    }

    /// Turns write-protection of translated code pages (identity strategy) on or off; off also
    /// releases the pages protected so far. With it off, only `invalidate_range` (the guest's
    /// munmap/mprotect/mmap) drops stale translations.
    pub fn set_write_protect_code(&mut self, on: bool) {
        self.write_protect_code = on;
        if !on {
            self.protected.release_all();
        }
    }

    /// Invalidates the blocks of host pages the guest wrote since the last exit (identity
    /// strategy; the signal handler already unlinked them and made the pages writable).
    pub(super) fn invalidate_written_pages(&mut self) {
        if self.protected.dirty_count == 0 && !self.protected.dirty_overflow {
            return;
        }
        if self.protected.dirty_overflow {
            self.flush();
            return;
        }
        let dirty: Vec<u64> = self.protected.dirty[..self.protected.dirty_count].to_vec();
        self.protected.dirty_count = 0;
        for written in dirty {
            let page = self.protected.code_page_of(written);
            self.protected.forget(written);
            self.invalidate_phys_page(page);
            self.protected.forget(page);
        }
    }
}

/// Signal-handler callback for a write fault: if `addr` lies in a page the translator
/// write-protected, unlink every jump into that page's blocks (so none runs again before the
/// dispatcher invalidates them), make the page writable and record it. Allocation-free.
pub(super) fn code_write(data: *const (), addr: u64, pc: u64) -> CodeWrite {
    // SAFETY: `data` is the Translator registered by `run`; translated code is stopped in the
    // signal handler, so its tables are not being changed. The handler writes only to the
    // boxed page set (through its raw pointer), to code-buffer bytes and to the context, none
    // of which the interrupted code holds references into.
    let t = unsafe { &*(data as *const Translator) };
    let written = addr & !(PAGE - 1);
    let protected =
        &*t.protected as *const crate::host::pages::ProtectedPages as *mut crate::host::pages::ProtectedPages;
    // SAFETY: see above; the engine reads the dirty list only after translated code returns.
    if !unsafe { (*protected).is_protected(written) } {
        return CodeWrite::NotCode;
    }
    // A write through an alias (a second mapping of a shared file page) modifies the code page.
    let page = t.protected.code_page_of(written);
    let writer = t.block_at_host(pc);
    let mut own_page = false;
    if let Some(list) = t.code_pages.get(&page) {
        own_page = writer.is_some_and(|w| list.contains(&w));
        let ctx = t.ctx.as_ptr();
        for &i in list {
            let block = &t.blocks[i];
            for link in block.incoming.iter().chain(&block.incoming_same_pages) {
                // SAFETY: fields recorded when the links were made, inside the code buffer;
                // translated code is stopped in the fault handler.
                unsafe { link.undo(false) };
            }
            // SAFETY: ctx is the live context; translated code is stopped.
            unsafe { (*ctx).ibl_forget(block.key, block.host, t.glue.ibl_empty) };
        }
    }
    // SAFETY: see above.
    match unsafe { (*protected).on_write_fault(written) } {
        false => CodeWrite::NotCode,
        true if own_page => CodeWrite::Stop,
        true => CodeWrite::Resume,
    }
}

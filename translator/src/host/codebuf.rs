//! Executable memory for translated code: one RWX anonymous mapping handed out bump-style.
//! Blocks are never freed one by one; invalidated blocks are unlinked and the whole buffer is
//! recycled by a flush when it fills up (QEMU and DynamoRIO do the same).

use crate::error::TranslateError;

/// Every block starts on a cache line. Its first byte is where indirect branches land (the
/// prologue), and on an Intel Sapphire Rapids host the rotating four-target jump-table kernel of
/// `benches/translate.rs` ran at 3.5x native with its blocks on 64-byte boundaries and at 5.8x
/// to 8.0x at every other offset of the same layout (16-byte steps and 4-byte shifts, block sizes
/// perturbed by padding: only line-aligned blocks were fast, all of them). The cost is ~24 bytes
/// of padding per block (a Linux boot's code grew from 57.0 to 58.3 MiB, ~2%).
pub const BLOCK_ALIGN: usize = 64;

pub struct CodeBuffer {
    base: *mut u8,
    size: usize,
    used: usize,
}

impl CodeBuffer {
    pub fn new(size: usize) -> Result<Self, TranslateError> {
        let Some(base) = super::map_anonymous(size, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) else {
            return Err(TranslateError::Host(format!(
                "mmap of {size} bytes of executable memory failed: {}",
                std::io::Error::last_os_error()
            )));
        };
        super::advise_huge_pages(base as u64, size);
        Ok(CodeBuffer { base, size, used: 0 })
    }

    /// Address the next [`CodeBuffer::append`] writes to.
    pub fn cursor(&self) -> u64 {
        self.base as u64 + self.used as u64
    }

    pub fn remaining(&self) -> usize {
        self.size - self.used
    }

    /// The whole mapping's host address range.
    pub fn range(&self) -> (u64, u64) {
        (self.base as u64, self.base as u64 + self.size as u64)
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base as u64 && addr < self.base as u64 + self.used as u64
    }

    /// Copies `code` (encoded for address [`CodeBuffer::cursor`]) in; returns its address.
    pub fn append(&mut self, code: &[u8]) -> Result<u64, TranslateError> {
        if code.len() > self.remaining() {
            return Err(TranslateError::CodeCacheFull);
        }
        let at = self.cursor();
        // SAFETY: [used, used+len) lies inside the mapping (checked above) and nothing else
        // aliases that range: it has never been handed out.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(self.used), code.len()) };
        self.used = (self.used + code.len()).next_multiple_of(BLOCK_ALIGN);
        Ok(at)
    }

    /// Rewrites a rel32 field at `field` so the jump ending at `field + 4` goes to `target`.
    pub fn patch_rel32(&mut self, field: u64, target: u64) {
        assert!(self.contains(field), "patch outside the code buffer");
        let rel = target.wrapping_sub(field + 4) as i64;
        assert!(i32::try_from(rel).is_ok(), "chained jump out of rel32 range");
        // SAFETY: field..field+4 is inside the mapping (asserted); unaligned write of 4 bytes.
        unsafe { std::ptr::write_unaligned(field as *mut i32, rel as i32) };
    }

    /// Turns the `jmp rel32` whose rel32 is at `field` into a 5-byte NOP. (A taken jump to the
    /// next instruction is not free: it is one more always-taken branch in the history the
    /// indirect-branch predictor reads.)
    pub fn patch_jmp_to_nop(&mut self, field: u64) {
        let at = field - 1;
        assert!(
            self.contains(at) && self.contains(field + 3),
            "patch outside the code buffer"
        );
        // SAFETY: at..at+5 is inside the mapping (asserted); translated code is stopped.
        unsafe { std::ptr::copy_nonoverlapping(crate::emit::asm::NOP5.as_ptr(), at as *mut u8, 5) };
    }

    /// Rewrites a 64-bit immediate at `field`.
    pub fn patch_u64(&mut self, field: u64, value: u64) {
        assert!(self.contains(field), "patch outside the code buffer");
        // SAFETY: field..field+8 is inside the mapping (asserted); unaligned write of 8 bytes.
        unsafe { std::ptr::write_unaligned(field as *mut u64, value) };
    }

    /// Forgets every block, keeping the first `keep` bytes (the shared glue).
    pub fn reset_to(&mut self, keep: usize) {
        self.used = keep;
    }

    pub fn used(&self) -> usize {
        self.used
    }
}

impl Drop for CodeBuffer {
    fn drop(&mut self) {
        // SAFETY: base/size are the mapping created in `new`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

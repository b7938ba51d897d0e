//! Memory for the system-mode unit tests: a flat byte array mapped at virtual 0, identity
//! addressed. Every access that reaches past its end is a #PF whose error code says whether the
//! test models a user-mode or a kernel-mode access, so a test can check the exact fault the CPU
//! would deliver without building page tables.

use crate::emulate::GuestMemory;
use crate::exit::GuestException;

pub(crate) struct FlatMemory {
    bytes: Vec<u8>,
    /// Error-code U/S bit (bit 2) of the #PF an unmapped access raises.
    user: u32,
}

impl FlatMemory {
    /// `len` bytes of zeros at virtual 0; accesses above fault as from CPL3 when `user`.
    pub(crate) fn new(len: usize, user: bool) -> Self {
        FlatMemory {
            bytes: vec![0; len],
            user: if user { 4 } else { 0 },
        }
    }

    pub(crate) fn put_u64(&mut self, at: u64, v: u64) {
        self.write(at, &v.to_le_bytes())
            .expect("test memory: put_u64 inside the array");
    }

    pub(crate) fn get_u64(&mut self, at: u64) -> u64 {
        self.read_le(at, 8).expect("test memory: get_u64 inside the array")
    }
}

impl GuestMemory for FlatMemory {
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
        let src = usize::try_from(va)
            .ok()
            .and_then(|at| self.bytes.get(at..at.checked_add(buf.len())?))
            .ok_or(GuestException::page_fault(va, self.user))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
        let user = self.user;
        let dst = usize::try_from(va)
            .ok()
            .and_then(|at| self.bytes.get_mut(at..at.checked_add(data.len())?))
            .ok_or(GuestException::page_fault(va, user | 2))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

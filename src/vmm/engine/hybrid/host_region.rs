//! hbt's region of guest-physical memory (`memory::HBT_REGION_START`, reserved in the e820
//! map, never guest RAM): what KVM runs guest user code with in place of the guest kernel's
//! own structures, so that every entry into the kernel leaves KVM.
//!
//! While KVM runs user code, its GDTR, IDTR, TR and LSTAR/CSTAR point here. Every IDT gate
//! enters a two-byte stub (`out`, then `hlt`) whose exit tells hbt the vector by the stub's
//! address; the gate frame is on the stack the TSS names. The region is mapped only at
//! `HBT_VA` (PML4 slot 256, where Linux maps nothing user-accessible), supervisor-only, in the
//! tables KVM uses (`user_tables.rs`); the guest kernel, in the translator, never sees any of
//! it: its own GDTR/IDTR/TR/MSRs stay in the translator's state.
//!
//! On kvm_pvm a CPL3 `syscall` enters LSTAR without leaving the user CS (measured), so the
//! stub's fetch from a supervisor page raises #PF at the stub's address: that #PF *is* the
//! system call (RCX and R11 already hold what the CPU put there). Where `syscall` works as on
//! a CPU, the LSTAR stub runs and exits itself; both are recognized.
//!
//! All gates have DPL 0: `int n` and `int3` at CPL3 raise #GP on a CPU (on kvm_pvm `int n` is
//! #UD and int3 enters the gate), and the translator re-runs the instruction against the
//! guest's own IDT.

use memmap2::MmapMut;

/// Where the region appears in the address space KVM runs user code in.
pub const HBT_VA: u64 = 0xffff_8000_0000_0000;
/// Its PML4 slot.
pub const HBT_PML4_SLOT: usize = 256;

const GDT: u64 = 0x0000;
const IDT: u64 = 0x1000;
const TSS: u64 = 0x2000;
const STUBS: u64 = 0x3000;
const SYSCALL_STUBS: u64 = 0x4000;
/// The stack the TSS names for CPL0 (pages 0x5000-0x7fff).
const STACK_TOP: u64 = 0x8000;
const PDPT: u64 = 0x8000;
const PD: u64 = 0x9000;
const PT: u64 = 0xa000;
/// The first frame of the page-table pool (`user_tables.rs`).
pub const POOL_START: u64 = 0x10000;
const STUB_SIZE: u64 = 16;
/// `out STUB_PORT, al`: any port would do (exits are told apart by RIP).
const STUB_PORT: u8 = 0x99;
const GDT_LIMIT: u16 = 0x27;
pub const KERNEL_CS: u16 = 0x08;
pub const TSS_SELECTOR: u16 = 0x18;
const TSS_LIMIT: u32 = 0x67;

/// Pages mapped at `HBT_VA` (offset, writable, executable).
const MAPPED: [(u64, bool, bool); 8] = [
    (GDT, true, false),
    (IDT, false, false),
    (TSS, true, false),
    (STUBS, false, true),
    (SYSCALL_STUBS, false, true),
    (0x5000, true, false),
    (0x6000, true, false),
    (0x7000, true, false),
];

/// The vectors whose gate frame carries an error code.
fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The interrupted user context as the gate frame holds it.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    // (SS follows; the user's SS selector stays the translator's.)
}

/// What made user code leave KVM through the region.
#[derive(Clone, Copy, Debug)]
pub enum Entry {
    /// `syscall` (RCX: the next instruction; R11: RFLAGS; `rsp`: the user's RSP).
    Syscall { rsp: u64 },
    /// An exception or software interrupt through gate `vector`.
    Gate {
        vector: u8,
        error_code: Option<u64>,
        frame: Frame,
    },
}

/// The region's memory and layout.
pub struct HostRegion {
    mem: MmapMut,
    gpa: u64,
}

impl HostRegion {
    /// Builds the GDT, IDT, TSS, stubs and the region's own page tables in a fresh mapping of
    /// `size` bytes that will appear at guest-physical `gpa`.
    pub fn new(gpa: u64, size: u64) -> std::io::Result<Self> {
        let mut r = HostRegion {
            mem: MmapMut::map_anon(size as usize)?,
            gpa,
        };
        r.put(GDT + 8, 0x00af_9b00_0000_ffff); // 64-bit code, DPL 0
        r.put(GDT + 16, 0x00cf_9300_0000_ffff); // data, DPL 0
        let tss = HBT_VA + TSS;
        let low = TSS_LIMIT as u64 | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56);
        r.put(GDT + 24, low);
        r.put(GDT + 32, tss >> 32);
        r.put(TSS + 4, HBT_VA + STACK_TOP); // RSP0
        r.mem[(TSS + 102) as usize..(TSS + 104) as usize].copy_from_slice(&(TSS_LIMIT as u16 + 1).to_le_bytes());
        for v in 0..256u64 {
            let stub = HBT_VA + STUBS + v * STUB_SIZE;
            r.put_stub(STUBS + v * STUB_SIZE);
            let low = (stub & 0xffff) | ((KERNEL_CS as u64) << 16) | (0x8e << 40) | (((stub >> 16) & 0xffff) << 48);
            r.put(IDT + 16 * v, low);
            r.put(IDT + 16 * v + 8, stub >> 32);
        }
        r.put_stub(SYSCALL_STUBS);
        r.put_stub(SYSCALL_STUBS + STUB_SIZE);
        r.put(PDPT, (gpa + PD) | 3);
        r.put(PD, (gpa + PT) | 3);
        for (offset, writable, executable) in MAPPED {
            let mut e = (gpa + offset) | 1 | 1 << 5 | 1 << 6;
            if writable {
                e |= 2;
            }
            if !executable {
                e |= 1 << 63;
            }
            r.put(PT + 8 * (offset / 4096), e);
        }
        Ok(r)
    }

    fn put(&mut self, offset: u64, v: u64) {
        self.mem[offset as usize..offset as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn put_stub(&mut self, offset: u64) {
        let o = offset as usize;
        self.mem[o..o + 3].copy_from_slice(&[0xe6, STUB_PORT, 0xf4]);
    }

    fn get(&self, offset: u64) -> u64 {
        u64::from_le_bytes(
            self.mem[offset as usize..offset as usize + 8]
                .try_into()
                .expect("8 bytes"),
        )
    }

    pub fn host_base(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn size(&self) -> u64 {
        self.mem.len() as u64
    }

    /// The PML4 entry that maps the region at `HBT_VA` (supervisor-only).
    pub fn pml4_entry(&self) -> u64 {
        (self.gpa + PDPT) | 3
    }

    pub fn lstar(&self) -> u64 {
        HBT_VA + SYSCALL_STUBS
    }

    pub fn cstar(&self) -> u64 {
        HBT_VA + SYSCALL_STUBS + STUB_SIZE
    }

    /// GDTR, IDTR and TR as KVM takes them.
    pub fn descriptor_tables(
        &self,
    ) -> (
        kvm_bindings::kvm_dtable,
        kvm_bindings::kvm_dtable,
        kvm_bindings::kvm_segment,
    ) {
        let gdt = kvm_bindings::kvm_dtable {
            base: HBT_VA + GDT,
            limit: GDT_LIMIT,
            ..Default::default()
        };
        let idt = kvm_bindings::kvm_dtable {
            base: HBT_VA + IDT,
            limit: 256 * 16 - 1,
            ..Default::default()
        };
        let tr = kvm_bindings::kvm_segment {
            base: HBT_VA + TSS,
            limit: TSS_LIMIT,
            selector: TSS_SELECTOR,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        (gdt, idt, tr)
    }

    /// The kernel entry behind an `out` exit at `rip` (after the `out`) with `rsp`, if the exit
    /// came from a stub; `None` otherwise.
    pub fn entry(&self, rip: u64, rsp: u64) -> Option<Entry> {
        let offset = rip.wrapping_sub(HBT_VA);
        if (SYSCALL_STUBS..SYSCALL_STUBS + 2 * STUB_SIZE).contains(&offset) {
            // The stub itself ran (a CPU's `syscall`): RSP is still the user's.
            return Some(Entry::Syscall { rsp });
        }
        if !(STUBS..STUBS + 256 * STUB_SIZE).contains(&offset) {
            return None;
        }
        let vector = ((offset - STUBS) / STUB_SIZE) as u8;
        let mut at = rsp.wrapping_sub(HBT_VA);
        if !(0x5000..STACK_TOP).contains(&at) {
            return None;
        }
        let error_code = has_error_code(vector).then(|| {
            let e = self.get(at);
            at += 8;
            e
        });
        if at + 40 > STACK_TOP {
            return None;
        }
        let frame = Frame {
            rip: self.get(at),
            cs: self.get(at + 8),
            rflags: self.get(at + 16),
            rsp: self.get(at + 24),
        };
        // kvm_pvm's syscall: a #PF fetching the LSTAR/CSTAR stub itself (by RIP: CR2 may be
        // unreported, `user_vcpu::UNREPORTED_CR2`). User code that jumps there gets the same
        // frame and is taken for a system call, with whatever RCX/R11 it holds.
        if vector == 14 && (frame.rip == self.lstar() || frame.rip == self.cstar()) {
            return Some(Entry::Syscall { rsp: frame.rsp });
        }
        Some(Entry::Gate {
            vector,
            error_code,
            frame,
        })
    }
}

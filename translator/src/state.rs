//! Guest CPU state: one `#[repr(C)]` struct that translated code, the dispatcher, the harness and
//! (later) the VMM all read and write. Translated code addresses it through the host GS base
//! (see `context.rs`), so field offsets are part of the code generator's contract.

/// Index of a general-purpose register in [`GuestState::gpr`] (hardware encoding order).
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
}

/// RFLAGS bits the translator cares about.
pub mod flags {
    pub const CF: u64 = 1 << 0;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const AC: u64 = 1 << 18;
    pub const VM: u64 = 1 << 17;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bit 1 always reads as one.
    pub const FIXED: u64 = 1 << 1;
}

pub use crate::cpu::xsave::XSAVE_CAPACITY;
/// Offset of the AVX (YMM_Hi128) component in the standard (non-compacted) XSAVE format (fixed
/// by the architecture; CPUID.(0DH,2):EBX).
pub const XSAVE_AVX_OFFSET: usize = 576;
/// Components hbt initializes and compares: x87, SSE, AVX (the rest start in init state).
pub const XSAVE_MASK: u64 = 0b111;

/// The guest's extended state in the standard XSAVE layout (what `xsave`/`xrstor` use), for the
/// components of its XCR0 (laid out by `cpu::xsave::XsaveLayout`; the image has room for every
/// managed component).
#[repr(C, align(64))]
#[derive(Clone)]
pub struct XSaveArea(pub [u8; XSAVE_CAPACITY]);

impl Default for XSaveArea {
    fn default() -> Self {
        let mut area = XSaveArea([0; XSAVE_CAPACITY]);
        area.set_fcw(0x037f);
        area.set_mxcsr(0x1f80);
        // XSTATE_BV: x87, SSE and AVX are all "in use" so xrstor loads them from here.
        area.0[512..520].copy_from_slice(&XSAVE_MASK.to_le_bytes());
        area
    }
}

impl XSaveArea {
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.0[off], self.0[off + 1]])
    }
    pub fn fcw(&self) -> u16 {
        self.u16_at(0)
    }
    pub fn set_fcw(&mut self, v: u16) {
        self.0[0..2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn fsw(&self) -> u16 {
        self.u16_at(2)
    }
    pub fn set_fsw(&mut self, v: u16) {
        self.0[2..4].copy_from_slice(&v.to_le_bytes());
    }
    /// Sets FSW.TOP, keeping every physical register where it is: the image holds the stack
    /// in ST(i) order, so the slots rotate (the abridged tag word is per physical register and
    /// stays).
    pub fn set_x87_top(&mut self, top: u16) {
        let old = (self.fsw() >> 11) & 7;
        let shift = (8 + old as usize - top as usize) % 8;
        let mut regs = [[0u8; 16]; 8];
        for (i, r) in regs.iter_mut().enumerate() {
            r.copy_from_slice(&self.0[32 + 16 * i..48 + 16 * i]);
        }
        for (i, r) in regs.iter().enumerate() {
            // Physical register (old + i) % 8 becomes ST((old + i - top) % 8).
            let j = (i + shift) % 8;
            self.0[32 + 16 * j..48 + 16 * j].copy_from_slice(r);
        }
        self.set_fsw((self.fsw() & !0x3800) | ((top & 7) << 11));
    }
    /// Abridged tag word (one bit per physical register: 1 = valid).
    pub fn ftw(&self) -> u8 {
        self.0[4]
    }
    pub fn set_ftw(&mut self, v: u8) {
        self.0[4] = v;
    }
    pub fn mxcsr(&self) -> u32 {
        u32::from_le_bytes(self.0[24..28].try_into().unwrap())
    }
    pub fn set_mxcsr(&mut self, v: u32) {
        self.0[24..28].copy_from_slice(&v.to_le_bytes());
    }
    /// ST(i)/MMi, 80 significant bits in a 16-byte slot.
    pub fn st(&self, i: usize) -> &[u8] {
        &self.0[32 + 16 * i..32 + 16 * i + 10]
    }
    pub fn st_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.0[32 + 16 * i..32 + 16 * i + 10]
    }
    pub fn xmm(&self, i: usize) -> &[u8] {
        &self.0[160 + 16 * i..176 + 16 * i]
    }
    pub fn xmm_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.0[160 + 16 * i..176 + 16 * i]
    }
    /// Upper 128 bits of YMMi.
    pub fn ymm_hi(&self, i: usize) -> &[u8] {
        &self.0[XSAVE_AVX_OFFSET + 16 * i..XSAVE_AVX_OFFSET + 16 + 16 * i]
    }
    pub fn ymm_hi_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.0[XSAVE_AVX_OFFSET + 16 * i..XSAVE_AVX_OFFSET + 16 + 16 * i]
    }
    /// The bytes of extended component `bit` in this image, when the translator manages it on
    /// this host (`XsaveLayout::managed`; the standard format puts it at CPUID's offset).
    fn component_range(bit: u32) -> Option<std::ops::Range<usize>> {
        let layout = crate::cpu::xsave::XsaveLayout::host();
        if layout.managed() & (1 << bit) == 0 {
            return None;
        }
        let c = layout.component(bit)?;
        Some(c.offset as usize..(c.offset + c.size) as usize)
    }
    /// AVX-512 opmask register k`k` (None where AVX-512 state is not managed).
    pub fn opmask(&self, k: usize) -> Option<u64> {
        let r = Self::component_range(5)?;
        let at = r.start + 8 * k;
        Some(u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap()))
    }
    pub fn set_opmask(&mut self, k: usize, value: u64) {
        if let Some(r) = Self::component_range(5) {
            let at = r.start + 8 * k;
            self.0[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
    }
    /// Bits 511:256 of ZMM`i` for i < 16 (ZMM_Hi256), or all of ZMM`i` for 16 ≤ i < 32
    /// (Hi16_ZMM); None where AVX-512 state is not managed.
    pub fn zmm_upper(&self, i: usize) -> Option<&[u8]> {
        let (bit, size, n) = if i < 16 { (6, 32, i) } else { (7, 64, i - 16) };
        let r = Self::component_range(bit)?;
        Some(&self.0[r.start + size * n..r.start + size * (n + 1)])
    }
    pub fn zmm_upper_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let (bit, size, n) = if i < 16 { (6, 32, i) } else { (7, 64, i - 16) };
        let r = Self::component_range(bit)?;
        Some(&mut self.0[r.start + size * n..r.start + size * (n + 1)])
    }
    /// Sets bits of XSTATE_BV (components whose saved values xrstor must load).
    pub fn mark_in_use(&mut self, components: u64) {
        let bv = self.xstate_bv() | components;
        self.0[512..520].copy_from_slice(&bv.to_le_bytes());
    }

    /// XSTATE_BV from the XSAVE header.
    pub fn xstate_bv(&self) -> u64 {
        u64::from_le_bytes(self.0[512..520].try_into().unwrap())
    }
    /// Drops the AVX-512 components outside `xcr0` (a guest without them): zeroed, and out of
    /// XSTATE_BV.
    pub fn restrict_to(&mut self, xcr0: u64) {
        for bit in 5..8 {
            if xcr0 & (1 << bit) == 0 {
                if let Some(r) = Self::component_range(bit) {
                    self.0[r].fill(0);
                }
            }
        }
        let bv = self.xstate_bv() & (xcr0 | !crate::cpu::xsave::component::AVX512);
        self.0[512..520].copy_from_slice(&bv.to_le_bytes());
    }

    /// Rewrites components the CPU left in their initial configuration (XSTATE_BV bit clear)
    /// as explicit zeros, so two areas describing the same state compare equal byte for byte.
    pub fn normalize(&mut self) {
        let bv = self.xstate_bv();
        if bv & 1 == 0 {
            // x87 init: FCW 0x37f, everything else zero.
            self.0[0..24].fill(0);
            self.0[32..160].fill(0);
            self.set_fcw(0x037f);
        }
        if bv & 2 == 0 {
            self.0[160..416].fill(0);
        }
        if bv & 4 == 0 {
            self.0[XSAVE_AVX_OFFSET..XSAVE_AVX_OFFSET + 256].fill(0);
        }
        // AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM): all zeros in the initial configuration.
        let mut normalized = XSAVE_MASK;
        for bit in 5..8 {
            if let Some(r) = Self::component_range(bit) {
                if bv & (1 << bit) == 0 {
                    self.0[r].fill(0);
                }
                normalized |= 1 << bit;
            }
        }
        self.0[512..520].copy_from_slice(&normalized.to_le_bytes());
    }

    /// Checks that `xrstor` on a CPU whose XCR0 is `xcr0` accepts this image (standard
    /// format): XSTATE_BV within XCR0, XCOMP_BV and the rest of the header zero, no reserved
    /// MXCSR bit set. The engine checks against the host's XCR0 before every run, so an image a
    /// guest supplied can make the translator refuse, never fault in its own glue; signal-frame
    /// images are checked against the guest's.
    pub fn check(&self, xcr0: u64) -> Result<(), String> {
        let bv = self.xstate_bv();
        let comp = u64::from_le_bytes(self.0[520..528].try_into().unwrap());
        let mask = crate::cpu::xsave::host_mxcsr_mask();
        if bv & !xcr0 != 0 {
            Err(format!("XSTATE_BV {bv:#x} has components outside XCR0 {xcr0:#x}"))
        } else if comp != 0 || self.0[528..576].iter().any(|&b| b != 0) {
            Err("the XSAVE header's reserved bytes (XCOMP_BV onwards) are not zero".into())
        } else if self.mxcsr() & !mask != 0 {
            Err(format!("MXCSR {:#x} sets reserved bits (mask {mask:#x})", self.mxcsr()))
        } else {
            Ok(())
        }
    }
}

/// Privilege the guest code runs at. User mode is what `hbt exec` and the harness use; the VMM
/// runs guest kernel code at `Kernel`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Cpl {
    Kernel = 0,
    #[default]
    User = 3,
}

/// GDTR/IDTR: a descriptor table's linear base and limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// A segment register with its hidden part, as the CPU caches it from the descriptor
/// (`attr` in the VMX/KVM layout: type 0-3, S 4, DPL 5-6, P 7, AVL 8, L 9, D/B 10, G 11).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub attr: u16,
}

/// The model-specific registers the CPU core itself uses (the rest are the platform's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreMsrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub misc_enable: u64,
    /// IA32_SPEC_CTRL (IBRS, STIBP, SSBD, BHI_DIS_S): stored only. The guest's code runs translated, so
    /// these speculation controls have nothing of its to act on (`vmm/cpuid.rs`,
    /// `ARCH_CAPABILITIES`); Linux writes IBRS once at boot when it sees enhanced IBRS.
    pub spec_ctrl: u64,
    /// MSR_MISC_FEATURES_ENABLES (Intel model): bit 0 makes `cpuid` at CPL3 raise #GP(0)
    /// (CPUID faulting: Linux's `arch_prctl(ARCH_SET_CPUID, 0)`).
    pub misc_features_enables: u64,
}

/// System state: what only kernel-mode guests (`hbt run --accel bt`) use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemState {
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub ldtr: Segment,
    pub tr: Segment,
    pub msr: CoreMsrs,
    pub cr8: u64,
    pub dr: [u64; 8],
    /// An interrupt shadow is active (after `sti` or a load of SS): no interrupt before the
    /// next instruction completes.
    pub interrupt_shadow: bool,
}

/// The architectural state of one guest vCPU.
#[repr(C, align(64))]
#[derive(Clone)]
pub struct GuestState {
    /// RAX..R15 in hardware encoding order (see [`gpr`]).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cpl: Cpl,
    /// CS is a 32-bit code segment of IA-32e mode (L clear, D set): compatibility mode, where
    /// code decodes as IA-32 and addresses, the stack and near branches are 32-bit. Only at
    /// CPL3 of a whole machine (a Linux kernel running 32-bit programs); the loads of CS that
    /// can enter it (`system/transfer.rs`) set it, every entry to CPL0 clears it.
    pub code32: bool,
    /// The guest's XCR0: the XSAVE components it was offered (a subset of
    /// `XsaveLayout::managed`). Entry/exit glue save exactly these; `xgetbv` returns it.
    pub xcr0: u64,
    /// Segment selectors in hardware order: ES, CS, SS, DS, FS, GS.
    pub seg: [u16; 6],
    /// Descriptor tables, TR/LDTR, core MSRs, debug registers, CR8, the interrupt shadow.
    pub sys: SystemState,
    pub xsave: XSaveArea,
}

impl GuestState {
    /// Alignment checking is on: CPL3 with CR0.AM and RFLAGS.AC set.
    pub fn alignment_checking(&self) -> bool {
        self.paging().alignment_checking()
    }

    /// The decoder's bitness for code at RIP: 32 in compatibility mode, else 64.
    pub fn bitness(&self) -> u32 {
        if self.code32 {
            32
        } else {
            64
        }
    }

    /// A linear address as the current mode forms it: compatibility mode truncates base plus
    /// offset to 32 bits.
    pub fn wrap_address(&self, va: u64) -> u64 {
        if self.code32 {
            va & 0xffff_ffff
        } else {
            va
        }
    }

    /// The registers a page walk and an alignment check depend on.
    pub fn paging(&self) -> Paging {
        Paging {
            cr0: self.cr0,
            cr3: self.cr3,
            cr4: self.cr4,
            efer: self.efer,
            rflags: self.rflags,
            cpl: self.cpl,
        }
    }
}

/// What a guest memory access is checked against (page walk, alignment): a copy of six
/// registers, cheap to take per access where the whole state (with its XSAVE image) is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rflags: u64,
    pub cpl: Cpl,
}

impl Paging {
    /// Alignment checking applies: CPL3, CR0.AM and RFLAGS.AC.
    pub fn alignment_checking(&self) -> bool {
        self.cpl == Cpl::User && self.cr0 & (1 << 18) != 0 && self.rflags & flags::AC != 0
    }
}

impl Default for GuestState {
    fn default() -> Self {
        GuestState {
            gpr: [0; 16],
            rip: 0,
            rflags: flags::FIXED,
            fs_base: 0,
            gs_base: 0,
            kernel_gs_base: 0,
            cr0: 0x8005_0033, // PE, MP, ET, NE, WP, AM, PG
            cr2: 0,
            cr3: 0,
            cr4: 0x0004_06a0, // PAE, PGE, OSFXSR, OSXMMEXCPT, OSXSAVE
            efer: 0xd01,      // SCE, LME, LMA, NXE
            cpl: Cpl::User,
            code32: false,
            xcr0: crate::cpu::xsave::XsaveLayout::host().managed() & XSAVE_MASK,
            // What a 64-bit Linux process starts with.
            seg: [0, 0x33, 0x2b, 0, 0, 0],
            sys: SystemState::default(),
            xsave: XSaveArea::default(),
        }
    }
}

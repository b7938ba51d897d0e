//! The XSAVE layout: which extended-state components the translator manages for a guest, where
//! each one lives in the standard-format image, and how large that image is — computed from
//! CPUID leaf 0DH and XCR0, never assumed (an AVX2 host saves 832 bytes, an AVX-512 host 2,688,
//! an AMX host would need 11,008).
//!
//! Policy (one place, used by the glue, the engine, the harness and `hbt exec`):
//! - A component is **managed** when the host OS enabled it in XCR0, the translator knows what
//!   it is ([`KNOWN`]), it is not armed by XFD (eXtended Feature Disable: Linux arms AMX tile
//!   data in every process that did not ask for it with `arch_prctl(ARCH_REQ_XCOMP_PERM)`, so an
//!   `xrstor` touching it faults), and it ends inside [`XSAVE_CAPACITY`]. Everything else is
//!   [`Exclusion`]-listed with the reason.
//! - A guest's **XCR0** is a subset of the managed set that always holds x87 and SSE. The entry
//!   and exit glue save and restore exactly the guest's components; a copied guest
//!   `xsave`/`xrstor` is masked to them; CPUID leaf 0DH is rewritten for them
//!   ([`XsaveLayout::guest_cpuid`]), so a buffer sized from the guest's CPUID never receives
//!   state the guest was not offered.
//! - Components outside the guest's XCR0 keep the host's values while guest code runs; the
//!   guest cannot reach them (their instructions are not translated and its `xsave` is masked).

use iced_x86::CpuidFeature;

/// Bytes reserved for a guest's XSAVE image: every standard component up to AVX-512 and PKRU
/// (they end at 2,696 on the largest layouts seen). XFD-armed AMX tiles (8 KiB) are never
/// managed, so never need room here.
pub const XSAVE_CAPACITY: usize = 4096;
/// The legacy (FXSAVE) region and the XSAVE header: where component 2 may start at the earliest.
pub const LEGACY_AND_HEADER: usize = 512 + 64;
/// Offset of XSTATE_BV in the image.
pub const XSTATE_BV: usize = 512;
/// Offset of XCOMP_BV in the image.
pub const XCOMP_BV: usize = 520;

/// State-component bits of XCR0 / XSTATE_BV.
pub mod component {
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
    pub const AVX: u64 = 1 << 2;
    pub const BNDREGS: u64 = 1 << 3;
    pub const BNDCSR: u64 = 1 << 4;
    pub const OPMASK: u64 = 1 << 5;
    pub const ZMM_HI256: u64 = 1 << 6;
    pub const HI16_ZMM: u64 = 1 << 7;
    pub const PKRU: u64 = 1 << 9;
    pub const XTILECFG: u64 = 1 << 17;
    pub const XTILEDATA: u64 = 1 << 18;
    /// Every guest has these (XCR0 bit 0 is architecturally always set; SSE is x86-64's baseline).
    pub const BASELINE: u64 = X87 | SSE;
    pub const AVX512: u64 = OPMASK | ZMM_HI256 | HI16_ZMM;
    pub const MPX: u64 = BNDREGS | BNDCSR;
    pub const AMX: u64 = XTILECFG | XTILEDATA;
}

/// The user state components the translator knows: bit, name, and the CPUID feature whose
/// presence in a guest's CPU model offers the component (None: always offered).
pub const KNOWN: &[(u32, &str, Option<CpuidFeature>)] = &[
    (0, "x87", None),
    (1, "SSE", None),
    (2, "AVX (YMM_Hi128)", Some(CpuidFeature::AVX)),
    (3, "MPX BNDREGS", Some(CpuidFeature::MPX)),
    (4, "MPX BNDCSR", Some(CpuidFeature::MPX)),
    (5, "AVX-512 opmask", Some(CpuidFeature::AVX512F)),
    (6, "AVX-512 ZMM_Hi256", Some(CpuidFeature::AVX512F)),
    (7, "AVX-512 Hi16_ZMM", Some(CpuidFeature::AVX512F)),
    (9, "PKRU", Some(CpuidFeature::PKU)),
];

/// Where one extended component lives in the standard-format image (CPUID.(0DH, i)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Component {
    pub offset: u32,
    pub size: u32,
    /// Aligned to 64 bytes in the compacted format (CPUID.(0DH, i):ECX bit 1).
    pub align64: bool,
}

/// Why an XCR0-enabled component is not managed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// Armed by eXtended Feature Disable (AMX tiles): touching it without the OS's permission faults.
    Xfd,
    /// The translator does not know this component.
    Unknown,
    /// It would end at `end`, beyond [`XSAVE_CAPACITY`].
    DoesNotFit { end: usize },
    /// CPUID reports no size for it.
    NoLayout,
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exclusion::Xfd => write!(f, "armed by XFD (AMX: needs arch_prctl permission)"),
            Exclusion::Unknown => write!(f, "not a component the translator models"),
            Exclusion::DoesNotFit { end } => write!(f, "ends at byte {end}, beyond the {XSAVE_CAPACITY}-byte image"),
            Exclusion::NoLayout => write!(f, "CPUID leaf 0DH gives it no size"),
        }
    }
}

/// The host's XSAVE geometry and the managed component set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XsaveLayout {
    host_xcr0: u64,
    managed: u64,
    /// Components 2..63 (0 and 1 live in the legacy region).
    components: [Option<Component>; 64],
    excluded: Vec<(u32, Exclusion)>,
    /// CPUID.(0DH, 1):EAX — XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD.
    sub1_eax: u32,
}

/// A CPUID source: `(leaf, subleaf) -> [eax, ebx, ecx, edx]` (the host's, or a synthetic table).
pub type CpuidFn<'a> = &'a dyn Fn(u32, u32) -> [u32; 4];

/// CPUID.(0DH, i):ECX bit 2: the component supports XFD.
const ECX_XFD: u32 = 1 << 2;

impl XsaveLayout {
    /// The layout for a CPU whose CPUID is `cpuid` and whose OS enabled `xcr0`.
    pub fn from_cpuid(cpuid: CpuidFn, xcr0: u64) -> XsaveLayout {
        let mut components = [None; 64];
        let mut excluded = Vec::new();
        let mut managed = xcr0 & component::BASELINE;
        // AMX tile configuration and data go together: XFD arms the data, and Linux grants
        // permission for both at once.
        let xfd_pairs = |bit: u32| if bit == 17 { 1u64 << 18 } else { 0 };
        for bit in 2..63u32 {
            if xcr0 & (1 << bit) == 0 {
                continue;
            }
            let [size, offset, ecx, _] = cpuid(0xd, bit);
            if size == 0 {
                excluded.push((bit, Exclusion::NoLayout));
                continue;
            }
            let c = Component {
                offset,
                size,
                align64: ecx & 2 != 0,
            };
            components[bit as usize] = Some(c);
            let partner_xfd = xfd_pairs(bit) != 0 && xcr0 & xfd_pairs(bit) != 0 && cpuid(0xd, 18)[2] & ECX_XFD != 0;
            let end = offset as usize + size as usize;
            let why = if ecx & ECX_XFD != 0 || partner_xfd {
                Some(Exclusion::Xfd)
            } else if !KNOWN.iter().any(|&(b, _, _)| b == bit) {
                Some(Exclusion::Unknown)
            } else if end > XSAVE_CAPACITY || (offset as usize) < LEGACY_AND_HEADER {
                Some(Exclusion::DoesNotFit { end })
            } else {
                None
            };
            match why {
                Some(why) => excluded.push((bit, why)),
                None => managed |= 1 << bit,
            }
        }
        XsaveLayout {
            host_xcr0: xcr0,
            managed,
            components,
            excluded,
            sub1_eax: cpuid(0xd, 1)[0],
        }
    }

    /// This host's layout (its CPUID and XCR0), computed once.
    pub fn host() -> &'static XsaveLayout {
        static HOST: std::sync::OnceLock<XsaveLayout> = std::sync::OnceLock::new();
        HOST.get_or_init(|| {
            let cpuid = |leaf, sub| {
                let r = std::arch::x86_64::__cpuid_count(leaf, sub);
                [r.eax, r.ebx, r.ecx, r.edx]
            };
            XsaveLayout::from_cpuid(&cpuid, crate::host::features::host_xcr0())
        })
    }

    /// XCR0 as the host OS set it.
    pub fn host_xcr0(&self) -> u64 {
        self.host_xcr0
    }

    /// The components the translator can save, restore and offer to guests.
    pub fn managed(&self) -> u64 {
        self.managed
    }

    /// XCR0-enabled components that are not managed, and why.
    pub fn excluded(&self) -> &[(u32, Exclusion)] {
        &self.excluded
    }

    pub fn component(&self, bit: u32) -> Option<Component> {
        self.components.get(bit as usize).copied().flatten()
    }

    /// Bytes of a standard-format image holding the components in `mask`.
    pub fn size(&self, mask: u64) -> usize {
        (2..64)
            .filter(|&b| mask & (1u64 << b) != 0)
            .filter_map(|b| self.component(b))
            .map(|c| c.offset as usize + c.size as usize)
            .fold(LEGACY_AND_HEADER, usize::max)
    }

    /// Bytes of a compacted-format image (`xsavec`) holding the components in `mask`.
    pub fn compacted_size(&self, mask: u64) -> usize {
        self.compacted_end(mask, mask)
    }

    /// Where the last of the components in `wanted` ends in a compacted-format image laid out
    /// for the components in `layout` (XCOMP_BV); at least the legacy region and header.
    fn compacted_end(&self, layout: u64, wanted: u64) -> usize {
        let (mut offset, mut end) = (LEGACY_AND_HEADER, LEGACY_AND_HEADER);
        for b in 2..64 {
            if layout & (1u64 << b) == 0 {
                continue;
            }
            if let Some(c) = self.component(b) {
                if c.align64 {
                    offset = offset.next_multiple_of(64);
                }
                offset += c.size as usize;
                if wanted & (1u64 << b) != 0 {
                    end = offset;
                }
            }
        }
        end
    }

    /// Bytes at the start of its image that the XSAVE-family instruction `mnemonic` may touch
    /// with the requested-feature bitmap `rfbm` (EDX:EAX & XCR0): the legacy region and header,
    /// and the components it saves or loads — in the standard format, or compacted for
    /// `xsavec` and for an `xrstor` whose image says so. `xrstor` needs the image's header
    /// (`[XSTATE_BV, XCOMP_BV]`): it reads only the components both RFBM and XSTATE_BV name.
    /// None when that is not known (then the whole image counts).
    ///
    /// The rest of the image is not accessed, so it may lie in a page that faults: a buffer
    /// sized from CPUID for a narrower RFBM (glibc's lazy-binding trampoline saves SSE, AVX
    /// and AVX-512 with `xsavec` into one on its stack) ends short of the standard image.
    /// Measured on an Intel Xeon (Sapphire Rapids): `xsavec` with RFBM 0xe6 into 2,432 bytes
    /// before a PROT_NONE page completes; the standard image for the same XCR0 is 2,688 bytes.
    pub fn touched_bytes(&self, mnemonic: iced_x86::Mnemonic, rfbm: u64, header: Option<[u64; 2]>) -> Option<usize> {
        use iced_x86::Mnemonic as M;
        match mnemonic {
            M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 => Some(self.size(rfbm)),
            M::Xsavec | M::Xsavec64 => Some(self.compacted_size(rfbm)),
            M::Xrstor | M::Xrstor64 => {
                let [xstate_bv, xcomp_bv] = header?;
                let loaded = rfbm & xstate_bv;
                Some(if xcomp_bv & (1 << 63) != 0 {
                    self.compacted_end(xcomp_bv, loaded)
                } else {
                    self.size(loaded)
                })
            }
            _ => None,
        }
    }

    /// The guest XCR0 for a CPU model that offers the features `offered` says it does: the
    /// managed components whose [`KNOWN`] feature is offered.
    pub fn xcr0_for(&self, offered: impl Fn(CpuidFeature) -> bool) -> u64 {
        KNOWN
            .iter()
            .filter(|&&(_, _, feature)| feature.is_none_or(&offered))
            .map(|&(bit, _, _)| 1u64 << bit)
            .fold(0, |x, b| x | b)
            & self.managed
    }

    /// Checks that `xcr0` is a guest XCR0 this layout can run: x87 and SSE, only managed
    /// components, AVX-512 only with AVX and as a whole (the architectural XCR0 rules).
    pub fn check_guest_xcr0(&self, xcr0: u64) -> Result<(), String> {
        use component::*;
        let problem = if xcr0 & BASELINE != BASELINE {
            Some("x87 and SSE state must be enabled")
        } else if xcr0 & !self.managed != 0 {
            Some("it enables components the translator does not manage on this host")
        } else if xcr0 & AVX512 != 0 && (xcr0 & AVX512 != AVX512 || xcr0 & AVX == 0) {
            Some("AVX-512 state needs all three AVX-512 components and AVX")
        } else if xcr0 & MPX != 0 && xcr0 & MPX != MPX {
            Some("MPX state needs both MPX components")
        } else {
            None
        };
        match problem {
            Some(why) => Err(format!(
                "guest XCR0 {xcr0:#x} is invalid: {why} (managed here: {:#x})",
                self.managed
            )),
            None => Ok(()),
        }
    }

    /// Rewrites host CPUID output `regs` for leaf/subleaf as a guest with XCR0 `xcr0` must see
    /// it: leaf 0DH describes exactly the guest's components (sizes included), XFD and the
    /// supervisor states are hidden, and the feature bits of components the guest was not given
    /// (AMX; PKU) are cleared. Other leaves pass through.
    pub fn guest_cpuid(&self, xcr0: u64, leaf: u32, subleaf: u32, regs: &mut [u32; 4]) {
        match (leaf, subleaf) {
            (0xd, 0) => {
                let size = self.size(xcr0) as u32;
                *regs = [xcr0 as u32, size, size, (xcr0 >> 32) as u32];
            }
            (0xd, 1) => {
                // XSAVEOPT, XSAVEC, XGETBV1 and XSAVES stay; XFD (bit 4) is hidden; no
                // supervisor state (IA32_XSS) is offered.
                regs[0] = self.sub1_eax & 0b1111;
                regs[1] = self.compacted_size(xcr0) as u32;
                regs[2] = 0;
                regs[3] = 0;
            }
            (0xd, n) if n < 64 && xcr0 & (1u64 << n) != 0 && n >= 2 => regs[2] &= !ECX_XFD,
            (0xd, _) => *regs = [0; 4],
            (7, 0) => {
                if xcr0 & component::AMX != component::AMX {
                    regs[3] &= !((1 << 22) | (1 << 24) | (1 << 25)); // AMX-BF16, AMX-TILE, AMX-INT8
                }
                if xcr0 & component::PKRU == 0 {
                    regs[2] &= !((1 << 3) | (1 << 4)); // PKU, OSPKE
                }
            }
            (7, 1) if xcr0 & component::AMX != component::AMX => {
                regs[0] &= !(1 << 21); // AMX-FP16
                regs[3] &= !(1 << 8); // AMX-COMPLEX
            }
            // The tile information leaves.
            (0x1d | 0x1e, _) if xcr0 & component::AMX != component::AMX => *regs = [0; 4],
            _ => {}
        }
    }
}

/// The XCR0 components `instr` needs enabled, or it raises #UD (SDM Vol. 2 §2.8 and §2.7.9):
/// AVX's (with SSE's) for a VEX form on vector registers, and all three AVX-512 components as
/// well for an EVEX form or an opmask instruction. VEX forms on general registers only
/// (BMI1/BMI2) need none.
///
/// A property of the form, looked up in a table built once, like [`touches_extended_state`]
/// (the block builder asks for every instruction it decodes; iced's table of form descriptions
/// is 430 KB).
pub fn components_needed(instr: &iced_x86::Instruction) -> u64 {
    // (The components are x87/SSE/AVX/AVX-512 bits, all in the low byte: 5 KB, not 39.)
    static BY_CODE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let table = BY_CODE.get_or_init(|| {
        iced_x86::Code::values()
            .map(|c| u8::try_from(code_components_needed(c)).expect("XCR0 bits 0-7"))
            .collect()
    });
    table[instr.code() as usize] as u64
}

/// [`components_needed`] for every instruction of the form `code`.
fn code_components_needed(code: iced_x86::Code) -> u64 {
    use iced_x86::OpCodeOperandKind as K;
    let op = code.op_code();
    let kinds = op.op_kinds();
    let avx = component::SSE | component::AVX;
    match op.encoding() {
        iced_x86::EncodingKind::EVEX => avx | component::AVX512,
        iced_x86::EncodingKind::VEX => {
            let opmask = kinds
                .iter()
                .any(|k| matches!(k, K::k_reg | K::k_rm | K::k_vvvv | K::k_or_mem | K::kp1_reg));
            let vector = kinds.iter().any(|k| {
                matches!(
                    k,
                    K::xmm_reg
                        | K::xmm_rm
                        | K::xmm_vvvv
                        | K::xmm_is4
                        | K::xmm_or_mem
                        | K::ymm_reg
                        | K::ymm_rm
                        | K::ymm_vvvv
                        | K::ymm_is4
                        | K::ymm_or_mem
                        | K::mem_vsib32x
                        | K::mem_vsib64x
                        | K::mem_vsib32y
                        | K::mem_vsib64y
                )
            });
            if opmask {
                avx | component::AVX512
            } else if vector || code == iced_x86::Code::VEX_Vzeroupper || code == iced_x86::Code::VEX_Vzeroall {
                avx
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// Whether `instr` reads or writes state the XSAVE image holds — an x87, MMX, SSE/AVX/AVX-512,
/// opmask or tile register, MXCSR, the x87 control, status and tag words, PKRU, or (through
/// `xgetbv`) XINUSE — so it must not run while that state is held elsewhere
/// (`Translator::set_extended_state_stale`). Fences, prefetches, `clflush`, `movnti`, `crc32`,
/// `popcnt` and the VEX forms on general registers (BMI1/BMI2) touch none of it: the kernel
/// code a timer tick runs has `lfence` (before `rdtsc`) and no other such instruction.
///
/// A property of the form alone, looked up in a table built once: worked out afresh for each
/// instruction of each block, it was ≈1.4% of a Linux boot's translation time.
pub fn touches_extended_state(instr: &iced_x86::Instruction) -> bool {
    static BY_CODE: std::sync::OnceLock<Vec<bool>> = std::sync::OnceLock::new();
    BY_CODE.get_or_init(|| iced_x86::Code::values().map(code_touches_extended_state).collect())[instr.code() as usize]
}

/// [`touches_extended_state`] for every instruction of the form `code`.
fn code_touches_extended_state(code: iced_x86::Code) -> bool {
    use iced_x86::{CpuidFeature as F, Mnemonic as M, OpCodeOperandKind as K};
    let register = code.op_code().op_kinds().iter().any(|k| {
        matches!(
            k,
            K::st0
                | K::sti_opcode
                | K::mm_reg
                | K::mm_rm
                | K::mm_or_mem
                | K::xmm_reg
                | K::xmm_rm
                | K::xmm_vvvv
                | K::xmmp3_vvvv
                | K::xmm_is4
                | K::xmm_is5
                | K::xmm_or_mem
                | K::ymm_reg
                | K::ymm_rm
                | K::ymm_vvvv
                | K::ymm_is4
                | K::ymm_is5
                | K::ymm_or_mem
                | K::zmm_reg
                | K::zmm_rm
                | K::zmm_vvvv
                | K::zmmp3_vvvv
                | K::zmm_or_mem
                | K::k_reg
                | K::kp1_reg
                | K::k_rm
                | K::k_vvvv
                | K::k_or_mem
                | K::tmm_reg
                | K::tmm_rm
                | K::tmm_vvvv
                | K::mem_vsib32x
                | K::mem_vsib64x
                | K::mem_vsib32y
                | K::mem_vsib64y
                | K::mem_vsib32z
                | K::mem_vsib64z
        )
    });
    // x87 forms on memory alone (`fld m32`, `fnstcw`, `fninit`…) name no register.
    let x87 = code.cpuid_features().iter().any(|f| {
        matches!(
            f,
            F::FPU | F::FPU287 | F::FPU287XL_ONLY | F::FPU387 | F::FPU387SL_ONLY | F::CYRIX_FPU | F::AMX_TILE
        )
    });
    register
        || x87
        || code.is_save_restore_instruction()
        || matches!(
            code.mnemonic(),
            M::Ldmxcsr
                | M::Stmxcsr
                | M::Vldmxcsr
                | M::Vstmxcsr
                | M::Emms
                | M::Femms
                | M::Vzeroupper
                | M::Vzeroall
                | M::Wait
                | M::Xgetbv
                | M::Xsetbv
                | M::Rdpkru
                | M::Wrpkru
        )
}

/// MXCSR bits `ldmxcsr`/`xrstor` accept on this host (FXSAVE's MXCSR_MASK; 0xffbf when the
/// CPU reports 0, as the SDM specifies).
pub fn host_mxcsr_mask() -> u32 {
    static MASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MASK.get_or_init(|| {
        #[repr(C, align(16))]
        struct Fx([u8; 512]);
        let mut fx = Fx([0; 512]);
        // SAFETY: fxsave writes exactly 512 bytes to a 16-byte-aligned buffer we own.
        unsafe { std::arch::asm!("fxsave64 [{}]", in(reg) fx.0.as_mut_ptr(), options(nostack)) };
        match u32::from_le_bytes(fx.0[28..32].try_into().unwrap()) {
            0 => 0xffbf,
            m => m,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn extended_state_users_are_told_apart_from_lookalikes() {
        let decode = |bytes: &[u8]| {
            let mut d = iced_x86::Decoder::with_ip(64, bytes, 0, iced_x86::DecoderOptions::NONE);
            let i = d.decode();
            assert!(!i.is_invalid() && i.len() == bytes.len(), "{bytes:x?}");
            i
        };
        let touching: &[&[u8]] = &[
            &[0x66, 0x0f, 0xef, 0xc0],             // pxor xmm0, xmm0
            &[0xc5, 0xfc, 0x77],                   // vzeroall
            &[0xc5, 0xf8, 0x77],                   // vzeroupper
            &[0xd9, 0x07],                         // fld dword [rdi]
            &[0xdb, 0xe3],                         // fninit
            &[0xd9, 0x3f],                         // fnstcw [rdi]
            &[0x9b],                               // wait
            &[0x0f, 0xae, 0x17],                   // ldmxcsr [rdi]
            &[0x0f, 0xae, 0x07],                   // fxsave [rdi]
            &[0x48, 0x0f, 0xc7, 0x1f],             // xrstors64 [rdi]
            &[0x0f, 0xae, 0x27],                   // xsave [rdi]
            &[0x0f, 0x01, 0xd0],                   // xgetbv
            &[0x0f, 0x01, 0xee],                   // rdpkru
            &[0x0f, 0x77],                         // emms
            &[0x0f, 0x6f, 0x07],                   // movq mm0, [rdi]
            &[0xc5, 0xf8, 0x90, 0xc1],             // kmovw k0, k1
            &[0x62, 0xf1, 0x7c, 0x48, 0x10, 0x07], // vmovups zmm0, [rdi]
            &[0xc4, 0xe2, 0x69, 0x90, 0x04, 0x8f], // vpgatherdd xmm0, [rdi+xmm1*4], xmm2
        ];
        for bytes in touching {
            assert!(touches_extended_state(&decode(bytes)), "{}", decode(bytes));
        }
        let untouched: &[&[u8]] = &[
            &[0x0f, 0xae, 0xe8],                   // lfence
            &[0x0f, 0xae, 0xf0],                   // mfence
            &[0x0f, 0x18, 0x0f],                   // prefetcht0 [rdi]
            &[0x0f, 0xae, 0x3f],                   // clflush [rdi]
            &[0x48, 0x0f, 0xc3, 0x07],             // movnti [rdi], rax
            &[0xf3, 0x48, 0x0f, 0xb8, 0xc1],       // popcnt rax, rcx
            &[0xc4, 0xe2, 0xf8, 0xf2, 0xc1],       // andn rax, rax, rcx
            &[0xc4, 0xe3, 0xfb, 0xf0, 0xc1, 0x05], // rorx rax, rcx, 5
            &[0x0f, 0x31],                         // rdtsc
            &[0xf3, 0x90],                         // pause
            &[0x48, 0x01, 0xc8],                   // add rax, rcx
        ];
        for bytes in untouched {
            assert!(!touches_extended_state(&decode(bytes)), "{}", decode(bytes));
        }
    }

    /// A synthetic CPUID: leaf 0DH subleaves as `(subleaf, [eax, ebx, ecx, edx])`.
    fn table(sub: &[(u32, [u32; 4])]) -> impl Fn(u32, u32) -> [u32; 4] {
        let map: HashMap<u32, [u32; 4]> = sub.iter().copied().collect();
        move |leaf, s| {
            if leaf == 0xd {
                map.get(&s).copied().unwrap_or([0; 4])
            } else {
                [0; 4]
            }
        }
    }

    /// Intel Xeon Sapphire Rapids with AMX enabled in XCR0 (0x602e7), as measured there.
    fn sapphire_rapids_amx() -> XsaveLayout {
        let cpuid = table(&[
            (0, [0x602e7, 11008, 11008, 0]),
            (1, [0x1f, 2440, 0x1900, 0]),
            (2, [256, 576, 0, 0]),
            (5, [64, 1088, 0, 0]),
            (6, [512, 1152, 0, 0]),
            (7, [1024, 1664, 0, 0]),
            (9, [8, 2688, 0, 0]),
            (17, [64, 2752, 2, 0]),
            (18, [8192, 2816, 6, 0]),
        ]);
        XsaveLayout::from_cpuid(&cpuid, 0x602e7)
    }

    /// An AVX-512 host without AMX in XCR0 (0xe7), as measured on an Intel Xeon of this project.
    fn avx512_no_amx() -> XsaveLayout {
        let cpuid = table(&[
            (0, [0xe7, 2688, 11008, 0]),
            (1, [0x1f, 2432, 0, 0]),
            (2, [256, 576, 0, 0]),
            (5, [64, 1088, 0, 0]),
            (6, [512, 1152, 0, 0]),
            (7, [1024, 1664, 0, 0]),
            (17, [64, 2752, 2, 0]),
            (18, [8192, 2816, 6, 0]),
        ]);
        XsaveLayout::from_cpuid(&cpuid, 0xe7)
    }

    /// An AVX2-only host (AMD EPYC without AVX-512: XCR0 0x7; PKRU on some parts).
    fn avx2_only() -> XsaveLayout {
        let cpuid = table(&[
            (0, [0x207, 840, 840, 0]),
            (1, [0xf, 840, 0, 0]),
            (2, [256, 576, 0, 0]),
            (9, [8, 832, 0, 0]),
        ]);
        XsaveLayout::from_cpuid(&cpuid, 0x207)
    }

    #[test]
    fn amx_host_manages_everything_but_the_xfd_tiles() {
        let l = sapphire_rapids_amx();
        assert_eq!(l.managed(), 0x2e7);
        assert_eq!(l.size(l.managed()), 2696, "ends with PKRU at 2688 + 8");
        assert!(l.size(l.managed()) <= XSAVE_CAPACITY);
        assert_eq!(l.excluded(), &[(17, Exclusion::Xfd), (18, Exclusion::Xfd)]);
        // The host's own size (11,008) is not what a guest is told.
        let mut regs = [0x602e7, 11008, 11008, 0];
        l.guest_cpuid(l.managed(), 0xd, 0, &mut regs);
        assert_eq!(regs, [0x2e7, 2696, 2696, 0]);
        let mut leaf7 = [0, 0, 0x18, (1 << 22) | (1 << 24) | (1 << 25) | (1 << 23)];
        l.guest_cpuid(l.managed(), 7, 0, &mut leaf7);
        assert_eq!(leaf7[3], 1 << 23, "AMX bits hidden, AVX512-FP16 kept");
        let mut tiles = [1, 2, 3, 4];
        l.guest_cpuid(l.managed(), 0x1d, 0, &mut tiles);
        assert_eq!(tiles, [0; 4]);
    }

    #[test]
    fn avx512_host_without_amx() {
        let l = avx512_no_amx();
        assert_eq!(l.managed(), 0xe7);
        assert_eq!(l.size(0xe7), 2688);
        assert_eq!(l.size(0x7), 832);
        assert_eq!(l.size(0x3), 576);
        assert!(l.excluded().is_empty(), "AMX is not in XCR0, so nothing is excluded");
        // Compacted: 576 + 256 + 64 + 512 + 1024.
        assert_eq!(l.compacted_size(0xe7), 2432);
        assert_eq!(l.compacted_size(0x7), 832);
    }

    #[test]
    fn an_xsave_family_instruction_touches_only_what_rfbm_names() {
        use iced_x86::Mnemonic as M;
        let l = avx512_no_amx();
        // Standard format: up to the last component in RFBM (AVX-512 after MPX's gap).
        assert_eq!(l.touched_bytes(M::Xsave64, 0x3, None), Some(576));
        assert_eq!(l.touched_bytes(M::Xsaveopt, 0x7, None), Some(832));
        assert_eq!(l.touched_bytes(M::Xsave, 0xe6, None), Some(2688));
        // Compacted: packed, so AVX-512 state ends 256 bytes earlier.
        assert_eq!(l.touched_bytes(M::Xsavec64, 0xe6, None), Some(2432));
        assert_eq!(l.touched_bytes(M::Xsavec, 0x3, None), Some(576));
        // xrstor reads what both RFBM and XSTATE_BV name, in the image's own format.
        assert_eq!(l.touched_bytes(M::Xrstor64, 0xe6, None), None, "header unknown");
        assert_eq!(l.touched_bytes(M::Xrstor64, 0xe6, Some([0x3, 0])), Some(576));
        assert_eq!(l.touched_bytes(M::Xrstor64, 0xe6, Some([0x27, 0])), Some(1152));
        let compacted = 1 << 63 | 0xe7;
        assert_eq!(l.touched_bytes(M::Xrstor, 0xe7, Some([0xe7, compacted])), Some(2432));
        assert_eq!(
            l.touched_bytes(M::Xrstor, 0x27, Some([0xe7, compacted])),
            Some(576 + 256 + 64)
        );
        assert_eq!(l.touched_bytes(M::Xrstor, 0x3, Some([0xe7, compacted])), Some(576));
        assert_eq!(l.touched_bytes(M::Fxsave64, 0x3, None), None);
    }

    #[test]
    fn avx2_host() {
        let l = avx2_only();
        assert_eq!(l.managed(), 0x207);
        assert_eq!(l.size(0x207), 840);
        assert_eq!(l.xcr0_for(|f| f == CpuidFeature::AVX), 0x7);
        assert_eq!(l.xcr0_for(|_| false), 0x3);
        assert_eq!(l.xcr0_for(|_| true), 0x207);
    }

    #[test]
    fn guest_xcr0_narrower_than_the_host_rewrites_leaf_0d() {
        let l = avx512_no_amx();
        let g = l.xcr0_for(|f| matches!(f, CpuidFeature::AVX));
        assert_eq!(g, 0x7, "no AVX-512 offered: its three components are left out");
        let mut sub0 = [0xe7, 2688, 11008, 0];
        l.guest_cpuid(g, 0xd, 0, &mut sub0);
        assert_eq!(sub0, [0x7, 832, 832, 0]);
        let mut sub1 = [0x1f, 2432, 0x1900, 0];
        l.guest_cpuid(g, 0xd, 1, &mut sub1);
        assert_eq!(
            sub1,
            [0xf, 832, 0, 0],
            "XFD hidden, compacted size for the guest's components"
        );
        let mut opmask = [64, 1088, 0, 0];
        l.guest_cpuid(g, 0xd, 5, &mut opmask);
        assert_eq!(opmask, [0; 4], "components the guest lacks have no layout");
        let mut avx = [256, 576, 0, 0];
        l.guest_cpuid(g, 0xd, 2, &mut avx);
        assert_eq!(avx, [256, 576, 0, 0]);
    }

    #[test]
    fn guest_xcr0_rules() {
        let l = avx512_no_amx();
        assert!(l.check_guest_xcr0(0x3).is_ok());
        assert!(l.check_guest_xcr0(0x7).is_ok());
        assert!(l.check_guest_xcr0(0xe7).is_ok());
        assert!(l.check_guest_xcr0(0x1).is_err(), "SSE is required");
        assert!(l.check_guest_xcr0(0x67).is_err(), "AVX-512 comes as a whole");
        assert!(l.check_guest_xcr0(0xe3).is_err(), "AVX-512 needs AVX");
        assert!(l.check_guest_xcr0(0x60007).is_err(), "AMX is not managed");
    }

    #[test]
    fn components_that_do_not_fit_or_are_unknown_are_excluded() {
        let cpuid = table(&[(2, [256, 576, 0, 0]), (9, [8, 5000, 0, 0]), (11, [16, 900, 0, 0])]);
        let l = XsaveLayout::from_cpuid(&cpuid, 0x807 | (1 << 9));
        assert_eq!(l.managed(), 0x7);
        assert_eq!(
            l.excluded(),
            &[(9, Exclusion::DoesNotFit { end: 5008 }), (11, Exclusion::Unknown)]
        );
    }
}

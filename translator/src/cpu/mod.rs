//! The CPU as the translator models it for a guest, derived from the host's CPUID: where CPUID
//! reports each feature (`cpuid_bits.rs`), the XSAVE layout and the guest's XCR0 (`xsave.rs`),
//! and the vendor differences it reproduces (`vendor.rs`). [`HostCpu`] names the host in reports (`hbt isa-test`, `supported.txt`, the
//! README status), because which forms can be verified, and how they behave, depends on it.

pub mod cpuid_bits;
pub mod vendor;
pub mod xsave;

use vendor::Vendor;
use xsave::XsaveLayout;

/// The facts about the host CPU that decide what the harness can verify here.
#[derive(Clone, Debug)]
pub struct HostCpu {
    pub vendor: Vendor,
    pub vendor_id: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub brand: String,
    pub xcr0: u64,
    /// Bytes `xsave` writes for the host's XCR0 (CPUID.(0DH,0):EBX).
    pub xsave_size: u32,
    /// Components the translator manages here, and the size of their image.
    pub managed_xcr0: u64,
    pub managed_size: usize,
    /// Feature flags that change which instruction forms can be verified here.
    pub flags: Vec<&'static str>,
}

/// Flags worth naming next to a figure: (name, leaf, subleaf, register index, bit).
const NOTABLE_FLAGS: &[(&str, u32, u32, usize, u32)] = &[
    ("avx2", 7, 0, 1, 5),
    ("avx512f", 7, 0, 1, 16),
    ("avx512bw", 7, 0, 1, 30),
    ("avx512vl", 7, 0, 1, 31),
    ("avx512_fp16", 7, 0, 3, 23),
    ("amx_tile", 7, 0, 3, 24),
    ("gfni", 7, 0, 2, 8),
    ("vaes", 7, 0, 2, 9),
    ("sha_ni", 7, 0, 1, 29),
    ("sse4a", 0x8000_0001, 0, 2, 6),
    ("xop", 0x8000_0001, 0, 2, 11),
];

impl HostCpu {
    pub fn get() -> HostCpu {
        let id = |leaf, sub| {
            let r = std::arch::x86_64::__cpuid_count(leaf, sub);
            [r.eax, r.ebx, r.ecx, r.edx]
        };
        let l0 = id(0, 0);
        let mut vendor_id = Vec::with_capacity(12);
        for r in [l0[1], l0[3], l0[2]] {
            vendor_id.extend_from_slice(&r.to_le_bytes());
        }
        let sig = id(1, 0)[0];
        let base_family = (sig >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((sig >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((sig >> 4) & 0xf) | (((sig >> 16) & 0xf) << 4)
        } else {
            (sig >> 4) & 0xf
        };
        let max_ext = id(0x8000_0000, 0)[0];
        let brand = if max_ext >= 0x8000_0004 {
            let mut b = Vec::with_capacity(48);
            for leaf in 0x8000_0002..=0x8000_0004 {
                for r in id(leaf, 0) {
                    b.extend_from_slice(&r.to_le_bytes());
                }
            }
            String::from_utf8_lossy(&b)
                .trim_matches(char::from(0))
                .trim()
                .to_string()
        } else {
            String::new()
        };
        let max = l0[0];
        let flags = NOTABLE_FLAGS
            .iter()
            .filter(|&&(_, leaf, sub, reg, bit)| {
                let avail = if leaf >= 0x8000_0000 {
                    leaf <= max_ext
                } else {
                    leaf <= max
                };
                avail && id(leaf, sub)[reg] & (1 << bit) != 0
            })
            .map(|&(name, ..)| name)
            .collect();
        let layout = XsaveLayout::host();
        HostCpu {
            vendor: Vendor::host(),
            vendor_id: String::from_utf8_lossy(&vendor_id).into_owned(),
            family,
            model,
            stepping: sig & 0xf,
            brand,
            xcr0: layout.host_xcr0(),
            xsave_size: id(0xd, 0)[1],
            managed_xcr0: layout.managed(),
            managed_size: layout.size(layout.managed()),
            flags,
        }
    }

    /// One line: `Intel(R) Xeon(R) … (GenuineIntel family 6 model 0xcf stepping 2), XCR0 0xe7
    /// (XSAVE 2688 bytes), flags: avx2 avx512f …`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} family {} model {:#x} stepping {}), XCR0 {:#x} (XSAVE {} bytes; managed {:#x}, {} bytes), flags: {}",
            if self.brand.is_empty() { "unknown model" } else { &self.brand },
            self.vendor_id,
            self.family,
            self.model,
            self.stepping,
            self.xcr0,
            self.xsave_size,
            self.managed_xcr0,
            self.managed_size,
            if self.flags.is_empty() {
                "none of note".to_string()
            } else {
                self.flags.join(" ")
            }
        )
    }
}

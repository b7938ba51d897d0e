//! Linux bzImage, 64-bit boot protocol (Documentation/arch/x86/boot.rst, version ≥ 2.12): the
//! kernel, the initrd near the top of low RAM, the command line, and a zero page (boot_params)
//! with the setup header and an e820 map; RSI = boot_params at entry. The kernel is the one in
//! the payload, decompressed and placed by hbt when the payload is LZ4 (`vmlinux.rs`: the guest
//! is spared its decompressor), entered at its `startup_64`; otherwise the protected-mode kernel
//! at 1 MiB, entered at its 64-bit entry point (load address + 0x200), decompresses itself.

use super::error::{fits, LoadError, Result};
use super::vmlinux::{self, Header};
use super::{Decompress, Entry, LoadOptions, Placement};
use crate::vmm::memory::GuestMemory;

const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 0x10000;
const KERNEL_ADDR: u64 = 0x100000;
const HDR_MAGIC: &[u8; 4] = b"HdrS";
const MIN_VERSION: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
const E820_MAX: usize = 128;
/// boot_params loadflags: the kernel was placed at a random address.
const KASLR_FLAG: u8 = 1 << 1;

pub fn is_bzimage(b: &[u8]) -> bool {
    b.len() > 0x250 && &b[0x202..0x206] == HDR_MAGIC && b[0x1fe] == 0x55 && b[0x1ff] == 0xaa
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

pub fn load(b: &[u8], mem: &mut GuestMemory, opts: &LoadOptions) -> Result<Entry> {
    let version = u16_at(b, 0x206);
    if version < MIN_VERSION {
        return Err(LoadError::OldProtocol {
            major: (version >> 8) as u8,
            minor: version as u8,
        });
    }
    if u16_at(b, 0x236) & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry);
    }
    let setup_sects = match b[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let kernel_off = (setup_sects + 1) * 512;
    if kernel_off >= b.len() {
        return Err(LoadError::Truncated {
            setup_sects,
            len: b.len(),
        });
    }
    // (`is_bzimage` saw 0x250 bytes; the fields up to 0x268 exist from protocol 2.10 on.)
    let field_end = 0x268;
    let header = (b.len() >= field_end).then(|| Header {
        payload_offset: u32_at(b, 0x248) as usize,
        payload_length: u32_at(b, 0x24c) as usize,
        pref_address: u64_at(b, 0x258),
        kernel_alignment: u32_at(b, 0x230) as u64,
        init_size: u32_at(b, 0x260) as u64,
        relocatable: b[0x234] != 0,
    });
    // The initrd near the top of low RAM, below the kernel's initrd_addr_max: decided first,
    // so that a kernel hbt places keeps clear of it.
    let initrd = match opts.initrd {
        Some(path) => {
            let initrd = hbt_translator::host::files::read_regular(path, mem.size(), "an --initrd (at most --mem)")?;
            let low_top = mem
                .e820()
                .iter()
                .filter(|e| e.2 == 1 && e.0 < 1 << 32)
                .map(|e| e.0 + e.1)
                .max()
                .unwrap_or(0);
            let max = u32_at(b, 0x22c) as u64; // initrd_addr_max
            let top = low_top.min(if max == 0 { 0x37ff_ffff } else { max + 1 });
            match top.checked_sub(initrd.len() as u64).map(|a| a & !0xfff) {
                Some(at) if at > KERNEL_ADDR => Some((at, initrd, top)),
                _ => return Err(LoadError::InitrdTooBig { len: initrd.len(), top }),
            }
        }
        None => None,
    };
    let initrd_range = initrd.as_ref().map(|(at, bytes, _)| *at..at + bytes.len() as u64);
    let kernel = &b[kernel_off..];
    let payload = header
        .as_ref()
        .filter(|_| opts.decompress == Decompress::Hbt)
        .and_then(|h| Some((h, vmlinux::lz4_payload(kernel, h)?)));
    // (KASLR: the flag says the kernel was randomized — when it has a relocation table and
    // the command line allows it, as the decompressor would have set it.)
    let (rip, kaslr, placement, kind) = match payload {
        Some((h, payload)) => {
            let offset = kernel_off + h.payload_offset;
            let k = vmlinux::load(payload, offset, h, mem, opts.cmdline, initrd_range)?;
            let placement = Placement {
                virtual_offset: k.kaslr_offset.unwrap_or(0),
                physical: k.physical,
            };
            let kind = "Linux bzImage, LZ4 kernel decompressed by hbt";
            (k.entry, k.kaslr_offset.is_some(), Some(placement), kind)
        }
        None => {
            let end = KERNEL_ADDR + kernel.len() as u64;
            if let Some((at, bytes, top)) = &initrd {
                if *at <= end {
                    return Err(LoadError::InitrdTooBig {
                        len: bytes.len(),
                        top: *top,
                    });
                }
            }
            fits("the kernel", mem.write(KERNEL_ADDR, kernel))?;
            (KERNEL_ADDR + 0x200, false, None, "Linux bzImage")
        }
    };

    // The zero page: the setup header copied to its offset, then the loader's fields.
    let hdr_end = (0x202 + b[0x201] as usize).min(b.len()).max(0x1f1);
    let mut zp = vec![0u8; 4096];
    zp[0x1f1..hdr_end].copy_from_slice(&b[0x1f1..hdr_end]);
    zp[0x210] = 0xff; // type_of_loader: undefined
    zp[0x211] |= 0x80; // loadflags: CAN_USE_HEAP
    if kaslr {
        zp[0x211] |= KASLR_FLAG;
    }
    zp[0x224..0x226].copy_from_slice(&0xde00u16.to_le_bytes()); // heap_end_ptr
    let cmdline = opts.cmdline.as_bytes();
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut c = cmdline.to_vec();
    c.push(0);
    fits("the command line", mem.write(CMDLINE, &c))?;
    zp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
    if let Some((at, bytes, _)) = &initrd {
        fits("the initrd", mem.write(*at, bytes))?;
        zp[0x218..0x21c].copy_from_slice(&(*at as u32).to_le_bytes());
        zp[0x21c..0x220].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
    }
    let e820 = mem.e820();
    if e820.len() > E820_MAX {
        return Err(LoadError::E820TooLong(E820_MAX));
    }
    zp[0x1e8] = e820.len() as u8;
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        let o = 0x2d0 + 20 * i;
        zp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        zp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        zp[o + 16..o + 20].copy_from_slice(&ty.to_le_bytes());
    }
    fits("boot_params", mem.write(ZERO_PAGE, &zp))?;
    Ok(Entry {
        rip,
        rsp: crate::vmm::boot::BOOT_STACK,
        rsi: ZERO_PAGE,
        kind,
        kernel: placement,
    })
}

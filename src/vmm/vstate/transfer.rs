//! The translator's [`GuestState`] — the one complete x86-64 state hbt has — to and from a KVM
//! vCPU's: general registers, segment registers with their hidden parts, extended (XSAVE)
//! state. Used wherever a state crosses between the engines: the KVM reference of
//! `isa-test --system` and the hybrid engine's switches.

use hbt_translator::state::{GuestState, Segment};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_xcrs, kvm_xsave};
use kvm_ioctls::VcpuFd;

/// An ioctl's error, named.
pub fn named(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |err| format!("{what}: {err}")
}

/// GPRs, RIP and RFLAGS as KVM takes them.
pub fn regs_of(s: &GuestState) -> kvm_regs {
    let g = &s.gpr;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: s.rip,
        rflags: s.rflags,
    }
}

/// KVM's GPRs in hardware encoding order (RAX..R15).
pub fn gprs_of(r: &kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
    ]
}

/// A code or data segment register as the CPU caches it from `descriptor` (the 8 bytes at the
/// selector's slot in the GDT; `None`: a null selector or one outside the table, which is
/// unusable). `base` overrides the descriptor's, for FS and GS.
pub fn segment_from_descriptor(selector: u16, descriptor: Option<u64>, base: Option<u64>) -> kvm_segment {
    let Some(d) = descriptor.filter(|_| selector & !3 != 0) else {
        return kvm_segment {
            selector,
            base: base.unwrap_or(0),
            unusable: 1,
            dpl: (selector & 3) as u8,
            ..Default::default()
        };
    };
    let g = (d >> 55) & 1;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: base.unwrap_or(((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24)),
        limit: if g != 0 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g: g as u8,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// TR or LDTR from the translator's descriptor cache (`attr` in the VMX layout).
pub fn system_segment(seg: &Segment, default_type: u8) -> kvm_segment {
    let a = seg.attr;
    kvm_segment {
        base: seg.base,
        limit: seg.limit,
        selector: seg.selector,
        type_: if a == 0 { default_type } else { (a & 0xf) as u8 },
        present: ((a >> 7) & 1) as u8,
        dpl: ((a >> 5) & 3) as u8,
        s: 0,
        unusable: (a & 0x80 == 0 && seg.selector == 0) as u8,
        ..Default::default()
    }
}

/// Loads XCR0 and the XSAVE image (standard format; the part KVM's 4 KiB buffer holds).
pub fn set_extended_state(vcpu: &VcpuFd, s: &GuestState) -> Result<(), String> {
    set_xcr0(vcpu, s.xcr0)?;
    set_xsave_image(vcpu, &s.xsave.0)
}

pub fn set_xcr0(vcpu: &VcpuFd, xcr0: u64) -> Result<(), String> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).map_err(named("KVM_SET_XCRS"))
}

/// Loads the first 4 KiB of a standard-format XSAVE image.
pub fn set_xsave_image(vcpu: &VcpuFd, image: &[u8]) -> Result<(), String> {
    let mut xsave = kvm_xsave::default();
    for (w, b) in xsave.region.iter_mut().zip(image.chunks(4)) {
        *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    vcpu.set_xsave(&xsave).map_err(named("KVM_SET_XSAVE"))
}

/// Reads the vCPU's XSAVE image into the first 4 KiB of `image`.
pub fn get_xsave_image(vcpu: &VcpuFd, image: &mut [u8]) -> Result<(), String> {
    let xsave = vcpu.get_xsave().map_err(named("KVM_GET_XSAVE"))?;
    for (b, w) in image.chunks_mut(4).zip(xsave.region.iter()) {
        b.copy_from_slice(&w.to_le_bytes());
    }
    Ok(())
}

/// Reads XCR0 and the XSAVE image back into `s`.
pub fn get_extended_state(vcpu: &VcpuFd, s: &mut GuestState) -> Result<(), String> {
    let xcrs = vcpu.get_xcrs().map_err(named("KVM_GET_XCRS"))?;
    s.xcr0 = xcrs.xcrs[..xcrs.nr_xcrs as usize]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(0, |x| x.value);
    get_xsave_image(vcpu, &mut s.xsave.0)
}

//! The vCPU's registers in one engine-neutral shape, taken from KVM or from the translator, for
//! the reports a run ends with (where the guest was: registers and the instruction at RIP).

use hbt_translator::state::GuestState;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnapshot {
    /// RAX..R15 in hardware order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cs: u16,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// FS and GS bases, and IA32_KERNEL_GS_BASE when known.
    pub bases: Option<[u64; 3]>,
}

impl CpuSnapshot {
    pub fn from_kvm(r: &kvm_bindings::kvm_regs, s: &kvm_bindings::kvm_sregs) -> Self {
        CpuSnapshot {
            gpr: [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            cs: s.cs.selector,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            bases: Some([s.fs.base, s.gs.base, 0]),
        }
    }

    pub fn from_translator(s: &GuestState) -> Self {
        CpuSnapshot {
            gpr: s.gpr,
            rip: s.rip,
            rflags: s.rflags,
            cs: s.seg[1],
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            bases: Some([s.fs_base, s.gs_base, s.kernel_gs_base]),
        }
    }

    /// One line of registers plus the instruction at RIP; `code` holds the bytes there when the
    /// engine could read them.
    pub fn describe(&self, code: Option<[u8; 15]>) -> String {
        let g = &self.gpr;
        let mut out =
            format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} \
             cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip, g[4], self.rflags, g[0], g[3], g[1], g[2], g[6], g[7], g[5], self.cs, self.cr0, self.cr2,
            self.cr3, self.cr4, self.efer
        );
        if let Some([fs, gs, kernel_gs]) = self.bases {
            out += &format!(" fs_base={fs:#x} gs_base={gs:#x}");
            if kernel_gs != 0 {
                out += &format!(" kernel_gs_base={kernel_gs:#x}");
            }
        }
        if let Some(bytes) = code {
            let instr = iced_x86::Decoder::with_ip(64, &bytes, self.rip, iced_x86::DecoderOptions::NONE).decode();
            out += &format!(
                " bytes at rip: {} ({})",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
                if instr.is_invalid() {
                    "not a valid instruction".to_string()
                } else {
                    format!("`{instr}`")
                }
            );
        }
        out
    }
}

//! The KVM vCPU that runs guest user code for the hybrid engine: a bare VM (no in-kernel
//! interrupt controllers: interrupts are hbt's chipset's, delivered by the translator) over the
//! same guest RAM, plus hbt's region (`host_region.rs`) in a slot of its own, and a vCPU that
//! shows the guest hbt's CPU model.
//!
//! [`UserVcpu::load`] puts a CPL3 state from the translator into KVM with hbt's descriptor
//! tables, entry stubs and page tables (`user_tables.rs`) in place of the guest kernel's;
//! [`UserVcpu::user_state`] reads the user state back, either as it stands (KVM_RUN was
//! interrupted at an instruction boundary) or from a gate frame (user code entered the kernel).
//! The XSAVE image stays in KVM until the translator asks for it
//! ([`UserVcpu::fetch_extended_state`]): the guest kernel's timer tick and most system calls
//! never touch it, and each KVM_GET_XSAVE costs ≈15–20 µs under kvm_pvm (AMD EPYC).

use super::host_region::{Frame, HostRegion, HBT_PML4_SLOT};
use super::user_tables::{CodePages, FramePool, TablesError, UserTables};
use crate::vmm::memory::{GuestMemory, HBT_REGION_SIZE, HBT_REGION_START};
use crate::vmm::vstate::transfer::{self, named};
use crate::vmm::vstate::vm::Vm;
use anyhow::{Context, Result};
use hbt_translator::mmu::soft_mmu::{self, GuestRam};
use hbt_translator::state::{flags, Cpl, GuestState};
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{SyncReg, VcpuFd};

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_SYSENTER_CS: u32 = 0x174;
/// MSR_MISC_FEATURES_ENABLES bit 0: CPUID faulting (KVM emulates it on every host).
const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;
const CPUID_FAULTING: u64 = 1;
const REGION_SLOT: u32 = 8;
/// RFLAGS bits user code cannot change at IOPL 0 (or that kvm_pvm does not show it): they stay
/// as the guest kernel left them.
/// The CR2 hbt gives KVM with every state it loads: non-canonical, so no page fault can
/// report it. kvm_pvm sometimes delivers a #PF without writing CR2 — measured on an Intel
/// Xeon (SPR) host, about 1 user fault in 4000 in a busybox loop: the first instruction after
/// a state load (typically the one after a `syscall`), error code "not present, fetch", the
/// frame's RF clear, CR2 whatever hbt loaded. A fault that comes back with this value has no
/// address hbt can trust, so the translator re-runs the instruction instead (`hybrid/mod.rs`).
pub const UNREPORTED_CR2: u64 = 0x8000_0000_0000_0000;

const KERNEL_OWNED_FLAGS: u64 = flags::IF | flags::IOPL | flags::VIF | flags::VIP | flags::VM;

/// Counters for `--stats`.
#[derive(Default, Clone, Copy)]
pub struct VcpuStats {
    pub loads: u64,
    /// XSAVE images that had to be given to KVM (the rest were what it held).
    pub xsave_loads: u64,
    /// XSAVE images read out of KVM because the translator was about to touch them.
    pub xsave_fetches: u64,
}

pub struct UserVcpu {
    pub vcpu: VcpuFd,
    vm: Vm,
    pub region: HostRegion,
    pub tables: UserTables,
    /// KVM's special registers as last read (the template each load edits).
    sregs: kvm_sregs,
    /// STAR and TSC_AUX as last given to KVM.
    msrs: Option<(u64, u64)>,
    /// XCR0 and the XSAVE image KVM holds (what was last loaded or read back): a load that
    /// would give KVM the same skips the ioctl.
    xcr0: Option<u64>,
    xsave: Vec<u8>,
    /// Guest CR3 and address of the last user page fault delivered to the guest kernel (its
    /// mapping is taken into the tree at the next load).
    pub faulted_at: Option<(u64, u64)>,
    pub stats: VcpuStats,
}

impl UserVcpu {
    /// `table_frames`: how many frames the page-table pool may use (None: the whole region).
    pub fn new(mem: &GuestMemory, table_frames: Option<u64>) -> Result<Self> {
        let vm = Vm::bare(mem)?;
        let region = HostRegion::new(HBT_REGION_START, HBT_REGION_SIZE).context("cannot map hbt's region")?;
        // SAFETY: the region's mapping lives as long as `region`, which this value owns with the
        // VM (the VM fd is closed before the mapping goes: field order); nothing else uses it.
        unsafe { vm.fd.set_user_memory_region(region_slot(&region, true)) }
            .map_err(named("KVM_SET_USER_MEMORY_REGION"))
            .map_err(anyhow::Error::msg)?;
        let mut vcpu = vm.create_model_vcpu()?;
        // Registers travel through kvm_run (KVM_CAP_SYNC_REGS) instead of four ioctls per
        // switch (each ≈ 5–8 µs under kvm_pvm).
        anyhow::ensure!(
            vm.kvm.check_extension(kvm_ioctls::Cap::SyncRegs),
            "--accel hybrid needs KVM_CAP_SYNC_REGS, which this KVM lacks (use --accel bt)"
        );
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        // SAFETY: the pool is the region's frames from POOL_START on, used by nothing else.
        let pool = unsafe {
            FramePool::new(
                region.host_base(),
                region.gpa(),
                super::host_region::POOL_START,
                table_frames.map_or(region.size(), |n| {
                    (super::host_region::POOL_START + n * 4096).min(region.size())
                }),
            )
        };
        let tables = UserTables::new(pool, HBT_PML4_SLOT, region.pml4_entry());
        let sregs = vcpu
            .get_sregs()
            .map_err(named("KVM_GET_SREGS"))
            .map_err(anyhow::Error::msg)?;
        let user = UserVcpu {
            vcpu,
            vm,
            region,
            tables,
            sregs,
            msrs: None,
            xcr0: None,
            xsave: Vec::new(),
            faulted_at: None,
            stats: VcpuStats::default(),
        };
        let (lstar, cstar) = (user.region.lstar(), user.region.cstar());
        user.set_msrs(&[
            (MSR_LSTAR, lstar),
            (MSR_CSTAR, cstar),
            (MSR_SFMASK, 0),
            (MSR_SYSENTER_CS, 0),
        ])?;
        // CPUID at CPL3 faults out and the translator answers it from the CPU model: KVM's own
        // answer is not the model's on kvm_pvm (leaf 7 shows the host's AVX-512, leaf 0xd the
        // host's XSAVE components), and a program that saw AVX-512 under KVM would later
        // execute it in the translator, which has no rules for it.
        user.set_msrs(&[(MSR_MISC_FEATURES_ENABLES, CPUID_FAULTING)])
            .context("cannot turn on CPUID faulting in KVM (MSR_MISC_FEATURES_ENABLES)")?;
        Ok(user)
    }

    fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = values
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
        let n = self
            .vcpu
            .set_msrs(&msrs)
            .map_err(named("KVM_SET_MSRS"))
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(n == values.len(), "KVM_SET_MSRS set {n} of {} MSRs", values.len());
        Ok(())
    }

    /// Deletes and re-adds the region's slot (KVM drops every shadow page) and recycles the
    /// page-table pool.
    fn reset_region_slot(&mut self) -> Result<()> {
        // SAFETY: deleting and re-adding the region's own mapping, which outlives the VM.
        unsafe {
            self.vm
                .fd
                .set_user_memory_region(region_slot(&self.region, false))
                .map_err(named("KVM_SET_USER_MEMORY_REGION"))
                .map_err(anyhow::Error::msg)?;
            self.vm
                .fd
                .set_user_memory_region(region_slot(&self.region, true))
                .map_err(named("KVM_SET_USER_MEMORY_REGION"))
                .map_err(anyhow::Error::msg)?;
        }
        self.tables.after_slot_reset();
        Ok(())
    }

    /// The root of the tables for `s` (building them, resetting the slot when the pool ran out).
    fn root(&mut self, ram: &GuestRam, s: &GuestState, generation: u64, code: &dyn CodePages) -> Result<u64> {
        match self.tables.root_for(ram, s.cr3, generation, code) {
            Ok(root) => Ok(root),
            Err(TablesError::Exhausted) => {
                self.reset_region_slot()?;
                self.tables
                    .root_for(ram, s.cr3, generation, code)
                    .map_err(|e| anyhow::anyhow!("{e} by a single address space"))
            }
        }
    }

    /// Puts the CPL3 state `s` into KVM, on tables for invalidation generation `generation`.
    /// `xsave_stale`: `s.xsave` is out of date and KVM still holds the live image (it was
    /// never fetched since KVM last ran: [`UserVcpu::fetch_extended_state`]).
    pub fn load(
        &mut self,
        ram: &GuestRam,
        s: &GuestState,
        xsave_stale: bool,
        generation: u64,
        code: &dyn CodePages,
    ) -> Result<()> {
        debug_assert_eq!(s.cpl, Cpl::User);
        let root = self.root(ram, s, generation, code)?;
        if let Some((cr3, va)) = self.faulted_at.take() {
            // The guest kernel has handled a fault of this user code at `va`: what it mapped
            // goes into the tree now rather than after one more exit. (If the pool is out of
            // frames, the access faults out and the tree is rebuilt then.)
            if cr3 == s.cr3 {
                self.tables.widen(ram, va, code);
            }
        }
        let descriptor = |selector: u16| guest_descriptor(ram, s, selector);
        let seg = |i: usize, base: Option<u64>| transfer::segment_from_descriptor(s.seg[i], descriptor(s.seg[i]), base);
        let sr = &mut self.sregs;
        sr.es = seg(0, None);
        sr.cs = seg(1, None);
        sr.ss = seg(2, None);
        sr.ds = seg(3, None);
        sr.fs = seg(4, Some(s.fs_base));
        sr.gs = seg(5, Some(s.gs_base));
        (sr.gdt, sr.idt, sr.tr) = self.region.descriptor_tables();
        sr.ldt = kvm_bindings::kvm_segment {
            unusable: 1,
            ..Default::default()
        };
        sr.cr0 = s.cr0;
        sr.cr2 = UNREPORTED_CR2;
        sr.cr3 = root;
        // UMIP whatever the guest chose: `sgdt`/`sidt`/`sldt`/`str`/`smsw` at CPL3 would show
        // hbt's tables (kvm_pvm's emulator answers them from KVM's registers); with it they
        // fault out and the translator runs them against the guest's own (the model offers
        // UMIP, so KVM accepts the bit).
        sr.cr4 = s.cr4 | hbt_translator::system::CR4_UMIP;
        sr.efer = s.efer;
        self.put_registers(transfer::regs_of(s));
        if self.xcr0 != Some(s.xcr0) {
            transfer::set_xcr0(&self.vcpu, s.xcr0).map_err(anyhow::Error::msg)?;
            self.xcr0 = Some(s.xcr0);
        }
        let image = &s.xsave.0[..s.xsave.0.len().min(4096)];
        if !xsave_stale && self.xsave != image {
            transfer::set_xsave_image(&self.vcpu, image).map_err(anyhow::Error::msg)?;
            self.xsave.clear();
            self.xsave.extend_from_slice(image);
            self.stats.xsave_loads += 1;
        }
        let msrs = (s.sys.msr.star, s.sys.msr.tsc_aux);
        if self.msrs != Some(msrs) {
            self.set_msrs(&[(MSR_STAR, msrs.0), (MSR_TSC_AUX, msrs.1)])?;
            self.msrs = Some(msrs);
        }
        self.stats.loads += 1;
        Ok(())
    }

    /// Gives KVM `regs` and the user special registers for its next entry (through kvm_run).
    fn put_registers(&mut self, regs: kvm_regs) {
        let sync = self.vcpu.sync_regs_mut();
        sync.regs = regs;
        sync.sregs = self.sregs;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
    }

    /// The vCPU's registers as of its last exit (or as given to it, if it did not run).
    pub fn registers(&self) -> (kvm_regs, kvm_sregs) {
        let sync = self.vcpu.sync_regs();
        (sync.regs, sync.sregs)
    }

    /// Puts the user registers back after a fault hbt resolved itself (the vCPU is in a stub
    /// at CPL0): the GPRs the fault left, at `frame`.
    pub fn resume_user(&mut self, frame: &Frame) {
        let mut regs = self.registers().0;
        regs.rip = frame.rip;
        regs.rsp = frame.rsp;
        regs.rflags = frame.rflags & !flags::RF;
        self.put_registers(regs);
    }

    /// The user state after a run: `before` (what was loaded) with KVM's GPRs and FS/GS bases;
    /// RIP, RSP and RFLAGS from `frame` when user code left through a gate. RFLAGS bits only
    /// the kernel changes keep `before`'s values; XCR0 stays (CPL3 cannot change it). The
    /// XSAVE image is `before`'s, out of date: KVM holds the live one
    /// ([`UserVcpu::fetch_extended_state`]).
    pub fn user_state(&self, before: &GuestState, frame: Option<&Frame>) -> GuestState {
        let (r, sr) = self.registers();
        let mut s = before.clone();
        s.gpr = transfer::gprs_of(&r);
        let (rip, rsp, rflags) = match frame {
            Some(f) => (f.rip, f.rsp, f.rflags),
            None => (r.rip, r.rsp, r.rflags),
        };
        s.rip = rip;
        s.gpr[4] = rsp;
        s.rflags = merge_flags(rflags, before.rflags);
        // (At a stub FS and GS are still the user's: a gate does not change them.)
        s.fs_base = sr.fs.base;
        s.gs_base = sr.gs.base;
        s
    }

    /// Reads the live XSAVE image out of KVM into `image` (the guest state's, which was out
    /// of date since KVM last ran user code).
    pub fn fetch_extended_state(&mut self, image: &mut [u8]) -> Result<()> {
        transfer::get_xsave_image(&self.vcpu, image).map_err(anyhow::Error::msg)?;
        self.xsave.clear();
        self.xsave.extend_from_slice(&image[..image.len().min(4096)]);
        self.stats.xsave_fetches += 1;
        Ok(())
    }

    /// The vCPU's registers, for an error report.
    pub fn describe(&self) -> String {
        match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(r), Ok(s)) => crate::vmm::cpu_state::CpuSnapshot::from_kvm(&r, &s).describe(None),
            _ => "(registers unavailable)".into(),
        }
    }

    /// `kvm_run.immediate_exit`, for the kick handler (`set_kick_flag`).
    pub fn immediate_exit_flag(&mut self) -> *mut u8 {
        &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8
    }
}

/// RFLAGS from KVM with the bits only the kernel changes taken from `kernel`'s.
pub fn merge_flags(kvm: u64, kernel: u64) -> u64 {
    (kvm & !KERNEL_OWNED_FLAGS & !flags::RF) | (kernel & KERNEL_OWNED_FLAGS) | flags::FIXED
}

/// The 8 bytes of the guest's GDT (or LDT: unusable here) slot for `selector`, read through its
/// page tables as the CPU does; `None` for a null selector or one outside the table.
fn guest_descriptor(ram: &GuestRam, s: &GuestState, selector: u16) -> Option<u64> {
    let index = (selector >> 3) as u64;
    if selector & 4 != 0 || 8 * index + 7 > s.sys.gdtr.limit as u64 {
        return None;
    }
    let va = s.sys.gdtr.base.wrapping_add(8 * index);
    let mut kernel = s.paging();
    kernel.cpl = Cpl::Kernel;
    let pa = soft_mmu::translate_for_debugger(ram, &kernel, va)?;
    if pa & 7 != 0 && (pa & 0xfff) > 0xff8 {
        return None;
    }
    ram.read_u64(pa)
}

fn region_slot(region: &HostRegion, present: bool) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: REGION_SLOT,
        guest_phys_addr: region.gpa(),
        memory_size: if present { region.size() } else { 0 },
        userspace_addr: region.host_base(),
        flags: 0,
    }
}

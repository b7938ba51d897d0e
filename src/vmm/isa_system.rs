//! KVM as the reference of `hbt isa-test --system` (the harness side is
//! `hbt_translator::harness::system`): one VM per test thread, reused across cases, created
//! *without* the in-kernel irqchip so that `hlt` at CPL0 — every IDT handler of the harness's
//! guest is one — exits to userspace (KVM_EXIT_HLT). CPL3 code runs on the host CPU with real
//! page walks over the guest's tables and real exception delivery through its IDT, which makes
//! it an exact oracle for the soft-MMU and for delivery; CPL0 code runs in KVM's instruction
//! emulator.
//!
//! The vCPU's CPUID is the bt engine's CPU model (`cpuid.rs`), so both engines show the guest
//! the same processor; the translator's platform here answers CPUID from the same model.
//!
//! Page-table coherence (kvm_pvm, shadow paging): KVM does not see page-table writes made
//! through this process's mapping of guest RAM (`shared/probes/shadowcoherence.c`). The harness
//! gives each case page-table frames no earlier case used since its pool last wrapped; when a
//! root comes round again, the memory slot is deleted and re-added, which drops every shadow
//! page (measured on an Intel Xeon SPR host: a case costs ≈130 µs; a slot re-add before every
//! case would add ≈145 µs to each, once per pool wrap it adds ≈2 µs per case).
//!
//! At CPL0 (`--system --cpl0`) the machine does port I/O, which exits here: the harness's
//! trivial device (`harness::system::device`) answers, as it does for the translator, and the
//! writes are compared. Debug registers, PAT and the SYSENTER MSRs move with the state, and CR8
//! through the run structure (KVM_RUN takes it from there without an in-kernel local APIC).
//! Where KVM on this host runs a CPL0 case differently from the CPU, `isa_system/cpl0.rs` says
//! so case by case; whole forms are in [`unfit`].

mod cpl0;

use crate::vmm::cpuid;
use crate::vmm::vstate::transfer::{self, named as e};
use hbt_translator::harness::system::device::{self, PortWrite};
use hbt_translator::harness::system::outcome::Stop;
use hbt_translator::harness::system::{guest, Case, KernelQuirks, Quirks, Reference, ReferenceError, Ring, Unfit};
use hbt_translator::state::{Cpl, GuestState};
use hbt_translator::Platform;
use kvm_bindings::{kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::MmapMut;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSRS: [u32; 6] = [
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SFMASK,
    MSR_KERNEL_GS_BASE,
    MSR_TSC_AUX,
];
/// MSRs only CPL0 cases set and read back (CPL3 code cannot reach them).
const KERNEL_MSRS: [u32; 4] = [MSR_PAT, MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP];
const MSR_PAT: u32 = 0x277;
const MSR_SYSENTER_CS: u32 = 0x174;
const MSR_SYSENTER_ESP: u32 = 0x175;
const MSR_SYSENTER_EIP: u32 = 0x176;
/// A case that has not stopped after this long is stuck (a loop the synthesizer did not
/// foresee): the watchdog interrupts KVM_RUN.
const CASE_TIMEOUT: Duration = Duration::from_secs(2);

/// `--system needs /dev/kvm` unless it can be opened.
pub fn check_kvm() -> anyhow::Result<()> {
    match Kvm::new() {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!("--system needs /dev/kvm: KVM is the reference (cannot open it: {e})"),
    }
}

pub struct KvmReference {
    vm: VmFd,
    vcpu: VcpuFd,
    ram: MmapMut,
    /// Page-table roots run since the memory slot was last re-added.
    roots: HashSet<u64>,
    /// The `out`s of the current run.
    port_writes: Vec<PortWrite>,
    /// The vCPU thread and when its current run started (0: not running), for the watchdog.
    watch: Arc<Watch>,
    /// CPUID bits KVM changed in the model's table when it was set (see `cpuid_adjustments`).
    cpuid_adjusted: Vec<CpuidAdjustment>,
    _kvm: Kvm,
}

/// Bits of one CPUID leaf (and subleaf, when its index is significant) that KVM changed.
struct CpuidAdjustment {
    function: u32,
    index: Option<u32>,
    bits: [u32; 4],
}

/// The bits KVM_SET_CPUID2 changed in `set` (what `get` reads back), but for those KVM computes
/// from the guest's state as it runs, which both engines do (leaf 1 ECX.OSXSAVE, leaf 7
/// ECX.OSPKE: CR4; leaf 1 EDX.APIC: the APIC base MSR). Measured on kvm_pvm (an Intel Xeon
/// host): leaf 1 EDX.MTRR comes back set though the model clears it, leaf 7's features the
/// model hides (FSGSBASE, SMEP…) come back as the host has them, and leaf 0xd
/// describes the host's XSAVE components (CPUID at CPL3 then answers EAX = 0xe7 for leaf 0xd
/// where the model says 0x7: the same host-XCR0 quirk as `unfit`'s XSAVE rows).
fn cpuid_adjustments(
    set: &[kvm_bindings::kvm_cpuid_entry2],
    get: &[kvm_bindings::kvm_cpuid_entry2],
) -> Vec<CpuidAdjustment> {
    let mut out = Vec::new();
    for g in get {
        let Some(s) = set.iter().find(|s| s.function == g.function && s.index == g.index) else {
            continue;
        };
        let mut bits = [s.eax ^ g.eax, s.ebx ^ g.ebx, s.ecx ^ g.ecx, s.edx ^ g.edx];
        if g.function == 1 {
            bits[2] &= !(1 << 27);
            bits[3] &= !(1 << 9);
        }
        if g.function == 7 && g.index == 0 {
            bits[2] &= !(1 << 4);
        }
        if bits != [0; 4] {
            out.push(CpuidAdjustment {
                function: g.function,
                index: (g.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0).then_some(g.index),
                bits,
            });
        }
    }
    out
}

struct Watch {
    thread: AtomicU64,
    started_ns: AtomicU64,
    epoch: Instant,
    done: std::sync::atomic::AtomicBool,
}

impl KvmReference {
    pub fn new() -> anyhow::Result<Self> {
        let kvm = Kvm::new().map_err(|e| anyhow::anyhow!("--system needs /dev/kvm: KVM is the reference ({e})"))?;
        let vm = kvm.create_vm()?;
        let ram = MmapMut::map_anon(guest::RAM_SIZE as usize)?;
        // SAFETY: the region is `ram`'s mapping, which lives as long as the VM (both fields of
        // this value; the VM fd closes before the mapping is unmapped: field order).
        unsafe { vm.set_user_memory_region(slot(&ram, guest::RAM_SIZE)) }?;
        let vcpu = vm.create_vcpu(0)?;
        let table = crate::vmm::vstate::vm::model_cpuid(&kvm)?;
        vcpu.set_cpuid2(&table)?;
        // What KVM made of the table: the bits it changed are the reference's, not the model's.
        let effective = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?;
        let cpuid_adjusted = cpuid_adjustments(table.as_slice(), effective.as_slice());
        let watch = Arc::new(Watch {
            // SAFETY: pthread_self has no preconditions.
            thread: AtomicU64::new(unsafe { libc::pthread_self() } as u64),
            started_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            done: false.into(),
        });
        install_kick_handler();
        let w = Arc::clone(&watch);
        std::thread::Builder::new()
            .name("hbt-isa-watchdog".into())
            .spawn(move || watchdog(&w))?;
        Ok(KvmReference {
            vm,
            vcpu,
            ram,
            roots: HashSet::new(),
            port_writes: Vec::new(),
            watch,
            cpuid_adjusted,
            _kvm: kvm,
        })
    }

    /// The bits of `adjusted` for CPUID `leaf`, `subleaf` (the subleaf matters only where KVM
    /// says the leaf's index is significant).
    fn adjusted_bits(adjusted: &[CpuidAdjustment], leaf: u32, subleaf: u32) -> [u32; 4] {
        adjusted
            .iter()
            .find(|a| a.function == leaf && a.index.is_none_or(|i| i == subleaf))
            .map_or([0; 4], |a| a.bits)
    }

    /// Deletes and re-adds the memory slot: KVM drops every shadow page built from the guest's
    /// page tables (the only way to make it see their new contents, see the file comment).
    fn refresh_slot(&mut self) -> Result<(), String> {
        let mut region = slot(&self.ram, 0);
        // SAFETY: deleting and re-adding the same mapping, which outlives the VM.
        unsafe {
            self.vm.set_user_memory_region(region).map_err(|e| e.to_string())?;
            region.memory_size = guest::RAM_SIZE;
            self.vm.set_user_memory_region(region).map_err(|e| e.to_string())?;
        }
        self.roots.clear();
        Ok(())
    }

    fn load(&mut self, s: &GuestState) -> Result<(), String> {
        let mut sregs = self.vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let ram: &[u8] = &self.ram;
        let seg = |i: usize, base: Option<u64>| segment(ram, s, s.seg[i], base);
        sregs.es = seg(0, None);
        sregs.cs = seg(1, None);
        sregs.ss = seg(2, None);
        sregs.ds = seg(3, None);
        sregs.fs = seg(4, Some(s.fs_base));
        sregs.gs = seg(5, Some(s.gs_base));
        sregs.tr = transfer::system_segment(&s.sys.tr, 11);
        sregs.ldt = transfer::system_segment(&s.sys.ldtr, 2);
        sregs.gdt.base = s.sys.gdtr.base;
        sregs.gdt.limit = s.sys.gdtr.limit;
        sregs.idt.base = s.sys.idtr.base;
        sregs.idt.limit = s.sys.idtr.limit;
        sregs.cr0 = s.cr0;
        sregs.cr2 = s.cr2;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        sregs.cr8 = s.sys.cr8;
        self.vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
        // Without an in-kernel local APIC, KVM_RUN loads CR8 from the run structure (which
        // holds the value of the last exit), not from the registers set above.
        self.vcpu.get_kvm_run().cr8 = s.sys.cr8;
        let regs = transfer::regs_of(s);
        self.vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
        transfer::set_extended_state(&self.vcpu, s)?;
        let m = &s.sys.msr;
        let mut values = vec![m.star, m.lstar, m.cstar, m.sfmask, s.kernel_gs_base, m.tsc_aux];
        let mut indexes = MSRS.to_vec();
        if s.cpl == Cpl::Kernel {
            indexes.extend(KERNEL_MSRS);
            values.extend([m.pat, m.sysenter_cs, m.sysenter_esp, m.sysenter_eip]);
            let d = &s.sys.dr;
            let debug = kvm_bindings::kvm_debugregs {
                db: [d[0], d[1], d[2], d[3]],
                dr6: d[6],
                dr7: d[7],
                ..Default::default()
            };
            self.vcpu.set_debug_regs(&debug).map_err(e("KVM_SET_DEBUGREGS"))?;
        }
        let entries: Vec<kvm_msr_entry> = indexes
            .iter()
            .zip(values)
            .map(|(&index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|err| format!("MSR list: {err:?}"))?;
        let n = self.vcpu.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
        if n != indexes.len() {
            return Err(format!(
                "KVM_SET_MSRS set {n} of {} MSRs (the first refused: {:#x})",
                indexes.len(),
                indexes[n]
            ));
        }
        Ok(())
    }

    /// The vCPU's state, in the translator's terms.
    fn save(&self) -> Result<GuestState, String> {
        let r = self.vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sr = self.vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let mut s = GuestState {
            gpr: transfer::gprs_of(&r),
            rip: r.rip,
            rflags: r.rflags,
            fs_base: sr.fs.base,
            gs_base: sr.gs.base,
            cr0: sr.cr0,
            cr2: sr.cr2,
            cr3: sr.cr3,
            cr4: sr.cr4,
            efer: sr.efer,
            cpl: if sr.cs.selector & 3 == 0 {
                Cpl::Kernel
            } else {
                Cpl::User
            },
            seg: [sr.es, sr.cs, sr.ss, sr.ds, sr.fs, sr.gs].map(|x| x.selector),
            code32: sr.cs.l == 0 && sr.cs.db == 1,
            ..GuestState::default()
        };
        s.sys.gdtr.base = sr.gdt.base;
        s.sys.gdtr.limit = sr.gdt.limit;
        s.sys.idtr.base = sr.idt.base;
        s.sys.idtr.limit = sr.idt.limit;
        s.sys.tr.selector = sr.tr.selector;
        s.sys.ldtr.selector = sr.ldt.selector;
        s.sys.cr8 = sr.cr8;
        transfer::get_extended_state(&self.vcpu, &mut s)?;
        let entries: Vec<kvm_msr_entry> = MSRS
            .iter()
            .chain(KERNEL_MSRS.iter())
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|err| format!("MSR list: {err:?}"))?;
        let n = self.vcpu.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(format!("KVM_GET_MSRS read {n} of {} MSRs", entries.len()));
        }
        let v: Vec<u64> = msrs.as_slice().iter().map(|m| m.data).collect();
        let m = &mut s.sys.msr;
        [m.star, m.lstar, m.cstar, m.sfmask, s.kernel_gs_base, m.tsc_aux] = [v[0], v[1], v[2], v[3], v[4], v[5]];
        [m.pat, m.sysenter_cs, m.sysenter_esp, m.sysenter_eip] = [v[6], v[7], v[8], v[9]];
        let debug = self.vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        s.sys.dr = [
            debug.db[0],
            debug.db[1],
            debug.db[2],
            debug.db[3],
            0,
            0,
            debug.dr6,
            debug.dr7,
        ];
        s.sys.ldtr.base = sr.ldt.base;
        s.sys.ldtr.limit = sr.ldt.limit;
        s.sys.tr.base = sr.tr.base;
        s.sys.tr.limit = sr.tr.limit;
        Ok(s)
    }

    /// What KVM said about its last internal-error exit.
    fn internal_error(&mut self) -> &'static str {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in; it is plain data.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        match suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "its instruction emulator failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "an exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "an event it could not deliver",
            _ => "an internal error",
        }
    }
}

impl Drop for KvmReference {
    fn drop(&mut self) {
        self.watch.done.store(true, Ordering::SeqCst);
    }
}

fn slot(ram: &MmapMut, size: u64) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: ram.as_ptr() as u64,
        flags: 0,
    }
}

/// A code or data segment register as the CPU caches it from the guest's GDT (a null
/// selector or one outside the table is unusable; `base` overrides the descriptor's, for FS
/// and GS).
fn segment(ram: &[u8], s: &GuestState, selector: u16, base: Option<u64>) -> kvm_segment {
    let index = (selector >> 3) as u64;
    let at = s.sys.gdtr.base + 8 * index;
    let inside = selector & 4 == 0 && at + 8 <= ram.len() as u64 && 8 * index + 7 <= s.sys.gdtr.limit as u64;
    transfer::segment_from_descriptor(selector, inside.then(|| guest::get(ram, at)), base)
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    // SAFETY: installing a no-op handler (without SA_RESTART, so KVM_RUN returns EINTR).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(crate::vmm::stop::KICK_SIGNAL, &sa, std::ptr::null_mut());
    }
}

/// Kicks the vCPU thread out of a run that has gone on longer than [`CASE_TIMEOUT`].
fn watchdog(w: &Watch) {
    while !w.done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let started = w.started_ns.load(Ordering::SeqCst);
        if started != 0 && w.epoch.elapsed().as_nanos() as u64 - started > CASE_TIMEOUT.as_nanos() as u64 {
            // SAFETY: the vCPU thread outlives its reference, which stops this thread first.
            unsafe {
                libc::pthread_kill(
                    w.thread.load(Ordering::SeqCst) as libc::pthread_t,
                    crate::vmm::stop::KICK_SIGNAL,
                )
            };
        }
    }
}

impl Reference for KvmReference {
    fn ram(&mut self) -> &mut [u8] {
        &mut self.ram
    }

    fn run(&mut self, state: &GuestState) -> Result<Stop, ReferenceError> {
        if !self.roots.insert(state.cr3) {
            self.refresh_slot().map_err(ReferenceError::Failed)?;
            self.roots.insert(state.cr3);
        }
        self.load(state).map_err(ReferenceError::Failed)?;
        self.watch
            .started_ns
            .store(self.watch.epoch.elapsed().as_nanos().max(1) as u64, Ordering::SeqCst);
        self.port_writes.clear();
        let run: *const kvm_bindings::kvm_run = self.vcpu.get_kvm_run();
        // The element size of a port I/O exit: `rep ins`/`rep outs` come out as one exit whose
        // data holds several elements.
        let io_size = || {
            // SAFETY: `run` is the vCPU's mapped kvm_run, valid while the vCPU lives; the exit
            // being a KVM_EXIT_IO, `io` is the union member KVM filled in (plain data).
            unsafe { (*run).__bindgen_anon_1.io.size as usize }
        };
        let exit = loop {
            // Port I/O at CPL0 comes out here: the harness's trivial device answers (the
            // translator's platform gives the same answers, `device.rs`). A guest-physical access
            // outside RAM reads all ones and drops writes, as the translator's platform does.
            match self.vcpu.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    let size = io_size().clamp(1, 4);
                    let v = device::port_in(port, size as u8);
                    for element in data.chunks_mut(size) {
                        element.copy_from_slice(&v.to_le_bytes()[..element.len()]);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let size = io_size().clamp(1, 4);
                    for element in data.chunks(size) {
                        let mut v = [0u8; 4];
                        v[..element.len()].copy_from_slice(element);
                        self.port_writes.push(PortWrite {
                            port,
                            size: element.len() as u8,
                            value: u32::from_le_bytes(v),
                        });
                    }
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) => {}
                other => break other,
            }
        };
        self.watch.started_ns.store(0, Ordering::SeqCst);
        let stop = match exit {
            Ok(VcpuExit::Hlt) => Stop::Halted(Box::new(self.save().map_err(ReferenceError::Failed)?)),
            Ok(VcpuExit::Shutdown) => Stop::Shutdown,
            Ok(VcpuExit::InternalError) => {
                return Err(ReferenceError::Cannot(format!(
                    "KVM cannot run it ({})",
                    self.internal_error()
                )));
            }
            Ok(other) => {
                let what = format!("{other:?}");
                return Err(ReferenceError::Failed(format!("unexpected KVM exit {what}")));
            }
            Err(e) if e.errno() == libc::EINTR => {
                return Err(ReferenceError::Failed(format!(
                    "the case did not stop within {} s under KVM",
                    CASE_TIMEOUT.as_secs()
                )))
            }
            Err(e) => return Err(ReferenceError::Failed(format!("KVM_RUN: {e}"))),
        };
        Ok(stop)
    }

    fn unfit(&self, instr: &iced_x86::Instruction, ring: Ring) -> Option<String> {
        unfit(instr, ring).map(str::to_string)
    }

    fn cpuid_adjusted(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        KvmReference::adjusted_bits(&self.cpuid_adjusted, leaf, subleaf)
    }

    fn xcr0(&self) -> u64 {
        cpuid::guest_xcr0()
    }

    fn take_port_writes(&mut self) -> Vec<PortWrite> {
        std::mem::take(&mut self.port_writes)
    }

    fn unfit_case(&self, case: &Case, ring: Ring) -> Option<Unfit> {
        match ring {
            Ring::Kernel => cpl0::unfit_case(case),
            Ring::User if case.instance.bitness == 32 => unfit_in_32_bit_code(case),
            Ring::User => None,
        }
    }

    fn runs_32_bit_code_emulated(&self) -> bool {
        // Measured on an AMD EPYC (`--accel kvm`, a 32-bit `dec ecx; jnz` loop at CPL3):
        // ≈0.9 million iterations a second, where the CPU runs billions — kvm_pvm runs 32-bit
        // user code in KVM's instruction emulator, one instruction per exit.
        true
    }

    fn kernel_quirks(&self) -> KernelQuirks {
        // Measured at CPL0 (`isa_system/cpl0.rs` has the case-by-case ones): a `sgdt`, `str`,
        // `smsw`… whose store crosses into a page it may not write leaves the bytes of the
        // first page written, then raises the #PF, and when both pages fault it reports the
        // second; a `mov` to DR6 writes bit 16 (RTM, which reads as 1 on a CPU without TSX, as
        // the model is) as given.
        KernelQuirks {
            split_store_writes_first_page: true,
            dr6_ignored: 1 << 16,
            split_store_faults_second_page: true,
        }
    }

    fn quirks(&self) -> Quirks {
        // Measured on kvm_pvm (README, `--system`): misaligned CPL3 accesses with RFLAGS.AC set
        // raise #AC or not whatever the guest's CR0.AM; `mov es, 1` or `mov fs, 0x33` at CPL3
        // read back 0, and `push fs` at CPL3 pushes the selector an earlier case loaded
        // (0x7b after `mov fs, dx` with DX = 0x7b) where this case's FS is null; with a
        // non-canonical RSP, `fwait`, `addps` or `cmpsd` at CPL3 raise #UD; SSE instructions
        // whose memory operand faults (#GP, #PF) raise #UD.
        //
        // kvm_pvm sends every #GP a guest raises to KVM's instruction emulator (PVM's exit
        // handler: GP_VECTOR -> kvm_emulate_instruction(vcpu, EMULTYPE_PVM_GP)), whose outcome
        // replaces the CPU's. Measured against the same instruction run natively in a Linux
        // process on the same Intel Xeon (whose GDT has the guest's layout): an `iret` frame
        // with SS 0x18 gives the CPU's #GP(0x18) natively, #GP(0) under KVM; SS 0x7505 (past
        // the GDT limit) #GP(0x7504) natively, #GP(0) under KVM; SS 0x3b (an empty entry)
        // #GP(0x38) natively, #SS(0x38) under KVM; `fxsave64`/`fxrstor` at an address 16-byte
        // misaligned give #GP(0) natively, under KVM a #PF on the image's page or a completed
        // restore; `fxrstor64 gs:[rcx]` with reserved MXCSR bits (#GP(0)) faults under KVM at
        // RCX without the GS base. The host runs with CR4.UMIP, so CPL3 `sgdt`/`sidt` always
        // go to the emulator (they store the guest's GDTR/IDTR, which the CPU cannot know);
        // a store split across a mapped and an unmapped page has its first page written
        // under KVM (the emulator writes page by page). So does a CPL3 `fstp m80fp` or `fbstp
        // m80bcd` split across a writable page and a read-only one on an AMD EPYC (`isa-test
        // --system` seeds 2 and 3: the mantissa's 8 bytes written), where the same store in a
        // Linux process on that host writes nothing before its SIGSEGV.
        Quirks {
            no_alignment_checks: true,
            loses_data_selectors: true,
            needs_canonical_rsp: true,
            spurious_ud: true,
            gp_goes_to_emulator: true,
            descriptor_table_stores_split: true,
            x87_wide_stores_split: true,
        }
    }
}

/// What kvm_pvm runs differently from the CPU in 32-bit code (compatibility mode), measured on
/// an AMD EPYC with `--system --compat`. kvm_pvm runs 32-bit user code in KVM's instruction
/// emulator ([`Reference::runs_32_bit_code_emulated`]), so the emulator's differences from the
/// CPU apply — the translator's behaviour in each of these is the one the CPU showed for the
/// same form in 64-bit code (`--system` without `--compat`): `int3` raises #UD; `syscall`
/// enters CSTAR truncated to 32 bits; 16/32-bit `iret` raises #GP(0) whatever the frame; far
/// returns read the offset slot before the selector (the #PF address differs); `cmps` reads
/// [ESI] first; `tzcnt`/`lzcnt` set ZF from the source, not the result; MMX instructions do not
/// put the x87 unit in MMX state (FTW, TOP); a 16-bit `enter` pushes 4 bytes. And on an Intel
/// Xeon (Sapphire Rapids): rotates by an immediate above 1 leave OF as it was (undefined), the
/// emulator's rotates by CL clear it.
fn unfit_in_32_bit_code(case: &Case) -> Option<Unfit> {
    use iced_x86::Mnemonic as M;
    let instr = &case.instance.instr;
    let why = match instr.mnemonic() {
        // The CPU checks that the final stack top of `enter` is writable (`emulate/implicit.rs`);
        // the emulator does not: cases whose frame ends in another page than the pushes.
        // em_enter pushes (E)BP with the stack's width, whatever the operand size.
        M::Enter if instr.code() == iced_x86::Code::Enterw_imm16_imm8 => {
            "KVM's emulator (32-bit code) pushes BP for a 16-bit `enter` as 4 bytes (the stack's width), the CPU as 2"
        }
        M::Enter => {
            let rsp = case.state.gpr[4] & 0xffff_ffff;
            let level = (instr.immediate8_2nd() & 31) as u64;
            let pushes = rsp.wrapping_sub(4 * (level + 1));
            let top = pushes.wrapping_sub(instr.immediate16() as u64) & 0xffff_ffff;
            if top >> 12 == (rsp.wrapping_sub(4) & 0xffff_ffff) >> 12 {
                return None;
            }
            "KVM's emulator (32-bit code) does not check that `enter`'s final stack top is writable"
        }
        // OF is undefined after a rotate by more than 1. Measured on an Intel Xeon (Sapphire
        // Rapids), natively: `rol ebx,0x6c` leaves OF as it was, `rol ebx,cl` with CL = 0x6c
        // clears it — and KVM's emulator performs every rotate by CL.
        M::Rol | M::Ror
            if instr.op1_kind() == iced_x86::OpKind::Immediate8
                && instr.immediate8() & 31 > 1
                && hbt_translator::cpu::vendor::Vendor::host() == hbt_translator::cpu::vendor::Vendor::Intel =>
        {
            "KVM's emulator (32-bit code) rotates by CL: on Intel a rotate by an immediate above 1 keeps OF (undefined), by CL it does not"
        }
        M::Int3 => "kvm_pvm raises #UD for int3 in 32-bit code",
        M::Syscall => "kvm_pvm enters CSTAR truncated to 32 bits from 32-bit code",
        M::Iret | M::Iretd => "KVM's emulator (32-bit code): every 16- and 32-bit `iret` raises #GP(0)",
        M::Retf => "KVM's emulator (32-bit code) reads a far return's offset before its selector",
        M::Cmpsb | M::Cmpsw | M::Cmpsd => "KVM's emulator (32-bit code) reads `cmps`'s [ESI] before [EDI]",
        M::Tzcnt | M::Lzcnt => "KVM's emulator (32-bit code) sets `tzcnt`/`lzcnt`'s ZF from the source",
        _ if (0..instr.op_count())
            .any(|n| instr.op_kind(n) == iced_x86::OpKind::Register && instr.op_register(n).is_mm()) =>
        {
            "KVM's emulator (32-bit code) leaves the x87 unit's tag word and TOP as they were for MMX instructions"
        }
        _ => return None,
    };
    Some(Unfit::Case(why.into()))
}

/// What kvm_pvm (no VT-x/AMD-V) does differently from the CPU, measured: such forms are not
/// compared against it.
fn unfit(instr: &iced_x86::Instruction, ring: Ring) -> Option<&'static str> {
    use hbt_translator::cpu::vendor::{host_has, Quirk};
    use iced_x86::Mnemonic as M;
    // A REX.W far pointer (m16:64): kvm_pvm hands far transfers and segment loads to KVM's
    // instruction emulator (the guest's selectors are not the host's), which reads m16:64,
    // where an AMD CPU reads m16:32 (`cpu::vendor`, as the translator does).
    if instr.memory_size() == iced_x86::MemorySize::SegPtr64 && host_has(Quirk::FarPointerIgnoresRexW) {
        return Some("KVM's instruction emulator (kvm_pvm's far transfers and segment loads) reads a REX.W far pointer as m16:64, this AMD CPU as m16:32");
    }
    // `0f 0d /r` with a register operand raises #UD on an AMD CPU (natively and translated:
    // `cpu::vendor`), which kvm_pvm then hands to KVM's emulator, which runs it as a NOP.
    if matches!(
        instr.code(),
        iced_x86::Code::Reservednop_rm16_r16_0F0D
            | iced_x86::Code::Reservednop_rm32_r32_0F0D
            | iced_x86::Code::Reservednop_rm64_r64_0F0D
    ) && host_has(Quirk::PrefetchOpcodeRejectsRegister)
    {
        return Some(
            "an AMD CPU raises #UD for `0f 0d` with a register operand, which kvm_pvm's emulator then runs as a NOP",
        );
    }
    match (instr.mnemonic(), ring) {
        (M::Xbegin | M::Xend | M::Xabort | M::Xtest, _) => Some(
            "the model hides RTM (the translator raises #UD, emulate/rtm.rs tests it); kvm_pvm runs RTM natively at CPL3 and cannot at CPL0",
        ),
        (M::Int, Ring::User) => Some("kvm_pvm raises #UD for `int n` at CPL3"),
        (M::Syscall, Ring::User) => Some("kvm_pvm enters LSTAR keeping the user CS (CPL3)"),
        (M::Str | M::Sldt, Ring::User) => {
            Some("kvm_pvm runs them at CPL3 on the host's descriptor tables, not the guest's")
        }
        // `lar 0x21` (Linux's 32-bit user code, RPL 1) sets ZF natively in a Linux process on
        // this host (0xcffb00) but clears it under KVM at CPL3, though the guest's GDT has that
        // same descriptor: the queries do not see the guest's GDT there.
        (M::Lar | M::Lsl | M::Verr | M::Verw, Ring::User) => {
            Some("kvm_pvm runs them at CPL3 on descriptor tables that are not the guest's")
        }
        (
            M::Xgetbv
            | M::Xsave
            | M::Xsave64
            | M::Xsaveopt
            | M::Xsaveopt64
            | M::Xsavec
            | M::Xsavec64
            | M::Xrstor
            | M::Xrstor64,
            Ring::User,
        ) => Some("kvm_pvm runs CPL3 code with the host's XCR0, not the guest's (xsavec wrote AVX-512 state bits)"),
        (M::Int, Ring::Kernel) => Some(
            "kvm_pvm at CPL0: `int n` fails in KVM's instruction emulator, or (vector 0x1b) returns -ENOSYS in RAX without delivering",
        ),
        (M::Rdpid, Ring::Kernel) => {
            Some("kvm_pvm at CPL0 raises #UD for `rdpid`: its CPU has no RDPID, the model's has")
        }
        (M::Cpuid, Ring::Kernel) => Some(
            "kvm_pvm at CPL0 answers CPUID with the host's values (leaf 7's AVX-512 bits, MTRR, XCR0 0xe7), not its CPUID table (the model's)",
        ),
        (M::Iret | M::Iretd, Ring::Kernel) => {
            Some("kvm_pvm at CPL0: every 16- and 32-bit `iret` raises #GP(0), whatever the frame")
        }
        (M::Sysret, Ring::Kernel) => {
            Some("kvm_pvm at CPL0: `sysret` without REX.W returns to the 64-bit user CS, not STAR's compatibility-mode one")
        }
        _ => None,
    }
}

/// The translator's platform in the harness: the bt engine's CPU model, as the vCPU's CPUID.
pub struct ModelPlatform;

impl Platform for ModelPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid::guest_cpuid(leaf, subleaf)
    }
    fn rdtsc(&mut self) -> u64 {
        // SAFETY: rdtsc has no memory effects.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    fn tsc_aux(&mut self) -> u32 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32, flags: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_adjustments_keep_what_kvm_changed_but_not_what_it_computes_as_the_guest_runs() {
        let set = [
            entry(1, 0, 0, 1 << 27, 0),
            entry(7, 0, 1, 1 << 4, 0),
            entry(7, 1, 1, 0, 0),
        ];
        // MTRR set by KVM, OSXSAVE and APIC changed with the guest's CR4 and APIC base.
        let get = [
            entry(1, 0, 0, 0, (1 << 12) | (1 << 9)),
            entry(7, 0, 1, 0, 0),
            entry(7, 1, 1, 0, 1 << 3),
        ];
        let r = KvmReference::adjusted_bits(&cpuid_adjustments(&set, &get), 1, 5);
        assert_eq!(r, [0, 0, 0, 1 << 12], "leaf 1 ignores the subleaf");
        assert_eq!(
            KvmReference::adjusted_bits(&cpuid_adjustments(&set, &get), 7, 0),
            [0; 4]
        );
        assert_eq!(
            KvmReference::adjusted_bits(&cpuid_adjustments(&set, &get), 7, 1),
            [0, 0, 0, 1 << 3]
        );
    }
}

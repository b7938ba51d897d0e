//! `--accel kvm`: the guest runs on KVM; hbt handles its port-I/O and MMIO exits with the device
//! models. KVM's in-kernel PIC/IOAPIC/LAPIC and PIT provide the interrupts.

use super::{ending, fmt_counts, End, Finished, Setup};
use crate::vmm::devices::{self, Action, Buses};
use crate::vmm::{boot, stop, vstate};
use anyhow::{bail, Context, Result};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::time::{Duration, Instant};

/// Exit reasons counted by the run loop (index into `RunStats::exits`).
const EXIT_REASONS: [&str; 6] = [
    "io-out",
    "io-in",
    "mmio-read",
    "mmio-write",
    "signal",
    "emulation-retry",
];
const IO_OUT: usize = 0;
const IO_IN: usize = 1;
const MMIO_READ: usize = 2;
const MMIO_WRITE: usize = 3;
const SIGNAL: usize = 4;
const EMULATION_RETRY: usize = 5;

/// `kvm_run.internal.suberror` for an instruction KVM's emulator could not perform.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// Emulation failures in a row at one RIP that are retried before the run fails. kvm_pvm
/// sometimes sends a faulting CPL3 instruction to its emulator instead of reflecting the fault
/// — measured on an Intel Xeon (SPR) host with the host loaded: `fistp` to an unmapped
/// address in `guests/user_chaos.c`, about 1 run in 45 — and the emulator has no x87; run
/// again, the instruction executes and faults as it should.
const EMULATION_RETRIES: u32 = 3;

#[derive(Default)]
struct RunStats {
    exits: [u64; EXIT_REASONS.len()],
    in_kvm: Duration,
}

impl RunStats {
    /// (reason, count) of the reasons that occurred.
    fn exits_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        EXIT_REASONS
            .iter()
            .zip(self.exits)
            .filter(|e| e.1 > 0)
            .map(|(r, n)| (*r, n))
    }
}

/// The VM with guest RAM registered and the vCPU in long mode at the entry point.
fn boot_vcpu(setup: &Setup) -> Result<(vstate::vm::Vm, VcpuFd)> {
    let vm = vstate::vm::Vm::new(setup.mem)?;
    let vcpu = vm.create_vcpu()?;
    let sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
    vcpu.set_sregs(&boot::long_mode_sregs(sregs))
        .context("KVM_SET_SREGS failed")?;
    let e = setup.entry;
    vcpu.set_regs(&boot::entry_regs(e.rip, e.rsp, e.rsi))
        .context("KVM_SET_REGS failed")?;
    Ok((vm, vcpu))
}

pub fn run(setup: &Setup) -> Result<Finished> {
    let (vm, mut vcpu) = boot_vcpu(setup)?;
    let mem = &*setup.mem;
    let (mut bus, marks) = Buses::standard(setup.started, setup.interactive, vm.irq_line(devices::serial::COM1_IRQ));
    let mut st = RunStats::default();
    let loop_started = Instant::now();
    // (RIP, failures in a row there) of the last emulation failure.
    let mut emulation_failures = (0u64, 0u32);
    let end = loop {
        if let Some(end) = stop::requested() {
            break end;
        }
        let t0 = Instant::now();
        let exit = vcpu.run();
        st.in_kvm += t0.elapsed();
        let (reason, action) = match exit {
            Ok(VcpuExit::IoOut(port, data)) => (IO_OUT, bus.pio.write(port as u64, data)),
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio.read(port as u64, data);
                (IO_IN, Action::Continue)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio.read(addr, data);
                (MMIO_READ, Action::Continue)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => (MMIO_WRITE, bus.mmio.write(addr, data)),
            Ok(VcpuExit::Hlt) => break End::Halted,
            Ok(VcpuExit::Shutdown) => {
                bail!(
                    "guest triple fault (shutdown) after {:.3} s: {}",
                    setup.started.elapsed().as_secs_f64(),
                    vstate::vcpu::describe(&vcpu, mem)
                )
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                bail!("guest system event {kind}: {}", vstate::vcpu::describe(&vcpu, mem))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the union holds `internal`.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let (at, count) = emulation_failures;
                emulation_failures = (rip, if at == rip { count + 1 } else { 1 });
                if suberror != KVM_INTERNAL_ERROR_EMULATION || emulation_failures.1 > EMULATION_RETRIES {
                    bail!(
                        "KVM internal error {suberror} (the in-kernel emulator could not run the guest{}): {}",
                        if suberror == KVM_INTERNAL_ERROR_EMULATION {
                            format!(", {EMULATION_RETRIES} retries")
                        } else {
                            String::new()
                        },
                        vstate::vcpu::describe(&vcpu, mem)
                    )
                }
                (EMULATION_RETRY, Action::Continue)
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                bail!(
                    "KVM could not enter the guest (hardware entry failure {reason:#x}): {}",
                    vstate::vcpu::describe(&vcpu, mem)
                )
            }
            Ok(VcpuExit::Intr) => (SIGNAL, Action::Continue),
            Ok(other) => {
                let what = format!("{other:?}");
                bail!("unexpected KVM exit {what}: {}", vstate::vcpu::describe(&vcpu, mem))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => (SIGNAL, Action::Continue),
            Err(e) => bail!("KVM_RUN failed: {e}: {}", vstate::vcpu::describe(&vcpu, mem)),
        };
        if let Some(end) = ending(action) {
            break end;
        }
        st.exits[reason] += 1;
    };
    let in_loop = loop_started.elapsed();
    let total = setup.started.elapsed();
    let total_exits: u64 = st.exits.iter().sum();
    let stats_lines = vec![
        format!(
            "  time: {:.6} s total, {:.6} s in KVM_RUN, {:.6} s in hbt; run loop {:.6} s, {:.3} µs per exit",
            total.as_secs_f64(),
            st.in_kvm.as_secs_f64(),
            total.saturating_sub(st.in_kvm).as_secs_f64(),
            in_loop.as_secs_f64(),
            in_loop.as_secs_f64() * 1e6 / total_exits.max(1) as f64
        ),
        format!(
            "  exits: {total_exits} ({})",
            fmt_counts(st.exits_by_reason().map(|(k, v)| (k.to_string(), v)))
        ),
    ];
    let mut stats_json = serde_json::Map::new();
    stats_json.insert("seconds_in_kvm_run".into(), st.in_kvm.as_secs_f64().into());
    stats_json.insert(
        "seconds_in_hbt".into(),
        total.saturating_sub(st.in_kvm).as_secs_f64().into(),
    );
    stats_json.insert("exits".into(), total_exits.into());
    stats_json.insert(
        "exits_by_reason".into(),
        serde_json::json!(st.exits_by_reason().collect::<std::collections::BTreeMap<_, _>>()),
    );
    Ok(Finished {
        end,
        location: vstate::vcpu::describe(&vcpu, mem),
        buses: bus,
        marks,
        seconds_run_loop: in_loop.as_secs_f64(),
        stats_lines,
        stats_json,
    })
}

/// The floor `--raw-exit-loop` measures: KVM_RUN and back with nothing in between but a match.
pub fn raw_exit_loop(setup: &Setup) -> Result<i32> {
    let (_vm, mut vcpu) = boot_vcpu(setup)?;
    let started = Instant::now();
    let mut exits = 0u64;
    loop {
        exits += 1;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) if port as u64 == devices::debug_exit::PORT => break,
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0),
            Ok(other) => {
                let what = format!("{other:?}");
                bail!("raw exit loop: unexpected exit {what}")
            }
            Err(e) => bail!("raw exit loop: KVM_RUN failed: {e}"),
        }
    }
    let t = started.elapsed().as_secs_f64();
    diag!(
        "raw exit loop: {exits} exits in {t:.6} s, {:.3} µs per exit",
        t * 1e6 / exits as f64
    );
    Ok(0)
}

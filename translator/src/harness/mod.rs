//! The differential harness (DESIGN §6): for an iced `Code`, synthesize instances and machine
//! states, run each natively on the host CPU and through the translator under both memory
//! strategies, and compare everything observable. `hbt isa-test` and CI drive it; the supported
//! set (`supported.rs`) is exactly what passes here.
//!
//! `machine.rs` (regions, native trampoline, soft-MMU page tables), `synth.rs` (instances and
//! states), `compare.rs` (outcomes and differences), `rng.rs` (reproducible randomness), and
//! `mutate.rs` (seeded input mutations for the fuzz tests of hbt's parsers).

pub mod compare;
pub mod machine;
pub mod mutate;
pub mod rng;
pub mod synth;
pub mod system;

use crate::engine::{Config, Translator};
use crate::exit::{vector, Exit, GuestException};
use crate::host::features::{host_has, host_runs};
use crate::mmu::MemoryStrategy;
use crate::platform::HostPlatform;
use crate::rules::{rule, EmulateOp, Rule};
use compare::{differences, Event, Ignore, Outcome};
use iced_x86::{Code, Formatter, IntelFormatter};
use machine::{Machine, HLT};
use rng::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// States run per synthesized instance.
const STATES_PER_INSTANCE: u32 = 8;
/// Attempts at synthesizing an encodable instance before giving up on a `Code`.
const SYNTH_ATTEMPTS: u32 = 64;
/// Dispatcher rounds one translated run may take (a test run needs two or three).
const RUN_BUDGET: u64 = 64;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Cases per memory strategy for each `Code`.
    pub cases: u32,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { cases: 200, seed: 1 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Passed,
    Failed,
    /// The host CPU lacks these CPUID features, so the form cannot be compared here (it is
    /// verified on hosts that have them).
    NotExecutable(Vec<iced_x86::CpuidFeature>),
    /// Not testable for another reason (no rule, not synthesizable): a defect for a supported form.
    Skipped(String),
    /// System mode: the reference engine cannot run the form as the CPU would (the reason),
    /// so it is not compared there.
    NoReference(String),
}

impl Status {
    /// One word for tables and JSON.
    pub fn label(&self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::NotExecutable(_) => "not-executable",
            Status::Skipped(_) => "skipped",
            Status::NoReference(_) => "no-reference",
        }
    }

    /// Why the form was not tested, if it was not.
    pub fn reason(&self) -> Option<String> {
        match self {
            Status::NotExecutable(missing) => Some(format!("the host CPU lacks {}", feature_names(missing))),
            Status::Skipped(why) | Status::NoReference(why) => Some(why.clone()),
            _ => None,
        }
    }
}

/// Records a line in the CI summary (the file `$HBT_CI_SUMMARY`, which `.ci/run` prints at the
/// end), so what the tests verified shows in CI's log even though cargo captures their output.
pub fn ci_summary(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("HBT_CI_SUMMARY") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// `SSE4A`, `AVX512F+AVX512VL`: iced's feature names.
pub fn feature_names(features: &[iced_x86::CpuidFeature]) -> String {
    features.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join("+")
}

#[derive(Clone, Debug)]
pub struct CodeResult {
    pub code: Code,
    pub mnemonic: String,
    /// Cases run per memory strategy.
    pub cases: u64,
    /// System mode: cases the reference engine could not run as the CPU would (not compared).
    pub uncompared: u64,
    /// Why those cases were not compared: each distinct reason with its count.
    pub uncompared_reasons: Vec<(String, u64)>,
    /// System mode: cases (counted in `cases`) that differed once and agreed when run again
    /// from the same inputs.
    pub passed_on_rerun: u64,
    pub status: Status,
    /// First failing case: reproducible with the same `--code` and `--seed`.
    pub failure: Option<String>,
}

/// The two strategies every case runs under.
const STRATEGIES: [&str; 2] = ["identity", "soft-mmu"];

/// One test thread: a machine and a translator per strategy. Translators are declared first so
/// they drop before the machine whose memory the soft-MMU one points into.
pub struct Worker {
    translators: [Translator; 2],
    machine: Machine,
}

impl Worker {
    pub fn new(index: usize) -> Result<Self, String> {
        pin_to_cpu(index);
        let mut machine = Machine::new(0x2000_0000 + (index as u64) * 0x100_0000)?;
        let cache = 4 << 20;
        let identity = Translator::new(Config {
            strategy: MemoryStrategy::Identity,
            code_cache_bytes: cache,
            verified_only: false,
            system: false,
        })
        .map_err(|e| e.to_string())?;
        let soft = Translator::new(Config {
            strategy: MemoryStrategy::SoftMmu(machine.guest_ram()),
            code_cache_bytes: cache,
            verified_only: false,
            system: false,
        })
        .map_err(|e| e.to_string())?;
        Ok(Worker {
            translators: [identity, soft],
            machine,
        })
    }

    /// Tests one `Code`.
    pub fn test_code(&mut self, code: Code, opts: &Options) -> CodeResult {
        test_cases(self, code, opts)
    }

    fn native_outcome(
        &mut self,
        state: &crate::state::GuestState,
        inst: &synth::Instance,
        forked: bool,
    ) -> Result<Outcome, String> {
        let (cap, data) = if forked {
            self.machine
                .run_native_forked(state)
                .ok_or("the forked native run did not report")?
        } else {
            let cap = self.machine.run_native(state);
            (cap, self.machine.native_data())
        };
        let mut s = state.clone();
        s.gpr = cap.gpr;
        s.rip = cap.rip;
        s.rflags = cap.rflags;
        s.seg = cap.seg;
        s.fs_base = cap.fs_base;
        s.gs_base = cap.gs_base;
        s.xsave.0.copy_from_slice(&cap.xsave[..]);
        guest_view_of_native(state, inst, &mut s);
        let exc = GuestException {
            vector: cap.trapno as u8,
            error_code: Some(cap.error_code as u32),
            address: (cap.trapno == 14).then_some(cap.cr2),
        };
        let event = self.classify(exc, cap.rip, inst);
        Ok(Outcome::from_state(&s, event, data))
    }

    fn classify(&self, exc: GuestException, rip: u64, inst: &synth::Instance) -> Event {
        let inside = rip >= inst.instr.ip() && rip < inst.instr.next_ip();
        if exc.vector == vector::GP && !inside && self.machine.code_byte(rip) == Some(HLT) {
            Event::Completed
        } else {
            Event::Exception(exc)
        }
    }

    fn translated_outcome(
        &mut self,
        which: usize,
        state: &crate::state::GuestState,
        mem: &[u8],
        inst: &synth::Instance,
    ) -> Result<Outcome, String> {
        let soft = which == 1;
        if soft {
            self.machine.set_soft_data(mem);
        } else {
            self.machine.set_native_data(mem);
        }
        let cr3 = self.machine.cr3();
        let t = &mut self.translators[which];
        *t.state_mut() = state.clone();
        t.state_mut().cr3 = cr3;
        let mut platform = HostPlatform;
        let mut syscalls = 0;
        let event = loop {
            match t.run(&mut platform, RUN_BUDGET).map_err(|e| e.to_string())? {
                Exit::Exception(exc) => break exc,
                Exit::Syscall if syscalls == 0 => {
                    syscalls += 1;
                    host_syscall(t.state_mut())?;
                }
                other => return Err(format!("run ended with {other:?}")),
            }
        };
        let rip = t.state().rip;
        let s = t.state().clone();
        let event = self.classify(event, rip, inst);
        let data = if soft {
            self.machine.soft_data()
        } else {
            self.machine.native_data()
        };
        Ok(Outcome::from_state(&s, event, data))
    }
}

impl Cases for Worker {
    fn place(&self) -> (u64, u64) {
        (self.machine.code_at(), self.machine.data())
    }

    fn load(&mut self, inst: &synth::Instance) {
        // Flush first: the identity translator write-protects the code pages it translated.
        for t in &mut self.translators {
            t.flush();
        }
        self.machine.load_code(&inst.bytes, inst.lead_in);
    }

    fn run(&mut self, inst: &synth::Instance, rng: &mut Rng, r: Rule) -> Result<Ran, Failure> {
        // The guest starts with this thread's FS/GS bases, so both runs agree on them.
        let bases = host_fs_gs_base();
        let data = self.machine.data();
        let (mut state, mem) = synth::state(inst, rng, self.machine.code_range(), data, bases);
        (state.fs_base, state.gs_base) = bases;
        self.machine.set_native_data(&mem);
        let forked = r == Rule::Emulate(EmulateOp::Segment);
        let native = self.native_outcome(&state, inst, forked).map_err(Failure::Plain)?;
        for (si, name) in STRATEGIES.iter().enumerate() {
            let translated = self.translated_outcome(si, &state, &mem, inst);
            let timed = matches!(r, Rule::Emulate(EmulateOp::Rdtsc | EmulateOp::Rdtscp));
            let ignore = Ignore::nondeterministic(r, &inst.instr, false);
            let diffs = match &translated {
                Ok(t) => {
                    let mut d = differences(&inst.instr, &native, t, ignore);
                    if timed && tsc(t) < tsc(&native) {
                        d.push("time-stamp counter went backwards".into());
                    }
                    d
                }
                Err(e) => vec![format!("translator error: {e}")],
            };
            if !diffs.is_empty() {
                return Err(Failure::Case {
                    under: name.to_string(),
                    state: Box::new(state),
                    diffs,
                });
            }
        }
        Ok(Ran::Compared)
    }
}

/// Why one case failed.
pub enum Failure {
    /// The case could not be run (the message says why).
    Plain(String),
    /// The reference engine cannot run this instance (system mode): not compared.
    Unreferenced(String),
    /// The runs differ: under which engine or strategy, from which input state, and how.
    Case {
        under: String,
        state: Box<crate::state::GuestState>,
        diffs: Vec<String>,
    },
}

/// A test machine as the shared case loop ([`test_cases`]) drives it.
pub trait Cases {
    /// Where instances are placed: the instruction's address and the data region's.
    fn place(&self) -> (u64, u64);
    /// Loads a new instance (its code) into the machine.
    fn load(&mut self, inst: &synth::Instance);
    /// Synthesizes one state for `inst`, runs it everywhere and compares.
    fn run(&mut self, inst: &synth::Instance, rng: &mut Rng, rule: Rule) -> Result<Ran, Failure>;
    /// The code the machine runs instances as: 64-bit, or 32-bit (compatibility mode, where
    /// the rules are `rules::rule_compat`'s).
    fn bitness(&self) -> u32 {
        64
    }
}

/// What became of one case that did not fail.
pub enum Ran {
    Compared,
    /// Compared, and agreed only when run a second time from the same inputs (system mode:
    /// the reference is not always the CPU's; see `system::SystemWorker`'s `run`).
    ComparedOnRerun,
    /// The reference could not run it as the CPU would (system mode): not compared, and why.
    NotCompared(String),
}

/// Tests one `Code` on `machine`: `opts.cases` states, `STATES_PER_INSTANCE` per synthesized
/// instance; stops at the first failing case.
pub fn test_cases(machine: &mut (impl Cases + ?Sized), code: Code, opts: &Options) -> CodeResult {
    let mut result = CodeResult {
        code,
        mnemonic: format!("{:?}", code.mnemonic()).to_lowercase(),
        cases: 0,
        uncompared: 0,
        uncompared_reasons: Vec::new(),
        passed_on_rerun: 0,
        status: Status::Passed,
        failure: None,
    };
    if std::env::var_os("HBT_ISA_TRACE").is_some() {
        eprintln!("testing {code:?}");
    }
    let bitness = machine.bitness();
    let rule_of = if bitness == 32 { crate::rules::rule_compat } else { rule };
    let Some(r) = rule_of(code) else {
        result.status = Status::Skipped("no translation rule".into());
        return result;
    };
    if !host_runs(code) {
        let missing = code
            .cpuid_features()
            .iter()
            .copied()
            .filter(|&f| !host_has(f))
            .collect();
        result.status = Status::NotExecutable(missing);
        return result;
    }
    let instances = opts.cases.div_ceil(STATES_PER_INSTANCE).max(1);
    let mut rng = Rng::new(opts.seed ^ (code as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut formatter = IntelFormatter::new();
    for k in 0..instances {
        let (at, data) = machine.place();
        let Some(inst) = (0..SYNTH_ATTEMPTS).find_map(|_| synth::instance(code, &mut rng, at, data, bitness)) else {
            if k == 0 {
                result.status = Status::Skipped("no encodable instance could be synthesized".into());
            }
            return result;
        };
        machine.load(&inst);
        let states = STATES_PER_INSTANCE.min(opts.cases - k * STATES_PER_INSTANCE);
        for j in 0..states {
            match machine.run(&inst, &mut rng, r) {
                Ok(Ran::Compared) => result.cases += 1,
                Ok(Ran::ComparedOnRerun) => {
                    result.cases += 1;
                    result.passed_on_rerun += 1;
                }
                Ok(Ran::NotCompared(why)) => {
                    result.uncompared += 1;
                    match result.uncompared_reasons.iter_mut().find(|(w, _)| *w == why) {
                        Some((_, n)) => *n += 1,
                        None => result.uncompared_reasons.push((why, 1)),
                    }
                }
                Err(Failure::Plain(e)) => {
                    result.status = Status::Failed;
                    result.failure = Some(e);
                    return result;
                }
                Err(Failure::Unreferenced(why)) => {
                    result.status = Status::NoReference(why);
                    return result;
                }
                Err(Failure::Case { under, state, diffs }) => {
                    let mut text = String::new();
                    formatter.format(&inst.instr, &mut text);
                    let report = format!(
                        "`{text}` (bytes {}) under {under}, seed {} (instance {k}, state {j})\n  input: {}\n  {}",
                        inst.bytes
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        opts.seed,
                        compare::describe_state(&state),
                        diffs.join("\n  ")
                    );
                    result.status = Status::Failed;
                    // For investigating a reference's differences: report every failing case
                    // (and go on) instead of stopping at the first.
                    if std::env::var_os("HBT_ISA_EVERY_FAILURE").is_some() {
                        eprintln!("CASE {:?} {report}", inst.instr.code());
                        result.failure.get_or_insert(report);
                        continue;
                    }
                    result.failure = Some(report);
                    return result;
                }
            }
        }
    }
    if result.cases == 0 && result.uncompared > 0 {
        let why = match result.uncompared_reasons.as_slice() {
            [(only, _)] => only.clone(),
            _ => "the reference could not run any of its cases as the CPU would".to_string(),
        };
        result.status = Status::NoReference(why);
    }
    result
}

/// What a guest of this translator sees where the host shows more: CPUID and `xgetbv` through
/// the guest's XCR0 (the managed components: XFD-armed AMX hidden). The native run executes on
/// the host, so its results are mapped the way the translator's platform maps the host's; on
/// hosts without such components this changes nothing but leaf 0DH's host-only fields. The
/// mapping itself is unit-tested on synthetic CPUID tables (`cpu::xsave`).
fn guest_view_of_native(input: &crate::state::GuestState, inst: &synth::Instance, out: &mut crate::state::GuestState) {
    let completed = out.rip == inst.instr.next_ip();
    if !completed {
        return;
    }
    let lo = |v: u64| v & 0xffff_ffff;
    match inst.instr.mnemonic() {
        iced_x86::Mnemonic::Cpuid => {
            let mut regs = [out.gpr[0], out.gpr[3], out.gpr[1], out.gpr[2]].map(|v| v as u32);
            crate::cpu::xsave::XsaveLayout::host().guest_cpuid(
                input.xcr0,
                input.gpr[0] as u32,
                input.gpr[1] as u32,
                &mut regs,
            );
            [out.gpr[0], out.gpr[3], out.gpr[1], out.gpr[2]] = regs.map(|v| v as u64);
        }
        iced_x86::Mnemonic::Xgetbv => {
            let v = ((lo(out.gpr[2]) << 32) | lo(out.gpr[0])) & input.xcr0;
            out.gpr[0] = lo(v);
            out.gpr[2] = v >> 32;
        }
        _ => {}
    }
}

fn host_fs_gs_base() -> (u64, u64) {
    let (mut fs, mut gs) = (0u64, 0u64);
    // SAFETY: ARCH_GET_FS/GS write one u64 each through valid pointers.
    unsafe {
        libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64);
        libc::syscall(libc::SYS_arch_prctl, 0x1004, &mut gs as *mut u64);
    }
    (fs, gs)
}

fn tsc(o: &Outcome) -> u64 {
    (o.gpr[0] & 0xffff_ffff) | (o.gpr[2] << 32)
}

/// Performs a guest `syscall` the harness allows (getpid, getuid, an unknown number).
fn host_syscall(state: &mut crate::state::GuestState) -> Result<(), String> {
    let nr = state.gpr[0];
    if ![39, 102, 1000].contains(&nr) {
        return Err(format!("unexpected system call {nr}"));
    }
    let ret: i64;
    // SAFETY: only getpid, getuid and an unassigned number (ENOSYS) reach here; none takes
    // pointers or changes process state.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") nr as i64 => ret, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    state.gpr[0] = ret as u64;
    Ok(())
}

fn pin_to_cpu(index: usize) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within its size; sched_setaffinity(0)
    // affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(index % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Tests `codes` on `threads` workers; `progress` is called after each `Code`.
pub fn run_codes(
    codes: &[Code],
    opts: &Options,
    threads: usize,
    progress: &(dyn Fn(&CodeResult) + Sync),
) -> Result<Vec<CodeResult>, String> {
    run_codes_on(codes, opts, threads, &|w| Worker::new(w), progress)
}

/// Tests `codes` on `threads` machines made by `make` (called with the thread's index, on that
/// thread); `progress` is called after each `Code`.
pub fn run_codes_on<M: Cases>(
    codes: &[Code],
    opts: &Options,
    threads: usize,
    make: &(dyn Fn(usize) -> Result<M, String> + Sync),
    progress: &(dyn Fn(&CodeResult) + Sync),
) -> Result<Vec<CodeResult>, String> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(codes.len()));
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for w in 0..threads.max(1) {
            let (next, results, errors) = (&next, &results, &errors);
            scope.spawn(move || {
                let mut machine = match make(w) {
                    Ok(m) => m,
                    Err(e) => {
                        errors.lock().unwrap().push(e);
                        return;
                    }
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&code) = codes.get(i) else { break };
                    let r = test_cases(&mut machine, code, opts);
                    progress(&r);
                    results.lock().unwrap().push((i, r));
                }
            });
        }
    });
    if let Some(e) = errors.into_inner().unwrap().into_iter().next() {
        return Err(e);
    }
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

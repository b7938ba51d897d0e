//! Which engine runs a stretch of guest user code (DESIGN §5). KVM runs it at native speed, but
//! every kernel entry from it costs a round trip through hbt's stubs and a state transfer
//! (≈ 60–120 µs for a system call or a page fault on an Intel SPR host under kvm_pvm); the
//! translator runs user code slower (≈ 1.1–3× native, `benches/exec-vs-peers.sh`) but enters
//! the guest kernel for the price of a jump.
//!
//! So a stretch that runs u µs natively costs u + T under KVM and ≈ s·u in the translator, and
//! both u and s belong to the program (s ≈ 1.1 for register arithmetic, 4 for a hash over
//! memory), T to the host (and to the stretch: the first one on fresh page tables pays for
//! KVM's shadow faults too). Rather than guess them, the adaptive policy measures what it is
//! choosing between: per address space (guest CR3) it keeps a moving average of what a stretch
//! costs under KVM (state in, user code, exit, hbt's fault fixes) and in the translator (user
//! entry to kernel entry), runs the cheaper, and re-measures the other now and then — a probe
//! of a few stretches, after a back-off that doubles while the verdict holds. A probe comes
//! early when KVM's average moves far from what it was when chosen (the program changed phase:
//! a shell done with its loop starts forking) or the running engine's rises above the other's
//! (a translated phase change alone is no reason: a process's stretches swing by 10×).
//!
//! Two facts bound the probing. KVM cannot win for a program whose translated stretches are
//! not much longer than one round trip (T: the median of the cheapest KVM stretches seen
//! anywhere; [`HOPELESS`] says how much), so those are not probed under KVM until they have
//! run [`PROBE_AFTER_US`] of translated time (then again after twice that, while KVM keeps
//! losing: the rule assumes a translator within 2× of native) — most processes of a shell
//! live a few system calls and page faults long (300 fork+exec of busybox `true` on an Intel
//! SPR host: 3.96 s starting under KVM, 1.5 s in the translator). And a stretch that makes no kernel entry at all would
//! never end: a [`Watch`] thread stops a translated stretch once it has run past what the same
//! stretch costs under KVM (or, with no KVM measurement yet, [`LONG`] round trips) and moves
//! it to KVM where it stands.
//!
//! On a host with real VT-x/AMD-V the same engine would run kernel code under KVM too and send
//! only exit-heavy code to the translator (exit clustering, Agesen et al., USENIX ATC'12): a
//! policy over kernel code paths instead of user address spaces; nothing here depends on which
//! engine is the default for CPL0.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Kvm,
    Translator,
}

impl Choice {
    fn other(self) -> Choice {
        match self {
            Choice::Kvm => Choice::Translator,
            Choice::Translator => Choice::Kvm,
        }
    }
}

/// `--hybrid-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Per address space, the engine whose stretches measure cheaper.
    Adaptive,
    /// Every stretch of user code under KVM.
    AlwaysKvm,
}

/// A translated stretch this many round trips long, in an address space never measured under
/// KVM, was user computation: KVM takes it from there. (A shell's 300 fork+exec of busybox
/// `true`, AMD EPYC: 25,107 translated stretches, 99.9% under 110 µs, one over 500 µs; the
/// round trip there is 44–100 µs. At 20 a 100k-iteration shell loop ran ≈2.6 ms translated,
/// at ≈1/7 of KVM's speed, before the watch moved it.)
const LONG: f64 = 10.0;
/// A translated stretch longer than this many times the same address space's KVM average is
/// moved to KVM while it runs (twice: the stretch under KVM would still have to run).
const CUT: f64 = 2.0;
/// The running engine's average this many times worse than the other's, or this factor away
/// from its value when chosen (either way), calls for an early probe.
const SHIFT: f64 = 4.0;
/// Stretches a probe measures the other engine for.
const PROBE: u32 = 4;
/// The cheapest KVM stretch assumed until one is measured (µs; Intel SPR host: 60–140).
const DEFAULT_FLOOR_US: f64 = 100.0;
/// How many of the cheapest KVM stretches the round-trip estimate is the median of.
const CHEAPEST_KEPT: usize = 16;
/// Translated time (µs) after which KVM is probed for an address space in the translator even
/// when its stretches look too short for KVM to win, and the longest it grows to while
/// probes keep confirming the translator (see [`Space::translated_overdue`]).
const PROBE_AFTER_US: f64 = 100_000.0;
const MAX_PROBE_AFTER_US: f64 = 6_400_000.0;
/// Stretches between probes: the first back-off, and the longest.
const FIRST_BACKOFF: u32 = 8;
const MAX_BACKOFF: u32 = 512;
/// Weight of the newest stretch in the moving averages.
const NEWEST: f64 = 0.25;
/// KVM is not probed for an address space whose translated stretches average less than this
/// many round trips. A stretch of t µs in the translator runs ≈ t/s natively (s: the
/// translator's slowdown for that code) and so costs t/s + T under KVM, which wins only when
/// t > T·s/(s−1): above 2T for code the translator runs within 2× of native, 1.33T at 4×
/// (memory-heavy code, whose short stretches gain little). A shell's stretches between its
/// fork/exec/wait calls sit at 1–1.5 T: probing them cost 300 fork+exec ≈ 20%.
const HOPELESS: f64 = 2.0;

struct Space {
    /// What else identifies the address space than its CR3 (see [`Policy::choose`]).
    identity: u64,
    engine: Choice,
    /// Moving averages of a stretch's cost under KVM and in the translator, µs.
    kvm_us: Option<f64>,
    translator_us: Option<f64>,
    /// The running engine's average when it was chosen.
    chosen_at_us: Option<f64>,
    /// Stretches before the other engine is probed; stretches of the probe still to measure.
    left: u32,
    probing: u32,
    backoff: u32,
    /// For `--stats`: stretches and µs spent in each engine (KVM, translator).
    stretches: [u64; 2],
    spent_us: [f64; 2],
    /// Translated stretches since the verdict was last settled: µs in all, and how many.
    translated_since: (f64, u32),
    /// KVM's verdict came from a cut (a translated stretch moved to KVM while it ran) after
    /// this many µs, and has not been settled again since.
    cut_at_us: Option<f64>,
    /// Translated µs since the verdict settled after which KVM is probed regardless.
    probe_after_us: f64,
    /// µs of the KVM stretch still running: its stints so far, each kicked out for an
    /// interrupt (or a stop) rather than ended by a kernel entry of its own.
    kvm_open_us: f64,
}

impl Space {
    /// A new address space starts in the translator (see the file comment).
    fn new() -> Space {
        Space {
            identity: 0,
            engine: Choice::Translator,
            kvm_us: None,
            translator_us: None,
            chosen_at_us: None,
            left: FIRST_BACKOFF,
            probing: 0,
            backoff: FIRST_BACKOFF,
            stretches: [0; 2],
            spent_us: [0.0; 2],
            translated_since: (0.0, 0),
            cut_at_us: None,
            probe_after_us: PROBE_AFTER_US,
            kvm_open_us: 0.0,
        }
    }

    /// Another process on the same CR3: it starts afresh, as a new address space does (what
    /// was spent stays counted for `--stats`).
    fn renew(&mut self, identity: u64) {
        let (stretches, spent_us) = (self.stretches, self.spent_us);
        *self = Space {
            identity,
            stretches,
            spent_us,
            ..Space::new()
        };
    }

    /// Its translated stretches are too short for KVM to win (under [`HOPELESS`] round trips
    /// of `floor` µs), on average since the verdict was settled: the moving average follows
    /// the last few stretches, and a process's swing by 10× (an exec's long first stretch, the
    /// short ones between its system calls) — a probe of KVM right after a long one compared
    /// KVM on short stretches with a translator average the long one had raised, and lost a
    /// shell's fork+exec loop to KVM every few processes.
    fn kvm_hopeless(&self, floor: f64) -> bool {
        let (us, n) = self.translated_since;
        let typical = if n > 0 { Some(us / n as f64) } else { self.translator_us };
        typical.is_some_and(|t| t < HOPELESS * floor)
    }

    /// In the translator for more than `probe_after_us` of translated time since the verdict
    /// settled. The back-off counts stretches and [`HOPELESS`] assumes the translator within
    /// 2× of native: `gzip` (≈3.3× here) in ≈450 µs stretches looked hopeless for KVM on a
    /// host whose round trip measured 230 µs, and one boot in five ran the bench's gzip in the
    /// translator (7.3 s instead of KVM's 4.7). A probe costs a few round trips, so one per
    /// `probe_after_us` — doubling while the probes find the translator better, and starting
    /// afresh for a new process — bounds both what a wrong verdict and what probing cost.
    fn translated_overdue(&self) -> bool {
        self.engine == Choice::Translator && self.translated_since.0 > self.probe_after_us
    }

    fn average(&self, engine: Choice) -> Option<f64> {
        match engine {
            Choice::Kvm => self.kvm_us,
            Choice::Translator => self.translator_us,
        }
    }

    fn add(&mut self, engine: Choice, us: f64) {
        self.stretches[engine as usize] += 1;
        self.spent_us[engine as usize] += us;
        let slot = match engine {
            Choice::Kvm => &mut self.kvm_us,
            Choice::Translator => &mut self.translator_us,
        };
        *slot = Some(slot.map_or(us, |old| (1.0 - NEWEST) * old + NEWEST * us));
    }

    /// The translator's verdict stands without a probe: only the back-off grows (the
    /// translated time since the verdict settled keeps counting, see `translated_overdue`).
    fn hold(&mut self) {
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.left = self.backoff;
    }

    /// Runs `engine` from now on; the back-off grows when it was running already.
    fn settle(&mut self, engine: Choice) {
        self.backoff = if engine == self.engine {
            (self.backoff * 2).min(MAX_BACKOFF)
        } else {
            FIRST_BACKOFF
        };
        self.probe_after_us = if engine == self.engine && self.translated_overdue() {
            (self.probe_after_us * 2.0).min(MAX_PROBE_AFTER_US)
        } else {
            PROBE_AFTER_US
        };
        self.engine = engine;
        self.left = self.backoff;
        self.probing = 0;
        self.translated_since = (0.0, 0);
        self.cut_at_us = None;
        self.chosen_at_us = self.average(engine);
    }
}

pub struct Policy {
    mode: Mode,
    spaces: HashMap<u64, Space>,
    /// The cheapest stretches under KVM seen, µs, ascending (at most `CHEAPEST_KEPT`): the
    /// round trip itself is the median of them. (The single cheapest was the estimate once; one
    /// 17.6 µs outlier on an Intel SPR host, where round trips take 70–120 µs, then kept every
    /// fork+exec under KVM: 300 of them took 10.5 s instead of 2.)
    cheapest_us: Vec<f64>,
    to_kvm: u64,
    to_translator: u64,
    /// Probes started, and verdicts that changed an address space's engine.
    probes: u64,
    switches: u64,
    /// Translated stretches moved to KVM while they ran.
    cuts: u64,
    /// Records renewed for a new process on a CR3 an earlier one had.
    renewed: u64,
}

impl Policy {
    pub fn new(mode: Mode) -> Self {
        Policy {
            mode,
            spaces: HashMap::new(),
            cheapest_us: Vec::with_capacity(CHEAPEST_KEPT + 1),
            to_kvm: 0,
            to_translator: 0,
            renewed: 0,
            probes: 0,
            switches: 0,
            cuts: 0,
        }
    }

    /// Where the user code of address space `cr3` that is about to run goes.
    ///
    /// `identity` tells processes apart that had the same CR3: a process that exits frees its
    /// page-table root and the next one may get the same page, with new tables under it (the
    /// caller passes the root's first entry, which names the new process's own table). Such a
    /// process does not inherit a KVM verdict: a long-running predecessor's made each `true`
    /// of a shell's fork+exec loop start under KVM.
    pub fn choose(&mut self, cr3: u64, identity: u64) -> Choice {
        let choice = if self.mode == Mode::AlwaysKvm {
            Choice::Kvm
        } else {
            let floor = self.floor();
            let space = self.spaces.entry(cr3).or_insert_with(|| Space {
                identity,
                ..Space::new()
            });
            if space.identity != identity {
                // A KVM verdict is the predecessor's (it computed); a translator one is kept,
                // with its back-off: a shell's short processes follow one another on a few
                // CR3s, and probing KVM afresh for each cost more than it found.
                if space.engine == Choice::Kvm {
                    space.renew(identity);
                    self.renewed += 1;
                } else {
                    space.identity = identity;
                    space.probe_after_us = PROBE_AFTER_US;
                }
            }
            let overdue = space.translated_overdue();
            if space.probing == 0 && (space.left == 0 || overdue) {
                // KVM cannot beat translated stretches not much longer than its round trip
                // (but see `translated_overdue`).
                if space.engine == Choice::Translator && space.kvm_hopeless(floor) && !overdue {
                    space.hold();
                } else if space.engine == Choice::Kvm && space.kvm_open_us > LONG * floor {
                    // In the middle of a KVM stretch already many round trips long (only
                    // interrupts have ended its stints): the translator cannot win it, and a
                    // probe would only run it slower until the watch cut it back — a shell's
                    // 100k-iteration loop lost ≈2.5 ms of its 107 to two such probes. The
                    // probe waits for the stretch's own kernel entry (`left` stays 0).
                } else {
                    // What the other engine measured before is stale (that is why it is probed).
                    match space.engine.other() {
                        Choice::Kvm => space.kvm_us = None,
                        Choice::Translator => space.translator_us = None,
                    }
                    space.probing = PROBE;
                    self.probes += 1;
                }
            }
            if space.probing > 0 {
                space.engine.other()
            } else {
                space.left = space.left.saturating_sub(1);
                space.engine
            }
        };
        match choice {
            Choice::Kvm => self.to_kvm += 1,
            Choice::Translator => self.to_translator += 1,
        }
        choice
    }

    /// A stretch of `cr3`'s user code took `took` under KVM, from the state going in to the
    /// state coming out (hbt's fixes of faults the guest's tables allow included: they are
    /// KVM's cost); `entered_kernel`: it ended with a kernel entry, not a kick (a kicked
    /// stretch is not over).
    pub fn stint_ended(&mut self, cr3: u64, took: Duration, entered_kernel: bool) {
        let us = took.as_secs_f64() * 1e6;
        let space = self.spaces.entry(cr3).or_insert_with(Space::new);
        if !entered_kernel {
            // Its time still counts for `--stats`.
            space.spent_us[Choice::Kvm as usize] += us;
            space.kvm_open_us += us;
            return;
        }
        space.kvm_open_us = 0.0;
        if self.cheapest_us.len() < CHEAPEST_KEPT || us < self.cheapest_us[CHEAPEST_KEPT - 1] {
            let at = self.cheapest_us.partition_point(|&c| c <= us);
            self.cheapest_us.insert(at, us);
            self.cheapest_us.truncate(CHEAPEST_KEPT);
        }
        match self.mode {
            Mode::Adaptive => self.stretch_ended(cr3, Choice::Kvm, us),
            Mode::AlwaysKvm => self.spaces.entry(cr3).or_insert_with(Space::new).add(Choice::Kvm, us),
        }
    }

    /// A stretch of `cr3`'s user code ran `took` in the translator, to its next kernel entry.
    pub fn translator_stretch_ended(&mut self, cr3: u64, took: Duration) {
        self.stretch_ended(cr3, Choice::Translator, took.as_secs_f64() * 1e6);
    }

    /// A translated stretch of `cr3` ran `took` and is still running (the watch fired): it
    /// moves to KVM where it stands.
    pub fn translator_stretch_cut(&mut self, cr3: u64, took: Duration) {
        let space = self.spaces.entry(cr3).or_insert_with(Space::new);
        let us = took.as_secs_f64() * 1e6;
        space.kvm_open_us = 0.0;
        space.add(Choice::Translator, us);
        if space.engine == Choice::Translator {
            self.switches += 1;
        }
        space.settle(Choice::Kvm);
        space.cut_at_us = Some(us);
        self.cuts += 1;
    }

    fn stretch_ended(&mut self, cr3: u64, engine: Choice, us: f64) {
        let floor = self.floor();
        let space = self.spaces.entry(cr3).or_insert_with(Space::new);
        space.kvm_open_us = 0.0;
        space.add(engine, us);
        if engine == Choice::Translator && space.engine == Choice::Translator && space.probing == 0 {
            space.translated_since.0 += us;
            space.translated_since.1 += 1;
        }
        if space.probing > 0 {
            if engine != space.engine {
                space.probing -= 1;
                if space.probing == 0 {
                    let (kvm, translator) = (
                        space.kvm_us.unwrap_or(f64::MAX),
                        space.translator_us.unwrap_or(f64::MAX),
                    );
                    let better = if kvm < translator {
                        Choice::Kvm
                    } else {
                        Choice::Translator
                    };
                    if better != space.engine {
                        self.switches += 1;
                    }
                    space.settle(better);
                }
            }
            return;
        }
        if engine != space.engine {
            return;
        }
        let mine = space.average(engine).unwrap_or(us);
        let worse_than_other = match space.average(engine.other()) {
            Some(other) => mine > SHIFT * other,
            // Never measured under KVM: translated stretches of many round trips compute.
            None => engine == Choice::Translator && mine > LONG * floor,
        };
        // Under KVM one stretch far shorter than the average KVM was chosen on (after a cut:
        // than the stretch that was cut) is enough: probing the translator costs little, and a
        // CR3 that a new process reuses (a shell's `true` after a long-running program)
        // inherits its predecessor's KVM verdict. In the translator a phase change alone is no
        // reason: only a translator average above KVM's (`worse_than_other`) or past [`LONG`]
        // round trips (never measured under KVM) makes KVM worth a probe — a process's
        // stretches swing by 10× and more (an exec's first against the system calls after it),
        // and probing KVM at each swing cost a shell's fork+exec loop ≈20%, the probes
        // comparing KVM on short stretches with a translator average a long one had raised.
        let chosen_on = space.cut_at_us.or(space.chosen_at_us);
        let moved = engine == Choice::Kvm
            && (space
                .chosen_at_us
                .is_some_and(|at| mine > SHIFT * at || SHIFT * mine < at)
                || chosen_on.is_some_and(|at| SHIFT * us < at));
        if worse_than_other || moved {
            space.left = 0;
        }
    }

    /// The cost of a KVM round trip: the median of the cheapest stretches once there are
    /// `CHEAPEST_KEPT`, assumed until then (µs).
    fn floor(&self) -> f64 {
        if self.cheapest_us.len() == CHEAPEST_KEPT {
            self.cheapest_us[CHEAPEST_KEPT / 2]
        } else {
            self.cheapest_us
                .first()
                .map_or(DEFAULT_FLOOR_US, |&c| c.min(DEFAULT_FLOOR_US))
        }
    }

    /// How long a translated stretch of `cr3` may run before it belongs under KVM. Where the
    /// translator's stretches average under [`HOPELESS`] round trips, KVM is not probed and
    /// its average may be stale (a shell measured under KVM while it waited for a gzip, now
    /// in a loop of its own): a stretch of [`LONG`] round trips is computation there, however
    /// long KVM's old stretches were (twice theirs kept the bench's 100k-iteration shell loop
    /// translated for ≈15 ms of its 140).
    pub fn long_stretch(&self, cr3: u64) -> Duration {
        let floor = self.floor();
        let space = self.spaces.get(&cr3);
        let hopeless = space.is_some_and(|s| s.kvm_hopeless(floor));
        let us = match space.and_then(|s| s.kvm_us) {
            Some(kvm) if !hopeless => (CUT * kvm).max(CUT * floor),
            _ => LONG * floor,
        };
        Duration::from_secs_f64(us * 1e-6)
    }

    /// One line for `--stats`. (A CR3 whose process exited may come back for another process;
    /// its record then starts afresh: `choose`'s identity.)
    pub fn describe(&self) -> String {
        let name = match self.mode {
            Mode::Adaptive => "adaptive",
            Mode::AlwaysKvm => "always-kvm",
        };
        let on_kvm = self.spaces.values().filter(|s| s.engine == Choice::Kvm).count();
        format!(
            "{name}; {} user stretches to KVM, {} to the translator; {} address spaces ({on_kvm} under KVM at the end; {} KVM verdicts dropped for a new process on an old CR3); {} probes, {} verdicts that switched engines, {} translated stretches moved to KVM while they ran; KVM round trip {:.1} µs (the median of the 16 cheapest stretches; 100 assumed until measured)",
            self.to_kvm,
            self.to_translator,
            self.spaces.len(),
            self.renewed,
            self.probes,
            self.switches,
            self.cuts,
            self.floor(),
        )
    }

    /// The address spaces by time spent, longest first.
    fn by_time(&self) -> Vec<(&u64, &Space)> {
        let mut spaces: Vec<_> = self.spaces.iter().collect();
        spaces.sort_by(|a, b| (b.1.spent_us[0] + b.1.spent_us[1]).total_cmp(&(a.1.spent_us[0] + a.1.spent_us[1])));
        spaces
    }

    /// The address spaces that ran longest, for `--stats`: CR3, stretches and seconds per
    /// engine, the averages, and where each ended up.
    pub fn busiest(&self, n: usize) -> Vec<String> {
        let spaces = self.by_time();
        let avg = |v: Option<f64>| v.map_or("-".to_string(), |us| format!("{us:.0} µs"));
        spaces
            .iter()
            .take(n)
            .map(|(cr3, s)| {
                format!(
                    "cr3 {cr3:#x}: KVM {} stretches {:.3} s (average {}), translator {} stretches {:.3} s (average {}); on {:?}",
                    s.stretches[0],
                    s.spent_us[0] * 1e-6,
                    avg(s.kvm_us),
                    s.stretches[1],
                    s.spent_us[1] * 1e-6,
                    avg(s.translator_us),
                    s.engine
                )
            })
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": format!("{:?}", self.mode),
            "to_kvm": self.to_kvm,
            "to_translator": self.to_translator,
            "address_spaces": self.spaces.len(),
            "records_renewed": self.renewed,
            "probes": self.probes,
            "switches": self.switches,
            "cuts": self.cuts,
            "round_trip_us": self.floor(),
            "busiest": self.by_time().iter().take(8).map(|(cr3, s)| serde_json::json!({
                "cr3": cr3,
                "engine": format!("{:?}", s.engine),
                "kvm_stretches": s.stretches[0],
                "kvm_seconds": s.spent_us[0] * 1e-6,
                "kvm_average_us": s.kvm_us,
                "translator_stretches": s.stretches[1],
                "translator_seconds": s.spent_us[1] * 1e-6,
                "translator_average_us": s.translator_us,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A thread that asks for a policy check (`stop::request_policy_check`) when a translated user
/// stretch has run for the time it was armed with, unless disarmed first. Arming and disarming
/// are one atomic store each (they happen at every user entry and kernel entry the translator
/// runs: a mutex and a wake-up there cost ≈10 µs per system call); the thread looks every
/// millisecond while stretches come and go, and parks once none was armed for
/// [`WATCH_PARK_AFTER`] looks — while user code computes under KVM nothing arms it, and a
/// thread waking 1,000 times a second there preempted the vCPU's `KVM_RUN` on this 2-CPU host
/// whenever the scheduler put the two together. Arming a parked watch unparks it.
pub struct Watch {
    shared: Arc<WatchState>,
    thread: Option<std::thread::Thread>,
}

struct WatchState {
    epoch: Instant,
    /// Nanoseconds after `epoch` the stretch is due; 0: disarmed.
    deadline_ns: AtomicU64,
    /// The thread is parked (or about to be): `arm` must unpark it.
    parked: AtomicBool,
    done: AtomicBool,
}

const WATCH_POLL: Duration = Duration::from_millis(1);
/// Looks in a row with nothing armed before the thread parks.
const WATCH_PARK_AFTER: u32 = 10;

impl Watch {
    pub fn start() -> Watch {
        let shared = Arc::new(WatchState {
            epoch: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let state = Arc::clone(&shared);
        let spawned = std::thread::Builder::new().name("hbt-policy".into()).spawn(move || {
            let mut idle = 0;
            while !state.done.load(Ordering::SeqCst) {
                std::thread::sleep(WATCH_POLL);
                let due = state.deadline_ns.load(Ordering::SeqCst);
                if due == 0 {
                    idle += 1;
                    if idle >= WATCH_PARK_AFTER {
                        // Announce the park, then look once more: an `arm` either comes
                        // before that look (seen here) or sees `parked` (and unparks).
                        state.parked.store(true, Ordering::SeqCst);
                        if state.deadline_ns.load(Ordering::SeqCst) == 0 && !state.done.load(Ordering::SeqCst) {
                            std::thread::park();
                        }
                        state.parked.store(false, Ordering::SeqCst);
                        idle = 0;
                    }
                    continue;
                }
                idle = 0;
                let now = state.epoch.elapsed().as_nanos() as u64;
                if now >= due
                    && state
                        .deadline_ns
                        .compare_exchange(due, 0, Ordering::SeqCst, Ordering::Relaxed)
                        .is_ok()
                {
                    crate::vmm::stop::request_policy_check();
                }
            }
        });
        // Without the thread, stretches end only at kernel entries (interrupts included).
        let thread = spawned.ok().map(|handle| handle.thread().clone());
        Watch { shared, thread }
    }

    pub fn arm(&self, after: Duration) {
        let due = (self.shared.epoch.elapsed() + after).as_nanos() as u64;
        self.shared.deadline_ns.store(due.max(1), Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) {
            self.unpark();
        }
    }

    pub fn disarm(&self) {
        self.shared.deadline_ns.store(0, Ordering::Relaxed);
    }

    fn unpark(&self) {
        if let Some(thread) = &self.thread {
            thread.unpark();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
        self.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_watch_wakes_when_armed_and_asks_for_the_check() {
        let watch = Watch::start();
        let give_up = Instant::now() + Duration::from_secs(5);
        while !watch.shared.parked.load(Ordering::SeqCst) && Instant::now() < give_up {
            std::thread::sleep(WATCH_POLL);
        }
        assert!(
            watch.shared.parked.load(Ordering::SeqCst),
            "nothing armed: the watch parks"
        );
        crate::vmm::stop::take_policy_check();
        watch.arm(Duration::from_micros(1));
        while !crate::vmm::stop::take_policy_check() {
            assert!(Instant::now() < give_up, "the armed watch asked for no policy check");
            std::thread::sleep(WATCH_POLL);
        }
        assert_eq!(watch.shared.deadline_ns.load(Ordering::SeqCst), 0, "a check disarms it");
    }

    #[test]
    fn one_cheap_outlier_does_not_set_the_round_trip_cost() {
        let mut p = Policy::new(Mode::Adaptive);
        p.stint_ended(1, Duration::from_micros(17), true);
        for us in (80..120).step_by(4) {
            p.stint_ended(2, Duration::from_micros(us), true);
        }
        for _ in 0..6 {
            p.stint_ended(3, Duration::from_micros(5000), true);
        }
        assert!((80.0..120.0).contains(&p.floor()), "floor {}", p.floor());
        // Kicks are not round trips.
        p.stint_ended(4, Duration::from_micros(1), false);
        assert!((80.0..120.0).contains(&p.floor()), "floor {}", p.floor());
    }

    /// Runs `n` stretches of `cr3`, each costing `kvm_us` under KVM or `translator_us` in the
    /// translator, as the policy chooses (a translated stretch past `long_stretch` is cut and
    /// finishes under KVM, as the watch makes it); returns how many went to KVM.
    fn run(p: &mut Policy, cr3: u64, n: u32, kvm_us: u64, translator_us: u64) -> u32 {
        let mut on_kvm = 0;
        for _ in 0..n {
            match p.choose(cr3, 0) {
                Choice::Kvm => {
                    on_kvm += 1;
                    p.stint_ended(cr3, Duration::from_micros(kvm_us), true);
                }
                Choice::Translator if Duration::from_micros(translator_us) > p.long_stretch(cr3) => {
                    p.translator_stretch_cut(cr3, p.long_stretch(cr3));
                    p.stint_ended(cr3, Duration::from_micros(kvm_us), true);
                }
                Choice::Translator => p.translator_stretch_ended(cr3, Duration::from_micros(translator_us)),
            }
        }
        on_kvm
    }

    #[test]
    fn each_address_space_runs_on_the_engine_that_measures_cheaper() {
        let mut p = Policy::new(Mode::Adaptive);
        // A compressor: 1.2 ms a stretch under KVM, 3.6 ms translated.
        let compressor = run(&mut p, 0x1000, 2000, 1200, 3600);
        // A reader of a pipe: 150 µs under KVM, 5 µs translated.
        let reader = run(&mut p, 0x2000, 2000, 150, 5);
        // A hash over small reads: 120 µs under KVM, 70 µs translated.
        let hasher = run(&mut p, 0x3000, 2000, 120, 70);
        assert!(compressor > 1950, "compressor under KVM {compressor} of 2000");
        // Shorter translated than one round trip: never probed under KVM.
        assert_eq!(reader, 0);
        assert!(hasher < 50, "hasher under KVM {hasher} of 2000");
        assert_eq!(Policy::new(Mode::AlwaysKvm).choose(0x1000, 0), Choice::Kvm);
    }

    #[test]
    fn long_translated_work_is_probed_under_kvm_even_when_its_stretches_look_short() {
        // A slow host: KVM's round trip measures 230 µs, so a compressor's 450 µs translated
        // stretches (370 µs under KVM) sit under HOPELESS round trips.
        let slow_host = || {
            let mut p = Policy::new(Mode::Adaptive);
            for _ in 0..CHEAPEST_KEPT {
                p.stint_ended(0x9000, Duration::from_micros(230), true);
            }
            p
        };
        let mut p = slow_host();
        let compressor = run(&mut p, 0x1000, 2000, 370, 450);
        assert!(compressor > 1500, "compressor under KVM {compressor} of 2000");
        // Where KVM keeps losing, the probes thin out: 2 s of translated stretches (KVM at 600
        // µs each) are probed at 0.1, 0.3, 0.7 and 1.5 s.
        let mut p = slow_host();
        let reader = run(&mut p, 0x2000, 20_000, 600, 100);
        assert!(reader <= 4 * PROBE, "reader under KVM {reader} of 20000");
        assert!(reader >= PROBE, "reader never probed");
    }

    #[test]
    fn a_phase_change_is_noticed_without_waiting_for_the_back_off() {
        let mut p = Policy::new(Mode::Adaptive);
        run(&mut p, 0x1000, 40, 100, 60);
        // A long loop: the watch moves it to KVM, where it stays while it computes.
        assert_eq!(p.choose(0x1000, 0), Choice::Translator);
        p.translator_stretch_cut(0x1000, p.long_stretch(0x1000));
        // (Probes of the translator are cut short: a few stretches of 600.)
        let compute = run(&mut p, 0x1000, 600, 50_000, 400_000);
        assert!(compute > 590, "{compute} of 600 under KVM");
        // Then it forks and waits: short stretches, cheaper translated — back within a few.
        let mut kvm = 0;
        for i in 0..40 {
            if run(&mut p, 0x1000, 1, 150, 40) == 1 {
                kvm = i + 1;
            }
        }
        assert!(kvm < 20, "still under KVM after {kvm} short stretches");
    }

    #[test]
    fn a_shells_short_processes_stay_translated_despite_their_long_first_stretches() {
        // A shell's `true`: an exec's long first stretch, then short ones between system
        // calls (their average swings 10× each process); under KVM every stretch costs more
        // (fresh page tables, round trips). Only the periodic probes (with their back-off) measure
        // KVM.
        let mut p = Policy::new(Mode::Adaptive);
        run(&mut p, 0x1000, 16, 150, 20);
        let mut kvm = 0;
        for _ in 0..100 {
            kvm += run(&mut p, 0x1000, 1, 1800, 900);
            kvm += run(&mut p, 0x1000, 20, 150, 20);
        }
        assert!(kvm < 40, "{kvm} of 2,100 stretches under KVM");
        assert!(p.probes < 10, "{} probes", p.probes);
    }

    #[test]
    fn a_long_kvm_stretch_is_not_probed_in_the_translator_while_it_runs() {
        let mut p = cut_at_start();
        p.stint_ended(0x1000, Duration::from_micros(800), true);
        // A loop without system calls: its stints end only at timer interrupts.
        for _ in 0..2000 {
            assert_eq!(p.choose(0x1000, 0), Choice::Kvm);
            p.stint_ended(0x1000, Duration::from_micros(3900), false);
        }
        assert_eq!(p.probes, 0);
        // Once it enters the kernel the probe that was due comes at once.
        p.stint_ended(0x1000, Duration::from_micros(600), true);
        assert_eq!(p.choose(0x1000, 0), Choice::Translator);
        assert_eq!(p.probes, 1);
    }

    #[test]
    fn a_new_process_on_an_old_cr3_starts_afresh() {
        let mut p = Policy::new(Mode::Adaptive);
        assert_eq!(p.choose(0x1000, 7), Choice::Translator);
        p.translator_stretch_cut(0x1000, Duration::from_millis(2));
        assert_eq!(p.choose(0x1000, 7), Choice::Kvm);
        // Another process got the same root page: the translator again, the counts kept.
        assert_eq!(p.choose(0x1000, 8), Choice::Translator);
        assert_eq!(p.renewed, 1);
        assert_eq!(p.spaces[&0x1000].stretches[1], 1);
        // A translator verdict carries over (with its back-off): nothing renewed.
        assert_eq!(p.choose(0x1000, 9), Choice::Translator);
        assert_eq!(p.renewed, 1);
    }

    /// A new address space (CR3 0x1000) whose first translated stretch, [`LONG`] round trips
    /// long (none measured yet), was cut to KVM.
    fn cut_at_start() -> Policy {
        let mut p = Policy::new(Mode::Adaptive);
        assert_eq!(p.choose(0x1000, 0), Choice::Translator);
        assert_eq!(
            p.long_stretch(0x1000),
            Duration::from_secs_f64(LONG * DEFAULT_FLOOR_US * 1e-6)
        );
        p.translator_stretch_cut(0x1000, p.long_stretch(0x1000));
        assert_eq!(p.choose(0x1000, 0), Choice::Kvm);
        p
    }

    #[test]
    fn a_new_address_space_starts_in_the_translator_and_a_long_stretch_moves_it() {
        let mut p = cut_at_start();
        // Once measured under KVM, the cut comes at twice its stretch.
        p.stint_ended(0x1000, Duration::from_micros(30_000), false);
        p.stint_ended(0x1000, Duration::from_micros(800), true);
        assert_eq!(p.choose(0x1000, 0), Choice::Kvm);
        assert_eq!(p.long_stretch(0x1000), Duration::from_micros(1600));
    }

    #[test]
    fn a_cut_that_did_not_pay_sends_the_space_back() {
        let mut p = cut_at_start();
        // The rest ended within 300 µs and the process goes on with system calls (an exec's
        // startup, not computation): KVM round trips, cheaper translated.
        p.stint_ended(0x1000, Duration::from_micros(300), true);
        let kvm = run(&mut p, 0x1000, 20, 150, 20);
        assert!(kvm < 4, "{kvm} of 20 short stretches under KVM");
        assert_eq!(p.choose(0x1000, 0), Choice::Translator);
    }
}

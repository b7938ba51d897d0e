//! Which engine runs a stretch of guest user code (DESIGN §5). KVM runs it at native speed, but
//! every kernel entry from it costs a round trip through hbt's stubs and a state transfer
//! (≈ 60–120 µs for a system call or a page fault on an Intel SPR host under kvm_pvm); the
//! translator runs user code slower (≈ 1.1–3× native, `benches/exec-vs-peers.sh`) but enters
//! the guest kernel for the price of a jump.
//!
//! So a stretch that runs u µs natively costs u + T under KVM and ≈ s·u in the translator:
//! KVM pays when u > T / (s − 1). The adaptive policy keeps, per address space (guest CR3),
//! a moving average of how long its stretches ran under KVM, and compares it with the cost
//! of a round trip (≈ T: the median of the cheapest stretches seen anywhere, user entries that
//! did almost nothing): an
//! address space whose stretches are a few round trips long or less goes to the translator for
//! a while, and is probed under KVM again after a back-off that doubles while the verdict
//! holds. While an address space is left to the translator, its user stretches there are timed
//! too (to their next kernel entry): one that ran many round trips' worth (user code that
//! computed) sends it back to KVM at once, and a [`Watch`] thread stops a stretch that is still
//! running by then and moves it to KVM where it stands.
//!
//! A new address space starts in the translator (for `MAX_BACKOFF` user entries, or until a
//! stretch computes): most processes of a shell live a few system calls and page faults long,
//! and under KVM each of those is a round trip. Measured on an Intel SPR host, 300 fork+exec
//! of busybox `true`: 3.96 s starting under KVM, 1.5–2.0 s starting in the translator (bt
//! alone: 1.5 s). (It measured the other way round while the translated kernel undid every
//! chain at each INVLPG near user code; `translator/src/engine/cache.rs`.)
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

/// `--hybrid-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Per address space, by how long its stretches run between kernel entries.
    Adaptive,
    /// Every stretch of user code under KVM.
    AlwaysKvm,
}

/// A stretch averaging less than this many times the cheapest stretch goes to the translator.
const SHORT: f64 = 4.0;
/// A stretch in the translator (user entry to user entry) longer than this many times the
/// cheapest KVM stretch was user computation: back to KVM.
const LONG: f64 = 20.0;
/// The cheapest KVM stretch assumed until one is measured (µs; Intel SPR host: 60–140).
const DEFAULT_FLOOR_US: f64 = 100.0;
/// How many of the cheapest KVM stretches the round-trip estimate is the median of.
const CHEAPEST_KEPT: usize = 16;
/// The first back-off (user entries left to the translator), and the longest.
const FIRST_BACKOFF: u32 = 8;
const MAX_BACKOFF: u32 = 512;

struct Space {
    /// Moving average of its stretches under KVM, µs.
    average_us: f64,
    stretches: u64,
    /// User entries still left to the translator, and the back-off that set it.
    translator_left: u32,
    backoff: u32,
}

impl Space {
    /// A new address space: its first user entries in the translator (see the file comment).
    fn new() -> Space {
        Space {
            average_us: 0.0,
            stretches: 0,
            translator_left: MAX_BACKOFF,
            backoff: MAX_BACKOFF,
        }
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
    /// Times an address space was sent to the translator for a while, and brought back early.
    demotions: u64,
    promotions: u64,
}

impl Policy {
    pub fn new(mode: Mode) -> Self {
        Policy {
            mode,
            spaces: HashMap::new(),
            cheapest_us: Vec::with_capacity(CHEAPEST_KEPT + 1),
            to_kvm: 0,
            to_translator: 0,
            demotions: 0,
            promotions: 0,
        }
    }

    /// Where the user code of address space `cr3` that is about to run goes.
    pub fn choose(&mut self, cr3: u64) -> Choice {
        let space = self.spaces.entry(cr3).or_insert_with(Space::new);
        if self.mode == Mode::Adaptive && space.translator_left > 0 {
            space.translator_left -= 1;
            self.to_translator += 1;
            Choice::Translator
        } else {
            self.to_kvm += 1;
            Choice::Kvm
        }
    }

    /// A stretch of `cr3`'s user code took `took` under KVM per round trip out of it (from the
    /// state going in to the state coming out, divided by the exits it took: a page fault hbt
    /// resolved is a round trip too, and a freshly exec'd program under KVM makes dozens);
    /// `entered_kernel`: it ended with a kernel entry (not a kick), so its length is the user
    /// code's own plus one round trip.
    pub fn stint_ended(&mut self, cr3: u64, took: Duration, entered_kernel: bool) {
        if !entered_kernel {
            return;
        }
        let us = took.as_secs_f64() * 1e6;
        if self.cheapest_us.len() < CHEAPEST_KEPT || us < self.cheapest_us[CHEAPEST_KEPT - 1] {
            let at = self.cheapest_us.partition_point(|&c| c <= us);
            self.cheapest_us.insert(at, us);
            self.cheapest_us.truncate(CHEAPEST_KEPT);
        }
        if self.mode != Mode::Adaptive {
            return;
        }
        let floor = self.floor();
        let space = self.spaces.entry(cr3).or_insert_with(Space::new);
        space.average_us = if space.stretches == 0 {
            us
        } else {
            0.5 * space.average_us + 0.5 * us
        };
        space.stretches += 1;
        if space.average_us < SHORT * floor {
            space.backoff = (space.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
            space.translator_left = space.backoff;
            self.demotions += 1;
        } else {
            space.backoff = 0;
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

    /// How long a translated user stretch may run before it belongs under KVM.
    pub fn long_stretch(&self) -> Duration {
        Duration::from_secs_f64(LONG * self.floor() * 1e-6)
    }

    /// A stretch of `cr3`'s user code ran `took` in the translator (to its next kernel entry,
    /// or to the watch's check).
    pub fn translator_stretch_ended(&mut self, cr3: u64, took: Duration) {
        if took.as_secs_f64() * 1e6 > LONG * self.floor() {
            let space = self.spaces.entry(cr3).or_insert_with(Space::new);
            space.translator_left = 0;
            space.backoff = 0;
            self.promotions += 1;
        }
    }

    /// One line for `--stats`. (A CR3 whose process exited may come back for another process;
    /// its record then starts from the old one's verdict, which its next stretch corrects.)
    pub fn describe(&self) -> String {
        let name = match self.mode {
            Mode::Adaptive => "adaptive",
            Mode::AlwaysKvm => "always-kvm",
        };
        format!(
            "{name}; {} user stretches to KVM, {} to the translator; {} address spaces, {} times one was left to the translator, {} times brought back early; cheapest stretch under KVM {:.1} µs (assumed 100 until 16 are measured; the median of the 16 cheapest)",
            self.to_kvm,
            self.to_translator,
            self.spaces.len(),
            self.demotions,
            self.promotions,
            self.floor(),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": format!("{:?}", self.mode),
            "to_kvm": self.to_kvm,
            "to_translator": self.to_translator,
            "address_spaces": self.spaces.len(),
            "demotions": self.demotions,
            "promotions": self.promotions,
            "cheapest_stretch_us": self.floor(),
        })
    }
}

/// A thread that asks for a policy check (`stop::request_policy_check`) when a translated user
/// stretch has run for the time it was armed with, unless disarmed first. Arming and disarming
/// are one atomic store each (they happen at every user entry and kernel entry the translator
/// runs: a mutex and a wake-up there cost ≈10 µs per system call); the thread looks every
/// millisecond.
pub struct Watch {
    shared: Arc<WatchState>,
}

struct WatchState {
    epoch: Instant,
    /// Nanoseconds after `epoch` the stretch is due; 0: disarmed.
    deadline_ns: AtomicU64,
    done: AtomicBool,
}

const WATCH_POLL: Duration = Duration::from_millis(1);

impl Watch {
    pub fn start() -> Watch {
        let shared = Arc::new(WatchState {
            epoch: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            done: AtomicBool::new(false),
        });
        let state = Arc::clone(&shared);
        let spawned = std::thread::Builder::new().name("hbt-policy".into()).spawn(move || {
            while !state.done.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH_POLL);
                let due = state.deadline_ns.load(Ordering::Relaxed);
                let now = state.epoch.elapsed().as_nanos() as u64;
                if due != 0
                    && now >= due
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
        drop(spawned);
        Watch { shared }
    }

    pub fn arm(&self, after: Duration) {
        let due = (self.shared.epoch.elapsed() + after).as_nanos() as u64;
        self.shared.deadline_ns.store(due.max(1), Ordering::Relaxed);
    }

    pub fn disarm(&self) {
        self.shared.deadline_ns.store(0, Ordering::Relaxed);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_new_address_space_starts_in_the_translator_until_a_stretch_computes() {
        let mut p = Policy::new(Mode::Adaptive);
        assert_eq!(p.choose(0x1000), Choice::Translator);
        p.translator_stretch_ended(0x1000, Duration::from_micros(100));
        assert_eq!(p.choose(0x1000), Choice::Translator);
        p.translator_stretch_ended(0x1000, Duration::from_millis(50));
        assert_eq!(p.choose(0x1000), Choice::Kvm);
        // Short stretches under KVM send it back to the translator for a while.
        for _ in 0..20 {
            p.stint_ended(0x1000, Duration::from_micros(100), true);
        }
        assert_eq!(p.choose(0x1000), Choice::Translator);
        assert_eq!(Policy::new(Mode::AlwaysKvm).choose(0x1000), Choice::Kvm);
    }
}

//! CI's differential test: every Code in the supported set, at least 200 cases under each memory
//! strategy, against the host CPU. Forms this host cannot execute (their CPUID features are
//! missing, e.g. SSE4A on Intel) are listed with the missing features; a supported form left
//! untested for any other reason fails the test.

use hbt_translator::cpu::HostCpu;
use hbt_translator::harness::{ci_summary, feature_names, run_codes, Options, Status};
use hbt_translator::host::features::host_has;
use hbt_translator::supported_codes;

#[test]
fn every_supported_code_passes_the_differential_test() {
    let seed = std::env::var("HBT_ISA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    differential_test(seed);
}

/// A second fixed seed: other operand values and states than seed 1's. Seed 9 found a false
/// #AC that seed 1 never hit (soft-MMU bulk `rep movsb`/`rep stosb` chunks alignment-checked
/// as one access, with RFLAGS.AC set).
#[test]
fn every_supported_code_passes_the_differential_test_with_a_second_seed() {
    differential_test(9);
}

fn differential_test(seed: u64) {
    let opts = Options { cases: 200, seed };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let results = run_codes(supported_codes(), &opts, threads, &|_| {}).expect("harness workers start");
    let mut problems = Vec::new();
    let mut not_executable = Vec::new();
    for r in &results {
        match &r.status {
            Status::Passed if r.cases >= 200 => {}
            Status::Passed => problems.push(format!("{:?}: only {} cases", r.code, r.cases)),
            Status::Failed => problems.push(format!("{:?} FAILED: {}", r.code, r.failure.as_deref().unwrap_or(""))),
            Status::NotExecutable(missing) if !missing.is_empty() && missing.iter().all(|&f| !host_has(f)) => {
                not_executable.push(format!("{:?} (needs {})", r.code, feature_names(missing)))
            }
            Status::NotExecutable(missing) => problems.push(format!(
                "{:?} reported not executable, but the host has {}",
                r.code,
                feature_names(missing)
            )),
            Status::Skipped(why) | Status::NoReference(why) => {
                problems.push(format!("{:?} is listed as supported but was not tested: {why}", r.code))
            }
        }
    }
    let cases: u64 = results.iter().map(|r| r.cases).sum();
    let verified = results.iter().filter(|r| r.status == Status::Passed).count();
    let summary = format!(
        "host: {}\n{} supported forms: {verified} verified here ({cases} cases per strategy, seed {seed}), \
         {} not executable on this host{}, {} problem(s)\n",
        HostCpu::get().describe(),
        results.len(),
        not_executable.len(),
        if not_executable.is_empty() {
            String::new()
        } else {
            format!(": {}", not_executable.join(", "))
        },
        problems.len()
    );
    ci_summary(summary.trim_end());
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

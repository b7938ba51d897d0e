//! CI's differential test: every Code in the supported set, at least 200 cases under each memory
//! strategy, against the host CPU. A supported Code the host cannot test fails loudly.

use hbt_translator::harness::{run_codes, Options, Status};
use hbt_translator::supported_codes;

#[test]
fn every_supported_code_passes_the_differential_test() {
    let seed = std::env::var("HBT_ISA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let opts = Options { cases: 200, seed };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let results = run_codes(supported_codes(), &opts, threads, &|_| {}).expect("harness workers start");
    let mut problems = Vec::new();
    for r in &results {
        match &r.status {
            Status::Passed if r.cases >= 200 => {}
            Status::Passed => problems.push(format!("{:?}: only {} cases", r.code, r.cases)),
            Status::Failed => problems.push(format!("{:?} FAILED: {}", r.code, r.failure.as_deref().unwrap_or(""))),
            Status::Skipped(why) => {
                problems.push(format!("{:?} is listed as supported but was not tested: {why}", r.code))
            }
        }
    }
    let cases: u64 = results.iter().map(|r| r.cases).sum();
    eprintln!(
        "{} supported forms, {} cases per strategy, seed {seed}",
        results.len(),
        cases
    );
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

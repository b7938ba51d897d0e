//! CI's system-mode differential test: `hbt isa-test --system --cases 32` over the whole
//! supported set (32 cases per form, where the user-mode harness runs 200 per strategy). Each
//! case runs at CPL3 inside a small guest machine on KVM (the reference) and through the
//! translator in system mode, and the outcomes are compared (README, `--system`).
//!
//! It fails on any difference in a form not listed in [`KNOWN`], and on any supported form left
//! untested for a reason other than a missing host CPU feature or a documented inability of
//! KVM to serve as the reference (`src/vmm/isa_system.rs`, `unfit`). A form listed in [`KNOWN`]
//! that passes is reported, so the list shrinks as those are fixed.

use std::process::Command;

/// Differences found by this test and not fixed yet, each with what was seen. Empty: every
/// difference found so far was a translator bug (fixed) or a documented way in which KVM on
/// this host (kvm_pvm) is no CPU, which the harness masks field by field (`Quirks` in
/// `translator/src/harness/system/mod.rs`, README `--system`).
const KNOWN: &[(&str, &str)] = &[];

/// Cases per form (the user-mode harness runs 200 per memory strategy).
const CASES: u32 = 32;

#[test]
fn supported_forms_match_kvm_in_a_guest_machine() {
    if !std::path::Path::new("/dev/kvm").exists() {
        panic!("/dev/kvm is missing: the system-mode harness needs KVM as its reference");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hbt"))
        .args([
            "isa-test",
            "--system",
            "--format",
            "json",
            "--cases",
            &CASES.to_string(),
        ])
        .output()
        .expect("hbt runs");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hbt isa-test --system printed no JSON ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut problems = Vec::new();
    let mut known_failed = Vec::new();
    let mut known_passed = Vec::new();
    let mut no_reference = Vec::new();
    let mut not_executable = Vec::new();
    let mut passed = 0;
    let mut cases = 0;
    for c in doc["codes"].as_array().expect("codes") {
        let code = c["code"].as_str().unwrap_or("?");
        let known = KNOWN.iter().find(|(k, _)| *k == code);
        cases += c["cases"].as_u64().unwrap_or(0);
        match (c["status"].as_str().unwrap_or("?"), known) {
            ("passed", None) => passed += 1,
            ("passed", Some(_)) => known_passed.push(code.to_string()),
            ("failed", Some((_, why))) => known_failed.push(format!("{code} ({why})")),
            ("failed", None) => problems.push(format!("{code} FAILED: {}", c["first_failure"].as_str().unwrap_or(""))),
            ("not-executable", _) => not_executable.push(format!("{code} ({})", c["reason"].as_str().unwrap_or(""))),
            ("no-reference", _) => no_reference.push(format!("{code} ({})", c["reason"].as_str().unwrap_or(""))),
            (other, _) => problems.push(format!(
                "{code} is supported but was not tested ({other}: {})",
                c["reason"].as_str().unwrap_or("")
            )),
        }
    }
    let summary = format!(
        "isa-test --system ({CASES} cases per form, seed 1): {passed} forms passed ({cases} cases compared under KVM and the translator), \
         {} known differences still failing, {} known differences now passing{}, {} forms KVM cannot serve as reference for, \
         {} not executable on this host, {} problem(s)",
        known_failed.len(),
        known_passed.len(),
        if known_passed.is_empty() {
            String::new()
        } else {
            format!(" ({}: remove them from tests/isa_system.rs KNOWN)", known_passed.join(", "))
        },
        no_reference.len(),
        not_executable.len(),
        problems.len()
    );
    eprintln!("{summary}");
    eprintln!("without a reference: {}", no_reference.join("; "));
    eprintln!("known differences: {}", known_failed.join("; "));
    if let Some(path) = std::env::var_os("HBT_CI_SUMMARY") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{summary}");
        }
    }
    assert!(passed > 1500, "only {passed} forms passed: {summary}");
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

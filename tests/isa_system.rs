//! CI's system-mode differential test: `hbt isa-test --system --cases 32` over the whole
//! supported set (32 cases per form, where the user-mode harness runs 200 per strategy). Each
//! case runs at CPL3 inside a small guest machine on KVM (the reference) and through the
//! translator in system mode, and the outcomes are compared (README, `--system`). The second
//! test runs the privileged and system forms at CPL0 (`--system --cpl0`, 200 cases per form),
//! the third 32-bit code at CPL3 (`--system --compat`, compatibility mode, where kvm_pvm's
//! reference is KVM's instruction emulator).
//!
//! It fails on any difference in a form not listed in [`KNOWN`], and on any supported form left
//! untested for a reason other than a missing host CPU feature or a documented inability of
//! KVM to serve as the reference (`src/vmm/isa_system.rs`, `unfit`). A form listed in [`KNOWN`]
//! that passes is reported, so the list shrinks as those are fixed.

use std::process::Command;

/// `hbt isa-test --format json --cases CASES` with `flags`, parsed (KVM is the reference: the
/// test fails without /dev/kvm).
fn isa_test_json(flags: &[&str], cases: u32) -> serde_json::Value {
    if !std::path::Path::new("/dev/kvm").exists() {
        panic!("/dev/kvm is missing: the system-mode harness needs KVM as its reference");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hbt"))
        .arg("isa-test")
        .args(flags)
        .args(["--format", "json", "--cases", &cases.to_string()])
        .output()
        .expect("hbt runs");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hbt isa-test {} printed no JSON ({e}); stderr:\n{}",
            flags.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Appends a test's summary line to the file CI collects (`HBT_CI_SUMMARY`), if set.
fn ci_summary(summary: &str) {
    if let Some(path) = std::env::var_os("HBT_CI_SUMMARY") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{summary}");
        }
    }
}

/// Differences found by this test and not fixed yet, each with what was seen. Empty: every
/// difference found so far was a translator bug (fixed) or a documented way in which KVM on
/// this host (kvm_pvm) is no CPU, which the harness masks field by field (`Quirks` in
/// `translator/src/harness/system/mod.rs`, README `--system`).
const KNOWN: &[(&str, &str)] = &[];

/// Cases per form (the user-mode harness runs 200 per memory strategy).
const CASES: u32 = 32;

/// CPL0 differences found by the second test and not fixed yet, each with what was seen (the
/// parallel of [`KNOWN`]).
const KNOWN_CPL0: &[(&str, &str)] = &[];

/// CPL0 forms KVM cannot serve as reference for on this host (kvm_pvm: its instruction emulator
/// fails, or does what the CPU does not; `src/vmm/isa_system.rs`), each with where it is checked
/// instead. A form KVM cannot serve that is missing here fails the test: add the check first.
const CPL0_CHECKED_ELSEWHERE: &[(&str, &str)] = &[
    (
        "Int3",
        "engine.rs int3_int1_and_int_n_at_cpl0_*; test-images/cpl0-int3.img under --accel bt",
    ),
    ("Int1", "engine.rs int3_int1_and_int_n_at_cpl0_*"),
    ("Int_imm8", "engine.rs int3_int1_and_int_n_at_cpl0_*"),
    ("Iretd", "engine.rs iretd_at_cpl0_pops_a_frame_of_32_bit_slots"),
    (
        "Iretw",
        "system/transfer.rs (shares iretd's path with 2-byte slots; Linux never uses it)",
    ),
    ("Verr_rm16", "engine.rs lar_lsl_verr_verw_at_cpl0_read_the_guest_gdt"),
    ("Verr_r32m16", "as Verr_rm16"),
    ("Verr_r64m16", "as Verr_rm16"),
    ("Verw_rm16", "as Verr_rm16"),
    ("Verw_r32m16", "as Verr_rm16"),
    ("Verw_r64m16", "as Verr_rm16"),
    ("Lar_r16_rm16", "as Verr_rm16"),
    ("Lar_r32_r32m16", "as Verr_rm16"),
    ("Lar_r64_r64m16", "as Verr_rm16"),
    ("Lsl_r16_rm16", "as Verr_rm16"),
    ("Lsl_r32_r32m16", "as Verr_rm16"),
    ("Lsl_r64_r64m16", "as Verr_rm16"),
    ("Xgetbv", "engine.rs xgetbv_and_xsetbv_at_cpl0_need_cr4_osxsave"),
    (
        "Xbegin_rel16",
        "emulate/rtm.rs transactions_abort_at_once_and_a_model_without_rtm_raises_ud; the user-mode harness",
    ),
    ("Xbegin_rel32", "as Xbegin_rel16"),
    ("Xend", "as Xbegin_rel16"),
    ("Xabort_imm8", "as Xbegin_rel16"),
    ("Xtest", "as Xbegin_rel16"),
    (
        "Rdtscp",
        "engine.rs rdpid_and_rdtscp_at_cpl0_read_the_tsc_aux_wrmsr_wrote",
    ),
    ("Rdpid_r64", "as Rdtscp"),
    (
        "Ud0_r16_rm16",
        "engine.rs ud0_ud1_xsaves_and_xrstors_raise_ud_at_cpl0",
    ),
    ("Ud0_r32_rm32", "as Ud0_r16_rm16"),
    ("Ud0_r64_rm64", "as Ud0_r16_rm16"),
    ("Ud1_r16_rm16", "as Ud0_r16_rm16"),
    ("Ud1_r32_rm32", "as Ud0_r16_rm16"),
    ("Ud1_r64_rm64", "as Ud0_r16_rm16"),
    ("Xsaves_mem", "as Ud0_r16_rm16 (the model has no XSAVES)"),
    ("Xsaves64_mem", "as Xsaves_mem"),
    ("Xrstors_mem", "as Xsaves_mem"),
    ("Xrstors64_mem", "as Xsaves_mem"),
    (
        "Sysretd",
        "engine.rs sysretl_enters_32_bit_code_which_decodes_as_ia32; test-images/compat-mode.img",
    ),
    (
        "Cpuid",
        "src/vmm/cpuid.rs unit tests (the model the translator's CPUID answers from)",
    ),
    // On AMD hosts only: KVM's emulator reads m16:64 where the CPU reads m16:32.
    (
        "Lss_r64_m1664",
        "engine.rs rex_w_far_pointers_at_cpl0_follow_the_host_vendor",
    ),
    ("Lfs_r64_m1664", "as Lss_r64_m1664"),
    ("Lgs_r64_m1664", "as Lss_r64_m1664"),
    (
        "Jmp_m1664",
        "the offset-size rule of Lss_r64_m1664 (system/mod.rs far_offset_size); the user-mode harness compares it with the CPU",
    ),
    ("Call_m1664", "as Jmp_m1664"),
];

/// Cases per form at CPL0: each is a few emulated instructions under KVM, so this is cheap
/// (≈3 s for the ≈130 forms in a debug build).
const CPL0_CASES: u32 = 200;

#[test]
fn privileged_forms_match_kvm_at_cpl0() {
    let doc = isa_test_json(&["--system", "--cpl0"], CPL0_CASES);
    let (mut passed, mut cases, mut uncompared) = (0, 0, 0);
    let (mut problems, mut known_failed, mut known_passed, mut elsewhere) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in doc["codes"].as_array().expect("codes") {
        let code = c["code"].as_str().unwrap_or("?");
        let reason = c["reason"].as_str().unwrap_or("");
        cases += c["cases"].as_u64().unwrap_or(0);
        uncompared += c["uncompared"].as_u64().unwrap_or(0);
        let known = KNOWN_CPL0.iter().find(|(k, _)| *k == code);
        match (c["status"].as_str().unwrap_or("?"), known) {
            ("passed", None) => passed += 1,
            ("passed", Some(_)) => known_passed.push(code.to_string()),
            ("failed", Some((_, why))) => known_failed.push(format!("{code} ({why})")),
            ("failed", None) => problems.push(format!("{code} FAILED: {}", c["first_failure"].as_str().unwrap_or(""))),
            // A form this host cannot run (RTM without TSX) counts as checked where it is
            // checked without KVM.
            ("no-reference" | "not-executable", _) => match CPL0_CHECKED_ELSEWHERE.iter().find(|(k, _)| *k == code) {
                Some((_, by)) => elsewhere.push(format!("{code} ({reason}; checked by {by})")),
                None => problems.push(format!(
                    "{code}: KVM cannot serve as reference at CPL0 ({reason}) and nothing else checks it (tests/isa_system.rs CPL0_CHECKED_ELSEWHERE)"
                )),
            },
            (other, _) => problems.push(format!("{code} is supported but was not tested at CPL0 ({other}: {reason})")),
        }
    }
    let summary = format!(
        "isa-test --system --cpl0 ({CPL0_CASES} cases per form, seed 1): {passed} forms passed ({cases} cases compared under KVM and the translator, {uncompared} not compared), \
         {} known differences still failing, {} known differences now passing{}, {} forms KVM cannot serve as reference for (checked elsewhere), {} problem(s)",
        known_failed.len(),
        known_passed.len(),
        if known_passed.is_empty() {
            String::new()
        } else {
            format!(" ({}: remove them from tests/isa_system.rs KNOWN_CPL0)", known_passed.join(", "))
        },
        elsewhere.len(),
        problems.len()
    );
    eprintln!("{summary}");
    eprintln!("KVM cannot serve as reference: {}", elsewhere.join("; "));
    ci_summary(&summary);
    assert!(passed >= 90, "only {passed} forms passed: {summary}");
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn supported_forms_match_kvm_in_a_guest_machine() {
    let doc = isa_test_json(&["--system"], CASES);
    let mut problems = Vec::new();
    let mut known_failed = Vec::new();
    let mut known_passed = Vec::new();
    let mut no_reference = Vec::new();
    let mut not_executable = Vec::new();
    let mut passed = 0;
    let mut cases = 0;
    let mut reruns = 0;
    for c in doc["codes"].as_array().expect("codes") {
        let code = c["code"].as_str().unwrap_or("?");
        let known = KNOWN.iter().find(|(k, _)| *k == code);
        cases += c["cases"].as_u64().unwrap_or(0);
        reruns += c["passed_on_rerun"].as_u64().unwrap_or(0);
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
        "isa-test --system ({CASES} cases per form, seed 1): {passed} forms passed ({cases} cases compared under KVM and the translator, {reruns} of them agreeing only when run again), \
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
    ci_summary(&summary);
    assert!(passed > 1500, "only {passed} forms passed: {summary}");
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Cases per form in 32-bit code (each a few emulated instructions under kvm_pvm).
const COMPAT_CASES: u32 = 16;

#[test]
fn thirty_two_bit_forms_match_kvm_in_compatibility_mode() {
    let doc = isa_test_json(&["--system", "--compat"], COMPAT_CASES);
    assert_eq!(doc["bitness"], 32, "{doc}");
    let (mut passed, mut cases) = (0, 0);
    let mut problems = Vec::new();
    let mut compat_only = 0;
    for c in doc["codes"].as_array().expect("codes") {
        let code = c["code"].as_str().unwrap_or("?");
        cases += c["cases"].as_u64().unwrap_or(0);
        match c["status"].as_str().unwrap_or("?") {
            "passed" => {
                passed += 1;
                // The forms only 32-bit code has (4-byte push/pop/call/ret, inc/dec r32,
                // 32-bit jcc/loop/jecxz): the ones the translator handles apart.
                compat_only += usize::from(
                    code.ends_with("32")
                        && (code.starts_with("Push")
                            || code.starts_with("Pop")
                            || code.starts_with("Call")
                            || code.starts_with("Jmp_rel")
                            || code.starts_with("Inc_r32")
                            || code.starts_with("Dec_r32")
                            || code.starts_with("Loop")
                            || code.starts_with("Jecxz")
                            || code.starts_with("Retnd")
                            || code.starts_with("Leaved")),
                );
            }
            "failed" => problems.push(format!("{code} FAILED: {}", c["first_failure"].as_str().unwrap_or(""))),
            _ => {}
        }
    }
    let summary = format!(
        "isa-test --system --compat ({COMPAT_CASES} cases per form, seed 1): {passed} forms passed ({compat_only} of them forms only 32-bit code has), {cases} cases compared under KVM's emulator and the translator, {} failed",
        problems.len()
    );
    eprintln!("{summary}");
    ci_summary(&summary);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        passed > 500 && compat_only >= 10,
        "only {passed} forms passed: {summary}"
    );
}

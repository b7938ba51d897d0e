//! The `hbt coverage` command as a user runs it: output formats, sharding, bad input.

#[path = "../coverage/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

fn hbt(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hbt"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .expect("run hbt")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "hbt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn json_report_has_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    let pop = common::popcon(dir.path(), 1000, &[("app", 500), ("libfoo1", 250), ("avxtool", 250)]);
    let out = hbt(
        &[
            "coverage",
            "--root",
            root.to_str().unwrap(),
            "--popcon",
            pop.to_str().unwrap(),
            "--format",
            "json",
            "--granularity",
            "code",
            "--supported",
            "all",
        ],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    for key in [
        "binaries",
        "packages",
        "bytes_decoded",
        "invalid_bytes",
        "cpu_model",
        "instructions",
        "supported",
        "plan",
        "timing",
    ] {
        assert!(v.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(v["binaries"], 3);
    assert_eq!(v["supported"]["weighted_completeness"], 1.0);
    let first = &v["instructions"][0];
    for key in ["mnemonic", "code", "importance", "package_share", "occurrences"] {
        assert!(first.get(key).is_some(), "instruction rows lack {key}");
    }
    assert!(v["plan"][0].get("instruction").is_some() && v["plan"][0].get("weighted_completeness").is_some());
    assert!(v["timing"]["seconds"].as_f64().unwrap() > 0.0);
    // The truncated ELF is a warning on stderr naming the file, not a failure.
    assert!(String::from_utf8_lossy(&out.stderr).contains("/usr/bin/broken"));
}

#[test]
fn compare_lists_the_important_instructions_a_census_never_ran() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    let pop = common::popcon(dir.path(), 1000, &[("app", 500), ("libfoo1", 250), ("avxtool", 250)]);
    let report = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "coverage",
            "--root",
            root.to_str().unwrap(),
            "--popcon",
            pop.to_str().unwrap(),
        ];
        args.extend_from_slice(&["--format", "json", "--granularity", "code"]);
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&hbt(&args, dir.path()))).unwrap()
    };
    let all = report(&[]);
    let rows = all["instructions"].as_array().unwrap();
    let first = rows[0]["code"].as_str().unwrap().to_string();
    // A census (as `hbt exec --census` writes it) that ran only the most important form.
    let census = dir.path().join("run.census");
    std::fs::write(&census, format!("# hbt census of a test\n{first}  # 7\n")).unwrap();
    let v = report(&["--compare", census.to_str().unwrap(), "--compare-top", "5"]);
    let c = &v["comparison"];
    assert_eq!(c["top"], 5);
    let missing: Vec<&str> = c["never_executed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["instruction"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = rows
        .iter()
        .take(5)
        .skip(1)
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(missing, expected);
    assert_eq!(c["never_executed"][0]["rank"], 2);
    assert_eq!(v["supported"]["set"], census.to_str().unwrap());
    // The table says it too; a file that is not an instruction list is one clear error.
    let table = ok(&hbt(
        &[
            "coverage",
            "--root",
            root.to_str().unwrap(),
            "--popcon",
            pop.to_str().unwrap(),
            "--compare",
            census.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(table.contains("never executed"), "{table}");
    std::fs::write(&census, "not_an_instruction\n").unwrap();
    let out = hbt(
        &[
            "coverage",
            "--root",
            root.to_str().unwrap(),
            "--compare",
            census.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--compare"), "{out:?}");
}

#[test]
fn table_csv_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    let r = root.to_str().unwrap();
    let table = ok(&hbt(&["coverage", "--root", r, "-q"], dir.path()));
    assert!(
        table.contains("weighted completeness") && table.contains("Implement next"),
        "{table}"
    );
    let csv = ok(&hbt(&["coverage", "--root", r, "-q", "--format", "csv"], dir.path()));
    assert!(csv.starts_with("rank,mnemonic,code,extension,importance"));
    assert!(csv.lines().count() > 5);
    let html_path = dir.path().join("report.html");
    ok(&hbt(
        &["coverage", "--root", r, "-q", "-o", html_path.to_str().unwrap()],
        dir.path(),
    ));
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.contains("<svg") && html.contains("</html>") && !html.contains("<script"));
}

#[test]
fn shard_and_merge_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    let r = root.to_str().unwrap();
    let mut parts = Vec::new();
    for k in 1..=2 {
        let part = dir.path().join(format!("part{k}.json"));
        ok(&hbt(
            &[
                "coverage",
                "--root",
                r,
                "-q",
                "--shard",
                &format!("{k}/2"),
                "-o",
                part.to_str().unwrap(),
            ],
            dir.path(),
        ));
        parts.push(part.to_str().unwrap().to_string());
    }
    let merged = ok(&hbt(
        &["coverage", "merge", &parts[0], &parts[1], "--format", "json", "-q"],
        dir.path(),
    ));
    let whole = ok(&hbt(&["coverage", "--root", r, "--format", "json", "-q"], dir.path()));
    let (m, w): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&merged).unwrap(),
        serde_json::from_str(&whole).unwrap(),
    );
    assert_eq!(m["binaries"], w["binaries"]);
    assert_eq!(m["instructions"], w["instructions"]);
    let out = hbt(&["coverage", "merge", &parts[0]], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2/2 is missing"));
}

#[test]
fn bad_input_gets_one_clear_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = hbt(&["coverage", "--root", "/nonexistent/root"], d);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error:") && err.contains("/nonexistent/root"), "{err}");

    let root = common::fake_root(d);
    let r = root.to_str().unwrap();
    let set = d.join("set.txt");
    std::fs::write(&set, "add\nnot_an_instruction\n").unwrap();
    let out = hbt(&["coverage", "--root", r, "--supported", set.to_str().unwrap()], d);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set.txt:2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pop = d.join("garbage-popcon");
    std::fs::write(&pop, "complete garbage\n\x00\x01\x02\n").unwrap();
    let out = hbt(&["coverage", "--root", r, "--popcon", pop.to_str().unwrap()], d);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usable popularity records"));

    let pop = common::popcon(d, 1000, &[("app", 500)]);
    let mut text = std::fs::read_to_string(&pop).unwrap();
    text += "this line is garbage\n";
    std::fs::write(&pop, text).unwrap();
    let out = hbt(
        &[
            "coverage",
            "--root",
            r,
            "--popcon",
            pop.to_str().unwrap(),
            "-o",
            d.join("x.json").to_str().unwrap(),
        ],
        d,
    );
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(":5: not a popcon record"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = hbt(&["coverage", "--root", r, "--shard", "3/2"], d);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    let out = hbt(&["coverage", "--cpu-model", "pentium"], d);
    assert!(String::from_utf8_lossy(&out.stderr).contains("x86-64-v3"));
}

#[test]
fn help_explains_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(&hbt(&["coverage", "--help"], dir.path()));
    assert!(help.contains("weighted completeness") && help.contains("Examples:") && help.contains("--cpu-model"));
    let help = ok(&hbt(&["coverage", "merge", "--help"], dir.path()));
    assert!(help.contains("Example"));
}

//! `hbt exec` on Debian's busybox-static: each applet's stdout and exit status must match the
//! native run byte for byte. busybox-static is installed by `.ci/run`; without it these tests
//! fail (they do not skip).

use std::path::Path;
use std::process::{Command, Stdio};

const BUSYBOX: &str = "/bin/busybox";

fn hbt() -> &'static str {
    env!("CARGO_BIN_EXE_hbt")
}

/// Runs busybox natively or under hbt: stdout and how it ended ("exit N" or "signal N").
fn run(native: bool, args: &[&str], stdin: &[u8], dir: &Path) -> (Vec<u8>, String) {
    run_ignoring(native, args, stdin, dir, None)
}

/// [`run`], started with signal `ignored` (if any) ignored, as a shell starts a background job.
fn run_ignoring(native: bool, args: &[&str], stdin: &[u8], dir: &Path, ignored: Option<i32>) -> (Vec<u8>, String) {
    let mut cmd = if native {
        Command::new(BUSYBOX)
    } else {
        let mut c = Command::new(hbt());
        c.args(["exec", BUSYBOX]);
        c
    };
    if let Some(sig) = ignored {
        use std::os::unix::process::CommandExt;
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(sig, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let mut child = cmd
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    let mut input = child.stdin.take().unwrap();
    // Feed stdin from another thread: a child writing a lot before reading would block.
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    if !native && !out.stderr.is_empty() {
        eprintln!("hbt stderr for {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    use std::os::unix::process::ExitStatusExt;
    let end = match (out.status.code(), out.status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown".to_string(),
    };
    (out.stdout, end)
}

fn same(args: &[&str], stdin: &[u8], dir: &Path) {
    same_ignoring(args, stdin, dir, None)
}

/// [`same`], both runs started with signal `ignored` ignored.
fn same_ignoring(args: &[&str], stdin: &[u8], dir: &Path, ignored: Option<i32>) {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} missing: install Debian's busybox-static (.ci/run does)"
    );
    let native = run_ignoring(true, args, stdin, dir, ignored);
    let translated = run_ignoring(false, args, stdin, dir, ignored);
    assert_eq!(native.1, translated.1, "how busybox {args:?} ended");
    assert!(
        native.0 == translated.0,
        "stdout of busybox {args:?} differs:\nnative: {}\nhbt:    {}",
        String::from_utf8_lossy(&native.0[..native.0.len().min(400)]),
        String::from_utf8_lossy(&translated.0[..translated.0.len().min(400)])
    );
}

fn corpus() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..20_000)
        .map(|i| format!("line {} {}\n", (i * 7919) % 10007, i % 13))
        .collect();
    std::fs::write(dir.path().join("data.txt"), &text).unwrap();
    std::fs::create_dir_all(dir.path().join("tree/a/b")).unwrap();
    std::fs::write(dir.path().join("tree/a/b/f"), "f\n").unwrap();
    std::fs::write(dir.path().join("tree/a/g"), "g\n").unwrap();
    (dir, text.into_bytes())
}

#[test]
fn hashes_and_compression_match_native() {
    let (dir, text) = corpus();
    let d = dir.path();
    same(&["sha256sum", "data.txt"], b"", d);
    same(&["md5sum", "data.txt"], b"", d);
    same(&["gzip", "-c", "data.txt"], b"", d);
    same(&["bzip2", "-c", "data.txt"], b"", d);
    let gz = run(true, &["gzip", "-c", "data.txt"], b"", d).0;
    same(&["gunzip", "-c"], &gz, d);
    same(&["wc"], &text, d);
    same(&["od", "-x", "data.txt"], b"", d);
}

#[test]
fn text_tools_match_native() {
    let (dir, text) = corpus();
    let d = dir.path();
    same(&["sort", "-n", "-k2", "data.txt"], b"", d);
    same(&["uniq", "-c"], &run(true, &["sort", "data.txt"], b"", d).0, d);
    same(&["awk", "BEGIN{s=0; for(i=0;i<200000;i++) s+=i%7; print s}"], b"", d);
    same(&["awk", "{s+=$2} END{print s, NR}", "data.txt"], b"", d);
    same(&["sed", "-e", "s/line/LINE/g", "-e", "/ 3$/d", "data.txt"], b"", d);
    same(&["grep", "-E", "^line [0-9]*7 (1|2)$", "data.txt"], b"", d);
    same(&["tr", "a-z", "A-Z"], &text, d);
}

#[test]
fn shell_find_and_tar_match_native() {
    let (dir, _) = corpus();
    let d = dir.path();
    same(
        &["sh", "-c", "i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; echo $i; echo a b c | tr ' ' '\\n' | sort -r; (echo sub; exit 3); echo $?"],
        b"",
        d,
    );
    same(&["sh", "-c", "exit 7"], b"", d);
    same(&["find", "tree", "-type", "f"], b"", d);
    // tar round trip through hbt on both ends.
    let tar = run(false, &["tar", "cf", "-", "tree"], b"", d).0;
    let out = tempfile::tempdir().unwrap();
    let (_, status) = run(false, &["tar", "xf", "-"], &tar, out.path());
    assert_eq!(status, "exit 0");
    assert_eq!(std::fs::read(out.path().join("tree/a/b/f")).unwrap(), b"f\n");
    assert_eq!(std::fs::read(out.path().join("tree/a/g")).unwrap(), b"g\n");
}

#[test]
fn bad_programs_get_one_line_errors() {
    let out = Command::new(hbt())
        .args(["exec", "/nonexistent/prog"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("error: /nonexistent/prog: cannot execute: No such file or directory"));
    let out = Command::new(hbt()).args(["exec", "/etc/hostname"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an ELF file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn signals_reach_guest_handlers_and_default_actions_match() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Synchronous: a trap handler runs on kill to self, and a handler that exits.
    same(
        &["sh", "-c", "trap 'echo caught USR1' USR1; kill -USR1 $$; echo after"],
        b"",
        d,
    );
    same(
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 5' TERM; kill -TERM $$; echo not reached",
        ],
        b"",
        d,
    );
    // Default actions: death by signal, seen by the parent as such.
    same(&["sh", "-c", "kill -INT $$; echo survived"], b"", d);
    // Ignored when the program starts (a background job of a non-interactive shell): it stays
    // ignored, as across execve, and the shell survives its own SIGINT.
    same_ignoring(&["sh", "-c", "kill -INT $$; echo survived"], b"", d, Some(libc::SIGINT));
    same(&["sh", "-c", "kill -SEGV $$"], b"", d);
    // Ignored SIGPIPE: `yes` gets EPIPE instead of dying.
    same(&["sh", "-c", "trap '' PIPE; yes | head -n 2"], b"", d);
    // Asynchronous: signals from another process interrupt a translated compute loop (no
    // system calls in it) and each reaches the trap.
    same(
        &[
            "sh",
            "-c",
            "n=0; trap 'n=$((n+1))' USR1; \
             (for k in 1 2 3 4 5; do kill -USR1 $$; sleep 0.05; done; kill -USR2 $$) & \
             trap 'done=1' USR2; done=0; i=0; \
             while [ $done = 0 ]; do i=$((i+1)); done; wait; echo traps $n",
        ],
        b"",
        d,
    );
}

#[test]
fn older_cpu_models_run_the_same_program() {
    let (dir, _) = corpus();
    let native = run(true, &["sha256sum", "data.txt"], b"", dir.path());
    for model in ["x86-64-v1", "x86-64-v2", "x86-64-v3"] {
        let out = Command::new(hbt())
            .args(["exec", "--cpu-model", model, BUSYBOX, "sha256sum", "data.txt"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.stdout, native.0, "sha256sum under --cpu-model {model}");
    }
    // x86-64-v4 runs where the host has all of its AVX-512 subsets (every EVEX form is verified
    // on such hosts), and is refused, naming what is missing, where it has not.
    let v4_host = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512cd")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl");
    let out = Command::new(hbt())
        .args(["exec", "--cpu-model", "x86-64-v4", BUSYBOX, "sha256sum", "data.txt"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    if v4_host {
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, native.0, "sha256sum under --cpu-model x86-64-v4");
    } else {
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("AVX512"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn stats_json_reports_translation_counts() {
    let out = Command::new(hbt())
        .args(["exec", "--stats-json", BUSYBOX, "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim()).unwrap();
    assert!(v["blocks_translated"].as_u64().unwrap() > 100, "{v}");
    assert!(v["system_calls"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["hidden_host_features"].is_array(), "{v}");
}

#[test]
fn census_counts_the_forms_of_the_process_and_the_programs_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"some bytes to hash\n").unwrap();
    // The forms of a census file (it reads as an instruction set), after running `args`.
    let census = |name: &str, args: &[&str]| {
        let file = dir.path().join(name);
        let out = Command::new(hbt())
            .args(["exec", "--census", file.to_str().unwrap(), BUSYBOX])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# hbt census of hbt exec"), "{text}");
        let set = hbt_coverage::instr_set::InstructionSet::parse(&text, &file).unwrap();
        (set.codes.iter().collect::<std::collections::BTreeSet<usize>>(), text)
    };
    let (shell, text) = census("sh.census", &["sh", "-c", ":"]);
    assert!(text.lines().any(|l| l.starts_with("Syscall ")), "{text}");
    let (hash, _) = census("hash.census", &["sha256sum", "f"]);
    let only_hashing: Vec<usize> = hash.difference(&shell).copied().collect();
    assert!(!only_hashing.is_empty());
    // A shell that changes directory, forks a child and execs the hash: the exec'd program,
    // told the same file (as an absolute path), adds what it translated.
    let (both, _) = census(
        "both.census",
        &[
            "sh",
            "-c",
            "mkdir sub && cd sub && /bin/busybox true; exec /bin/busybox sha256sum ../f",
        ],
    );
    let missing: Vec<usize> = only_hashing.iter().filter(|c| !both.contains(c)).copied().collect();
    assert!(missing.is_empty(), "forms of sha256sum missing after exec: {missing:?}");
    // A second run adds to the file.
    let before = census("sh.census", &["sh", "-c", ":"]).1;
    let count = |t: &str| t.lines().find(|l| l.starts_with("Syscall ")).map(|l| l.to_string());
    assert_ne!(count(&text), count(&before), "{before}");
}

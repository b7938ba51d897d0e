//! `hbt run` on the test guests in test-images/ (built by guests/build.sh): transcript and exit
//! status of each. These need /dev/kvm; without it they fail with a message saying so.

use std::path::Path;
use std::process::Command;

fn hbt_run(args: &[&str]) -> (String, String, Option<i32>) {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests run guests on KVM (CI provides it)"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hbt"));
    cmd.arg("run");
    if !args.contains(&"--timeout") {
        cmd.args(["--timeout", "60"]);
    }
    let out = cmd
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("spawn hbt");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

fn transcript(image: &str, expected: &str, status: i32) {
    let (stdout, stderr, code) = hbt_run(&[image]);
    assert_eq!(stdout, expected, "transcript of {image} (stderr: {stderr})");
    assert_eq!(code, Some(status), "exit status of {image} (stderr: {stderr})");
}

#[test]
fn hello_and_exit_code() {
    transcript("test-images/hello.img", "Hello from an hbt test guest!\n", 0);
    transcript("test-images/exit-code.img", "exiting with status 42\n", 42);
}

#[test]
fn cpl3_compute_runs_at_cpl3_and_returns() {
    transcript(
        "test-images/cpl3-compute.img",
        "cpl3-compute: 100000000 xorshift steps at CPL3\nchecksum 0x1bc0bc52acde89e3\n",
        0,
    );
}

#[test]
fn io_heavy_exits_per_port_write() {
    transcript(
        "test-images/io-heavy.img",
        "io-heavy: 20000 port writes, scratch reads back 31\n",
        0,
    );
    let (_, stderr, _) = hbt_run(&["--stats", "test-images/io-heavy.img"]);
    assert!(stderr.contains("serial@0x3f8 20052"), "per-port exit counts: {stderr}");
}

#[test]
fn exceptions_reach_the_guest_idt() {
    transcript(
        "test-images/exceptions.img",
        "CPL0: #PF vector 14 error 0x0 cr2 0x8000000000, #GP vector 13, #DE vector 0, from CS 0x8\n\
         CPL3: #PF ok, #GP ok, #DE ok, #BP ok, cli #GP ok\n",
        0,
    );
}

#[test]
fn timer_interrupts_are_counted() {
    transcript("test-images/timer.img", "timer: 20 PIT interrupts on vector 32\n", 0);
}

#[test]
fn self_modifying_code_runs_the_new_instruction() {
    transcript(
        "test-images/smc.img",
        "smc: first 0x11111111, after rewrite 0x22222222\n",
        0,
    );
}

#[test]
fn kvm_emulation_failures_are_reported_with_rip_and_bytes() {
    // kvm_pvm cannot emulate `int3` at CPL0 (see guests/cpl0_int3.c).
    let (stdout, stderr, code) = hbt_run(&["test-images/cpl0-int3.img"]);
    assert_eq!(stdout, "int3 at CPL0\n");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("KVM internal error") && stderr.contains("bytes at rip: cc"),
        "stderr: {stderr}"
    );
}

#[test]
fn boot_progress_is_timestamped_in_stats() {
    let (_, stderr, code) = hbt_run(&["--stats", "test-images/hello.img"]);
    assert_eq!(code, Some(0));
    assert!(
        stderr.contains("boot progress 0x01 at") && stderr.contains("boot progress 0x02 at"),
        "{stderr}"
    );
    assert!(stderr.contains("in KVM_RUN"), "{stderr}");
}

#[test]
fn timeout_ends_a_spinning_guest() {
    let dir = tempfile::tempdir().unwrap();
    let spin = dir.path().join("spin.bin");
    std::fs::write(&spin, [0xebu8, 0xfe]).unwrap(); // jmp $
    let (_, stderr, code) = hbt_run(&["--timeout", "1", "--load-addr", "0x100000", spin.to_str().unwrap()]);
    assert_eq!(code, Some(124), "{stderr}");
    assert!(stderr.contains("--timeout"), "{stderr}");
}

#[test]
fn bad_images_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, stderr, code) = hbt_run(&["/nonexistent.img"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("does not exist"), "{stderr}");
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, b"not a guest").unwrap();
    let (_, stderr, code) = hbt_run(&[junk.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--load-addr"), "{stderr}");
    let mut elf = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("test-images/hello.img")).unwrap();
    elf.truncate(200);
    let bad = dir.path().join("truncated.img");
    std::fs::write(&bad, &elf).unwrap();
    let (_, stderr, code) = hbt_run(&[bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("truncated.img"), "{stderr}");
    let (_, stderr, code) = hbt_run(&["--accel", "hybrid", "test-images/hello.img"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not available yet"), "{stderr}");
}

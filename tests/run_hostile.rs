//! `hbt run` against hostile or careless input (issue 11): oversized or endless files, special
//! files, headers that lie, guests that never exit, a closed stdout, a background job. Every
//! run is bounded in address space (RLIMIT_AS) and time, so a regression fails the test
//! instead of taking the machine down. Needs /dev/kvm, like tests/run_guests.rs.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{debian_kernel, limit_memory, mkfifo, run_bounded};

/// Address-space limit for one `hbt run` (256 MiB of guest RAM plus hbt itself fit easily).
const AS_LIMIT: u64 = 2 << 30;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `hbt run ARGS` under RLIMIT_AS, with stdin from /dev/null.
fn command(args: &[&str]) -> Command {
    let translated = args.windows(2).any(|w| w == ["--accel", "bt"]);
    assert!(
        translated || Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing (CI provides it; kvm and the default, hybrid, need it)"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hbt"));
    cmd.arg("run").args(args).current_dir(root());
    limit_memory(&mut cmd, AS_LIMIT);
    cmd
}

fn run(args: &[&str]) -> (String, String, Option<i32>) {
    let out = run_bounded(&mut command(args), Duration::from_secs(30));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

/// An error run: status 1, one line, no panic.
fn refused(args: &[&str], needle: &str) {
    let (_, stderr, code) = run(args);
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// hello.img with its first PT_LOAD's p_memsz replaced.
fn elf_with_memsz(dir: &Path, memsz: u64) -> PathBuf {
    let mut b = std::fs::read(root().join("test-images/hello.img")).unwrap();
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let phent = u16::from_le_bytes([b[0x36], b[0x37]]) as usize;
    let phnum = u16::from_le_bytes([b[0x38], b[0x39]]) as usize;
    let load = (0..phnum)
        .map(|i| phoff + i * phent)
        .find(|&o| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == 1)
        .unwrap();
    b[load + 0x28..load + 0x30].copy_from_slice(&memsz.to_le_bytes());
    let path = dir.join(format!("memsz-{memsz:x}.img"));
    std::fs::write(&path, b).unwrap();
    path
}

#[test]
fn lying_elf_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    for memsz in [u64::MAX, 0xffff_ffff_fff0_0000, 8 << 30, 300 << 20] {
        let img = elf_with_memsz(dir.path(), memsz);
        let started = Instant::now();
        refused(&[img.to_str().unwrap()], "does not fit in guest RAM");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "memsz {memsz:#x} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn special_and_endless_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo, 0o600);
    refused(&["/dev/zero"], "/dev/zero is a character device, not a regular file");
    refused(&[fifo.to_str().unwrap()], "is a FIFO, not a regular file");
    refused(&["test-images"], "test-images is a directory, not a regular file");
    let kernel = debian_kernel();
    let k = kernel.to_str().unwrap();
    refused(&["--initrd", "/dev/zero", k], "/dev/zero is a character device");
    refused(&["--initrd", fifo.to_str().unwrap(), k], "is a FIFO");
    let big = dir.path().join("big");
    std::fs::File::create(&big).unwrap().set_len(300 << 20).unwrap(); // sparse, larger than RAM
    refused(&[big.to_str().unwrap()], "can be at most");
    refused(&["--initrd", big.to_str().unwrap(), k], "can be at most");
}

#[test]
fn option_values_that_overflow_or_lie_are_refused() {
    refused(
        &["--mem", "17592186044419", "test-images/hello.img"],
        "--mem 17592186044419 MiB is more than",
    );
    let kernel = debian_kernel();
    let long = "x".repeat(65536);
    refused(
        &["--append", &long, kernel.to_str().unwrap()],
        "--append is 65536 bytes; the kernel command line holds at most 65535",
    );
}

#[test]
fn a_closed_stdout_ends_the_run() {
    // serial-flood prints forever; `| head -c 100` closes the pipe.
    let mut child = command(&["--timeout", "30", "test-images/serial-flood.img"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 100];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert!(first.starts_with(b"serial-flood line 0\n"));
    drop(stdout);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.contains("stdout was closed"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_guest_that_never_exits_still_ends_on_timeout_and_signals() {
    // (Under KVM: the translator has no VMX, so there `vmcall` is #UD and the guest ends.)
    let (_, stderr, code) = run(&["--accel", "kvm", "--timeout", "1", "test-images/stuck-vmcall.img"]);
    assert_eq!(code, Some(124), "{stderr}");
    assert!(stderr.contains("`vmcall`"), "says what the guest was doing: {stderr}");
    for (sig, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let child = command(&["--accel", "kvm", "test-images/stuck-vmcall.img"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let started = Instant::now();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(status),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

#[test]
fn a_background_job_on_a_terminal_is_not_stopped() {
    // An interactive shell on a pseudo-terminal (script(1)) runs hbt as a background job with
    // the terminal as stdin: touching the terminal's mode or reading it would stop hbt with
    // SIGTTOU/SIGTTIN, and then its --timeout could never fire.
    let hbt = env!("CARGO_BIN_EXE_hbt");
    let inner = format!(
        "{hbt} run --accel kvm --timeout 2 test-images/stuck-vmcall.img < /dev/tty & wait $!; echo job-exit=$?"
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &format!("bash --norc -ic '{inner}'"), "/dev/null"])
        .current_dir(root())
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("job-exit=124"),
        "the background run timed out normally: {text}"
    );
}

#[test]
fn mutated_images_never_crash_hbt() {
    // 200 seeded mutants of two test guests (headers mostly), half under each engine: each run
    // ends with the guest's status, a refusal, a guest fault report or the timeout — never a
    // panic or a crash of hbt.
    use hbt_translator::harness::{ci_summary, mutate::Mutator};
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Vec<u8>> = ["hello", "exit-code"]
        .iter()
        .map(|n| std::fs::read(root().join(format!("test-images/{n}.img"))).unwrap())
        .collect();
    let mut m = Mutator::new(0x5eed_0011, 0..0x200);
    let mut ends = std::collections::BTreeMap::<String, u32>::new();
    const RUNS: usize = 200;
    for i in 0..RUNS {
        let img = dir.path().join(format!("m{i}.img"));
        std::fs::write(&img, m.mutate(&seeds[i % seeds.len()])).unwrap();
        let accel = ["kvm", "bt", "hybrid"][(i / 2) % 3];
        let out = run_bounded(
            &mut command(&["--accel", accel, "--timeout", "0.5", img.to_str().unwrap()]),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && out.status.code().is_some_and(|c| c != 101),
            "mutant {i} (seed 0x5eed0011, --accel {accel}) crashed hbt ({:?}): {stderr}",
            out.status
        );
        *ends.entry(format!("exit {}", out.status.code().unwrap())).or_default() += 1;
    }
    ci_summary(&format!("hbt run: {RUNS} mutated images, no crash; ended by {ends:?}"));
}

/// Runs a flat CPL0 image (loaded at 0x100000 in long mode, identity-mapped, no IDT) under
/// `accel` with a short `--timeout`: it must end cleanly — a guest status, a reported guest
/// fault or triple fault (1), or the timeout (124) — never a panic or a signal.
fn hostile_cpl0_run(dir: &Path, name: &str, code: &[u8], accel: &str) -> i32 {
    let img = dir.join(format!("{name}.bin"));
    std::fs::write(&img, code).unwrap();
    let out = run_bounded(
        &mut command(&[
            "--accel",
            accel,
            "--timeout",
            "0.5",
            "--load-addr",
            "0x100000",
            img.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(
        !stderr.contains("panicked") && code.is_some_and(|c| c != 101),
        "{name} (--accel {accel}) crashed hbt ({:?}): {stderr}",
        out.status
    );
    code.unwrap()
}

#[test]
fn hostile_cpl0_code_ends_cleanly() {
    // Targeted attacks on the machine model, each ending in `jmp $`: a CR3 far outside RAM,
    // a PTE whose frame lies outside RAM (read and written after INVLPG), and writes into the
    // MMIO hole (the LAPIC page, the top of the 4 GiB window).
    let dir = tempfile::tempdir().unwrap();
    let mov_rax = |v: u64| [&[0x48u8, 0xb8][..], &v.to_le_bytes()].concat();
    let spin = [0xeb, 0xfe];
    let wild_cr3 = [
        mov_rax(0x000f_ffff_ffff_f000),
        vec![0x0f, 0x22, 0xd8],                         // mov cr3, rax
        vec![0x8b, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00], // mov eax, [0x100000]
        spin.to_vec(),
    ]
    .concat();
    let pte_outside_ram = [
        mov_rax(0x0000_0040_0000_0083), // 2 MiB page at 256 GiB, present + writable
        vec![0x48, 0xa3, 0x08, 0xb0, 0, 0, 0, 0, 0, 0], // mov [0xb008], rax: PD entry 1
        vec![0x0f, 0x01, 0x3c, 0x25, 0x00, 0x00, 0x20, 0x00], // invlpg [0x200000]
        vec![0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00], // mov eax, [0x200000]
        vec![0xc7, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x78, 0x56, 0x34, 0x12], // mov dword [0x200000], imm
        spin.to_vec(),
    ]
    .concat();
    let mmio_writes = [
        mov_rax(0xfee0_0000),
        vec![0xc7, 0x00, 0x78, 0x56, 0x34, 0x12], // mov dword [rax], imm
        vec![0x8b, 0x00],                         // mov eax, [rax]
        mov_rax(0xffff_fff8),
        vec![0x48, 0x89, 0x00], // mov [rax], rax
        vec![0xf3, 0x48, 0xab], // rep stosq (rcx = 0 at boot: no iterations)
        spin.to_vec(),
    ]
    .concat();
    // Device memory reads all ones and drops writes under both engines, so those two spin into
    // the timeout; the wild CR3 ends in a reported fault or the timeout.
    for accel in ["bt", "kvm", "hybrid"] {
        for (name, code, ends) in [
            ("wild-cr3", &wild_cr3, &[1, 124][..]),
            ("pte-outside-ram", &pte_outside_ram, &[124][..]),
            ("mmio-writes", &mmio_writes, &[124][..]),
        ] {
            let status = hostile_cpl0_run(dir.path(), name, code, accel);
            assert!(ends.contains(&status), "{name} (--accel {accel}): status {status}");
        }
    }
}

#[test]
fn random_bytes_at_cpl0_never_crash_hbt() {
    // 100 seeded images of random bytes executed at CPL0 under the translator (which must
    // survive whatever they do to CR3, the page tables, MSRs and the IDT), every third under
    // the hybrid engine (whose KVM side gets whatever CPL3 state they reach).
    use hbt_translator::harness::ci_summary;
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x5eed_c910_u64;
    let mut ends = std::collections::BTreeMap::<i32, u32>::new();
    const RUNS: usize = 100;
    for i in 0..RUNS {
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let accel = if i % 3 == 2 { "hybrid" } else { "bt" };
        let status = hostile_cpl0_run(dir.path(), &format!("random{i}"), &bytes, accel);
        *ends.entry(status).or_default() += 1;
    }
    ci_summary(&format!(
        "hbt run --accel bt/hybrid: {RUNS} random-byte CPL0 images (seed 0x5eedc910), no crash; ended by status {ends:?}"
    ));
}

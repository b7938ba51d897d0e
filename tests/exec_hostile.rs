//! `hbt exec` against programs that probe the corners (issue 11): self-modifying code (same
//! block, a second mapping of the same memory, other threads), no-execute pages, `int $0x80`,
//! x87/SSE floating-point exceptions, non-canonical branch targets, and ELF files the kernel
//! treats in its own way. Each probe runs natively and under hbt, bounded in time and address
//! space, and how it ended (stdout, exit status or signal) must match. The probes are C built
//! with the machine's gcc (`-static`), or mutations of busybox-static.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{limit_memory, mkfifo, run_bounded};

const AS_LIMIT: u64 = 4 << 30;

/// How a run ended, comparable across native and hbt.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    stdout: String,
    end: String,
}

fn bounded(mut cmd: Command) -> (Outcome, String) {
    limit_memory(&mut cmd, AS_LIMIT);
    let out = run_bounded(&mut cmd, Duration::from_secs(20));
    let end = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "hbt panicked: {stderr}");
    (
        Outcome {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            end,
        },
        stderr,
    )
}

fn native(program: &Path, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(program);
    cmd.args(args);
    bounded(cmd).0
}

fn translated(program: &Path, args: &[&str]) -> (Outcome, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hbt"));
    cmd.arg("exec").arg(program).args(args);
    bounded(cmd)
}

/// Native and translated runs end the same way; returns the outcome.
fn same(program: &Path, args: &[&str]) -> Outcome {
    let n = native(program, args);
    let (t, stderr) = translated(program, args);
    assert_eq!(
        n,
        t,
        "{} {args:?} natively vs under hbt (hbt stderr: {stderr})",
        program.display()
    );
    n
}

/// Builds a static C probe.
fn probe(dir: &Path, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(name);
    let st = Command::new("gcc")
        .args(["-O1", "-static", "-fno-pie", "-no-pie", "-o"])
        .arg(&out)
        .arg(&src)
        .args(extra)
        .output()
        .expect("gcc (.ci/run installs it)");
    assert!(
        st.status.success(),
        "gcc {name}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

const SMC_SAME_BLOCK: &str = r#"
#include <sys/mman.h>
#include <string.h>
#include <stdio.h>
/* The store patches the imm32 of a later `mov edi` in the block that executes it. */
static const unsigned char code[] = {
    0xbf, 7, 0, 0, 0,                     /* mov edi, 7 */
    0x48, 0x8d, 0x05, 0x07, 0, 0, 0,      /* lea rax, [rip+7] -> the mov below */
    0xc7, 0x40, 0x01, 42, 0, 0, 0,        /* mov dword [rax+1], 42 */
    0xbf, 9, 0, 0, 0,                     /* mov edi, 9   (patched to mov edi, 42) */
    0x89, 0xf8,                           /* mov eax, edi */
    0xc3,                                 /* ret */
};
int main(void) {
    unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(p, code, sizeof code);
    int r1 = ((int (*)(void))p)();
    memcpy(p, code, sizeof code);            /* restore 9 and run again: the translation must follow */
    int r2 = ((int (*)(void))p)();
    printf("%d %d\n", r1, r2);
    return 0;
}
"#;

const SMC_ALIAS: &str = r#"
#define _GNU_SOURCE
#include <sys/mman.h>
#include <unistd.h>
#include <stdio.h>
/* One memfd mapped twice: written through the RW view, run through the RX view. */
int main(void) {
    int fd = memfd_create("code", 0);
    ftruncate(fd, 4096);
    unsigned char *w = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    unsigned char *x = mmap(0, 4096, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0);
    int (*f)(void) = (int (*)(void))x;
    unsigned char ret1[] = {0xb8, 1, 0, 0, 0, 0xc3}; /* mov eax,1; ret */
    for (int i = 0; i < 6; i++) w[i] = ret1[i];
    int a = f();
    w[1] = 2;                                   /* mov eax,2 */
    int b = f();
    w[1] = 3;
    int c = f();
    printf("%d %d %d\n", a, b, c);
    return 0;
}
"#;

const SMC_THREADS: &str = r#"
#include <sys/mman.h>
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <string.h>
/* A thread spins calling code in a page; main rewrites the code (a write, then an mprotect as
   a JIT does to publish it) and waits for the thread to see the new value. Then main unmaps the page under the
   spinning thread, which must die by SIGSEGV as it does natively. */
static unsigned char *page;
static atomic_int seen, stop_seen;
static void *spin(void *arg) {
    (void)arg;
    for (;;) {
        int v = ((int (*)(void))page)();
        atomic_store(&seen, v);
    }
    return 0;
}
int main(void) {
    page = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char code[] = {0xb8, 1, 0, 0, 0, 0xc3};
    memcpy(page, code, sizeof code);
    pthread_t t;
    pthread_create(&t, 0, spin, 0);
    while (atomic_load(&seen) != 1) ;
    page[1] = 2;
    /* The JIT's "publish" step: same protection, but a system call hbt sees. */
    mprotect(page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC);
    for (long i = 0; atomic_load(&seen) != 2; i++)
        if (i > 2000000000L) { printf("the thread never saw the new code\n"); return 1; }
    printf("thread saw 2\n");
    fflush(stdout);
    munmap(page, 4096);
    for (;;) ;
}
"#;

const NX: &str = r#"
#include <sys/mman.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <setjmp.h>
static sigjmp_buf back;
static void on_segv(int s, siginfo_t *si, void *u) { (void)s; (void)u; printf("SIGSEGV code %d\n", si->si_code); fflush(stdout); siglongjmp(back, 1); }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_segv; sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    unsigned char ret7[] = {0xb8, 7, 0, 0, 0, 0xc3};
    unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(p, ret7, sizeof ret7);
    printf("exec page: %d\n", ((int (*)(void))p)());
    mprotect(p, 4096, PROT_READ | PROT_WRITE);
    if (!sigsetjmp(back, 1)) printf("after mprotect: %d\n", ((int (*)(void))p)());
    unsigned char stack[16];
    memcpy(stack, ret7, sizeof ret7);
    if (!sigsetjmp(back, 1)) printf("stack: %d\n", ((int (*)(void))stack)());
    return 0;
}
"#;

const INT80: &str = r#"
#include <stdio.h>
#include <unistd.h>
static const char msg[] = "written by int 0x80\n";
int main(void) {
    long pid;
    __asm__ volatile("int $0x80" : "=a"(pid) : "a"(20L) : "memory");            /* getpid (i386 #20) */
    long n;
    __asm__ volatile("int $0x80" : "=a"(n) : "a"(4L), "b"(1L), "c"(msg), "d"(sizeof msg - 1) : "memory"); /* write */
    printf("getpid matches: %d, wrote %ld\n", pid == getpid(), n);
    return 0;
}
"#;

const FP_FAULTS: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <setjmp.h>
#include <xmmintrin.h>
static sigjmp_buf back;
static void on_fpe(int s, siginfo_t *si, void *u) { (void)s; (void)u; printf("SIGFPE code %d\n", si->si_code); fflush(stdout); siglongjmp(back, 1); }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_fpe; sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGFPE, &sa, 0);
    if (!sigsetjmp(back, 1)) {
        unsigned short cw = 0x037f & ~0x4;      /* unmask x87 zero-divide */
        __asm__ volatile("fninit; fldcw %0; fld1; fldz; fdivrp; fwait" :: "m"(cw));
        printf("x87: no fault\n");
    }
    __asm__ volatile("fninit");
    if (!sigsetjmp(back, 1)) {
        _mm_setcsr(0x1f80 & ~0x200);             /* unmask SSE zero-divide */
        volatile float a = 1.0f, z = 0.0f;
        volatile float r = a / z;
        printf("sse: no fault %f\n", r);
    }
    _mm_setcsr(0x1f80);
    if (!sigsetjmp(back, 1)) {
        _mm_setcsr(0x1f80 & ~0x80);              /* unmask SSE invalid */
        volatile float z = 0.0f;
        volatile float r = z / z;
        printf("sse: no fault %f\n", r);
    }
    return 0;
}
"#;

const NONCANONICAL: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <setjmp.h>
#include <ucontext.h>
#include <stdint.h>
static sigjmp_buf back;
static volatile uintptr_t expect_rip, expect_rsp;
static void on_segv(int s, siginfo_t *si, void *u) {
    ucontext_t *uc = u; (void)s;
    printf("SIGSEGV code %d addr %p rip-at-branch %d rsp-unchanged %d\n", si->si_code, si->si_addr,
           (uintptr_t)uc->uc_mcontext.gregs[REG_RIP] == expect_rip, (uintptr_t)uc->uc_mcontext.gregs[REG_RSP] == expect_rsp);
    fflush(stdout);
    siglongjmp(back, 1);
}
#define BRANCH(name, insn, target)                                                              \
    if (!sigsetjmp(back, 1)) {                                                                   \
        __asm__ volatile("lea 1f(%%rip), %%rax; mov %%rax, %0; mov %%rsp, %1;"                   \
                         "mov %2, %%r11; push %%r11; pop %%r11; 1: " insn                        \
                         : "=m"(expect_rip), "=m"(expect_rsp) : "r"((uintptr_t)(target)) : "rax", "r11", "memory"); \
        printf(name ": no fault\n");                                                             \
    }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_segv; sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    static char alt[65536];
    stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt};
    sigaltstack(&ss, 0);
    sigaction(SIGSEGV, &sa, 0);
    BRANCH("jmp 8000000000000000", "jmp *%%r11", 0x8000000000000000ull)
    BRANCH("jmp 0000800000000000", "jmp *%%r11", 0x0000800000000000ull)
    BRANCH("call 8000000000000000", "call *%%r11", 0x8000000000000000ull)
    BRANCH("call 1234567812345678", "call *%%r11", 0x1234567812345678ull)
    return 0;
}
"#;

#[test]
fn self_modifying_code_in_the_same_block_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "smc_same_block", SMC_SAME_BLOCK, &[]);
    assert_eq!(same(&p, &[]).stdout, "42 42\n");
}

#[test]
fn code_written_through_a_second_mapping_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "smc_alias", SMC_ALIAS, &[]);
    assert_eq!(same(&p, &[]).stdout, "1 2 3\n");
}

#[test]
fn other_threads_see_new_code_and_die_when_it_is_unmapped() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "smc_threads", SMC_THREADS, &["-pthread"]);
    let o = same(&p, &[]);
    assert_eq!(o.stdout, "thread saw 2\n");
    assert_eq!(o.end, "signal 11");
}

#[test]
fn no_execute_pages_fault() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "nx", NX, &["-z", "noexecstack"]);
    assert_eq!(same(&p, &[]).stdout, "exec page: 7\nSIGSEGV code 2\nSIGSEGV code 2\n");
}

#[test]
fn int_0x80_runs_the_32_bit_system_call() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "int80", INT80, &[]);
    assert_eq!(
        same(&p, &[]).stdout,
        "written by int 0x80\ngetpid matches: 1, wrote 20\n"
    );
}

#[test]
fn floating_point_exceptions_are_sigfpe() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "fp_faults", FP_FAULTS, &[]);
    // FPE_FLTDIV (3) for both divides by zero, FPE_FLTINV (7) for 0/0.
    assert_eq!(same(&p, &[]).stdout, "SIGFPE code 3\nSIGFPE code 3\nSIGFPE code 7\n");
}

#[test]
fn non_canonical_branch_targets_fault_at_the_branch() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path(), "noncanonical", NONCANONICAL, &[]);
    let o = same(&p, &[]);
    assert_eq!(o.stdout.lines().count(), 4, "{}", o.stdout);
    assert!(
        o.stdout.lines().all(|l| l.ends_with("rip-at-branch 1 rsp-unchanged 1")),
        "{}",
        o.stdout
    );
}

/// busybox-static with `edit` applied to its bytes, written executable to `dir/name/busybox`
/// (busybox picks its applet from its own name).
fn busybox_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read("/bin/busybox").expect("busybox-static (.ci/run installs it)");
    edit(&mut b);
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let path = dir.join(name).join("busybox");
    std::fs::write(&path, &b).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// The program headers of an ELF image: (offset of the entry, p_type).
fn phdrs(b: &[u8]) -> Vec<(usize, u32)> {
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let n = u16::from_le_bytes([b[0x38], b[0x39]]) as usize;
    (0..n)
        .map(|i| {
            let o = phoff + 56 * i;
            (o, u32::from_le_bytes(b[o..o + 4].try_into().unwrap()))
        })
        .collect()
}

/// What execve's failure looks like: natively a spawn error; under hbt a one-line error naming
/// the same errno.
fn both_refuse(program: &Path, errno: i32) {
    let e = Command::new(program)
        .arg("true")
        .output()
        .expect_err("the kernel refuses it");
    assert_eq!(e.raw_os_error(), Some(errno), "native execve of {}", program.display());
    let (t, stderr) = translated(program, &["true"]);
    assert_eq!(t.end, "exit 1", "{stderr}");
    let text = hbt_translator::host::files::os_message(&std::io::Error::from_raw_os_error(errno));
    assert!(stderr.contains(&text), "hbt names `{text}`: {stderr}");
}

#[test]
fn elf_files_are_judged_like_the_kernel_judges_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Section headers are ignored by the kernel: garbage there still runs.
    let p = busybox_variant(d, "bad-shdrs", |b| {
        b[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&0xfffeu16.to_le_bytes());
    });
    assert_eq!(same(&p, &["echo", "runs"]).stdout, "runs\n");
    // A wrong e_phentsize is ENOEXEC.
    let p = busybox_variant(d, "bad-phentsize", |b| b[0x36] = 0x30);
    both_refuse(&p, libc::ENOEXEC);
    // A program-header table past the end of the file is ENOEXEC.
    let p = busybox_variant(d, "phdrs-past-eof", |b| {
        b[0x20..0x28].copy_from_slice(&(1u64 << 32).to_le_bytes())
    });
    both_refuse(&p, libc::ENOEXEC);
    // A PT_INTERP whose string lies past the end of the file (the program becomes "dynamic").
    let p = busybox_variant(d, "interp-past-eof", |b| {
        let (o, _) = phdrs(b).into_iter().find(|&(_, t)| t == 4 || t == 0x6474e551).unwrap();
        b[o..o + 4].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        b[o + 8..o + 16].copy_from_slice(&(1u64 << 32).to_le_bytes()); // p_offset
        b[o + 32..o + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
    });
    both_refuse(&p, libc::EIO);
    // A FIFO, even with execute permission, is EACCES (and never blocks).
    let fifo = d.join("fifo");
    mkfifo(&fifo, 0o755);
    both_refuse(&fifo, libc::EACCES);
    both_refuse(Path::new("/dev/zero"), libc::EACCES);
    // The data segment's file part is cut off and its bss is gone: the kernel maps past the end
    // of the file and the program dies when it touches the missing bytes.
    let p = busybox_variant(d, "truncated", |b| {
        for (o, t) in phdrs(b) {
            let flags = u32::from_le_bytes(b[o + 4..o + 8].try_into().unwrap());
            if t == 1 && flags & 2 != 0 {
                let filesz = b[o + 32..o + 40].to_vec();
                b[o + 40..o + 48].copy_from_slice(&filesz);
            }
        }
        b.truncate(1_000_000);
    });
    same(&p, &["true"]);
}

#[test]
fn mutated_programs_end_as_they_do_natively() {
    // 200 seeded mutants of a small static program (its ELF header and program headers mostly):
    // hbt must never crash, and each must end as it does natively — same stdout, same exit
    // status or signal, or the same execve refusal.
    use hbt_translator::harness::{ci_summary, mutate::Mutator};
    let dir = tempfile::tempdir().unwrap();
    let p = probe(
        dir.path(),
        "hello",
        "#include <stdio.h>\nint main(int c, char **v) { printf(\"hello %d\\n\", c); return 3; }\n",
        &[],
    );
    let seed = std::fs::read(&p).unwrap();
    let mut m = Mutator::new(0x5eed_0012, 0..0x400);
    let mut ends = std::collections::BTreeMap::<String, u32>::new();
    let mut mismatches = Vec::new();
    const RUNS: usize = 200;
    for i in 0..RUNS {
        let path = dir.path().join(format!("m{i}"));
        std::fs::write(&path, m.mutate(&seed)).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // ETXTBSY is the test harness's, not the mutant's: another test thread that forks
        // while this file was open for writing holds the fd until its child execs. Retried.
        let busy = |text: &str| text.contains("Text file busy");
        let mut native = String::new();
        for _ in 0..20 {
            native = match Command::new(&path).output() {
                Err(e) => format!("execve: {}", hbt_translator::host::files::os_message(&e)),
                Ok(_) => {
                    let n = native_outcome(&path);
                    format!("{} {:?}", n.end, n.stdout)
                }
            };
            if !busy(&native) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (mut t, mut stderr) = translated(&path, &[]);
        for _ in 0..20 {
            if !busy(&stderr) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            (t, stderr) = translated(&path, &[]);
        }
        let under_hbt = if t.end == "exit 1" && stderr.contains("cannot execute") {
            // hbt's execve refusal names the errno text.
            match native.strip_prefix("execve: ") {
                Some(text) if stderr.contains(text) => native.clone(),
                _ => format!("refused: {stderr}"),
            }
        } else {
            format!("{} {:?}", t.end, t.stdout)
        };
        *ends
            .entry(native.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .or_default() += 1;
        if native != under_hbt {
            // HBT_KEEP_MISMATCHES=DIR keeps the mutants that differ, for a closer look.
            if let Some(keep) = std::env::var_os("HBT_KEEP_MISMATCHES") {
                let _ = std::fs::copy(&path, Path::new(&keep).join(format!("mutant-{i}")));
            }
            mismatches.push(format!("mutant {i}: native {native}, hbt {under_hbt}"));
        }
    }
    ci_summary(&format!(
        "hbt exec: {RUNS} mutated programs, {} mismatches with native; native ends {ends:?}",
        mismatches.len()
    ));
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn native_outcome(path: &Path) -> Outcome {
    native(path, &[])
}

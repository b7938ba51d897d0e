//! `hbt exec` on dynamically linked Debian programs (ld.so, glibc, libcrypto, libpython…):
//! stdout and how each run ended must match the native run. All are in every Debian install
//! (.ci/run adds python3).

use std::process::Command;

/// (stdout, "exit N" / "signal N") of `argv`, natively or under `hbt exec`.
fn run(hbt: bool, argv: &[&str]) -> (String, String) {
    let mut cmd = if hbt {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hbt"));
        c.arg("exec").args(argv);
        c
    } else {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        c
    };
    let out = cmd.output().expect("spawn");
    use std::os::unix::process::ExitStatusExt;
    let end = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    };
    if hbt && !out.stderr.is_empty() {
        eprintln!("hbt stderr for {argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (String::from_utf8_lossy(&out.stdout).into_owned(), end)
}

fn same(argv: &[&str]) {
    assert!(
        std::path::Path::new(argv[0]).exists(),
        "{} is missing (a Debian base program; .ci/run installs python3)",
        argv[0]
    );
    let native = run(false, argv);
    let translated = run(true, argv);
    assert_eq!(native, translated, "{argv:?}: native vs hbt exec");
}

#[test]
fn coreutils_and_shells() {
    same(&["/usr/bin/sha256sum", "/etc/services"]);
    same(&["/usr/bin/sort", "-r", "/etc/services"]);
    same(&["/bin/ls", "-la", "/etc/ssl"]);
    same(&[
        "/bin/bash",
        "-c",
        "for i in $(seq 1 200); do x=$((x+i)); done; echo $x | tr 0-9 a-j",
    ]);
    same(&["/bin/sh", "-c", "exit 3"]);
    same(&["/usr/bin/env", "sh", "-c", "echo found through PATH"]); // execve's ENOENT lets the PATH search go on
}

#[test]
fn interpreters() {
    same(&[
        "/usr/bin/perl",
        "-e",
        "my %h; $h{$_ % 7}++ for 1..10000; print join(',', map {\"$_=$h{$_}\"} sort keys %h), \"\\n\"",
    ]);
    same(&[
        "/usr/bin/python3",
        "-c",
        "import hashlib, json, zlib; d = zlib.compress(b'hbt' * 1000); print(hashlib.sha256(d).hexdigest(), json.dumps({'n': len(d)}))",
    ]);
    // A Python signal handler (glibc sigaction, rt_sigreturn) and an alarm interrupting sleep.
    same(&[
        "/usr/bin/python3",
        "-c",
        "import os, signal, time\n\
         signal.signal(signal.SIGUSR1, lambda *a: print('got USR1'))\n\
         os.kill(os.getpid(), signal.SIGUSR1)\n\
         signal.signal(signal.SIGALRM, lambda *a: print('alarm'))\n\
         signal.setitimer(signal.ITIMER_REAL, 0.05)\n\
         time.sleep(0.5)\n\
         print('done')",
    ]);
}

#[test]
fn scripts_run_through_their_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.sh");
    std::fs::write(&script, "#!/bin/sh -e\necho script \"$0\" args: \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = script.to_str().unwrap();
    same(&[s, "a", "b c"]);
    same(&["/bin/sh", "-c", &format!("{s} nested")]);
}

#[test]
fn threads_run_each_on_its_own_translator() {
    // Python threads with a queue and a lock, and GNU sort's worker threads.
    same(&[
        "/usr/bin/python3",
        "-c",
        "import threading, queue\\n\\
         q = queue.Queue(); lock = threading.Lock(); total = [0]\\n\\
         def produce():\\n    for i in range(20000): q.put(i)\\n    q.put(None)\\n\\
         def consume():\\n    while (x := q.get()) is not None:\\n        with lock: total[0] += x\\n\\
         ts = [threading.Thread(target=f) for f in (produce, consume)]\\n\\
         [t.start() for t in ts]; [t.join() for t in ts]\\n\\
         sums = [0] * 4\\n\\
         def work(i): sums[i] = sum(k * i for k in range(100000))\\n\\
         ws = [threading.Thread(target=work, args=(i,)) for i in range(4)]\\n\\
         [w.start() for w in ws]; [w.join() for w in ws]\\n\\
         print(total[0], sums)",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("numbers");
    let text: String = (0..200_000u64).map(|i| format!("{}\n", (i * 7919) % 200_003)).collect();
    std::fs::write(&input, text).unwrap();
    same(&[
        "/usr/bin/sort",
        "-n",
        "--parallel=2",
        "-S",
        "1M",
        input.to_str().unwrap(),
    ]);
}

#[test]
fn gcc_under_hbt_builds_the_same_binary() {
    // gcc forks and execs cc1, as and collect2/ld, each re-executed under hbt.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("t.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void){int s=0;for(int i=0;i<10;i++)s+=i*i;printf(\"%d\\n\",s);return 0;}\n",
    )
    .unwrap();
    let build = |hbt: bool, out: &str| {
        let out = dir.path().join(out);
        let argv = [
            "/usr/bin/gcc",
            "-O2",
            "-o",
            out.to_str().unwrap(),
            src.to_str().unwrap(),
        ];
        let (_, end) = run(hbt, &argv);
        assert_eq!(end, "exit 0", "gcc under hbt: {hbt}");
        std::fs::read(out).unwrap()
    };
    assert!(
        build(false, "native") == build(true, "translated"),
        "gcc's output differs under hbt"
    );
}

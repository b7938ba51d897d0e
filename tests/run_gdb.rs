//! `hbt run --accel bt --gdb`: the real gdb (Debian package `gdb`, which `.ci/run` installs)
//! drives a test guest through a breakpoint, steps, register and memory reads and writes, to
//! its exit; Ctrl-C stops a spinning guest; a detaching or vanishing gdb lets the guest run on;
//! malformed packets and bad `--gdb` values get errors, never a panic.

mod support;

use goblin::elf::{program_header::PT_LOAD, Elf};
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A test guest's loadable bytes by virtual address (the guests are identity-mapped: virtual
/// = physical) and its entry point.
struct Image {
    bytes: Vec<u8>,
    entry: u64,
    /// (vaddr, file offset, file size) of each loadable segment.
    segments: Vec<(u64, usize, usize)>,
}

impl Image {
    fn open(name: &str) -> Image {
        let bytes = std::fs::read(root().join("test-images").join(name)).unwrap();
        let elf = Elf::parse(&bytes).unwrap();
        let segments = elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == PT_LOAD)
            .map(|p| (p.p_vaddr, p.p_offset as usize, p.p_filesz as usize))
            .collect();
        let entry = elf.entry;
        Image { bytes, entry, segments }
    }

    /// `len` bytes of the image at virtual address `va`.
    fn at(&self, va: u64, len: usize) -> &[u8] {
        let &(base, off, size) = self
            .segments
            .iter()
            .find(|(base, _, size)| (*base..*base + *size as u64).contains(&va))
            .expect("address in a loaded segment");
        let start = off + (va - base) as usize;
        assert!(start + len <= off + size);
        &self.bytes[start..start + len]
    }

    /// The virtual address of the first occurrence of `needle` in a loaded segment.
    fn find(&self, needle: &[u8]) -> u64 {
        self.segments
            .iter()
            .find_map(|&(base, off, size)| {
                let data = &self.bytes[off..off + size];
                let at = data.windows(needle.len()).position(|w| w == needle)?;
                Some(base + at as u64)
            })
            .expect("needle in the image")
    }
}

/// A running hbt, killed if the test fails before it ends (a guest that never ends must not
/// outlive the test).
struct Hbt(Option<Child>);

impl Drop for Hbt {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `hbt run --accel bt --gdb 127.0.0.1:0 test-images/IMAGE`, and the port it printed.
fn hbt_waiting_for_gdb(image: &str) -> (Hbt, u16) {
    hbt_with_gdb(&[&format!("test-images/{image}")])
}

/// `hbt run --accel bt --gdb 127.0.0.1:0 ARGS`, and the port it printed.
fn hbt_with_gdb(args: &[&str]) -> (Hbt, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hbt"))
        .args(["run", "--accel", "bt", "--gdb", "127.0.0.1:0"])
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("hbt: waiting for gdb on 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no `waiting for gdb` line: {line:?}"));
    // The rest of stderr, for the checks at the end.
    child.stderr = None;
    let rest = std::thread::spawn(move || {
        let mut s = line;
        let _ = stderr.read_to_string(&mut s);
        s
    });
    STDERR.with(|c| c.replace(Some(rest)));
    (Hbt(Some(child)), port)
}

std::thread_local! {
    static STDERR: std::cell::RefCell<Option<std::thread::JoinHandle<String>>> = const { std::cell::RefCell::new(None) };
}

/// Waits (bounded) for hbt to end: (stdout, stderr, status).
fn hbt_finished(mut hbt: Hbt) -> (String, String, Option<i32>) {
    let started = Instant::now();
    while hbt.0.as_mut().unwrap().try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            panic!("hbt did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = hbt.0.take().unwrap().wait_with_output().unwrap();
    let stderr = STDERR
        .with(|c| c.borrow_mut().take())
        .map(|t| t.join().unwrap())
        .unwrap_or_default();
    assert!(!stderr.contains("panicked"), "hbt panicked: {stderr}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        out.status.code(),
    )
}

/// gdb in batch mode, without any init file, running `commands` against `port`.
fn gdb(port: u16, commands: &[String]) -> Command {
    let found = Command::new("gdb").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "gdb is not installed (Debian package `gdb`; .ci/run installs it)"
    );
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch", "-ex", "set confirm off", "-ex"])
        .arg(format!("target remote 127.0.0.1:{port}"));
    for c in commands {
        cmd.arg("-ex").arg(c);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn bounded(mut child: Child) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("gdb did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The value printed after `KEY ` by a `printf "KEY %#lx\n"` command.
fn printed(out: &str, key: &str) -> u64 {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no `{key}` line in gdb's output:\n{out}"));
    let v = line.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

#[test]
fn gdb_drives_a_guest_through_breakpoints_steps_memory_and_registers_to_its_exit() {
    let image = Image::open("hello.img");
    // _start: lea rsp,[..]; call rt_init; call main; mov edi,eax; call rt_exit
    let code = image.at(image.entry, 32);
    let instrs: Vec<_> = Decoder::with_ip(64, code, image.entry, DecoderOptions::NONE)
        .into_iter()
        .take(5)
        .collect();
    let mov = instrs
        .iter()
        .position(|i| i.mnemonic() == Mnemonic::Mov && i.op0_register() == Register::EDI)
        .expect("mov edi,eax after call main");
    let (bp, bp_len) = (instrs[mov].ip(), instrs[mov].len() as u64);
    let call = instrs[mov + 1];
    assert_eq!(
        (call.mnemonic(), call.op0_kind()),
        (Mnemonic::Call, OpKind::NearBranch64)
    );
    let hello = image.find(b"Hello from an hbt test guest!");

    let (hbt, port) = hbt_waiting_for_gdb("hello.img");
    let commands = [
        "printf \"START %#lx\\n\", $pc".to_string(),
        "x/4bx $pc".into(),
        // A memory write through the guest's page tables, before the guest prints it.
        format!("set {{char}}{hello:#x} = 'J'"),
        format!("break *{bp:#x}"),
        "continue".into(),
        "printf \"BREAK %#lx\\n\", $pc".into(),
        // main returned 0 in RAX; the guest exits with what `mov edi,eax; call rt_exit` passes.
        "set $rax = 42".into(),
        "stepi".into(),
        "printf \"STEP %#lx\\n\", $pc".into(),
        "printf \"RDI %d\\n\", $rdi".into(),
        "stepi".into(),
        "printf \"CALLEE %#lx\\n\", $pc".into(),
        "printf \"RETURN %#lx\\n\", *(unsigned long *)$rsp".into(),
        "info registers cr0 cr3 efer fs_base gs_base eflags".into(),
        "x/4bx 0x7ffffffff000".into(),
        "continue".into(),
    ];
    let out = bounded(gdb(port, &commands).spawn().unwrap());
    let gdb_out = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (stdout, stderr, status) = hbt_finished(hbt);
    let context = format!("gdb:\n{gdb_out}\nhbt stderr:\n{stderr}");

    assert_eq!(
        printed(&gdb_out, "START"),
        image.entry,
        "stopped at the first instruction: {context}"
    );
    let bytes: Vec<String> = image.at(image.entry, 4).iter().map(|b| format!("0x{b:02x}")).collect();
    let x = format!("{:#x}:\t{}", image.entry, bytes.join("\t"));
    assert!(gdb_out.contains(&x), "x/4bx shows the image's bytes ({x:?}): {context}");
    assert_eq!(printed(&gdb_out, "BREAK"), bp, "{context}");
    assert_eq!(
        printed(&gdb_out, "STEP"),
        bp + bp_len,
        "stepi moved past one instruction: {context}"
    );
    assert_eq!(printed(&gdb_out, "RDI"), 42, "the written RAX reached RDI: {context}");
    assert_eq!(
        printed(&gdb_out, "CALLEE"),
        call.near_branch64(),
        "stepped into the call: {context}"
    );
    assert_eq!(
        printed(&gdb_out, "RETURN"),
        call.next_ip(),
        "return address on the stack: {context}"
    );
    assert!(gdb_out.contains("cr3"), "system registers are described: {context}");
    assert!(
        gdb_out.contains("Cannot access memory at address 0x7ffffffff000"),
        "an unmapped read is an error: {context}"
    );
    assert!(
        gdb_out.contains("exited with code 052"),
        "gdb heard the exit status: {context}"
    );
    assert_eq!(status, Some(42), "{context}");
    assert!(
        stdout.contains("Jello from an hbt test guest!"),
        "the memory write reached the guest: {stdout}"
    );
}

/// Lets the guest run under gdb, sends gdb a SIGINT (what Ctrl-C in its terminal does: gdb
/// passes the interrupt to the stub), prints where it stopped (`STOPPED`), then runs `then`:
/// (gdb's output, hbt's stdout, hbt's stderr, hbt's status).
fn interrupt_with_ctrl_c(hbt: Hbt, port: u16, then: &[String]) -> (String, String, String, Option<i32>) {
    let mut commands = vec![
        "echo READY\\n".to_string(),
        "continue".into(),
        "printf \"STOPPED %#lx\\n\", $pc".into(),
    ];
    commands.extend_from_slice(then);
    let mut gdb = gdb(port, &commands).spawn().unwrap();
    // Once gdb is connected and about to continue, let the guest run a while.
    let mut stdout = BufReader::new(gdb.stdout.take().unwrap());
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 && !line.contains("READY") {}
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(gdb.id() as i32, libc::SIGINT) }, 0);
    let out = bounded(gdb);
    let mut gdb_out = line;
    stdout.read_to_string(&mut gdb_out).unwrap();
    gdb_out += &String::from_utf8_lossy(&out.stdout);
    gdb_out += &String::from_utf8_lossy(&out.stderr);
    let (hbt_out, stderr, status) = hbt_finished(hbt);
    assert!(
        gdb_out.contains("received signal SIGINT"),
        "gdb:\n{gdb_out}\nhbt stderr:\n{stderr}"
    );
    (gdb_out, hbt_out, stderr, status)
}

#[test]
fn ctrl_c_in_gdb_stops_a_spinning_guest_and_kill_ends_the_run() {
    // serial-echo waits (interrupts on) for a line on stdin, which is /dev/null.
    let (hbt, port) = hbt_waiting_for_gdb("serial-echo.img");
    let then = [
        "stepi".to_string(),
        "printf \"STEPPED %#lx\\n\", $pc".into(),
        "kill".into(),
    ];
    let (gdb_out, _, stderr, status) = interrupt_with_ctrl_c(hbt, port, &then);
    let context = format!("gdb:\n{gdb_out}\nhbt stderr:\n{stderr}");
    let image = Image::open("serial-echo.img");
    let stopped = printed(&gdb_out, "STOPPED");
    assert!(
        image
            .segments
            .iter()
            .any(|&(base, _, size)| (base..base + size as u64).contains(&stopped)),
        "{context}"
    );
    assert_ne!(printed(&gdb_out, "STEPPED"), stopped, "{context}");
    assert_eq!(status, Some(137), "gdb's kill ends the run: {context}");
    assert!(stderr.contains("gdb killed the guest"), "{context}");
}

#[test]
fn ctrl_c_stops_a_loop_with_interrupts_off_and_code_written_from_gdb_replaces_it() {
    // cli; L: jmp L  — one self-chained block that no interrupt can leave.
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("spin.bin");
    std::fs::write(&code, [0xfa, 0xeb, 0xfe]).unwrap();
    let (hbt, port) = hbt_with_gdb(&["--load-addr", "0x100000", code.to_str().unwrap()]);
    // Over the translated loop: mov al,7; out 0xf4,al (the exit port: status 7).
    let then = [
        "stepi".to_string(),
        "printf \"STEPPED %#lx\\n\", $pc".into(),
        "set {unsigned int}0x100001 = 0xf4e607b0".into(),
        "x/2i 0x100001".into(),
        "continue".into(),
    ];
    let (gdb_out, _, stderr, status) = interrupt_with_ctrl_c(hbt, port, &then);
    let context = format!("gdb:\n{gdb_out}\nhbt stderr:\n{stderr}");
    assert_eq!(printed(&gdb_out, "STOPPED"), 0x100001, "{context}");
    assert_eq!(printed(&gdb_out, "STEPPED"), 0x100001, "jmp to itself: {context}");
    assert!(gdb_out.contains("out    %al,$0xf4"), "{context}");
    assert!(gdb_out.contains("exited with code 07"), "{context}");
    assert_eq!(status, Some(7), "the new code ran, not the old translation: {context}");
}

#[test]
fn a_detaching_or_vanishing_gdb_lets_the_guest_run_to_its_end() {
    let image = Image::open("hello.img");
    // Detach at a breakpoint at the entry's second instruction: the guest goes on to its end.
    let second = Decoder::with_ip(64, image.at(image.entry, 16), image.entry, DecoderOptions::NONE).decode();
    let (hbt, port) = hbt_waiting_for_gdb("hello.img");
    let commands = [
        format!("break *{:#x}", second.next_ip()),
        "continue".into(),
        "printf \"AT %#lx\\n\", $pc".into(),
        "detach".into(),
    ];
    let out = bounded(gdb(port, &commands).spawn().unwrap());
    let gdb_out = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (stdout, stderr, status) = hbt_finished(hbt);
    assert_eq!(printed(&gdb_out, "AT"), second.next_ip(), "{gdb_out}");
    assert_eq!(status, Some(0), "{gdb_out}\n{stderr}");
    assert!(stdout.contains("Hello from an hbt test guest!"), "{stdout}");
    assert!(stderr.contains("gdb detached; the guest runs on"), "{stderr}");

    // A client that connects and goes away without a word.
    let (hbt, port) = hbt_waiting_for_gdb("hello.img");
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let (stdout, stderr, status) = hbt_finished(hbt);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains("Hello from an hbt test guest!"), "{stdout}");
    assert!(stderr.contains("lost gdb"), "{stderr}");
}

#[test]
fn a_machine_that_cannot_go_on_stops_for_gdb_before_the_run_ends() {
    // lidt [an IDT of limit 0]; ud2  — #UD, then #GP delivering it, then a triple fault.
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("triple-fault.bin");
    let mut bytes = vec![0x0f, 0x01, 0x1d, 0x02, 0, 0, 0, 0x0f, 0x0b];
    bytes.extend([0u8; 10]);
    std::fs::write(&code, bytes).unwrap();
    let (hbt, port) = hbt_with_gdb(&["--load-addr", "0x100000", code.to_str().unwrap()]);
    let commands = [
        "continue".to_string(),
        "printf \"AT %#lx\\n\", $pc".into(),
        "continue".into(),
    ];
    let out = bounded(gdb(port, &commands).spawn().unwrap());
    let gdb_out = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (_, stderr, status) = hbt_finished(hbt);
    let context = format!("gdb:\n{gdb_out}\nhbt stderr:\n{stderr}");
    assert!(gdb_out.contains("received signal SIGSEGV"), "{context}");
    assert_eq!(printed(&gdb_out, "AT"), 0x100007, "stopped at the ud2: {context}");
    assert!(gdb_out.contains("terminated with signal SIGSEGV"), "{context}");
    assert_eq!(status, Some(1), "{context}");
    assert!(stderr.contains("error: guest triple fault"), "{context}");
    // gdb leaving (detaching) after the stop ends the run the same way: the machine is dead.
    let (hbt, port) = hbt_with_gdb(&["--load-addr", "0x100000", code.to_str().unwrap()]);
    let out = bounded(gdb(port, &["continue".to_string()]).spawn().unwrap());
    let gdb_out = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (_, stderr, status) = hbt_finished(hbt);
    assert!(gdb_out.contains("received signal SIGSEGV"), "{gdb_out}");
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("error: guest triple fault"), "{stderr}");
}

/// A minimal remote-protocol client: one packet out, its reply back.
struct Rsp(TcpStream);

impl Rsp {
    fn connect(port: u16) -> Rsp {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        Rsp(s)
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        // (A stub that already closed the connection is seen by the next read.)
        let _ = self.0.write_all(bytes);
    }

    /// Sends `$data#checksum` and returns the reply's data (acknowledging it).
    fn ask(&mut self, data: &[u8]) -> String {
        self.send_raw(&packet(data));
        self.reply().expect("a reply")
    }

    /// The next reply, or `None` if the stub closed the connection.
    fn reply(&mut self) -> Option<String> {
        let mut byte = [0u8];
        loop {
            self.0.read_exact(&mut byte).ok()?;
            if byte[0] == b'$' {
                break;
            }
        }
        let mut data = Vec::new();
        loop {
            self.0.read_exact(&mut byte).ok()?;
            if byte[0] == b'#' {
                break;
            }
            data.push(byte[0]);
        }
        let mut sum = [0u8; 2];
        self.0.read_exact(&mut sum).ok()?;
        self.send_raw(b"+");
        // Run-length encoding: `X*n` is X followed by n - 29 more copies.
        let mut out = Vec::new();
        let mut bytes = data.into_iter();
        while let Some(b) = bytes.next() {
            match (b, out.last().copied()) {
                (b'*', Some(prev)) => {
                    let n = bytes.next()? - 29;
                    out.extend(std::iter::repeat_n(prev, n as usize));
                }
                _ => out.push(b),
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }
}

/// `$data#checksum`.
fn packet(data: &[u8]) -> Vec<u8> {
    let sum = data.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    [b"$", data, format!("#{sum:02x}").as_bytes()].concat()
}

#[test]
fn malformed_and_hostile_packets_get_errors_never_a_panic() {
    let image = Image::open("hello.img");
    let (hbt, port) = hbt_waiting_for_gdb("hello.img");
    let mut gdb = Rsp::connect(port);
    assert!(gdb.ask(b"?").starts_with('T'), "stopped at the start");
    // RIP (register 16) and the code there.
    let rip = gdb.ask(b"p10");
    assert_eq!(rip, hex(&image.entry.to_le_bytes()));
    let m = gdb.ask(format!("m{:x},4", image.entry).as_bytes());
    assert_eq!(m, hex(image.at(image.entry, 4)));
    for (packet, why) in [
        (&b"mffff800000000000,10"[..], "not canonical"),
        (b"m7ffffffff000,8", "not mapped"),
        (b"m8000000000000000,ffffffffffffffff", "absurd range"),
        (b"Mffff800000000000,2:9090", "write to a non-canonical address"),
        (b"P12=08000000", "write to CS"),
        (b"P5d=0000000000000000", "register 93 does not exist"),
        (b"P10=00", "a short RIP"),
    ] {
        let r = gdb.ask(packet);
        assert!(r.starts_with('E') || r.is_empty(), "{why}: {packet:?} -> {r:?}");
    }
    // Well-formed requests the stub does not know get an empty reply.
    for unknown in [&b"qHbtNothing"[..], b"vMustReplyEmpty", b"Z4,200000,1"] {
        let r = gdb.ask(unknown);
        assert!(r.is_empty() || r.starts_with('E'), "{unknown:?} -> {r:?}");
    }
    assert!(gdb.ask(b"qXfer:features:read:target.xml:0,40").contains("<?xml"));
    // Still there, still stopped where it was.
    assert_eq!(gdb.ask(b"p10"), hex(&image.entry.to_le_bytes()));
    gdb.send_raw(b"$k#6b");
    let (_, stderr, status) = hbt_finished(hbt);
    assert_eq!(status, Some(137), "{stderr}");

    // What gdbstub cannot parse (it never comes from gdb), a wrong checksum, or a register file
    // of the wrong size (gdb and the stub disagree about the target) ends the session; bytes
    // outside a packet are ignored. Either way the guest runs on to its end once the client
    // is gone.
    let hostile = [
        packet(b"M200000,4:zzzz"),
        packet(b"G00"),
        packet(b"Zq,zz,1"),
        packet(b"Hgzz"),
        packet(b"vCont;x"),
        packet(b"\x00\x01\x02"),
        b"$m0,4#00".to_vec(),
        vec![0xff; 64],
    ];
    for bytes in hostile {
        let (hbt, port) = hbt_waiting_for_gdb("hello.img");
        let mut gdb = Rsp::connect(port);
        assert!(gdb.ask(b"?").starts_with('T'));
        gdb.send_raw(&bytes);
        gdb.send_raw(&packet(b"?"));
        let _ = gdb.reply();
        drop(gdb);
        let (stdout, stderr, status) = hbt_finished(hbt);
        assert_eq!(status, Some(0), "{bytes:?}: {stderr}");
        assert!(stderr.contains("lost gdb"), "{bytes:?}: {stderr}");
        assert!(stdout.contains("Hello from an hbt test guest!"), "{stdout}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn bad_gdb_options_are_refused_clearly() {
    let hbt = |args: &[&str]| {
        let out = support::run_bounded(
            Command::new(env!("CARGO_BIN_EXE_hbt"))
                .arg("run")
                .args(args)
                .current_dir(root())
                .stdin(Stdio::null()),
            LIMIT,
        );
        (String::from_utf8_lossy(&out.stderr).into_owned(), out.status.code())
    };
    for bad in ["notaport", "70000", "127.0.0.1:", "host:port"] {
        let (stderr, status) = hbt(&["--accel", "bt", "--gdb", bad, "test-images/hello.img"]);
        assert_eq!(status, Some(2), "--gdb {bad}: {stderr}");
        assert!(stderr.contains("is not a port or HOST:PORT"), "--gdb {bad}: {stderr}");
    }
    let (stderr, status) = hbt(&["--accel", "kvm", "--gdb", "1234", "test-images/hello.img"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("--gdb needs --accel bt"), "{stderr}");
}

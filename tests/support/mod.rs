//! Helpers the hostile-input tests share: every probe runs with an address-space limit
//! (RLIMIT_AS) and a wall-clock bound, so a regression fails the test instead of taking the
//! machine down or hanging CI.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Limits `cmd`'s address space to `bytes` (set between fork and exec) and gives it no stdin.
pub fn limit_memory(cmd: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: setrlimit between fork and exec touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
}

/// Runs `cmd` to completion with its output captured; a run longer than `limit` kills it and
/// fails the test.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("did not finish within {limit:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

pub fn mkfifo(path: &Path, mode: u32) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path in a test's temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), mode) }, 0);
}

/// The newest Debian kernel in /boot (linux-image-cloud-amd64; `.ci/run` installs it).
pub fn debian_kernel() -> std::path::PathBuf {
    let mut kernels: Vec<_> = std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("a Debian kernel in /boot (.ci/run installs linux-image-cloud-amd64)")
}

//! A 32-bit userland: Debian's installed kernel boots under `--accel bt` and `--accel hybrid`
//! to an initramfs whose busybox is Debian's i386 `busybox-static` (`.ci/run` puts it at
//! [`BUSYBOX_I386`]), so every process — the shell, its pipelines, 200 fork+exec — is 32-bit
//! code in compatibility mode. The guest runs a script (a shell loop, `sha256sum`, a `gzip`
//! round trip, `awk`, `sort`, `sed`, a background job) whose output must be exactly what the
//! same busybox prints running the same script on the host CPU.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{debian_kernel, run_bounded};

/// Where `.ci/run` installs Debian's i386 busybox-static (`apt-get download
/// busybox-static:i386`, extracted).
const BUSYBOX_I386: &str = "/usr/local/lib/hbt/busybox-i386";

/// Run in the directory holding `payload.bin`, by the guest's /init and on the host.
const SCRIPT: &str = r#"i=0; s=0; while [ $i -lt 20000 ]; do s=$((s+i*i%7)); i=$((i+1)); done; echo "loop $s"
sha256sum payload.bin
gzip -c payload.bin > p.gz; gunzip -c p.gz | sha256sum
seq 1 20000 | awk '{t+=$1*$1} END {print "awk", t}'
seq 1 5000 | sort -rn | head -3 | tr '\n' ' '; echo
i=0; while [ $i -lt 200 ]; do true; i=$((i+1)); done; echo "forks done"
echo "abc def ghi" | sed 's/def/DEF/' | cut -d' ' -f2
(sleep 0.1; echo "background job") & wait; echo "waited"
"#;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
cd /
echo BEGIN
. /script.sh
echo END
poweroff -f
"#;

/// The applets the script uses (the host run finds them as links to the i386 busybox).
const APPLETS: &[&str] = &[
    "sh",
    "sha256sum",
    "gzip",
    "gunzip",
    "seq",
    "awk",
    "sort",
    "head",
    "tr",
    "true",
    "sed",
    "cut",
    "sleep",
];

#[test]
fn a_32_bit_busybox_userland_runs_like_on_the_host() {
    assert!(
        std::path::Path::new(BUSYBOX_I386).exists(),
        "{BUSYBOX_I386} is missing: .ci/run downloads Debian's busybox-static:i386 there"
    );
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("payload.bin"), &payload).unwrap();
    std::fs::write(dir.path().join("script.sh"), SCRIPT).unwrap();
    std::fs::write(dir.path().join("init"), INIT).unwrap();

    // The script on the host CPU, through the same busybox.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink(BUSYBOX_I386, bin.join(applet)).unwrap();
    }
    let host = Command::new(BUSYBOX_I386)
        .args(["sh", "script.sh"])
        .current_dir(dir.path())
        .env("PATH", &bin)
        .output()
        .expect("the i386 busybox runs on the host");
    assert!(host.status.success(), "{host:?}");
    let expected = String::from_utf8_lossy(&host.stdout).to_string();
    assert!(
        expected.contains("forks done") && expected.contains("background job"),
        "{expected}"
    );
    std::fs::remove_file(dir.path().join("p.gz")).unwrap();

    let initrd = dir.path().join("initramfs.cpio");
    let root = env!("CARGO_MANIFEST_DIR");
    let st = Command::new("bash")
        .arg(format!("{root}/scripts/busybox-initramfs.sh"))
        .arg(&initrd)
        .arg(dir.path().join("init"))
        .arg(dir.path().join("payload.bin"))
        .arg(dir.path().join("script.sh"))
        .env("BUSYBOX", BUSYBOX_I386)
        .status()
        .expect("bash");
    assert!(st.success(), "building the initramfs (needs cpio; .ci/run installs it)");

    for engine in ["bt", "hybrid"] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hbt"));
        cmd.args(["run", "--accel", engine, "--timeout", "300", "--mem", "512", "--stats"])
            .arg("--initrd")
            .arg(&initrd)
            .args(["--append", "console=ttyS0 quiet panic=-1"])
            .arg(debian_kernel());
        let out = run_bounded(&mut cmd, Duration::from_secs(330));
        let stdout = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let context = format!("--- hbt run --accel {engine} ---\n{stdout}\n--- stderr ---\n{stderr}");
        assert_eq!(out.status.code(), Some(0), "{context}");
        let guest: String = stdout
            .lines()
            .skip_while(|l| *l != "BEGIN")
            .skip(1)
            .take_while(|l| *l != "END")
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            guest, expected,
            "the script's output in the guest and on the host\n{context}"
        );
        assert!(
            stderr.contains("unimplemented instructions (#UD to the guest): none"),
            "{context}"
        );
        if engine == "hybrid" {
            // Every user stretch is 32-bit code, which stays in the translator.
            let stretches: u64 = stderr
                .split(" of them 32-bit code,")
                .next()
                .and_then(|before| before.rsplit('(').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(stretches > 100, "{stretches} stretches of 32-bit code\n{context}");
        }
    }
}

//! Helpers shared by the coverage integration tests: build tiny ELF files with the machine's
//! assembler and linker, and lay out fake installed roots and .deb files around them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is binutils installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assemble Intel-syntax `body` into `.text` and link it. `kind` is "exe" (static, entry
/// `_start`), "lib" (shared object with `soname`), `needed` are shared objects to link against.
pub fn build(dir: &Path, name: &str, body: &str, kind: &str, soname: Option<&str>, needed: &[&Path]) -> PathBuf {
    let src = dir.join(format!("{name}.s"));
    let obj = dir.join(format!("{name}.o"));
    let out = dir.join(name);
    std::fs::write(
        &src,
        format!(".intel_syntax noprefix\n.text\n.globl _start\n_start:\n{body}\n"),
    )
    .unwrap();
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    let mut ld = Command::new("ld");
    ld.arg("-o")
        .arg(&out)
        .arg("--hash-style=gnu")
        .arg("-z")
        .arg("noseparate-code");
    if kind == "lib" {
        ld.arg("-shared");
        if let Some(s) = soname {
            ld.arg(format!("-soname={s}"));
        }
    } else if !needed.is_empty() {
        ld.arg("--dynamic-linker=/lib64/ld-linux-x86-64.so.2");
    }
    ld.arg(&obj);
    for n in needed {
        ld.arg(n);
    }
    run(&mut ld);
    out
}

pub fn install(root: &Path, path: &str, from: &Path) {
    let dest = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(from, dest).unwrap();
}

pub fn dpkg_list(root: &Path, package: &str, paths: &[&str]) {
    let info = root.join("var/lib/dpkg/info");
    std::fs::create_dir_all(&info).unwrap();
    let mut text = String::from("/.\n");
    for p in paths {
        text += p;
        text += "\n";
    }
    std::fs::write(info.join(format!("{package}.list")), text).unwrap();
}

/// A popcon file in the real `by_inst` layout.
pub fn popcon(dir: &Path, submissions: u64, entries: &[(&str, u64)]) -> PathBuf {
    let mut text = format!("#Format\n# Number of submissions considered: {submissions}\n#rank name inst vote old recent no-files (maintainer)\n");
    for (i, (name, inst)) in entries.iter().enumerate() {
        text += &format!("{} {name} {inst} 0 0 0 0 (Someone)\n", i + 1);
    }
    let path = dir.join("by_inst");
    std::fs::write(&path, text).unwrap();
    path
}

/// Instruction bodies with exactly known content.
pub const LIB_BODY: &str = "add eax, ebx\nadd eax, ebx\nimul rax, rcx\nret\n";
pub const APP_BODY: &str = "mov eax, 60\nxor edi, edi\npopcnt rax, rbx\nsyscall\n";
pub const AVX_BODY: &str = "vpaddd ymm0, ymm1, ymm2\nmov eax, 60\nsyscall\n";

/// A fake installed root:
/// - `libfoo1`: /usr/lib/x86_64-linux-gnu/libfoo.so.1 (LIB_BODY), soname libfoo.so.1;
/// - `app`: /usr/bin/app (APP_BODY), dynamically linked against libfoo.so.1;
/// - `avxtool`: /usr/bin/avxtool (AVX_BODY), static;
/// - `broken`: a truncated ELF; `docs`: no ELF at all.
pub fn fake_root(dir: &Path) -> PathBuf {
    let build_dir = dir.join("build");
    std::fs::create_dir_all(&build_dir).unwrap();
    let lib = build(&build_dir, "libfoo.so.1", LIB_BODY, "lib", Some("libfoo.so.1"), &[]);
    let app = build(&build_dir, "app", APP_BODY, "exe", None, &[&lib]);
    let avx = build(&build_dir, "avxtool", AVX_BODY, "exe", None, &[]);
    let root = dir.join("root");
    install(&root, "/usr/lib/x86_64-linux-gnu/libfoo.so.1", &lib);
    install(&root, "/usr/bin/app", &app);
    install(&root, "/usr/bin/avxtool", &avx);
    let bytes = std::fs::read(&app).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("usr/bin/broken"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::create_dir_all(root.join("usr/share/doc/docs")).unwrap();
    std::fs::write(root.join("usr/share/doc/docs/README"), "x".repeat(200)).unwrap();
    // merged /usr: the dpkg database names /lib/..., the file lives in /usr/lib/...
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    dpkg_list(
        &root,
        "libfoo1",
        &["/lib", "/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu/libfoo.so.1"],
    );
    dpkg_list(&root, "app", &["/usr/bin/app"]);
    dpkg_list(&root, "avxtool:amd64", &["/usr/bin/avxtool"]);
    dpkg_list(&root, "broken", &["/usr/bin/broken"]);
    dpkg_list(&root, "docs", &["/usr/share/doc/docs/README"]);
    root
}

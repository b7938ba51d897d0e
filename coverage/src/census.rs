//! Census files: the instruction forms a run translated (`hbt exec --census FILE`, `hbt run
//! --census FILE`). The format is an instruction-set file (`instr_set.rs`: one iced `Code` name
//! per line, `#` comments), so `--supported FILE` and `--compare FILE` read it as it is; each
//! line's comment carries how many instances of the form were translated. Several processes of
//! one run (a shell's children, an exec'd program) add to the same file: [`add_to_file`].

use crate::keys::code_name;
use iced_x86::Code;
use std::collections::HashMap;
use std::fmt::Write;
use std::io::{Read, Seek, Write as _};
use std::path::Path;

const HEADER: &str = "# hbt census of ";

/// The census file for `forms` (form, translated instances), recorded while running `what`.
pub fn render(what: &str, forms: &[(Code, u64)]) -> String {
    let mut forms = forms.to_vec();
    forms.sort_by_key(|&(c, n)| (std::cmp::Reverse(n), c as usize));
    let mut out = String::new();
    let total: u64 = forms.iter().map(|&(_, n)| n).sum();
    // One line, whatever the command line held.
    let what: String = what.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let _ = writeln!(out, "{HEADER}{what}");
    let _ = writeln!(
        out,
        "# {} instruction forms translated ({total} instances); read with `hbt coverage --compare FILE`",
        forms.len()
    );
    let width = forms.iter().map(|&(c, _)| code_name(c).len()).max().unwrap_or(0);
    for &(code, n) in &forms {
        let _ = writeln!(out, "{:width$}  # {n}", code_name(code));
    }
    out
}

/// What [`render`] wrote: the run's description and the counts (a line without a count
/// counts once). `None` when `text` is not a census (the caller refuses to overwrite it).
pub fn parse(text: &str) -> Option<(String, Vec<(Code, u64)>)> {
    let what = text.lines().next()?.strip_prefix(HEADER)?.to_string();
    let by_name: HashMap<String, Code> = Code::values().map(|c| (code_name(c), c)).collect();
    let mut forms = Vec::new();
    for line in text.lines() {
        let (name, comment) = line.split_once('#').unwrap_or((line, ""));
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let code = *by_name.get(name)?;
        forms.push((code, comment.trim().parse().unwrap_or(1)));
    }
    Some((what, forms))
}

/// Adds `forms` to the census at `path` (created if missing or empty; otherwise it must be a
/// census, whose description is kept), holding an exclusive lock on it meanwhile: processes of
/// one run may finish at the same time.
pub fn add_to_file(path: &Path, what: &str, forms: &[(Code, u64)]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.lock()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let (what, mut total) = if text.trim().is_empty() {
        (what.to_string(), HashMap::new())
    } else {
        let (what, old) = parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} exists and is not an hbt census (not overwritten)", path.display()),
            )
        })?;
        (what, old.into_iter().collect::<HashMap<Code, u64>>())
    };
    for &(code, n) in forms {
        *total.entry(code).or_default() += n;
    }
    let merged: Vec<(Code, u64)> = total.into_iter().collect();
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(render(&what, &merged).as_bytes())?;
    file.unlock()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instr_set::InstructionSet;

    #[test]
    fn a_census_reads_back_as_an_instruction_set() {
        let text = render("a test\nover lines", &[(Code::Add_rm64_r64, 12), (Code::Syscall, 1)]);
        assert!(text.starts_with("# hbt census of a test over lines\n"), "{text}");
        let set = InstructionSet::parse(&text, Path::new("census.txt")).unwrap();
        assert!(set.codes.contains(Code::Add_rm64_r64 as usize));
        assert!(set.codes.contains(Code::Syscall as usize));
        assert_eq!(set.codes.len(), 2);
        assert!(text.contains("Add_rm64_r64  # 12"), "{text}");
    }

    #[test]
    fn processes_of_one_run_add_to_one_file_and_other_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("census.txt");
        add_to_file(&path, "first", &[(Code::Add_rm64_r64, 2)]).unwrap();
        add_to_file(&path, "second", &[(Code::Add_rm64_r64, 3), (Code::Syscall, 1)]).unwrap();
        let (what, forms) = parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(what, "first");
        assert_eq!(forms, vec![(Code::Add_rm64_r64, 5), (Code::Syscall, 1)]);
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, "my notes\n").unwrap();
        let e = add_to_file(&other, "x", &[(Code::Syscall, 1)]).unwrap_err();
        assert!(e.to_string().contains("not an hbt census"), "{e}");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "my notes\n");
    }
}

//! Instruction sets named on the command line: the translator's supported set, `all`, `none`,
//! or a file listing iced `Code` names and/or mnemonics.
//!
//! File format: one name per line, `#` starts a comment. A `Code` name (`Add_rm32_r32`) adds
//! that form; a mnemonic (`add`, any case) adds every form of it.

use crate::error::{CoverageError, Result};
use crate::keys::{code_count, code_name, mnemonic_name, KeySet};
use iced_x86::Code;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct InstructionSet {
    /// Where the set came from, for reports (`translator`, `all`, a file path).
    pub name: String,
    /// Code-granularity members.
    pub codes: KeySet,
}

impl InstructionSet {
    pub fn from_codes(name: &str, codes: impl IntoIterator<Item = Code>) -> Self {
        let mut set = KeySet::with_capacity(code_count());
        codes.into_iter().for_each(|c| set.insert(c as usize));
        InstructionSet {
            name: name.to_string(),
            codes: set,
        }
    }

    /// What the translator supports today (its table of rules with passing differential tests).
    pub fn translator() -> Self {
        Self::from_codes("translator", hbt_translator::supported_codes().iter().copied())
    }

    pub fn all() -> Self {
        Self::from_codes("all", Code::values().filter(|&c| c != Code::INVALID))
    }

    pub fn none() -> Self {
        Self::from_codes("none", [])
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = hbt_translator::host::files::read_regular_text(path, 64 << 20, "an instruction list")?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut by_name: HashMap<String, Vec<Code>> = HashMap::new();
        for code in Code::values().filter(|&c| c != Code::INVALID) {
            by_name.entry(code_name(code)).or_default().push(code);
            by_name.entry(mnemonic_name(code.mnemonic())).or_default().push(code);
        }
        let mut codes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let name = line.split('#').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            let found = by_name.get(name).or_else(|| by_name.get(&name.to_ascii_lowercase()));
            match found {
                Some(list) => codes.extend(list.iter().copied()),
                None => {
                    return Err(CoverageError::UnknownInstruction {
                        path: path.to_path_buf(),
                        line: i + 1,
                        name: name.to_string(),
                    })
                }
            }
        }
        Ok(Self::from_codes(&path.display().to_string(), codes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_codes_and_mnemonics() {
        let s = InstructionSet::parse("# comment\nAdd_rm32_r32\nSUB # all forms\n\n", Path::new("x")).unwrap();
        assert!(s.codes.contains(Code::Add_rm32_r32 as usize));
        assert!(!s.codes.contains(Code::Add_r32_rm32 as usize));
        assert!(s.codes.contains(Code::Sub_r64_rm64 as usize));
        assert!(s.codes.contains(Code::Sub_rm8_imm8 as usize));
        let err = InstructionSet::parse("add\nfrobnicate\n", Path::new("set.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("set.txt:2") && err.contains("frobnicate"), "{err}");
    }
}

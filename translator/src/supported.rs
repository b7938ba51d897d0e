//! The supported-instruction table: every iced `Code` the translator has a rule for *and*
//! whose differential test passes, grown in the order `hbt coverage` recommends.
//!
//! The table is data (`supported.txt`, one iced `Code` name per line, optionally followed by a
//! `# note`), written by `hbt isa-test --all --write-supported translator/src/supported.txt`;
//! CI re-runs the harness on exactly this set (`tests/isa_harness.rs`), so a Code can only stay
//! here while its rule keeps passing on every host that can execute it. A form is supported when
//! it has a rule and passed the harness on a host with its CPUID features: writing the file on a
//! host that lacks some (SSE4A on Intel) keeps those lines, noted, rather than dropping them.

use iced_x86::Code;
use std::collections::HashMap;
use std::sync::OnceLock;

const TABLE: &str = include_str!("supported.txt");

/// Instruction forms the translator supports, sorted by `Code`.
pub fn supported_codes() -> &'static [Code] {
    static CODES: OnceLock<Vec<Code>> = OnceLock::new();
    CODES.get_or_init(|| {
        let mut codes: Vec<Code> = parse_entries(TABLE)
            .unwrap_or_else(|e| panic!("supported.txt: {e}"))
            .into_iter()
            .map(|(code, _)| code)
            .collect();
        codes.sort_by_key(|&c| c as u32);
        codes
    })
}

/// True when `code` is in the verified supported set.
pub fn is_supported(code: Code) -> bool {
    supported_codes()
        .binary_search_by_key(&(code as u32), |c| *c as u32)
        .is_ok()
}

/// The entries of a supported-set file: each Code with the note after `#` on its line.
pub fn parse_entries(text: &str) -> Result<Vec<(Code, Option<String>)>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let (name, note) = match line.split_once('#') {
            Some((name, note)) => (name.trim(), Some(note.trim().to_string())),
            None => (line.trim(), None),
        };
        if name.is_empty() {
            continue;
        }
        let code = code_by_name(name).ok_or_else(|| format!("line {}: unknown iced Code `{name}`", n + 1))?;
        entries.push((code, note.filter(|n| !n.is_empty())));
    }
    Ok(entries)
}

/// A supported-set file for `entries` (sorted by Code), naming the host that wrote it.
pub fn render(host: &str, entries: &[(Code, Option<String>)]) -> String {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(c, _)| *c as u32);
    sorted.dedup_by_key(|(c, _)| *c as u32);
    let mut text = String::new();
    for line in [
        "# The translator's supported set: every iced Code with a rule whose differential test passed on a",
        "# host that can execute it. Written by `hbt isa-test --all --write-supported <this file>`; do not",
        "# edit by hand. A `# note` marks a form the writing host could not execute (kept as verified elsewhere).",
    ] {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&format!("# Written on: {host}\n"));
    for (code, note) in &sorted {
        match note {
            Some(note) => text.push_str(&format!("{code:?}  # {note}\n")),
            None => text.push_str(&format!("{code:?}\n")),
        }
    }
    text
}

/// The iced `Code` whose `Debug` name is `name` (ASCII case-insensitive), via a table built
/// once: formatting every Code per lookup made `hbt exec` start-up take 0.2 s.
pub fn code_by_name(name: &str) -> Option<Code> {
    static BY_NAME: OnceLock<HashMap<String, Code>> = OnceLock::new();
    BY_NAME
        .get_or_init(|| {
            Code::values()
                .map(|c| (format!("{c:?}").to_ascii_lowercase(), c))
                .collect()
        })
        .get(&name.to_ascii_lowercase())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::rule;

    #[test]
    fn files_round_trip_with_notes() {
        let entries = vec![
            (Code::Extrq_xmm_xmm, Some("verified on a host with SSE4A".to_string())),
            (Code::Add_rm8_r8, None),
        ];
        let text = render("Test CPU", &entries);
        assert!(text.contains("# Written on: Test CPU"));
        let back = parse_entries(&text).unwrap();
        assert_eq!(back[0], (Code::Add_rm8_r8, None), "sorted by Code");
        assert_eq!(back[1], entries[0]);
        assert!(parse_entries("Not_a_code\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn table_is_sorted_unique_and_every_code_has_a_rule() {
        let codes = supported_codes();
        assert!(codes.len() > 1500, "supported set unexpectedly small: {}", codes.len());
        assert!(codes.windows(2).all(|w| (w[0] as u32) < (w[1] as u32)));
        for &c in codes {
            assert!(rule(c).is_some(), "{c:?} is listed as supported but has no rule");
        }
    }
}

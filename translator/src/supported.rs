//! The supported-instruction table: every iced `Code` the translator has a rule for *and*
//! whose differential test passes, grown in the order `hbt coverage` recommends.
//!
//! The table is data (`supported.txt`, one iced `Code` name per line), written by
//! `hbt isa-test --all --write-supported translator/src/supported.txt` from the Codes that
//! passed; CI re-runs the harness on exactly this set (`tests/isa_harness.rs`), so a Code can only
//! stay here while its rule keeps passing.

use iced_x86::Code;
use std::collections::HashMap;
use std::sync::OnceLock;

const TABLE: &str = include_str!("supported.txt");

/// Instruction forms the translator supports, sorted by `Code`.
pub fn supported_codes() -> &'static [Code] {
    static CODES: OnceLock<Vec<Code>> = OnceLock::new();
    CODES.get_or_init(|| {
        let mut codes: Vec<Code> = TABLE
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|name| code_by_name(name).unwrap_or_else(|| panic!("supported.txt names unknown iced Code `{name}`")))
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
    fn table_is_sorted_unique_and_every_code_has_a_rule() {
        let codes = supported_codes();
        assert!(codes.len() > 1500, "supported set unexpectedly small: {}", codes.len());
        assert!(codes.windows(2).all(|w| (w[0] as u32) < (w[1] as u32)));
        for &c in codes {
            assert!(rule(c).is_some(), "{c:?} is listed as supported but has no rule");
        }
    }
}

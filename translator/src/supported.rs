//! The supported-instruction table: every iced `Code` the translator has a rule for *and*
//! whose differential test passes. It is data, grown in the order `hbt coverage` recommends.
//!
//! Empty until the translator core lands: an instruction enters this table together with its
//! rule and its harness cases, never before.

use iced_x86::Code;

/// Instruction forms the translator supports, sorted by `Code`.
static SUPPORTED: &[Code] = &[];

/// Instruction forms the translator supports.
pub fn supported_codes() -> &'static [Code] {
    SUPPORTED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(SUPPORTED.windows(2).all(|w| (w[0] as u32) < (w[1] as u32)));
    }
}

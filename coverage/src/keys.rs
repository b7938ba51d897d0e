//! Instruction keys and dense bit sets over them.
//!
//! Every metric works on small integer keys: at code granularity a key is an iced
//! [`Code`] (one instruction *form*, e.g. `Add_rm32_r32`), at mnemonic granularity an iced
//! [`Mnemonic`]. Footprints of hundreds of packages are intersected and compared many times
//! during planning, so sets are fixed-size bit vectors rather than hash sets.

use iced_x86::{Code, Mnemonic};

/// Number of iced `Code` values (instruction forms).
pub fn code_count() -> usize {
    Code::values().len()
}

/// Number of iced `Mnemonic` values.
pub fn mnemonic_count() -> usize {
    Mnemonic::values().len()
}

/// `Code` from its index; `None` for an index past the table (e.g. from a foreign cache).
pub fn code_from_index(index: u16) -> Option<Code> {
    Code::try_from(index as usize).ok()
}

/// The iced name of a code, e.g. `Add_rm32_r32`.
pub fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// Lower-case assembler mnemonic, e.g. `add`.
pub fn mnemonic_name(mnemonic: Mnemonic) -> String {
    format!("{mnemonic:?}").to_ascii_lowercase()
}

/// A set of keys in `0..capacity`, stored as bits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeySet {
    words: Vec<u64>,
}

impl KeySet {
    pub fn with_capacity(capacity: usize) -> Self {
        KeySet {
            words: vec![0; capacity.div_ceil(64)],
        }
    }

    pub fn insert(&mut self, key: usize) {
        self.words[key / 64] |= 1 << (key % 64);
    }

    pub fn remove(&mut self, key: usize) {
        self.words[key / 64] &= !(1 << (key % 64));
    }

    pub fn contains(&self, key: usize) -> bool {
        self.words.get(key / 64).is_some_and(|w| w & (1 << (key % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// `self ⊆ other`.
    pub fn is_subset(&self, other: &KeySet) -> bool {
        self.words.iter().zip(&other.words).all(|(a, b)| a & !b == 0)
    }

    pub fn union_with(&mut self, other: &KeySet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    pub fn intersect_with(&mut self, other: &KeySet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    /// Number of keys in `self` that are not in `other`.
    pub fn count_missing_from(&self, other: &KeySet) -> usize {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a & !b).count_ones() as usize)
            .sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// Keys in `self` but not in `other`.
    pub fn difference<'a>(&'a self, other: &'a KeySet) -> impl Iterator<Item = usize> + 'a {
        self.iter().filter(move |&k| !other.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut a = KeySet::with_capacity(200);
        let mut b = KeySet::with_capacity(200);
        for k in [0, 63, 64, 199] {
            a.insert(k);
        }
        b.insert(63);
        b.insert(64);
        assert_eq!(a.len(), 4);
        assert!(b.is_subset(&a));
        assert!(!a.is_subset(&b));
        assert_eq!(a.count_missing_from(&b), 2);
        assert_eq!(a.difference(&b).collect::<Vec<_>>(), vec![0, 199]);
        a.remove(0);
        assert!(!a.contains(0));
        assert!(!a.contains(10_000));
        a.intersect_with(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![63, 64]);
    }

    #[test]
    fn code_names_round_trip() {
        assert_eq!(code_name(Code::Add_rm32_r32), "Add_rm32_r32");
        assert_eq!(mnemonic_name(Code::Add_rm32_r32.mnemonic()), "add");
        assert_eq!(code_from_index(Code::Add_rm32_r32 as u16), Some(Code::Add_rm32_r32));
        assert_eq!(code_from_index(u16::MAX), None);
    }
}

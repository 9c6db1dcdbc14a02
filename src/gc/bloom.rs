//! A Bloom filter over blob ids, for marking reachable blobs in bounded memory.
//!
//! A false positive only keeps an unreachable blob a little longer; it can never make
//! gc delete a reachable one. Ids are BLAKE3 hashes, so their bytes are already
//! uniform: the probe positions come from the id itself (double hashing).

use crate::id::Id;

/// Bits per expected element: with 7 probes, about 0.8% false positives.
const BITS_PER_ELEMENT: u64 = 10;
const PROBES: u64 = 7;
/// The filter never exceeds this (512 MiB of bits; beyond ~400 million blobs the false
/// positive rate rises and gc reclaims less, never wrongly).
pub const BLOOM_BYTES_MAX: u64 = 512 << 20;

pub struct Bloom {
    bits: Vec<u64>,
    mask: u64,
}

impl Bloom {
    /// A filter sized for `expected` elements.
    pub fn new(expected: u64) -> Bloom {
        let want = (expected.max(1 << 16) * BITS_PER_ELEMENT).next_power_of_two();
        let bits = want.min(BLOOM_BYTES_MAX * 8);
        Bloom {
            bits: vec![0; (bits / 64) as usize],
            mask: bits - 1,
        }
    }

    fn probes(&self, id: &Id) -> impl Iterator<Item = u64> {
        let h1 = u64::from_le_bytes(id.0[0..8].try_into().expect("8 bytes"));
        let h2 = u64::from_le_bytes(id.0[8..16].try_into().expect("8 bytes")) | 1;
        let mask = self.mask;
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
    }

    pub fn insert(&mut self, id: &Id) {
        let probes: Vec<u64> = self.probes(id).collect();
        for bit in probes {
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// False means certainly absent; true means probably present.
    pub fn contains(&self, id: &Id) -> bool {
        self.probes(id)
            .all(|bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(100_000);
        for i in 0..100_000u64 {
            b.insert(&Id::of(&i.to_le_bytes()));
        }
        assert!((0..100_000u64).all(|i| b.contains(&Id::of(&i.to_le_bytes()))));
        let fp = (100_000..200_000u64)
            .filter(|i| b.contains(&Id::of(&i.to_le_bytes())))
            .count();
        assert!(fp < 2_000, "{fp} false positives in 100000");
    }
}

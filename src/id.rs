//! Content ids: BLAKE3-256 of the uncompressed bytes of a chunk or tree, and of a pack file.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A 32-byte BLAKE3 hash naming a chunk, a tree, a pack or a snapshot record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 8 hex characters, for humans.
    pub fn short(&self) -> String {
        self.hex()[..8].to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Id> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Id(out))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let id = Id::of(b"volsnap");
        assert_eq!(Id::from_hex(&id.hex()), Some(id));
        assert_eq!(id.short().len(), 8);
        assert_eq!(Id::from_hex("zz"), None);
    }
}

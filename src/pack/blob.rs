//! Blob encoding: the self-describing header in front of every chunk or tree in a pack.
//!
//! ```text
//! offset size field
//!  0      4   magic "VBLB"
//!  4      1   kind: 0 data chunk, 1 tree
//!  5      1   compression: 0 stored raw, 1 zstd
//!  6      2   reserved, zero
//!  8      4   raw_len: uncompressed length, u32 LE
//! 12      4   stored_len: length of the bytes that follow, u32 LE
//! 16     32   id: BLAKE3-256 of the uncompressed bytes
//! 48      4   check: first 4 bytes of BLAKE3(bytes 0..48)
//! 52  stored  the stored bytes
//! ```
//! Invariant 1: `id` is the hash of the decompressed stored bytes; every read verifies it.
//! Invariant 2: `check` lets a scan of a pack tell a damaged header from a damaged body,
//! so the index can be rebuilt from packs alone.

use crate::error::Result;
use crate::id::Id;
use crate::limits::BLOB_SIZE_MAX;

pub const BLOB_MAGIC: &[u8; 4] = b"VBLB";
pub const HEADER_LEN: usize = 52;

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    Data = 0,
    Tree = 1,
}

/// How the stored bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Raw = 0,
    Zstd = 1,
}

/// A decoded blob header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    pub kind: BlobKind,
    pub compression: Compression,
    pub raw_len: u32,
    pub stored_len: u32,
    pub id: Id,
}

impl BlobHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(BLOB_MAGIC);
        h[4] = self.kind as u8;
        h[5] = self.compression as u8;
        h[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        h[16..48].copy_from_slice(&self.id.0);
        let check = blake3::hash(&h[0..48]);
        h[48..52].copy_from_slice(&check.as_bytes()[0..4]);
        h
    }

    /// Decodes a header; `Err` names what is wrong with it.
    pub fn decode(h: &[u8]) -> std::result::Result<BlobHeader, String> {
        if h.len() < HEADER_LEN {
            return Err(format!("blob header truncated ({} bytes)", h.len()));
        }
        if &h[0..4] != BLOB_MAGIC {
            return Err("bad blob magic".into());
        }
        if blake3::hash(&h[0..48]).as_bytes()[0..4] != h[48..52] {
            return Err("blob header checksum mismatch".into());
        }
        let kind = match h[4] {
            0 => BlobKind::Data,
            1 => BlobKind::Tree,
            k => return Err(format!("unknown blob kind {k}")),
        };
        let compression = match h[5] {
            0 => Compression::Raw,
            1 => Compression::Zstd,
            c => return Err(format!("unknown compression {c}")),
        };
        let raw_len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let stored_len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        if raw_len > BLOB_SIZE_MAX || stored_len > BLOB_SIZE_MAX {
            return Err(format!("blob length {raw_len}/{stored_len} over the limit"));
        }
        if compression == Compression::Raw && raw_len != stored_len {
            return Err("raw blob with stored length != raw length".into());
        }
        let id = Id(h[16..48].try_into().expect("32 bytes"));
        Ok(BlobHeader {
            kind,
            compression,
            raw_len,
            stored_len,
            id,
        })
    }
}

thread_local! {
    // zstd contexts are costly to create (about a tenth of a snapshot's CPU when made
    // per chunk): each worker thread keeps one of each.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        c.as_mut().expect("just set").1.compress(raw)
    })
}

fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("just set").decompress(stored, capacity)
    })
}

/// A blob ready to append to a pack: header plus stored bytes, already verified.
#[derive(Debug)]
pub struct EncodedBlob {
    pub header: BlobHeader,
    pub stored: Vec<u8>,
}

/// Compresses `raw` (keeping it raw when zstd does not shrink it), then decompresses and
/// re-hashes the result, so that no blob whose stored bytes do not reproduce `id` ever
/// reaches a pack.
pub fn encode(kind: BlobKind, id: Id, raw: &[u8], level: i32) -> Result<EncodedBlob, String> {
    assert!(
        raw.len() as u64 <= BLOB_SIZE_MAX as u64,
        "blob over BLOB_SIZE_MAX"
    );
    let compressed = compress(raw, level).map_err(|e| format!("zstd: {e}"))?;
    let (compression, stored) = if compressed.len() < raw.len() {
        (Compression::Zstd, compressed)
    } else {
        (Compression::Raw, raw.to_vec())
    };
    let header = BlobHeader {
        kind,
        compression,
        raw_len: raw.len() as u32,
        stored_len: stored.len() as u32,
        id,
    };
    let check = decode_body(&header, &stored)?;
    if Id::of(&check) != id {
        return Err(format!(
            "blob {id} does not reproduce its id after encoding"
        ));
    }
    Ok(EncodedBlob { header, stored })
}

/// Decodes stored bytes and verifies them against the header's id.
pub fn decode_verified(header: &BlobHeader, stored: &[u8]) -> Result<Vec<u8>, String> {
    let raw = decode_body(header, stored)?;
    if Id::of(&raw) != header.id {
        return Err("content does not match its hash".into());
    }
    Ok(raw)
}

fn decode_body(header: &BlobHeader, stored: &[u8]) -> Result<Vec<u8>, String> {
    if stored.len() != header.stored_len as usize {
        return Err(format!(
            "stored length {} != {}",
            stored.len(),
            header.stored_len
        ));
    }
    match header.compression {
        Compression::Raw => Ok(stored.to_vec()),
        Compression::Zstd => {
            let raw =
                decompress(stored, header.raw_len as usize).map_err(|e| format!("zstd: {e}"))?;
            if raw.len() != header.raw_len as usize {
                return Err(format!(
                    "decompressed {} bytes, header says {}",
                    raw.len(),
                    header.raw_len
                ));
            }
            Ok(raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &[u8], expect: Compression) {
        let id = Id::of(raw);
        let blob = encode(BlobKind::Data, id, raw, 3).unwrap();
        assert_eq!(blob.header.compression, expect);
        let header = BlobHeader::decode(&blob.header.encode()).unwrap();
        assert_eq!(header, blob.header);
        assert_eq!(decode_verified(&header, &blob.stored).unwrap(), raw);
    }

    #[test]
    fn compressible_and_incompressible_round_trip() {
        check(&[7u8; 100_000], Compression::Zstd);
        let mut noise = vec![0u8; 10_000];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut noise);
        check(&noise, Compression::Raw);
        check(b"", Compression::Raw);
    }

    #[test]
    fn damaged_header_and_body_are_rejected() {
        let raw = vec![1u8; 5000];
        let blob = encode(BlobKind::Data, Id::of(&raw), &raw, 3).unwrap();
        let mut h = blob.header.encode();
        h[9] ^= 1;
        assert!(BlobHeader::decode(&h).is_err());
        let mut stored = blob.stored.clone();
        let mid = stored.len() / 2;
        stored[mid] ^= 0x40;
        assert!(decode_verified(&blob.header, &stored).is_err());
    }
}

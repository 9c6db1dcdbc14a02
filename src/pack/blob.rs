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
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
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

/// The most bytes a zstd frame can decode to per stored byte: every block takes at
/// least 4 bytes (a 3-byte header and one byte of content) and decodes to at most
/// 128 KiB. A header claiming more than this for its stored bytes is damaged.
const ZSTD_EXPANSION_MAX: u64 = 128 * 1024 / 4;

/// The output room tried first: the raw length for every ordinary blob, less only when
/// the header claims a ratio beyond what real data shows, so that a damaged header
/// (a huge raw length over a few stored bytes) cannot make us reserve memory the
/// stored bytes never decode to.
fn first_room(stored_len: usize, raw_len: usize) -> usize {
    raw_len.min(stored_len.saturating_mul(64).saturating_add(1 << 20))
}

/// Decompresses one blob's zstd frame to exactly `raw_len` bytes. Memory follows what
/// the frame actually decodes to: it starts with `first_room` bytes and doubles only
/// when zstd reports the room too small (a frame that really holds that much), up
/// to `raw_len`.
fn decompress(stored: &[u8], raw_len: usize) -> std::result::Result<Vec<u8>, String> {
    if raw_len as u64 > (stored.len() as u64).saturating_mul(ZSTD_EXPANSION_MAX) {
        return Err(format!(
            "header says {raw_len} bytes, more than {} stored bytes can hold",
            stored.len()
        ));
    }
    match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n != raw_len as u64 => {
            return Err(format!("zstd frame says {n} bytes, header says {raw_len}"));
        }
        Ok(_) => {}
        Err(_) => return Err("not a zstd frame".into()),
    }
    let too_small = (zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall
        as usize)
        .wrapping_neg();
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let dctx = d.get_or_insert_with(zstd::zstd_safe::DCtx::create);
        let mut room = first_room(stored.len(), raw_len);
        loop {
            let mut out = Vec::with_capacity(room);
            match dctx.decompress(&mut out, stored) {
                Ok(_) => return Ok(out),
                Err(code) if code == too_small && room < raw_len => {
                    room = room.saturating_mul(2).min(raw_len);
                }
                Err(code) => {
                    return Err(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)));
                }
            }
        }
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
            let raw = decompress(stored, header.raw_len as usize)?;
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
    fn blobs_far_larger_than_their_stored_bytes_round_trip() {
        // 8 MiB of zeros compress to a few hundred bytes: decoding starts with less
        // room than the header says and grows it as the frame fills it.
        let zeros = vec![0u8; 8 << 20];
        let blob = encode(BlobKind::Data, Id::of(&zeros), &zeros, 3).unwrap();
        assert!(
            blob.stored.len() < 4096 && first_room(blob.stored.len(), zeros.len()) < zeros.len()
        );
        assert!(decode_verified(&blob.header, &blob.stored).unwrap() == zeros);
    }

    #[test]
    fn a_raw_length_the_stored_bytes_cannot_hold_is_refused() {
        let raw = vec![3u8; 200_000];
        let blob = encode(BlobKind::Data, Id::of(&raw), &raw, 3).unwrap();
        let stored = blob.stored.len() as u32;
        // More than any zstd frame of these stored bytes decodes to.
        let over = BlobHeader {
            raw_len: stored * 32_768 + 1,
            ..blob.header
        };
        let err = decode_verified(&over, &blob.stored).unwrap_err();
        assert!(err.contains("more than"), "{err}");
        // Within that ratio but not what the frame says it holds.
        let other = BlobHeader {
            raw_len: 199_999,
            ..blob.header
        };
        let err = decode_verified(&other, &blob.stored).unwrap_err();
        assert!(err.contains("zstd frame says 200000"), "{err}");
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

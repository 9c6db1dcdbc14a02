//! Content-defined chunk boundaries (FastCDC 2020, normalization level 1). Pure: no I/O
//! beyond the reader it is handed.
//!
//! Data is read in batches of `READ_BATCH_BYTES`; the boundaries inside a batch are
//! found sequentially (cheap, over 1 GB/s) and the batch is then handed to the caller,
//! which hashes and compresses its chunks in parallel. A batch is only cut where at
//! least `chunk_size_max` bytes are available after the cut start (or at end of
//! input), so boundaries do not depend on the batch size.

use std::io::{self, Read};
use std::ops::Range;

use fastcdc::v2020::{FastCDC, Normalization};

/// Chunk size bounds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// Reads `reader` to its end, calling `on_batch(bytes, chunks)` with consecutive
/// batches; `chunks` are ranges into `bytes` that tile it exactly.
/// `size_hint` (the file size from stat) keeps the buffer small for small files; a
/// file that grows past it still reads correctly. Returns the number of bytes read.
pub fn chunk_reader<R: Read, E: From<io::Error>>(
    mut reader: R,
    sizes: ChunkSizes,
    batch_bytes: usize,
    size_hint: u64,
    mut on_batch: impl FnMut(&[u8], &[Range<usize>]) -> Result<(), E>,
) -> Result<u64, E> {
    let max = sizes.max as usize;
    assert!(batch_bytes >= max, "batch smaller than a chunk");
    let full = batch_bytes + max;
    // One byte past the expected end lets the first read loop see EOF.
    let mut buf = vec![0u8; (size_hint.saturating_add(1)).clamp(1, full as u64) as usize];
    let mut len = 0usize;
    let mut total = 0u64;
    let mut eof = false;
    let mut cuts = Vec::new();
    loop {
        while !eof && len < buf.len() {
            match reader.read(&mut buf[len..]) {
                Ok(0) => eof = true,
                Ok(n) => {
                    len += n;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        cuts.clear();
        let consumed = boundaries(&buf[..len], sizes, eof, &mut cuts);
        if !cuts.is_empty() {
            on_batch(&buf[..consumed], &cuts)?;
        }
        if consumed == 0 && !eof && len == buf.len() {
            // The file is larger than its size hint: grow to a full batch.
            buf.resize(full, 0);
            continue;
        }
        buf.copy_within(consumed..len, 0);
        len -= consumed;
        if eof && len == 0 {
            return Ok(total);
        }
    }
}

/// Finds chunk boundaries in `data`. Unless `eof`, stops before any chunk that could
/// extend past the data. Returns how many bytes the ranges cover.
pub fn boundaries(data: &[u8], sizes: ChunkSizes, eof: bool, out: &mut Vec<Range<usize>>) -> usize {
    let max = sizes.max as usize;
    let cdc = FastCDC::with_level(
        data,
        sizes.min as usize,
        sizes.avg as usize,
        max,
        Normalization::Level1,
    );
    let mut start = 0;
    while start < data.len() {
        let remaining = data.len() - start;
        if !eof && remaining < max {
            break;
        }
        let (_, end) = cdc.cut(start, remaining);
        assert!(end > start && end <= data.len(), "cut point out of range");
        out.push(start..end);
        start = end;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: ChunkSizes = ChunkSizes {
        min: 2048,
        avg: 8192,
        max: 32768,
    };

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunks(data: &[u8], batch: usize) -> Vec<Vec<u8>> {
        chunks_with_hint(data, batch, data.len() as u64)
    }

    fn chunks_with_hint(data: &[u8], batch: usize, hint: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        chunk_reader::<_, io::Error>(data, SIZES, batch, hint, |bytes, ranges| {
            out.extend(ranges.iter().map(|r| bytes[r.clone()].to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn boundaries_do_not_depend_on_batch_size() {
        let data = noise(1_000_000, 7);
        let a = chunks(&data, 32768);
        let b = chunks(&data, 1 << 20);
        assert_eq!(a, b);
        assert_eq!(a.concat(), data);
        assert!(a.iter().all(|c| c.len() <= SIZES.max as usize));
    }

    #[test]
    fn an_insertion_only_changes_nearby_chunks() {
        let data = noise(2_000_000, 9);
        let mut edited = data.clone();
        edited.splice(1_000_000..1_000_000, b"inserted bytes".iter().copied());
        let a = chunks(&data, 1 << 20);
        let b = chunks(&edited, 1 << 20);
        let shared = a.iter().filter(|c| b.contains(c)).count();
        assert!(
            shared + 3 >= a.len(),
            "only chunks near the edit change: {shared}/{}",
            a.len()
        );
    }

    #[test]
    fn a_wrong_size_hint_changes_nothing() {
        let data = noise(300_000, 3);
        let exact = chunks(&data, 1 << 20);
        assert_eq!(chunks_with_hint(&data, 1 << 20, 10), exact);
        assert_eq!(chunks_with_hint(&data, 1 << 20, 0), exact);
        assert_eq!(
            chunks_with_hint(&data, 32768, 5_000_000),
            chunks(&data, 32768)
        );
    }

    #[test]
    fn empty_and_tiny_inputs() {
        assert!(chunks(b"", 32768).is_empty());
        assert_eq!(chunks(b"abc", 32768), vec![b"abc".to_vec()]);
    }
}

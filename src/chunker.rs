//! Content-defined chunk boundaries (FastCDC 2020, normalization level 1). Pure: no I/O
//! beyond the `Source` it is handed.
//!
//! Data is read in batches of `READ_BATCH_BYTES`; the boundaries inside a batch are
//! found sequentially (cheap, over 1 GB/s) and the batch is then handed to the caller,
//! which hashes and compresses its chunks in parallel. A batch is only cut where at
//! least `chunk_size_max` bytes are available after the cut start (or at end of
//! input), so boundaries do not depend on the batch size.
//!
//! Holes: a source may announce a stretch of zeros instead of reading it (a sparse
//! file's hole, found with `SEEK_DATA`/`SEEK_HOLE`). Boundaries are a function of the
//! bytes alone, so a hole chunks exactly as the same zeros written out would: a FastCDC
//! cut depends only on the `chunk_size_max` bytes after the chunk's start, so every
//! chunk that starts inside a stretch of zeros with at least that many zeros ahead has
//! the same length (`zero_chunk_len`). Such chunks are handed over as one
//! `Batch::Zeros` run, never materialized; only the zeros within `chunk_size_max` of a
//! hole's edges are, for the chunks that straddle an edge. A hole therefore costs
//! O(1) whatever its size, and a file with holes gives the same chunks as its dense
//! copy (so dedup and tree ids do not depend on how the file is allocated).

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

/// What a `Source` yields next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// This many bytes (at least one) were read into the buffer.
    Data(usize),
    /// The next this many bytes (at least one) are zeros, not read.
    Zeros(u64),
    /// The end of the content.
    End,
}

/// Where content comes from, in order.
pub trait Source {
    /// Reads into `buf` (never empty), or announces zeros, or says the content ended.
    fn next(&mut self, buf: &mut [u8]) -> io::Result<Next>;
}

/// Every byte of a reader, read.
#[derive(Debug)]
pub struct Dense<R>(pub R);

impl<R: Read> Source for Dense<R> {
    fn next(&mut self, buf: &mut [u8]) -> io::Result<Next> {
        loop {
            match self.0.read(buf) {
                Ok(0) => return Ok(Next::End),
                Ok(n) => return Ok(Next::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Consecutive chunks handed to the caller.
#[derive(Debug)]
pub enum Batch<'a> {
    /// Chunks as ranges into `bytes` that tile it exactly.
    Bytes {
        bytes: &'a [u8],
        chunks: &'a [Range<usize>],
    },
    /// `count` chunks of `len` zero bytes each (`len` is `zero_chunk_len`).
    Zeros { len: usize, count: u64 },
}

/// The length of the chunk cut at the start of `sizes.max` zero bytes: the length of
/// every chunk that starts with at least that many zeros ahead.
pub fn zero_chunk_len(sizes: ChunkSizes) -> usize {
    let zeros = vec![0u8; sizes.max as usize];
    let mut cuts = Vec::new();
    boundaries(&zeros, sizes, true, &mut cuts);
    cuts[0].end
}

/// Chunks `source` to its end, calling `on_batch` with consecutive batches.
/// `size_hint` (the file size from stat) keeps the buffer small for small files; a
/// file that grows past it still reads correctly. Returns the content length (bytes
/// read and zeros announced).
pub fn chunk_source<S: Source + ?Sized, E: From<io::Error>>(
    source: &mut S,
    sizes: ChunkSizes,
    batch_bytes: usize,
    size_hint: u64,
    mut on_batch: impl FnMut(Batch<'_>) -> Result<(), E>,
) -> Result<u64, E> {
    let max = sizes.max as usize;
    assert!(batch_bytes >= max, "batch smaller than a chunk");
    let full = batch_bytes + max;
    // One byte past the expected end lets the first read loop see EOF.
    let mut buf = vec![0u8; (size_hint.saturating_add(1)).clamp(1, full as u64) as usize];
    // `buf[..len]` is the content from offset `pos`, where the next chunk starts.
    let mut len = 0usize;
    let mut pos = 0u64;
    let mut total = 0u64;
    let mut eof = false;
    // Zeros announced by the source and not yet in `buf`; they follow `buf[..len]` and
    // began at offset `hole_start`.
    let mut zeros = 0u64;
    let mut hole_start = 0u64;
    // Filling stops once at this offset (a long hole's start plus `max`): the chunks
    // that straddle the hole's start are then cut, and the next one starts inside it.
    let mut pause_at: Option<u64> = None;
    let mut zero_len: Option<u64> = None;
    let mut cuts = Vec::new();
    loop {
        while !eof && len < buf.len() {
            if zeros > 0 {
                let mut n = ((buf.len() - len) as u64).min(zeros);
                if let Some(at) = pause_at {
                    let room = at.saturating_sub(pos + len as u64);
                    if room == 0 {
                        pause_at = None;
                        break;
                    }
                    n = n.min(room);
                }
                let n = n as usize;
                buf[len..len + n].fill(0);
                len += n;
                zeros -= n as u64;
                continue;
            }
            match source.next(&mut buf[len..])? {
                Next::Data(0) | Next::End => eof = true,
                Next::Zeros(0) => {}
                Next::Data(n) => {
                    assert!(n <= buf.len() - len, "source overran its buffer");
                    len += n;
                    total += n as u64;
                }
                Next::Zeros(n) => {
                    zeros = n;
                    total += n;
                    hole_start = pos + len as u64;
                    if n >= max as u64 {
                        pause_at = Some(hole_start + max as u64);
                    }
                }
            }
        }
        cuts.clear();
        let consumed = boundaries(&buf[..len], sizes, eof, &mut cuts);
        if !cuts.is_empty() {
            on_batch(Batch::Bytes {
                bytes: &buf[..consumed],
                chunks: &cuts,
            })?;
        }
        if consumed == 0 && !eof && len == buf.len() && buf.len() < full {
            // The file is larger than its size hint: grow to a full batch.
            buf.resize(full, 0);
            continue;
        }
        buf.copy_within(consumed..len, 0);
        len -= consumed;
        pos += consumed as u64;
        // The next chunk starts inside announced zeros: every chunk with `max` zeros
        // ahead of its start has the zero chunk's length; hand them over as one run.
        if zeros > 0 && pos >= hole_start && len as u64 + zeros >= max as u64 {
            let k = *zero_len.get_or_insert_with(|| zero_chunk_len(sizes) as u64);
            let count = (len as u64 + zeros - max as u64) / k + 1;
            on_batch(Batch::Zeros {
                len: k as usize,
                count,
            })?;
            let skip = count * k;
            if skip <= len as u64 {
                buf.copy_within(skip as usize..len, 0);
                len -= skip as usize;
            } else {
                zeros -= skip - len as u64;
                len = 0;
            }
            pos += skip;
            pause_at = None;
        }
        if eof && len == 0 {
            debug_assert_eq!(pos, total);
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
        collect(&mut Dense(data), batch, hint).0
    }

    /// The chunks of a source (zero runs expanded) and how many bytes were handed
    /// over materialized.
    fn collect<S: Source>(source: &mut S, batch: usize, hint: u64) -> (Vec<Vec<u8>>, usize) {
        let mut out = Vec::new();
        let mut materialized = 0;
        let total = chunk_source::<_, io::Error>(source, SIZES, batch, hint, |b| {
            match b {
                Batch::Bytes { bytes, chunks } => {
                    materialized += bytes.len();
                    out.extend(chunks.iter().map(|r| bytes[r.clone()].to_vec()));
                }
                Batch::Zeros { len, count } => {
                    assert_eq!(len, zero_chunk_len(SIZES));
                    out.extend((0..count).map(|_| vec![0u8; len]));
                }
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(total as usize, out.iter().map(Vec::len).sum::<usize>());
        (out, materialized)
    }

    /// `data` whose `holes` (sorted, disjoint, zeros in `data`) are announced as zeros
    /// rather than read; reads return at most `step` bytes.
    struct Holey<'a> {
        data: &'a [u8],
        holes: &'a [Range<usize>],
        at: usize,
        step: usize,
    }

    impl Source for Holey<'_> {
        fn next(&mut self, buf: &mut [u8]) -> io::Result<Next> {
            if self.at == self.data.len() {
                return Ok(Next::End);
            }
            if let Some(h) = self.holes.iter().find(|h| h.contains(&self.at)) {
                let n = h.end - self.at;
                self.at = h.end;
                return Ok(Next::Zeros(n as u64));
            }
            let next_hole = self
                .holes
                .iter()
                .map(|h| h.start)
                .filter(|&s| s > self.at)
                .min()
                .unwrap_or(self.data.len());
            let n = buf.len().min(next_hole - self.at).min(self.step);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(Next::Data(n))
        }
    }

    /// Noise with zeroed `holes`.
    fn holey_data(len: usize, holes: &[Range<usize>], seed: u64) -> Vec<u8> {
        let mut data = noise(len, seed);
        for h in holes {
            data[h.clone()].fill(0);
        }
        data
    }

    fn check_holes_chunk_like_zeros(len: usize, holes: &[Range<usize>], seed: u64) {
        let data = holey_data(len, holes, seed);
        let dense = chunks(&data, 1 << 20);
        let max = SIZES.max as usize;
        for (batch, step, hint) in [
            (32768, 1 << 20, len as u64),
            (100_000, 4096, len as u64),
            (1 << 20, 1 << 20, 0),
            (1 << 20, 777, len as u64 * 2),
        ] {
            let mut source = Holey {
                data: &data,
                holes,
                at: 0,
                step,
            };
            let (got, materialized) = collect(&mut source, batch, hint);
            assert!(
                got == dense,
                "holes {holes:?}, batch {batch}, step {step}: chunks differ from the dense file's"
            );
            // Only data and the zeros near each hole's edges are ever materialized.
            let in_holes: usize = holes.iter().map(|h| h.len()).sum();
            let bound = len - in_holes + holes.len() * 3 * max + batch.min(len);
            assert!(
                materialized <= bound,
                "holes {holes:?}, batch {batch}: {materialized} bytes materialized, bound {bound}"
            );
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // lists of holes, some with one
    fn holes_chunk_exactly_like_the_zeros_they_stand_for() {
        let max = SIZES.max as usize;
        let cases: Vec<(usize, Vec<Range<usize>>)> = vec![
            // At the start, in the middle, shorter than a chunk, exactly `max`, at the end.
            (
                2_000_000,
                vec![
                    0..200_000,
                    300_000..1_000_000,
                    1_050_000..1_060_000,
                    1_100_000..1_100_000 + max,
                    1_500_000..2_000_000,
                ],
            ),
            // One hole, the whole file.
            (1_000_000, vec![0..1_000_000]),
            // Unaligned edges, data pieces shorter than a minimum chunk between holes.
            (
                900_000,
                vec![1..100_001, 100_100..400_003, 400_500..899_999],
            ),
            (5, vec![1..4]),
        ];
        for (len, holes) in &cases {
            check_holes_chunk_like_zeros(*len, holes, 11);
        }
        // Random layouts.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) as usize
        };
        for seed in 0..40 {
            let len = 1 + rand(1_500_000);
            let mut holes = Vec::new();
            let mut at = rand(50_000);
            while at < len {
                let end = (at + 1 + rand(300_000)).min(len);
                holes.push(at..end);
                at = end + 1 + rand(120_000);
            }
            check_holes_chunk_like_zeros(len, &holes, seed);
        }
    }

    #[test]
    fn a_hole_costs_nothing_whatever_its_size() {
        // 64 GiB of zeros after a little data: chunked without touching the hole.
        let head = noise(100_000, 5);
        let size = 64u64 << 30;
        let mut source = Tail {
            head: &head,
            at: 0,
            size,
        };
        let mut materialized = 0;
        let mut runs = 0;
        let total = chunk_source::<_, io::Error>(&mut source, SIZES, 1 << 20, size, |b| {
            match b {
                Batch::Bytes { bytes, .. } => materialized += bytes.len(),
                Batch::Zeros { .. } => runs += 1,
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(total, size);
        assert_eq!(runs, 1);
        assert!(materialized < 100_000 + 3 * SIZES.max as usize);
    }

    /// `head`, then zeros up to `size`, announced at once.
    struct Tail<'a> {
        head: &'a [u8],
        at: usize,
        size: u64,
    }

    impl Source for Tail<'_> {
        fn next(&mut self, buf: &mut [u8]) -> io::Result<Next> {
            if self.at < self.head.len() {
                let n = buf.len().min(self.head.len() - self.at);
                buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
                self.at += n;
                return Ok(Next::Data(n));
            }
            if self.at == self.head.len() {
                self.at += 1;
                return Ok(Next::Zeros(self.size - self.head.len() as u64));
            }
            Ok(Next::End)
        }
    }

    #[test]
    fn long_zeros_cut_into_zero_chunks() {
        let zeros = vec![0u8; 1_000_000];
        let got = chunks(&zeros, 1 << 20);
        let k = zero_chunk_len(SIZES);
        assert!(got[..got.len() - 1].iter().all(|c| c.len() == k));
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

//! Micro benchmarks of the hot paths, each reported as throughput so it compares with
//! the performance model (hashing and chunking over 1 GB/s per core, zstd hundreds of
//! MB/s per core). Run with `cargo bench --bench micro`.

use std::sync::OnceLock;

use divan::counter::{BytesCount, ItemsCount};
use divan::{Bencher, black_box};
use volsnap::chunker::{self, ChunkSizes};
use volsnap::id::Id;
use volsnap::index::{Index, Location, PackRow};
use volsnap::pack::Packer;
use volsnap::pack::blob::{self, BlobKind};
use volsnap::repo::{Config, Repository};
use volsnap::tree::{Entry, Kind, Run, Tree};

fn main() {
    divan::main();
}

const SIZES: ChunkSizes = ChunkSizes {
    min: 16 * 1024,
    avg: 64 * 1024,
    max: 256 * 1024,
};

/// Database-like bytes: each 8 KiB page half random, half repetitive text.
fn pages(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    for (i, page) in out.chunks_mut(8192).enumerate() {
        let text = format!("row {i:012} status=active balance=000000001234 ");
        for (j, b) in page.iter_mut().skip(4096).enumerate() {
            *b = text.as_bytes()[j % text.len()];
        }
    }
    out
}

fn data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| pages(32 << 20, 1))
}

#[divan::bench(sample_count = 10)]
fn fastcdc_boundaries(b: Bencher) {
    let d = data();
    b.counter(BytesCount::of_slice(d)).bench(|| {
        let mut out = Vec::new();
        chunker::boundaries(black_box(d), SIZES, true, &mut out);
        out.len()
    });
}

#[divan::bench(sample_count = 10)]
fn blake3_64k_chunks(b: Bencher) {
    let d = data();
    b.counter(BytesCount::of_slice(d)).bench(|| {
        d.chunks(64 * 1024)
            .map(|c| Id::of(black_box(c)).0[0])
            .sum::<u8>()
    });
}

#[divan::bench(args = [1, 3], sample_count = 10)]
fn zstd_encode_verified(b: Bencher, level: i32) {
    let d = &data()[..8 << 20];
    b.counter(BytesCount::of_slice(d)).bench(|| {
        d.chunks(64 * 1024)
            .map(|c| {
                blob::encode(BlobKind::Data, Id::of(c), c, level)
                    .unwrap()
                    .stored
                    .len()
            })
            .sum::<usize>()
    });
}

/// Packer::store of new chunks (compress, verify, append, commit packs with fsync).
#[divan::bench(sample_count = 5)]
fn pack_write_verified(b: Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::init(&dir.path().join("repo"), Config::default()).unwrap();
    let seed = std::sync::atomic::AtomicU64::new(1000);
    b.counter(BytesCount::new(16usize << 20))
        .with_inputs(|| {
            pages(
                16 << 20,
                seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            )
        })
        .bench_refs(|d| {
            let packer = Packer::new(&repo, BlobKind::Data);
            for c in d.chunks(64 * 1024) {
                packer.store(Id::of(c), c).unwrap();
            }
            packer.flush().unwrap();
        });
}

fn tree_of(n: usize) -> Tree {
    let entries = (0..n)
        .map(|i| Entry {
            name: format!("file-{i:08}.dat").into_bytes(),
            kind: Kind::File {
                size: 70_000,
                chunks: vec![
                    Run {
                        id: Id::of(&i.to_le_bytes()),
                        count: 1,
                    },
                    Run {
                        id: Id::of(&(i + 1).to_le_bytes()),
                        count: 1,
                    },
                ],
            },
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            xattrs: Vec::new(),
        })
        .collect();
    Tree { entries }
}

#[divan::bench(sample_count = 20)]
fn tree_encode_1000_entries(b: Bencher) {
    let tree = tree_of(1000);
    b.counter(ItemsCount::new(1000usize))
        .bench(|| tree.encode().len());
}

#[divan::bench(sample_count = 20)]
fn tree_decode_1000_entries(b: Bencher) {
    let bytes = tree_of(1000).encode();
    b.counter(ItemsCount::new(1000usize))
        .bench(|| Tree::decode(black_box(&bytes)).unwrap().entries.len());
}

const INDEX_ROWS: u64 = 1_000_000;

/// An index holding a million chunk rows, built once.
fn big_index() -> &'static Index {
    static INDEX: OnceLock<(tempfile::TempDir, Index)> = OnceLock::new();
    &INDEX
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let index = Index::open(&dir.path().join("index.redb"), true).unwrap();
            for batch in 0..INDEX_ROWS / 50_000 {
                let pack = Id::of(&batch.to_le_bytes());
                let rows: Vec<(Id, Location)> = (batch * 50_000..(batch + 1) * 50_000)
                    .map(|i| {
                        (
                            Id::of(&i.to_le_bytes()),
                            Location {
                                pack,
                                offset: i * 70_000,
                                stored_len: 40_000,
                                raw_len: 65_536,
                            },
                        )
                    })
                    .collect();
                index
                    .commit_pack(
                        &pack,
                        &PackRow {
                            kind: 0,
                            size_bytes: 1 << 30,
                            blobs: 50_000,
                        },
                        &rows,
                        volsnap::index::Commit::Store,
                    )
                    .unwrap();
            }
            (dir, index)
        })
        .1
}

#[divan::bench(sample_count = 10)]
fn index_lookup_hit_1m(b: Bencher) {
    let index = big_index();
    let mut i = 0u64;
    b.counter(ItemsCount::new(1000usize)).bench_local(|| {
        for _ in 0..1000 {
            i = (i + 7919) % INDEX_ROWS;
            assert!(index.lookup(&Id::of(&i.to_le_bytes())).unwrap().is_some());
        }
    });
}

#[divan::bench(sample_count = 10)]
fn index_lookup_miss_1m(b: Bencher) {
    let index = big_index();
    let mut i = INDEX_ROWS;
    b.counter(ItemsCount::new(1000usize)).bench_local(|| {
        for _ in 0..1000 {
            i += 1;
            assert!(index.lookup(&Id::of(&i.to_le_bytes())).unwrap().is_none());
        }
    });
}

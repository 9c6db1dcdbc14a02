//! Every on-disk decoder on arbitrary bytes: errors are fine, panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volsnap::pack::{self, blob::BlobHeader};
use volsnap::snapshot::Snapshot;
use volsnap::tree::Tree;

fuzz_target!(|data: &[u8]| {
    let _ = Tree::decode(data);
    let _ = BlobHeader::decode(data);
    let _ = Snapshot::decode(data);
    let _ = volsnap::snapshot::cache::DirCache::decode(data);
    let (blobs, _) = pack::scan(data);
    for b in blobs {
        assert!(b.offset < data.len() as u64);
    }
});

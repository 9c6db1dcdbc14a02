//! Every decoder of bytes volsnap reads back from disk, on arbitrary bytes: the first
//! byte picks one of `volsnap::fuzz::TARGETS` (blobs, packs in memory and as files,
//! trees, snapshot records, restore journals and records, the config, quiesce
//! journals, files-cache rows, lease rows, index rows), the rest is its input. An
//! error is a correct answer; a panic is a bug. The same targets run on stable in
//! `cargo test` (`tests/fuzz.rs`), which also bounds their memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = volsnap::fuzz::any(data);
});

//! Every limit that bounds something that can grow, in one place.

/// On-disk format version of the repository written by this build.
pub const FORMAT_VERSION: u32 = 2;

/// Default chunker sizes (FastCDC, normalization level 1), fixed per repository at init.
pub const CHUNK_SIZE_MIN_DEFAULT: u32 = 16 * 1024;
pub const CHUNK_SIZE_AVG_DEFAULT: u32 = 64 * 1024;
pub const CHUNK_SIZE_MAX_DEFAULT: u32 = 256 * 1024;

/// zstd level used for new blobs.
pub const ZSTD_LEVEL_DEFAULT: i32 = 3;

/// A pack is closed once it holds this many bytes.
pub const PACK_SIZE_TARGET: usize = 8 * 1024 * 1024;

/// Largest blob a pack may hold (trees of huge directories are the biggest blobs).
pub const BLOB_SIZE_MAX: u32 = 256 * 1024 * 1024;

/// A directory whose tree encodes to more than this is split across blobs: a root
/// naming parts (`tree::encode_dir`). Smaller ones are one blob, as they always were.
pub const TREE_BLOB_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A part of a split directory ends after an entry whose name hashes to a multiple of
/// this (so parts hold this many entries on average, and an unchanged part keeps its
/// id when entries elsewhere come and go)...
pub const TREE_PART_ENTRIES_AVG: u32 = 2048;

/// ...or before an entry that would take it over this many bytes.
pub const TREE_PART_BYTES_MAX: usize = TREE_BLOB_BYTES_MAX / 2;

/// Longest name of a directory entry, in bytes. Linux filesystems stop at 255 bytes
/// (NAME_MAX); network filesystems may give up to 255 UTF-16 units, 765 bytes of
/// UTF-8. A longer name is left out of a snapshot and listed as unreadable, and a
/// tree holding one is refused as damaged.
pub const NAME_BYTES_MAX: usize = 1024;

/// Longest symlink target, in bytes (Linux stops at PATH_MAX, 4096, with its NUL).
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;

/// Extended attributes of one entry: names and values together, in bytes. Linux caps
/// one value at 64 KiB and the list of names at 64 KiB, so about 9,000 values of
/// 64 KiB (590 MB) are possible on one file. Past this the entry is kept without its
/// extended attributes and listed as unreadable, with the reason.
pub const XATTR_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Runs of chunks in one file's chunk list (each 33 bytes in its tree entry): about
/// 440 GiB of distinct content at the default 64 KiB average chunk. A larger file is
/// left out and listed as unreadable, with the reason.
pub const FILE_RUNS_MAX: usize = 7 * 1024 * 1024;

/// Largest encoding of one directory entry: a file at `FILE_RUNS_MAX` with
/// `XATTR_BYTES_MAX` of extended attributes and the longest name fits.
pub const ENTRY_BYTES_MAX: usize = 256 * 1024 * 1024 - 1024 * 1024;

/// Directory nesting a snapshot descends, counted from the volume root. Deeper
/// directories are kept empty and listed as unreadable, with the reason; a tree
/// nested deeper is refused by restore and export. Every walk keeps a bounded number
/// of descriptors whatever the depth (`DIR_FDS_HELD_MAX`), and memory per level is a
/// few dozen bytes plus the name.
pub const PATH_DEPTH_MAX: usize = 131_072;

/// Directory descriptors a walk keeps open along its current path; above this, the
/// descriptors of the levels nearest the root are closed and reopened through `..`
/// (checked against the recorded device and inode) when the walk climbs back.
pub const DIR_FDS_HELD_MAX: usize = 64;

/// A snapshot's notes (entries skipped by kind: sockets, other filesystems) keep at
/// most this many example paths per kind, with the count of the rest.
pub const NOTE_EXAMPLES_MAX: usize = 10;

/// A snapshot record lists at most this many unreadable entries (the first in path
/// order), and a note counts the rest: every command loads records.
pub const UNREADABLE_LISTED_MAX: usize = 1000;

/// Bytes read from a file per batch handed to the hash/compress workers.
pub const READ_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Files-cache rows written per index write transaction.
pub const CACHE_ROWS_PER_TRANSACTION: usize = 2_000;

/// Rows gc's condemn and sweep steps (and its pass over the files cache) handle per
/// index write transaction. A concurrent snapshot, restore or lease waits for at most one
/// such transaction at a time, never for a pass over the whole index: a batch of 5,000
/// holds the write lock for 10 to 20 ms (BENCHMARKS.md, "gc and concurrent writers").
/// Tests may lower it with `VOLSNAP_GC_BATCH_ROWS` (see `gc`).
pub const GC_ROWS_PER_TRANSACTION: usize = 5_000;

/// gc's pause between two batches, so that a writer woken when gc releases the index's
/// write lock can take it before gc's next batch does (see `gc::between_batches`).
pub const GC_PAUSE_BETWEEN_BATCHES_MS: u64 = 10;

/// A file whose mtime or ctime lies within this window before the scan started is
/// "racily clean": a later change within the same timestamp tick could leave its stat
/// unchanged, so it is not trusted from the files cache. One second covers every
/// Linux filesystem volumes live on (ext4, xfs, btrfs and tmpfs are ns-granular and
/// ext3 is 1 s).
pub const RACY_WINDOW_NS: i64 = 1_000_000_000;

/// Open pack files kept per reader.
pub const OPEN_PACKS_MAX: usize = 64;

/// Packs a packer has handed to an object store and not yet indexed: the PUTs in
/// flight while chunking and compression go on (memory: this many packs per packer,
/// `PACK_SIZE_TARGET` each). A local store writes each pack before going on.
pub const UPLOADS_IN_FLIGHT: usize = 4;

/// On an object store a packer indexes the packs that became durable in groups of
/// this many, with one log object for the group (`repo::sync`): another host catching
/// up reads one object per 128 MiB written, not one per pack. A writer killed before
/// a group is logged uploads those packs again when it runs again.
pub const PACKS_PER_LOG: usize = 16;

/// Restores from an object store download the packs they will need this many at a
/// time, ahead of the writers (`PackReader::read_ahead`)...
pub const READ_AHEAD_DOWNLOADS: usize = 4;

/// ... and at most this many packs (`PACK_SIZE_TARGET` each, in unnamed temporary
/// files of the cache) beyond the furthest one a writer has reached.
pub const READ_AHEAD_PACKS: usize = 8;

/// Retention policies keep the undo snapshots of this many latest committed in-place
/// restores of each target (the first is what `restore --undo` uses; the others let
/// a user go back past a restore that was itself a mistake). Older ones, outside the
/// `--keep-*` rules, go with the next policy run: this bounds how many accumulate.
pub const UNDO_RESTORES_KEPT: usize = 3;

/// `copy` reads and verifies the data blobs of this many chunk references at a time, in
/// parallel: enough to keep every core busy, few enough that the blobs in flight stay
/// a few megabytes per core.
pub const COPY_BATCH_BLOBS: usize = 256;

/// A packer remembers the id of every blob it accepted (so a blob met twice is stored
/// once); `copy` commits its packs and starts new packers after this many, so a copy
/// of a whole repository holds about 20 MB of ids, not one row per blob it sent.
pub const COPY_PACKER_BLOBS_MAX: u64 = 262_144;

const _: () = assert!(CHUNK_SIZE_MIN_DEFAULT < CHUNK_SIZE_AVG_DEFAULT);
const _: () = assert!(COPY_BATCH_BLOBS as u64 <= COPY_PACKER_BLOBS_MAX);
const _: () = assert!(CHUNK_SIZE_AVG_DEFAULT < CHUNK_SIZE_MAX_DEFAULT);
const _: () = assert!(CHUNK_SIZE_MAX_DEFAULT as usize * 4 <= READ_BATCH_BYTES);
const _: () = assert!((CHUNK_SIZE_MAX_DEFAULT as usize) < PACK_SIZE_TARGET);
const _: () = assert!(CHUNK_SIZE_MAX_DEFAULT <= BLOB_SIZE_MAX);
const _: () = assert!(UNDO_RESTORES_KEPT >= 1);
// A gc batch is a bounded transaction (tens of milliseconds at most), yet large enough
// that the pauses between batches and their commits stay a small part of gc's time.
const _: () = assert!(GC_ROWS_PER_TRANSACTION >= 1_000 && GC_ROWS_PER_TRANSACTION <= 50_000);
const _: () = assert!(GC_PAUSE_BETWEEN_BATCHES_MS >= 1 && GC_PAUSE_BETWEEN_BATCHES_MS <= 100);

/// After a hole gc punched, a pack scan looks for the next blob header this far: the
/// true one lies within one filesystem block of the hole's end (holes cover whole
/// blocks inside runs of dead blobs), and `pack::punch` never punches with blocks
/// larger than this.
pub const RESYNC_WINDOW_BYTES: usize = 1024 * 1024;
const _: () = assert!(TREE_PART_BYTES_MAX <= TREE_BLOB_BYTES_MAX);
const _: () = assert!(TREE_BLOB_BYTES_MAX <= BLOB_SIZE_MAX as usize);
const _: () = assert!(ENTRY_BYTES_MAX < BLOB_SIZE_MAX as usize - 64);
const _: () =
    assert!(FILE_RUNS_MAX * 33 + XATTR_BYTES_MAX + NAME_BYTES_MAX + 1024 <= ENTRY_BYTES_MAX);
const _: () = assert!(SYMLINK_TARGET_BYTES_MAX + XATTR_BYTES_MAX < ENTRY_BYTES_MAX);

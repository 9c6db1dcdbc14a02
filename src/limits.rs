//! Every limit that bounds something that can grow, in one place.

/// On-disk format version of the repository written by this build.
pub const FORMAT_VERSION: u32 = 1;

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

/// Bytes read from a file per batch handed to the hash/compress workers.
pub const READ_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Files-cache rows written per index write transaction.
pub const CACHE_ROWS_PER_TRANSACTION: usize = 2_000;

/// A file whose mtime or ctime lies within this window before the scan started is
/// "racily clean": a later change within the same timestamp tick could leave its stat
/// unchanged, so it is not trusted from the files cache. One second covers every
/// Linux filesystem volumes live on (ext4, xfs, btrfs and tmpfs are ns-granular and
/// ext3 is 1 s).
pub const RACY_WINDOW_NS: i64 = 1_000_000_000;

/// Open pack files kept per reader.
pub const OPEN_PACKS_MAX: usize = 64;

/// Retention policies keep the undo snapshots of this many latest committed in-place
/// restores of each target (the first is what `restore --undo` uses; the others let
/// a user go back past a restore that was itself a mistake). Older ones, outside the
/// `--keep-*` rules, go with the next policy run: this bounds how many accumulate.
pub const UNDO_RESTORES_KEPT: usize = 3;

const _: () = assert!(CHUNK_SIZE_MIN_DEFAULT < CHUNK_SIZE_AVG_DEFAULT);
const _: () = assert!(CHUNK_SIZE_AVG_DEFAULT < CHUNK_SIZE_MAX_DEFAULT);
const _: () = assert!(CHUNK_SIZE_MAX_DEFAULT as usize * 4 <= READ_BATCH_BYTES);
const _: () = assert!((CHUNK_SIZE_MAX_DEFAULT as usize) < PACK_SIZE_TARGET);
const _: () = assert!(CHUNK_SIZE_MAX_DEFAULT <= BLOB_SIZE_MAX);
const _: () = assert!(UNDO_RESTORES_KEPT >= 1);

/// After a hole gc punched, a pack scan looks for the next blob header this far: the
/// true one lies within one filesystem block of the hole's end (holes cover whole
/// blocks inside runs of dead blobs), and `pack::punch` never punches with blocks
/// larger than this.
pub const RESYNC_WINDOW_BYTES: usize = 1024 * 1024;

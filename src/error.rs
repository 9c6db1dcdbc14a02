//! The library's one error type.
//!
//! Every variant carries the object it concerns (a path, a pack, a chunk, a snapshot
//! reference) so the binary can print a one-line message without extra context.
//! Bugs in volsnap itself are `assert!`s, never variants here.

use std::path::PathBuf;

use crate::id::Id;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong that is not a bug in volsnap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a named path failed.
    /// (The cause is part of the message rather than a `source`, so that `{:#}` does
    /// not print it twice.)
    #[error("{op} {}: {cause}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A request to the object store failed (after its retries).
    #[error("{op} {object}: {detail}")]
    Store {
        op: &'static str,
        object: String,
        detail: String,
    },
    /// No repository exists at the path (exit code 10).
    #[error("no repository at {}: {why}; {}", path.display(), why.hint(path))]
    NoRepository { path: PathBuf, why: Absence },
    /// The repository was written by a newer volsnap.
    #[error(
        "repository {} has format version {found}; this volsnap reads up to {supported}: upgrade volsnap",
        path.display()
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A repository file does not decode or fails its checksum.
    #[error("corrupt {what} {}: {detail}", path.display())]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// A tree blob verified but does not decode, or holds invalid names.
    #[error("tree {id}: {detail}")]
    CorruptTree { id: Id, detail: String },
    /// A blob's bytes do not hash to its id.
    #[error(
        "chunk {id} in pack {pack}: {detail} (run `volsnap check`; if the index is at fault, `volsnap repair index` mends it)"
    )]
    BadBlob { id: Id, pack: Id, detail: String },
    /// A chunk referenced by a tree is not in the index.
    #[error(
        "chunk {id} is not in the index (repository damaged; run `volsnap check`, then `volsnap repair index`)"
    )]
    MissingChunk { id: Id },
    /// The index database failed.
    #[error("index {}: {detail}", path.display())]
    Index { path: PathBuf, detail: String },
    /// The index file is missing while the repository exists.
    #[error("index {} is missing: run `volsnap repair index` to rebuild it from the packs", path.display())]
    IndexMissing { path: PathBuf },
    /// The index file is damaged (redb reports corruption or asserts on it).
    #[error("index {} is damaged ({detail}): run `volsnap repair index` to rebuild it from the packs", path.display())]
    IndexDamaged { path: PathBuf, detail: String },
    /// A snapshot reference did not resolve.
    #[error("snapshot {reference:?}: {detail}")]
    SnapshotRef { reference: String, detail: String },
    /// A path inside a snapshot does not exist.
    #[error("path {path:?} not found in snapshot {snapshot}")]
    PathNotFound { snapshot: String, path: String },
    /// Another process holds what this operation needs (exit code 11).
    #[error("{0}")]
    Busy(String),
    /// The user asked for something that cannot be done as asked.
    #[error("{0}")]
    Usage(String),

    /// A live restore that pre-flight refused: nothing was changed.
    #[error("{0}")]
    Refused(String),

    /// An in-place restore committed, but bringing the application back failed.
    #[error("{0}")]
    Redeploy(String),

    /// An entry volsnap made was replaced by something else while it worked on it (a
    /// racing or hostile writer in the target); nothing was applied through it.
    #[error(
        "{} was replaced while volsnap was restoring it ({detail}); nothing was applied to what is there now",
        path.display()
    )]
    Replaced { path: PathBuf, detail: String },

    /// A failure a test asked for (`VOLSNAP_FAIL_AT`).
    #[error("injected failure at {0:?}")]
    Injected(String),

    /// The Docker engine failed or refused: one line, with a hint where one helps.
    #[error("{0}")]
    Engine(String),

    #[error("{phase} failed: {detail}")]
    Hook { phase: &'static str, detail: String },
    /// An invalid exclude pattern.
    #[error("exclude pattern {pattern:?}: {detail}")]
    Pattern { pattern: String, detail: String },
}

impl Error {
    /// Wraps an `io::Error` with the operation and path it concerns.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io { op, path, cause }
    }

    /// Whether this error means another process holds what was needed (exit code 11).
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy(_))
    }

    /// Whether the index is damaged or missing (the record files may still be read).
    pub fn is_index_unusable(&self) -> bool {
        matches!(
            self,
            Error::IndexDamaged { .. } | Error::IndexMissing { .. }
        )
    }

    /// Whether this error means there is no repository (exit code 10).
    pub fn is_no_repository(&self) -> bool {
        matches!(self, Error::NoRepository { .. })
    }
}

/// Why a path holds no repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Absence {
    /// The directory does not exist, but its parent does.
    Missing,
    /// Neither the directory nor its parent exists: most often a disk that is not
    /// mounted, or a mistyped path.
    ParentMissing { parent: PathBuf },
    /// The path (or one of its parents) is not a directory.
    NotADirectory,
    /// A directory without a repository `config`.
    NoConfig,
}

impl Absence {
    /// The command that mends it.
    fn hint(&self, path: &std::path::Path) -> String {
        match self {
            Absence::NotADirectory => {
                "pass a repository's directory, or create one with `volsnap init --repo DIR`".into()
            }
            Absence::ParentMissing { parent } => format!(
                "mount or create {} first, then `volsnap init --repo {}`",
                parent.display(),
                path.display()
            ),
            _ => format!("create one with `volsnap init --repo {}`", path.display()),
        }
    }
}

impl std::fmt::Display for Absence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Absence::Missing => write!(f, "the directory does not exist"),
            Absence::ParentMissing { parent } => write!(
                f,
                "neither it nor {} exists (a disk not mounted, or a mistyped path?)",
                parent.display()
            ),
            Absence::NotADirectory => write!(f, "it is not a directory"),
            Absence::NoConfig => write!(f, "the directory holds no volsnap config"),
        }
    }
}

/// Converts a rustix errno into an `io::Error`.
pub(crate) fn errno(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

//! The files cache: per series, volume and directory, the stat signature of every file
//! of the last snapshot that read it, with its chunk list and xattrs, so an unchanged
//! file is neither read nor hashed again.
//!
//! Key: `series \0 label \0 relative directory path`. Value: postcard `DirCache`.
//! **Invariant:** a row is written only after the snapshot that produced it is
//! committed, so its chunks are referenced by a committed snapshot.
//! **Invariant:** a file is cached only when it was stable while read and not "racily
//! clean" (its mtime and ctime are older than the scan start minus `RACY_WINDOW_NS`).
//! Garbage collection that deletes chunks must drop the rows of the series concerned.
//! Rows are derived data: a row that fails to decode is ignored.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::Id;
use crate::limits::CACHE_ROWS_PER_TRANSACTION;
use crate::repo::Repository;
use crate::tree::Xattr;

/// What the cache remembers of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    pub name: Vec<u8>,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub xattrs: Vec<Xattr>,
    pub chunks: Vec<Id>,
}

/// The cached files of one directory, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirCache {
    pub files: Vec<CachedFile>,
}

impl DirCache {
    pub fn get(&self, name: &[u8]) -> Option<&CachedFile> {
        self.files
            .binary_search_by(|f| f.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.files[i])
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("cache rows encode")
    }
}

/// The row key of a directory.
pub fn key(series: &str, label: &str, rel_dir: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(series.len() + label.len() + rel_dir.len() + 2);
    k.extend_from_slice(series.as_bytes());
    k.push(0);
    k.extend_from_slice(label.as_bytes());
    k.push(0);
    k.extend_from_slice(rel_dir);
    k
}

/// Loads a directory's row; returns its raw bytes too so unchanged rows are not rewritten.
pub fn load(repo: &Repository, key: &[u8]) -> Result<Option<(DirCache, Vec<u8>)>> {
    Ok(repo
        .index
        .cache_get(key)?
        .and_then(|bytes| postcard::from_bytes(&bytes).ok().map(|c| (c, bytes))))
}

/// Writes rows in bounded transactions.
pub fn store(repo: &Repository, rows: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    for batch in rows.chunks(CACHE_ROWS_PER_TRANSACTION) {
        repo.index.cache_put(batch)?;
    }
    Ok(())
}

//! The files cache: per series, volume and directory, the stat signature of every file
//! of the last snapshot that read it, with its chunk list and xattrs, so an unchanged
//! file is neither read nor hashed again.
//!
//! Key: `series \0 label \0 relative directory path`. Value: `ROW_MAGIC`, a version
//! byte (2), then postcard `DirCache`. The magic is ten 0xff bytes, an invalid postcard
//! length: rows of version 1 (plain postcard, chunk lists without runs) fail to decode
//! here and are ignored, and builds that wrote version 1 fail to decode these rows, so
//! they ignore them and their gc drops them. A row is never read as the other layout.
//! **Invariant:** a row is written only after the snapshot that produced it is
//! committed, so its chunks are referenced by a committed snapshot.
//! **Invariant:** a file is cached only when it was stable while read and not "racily
//! clean" (its mtime and ctime are older than the scan start minus `RACY_WINDOW_NS`).
//! Garbage collection that deletes chunks must drop the rows of the series concerned.
//! Rows are derived data: a row that fails to decode is ignored.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::limits::CACHE_ROWS_PER_TRANSACTION;
use crate::repo::Repository;
use crate::tree::{Run, Xattr};

/// The start of every row: an invalid postcard varint (see the module comment).
const ROW_MAGIC: [u8; 10] = [0xff; 10];
const ROW_VERSION: u8 = 2;

/// What the cache remembers of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    pub name: Vec<u8>,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub xattrs: Vec<Xattr>,
    pub chunks: Vec<Run>,
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
        let mut out = ROW_MAGIC.to_vec();
        out.push(ROW_VERSION);
        postcard::to_io(self, &mut out).expect("cache rows encode");
        out
    }

    /// Decodes a row; `None` for a row of another version or damaged bytes. A hit's
    /// chunk list goes into a tree as it is, so a row holding a run of no chunks (which
    /// no tree may hold) is damaged too.
    pub fn decode(row: &[u8]) -> Option<DirCache> {
        let rest = row.strip_prefix(&ROW_MAGIC[..])?;
        let cache: DirCache = match rest.split_first() {
            Some((&ROW_VERSION, body)) => postcard::from_bytes(body).ok()?,
            _ => return None,
        };
        let runs_sound = cache
            .files
            .iter()
            .all(|f| f.chunks.iter().all(|r| r.count > 0));
        runs_sound.then_some(cache)
    }

    /// Every chunk id the row names.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &Id> {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|r| &r.id))
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
        .and_then(|bytes| DirCache::decode(&bytes).map(|c| (c, bytes))))
}

/// Rows waiting for their snapshot's commit, in an unnamed temporary file of the
/// repository's `tmp/` (gone with the process whatever happens): memory stays bounded
/// however many directories a snapshot has.
#[derive(Debug)]
pub struct Spool {
    file: std::io::BufWriter<std::fs::File>,
    rows: u64,
}

impl Spool {
    pub fn new(repo: &Repository) -> Result<Spool> {
        let tmp = repo.tmp_dir();
        let file =
            tempfile::tempfile_in(&tmp).map_err(Error::io("create a temporary file in", &tmp))?;
        Ok(Spool {
            file: std::io::BufWriter::new(file),
            rows: 0,
        })
    }

    /// Appends a row: key length, value length (u32 LE each), key, value.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        use std::io::Write;
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(key.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&(value.len() as u32).to_le_bytes());
        let w = &mut self.file;
        w.write_all(&head)
            .and_then(|()| w.write_all(key))
            .and_then(|()| w.write_all(value))
            .map_err(Error::io("write the files-cache spool in", "tmp/"))?;
        self.rows += 1;
        Ok(())
    }
}

/// Writes a spool's rows in bounded transactions.
pub fn store_spool(repo: &Repository, spool: Spool) -> Result<()> {
    use std::io::{Read, Seek};
    let io = Error::io("read the files-cache spool in", "tmp/");
    let mut file = spool.file.into_inner().map_err(|e| io(e.into_error()))?;
    file.rewind()
        .map_err(Error::io("read the files-cache spool in", "tmp/"))?;
    let mut file = std::io::BufReader::new(file);
    let mut batch = Vec::new();
    for _ in 0..spool.rows {
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .map_err(Error::io("read the files-cache spool in", "tmp/"))?;
        let key_len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let value_len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
        let mut key = vec![0; key_len];
        let mut value = vec![0; value_len];
        file.read_exact(&mut key)
            .and_then(|()| file.read_exact(&mut value))
            .map_err(Error::io("read the files-cache spool in", "tmp/"))?;
        batch.push((key, value));
        if batch.len() == CACHE_ROWS_PER_TRANSACTION {
            repo.index.cache_put(&batch)?;
            crate::crash::point("files cache rows written");
            batch.clear();
        }
    }
    if !batch.is_empty() {
        repo.index.cache_put(&batch)?;
        crate::crash::point("files cache rows written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row as version 1 wrote it.
    #[derive(Serialize, Deserialize)]
    struct V1File {
        name: Vec<u8>,
        size: u64,
        mtime_ns: i64,
        ctime_ns: i64,
        ino: u64,
        xattrs: Vec<Xattr>,
        chunks: Vec<Id>,
    }

    #[derive(Serialize, Deserialize)]
    struct V1Dir {
        files: Vec<V1File>,
    }

    #[test]
    fn rows_of_either_version_are_never_read_as_the_other() {
        let row = DirCache {
            files: vec![CachedFile {
                name: b"f".to_vec(),
                size: 1 << 40,
                mtime_ns: 1,
                ctime_ns: 2,
                ino: 3,
                xattrs: Vec::new(),
                chunks: vec![Run {
                    id: Id::of(b"z"),
                    count: 1 << 20,
                }],
            }],
        };
        let bytes = row.encode();
        assert_eq!(DirCache::decode(&bytes), Some(row));
        assert!(postcard::from_bytes::<V1Dir>(&bytes).is_err());
        let old = postcard::to_stdvec(&V1Dir {
            files: vec![V1File {
                name: b"f".to_vec(),
                size: 3,
                mtime_ns: 1,
                ctime_ns: 2,
                ino: 3,
                xattrs: Vec::new(),
                chunks: vec![Id::of(b"abc")],
            }],
        })
        .unwrap();
        assert_eq!(DirCache::decode(&old), None);
        assert_eq!(DirCache::decode(&[]), None);
    }
}

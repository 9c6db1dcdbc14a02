//! Where a repository's ground truth lives: a local directory or an S3-compatible
//! object store, behind one small trait.
//!
//! The repository code names objects by keys (`config`, `packs/ab/<id>.pack`,
//! `snapshots/<id>`, `series/<hex>`, ...) and calls `Store`; nothing else knows which
//! kind of store it has. Objects are written whole and never seen half-written: a
//! local store writes a temporary file, fsyncs it and renames it into place; an object
//! store's PUT is atomic by itself. Every object is immutable once written except the
//! few the repository replaces as a whole (`series/*`), and content-addressed names make
//! a repeated write of the same key with the same bytes harmless, so no operation
//! needs a conditional write (which some stores silently ignore; see ARCHITECTURE.md).
//!
//! Everything derived from the ground truth (the index, the files cache, journals,
//! locks, staging) lives in a local directory, the cache: for a local repository the
//! repository directory itself (its layout is unchanged since format version 1), for
//! an object-store repository `$XDG_CACHE_HOME/volsnap/<repository id>` (see
//! `Location::cache_dir`).

mod local;
mod s3;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use local::LocalStore;
pub use s3::S3Store;

use crate::error::Result;

/// One object found by `Store::list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Its key, relative to the store's root (`packs/ab/<id>.pack`).
    pub key: String,
    pub size: u64,
    /// When the object was written, by the store's clock (an object store's
    /// Last-Modified; a local file's mtime). Only ever compared with another time
    /// from the same store, never with this host's clock.
    pub modified: Option<std::time::SystemTime>,
}

/// The operations the repository needs of the place its ground truth lives.
pub trait Store: Send + Sync {
    /// The location as the user gave it (a path or `s3://bucket/prefix`).
    fn location(&self) -> String;

    /// How messages name the object `key` (a path, or an `s3://` URL).
    fn display(&self, key: &str) -> PathBuf;

    /// The whole object, or `None` if there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// `get` of each of `keys`, in that order. An object store has several of the
    /// requests in flight at once.
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// Bytes `range` of the object (fewer if the object is shorter), or `None` if
    /// there is no such object.
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Vec<u8>>>;

    /// A local file holding the object's bytes, for reading at offsets (a local store
    /// opens the object itself; an object store downloads it into an unnamed file in
    /// `tmp`), or `None` if there is no such object.
    fn open(&self, key: &str, tmp: &Path) -> Result<Option<File>>;

    /// The object's size, or `None` if there is none.
    fn size(&self, key: &str) -> Result<Option<u64>>;

    /// Writes the object whole and durably, replacing any object of that key; when it
    /// returns, every later `get` anywhere sees it. `staged` names a crash point reached
    /// after the bytes are durable somewhere but before they are visible under `key`.
    fn put(&self, key: &str, bytes: &[u8], staged: Option<&'static str>) -> Result<()>;

    /// Starts `put` and returns a handle whose `Upload::wait` returns once the object
    /// is durable (with `put`'s guarantees) or the write failed. An object store goes on
    /// with the request in the background, so several can be in flight while the
    /// caller works; a local store writes before returning. `staged` as for `put`.
    fn put_started(
        &self,
        key: &str,
        bytes: Vec<u8>,
        staged: Option<&'static str>,
    ) -> Result<Upload> {
        self.put(key, &bytes, staged)?;
        Ok(Upload::done())
    }

    /// Writes the object unless one of that key exists. Returns whether it wrote.
    /// Only a local store makes this atomic; on an object store two concurrent calls
    /// may both write (see ARCHITECTURE.md): callers must not need more.
    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool>;

    /// Removes the object durably; an absent object is fine.
    fn delete(&self, key: &str) -> Result<()>;

    /// Every object whose key starts with `prefix` (a directory-like prefix ending in
    /// `/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<Object>>;

    /// The "directories" directly under `prefix` (a prefix ending in `/`): every
    /// distinct `prefix` + NAME + `/` some key starts with, as that string, sorted. One
    /// request per thousand names on an object store (a delimiter listing), whatever the
    /// number of objects below them.
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>>;

    /// Every object under `prefix` whose key sorts after `after` (a full key, which
    /// need not exist), in key order. Costs requests in proportion to what it returns,
    /// not to what sorts before `after`.
    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<Object>>;

    /// Gives back the space of byte ranges of an object no reader needs (gc). Returns
    /// the bytes freed, or `None` where the store cannot do it (gc then repacks).
    fn punch(&self, key: &str, runs: &[(u64, u64)]) -> Result<Option<u64>>;

    /// Bytes the object holds on its medium (`size` for an object store; fewer for a
    /// punched local file).
    fn allocated(&self, key: &str, size: u64) -> u64;

    /// Whether this store is the local directory the cache also lives in.
    fn is_local(&self) -> bool;
}

/// A write `Store::put_started` began: `wait` for its outcome. Dropping it without
/// waiting leaves the write to finish or fail on its own (nothing refers to the object
/// until the caller records it, so an abandoned write is at most an unreferenced object
/// that gc removes).
#[must_use = "an upload is durable only once `wait` returned Ok"]
pub struct Upload(Option<Box<dyn FnOnce() -> Result<()> + Send>>);

impl Upload {
    /// A write already done.
    pub fn done() -> Upload {
        Upload(None)
    }

    /// A write whose outcome `wait` will ask `outcome` for.
    pub fn pending(outcome: impl FnOnce() -> Result<()> + Send + 'static) -> Upload {
        Upload(Some(Box::new(outcome)))
    }

    /// Blocks until the object is durable; `Err` if the write failed.
    pub fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(outcome) => outcome(),
        }
    }
}

/// Where a repository is, as the user named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    /// `s3://BUCKET[/PREFIX]`: endpoint, region and credentials come from the standard
    /// AWS variables and files (see `s3`).
    S3 {
        bucket: String,
        prefix: String,
    },
}

impl Location {
    /// Parses `--repo`: `s3://BUCKET[/PREFIX]`, else a local path.
    pub fn parse(arg: &OsStr) -> std::result::Result<Location, String> {
        let bytes = arg.as_bytes();
        let Some(rest) = bytes.strip_prefix(b"s3://") else {
            if bytes.is_empty() {
                return Err("the repository location is empty".into());
            }
            return Ok(Location::Local(PathBuf::from(arg)));
        };
        let rest = std::str::from_utf8(rest)
            .map_err(|_| "an s3:// repository location must be UTF-8".to_string())?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!(
                "{:?} is not a bucket name (3 to 63 lowercase letters, digits, '-' or '.'); \
                 use s3://BUCKET[/PREFIX]",
                bucket
            ));
        }
        let prefix = prefix.trim_matches('/');
        let prefix_ok = prefix.split('/').all(|part| {
            prefix.is_empty()
                || (!part.is_empty()
                    && part != "."
                    && part != ".."
                    && part.bytes().all(|b| b.is_ascii_graphic()))
        });
        if !prefix_ok {
            return Err(format!(
                "{prefix:?} is not a usable prefix in s3://{bucket}/ (no empty, '.' or '..' \
                 parts, no spaces or control characters)"
            ));
        }
        Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The location as the user writes it.
    pub fn to_os_string(&self) -> OsString {
        match self {
            Location::Local(p) => p.clone().into_os_string(),
            Location::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}").into(),
            Location::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}").into(),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Location::Local(_))
    }

    /// Opens the store at this location (no request is made yet for an object store).
    pub fn open_store(&self) -> Result<Box<dyn Store>> {
        Ok(match self {
            Location::Local(root) => Box::new(LocalStore::new(root)),
            Location::S3 { bucket, prefix } => Box::new(S3Store::new(bucket, prefix)?),
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_os_string().to_string_lossy())
    }
}

/// The cache directory of an object-store repository with id `repo_id`:
/// `override_dir` if given, else `$XDG_CACHE_HOME/volsnap/<id>`, else
/// `$HOME/.cache/volsnap/<id>`.
pub fn cache_dir(repo_id: &str, override_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = override_dir {
        return d.to_path_buf();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("volsnap").join(repo_id);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/volsnap").join(repo_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let p = |s: &str| Location::parse(OsStr::new(s));
        assert_eq!(p("/srv/repo"), Ok(Location::Local("/srv/repo".into())));
        assert_eq!(
            p("s3://backups/hosts/a/"),
            Ok(Location::S3 {
                bucket: "backups".into(),
                prefix: "hosts/a".into()
            })
        );
        assert_eq!(
            p("s3://backups"),
            Ok(Location::S3 {
                bucket: "backups".into(),
                prefix: "".into()
            })
        );
        assert!(p("s3://").is_err());
        assert!(p("s3://Bad_Bucket/x").is_err());
        assert!(p("s3://bucket/a/../b").is_err());
        assert!(p("s3://bucket/a//b").is_err());
        assert!(p("").is_err());
        assert_eq!(
            p("s3://b-1/x").unwrap().to_string(),
            "s3://b-1/x".to_string()
        );
    }
}

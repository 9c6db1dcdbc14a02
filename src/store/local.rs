//! A store in a local directory: the layout of format version 1, unchanged.
//!
//! Objects are files named by their keys under the root. Writes go through `fsutil`
//! (temporary file in `tmp/`, fsync, rename, directory fsync); the directories of keys
//! are created on first use, and every process fsyncs a directory's parent the first
//! time it writes into it, so that no durable object depends on another (possibly
//! killed) process having made its directory's entry durable.

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Object, Store};
use crate::error::{Error, Result};
use crate::fsutil;

pub struct LocalStore {
    root: PathBuf,
    /// Directories this process has made durable (see the module comment).
    dirs: Mutex<HashSet<PathBuf>>,
}

impl LocalStore {
    pub fn new(root: &Path) -> LocalStore {
        LocalStore {
            root: root.to_path_buf(),
            dirs: Mutex::default(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        let mut known = self.dirs.lock().expect("dir lock");
        if known.contains(dir) {
            return Ok(());
        }
        fsutil::create_dir_private(dir)?;
        if dir != self.root {
            fsutil::fsync_dir(dir.parent().expect("a key's directory has a parent"))?;
        }
        known.insert(dir.to_path_buf());
        Ok(())
    }

    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

fn missing(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound)
}

impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn display(&self, key: &str) -> PathBuf {
        self.path(key)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(Error::io("read", &path)(e)),
        }
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(Error::io("open", &path)(e)),
        };
        let mut buf = vec![0u8; range.end.saturating_sub(range.start) as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], range.start + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", &path)(e)),
            }
        }
        buf.truncate(got);
        Ok(Some(buf))
    }

    fn open(&self, key: &str, _tmp: &Path) -> Result<Option<File>> {
        let path = self.path(key);
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(Error::io("open", &path)(e)),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(Error::io("stat", &path)(e)),
        }
    }

    fn put(&self, key: &str, bytes: &[u8], staged: Option<&'static str>) -> Result<()> {
        let path = self.path(key);
        self.ensure_dir(path.parent().expect("keys have a directory"))?;
        // A unique temporary name: another process may be writing the same key, and a
        // crashed one may have left a partial file behind.
        let tmp = fsutil::write_temp_durable(&self.tmp(), bytes)?;
        if let Some(point) = staged {
            crate::crash::point(point);
        }
        fsutil::persist_durable(tmp, &path)
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let path = self.path(key);
        self.ensure_dir(path.parent().expect("keys have a directory"))?;
        fsutil::write_new_durable(&self.tmp(), &path, bytes)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if missing(&e) => return Ok(()),
            Err(e) => return Err(Error::io("remove", &path)(e)),
        }
        fsutil::fsync_dir(path.parent().expect("keys have a directory"))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Object>> {
        let mut out = Vec::new();
        let mut dirs = vec![(self.path(prefix), prefix.to_string(), 0)];
        while let Some((dir, key_prefix, depth)) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if missing(&e) => continue,
                Err(e) => return Err(Error::io("read directory", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(Error::io("read directory", &dir))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let kind = entry.file_type().map_err(Error::io("stat", entry.path()))?;
                let key = format!("{key_prefix}{name}");
                if kind.is_dir() && depth < 2 {
                    dirs.push((entry.path(), format!("{key}/"), depth + 1));
                } else if kind.is_file() {
                    let meta = entry.metadata().ok();
                    out.push(Object {
                        key,
                        size: meta.as_ref().map_or(0, |m| m.len()),
                        modified: meta.and_then(|m| m.modified().ok()),
                    });
                }
            }
        }
        Ok(out)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.path(prefix);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if missing(&e) => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read directory", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("read directory", &dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if entry
                .file_type()
                .map_err(Error::io("stat", entry.path()))?
                .is_dir()
            {
                out.push(format!("{prefix}{name}/"));
            }
        }
        out.sort();
        Ok(out)
    }

    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<Object>> {
        let mut out: Vec<Object> = self
            .list(prefix)?
            .into_iter()
            .filter(|o| o.key.as_str() > after)
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn punch(&self, key: &str, runs: &[(u64, u64)]) -> Result<Option<u64>> {
        let path = self.path(key);
        crate::pack::punch(&path, runs).map_err(Error::io("punch holes in pack", &path))
    }

    fn allocated(&self, key: &str, size: u64) -> u64 {
        std::fs::metadata(self.path(key)).map_or(size, |m| size.min(m.blocks() * 512))
    }

    fn is_local(&self) -> bool {
        true
    }
}

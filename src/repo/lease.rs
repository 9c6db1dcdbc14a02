//! Leases: the claim an in-flight operation (snapshot, restore, export, check) holds
//! on the repository, so garbage collection never deletes what it may still use.
//!
//! A lease is a row in the index (`leases`: id → `LeaseRow`) plus an exclusive kernel
//! lock (`File::lock`, flock) on its own file in `locks/`. The lock dies with the
//! process, so a lease can never go stale: a row whose file is not locked belongs to a
//! dead process and is ignored and cleaned up. No timers or clocks decide anything.
//! **Invariant:** the lock is taken before the row is written, so a row whose lock
//! can be taken by someone else is dead, never "not yet locked".
//! **Invariant:** lease ids only grow, so "leases older than X" is "ids below X".

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repo::Repository;

/// What the index stores of a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRow {
    /// File name of its lock in `locks/`.
    pub lock: String,
    pub pid: u32,
    /// "snapshot", "restore", "export", "check"...
    pub kind: String,
    pub started_ns: i64,
}

impl LeaseRow {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("lease rows encode")
    }

    /// Decodes a row; `None` for damaged bytes, and for a row whose lock is not a
    /// plain `lease-*` file name: `live_leases` deletes the lock file of a dead row,
    /// which must never be a path outside `locks/`.
    pub(crate) fn decode(bytes: &[u8]) -> Option<LeaseRow> {
        let row: LeaseRow = postcard::from_bytes(bytes).ok()?;
        let plain = row.lock.starts_with("lease-") && crate::tree::valid_name(row.lock.as_bytes());
        plain.then_some(row)
    }
}

/// A held lease; released on drop (and by the kernel if the process dies).
pub struct Lease<'r> {
    repo: &'r Repository,
    pub id: u64,
    _lock: tempfile::NamedTempFile,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.repo.held_leases.lock() {
            held.remove(&self.id);
        }
        // Best effort: if this fails the row is left, and its unlocked file marks it dead.
        let _ = self.repo.index.remove_lease(self.id);
    }
}

fn locks_dir(root: &Path) -> PathBuf {
    root.join("locks")
}

impl Repository {
    /// The oldest lease this process holds now, if any.
    pub fn oldest_held_lease(&self) -> Option<u64> {
        self.held_leases
            .lock()
            .ok()
            .and_then(|h| h.iter().next().copied())
    }

    /// Takes a lease for an operation of `kind`.
    pub fn lease(&self, kind: &str) -> Result<Lease<'_>> {
        let dir = locks_dir(&self.cache);
        if !dir.exists() {
            crate::fsutil::create_dir_private(&dir)?;
        }
        let lock = tempfile::Builder::new()
            .prefix("lease-")
            .tempfile_in(&dir)
            .map_err(Error::io("create lease lock in", &dir))?;
        lock.as_file()
            .lock()
            .map_err(Error::io("lock", lock.path()))?;
        let row = LeaseRow {
            lock: lock
                .path()
                .file_name()
                .expect("temp file has a name")
                .to_string_lossy()
                .into_owned(),
            pid: std::process::id(),
            kind: kind.to_string(),
            started_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
        };
        let id = self.index.insert_lease(&row.encode())?;
        // Every lookup under this lease must see the index as of now or later (a gc
        // condemnation committed before the lease must not be missed).
        self.index.refresh();
        self.held_leases.lock().expect("lease lock").insert(id);
        Ok(Lease {
            repo: self,
            id,
            _lock: lock,
        })
    }

    /// Takes a lease for reading the committed snapshot `snap`, then makes sure it is
    /// still committed, unless a lease this process still holds was held when `snap`
    /// was listed (then gc keeps its blobs whatever happened since). A snapshot
    /// resolved without a lease may have been forgotten, and its blobs swept, before
    /// this lease began; one still committed once the lease is held stays readable
    /// until the lease ends (gc waits for it).
    pub fn lease_for(&self, kind: &str, snap: &crate::snapshot::Listed) -> Result<Lease<'_>> {
        let lease = self.lease(kind)?;
        let guarded = snap
            .guarded_by
            .is_some_and(|l| self.held_leases.lock().expect("lease lock").contains(&l));
        if !guarded
            && self
                .store
                .size(&crate::snapshot::record::record_key(&snap.id))?
                .is_none()
        {
            return Err(Error::SnapshotRef {
                reference: snap.id.hex(),
                detail: "it was forgotten while this command started; nothing was read".into(),
            });
        }
        Ok(lease)
    }

    /// The leases whose holders are alive, oldest first. Rows of dead holders are
    /// removed on the way.
    pub fn live_leases(&self) -> Result<Vec<(u64, LeaseRow)>> {
        let mut out = Vec::new();
        for (id, bytes) in self.index.leases()? {
            let Some(row) = LeaseRow::decode(&bytes) else {
                self.index.remove_lease(id)?;
                continue;
            };
            if lock_is_held(&locks_dir(&self.cache).join(&row.lock))? {
                out.push((id, row));
            } else {
                self.index.remove_lease(id)?;
                let _ = std::fs::remove_file(locks_dir(&self.cache).join(&row.lock));
            }
        }
        Ok(out)
    }
}

impl Repository {
    /// Whether any lease lock (or the gc lock) in `locks/` is held, read from the lock
    /// files alone (the index may be missing, as when it is being rebuilt).
    pub fn any_live_lock(root: &Path) -> Result<bool> {
        let dir = locks_dir(root);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("read directory", &dir)(e)),
        };
        for e in entries {
            let path = e.map_err(Error::io("read directory", &dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if (name.starts_with("lease-") || name == "gc.lock") && lock_is_held(&path)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Whether some process holds the lock on `path`.
fn lock_is_held(path: &Path) -> Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("open lease lock", path)(e)),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("test lease lock", path)(e)),
    }
}

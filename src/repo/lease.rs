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
//!
//! Kernel locks do not cross hosts. On an object store every lease is also an object,
//! `leases/<host id hex>/<lease id>`, written after the kernel lock is taken and
//! deleted (before the lock is released) when the lease ends; a gc on any host waits
//! for it (see `gc` and ARCHITECTURE.md, "gc across hosts"). Right after writing it,
//! the holder reads every running gc's condemned set (`gc/*`) into its own index as
//! condemnations, so it never reuses what such a gc may delete. A lease object is
//! proven dead only by its own host (the same host id, i.e. the same cache): its lock
//! file there is free. Any command on that host deletes its own dead lease objects
//! when it opens the repository (`clean_dead_bucket_leases`).

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

/// What a lease object in an object store holds (JSON, for people reading a bucket).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketLease {
    /// "snapshot", "restore", "export", "check", "copy".
    pub kind: String,
    pub pid: u32,
    /// File name of its lock in the holder's `<cache>/locks/`.
    pub lock: String,
    /// For messages only: hosts are told apart by their host id.
    pub hostname: String,
}

/// What a running gc's object `gc/<host id hex>-<gc id>` holds: the blobs it condemned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcObject {
    pub host: String,
    pub condemned: Vec<[u8; 32]>,
}

impl GcObject {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(self).expect("gc objects encode");
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<GcObject> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        (blake3::hash(body).as_bytes() == sum)
            .then(|| postcard::from_bytes(body).ok())
            .flatten()
    }
}

/// The prefix of every lease object in the store.
pub const LEASES_PREFIX: &str = "leases/";
/// The prefix of every running gc's condemned set in the store.
pub const GC_PREFIX: &str = "gc/";

pub fn hex16(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A held lease; released on drop (and by the kernel if the process dies).
pub struct Lease<'r> {
    repo: &'r Repository,
    pub id: u64,
    /// Its object in an object store (none for a local repository).
    bucket_key: Option<String>,
    _lock: tempfile::NamedTempFile,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // Before the kernel lock goes (with `_lock`, after this): an object whose lock
        // is free is dead, never "not yet deleted". Best effort: if the DELETE fails,
        // the next command on this host finds the object dead and deletes it.
        if let Some(key) = self.bucket_key.take() {
            crate::crash::point("lease ending");
            let _ = self.repo.store.delete(&key);
        }
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
        self.held_leases.lock().expect("lease lock").insert(id);
        let mut lease = Lease {
            repo: self,
            id,
            bucket_key: None,
            _lock: lock,
        };
        if !self.store.is_local() {
            let key = format!(
                "{LEASES_PREFIX}{}/{id:020}",
                crate::repo::sync::host_id(self)?
            );
            let body = BucketLease {
                kind: row.kind.clone(),
                pid: row.pid,
                lock: row.lock.clone(),
                hostname: crate::snapshot::create::hostname(),
            };
            let bytes = serde_json::to_vec(&body).expect("leases encode");
            self.store.put(&key, &bytes, None)?;
            lease.bucket_key = Some(key);
            crate::crash::point("lease written");
            // After the lease object is visible: any gc that listed leases without it
            // had already written its condemned set, which this listing sees.
            self.import_gc_condemnations()?;
        }
        // Every lookup under this lease must see the index as of now or later (a gc
        // condemnation committed before the lease must not be missed).
        self.index.refresh();
        Ok(lease)
    }

    /// Reads every running gc's condemned set (`gc/*` in an object store) into the
    /// index as condemnations. A set that cannot be read stops the caller: reusing a
    /// blob such a gc may delete would lose data.
    fn import_gc_condemnations(&self) -> Result<()> {
        let running = self.store.list(GC_PREFIX)?;
        if !running.is_empty() {
            // Condemnations are recorded on index rows: rows of other hosts' packs a
            // snapshot deferred must be there first, or indexing them later would
            // make blobs that gc is deleting look stored.
            self.apply_pending_logs()?;
        }
        for obj in running {
            let Some(bytes) = self.store.get(&obj.key)? else {
                continue; // that gc ended meanwhile
            };
            let gc = GcObject::decode(&bytes).ok_or_else(|| {
                Error::Usage(format!(
                    "{} is damaged: a gc of host {} may be running; if none is, delete that object",
                    self.store.display(&obj.key).display(),
                    obj.key.trim_start_matches(GC_PREFIX),
                ))
            })?;
            let ids: Vec<crate::id::Id> = gc.condemned.iter().map(|r| crate::id::Id(*r)).collect();
            self.index
                .import_condemned(&ids, crate::limits::GC_ROWS_PER_TRANSACTION)?;
        }
        Ok(())
    }

    /// Every lease object in the store, with its holder's host id (hex) and lease id.
    pub fn bucket_leases(&self) -> Result<Vec<(crate::store::Object, String)>> {
        let mut out = Vec::new();
        for obj in self.store.list(LEASES_PREFIX)? {
            let rest = &obj.key[LEASES_PREFIX.len()..];
            if let Some((host, _)) = rest.split_once('/') {
                let host = host.to_string();
                out.push((obj, host));
            }
        }
        Ok(out)
    }

    /// Whether the lease object `key` of this host is dead: its lock file here is
    /// free (or gone), or the object is unreadable or gone.
    pub fn own_bucket_lease_is_dead(&self, key: &str) -> Result<bool> {
        let Some(bytes) = self.store.get(key)? else {
            return Ok(true);
        };
        let Ok(lease) = serde_json::from_slice::<BucketLease>(&bytes) else {
            return Ok(true);
        };
        if !(lease.lock.starts_with("lease-") && crate::tree::valid_name(lease.lock.as_bytes())) {
            return Ok(true);
        }
        Ok(!lock_is_held(&locks_dir(&self.cache).join(&lease.lock))?)
    }

    /// Deletes this host's dead lease objects (left by a killed process, or by a
    /// DELETE that failed). One LIST of this host's prefix; nothing for a local store.
    /// Returns how many were deleted.
    pub fn clean_dead_bucket_leases(&self) -> Result<u64> {
        if self.store.is_local() {
            return Ok(0);
        }
        let prefix = format!("{LEASES_PREFIX}{}/", crate::repo::sync::host_id(self)?);
        let mut n = 0;
        for obj in self.store.list(&prefix)? {
            if self.own_bucket_lease_is_dead(&obj.key)? {
                self.store.delete(&obj.key)?;
                n += 1;
            }
        }
        Ok(n)
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

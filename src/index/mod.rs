//! The index: the only module that knows redb.
//!
//! Tables (keys and values are bytes; encodings are fixed here):
//! - `chunks`: blob id (32) → `Location` (48 bytes: pack id, offset u64 LE, stored_len u32 LE, raw_len u32 LE)
//! - `packs`: pack id (32) → postcard `PackRow`
//! - `snapshots`: snapshot id (32) → the snapshot record file's bytes
//! - `series`: series name → highest version ever allocated (u64)
//! - `files`: files-cache key → files-cache value (owned by `snapshot::cache`)
//! - `meta`: name → bytes
//! - `sync`: host id (hex) → the sequence number of the last of its logs applied here
//! - `gone`: pack id (32) → 0: packs a removal log named (their logs are not applied)
//! - `alt`: blob id (32) ++ pack id (32) → `Location`: other copies of a blob that sync
//!   saw in another host's pack while the blob already had a row (used when a removal
//!   takes the row's pack away)
//!
//! **Invariant:** the index is derived data. Every row can be rebuilt from the packs and
//! the snapshot record files; losing `index.redb` loses nothing but time.
//! **Boundary:** no other module names a redb type.
//! Processes share the file in redb's `MultiWriter` mode; every write transaction is
//! short (one pack, one snapshot, or a bounded batch of cache rows or of gc's rows).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::limits::BLOB_SIZE_MAX;

mod faulty;

const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const PACKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("packs");
const SNAPSHOTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("snapshots");
const SERIES: TableDefinition<&str, u64> = TableDefinition::new("series");
const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files");
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Chunks a running gc found unreachable: dedup treats them as absent (see `gc`). A
/// condemned chunk whose row the sweep deleted stays here as a tombstone until gc has
/// dropped the files-cache rows that may name it: while any entry is here,
/// `any_condemned` holds and writers check their cache hits. (The value is unused.)
const CONDEMNED: TableDefinition<&[u8], u64> = TableDefinition::new("condemned");
/// Sync cursors: host id (hex) → sequence number of the last log of that host applied.
const SYNC: TableDefinition<&str, u64> = TableDefinition::new("sync");
/// Packs a removal log named: a log of one of them seen later is not applied.
const GONE: TableDefinition<&[u8], u64> = TableDefinition::new("gone");
/// Other copies of blobs (blob id ++ pack id → location), from other hosts' logs.
const ALT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("alt");

/// Where a blob lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: Id,
    /// Offset of the blob header within the pack.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

const LOCATION_LEN: usize = 48;

impl Location {
    pub(crate) fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut b = [0u8; LOCATION_LEN];
        b[0..32].copy_from_slice(&self.pack.0);
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.raw_len.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Location> {
        if b.len() != LOCATION_LEN {
            return None;
        }
        let loc = Location {
            pack: Id(b[0..32].try_into().ok()?),
            offset: u64::from_le_bytes(b[32..40].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[40..44].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[44..48].try_into().ok()?),
        };
        // A damaged row must not make a reader allocate gigabytes.
        (loc.stored_len <= BLOB_SIZE_MAX && loc.raw_len <= BLOB_SIZE_MAX).then_some(loc)
    }
}

/// What the index knows of a pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRow {
    pub kind: u8,
    pub size_bytes: u64,
    pub blobs: u64,
}

/// A pack another host logged (`repo::sync`): its row, its blobs' rows, and the pack
/// a gc repack emptied into it.
#[derive(Clone, Debug)]
pub struct SyncedPack {
    pub pack: Id,
    pub row: PackRow,
    pub blobs: Vec<(Id, Location)>,
    pub from: Option<Id>,
}

/// How long a cached read snapshot of the chunk table may serve lookups. A lookup
/// through a slightly old snapshot can only miss a chunk committed meanwhile (which is
/// then stored twice, harmlessly); it never reports a chunk that is not stored.
const CHUNK_READER_MAX_AGE: Duration = Duration::from_millis(50);

type ChunkTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;
type CondemnedTable = redb::ReadOnlyTable<&'static [u8], u64>;
/// A read snapshot of the chunk table and the condemned set, taken together.
type ChunkTables = (ChunkTable, CondemnedTable);

/// What a sweep did: the rows it deleted, and every tombstone it leaves (the blobs it
/// deleted and those a sweep that stopped had deleted).
#[derive(Debug, Default)]
pub struct Swept {
    pub deleted: Vec<(Id, Location)>,
    pub tombstones: std::collections::HashSet<Id>,
}

/// How `commit_pack` treats a blob whose id already has a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// New data: keep an existing location unless the chunk is condemned, in which
    /// case this copy replaces it (and the chunk is no longer condemned); a chunk with
    /// no row gets one, and loses any tombstone the sweep left.
    Store,
    /// A repack of pack `from`: move rows that still point into `from` to the new pack.
    Repack { from: Id },
    /// gc found these blobs in a pack it was about to delete, referenced and with no
    /// sound row: the rows are replaced by these locations.
    Mend,
}

/// The redb database of a repository.
pub struct Index {
    /// Shared by every operation; taken exclusively only to compact the file.
    /// `None` when the file was found damaged (every call then says so).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    /// Why the file is known to be damaged, once it is (see `guard`): set once, read
    /// without a lock on every call.
    damage: std::sync::OnceLock<String>,
    /// A shared read snapshot of the chunk table: opening a read transaction costs
    /// several microseconds (file locks), more than the lookup itself.
    chunk_reader: Mutex<Option<(Arc<ChunkTables>, Instant)>>,
    /// The first I/O error of the file in this process: after it redb refuses every
    /// call ("previous I/O error"), and errors then name it.
    io_failure: std::sync::OnceLock<String>,
}

impl Index {
    /// Opens `path`, creating it when `create` is set. A file that redb finds damaged
    /// (or panics on) still opens: every call then returns `Error::IndexDamaged`, so
    /// commands that can work from the record files (`list`) still do.
    pub fn open(path: &Path, create: bool) -> Result<Index> {
        if !create && !path.exists() {
            return Err(Error::IndexMissing {
                path: path.to_path_buf(),
            });
        }
        quiet_panics_in_index_calls();
        let mut builder = Database::builder();
        builder.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
        if create {
            crate::fsutil::ensure_private_file(path)?;
        }
        let opened = catch_quietly(|| {
            if crate::crash::io_faults() {
                // Test-only: writes and syncs through the fault layer (an existing file
                // is opened, as `open` would).
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(create)
                    .truncate(false)
                    .open(path)?;
                builder.create_with_backend(faulty::Faulty::new(file)?)
            } else if create {
                builder.create(path)
            } else {
                builder.open(path)
            }
        });
        let (db, damage) = match opened {
            Ok(Ok(db)) => (Some(db), None),
            Ok(Err(e)) => {
                let e: redb::Error = e.into();
                if !matches!(e, redb::Error::Corrupted(_)) {
                    return Err(Error::Index {
                        path: path.to_path_buf(),
                        detail: e.to_string(),
                    });
                }
                (None, Some(e.to_string()))
            }
            Err(why) => (None, Some(why)),
        };
        let index = Index {
            db: std::sync::RwLock::new(db),
            path: path.to_path_buf(),
            damage: damage.map_or_else(std::sync::OnceLock::new, std::sync::OnceLock::from),
            chunk_reader: Mutex::new(None),
            io_failure: std::sync::OnceLock::new(),
        };
        if create {
            // Create every table once so readers never meet a missing table.
            index.write(|txn| {
                txn.open_table(CHUNKS)?;
                txn.open_table(PACKS)?;
                txn.open_table(SNAPSHOTS)?;
                txn.open_table(SERIES)?;
                txn.open_table(FILES)?;
                txn.open_table(LEASES)?;
                txn.open_table(COUNTERS)?;
                txn.open_table(CONDEMNED)?;
                txn.open_table(SYNC)?;
                txn.open_table(GONE)?;
                txn.open_table(ALT)?;
                Ok(())
            })?;
        }
        Ok(index)
    }

    /// Why the index is known to be damaged, if it is.
    pub fn damage(&self) -> Option<String> {
        self.damage.get().cloned()
    }

    fn damaged_error(&self, detail: String) -> Error {
        Error::IndexDamaged {
            path: self.path.clone(),
            detail,
        }
    }

    /// Runs one index operation. redb asserts on some damaged files instead of
    /// returning an error: a panic here (or a `Corrupted` error) marks the index
    /// damaged for the rest of the process, and this and every later call return
    /// `Error::IndexDamaged`, which names `volsnap repair index`. Bytes on disk never
    /// crash a command.
    fn guard<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if let Some(why) = self.damage.get() {
            return Err(self.damaged_error(why.clone()));
        }
        let why = match catch_quietly(f) {
            Ok(Err(Error::IndexDamaged { detail, .. })) => detail,
            Ok(other) => return other,
            Err(panic) => panic,
        };
        let _ = self.damage.set(why.clone());
        Err(self.damaged_error(why))
    }

    fn err(&self, e: impl Into<redb::Error>) -> Error {
        let detail = self.io_detail(e.into());
        match detail {
            Ok(detail) => Error::Index {
                path: self.path.clone(),
                detail,
            },
            Err(why) => self.damaged_error(why),
        }
    }

    /// What a redb error says (`Err` for damage), remembering the first I/O error so
    /// that redb's later "previous I/O error" refusals name it.
    fn io_detail(&self, e: redb::Error) -> std::result::Result<String, String> {
        match e {
            redb::Error::Corrupted(why) => Err(why),
            // Our tables are only ever opened with the types they were made with: a
            // stored definition that disagrees is a damaged file, not a usage error.
            e @ (redb::Error::TableTypeMismatch { .. }
            | redb::Error::TypeDefinitionChanged { .. }
            | redb::Error::TableIsMultimap(_)
            | redb::Error::TableIsNotMultimap(_)) => Err(e.to_string()),
            redb::Error::PreviousIo => Ok(match self.io_failure.get() {
                Some(first) => format!(
                    "closed after an earlier I/O error in this process ({first}); run the \
                     command again"
                ),
                None => redb::Error::PreviousIo.to_string(),
            }),
            e => {
                let detail = e.to_string();
                if matches!(e, redb::Error::Io(_)) {
                    let _ = self.io_failure.set(detail.clone());
                }
                Ok(detail)
            }
        }
    }

    /// A row or key that does not decode: the file is damaged.
    fn bad(&self, what: impl std::fmt::Display) -> Error {
        self.damaged_error(what.to_string())
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<T, redb::Error>,
    ) -> Result<T> {
        let db = self.db.read().expect("index lock");
        let db = db.as_ref().ok_or_else(|| self.bad("damaged"))?;
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn read(&self) -> Result<redb::ReadTransaction> {
        let db = self.db.read().expect("index lock");
        let db = db.as_ref().ok_or_else(|| self.bad("damaged"))?;
        db.begin_read().map_err(|e| self.err(e))
    }

    fn chunk_tables(&self) -> Result<Arc<ChunkTables>> {
        let mut cached = self.chunk_reader.lock().expect("index lock");
        if let Some((tables, at)) = cached.as_ref()
            && at.elapsed() < CHUNK_READER_MAX_AGE
        {
            return Ok(tables.clone());
        }
        let txn = self.read()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let condemned = txn.open_table(CONDEMNED).map_err(|e| self.err(e))?;
        let tables = Arc::new((chunks, condemned));
        *cached = Some((tables.clone(), Instant::now()));
        Ok(tables)
    }

    /// Compacts the file after large deletions. Best effort: an open transaction makes
    /// redb refuse (`Ok(false)`); anything else (an I/O error) is an `Err` to report.
    pub fn compact(&self) -> std::result::Result<bool, String> {
        self.refresh();
        let mut db = self.db.write().expect("index lock");
        match db.as_mut() {
            Some(db) => catch_quietly(|| match db.compact() {
                Err(redb::CompactionError::TransactionInProgress) => Ok(false),
                Err(e) => Err(self.io_detail(e.into()).unwrap_or_else(|why| why)),
                Ok(done) => Ok(done),
            })?,
            None => Err("the index is damaged".to_string()),
        }
    }

    /// Drops the shared read snapshot, so the next lookup sees every commit made so far.
    pub fn refresh(&self) {
        if self.damage.get().is_some() {
            return; // the cached tables are forgotten on drop (see `Drop`)
        }
        // Dropping the cached read snapshot runs redb code: guarded like every call.
        let _ = self.guard(|| {
            if let Ok(mut cached) = self.chunk_reader.lock() {
                *cached = None;
            }
            Ok(())
        });
    }

    /// Where the blob `id` is stored, if anywhere. Condemned chunks are still found:
    /// readers of committed snapshots need them. A blob missing from the shared read
    /// snapshot is looked up again in a fresh one, so a reader never misses a blob
    /// committed before its lookup.
    pub fn lookup(&self, id: &Id) -> Result<Option<Location>> {
        self.guard(|| {
            for attempt in 0..2 {
                if attempt == 1 {
                    self.refresh();
                }
                let tables = self.chunk_tables()?;
                if let Some(value) = tables.0.get(&id.0[..]).map_err(|e| self.err(e))? {
                    return Location::decode(value.value())
                        .map(Some)
                        .ok_or_else(|| self.bad(format!("bad location row for chunk {id}")));
                }
            }
            Ok(None)
        })
    }

    /// Whether a writer may reuse the stored blob `id` instead of storing it: it is
    /// indexed and not condemned by a running gc.
    pub fn is_stored(&self, id: &Id) -> Result<bool> {
        self.guard(|| {
            let tables = self.chunk_tables()?;
            if tables.0.get(&id.0[..]).map_err(|e| self.err(e))?.is_none() {
                return Ok(false);
            }
            Ok(tables.1.get(&id.0[..]).map_err(|e| self.err(e))?.is_none())
        })
    }

    /// Records a pack and the blobs in it, in one transaction (see `Commit` for blobs
    /// whose id already has a row).
    pub fn commit_pack(
        &self,
        pack: &Id,
        row: &PackRow,
        blobs: &[(Id, Location)],
        mode: Commit,
    ) -> Result<()> {
        self.guard(|| {
            let row_bytes = postcard::to_stdvec(row).expect("pack rows encode");
            self.write(|txn| {
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut condemned = txn.open_table(CONDEMNED)?;
                for (id, loc) in blobs {
                    let current = chunks
                        .get(&id.0[..])?
                        .and_then(|v| Location::decode(v.value()));
                    let replace = match (mode, current) {
                        // A tombstone left by a sweep goes with the blob's return: a
                        // later sweep must not take this copy for the one it deleted.
                        (Commit::Store, None) => {
                            condemned.remove(&id.0[..])?;
                            true
                        }
                        (Commit::Store, Some(_)) => condemned.remove(&id.0[..])?.is_some(),
                        // A repack only moves rows still pointing into the old pack; it
                        // never brings back a row deleted meanwhile.
                        (Commit::Repack { from }, Some(cur)) => cur.pack == from,
                        (Commit::Repack { .. }, None) => false,
                        (Commit::Mend, _) => true,
                    };
                    if replace {
                        chunks.insert(&id.0[..], &loc.encode()[..])?;
                    }
                }
                txn.open_table(PACKS)?.insert(&pack.0[..], &row_bytes[..])?;
                Ok(())
            })
        })
    }

    /// Where sync stands with every host: host id (hex) → sequence number of the last
    /// of its logs applied here.
    pub fn sync_cursors(&self) -> Result<std::collections::HashMap<String, u64>> {
        self.guard(|| {
            let txn = self.read()?;
            let table = match txn.open_table(SYNC) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
                Err(e) => return Err(self.err(e)),
            };
            let mut out = std::collections::HashMap::new();
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                out.insert(k.value().to_string(), v.value());
            }
            Ok(out)
        })
    }

    /// Moves the cursor of each host of `moved` to its seq unless it is already there
    /// or beyond, in one transaction.
    pub fn advance_sync_cursors(&self, moved: &[(String, u64)]) -> Result<()> {
        if moved.is_empty() {
            return Ok(());
        }
        self.guard(|| {
            self.write(|txn| {
                let mut table = txn.open_table(SYNC)?;
                for (host, seq) in moved {
                    let current = table.get(host.as_str())?.map_or(0, |v| v.value());
                    if *seq > current {
                        table.insert(host.as_str(), *seq)?;
                    }
                }
                Ok(())
            })
        })
    }

    /// Whether a removal log named `pack`.
    pub fn is_gone(&self, pack: &Id) -> Result<bool> {
        self.guard(|| {
            let txn = self.read()?;
            let table = match txn.open_table(GONE) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
                Err(e) => return Err(self.err(e)),
            };
            Ok(table.get(&pack.0[..]).map_err(|e| self.err(e))?.is_some())
        })
    }

    /// Records packs other hosts wrote, from their logs, in order and in one
    /// transaction. For each: a blob with no row gets one (and loses any tombstone); a
    /// row pointing into `from` (the pack this one was repacked from) moves here; a
    /// condemned row is replaced (as with `Commit::Store`); any other row stays, and
    /// this copy is remembered as another location of the blob (see `remove_packs`). A
    /// pack already gone is skipped.
    pub fn commit_synced_packs(&self, packs: &[SyncedPack]) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        self.guard(|| {
            self.write(|txn| {
                let gone = txn.open_table(GONE)?;
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut condemned = txn.open_table(CONDEMNED)?;
                let mut alt = txn.open_table(ALT)?;
                let mut rows = txn.open_table(PACKS)?;
                // Blob rows in key order (B-tree inserts in order touch each page
                // once); a blob in several packs keeps the packs' order.
                let mut blobs: Vec<(&Id, &Location, &SyncedPack)> = Vec::new();
                for p in packs {
                    if gone.get(&p.pack.0[..])?.is_some() {
                        continue;
                    }
                    blobs.extend(p.blobs.iter().map(|(id, loc)| (id, loc, p)));
                    let row_bytes = postcard::to_stdvec(&p.row).expect("pack rows encode");
                    rows.insert(&p.pack.0[..], &row_bytes[..])?;
                }
                blobs.sort_by_key(|(id, _, _)| *id);
                let any_condemned = !condemned.is_empty()?;
                for (id, loc, p) in blobs {
                    // Most blobs are new here: write the row, and put back the one it
                    // replaced when that one stays (one tree walk for a new blob).
                    let (current, old) = match chunks.insert(&id.0[..], &loc.encode()[..])? {
                        None => (None, None),
                        Some(v) => (Location::decode(v.value()), Some(v.value().to_vec())),
                    };
                    let uncondemn = |condemned: &mut redb::Table<&[u8], u64>| {
                        Ok::<_, redb::Error>(
                            any_condemned && condemned.remove(&id.0[..])?.is_some(),
                        )
                    };
                    let replace = match current {
                        // No row, or one that does not decode: this one is sound.
                        None => {
                            uncondemn(&mut condemned)?;
                            true
                        }
                        Some(cur) if cur.pack == p.pack => false,
                        Some(cur) if Some(cur.pack) == p.from => true,
                        Some(_) => uncondemn(&mut condemned)?,
                    };
                    if !replace {
                        if let Some(old) = &old {
                            chunks.insert(&id.0[..], &old[..])?;
                        }
                        if current.is_some_and(|c| c.pack != p.pack) {
                            alt.insert(&alt_key(id, &p.pack)[..], &loc.encode()[..])?;
                        }
                    }
                }
                Ok(())
            })
        })
    }

    /// Marks `packs` gone (a removal log names them): a log of one of them met later is
    /// not applied, and other locations remembered in them are forgotten. Rows are left
    /// to the caller (gc removes its own).
    pub fn mark_gone(&self, packs: &[Id]) -> Result<()> {
        self.guard(|| {
            if packs.is_empty() {
                return Ok(());
            }
            let set: std::collections::HashSet<Id> = packs.iter().copied().collect();
            self.write(|txn| {
                let mut gone = txn.open_table(GONE)?;
                for p in packs {
                    gone.insert(&p.0[..], 0)?;
                }
                drop_alt_in(&mut txn.open_table(ALT)?, &set)?;
                Ok(())
            })
        })
    }

    /// Applies removal logs: `packs` are gone from the store (or about to be), so their
    /// rows are dropped, every chunk row pointing into them moves to another known
    /// copy of the blob (`alt`) or is dropped, and they are remembered as gone. One pass
    /// over the chunk rows, in one transaction. Returns the chunk rows dropped.
    pub fn remove_packs(&self, packs: &[Id]) -> Result<u64> {
        self.guard(|| {
            if packs.is_empty() {
                return Ok(0);
            }
            let set: std::collections::HashSet<Id> = packs.iter().copied().collect();
            self.write(|txn| {
                let mut gone = txn.open_table(GONE)?;
                let mut pack_rows = txn.open_table(PACKS)?;
                for p in packs {
                    gone.insert(&p.0[..], 0)?;
                    pack_rows.remove(&p.0[..])?;
                }
                let mut alt = txn.open_table(ALT)?;
                drop_alt_in(&mut alt, &set)?;
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut dead = Vec::new();
                for item in chunks.iter()? {
                    let (k, v) = item?;
                    if let Some(loc) = Location::decode(v.value())
                        && set.contains(&loc.pack)
                    {
                        dead.push(k.value().to_vec());
                    }
                }
                let mut dropped = 0;
                for k in &dead {
                    let mut moved = None;
                    let mut lo = k.clone();
                    lo.extend_from_slice(&[0u8; 32]);
                    let mut hi = k.clone();
                    hi.extend_from_slice(&[0xffu8; 32]);
                    for item in alt.range::<&[u8]>(&lo[..]..=&hi[..])? {
                        let (ak, av) = item?;
                        let Some(loc) = Location::decode(av.value()) else {
                            continue;
                        };
                        if gone.get(&loc.pack.0[..])?.is_none() {
                            moved = Some((ak.value().to_vec(), loc));
                            break;
                        }
                    }
                    match moved {
                        Some((ak, loc)) => {
                            chunks.insert(&k[..], &loc.encode()[..])?;
                            alt.remove(&ak[..])?;
                        }
                        None => {
                            chunks.remove(&k[..])?;
                            dropped += 1;
                        }
                    }
                }
                Ok(dropped)
            })
        })
    }

    /// Number of indexed blobs.
    pub fn chunk_count(&self) -> Result<u64> {
        self.guard(|| {
            let txn = self.read()?;
            let table = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
            table.len().map_err(|e| self.err(e))
        })
    }

    /// gc step 2, in write transactions of at most `rows` chunk rows each, in key order
    /// (a writer waits for one batch, never for the whole table): condemns every indexed
    /// blob `reachable` rejects and lifts any earlier condemnation of the others (left by
    /// a gc that stopped). `between` runs after every batch that has another after it.
    /// Returns the number condemned and their stored bytes.
    pub fn condemn(
        &self,
        reachable: impl Fn(&Id) -> bool,
        rows: usize,
        mut between: impl FnMut(),
    ) -> Result<(u64, u64)> {
        assert!(rows > 0);
        // Only gc adds condemnations (one gc at a time): with none left by an earlier
        // one, there is nothing to lift.
        let stale = self.any_condemned()?;
        self.guard(|| {
            let (mut n, mut bytes) = (0, 0);
            let mut after: Option<Vec<u8>> = None;
            loop {
                let more = self.write(|txn| {
                    let chunks = txn.open_table(CHUNKS)?;
                    let mut condemned = txn.open_table(CONDEMNED)?;
                    let (batch, more) =
                        next_batch(&chunks, after.as_deref(), rows, |v| v.to_vec())?;
                    for (k, v) in &batch {
                        let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                            continue;
                        };
                        if !reachable(&Id(raw)) {
                            condemned.insert(&raw[..], 1)?;
                            n += 1;
                            bytes += Location::decode(v).map_or(0, |l| u64::from(l.stored_len));
                        } else if stale {
                            condemned.remove(&raw[..])?;
                        }
                    }
                    after = batch.into_iter().last().map(|(k, _)| k);
                    Ok(more)
                })?;
                if !more {
                    return Ok((n, bytes));
                }
                between();
            }
        })
    }

    /// gc step 4, in write transactions of at most `rows` condemned blobs each, in key
    /// order: the row of a condemned blob that `reachable` still rejects is deleted and
    /// its condemnation stays as a tombstone; the condemnation of a reachable one is
    /// lifted. A condemnation with no row (left by a sweep that stopped) stays a
    /// tombstone whatever `reachable` says: files-cache rows may name the blob. Each batch
    /// reads the condemnations inside its own transaction, so a blob a writer stored
    /// again meanwhile (lifting its condemnation) is never deleted. `between` runs after
    /// every batch that has another after it.
    pub fn sweep(
        &self,
        reachable: impl Fn(&Id) -> bool,
        rows: usize,
        mut between: impl FnMut(),
    ) -> Result<Swept> {
        assert!(rows > 0);
        self.guard(|| {
            let mut swept = Swept::default();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let more = self.write(|txn| {
                    let mut condemned = txn.open_table(CONDEMNED)?;
                    let mut chunks = txn.open_table(CHUNKS)?;
                    let (batch, more) = next_batch(&condemned, after.as_deref(), rows, |_| ())?;
                    for (k, ()) in &batch {
                        let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                            condemned.remove(&k[..])?;
                            continue;
                        };
                        let id = Id(raw);
                        if reachable(&id) {
                            if chunks.get(&raw[..])?.is_some() {
                                condemned.remove(&raw[..])?;
                                continue;
                            }
                        } else if let Some(v) = chunks.remove(&raw[..])?
                            && let Some(loc) = Location::decode(v.value())
                        {
                            swept.deleted.push((id, loc));
                        }
                        swept.tombstones.insert(id);
                    }
                    after = batch.into_iter().last().map(|(k, _)| k);
                    Ok(more)
                })?;
                if !more {
                    return Ok(swept);
                }
                between();
            }
        })
    }

    /// gc step 4, after the sweep: drops every files-cache row `stale` accepts, in write
    /// transactions of at most `rows` rows each. `between` runs after every batch that
    /// has another after it. Returns the number of rows dropped.
    pub fn drop_cache_rows(
        &self,
        stale: impl Fn(&[u8]) -> bool,
        rows: usize,
        mut between: impl FnMut(),
    ) -> Result<u64> {
        assert!(rows > 0);
        self.guard(|| {
            let mut dropped = 0;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let more = self.write(|txn| {
                    let mut files = txn.open_table(FILES)?;
                    let (batch, more) = next_batch(&files, after.as_deref(), rows, |v| v.to_vec())?;
                    for (k, v) in &batch {
                        if stale(v) {
                            files.remove(&k[..])?;
                            dropped += 1;
                        }
                    }
                    after = batch.into_iter().last().map(|(k, _)| k);
                    Ok(more)
                })?;
                if !more {
                    return Ok(dropped);
                }
                between();
            }
        })
    }

    /// gc step 4, last: forgets every tombstone. Only once a sweep has run to its end
    /// (only tombstones are left) and the files-cache rows naming them are dropped.
    /// Dropping the table costs a pass over its pages, not a B-tree update per row.
    pub fn clear_tombstones(&self) -> Result<()> {
        self.guard(|| {
            self.write(|txn| {
                txn.delete_table(CONDEMNED)?;
                txn.open_table(CONDEMNED)?;
                Ok(())
            })
        })
    }

    /// Condemns, as a running gc of another host asked (its `gc/` object, see
    /// `repo::lease`), every blob of `ids` this index has a row for, in write
    /// transactions of at most `rows` ids each: from then on dedup treats them as
    /// absent and writers check their files-cache hits, exactly as under a local gc.
    /// Storing a blob again lifts its condemnation; this host's next gc lifts the rest
    /// or sweeps their rows. Returns how many were newly condemned.
    pub fn import_condemned(&self, ids: &[Id], rows: usize) -> Result<u64> {
        assert!(rows > 0);
        self.guard(|| {
            let mut n = 0;
            for batch in ids.chunks(rows) {
                self.write(|txn| {
                    let chunks = txn.open_table(CHUNKS)?;
                    let mut condemned = txn.open_table(CONDEMNED)?;
                    for id in batch {
                        if chunks.get(&id.0[..])?.is_some()
                            && condemned.insert(&id.0[..], 1)?.is_none()
                        {
                            n += 1;
                        }
                    }
                    Ok(())
                })?;
            }
            Ok(n)
        })
    }

    /// Whether any blob is condemned (a gc is between its condemn and sweep steps).
    pub fn any_condemned(&self) -> Result<bool> {
        self.guard(|| {
            let txn = self.read()?;
            let table = txn.open_table(CONDEMNED).map_err(|e| self.err(e))?;
            Ok(!table.is_empty().map_err(|e| self.err(e))?)
        })
    }

    /// Live stored bytes (headers included) per pack, from the chunk rows.
    pub fn pack_live_bytes(&self) -> Result<std::collections::HashMap<Id, u64>> {
        self.guard(|| {
            let mut live = std::collections::HashMap::new();
            self.for_each_chunk(|_, loc| {
                *live.entry(loc.pack).or_insert(0) +=
                    crate::pack::blob::HEADER_LEN as u64 + u64::from(loc.stored_len);
            })?;
            Ok(live)
        })
    }

    /// Forgets a pack's row (its blobs' rows must already point elsewhere or be gone).
    pub fn remove_pack(&self, pack: &Id) -> Result<()> {
        self.guard(|| {
            self.write(|txn| {
                txn.open_table(PACKS)?.remove(&pack.0[..])?;
                Ok(())
            })
        })
    }

    /// Removes a snapshot's row (its record file is already gone).
    pub fn remove_snapshot(&self, id: &Id) -> Result<()> {
        self.guard(|| {
            self.write(|txn| {
                txn.open_table(SNAPSHOTS)?.remove(&id.0[..])?;
                Ok(())
            })
        })
    }

    /// Every pack the index knows.
    pub fn packs(&self) -> Result<Vec<(Id, PackRow)>> {
        self.guard(|| {
            let txn = self.read()?;
            let table = txn.open_table(PACKS).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let id = Id(k.value().try_into().map_err(|_| self.bad("bad pack key"))?);
                let row = postcard::from_bytes(v.value())
                    .map_err(|e| self.bad(format!("pack row {id}: {e}")))?;
                out.push((id, row));
            }
            Ok(out)
        })
    }

    /// Every chunk row (id, location), for check.
    pub fn for_each_chunk(&self, mut f: impl FnMut(Id, Location)) -> Result<()> {
        self.guard(|| {
            let txn = self.read()?;
            let table = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let id = Id(k
                    .value()
                    .try_into()
                    .map_err(|_| self.bad("bad chunk key"))?);
                let loc =
                    Location::decode(v.value()).ok_or_else(|| self.bad("bad location row"))?;
                f(id, loc);
            }
            Ok(())
        })
    }

    /// All snapshot rows: id → record bytes.
    pub fn snapshots(&self) -> Result<Vec<(Id, Vec<u8>)>> {
        self.guard(|| {
            let txn = self.read()?;
            let table = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let id = Id(k
                    .value()
                    .try_into()
                    .map_err(|_| self.bad("bad snapshot key"))?);
                out.push((id, v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Reserves the next version number of `series` in its own transaction, so no
    /// version is ever handed out twice: a crash after this leaves a gap, never a
    /// duplicate. It is above `floor` (the highest version forgotten in the series).
    pub fn reserve_version(&self, series: &str, floor: u64) -> Result<u64> {
        self.guard(|| {
            self.write(|txn| {
                let mut table = txn.open_table(SERIES)?;
                let version = table.get(series)?.map_or(0, |v| v.value()).max(floor) + 1;
                table.insert(series, version)?;
                Ok(version)
            })
        })
    }

    /// Adds the index row of a committed snapshot record.
    pub fn insert_snapshot(&self, id: &Id, record: &[u8]) -> Result<()> {
        self.guard(|| {
            self.write(|txn| {
                txn.open_table(SNAPSHOTS)?.insert(&id.0[..], record)?;
                Ok(())
            })
        })
    }

    /// Adds snapshot rows found on disk but missing here (a crash between the record
    /// file and its row) and drops rows whose record file is gone.
    pub fn reconcile_snapshots(
        &self,
        on_disk: &[(Id, Vec<u8>, String, u64)],
        gone: &[Id],
    ) -> Result<()> {
        self.guard(|| {
            if on_disk.is_empty() && gone.is_empty() {
                return Ok(());
            }
            self.write(|txn| {
                let mut snaps = txn.open_table(SNAPSHOTS)?;
                let mut series = txn.open_table(SERIES)?;
                for (id, bytes, name, version) in on_disk {
                    snaps.insert(&id.0[..], &bytes[..])?;
                    let current = series.get(name.as_str())?.map_or(0, |v| v.value());
                    if *version > current {
                        series.insert(name.as_str(), *version)?;
                    }
                }
                for id in gone {
                    snaps.remove(&id.0[..])?;
                }
                Ok(())
            })
        })
    }

    /// Registers a lease: allocates its id (ids only grow) and stores its row, in one
    /// transaction.
    pub fn insert_lease(&self, row: &[u8]) -> Result<u64> {
        self.guard(|| {
            self.write(|txn| {
                let mut counters = txn.open_table(COUNTERS)?;
                let id = counters.get("lease")?.map_or(0, |v| v.value()) + 1;
                counters.insert("lease", id)?;
                txn.open_table(LEASES)?.insert(id, row)?;
                Ok(id)
            })
        })
    }

    /// The id the next lease will get: every lease registered so far has a smaller one.
    pub fn next_lease_id(&self) -> Result<u64> {
        self.guard(|| {
            let txn = self.read()?;
            let counters = match txn.open_table(COUNTERS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(1),
                Err(e) => return Err(self.err(e)),
            };
            Ok(counters
                .get("lease")
                .map_err(|e| self.err(e))?
                .map_or(0, |v| v.value())
                + 1)
        })
    }

    pub fn remove_lease(&self, id: u64) -> Result<()> {
        self.guard(|| {
            self.write(|txn| {
                txn.open_table(LEASES)?.remove(id)?;
                Ok(())
            })
        })
    }

    /// Every registered lease (alive or left by a dead process).
    pub fn leases(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.guard(|| {
            let txn = self.read()?;
            let table = match txn.open_table(LEASES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(self.err(e)),
            };
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Reads one files-cache row.
    pub fn cache_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.guard(|| {
            let txn = self.read()?;
            let table = txn.open_table(FILES).map_err(|e| self.err(e))?;
            Ok(table
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// Writes files-cache rows, in one transaction (callers bound the batch).
    pub fn cache_put(&self, rows: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        self.guard(|| {
            if rows.is_empty() {
                return Ok(());
            }
            self.write(|txn| {
                let mut table = txn.open_table(FILES)?;
                for (k, v) in rows {
                    table.insert(&k[..], &v[..])?;
                }
                Ok(())
            })
        })
    }
}

/// The `alt` key of a copy of blob `id` in pack `pack`.
fn alt_key(id: &Id, pack: &Id) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(&id.0);
    k[32..].copy_from_slice(&pack.0);
    k
}

/// Drops the `alt` rows of copies in `packs` (the table holds only copies of blobs
/// two hosts stored at once, so a pass over it is short).
fn drop_alt_in(
    alt: &mut redb::Table<&'static [u8], &'static [u8]>,
    packs: &std::collections::HashSet<Id>,
) -> std::result::Result<(), redb::Error> {
    let mut drop = Vec::new();
    for item in alt.iter()? {
        let (k, _) = item?;
        let k = k.value();
        if k.len() == 64 && packs.contains(&Id(k[32..].try_into().expect("32 bytes"))) {
            drop.push(k.to_vec());
        }
    }
    for k in drop {
        alt.remove(&k[..])?;
    }
    Ok(())
}

/// Rows (key, mapped value) of one batch, and whether more rows follow.
type Batch<T> = (Vec<(Vec<u8>, T)>, bool);

/// Up to `rows` rows of `table` after the key `after` (from the first when `None`), their
/// values mapped by `value`, and whether more rows follow.
fn next_batch<V: redb::Value + 'static, T>(
    table: &impl ReadableTable<&'static [u8], V>,
    after: Option<&[u8]>,
    rows: usize,
    value: impl for<'a> Fn(V::SelfType<'a>) -> T,
) -> std::result::Result<Batch<T>, redb::Error> {
    use std::ops::Bound;
    let range = match after {
        Some(k) => table.range::<&[u8]>((Bound::Excluded(k), Bound::Unbounded))?,
        None => table.range::<&[u8]>(..)?,
    };
    let mut out = Vec::new();
    for item in range {
        let (k, v) = item?;
        if out.len() == rows {
            return Ok((out, true));
        }
        out.push((k.value().to_vec(), value(v.value())));
    }
    Ok((out, false))
}

thread_local! {
    /// Depth of index calls on this thread: a panic inside one is turned into
    /// `Error::IndexDamaged`, so the panic message must not reach the user.
    static IN_INDEX: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Installs (once) a panic hook that stays silent for panics inside index calls and
/// defers to the previous hook for every other panic (our own bugs still print).
fn quiet_panics_in_index_calls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_INDEX.with(|d| d.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into its message.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    IN_INDEX.with(|d| d.set(d.get() + 1));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_INDEX.with(|d| d.set(d.get() - 1));
    out.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "redb panicked".to_string());
        format!("redb: {msg}")
    })
}

impl Drop for Index {
    fn drop(&mut self) {
        // A database redb panicked on may panic again while closing: leave it to the
        // kernel (the process is ending, or the index is abandoned).
        if self.damage.get().is_some() {
            if let Ok(mut cached) = self.chunk_reader.lock() {
                std::mem::forget(cached.take());
            }
            if let Ok(mut db) = self.db.write() {
                std::mem::forget(db.take());
            }
        }
    }
}

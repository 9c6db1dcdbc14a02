//! Many hosts on one object store: per-pack logs, and bringing this host's cache up to
//! date with what other hosts wrote.
//!
//! Every host (a cache directory: `<cache>/host-id`, 16 random bytes made when missing)
//! writes, after packs it uploaded are durable and before their rows enter its index,
//! one immutable object `logs/<host id hex>/<seq 020>`: each pack's id, kind, size and
//! blob table (`Log::Packs`, up to `PACKS_PER_LOG` packs; `Log::Pack`, one pack, is
//! still read). Before gc deletes packs it writes `Log::Removed` naming them. So no pack is ever indexed anywhere without its log, and an index is
//! rebuilt from the logs without downloading a pack body.
//!
//! `sync` lists the hosts (one delimiter listing of `logs/`), then for each host the
//! logs after its cursor (kept in the index), applies them, and moves the cursors: its
//! cost is O(hosts + new logs) requests, independent of the number of packs. A
//! snapshot's sync defers other hosts' pack logs (`sync_deferring`, the pending file)
//! until it needs them; removals are never deferred.
//!
//! Order: a host's logs are written one at a time (`locks/log.lock` in its cache, held
//! from taking the sequence number until the PUT has returned), so a log becomes
//! visible only after every lower-numbered log of its host: a listing that shows log n
//! shows every log below n that will ever exist, and a cursor never skips one. (A PUT
//! that fails leaves a gap: its pack is not indexed by its writer and is a leftover.)
//!
//! Encoding: magic "VSNPLOG1" | postcard `Log` | BLAKE3 (32 bytes) of what precedes.
//! Local repositories write no logs: every process there shares one index, which is
//! the only cache (see ARCHITECTURE.md).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::Id;
use crate::index::{Location, PackRow, SyncedPack};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::repair::{Report, index_pack};

const LOG_MAGIC: &[u8; 8] = b"VSNPLOG1";

/// Logs a sync reads together (their GETs in flight at once).
const LOGS_PER_BATCH: usize = 16;

/// Blob rows a sync indexes per transaction (about 20 MB of rows in memory; a log of
/// 16 packs of tiny blobs can hold hundreds of thousands).
const ROWS_PER_TRANSACTION: usize = 262_144;

/// A deferring sync indexes everything pending once the pending file is larger than
/// this (about 600,000 blob rows: some 40 GiB of other hosts' data).
const PENDING_BYTES_MAX: u64 = 32 << 20;

/// One blob of a pack, as the pack's log lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub id: Id,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// What one log object says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Log {
    /// A pack was uploaded: its blob table (the format before `Packs`, still read;
    /// the same bytes as the struct's fields inline).
    Pack(PackLog),
    /// gc is about to delete these packs.
    Removed { packs: Vec<Id> },
    /// Several packs uploaded, each as `Pack` says (a packer logs the packs that
    /// became durable together in one object).
    Packs { packs: Vec<PackLog> },
}

/// One pack's log: its id, kind, size, the pack a gc repack moved its blobs out of
/// (rows there move here), and its blob table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackLog {
    pub pack: Id,
    pub kind: u8,
    pub size: u64,
    pub from: Option<Id>,
    pub rows: Vec<LogRow>,
}

impl PackLog {
    fn synced(self) -> SyncedPack {
        let PackLog {
            pack,
            kind,
            size,
            from,
            rows,
        } = self;
        SyncedPack {
            pack,
            row: PackRow {
                kind,
                size_bytes: size,
                blobs: rows.len() as u64,
            },
            blobs: rows
                .into_iter()
                .map(|r| {
                    (
                        r.id,
                        Location {
                            pack,
                            offset: r.offset,
                            stored_len: r.stored_len,
                            raw_len: r.raw_len,
                        },
                    )
                })
                .collect(),
            from,
        }
    }
}

impl Log {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = LOG_MAGIC.to_vec();
        out.extend_from_slice(&postcard::to_stdvec(self).expect("logs encode"));
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Log, String> {
        if bytes.len() < LOG_MAGIC.len() + 32 || &bytes[..8] != LOG_MAGIC {
            return Err("not a volsnap log".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        postcard::from_bytes(&body[8..]).map_err(|e| e.to_string())
    }
}

/// The key of log `seq` of `host`.
pub fn log_key(host: &str, seq: u64) -> String {
    format!("logs/{host}/{seq:020}")
}

fn seq_of(key: &str) -> Option<u64> {
    let last = key.rsplit('/').next()?;
    (last.len() == 20 && last.bytes().all(|b| b.is_ascii_digit()))
        .then(|| last.parse().ok())
        .flatten()
}

fn is_host(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// This cache's host id (32 hex characters), made when missing: a new cache is a new
/// host. Hostnames are never used: two caches on one machine are two hosts.
pub fn host_id(repo: &Repository) -> Result<String> {
    let path = repo.cache.join("host-id");
    let read = |path: &PathBuf| -> Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(s) if is_host(s.trim()) => Ok(Some(s.trim().to_string())),
            Ok(_) => Err(Error::Corrupt {
                what: "host id",
                path: path.clone(),
                detail: "not 32 hex characters; delete the cache directory to make a new host"
                    .into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path)(e)),
        }
    };
    if let Some(id) = read(&path)? {
        return Ok(id);
    }
    let mut bytes = [0u8; 16];
    {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(Error::io("read", "/dev/urandom"))?;
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Two processes of a new cache race here: the first file wins, both read it.
    fsutil::write_new_durable(&repo.tmp_dir(), &path, format!("{hex}\n").as_bytes())?;
    read(&path)?.ok_or_else(|| Error::io("read", &path)(std::io::ErrorKind::NotFound.into()))
}

/// Writes `log` as this host's next log. Nothing on a local repository.
pub fn put_log(repo: &Repository, log: &Log) -> Result<()> {
    if repo.store.is_local() {
        return Ok(());
    }
    let host = host_id(repo)?;
    let bytes = log.encode();
    let lock_path = repo.cache.join("locks").join("log.lock");
    let lock = fsutil::open_lock_file(&lock_path)?;
    lock.lock().map_err(Error::io("lock", &lock_path))?;
    // The counter lives in the cache beside the host id (not in the index, which
    // `repair index` or a deleted index.redb starts afresh): a number is never reused.
    let seq_path = repo.cache.join("log-seq");
    let last = match std::fs::read_to_string(&seq_path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| Error::Corrupt {
            what: "log counter",
            path: seq_path.clone(),
            detail: "not a number; delete the cache directory to make a new host".into(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io("read", &seq_path)(e)),
    };
    let seq = last + 1;
    fsutil::atomic_write(&repo.tmp_dir(), &seq_path, format!("{seq}\n").as_bytes())?;
    repo.store.put(&log_key(&host, seq), &bytes, None)?;
    drop(lock);
    Ok(())
}

/// The log of packs just uploaded (from `Packer`, before their rows are indexed):
/// one object for them all.
pub fn log_packs(repo: &Repository, packs: &[SyncedPack]) -> Result<()> {
    if repo.store.is_local() || packs.is_empty() {
        return Ok(());
    }
    let log = Log::Packs {
        packs: packs
            .iter()
            .map(|p| PackLog {
                pack: p.pack,
                kind: p.row.kind,
                size: p.row.size_bytes,
                from: p.from,
                rows: p
                    .blobs
                    .iter()
                    .map(|(id, loc)| LogRow {
                        id: *id,
                        offset: loc.offset,
                        stored_len: loc.stored_len,
                        raw_len: loc.raw_len,
                    })
                    .collect(),
            })
            .collect(),
    };
    put_log(repo, &log)?;
    crate::crash::point("pack logged");
    Ok(())
}

/// Tells every host that `packs` are about to be deleted; gc calls it before it deletes
/// or replaces packs. Nothing on a local repository.
pub fn log_removed(repo: &Repository, packs: &[Id]) -> Result<()> {
    if repo.store.is_local() || packs.is_empty() {
        return Ok(());
    }
    put_log(
        repo,
        &Log::Removed {
            packs: packs.to_vec(),
        },
    )?;
    repo.index.mark_gone(packs)
}

/// What a sync did.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    /// Hosts with logs in the store (this one included).
    pub hosts: u64,
    /// Logs read and applied.
    pub logs: u64,
    /// Packs whose logs were applied (a repair counts every logged pack).
    pub packs: HashSet<Id>,
    /// Packs a removal log named.
    pub removed: HashSet<Id>,
    /// Logs that did not verify (reported as warnings).
    pub bad_logs: u64,
    /// Packs indexed by scanning them (after a bad log).
    pub scanned: u64,
}

/// Brings this host's index up to date with the logs of every other host. Nothing on
/// a local repository (one index is shared by every process there).
pub fn sync(repo: &Repository) -> Result<Synced> {
    sync_with(repo, false)
}

/// `sync`, applying this host's own logs too when `own` (an index made anew, which
/// lacks what this host wrote before).
pub fn sync_with(repo: &Repository, own: bool) -> Result<Synced> {
    sync_deferring(repo, own, false)
}

/// `sync_with`, leaving other hosts' pack logs unindexed when `defer` (see
/// `OpenOptions::defer_pack_logs`): at most `DEFERRED_LOGS_MAX` of them, never on a
/// new index or when a log is damaged. Removal logs are applied at once whatever
/// `defer` says: an index row into a pack gc deleted would let a snapshot reuse a blob
/// that is gone.
pub fn sync_deferring(repo: &Repository, own: bool, defer: bool) -> Result<Synced> {
    if repo.store.is_local() {
        return Ok(Synced::default());
    }
    let mut synced = apply_logs_deferring(repo, own, defer && !own)?;
    if defer && pending_path(repo).exists() {
        *repo.pending_logs.lock().expect("pending logs lock") = 1;
    }
    if synced.bad_logs > 0 {
        // A damaged log hides which pack it described: index every pack in the store
        // that neither the index nor a removal log knows, by scanning it.
        let known: HashSet<Id> = repo.index.packs()?.into_iter().map(|(id, _)| id).collect();
        let mut report = Report::default();
        for (pack, _) in repo.pack_files()? {
            if !known.contains(&pack) && !repo.index.is_gone(&pack)? {
                index_pack(repo, &pack, &mut report, &Progress::default())?;
                synced.scanned += 1;
            }
        }
        for p in report.problems {
            eprintln!("warning: {p}");
        }
    }
    Ok(synced)
}

/// Applies every log after the index's cursors (and this host's own logs too when
/// `own`, for `repair index`), removals last, then moves the cursors.
pub(crate) fn apply_logs(repo: &Repository, own: bool) -> Result<Synced> {
    apply_logs_deferring(repo, own, false)
}

/// Where a deferring sync keeps the pack logs it read and did not index: the logs
/// themselves, each framed by its length (u64 LE), rewritten whole (temporary file,
/// fsync, rename) before the cursors move past them.
fn pending_path(repo: &Repository) -> PathBuf {
    repo.cache.join("pending-logs")
}

/// `locks/pending.lock`, held while a process reads and rewrites or removes the
/// pending file (processes of one cache share it).
fn pending_lock(repo: &Repository) -> Result<std::fs::File> {
    let path = repo.cache.join("locks").join("pending.lock");
    let lock = fsutil::open_lock_file(&path)?;
    lock.lock().map_err(Error::io("lock", &path))?;
    Ok(lock)
}

/// The logs in the pending file (none if there is no file).
fn read_pending(repo: &Repository) -> Result<Vec<Vec<u8>>> {
    let path = pending_path(repo);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read", &path)(e)),
    };
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = rest
            .get(..8)
            .map(|l| u64::from_le_bytes(l.try_into().expect("8 bytes")) as usize)
            .filter(|&len| rest.len() - 8 >= len)
            .ok_or_else(|| Error::Corrupt {
                what: "pending logs",
                path: path.clone(),
                detail: "a log is cut short; delete the file (the next sync cannot \
                         tell which logs it held: run `volsnap repair index`)"
                    .into(),
            })?;
        out.push(rest[8..8 + len].to_vec());
        rest = &rest[8 + len..];
    }
    Ok(out)
}

/// The packs the logs `logs` describe (packs a removal named are skipped when they are
/// indexed: `commit_synced_packs` leaves out gone packs).
fn packs_of(repo: &Repository, logs: &[Vec<u8>]) -> Result<Vec<SyncedPack>> {
    let mut packs = Vec::new();
    for bytes in logs {
        let logged = match Log::decode(bytes) {
            Ok(Log::Pack(p)) => vec![p],
            Ok(Log::Packs { packs }) => packs,
            Ok(Log::Removed { .. }) => Vec::new(),
            Err(why) => {
                return Err(Error::Corrupt {
                    what: "pending logs",
                    path: pending_path(repo),
                    detail: format!("a log is damaged ({why}); run `volsnap repair index`"),
                });
            }
        };
        packs.extend(logged.into_iter().map(PackLog::synced));
    }
    Ok(packs)
}

/// Indexes the packs of the pending file (see `pending_path`), then removes it.
/// Returns whether there was one. Packs a removal log named meanwhile are skipped
/// (`commit_synced_packs` skips gone packs); applying a file twice (a crash before
/// its removal) changes nothing.
pub(crate) fn apply_pending(repo: &Repository) -> Result<bool> {
    let _lock = pending_lock(repo)?;
    let logs = read_pending(repo)?;
    if logs.is_empty() {
        return Ok(false);
    }
    // A log at a time: memory stays that of one log's rows, transactions few.
    let mut packs = Vec::new();
    for log in &logs {
        packs.extend(packs_of(repo, std::slice::from_ref(log))?);
        if packs.iter().map(|p| p.blobs.len()).sum::<usize>() >= ROWS_PER_TRANSACTION {
            repo.index
                .commit_synced_packs(&std::mem::take(&mut packs))?;
        }
    }
    repo.index.commit_synced_packs(&packs)?;
    let path = pending_path(repo);
    std::fs::remove_file(&path).map_err(Error::io("remove", &path))?;
    fsutil::fsync_dir(&repo.cache)?;
    repo.index.refresh();
    Ok(true)
}

/// Adds `logs` to the pending file; returns its size after.
fn add_pending(repo: &Repository, logs: &[Vec<u8>]) -> Result<u64> {
    let _lock = pending_lock(repo)?;
    let mut all = Vec::new();
    for log in read_pending(repo)?.iter().chain(logs) {
        all.extend_from_slice(&(log.len() as u64).to_le_bytes());
        all.extend_from_slice(log);
    }
    fsutil::atomic_write(&repo.tmp_dir(), &pending_path(repo), &all)?;
    Ok(all.len() as u64)
}

fn apply_logs_deferring(repo: &Repository, own: bool, defer: bool) -> Result<Synced> {
    // What earlier syncs deferred comes first, unless this one defers too.
    if !defer {
        apply_pending(repo)?;
    }
    let me = host_id(repo)?;
    let cursors = repo.index.sync_cursors()?;
    let mut synced = Synced::default();
    let mut removed: Vec<Id> = Vec::new();
    let mut moved: BTreeMap<String, u64> = BTreeMap::new();
    // Every log written since the cursors: one listing per host.
    let mut keys: Vec<String> = Vec::new();
    for dir in repo.store.list_dirs("logs/")? {
        let host = dir
            .strip_prefix("logs/")
            .unwrap_or("")
            .trim_end_matches('/');
        if !is_host(host) {
            continue;
        }
        synced.hosts += 1;
        if host == me && !own {
            continue;
        }
        let cursor = cursors.get(host).copied().unwrap_or(0);
        for object in repo.store.list_after(&dir, &log_key(host, cursor))? {
            let Some(seq) = seq_of(&object.key) else {
                continue;
            };
            moved.insert(host.to_string(), seq);
            keys.push(object.key);
        }
    }
    // Read a batch at a time, its requests in flight together, and index each batch
    // in one transaction (a host catching up with another's thousand packs makes one
    // commit per batch, not one per pack).
    let mut deferred: Vec<Vec<u8>> = Vec::new();
    let mut packs = Vec::new();
    let mut rows = 0;
    for batch in keys.chunks(LOGS_PER_BATCH) {
        for (key, bytes) in batch.iter().zip(repo.store.get_many(batch)?) {
            let Some(bytes) = bytes else {
                continue;
            };
            let logged = match Log::decode(&bytes) {
                Ok(Log::Pack(p)) => vec![p],
                Ok(Log::Packs { packs }) => packs,
                Ok(Log::Removed { packs }) => {
                    synced.logs += 1;
                    for p in packs {
                        if synced.removed.insert(p) {
                            removed.push(p);
                        }
                    }
                    continue;
                }
                Err(why) => {
                    synced.bad_logs += 1;
                    eprintln!(
                        "warning: log {} is damaged ({why}); the packs it described are \
                         indexed by reading them",
                        repo.store.display(key).display()
                    );
                    continue;
                }
            };
            synced.logs += 1;
            if defer {
                deferred.push(bytes);
                continue;
            }
            for p in logged {
                synced.packs.insert(p.pack);
                if !synced.removed.contains(&p.pack) {
                    rows += p.rows.len();
                    packs.push(p.synced());
                }
            }
            if rows >= ROWS_PER_TRANSACTION {
                repo.index
                    .commit_synced_packs(&std::mem::take(&mut packs))?;
                rows = 0;
            }
        }
    }
    repo.index.commit_synced_packs(&packs)?;
    let moved: Vec<(String, u64)> = moved.into_iter().collect();
    // Deferred logs are kept in the pending file before the cursors move past them;
    // too many of them, or a damaged log (the scan after it must know every pack),
    // and everything pending is indexed now.
    if !deferred.is_empty() && add_pending(repo, &deferred)? > PENDING_BYTES_MAX {
        apply_pending(repo)?;
    }
    if synced.bad_logs > 0 {
        apply_pending(repo)?;
    }
    // Removals last, in one pass over the chunk rows; cursors only after them, so a
    // crash in between applies these logs again (each is idempotent).
    repo.index.remove_packs(&removed)?;
    repo.index.advance_sync_cursors(&moved)?;
    if synced.logs > 0 {
        repo.index.refresh();
    }
    Ok(synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack_log(n: u8) -> PackLog {
        PackLog {
            pack: Id([n; 32]),
            kind: 0,
            size: 1000 + u64::from(n),
            from: n.is_multiple_of(2).then_some(Id([n + 100; 32])),
            rows: (0..n)
                .map(|i| LogRow {
                    id: Id([i; 32]),
                    offset: 32 + 100 * u64::from(i),
                    stored_len: 60,
                    raw_len: 90,
                })
                .collect(),
        }
    }

    #[test]
    fn a_log_of_several_packs_round_trips_and_every_damaged_byte_is_refused() {
        let log = Log::Packs {
            packs: (1..4).map(pack_log).collect(),
        };
        let bytes = log.encode();
        assert_eq!(Log::decode(&bytes).unwrap(), log);
        // A one-pack log as the format before `Packs` wrote it: variant 0, then the
        // fields inline.
        let one = Log::Pack(pack_log(2));
        let mut old = vec![0u8];
        old.extend(postcard::to_stdvec(&pack_log(2)).unwrap());
        assert_eq!(postcard::to_stdvec(&one).unwrap(), old);
        assert_eq!(Log::decode(&one.encode()).unwrap(), one);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Log::decode(&bad).is_err(), "byte {i}");
        }
        assert!(Log::decode(&bytes[..bytes.len() - 1]).is_err());
        // What it says as index rows: every blob located in its own pack.
        let synced = pack_log(3).synced();
        assert_eq!(synced.row.blobs, 3);
        assert_eq!(synced.from, None);
        assert!(synced.blobs.iter().all(|(_, loc)| loc.pack == Id([3; 32])));
        assert_eq!(synced.blobs[2].1.offset, 232);
    }
}

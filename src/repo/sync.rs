//! Many hosts on one object store: per-pack logs, and bringing this host's cache up to
//! date with what other hosts wrote.
//!
//! Every host (a cache directory: `<cache>/host-id`, 16 random bytes made when missing)
//! writes, right after each pack it uploads and before the pack's rows enter its index,
//! one small immutable object `logs/<host id hex>/<seq 020>`: the pack's id, kind, size
//! and blob table (`Log::Pack`). Before gc deletes packs it writes `Log::Removed`
//! naming them. So no pack is ever indexed anywhere without its log, and an index is
//! rebuilt from the logs without downloading a pack body.
//!
//! `sync` lists the hosts (one delimiter listing of `logs/`), then for each host the
//! logs after its cursor (kept in the index), applies them, and moves the cursors: its
//! cost is O(hosts + new logs) requests, independent of the number of packs.
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
use crate::index::{Location, PackRow};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::repair::{Report, index_pack};

const LOG_MAGIC: &[u8; 8] = b"VSNPLOG1";

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
    /// A pack was uploaded: its blob table. `from`: the pack a gc repack moved these
    /// blobs out of (rows there move here).
    Pack {
        pack: Id,
        kind: u8,
        size: u64,
        from: Option<Id>,
        rows: Vec<LogRow>,
    },
    /// gc is about to delete these packs.
    Removed { packs: Vec<Id> },
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

/// The log of a pack just uploaded (from `Packer::commit`, before its rows are indexed).
pub fn log_pack(
    repo: &Repository,
    pack: &Id,
    row: &PackRow,
    rows: &[(Id, Location)],
    from: Option<Id>,
) -> Result<()> {
    if repo.store.is_local() {
        return Ok(());
    }
    let log = Log::Pack {
        pack: *pack,
        kind: row.kind,
        size: row.size_bytes,
        from,
        rows: rows
            .iter()
            .map(|(id, loc)| LogRow {
                id: *id,
                offset: loc.offset,
                stored_len: loc.stored_len,
                raw_len: loc.raw_len,
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
    if repo.store.is_local() {
        return Ok(Synced::default());
    }
    let mut synced = apply_logs(repo, own)?;
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
    let me = host_id(repo)?;
    let cursors = repo.index.sync_cursors()?;
    let mut synced = Synced::default();
    let mut removed: Vec<Id> = Vec::new();
    let mut moved: BTreeMap<String, u64> = BTreeMap::new();
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
            let Some(bytes) = repo.store.get(&object.key)? else {
                continue;
            };
            match Log::decode(&bytes) {
                Ok(Log::Pack {
                    pack,
                    kind,
                    size,
                    from,
                    rows,
                }) => {
                    synced.logs += 1;
                    synced.packs.insert(pack);
                    if synced.removed.contains(&pack) {
                        continue;
                    }
                    let row = PackRow {
                        kind,
                        size_bytes: size,
                        blobs: rows.len() as u64,
                    };
                    let rows: Vec<(Id, Location)> = rows
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
                        .collect();
                    repo.index.commit_synced_pack(&pack, &row, &rows, from)?;
                }
                Ok(Log::Removed { packs }) => {
                    synced.logs += 1;
                    for p in packs {
                        if synced.removed.insert(p) {
                            removed.push(p);
                        }
                    }
                }
                Err(why) => {
                    synced.bad_logs += 1;
                    eprintln!(
                        "warning: log {} is damaged ({why}); the packs it described are \
                         indexed by reading them",
                        repo.store.display(&object.key).display()
                    );
                }
            }
        }
    }
    // Removals last, in one pass over the chunk rows; cursors only after them, so a
    // crash in between applies these logs again (each is idempotent).
    repo.index.remove_packs(&removed)?;
    for (host, seq) in moved {
        repo.index.advance_sync_cursor(&host, seq)?;
    }
    if synced.logs > 0 {
        repo.index.refresh();
    }
    Ok(synced)
}

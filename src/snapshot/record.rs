//! Snapshot records: one small immutable file per snapshot, the commit point.
//!
//! ```text
//! snapshots/<id>  = magic "VSNPSNAP" (8) | record version u32 LE | postcard `Snapshot`
//! id              = BLAKE3 of the whole file
//! ```
//! **Invariant:** a record is written (fsynced, renamed, directory fsynced) only after
//! every pack it references is durable and indexed; it is never modified.
//! The index holds a copy of each record for fast listing; `list_all` reconciles the
//! two, so a crash between the record and its index row loses nothing.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::Id;
use crate::repo::Repository;

const RECORD_MAGIC: &[u8; 8] = b"VSNPSNAP";
/// Version 2 added `containers`; version 1 records are still read.
const RECORD_VERSION: u32 = 2;

/// One volume of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub label: String,
    /// Absolute path it was read from, as raw bytes.
    pub source: Vec<u8>,
    pub tree: Id,
    /// Metadata of the volume's root directory, which no tree holds.
    pub root: RootMeta,
}

/// Metadata of a volume's root directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub xattrs: Vec<crate::tree::Xattr>,
}

impl Volume {
    /// The volume root as a directory entry named by its label.
    pub fn root_entry(&self) -> crate::tree::Entry {
        crate::tree::Entry {
            name: self.label.as_bytes().to_vec(),
            kind: crate::tree::Kind::Dir { tree: self.tree },
            mode: self.root.mode,
            uid: self.root.uid,
            gid: self.root.gid,
            mtime_ns: self.root.mtime_ns,
            xattrs: self.root.xattrs.clone(),
        }
    }
}

/// Counters of one snapshot run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub new_bytes_stored: u64,
    pub new_chunks: u64,
    pub duration_ms: u64,
}

/// A path that could not be read, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    pub path: Vec<u8>,
    pub error: String,
}

/// The tag of every undo snapshot (taken of the live targets by an in-place restore,
/// just before it swaps them). Reserved: `snapshot --tag` refuses it.
pub const UNDO_TAG: &str = "pre-restore";

/// A snapshot record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub series: String,
    pub version: u64,
    pub time_ns: i64,
    pub hostname: String,
    pub volumes: Vec<Volume>,
    pub tags: Vec<String>,
    pub parent: Option<Id>,
    pub stats: Stats,
    pub incomplete: bool,
    pub unreadable: Vec<Unreadable>,
    pub notes: Vec<String>,
    /// The containers whose volumes these are (empty for plain directories).
    pub containers: Vec<ContainerManifest>,
}

/// What a snapshot records of a container it was taken from: enough to know what it
/// ran and where its data was, never its environment (it holds secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerManifest {
    pub name: String,
    pub id: String,
    /// As created (`name:tag`).
    pub image: String,
    /// The image's id (`sha256:...`).
    pub image_id: String,
    /// Its registry digests (`name@sha256:...`), if it came from a registry.
    pub repo_digests: Vec<String>,
    pub project: Option<String>,
    pub service: Option<String>,
    pub labels: Vec<(String, String)>,
    pub mounts: Vec<MountManifest>,
}

/// One mount of a recorded container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountManifest {
    pub destination: String,
    /// "bind", "volume", "tmpfs"...
    pub kind: String,
    pub source: Option<Vec<u8>>,
    pub volume: Option<String>,
    pub read_write: bool,
    /// The volume label it was snapshotted as; `None`: not snapshotted (`skipped` says why).
    pub label: Option<String>,
    pub skipped: Option<String>,
}

/// A version 1 record: a `Snapshot` without `containers`.
#[derive(Deserialize)]
struct SnapshotV1 {
    series: String,
    version: u64,
    time_ns: i64,
    hostname: String,
    volumes: Vec<Volume>,
    tags: Vec<String>,
    parent: Option<Id>,
    stats: Stats,
    incomplete: bool,
    unreadable: Vec<Unreadable>,
    notes: Vec<String>,
}

impl From<SnapshotV1> for Snapshot {
    fn from(v: SnapshotV1) -> Snapshot {
        Snapshot {
            series: v.series,
            version: v.version,
            time_ns: v.time_ns,
            hostname: v.hostname,
            volumes: v.volumes,
            tags: v.tags,
            parent: v.parent,
            stats: v.stats,
            incomplete: v.incomplete,
            unreadable: v.unreadable,
            notes: v.notes,
            containers: Vec::new(),
        }
    }
}

impl Snapshot {
    /// Whether this is an undo snapshot: not `SERIES@latest`, not the parent of the next
    /// snapshot, outside the `--keep-*` rules (see `gc::forget`).
    pub fn is_undo(&self) -> bool {
        self.tags.iter().any(|t| t == UNDO_TAG)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = RECORD_MAGIC.to_vec();
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        postcard::to_io(self, &mut out).expect("records encode");
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, String> {
        if bytes.len() < 12 || &bytes[0..8] != RECORD_MAGIC {
            return Err("not a snapshot record".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let body = &bytes[12..];
        let snapshot: Snapshot = match version {
            1 => postcard::from_bytes::<SnapshotV1>(body)
                .map_err(|e| e.to_string())?
                .into(),
            RECORD_VERSION => postcard::from_bytes(body).map_err(|e| e.to_string())?,
            _ => return Err(format!("unknown record version {version}")),
        };
        // Labels become directory names on restore: they must be single, unique names.
        let mut labels = HashSet::new();
        for v in &snapshot.volumes {
            if !crate::tree::valid_name(v.label.as_bytes()) || !labels.insert(&v.label) {
                return Err(format!("invalid volume label {:?}", v.label));
            }
        }
        if snapshot.volumes.is_empty() {
            return Err("snapshot has no volumes".into());
        }
        Ok(snapshot)
    }
}

/// A record with its id.
#[derive(Clone, Debug)]
pub struct Listed {
    pub id: Id,
    pub snapshot: Snapshot,
    /// A lease this process held when the snapshot was listed: while it is held, gc
    /// keeps every blob the snapshot names, even if it is forgotten meanwhile.
    pub guarded_by: Option<u64>,
}

/// Commits a snapshot: reserves its version, writes the record durably (the commit
/// point), then indexes it. A crash after the record leaves a row missing, which
/// `scan` adds back.
pub fn commit(repo: &Repository, mut snapshot: Snapshot) -> Result<Listed> {
    let floor = forgotten_version(repo, &snapshot.series)?;
    snapshot.version = crate::repo::versions::reserve(repo, &snapshot.series, floor)?;
    crate::crash::point("snapshot version reserved");
    let bytes = snapshot.encode();
    let id = Id::of(&bytes);
    let key = record_key(&id);
    if let Err(e) = repo.store.put(&key, &bytes, None) {
        // The user is told this snapshot failed: it must not appear later.
        let _ = repo.store.delete(&key);
        return Err(e);
    }
    crate::crash::point("snapshot record written");
    if let Err(e) = repo.index.insert_snapshot(&id, &bytes) {
        return Err(withdraw(repo, &id, e));
    }
    crate::crash::point("snapshot record indexed");
    Ok(Listed {
        id,
        snapshot,
        guarded_by: repo.oldest_held_lease(),
    })
}

/// The store key of the record with id `id`.
pub fn record_key(id: &Id) -> String {
    format!("snapshots/{}", id.hex())
}

const SERIES_MAGIC: &[u8; 8] = b"VSNPSERI";

/// The key of the object holding the highest version of `series` that `forget` removed.
fn forgotten_key(series: &str) -> String {
    let hex: String = series.bytes().map(|b| format!("{b:02x}")).collect();
    format!("series/{hex}")
}

/// The highest version of `series` whose record `forget` removed (0: none). The index's
/// version counter is derived data: after `repair index` it knows only the records left,
/// and without this a forgotten snapshot's number would be handed out again, so that
/// `SERIES@N` would name other data than it did.
pub fn forgotten_version(repo: &Repository, series: &str) -> Result<u64> {
    let key = forgotten_key(series);
    match repo.store.get(&key)? {
        Some(b) if b.len() == 16 && &b[..8] == SERIES_MAGIC => {
            Ok(u64::from_le_bytes(b[8..].try_into().expect("8 bytes")))
        }
        Some(_) => Err(Error::Corrupt {
            what: "series file",
            path: repo.store.display(&key),
            detail: "not a highest forgotten version".into(),
        }),
        None => Ok(0),
    }
}

/// Records, durably and before any record is removed, the highest version `forget` is
/// about to remove in each series (see `forgotten_version`). Forgets are serialized on
/// `locks/series.lock` so that the highest value always wins.
pub fn remember_forgotten(repo: &Repository, highest: &HashMap<String, u64>) -> Result<()> {
    if highest.is_empty() {
        return Ok(());
    }
    let lock_path = repo.cache.join("locks").join("series.lock");
    let lock = fsutil::open_lock_file(&lock_path)?;
    lock.lock().map_err(Error::io("lock", &lock_path))?;
    for (series, &version) in highest {
        if version > forgotten_version(repo, series)? {
            let mut bytes = SERIES_MAGIC.to_vec();
            bytes.extend_from_slice(&version.to_le_bytes());
            repo.store.put(&forgotten_key(series), &bytes, None)?;
        }
    }
    Ok(())
}

/// Takes back the record of a snapshot whose commit failed after the record was written
/// (its index row, its files-cache rows), so a snapshot the user is told failed never
/// appears: like a `forget`, which is always safe. Returns `cause`, extended when the
/// record could not be removed.
pub fn withdraw(repo: &Repository, id: &Id, cause: Error) -> Error {
    match repo.store.delete(&record_key(id)) {
        Ok(()) => cause,
        Err(e) => Error::Refused(format!(
            "{cause}; the record of the failed snapshot {} could not be removed ({e}), so it \
             may still be listed",
            id.short()
        )),
    }
}

/// Every snapshot, and what could not be used.
#[derive(Debug, Default)]
pub struct Scan {
    pub snapshots: Vec<Listed>,
    /// Record files that cannot be read, do not match their name or do not decode
    /// (and have no sound copy in the index), and a damaged index, each with why.
    pub problems: Vec<(std::path::PathBuf, String)>,
}

/// Every usable snapshot, oldest first, after reconciling the index with the record
/// files. Damaged records are left out (`scan` reports them).
pub fn list_all(repo: &Repository) -> Result<Vec<Listed>> {
    Ok(scan(repo)?.snapshots)
}

/// Every snapshot, from the record files (the ground truth), with the index's copies
/// used only where they hash to the record's name. Mends the index: adopts records
/// without a row (a crash after the commit point), replaces rows that do not hash to
/// their id (damage), drops rows whose record is gone (forgotten by another process).
/// A record that cannot be read anywhere is reported, never silently left out, and
/// one damaged file never makes the others unusable. A damaged index is reported and
/// the records are read from their files alone.
pub fn scan(repo: &Repository) -> Result<Scan> {
    let mut out = Scan::default();
    let guarded_by = repo.oldest_held_lease();
    let mut rows: HashMap<Id, Vec<u8>> = match repo.index.snapshots() {
        Ok(rows) => rows.into_iter().collect(),
        Err(e) if e.is_index_unusable() => {
            out.problems
                .push((repo.cache.join("index.redb"), e.to_string()));
            HashMap::new()
        }
        Err(e) => return Err(e),
    };
    let index_usable = out.problems.is_empty();
    // Listed after the rows were read: a record committed in between has a file and
    // no row (adopted below), never a row whose file was not looked for.
    let mut on_disk = Vec::new();
    for object in repo.store.list("snapshots/")? {
        if let Some(id) = object.key.strip_prefix("snapshots/").and_then(Id::from_hex) {
            on_disk.push(id);
        }
    }
    let mut mend = Vec::new();
    for id in &on_disk {
        // The index's copy, if it is the record byte for byte (it hashes to the name).
        let row = rows.remove(id).filter(|bytes| Id::of(bytes) == *id);
        let (bytes, from_file) = match row {
            Some(bytes) => (bytes, false),
            None => {
                let key = record_key(id);
                let path = repo.store.display(&key);
                match repo.store.get(&key) {
                    Ok(Some(b)) if Id::of(&b) == *id => (b, true),
                    Ok(Some(_)) => {
                        out.problems
                            .push((path, "record does not match its name (damaged)".into()));
                        continue;
                    }
                    Ok(None) => continue, // forgotten meanwhile
                    Err(e) => {
                        out.problems.push((path, e.to_string()));
                        continue;
                    }
                }
            }
        };
        match Snapshot::decode(&bytes) {
            Ok(snapshot) => {
                if from_file {
                    mend.push((*id, bytes, snapshot.series.clone(), snapshot.version));
                }
                out.snapshots.push(Listed {
                    id: *id,
                    snapshot,
                    guarded_by,
                });
            }
            Err(e) => out.problems.push((repo.store.display(&record_key(id)), e)),
        }
    }
    // Rows left over name no record file: forgotten, or keys damaged in the index.
    let gone: Vec<Id> = rows.into_keys().collect();
    if index_usable {
        match repo.index.reconcile_snapshots(&mend, &gone) {
            Ok(()) => {}
            // Mending is best effort: the records were read from their files.
            Err(e) if e.is_index_unusable() => {
                out.problems
                    .push((repo.cache.join("index.redb"), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    out.snapshots.sort_by(|a, b| {
        (a.snapshot.time_ns, &a.snapshot.series, a.snapshot.version).cmp(&(
            b.snapshot.time_ns,
            &b.snapshot.series,
            b.snapshot.version,
        ))
    });
    Ok(out)
}

/// Every snapshot, or an error naming the first record that cannot be read (and the
/// commands that mend it). For operations that decide from the whole set what to
/// delete (`gc`, `forget` by policy): a snapshot they cannot see must stop them.
pub fn list_complete(repo: &Repository, operation: &str) -> Result<Vec<Listed>> {
    let scan = scan(repo)?;
    if let Some((path, why)) = scan.problems.first() {
        return Err(Error::Refused(format!(
            "{operation} refused, nothing was changed: {} cannot be read ({why}); run `volsnap check`, then `volsnap repair index` or restore the file",
            path.display()
        )));
    }
    Ok(scan.snapshots)
}

/// The newest ordinary snapshot of a series: undo snapshots are left out, so
/// `SERIES@latest` and the parent of the next snapshot are always real backups.
pub fn latest(all: &[Listed], series: &str) -> Option<Listed> {
    all.iter()
        .filter(|l| l.snapshot.series == series && !l.snapshot.is_undo())
        .max_by_key(|l| l.snapshot.version)
        .cloned()
}

/// Resolves `<id>`, `<id prefix>`, `SERIES@latest` or `SERIES@N`.
pub fn resolve(repo: &Repository, reference: &str) -> Result<Listed> {
    let all = list_all(repo)?;
    let fail = |detail: &str| Error::SnapshotRef {
        reference: reference.to_string(),
        detail: detail.to_string(),
    };
    if let Some((series, which)) = reference.rsplit_once('@') {
        let found = if which == "latest" {
            let found = latest(&all, series);
            if found.is_none() && all.iter().any(|l| l.snapshot.series == series) {
                return Err(fail(
                    "the series holds only undo snapshots (pre-restore); name one with SERIES@N",
                ));
            }
            found
        } else {
            let n: u64 = which
                .parse()
                .map_err(|_| fail("expected SERIES@latest or SERIES@N"))?;
            all.iter()
                .find(|l| l.snapshot.series == series && l.snapshot.version == n)
                .cloned()
        };
        return found.ok_or_else(|| fail("no such snapshot in that series"));
    }
    let lower = reference.to_ascii_lowercase();
    if lower.len() < 4 || !lower.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(fail(
            "expected an id (at least 4 hex digits), SERIES@latest or SERIES@N",
        ));
    }
    let mut matches = all.into_iter().filter(|l| l.id.hex().starts_with(&lower));
    match (matches.next(), matches.next()) {
        (Some(one), None) => Ok(one),
        (None, _) => Err(fail("no snapshot has this id")),
        (Some(_), Some(_)) => Err(fail("ambiguous id prefix; give more digits")),
    }
}

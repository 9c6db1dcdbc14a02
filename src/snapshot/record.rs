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

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::Id;
use crate::repo::Repository;

const RECORD_MAGIC: &[u8; 8] = b"VSNPSNAP";
const RECORD_VERSION: u32 = 1;

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
}

impl Snapshot {
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
        if version != RECORD_VERSION {
            return Err(format!("unknown record version {version}"));
        }
        postcard::from_bytes(&bytes[12..]).map_err(|e| e.to_string())
    }
}

/// A record with its id.
#[derive(Clone, Debug)]
pub struct Listed {
    pub id: Id,
    pub snapshot: Snapshot,
}

/// Commits a snapshot: allocates its version, writes the record durably, indexes it.
pub fn commit(repo: &Repository, mut snapshot: Snapshot) -> Result<Listed> {
    let series = snapshot.series.clone();
    let mut written = None;
    let (id, version) = repo.index.commit_snapshot(&series, |version| {
        snapshot.version = version;
        let bytes = snapshot.encode();
        let id = Id::of(&bytes);
        let path = repo.snapshots_dir().join(id.hex());
        fsutil::atomic_write(&repo.tmp_dir(), &path, &bytes)?;
        written = Some(snapshot.clone());
        Ok((id, bytes))
    })?;
    let snapshot = written.expect("record written");
    assert_eq!(snapshot.version, version);
    Ok(Listed { id, snapshot })
}

/// Every snapshot, oldest first, after reconciling the index with the record files.
pub fn list_all(repo: &Repository) -> Result<Vec<Listed>> {
    let dir = repo.snapshots_dir();
    let mut on_disk = HashSet::new();
    for entry in std::fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
        let entry = entry.map_err(Error::io("read directory", &dir))?;
        if let Some(id) = entry.file_name().to_str().and_then(Id::from_hex) {
            on_disk.insert(id);
        }
    }
    let rows = repo.index.snapshots()?;
    let indexed: HashSet<Id> = rows.iter().map(|(id, _)| *id).collect();
    let gone: Vec<Id> = indexed.difference(&on_disk).copied().collect();
    let mut missing = Vec::new();
    for id in on_disk.difference(&indexed) {
        let path = dir.join(id.hex());
        let bytes = std::fs::read(&path).map_err(Error::io("read", &path))?;
        let snapshot = Snapshot::decode(&bytes).map_err(|detail| Error::Corrupt {
            what: "snapshot record",
            path: path.clone(),
            detail,
        })?;
        missing.push((*id, bytes, snapshot.series, snapshot.version));
    }
    repo.index.reconcile_snapshots(&missing, &gone)?;
    let mut out = Vec::new();
    for (id, bytes) in rows
        .into_iter()
        .filter(|(id, _)| on_disk.contains(id))
        .chain(missing.into_iter().map(|(id, b, _, _)| (id, b)))
    {
        let snapshot = Snapshot::decode(&bytes).map_err(|detail| Error::Corrupt {
            what: "snapshot record",
            path: dir.join(id.hex()),
            detail,
        })?;
        out.push(Listed { id, snapshot });
    }
    out.sort_by(|a, b| {
        (a.snapshot.time_ns, &a.snapshot.series, a.snapshot.version).cmp(&(
            b.snapshot.time_ns,
            &b.snapshot.series,
            b.snapshot.version,
        ))
    });
    Ok(out)
}

/// The newest snapshot of a series.
pub fn latest(all: &[Listed], series: &str) -> Option<Listed> {
    all.iter()
        .filter(|l| l.snapshot.series == series)
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
            latest(&all, series)
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

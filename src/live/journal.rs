//! The live-restore journal: what a restore in flight is about to do and has done,
//! written durably (atomic replace, fsynced) before every step that changes live
//! state, so that `recover` can roll it back or finish it after a crash.
//!
//! ```text
//! <repo>/journals/<id>.journal   magic "VSNPJRNL" | version u32 LE | postcard Journal
//! <repo>/journals/<id>.lock      flock held by the restoring process
//! <repo>/restores/<id>           magic "VSNPREST" | version u32 LE | postcard Restore
//! ```
//! A `restores/` record is written when a restore commits: what `--undo` undoes.
//! Invariant: a journal whose lock can be taken belongs to a dead process (the kernel
//! drops the lock with the process); one whose lock is held is in flight and left
//! alone.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::Id;
use crate::repo::Repository;

const MAGIC: &[u8; 8] = b"VSNPJRNL";
/// Version 3 added `EntrySwap::held_ino`.
const VERSION: u32 = 3;
const RECORD_MAGIC: &[u8; 8] = b"VSNPREST";
const RECORD_VERSION: u32 = 1;

/// How far a restore got. Recovery rolls back anything before `Committed` and
/// finishes anything from it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum State {
    /// Targets checked; nothing touched yet.
    Prepared,
    /// The quiesce hook is about to run or has run: the application may be down, so
    /// recovery runs the redeploy hook.
    Quiesced,
    /// Every volume is staged (fsynced) and the undo snapshot taken.
    Staged,
    /// Swaps are under way (`Volume::swapped` records which are done).
    Swapping,
    /// Every volume is swapped: the restore has happened.
    Committed,
    /// The redeploy hook has run.
    Redeployed,
}

/// A command the restore runs, recorded so recovery can run it too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hook {
    /// `sh -c COMMAND`.
    Shell(String),
    /// Stop these containers (quiesce), start them and wait for them (redeploy).
    Containers(crate::docker::restore::Redeploy),
}

/// A file or directory's identity: (device, inode).
pub type Ino = (u64, u64);

/// One volume of a restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Volume {
    pub label: String,
    /// The live directory, absolute.
    pub target: PathBuf,
    /// The sibling staging directory, absolute.
    pub stage: PathBuf,
    /// The live directory's identity when the restore began; `None`: it did not exist.
    pub old: Option<Ino>,
    /// The staged directory's identity, once staged.
    pub new: Option<Ino>,
    /// Progress record: the swap of this volume has been done.
    pub swapped: bool,
    /// Set when the target cannot be renamed (a mount point, a filesystem without
    /// `RENAME_EXCHANGE`) and `--allow-in-place-copy` moves its entries instead.
    pub entries: Option<EntrySwap>,
}

/// A swap of a target's top-level entries: the staging directory and a holding
/// directory for the old entries are both inside the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntrySwap {
    pub phase: EntryPhase,
    /// Where the old entries go: `<target>/.volsnap-old-<id>-<n>`.
    pub held: PathBuf,
    /// The holding directory's identity, recorded when it is created (exclusively),
    /// before anything moves into it: recovery moves entries out of, and deletes, only
    /// that directory.
    pub held_ino: Option<Ino>,
    /// The target directory's own attributes before the restore.
    pub old_root: RootAttrs,
    /// The snapshot's attributes for it, read from the staged tree before it moves in.
    pub new_root: Option<RootAttrs>,
}

/// How far an entry swap got. Each phase is journaled before it starts; recovery
/// moves everything of an unfinished swap back, whatever part of a phase was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntryPhase {
    /// Nothing moved yet.
    Staged,
    /// Old entries are moving from the target into the holding directory.
    MovingOut,
    /// Every old entry is held; staged entries are moving into the target.
    MovingIn,
    /// Every staged entry is in the target, which has the snapshot's attributes.
    Done,
}

/// A directory's own attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootAttrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub xattrs: Vec<crate::tree::Xattr>,
}

/// A restore in flight.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    pub id: String,
    /// The snapshot being restored.
    pub snapshot: Id,
    pub pid: u32,
    pub started_ns: i64,
    pub state: State,
    pub quiesce: Option<Hook>,
    pub redeploy: Option<Hook>,
    /// The pre-restore snapshot of the live targets (the undo), once taken.
    pub undo: Option<Id>,
    pub volumes: Vec<Volume>,
}

pub fn dir(repo: &Repository) -> PathBuf {
    repo.cache.join("journals")
}

fn path(repo: &Repository, id: &str) -> PathBuf {
    dir(repo).join(format!("{id}.journal"))
}

fn lock_path(repo: &Repository, id: &str) -> PathBuf {
    dir(repo).join(format!("{id}.lock"))
}

impl Journal {
    /// Writes the journal durably, replacing the previous version atomically.
    pub fn save(&self, repo: &Repository) -> Result<()> {
        fsutil::atomic_write(&repo.tmp_dir(), &path(repo, &self.id), &self.encode())
    }

    /// The journal's file contents.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        postcard::to_io(self, &mut bytes).expect("journals encode");
        bytes
    }

    /// Reads a journal; `None` if it is gone.
    pub fn load(repo: &Repository, id: &str) -> Result<Option<Journal>> {
        let p = path(repo, id);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read journal", &p)(e)),
        };
        Journal::decode(&bytes, id)
            .map(Some)
            .map_err(|detail| Error::Corrupt {
                what: "restore journal",
                path: p.clone(),
                detail,
            })
    }

    /// Decodes the journal file of restore `id`, checking every path it names (see
    /// `check_paths`).
    pub(crate) fn decode(bytes: &[u8], id: &str) -> std::result::Result<Journal, String> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err("not a volsnap journal".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!(
                "journal version {version} is not {VERSION}: settle it with the volsnap \
                 version that wrote it (`volsnap recover`)"
            ));
        }
        let j: Journal = postcard::from_bytes(&bytes[12..]).map_err(|e| e.to_string())?;
        j.check_paths(id).map_err(|detail| {
            format!(
                "{detail}; nothing was moved or deleted (settle the restore by hand and \
                 remove the journal)"
            )
        })?;
        Ok(j)
    }

    /// Checks every path recovery would move or delete against the only shapes this
    /// restore gives them: the journal's own id, absolute targets without `.` or `..`,
    /// `.volsnap-stage-<id>-<n>` beside the target (inside it for an entry swap) and
    /// `.volsnap-old-<id>-<n>` inside it. A journal naming anything else (damaged, or
    /// written by someone else) is never acted on.
    fn check_paths(&self, id: &str) -> std::result::Result<(), String> {
        if self.id != id || !is_restore_id(id) {
            return Err(format!("it holds restore id {:?}", self.id));
        }
        for (n, v) in self.volumes.iter().enumerate() {
            let normal = v.target.is_absolute()
                && v.target.file_name().is_some()
                && v.target.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                });
            if !normal {
                return Err(format!(
                    "target {} is not an absolute path",
                    v.target.display()
                ));
            }
            let stage_dir = match &v.entries {
                Some(_) => v.target.as_path(),
                None => v.target.parent().expect("has a file name"),
            };
            let stage = stage_dir.join(format!(".volsnap-stage-{id}-{n}"));
            if v.stage != stage {
                return Err(format!(
                    "staging path {} is not {}",
                    v.stage.display(),
                    stage.display()
                ));
            }
            if let Some(e) = &v.entries {
                let held = v.target.join(format!(".volsnap-old-{id}-{n}"));
                if e.held != held {
                    return Err(format!(
                        "holding path {} is not {}",
                        e.held.display(),
                        held.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Removes the journal (durably) and then its lock file.
    pub fn remove(&self, repo: &Repository) -> Result<()> {
        let p = path(repo, &self.id);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove journal", &p)(e)),
        }
        fsutil::fsync_dir(&dir(repo))?;
        remove_lock(repo, &self.id);
        Ok(())
    }
}

/// Whether `id` has the shape of a restore id (16 lowercase hex digits).
pub fn is_restore_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes the lock file of journal `id` (best effort: a leftover is harmless).
pub fn remove_lock(repo: &Repository, id: &str) {
    let _ = std::fs::remove_file(lock_path(repo, id));
}

/// Creates a repository subdirectory and makes its name durable.
fn ensure_dir(repo: &Repository, d: &Path) -> Result<()> {
    if !d.exists() {
        fsutil::create_dir_private(d)?;
        fsutil::fsync_dir(&repo.cache)?;
    }
    Ok(())
}

/// A committed in-place restore, as `--undo` needs it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Restore {
    pub id: String,
    pub committed_ns: i64,
    pub snapshot: Id,
    /// Its pre-restore snapshot (of the targets that existed).
    pub undo: Option<Id>,
    pub targets: Vec<RestoreTarget>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreTarget {
    pub label: String,
    pub path: PathBuf,
    /// It existed before the restore (and is in the undo snapshot).
    pub existed: bool,
}

/// Records that restore `j` committed (once; later calls keep the first record).
pub fn record_restore(repo: &Repository, j: &Journal) -> Result<()> {
    let d = repo.cache.join("restores");
    ensure_dir(repo, &d)?;
    let p = d.join(&j.id);
    if p.exists() {
        return Ok(());
    }
    let r = Restore {
        id: j.id.clone(),
        committed_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as i64),
        snapshot: j.snapshot,
        undo: j.undo,
        targets: j
            .volumes
            .iter()
            .map(|v| RestoreTarget {
                label: v.label.clone(),
                path: v.target.clone(),
                existed: v.old.is_some(),
            })
            .collect(),
    };
    fsutil::atomic_write(&repo.tmp_dir(), &p, &r.encode())
}

impl Restore {
    /// The record's file contents.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut bytes = RECORD_MAGIC.to_vec();
        bytes.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        postcard::to_io(self, &mut bytes).expect("records encode");
        bytes
    }

    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Restore, String> {
        if bytes.len() < 12 || &bytes[..8] != RECORD_MAGIC {
            return Err("not a volsnap restore record".into());
        }
        if bytes[8..12] != RECORD_VERSION.to_le_bytes() {
            return Err("unknown record version".into());
        }
        postcard::from_bytes(&bytes[12..]).map_err(|e| e.to_string())
    }
}

/// Every committed in-place restore recorded in the repository.
pub fn restores(repo: &Repository) -> Result<Vec<Restore>> {
    let d = repo.cache.join("restores");
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", &d)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let p = entry.map_err(Error::io("read directory", &d))?.path();
        let bytes = std::fs::read(&p).map_err(Error::io("read", &p))?;
        out.push(Restore::decode(&bytes).map_err(|detail| Error::Corrupt {
            what: "restore record",
            path: p.clone(),
            detail,
        })?);
    }
    Ok(out)
}

/// Takes the lock of journal `id` (creating its file). `None` when another process
/// holds it: that restore is in flight.
pub fn lock(repo: &Repository, id: &str) -> Result<Option<File>> {
    ensure_dir(repo, &dir(repo))?;
    let p = lock_path(repo, id);
    let file = fsutil::open_lock_file(&p)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &p)(e)),
    }
}

/// The ids of every restore journal in the repository (the directory also holds the
/// quiesce journals of container snapshots, `quiesce-*`, which are not restores).
pub fn list(repo: &Repository) -> Result<Vec<String>> {
    let d = dir(repo);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", &d)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let name = entry.map_err(Error::io("read directory", &d))?.file_name();
        if let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".journal"))
            .filter(|n| !n.starts_with("quiesce-"))
        {
            ids.push(id.to_string());
        }
    }
    ids.sort();
    Ok(ids)
}

/// The identity of whatever is at `path` now (not following a final symlink).
pub fn ino(path: &Path) -> Result<Option<Ino>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("stat", path)(e)),
    }
}

//! Integrity checks: structure (every snapshot's trees decode, every referenced chunk is
//! indexed, every indexed pack exists with its recorded size) and, with read-data,
//! every blob of the chosen packs decompressed and re-hashed.
//!
//! Problems are reported with the snapshot and path they damage, so a user knows what
//! is lost. Memory: one set of visited tree ids and, for damaged packs only, the offsets
//! of their good blobs.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Location;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::{self, Listed};
use crate::tree::{DirEntries, Kind};

/// What to check.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Percentage of packs whose every blob is read and verified (None: structure only).
    pub read_data_percent: Option<u8>,
}

/// One thing found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub snapshot: Option<Id>,
    pub path: Option<Vec<u8>>,
    pub pack: Option<Id>,
    pub message: String,
}

/// The outcome of a check.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub snapshots: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub blobs_read: u64,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn check(repo: &Repository, opts: Options, progress: &Progress) -> Result<Report> {
    let _lease = repo.lease("check")?;
    let mut report = Report::default();
    let packs = repo.index.packs()?;
    crate::crash::pause("check listed packs");
    report.packs = packs.len() as u64;
    // Packs: present, with the recorded size. A damaged pack's good blobs are
    // remembered by offset; index rows pointing elsewhere in it are bad.
    let mut damaged: HashMap<Id, HashSet<u64>> = HashMap::new();
    let mut truncated: HashMap<Id, u64> = HashMap::new();
    let pct = opts.read_data_percent.map(|p| p.min(100));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    progress.set_total(if pct.is_some() {
        packs.iter().map(|(_, r)| r.size_bytes).sum()
    } else {
        0
    });
    // A gc running meanwhile deletes packs whose rows it removed first: a pack that
    // cannot be read and has no row any more is gone, not damaged.
    let deleted_since =
        |pack: &Id| -> Result<bool> { Ok(!repo.index.packs()?.iter().any(|(p, _)| p == pack)) };
    // One listing of the store, not a request per pack.
    let in_store: HashMap<Id, u64> = repo.pack_files()?.into_iter().collect();
    for (pack, row) in &packs {
        let path = repo.pack_path(pack);
        let size = match in_store.get(pack) {
            Some(&size) => size,
            None if deleted_since(pack)? => continue,
            None => {
                report.problems.push(Problem {
                    snapshot: None,
                    path: None,
                    pack: Some(*pack),
                    message: format!("pack {}: No such file or directory", path.display()),
                });
                damaged.insert(*pack, HashSet::new());
                continue;
            }
        };
        if size != row.size_bytes {
            report.problems.push(Problem {
                snapshot: None,
                path: None,
                pack: Some(*pack),
                message: format!(
                    "pack {} is {size} bytes, the index says {} (truncated or damaged)",
                    path.display(),
                    row.size_bytes
                ),
            });
            truncated.insert(*pack, size);
        }
        let selected = match pct {
            None => false,
            Some(p) => {
                let mut h = blake3::Hasher::new();
                h.update(&seed.to_le_bytes());
                h.update(&pack.0);
                let roll =
                    u64::from_le_bytes(h.finalize().as_bytes()[0..8].try_into().expect("8 bytes"))
                        % 100;
                roll < u64::from(p)
            }
        };
        if !selected {
            continue;
        }
        let read = repo.open_pack(pack).and_then(|f| match f {
            Some(f) => crate::pack::read_pack(&f).map_err(Error::io("read pack", &path)),
            None => Err(Error::io("read pack", &path)(
                std::io::ErrorKind::NotFound.into(),
            )),
        });
        let (bytes, holes) = match read {
            Ok(b) => b,
            Err(_) if deleted_since(pack)? => continue,
            Err(e) => {
                report.problems.push(Problem {
                    snapshot: None,
                    path: None,
                    pack: Some(*pack),
                    message: format!("read pack {}: {e}", path.display()),
                });
                damaged.insert(*pack, HashSet::new());
                continue;
            }
        };
        report.packs_read += 1;
        progress.add(1, bytes.len() as u64);
        // A pack gc punched holes in no longer hashes to its name; its blobs still verify.
        if holes.is_empty() && Id::of(&bytes) != *pack && size == row.size_bytes {
            report.problems.push(Problem {
                snapshot: None,
                path: None,
                pack: Some(*pack),
                message: format!("pack {} does not match its name (damaged)", path.display()),
            });
        }
        let (blobs, stopped) = crate::pack::scan(&bytes, &holes);
        report.blobs_read += blobs.len() as u64;
        // In a damaged or punched pack, index rows must name a blob that verified.
        let bad =
            blobs.iter().any(|b| b.verified.is_err()) || stopped.is_some() || !holes.is_empty();
        if let Some(why) = &stopped {
            report.problems.push(Problem {
                snapshot: None,
                path: None,
                pack: Some(*pack),
                message: format!("pack {}: {why}", path.display()),
            });
        }
        // Collected bodies are a problem only if an index row names them (below).
        for b in blobs.iter().filter(|b| b.verified.is_err() && !b.collected) {
            report.problems.push(Problem {
                snapshot: None,
                path: None,
                pack: Some(*pack),
                message: format!(
                    "pack {}: blob {} at offset {}: {}",
                    path.display(),
                    b.header.id.short(),
                    b.offset,
                    b.verified.as_ref().unwrap_err()
                ),
            });
        }
        if bad {
            damaged.insert(
                *pack,
                blobs
                    .iter()
                    .filter(|b| b.verified.is_ok())
                    .map(|b| b.offset)
                    .collect(),
            );
        }
    }
    let known_packs: HashSet<Id> = packs.iter().map(|(id, _)| *id).collect();
    // Index rows that point at missing or damaged bytes.
    let mut bad_blobs: HashSet<Id> = HashSet::new();
    let mut in_unlisted: Vec<(Id, Id)> = Vec::new();
    repo.index.for_each_chunk(|id, loc: Location| {
        let fits = truncated
            .get(&loc.pack)
            .is_none_or(|&size| loc.offset + 52 + u64::from(loc.stored_len) <= size);
        let good = damaged
            .get(&loc.pack)
            .is_none_or(|ok| ok.contains(&loc.offset));
        if !fits || !good {
            bad_blobs.insert(id);
        } else if !known_packs.contains(&loc.pack) {
            in_unlisted.push((id, loc.pack));
        }
    })?;
    // A pack written since the list above (a gc's repack moved rows into it, in the
    // transaction that added its own row) was not read, and is not damage. Listed after
    // the rows, every pack a row names is there: a pack is deleted only after its rows
    // are, or after a wait for older operations (this one included).
    if !in_unlisted.is_empty() {
        let now: HashSet<Id> = repo.index.packs()?.into_iter().map(|(id, _)| id).collect();
        bad_blobs.extend(
            in_unlisted
                .into_iter()
                .filter(|(_, pack)| !now.contains(pack))
                .map(|(id, _)| id),
        );
    }
    // Snapshots: records match their names; trees decode; chunks indexed and sound.
    let scan = snapshot::record::scan(repo)?;
    for (path, why) in scan.problems {
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(Id::from_hex);
        report.problems.push(Problem {
            snapshot: id,
            path: None,
            pack: None,
            message: format!("snapshot record {}: {why}", path.display()),
        });
    }
    let snapshots = scan.snapshots;
    report.snapshots = snapshots.len() as u64;
    let mut sound_trees = HashSet::new();
    for snap in &snapshots {
        match repo
            .store
            .get(&crate::snapshot::record::record_key(&snap.id))
        {
            Ok(Some(bytes)) if Id::of(&bytes) == snap.id => {}
            Ok(None) => report.problems.push(Problem {
                snapshot: Some(snap.id),
                path: None,
                pack: None,
                message: "snapshot record is missing".into(),
            }),
            Ok(Some(_)) => report.problems.push(Problem {
                snapshot: Some(snap.id),
                path: None,
                pack: None,
                message: "snapshot record does not match its id".into(),
            }),
            Err(e) => report.problems.push(Problem {
                snapshot: Some(snap.id),
                path: None,
                pack: None,
                message: e.to_string(),
            }),
        }
        let multi = snap.snapshot.volumes.len() > 1;
        for v in &snap.snapshot.volumes {
            let prefix = if multi {
                v.label.as_bytes().to_vec()
            } else {
                Vec::new()
            };
            check_tree(
                repo,
                snap,
                &v.tree,
                &prefix,
                &bad_blobs,
                &mut sound_trees,
                &mut report.problems,
            )?;
        }
    }
    Ok(report)
}

/// Checks a tree and everything below it, with an explicit stack (memory per level is
/// one frame and one name in the shared path; a split directory is read one part at a
/// time); trees found sound are not walked again.
fn check_tree(
    repo: &Repository,
    snap: &Listed,
    id: &Id,
    path: &[u8],
    bad_blobs: &HashSet<Id>,
    sound: &mut HashSet<Id>,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    struct Frame {
        id: Id,
        entries: DirEntries,
        /// Problems found before this tree: it is sound if none were added below it.
        before: usize,
        /// The length of `path` before this tree's name was added.
        path_len: usize,
    }
    let problem = |p: &[u8], message: String| Problem {
        snapshot: Some(snap.id),
        path: Some(p.to_vec()),
        pack: None,
        message,
    };
    // Opens a tree to walk, or records why it cannot be (`None`: nothing to walk).
    let open = |id: &Id, path: &[u8], problems: &mut Vec<Problem>| -> Option<DirEntries> {
        if bad_blobs.contains(id) {
            problems.push(problem(path, format!("tree {} is damaged", id.short())));
            return None;
        }
        match DirEntries::open(repo, id) {
            Ok(t) if t.parts().iter().any(|p| bad_blobs.contains(p)) => {
                problems.push(problem(
                    path,
                    format!("a part of tree {} is damaged", id.short()),
                ));
                None
            }
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(problem(path, e.to_string()));
                None
            }
        }
    };
    if sound.contains(id) {
        return Ok(());
    }
    let mut path = path.to_vec();
    let Some(entries) = open(id, &path, problems) else {
        return Ok(());
    };
    let mut stack = vec![Frame {
        id: *id,
        entries,
        before: problems.len(),
        path_len: path.len(),
    }];
    while let Some(top) = stack.last_mut() {
        let entry = match top.entries.next(repo) {
            Ok(e) => e,
            Err(e) => {
                problems.push(problem(&path, e.to_string()));
                None
            }
        };
        let Some(entry) = entry else {
            let frame = stack.pop().expect("a frame");
            if problems.len() == frame.before {
                sound.insert(frame.id);
            }
            path.truncate(frame.path_len);
            continue;
        };
        let len = path.len();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&entry.name);
        match &entry.kind {
            Kind::Dir { tree } if !sound.contains(tree) => {
                if let Some(entries) = open(tree, &path, problems) {
                    stack.push(Frame {
                        id: *tree,
                        entries,
                        before: problems.len(),
                        path_len: len,
                    });
                    continue;
                }
            }
            Kind::File { chunks, .. } => {
                for c in chunks.iter().map(|r| &r.id) {
                    if bad_blobs.contains(c) {
                        problems.push(problem(&path, format!("chunk {} is damaged", c.short())));
                        break;
                    }
                    if repo.index.lookup(c)?.is_none() {
                        problems.push(problem(
                            &path,
                            format!("chunk {} is missing from the index", c.short()),
                        ));
                        break;
                    }
                }
            }
            _ => {}
        }
        path.truncate(len);
    }
    Ok(())
}

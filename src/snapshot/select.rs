//! Which entries of a snapshot a restore or export covers, and where each goes.
//!
//! A snapshot path `P` (from `SNAP:P`) is relative to the volume root in a
//! single-volume snapshot; with several volumes its first component is a volume label.
//! The whole of a multi-volume snapshot maps each volume to a top-level directory
//! named by its label; a directory maps onto the top itself; a single other entry goes
//! to the top under its own name.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::limits::PATH_DEPTH_MAX;
use crate::repo::Repository;
use crate::snapshot::Listed;
use crate::tree::{self, DirEntries, Entry, Kind};

/// One tree (or single entry) to materialize, and where.
#[derive(Clone, Debug)]
pub struct Selection {
    /// Path below the top of the output ("" = the top itself, for a directory).
    pub dest: Vec<u8>,
    pub entry: Entry,
    /// Tree of the volume root, for hardlinks whose first name is not selected.
    pub volume_root: Id,
    /// Which volume (its label): keys hardlink bookkeeping, since two volumes with
    /// the same content share a root tree id.
    pub volume: String,
    /// Path of `entry` from its volume root ("" for the root), to match hardlink targets.
    pub source_path: Vec<u8>,
}

/// Decides which entries go where, for `path` in `snap`, optionally one volume only.
pub fn select(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    volume: Option<&str>,
) -> Result<Vec<Selection>> {
    let mut components = tree::split_path(path).map_err(Error::Usage)?;
    let volumes: Vec<_> = match volume {
        Some(label) => {
            let v = snap
                .snapshot
                .volumes
                .iter()
                .find(|v| v.label == label)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "snapshot {} has no volume {label:?}",
                        snap.id.short()
                    ))
                })?;
            vec![v]
        }
        None => snap.snapshot.volumes.iter().collect(),
    };
    let multi = volumes.len() > 1;
    let not_found = |p: &[u8]| Error::PathNotFound {
        snapshot: snap.id.short(),
        path: String::from_utf8_lossy(p).into_owned(),
    };
    if multi && components.is_empty() {
        return Ok(volumes
            .iter()
            .map(|v| Selection {
                dest: v.label.as_bytes().to_vec(),
                entry: v.root_entry(),
                volume_root: v.tree,
                volume: v.label.clone(),
                source_path: Vec::new(),
            })
            .collect());
    }
    let volume = if multi {
        let label = components.remove(0);
        *volumes
            .iter()
            .find(|v| v.label.as_bytes() == label)
            .ok_or_else(|| not_found(path))?
    } else {
        volumes[0]
    };
    if components.is_empty() {
        return Ok(vec![Selection {
            dest: Vec::new(),
            entry: volume.root_entry(),
            volume_root: volume.tree,
            volume: volume.label.clone(),
            source_path: Vec::new(),
        }]);
    }
    let entry = tree::resolve(repo, &volume.tree, &components)
        .map_err(|e| match e {
            Error::PathNotFound { .. } => not_found(path),
            other => other,
        })?
        .expect("non-empty path resolves to an entry");
    let source_path = components.join(&b'/');
    let dest = match entry.kind {
        Kind::Dir { .. } => Vec::new(),
        _ => entry.name.clone(),
    };
    Ok(vec![Selection {
        dest,
        entry,
        volume_root: volume.tree,
        volume: volume.label.clone(),
        source_path,
    }])
}

/// Hardlink targets in the selected trees: (volume label, path from the volume root).
/// Restore and export record where they put a file only when a hardlink names it, so
/// their bookkeeping grows with the hardlinks, not with the files.
#[derive(Debug, Default)]
pub struct LinkTargets {
    paths: HashSet<(String, Vec<u8>)>,
    /// The last component of every target: most files are ruled out by name alone,
    /// without building their path.
    names: HashSet<Vec<u8>>,
}

impl LinkTargets {
    /// Whether the entry `name` of the directory `dir` (a path from the root of
    /// `volume`) is a hardlink target; its path is built only when its name is one.
    pub fn contains(&self, volume: &str, dir: &[u8], name: &[u8]) -> bool {
        self.names.contains(name)
            && self
                .paths
                .contains(&(volume.to_string(), crate::walk::join_rel(dir, name)))
    }

    /// Whether the entry at `path` (from the root of `volume`) is a hardlink target.
    pub fn contains_path(&self, volume: &str, path: &[u8]) -> bool {
        match path.iter().rposition(|&b| b == b'/') {
            Some(i) => self.contains(volume, &path[..i], &path[i + 1..]),
            None => self.contains(volume, b"", path),
        }
    }

    fn insert(&mut self, volume: &str, path: &[u8]) {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        self.names.insert(name.to_vec());
        self.paths.insert((volume.to_string(), path.to_vec()));
    }
}

/// A first pass over what `selections` cover, before restore or export writes
/// anything: refuses a tree nested deeper than `PATH_DEPTH_MAX` (the snapshot walk
/// never stores one; only a crafted repository holds one) and gathers the hardlink
/// targets. An explicit stack (memory per level is one frame) and each distinct tree
/// read once, with the depth below it remembered.
pub fn survey(repo: &Repository, selections: &[Selection]) -> Result<LinkTargets> {
    survey_with(repo, selections, None)
}

/// The packs that hold the content of the files a survey met, each once, in the
/// order the walk first needed it: a restore from an object store downloads them in
/// that order ahead of its writers (`PackReader::plan`).
#[derive(Default)]
pub struct PackOrder {
    chunks: HashSet<Id>,
    packs: HashSet<Id>,
    pub order: Vec<Id>,
}

impl PackOrder {
    fn add(&mut self, repo: &Repository, chunks: &[crate::tree::Run]) -> Result<()> {
        for run in chunks {
            if self.chunks.insert(run.id)
                && let Some(loc) = repo.index.lookup(&run.id)?
                && self.packs.insert(loc.pack)
            {
                self.order.push(loc.pack);
            }
        }
        Ok(())
    }
}

/// `survey`, also gathering the packs the files' content is in when `packs` is given.
pub fn survey_with(
    repo: &Repository,
    selections: &[Selection],
    mut packs: Option<&mut PackOrder>,
) -> Result<LinkTargets> {
    let mut out = LinkTargets::default();
    for s in selections {
        match &s.entry.kind {
            Kind::Dir { tree } => survey_tree(repo, tree, s, &mut out, packs.as_deref_mut())?,
            Kind::Hardlink { target } => out.insert(&s.volume, target),
            Kind::File { chunks, .. } => {
                if let Some(p) = packs.as_deref_mut() {
                    p.add(repo, chunks)?;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A directory on `survey_tree`'s stack.
struct SurveyFrame {
    id: Id,
    /// Its name (empty for the top), for the message about a tree too deep.
    name: Vec<u8>,
    subdirs: std::vec::IntoIter<(Vec<u8>, Id)>,
    /// Deepest entry found below it so far, in levels (0: empty).
    height: usize,
}

fn survey_tree(
    repo: &Repository,
    root: &Id,
    s: &Selection,
    out: &mut LinkTargets,
    mut packs: Option<&mut PackOrder>,
) -> Result<()> {
    // Trees already surveyed: how many levels they hold. Per selection, since
    // hardlink targets are paths of one volume.
    let mut heights: HashMap<Id, usize> = HashMap::new();
    let mut stack: Vec<SurveyFrame> = Vec::new();
    let mut next = Some((Vec::new(), *root));
    loop {
        if let Some((name, id)) = next.take() {
            // Entries of a directory at stack index i are i + 1 levels down.
            let depth = stack.len();
            if let Some(&h) = heights.get(&id) {
                if depth + h > PATH_DEPTH_MAX {
                    return Err(too_deep(s, &stack, &name));
                }
                let parent = stack.last_mut().expect("the top is never known yet");
                parent.height = parent.height.max(1 + h);
            } else {
                let corrupt = |e: Error, stack: &[SurveyFrame]| Error::Corrupt {
                    what: "directory",
                    path: display_stack(s, stack, &name).into(),
                    detail: e.to_string(),
                };
                // One part of a split directory in memory at a time.
                let mut entries = DirEntries::open(repo, &id).map_err(|e| corrupt(e, &stack))?;
                let mut subdirs = Vec::new();
                let mut height = 0;
                while let Some(e) = entries.next(repo).map_err(|e| corrupt(e, &stack))? {
                    if depth >= PATH_DEPTH_MAX {
                        return Err(too_deep(s, &stack, &name));
                    }
                    height = 1;
                    match e.kind {
                        Kind::Dir { tree } => subdirs.push((e.name, tree)),
                        Kind::Hardlink { target } => out.insert(&s.volume, &target),
                        Kind::File { chunks, .. } => {
                            if let Some(p) = packs.as_deref_mut() {
                                p.add(repo, &chunks)?;
                            }
                        }
                        _ => {}
                    }
                }
                stack.push(SurveyFrame {
                    id,
                    name,
                    subdirs: subdirs.into_iter(),
                    height,
                });
            }
        }
        let top = stack.last_mut().expect("a frame");
        if let Some(child) = top.subdirs.next() {
            next = Some(child);
            continue;
        }
        let frame = stack.pop().expect("a frame");
        heights.insert(frame.id, frame.height);
        match stack.last_mut() {
            Some(parent) => parent.height = parent.height.max(1 + frame.height),
            None => return Ok(()),
        }
    }
}

/// The path of the directory `name` below the selection (truncated for the message:
/// a path this deep runs to hundreds of kilobytes).
fn display_stack(s: &Selection, stack: &[SurveyFrame], name: &[u8]) -> String {
    const SHOWN: usize = 3;
    let mut parts: Vec<&[u8]> = Vec::new();
    if !s.dest.is_empty() {
        parts.push(&s.dest);
    }
    let names = stack
        .iter()
        .skip(1)
        .map(|f| &f.name[..])
        .chain(Some(name).filter(|n| !n.is_empty()));
    let names: Vec<&[u8]> = names.collect();
    if names.len() > 2 * SHOWN {
        parts.extend(&names[..SHOWN]);
        parts.push(b"...");
        parts.extend(&names[names.len() - SHOWN..]);
    } else {
        parts.extend(&names);
    }
    let path = String::from_utf8_lossy(&parts.join(&b'/')).into_owned();
    if path.is_empty() { ".".into() } else { path }
}

fn too_deep(s: &Selection, stack: &[SurveyFrame], name: &[u8]) -> Error {
    Error::Corrupt {
        what: "snapshot",
        path: display_stack(s, stack, name).into(),
        detail: format!(
            "directories nested deeper than {PATH_DEPTH_MAX} levels (the limit; volsnap never stores such a tree); nothing was written"
        ),
    }
}

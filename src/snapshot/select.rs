//! Which entries of a snapshot a restore or export covers, and where each goes.
//!
//! A snapshot path `P` (from `SNAP:P`) is relative to the volume root in a
//! single-volume snapshot; with several volumes its first component is a volume label.
//! The whole of a multi-volume snapshot maps each volume to a top-level directory
//! named by its label; a directory maps onto the top itself; a single other entry goes
//! to the top under its own name.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::snapshot::Listed;
use crate::tree::{self, Entry, Kind};

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

//! `repair index`: rebuild the index from the packs and the snapshot records.
//!
//! A local repository: every pack is scanned; each blob that verifies is indexed at its
//! offset, so a damaged pack still yields its sound blobs. An object store: the index is
//! built from every host's logs (`repo::sync`), without reading a pack body; only packs
//! that no log names are scanned. Snapshot rows come from the record files.
//! The files cache starts empty: the next snapshot of each series reads its files again.

use crate::error::Result;
use crate::id::Id;
use crate::index::{Commit, Location, PackRow};
use crate::progress::Progress;
use crate::repo::{OpenOptions, Repository};
use crate::snapshot;
use crate::store::Location as StoreLocation;

/// What a rebuild found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub packs: u64,
    pub blobs: u64,
    pub damaged_blobs: u64,
    pub snapshots: u64,
    /// Logs read (object stores: the index is built from them).
    pub logs: u64,
    /// Packs whose bytes were read and scanned.
    pub packs_scanned: u64,
    /// Packs that could not be read or are damaged, with why.
    pub problems: Vec<String>,
}

/// Rebuilds the index of the repository at `location` into a new file beside it
/// (in its cache), then renames it into place (the old index, if any, is kept as
/// `index.redb.old`). Runs only while no other process has the repository open, and
/// keeps every other process out until it is done; interrupted, it leaves the old
/// index as it was.
pub fn rebuild_index(
    location: &StoreLocation,
    opts: &OpenOptions,
    progress: &Progress,
) -> Result<Report> {
    let repo = Repository::open_for_rebuild(location, opts)?;
    // Processes of builds that do not take the open lock still hold leases.
    if Repository::any_live_lock(&repo.cache)? {
        return Err(crate::error::Error::Busy(
            "another volsnap operation is running on this repository; repair the index when it has finished".into(),
        ));
    }
    let mut report = Report::default();
    // An object store: every host's logs first (no pack body is read), then only the
    // packs no log names are scanned (and logged, so other hosts see them too).
    let logged = if repo.store.is_local() {
        None
    } else {
        let synced = crate::repo::sync::apply_logs(&repo, true)?;
        report.logs = synced.logs;
        report.problems.extend(
            (0..synced.bad_logs).map(|_| "a damaged log (named above) was skipped".to_string()),
        );
        Some(synced)
    };
    let mut files = repo.pack_files()?;
    files.sort();
    for (pack, _) in files {
        if let Some(s) = &logged {
            if s.removed.contains(&pack) {
                continue;
            }
            if s.packs.contains(&pack) {
                report.packs += 1;
                continue;
            }
        }
        index_pack(&repo, &pack, &mut report, progress)?;
    }
    if logged.is_some() {
        report.blobs = repo.index.chunk_count()?;
    }
    report.snapshots = snapshot::list_all(&repo)?.len() as u64;
    crate::crash::point("repair index built");
    repo.install_index()?;
    Ok(report)
}

/// Scans pack `pack` and indexes every blob in it that verifies; what does not is
/// counted and named in `report`.
pub(crate) fn index_pack(
    repo: &Repository,
    pack: &Id,
    report: &mut Report,
    progress: &Progress,
) -> Result<()> {
    let path = repo.pack_path(pack);
    let read = repo
        .open_pack(pack)
        .and_then(|f| {
            f.ok_or_else(|| crate::error::Error::Corrupt {
                what: "pack",
                path: path.clone(),
                detail: "vanished while being read".into(),
            })
        })
        .and_then(|f| crate::pack::read_pack(&f).map_err(crate::error::Error::io("read", &path)));
    let (bytes, holes) = match read {
        Ok(b) => b,
        Err(e) => {
            report.problems.push(e.to_string());
            return Ok(());
        }
    };
    progress.add(1, bytes.len() as u64);
    report.packs_scanned += 1;
    let (blobs, stopped) = crate::pack::scan(&bytes, &holes);
    if let Some(why) = stopped {
        report
            .problems
            .push(format!("pack {}: {why}", path.display()));
    }
    let mut rows = Vec::new();
    let mut kind = None;
    for b in &blobs {
        match &b.verified {
            Ok(()) => {
                kind.get_or_insert(b.header.kind as u8);
                rows.push((
                    b.header.id,
                    Location {
                        pack: *pack,
                        offset: b.offset,
                        stored_len: b.header.stored_len,
                        raw_len: b.header.raw_len,
                    },
                ));
            }
            // Given back by gc: nothing referenced it.
            Err(_) if b.collected => {}
            Err(why) => {
                report.damaged_blobs += 1;
                report.problems.push(format!(
                    "pack {}: blob {} at offset {}: {why}",
                    path.display(),
                    b.header.id.short(),
                    b.offset
                ));
            }
        }
    }
    let row = PackRow {
        kind: kind.unwrap_or(0),
        size_bytes: bytes.len() as u64,
        blobs: rows.len() as u64,
    };
    report.packs += 1;
    report.blobs += rows.len() as u64;
    // Found without a log (object stores): log it now, so other hosts index it too.
    let logged = crate::index::SyncedPack {
        pack: *pack,
        row,
        blobs: rows,
        from: None,
    };
    crate::repo::sync::log_packs(repo, std::slice::from_ref(&logged))?;
    repo.index
        .commit_pack(pack, &logged.row, &logged.blobs, Commit::Store)
}

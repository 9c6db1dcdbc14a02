//! `repair index`: rebuild the index from the packs and the snapshot records.
//!
//! Every pack is scanned; each blob that verifies is indexed at its offset, so a
//! damaged pack still yields its sound blobs. Snapshot rows come from the record files.
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
    let mut files = repo.pack_files()?;
    files.sort();
    for (pack, _) in files {
        index_pack(&repo, &pack, &mut report, progress)?;
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
    repo.index.commit_pack(pack, &row, &rows, Commit::Store)
}

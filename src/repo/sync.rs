//! Bringing this host's cache up to date with an object-store repository.
//!
//! A new cache (a host that has not used the repository before, or whose cache was
//! deleted) starts with an empty index: `sync` indexes every pack in the store. The
//! snapshot records need nothing here: listing them always reads the store
//! (`snapshot::record::scan`), and adds the rows of records another host wrote.

use crate::error::Result;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::repair::{Report, index_pack};

/// Indexes the packs of the store when this cache's index knows none.
pub fn sync(repo: &Repository) -> Result<()> {
    if !repo.index.packs()?.is_empty() {
        return Ok(());
    }
    let mut report = Report::default();
    let mut files = repo.pack_files()?;
    files.sort();
    for (pack, _) in files {
        index_pack(repo, &pack, &mut report, &Progress::default())?;
    }
    Ok(())
}

//! Garbage collection: delete what no snapshot references, without ever deleting a
//! blob that a committed snapshot, a snapshot being written, or a restore or export
//! being read will need, and without stopping them.
//!
//! The protocol (no timers or clocks decide safety; see ARCHITECTURE.md):
//! 1. mark: a Bloom filter of every blob reachable from every committed snapshot;
//! 2. condemn (in batches of `GC_ROWS_PER_TRANSACTION` rows with a pause between two,
//!    so writers never wait for a pass over the index): every indexed blob not in the
//!    filter is condemned; writers' dedup treats condemned blobs as absent, so from
//!    then on no new work reuses them (storing a condemned blob again lifts the
//!    condemnation), and writers that start while blobs are condemned check their
//!    files-cache hits against the condemned set;
//! 3. wait until every lease older than the last condemn batch has ended (work that
//!    may have decided to reuse a blob before its batch condemned it has committed or
//!    died);
//! 4. mark again, then sweep (in batches): delete the rows of blobs still condemned
//!    and unreachable, their condemnations staying as tombstones, and lift the rest;
//!    drop the files-cache rows naming a tombstoned blob, then the tombstones;
//! 5. delete packs with nothing live; in the others, punch holes in the bodies of the
//!    blobs just deleted (the space comes back without rewriting live data); rewrite
//!    packs still holding too much dead weight, and delete the old ones after another
//!    wait for older leases (readers may hold their old locations); delete stale
//!    temporary files and unindexed packs that were there before the wait.
//!
//! Memory: a Bloom filter (10 bits per indexed blob, capped), the set of tree ids
//! visited while marking, and the ids deleted by the sweep.

pub mod bloom;
pub mod forget;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use bloom::Bloom;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::blob::{BlobKind, EncodedBlob, HEADER_LEN};
use crate::pack::{PACK_HEADER_LEN, Packer};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::lease::LeaseRow;
use crate::snapshot::{self, cache::DirCache};
use crate::tree::{DirEntries, Kind};

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub dry_run: bool,
    /// Rewrite packs whose dead bytes exceed this percentage of their size.
    pub max_unused_percent: f64,
    /// At most this many live bytes are rewritten by one run.
    pub max_repack_bytes: Option<u64>,
    /// On an object store: how long to wait for another host's lease before stopping
    /// with nothing deleted (`--lease-wait`, `VOLSNAP_GC_LEASE_WAIT`).
    pub lease_wait: Duration,
}

/// The default of `Options::lease_wait`: longer than any snapshot or restore should
/// take between two of its own requests, short enough for a cron job.
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(600);

impl Default for Options {
    fn default() -> Options {
        Options {
            dry_run: false,
            max_unused_percent: 10.0,
            max_repack_bytes: None,
            lease_wait: DEFAULT_LEASE_WAIT,
        }
    }
}

/// What a gc found and did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub dry_run: bool,
    pub snapshots: u64,
    pub blobs: u64,
    pub unreachable_blobs: u64,
    pub unreachable_bytes: u64,
    pub packs_deleted: u64,
    /// Packs that keep live blobs and gave back the space of dead ones in place.
    pub packs_punched: u64,
    pub packs_repacked: u64,
    /// Bytes of pack files removed minus bytes of packs written.
    pub bytes_reclaimed: u64,
    pub stale_files_removed: u64,
    /// Pack files kept although nothing indexed them live: they hold blobs a snapshot
    /// references (indexed again) or could not be read whole.
    pub packs_kept: u64,
    /// Referenced blobs found in such packs with no sound index row, indexed again.
    pub blobs_reindexed: u64,
    /// Whether the index file was compacted ("compacted", or "skipped: why").
    pub index_compaction: Option<String>,
}

/// Called while gc waits for older operations, with the leases it waits for.
pub type OnWait<'a> = &'a dyn Fn(&[(u64, LeaseRow)]);

pub fn gc(
    repo: &Repository,
    opts: &Options,
    progress: &Progress,
    on_wait: OnWait<'_>,
) -> Result<Report> {
    let _gc_lock = lock_gc(repo)?;
    let mut report = Report {
        dry_run: opts.dry_run,
        ..Report::default()
    };
    // What was on disk before any wait: only these can be stale leftovers.
    let packs_on_disk = repo.pack_files()?;
    let tmp_files = list_dir(&repo.tmp_dir())?;
    // On an object store other hosts' packs must be in this index before marking, so
    // their unreachable blobs are condemned (and named in `gc/`) like ours: a pack
    // deleted without its blobs condemned could be one another host dedups against.
    let shared = !repo.store.is_local();
    if shared && !opts.dry_run {
        index_unknown_packs(repo, &packs_on_disk, progress)?;
    }

    let (reach1, snapshots) = mark_indexed(repo, progress, shared && !opts.dry_run)?;
    report.snapshots = snapshots;
    report.blobs = repo.index.chunk_count()?;
    if opts.dry_run {
        let mut dead_in: HashMap<Id, Vec<(u64, u32)>> = HashMap::new();
        repo.index.for_each_chunk(|id, loc| {
            if !reach1.contains(&id) {
                report.unreachable_blobs += 1;
                report.unreachable_bytes += u64::from(loc.stored_len);
                dead_in
                    .entry(loc.pack)
                    .or_default()
                    .push((loc.offset, loc.stored_len));
            }
        })?;
        let live = repo.index.pack_live_bytes()?;
        for (pack, row) in repo.index.packs()? {
            let runs = crate::pack::dead_runs(dead_in.remove(&pack).unwrap_or_default());
            let dead: u64 = runs.iter().map(|(a, b)| b - a).sum();
            let punchable: u64 = runs
                .iter()
                .filter_map(|&r| crate::pack::punchable(r, 4096))
                .map(|(a, b)| b - a)
                .sum();
            let still_live = live.get(&pack).copied().unwrap_or(0).saturating_sub(dead);
            if still_live == 0 {
                report.packs_deleted += 1;
                report.bytes_reclaimed += allocated(repo, &pack, row.size_bytes);
                continue;
            }
            if punchable > 0 {
                report.packs_punched += 1;
                report.bytes_reclaimed += punchable;
            }
            let unused = allocated(repo, &pack, row.size_bytes)
                .saturating_sub(punchable + PACK_HEADER_LEN as u64 + still_live);
            if unused as f64 > row.size_bytes as f64 * opts.max_unused_percent / 100.0 {
                report.packs_repacked += 1;
                report.bytes_reclaimed += unused;
            }
        }
        return Ok(report);
    }

    // Condemn in bounded batches: writers wait for one batch at a time. The wait below
    // reads the lease counter after the last batch, so it covers every operation that
    // may have looked a blob up before its own batch condemned it.
    let rows = rows_per_transaction();
    let (n, bytes) = repo.index.condemn(
        |id| reach1.contains(id),
        rows,
        || between_batches("gc condemned a batch"),
    )?;
    report.unreachable_blobs = n;
    report.unreachable_bytes = bytes;
    crate::crash::point("gc condemned");
    // Across hosts: publish the condemned set, then wait for every lease listed after.
    let run = if shared {
        Some(SharedRun::start(repo, &reach1)?)
    } else {
        None
    };
    drop(reach1);
    wait_for_older_leases(repo, on_wait)?;
    if let Some(run) = &run {
        run.wait_for_leases(repo, opts.lease_wait, on_wait)?;
    }
    crate::crash::point("gc waited");

    // Records other hosts committed meanwhile name trees in packs this index has not
    // seen yet. Indexed as new data (`Commit::Store`): a blob one of them holds again
    // loses its condemnation here, and its row moves to that live copy.
    if shared {
        index_unknown_packs(repo, &repo.pack_files()?, progress)?;
    }
    let (reach2, _) = mark_indexed(repo, progress, shared)?;
    let swept = repo.index.sweep(
        |id| reach2.contains(id),
        rows,
        || between_batches("gc swept a batch"),
    )?;
    crate::crash::point("gc swept");
    // Files-cache rows naming a deleted blob go before the tombstones: until then
    // writers check every cache hit against the index.
    let gone = swept.tombstones;
    repo.index.drop_cache_rows(
        |row| cache_row_names(row, &|id| gone.contains(id)),
        rows,
        || between_batches("gc dropped a batch of cache rows"),
    )?;
    drop(gone);
    crate::crash::point("gc dropped cache rows");
    repo.index.clear_tombstones()?;
    crate::crash::point("gc cleared tombstones");
    let deleted = swept.deleted;
    // A reader that looked up a location before the sweep may still be reading it:
    // nothing is deleted or punched until every operation older than the sweep ended.
    wait_for_older_leases(repo, on_wait)?;
    // Readers on other hosts that began before the second marking (and found their
    // snapshot still committed) may read what the sweep deleted: wait for them too.
    if let Some(run) = &run {
        run.wait_for_leases(repo, opts.lease_wait, on_wait)?;
        run.deleting.set(true);
    }
    crate::crash::point("gc waited after the sweep");
    report.unreachable_blobs = deleted.len() as u64;
    report.unreachable_bytes = deleted.iter().map(|(_, l)| u64::from(l.stored_len)).sum();

    // Packs: delete the empty; give back the dead bodies in the others in place; choose
    // for repacking those still holding too much dead weight (small blobs, crash
    // leftovers, filesystems that cannot punch holes).
    let mut dead_in: HashMap<Id, Vec<(Id, crate::index::Location)>> = HashMap::new();
    for (id, loc) in deleted {
        dead_in.entry(loc.pack).or_default().push((id, loc));
    }
    // The packs first, then the rows: a pack is committed with its rows in one
    // transaction and only gc takes rows out of a pack now, so every pack listed has
    // all its rows counted below. (Listed after the rows, a pack a snapshot committed
    // in between would look empty and be deleted under it.)
    let packs = repo.index.packs()?;
    crate::crash::pause("gc listed packs");
    // One pass over the rows left: live bytes per pack, and where the live blobs lie in
    // the packs that lost some (punching must never touch them).
    let mut live: HashMap<Id, u64> = HashMap::new();
    let mut live_spans: HashMap<Id, Vec<(u64, u64)>> =
        dead_in.keys().map(|p| (*p, Vec::new())).collect();
    repo.index.for_each_chunk(|_, loc| {
        let end = loc.offset + HEADER_LEN as u64 + u64::from(loc.stored_len);
        *live.entry(loc.pack).or_insert(0) += end - loc.offset;
        if let Some(spans) = live_spans.get_mut(&loc.pack) {
            spans.push((loc.offset, end));
        }
    })?;
    let mut to_punch = Vec::new();
    let empty: Vec<Id> = packs
        .iter()
        .filter(|(pack, _)| live.get(pack).copied().unwrap_or(0) == 0)
        .map(|(pack, _)| *pack)
        .collect();
    let kept = keep_referenced(repo, &empty, &reach2, &mut report, progress)?;
    for (pack, row) in &packs {
        if live.get(pack).copied().unwrap_or(0) == 0 {
            if kept.contains(pack) {
                continue;
            }
            let held = allocated(repo, pack, row.size_bytes);
            delete_pack(repo, pack)?;
            report.packs_deleted += 1;
            report.bytes_reclaimed += held;
        } else if let Some(dead) = dead_in.remove(pack) {
            to_punch.push((*pack, dead));
        }
    }
    // Only bytes proven dead are punched: a deleted row's location must hold the
    // header of that very blob (a damaged row may name any bytes), and the blob must
    // not overlap a live row's blob (a header inside a live blob's body may come from
    // a volume).
    let to_punch: Vec<(Id, Vec<(u64, u64)>)> = to_punch
        .into_iter()
        .map(|(pack, dead)| {
            let spans = &live_spans[&pack];
            let proven: Vec<(u64, u32)> = dead
                .into_iter()
                .filter(|(id, loc)| crate::pack::row_is_sound(repo, id, loc))
                .map(|(_, loc)| (loc.offset, loc.stored_len))
                .filter(|&(offset, len)| {
                    let end = offset + HEADER_LEN as u64 + u64::from(len);
                    spans.iter().all(|&(a, b)| end <= a || b <= offset)
                })
                .collect();
            (pack, crate::pack::dead_runs(proven))
        })
        .collect();
    // In parallel: with online discard each punch waits for the device.
    let punched: Vec<Option<u64>> = to_punch
        .par_iter()
        .map(|(pack, dead)| {
            let freed = repo.store.punch(&repo.pack_key(pack), dead)?;
            crate::crash::point("gc punched a pack");
            Ok(freed)
        })
        .collect::<Result<_>>()?;
    for freed in punched.into_iter().flatten() {
        report.packs_punched += 1;
        report.bytes_reclaimed += freed;
    }
    let mut candidates = Vec::new();
    for (pack, row) in packs {
        let live_bytes = live.get(&pack).copied().unwrap_or(0);
        if live_bytes == 0 {
            continue;
        }
        let held = allocated(repo, &pack, row.size_bytes);
        let dead = held.saturating_sub(PACK_HEADER_LEN as u64 + live_bytes);
        if dead as f64 > row.size_bytes as f64 * opts.max_unused_percent / 100.0 {
            candidates.push((dead, pack, held, live_bytes, row.kind));
        }
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    let mut budget = opts.max_repack_bytes.unwrap_or(u64::MAX);
    let chosen: Vec<_> = candidates
        .into_iter()
        .filter(|(_, _, _, live_bytes, _)| {
            let fits = *live_bytes <= budget;
            if fits {
                budget -= live_bytes;
            }
            fits
        })
        .collect();
    // Repacks copy what the index rows name, never what a scan of the bytes suggests.
    let mut rows_of: HashMap<Id, Vec<(Id, crate::index::Location)>> =
        chosen.iter().map(|c| (c.1, Vec::new())).collect();
    if !rows_of.is_empty() {
        repo.index.refresh();
        repo.index.for_each_chunk(|id, loc| {
            if let Some(rows) = rows_of.get_mut(&loc.pack) {
                rows.push((id, loc));
            }
        })?;
    }
    // Packs are rewritten in parallel: verifying their live blobs is the work.
    let written: Vec<u64> = chosen
        .par_iter()
        .map(|(_, pack, _, _, kind)| {
            let w = repack(repo, pack, *kind, &rows_of[pack])?;
            crate::crash::point("gc repacked a pack");
            Ok(w)
        })
        .collect::<Result<_>>()?;
    let mut repacked = Vec::new();
    for ((_, pack, size, _, _), w) in chosen.into_iter().zip(written) {
        report.bytes_reclaimed = report
            .bytes_reclaimed
            .saturating_add(size)
            .saturating_sub(w);
        repacked.push(pack);
    }
    if !repacked.is_empty() {
        // Readers that looked up a location in a repacked pack before its rows moved
        // must finish before the old pack goes.
        wait_for_older_leases(repo, on_wait)?;
        let live = repo.index.pack_live_bytes()?;
        let emptied: Vec<Id> = repacked
            .iter()
            .filter(|pack| live.get(pack).copied().unwrap_or(0) == 0)
            .copied()
            .collect();
        let kept = keep_referenced(repo, &emptied, &reach2, &mut report, progress)?;
        for pack in emptied {
            if !kept.contains(&pack) {
                delete_pack(repo, &pack)?;
                report.packs_repacked += 1;
            }
        }
    }

    // Give the space of deleted index rows back when they were a large share. redb's
    // compaction holds the whole file: every other process's transactions wait for it
    // (0.3 to 0.6 s for an index of 825,000 rows, BENCHMARKS.md). So it runs only
    // while no operation holds a lease; otherwise later writes reuse the freed pages and
    // the next gc tries again.
    if report.unreachable_blobs > 0 && report.unreachable_blobs * 5 >= report.blobs {
        let running = repo.live_leases()?.len();
        report.index_compaction = Some(if running > 0 {
            format!("skipped: {running} operations running")
        } else {
            match repo.index.compact() {
                Ok(true) => "compacted".to_string(),
                Ok(false) => "skipped: another operation holds a transaction".to_string(),
                Err(why) => format!("failed: {why}"),
            }
        });
    }

    // Leftovers of crashed writers: present before the wait, still unindexed now. A
    // pack file is never deleted unread: one holding a blob a snapshot references
    // with no sound row (a pack set aside during a repair, a damaged index) is indexed
    // again and kept. Pack names never repeat (a nonce in every pack), so no writer
    // can re-create a file under a name decided here.
    let indexed: HashSet<Id> = repo.index.packs()?.into_iter().map(|(id, _)| id).collect();
    let leftovers: Vec<Id> = packs_on_disk
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !indexed.contains(id))
        .collect();
    let kept = keep_referenced(repo, &leftovers, &reach2, &mut report, progress)?;
    let doomed: Vec<Id> = leftovers
        .iter()
        .filter(|id| !kept.contains(id))
        .copied()
        .collect();
    crate::repo::sync::log_removed(repo, &doomed)?;
    for id in leftovers {
        if !kept.contains(&id) {
            repo.store.delete(&repo.pack_key(&id))?;
            report.stale_files_removed += 1;
        }
    }
    for path in tmp_files {
        if path.exists() {
            remove_file(&path)?;
            report.stale_files_removed += 1;
        }
    }
    if let Some(run) = run {
        run.finish(repo)?;
    }
    Ok(report)
}

/// Indexes every pack of `packs` this index does not know (written by another host),
/// reading its blob headers. Until every host logs its packs (`repo::sync`), this is how
/// a gc on an object store learns of them.
fn index_unknown_packs(repo: &Repository, packs: &[(Id, u64)], progress: &Progress) -> Result<()> {
    let known: HashSet<Id> = repo.index.packs()?.into_iter().map(|(id, _)| id).collect();
    let mut report = crate::repo::repair::Report::default();
    for (pack, _) in packs {
        if !known.contains(pack) {
            crate::repo::repair::index_pack(repo, pack, &mut report, progress)?;
        }
    }
    Ok(())
}

/// A gc on an object store, between publishing its condemned set (`gc/<host>-<run>`)
/// and deleting that object again. The protocol and its safety argument are in
/// ARCHITECTURE.md ("gc across hosts").
struct SharedRun<'r> {
    repo: &'r Repository,
    key: String,
    bytes: Vec<u8>,
    own_host: String,
    /// Set once gc may delete something: from then on a failed gc leaves its object
    /// (writers keep avoiding the blobs it named; costs re-uploads, never data).
    deleting: std::cell::Cell<bool>,
}

impl<'r> SharedRun<'r> {
    /// PUTs the condemned set (every indexed blob `reach1` rejects), then makes sure no
    /// other host's gc is running (two at once could lift each other's condemnations).
    fn start(repo: &'r Repository, reach1: &Bloom) -> Result<SharedRun<'r>> {
        use crate::repo::lease::{GC_PREFIX, GcObject, hex16};
        let own_host = crate::repo::sync::host_id(repo)?;
        // This host's gc lock is held: any gc object of this host is a dead run's.
        for obj in repo.store.list(GC_PREFIX)? {
            let name = &obj.key[GC_PREFIX.len()..];
            if name.starts_with(&format!("{own_host}-")) {
                repo.store.delete(&obj.key)?;
            }
        }
        let mut condemned = Vec::new();
        repo.index.for_each_chunk(|id, _| {
            if !reach1.contains(&id) {
                condemned.push(id.0);
            }
        })?;
        let key = format!(
            "{GC_PREFIX}{own_host}-{}",
            hex16(&crate::repo::new_random_id()?)
        );
        let bytes = GcObject {
            host: own_host.clone(),
            condemned,
        }
        .encode();
        repo.store.put(&key, &bytes, None)?;
        let run = SharedRun {
            repo,
            key,
            bytes,
            own_host,
            deleting: std::cell::Cell::new(false),
        };
        crate::crash::point("gc published its condemned set");
        for obj in repo.store.list(GC_PREFIX)? {
            let name = &obj.key[GC_PREFIX.len()..];
            if obj.key != run.key && !name.starts_with(&format!("{}-", run.own_host)) {
                let host = name.split('-').next().unwrap_or(name);
                return Err(Error::Busy(format!(
                    "gc: a gc of host {host} is running on this repository ({}); \
                     if that host is gone for good: volsnap gc --release-host {host}",
                    repo.store.display(&obj.key).display()
                )));
            }
        }
        Ok(run)
    }

    /// Lists the lease objects and waits until each of another host is deleted. This
    /// host's are not waited for here: they share this index, so the local protocol
    /// (`wait_for_older_leases`) covers them; dead ones (lock free) are deleted on the
    /// way. A lease of another host still there after `wait` stops gc with nothing
    /// deleted (exit code 11).
    fn wait_for_leases(
        &self,
        repo: &Repository,
        wait: Duration,
        on_wait: OnWait<'_>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let mut pending = Vec::new();
        for (obj, host) in repo.bucket_leases()? {
            if host != self.own_host {
                pending.push((obj, host));
            } else if repo.own_bucket_lease_is_dead(&obj.key)? {
                repo.store.delete(&obj.key)?;
            }
        }
        crate::crash::point("gc listed leases");
        let mut announced = false;
        loop {
            if pending.is_empty() {
                return Ok(());
            }
            if !announced {
                let rows: Vec<(u64, LeaseRow)> = pending
                    .iter()
                    .map(|(o, h)| (0, describe_lease(repo, &o.key, h)))
                    .collect();
                on_wait(&rows);
                announced = true;
            }
            if started.elapsed() >= wait
                && let Some((obj, host)) = pending.first()
            {
                return Err(self.stuck(repo, obj, host, wait));
            }
            std::thread::sleep(Duration::from_millis(200));
            let now: HashSet<String> = repo
                .bucket_leases()?
                .into_iter()
                .map(|(o, _)| o.key)
                .collect();
            pending.retain(|(o, _)| now.contains(&o.key));
        }
    }

    /// The error for a lease of another host that outlived the wait: its kind, host and
    /// age by the store's clock (its Last-Modified against that of the object gc
    /// writes again now).
    fn stuck(
        &self,
        repo: &Repository,
        obj: &crate::store::Object,
        host: &str,
        wait: Duration,
    ) -> Error {
        let row = describe_lease(repo, &obj.key, host);
        let now = repo
            .store
            .put(&self.key, &self.bytes, None)
            .ok()
            .and_then(|()| repo.store.list(crate::repo::lease::GC_PREFIX).ok())
            .and_then(|l| l.into_iter().find(|o| o.key == self.key))
            .and_then(|o| o.modified);
        let age = match (now, obj.modified) {
            (Some(now), Some(then)) => now
                .duration_since(then)
                .map_or("less than a second".to_string(), |d| {
                    format!("{} s", d.as_secs())
                }),
            _ => "an unknown time".to_string(),
        };
        Error::Busy(format!(
            "gc: {} has held a lease for {age} by the store's clock ({}); waited {} s, nothing was deleted; if that host is gone for good: volsnap gc --release-host {host}",
            row.kind,
            repo.store.display(&obj.key).display(),
            wait.as_secs()
        ))
    }

    /// The run ended: its condemned set goes (writers may reuse those blobs again).
    fn finish(self, repo: &Repository) -> Result<()> {
        repo.store.delete(&self.key)?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for SharedRun<'_> {
    fn drop(&mut self) {
        // A run that stopped before deleting anything takes its condemned set back; one
        // that may have deleted leaves it (see `deleting`).
        if !self.deleting.get() {
            let _ = self.repo.store.delete(&self.key);
        }
    }
}

/// How messages name the lease object `key` of host `host`: kind, hostname, host id.
fn describe_lease(repo: &Repository, key: &str, host: &str) -> LeaseRow {
    let lease = repo
        .store
        .get(key)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<crate::repo::lease::BucketLease>(&b).ok());
    let (kind, pid, lock) = match lease {
        Some(l) => (
            format!("a {} on host {} ({host})", l.kind, l.hostname),
            l.pid,
            l.lock,
        ),
        None => (format!("an operation on host {host}"), 0, String::new()),
    };
    LeaseRow {
        lock,
        pid,
        kind,
        started_ns: 0,
    }
}

/// Deletes every lease object of host `host` (hex host id): an operator's word that
/// the host is gone for good and none of its operations will ever write again. Its
/// running gc's object goes too. Returns the number of objects deleted.
pub fn release_host(repo: &Repository, host: &str) -> Result<u64> {
    use crate::repo::lease::{GC_PREFIX, LEASES_PREFIX, hex16, parse_hex16};
    if repo.store.is_local() {
        return Err(Error::Usage(
            "--release-host is for object-store repositories: a local repository's leases are told dead by their locks".into(),
        ));
    }
    let Some(id) = parse_hex16(host) else {
        return Err(Error::Usage(format!(
            "--release-host {host:?}: a host id is 32 hex digits (as gc names it)"
        )));
    };
    let host = hex16(&id);
    if host == crate::repo::sync::host_id(repo)? {
        return Err(Error::Usage(
            "--release-host names this host: its leases are told dead by their locks".into(),
        ));
    }
    let mut n = 0;
    for obj in repo.store.list(&format!("{LEASES_PREFIX}{host}/"))? {
        repo.store.delete(&obj.key)?;
        n += 1;
    }
    for obj in repo.store.list(GC_PREFIX)? {
        if obj.key[GC_PREFIX.len()..].starts_with(&format!("{host}-")) {
            repo.store.delete(&obj.key)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Rows per index write transaction of condemn and sweep: `GC_ROWS_PER_TRANSACTION`, or
/// `VOLSNAP_GC_BATCH_ROWS` (read once; for tests, which need several batches from a
/// few rows to stop gc between two of them).
fn rows_per_transaction() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("VOLSNAP_GC_BATCH_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(crate::limits::GC_ROWS_PER_TRANSACTION)
    })
}

/// Between two of gc's batches: the crash point, then a pause that lets writers waiting
/// for the index's write lock take it. redb's writer lock is an fcntl lock, which the
/// kernel does not hand to waiters in turn: a gc that began its next transaction at once
/// would take the lock again before a woken writer runs, batch after batch (measured on
/// 825,000 rows: a snapshot then waited 1.3 to 1.9 s, no better than behind the single
/// transaction batching replaced). The pause is the time a woken writer needs to be
/// scheduled and take it.
fn between_batches(point: &str) {
    crate::crash::point(point);
    std::thread::sleep(Duration::from_millis(
        crate::limits::GC_PAUSE_BETWEEN_BATCHES_MS,
    ));
}

/// `mark`; on an object store (`shared`), a record another host committed after
/// this gc indexed the packs names blobs in packs it has not seen: those are indexed
/// and the marking starts again (a few times at most: each round sees more).
fn mark_indexed(repo: &Repository, progress: &Progress, shared: bool) -> Result<(Bloom, u64)> {
    let mut rounds = 0;
    loop {
        match mark(repo, progress) {
            Err(Error::MissingChunk { .. }) if shared && rounds < 5 => {
                rounds += 1;
                index_unknown_packs(repo, &repo.pack_files()?, progress)?;
            }
            other => return other,
        }
    }
}

/// Marks every blob reachable from every committed snapshot.
fn mark(repo: &Repository, progress: &Progress) -> Result<(Bloom, u64)> {
    let mut bloom = Bloom::new(repo.index.chunk_count()?);
    let snapshots = reachable(repo, progress, &mut |id| bloom.insert(id))?;
    Ok((bloom, snapshots))
}

/// Calls `visit` with every blob (tree or data) reachable from every committed
/// snapshot (trees once each); returns the number of snapshots.
fn reachable(repo: &Repository, progress: &Progress, visit: &mut dyn FnMut(&Id)) -> Result<u64> {
    let mut trees = HashSet::new();
    // A record that cannot be read makes reachability unknowable: delete nothing.
    let snapshots = snapshot::record::list_complete(repo, "gc")?;
    for s in &snapshots {
        for v in &s.snapshot.volumes {
            visit_tree(repo, &v.tree, visit, &mut trees, progress)?;
        }
    }
    Ok(snapshots.len() as u64)
}

/// Visits the tree `id`, its parts and everything below it not seen yet, with an
/// explicit stack (memory per level is one frame; a split directory is read one part
/// at a time).
fn visit_tree(
    repo: &Repository,
    id: &Id,
    visit: &mut dyn FnMut(&Id),
    seen: &mut HashSet<Id>,
    progress: &Progress,
) -> Result<()> {
    // A tree that cannot be read makes reachability unknowable: stop, delete nothing.
    let mut open = |id: &Id, visit: &mut dyn FnMut(&Id)| -> Result<Option<DirEntries>> {
        if !seen.insert(*id) {
            return Ok(None);
        }
        visit(id);
        let entries = DirEntries::open(repo, id)?;
        entries.parts().iter().for_each(&mut *visit);
        Ok(Some(entries))
    };
    let Some(entries) = open(id, visit)? else {
        return Ok(());
    };
    let mut stack = vec![entries];
    while let Some(top) = stack.last_mut() {
        let Some(e) = top.next(repo)? else {
            stack.pop();
            continue;
        };
        progress.add(1, 0);
        match &e.kind {
            Kind::File { chunks, .. } => chunks.iter().for_each(|r| visit(&r.id)),
            Kind::Dir { tree } => stack.extend(open(tree, visit)?),
            _ => {}
        }
    }
    Ok(())
}

/// Of the pack files about to be deleted, the ones that must stay: each is read (its
/// blob headers) first, and a blob that a snapshot may reference (`reach`) and that has
/// no sound index row elsewhere is confirmed against the snapshots exactly, then
/// verified and indexed here again (`Commit::Mend`), and its pack kept. A pack that
/// cannot be read, or whose walk stops on damage, is kept too: when in doubt, keep.
fn keep_referenced(
    repo: &Repository,
    packs: &[Id],
    reach: &Bloom,
    report: &mut Report,
    progress: &Progress,
) -> Result<HashSet<Id>> {
    let mut keep = HashSet::new();
    let mut candidates = Vec::new();
    for pack in packs {
        let file = match repo.open_pack(pack) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(_) => {
                keep.insert(*pack);
                continue;
            }
        };
        let (headers, stopped) = match crate::pack::read_headers(&file) {
            Ok(h) => h,
            Err(_) => {
                keep.insert(*pack);
                continue;
            }
        };
        if stopped.is_some() {
            keep.insert(*pack);
            continue;
        }
        for (offset, header) in headers {
            if !reach.contains(&header.id) {
                continue;
            }
            match repo.index.lookup(&header.id)? {
                Some(loc) if crate::pack::row_is_sound(repo, &header.id, &loc) => {
                    if loc.pack == *pack {
                        keep.insert(*pack); // indexed here after all: live
                    }
                }
                _ => candidates.push((*pack, offset, header)),
            }
        }
    }
    if candidates.is_empty() {
        report.packs_kept += keep.len() as u64;
        return Ok(keep);
    }
    // The Bloom filter can say yes by mistake: ask the snapshots exactly.
    let wanted: HashSet<Id> = candidates.iter().map(|c| c.2.id).collect();
    let mut referenced = HashSet::new();
    reachable(repo, progress, &mut |id| {
        if wanted.contains(id) {
            referenced.insert(*id);
        }
    })?;
    type Rows = Vec<(Id, crate::index::Location)>;
    let mut mend: HashMap<Id, (u64, Rows, u8)> = HashMap::new();
    let mut opened: Option<(Id, File, u64)> = None;
    for (pack, offset, header) in candidates {
        if !referenced.contains(&header.id) {
            continue;
        }
        keep.insert(pack);
        if opened.as_ref().is_none_or(|(p, _, _)| *p != pack) {
            let path = repo.pack_path(&pack);
            let file = repo.open_pack(&pack)?.ok_or_else(|| {
                Error::io("read pack", &path)(std::io::ErrorKind::NotFound.into())
            })?;
            let size = file
                .metadata()
                .map_err(Error::io("read metadata of", &path))?
                .len();
            opened = Some((pack, file, size));
        }
        let (_, file, size) = opened.as_ref().expect("opened above");
        let sound = crate::pack::read_verified_at(file, offset, &header)
            .map_err(Error::io("read pack", repo.pack_path(&pack)))?;
        if sound {
            let entry = mend
                .entry(pack)
                .or_insert_with(|| (*size, Vec::new(), header.kind as u8));
            entry.1.push((
                header.id,
                crate::index::Location {
                    pack,
                    offset,
                    stored_len: header.stored_len,
                    raw_len: header.raw_len,
                },
            ));
        }
    }
    for (pack, (size_bytes, rows, kind)) in mend {
        let row = crate::index::PackRow {
            kind,
            size_bytes,
            blobs: rows.len() as u64,
        };
        repo.index
            .commit_pack(&pack, &row, &rows, crate::index::Commit::Mend)?;
        report.blobs_reindexed += rows.len() as u64;
    }
    report.packs_kept += keep.len() as u64;
    Ok(keep)
}

/// Whether a files-cache row names a blob `bad` accepts (undecodable rows count too).
fn cache_row_names(row: &[u8], bad: &dyn Fn(&Id) -> bool) -> bool {
    match DirCache::decode(row) {
        Some(c) => c.chunk_ids().any(bad),
        None => true,
    }
}

fn wait_for_older_leases(repo: &Repository, on_wait: OnWait<'_>) -> Result<()> {
    let before = repo.index.next_lease_id()?;
    let mut announced = false;
    loop {
        let older: Vec<_> = repo
            .live_leases()?
            .into_iter()
            .filter(|(id, _)| *id < before)
            .collect();
        if older.is_empty() {
            return Ok(());
        }
        if !announced {
            on_wait(&older);
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Moves the live blobs of `pack` (its index `rows`) into new packs. Returns the bytes
/// written. Works from the rows, never from a scan of the pack's bytes: after holes,
/// bytes that look like blob headers may come from a volume.
fn repack(
    repo: &Repository,
    pack: &Id,
    kind: u8,
    rows: &[(Id, crate::index::Location)],
) -> Result<u64> {
    let path = repo.pack_path(pack);
    let file = repo
        .open_pack(pack)?
        .ok_or_else(|| Error::io("open pack", &path)(std::io::ErrorKind::NotFound.into()))?;
    let kind = if kind == BlobKind::Tree as u8 {
        BlobKind::Tree
    } else {
        BlobKind::Data
    };
    let packer = Packer::for_repack(repo, kind, *pack);
    let mut rows = rows.to_vec();
    rows.sort_by_key(|(_, loc)| loc.offset);
    for (id, loc) in rows {
        let mut buf = vec![0u8; HEADER_LEN + loc.stored_len as usize];
        if std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, loc.offset).is_err() {
            continue; // damaged or truncated: left where it is, `check` reports it
        }
        let Ok(header) = crate::pack::blob::BlobHeader::decode(&buf[..HEADER_LEN]) else {
            continue;
        };
        if header.id != id || header.stored_len != loc.stored_len {
            continue;
        }
        let stored = &buf[HEADER_LEN..];
        // A damaged live blob is left where it is (check reports it), never copied.
        if crate::pack::blob::decode_verified(&header, stored).is_ok() {
            packer.add_encoded(EncodedBlob {
                header,
                stored: stored.to_vec(),
            })?;
        }
    }
    packer.flush()?;
    Ok(packer.new_bytes_stored())
}

/// Bytes the pack's file takes on disk: its size, less any holes gc punched in it.
/// A file that cannot be examined counts at its indexed `size`.
fn allocated(repo: &Repository, pack: &Id, size: u64) -> u64 {
    repo.store.allocated(&repo.pack_key(pack), size)
}

fn delete_pack(repo: &Repository, pack: &Id) -> Result<()> {
    // Other hosts drop their rows of it (object stores; see `repo::sync`).
    crate::repo::sync::log_removed(repo, std::slice::from_ref(pack))?;
    // Row first: a crash after it leaves an unindexed file, removed by the next gc.
    repo.index.remove_pack(pack)?;
    repo.store.delete(&repo.pack_key(pack))?;
    crate::crash::point("gc deleted a pack");
    Ok(())
}

fn remove_file(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}

fn list_dir(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        out.push(e.map_err(Error::io("read directory", dir))?.path());
    }
    Ok(out)
}

/// Only one gc runs at a time; a second one stops at once with a clear error.
fn lock_gc(repo: &Repository) -> Result<File> {
    let path = repo.cache.join("locks").join("gc.lock");
    let file = crate::fsutil::open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Busy(
            "another gc is running on this repository".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path)(e)),
    }
}

//! Copying snapshots from one repository into another: only the blobs the destination
//! lacks are sent, each decompressed and re-hashed before it is written, and a
//! snapshot's record is committed in the destination only after every blob it names
//! is durable there.
//!
//! A copied snapshot keeps everything its record says (series, time, hostname, volumes
//! and their trees, tags, containers, counters, notes) except the two fields each
//! repository assigns itself: the version is the destination series' next one
//! (`record::commit` reserves it), so retention runs in each repository on its own;
//! the parent, a record id of the source, becomes the id of the parent's copy in the
//! destination when it has one, else nothing.
//!
//! **Idempotent:** a snapshot whose record, version and parent aside, is already in the
//! destination (`copy_key`) is skipped, so copying again copies nothing and makes no
//! second record, whatever the version numbers on either side.
//! **Resumable:** packs are written whole (the packer's own commit), and the record is
//! written after both packers are flushed; a killed copy leaves whole packs the next
//! run finds in the destination's index, and no record.
//!
//! Walking without reading everything: a tree present in the destination does not
//! prove that what it names is present (a snapshot's tree packs are committed as they
//! fill, before its data packs; a killed snapshot leaves such trees behind; gc's Bloom
//! filter may keep an unreachable tree whose blobs it deletes). What does prove it is a
//! committed snapshot: its record is written only after every blob it names is
//! durable, and gc keeps what committed snapshots name. So each snapshot is walked
//! beside a *reference*: the nearest snapshot of its series, in the source, whose copy
//! is committed in the destination (found at the start, or copied earlier in this run).
//! A subtree, a part of a split directory or a file's chunk list identical to the
//! reference's at the same path is in the destination with everything below it and
//! is passed over unread; everything else is walked and each blob looked up in the
//! destination's index. A nightly copy of a series thus costs what changed since the
//! last copy. While a gc has blobs condemned in the destination, no reference is
//! trusted (as a snapshot then checks its files-cache hits): a blob a committed
//! snapshot named may then be on its way out.
//!
//! Both repositories are held under a lease for the whole copy (`copy`), taken before
//! anything is listed, so gc on either side deletes nothing the copy reads or names.
//! Memory: the walk holds one frame per directory level (iterative, a split directory
//! one part at a time); each packer remembers the ids it accepted, and is replaced
//! after `COPY_PACKER_BLOBS_MAX` of them (its packs committed, the index then answers).
//! Deliberately absent: recompression. Blobs are appended as the source stored them
//! (verified first), so the destination's zstd level applies to what it snapshots
//! itself; chunk sizes do not matter to a copy, but snapshots taken directly into a
//! repository with other chunk sizes do not deduplicate with the copied ones.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::limits::{COPY_BATCH_BLOBS, COPY_PACKER_BLOBS_MAX, PATH_DEPTH_MAX};
use crate::pack::Packer;
use crate::pack::blob::{BlobKind, HEADER_LEN};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::record::{self, Listed, Snapshot};
use crate::tree::{DirEntries, Entry, Kind};

/// Which snapshots of the source to copy.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// References (`<id>`, `SERIES@latest`, `SERIES@N`); empty: every snapshot that
    /// matches `series` and `tag`.
    pub refs: Vec<String>,
    pub series: Option<String>,
    pub tag: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Report what would be copied and sent; write nothing.
    pub dry_run: bool,
}

/// A source snapshot and its copy in the destination (`None` in a dry run).
#[derive(Clone, Debug)]
pub struct Copied {
    pub source: Listed,
    pub dest: Option<Listed>,
}

/// A source snapshot that could not be copied (its blobs or trees do not verify, or
/// cannot be read): nothing of it was committed in the destination.
#[derive(Clone, Debug)]
pub struct Failed {
    pub source: Listed,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub dry_run: bool,
    /// Copied now, oldest first.
    pub copied: Vec<Copied>,
    /// Already in the destination, with the copy found there.
    pub skipped: Vec<Copied>,
    pub failed: Vec<Failed>,
    /// Blobs sent (or, in a dry run, that would be), and their bytes as stored
    /// (headers included).
    pub data_blobs: u64,
    pub tree_blobs: u64,
    pub bytes_sent: u64,
    /// Directory entries read from the source's trees: what a copy walked (subtrees
    /// identical to the reference's are passed over).
    pub entries_walked: u64,
    /// Source records that cannot be read (left out of a copy of every snapshot).
    pub problems: Vec<(std::path::PathBuf, String)>,
    pub duration_ms: u64,
}

/// What identifies a snapshot across repositories: the BLAKE3 of its record without
/// the two fields each repository assigns itself (the version, and the parent, a
/// record id of that repository).
pub fn copy_key(snapshot: &Snapshot) -> Id {
    let mut s = snapshot.clone();
    s.version = 0;
    s.parent = None;
    Id::of(&s.encode())
}

/// Whether two repository directories are one (the same directory, by device and
/// inode, however it is named).
pub fn same_repository(a: &Repository, b: &Repository) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Some(x), Some(y)) = (a.id, b.id) {
        return x == y;
    }
    // Format-1 repositories have no id: the same directory is the same repository.
    match (std::fs::metadata(&a.cache), std::fs::metadata(&b.cache)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// Copies the selected snapshots of `source` into `dest`, oldest first. A snapshot
/// the source cannot deliver whole (a blob that does not verify, a tree that does not
/// decode) is reported in `failed` and the others are still copied; a failure on the
/// destination's side stops the copy.
pub fn copy(
    source: &Repository,
    dest: &Repository,
    selection: &Selection,
    opts: &Options,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    if same_repository(source, dest) {
        return Err(Error::Usage(format!(
            "{} and {} are the same repository: copy between two repositories",
            source.location, dest.location
        )));
    }
    // Two copies into one repository would both find a snapshot missing and both
    // commit it: one at a time (a dry run commits nothing).
    let _copy_lock = if opts.dry_run {
        None
    } else {
        Some(lock_copies(dest)?)
    };
    // Before anything is listed: gc on either side keeps what the listed snapshots name
    // until the copy ends.
    let _source_lease = source.lease("copy")?;
    let _dest_lease = dest.lease("copy")?;
    // After the lease, as a snapshot checks its files-cache hits: a gc that condemned
    // blobs before it started waits for nothing of ours.
    let trust_references = !dest.index.any_condemned()?;
    let scan = record::scan(source)?;
    let chosen = select(source, &scan.snapshots, selection)?;
    // A snapshot the destination cannot list could be one already copied: stop rather
    // than make a second copy of it.
    let mut in_dest: HashMap<Id, Listed> = record::list_complete(dest, "copy")?
        .into_iter()
        .map(|l| (copy_key(&l.snapshot), l))
        .collect();
    let source_keys: HashMap<Id, Id> = scan
        .snapshots
        .iter()
        .map(|l| (l.id, copy_key(&l.snapshot)))
        .collect();
    // Source snapshots whose copy is committed in the destination (or, in a dry run,
    // was counted as sent): the references of the walk.
    let mut available: HashSet<Id> = scan
        .snapshots
        .iter()
        .filter(|l| in_dest.contains_key(&source_keys[&l.id]))
        .map(|l| l.id)
        .collect();
    let mut report = Report {
        dry_run: opts.dry_run,
        problems: scan.problems.clone(),
        ..Report::default()
    };
    let mut sink = Sink::new(dest, opts.dry_run, progress);
    for listed in chosen {
        let key = copy_key(&listed.snapshot);
        if let Some(there) = in_dest.get(&key) {
            report.skipped.push(Copied {
                source: listed,
                dest: Some(there.clone()),
            });
            continue;
        }
        let reference = if trust_references {
            nearest(&scan.snapshots, &available, &listed)
        } else {
            None
        };
        match copy_one(source, &mut sink, &listed, reference) {
            Ok(()) => {}
            Err(Stop::Source(e)) => {
                sink.discard();
                report.failed.push(Failed {
                    source: listed,
                    error: e.to_string(),
                });
                continue;
            }
            Err(Stop::Dest(e)) => return Err(e),
        }
        available.insert(listed.id);
        let copy = if opts.dry_run {
            None
        } else {
            let mut snapshot = listed.snapshot.clone();
            snapshot.parent = listed
                .snapshot
                .parent
                .and_then(|p| source_keys.get(&p))
                .and_then(|k| in_dest.get(k))
                .map(|l| l.id);
            let committed = record::commit(dest, snapshot)?;
            in_dest.insert(key, committed.clone());
            Some(committed)
        };
        report.copied.push(Copied {
            source: listed,
            dest: copy,
        });
    }
    report.data_blobs = sink.data_blobs.load(Ordering::Relaxed);
    report.tree_blobs = sink.tree_blobs.load(Ordering::Relaxed);
    report.bytes_sent = sink.bytes.load(Ordering::Relaxed);
    report.entries_walked = sink.entries.load(Ordering::Relaxed);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Takes `locks/copy.lock` in the destination's cache, held until the copy ends (a
/// kernel lock: it dies with its process). It orders the copies of one host; two hosts
/// copying the same snapshot into one bucket at once can still both commit it (two
/// records of the same content, each restoring exactly).
fn lock_copies(dest: &Repository) -> Result<std::fs::File> {
    let dir = dest.cache.join("locks");
    if !dir.exists() {
        crate::fsutil::create_dir_private(&dir)?;
    }
    let path = dir.join("copy.lock");
    let file = crate::fsutil::open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Busy(format!(
            "another copy into {} is running; run this one again when it has finished",
            dest.location
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path)(e)),
    }
}

/// The snapshots a selection names, oldest first, each once. Without references:
/// every snapshot matching the filters, undo snapshots of in-place restores left out
/// unless the tag filter names their tag (they live by the restores of the host that
/// took them, which the destination does not have, so its next `forget` would drop
/// them).
fn select(source: &Repository, all: &[Listed], selection: &Selection) -> Result<Vec<Listed>> {
    if selection.refs.is_empty() {
        return Ok(all
            .iter()
            .filter(|l| {
                selection
                    .series
                    .as_ref()
                    .is_none_or(|s| &l.snapshot.series == s)
            })
            .filter(|l| match &selection.tag {
                Some(t) => l.snapshot.tags.contains(t),
                None => !l.snapshot.is_undo(),
            })
            .cloned()
            .collect());
    }
    if selection.series.is_some() || selection.tag.is_some() {
        return Err(Error::Usage(
            "give snapshots to copy, or --name/--tag, not both".into(),
        ));
    }
    let mut out: Vec<Listed> = Vec::new();
    for reference in &selection.refs {
        let listed = record::resolve(source, reference).map_err(|e| match e {
            Error::SnapshotRef { reference, detail } => Error::SnapshotRef {
                reference,
                detail: format!(
                    "{detail} (in repository {}, the one copied from)",
                    source.location
                ),
            },
            other => other,
        })?;
        if !out.iter().any(|l| l.id == listed.id) {
            out.push(listed);
        }
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

/// The reference for copying `s`: of the source snapshots of its series whose copy is
/// in the destination, the newest not newer than `s`, else the oldest newer one.
fn nearest<'a>(all: &'a [Listed], available: &HashSet<Id>, s: &Listed) -> Option<&'a Listed> {
    let series = all
        .iter()
        .filter(|l| l.snapshot.series == s.snapshot.series && available.contains(&l.id));
    let (older, newer): (Vec<&Listed>, Vec<&Listed>) =
        series.partition(|l| l.snapshot.time_ns <= s.snapshot.time_ns);
    older
        .into_iter()
        .max_by_key(|l| l.snapshot.time_ns)
        .or_else(|| newer.into_iter().min_by_key(|l| l.snapshot.time_ns))
}

/// Why copying one snapshot stopped: the source could not deliver it (the copy goes
/// on with the next), or the destination failed (the copy stops).
enum Stop {
    Source(Error),
    Dest(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Dest(e)
    }
}

/// Marks an error as the source's.
fn src<T>(r: Result<T>) -> std::result::Result<T, Stop> {
    r.map_err(Stop::Source)
}

/// Sends every blob of `s` the destination lacks, then makes them durable there.
fn copy_one(
    source: &Repository,
    sink: &mut Sink<'_>,
    s: &Listed,
    reference: Option<&Listed>,
) -> std::result::Result<(), Stop> {
    for v in &s.snapshot.volumes {
        let like = reference
            .and_then(|r| r.snapshot.volumes.iter().find(|rv| rv.label == v.label))
            .map(|rv| rv.tree);
        walk(source, sink, v.tree, like)?;
    }
    // Data before trees, both before the record (`record::commit`).
    sink.flush()?;
    crate::crash::point("copy blobs stored");
    Ok(())
}

/// One directory being walked, beside the same directory of the reference.
struct Frame {
    dir: DirEntries,
    reference: Option<DirEntries>,
    /// Parts of the reference's directory: the parts of `dir` among them are passed
    /// over.
    reference_parts: HashSet<Id>,
    /// Parts of `dir`: the parts of the reference among them hold no entry `dir`
    /// looks up.
    parts: HashSet<Id>,
}

/// Sends the tree `root` and everything below it that the tree `like` (the same
/// volume in the reference snapshot) does not hold, with an explicit stack.
fn walk(
    source: &Repository,
    sink: &mut Sink<'_>,
    root: Id,
    like: Option<Id>,
) -> std::result::Result<(), Stop> {
    if like == Some(root) {
        return Ok(());
    }
    let mut batch: Vec<Id> = Vec::new();
    let mut stack = vec![open(source, sink, root, like)?];
    while let Some(top) = stack.last_mut() {
        while top.dir.at_part_start()
            && top
                .dir
                .next_part_id()
                .is_some_and(|p| top.reference_parts.contains(p))
        {
            top.dir.skip_part();
        }
        let Some(entry) = src(top.dir.next(source))? else {
            stack.pop();
            continue;
        };
        let same = match &mut top.reference {
            Some(r) => src(seek(source, r, &top.parts, &entry.name))?,
            None => None,
        };
        sink.entries.fetch_add(1, Ordering::Relaxed);
        sink.progress.add(1, 0);
        match entry.kind {
            Kind::File { chunks, .. } => {
                if matches!(&same, Some(Entry { kind: Kind::File { chunks: c, .. }, .. }) if *c == chunks)
                {
                    continue;
                }
                batch.extend(chunks.iter().map(|r| r.id));
                if batch.len() >= COPY_BATCH_BLOBS {
                    sink.send_data(source, &mut batch)?;
                }
            }
            Kind::Dir { tree } => {
                let like = match same {
                    Some(Entry {
                        kind: Kind::Dir { tree: t },
                        ..
                    }) => Some(t),
                    _ => None,
                };
                if like == Some(tree) {
                    continue;
                }
                if stack.len() >= PATH_DEPTH_MAX {
                    return Err(Stop::Source(Error::CorruptTree {
                        id: tree,
                        detail: format!("nested deeper than {PATH_DEPTH_MAX} directories"),
                    }));
                }
                let frame = open(source, sink, tree, like)?;
                stack.push(frame);
            }
            _ => {}
        }
    }
    sink.send_data(source, &mut batch)?;
    Ok(())
}

/// Opens the directory `tree` (and `like`, the reference's), sending its blob and the
/// parts the reference does not share.
fn open(
    source: &Repository,
    sink: &Sink<'_>,
    tree: Id,
    like: Option<Id>,
) -> std::result::Result<Frame, Stop> {
    let dir = src(DirEntries::open(source, &tree))?;
    sink.send(source, &tree, BlobKind::Tree)?;
    let reference = match like {
        Some(l) => Some(src(DirEntries::open(source, &l))?),
        None => None,
    };
    let reference_parts: HashSet<Id> = reference
        .iter()
        .flat_map(|r| r.parts().iter().copied())
        .collect();
    for part in dir.parts() {
        if !reference_parts.contains(part) {
            sink.send(source, part, BlobKind::Tree)?;
        }
    }
    let parts = if reference_parts.is_empty() {
        HashSet::new()
    } else {
        dir.parts().iter().copied().collect()
    };
    Ok(Frame {
        dir,
        reference,
        reference_parts,
        parts,
    })
}

/// Advances the reference's directory to the entry named `name` and takes it, if it
/// has one; parts `dir` shares (`shared`) are passed over unread.
fn seek(
    source: &Repository,
    reference: &mut DirEntries,
    shared: &HashSet<Id>,
    name: &[u8],
) -> Result<Option<Entry>> {
    loop {
        while reference.at_part_start()
            && reference.next_part_id().is_some_and(|p| shared.contains(p))
        {
            reference.skip_part();
        }
        match reference.peek(source)? {
            Some(e) if e.name.as_slice() < name => {
                reference.next(source)?;
            }
            Some(e) if e.name.as_slice() == name => return reference.next(source),
            _ => return Ok(None),
        }
    }
}

/// The destination's side: one packer per kind, the counters, and in a dry run the
/// ids counted as sent.
struct Sink<'d> {
    dest: &'d Repository,
    progress: &'d Progress,
    data: Packer<'d>,
    trees: Packer<'d>,
    dry: Option<Mutex<HashSet<Id>>>,
    data_blobs: AtomicU64,
    tree_blobs: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
}

impl<'d> Sink<'d> {
    fn new(dest: &'d Repository, dry_run: bool, progress: &'d Progress) -> Sink<'d> {
        Sink {
            dest,
            progress,
            data: Packer::new(dest, BlobKind::Data),
            trees: Packer::new(dest, BlobKind::Tree),
            dry: dry_run.then(Mutex::default),
            data_blobs: AtomicU64::new(0),
            tree_blobs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
        }
    }

    /// Sends the blob `id` (expected to be of `kind`) unless the destination has it.
    /// It is read as stored, decompressed and re-hashed (`read_blob_encoded`), and
    /// appended as it is. A blob is stored by the kind its header gives: a file may
    /// hold the bytes of a tree blob, and then the id names that one blob.
    fn send(&self, source: &Repository, id: &Id, kind: BlobKind) -> std::result::Result<(), Stop> {
        let (first, other) = match kind {
            BlobKind::Data => (&self.data, &self.trees),
            BlobKind::Tree => (&self.trees, &self.data),
        };
        if first.has(id)? {
            return Ok(());
        }
        if let Some(counted) = &self.dry {
            if !counted.lock().expect("dry-run lock").insert(*id) {
                return Ok(());
            }
            let loc = src(source.index.lookup(id))?;
            let loc = src(loc.ok_or(Error::MissingChunk { id: *id }))?;
            self.count(kind, HEADER_LEN as u64 + u64::from(loc.stored_len));
            return Ok(());
        }
        let blob = src(source.read_blob_encoded(id))?;
        let stored_kind = blob.header.kind;
        let packer = if stored_kind == kind {
            first
        } else if other.has(id)? {
            return Ok(());
        } else {
            other
        };
        let len = (HEADER_LEN + blob.stored.len()) as u64;
        if packer.add_encoded(blob)? {
            self.count(stored_kind, len);
        }
        Ok(())
    }

    fn count(&self, kind: BlobKind, bytes: u64) {
        match kind {
            BlobKind::Data => &self.data_blobs,
            BlobKind::Tree => &self.tree_blobs,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress.add(0, bytes);
    }

    /// Sends the data blobs of `batch` in parallel, then empties it.
    fn send_data(
        &mut self,
        source: &Repository,
        batch: &mut Vec<Id>,
    ) -> std::result::Result<(), Stop> {
        batch.sort_unstable();
        batch.dedup();
        {
            let this = &*self;
            batch
                .par_iter()
                .try_for_each(|id| this.send(source, id, BlobKind::Data))?;
        }
        batch.clear();
        if self.data.new_blobs() + self.trees.new_blobs() >= COPY_PACKER_BLOBS_MAX {
            // The packers remember every id they accepted: commit their packs and let
            // the index answer for them from now on.
            self.flush()?;
        }
        Ok(())
    }

    /// Makes everything sent durable and indexed (data packs first), and starts new
    /// packers.
    fn flush(&mut self) -> Result<()> {
        self.data.flush()?;
        self.trees.flush()?;
        // Lookups see the rows just committed (the shared read snapshot may be older).
        self.dest.index.refresh();
        self.discard();
        Ok(())
    }

    /// Starts new packers; blobs accepted and not yet in a committed pack are dropped
    /// (after a snapshot failed). Packs already indexed stay, unreferenced until a
    /// later copy names them or gc removes them; on an object store, packs still
    /// uploading or not yet logged are left unindexed: a later copy sends those blobs
    /// again, and gc removes the packs.
    fn discard(&mut self) {
        self.data = Packer::new(self.dest, BlobKind::Data);
        self.trees = Packer::new(self.dest, BlobKind::Tree);
    }
}

//! The snapshot pipeline: walk each volume in parallel, reuse unchanged files from the
//! files cache, read, chunk, hash and compress the rest, build trees bottom-up, then
//! commit the record.
//!
//! Parallelism: directories and the files in a directory are rayon tasks; each file is
//! read in batches whose chunks are hashed and compressed in parallel. Both cores stay
//! busy whether a volume holds many small files or a few large ones.
//! Memory: the metadata of one volume's entries (not their contents) is held until its
//! trees are built; file contents stream through bounded batches.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use rustix::fs::FileType;
use rustix::io::Errno;

use super::cache::{self, CachedFile, DirCache};
use super::record::{self, Listed, RootMeta, Snapshot, Stats, Unreadable, Volume};
use super::source::FileSource;
use crate::chunker::{self, Batch, ChunkSizes};
use crate::error::{Error, Result, errno};
use crate::id::Id;
use crate::limits::{
    DIR_FDS_HELD_MAX, FILE_RUNS_MAX, NAME_BYTES_MAX, NOTE_EXAMPLES_MAX, PATH_DEPTH_MAX,
    RACY_WINDOW_NS, READ_BATCH_BYTES, SYMLINK_TARGET_BYTES_MAX, UNREADABLE_LISTED_MAX,
    XATTR_BYTES_MAX,
};
use crate::pack::Packer;
use crate::pack::blob::BlobKind;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::tree::{self, Entry, Kind, Run, Xattr};
use crate::walk::{self, Stat};

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub series: Option<String>,
    pub tags: Vec<String>,
    pub skip_if_unchanged: bool,
    pub excludes: Vec<String>,
    /// Descend into other filesystems mounted inside a volume.
    pub cross_filesystems: bool,
    /// Volume labels, one per directory, instead of the directories' names.
    pub labels: Option<Vec<String>>,
    /// Read and hash everything but store nothing: the snapshot is returned unsaved
    /// (id zero) and its trees are readable in this process only.
    pub dry_run: bool,
    /// The containers the directories belong to, recorded in the snapshot.
    pub containers: Vec<super::record::ContainerManifest>,
}

/// The result of `create`.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub listed: Listed,
    /// True when `skip_if_unchanged` found nothing new and `listed` is the parent.
    pub skipped: bool,
    /// What went wrong after the commit without undoing it (an index compaction).
    pub warnings: Vec<String>,
}

/// An entry found by the walk, before it becomes part of a tree.
struct Node {
    name: Vec<u8>,
    stat: Stat,
    xattrs: Vec<Xattr>,
    what: What,
}

enum What {
    File { size: u64, chunks: Vec<Run> },
    Hardlink { target: Vec<u8> },
    Dir(DirNode),
    Symlink { target: Vec<u8> },
    Fifo,
    CharDevice,
    BlockDevice,
}

/// A directory the walk has finished.
enum DirNode {
    /// Its tree is stored: nothing below it is held in memory.
    Built(Id),
    /// Its subtree holds a multiply-linked file: which of its names becomes the file
    /// and which become hardlinks is decided in depth-first name order once the whole
    /// volume is walked (`finish_volume`), so its entries wait until then.
    Pending(Vec<Node>),
}

impl Node {
    /// Whether this entry keeps its directory pending (see `DirNode::Pending`).
    fn holds_links(&self) -> bool {
        match &self.what {
            What::File { .. } => self.stat.nlink > 1,
            What::Dir(DirNode::Pending(_)) => true,
            _ => false,
        }
    }
}

/// What visiting a name yields: nothing (skipped or unreadable), or a node and, for a
/// file that may be trusted next time, its files-cache row.
type Visited = Option<(Node, Option<CachedFile>)>;

/// State shared by the workers of one volume.
struct Ctx<'a> {
    repo: &'a Repository,
    data: &'a Packer<'a>,
    sizes: ChunkSizes,
    /// The chunk every long stretch of zeros (a hole) is made of: its id and bytes.
    zero_chunk: &'a (Id, Vec<u8>),
    series: &'a str,
    label: &'a str,
    root: &'a Path,
    root_dev: u64,
    cross_filesystems: bool,
    excludes: &'a GlobSet,
    racy_after_ns: i64,
    /// A gc has blobs condemned: cache hits must be checked against the index.
    check_cache_hits: bool,
    progress: &'a Progress,
    trees: &'a Packer<'a>,
    unreadable: &'a Unreadables,
    notes: &'a Notes,
    cache_rows: &'a Mutex<cache::Spool>,
    files: AtomicU64,
    dirs: AtomicU64,
    bytes: AtomicU64,
    bytes_read: AtomicU64,
}

impl Ctx<'_> {
    fn unreadable(&self, rel: &[u8], error: impl std::fmt::Display) {
        let path = walk::display_path(self.root, rel)
            .into_os_string()
            .into_vec();
        self.unreadable.add(Unreadable {
            path,
            error: error.to_string(),
        });
    }

    /// Extended attributes past `XATTR_BYTES_MAX` are left out, with the reason listed.
    fn limit_xattrs(&self, rel: &[u8], xattrs: Vec<Xattr>) -> Vec<Xattr> {
        let bytes = xattr_bytes(&xattrs);
        if bytes <= XATTR_BYTES_MAX {
            return xattrs;
        }
        self.unreadable(
            rel,
            format!(
                "extended attributes: {} of them, {bytes} bytes, over the limit of {XATTR_BYTES_MAX} bytes per entry; not included",
                xattrs.len()
            ),
        );
        Vec::new()
    }

    fn note(&self, kind: &'static str, rel: &[u8]) {
        self.notes.add(kind, walk::display_path(self.root, rel));
    }

    fn excluded(&self, rel: &[u8], name: &[u8]) -> bool {
        !self.excludes.is_empty()
            && (self
                .excludes
                .is_match(Path::new(std::ffi::OsStr::from_bytes(rel)))
                || self
                    .excludes
                    .is_match(Path::new(std::ffi::OsStr::from_bytes(name))))
    }
}

use std::os::unix::ffi::OsStringExt;

/// Takes a snapshot of `dirs` into `repo`.
pub fn create(
    repo: &Repository,
    dirs: &[PathBuf],
    opts: &Options,
    progress: &Progress,
) -> Result<Outcome> {
    let started = Instant::now();
    let time_ns = now_ns();
    if dirs.is_empty() {
        return Err(Error::Usage("snapshot needs at least one directory".into()));
    }
    let mut sources = Vec::new();
    for dir in dirs {
        let canonical = std::fs::canonicalize(dir).map_err(Error::io("snapshot source", dir))?;
        if !canonical.is_dir() {
            return Err(Error::Usage(format!(
                "snapshot source {} is not a directory",
                dir.display()
            )));
        }
        sources.push(canonical);
    }
    let labels = match &opts.labels {
        Some(l) if l.len() == sources.len() => l.clone(),
        Some(_) => {
            return Err(Error::Usage(
                "one label per snapshot source is needed".into(),
            ));
        }
        None => labels_for(&sources),
    };
    let series = match &opts.series {
        Some(s) if s.is_empty() || s.contains(['@', ':', '\0', '/']) => {
            return Err(Error::Usage(format!(
                "series name {s:?} must be non-empty and contain none of '@', ':', '/'"
            )));
        }
        Some(s) => s.clone(),
        None => default_series(&sources, &labels),
    };
    let excludes = build_excludes(&opts.excludes)?;
    // Held until the record is committed: gc keeps every chunk this run may reuse.
    let _lease = repo.lease("snapshot")?;
    // Taken after the lease: a gc that condemned blobs before it waits for nothing of
    // ours, so every cached chunk list must then be checked (see `gc`).
    let check_cache_hits = repo.index.any_condemned()?;
    let parent = record::latest(&record::list_all(repo)?, &series);
    if let Some(p) = &parent {
        progress.set_total(p.snapshot.stats.bytes);
    }
    let sizes = repo.config.chunk_sizes();
    let zero_chunk = {
        let zeros = vec![0u8; chunker::zero_chunk_len(sizes)];
        (Id::of(&zeros), zeros)
    };
    let (data, trees) = if opts.dry_run {
        (
            Packer::dry(repo, BlobKind::Data),
            Packer::dry(repo, BlobKind::Tree),
        )
    } else {
        (
            Packer::new(repo, BlobKind::Data),
            Packer::new(repo, BlobKind::Tree),
        )
    };
    let mut volumes = Vec::new();
    let mut stats = Stats::default();
    let unreadable = Unreadables::default();
    let notes = Notes::default();
    // Files-cache rows wait in a spool file until the record is committed: held in
    // memory they would cost about 100 bytes per file of the volume.
    let cache_rows = Mutex::new(cache::Spool::new(repo)?);
    for (source, label) in sources.iter().zip(&labels) {
        let root_fd = walk::open_root(source).map_err(|e| Error::io("open", source)(errno(e)))?;
        let root_stat =
            walk::stat_fd(root_fd.as_fd()).map_err(|e| Error::io("stat", source)(errno(e)))?;
        let ctx = Ctx {
            repo,
            data: &data,
            trees: &trees,
            sizes,
            zero_chunk: &zero_chunk,
            series: &series,
            label,
            root: source,
            root_dev: root_stat.dev,
            cross_filesystems: opts.cross_filesystems,
            excludes: &excludes,
            racy_after_ns: time_ns - RACY_WINDOW_NS,
            check_cache_hits,
            progress,
            unreadable: &unreadable,
            notes: &notes,
            cache_rows: &cache_rows,
            files: AtomicU64::new(0),
            dirs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
        };
        let root_node = walk_dir(&ctx, root_fd.as_fd(), b"", 0)?;
        let (tree, linked_bytes) = finish_volume(&trees, root_node)?;
        let root_xattrs = match walk::xattrs_fd(root_fd.as_fd()) {
            Ok(x) => ctx.limit_xattrs(b"", x),
            Err(e) => {
                ctx.unreadable(b"", format!("extended attributes: {}", errno(e)));
                Vec::new()
            }
        };
        let root = RootMeta {
            mode: root_stat.mode,
            uid: root_stat.uid,
            gid: root_stat.gid,
            mtime_ns: root_stat.mtime_ns,
            xattrs: root_xattrs,
        };
        volumes.push(Volume {
            label: label.clone(),
            source: source.clone().into_os_string().into_vec(),
            tree,
            root,
        });
        stats.files += ctx.files.into_inner();
        stats.dirs += ctx.dirs.into_inner() + 1;
        stats.bytes += ctx.bytes.into_inner() - linked_bytes;
        stats.bytes_read += ctx.bytes_read.into_inner();
    }
    let (unreadable, unlisted) = unreadable.into_parts();
    let mut notes = notes.into_lines();
    if unlisted > 0 {
        notes.push(format!(
            "{unlisted} more paths could not be read; only the first {UNREADABLE_LISTED_MAX} are listed"
        ));
    }
    // Data packs before tree packs, both before the record: nothing committed ever
    // refers to a blob that is not durable and indexed.
    data.flush()?;
    trees.flush()?;
    if let Some(p) = parent
        .as_ref()
        .filter(|_| opts.skip_if_unchanged && unreadable.is_empty())
        // The root directory's own metadata is in the record, not in a tree.
        && p.snapshot
            .volumes
            .iter()
            .map(|v| (&v.label, v.tree, &v.root))
            .eq(volumes.iter().map(|v| (&v.label, v.tree, &v.root)))
    {
        return Ok(Outcome {
            listed: p.clone(),
            skipped: true,
            warnings: Vec::new(),
        });
    }
    stats.new_chunks = data.new_blobs();
    stats.new_bytes_stored = data.new_bytes_stored() + trees.new_bytes_stored();
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let mut tags = opts.tags.clone();
    tags.sort();
    tags.dedup();
    let snapshot = Snapshot {
        series,
        version: 0,
        time_ns,
        hostname: hostname(),
        volumes,
        tags,
        parent: parent.map(|p| p.id),
        stats,
        incomplete: !unreadable.is_empty(),
        unreadable,
        notes,
        containers: opts.containers.clone(),
    };
    if opts.dry_run {
        return Ok(Outcome {
            listed: Listed {
                id: Id([0; 32]),
                snapshot,
                guarded_by: None,
            },
            skipped: false,
            warnings: Vec::new(),
        });
    }
    crate::crash::pause("snapshot before commit");
    let listed = record::commit(repo, snapshot)?;
    if let Err(e) = cache::store_spool(repo, cache_rows.into_inner().expect("lock")) {
        return Err(record::withdraw(repo, &listed.id, e));
    }
    // A snapshot that added a large share of the index (a first snapshot, a big change)
    // leaves redb's file full of pages freed by its many small transactions: give them
    // back. Best effort, and proportional to the work just done; skipped (by redb) while
    // another process holds a transaction. The snapshot is committed whatever happens
    // here; an error (an I/O error of the index) is said as a warning.
    let mut warnings = Vec::new();
    let compact = repo
        .index
        .chunk_count()
        .map_err(|e| e.to_string())
        .and_then(|n| {
            if listed.snapshot.stats.new_chunks * 4 >= n {
                repo.index.compact()
            } else {
                Ok(false)
            }
        });
    if let Err(why) = compact {
        warnings.push(format!("the index could not be compacted: {why}"));
    }
    Ok(Outcome {
        listed,
        skipped: false,
        warnings,
    })
}

/// Directories nearer the volume root than this are walked recursively, their
/// subdirectories in parallel; deeper ones by `walk_deep` with an explicit stack, so
/// the call stack and the descriptors held stay bounded whatever the depth.
const PARALLEL_DEPTH: usize = 24;

/// What a directory's scan found besides its finished entries: subdirectories still to
/// walk (name and the walk's stat).
type Subdirs = Vec<(CString, Stat)>;

/// One directory being walked: its files-cache row (old and new) and the entries
/// finished so far.
struct DirState {
    key: Vec<u8>,
    old: Option<(DirCache, Vec<u8>)>,
    nodes: Vec<Node>,
    new_cache: DirCache,
}

impl DirState {
    fn new(ctx: &Ctx<'_>, key: Vec<u8>) -> Result<DirState> {
        let old = cache::load(ctx.repo, &key)?;
        Ok(DirState {
            key,
            old,
            nodes: Vec::new(),
            new_cache: DirCache::default(),
        })
    }

    /// Lists the directory and visits every entry but its subdirectories (in
    /// parallel), which are returned to be walked by the caller.
    fn scan(&mut self, ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &[u8]) -> Result<Subdirs> {
        let names = match walk::list_dir(dir) {
            Ok(n) => n,
            Err(e) => {
                ctx.unreadable(rel, errno(e));
                return Ok(Vec::new());
            }
        };
        let old_cache = self.old.as_ref().map(|(c, _)| c);
        let results: Vec<Result<Scanned>> = names
            .into_par_iter()
            .map(|name| scan_entry(ctx, dir, rel, name, old_cache))
            .collect();
        let mut subdirs = Vec::new();
        for r in results {
            match r? {
                Scanned::Skipped => {}
                Scanned::Done(node, cached) => {
                    self.nodes.push(node);
                    self.new_cache.files.extend(cached);
                }
                Scanned::Subdir(name, stat) => subdirs.push((name, stat)),
            }
        }
        Ok(subdirs)
    }

    /// Writes the directory's files-cache row if it changed, and stores its tree
    /// unless it must wait for hardlink resolution.
    fn finish(mut self, ctx: &Ctx<'_>) -> Result<DirNode> {
        self.nodes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        self.new_cache
            .files
            .sort_unstable_by(|a, b| a.name.cmp(&b.name));
        // The cache rows go first and are dropped before the tree is built: in a
        // directory of millions of entries each is hundreds of megabytes.
        let new_cache = std::mem::take(&mut self.new_cache);
        let bytes = new_cache.encode();
        let unchanged = match self.old.take() {
            Some((_, old_bytes)) => old_bytes == bytes,
            None => new_cache.files.is_empty(),
        };
        drop(new_cache);
        if !unchanged {
            ctx.cache_rows
                .lock()
                .expect("lock")
                .push(&self.key, &bytes)?;
        }
        drop(bytes);
        if self.nodes.iter().any(Node::holds_links) {
            return Ok(DirNode::Pending(self.nodes));
        }
        let entries: Vec<Entry> = self.nodes.into_iter().map(Node::into_entry).collect();
        Ok(DirNode::Built(store_tree(ctx.trees, &entries)?))
    }
}

/// What scanning one name gave.
enum Scanned {
    /// Excluded, vanished or unreadable (reported).
    Skipped,
    /// A finished entry, with its files-cache row for a file that may be trusted next time.
    Done(Node, Option<CachedFile>),
    /// A directory of the volume's filesystem, to walk.
    Subdir(CString, Stat),
}

/// Walks the directory `dir` (at `rel`, `depth` levels below the volume root) and
/// everything below it.
fn walk_dir(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &[u8], depth: usize) -> Result<DirNode> {
    if depth >= PARALLEL_DEPTH {
        return walk_deep(ctx, dir, rel, depth);
    }
    let mut state = DirState::new(ctx, cache::key(ctx.series, ctx.label, rel))?;
    let subdirs = state.scan(ctx, dir, rel)?;
    let nodes: Vec<Result<Option<Node>>> = subdirs
        .into_par_iter()
        .map(|(name, stat)| {
            let rel_child = walk::join_rel(rel, name.to_bytes());
            let Some((fd, stat, xattrs)) = open_subdir(ctx, dir, &name, &rel_child, stat) else {
                return Ok(None);
            };
            let what = What::Dir(walk_dir(ctx, fd.as_fd(), &rel_child, depth + 1)?);
            Ok(Some(Node {
                name: name.into_bytes(),
                stat,
                xattrs,
                what,
            }))
        })
        .collect();
    for n in nodes {
        state.nodes.extend(n?);
    }
    state.finish(ctx)
}

/// A directory on the walk's current path in `walk_deep`.
struct Frame {
    /// Open while the frame is among the `DIR_FDS_HELD_MAX` deepest; otherwise
    /// reopened through `..` of its child when the walk climbs back to it.
    fd: Option<OwnedFd>,
    /// (device, inode), to check a reopened descriptor against.
    dev_ino: (u64, u64),
    /// The bytes this frame's name added to the shared relative path.
    rel_added: usize,
    /// Keys the files-cache rows of its children (see `deep_key`).
    key_hash: [u8; 32],
    subdirs: std::vec::IntoIter<(CString, Stat)>,
    state: DirState,
    /// This directory's own entry, finished when the frame is.
    entry: Option<(CString, Stat, Vec<Xattr>)>,
}

/// Walks a deep subtree with an explicit stack: memory per level is one frame, and at
/// most `DIR_FDS_HELD_MAX` directory descriptors are open. A directory nested deeper
/// than `PATH_DEPTH_MAX` below the volume root is kept empty and listed as unreadable.
fn walk_deep(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &[u8], depth: usize) -> Result<DirNode> {
    let mut rel = rel.to_vec();
    let root_stat = walk::stat_fd(dir)
        .map_err(|e| Error::io("stat", walk::display_path(ctx.root, &rel))(errno(e)))?;
    let root_fd = rustix::io::fcntl_dupfd_cloexec(dir, 0)
        .map_err(|e| Error::io("dup", walk::display_path(ctx.root, &rel))(errno(e)))?;
    let key_hash = *blake3::hash(&rel).as_bytes();
    let mut state = DirState::new(ctx, deep_key(ctx, &key_hash))?;
    let subdirs = state.scan(ctx, root_fd.as_fd(), &rel)?;
    let mut stack = vec![Frame {
        fd: Some(root_fd),
        dev_ino: (root_stat.dev, root_stat.ino),
        rel_added: 0,
        key_hash,
        subdirs: subdirs.into_iter(),
        state,
        entry: None,
    }];
    // Frames below this index hold no descriptor.
    let mut first_open = 0;
    loop {
        let top = stack.last_mut().expect("the stack holds the subtree root");
        if let Some((name, stat)) = top.subdirs.next() {
            // A frame without a descriptor has no subdirectories left (cleared when
            // its reopening failed).
            let parent = top
                .fd
                .as_ref()
                .expect("a frame with subdirectories is open");
            let len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.to_bytes());
            let Some((fd, stat, xattrs)) = open_subdir(ctx, parent.as_fd(), &name, &rel, stat)
            else {
                rel.truncate(len);
                continue;
            };
            let mut child_hash = blake3::Hasher::new();
            child_hash.update(&top.key_hash);
            child_hash.update(name.to_bytes());
            let key_hash = *child_hash.finalize().as_bytes();
            let mut state = DirState::new(ctx, deep_key(ctx, &key_hash))?;
            let subdirs = if depth + stack.len() >= PATH_DEPTH_MAX {
                ctx.unreadable(
                    &rel,
                    format!(
                        "nested deeper than {PATH_DEPTH_MAX} directories; its contents are not included"
                    ),
                );
                Vec::new()
            } else {
                state.scan(ctx, fd.as_fd(), &rel)?
            };
            stack.push(Frame {
                fd: Some(fd),
                dev_ino: (stat.dev, stat.ino),
                rel_added: rel.len() - len,
                key_hash,
                subdirs: subdirs.into_iter(),
                state,
                entry: Some((name, stat, xattrs)),
            });
            if stack.len() - first_open > DIR_FDS_HELD_MAX {
                stack[first_open].fd = None;
                first_open += 1;
            }
            continue;
        }
        let frame = stack.pop().expect("a frame");
        let node = frame.state.finish(ctx)?;
        let Some((name, stat, xattrs)) = frame.entry else {
            return Ok(node);
        };
        rel.truncate(rel.len() - frame.rel_added);
        let parent_index = stack.len() - 1;
        let parent = &mut stack[parent_index];
        if parent.fd.is_none() {
            first_open = first_open.min(parent_index);
            parent.fd = match &frame.fd {
                Some(child) => reopen_parent(ctx, child.as_fd(), parent.dev_ino, &rel),
                // Its child could not be reopened either: no way back up that is safe.
                None => {
                    ctx.unreadable(
                        &rel,
                        "a directory below it moved during the snapshot; its entries not yet read are not included",
                    );
                    None
                }
            };
            if parent.fd.is_none() {
                // Moved away meanwhile: the rest of its entries cannot be reached
                // safely (the reason is listed).
                parent.subdirs = Vec::new().into_iter();
            }
        }
        parent.state.nodes.push(Node {
            name: name.into_bytes(),
            stat,
            xattrs,
            what: What::Dir(node),
        });
    }
}

/// The files-cache key of a directory walked by `walk_deep`: a hash chained from its
/// ancestors' names, so building it costs the name, not the depth (a directory
/// 100,000 levels down would otherwise key its row by a path of 100,000 names).
/// Relative paths never start with NUL, so these never meet `cache::key`'s.
fn deep_key(ctx: &Ctx<'_>, key_hash: &[u8; 32]) -> Vec<u8> {
    let mut rel = vec![0];
    rel.extend_from_slice(key_hash);
    cache::key(ctx.series, ctx.label, &rel)
}

/// Reopens a directory through `..` of its child, only if it is still the directory
/// the walk saw (device and inode); otherwise lists it as unreadable and gives `None`.
fn reopen_parent(
    ctx: &Ctx<'_>,
    child: BorrowedFd<'_>,
    dev_ino: (u64, u64),
    rel: &[u8],
) -> Option<OwnedFd> {
    let fd = match walk::open_dir_at(child, c"..") {
        Ok(fd) => fd,
        Err(e) => {
            ctx.unreadable(rel, format!("reopening it: {}", errno(e)));
            return None;
        }
    };
    match walk::stat_fd(fd.as_fd()) {
        Ok(s) if (s.dev, s.ino) == dev_ino => Some(fd),
        _ => {
            ctx.unreadable(
                rel,
                "moved during the snapshot; its entries not yet read are not included",
            );
            None
        }
    }
}

/// Opens a subdirectory the scan found, with its xattrs; a directory of another
/// filesystem (unless crossing is asked for) is returned as an empty entry instead.
/// `None` when it cannot be opened (listed as unreadable).
fn open_subdir(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CStr,
    rel: &[u8],
    seen: Stat,
) -> Option<(OwnedFd, Stat, Vec<Xattr>)> {
    let fd = match walk::open_dir_at(dir, name) {
        Ok(fd) => fd,
        Err(e) => {
            ctx.unreadable(rel, errno(e));
            return None;
        }
    };
    let stat = match walk::stat_fd(fd.as_fd()) {
        Ok(s) if s.file_type == FileType::Directory && s.dev == seen.dev => s,
        Ok(_) => {
            ctx.unreadable(rel, "replaced during the snapshot");
            return None;
        }
        Err(e) => {
            ctx.unreadable(rel, errno(e));
            return None;
        }
    };
    let xattrs = match walk::xattrs_fd(fd.as_fd()) {
        Ok(x) => ctx.limit_xattrs(rel, x),
        Err(e) => {
            ctx.unreadable(rel, format!("extended attributes: {}", errno(e)));
            Vec::new()
        }
    };
    Some((fd, stat, xattrs))
}

/// Scans one name of a directory: excluded, stat, and every kind but a directory of
/// the volume's filesystem finished here.
fn scan_entry(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &[u8],
    name: CString,
    old_cache: Option<&DirCache>,
) -> Result<Scanned> {
    let name_bytes = name.to_bytes();
    // The entry's relative path is built only when needed: in a deep tree building it
    // for every entry would cost the depth each time.
    let at = At {
        rel,
        name: name_bytes,
    };
    if !ctx.excludes.is_empty() && ctx.excluded(&at.path(), name_bytes) {
        return Ok(Scanned::Skipped);
    }
    if name_bytes.len() > NAME_BYTES_MAX {
        ctx.unreadable(
            &at.path(),
            format!(
                "a name of {} bytes, over the limit of {NAME_BYTES_MAX}",
                name_bytes.len()
            ),
        );
        return Ok(Scanned::Skipped);
    }
    let stat = match walk::stat_at(dir, &name) {
        Ok(s) => s,
        Err(Errno::NOENT) => {
            ctx.unreadable(&at.path(), "vanished during the snapshot");
            return Ok(Scanned::Skipped);
        }
        Err(e) => {
            ctx.unreadable(&at.path(), errno(e));
            return Ok(Scanned::Skipped);
        }
    };
    if stat.file_type == FileType::Directory {
        ctx.dirs.fetch_add(1, Ordering::Relaxed);
        if stat.dev == ctx.root_dev || ctx.cross_filesystems {
            return Ok(Scanned::Subdir(name, stat));
        }
        ctx.note(NOTE_OTHER_FILESYSTEM, &at.path());
    }
    Ok(match visit(ctx, dir, &at, &name, stat, old_cache)? {
        Some((node, cached)) => Scanned::Done(node, cached),
        None => Scanned::Skipped,
    })
}

fn visit(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    at: &At<'_>,
    name: &CStr,
    stat: Stat,
    old_cache: Option<&DirCache>,
) -> Result<Visited> {
    let name_bytes = name.to_bytes();
    let node = |xattrs, what| Node {
        name: name_bytes.to_vec(),
        stat,
        xattrs,
        what,
    };
    let xattrs_at = |ctx: &Ctx<'_>| match walk::xattrs_at(dir, name) {
        Ok(x) => ctx.limit_xattrs(&at.path(), x),
        Err(e) => {
            ctx.unreadable(&at.path(), format!("extended attributes: {}", errno(e)));
            Vec::new()
        }
    };
    let out = match stat.file_type {
        FileType::RegularFile => {
            let hit = old_cache.and_then(|c| c.get(name_bytes)).filter(|c| {
                c.size == stat.size
                    && c.mtime_ns == stat.mtime_ns
                    && c.ctime_ns == stat.ctime_ns
                    && c.ino == stat.ino
            });
            let hit = match hit {
                Some(h) if ctx.check_cache_hits => {
                    let mut stored = true;
                    for r in &h.chunks {
                        stored &= ctx.repo.index.is_stored(&r.id)?;
                    }
                    stored.then_some(h)
                }
                other => other,
            };
            if let Some(hit) = hit {
                ctx.files.fetch_add(1, Ordering::Relaxed);
                ctx.bytes.fetch_add(hit.size, Ordering::Relaxed);
                ctx.progress.add(1, hit.size);
                let n = node(
                    hit.xattrs.clone(),
                    What::File {
                        size: hit.size,
                        chunks: hit.chunks.clone(),
                    },
                );
                return Ok(Some((n, Some(hit.clone()))));
            }
            return read_file(ctx, dir, name, at, stat);
        }
        // A directory of another filesystem, not crossed: kept empty (noted).
        FileType::Directory => node(xattrs_at(ctx), What::Dir(DirNode::Built(empty_tree(ctx)?))),
        FileType::Symlink => match walk::read_link_at(dir, name) {
            Ok(target) if target.len() > SYMLINK_TARGET_BYTES_MAX => {
                ctx.unreadable(
                    &at.path(),
                    format!(
                        "a symlink target of {} bytes, over the limit of {SYMLINK_TARGET_BYTES_MAX}",
                        target.len()
                    ),
                );
                return Ok(None);
            }
            Ok(target) => node(xattrs_at(ctx), What::Symlink { target }),
            Err(e) => {
                ctx.unreadable(&at.path(), errno(e));
                return Ok(None);
            }
        },
        FileType::Fifo => node(xattrs_at(ctx), What::Fifo),
        FileType::CharacterDevice => node(xattrs_at(ctx), What::CharDevice),
        FileType::BlockDevice => node(xattrs_at(ctx), What::BlockDevice),
        FileType::Socket | FileType::Unknown => {
            ctx.note(NOTE_SOCKET, &at.path());
            return Ok(None);
        }
    };
    Ok(Some((out, None)))
}

/// The id of the empty tree, stored once per snapshot.
fn empty_tree(ctx: &Ctx<'_>) -> Result<Id> {
    store_tree(ctx.trees, &[])
}

/// Why reading a file stopped.
enum ReadError {
    Io(std::io::Error),
    /// The file's chunk list grew past `FILE_RUNS_MAX`.
    TooManyRuns,
    Store(Error),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

fn read_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CStr,
    at: &At<'_>,
    stat: Stat,
) -> Result<Visited> {
    // Between the walk's stat and this open: where a test swaps the entry.
    crate::crash::pause("snapshot before file open");
    let (fd, before): (OwnedFd, Stat) = match walk::open_regular_at(dir, name, &stat) {
        Ok(walk::Opened::File(fd, before)) => (fd, before),
        Ok(walk::Opened::Replaced(now)) => {
            let what = if now.file_type == FileType::RegularFile {
                "replaced by a file of another filesystem during the snapshot"
            } else {
                "replaced by another kind of file during the snapshot"
            };
            ctx.unreadable(&at.path(), what);
            return Ok(None);
        }
        Err(Errno::NOENT) => {
            ctx.unreadable(&at.path(), "vanished during the snapshot");
            return Ok(None);
        }
        Err(e) => {
            ctx.unreadable(&at.path(), errno(e));
            return Ok(None);
        }
    };
    // A file whose xattrs could not be read is recorded without them and reported,
    // and never cached: the next snapshot must try (and report) again.
    let (xattrs, xattrs_ok) = match walk::xattrs_fd(fd.as_fd()) {
        Ok(x) if xattr_bytes(&x) > XATTR_BYTES_MAX => (ctx.limit_xattrs(&at.path(), x), false),
        Ok(x) => (x, true),
        Err(e) => {
            ctx.unreadable(&at.path(), format!("extended attributes: {}", errno(e)));
            (Vec::new(), false)
        }
    };
    let file = File::from(fd);
    let mut chunks: Vec<Run> = Vec::new();
    let mut source = FileSource::new(&file);
    let read = chunker::chunk_source(
        &mut source,
        ctx.sizes,
        READ_BATCH_BYTES,
        before.size,
        |batch| {
            let store = |r: &std::ops::Range<usize>, bytes: &[u8]| -> Result<Id, ReadError> {
                let piece = &bytes[r.clone()];
                let id = Id::of(piece);
                ctx.data.store(id, piece).map_err(ReadError::Store)?;
                Ok(id)
            };
            let content_bytes = match batch {
                Batch::Bytes {
                    bytes,
                    chunks: ranges,
                } => {
                    if ranges.len() == 1 {
                        tree::push_run(&mut chunks, store(&ranges[0], bytes)?, 1);
                    } else {
                        let ids: Vec<Id> = ranges
                            .par_iter()
                            .map(|r| store(r, bytes))
                            .collect::<Result<_, ReadError>>()?;
                        for id in ids {
                            tree::push_run(&mut chunks, id, 1);
                        }
                    }
                    bytes.len() as u64
                }
                // Zeros not read (a hole): the zero chunk, once, however long.
                Batch::Zeros { len, count } => {
                    let (id, zeros) = ctx.zero_chunk;
                    assert_eq!(len, zeros.len(), "one zero chunk length per repository");
                    ctx.data.store(*id, zeros).map_err(ReadError::Store)?;
                    tree::push_run(&mut chunks, *id, count);
                    len as u64 * count
                }
            };
            ctx.progress.add(0, content_bytes);
            if chunks.len() > FILE_RUNS_MAX {
                return Err(ReadError::TooManyRuns);
            }
            Ok::<(), ReadError>(())
        },
    );
    ctx.bytes_read
        .fetch_add(source.bytes_read, Ordering::Relaxed);
    let size = match read {
        Ok(n) => n,
        Err(ReadError::Io(e)) => {
            ctx.unreadable(&at.path(), e);
            return Ok(None);
        }
        Err(ReadError::TooManyRuns) => {
            ctx.unreadable(
                &at.path(),
                format!(
                    "more than {FILE_RUNS_MAX} distinct chunks, the limit of one file's chunk list; not included"
                ),
            );
            return Ok(None);
        }
        Err(ReadError::Store(e)) => return Err(e),
    };
    ctx.files.fetch_add(1, Ordering::Relaxed);
    ctx.bytes.fetch_add(size, Ordering::Relaxed);
    ctx.progress.add(1, 0);
    let after = walk::stat_fd(file.as_fd()).ok();
    let stable = after.is_some_and(|a| {
        a.size == size && a.mtime_ns == before.mtime_ns && a.ctime_ns == before.ctime_ns
    });
    if !stable {
        ctx.note(NOTE_CHANGED, &at.path());
    }
    let racy = before.mtime_ns.max(before.ctime_ns) >= ctx.racy_after_ns;
    let cached = (stable && xattrs_ok && !racy && stat.ino == before.ino).then(|| CachedFile {
        name: name.to_bytes().to_vec(),
        size,
        mtime_ns: before.mtime_ns,
        ctime_ns: before.ctime_ns,
        ino: before.ino,
        xattrs: xattrs.clone(),
        chunks: chunks.clone(),
    });
    let node = Node {
        name: name.to_bytes().to_vec(),
        stat: before,
        xattrs,
        what: What::File { size, chunks },
    };
    Ok(Some((node, cached)))
}

impl Node {
    /// The tree entry of a finished node (not a pending directory).
    fn into_entry(self) -> Entry {
        let kind = match self.what {
            What::File { size, chunks } => Kind::File { size, chunks },
            What::Hardlink { target } => Kind::Hardlink { target },
            What::Dir(DirNode::Built(tree)) => Kind::Dir { tree },
            What::Dir(DirNode::Pending(_)) => unreachable!("pending directories are built first"),
            What::Symlink { target } => Kind::Symlink { target },
            What::Fifo => Kind::Fifo,
            What::CharDevice => Kind::CharDevice {
                rdev: self.stat.rdev,
            },
            What::BlockDevice => Kind::BlockDevice {
                rdev: self.stat.rdev,
            },
        };
        Entry {
            name: self.name,
            kind,
            mode: self.stat.mode,
            uid: self.stat.uid,
            gid: self.stat.gid,
            mtime_ns: self.stat.mtime_ns,
            xattrs: self.xattrs,
        }
    }
}

/// Stores a directory's tree (split across blobs when large); returns its id.
fn store_tree(trees: &Packer<'_>, entries: &[Entry]) -> Result<Id> {
    tree::store_dir(entries, |id, bytes| trees.store(id, bytes).map(|_| ()))
}

/// A pending directory being finished by `finish_volume`.
struct PendingFrame {
    nodes: Vec<Node>,
    /// The next node to resolve.
    next: usize,
    /// The bytes its name added to the path.
    path_added: usize,
}

/// Finishes a volume's root: in every pending directory (those holding multiply-linked
/// files), depth first in name order, every name of a file after its first becomes a
/// `Hardlink` to the first; then their trees are stored, deepest first. Iterative, like
/// the walk. Returns the root tree and the content bytes of the names turned into
/// hardlinks (content is counted once per file, not once per name).
fn finish_volume(trees: &Packer<'_>, root: DirNode) -> Result<(Id, u64)> {
    let nodes = match root {
        DirNode::Built(id) => return Ok((id, 0)),
        DirNode::Pending(nodes) => nodes,
    };
    let mut first: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut linked_bytes = 0;
    let mut path: Vec<u8> = Vec::new();
    let mut stack = vec![PendingFrame {
        nodes,
        next: 0,
        path_added: 0,
    }];
    loop {
        let top = stack.last_mut().expect("the root frame");
        if top.next < top.nodes.len() {
            let node = &mut top.nodes[top.next];
            top.next += 1;
            let len = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&node.name);
            match &mut node.what {
                What::Dir(DirNode::Pending(children)) => {
                    let nodes = std::mem::take(children);
                    stack.push(PendingFrame {
                        nodes,
                        next: 0,
                        path_added: path.len() - len,
                    });
                    continue;
                }
                What::File { size, .. } if node.stat.nlink > 1 => {
                    let key = (node.stat.dev, node.stat.ino);
                    match first.get(&key) {
                        Some(target) => {
                            linked_bytes += *size;
                            node.what = What::Hardlink {
                                target: target.clone(),
                            };
                        }
                        None => {
                            first.insert(key, path.clone());
                        }
                    }
                }
                _ => {}
            }
            path.truncate(len);
            continue;
        }
        let frame = stack.pop().expect("a frame");
        let entries: Vec<Entry> = frame.nodes.into_iter().map(Node::into_entry).collect();
        let id = store_tree(trees, &entries)?;
        let Some(parent) = stack.last_mut() else {
            return Ok((id, linked_bytes));
        };
        path.truncate(path.len() - frame.path_added);
        parent.nodes[parent.next - 1].what = What::Dir(DirNode::Built(id));
    }
}

/// Bytes of a list of extended attributes, names and values.
fn xattr_bytes(xattrs: &[Xattr]) -> usize {
    xattrs.iter().map(|x| x.name.len() + x.value.len()).sum()
}

/// The entry's relative path, built only when a message or a pattern needs it.
struct At<'a> {
    rel: &'a [u8],
    name: &'a [u8],
}

impl At<'_> {
    fn path(&self) -> Vec<u8> {
        walk::join_rel(self.rel, self.name)
    }
}

/// Why entries were left out or noted, by kind: each kind keeps its first
/// `NOTE_EXAMPLES_MAX` paths in name order and counts the rest, so a volume of 20,000
/// sockets makes a few lines, not a record of 20,000.
const NOTE_SOCKET: &str = "socket skipped (sockets cannot be restored)";
const NOTE_OTHER_FILESYSTEM: &str =
    "another filesystem is mounted here; its contents are not included";
const NOTE_CHANGED: &str = "changed while it was read";

/// The entries a snapshot could not read: the first `UNREADABLE_LISTED_MAX` in path
/// order, and how many more there were.
#[derive(Default)]
struct Unreadables(Mutex<(u64, Vec<Unreadable>)>);

impl Unreadables {
    fn add(&self, u: Unreadable) {
        let mut guard = self.0.lock().expect("lock");
        let (unlisted, listed) = &mut *guard;
        let at = listed.partition_point(|l| l.path <= u.path);
        if at < UNREADABLE_LISTED_MAX {
            listed.insert(at, u);
        } else {
            *unlisted += 1;
        }
        if listed.len() > UNREADABLE_LISTED_MAX {
            listed.pop();
            *unlisted += 1;
        }
    }

    fn into_parts(self) -> (Vec<Unreadable>, u64) {
        let (unlisted, listed) = self.0.into_inner().expect("lock");
        (listed, unlisted)
    }
}

#[derive(Default)]
struct Notes(Mutex<std::collections::BTreeMap<&'static str, (u64, Vec<PathBuf>)>>);

impl Notes {
    fn add(&self, kind: &'static str, path: PathBuf) {
        let mut map = self.0.lock().expect("lock");
        let (count, examples) = map.entry(kind).or_default();
        *count += 1;
        let at =
            examples.partition_point(|p| p.as_os_str().as_bytes() < path.as_os_str().as_bytes());
        if at < NOTE_EXAMPLES_MAX {
            examples.insert(at, path);
            examples.truncate(NOTE_EXAMPLES_MAX);
        }
    }

    /// One line per example, then one line counting the rest of each kind.
    fn into_lines(self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, (count, examples)) in self.0.into_inner().expect("lock") {
            for p in &examples {
                out.push(format!("{}: {kind}", p.display()));
            }
            let rest = count - examples.len() as u64;
            if rest > 0 {
                out.push(format!("{rest} more entries: {kind}"));
            }
        }
        out
    }
}

fn build_excludes(patterns: &[String]) -> Result<GlobSet> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        let glob = Glob::new(p).map_err(|e| Error::Pattern {
            pattern: p.clone(),
            detail: e.to_string(),
        })?;
        builder.add(glob);
    }
    builder.build().map_err(|e| Error::Pattern {
        pattern: patterns.join(","),
        detail: e.to_string(),
    })
}

/// Volume labels: each source's base name, made unique with "-2", "-3"...
fn labels_for(sources: &[PathBuf]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in sources {
        let base = s
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let mut label = base.clone();
        let mut n = 2;
        while out.contains(&label) {
            label = format!("{base}-{n}");
            n += 1;
        }
        out.push(label);
    }
    out
}

/// A stable series name for a set of sources: the first label and a hash of all paths.
fn default_series(sources: &[PathBuf], labels: &[String]) -> String {
    let mut hasher = blake3::Hasher::new();
    for s in sources {
        hasher.update(s.as_os_str().as_bytes());
        hasher.update(&[0]);
    }
    let hex = Id(*hasher.finalize().as_bytes()).short();
    let first: String = labels[0]
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{first}-{hex}")
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

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
use std::ffi::CStr;
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
use crate::limits::{RACY_WINDOW_NS, READ_BATCH_BYTES};
use crate::pack::Packer;
use crate::pack::blob::BlobKind;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::tree::{self, Entry, Kind, Run, Tree, Xattr};
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
    Dir { children: Vec<Node> },
    Symlink { target: Vec<u8> },
    Fifo,
    CharDevice,
    BlockDevice,
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
    unreadable: Mutex<Vec<Unreadable>>,
    notes: Mutex<Vec<String>>,
    cache_rows: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
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
        self.unreadable.lock().expect("lock").push(Unreadable {
            path,
            error: error.to_string(),
        });
    }

    fn note(&self, note: String) {
        self.notes.lock().expect("lock").push(note);
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
    let mut unreadable = Vec::new();
    let mut notes = Vec::new();
    let mut cache_rows = Vec::new();
    for (source, label) in sources.iter().zip(&labels) {
        let root_fd = walk::open_root(source).map_err(|e| Error::io("open", source)(errno(e)))?;
        let root_stat =
            walk::stat_fd(root_fd.as_fd()).map_err(|e| Error::io("stat", source)(errno(e)))?;
        let ctx = Ctx {
            repo,
            data: &data,
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
            unreadable: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
            cache_rows: Mutex::new(Vec::new()),
            files: AtomicU64::new(0),
            dirs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
        };
        let mut children = walk_dir(&ctx, root_fd.as_fd(), b"")?;
        let linked_bytes = resolve_hardlinks(&mut children, &mut Vec::new(), &mut HashMap::new());
        let tree = build_tree(&trees, &children)?;
        let root_xattrs = walk::xattrs_fd(root_fd.as_fd()).unwrap_or_else(|e| {
            ctx.unreadable(b"", format!("extended attributes: {}", errno(e)));
            Vec::new()
        });
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
        unreadable.extend(ctx.unreadable.into_inner().expect("lock"));
        notes.extend(ctx.notes.into_inner().expect("lock"));
        cache_rows.extend(ctx.cache_rows.into_inner().expect("lock"));
    }
    // Data packs before tree packs, both before the record: nothing committed ever
    // refers to a blob that is not durable and indexed.
    data.flush()?;
    trees.flush()?;
    if let Some(p) = parent
        .as_ref()
        .filter(|_| opts.skip_if_unchanged && unreadable.is_empty())
        && p.snapshot
            .volumes
            .iter()
            .map(|v| (&v.label, v.tree))
            .eq(volumes.iter().map(|v| (&v.label, v.tree)))
    {
        return Ok(Outcome {
            listed: p.clone(),
            skipped: true,
        });
    }
    stats.new_chunks = data.new_blobs();
    stats.new_bytes_stored = data.new_bytes_stored() + trees.new_bytes_stored();
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let mut tags = opts.tags.clone();
    tags.sort();
    tags.dedup();
    unreadable.sort_by(|a, b| a.path.cmp(&b.path));
    notes.sort();
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
        });
    }
    crate::crash::pause("snapshot before commit");
    let listed = record::commit(repo, snapshot)?;
    cache::store(repo, &cache_rows)?;
    // A snapshot that added a large share of the index (a first snapshot, a big change)
    // leaves redb's file full of pages freed by its many small transactions: give them
    // back. Best effort, and proportional to the work just done; skipped (by redb) while
    // another process holds a transaction.
    if listed.snapshot.stats.new_chunks * 4 >= repo.index.chunk_count()? {
        let _ = repo.index.compact();
    }
    Ok(Outcome {
        listed,
        skipped: false,
    })
}

fn walk_dir(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &[u8]) -> Result<Vec<Node>> {
    let names = match walk::list_dir(dir) {
        Ok(n) => n,
        Err(e) => {
            ctx.unreadable(rel, errno(e));
            return Ok(Vec::new());
        }
    };
    let key = cache::key(ctx.series, ctx.label, rel);
    let old = cache::load(ctx.repo, &key)?;
    let old_cache = old.as_ref().map(|(c, _)| c);
    let results: Vec<Result<Visited>> = names
        .par_iter()
        .map(|name| visit(ctx, dir, rel, name, old_cache))
        .collect();
    let mut nodes = Vec::with_capacity(results.len());
    let mut new_cache = DirCache::default();
    for r in results {
        if let Some((node, cached)) = r? {
            nodes.push(node);
            new_cache.files.extend(cached);
        }
    }
    let bytes = new_cache.encode();
    let unchanged = match &old {
        Some((_, old_bytes)) => *old_bytes == bytes,
        None => new_cache.files.is_empty(),
    };
    if !unchanged {
        ctx.cache_rows.lock().expect("lock").push((key, bytes));
    }
    Ok(nodes)
}

fn visit(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &[u8],
    name: &CStr,
    old_cache: Option<&DirCache>,
) -> Result<Visited> {
    let name_bytes = name.to_bytes();
    let rel_child = walk::join_rel(rel, name_bytes);
    if ctx.excluded(&rel_child, name_bytes) {
        return Ok(None);
    }
    let stat = match walk::stat_at(dir, name) {
        Ok(s) => s,
        Err(Errno::NOENT) => {
            ctx.unreadable(&rel_child, "vanished during the snapshot");
            return Ok(None);
        }
        Err(e) => {
            ctx.unreadable(&rel_child, errno(e));
            return Ok(None);
        }
    };
    let node = |xattrs, what| Node {
        name: name_bytes.to_vec(),
        stat,
        xattrs,
        what,
    };
    let xattrs_at = |ctx: &Ctx<'_>| match walk::xattrs_at(dir, name) {
        Ok(x) => x,
        Err(e) => {
            ctx.unreadable(&rel_child, format!("extended attributes: {}", errno(e)));
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
            return read_file(ctx, dir, name, &rel_child, stat);
        }
        FileType::Directory => {
            ctx.dirs.fetch_add(1, Ordering::Relaxed);
            if stat.dev != ctx.root_dev && !ctx.cross_filesystems {
                ctx.note(format!(
                    "{}: another filesystem is mounted here; its contents are not included",
                    walk::display_path(ctx.root, &rel_child).display()
                ));
                node(
                    xattrs_at(ctx),
                    What::Dir {
                        children: Vec::new(),
                    },
                )
            } else {
                let fd = match walk::open_dir_at(dir, name) {
                    Ok(fd) => fd,
                    Err(e) => {
                        ctx.unreadable(&rel_child, errno(e));
                        return Ok(None);
                    }
                };
                let xattrs = match walk::xattrs_fd(fd.as_fd()) {
                    Ok(x) => x,
                    Err(e) => {
                        ctx.unreadable(&rel_child, format!("extended attributes: {}", errno(e)));
                        Vec::new()
                    }
                };
                let children = walk_dir(ctx, fd.as_fd(), &rel_child)?;
                node(xattrs, What::Dir { children })
            }
        }
        FileType::Symlink => match walk::read_link_at(dir, name) {
            Ok(target) => node(xattrs_at(ctx), What::Symlink { target }),
            Err(e) => {
                ctx.unreadable(&rel_child, errno(e));
                return Ok(None);
            }
        },
        FileType::Fifo => node(xattrs_at(ctx), What::Fifo),
        FileType::CharacterDevice => node(xattrs_at(ctx), What::CharDevice),
        FileType::BlockDevice => node(xattrs_at(ctx), What::BlockDevice),
        FileType::Socket | FileType::Unknown => {
            ctx.note(format!(
                "{}: socket skipped (sockets cannot be restored)",
                walk::display_path(ctx.root, &rel_child).display()
            ));
            return Ok(None);
        }
    };
    Ok(Some((out, None)))
}

/// Why reading a file stopped.
enum ReadError {
    Io(std::io::Error),
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
    rel: &[u8],
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
            ctx.unreadable(rel, what);
            return Ok(None);
        }
        Err(Errno::NOENT) => {
            ctx.unreadable(rel, "vanished during the snapshot");
            return Ok(None);
        }
        Err(e) => {
            ctx.unreadable(rel, errno(e));
            return Ok(None);
        }
    };
    // A file whose xattrs could not be read is recorded without them and reported,
    // and never cached: the next snapshot must try (and report) again.
    let (xattrs, xattrs_ok) = match walk::xattrs_fd(fd.as_fd()) {
        Ok(x) => (x, true),
        Err(e) => {
            ctx.unreadable(rel, format!("extended attributes: {}", errno(e)));
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
            Ok::<(), ReadError>(())
        },
    );
    ctx.bytes_read
        .fetch_add(source.bytes_read, Ordering::Relaxed);
    let size = match read {
        Ok(n) => n,
        Err(ReadError::Io(e)) => {
            ctx.unreadable(rel, e);
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
        ctx.note(format!(
            "{}: changed while it was read",
            walk::display_path(ctx.root, rel).display()
        ));
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

/// Turns every later name of a multiply-linked file (in depth-first name order) into a
/// hardlink to its first name.
fn resolve_hardlinks(
    nodes: &mut [Node],
    path: &mut Vec<u8>,
    first: &mut HashMap<(u64, u64), Vec<u8>>,
) -> u64 {
    // Returns the content bytes of the names turned into hardlinks: content is counted
    // once per file, not once per name.
    let mut linked_bytes = 0;
    for node in nodes {
        let len = path.len();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&node.name);
        match &mut node.what {
            What::Dir { children } => linked_bytes += resolve_hardlinks(children, path, first),
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
    }
    linked_bytes
}

/// Builds and stores the trees of a directory's children, bottom-up; returns the
/// directory's tree id.
fn build_tree(trees: &Packer<'_>, children: &[Node]) -> Result<Id> {
    let entries: Vec<Entry> = children
        .par_iter()
        .map(|node| {
            let kind = match &node.what {
                What::File { size, chunks } => Kind::File {
                    size: *size,
                    chunks: chunks.clone(),
                },
                What::Hardlink { target } => Kind::Hardlink {
                    target: target.clone(),
                },
                What::Dir { children } => Kind::Dir {
                    tree: build_tree(trees, children)?,
                },
                What::Symlink { target } => Kind::Symlink {
                    target: target.clone(),
                },
                What::Fifo => Kind::Fifo,
                What::CharDevice => Kind::CharDevice {
                    rdev: node.stat.rdev,
                },
                What::BlockDevice => Kind::BlockDevice {
                    rdev: node.stat.rdev,
                },
            };
            Ok(Entry {
                name: node.name.clone(),
                kind,
                mode: node.stat.mode,
                uid: node.stat.uid,
                gid: node.stat.gid,
                mtime_ns: node.stat.mtime_ns,
                xattrs: node.xattrs.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let bytes = Tree { entries }.encode();
    let id = Id::of(&bytes);
    trees.store(id, &bytes)?;
    Ok(id)
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

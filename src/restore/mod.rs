//! Restore to a directory: materialize a snapshot (or one path of it) into a new or
//! empty directory with full metadata.
//!
//! Three passes, so that nothing disturbs a time already set:
//! 1. in parallel, create directories, files (contents verified by hash on read, aligned
//!    blocks of zeros left as holes), symlinks, fifos and devices, with their metadata;
//! 2. create hardlinks (their targets now exist);
//! 3. set directory metadata, deepest first (creating entries changes a directory's
//!    mtime).
//!
//! All operations are relative to directory descriptors opened with `O_NOFOLLOW`:
//! no path length limit, and no symlink in the snapshot can redirect a write.
//! The target may be shared with an untrusted writer (a container's volume) that
//! renames and swaps entries while restore works, so metadata is only ever applied
//! through a descriptor of the entry restore made: a file it wrote, a directory
//! reopened with `O_NOFOLLOW` whose inode is the one restore created, or an `O_PATH`
//! descriptor of a symlink or node whose type was checked. An entry found replaced is
//! an error ([`Error::Replaced`]); whatever replaced it is left untouched.
//! A file whose content cannot be verified is removed and the restore fails: wrong
//! bytes are never left behind.
//! Deliberately absent: fsync (restore to a new directory; the live restore issue
//! stages with fsync), and writing outside `target`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::error::{Error, Result, errno};
use crate::id::Id;
use crate::limits::{DIR_FDS_HELD_MAX, PATH_DEPTH_MAX, READ_AHEAD_DOWNLOADS};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::Listed;
use crate::snapshot::select::{self, LinkTargets, Selection};
use crate::tree::{self, DirEntries, Entry, Kind, Run};
use crate::walk;

/// Chunk runs read ahead in parallel per file.
const CHUNKS_IN_FLIGHT: usize = 16;

/// Aligned blocks of zeros this size are left as holes in restored files (the block
/// size of ext4, xfs and tmpfs pages; larger blocks are just allocated when partly
/// written).
const HOLE_BLOCK: usize = 4096;

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Restore into a non-empty directory, replacing entries of the same name.
    pub force: bool,
    /// Restore only this volume of a multi-volume snapshot.
    pub volume: Option<String>,
}

/// What a restore did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    /// Metadata that could not be applied (e.g. owners when not root).
    pub warnings: Vec<String>,
}

/// Files a restore wrote that a hardlink names: (volume label, source path) →
/// destination path.
type WrittenFiles = HashMap<(String, Vec<u8>), Vec<u8>>;

/// Directories nearer the top of a restore than this are restored recursively, their
/// entries in parallel; deeper ones by `restore_deep` with an explicit stack (their
/// files still in parallel), so the call stack and the descriptors held stay bounded
/// whatever the depth.
const PARALLEL_DEPTH: usize = 24;

/// A hardlink to create once every file exists.
struct PendingLink {
    dest: Vec<u8>,
    entry: Entry,
    /// The first name's path from the volume root.
    target: Vec<u8>,
    volume_root: Id,
    volume: String,
}

struct Ctx<'a> {
    repo: &'a Repository,
    /// Names the target in messages.
    target: &'a Path,
    as_root: bool,
    force: bool,
    progress: &'a Progress,
    files: AtomicU64,
    dirs: AtomicU64,
    bytes: AtomicU64,
    warnings: Mutex<Vec<String>>,
    hardlinks: Mutex<Vec<PendingLink>>,
    /// The paths hardlinks name (`select::survey`): only those files are recorded in
    /// `written`.
    link_targets: LinkTargets,
    /// Where this restore wrote each file a hardlink names: (volume, source path) →
    /// destination. Hardlinks only ever link to files this restore created, never to
    /// something that was already in the target.
    written: Mutex<WrittenFiles>,
    dir_meta: Mutex<Vec<DirMeta>>,
}

/// A directory whose metadata pass 3 applies. Directories form a tree through
/// `parent`, so pass 3 reopens each from its parent's descriptor (one `openat` per
/// directory whatever its depth) and messages build a path only when one is needed.
struct DirMeta {
    /// The directory holding it; `None` for the top of a job (in the target, or the
    /// target itself when `name` is empty).
    parent: Option<usize>,
    name: Vec<u8>,
    /// Its entry (name taken out: it is `name`).
    entry: Entry,
    /// (device, inode) of the directory restore created (or, with `--force`, reused):
    /// the metadata goes to that inode or nowhere.
    ino: (u64, u64),
}

/// Where an entry goes, for messages and hardlink bookkeeping: its paths are built
/// only when needed (a path 100,000 levels down is long, and most entries never need
/// theirs).
#[derive(Clone, Copy)]
enum Place<'a> {
    /// Paths known whole: below the target, and from the volume root.
    Whole { dest: &'a [u8], src: &'a [u8] },
    /// The entry `name` of the directory at `dest_dir` (`src_dir` from the volume root).
    In {
        dest_dir: &'a [u8],
        src_dir: &'a [u8],
        name: &'a [u8],
    },
    /// A directory restore created, by its place in pass 3's list.
    Dir(&'a [DirMeta], usize),
}

impl Place<'_> {
    /// The path below the target.
    fn dest(&self) -> Vec<u8> {
        match *self {
            Place::Whole { dest, .. } => dest.to_vec(),
            Place::In { dest_dir, name, .. } => walk::join_rel(dest_dir, name),
            Place::Dir(metas, mut i) => {
                let mut names = Vec::new();
                loop {
                    let m = &metas[i];
                    if !m.name.is_empty() {
                        names.push(&m.name[..]);
                    }
                    match m.parent {
                        Some(p) => i = p,
                        None => break,
                    }
                }
                names.reverse();
                names.join(&b'/')
            }
        }
    }

    /// The path from the volume root (a directory restore created is never asked).
    fn src(&self) -> Vec<u8> {
        match *self {
            Place::Whole { src, .. } => src.to_vec(),
            Place::In { src_dir, name, .. } => walk::join_rel(src_dir, name),
            Place::Dir(..) => unreachable!("pass 3 needs no source paths"),
        }
    }

    fn display(&self, target: &Path) -> PathBuf {
        walk::display_path(target, &self.dest())
    }
}

impl Ctx<'_> {
    fn warn(&self, w: String) {
        self.warnings.lock().expect("lock").push(w);
    }

    /// Records a directory for pass 3; returns its index.
    fn add_dir(&self, parent: Option<usize>, name: &[u8], entry: &Entry, ino: (u64, u64)) -> usize {
        let mut entry = entry.clone();
        entry.name = Vec::new();
        let mut metas = self.dir_meta.lock().expect("lock");
        metas.push(DirMeta {
            parent,
            name: name.to_vec(),
            entry,
            ino,
        });
        metas.len() - 1
    }
}

/// Restores `snap` (or `path` inside it) into `target`.
pub fn restore(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    target: &Path,
    opts: &Options,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    crate::crash::pause("restore started");
    let _lease = repo.lease_for("restore", snap)?;
    let jobs = select::select(repo, snap, path, opts.volume.as_deref())?;
    let (link_targets, packs) = survey(repo, &jobs)?;
    prepare_target(target, opts.force)?;
    let root_fd = walk::open_root(target).map_err(|e| Error::io("open", target)(errno(e)))?;
    materialize(
        repo,
        snap,
        path,
        &jobs,
        link_targets,
        packs,
        root_fd.as_fd(),
        target,
        opts,
        progress,
        started,
    )
}

/// Restores `snap` (or `path` inside it) into the open directory `root`, an empty
/// directory the caller made for it; `target` names it in messages.
pub fn restore_into(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    root: BorrowedFd<'_>,
    target: &Path,
    opts: &Options,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    let _lease = repo.lease("restore")?;
    let jobs = select::select(repo, snap, path, opts.volume.as_deref())?;
    let (link_targets, packs) = survey(repo, &jobs)?;
    materialize(
        repo,
        snap,
        path,
        &jobs,
        link_targets,
        packs,
        root,
        target,
        opts,
        progress,
        started,
    )
}

/// The hardlink targets of `jobs` and, from an object store, the packs their files'
/// content is in, in the order the restore first needs them (empty for a local store).
fn survey(repo: &Repository, jobs: &[Selection]) -> Result<(LinkTargets, Vec<Id>)> {
    if repo.store.is_local() {
        return Ok((select::survey(repo, jobs)?, Vec::new()));
    }
    let mut order = select::PackOrder::default();
    let links = select::survey_with(repo, jobs, Some(&mut order))?;
    Ok((links, order.order))
}

/// The three passes, into the open directory `root`; from an object store, with
/// threads downloading the packs in `packs` ahead of the writers.
#[allow(clippy::too_many_arguments)]
fn materialize(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    jobs: &[Selection],
    link_targets: LinkTargets,
    packs: Vec<Id>,
    root: BorrowedFd<'_>,
    target: &Path,
    opts: &Options,
    progress: &Progress,
    started: Instant,
) -> Result<Report> {
    let run = move || {
        passes(
            repo,
            snap,
            path,
            jobs,
            link_targets,
            root,
            target,
            opts,
            progress,
            started,
        )
    };
    if packs.is_empty() {
        return run();
    }
    /// Ends the read-ahead however the passes end (an error or a panic included), so
    /// the scope's threads return.
    struct Stop<'a>(&'a Repository);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.stop_reading_ahead();
        }
    }
    repo.plan_reads(packs);
    std::thread::scope(|s| {
        let _stop = Stop(repo);
        for _ in 0..READ_AHEAD_DOWNLOADS {
            s.spawn(|| repo.read_ahead());
        }
        run()
    })
}

#[allow(clippy::too_many_arguments)]
fn passes(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    jobs: &[Selection],
    link_targets: LinkTargets,
    root: BorrowedFd<'_>,
    target: &Path,
    opts: &Options,
    progress: &Progress,
    started: Instant,
) -> Result<Report> {
    // The whole snapshot's size is known from its stats; a part's is not.
    if path.iter().all(|&b| b == b'/')
        && (opts.volume.is_none() || snap.snapshot.volumes.len() == 1)
    {
        progress.set_total(snap.snapshot.stats.bytes);
    }
    let ctx = Ctx {
        repo,
        target,
        as_root: rustix::process::geteuid().is_root(),
        force: opts.force,
        progress,
        files: AtomicU64::new(0),
        dirs: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        warnings: Mutex::new(Vec::new()),
        hardlinks: Mutex::new(Vec::new()),
        link_targets,
        written: Mutex::new(HashMap::new()),
        dir_meta: Mutex::new(Vec::new()),
    };
    for job in jobs {
        materialize_job(&ctx, root, job)?;
    }
    // Pass 2: hardlinks.
    let links = std::mem::take(&mut *ctx.hardlinks.lock().expect("lock"));
    let mut written = std::mem::take(&mut *ctx.written.lock().expect("lock"));
    for link in links {
        make_hardlink(&ctx, root, &link, &mut written)?;
    }
    // Pass 3: directory metadata, every directory after everything inside it.
    let dirs = std::mem::take(&mut *ctx.dir_meta.lock().expect("lock"));
    crate::crash::point("restore before directory metadata");
    apply_dir_meta(&ctx, root, &dirs)?;
    let mut warnings = ctx.warnings.into_inner().expect("lock");
    warnings.sort();
    warnings.dedup();
    Ok(Report {
        files: ctx.files.into_inner(),
        dirs: ctx.dirs.into_inner(),
        bytes: ctx.bytes.into_inner(),
        duration_ms: started.elapsed().as_millis() as u64,
        warnings,
    })
}

fn prepare_target(target: &Path, force: bool) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            let mut it = std::fs::read_dir(target).map_err(Error::io("read directory", target))?;
            if it.next().is_some() && !force {
                return Err(Error::Usage(format!(
                    "restore target {} is not empty (use --force to restore into it anyway)",
                    target.display()
                )));
            }
            Ok(())
        }
        Ok(_) => Err(Error::Usage(format!(
            "restore target {} exists and is not a directory",
            target.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(target).map_err(Error::io("create directory", target))
        }
        Err(e) => Err(Error::io("stat", target)(e)),
    }
}

fn materialize_job(ctx: &Ctx<'_>, root: BorrowedFd<'_>, job: &Selection) -> Result<()> {
    let place = Place::Whole {
        dest: &job.dest,
        src: &job.source_path,
    };
    if job.dest.is_empty() {
        // The job's entry is a directory restored as the target itself.
        let Kind::Dir { tree } = job.entry.kind else {
            unreachable!("only directories map onto the target")
        };
        ctx.dirs.fetch_add(1, Ordering::Relaxed);
        let st = walk::stat_fd(root).map_err(io_err("stat", ctx.target, place))?;
        let meta = ctx.add_dir(None, b"", &job.entry, (st.dev, st.ino));
        let dup =
            rustix::io::fcntl_dupfd_cloexec(root, 0).map_err(io_err("open", ctx.target, place))?;
        return restore_dir(
            ctx,
            dup,
            (st.dev, st.ino),
            &tree,
            b"",
            &job.source_path,
            meta,
            0,
            job,
        );
    }
    let name = CString::new(job.dest.clone()).map_err(|_| Error::Usage("bad name".into()))?;
    restore_entry(ctx, root, &name, &job.entry, place, None, 0, job)
}

/// Restores the entries of a tree into `dir` (whose pass-3 record is `meta`), which
/// is `dest` below the target, `src` below the volume root and `depth` levels below
/// the top of the job.
#[allow(clippy::too_many_arguments)]
fn restore_dir(
    ctx: &Ctx<'_>,
    dir: OwnedFd,
    dev_ino: (u64, u64),
    tree_id: &Id,
    dest: &[u8],
    src: &[u8],
    meta: usize,
    depth: usize,
    job: &Selection,
) -> Result<()> {
    if depth >= PARALLEL_DEPTH {
        return restore_deep(ctx, dir, dev_ino, tree_id, dest, src, meta, depth, job);
    }
    let mut entries = open_tree(ctx, tree_id, dest)?;
    while let Some(batch) = next_batch(ctx, &mut entries, dest)? {
        batch.par_iter().try_for_each(|entry| {
            let name = CString::new(entry.name.clone()).expect("tree names hold no NUL");
            let place = Place::In {
                dest_dir: dest,
                src_dir: src,
                name: &entry.name,
            };
            restore_entry(
                ctx,
                dir.as_fd(),
                &name,
                entry,
                place,
                Some(meta),
                depth,
                job,
            )
        })?;
    }
    Ok(())
}

fn not_restored(ctx: &Ctx<'_>, dest: &[u8], e: Error) -> Error {
    Error::Corrupt {
        what: "directory",
        path: walk::display_path(ctx.target, dest),
        detail: format!("not restored: {e}"),
    }
}

/// The entries of a tree, read one part at a time (a split directory never whole in
/// memory).
fn open_tree(ctx: &Ctx<'_>, tree_id: &Id, dest: &[u8]) -> Result<DirEntries> {
    DirEntries::open(ctx.repo, tree_id).map_err(|e| not_restored(ctx, dest, e))
}

fn next_batch(ctx: &Ctx<'_>, entries: &mut DirEntries, dest: &[u8]) -> Result<Option<Vec<Entry>>> {
    entries
        .next_batch(ctx.repo)
        .map_err(|e| not_restored(ctx, dest, e))
}

/// Restores every entry of a tree but its subdirectories (in parallel) into `dir`;
/// returns the subdirectories, for `restore_deep` to walk.
#[allow(clippy::too_many_arguments)]
fn restore_files(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    tree_id: &Id,
    dest: &[u8],
    src: &[u8],
    meta: usize,
    depth: usize,
    job: &Selection,
) -> Result<Vec<Entry>> {
    let mut entries = open_tree(ctx, tree_id, dest)?;
    let mut subdirs = Vec::new();
    while let Some(batch) = next_batch(ctx, &mut entries, dest)? {
        if depth >= PATH_DEPTH_MAX {
            // `select::survey` refuses such a tree before anything is written.
            return Err(Error::Corrupt {
                what: "directory",
                path: walk::display_path(ctx.target, dest),
                detail: format!("nested deeper than {PATH_DEPTH_MAX} levels"),
            });
        }
        let (dirs, others): (Vec<Entry>, Vec<Entry>) = batch
            .into_iter()
            .partition(|e| matches!(e.kind, Kind::Dir { .. }));
        subdirs.extend(dirs);
        others.par_iter().try_for_each(|entry| {
            let name = CString::new(entry.name.clone()).expect("tree names hold no NUL");
            let place = Place::In {
                dest_dir: dest,
                src_dir: src,
                name: &entry.name,
            };
            restore_entry(ctx, dir, &name, entry, place, Some(meta), depth, job)
        })?;
    }
    Ok(subdirs)
}

/// A directory on `restore_deep`'s current path.
struct DeepFrame {
    /// Open while the frame is among the `DIR_FDS_HELD_MAX` deepest; otherwise
    /// reopened through `..` of its child when the walk climbs back to it.
    fd: Option<OwnedFd>,
    /// (device, inode) of the directory restore created, to check a reopened
    /// descriptor against.
    dev_ino: (u64, u64),
    meta: usize,
    subdirs: std::vec::IntoIter<Entry>,
    /// The bytes this frame's name added to the shared paths.
    dest_added: usize,
    src_added: usize,
}

/// Restores a deep subtree with an explicit stack: memory per level is one frame and
/// the paths are one shared buffer each, and at most `DIR_FDS_HELD_MAX` directory
/// descriptors are open. Climbing back to a directory whose descriptor was closed
/// reopens it through `..` and checks it is the inode restore created; anything else
/// is `Error::Replaced`.
#[allow(clippy::too_many_arguments)]
fn restore_deep(
    ctx: &Ctx<'_>,
    dir: OwnedFd,
    dev_ino: (u64, u64),
    tree_id: &Id,
    dest: &[u8],
    src: &[u8],
    meta: usize,
    depth: usize,
    job: &Selection,
) -> Result<()> {
    let (mut dest, mut src) = (dest.to_vec(), src.to_vec());
    let subdirs = restore_files(ctx, dir.as_fd(), tree_id, &dest, &src, meta, depth, job)?;
    let mut stack = vec![DeepFrame {
        fd: Some(dir),
        dev_ino,
        meta,
        subdirs: subdirs.into_iter(),
        dest_added: 0,
        src_added: 0,
    }];
    // Frames below this index hold no descriptor.
    let mut first_open = 0;
    loop {
        let top = stack.last_mut().expect("the stack holds the subtree's top");
        if let Some(entry) = top.subdirs.next() {
            let parent = top.fd.as_ref().expect("the deepest frames are open");
            let name = CString::new(entry.name.clone()).expect("tree names hold no NUL");
            let place = Place::In {
                dest_dir: &dest,
                src_dir: &src,
                name: &entry.name,
            };
            let (fd, child_ino, child_meta) =
                make_dir(ctx, parent.as_fd(), &name, &entry, place, Some(top.meta))?;
            let (dest_len, src_len) = (dest.len(), src.len());
            push_name(&mut dest, &entry.name);
            push_name(&mut src, &entry.name);
            let Kind::Dir { tree } = entry.kind else {
                unreachable!("only directories are kept as subdirectories")
            };
            let child_depth = depth + stack.len();
            let subdirs = restore_files(
                ctx,
                fd.as_fd(),
                &tree,
                &dest,
                &src,
                child_meta,
                child_depth,
                job,
            )?;
            stack.push(DeepFrame {
                fd: Some(fd),
                dev_ino: child_ino,
                meta: child_meta,
                subdirs: subdirs.into_iter(),
                dest_added: dest.len() - dest_len,
                src_added: src.len() - src_len,
            });
            if stack.len() - first_open > DIR_FDS_HELD_MAX {
                stack[first_open].fd = None;
                first_open += 1;
            }
            continue;
        }
        let frame = stack.pop().expect("a frame");
        dest.truncate(dest.len() - frame.dest_added);
        src.truncate(src.len() - frame.src_added);
        let Some(parent) = stack.last_mut() else {
            return Ok(());
        };
        if parent.fd.is_none() {
            let child = frame.fd.as_ref().expect("the deepest frames are open");
            parent.fd = Some(reopen_parent(ctx, child.as_fd(), parent.dev_ino, &dest)?);
            first_open = stack.len() - 1;
        }
    }
}

fn push_name(path: &mut Vec<u8>, name: &[u8]) {
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name);
}

/// Reopens a directory restore created through `..` of its child, only if it is
/// still that inode.
fn reopen_parent(
    ctx: &Ctx<'_>,
    child: BorrowedFd<'_>,
    dev_ino: (u64, u64),
    dest: &[u8],
) -> Result<OwnedFd> {
    let place = Place::Whole { dest, src: b"" };
    let fd = walk::open_dir_at(child, c"..")
        .map_err(|e| replaced_or(e, "reopen directory", ctx.target, place))?;
    let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", ctx.target, place))?;
    if (st.dev, st.ino) != dev_ino {
        return Err(Error::Replaced {
            path: place.display(ctx.target),
            detail: "it is another directory than the one restore created".into(),
        });
    }
    Ok(fd)
}

/// Creates (or with `--force` reuses) the directory `name` in `dir`, opens it without
/// following symlinks and records it for pass 3: its descriptor, (device, inode) and
/// record.
fn make_dir(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    entry: &Entry,
    place: Place<'_>,
    parent_meta: Option<usize>,
) -> Result<(OwnedFd, (u64, u64), usize)> {
    match rustix::fs::mkdirat(dir, name.as_c_str(), Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(Errno::EXIST) if ctx.force => {}
        Err(e) => return Err(io_err("create directory", ctx.target, place)(e)),
    }
    let fd = walk::open_dir_at(dir, name)
        .map_err(|e| replaced_or(e, "open directory", ctx.target, place))?;
    let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", ctx.target, place))?;
    ctx.dirs.fetch_add(1, Ordering::Relaxed);
    let ino = (st.dev, st.ino);
    let meta = ctx.add_dir(parent_meta, name.as_bytes(), entry, ino);
    Ok((fd, ino, meta))
}

fn io_err<'a>(
    op: &'static str,
    target: &'a Path,
    place: Place<'a>,
) -> impl FnOnce(Errno) -> Error + 'a {
    move |e| Error::io(op, place.display(target))(errno(e))
}

fn remove_existing(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    keep_dir: bool,
    place: Place<'_>,
) -> Result<()> {
    if !ctx.force {
        return Ok(());
    }
    match walk::stat_at(dir, name) {
        Ok(s) if s.file_type == FileType::Directory => {
            if !keep_dir {
                return Err(Error::Usage(format!(
                    "cannot replace directory {} with a non-directory",
                    place.display(ctx.target).display()
                )));
            }
            Ok(())
        }
        Ok(_) => rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty())
            .map_err(io_err("remove", ctx.target, place)),
        Err(_) => Ok(()),
    }
}

/// Restores one entry into `dir` (whose pass-3 record is `parent_meta`, `None` for
/// the target), `depth` levels below the top of the job.
#[allow(clippy::too_many_arguments)]
fn restore_entry(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    entry: &Entry,
    place: Place<'_>,
    parent_meta: Option<usize>,
    depth: usize,
    job: &Selection,
) -> Result<()> {
    let target = ctx.target;
    let is_dir = matches!(entry.kind, Kind::Dir { .. });
    if !matches!(entry.kind, Kind::Hardlink { .. }) {
        remove_existing(ctx, dir, name, is_dir, place)?;
    }
    match &entry.kind {
        Kind::Dir { tree } => {
            let (fd, ino, meta) = make_dir(ctx, dir, name, entry, place, parent_meta)?;
            restore_dir(
                ctx,
                fd,
                ino,
                tree,
                &place.dest(),
                &place.src(),
                meta,
                depth + 1,
                job,
            )
        }
        Kind::File { size, chunks } => {
            let file = write_file(ctx, dir, name, *size, chunks, place)?;
            apply_meta_fd(ctx, file.as_fd(), entry, place)?;
            let is_target = match place {
                Place::In { src_dir, name, .. } => {
                    ctx.link_targets.contains(&job.volume, src_dir, name)
                }
                Place::Whole { src, .. } => ctx.link_targets.contains_path(&job.volume, src),
                Place::Dir(..) => false,
            };
            if is_target {
                ctx.written
                    .lock()
                    .expect("lock")
                    .insert((job.volume.clone(), place.src()), place.dest());
            }
            Ok(())
        }
        Kind::Hardlink {
            target: link_target,
        } => {
            ctx.hardlinks.lock().expect("lock").push(PendingLink {
                dest: place.dest(),
                entry: entry.clone(),
                target: link_target.clone(),
                volume_root: job.volume_root,
                volume: job.volume.clone(),
            });
            Ok(())
        }
        Kind::Symlink { target: link } => {
            let link = CString::new(link.clone())
                .map_err(|_| Error::Usage("symlink target holds NUL".into()))?;
            rustix::fs::symlinkat(link.as_c_str(), dir, name.as_c_str()).map_err(io_err(
                "create symlink",
                target,
                place,
            ))?;
            ctx.files.fetch_add(1, Ordering::Relaxed);
            apply_meta_at(ctx, dir, name, entry, place)
        }
        Kind::Fifo | Kind::CharDevice { .. } | Kind::BlockDevice { .. } => {
            let (ft, rdev) = match entry.kind {
                Kind::Fifo => (FileType::Fifo, 0),
                Kind::CharDevice { rdev } => (FileType::CharacterDevice, rdev),
                Kind::BlockDevice { rdev } => (FileType::BlockDevice, rdev),
                _ => unreachable!(),
            };
            if ft != FileType::Fifo && !ctx.as_root {
                ctx.warn(format!(
                    "{}: device not created (needs root)",
                    place.display(target).display()
                ));
                return Ok(());
            }
            rustix::fs::mknodat(dir, name.as_c_str(), ft, Mode::from_raw_mode(0o600), rdev)
                .map_err(io_err("create node", target, place))?;
            crate::crash::pause("restore created a node");
            ctx.files.fetch_add(1, Ordering::Relaxed);
            apply_meta_at(ctx, dir, name, entry, place)
        }
    }
}

/// Creates and fills a file; returns it open, so its metadata is set through the
/// descriptor (no path lookups). Zeros are never written: the file is new, so what is
/// not written reads as zeros, and every aligned block of zeros (a run of the zero
/// chunk: a hole in the source, or zeros written out) stays a hole.
fn write_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    size: u64,
    chunks: &[Run],
    place: Place<'_>,
) -> Result<File> {
    let target = ctx.target;
    let fd: OwnedFd = rustix::fs::openat(
        dir,
        name.as_c_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io_err("create file", target, place))?;
    let file = File::from(fd);
    let corrupt = |detail: String| Error::Corrupt {
        what: "file in snapshot",
        path: place.display(target),
        detail,
    };
    let result = (|| -> Result<()> {
        let mut offset = 0u64;
        for window in chunks.chunks(CHUNKS_IN_FLIGHT) {
            let blobs: Vec<Vec<u8>> = if window.len() == 1 {
                vec![ctx.repo.read_blob(&window[0].id)?]
            } else {
                window
                    .par_iter()
                    .map(|r| ctx.repo.read_blob(&r.id))
                    .collect::<Result<_>>()?
            };
            for (run, data) in window.iter().zip(blobs) {
                let len = data.len() as u64;
                // Checked before writing: a run is never written past the size.
                let end = len
                    .checked_mul(run.count)
                    .and_then(|n| offset.checked_add(n))
                    .filter(|&end| end <= size)
                    .ok_or_else(|| {
                        corrupt(format!(
                            "chunks hold more than the {size} bytes the tree says"
                        ))
                    })?;
                if data.iter().fold(0u8, |acc, &b| acc | b) != 0 {
                    for _ in 0..run.count {
                        write_nonzero(&file, &data, offset)
                            .map_err(|e| Error::io("write", place.display(target))(e))?;
                        offset += len;
                        ctx.progress.add(0, len);
                    }
                } else {
                    ctx.progress.add(0, end - offset);
                }
                offset = end;
            }
        }
        if offset != size {
            return Err(corrupt(format!(
                "chunks hold {offset} bytes, the tree says {size}"
            )));
        }
        // Zeros at the end were not written: the size makes them a hole.
        file.set_len(size)
            .map_err(|e| Error::io("truncate", place.display(target))(e))
    })();
    if let Err(e) = result {
        drop(file);
        let _ = rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty());
        return Err(match e {
            Error::BadBlob { .. } | Error::MissingChunk { .. } => Error::Corrupt {
                what: "content of",
                path: place.display(target),
                detail: format!("not restored: {e}"),
            },
            other => other,
        });
    }
    ctx.files.fetch_add(1, Ordering::Relaxed);
    ctx.bytes.fetch_add(size, Ordering::Relaxed);
    ctx.progress.add(1, 0);
    Ok(file)
}

/// Writes `data` at `offset` except its `HOLE_BLOCK`-aligned stretches of zeros.
fn write_nonzero(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let zero = |piece: &[u8]| piece.iter().fold(0u8, |acc, &b| acc | b) == 0;
    // Pieces end at block boundaries of the file.
    let piece_end = |i: usize| {
        let in_block = ((offset + i as u64) % HOLE_BLOCK as u64) as usize;
        (i + HOLE_BLOCK - in_block).min(data.len())
    };
    let mut i = 0;
    while i < data.len() {
        let mut end = piece_end(i);
        if zero(&data[i..end]) {
            i = end;
            continue;
        }
        while end < data.len() && !zero(&data[end..piece_end(end)]) {
            end = piece_end(end);
        }
        crate::crash::before_write(std::os::fd::AsFd::as_fd(file))?;
        file.write_all_at(&data[i..end], offset + i as u64)?;
        i = end;
    }
    Ok(())
}

pub(crate) fn timestamps(mtime_ns: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Owner, mode, xattrs, then times of the symlink, fifo or device `name` in `dir`
/// (owner first: chown clears setuid), through an `O_PATH` descriptor of the entry:
/// calls on `/proc/self/fd/N` act on the inode it holds, never on a symlink's target.
/// The entry must still be of the kind restore just created, else it was replaced.
fn apply_meta_at(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    entry: &Entry,
    place: Place<'_>,
) -> Result<()> {
    let target = ctx.target;
    let fd = rustix::fs::openat(
        dir,
        name.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| replaced_or(e, "open", target, place))?;
    let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", target, place))?;
    let (kind, rdev) = match entry.kind {
        Kind::Symlink { .. } => (FileType::Symlink, None),
        Kind::Fifo => (FileType::Fifo, None),
        Kind::CharDevice { rdev } => (FileType::CharacterDevice, Some(rdev)),
        Kind::BlockDevice { rdev } => (FileType::BlockDevice, Some(rdev)),
        _ => unreachable!("files and directories have descriptors of their own"),
    };
    if st.file_type != kind || rdev.is_some_and(|r| r != st.rdev) {
        return Err(Error::Replaced {
            path: place.display(target),
            detail: format!("it is now {}", kind_name(st.file_type)),
        });
    }
    let path = walk::proc_fd_path(fd.as_fd());
    if ctx.as_root {
        rustix::fs::chown(
            &*path,
            Some(rustix::fs::Uid::from_raw(entry.uid)),
            Some(rustix::fs::Gid::from_raw(entry.gid)),
        )
        .map_err(io_err("change owner of", target, place))?;
    }
    if kind != FileType::Symlink {
        rustix::fs::chmod(&*path, Mode::from_raw_mode(entry.mode)).map_err(io_err(
            "change mode of",
            target,
            place,
        ))?;
    }
    for x in &entry.xattrs {
        if let Err(e) =
            rustix::fs::setxattr(&*path, x.name.as_slice(), &x.value, XattrFlags::empty())
        {
            ctx.warn(format!(
                "{}: extended attribute {} not restored: {}",
                place.display(target).display(),
                String::from_utf8_lossy(&x.name),
                errno(e)
            ));
        }
    }
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &*path,
        &timestamps(entry.mtime_ns),
        AtFlags::empty(),
    )
    .map_err(io_err("set times of", target, place))
}

fn kind_name(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a fifo",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "something else",
    }
}

/// An error for a failed open of an entry restore made: a symlink, a non-directory
/// or nothing where restore's entry was means something replaced it.
fn replaced_or(e: Errno, op: &'static str, target: &Path, place: Place<'_>) -> Error {
    match e {
        Errno::LOOP | Errno::NOTDIR | Errno::NOENT => Error::Replaced {
            path: place.display(target),
            detail: format!("{op}: {}", errno(e)),
        },
        other => io_err(op, target, place)(other),
    }
}

/// Owner, mode, xattrs, then times, through a descriptor of a file restore wrote or a
/// directory it created.
fn apply_meta_fd(ctx: &Ctx<'_>, fd: BorrowedFd<'_>, entry: &Entry, place: Place<'_>) -> Result<()> {
    let target = ctx.target;
    if ctx.as_root {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(entry.uid)),
            Some(rustix::fs::Gid::from_raw(entry.gid)),
        )
        .map_err(io_err("change owner of", target, place))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(entry.mode)).map_err(io_err(
        "change mode of",
        target,
        place,
    ))?;
    for x in &entry.xattrs {
        if let Err(e) = rustix::fs::fsetxattr(fd, x.name.as_slice(), &x.value, XattrFlags::empty())
        {
            ctx.warn(format!(
                "{}: extended attribute {} not restored: {}",
                place.display(target).display(),
                String::from_utf8_lossy(&x.name),
                errno(e)
            ));
        }
    }
    rustix::fs::futimens(fd, &timestamps(entry.mtime_ns)).map_err(io_err(
        "set times of",
        target,
        place,
    ))
}

/// Opens the directory holding `dest` (a '/'-separated path below the target), one
/// component at a time without following symlinks. Returns it and the last component;
/// for the target itself, returns the target and `None`.
fn open_parent(
    root: BorrowedFd<'_>,
    dest: &[u8],
    target: &Path,
) -> Result<(OwnedFd, Option<CString>)> {
    let top = Place::Whole {
        dest: b"",
        src: b"",
    };
    let mut fd = rustix::io::dup(root).map_err(io_err("open", target, top))?;
    if dest.is_empty() {
        return Ok((fd, None));
    }
    let parts: Vec<&[u8]> = dest.split(|&b| b == b'/').collect();
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let name = CString::new(*part).expect("names hold no NUL");
        fd = walk::open_dir_at(fd.as_fd(), &name).map_err(|e| {
            let dest = parts[..=i].join(&b'/');
            replaced_or(
                e,
                "open directory",
                target,
                Place::Whole {
                    dest: &dest,
                    src: b"",
                },
            )
        })?;
    }
    Ok((
        fd,
        Some(CString::new(*parts.last().expect("non-empty")).expect("names hold no NUL")),
    ))
}

/// Creates one hardlink, to the file this restore wrote for the first name. When the
/// first name was not restored (outside the restored path, or unreadable when the
/// snapshot was taken), the content is written once and later names link to it.
fn make_hardlink(
    ctx: &Ctx<'_>,
    root: BorrowedFd<'_>,
    link: &PendingLink,
    written: &mut WrittenFiles,
) -> Result<()> {
    let target = ctx.target;
    let (dest, entry, link_target) = (&link.dest[..], &link.entry, &link.target[..]);
    let place = Place::Whole {
        dest,
        src: link_target,
    };
    let (link_dir, link_name) = open_parent(root, dest, target)?;
    let link_name = link_name.expect("a hardlink is never the target itself");
    remove_existing(ctx, link_dir.as_fd(), &link_name, false, place)?;
    let key = (link.volume.clone(), link_target.to_vec());
    let first = written.get(&key).cloned();
    if let Some(rel) = first {
        let (tdir, tname) = open_parent(root, &rel, target)?;
        let tname = tname.expect("a link target is never the target itself");
        match rustix::fs::linkat(
            tdir.as_fd(),
            tname.as_c_str(),
            link_dir.as_fd(),
            link_name.as_c_str(),
            AtFlags::empty(),
        ) {
            Ok(()) => {
                ctx.files.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // Removed since it was written (not by volsnap): write a copy instead.
            Err(Errno::NOENT) => {}
            Err(e) => return Err(io_err("create hardlink", target, place)(e)),
        }
    }
    // The first name was not restored by this run: write the content as a file, once.
    written.insert(key, dest.to_vec());
    let components = tree::split_path(link_target).map_err(Error::Usage)?;
    let first = tree::resolve(ctx.repo, &link.volume_root, &components)?;
    match first {
        Some(Entry {
            kind: Kind::File { size, chunks },
            ..
        }) => {
            let file = write_file(ctx, link_dir.as_fd(), &link_name, size, &chunks, place)?;
            apply_meta_fd(ctx, file.as_fd(), entry, place)
        }
        _ => Err(Error::Corrupt {
            what: "hardlink",
            path: place.display(target),
            detail: format!(
                "its target {:?} is not a file in the snapshot",
                String::from_utf8_lossy(link_target)
            ),
        }),
    }
}

/// A directory on pass 3's current path.
struct MetaFrame {
    meta: usize,
    /// Open while among the `DIR_FDS_HELD_MAX` deepest, like `DeepFrame`.
    fd: Option<OwnedFd>,
    /// Its next child in `children`.
    next: usize,
}

/// Pass 3: the metadata of every directory restore created, each after everything
/// inside it (creating entries changes a directory's mtime, and a mode without write
/// or search permission would stop the work below it). A depth-first walk of the
/// records with an explicit stack: each directory is opened from its parent's
/// descriptor without following symlinks and must be the inode restore made, a parent
/// whose descriptor was closed is reopened through `..` and checked the same way, and
/// at most `DIR_FDS_HELD_MAX` descriptors are open. Work and memory are linear in the
/// number of directories, whatever their depth.
fn apply_dir_meta(ctx: &Ctx<'_>, root: BorrowedFd<'_>, metas: &[DirMeta]) -> Result<()> {
    // Children of each record, contiguous: record i's are children[start[i]..start[i + 1]].
    let mut start = vec![0usize; metas.len() + 1];
    for m in metas {
        if let Some(p) = m.parent {
            start[p + 1] += 1;
        }
    }
    for i in 0..metas.len() {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut children = vec![0usize; start[metas.len()]];
    for (i, m) in metas.iter().enumerate() {
        if let Some(p) = m.parent {
            children[fill[p]] = i;
            fill[p] += 1;
        }
    }
    drop(fill);
    let target = ctx.target;
    let open_checked = |dir: BorrowedFd<'_>, i: usize| -> Result<OwnedFd> {
        let m = &metas[i];
        let place = Place::Dir(metas, i);
        let fd = if m.name.is_empty() {
            rustix::io::fcntl_dupfd_cloexec(dir, 0).map_err(io_err("open", target, place))?
        } else {
            let name = CString::new(m.name.clone()).expect("names hold no NUL");
            walk::open_dir_at(dir, &name)
                .map_err(|e| replaced_or(e, "open directory", target, place))?
        };
        let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", target, place))?;
        if (st.dev, st.ino) != m.ino {
            return Err(Error::Replaced {
                path: place.display(target),
                detail: "it is another directory than the one restore created".into(),
            });
        }
        Ok(fd)
    };
    for top in (0..metas.len()).filter(|&i| metas[i].parent.is_none()) {
        let mut stack = vec![MetaFrame {
            meta: top,
            fd: Some(open_checked(root, top)?),
            next: start[top],
        }];
        let mut first_open = 0;
        loop {
            let frame = stack.last_mut().expect("a frame");
            if frame.next < start[frame.meta + 1] {
                let child = children[frame.next];
                frame.next += 1;
                let dir = frame.fd.as_ref().expect("the deepest frames are open");
                let fd = open_checked(dir.as_fd(), child)?;
                stack.push(MetaFrame {
                    meta: child,
                    fd: Some(fd),
                    next: start[child],
                });
                if stack.len() - first_open > DIR_FDS_HELD_MAX {
                    stack[first_open].fd = None;
                    first_open += 1;
                }
                continue;
            }
            let frame = stack.pop().expect("a frame");
            let fd = frame.fd.expect("the deepest frames are open");
            if let Some(parent) = stack.last_mut()
                && parent.fd.is_none()
            {
                // Before this directory's own mode is applied: `..` needs search
                // permission on it.
                let place = Place::Dir(metas, parent.meta);
                let up = walk::open_dir_at(fd.as_fd(), c"..")
                    .map_err(|e| replaced_or(e, "reopen directory", target, place))?;
                let st = walk::stat_fd(up.as_fd()).map_err(io_err("stat", target, place))?;
                if (st.dev, st.ino) != metas[parent.meta].ino {
                    return Err(Error::Replaced {
                        path: place.display(target),
                        detail: "it is another directory than the one restore created".into(),
                    });
                }
                parent.fd = Some(up);
                first_open = stack.len() - 1;
            }
            let m = &metas[frame.meta];
            apply_meta_fd(ctx, fd.as_fd(), &m.entry, Place::Dir(metas, frame.meta))?;
            if stack.is_empty() {
                break;
            }
        }
    }
    Ok(())
}

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
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::error::{Error, Result, errno};
use crate::id::Id;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::Listed;
use crate::snapshot::select::{self, Selection};
use crate::tree::{self, Entry, Kind, Run};
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

/// Files a restore wrote: (volume label, source path) → destination path.
type WrittenFiles = HashMap<(String, Vec<u8>), Vec<u8>>;

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
    as_root: bool,
    force: bool,
    progress: &'a Progress,
    files: AtomicU64,
    dirs: AtomicU64,
    bytes: AtomicU64,
    warnings: Mutex<Vec<String>>,
    hardlinks: Mutex<Vec<PendingLink>>,
    /// Where this restore wrote each file: (volume root, source path) → destination.
    /// Hardlinks only ever link to files this restore created, never to something
    /// that was already in the target.
    written: Mutex<WrittenFiles>,
    dir_meta: Mutex<Vec<DirMeta>>,
}

/// A directory whose metadata pass 3 applies.
struct DirMeta {
    dest: Vec<u8>,
    entry: Entry,
    /// (device, inode) of the directory restore created (or, with `--force`, reused):
    /// the metadata goes to that inode or nowhere.
    ino: (u64, u64),
}

impl Ctx<'_> {
    fn warn(&self, w: String) {
        self.warnings.lock().expect("lock").push(w);
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
    prepare_target(target, opts.force)?;
    let root_fd = walk::open_root(target).map_err(|e| Error::io("open", target)(errno(e)))?;
    materialize(
        repo,
        snap,
        path,
        &jobs,
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
    materialize(
        repo, snap, path, &jobs, root, target, opts, progress, started,
    )
}

/// The three passes, into the open directory `root`.
#[allow(clippy::too_many_arguments)]
fn materialize(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    jobs: &[Selection],
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
        as_root: rustix::process::geteuid().is_root(),
        force: opts.force,
        progress,
        files: AtomicU64::new(0),
        dirs: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        warnings: Mutex::new(Vec::new()),
        hardlinks: Mutex::new(Vec::new()),
        written: Mutex::new(HashMap::new()),
        dir_meta: Mutex::new(Vec::new()),
    };
    for job in jobs {
        materialize_job(&ctx, root, job, target)?;
    }
    // Pass 2: hardlinks.
    let links = std::mem::take(&mut *ctx.hardlinks.lock().expect("lock"));
    let mut written = std::mem::take(&mut *ctx.written.lock().expect("lock"));
    for link in links {
        make_hardlink(&ctx, root, &link, &mut written, target)?;
    }
    // Pass 3: directory metadata, deepest first.
    let mut dirs = std::mem::take(&mut *ctx.dir_meta.lock().expect("lock"));
    dirs.sort_by_key(|d| {
        let p = &d.dest;
        std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count() + usize::from(!p.is_empty()))
    });
    crate::crash::pause("restore before directory metadata");
    for d in dirs {
        let fd = reopen_dir(root, &d, target)?;
        apply_meta_fd(&ctx, fd.as_fd(), &d.entry, &d.dest, target)?;
    }
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

fn materialize_job(
    ctx: &Ctx<'_>,
    root: BorrowedFd<'_>,
    job: &Selection,
    target: &Path,
) -> Result<()> {
    if job.dest.is_empty() {
        // The job's entry is a directory restored as the target itself.
        let Kind::Dir { tree } = job.entry.kind else {
            unreachable!("only directories map onto the target")
        };
        ctx.dirs.fetch_add(1, Ordering::Relaxed);
        let st = walk::stat_fd(root).map_err(io_err("stat", target, b""))?;
        ctx.dir_meta.lock().expect("lock").push(DirMeta {
            dest: Vec::new(),
            entry: job.entry.clone(),
            ino: (st.dev, st.ino),
        });
        return restore_dir(ctx, root, &tree, b"", &job.source_path, job, target);
    }
    let name = CString::new(job.dest.clone()).map_err(|_| Error::Usage("bad name".into()))?;
    restore_entry(
        ctx,
        root,
        &name,
        &job.entry,
        &job.dest,
        &job.source_path,
        job,
        target,
    )
}

/// Restores the entries of a tree into `dir`, which is `dest` below the target and
/// `src` below the volume root.
fn restore_dir(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    tree_id: &Id,
    dest: &[u8],
    src: &[u8],
    job: &Selection,
    target: &Path,
) -> Result<()> {
    let tree = tree::load(ctx.repo, tree_id).map_err(|e| Error::Corrupt {
        what: "directory",
        path: walk::display_path(target, dest),
        detail: format!("not restored: {e}"),
    })?;
    tree.entries.par_iter().try_for_each(|entry| {
        let child_dest = walk::join_rel(dest, &entry.name);
        let child_src = walk::join_rel(src, &entry.name);
        let name = CString::new(entry.name.clone()).expect("tree names hold no NUL");
        restore_entry(ctx, dir, &name, entry, &child_dest, &child_src, job, target)
    })
}

fn io_err(op: &'static str, target: &Path, dest: &[u8]) -> impl FnOnce(Errno) -> Error {
    let path = walk::display_path(target, dest);
    move |e| Error::io(op, path)(errno(e))
}

fn remove_existing(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    keep_dir: bool,
    dest: &[u8],
    target: &Path,
) -> Result<()> {
    if !ctx.force {
        return Ok(());
    }
    match walk::stat_at(dir, name) {
        Ok(s) if s.file_type == FileType::Directory => {
            if !keep_dir {
                return Err(Error::Usage(format!(
                    "cannot replace directory {} with a non-directory",
                    walk::display_path(target, dest).display()
                )));
            }
            Ok(())
        }
        Ok(_) => rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty())
            .map_err(io_err("remove", target, dest)),
        Err(_) => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn restore_entry(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CString,
    entry: &Entry,
    dest: &[u8],
    src: &[u8],
    job: &Selection,
    target: &Path,
) -> Result<()> {
    let is_dir = matches!(entry.kind, Kind::Dir { .. });
    if !matches!(entry.kind, Kind::Hardlink { .. }) {
        remove_existing(ctx, dir, name, is_dir, dest, target)?;
    }
    match &entry.kind {
        Kind::Dir { tree } => {
            match rustix::fs::mkdirat(dir, name.as_c_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(Errno::EXIST) if ctx.force => {}
                Err(e) => return Err(io_err("create directory", target, dest)(e)),
            }
            let fd = walk::open_dir_at(dir, name)
                .map_err(|e| replaced_or(e, "open directory", target, dest))?;
            let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", target, dest))?;
            ctx.dirs.fetch_add(1, Ordering::Relaxed);
            ctx.dir_meta.lock().expect("lock").push(DirMeta {
                dest: dest.to_vec(),
                entry: entry.clone(),
                ino: (st.dev, st.ino),
            });
            restore_dir(ctx, fd.as_fd(), tree, dest, src, job, target)
        }
        Kind::File { size, chunks } => {
            let file = write_file(ctx, dir, name, *size, chunks, dest, target)?;
            apply_meta_fd(ctx, file.as_fd(), entry, dest, target)?;
            ctx.written
                .lock()
                .expect("lock")
                .insert((job.volume.clone(), src.to_vec()), dest.to_vec());
            Ok(())
        }
        Kind::Hardlink {
            target: link_target,
        } => {
            ctx.hardlinks.lock().expect("lock").push(PendingLink {
                dest: dest.to_vec(),
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
                dest,
            ))?;
            ctx.files.fetch_add(1, Ordering::Relaxed);
            apply_meta_at(ctx, dir, name, entry, dest, target)
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
                    walk::display_path(target, dest).display()
                ));
                return Ok(());
            }
            rustix::fs::mknodat(dir, name.as_c_str(), ft, Mode::from_raw_mode(0o600), rdev)
                .map_err(io_err("create node", target, dest))?;
            crate::crash::pause("restore created a node");
            ctx.files.fetch_add(1, Ordering::Relaxed);
            apply_meta_at(ctx, dir, name, entry, dest, target)
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
    dest: &[u8],
    target: &Path,
) -> Result<File> {
    let fd: OwnedFd = rustix::fs::openat(
        dir,
        name.as_c_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io_err("create file", target, dest))?;
    let file = File::from(fd);
    let corrupt = |detail: String| Error::Corrupt {
        what: "file in snapshot",
        path: walk::display_path(target, dest),
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
                            .map_err(Error::io("write", walk::display_path(target, dest)))?;
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
            .map_err(Error::io("truncate", walk::display_path(target, dest)))
    })();
    if let Err(e) = result {
        drop(file);
        let _ = rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty());
        return Err(match e {
            Error::BadBlob { .. } | Error::MissingChunk { .. } => Error::Corrupt {
                what: "content of",
                path: walk::display_path(target, dest),
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
    dest: &[u8],
    target: &Path,
) -> Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| replaced_or(e, "open", target, dest))?;
    let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", target, dest))?;
    let (kind, rdev) = match entry.kind {
        Kind::Symlink { .. } => (FileType::Symlink, None),
        Kind::Fifo => (FileType::Fifo, None),
        Kind::CharDevice { rdev } => (FileType::CharacterDevice, Some(rdev)),
        Kind::BlockDevice { rdev } => (FileType::BlockDevice, Some(rdev)),
        _ => unreachable!("files and directories have descriptors of their own"),
    };
    if st.file_type != kind || rdev.is_some_and(|r| r != st.rdev) {
        return Err(Error::Replaced {
            path: walk::display_path(target, dest),
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
        .map_err(io_err("change owner of", target, dest))?;
    }
    if kind != FileType::Symlink {
        rustix::fs::chmod(&*path, Mode::from_raw_mode(entry.mode)).map_err(io_err(
            "change mode of",
            target,
            dest,
        ))?;
    }
    for x in &entry.xattrs {
        if let Err(e) =
            rustix::fs::setxattr(&*path, x.name.as_slice(), &x.value, XattrFlags::empty())
        {
            ctx.warn(format!(
                "{}: extended attribute {} not restored: {}",
                walk::display_path(target, dest).display(),
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
    .map_err(io_err("set times of", target, dest))
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
fn replaced_or(e: Errno, op: &'static str, target: &Path, dest: &[u8]) -> Error {
    match e {
        Errno::LOOP | Errno::NOTDIR | Errno::NOENT => Error::Replaced {
            path: walk::display_path(target, dest),
            detail: format!("{op}: {}", errno(e)),
        },
        other => io_err(op, target, dest)(other),
    }
}

/// Reopens a directory restore created, for its metadata: each level without
/// following symlinks, and the directory itself only if it is still the inode restore
/// made (a directory renamed away and replaced, by a symlink or anything else, gets
/// nothing).
fn reopen_dir(root: BorrowedFd<'_>, d: &DirMeta, target: &Path) -> Result<OwnedFd> {
    let fd = match open_parent(root, &d.dest, target)? {
        (parent, Some(name)) => walk::open_dir_at(parent.as_fd(), &name)
            .map_err(|e| replaced_or(e, "open directory", target, &d.dest))?,
        (fd, None) => fd,
    };
    let st = walk::stat_fd(fd.as_fd()).map_err(io_err("stat", target, &d.dest))?;
    if (st.dev, st.ino) != d.ino {
        return Err(Error::Replaced {
            path: walk::display_path(target, &d.dest),
            detail: "it is another directory than the one restore created".into(),
        });
    }
    Ok(fd)
}

/// Owner, mode, xattrs, then times, through a descriptor of a file restore wrote or a
/// directory it created.
fn apply_meta_fd(
    ctx: &Ctx<'_>,
    fd: BorrowedFd<'_>,
    entry: &Entry,
    dest: &[u8],
    target: &Path,
) -> Result<()> {
    if ctx.as_root {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(entry.uid)),
            Some(rustix::fs::Gid::from_raw(entry.gid)),
        )
        .map_err(io_err("change owner of", target, dest))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(entry.mode)).map_err(io_err(
        "change mode of",
        target,
        dest,
    ))?;
    for x in &entry.xattrs {
        if let Err(e) = rustix::fs::fsetxattr(fd, x.name.as_slice(), &x.value, XattrFlags::empty())
        {
            ctx.warn(format!(
                "{}: extended attribute {} not restored: {}",
                walk::display_path(target, dest).display(),
                String::from_utf8_lossy(&x.name),
                errno(e)
            ));
        }
    }
    rustix::fs::futimens(fd, &timestamps(entry.mtime_ns)).map_err(io_err(
        "set times of",
        target,
        dest,
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
    let mut fd = rustix::io::dup(root).map_err(io_err("open", target, b""))?;
    if dest.is_empty() {
        return Ok((fd, None));
    }
    let parts: Vec<&[u8]> = dest.split(|&b| b == b'/').collect();
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let name = CString::new(*part).expect("names hold no NUL");
        fd = walk::open_dir_at(fd.as_fd(), &name)
            .map_err(|e| replaced_or(e, "open directory", target, &parts[..=i].join(&b'/')))?;
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
    target: &Path,
) -> Result<()> {
    let (dest, entry, link_target) = (&link.dest[..], &link.entry, &link.target[..]);
    let (link_dir, link_name) = open_parent(root, dest, target)?;
    let link_name = link_name.expect("a hardlink is never the target itself");
    remove_existing(ctx, link_dir.as_fd(), &link_name, false, dest, target)?;
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
            Err(e) => return Err(io_err("create hardlink", target, dest)(e)),
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
            let file = write_file(
                ctx,
                link_dir.as_fd(),
                &link_name,
                size,
                &chunks,
                dest,
                target,
            )?;
            apply_meta_fd(ctx, file.as_fd(), entry, dest, target)
        }
        _ => Err(Error::Corrupt {
            what: "hardlink",
            path: walk::display_path(target, dest),
            detail: format!(
                "its target {:?} is not a file in the snapshot",
                String::from_utf8_lossy(link_target)
            ),
        }),
    }
}

//! Export: a snapshot, one path of it, or one volume, as a tar stream (plain, gzip
//! with every core, or zstd) that any tar reads.
//!
//! The archive is built sequentially in depth-first name order, so it is deterministic:
//! the same snapshot gives the same bytes. File contents stream chunk by chunk, each
//! verified against its hash before a byte of it is written; memory stays bounded by
//! one chunk plus the compressor's buffers, whatever the snapshot's size.
//! Names come from validated trees (no `..`, no `/` inside a name, never absolute), so
//! the archive is safe to extract; every file entry holds exactly the bytes its header
//! announces, or the export fails.
//! Deliberately absent: sparse entries (holes are written as zeros; extraction
//! round-trips the content), user and group names (owners are numeric).

mod archive;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::limits::PATH_DEPTH_MAX;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::Listed;
use crate::snapshot::select::{self, LinkTargets, Selection};
use crate::tree::{self, DirEntries, Entry, Kind, Run};

/// Archive formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    TarGz,
    Tar,
    TarZst,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "tar.gz" | "tgz" => Some(Format::TarGz),
            "tar" => Some(Format::Tar),
            "tar.zst" | "tzst" => Some(Format::TarZst),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Format::TarGz => "tar.gz",
            Format::Tar => "tar",
            Format::TarZst => "tar.zst",
        }
    }
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub format: Format,
    /// Compression level (gzip 1-9, default 6; zstd 1-19, default 3).
    pub level: Option<u32>,
    /// Export only this volume of a multi-volume snapshot.
    pub volume: Option<String>,
    /// Compression threads (default: every core).
    pub threads: Option<usize>,
}

/// What an export did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// File content bytes read from the repository.
    pub bytes_in: u64,
    /// Archive bytes written.
    pub bytes_out: u64,
    pub entries: u64,
    pub duration_ms: u64,
}

/// Counts the bytes that reach the final writer, and refuses more once the export is
/// abandoned.
struct Counting<W> {
    inner: W,
    count: Arc<AtomicU64>,
    abandoned: Arc<AtomicBool>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("export abandoned"));
        }
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `path` of `snap` to `out` as an archive. `out` receives the complete archive
/// only if this returns `Ok`; on error it holds a truncated stream, which the caller
/// must discard.
pub fn export<W: Write + Send + 'static>(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    out: W,
    opts: &Options,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    crate::crash::pause("export started");
    let _lease = repo.lease_for("export", snap)?;
    let selections = select::select(repo, snap, path, opts.volume.as_deref())?;
    let link_targets = select::survey(repo, &selections)?;
    if path.iter().all(|&b| b == b'/')
        && (opts.volume.is_none() || snap.snapshot.volumes.len() == 1)
    {
        progress.set_total(snap.snapshot.stats.bytes);
    }
    let count = Arc::new(AtomicU64::new(0));
    let abandoned = Arc::new(AtomicBool::new(false));
    let counting = Counting {
        inner: out,
        count: count.clone(),
        abandoned: abandoned.clone(),
    };
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut writer =
        archive::Compressor::new(counting, opts.format, opts.level, threads, abandoned)?;
    let mut ctx = Ctx {
        repo,
        progress,
        link_targets,
        written: HashMap::new(),
        bytes_in: 0,
        entries: 0,
    };
    {
        let mut tar = archive::TarWriter::new(&mut writer);
        for s in &selections {
            ctx.export_selection(&mut tar, s)?;
        }
        tar.finish()?;
    }
    writer.finish()?;
    Ok(Report {
        bytes_in: ctx.bytes_in,
        bytes_out: count.load(Ordering::Relaxed),
        entries: ctx.entries,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

struct Ctx<'a> {
    repo: &'a Repository,
    progress: &'a Progress,
    /// The paths hardlinks name (`select::survey`): only those files are recorded in
    /// `written`.
    link_targets: LinkTargets,
    /// Files already in the archive that a hardlink names: (volume label, source
    /// path) → archive path.
    written: HashMap<(String, Vec<u8>), Vec<u8>>,
    bytes_in: u64,
    entries: u64,
}

impl Ctx<'_> {
    fn export_selection(&mut self, tar: &mut archive::TarWriter<'_>, s: &Selection) -> Result<()> {
        match &s.entry.kind {
            Kind::Dir { tree } if s.dest.is_empty() => {
                // The directory is the top of the archive: "./" carries its metadata.
                tar.dir(b".", &s.entry)?;
                self.entries += 1;
                self.export_tree(tar, tree, b"", &s.source_path, s)
            }
            _ => self.export_entry(tar, &s.entry, &s.dest, &s.source_path, s),
        }
    }

    /// Writes everything below the directory `tree_id` (at `dest` in the archive and
    /// `src` below the volume root), in depth-first name order, with an explicit
    /// stack: memory per level is one frame and one name in each shared path, and a
    /// split directory is read one part at a time. (The archive itself holds every
    /// entry's whole path, as tar requires.)
    fn export_tree(
        &mut self,
        tar: &mut archive::TarWriter<'_>,
        tree_id: &Id,
        dest: &[u8],
        src: &[u8],
        s: &Selection,
    ) -> Result<()> {
        struct Frame {
            entries: DirEntries,
            dest_added: usize,
            src_added: usize,
        }
        let (mut dest, mut src) = (dest.to_vec(), src.to_vec());
        let mut stack = vec![Frame {
            entries: self.open_tree(tree_id, &dest)?,
            dest_added: 0,
            src_added: 0,
        }];
        while let Some(top) = stack.last_mut() {
            let next = top
                .entries
                .next(self.repo)
                .map_err(|e| not_exported(&dest, e))?;
            let Some(entry) = next else {
                let frame = stack.pop().expect("a frame");
                dest.truncate(dest.len() - frame.dest_added);
                src.truncate(src.len() - frame.src_added);
                continue;
            };
            let (dest_len, src_len) = (dest.len(), src.len());
            push_name(&mut dest, &entry.name);
            push_name(&mut src, &entry.name);
            let Kind::Dir { tree } = &entry.kind else {
                self.export_entry(tar, &entry, &dest, &src, s)?;
                dest.truncate(dest_len);
                src.truncate(src_len);
                continue;
            };
            self.entries += 1;
            tar.dir(&dest, &entry)?;
            let mut entries = self.open_tree(tree, &dest)?;
            if stack.len() >= PATH_DEPTH_MAX
                && entries
                    .peek(self.repo)
                    .map_err(|e| not_exported(&dest, e))?
                    .is_some()
            {
                // `select::survey` refuses such a tree before anything is written.
                return Err(not_exported(
                    &dest,
                    format!("nested deeper than {PATH_DEPTH_MAX} levels"),
                ));
            }
            stack.push(Frame {
                entries,
                dest_added: dest.len() - dest_len,
                src_added: src.len() - src_len,
            });
        }
        Ok(())
    }

    fn open_tree(&self, tree_id: &Id, dest: &[u8]) -> Result<DirEntries> {
        DirEntries::open(self.repo, tree_id).map_err(|e| not_exported(dest, e))
    }

    fn export_entry(
        &mut self,
        tar: &mut archive::TarWriter<'_>,
        entry: &Entry,
        dest: &[u8],
        src: &[u8],
        s: &Selection,
    ) -> Result<()> {
        self.entries += 1;
        match &entry.kind {
            Kind::Dir { tree } => {
                tar.dir(dest, entry)?;
                self.export_tree(tar, tree, dest, src, s)
            }
            Kind::File { size, chunks } => {
                self.file(tar, dest, entry, *size, chunks)?;
                if self.link_targets.contains_path(&s.volume, src) {
                    self.written
                        .insert((s.volume.clone(), src.to_vec()), dest.to_vec());
                }
                Ok(())
            }
            Kind::Hardlink { target } => {
                let key = (s.volume.clone(), target.clone());
                if let Some(first) = self.written.get(&key) {
                    return tar.hardlink(dest, entry, first);
                }
                // The first name is outside what is exported: this name carries the content.
                let components = tree::split_path(target).map_err(Error::Usage)?;
                match tree::resolve(self.repo, &s.volume_root, &components)? {
                    Some(Entry {
                        kind: Kind::File { size, chunks },
                        ..
                    }) => {
                        self.file(tar, dest, entry, size, &chunks)?;
                        self.written.insert(key, dest.to_vec());
                        Ok(())
                    }
                    _ => Err(Error::Corrupt {
                        what: "hardlink",
                        path: String::from_utf8_lossy(dest).into_owned().into(),
                        detail: format!(
                            "its target {:?} is not a file in the snapshot",
                            String::from_utf8_lossy(target)
                        ),
                    }),
                }
            }
            Kind::Symlink { target } => tar.symlink(dest, entry, target),
            Kind::Fifo | Kind::CharDevice { .. } | Kind::BlockDevice { .. } => {
                tar.node(dest, entry)
            }
        }
    }

    fn file(
        &mut self,
        tar: &mut archive::TarWriter<'_>,
        dest: &[u8],
        entry: &Entry,
        size: u64,
        chunks: &[Run],
    ) -> Result<()> {
        let mut reader = ChunkReader {
            repo: self.repo,
            runs: chunks,
            next: 0,
            repeats: 0,
            buf: Vec::new(),
            at: 0,
            total: 0,
            size,
            progress: self.progress,
        };
        tar.file(dest, entry, size, &mut reader)
            .map_err(|e| match e {
                Error::BadBlob { .. } | Error::MissingChunk { .. } | Error::Corrupt { .. } => {
                    Error::Corrupt {
                        what: "content of",
                        path: String::from_utf8_lossy(dest).into_owned().into(),
                        detail: format!("not exported: {e}"),
                    }
                }
                other => other,
            })?;
        self.bytes_in += size;
        self.progress.add(1, 0);
        Ok(())
    }
}

fn push_name(path: &mut Vec<u8>, name: &[u8]) {
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name);
}

fn not_exported(dest: &[u8], e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what: "directory",
        path: String::from_utf8_lossy(dest).into_owned().into(),
        detail: format!("not exported: {e}"),
    }
}

/// Reads a file's content chunk by chunk, each verified; fails unless the chunks hold
/// exactly `size` bytes. A run's chunk is read and verified once and repeated from
/// memory (a hole of any size costs one chunk of memory and streams as zeros).
struct ChunkReader<'a> {
    repo: &'a Repository,
    runs: &'a [Run],
    /// The next run to read.
    next: usize,
    /// Times `buf` is still to be served again (the rest of its run).
    repeats: u64,
    buf: Vec<u8>,
    at: usize,
    total: u64,
    size: u64,
    progress: &'a Progress,
}

impl ChunkReader<'_> {
    /// The next piece of content, or an empty slice at the end.
    pub fn fill(&mut self) -> Result<&[u8]> {
        // A loop, so an empty chunk (never written, but trees are not trusted) is
        // skipped rather than taken for the end of the content.
        while self.at == self.buf.len() {
            if self.repeats > 0 {
                self.repeats -= 1;
                self.at = 0;
            } else if self.next == self.runs.len() {
                if self.total != self.size {
                    return Err(Error::Corrupt {
                        what: "file in snapshot",
                        path: Default::default(),
                        detail: format!(
                            "chunks hold {} bytes, the tree says {}",
                            self.total, self.size
                        ),
                    });
                }
                return Ok(&[]);
            } else {
                let run = self.runs[self.next];
                self.buf = self.repo.read_blob(&run.id)?;
                self.next += 1;
                self.repeats = if self.buf.is_empty() {
                    0
                } else {
                    run.count - 1
                };
                self.at = 0;
            }
            self.total += self.buf.len() as u64;
            self.progress.add(0, self.buf.len() as u64);
            if self.total > self.size {
                return Err(Error::Corrupt {
                    what: "file in snapshot",
                    path: Default::default(),
                    detail: format!(
                        "chunks hold more than the {} bytes the tree says",
                        self.size
                    ),
                });
            }
        }
        Ok(&self.buf[self.at..])
    }

    pub fn consume(&mut self, n: usize) {
        self.at += n;
    }
}

/// Exports to `dest` through a temporary file in the same directory, renamed into
/// place only when the archive is complete: a failed export leaves no file behind.
pub fn export_to_file(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    dest: &std::path::Path,
    opts: &Options,
    progress: &Progress,
) -> Result<Report> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".volsnap-export-")
        .tempfile_in(dir)
        .map_err(Error::io("create temporary file in", dir))?;
    let file = tmp.reopen().map_err(Error::io("open", tmp.path()))?;
    let report = export(repo, snap, path, crate::crash::Faulty(file), opts, progress)?;
    crate::crash::point("export wrote the archive");
    crate::crash::before_fsync(std::os::fd::AsFd::as_fd(tmp.as_file()))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(Error::io("fsync", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| Error::io("rename into place", dest)(e.error))?;
    Ok(report)
}

//! Reading a volume: directory listing, lstat, symlink targets and extended attributes,
//! all relative to open directory descriptors.
//!
//! Working from descriptors (`openat`, `fstatat`, `readlinkat`) rather than paths means
//! no path length limit (trees deeper than PATH_MAX walk fine), no symlink is ever
//! followed (every open uses `O_NOFOLLOW`), and a directory renamed during the walk
//! cannot redirect it outside the volume. Nothing but a regular file is ever opened for
//! reading: file contents are opened through an `O_PATH` descriptor checked first
//! (`open_regular_at`), so a device node swapped in after the stat is never opened.
//! Deliberately absent: content reads and chunking (`snapshot` owns them), and mmap of
//! live files.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::tree::Xattr;

/// What a snapshot needs of `struct stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub file_type: FileType,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    pub nlink: u64,
    pub rdev: u64,
}

impl Stat {
    // `struct stat` field types differ between architectures; the casts are no-ops on some.
    #[allow(clippy::unnecessary_cast)]
    fn from_raw(s: &rustix::fs::Stat) -> Stat {
        Stat {
            file_type: FileType::from_raw_mode(s.st_mode as _),
            mode: s.st_mode as u32 & 0o7777,
            uid: s.st_uid as u32,
            gid: s.st_gid as u32,
            size: s.st_size as u64,
            mtime_ns: s.st_mtime as i64 * 1_000_000_000 + s.st_mtime_nsec as i64,
            ctime_ns: s.st_ctime as i64 * 1_000_000_000 + s.st_ctime_nsec as i64,
            ino: s.st_ino as u64,
            dev: s.st_dev as u64,
            nlink: s.st_nlink as u64,
            rdev: s.st_rdev as u64,
        }
    }
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Stat, Errno> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map(|s| Stat::from_raw(&s))
}

/// `fstat` of an open file.
pub fn stat_fd(fd: BorrowedFd<'_>) -> Result<Stat, Errno> {
    rustix::fs::fstat(fd).map(|s| Stat::from_raw(&s))
}

/// Opens a directory given by path (a volume root), not following a final symlink.
pub fn open_root(path: &Path) -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
}

/// Opens the subdirectory `name` of `dir` without following symlinks.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
}

/// What `open_regular_at` found under a name the walk had seen as a regular file.
#[derive(Debug)]
pub enum Opened {
    /// The regular file, open for reading, with its `fstat`.
    File(OwnedFd, Stat),
    /// Something else now: another kind of entry, or an entry of another filesystem
    /// (a mount placed over the name). Never opened for reading.
    Replaced(Stat),
}

/// Opens `name` in `dir` for reading only if it is still a regular file on the device
/// the walk saw (`seen`), without ever opening anything else.
///
/// A container can replace a file by a device node or a fifo between the walk's
/// `fstatat` and this open; opening a device runs its driver's `open` (a watchdog
/// arms, a tape rewinds). So the name is first opened with `O_PATH | O_NOFOLLOW`, which
/// runs no driver code and blocks on nothing, the descriptor is `fstat`ed, and only a
/// regular file is reopened for reading through `/proc/self/fd/N`: that magic link
/// names the inode the `O_PATH` descriptor holds, whatever the name holds by then.
/// A regular file replaced by another regular file (an atomic rename over it) is read:
/// it is what the name holds, and the caller records this descriptor's `fstat`.
pub fn open_regular_at(dir: BorrowedFd<'_>, name: &CStr, seen: &Stat) -> Result<Opened, Errno> {
    let path_fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let found = stat_fd(path_fd.as_fd())?;
    if found.file_type != FileType::RegularFile || found.dev != seen.dev {
        return Ok(Opened::Replaced(found));
    }
    let proc =
        CString::new(format!("/proc/self/fd/{}", path_fd.as_raw_fd())).expect("no NUL in a number");
    // No O_NOFOLLOW: the final component is the magic link itself. NOCTTY and NONBLOCK
    // change nothing for a regular file; they are there should anything else get through.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let fd = match rustix::fs::open(&*proc, flags | OFlags::NOATIME, Mode::empty()) {
        Err(Errno::PERM) => rustix::fs::open(&*proc, flags, Mode::empty()),
        other => other,
    }?;
    let stat = stat_fd(fd.as_fd())?;
    if stat.file_type != FileType::RegularFile || (stat.dev, stat.ino) != (found.dev, found.ino) {
        return Ok(Opened::Replaced(stat));
    }
    Ok(Opened::File(fd, stat))
}

/// The names in a directory, except `.` and `..`, sorted by raw bytes.
pub fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<CString>, Errno> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        names.push(name.to_owned());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// The target of the symlink `name` in `dir`.
pub fn read_link_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Vec<u8>, Errno> {
    rustix::fs::readlinkat(dir, name, Vec::new()).map(|t| t.into_bytes())
}

/// A path naming `name` inside `dir` through procfs, for the `l*xattr` calls that have
/// no descriptor-relative form. Short whatever the depth of `dir`.
pub fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    CString::new(p).expect("names hold no NUL")
}

/// `/proc/self/fd/N` for an open descriptor: calls that take a path act through it on
/// the inode the descriptor holds (even an `O_PATH` descriptor of a symlink: the
/// symlink itself, never its target).
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

fn list_with(mut get: impl FnMut(&mut [u8]) -> Result<usize, Errno>) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; 1024];
    loop {
        match get(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < (1 << 24) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
}

fn collect_xattrs(
    mut list: impl FnMut(&mut [u8]) -> Result<usize, Errno>,
    mut get: impl FnMut(&CStr, &mut [u8]) -> Result<usize, Errno>,
) -> Result<Vec<Xattr>, Errno> {
    let names = match list_with(&mut list) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        match list_with(|buf| get(&cname, buf)) {
            Ok(value) => out.push(Xattr {
                name: name.to_vec(),
                value,
            }),
            Err(Errno::NODATA) => {} // removed since listed
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Extended attributes of an open file or directory.
pub fn xattrs_fd(fd: BorrowedFd<'_>) -> Result<Vec<Xattr>, Errno> {
    collect_xattrs(
        |buf| rustix::fs::flistxattr(fd, buf),
        |name, buf| rustix::fs::fgetxattr(fd, name, buf),
    )
}

/// Extended attributes of `name` in `dir`, not following a symlink.
pub fn xattrs_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Vec<Xattr>, Errno> {
    let path = proc_path(dir, name);
    collect_xattrs(
        |buf| rustix::fs::llistxattr(&*path, buf),
        |n, buf| rustix::fs::lgetxattr(&*path, n, buf),
    )
}

/// A path for messages: `root/rel` with `rel` as raw bytes.
pub fn display_path(root: &Path, rel: &[u8]) -> std::path::PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// Joins a relative path and a name with '/'.
pub fn join_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        out.extend_from_slice(rel);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// Raises the soft open-files limit to the hard limit: a parallel walk holds one
/// descriptor per directory level per worker.
pub fn raise_fd_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if limit.current < limit.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

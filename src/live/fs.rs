//! Filesystem operations of a live restore: moving entries, a directory's own
//! attributes, making a staged tree durable, and removing trees without ever crossing
//! into another filesystem mounted inside them.
//!
//! A target's contents belong to an untrusted writer (a container) that can rename or
//! swap any entry at any instant, including the staging and holding directories an
//! entry swap keeps inside the target. So the directories volsnap makes for itself are
//! created exclusively and then used only through descriptors, and one found again by
//! name is reopened without following symlinks and used only if it is the inode
//! volsnap recorded.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;

use super::journal::{Ino, RootAttrs};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::walk;

/// Renames every entry of the open directory `from` (except the names in `skip`) into
/// the open directory `to`, never replacing anything, then makes both durable. Both
/// sides are descriptors: an entry swapped for a symlink in either cannot redirect a
/// move.
pub fn move_entries(
    from: BorrowedFd<'_>,
    from_path: &Path,
    to: BorrowedFd<'_>,
    to_path: &Path,
    skip: &[&CStr],
) -> Result<()> {
    let names =
        walk::list_dir(from).map_err(|e| Error::io("read directory", from_path)(e.into()))?;
    for name in names {
        if skip.contains(&name.as_c_str()) {
            continue;
        }
        fsutil::rename_new_at(from, &name, to, &name)
            .map_err(Error::io("move into place", to_path.join(os(&name))))?;
    }
    fsync(from, from_path)?;
    fsync(to, to_path)
}

fn os(name: &CStr) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(name.to_bytes())
}

/// Fsyncs an open directory.
pub fn fsync(dir: BorrowedFd<'_>, path: &Path) -> Result<()> {
    crate::crash::before_fsync(dir)
        .and_then(|()| rustix::fs::fsync(dir).map_err(Into::into))
        .map_err(Error::io("fsync directory", path))
}

/// Opens a directory given by path, not following a final symlink.
pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    crate::walk::open_root(path).map_err(|e| Error::io("open", path)(e.into()))
}

/// The identity of an open file.
pub fn ino_fd(fd: BorrowedFd<'_>, path: &Path) -> Result<Ino> {
    let st = walk::stat_fd(fd).map_err(|e| Error::io("stat", path)(e.into()))?;
    Ok((st.dev, st.ino))
}

/// The last component of a path this restore named (a staging or holding directory;
/// the journal checks their shape).
pub fn name_of(path: &Path) -> CString {
    let name = path.file_name().expect("journaled paths have a name");
    CString::new(name.as_bytes()).expect("paths hold no NUL")
}

/// Creates directory `name` in `parent` for this restore's own use: exclusively (an
/// entry already there, planted or left over, is an error, never reused), mode 0700,
/// then opens it without following symlinks. Returns it and its identity.
pub fn make_dir(parent: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<(OwnedFd, Ino)> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(Errno::EXIST) => {
            return Err(Error::Refused(format!(
                "{} already exists and was not made by this restore; left as it is",
                path.display()
            )));
        }
        Err(e) => return Err(Error::io("create directory", path)(e.into())),
    }
    let fd = open_child_any(parent, name, path)?.ok_or_else(|| Error::Replaced {
        path: path.to_path_buf(),
        detail: "it vanished as soon as it was made".into(),
    })?;
    let ino = ino_fd(fd.as_fd(), path)?;
    Ok((fd, ino))
}

/// Opens directory `name` of `parent` without following a symlink; `None` when
/// nothing is there. Anything but a directory is refused.
fn open_child_any(parent: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<Option<OwnedFd>> {
    match walk::open_dir_at(parent, name) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP | Errno::NOTDIR) => Err(Error::Refused(format!(
            "{} is not the directory volsnap made there (it is a symlink or a file now); \
             left as it is",
            path.display()
        ))),
        Err(e) => Err(Error::io("open", path)(e.into())),
    }
}

/// Opens directory `name` of `parent` without following a symlink, only if it is
/// `expected` (the directory this restore made); `None` when nothing is there.
pub fn open_child(
    parent: BorrowedFd<'_>,
    name: &CStr,
    expected: Ino,
    path: &Path,
) -> Result<Option<OwnedFd>> {
    let Some(fd) = open_child_any(parent, name, path)? else {
        return Ok(None);
    };
    if ino_fd(fd.as_fd(), path)? != expected {
        return Err(Error::Refused(format!(
            "{} is not the directory volsnap made there; left as it is",
            path.display()
        )));
    }
    Ok(Some(fd))
}

/// A directory's own mode, owner, mtime and extended attributes.
pub fn read_root_attrs(fd: BorrowedFd<'_>, path: &Path) -> Result<RootAttrs> {
    let st = crate::walk::stat_fd(fd).map_err(|e| Error::io("stat", path)(e.into()))?;
    let xattrs =
        crate::walk::xattrs_fd(fd).map_err(|e| Error::io("read xattrs of", path)(e.into()))?;
    Ok(RootAttrs {
        mode: st.mode & 0o7777,
        uid: st.uid,
        gid: st.gid,
        mtime_ns: st.mtime_ns,
        xattrs,
    })
}

/// Gives an open directory exactly `a`'s attributes (owner only as root).
pub fn apply_root_attrs(fd: BorrowedFd<'_>, path: &Path, a: &RootAttrs) -> Result<()> {
    use rustix::fs::{Gid, Uid, XattrFlags};
    let fail = |op: &'static str| move |e: rustix::io::Errno| Error::io(op, path)(e.into());
    if rustix::process::geteuid().is_root() {
        rustix::fs::fchown(fd, Some(Uid::from_raw(a.uid)), Some(Gid::from_raw(a.gid)))
            .map_err(fail("change owner of"))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(a.mode)).map_err(fail("change mode of"))?;
    for x in crate::walk::xattrs_fd(fd).map_err(fail("read xattrs of"))? {
        if !a.xattrs.iter().any(|y| y.name == x.name) {
            rustix::fs::fremovexattr(fd, x.name.as_slice()).map_err(fail("remove xattr of"))?;
        }
    }
    for x in &a.xattrs {
        rustix::fs::fsetxattr(fd, x.name.as_slice(), &x.value, XattrFlags::empty())
            .map_err(fail("set xattr of"))?;
    }
    rustix::fs::futimens(fd, &crate::restore::timestamps(a.mtime_ns)).map_err(fail("set times of"))
}

/// Makes a staged tree durable: the whole filesystem's dirty data (one `syncfs`), then
/// the staging directory and its parent.
pub fn sync_tree(dir: BorrowedFd<'_>, parent: BorrowedFd<'_>, path: &Path) -> Result<()> {
    crate::crash::before_fsync(dir)
        .and_then(|()| rustix::fs::syncfs(dir).map_err(Into::into))
        .map_err(Error::io("syncfs", path))?;
    fsync(dir, path)?;
    fsync(parent, path)
}

pub fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

/// Removes directory `name` of `parent` and everything in it, if it is `expected`
/// (nothing if absent). Refuses, removing nothing more, on reaching a directory of
/// another filesystem: something is mounted inside it, and what is mounted is not this
/// restore's to delete.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &CStr, expected: Ino, path: &Path) -> Result<()> {
    let Some(fd) = open_child(parent, name, expected, path)? else {
        return Ok(());
    };
    remove_children(fd.as_fd(), expected.0, path)?;
    drop(fd);
    unlink(parent, name, AtFlags::REMOVEDIR, path)?;
    fsync(parent, path)
}

/// The identity of entry `name` of `parent` (not following a symlink); `None` when
/// nothing is there.
pub fn ino_at(parent: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<Option<Ino>> {
    match walk::stat_at(parent, name) {
        Ok(st) => Ok(Some((st.dev, st.ino))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(Error::io("stat", path)(e.into())),
    }
}

fn remove_children(dir: BorrowedFd<'_>, dev: u64, path: &Path) -> Result<()> {
    let names = walk::list_dir(dir).map_err(|e| Error::io("read directory", path)(e.into()))?;
    for name in names {
        let here = path.join(os(&name));
        let st = walk::stat_at(dir, &name).map_err(|e| Error::io("stat", &here)(e.into()))?;
        if st.file_type == FileType::Directory {
            if st.dev != dev {
                return Err(Error::Refused(format!(
                    "{} is another filesystem mounted inside a tree volsnap is removing; \
                     unmount it and run `volsnap recover`",
                    here.display()
                )));
            }
            let sub =
                walk::open_dir_at(dir, &name).map_err(|e| Error::io("open", &here)(e.into()))?;
            remove_children(sub.as_fd(), dev, &here)?;
            unlink(dir, &name, AtFlags::REMOVEDIR, &here)?;
        } else {
            unlink(dir, &name, AtFlags::empty(), &here)?;
        }
    }
    Ok(())
}

fn unlink(dir: BorrowedFd<'_>, name: &CStr, flags: AtFlags, here: &Path) -> Result<()> {
    rustix::fs::unlinkat(dir, name, flags).map_err(|e| Error::io("remove", here)(e.into()))
}

/// Every mount point strictly below `dir`.
pub fn mounts_below(dir: &Path, mounts: &[PathBuf]) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.starts_with(dir) && m.as_path() != dir)
        .cloned()
        .collect()
}
